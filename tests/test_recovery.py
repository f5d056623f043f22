"""Crash safety: a server killed with runs in flight loses none of them."""

from __future__ import annotations

import time

import httpx
import pytest

from convergence_server.stack import Stack
from tests.conftest import (
    TERMINAL,
    UNMETERED,
    StackFactory,
    dump_store,
    onboard,
    trigger,
    wait_for_run,
)


def statuses(http: httpx.Client, key: str, run_ids: list[object]) -> list[str]:
    return [
        http.get(f"/api/v1/pipelines/runs/{r}", headers={"X-API-Key": key}).json()["status"]
        for r in run_ids
    ]


def test_kill_9_with_runs_in_flight_then_restart(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("recovery")
    env = {**pipeline_env, "CONVERGENCE_WORKERS": "2"}
    stack: Stack = stack_factory(data_dir=data_dir, **env)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run_ids = [
            trigger(http, key, tenant_id, "test/runs/slow")["pipeline_logging_id"] for _ in range(5)
        ]
        fragile = trigger(http, key, tenant_id, "test/runs/fragile")["pipeline_logging_id"]
        deadline = time.monotonic() + 60
        while "RUNNING" not in statuses(http, key, run_ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        before = statuses(http, key, run_ids)
    assert "RUNNING" in before and "PENDING" in before, before
    interrupted = [r for r, status in zip(run_ids, before, strict=True) if status == "RUNNING"]

    stack.kill_server()
    stack.stop()
    restarted = stack_factory(data_dir=data_dir, **env)
    with httpx.Client(base_url=restarted.http_url, timeout=30) as http:
        finals = [wait_for_run(http, key, r, TERMINAL, timeout=180) for r in run_ids]
        fragile_final = wait_for_run(http, key, fragile, TERMINAL, timeout=180)
        steps = {
            r: http.get(f"/api/v1/pipelines/runs/{r}/steps", headers={"X-API-Key": key}).json()
            for r in interrupted
        }
    # Every accepted run ended; the interrupted ones ran again (their template allows it).
    assert [f["status"] for f in finals] == ["COMPLETE"] * len(run_ids), finals
    # A run its template forbids retrying ended FAILED, or never started before the kill.
    assert fragile_final["status"] in ("FAILED", "COMPLETE")
    if fragile_final["status"] == "FAILED":
        assert "server stopped while the run was in progress" in str(fragile_final["error_message"])
    # The steps shown are the last attempt's, each COMPLETE.
    for run_id, listed in steps.items():
        assert [(s["step_name"], s["status"]) for s in listed["steps"]] == [
            ("count_1", "COMPLETE"),
            ("count_2", "COMPLETE"),
            ("count_3", "COMPLETE"),
            ("counted", "COMPLETE"),
        ], run_id

    restarted.stop()
    tables = dump_store(restarted)
    leftovers = [name for name in tables if "._stage_" in name]
    assert leftovers == []
    slow_counts = tables[f"{tenant_id}.slow_counts"]
    assert len(slow_counts) == 3 * len(run_ids)  # no interrupted run published twice
    step_states = {row[7] for row in tables["tenants.tenant_step_logs"]}
    assert "RUNNING" not in step_states  # interrupted steps were closed as FAILED
