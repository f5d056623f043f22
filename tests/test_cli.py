"""The `convergence` command, run as a user runs it (a process of its own) against a real
stack: onboarding, runs followed to their end, listings as JSON, keys, schedules, and
errors as one line on stderr with the exit code that says what happened."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from convergence_server.stack import Stack
from tests.conftest import UNMETERED, StackFactory, new_tenant_id, onboard

RUN_ID = re.compile(r"Started run ([0-9a-f-]{36})")


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
    created = convergence(
        cli_stack, "schedules", "create", "test/runs/quick", "--cron", "0 6 * * *", api_key=key
    )
    assert created.returncode == 0, created.stderr
    found = re.search(r"Schedule (\S+):", created.stdout)
    assert found, created.stdout
    schedule_id = found.group(1)

    paused = convergence(cli_stack, "schedules", "pause", schedule_id, api_key=key)
    assert "(paused)" in paused.stdout
    resumed = convergence(cli_stack, "schedules", "resume", schedule_id, api_key=key)
    assert resumed.returncode == 0 and "(paused)" not in resumed.stdout
    assert schedule_id in convergence(cli_stack, "schedules", "list", api_key=key).stdout
    assert convergence(cli_stack, "schedules", "delete", schedule_id, api_key=key).returncode == 0
    assert schedule_id not in convergence(cli_stack, "schedules", "list", api_key=key).stdout
