"""`convergence`: the service from a terminal, over the typed client.

Every command reads the server from `--target` (`CONVERGENCE_TARGET`), the API key from
`CONVERGENCE_API_KEY` (or `--api-key`), the caller from `--user-id` (`CONVERGENCE_USER_ID`)
and the tenant from `--tenant` (`CONVERGENCE_TENANT_ID`; else the key's own, asked of the
server). Exit codes: 0 done (a run that ended COMPLETE), 1 an outcome that failed (a run that
ended FAILED, a dry-run that found the tenant not ready), 2 a usage error or a call the
service refused or could not complete (`error: <message>` on stderr), 3 `run --wait
--timeout` stopped waiting before the run ended (the run goes on).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import click
from google.protobuf import json_format, message, timestamp_pb2
from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from convergence.client import Client
from convergence.errors import ConvergenceError
from convergence.v1 import (
    access_service_pb2,
    run_pb2,
    run_service_pb2,
    schedule_pb2,
    tenant_pb2,
    tenant_service_pb2,
)

__all__ = ["cli", "main"]

EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_STILL_RUNNING = 3
RUN_STATUSES = ("PENDING", "RUNNING", "COMPLETE", "FAILED")
STATUS_STYLES = {"COMPLETE": "green", "PASSED": "green", "FAILED": "red", "WARNING": "yellow"}

# Tables read in a pipe or a log are not cut to 80 columns.
PIPE_WIDTH = 160
out = Console(highlight=False)
if not out.is_terminal and "COLUMNS" not in os.environ:
    out.width = PIPE_WIDTH


@dataclass(frozen=True)
class Settings:
    """The connection options every command shares."""

    target: str
    api_key: str | None
    user_id: str | None
    tenant: str | None

    def anonymous(self) -> Client:
        """A client that sends no key (onboarding)."""
        return Client(self.target)

    def client(self) -> Client:
        """A client with the key; a usage error without one."""
        if not self.api_key:
            raise click.UsageError("no API key: set CONVERGENCE_API_KEY (or pass --api-key)")
        return Client(self.target, api_key=self.api_key, user_id=self.user_id)

    def tenant_id(self, client: Client) -> str:
        """The tenant given, else the one the key belongs to."""
        if self.tenant:
            return self.tenant
        health = client.get_health()
        if not health.HasField("tenant_id"):
            raise click.UsageError("no tenant: set CONVERGENCE_TENANT_ID (or pass --tenant)")
        return health.tenant_id


pass_settings = click.make_pass_decorator(Settings)


def timestamp(value: timestamp_pb2.Timestamp) -> str:
    """An instant as ISO 8601 UTC, empty when unset."""
    if not (value.seconds or value.nanos):
        return ""
    instant = value.ToDatetime(tzinfo=datetime.UTC).replace(microsecond=0)
    return instant.isoformat().replace("+00:00", "Z")


def unbroken(table: Table, header: str, width: int) -> None:
    """A column of identifiers: never cut, so that they can be copied from the table."""
    table.add_column(header, no_wrap=True, min_width=width)


def styled(status: str) -> str:
    style = STATUS_STYLES.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def status_name(status: run_pb2.Run.Status.ValueType) -> str:
    return run_pb2.Run.Status.Name(status)


def parameters(pairs: Sequence[str]) -> dict[str, str]:
    """`name=value` options as a mapping."""
    result: dict[str, str] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--param")
        result[name] = value
    return result


def pipeline_path(value: str) -> tuple[str, str, str]:
    """`PROVIDER/DOMAIN/TEMPLATE` as its three parts."""
    parts = value.split("/")
    if len(parts) != 3 or not all(parts):
        raise click.BadParameter(f"expected PROVIDER/DOMAIN/TEMPLATE, got {value!r}")
    return parts[0], parts[1], parts[2]


def as_dict(found: message.Message) -> dict[str, object]:
    """A message as the REST API shows it: its field names, zero values included."""
    return json_format.MessageToDict(
        found, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(messages: Iterable[message.Message]) -> None:
    """Messages as one JSON array, as the REST API shows them."""
    click.echo(json.dumps([as_dict(m) for m in messages], indent=2))


def print_fields(title: str, fields: Mapping[str, object]) -> None:
    out.print(title, markup=False)
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in fields.items():
        table.add_row(name, str(value))
    out.print(table)


def print_secret(label: str, secret: str) -> None:
    """A key shown once, on a line of its own, with the warning to keep it."""
    out.print(f"[bold]{label}[/bold]")
    click.echo(secret)
    out.print(
        "[yellow]Store this key now (e.g. in your secret store): it is not shown again.[/yellow]"
    )


# Commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--target",
    envvar="CONVERGENCE_TARGET",
    default="127.0.0.1:50051",
    show_default=True,
    help="The server's gRPC address (or Envoy's).",
)
@click.option(
    "--api-key",
    envvar="CONVERGENCE_API_KEY",
    help="The tenant's API key; prefer CONVERGENCE_API_KEY (command lines are visible).",
)
@click.option("--user-id", envvar="CONVERGENCE_USER_ID", help="Recorded for auditing.")
@click.option(
    "--tenant", envvar="CONVERGENCE_TENANT_ID", help="The tenant (default: the key's own)."
)
@click.pass_context
def cli(
    ctx: click.Context,
    target: str,
    api_key: str | None,
    user_id: str | None,
    tenant: str | None,
) -> None:
    """Onboard, run pipelines, and manage runs, keys and schedules of Convergence."""
    ctx.obj = Settings(target=target, api_key=api_key, user_id=user_id, tenant=tenant)


@cli.command()
@click.argument("tenant_id")
@click.option("--company", required=True, help="Company name.")
@click.option("--email", required=True, help="Admin email.")
@click.option("--plan", required=True, help="Subscription plan, e.g. PROFESSIONAL.")
@pass_settings
def onboard(settings: Settings, tenant_id: str, company: str, email: str, plan: str) -> None:
    """Dry-run, then onboard TENANT_ID if it is ready; prints its API key once."""
    with settings.anonymous() as client:
        try:
            report = client.dry_run_onboarding(tenant_id, company, email, plan)
        except ConvergenceError as error:
            if error.report is None:
                raise
            print_report(error.report)
            click.echo(f"error: {error.message}", err=True)
            sys.exit(EXIT_FAILED)
        print_report(report)
        if not report.ready_for_onboarding:
            sys.exit(EXIT_FAILED)
        onboarded = client.onboard_tenant(tenant_id, company, email, plan)
    out.print(f"Onboarded {onboarded.tenant_id} on {onboarded.subscription_plan}.")
    print_secret("API key:", onboarded.api_key)


def print_report(report: tenant_service_pb2.DryRunOnboardingResponse) -> None:
    summary = report.validation_summary
    out.print(f"Dry-run: {summary.passed} of {summary.total_checks} checks passed")
    table = Table()
    table.add_column("check")
    table.add_column("status")
    table.add_column("message", overflow="fold")
    for check in report.validation_results:
        status = tenant_pb2.ValidationCheck.Status.Name(check.status)
        table.add_row(check.check_name, styled(status), check.message)
    out.print(table)
    verdict = "ready for onboarding" if report.ready_for_onboarding else "NOT ready for onboarding"
    out.print(f"{verdict}: {report.message}" if report.message else verdict)


@cli.command()
@pass_settings
def pipelines(settings: Settings) -> None:
    """The templates the tenant can run."""
    with settings.client() as client:
        templates = client.list_pipelines().pipelines
    table = Table()
    table.add_column("pipeline", overflow="fold")
    table.add_column("description")
    table.add_column("schedule", no_wrap=True)
    table.add_column("parameters")
    for template in templates:
        table.add_row(
            f"{template.provider}/{template.domain}/{template.template}",
            template.description,
            template.schedule,
            ", ".join(p.name for p in template.parameters),
        )
    out.print(table)


@cli.command()
@click.argument("pipeline")
@click.option("--date", help="The day to process, YYYY-MM-DD (default: yesterday UTC).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--wait", is_flag=True, help="Follow the run to its end; exit 1 if it fails.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="With --wait: stop waiting after SECONDS and exit 3; the run goes on.",
)
@pass_settings
def run(
    settings: Settings,
    pipeline: str,
    date: str | None,
    params: tuple[str, ...],
    wait: bool,
    timeout: float | None,
) -> None:
    """Triggers PIPELINE (PROVIDER/DOMAIN/TEMPLATE).

    With --wait, the exit code is 0 when the run ends COMPLETE, 1 when it ends FAILED, and 3
    when --timeout passes first (the run keeps going on the server).
    """
    if timeout is not None and not wait:
        raise click.UsageError("--timeout needs --wait")
    provider, domain, template = pipeline_path(pipeline)
    with settings.client() as client:
        started = client.run_pipeline(
            settings.tenant_id(client),
            provider,
            domain,
            template,
            date=date,
            parameters=parameters(params),
            trigger_by=settings.user_id,
        )
        run_id = started.pipeline_logging_id
        out.print(f"Started run {run_id} ({status_name(started.status)})")
        if not wait:
            return
        seen = follow(client, run_id, timeout)
    if seen.status not in (run_pb2.Run.COMPLETE, run_pb2.Run.FAILED):
        state = f" ({status_name(seen.status)})" if seen.status else ""
        waited = f" after {timeout:g} s" if timeout else ""
        out.print(
            f"Stopped waiting{waited}: run {run_id}{state} keeps going on the server; "
            f"`convergence runs show {run_id}` shows how it ends.",
            markup=False,
        )
        sys.exit(EXIT_STILL_RUNNING)
    out.print(f"Run {run_id} ended {styled(status_name(seen.status))}")
    if seen.error_message:
        out.print(seen.error_message, markup=False)
    if seen.status != run_pb2.Run.COMPLETE:
        sys.exit(EXIT_FAILED)


def follow(client: Client, run_id: str, timeout: float | None) -> run_pb2.Run:
    """Shows the run's steps live until it ends, or until `timeout` seconds (None: no limit)
    have passed; returns the run as last seen (an empty one if nothing came in time)."""
    latest = run_service_pb2.WatchRunResponse()
    # A terminal shows the steps live; a log or a pipe gets them once, at the end.
    live = Live(console=out, transient=False, refresh_per_second=8) if out.is_terminal else None
    with (
        contextlib.suppress(TimeoutError),
        live if live is not None else contextlib.nullcontext(),
    ):
        for latest in client.watch_run(run_id, timeout=timeout):
            if live is not None:
                live.update(progress_view(latest))
    if live is None:
        out.print(steps_table(latest.steps))
    return latest.run


def progress_view(update: run_service_pb2.WatchRunResponse) -> Group | Table:
    table = steps_table(update.steps)
    status = status_name(update.run.status)
    if status in ("COMPLETE", "FAILED"):
        return table
    return Group(table, Spinner("dots", text=f"{status} ({len(update.steps)} steps started)"))


def steps_table(steps: Iterable[run_pb2.RunStep]) -> Table:
    table = Table("#", "step", "type", "status", "rows", "ms", "warnings", "error")
    for step in steps:
        table.add_row(
            str(step.step_index),
            step.step_name,
            step.step_type,
            styled(status_name(step.status)),
            str(step.rows_processed),
            str(step.duration_ms),
            str(step.warnings),
            step.error_message,
        )
    return table


def print_runs(found: Sequence[run_pb2.Run]) -> None:
    table = Table()
    unbroken(table, "run", 36)
    table.add_column("pipeline", overflow="fold")
    table.add_column("status")
    table.add_column("trigger")
    table.add_column("created", overflow="fold")
    table.add_column("ms")
    table.add_column("error", overflow="fold")
    for item in found:
        table.add_row(
            item.pipeline_logging_id,
            item.pipeline_id,
            styled(status_name(item.status)),
            item.trigger_type,
            timestamp(item.created_at),
            str(item.duration_ms),
            item.error_message,
        )
    out.print(table)


@cli.group(invoke_without_command=True)
@click.option("--status", type=click.Choice(RUN_STATUSES, case_sensitive=False))
@click.option("--pipeline", "pipeline_id", help="Only this pipeline's runs.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON array instead of a table.")
@click.pass_context
def runs(
    ctx: click.Context, status: str | None, pipeline_id: str | None, limit: int, as_json: bool
) -> None:
    """The tenant's runs, newest first; `runs show|steps|checks|cancel RUN_ID` for one."""
    if ctx.invoked_subcommand is not None:
        return
    settings = ctx.find_object(Settings)
    assert settings is not None
    with settings.client() as client:
        listing = client.list_runs(
            status=status.upper() if status else None, pipeline_id=pipeline_id, page_size=limit
        )
        found = list(itertools.islice(listing, limit))
    if as_json:
        print_json(found)
    else:
        print_runs(found)


