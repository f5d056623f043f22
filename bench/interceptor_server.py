"""The real server with its interceptors off: the baseline for `bench.interceptors`.

`python bench/interceptor_server.py TENANT_ID KEY_ID` builds the service exactly as
`python -m convergence_server serve` does (`create_server`, configured by the same
CONVERGENCE_* variables, the same store, servicers and port binding), but replaces the
standard interceptor chain (errors, request context, auth, quotas) with `FixedCaller`,
which only makes every call come from the given caller, so that servicers that need one
(`require_caller()`) still work without metadata. It prints the same ready line as `serve`
(`{"event": "serving", "grpc_port": N}`) and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from grpc.aio import ServicerContext

from convergence_server import logs
from convergence_server.api.context import caller_var
from convergence_server.api.interceptors import _WrappingInterceptor
from convergence_server.app import create_server
from convergence_server.config import Config
from convergence_server.domain.auth import Caller


class FixedCaller(_WrappingInterceptor):
    """Sets `caller_var` to one fixed caller for every call; nothing else.

    Built on the same wrapper as the real interceptors, so the variable is set inside the
    call's own task, where the servicer reads it.
    """

    def __init__(self, caller: Caller) -> None:
        self._caller = caller

    async def before(self, context: ServicerContext[Any, Any]) -> None:
        caller_var.set(self._caller)


async def serve(config: Config, caller: Caller) -> None:
    await create_server(config, interceptors=[FixedCaller(caller)]).serve_until_signalled()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/interceptor_server.py")
    parser.add_argument("tenant_id", help="the fixed caller's tenant")
    parser.add_argument("key_id", help="the fixed caller's API key id")
    args = parser.parse_args(argv)
    config = Config.from_env()
    logs.configure(config.log_level)
    caller = Caller(tenant_id=args.tenant_id, key_id=args.key_id)
    asyncio.run(serve(config, caller))


if __name__ == "__main__":
    main()
