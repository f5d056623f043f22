"""Command line: `python -m convergence_server [serve|stack|envoy-config]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from convergence_server import logs
from convergence_server.config import Config


async def _serve(config: Config) -> None:
    from convergence_server.app import create_server

    server = create_server(config)
    await server.start()
    # One line on stdout tells a launcher the bound port (the config may ask for port 0).
    print(json.dumps({"event": "serving", "grpc_port": server.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convergence-server")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the gRPC server (default)")
    commands.add_parser("stack", help="run the gRPC server and Envoy (REST) together")
    render = commands.add_parser("envoy-config", help="print the rendered Envoy config")
    render.add_argument("--grpc-port", type=int, help="upstream port (default: configured)")
    args = parser.parse_args(argv)
    config = Config.from_env()
    logs.configure(config.log_level)
    if args.command in (None, "serve"):
        asyncio.run(_serve(config))
    elif args.command == "stack":
        from convergence_server.stack import run_stack

        sys.exit(run_stack(config))
    else:
        from convergence_server.envoy import render_config

        sys.stdout.write(render_config(config, args.grpc_port or config.grpc_port))


if __name__ == "__main__":
    main()
