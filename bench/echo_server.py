"""A bare grpc.aio echo server: the baseline for `bench.api_overhead`.

Same process model as the real server (its own Python process, grpc.aio, unary-unary),
but nothing else: one generic handler, bytes in and bytes out, no interceptors.
Binds 127.0.0.1 on a free port, prints that port on stdout, serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal

import grpc

SERVICE = "bench.Echo"
METHOD = "Echo"
FULL_METHOD = f"/{SERVICE}/{METHOD}"


def _identity(message: bytes) -> bytes:
    return message


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve() -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(
        _echo, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
    )
    await serve_on_free_port(server)


async def serve_on_free_port(server: grpc.aio.Server) -> None:
    """Binds 127.0.0.1 on a free port, prints the port, serves until SIGTERM/SIGINT."""
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


if __name__ == "__main__":
    asyncio.run(serve())
