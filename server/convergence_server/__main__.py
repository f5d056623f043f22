"""Command line: `python -m convergence_server [serve|stack|envoy-config]`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from convergence_server import logs
from convergence_server.config import Config


async def _serve(config: Config) -> None:
    from convergence_server.app import create_server
    from convergence_server.domain.plans import PlanCatalogError
    from convergence_server.engine.templates import TemplateError

    try:
        server = create_server(config)
    except (PlanCatalogError, TemplateError) as exc:
        raise SystemExit(f"convergence: cannot start: {exc}") from None
    await server.serve_until_signalled()


def _validate(config: Config) -> int:
    from convergence_server.domain.plans import PlanCatalogError, load_plans
    from convergence_server.domain.schedules import check_schedule_hints
    from convergence_server.engine.templates import TemplateError, load_catalog

    try:
        plans = load_plans(config.plans_path)
        catalog = load_catalog(config.config_dir)
        check_schedule_hints(catalog)
    except (PlanCatalogError, TemplateError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    for key in sorted(catalog.templates):
        print(f"ok  {key}")
    print(f"{len(catalog.templates)} templates and {len(plans)} plans are valid")
    return 0


def _receive_stop_signals() -> None:
    """Lets SIGTERM and SIGINT reach this process whatever its parent left it: a blocked
    signal stays blocked through exec, and so does an ignored SIGTERM (a server that cannot
    get SIGTERM outlives its launcher). An ignored SIGINT is kept: it is how a shell keeps
    Ctrl-C from its background jobs."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def main(argv: list[str] | None = None) -> None:
    _receive_stop_signals()
    parser = argparse.ArgumentParser(prog="convergence-server")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the gRPC server (default)")
    commands.add_parser("stack", help="run the gRPC server and Envoy (REST) together")
    commands.add_parser("validate", help="check plans.yml and every pipeline template")
    sql = commands.add_parser(
        "sql", help="run BigQuery SQL on the store (embedded: stop the server first)"
    )
    sql.add_argument("query", help="BigQuery SQL; `your-project` is CONVERGENCE_PROJECT")
    sql.add_argument("--format", choices=("table", "json"), default="table")
    render = commands.add_parser("envoy-config", help="print the rendered Envoy config")
    render.add_argument("--grpc-port", type=int, help="upstream port (default: configured)")
    args = parser.parse_args(argv)
    config = Config.from_env()
    logs.configure(config.log_level)
    if args.command in (None, "serve"):
        asyncio.run(_serve(config))
    elif args.command == "validate":
        sys.exit(_validate(config))
    elif args.command == "sql":
        from convergence_server.storage.console import run_sql

        sys.exit(run_sql(config, args.query, args.format))
    elif args.command == "stack":
        from convergence_server.stack import run_stack

        sys.exit(run_stack(config))
    else:
        from convergence_server.envoy import render_config

        sys.stdout.write(render_config(config, args.grpc_port or config.grpc_port))


if __name__ == "__main__":
    main()