json_option = click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")


@runs.command("show")
@click.argument("run_id")
@json_option
@pass_settings
def run_show(settings: Settings, run_id: str, as_json: bool) -> None:
    """One run."""
    with settings.client() as client:
        found = client.get_run(run_id)
    if as_json:
        click.echo(json.dumps(as_dict(found)))
        return
    print_fields(
        f"Run {found.pipeline_logging_id}",
        {
            "pipeline": found.pipeline_id,
            "status": status_name(found.status),
            "trigger": f"{found.trigger_type} by {found.trigger_by}".strip(),
            "parameters": ", ".join(f"{k}={v}" for k, v in sorted(found.parameters.items())),
            "created": timestamp(found.created_at),
            "started": timestamp(found.start_time),
            "ended": timestamp(found.end_time),
            "duration ms": found.duration_ms,
            "warnings": found.warnings,
            "error": found.error_message,
        },
    )


@runs.command("steps")
@click.argument("run_id")
@json_option
@pass_settings
def run_steps(settings: Settings, run_id: str, as_json: bool) -> None:
    """The run's steps, in template order."""
    with settings.client() as client:
        steps = client.list_run_steps(run_id).steps
    if as_json:
        print_json(steps)
    else:
        out.print(steps_table(steps))


@runs.command("checks")
@click.argument("run_id")
@pass_settings
def run_checks(settings: Settings, run_id: str) -> None:
    """The run's data-quality checks."""
    with settings.client() as client:
        checks = client.list_run_checks(run_id).checks
    table = Table("step", "check", "severity", "status", "observed", "expected", "message")
    for check in checks:
        table.add_row(
            check.step_name,
            check.check_name,
            check.severity,
            styled(run_pb2.RunCheck.Status.Name(check.status)),
            check.observed_value,
            check.expected_value,
            check.message,
        )
    out.print(table)


