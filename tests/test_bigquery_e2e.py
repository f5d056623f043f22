"""The whole flow with the server on the BigQuery store (the local emulator): onboard,
trigger every shipped template, follow each to COMPLETE, list runs, watch a run's stream,
quota refusals, and the published tables read back with the BigQuery client."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from convergence.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from convergence_server import faults
from convergence_server.stack import Stack
from tests.bigquery_emulator import Emulator
from tests.conftest import (
    UNMETERED,
    StackFactory,
    new_prefix,
    onboard,
    trigger,
    wait_for_run,
)
from tests.test_templates import RUNS, SAMPLES

# The local emulator runs every job in one Python process: slow on a busy machine.
pytestmark = pytest.mark.timeout(900)


class BigQueryStack:
    def __init__(self, stack: Stack, prefix: str, emulator: Emulator, hold: Path) -> None:
        self.stack, self.prefix, self.emulator = stack, prefix, emulator
        # While this file exists, runs wait before each check for a cancel.
        self.hold_between_steps = hold / faults.BETWEEN_STEPS

    def query(self, sql: str) -> list[dict[str, Any]]:
        """Runs BigQuery SQL; `{prefix}` is the stack's dataset prefix."""
        return self.emulator.query(sql.replace("{prefix}", self.prefix))


@pytest.fixture(scope="module")
def bq(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    emulator: Emulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BigQueryStack]:
    prefix = new_prefix()
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "hold").mkdir()
    stack = stack_factory(
        data_dir,
        **pipeline_env,
        **emulator.env(prefix),
        CONVERGENCE_FAULT_POINTS=faults.BETWEEN_STEPS,
    )
    yield BigQueryStack(stack, prefix, emulator, data_dir / "hold")
    stack.stop()


@pytest.fixture(scope="module")
def http(bq: BigQueryStack) -> Iterator[httpx.Client]:
    # A store call may take up to two minutes per job on a busy shared emulator (and run
    # again after a transaction conflict): the client waits longer than the server does.
    with httpx.Client(base_url=bq.stack.http_url, timeout=300) as client:
        yield client


def test_health_reports_the_bigquery_store(http: httpx.Client) -> None:
    body = http.get("/health").json()
    assert body["status"] == "healthy" and body["store"] == "bigquery", body


def test_every_template_runs_to_complete(bq: BigQueryStack, http: httpx.Client) -> None:
    tenant_id, key = onboard(http, plan=UNMETERED)
    runs = {
        template: trigger(http, key, tenant_id, template, date=day)["pipeline_logging_id"]
        for template, day in RUNS
    }
    ended = {
        template: wait_for_run(http, key, run_id, timeout=600) for template, run_id in runs.items()
    }
    assert {t: (r["status"], r.get("error_message", "")) for t, r in ended.items()} == {
        t: ("COMPLETE", "") for t in runs
    }
    listed = http.get("/api/v1/pipelines/runs", headers={"X-API-Key": key}).json()
    assert {r["pipeline_logging_id"] for r in listed["runs"]} == set(runs.values())

    # The AWS day's billed cost, as BigQuery holds it, equals the CSV's own sum.
    aws_day = dict(RUNS)["aws/cost/cost_usage"]
    with (SAMPLES / "aws_cur_sample.csv").open(newline="") as source:
        expected = sum(
            Decimal(row["lineItem/UnblendedCost"])
            for row in csv.DictReader(source)
            if row["lineItem/UsageStartDate"].startswith(aws_day)
        )
    (row,) = bq.query(
        f"SELECT SUM(BilledCost) AS billed, COUNT(*) AS n "
        f"FROM `{{prefix}}{tenant_id}.focus_cost` WHERE DATE(ChargePeriodStart) = '{aws_day}'"
    )
    assert Decimal(row["billed"]).quantize(Decimal("0.000001")) == expected.quantize(
        Decimal("0.000001")
    )
    steps = bq.query(
        "SELECT step_name, status FROM `{prefix}tenants.tenant_step_logs` "
        f"WHERE tenant_id = '{tenant_id}' AND pipeline_logging_id = "
        f"'{runs['aws/cost/cost_usage']}' ORDER BY step_index"
    )
    assert [s["status"] for s in steps] == ["COMPLETE"] * 5


def test_quota_refusals(bq: BigQueryStack, http: httpx.Client) -> None:
    tenant_id, key = onboard(http, plan="STARTER")  # one run at a time
    bq.hold_between_steps.touch()  # the run waits until it is cancelled, however quick
    try:
        first = trigger(http, key, tenant_id, "test/runs/slow", parameters={"size": "400"})
        refused = http.post(
            f"/api/v1/pipelines/run/{tenant_id}/test/runs/quick",
            headers={"X-API-Key": key},
            json={},
        )
        assert refused.status_code == 429, refused.text
        assert "concurrent" in refused.text.lower()
        http.post(
            f"/api/v1/pipelines/runs/{first['pipeline_logging_id']}:cancel",
            headers={"X-API-Key": key},
        )
    finally:
        bq.hold_between_steps.unlink()
    assert wait_for_run(http, key, first["pipeline_logging_id"], timeout=300)["status"] == "FAILED"
    usage = http.get(f"/api/v1/tenants/{tenant_id}/usage", headers={"X-API-Key": key}).json()
    assert (
        usage["pipelines_run_today"],
        usage["pipelines_failed_today"],
        usage["concurrent_pipelines_running"],
        usage["concurrent_limit"],
    ) == (1, 1, 0, 1), usage

    # STARTER allows 6 runs a day: 5 more (each cancelled, to free the one slot) use them up.
    for _ in range(5):
        made = trigger(http, key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
        http.post(f"/api/v1/pipelines/runs/{made}:cancel", headers={"X-API-Key": key})
        assert wait_for_run(http, key, made, timeout=300)["status"] in ("COMPLETE", "FAILED")
    over = http.post(
        f"/api/v1/pipelines/run/{tenant_id}/test/runs/quick", headers={"X-API-Key": key}, json={}
    )
    assert over.status_code == 429, over.text
    assert "daily" in over.text.lower()
    usage = http.get(f"/api/v1/tenants/{tenant_id}/usage", headers={"X-API-Key": key}).json()
    assert (usage["pipelines_run_today"], usage["remaining_today"]) == (6, 0), usage


def test_a_run_is_watched_to_complete_over_grpc(bq: BigQueryStack, http: httpx.Client) -> None:
    tenant_id, key = onboard(http, plan=UNMETERED)
    run_id = trigger(http, key, tenant_id, "test/runs/slow", parameters={"size": "1000"})
    with grpc.insecure_channel(bq.stack.grpc_target) as channel:
        updates = list(
            run_service_pb2_grpc.RunServiceStub(channel).WatchRun(
                run_service_pb2.WatchRunRequest(
                    pipeline_logging_id=str(run_id["pipeline_logging_id"])
                ),
                metadata=[("x-api-key", key)],
                # Four steps of emulator jobs: minutes on a busy machine (the module's
                # other waits are 300 s per run; pytest stops it at 900 s).
                timeout=600,
            )
        )
    assert updates[-1].run.status == run_pb2.Run.COMPLETE
    assert [s.step_name for s in updates[-1].steps] == ["count_1", "count_2", "count_3", "counted"]
    statuses = [u.run.status for u in updates]
    assert statuses == sorted(statuses) and len(updates) >= 3
