"""Command line: `python -m convergence_server [serve|stack|validate|sql|keys|envoy-config]`."""

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


def _keys(config: Config, args: argparse.Namespace) -> int:
    """`keys issue`: prints a new key of the tenant (once); `keys revoke`: revokes one, even
    the last. Each writes its audit row."""
    from datetime import timedelta

    from convergence_server.clock import make_clock
    from convergence_server.domain.access import AccessLog, Keys
    from convergence_server.domain.runs import PageTokens, page_token_key
    from convergence_server.errors import ConvergenceError
    from convergence_server.storage import open_store

    async def issue() -> int:
        try:
            store = open_store(config)
        except SystemExit as exc:
            print(f"{exc} (is the server running? stop it first)", file=sys.stderr)
            return 2
        clock = make_clock(config.clock_offset_file)
        keys = Keys(
            store,
            config.key_pepper,
            AccessLog(store, clock),
            clock,
            PageTokens(page_token_key(config.key_pepper)),
            max_days=config.key_max_days,
        )
        try:
            if args.keys_command == "revoke":
                revoked = await keys.revoke_any(args.tenant_id, args.key_id)
                print(f"API key {revoked.key_id} of {args.tenant_id} is revoked.")
                return 0
            days = args.expires_days
            expires = clock() + timedelta(days=days) if days else None
            new = await keys.issue(args.tenant_id, args.name, args.scope, expires)
        except ConvergenceError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await store.close()
        print(new.secret)
        print(
            f"API key {new.record.key_id} ({args.name}, {args.scope}) issued for "
            f"{args.tenant_id}; it is shown only this once.",
            file=sys.stderr,
        )
        return 0

    return asyncio.run(issue())


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
    keys = commands.add_parser("keys", help="operator commands for API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    issue = key_commands.add_parser(
        "issue",
        help="issue a new API key for a tenant that lost every key (embedded: stop the "
        "server first); prints it once and writes an audit row",
    )
    issue.add_argument("tenant_id")
    issue.add_argument("--name", required=True, help="a name for the key, e.g. recovery")
    issue.add_argument("--scope", choices=("FULL", "READ_ONLY"), default="FULL")
    issue.add_argument(
        "--expires-days", type=int, default=0, help="days until it expires (default: never)"
    )
    revoke = key_commands.add_parser(
        "revoke",
        help="revoke a tenant's API key, even its last one (embedded: stop the server first)",
    )
    revoke.add_argument("tenant_id")
    revoke.add_argument("key_id")
    render = commands.add_parser("envoy-config", help="print the rendered Envoy config")
    render.add_argument("--grpc-port", type=int, help="upstream port (default: configured)")
    args = parser.parse_args(argv)
    # Only the server and the key commands use the pepper (the launcher's server makes it).
    config = Config.from_env(local_pepper=args.command in (None, "serve", "keys"))
    logs.configure(config.log_level, config.project)
    if args.command in (None, "serve"):
        asyncio.run(_serve(config))
    elif args.command == "validate":
        sys.exit(_validate(config))
    elif args.command == "sql":
        from convergence_server.storage.console import run_sql

        sys.exit(run_sql(config, args.query, args.format))
    elif args.command == "keys":
        sys.exit(_keys(config, args))
    elif args.command == "stack":
        from convergence_server.stack import run_stack

        sys.exit(run_stack(config))
    else:
        from convergence_server.envoy import render_config

        sys.stdout.write(render_config(config, args.grpc_port or config.grpc_port))


if __name__ == "__main__":
    main()