@runs.command("cancel")
@click.argument("run_id")
@pass_settings
def run_cancel(settings: Settings, run_id: str) -> None:
    """Cancels a run (it ends FAILED)."""
    with settings.client() as client:
        cancelled = client.cancel_run(run_id).run
    out.print(f"Run {cancelled.pipeline_logging_id}: {status_name(cancelled.status)}")


@cli.command()
@pass_settings
def usage(settings: Settings) -> None:
    """Today's usage against the plan."""
    with settings.client() as client:
        today = client.get_usage(settings.tenant_id(client))
    print_fields(
        f"Usage of {today.tenant_id} on {today.usage_date} ({today.subscription_plan})",
        {
            "runs today": f"{today.pipelines_run_today} of {today.daily_limit}",
            "succeeded / failed": (
                f"{today.pipelines_succeeded_today} / {today.pipelines_failed_today}"
            ),
            "running": f"{today.concurrent_pipelines_running} of {today.concurrent_limit}",
            "remaining today": today.remaining_today,
            "requests per minute": today.requests_per_minute,
            "team": f"{today.team_members} of {today.team_size}",
        },
    )


# API keys


@cli.group()
def keys() -> None:
    """The tenant's API keys."""


@keys.command("list")
@pass_settings
def keys_list(settings: Settings) -> None:
    """Every key (never a secret)."""
    with settings.client() as client:
        found = client.list_api_keys(settings.tenant_id(client)).keys
    table = Table()
    unbroken(table, "key id", 12)
    table.add_column("name", overflow="fold")
    table.add_column("scope")
    table.add_column("state")
    for header in ("created", "expires", "last used"):
        table.add_column(header, overflow="fold")
    for key in found:
        table.add_row(
            key.key_id,
            key.name,
            access_service_pb2.ApiKey.Scope.Name(key.scope),
            styled(key.state),
            timestamp(key.created_at),
            timestamp(key.expires_at),
            timestamp(key.last_used_at),
        )
    out.print(table)


