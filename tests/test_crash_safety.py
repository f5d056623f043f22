"""Crash and stop safety: a run is published exactly once, a SIGTERM stops the server within
its bound and hands running runs back, and a full disk strands no run in a live server.

Crash windows are widened deterministically: the fault point `after_publish` makes the
server kill itself (SIGKILL) right after a run's publication committed and before its end
is written, which is where a crash used to publish a run twice; `before_publish` kills it
while a day written into place waits for its publication.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import duckdb
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convergence_server import faults
from convergence_server.stack import Stack, start_stack
from convergence_server.storage.warehouse import STAGE_PREFIX
from tests.bigquery_emulator import Emulator
from tests.conftest import (
    TERMINAL,
    UNMETERED,
    StackFactory,
    database_path,
    eventually,
    fill,
    new_prefix,
    onboard,
    small_disk,
    stack_env,
    trigger,
    wait_for_run,
)
from tests.cost_support import AWS, SAMPLES, csv_text, read_csv

CRASH = {"CONVERGENCE_FAULT_POINTS": "after_publish"}
# (template, its parameters, destination table, rows one run publishes)
DESTINATIONS = [
    pytest.param("test/runs/quick", {}, "quick_rows", 1, id="replace_partition"),
    pytest.param("test/runs/slow", {"size": "1000"}, "slow_counts", 3, id="append"),
]
LONG_TEMPLATE = """
description: One step that counts a cross join of two sides of {side}; slow with @size.
parameters:
  size: {{type: integer, default: 400000, description: Each side of the cross join.}}
steps:
  - name: long_count
    kind: query
    sql: >-
      SELECT COUNT(*) AS n FROM UNNEST(GENERATE_ARRAY(1, {side})) AS a
      CROSS JOIN UNNEST(GENERATE_ARRAY(1, {side})) AS b
    destination: long_counts
    write_mode: append
"""


def wait_for_exit(process: subprocess.Popen[bytes], timeout: float = 120) -> int:
    """The process's exit code; fails the test if it is still alive after `timeout`."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {process.pid} did not exit within {timeout} s")


def stored_run(stack: Stack, run_id: object) -> dict[str, object]:
    """The run's row, read from the store file (the server must be stopped)."""
    with duckdb.connect(str(database_path(stack)), read_only=True) as db:
        cursor = db.execute(
            "SELECT * FROM tenants.tenant_pipeline_runs WHERE pipeline_logging_id = ?", [run_id]
        )
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
    assert row is not None
    return dict(zip(names, row, strict=True))


def stored_count(stack: Stack, sql: str, *params: object) -> int:
    with duckdb.connect(str(database_path(stack)), read_only=True) as db:
        row = db.execute(sql, list(params)).fetchone()
    return int(row[0]) if row else 0


def stored_row(stack: Stack, sql: str, *params: object) -> tuple[object, ...]:
    with duckdb.connect(str(database_path(stack)), read_only=True) as db:
        db.execute("SET TimeZone = 'UTC'")
        row = db.execute(sql, list(params)).fetchone()
    assert row is not None
    return tuple(row)


def table_exists(stack: Stack, dataset: str, table: str) -> bool:
    return bool(
        stored_count(
            stack,
            "SELECT COUNT(*) FROM information_schema.tables "
            "WHERE table_schema = ? AND table_name = ?",
            dataset,
            table,
        )
    )


