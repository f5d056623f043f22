"""The `convergence` command, run as a user runs it (a process of its own) against a real
stack: onboarding, runs followed to their end, listings as JSON, keys, schedules, and
errors as one line on stderr with the exit code that says what happened."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from convergence_server.stack import Stack
from tests.conftest import (
    FIXTURES,
    UNMETERED,
    StackFactory,
    new_tenant_id,
    onboard,
    wait_for_run,
)

RUN_ID = re.compile(r"Started run ([0-9a-f-]{36})")
EXIT_STILL_RUNNING = 3


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    api_key: str


@pytest.fixture(scope="module")
def cli_stack(stack_factory: StackFactory, pipeline_env: dict[str, str]) -> Stack:
    return stack_factory(**pipeline_env)


@pytest.fixture(scope="module")
def cli_http(cli_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cli_stack.http_url, timeout=30) as http:
        yield http


@pytest.fixture
def tenant(cli_http: httpx.Client) -> Tenant:
    return Tenant(*onboard(cli_http, plan=UNMETERED))


def convergence(
    stack: Stack, *args: str, api_key: str | None = None, shows_secret: bool = False
) -> subprocess.CompletedProcess[str]:
    """Runs the command with the target and key in its environment, as the README says;
    the key must never appear in what it prints unless the command's purpose is to."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONVERGENCE_")}
    env["CONVERGENCE_TARGET"] = stack.grpc_target
    env["COLUMNS"] = "200"
    if api_key is not None:
        env["CONVERGENCE_API_KEY"] = api_key
    result = subprocess.run(
        [sys.executable, "-m", "convergence.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    if api_key and not shows_secret:
        assert api_key not in result.stdout + result.stderr
    return result


def started_run(result: subprocess.CompletedProcess[str]) -> str:
    found = RUN_ID.search(result.stdout)
    assert found, result.stdout
    return found.group(1)


def row(result: subprocess.CompletedProcess[str], text: str) -> str:
    """The one line of a printed table that holds `text`."""
    lines = [line for line in result.stdout.splitlines() if text in line]
    assert len(lines) == 1, result.stdout
    return lines[0]


def printed_secret(result: subprocess.CompletedProcess[str], tenant: Tenant) -> str:
    """The key a command printed, which it prints exactly once."""
    secrets = [line for line in result.stdout.splitlines() if line.startswith(tenant.tenant_id)]
    assert len(secrets) == 1, result.stdout
    assert result.stdout.count(secrets[0]) == 1
    assert "not shown again" in result.stdout
    return secrets[0]


def created_key_id(result: subprocess.CompletedProcess[str]) -> str:
    found = re.search(r"Created key (\S+) \(", result.stdout)
    assert found, result.stdout
    return found.group(1)


def created_schedule(stack: Stack, key: str, *options: str) -> str:
    created = convergence(stack, "schedules", "create", "test/runs/quick", *options, api_key=key)
    assert created.returncode == 0, created.stderr
    found = re.search(r"Schedule (\S+):", created.stdout)
    assert found, created.stdout
    return found.group(1)


def test_onboard_prints_the_report_and_a_key_that_works(cli_stack: Stack) -> None:
    tenant_id = new_tenant_id()
    onboarding = (
        "onboard",
        tenant_id,
        "--company",
        "Acme Corporation",
        "--email",
        "admin@acme.com",
        "--plan",
        "PROFESSIONAL",
    )
    result = convergence(cli_stack, *onboarding)
    assert result.returncode == 0, result.stderr
    assert "tenant_id_format" in result.stdout
    assert "ready for onboarding" in result.stdout
    assert "not shown again" in result.stdout
    keys = [line for line in result.stdout.splitlines() if line.startswith(f"{tenant_id}_api_")]
    assert len(keys) == 1, result.stdout

    usage = convergence(cli_stack, "usage", api_key=keys[0])
    assert usage.returncode == 0, usage.stderr
    assert tenant_id in usage.stdout

    again = convergence(cli_stack, *onboarding)
    assert again.returncode == 1
    assert "tenant_not_onboarded" in again.stdout
    assert "NOT ready for onboarding" in again.stdout
    assert again.stderr.startswith("error: ")
    assert f"{tenant_id}_api_" not in again.stdout


def test_run_wait_exits_0_when_the_run_completes(cli_stack: Stack, tenant: Tenant) -> None:
    result = convergence(cli_stack, "run", "test/runs/quick", "--wait", api_key=tenant.api_key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "one_row" in result.stdout
    assert f"Run {started_run(result)} ended COMPLETE" in result.stdout


def test_run_wait_exits_1_when_the_run_fails(cli_stack: Stack, tenant: Tenant) -> None:
    result = convergence(
        cli_stack,
        "run",
        "test/runs/checks",
        "--param",
        "break_error=true",
        "--wait",
        api_key=tenant.api_key,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Run {started_run(result)} ended FAILED" in result.stdout
    assert "validate" in result.stdout


def test_runs_json_lists_the_runs(cli_stack: Stack, tenant: Tenant) -> None:
    key = tenant.api_key
    completed = started_run(
        convergence(
            cli_stack, "run", "test/runs/quick", "--date", "2024-01-02", "--wait", api_key=key
        )
    )
    failed = started_run(
        convergence(
            cli_stack,
            "run",
            "test/runs/checks",
            "--param",
            "break_error=true",
            "--wait",
            api_key=key,
        )
    )

    listed = convergence(cli_stack, "runs", "--json", api_key=key)
    assert listed.returncode == 0, listed.stderr
    runs = {run["pipeline_logging_id"]: run for run in json.loads(listed.stdout)}
    assert runs.keys() == {completed, failed}
    assert runs[completed]["status"] == "COMPLETE"
    assert runs[completed]["parameters"]["date"] == "2024-01-02"
    # Every field, zero values too, as over REST.
    assert (runs[completed]["warnings"], runs[completed]["schedule_id"]) == (0, "")
    assert runs[failed]["status"] == "FAILED"

    only_failed = convergence(cli_stack, "runs", "--status", "FAILED", "--json", api_key=key)
    assert [run["pipeline_logging_id"] for run in json.loads(only_failed.stdout)] == [failed]

    one = convergence(cli_stack, "runs", "--limit", "1", "--json", api_key=key)
    assert len(json.loads(one.stdout)) == 1

    shown = convergence(cli_stack, "runs", "show", failed, "--json", api_key=key)
    assert json.loads(shown.stdout)["tenant_id"] == tenant.tenant_id
    steps = convergence(cli_stack, "runs", "steps", completed, "--json", api_key=key)
    assert [step["step_name"] for step in json.loads(steps.stdout)] == ["one_row"]
    table = convergence(cli_stack, "runs", api_key=key)
    assert completed in table.stdout and failed in table.stdout

    ended = convergence(cli_stack, "runs", "cancel", completed, api_key=key)
    assert ended.returncode == 2
    assert ended.stderr.startswith("error: ")


def test_a_bad_key_is_one_clear_line_and_exit_2(cli_stack: Stack, tenant: Tenant) -> None:
    bad_key = f"{tenant.tenant_id}_api_{'x' * 52}"
    result = convergence(cli_stack, "runs", api_key=bad_key)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "API key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""

    missing = convergence(cli_stack, "runs")
    assert missing.returncode == 2
    assert "CONVERGENCE_API_KEY" in missing.stderr


def test_keys_create_list_and_read_only_scope(cli_stack: Stack, tenant: Tenant) -> None:
    created = convergence(
        cli_stack, "keys", "create", "ci-reader", "--read-only", api_key=tenant.api_key
    )
    assert created.returncode == 0, created.stderr
    secrets = [line for line in created.stdout.splitlines() if line.startswith(tenant.tenant_id)]
    assert len(secrets) == 1, created.stdout
    reader = secrets[0]

    listed = convergence(cli_stack, "keys", "list", api_key=reader)
    assert listed.returncode == 0, listed.stderr
    assert "ci-reader" in listed.stdout and "READ_ONLY" in listed.stdout

    refused = convergence(cli_stack, "run", "test/runs/quick", api_key=reader)
    assert refused.returncode == 2
    assert "read-only" in refused.stderr


def test_schedules_create_pause_resume_delete(cli_stack: Stack, tenant: Tenant) -> None:
    key = tenant.api_key
    schedule_id = created_schedule(cli_stack, key, "--cron", "0 6 * * *")

    paused = convergence(cli_stack, "schedules", "pause", schedule_id, api_key=key)
    assert "(paused)" in paused.stdout
    resumed = convergence(cli_stack, "schedules", "resume", schedule_id, api_key=key)
    assert resumed.returncode == 0 and "(paused)" not in resumed.stdout
    assert schedule_id in convergence(cli_stack, "schedules", "list", api_key=key).stdout
    assert convergence(cli_stack, "schedules", "delete", schedule_id, api_key=key).returncode == 0
    assert schedule_id not in convergence(cli_stack, "schedules", "list", api_key=key).stdout


def test_run_wait_timeout_stops_waiting_and_the_run_goes_on(
    cli_stack: Stack, cli_http: httpx.Client, tenant: Tenant
) -> None:
    key = tenant.api_key
    result = convergence(
        cli_stack,
        "run",
        "test/runs/slow",
        "--param",
        "size=30000000",
        "--wait",
        "--timeout",
        "0.5",
        api_key=key,
    )
    assert result.returncode == EXIT_STILL_RUNNING, result.stdout + result.stderr
    run_id = started_run(result)
    assert f"run {run_id}" in result.stdout
    assert "keeps going on the server" in result.stdout
    assert result.stderr == ""
    # Giving up the wait did not stop the run.
    assert wait_for_run(cli_http, key, run_id, timeout=900)["status"] == "COMPLETE"

    alone = convergence(cli_stack, "run", "test/runs/quick", "--timeout", "5", api_key=key)
    assert alone.returncode == 2
    assert "--wait" in alone.stderr
    # Usage errors, click's own included, are one line too.
    for args in (("run", "test/runs/quick", "--wait", "--timeout", "0"), ("runs", "--nope")):
        usage = convergence(cli_stack, *args, api_key=key)
        assert usage.returncode == 2
        assert usage.stderr.startswith("error: ") and len(usage.stderr.splitlines()) == 1, usage
    assert convergence(cli_stack, "--help").returncode == 0
    group = convergence(cli_stack, "keys", api_key=key)  # a group alone: its help, as click's
    assert group.returncode == 2 and "Usage:" in group.stderr and "error:" not in group.stderr


def test_runs_checks_shows_each_check_and_its_outcome(cli_stack: Stack, tenant: Tenant) -> None:
    key = tenant.api_key
    ran = convergence(cli_stack, "run", "test/runs/checks", "--wait", api_key=key)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    run_id = started_run(ran)

    checks = convergence(cli_stack, "runs", "checks", run_id, api_key=key)
    assert checks.returncode == 0, checks.stderr
    for name, severity, status in (
        ("has_rows", "error", "PASSED"),
        ("labelled", "warn", "FAILED"),
        ("below_three", "error", "PASSED"),
    ):
        line = row(checks, name)
        assert "validate" in line and severity in line and status in line, line

    quick = started_run(convergence(cli_stack, "run", "test/runs/quick", "--wait", api_key=key))
    none = convergence(cli_stack, "runs", "checks", quick, api_key=key)
    assert none.returncode == 0, none.stderr
    assert "check" in none.stdout and "PASSED" not in none.stdout


def test_pipelines_lists_the_test_templates(cli_stack: Stack, tenant: Tenant) -> None:
    listed = convergence(cli_stack, "pipelines", api_key=tenant.api_key)
    assert listed.returncode == 0, listed.stderr
    for template in sorted((FIXTURES / "templates").glob("*.yml")):
        assert f"test/runs/{template.stem}" in listed.stdout
    assert "size" in row(listed, "test/runs/slow")
    assert "break_error" in row(listed, "test/runs/checks")


def test_keys_revoke_refuses_the_key_at_once(cli_stack: Stack, tenant: Tenant) -> None:
    created = convergence(cli_stack, "keys", "create", "leaked", api_key=tenant.api_key)
    assert created.returncode == 0, created.stderr
    key_id, leaked = created_key_id(created), printed_secret(created, tenant)
    assert convergence(cli_stack, "usage", api_key=leaked).returncode == 0

    revoked = convergence(cli_stack, "keys", "revoke", key_id, api_key=tenant.api_key)
    assert revoked.returncode == 0, revoked.stderr
    assert f"Key {key_id}: REVOKED" in revoked.stdout

    refused = convergence(cli_stack, "usage", api_key=leaked)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and "revoked" in refused.stderr
    assert "REVOKED" in row(convergence(cli_stack, "keys", "list", api_key=tenant.api_key), key_id)
    assert convergence(cli_stack, "usage", api_key=tenant.api_key).returncode == 0


def test_keys_rotate_prints_a_new_secret_once_that_works(cli_stack: Stack, tenant: Tenant) -> None:
    created = convergence(cli_stack, "keys", "create", "deployer", api_key=tenant.api_key)
    assert created.returncode == 0, created.stderr
    old_id, old = created_key_id(created), printed_secret(created, tenant)

    rotated = convergence(
        cli_stack, "keys", "rotate", old_id, "--grace-seconds", "0", api_key=tenant.api_key
    )
    assert rotated.returncode == 0, rotated.stderr
    new = printed_secret(rotated, tenant)
    assert new != old
    found = re.search(rf"Key {old_id} replaced by (\S+)\.", rotated.stdout)
    assert found, rotated.stdout
    assert found.group(1) != old_id

    works = convergence(cli_stack, "usage", api_key=new)
    assert works.returncode == 0, works.stderr
    assert tenant.tenant_id in works.stdout
    # Without a grace period the old key ends with the rotation.
    refused = convergence(cli_stack, "usage", api_key=old)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and "expired" in refused.stderr


def test_schedules_update_changes_only_the_options_given(
    cli_stack: Stack, cli_http: httpx.Client, tenant: Tenant
) -> None:
    key = tenant.api_key
    schedule_id = created_schedule(
        cli_stack, key, "--cron", "0 6 * * *", "--param", "date={slot_date-1}"
    )

    updated = convergence(
        cli_stack,
        "schedules",
        "update",
        schedule_id,
        "--cron",
        "30 7 * * 1-5",
        "--time-zone",
        "Europe/Berlin",
        "--catch-up",
        "all",
        "--catch-up-max",
        "5",
        api_key=key,
    )
    assert updated.returncode == 0, updated.stderr
    assert "'30 7 * * 1-5' Europe/Berlin" in updated.stdout
    listed = row(convergence(cli_stack, "schedules", "list", api_key=key), schedule_id)
    assert "30 7 * * 1-5" in listed and "Europe/Berlin" in listed and "all" in listed
    shown = cli_http.get(f"/api/v1/schedules/{schedule_id}", headers={"X-API-Key": key}).json()
    assert shown["parameters"] == {"date": "{slot_date-1}"}
    assert shown["catch_up_max"] == 5

    params = convergence(
        cli_stack, "schedules", "update", schedule_id, "--param", "date={slot_date}", api_key=key
    )
    assert params.returncode == 0, params.stderr
    shown = cli_http.get(f"/api/v1/schedules/{schedule_id}", headers={"X-API-Key": key}).json()
    assert shown["parameters"] == {"date": "{slot_date}"}
    assert (shown["cron"], shown["time_zone"]) == ("30 7 * * 1-5", "Europe/Berlin")
    assert (shown["catch_up"], shown["catch_up_max"]) == ("all", 5)

    nothing = convergence(cli_stack, "schedules", "update", schedule_id, api_key=key)
    assert nothing.returncode == 2
    assert "nothing to change" in nothing.stderr
    bad = convergence(
        cli_stack, "schedules", "update", schedule_id, "--time-zone", "Mars/Olympus", api_key=key
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_schedules_backfill_starts_the_runs_of_the_days_given(
    cli_stack: Stack, cli_http: httpx.Client, tenant: Tenant
) -> None:
    key = tenant.api_key
    schedule_id = created_schedule(
        cli_stack, key, "--cron", "0 6 * * *", "--param", "date={slot_date}"
    )
    today = datetime.now(UTC).date()
    days = [(today - timedelta(days=n)).isoformat() for n in (3, 2)]
    backfill = ("schedules", "backfill", schedule_id, "--start", days[0], "--end", days[1])

    accepted = convergence(cli_stack, *backfill, api_key=key)
    assert accepted.returncode == 0, accepted.stderr
    assert f"{days[0]} to {days[1]}: 2 slots, 2 left to run" in accepted.stdout
    # An earlier backfill still has slots left: the server refuses another.
    again = convergence(cli_stack, *backfill, api_key=key)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "in progress" in again.stderr
    not_a_day = convergence(
        cli_stack,
        "schedules",
        "backfill",
        schedule_id,
        "--start",
        "yesterday",
        "--end",
        days[1],
        api_key=key,
    )
    assert not_a_day.returncode == 2
    assert "--start" in not_a_day.stderr

    # The slots start at the next triggers.
    deadline = time.monotonic() + 120
    while True:
        fired = cli_http.post("/api/v1/scheduler/trigger", headers={"X-API-Key": key}, json={})
        assert fired.status_code == 200, fired.text
        listed = convergence(cli_stack, "runs", "--json", api_key=key)
        scheduled = [r for r in json.loads(listed.stdout) if r["trigger_type"] == "scheduler"]
        if len(scheduled) >= len(days) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(r["parameters"]["date"] for r in scheduled) == days
    assert {r["schedule_id"] for r in scheduled} == {schedule_id}
    for started in scheduled:
        ended = wait_for_run(cli_http, key, started["pipeline_logging_id"])
        assert ended["status"] == "COMPLETE", ended


def test_webhook_set_show_test_and_delete(cli_stack: Stack, tenant: Tenant) -> None:
    url = "https://localhost:1/hooks"  # resolved when called: refused then (loopback)
    done = convergence(cli_stack, "webhook", "set", url, api_key=tenant.api_key)
    assert done.returncode == 0, done.stderr
    assert url in done.stdout and re.search(r"^whsec_\S+$", done.stdout, re.M), done.stdout
    shown = convergence(cli_stack, "webhook", "show", api_key=tenant.api_key)
    assert shown.returncode == 0 and url in shown.stdout and "whsec_" not in shown.stdout
    tested = convergence(cli_stack, "webhook", "test", api_key=tenant.api_key)
    assert tested.returncode == 1 and "loopback" in tested.stdout, tested
    deleted = convergence(cli_stack, "webhook", "delete", api_key=tenant.api_key)
    assert deleted.returncode == 0, deleted.stderr
    gone = convergence(cli_stack, "webhook", "show", api_key=tenant.api_key)
    assert gone.returncode == 2 and "has no webhook" in gone.stderr