@keys.command("create")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="Scope READ_ONLY (default FULL).")
@click.option("--expires-days", type=click.IntRange(min=1), help="Expire after N days.")
@pass_settings
def keys_create(settings: Settings, name: str, read_only: bool, expires_days: int | None) -> None:
    """Creates a key; prints its secret once."""
    expires_at = (
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=expires_days)
        if expires_days
        else None
    )
    with settings.client() as client:
        created = client.create_api_key(
            settings.tenant_id(client),
            name,
            scope="READ_ONLY" if read_only else None,
            expires_at=expires_at,
        )
    out.print(f"Created key {created.key.key_id} ({created.key.name}).")
    print_secret("API key:", created.api_key)


@keys.command("revoke")
@click.argument("key_id")
@pass_settings
def keys_revoke(settings: Settings, key_id: str) -> None:
    """Revokes a key, at once."""
    with settings.client() as client:
        revoked = client.revoke_api_key(settings.tenant_id(client), key_id)
    out.print(f"Key {revoked.key_id}: {revoked.state}")


@keys.command("rotate")
@click.argument("key_id")
@click.option("--grace-seconds", type=click.IntRange(min=0), help="Default 86400.")
@pass_settings
def keys_rotate(settings: Settings, key_id: str, grace_seconds: int | None) -> None:
    """Replaces a key; the old one works for the grace period."""
    with settings.client() as client:
        created = client.rotate_api_key(
            settings.tenant_id(client), key_id, grace_seconds=grace_seconds
        )
    out.print(f"Key {key_id} replaced by {created.key.key_id}.")
    print_secret("API key:", created.api_key)