def test_a_crash_before_publication_leaves_the_published_day_as_it_was(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The embedded store writes a day of FOCUS rows into place, in the run's transaction,
    which only the publication commits: a crash before it leaves the published day as it
    was, and the run, run again after the restart, publishes its rows once."""
    day = "2023-11-04"
    data_dir = tmp_path_factory.mktemp("in_place")
    first = stack_factory(data_dir=data_dir, **pipeline_env)
    with httpx.Client(base_url=first.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        clean = trigger(http, key, tenant_id, AWS, date=day)["pipeline_logging_id"]
        assert wait_for_run(http, key, str(clean))["status"] == "COMPLETE"
    first.stop()
    published = (
        f'SELECT COUNT(*), SUM(BilledCost) FROM "{tenant_id}".focus_aws_cost '
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{day}'"
    )
    count, total = stored_row(first, published)
    assert count and total

    header, rows = read_csv(SAMPLES / "aws_cur_sample.csv")
    for row in rows:  # the same line items, each billed twice as much
        cost = row["lineItem/UnblendedCost"]
        row["lineItem/UnblendedCost"] = f"{Decimal(cost) * 2:f}" if cost else cost
    folder = sources_dir / tenant_id
    folder.mkdir()
    (folder / "doubled.csv").write_text(csv_text(header, rows))
    crashing = stack_factory(
        data_dir=data_dir, **pipeline_env, CONVERGENCE_FAULT_POINTS="before_publish"
    )
    with httpx.Client(base_url=crashing.http_url, timeout=30) as http:
        run_id = trigger(
            http,
            key,
            tenant_id,
            AWS,
            date=day,
            parameters={"source_uri": str(folder / "doubled.csv")},
        )["pipeline_logging_id"]
    wait_for_exit(crashing.server)  # killed by the fault point, the day written in place
    crashing.stop()
    assert stored_run(crashing, run_id)["status"] == "RUNNING"
    assert stored_row(crashing, published) == (count, total)
    stages = stored_count(
        crashing,
        "SELECT COUNT(*) FROM information_schema.tables "
        "WHERE table_schema = ? AND starts_with(table_name, ?)",
        tenant_id,
        STAGE_PREFIX,
    )
    assert stages == 0

    restarted = stack_factory(data_dir=data_dir, **pipeline_env)
    with httpx.Client(base_url=restarted.http_url, timeout=30) as http:
        final = wait_for_run(http, key, run_id, timeout=120)
    restarted.stop()
    assert final["status"] == "COMPLETE", final
    doubled = sum(
        Decimal(r["lineItem/UnblendedCost"]).quantize(Decimal("1e-9"), ROUND_HALF_UP)
        for r in rows
        if str(r["lineItem/UsageStartDate"]).startswith(day)
    )
    assert stored_row(restarted, published) == (count, doubled)
    assert doubled != total


@pytest.mark.parametrize(("template", "parameters", "table", "rows"), DESTINATIONS)
def test_a_crash_after_publication_never_publishes_the_run_again(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    template: str,
    parameters: dict[str, str],
    table: str,
    rows: int,
) -> None:
    data_dir = tmp_path_factory.mktemp("crash")
    crashing = stack_factory(data_dir=data_dir, **pipeline_env, **CRASH)
    with httpx.Client(base_url=crashing.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run_id = trigger(http, key, tenant_id, template, parameters=parameters)[
            "pipeline_logging_id"
        ]
    wait_for_exit(crashing.server)  # killed by the fault point, between publication and end
    crashing.stop()
    assert stored_run(crashing, run_id)["status"] == "RUNNING"
    assert stored_count(crashing, f'SELECT COUNT(*) FROM "{tenant_id}"."{table}"') == rows

    restarted = stack_factory(data_dir=data_dir, **pipeline_env)
    with httpx.Client(base_url=restarted.http_url, timeout=30) as http:
        final = wait_for_run(http, key, run_id, timeout=120)
    restarted.stop()
    assert final["status"] == "COMPLETE", final
    # Its rows exactly once, and no attempt was spent running it again.
    assert stored_count(restarted, f'SELECT COUNT(*) FROM "{tenant_id}"."{table}"') == rows
    assert stored_run(restarted, run_id)["attempt"] == 1
    assert (
        stored_count(
            restarted,
            "SELECT COUNT(*) FROM tenants.tenant_usage_quotas "
            "WHERE tenant_id = ? AND pipelines_succeeded_today = 1 "
            "AND concurrent_pipelines_running = 0",
            tenant_id,
        )
        == 1
    )


# Its waits for the emulator add up to more than the default 300 s on a busy machine.
@pytest.mark.timeout(900)
def test_a_crash_after_publication_on_bigquery_never_publishes_the_run_again(
    stack_factory: StackFactory, pipeline_env: dict[str, str], emulator: Emulator
) -> None:
    prefix = new_prefix()
    env = {
        **pipeline_env,
        **emulator.env(prefix),
        "CONVERGENCE_WORKERS": "1",
        "CONVERGENCE_RUN_HEARTBEAT_SECONDS": "1",
        "CONVERGENCE_RUN_LEASE_SECONDS": "4",
    }
    crashing = stack_factory(**env, **CRASH)
    with httpx.Client(base_url=crashing.http_url, timeout=120) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run_id = trigger(http, key, tenant_id, "test/runs/slow", parameters={"size": "1000"})[
            "pipeline_logging_id"
        ]
    # The run's steps are emulator jobs: on a busy machine reaching the fault point alone
    # took more than 120 s (a make test of 2026-12-01).
    wait_for_exit(crashing.server, timeout=600)
    crashing.stop()
    counts = f"SELECT COUNT(*) AS n FROM `{prefix}{tenant_id}.slow_counts`"
    assert emulator.query(counts) == [{"n": 3}]

    other = stack_factory(**env)  # a replica: it recovers the run once its lease has run out
    try:
        with httpx.Client(base_url=other.http_url, timeout=120) as http:
            final = wait_for_run(http, key, run_id, timeout=240)
    finally:
        other.stop()
    assert final["status"] == "COMPLETE", final
    assert emulator.query(counts) == [{"n": 3}]
    history = emulator.query(
        f"SELECT event, attempt FROM `{prefix}tenants.tenant_run_events` "
        f"WHERE pipeline_logging_id = '{run_id}' ORDER BY event_seq",
    )
    assert [(h["event"], h["attempt"]) for h in history] == [
        ("created", 1),
        ("claimed", 1),
        ("publishing", 1),
        ("finished", 1),
    ]


def test_sigterm_interrupts_a_long_step_and_hands_its_run_back(
    stack_factory: StackFactory,
    config_dir: Path,
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The step would count for minutes; the server stops within its bound instead, and the
    run waits PENDING, its attempt unused and nothing published, for the next start."""
    own_configs = tmp_path_factory.mktemp("long") / "configs"
    shutil.copytree(config_dir, own_configs)
    long_template = own_configs / "test" / "runs" / "long.yml"
    long_template.write_text(LONG_TEMPLATE.format(side="@size"))
    data_dir = tmp_path_factory.mktemp("sigterm")
    env = {
        "CONVERGENCE_CONFIG_DIR": str(own_configs),
        "CONVERGENCE_SOURCE_ROOTS": str(sources_dir),
        "CONVERGENCE_SHUTDOWN_SECONDS": "5",
    }
    stack = stack_factory(data_dir=data_dir, **env)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run_id = trigger(http, key, tenant_id, "test/runs/long")["pipeline_logging_id"]
        steps: list[dict[str, object]] = []

        def a_step_started() -> bool:
            steps[:] = http.get(
                f"/api/v1/pipelines/runs/{run_id}/steps", headers={"X-API-Key": key}
            ).json()["steps"]
            return bool(steps)

        eventually(a_step_started)
    assert steps[0]["status"] == "RUNNING", steps

    stack.server.send_signal(signal.SIGTERM)
    assert wait_for_exit(stack.server, timeout=60) == 0
    stack.stop()
    run = stored_run(stack, run_id)
    assert (run["status"], run["attempt"], run["worker_id"]) == ("PENDING", 1, None)
    assert not table_exists(stack, tenant_id, "long_counts")
    log = (data_dir / "logs" / "server.log").read_text()
    assert f"run {run_id} handed back" in log

    # A run keeps the parameter values it was triggered with (size 400,000, which counts
    # for minutes on a busy machine); its steps are read again when it runs.
    long_template.write_text(LONG_TEMPLATE.format(side="LEAST(@size, 10)"))
    restarted = stack_factory(data_dir=data_dir, **env)
    with httpx.Client(base_url=restarted.http_url, timeout=30) as http:
        final = wait_for_run(http, key, run_id, timeout=120)
        listed = http.get(f"/api/v1/pipelines/runs/{run_id}/steps", headers={"X-API-Key": key})
    restarted.stop()
    assert final["status"] == "COMPLETE", final
    # The steps of the execution that completed it, not those the stop cut short.
    assert [s["status"] for s in listed.json()["steps"]] == ["COMPLETE"], listed.text
    table = f'"{tenant_id}".long_counts'
    assert stored_count(restarted, f"SELECT COUNT(*) FROM {table}") == 1
    assert stored_count(restarted, f"SELECT n FROM {table}") == 10 * 10  # the step as it is now
    assert stored_run(restarted, run_id)["attempt"] == 1


def test_a_run_claimed_as_the_server_stops_is_handed_back_unstarted(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The worker's claim commits, then the server is asked to stop before the run starts
    (held there by the `after_claim` fault point): the run is handed back PENDING with its
    attempt unused, not left RUNNING for the next start to count as a crash. An idle
    worker, waiting in an hour-long poll for runs, does not hold a stop up either."""
    data_dir = tmp_path_factory.mktemp("claimed")
    hold = data_dir / "hold" / faults.AFTER_CLAIM
    hold.parent.mkdir()
    hold.touch()
    env = {
        **pipeline_env,
        "CONVERGENCE_WORKERS": "1",
        "CONVERGENCE_FAULT_POINTS": faults.AFTER_CLAIM,
        "CONVERGENCE_SHUTDOWN_SECONDS": "60",
        "CONVERGENCE_CLAIM_POLL_SECONDS": "3600",
    }
    stack = stack_factory(data_dir=data_dir, **env)
    server_log = data_dir / "logs" / "server.log"
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run_id = trigger(http, key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
        eventually(lambda: f"fault point {faults.AFTER_CLAIM}: holding" in server_log.read_text())
        assert wait_for_run(http, key, run_id, ("RUNNING",))["status"] == "RUNNING"

    stack.server.send_signal(signal.SIGTERM)
    eventually(lambda: '"message": "stopping"' in server_log.read_text())
    hold.unlink()
    assert wait_for_exit(stack.server) == 0
    stack.stop()
    run = stored_run(stack, run_id)
    assert (run["status"], run["attempt"], run["worker_id"]) == ("PENDING", 1, None)
    assert f"run {run_id} handed back" in server_log.read_text()

    restarted = stack_factory(data_dir=data_dir, **env)
    with httpx.Client(base_url=restarted.http_url, timeout=30) as http:
        final = wait_for_run(http, key, run_id)
    restarted.server.send_signal(signal.SIGTERM)  # its worker idle, its next look an hour away
    assert wait_for_exit(restarted.server) == 0
    restarted.stop()
    # Neither stop left a worker behind at its bound (which logs an ERROR and exits 0 all
    # the same).
    errors = [line for line in server_log.read_text().splitlines() if '"severity": "ERROR"' in line]
    assert errors == []
    assert (final["status"], stored_run(restarted, run_id)["attempt"]) == ("COMPLETE", 1), final


def grpc_health(stack: Stack) -> int:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
    return int(reply.status)


def test_a_full_disk_strands_no_run_and_answers_503(
    pipeline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("full")
    with small_disk(base / "disk", "64m") as disk:
        env = stack_env(disk, **pipeline_env, CONVERGENCE_WORKERS="2")
        stack = start_stack(env, log_dir=base / "logs")
        try:
            run_while_the_disk_fills(stack, disk, base / "logs" / "server.log")
        finally:
            stack.stop()


def run_while_the_disk_fills(stack: Stack, disk: Path, server_log: Path) -> None:
    server_pid = stack.server.pid
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        headers = {"X-API-Key": key}
        # Steps of a few seconds each: the runs are still going when the disk fills.
        slow = {"parameters": {"size": "8000000"}}
        running = [
            trigger(http, key, tenant_id, "test/runs/slow", **slow)["pipeline_logging_id"]
            for _ in range(2)
        ]
        wait_for_run(http, key, running[0], ("RUNNING",), timeout=120)
        filler = fill(disk)

        # Triggers are refused with the documented 503, never a 500, until space returns.
        refused: list[httpx.Response] = []

        def refuses_a_trigger() -> bool:
            response = http.post(
                f"/api/v1/pipelines/run/{tenant_id}/test/runs/quick", headers=headers, json={}
            )
            assert response.status_code in (200, 503), response.text
            if response.status_code == 503:
                refused.append(response)
            else:  # accepted before the store's first refused write: it must end too
                running.append(response.json()["pipeline_logging_id"])
            return bool(refused)

        eventually(refuses_a_trigger)
        body = refused[0].json()
        assert body["error"] == "Service unavailable"
        assert "No space left on device" in body["message"], body
        assert body["request_id"]
        eventually(lambda: http.get("/health").status_code == 503)
        eventually(lambda: grpc_health(stack) == health_pb2.HealthCheckResponse.NOT_SERVING)
        # A run cannot end while no write goes through: it waits, holding its slot.
        eventually(lambda: "cannot end run" in server_log.read_text())
        assert "RUNNING" in [
            http.get(f"/api/v1/pipelines/runs/{r}", headers=headers).json()["status"]
            for r in running
        ]

        os.remove(filler)
        eventually(lambda: http.get("/health").status_code == 200)
        eventually(lambda: grpc_health(stack) == health_pb2.HealthCheckResponse.SERVING)
        for run_id in running:  # ended by the same live server, and their slots freed
            assert wait_for_run(http, key, run_id, timeout=120)["status"] in TERMINAL
        usage = http.get(f"/api/v1/tenants/{tenant_id}/usage", headers=headers).json()
        assert usage["concurrent_pipelines_running"] == 0, usage
        after = trigger(http, key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
        assert wait_for_run(http, key, after, timeout=120)["status"] == "COMPLETE"
    assert stack.server.poll() is None and stack.server.pid == server_pid