# Webhook


@cli.group()
def webhook() -> None:
    """The URL called when a run fails or a schedule skips slots."""


@webhook.command("show")
@pass_settings
def webhook_show(settings: Settings) -> None:
    """The tenant's webhook."""
    with settings.client() as client:
        found = client.get_webhook(settings.tenant_id(client))
    print_fields(
        "Webhook",
        {"url": found.url, "updated": timestamp(found.update_time), "by": found.updated_by},
    )


@webhook.command("set")
@click.argument("url")
@click.option("--rotate-secret", is_flag=True, help="Issue a new signing secret.")
@pass_settings
def webhook_set(settings: Settings, url: str, rotate_secret: bool) -> None:
    """Sets the webhook; prints its signing secret."""
    with settings.client() as client:
        done = client.set_webhook(settings.tenant_id(client), url, rotate_secret=rotate_secret)
    out.print(f"Webhook set: {done.webhook.url}", markup=False)
    out.print("[bold]Signing secret:[/bold]")
    click.echo(done.signing_secret)


@webhook.command("test")
@pass_settings
def webhook_test(settings: Settings) -> None:
    """Sends a test event now; exit 1 if the receiver does not answer 2xx."""
    with settings.client() as client:
        result = client.test_webhook(settings.tenant_id(client))
    answer = f"HTTP {result.status_code}" if result.status_code else result.error
    out.print(f"Event {result.event_id}: {answer}", markup=False)
    if not result.delivered:
        raise SystemExit(1)


@webhook.command("delete")
@pass_settings
def webhook_delete(settings: Settings) -> None:
    """Deletes the webhook."""
    with settings.client() as client:
        client.delete_webhook(settings.tenant_id(client))
    out.print("Webhook deleted.")


# Schedules


@cli.group()
def schedules() -> None:
    """The tenant's schedules."""


def print_schedule(schedule: schedule_pb2.Schedule) -> None:
    out.print(
        f"Schedule {schedule.schedule_id}: {schedule.provider}/{schedule.domain}/"
        f"{schedule.template} '{schedule.cron}' {schedule.time_zone}"
        f"{' (paused)' if schedule.paused else ''}",
        markup=False,
    )


@schedules.command("list")
@pass_settings
def schedules_list(settings: Settings) -> None:
    """Every schedule, oldest first."""
    with settings.client() as client:
        found = list(client.list_schedules())
    table = Table()
    unbroken(table, "schedule", max((len(item.schedule_id) for item in found), default=8))
    table.add_column("pipeline", overflow="fold")
    table.add_column("cron")
    table.add_column("time zone")
    table.add_column("catch-up")
    table.add_column("paused")
    table.add_column("next slot", overflow="fold")
    for item in found:
        table.add_row(
            item.schedule_id,
            f"{item.provider}/{item.domain}/{item.template}",
            item.cron,
            item.time_zone,
            item.catch_up,
            "yes" if item.paused else "",
            timestamp(item.next_slot_time),
        )
    out.print(table)


@schedules.command("create")
@click.argument("pipeline")
@click.option("--cron", help="5-field cron (default: the template's schedule).")
@click.option("--time-zone", help="IANA time zone (default UTC).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--catch-up", type=click.Choice(["none", "latest", "all"]))
@pass_settings
def schedules_create(
    settings: Settings,
    pipeline: str,
    cron: str | None,
    time_zone: str | None,
    params: tuple[str, ...],
    catch_up: str | None,
) -> None:
    """Creates a schedule of PIPELINE (PROVIDER/DOMAIN/TEMPLATE)."""
    provider, domain, template = pipeline_path(pipeline)
    with settings.client() as client:
        created = client.create_schedule(
            provider,
            domain,
            template,
            cron=cron,
            time_zone=time_zone,
            parameters=parameters(params),
            catch_up=catch_up,
            created_by=settings.user_id,
        )
    print_schedule(created)


@schedules.command("pause")
@click.argument("schedule_id")
@pass_settings
def schedules_pause(settings: Settings, schedule_id: str) -> None:
    """Pauses a schedule."""
    with settings.client() as client:
        print_schedule(client.pause_schedule(schedule_id))


@schedules.command("resume")
@click.argument("schedule_id")
@pass_settings
def schedules_resume(settings: Settings, schedule_id: str) -> None:
    """Resumes a paused schedule."""
    with settings.client() as client:
        print_schedule(client.resume_schedule(schedule_id))


@schedules.command("delete")
@click.argument("schedule_id")
@pass_settings
def schedules_delete(settings: Settings, schedule_id: str) -> None:
    """Deletes a schedule (its runs are kept)."""
    with settings.client() as client:
        client.delete_schedule(schedule_id)
    out.print(f"Deleted schedule {schedule_id}", markup=False)


@schedules.command("update")
@click.argument("schedule_id")
@click.option("--cron", help="5-field cron; its slots count from now.")
@click.option("--time-zone", help="IANA time zone of the cron.")
@click.option("--catch-up", type=click.Choice(["none", "latest", "all"]))
@click.option(
    "--catch-up-max",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --catch-up all: how many missed slots run at most.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Repeatable; replaces all the schedule's parameters.",
)
@pass_settings
def schedules_update(
    settings: Settings,
    schedule_id: str,
    cron: str | None,
    time_zone: str | None,
    catch_up: str | None,
    catch_up_max: int | None,
    params: tuple[str, ...],
) -> None:
    """Changes the options given of SCHEDULE_ID; the others stay as they are."""
    if not any(v is not None for v in (cron, time_zone, catch_up, catch_up_max)) and not params:
        raise click.UsageError(
            "nothing to change: give --cron, --time-zone, --catch-up, --catch-up-max or --param"
        )
    with settings.client() as client:
        updated = client.update_schedule(
            schedule_id,
            cron=cron,
            time_zone=time_zone,
            parameters=parameters(params) if params else None,
            catch_up=catch_up,
            catch_up_max=catch_up_max,
        )
    print_schedule(updated)
    named = ", ".join(f"{k}={v}" for k, v in sorted(updated.parameters.items()))
    out.print(
        f"catch-up {updated.catch_up} (at most {updated.catch_up_max}); "
        f"parameters: {named or 'none'}; next slot {timestamp(updated.next_slot_time) or 'none'}",
        markup=False,
    )


@schedules.command("backfill")
@click.argument("schedule_id")
@click.option("--start", type=click.DateTime(["%Y-%m-%d"]), required=True, metavar="YYYY-MM-DD")
@click.option(
    "--end",
    type=click.DateTime(["%Y-%m-%d"]),
    required=True,
    metavar="YYYY-MM-DD",
    help="Included.",
)
@pass_settings
def schedules_backfill(
    settings: Settings, schedule_id: str, start: datetime.datetime, end: datetime.datetime
) -> None:
    """Runs SCHEDULE_ID's slots of those days again (days in its time zone, up to today).

    The slots start, oldest first, at the next triggers as the plan's limits allow; a slot
    whose run already started is not started again.
    """
    with settings.client() as client:
        accepted = client.backfill_schedule(schedule_id, start.date(), end.date())
    schedule = accepted.schedule
    out.print(
        f"Backfill of schedule {schedule.schedule_id} from {start:%Y-%m-%d} to {end:%Y-%m-%d}: "
        f"{accepted.slots} slots, {schedule.backfill_slots_left} left to run "
        f"({schedule.time_zone}).",
        markup=False,
    )


def fail(text: str) -> NoReturn:
    click.echo(f"error: {text}", err=True)
    sys.exit(EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: usage errors, refusals and transport failures end in one line
    on stderr."""
    try:
        code = cli.main(args=argv, prog_name="convergence", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:  # a group named alone: its help
        error.show()
        sys.exit(error.exit_code)
    except click.ClickException as error:  # a usage error (2), a file option's file (1)
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except click.Abort:  # Ctrl-C
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except ConvergenceError as error:
        suffix = f" (request_id {error.request_id})" if error.request_id else ""
        fail(f"{error.message or error.code.name}{suffix}")
    except TimeoutError as error:
        fail(str(error))
    if isinstance(code, int):  # --help, or a command that ended with a status of its own
        sys.exit(code)


if __name__ == "__main__":
    main()
