"""Idle workers' claim poll: it slows down while it finds nothing (on BigQuery each look is
a billed query job) and comes back to its first interval as soon as there is work. The
workers' timing settings out of range stop the server before it starts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from convergence_server import faults
from convergence_server.stack import Stack
from tests.conftest import StackFactory, onboard, stack_env, trigger, wait_for_run
from tests.test_metrics import Samples, scrape, scrape_until, value

INTERVAL = "convergence_claim_poll_interval_seconds"
CLAIMS = "convergence_store_operation_seconds_count"


def claims(samples: Samples) -> float:
    return value(samples, CLAIMS, operation="claim_next_run", adapter="embedded")


@pytest.fixture
def held(tmp_path: Path) -> Path:
    """A data directory whose runs wait before their first step while `hold` exists."""
    (tmp_path / "hold").mkdir()
    return tmp_path


@pytest.fixture
def polling(
    stack_factory: StackFactory, pipeline_env: dict[str, str], held: Path
) -> Iterator[Stack]:
    stack = stack_factory(
        held,
        **pipeline_env,
        CONVERGENCE_METRICS_PORT="0",
        CONVERGENCE_WORKERS="1",
        CONVERGENCE_CLAIM_POLL_SECONDS="0.05",
        CONVERGENCE_CLAIM_POLL_MAX_SECONDS="0.4",
        CONVERGENCE_FAULT_POINTS=faults.BETWEEN_STEPS,
    )
    yield stack
    stack.stop()


def test_an_idle_servers_poll_slows_to_its_longest_interval_and_quickens_with_work(
    polling: Stack, held: Path
) -> None:
    # Idle: each empty look doubles the wait, 0.05 s to 0.4 s, and the looks go on there.
    at_cap = scrape_until(polling, lambda s: value(s, INTERVAL) == 0.4)
    assert value(at_cap, INTERVAL) == 0.4
    more = scrape_until(polling, lambda s: claims(s) >= claims(at_cap) + 2)
    assert claims(more) >= claims(at_cap) + 2
    assert value(more, INTERVAL) == 0.4

    hold = held / "hold" / faults.BETWEEN_STEPS
    hold.touch()
    with httpx.Client(base_url=polling.http_url, timeout=120) as http:
        tenant_id, key = onboard(http)
        run_id = trigger(http, key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
        assert wait_for_run(http, key, run_id, ("RUNNING",))["status"] == "RUNNING"
        # Woken by the admission and given a run: back to the first interval, where it
        # stays while its one worker is busy (no look finds nothing meanwhile).
        busy = scrape_until(polling, lambda s: value(s, INTERVAL) == 0.05)
        assert value(busy, INTERVAL) == 0.05
        assert value(scrape(polling), INTERVAL) == 0.05
        hold.unlink()
        assert wait_for_run(http, key, run_id)["status"] == "COMPLETE"
    idle_again = scrape_until(polling, lambda s: value(s, INTERVAL) == 0.4)
    assert value(idle_again, INTERVAL) == 0.4


def test_a_run_admitted_while_its_answer_was_lost_starts_without_waiting_for_the_poll(
    stack_factory: StackFactory, pipeline_env: dict[str, str], held: Path
) -> None:
    """A trigger whose commit landed but whose call failed (the store's answer lost on the
    way) still wakes the workers: the run starts now, not at the next poll, an hour away."""
    stack = stack_factory(
        held,
        **pipeline_env,
        CONVERGENCE_WORKERS="1",
        CONVERGENCE_CLAIM_POLL_SECONDS="3600",
        CONVERGENCE_CLAIM_POLL_MAX_SECONDS="3600",
        CONVERGENCE_FAULT_POINTS=faults.AFTER_ADMISSION,
    )
    lost = held / "hold" / faults.AFTER_ADMISSION
    try:
        with httpx.Client(base_url=stack.http_url, timeout=120) as http:
            tenant_id, key = onboard(http)
            lost.touch()
            failed = http.post(
                f"/api/v1/pipelines/run/{tenant_id}/test/runs/quick",
                headers={"X-API-Key": key},
                json={},
            )
            lost.unlink()
            assert failed.status_code == 503, failed.text
            assert failed.json()["error"] == "Service unavailable"
            listed = http.get("/api/v1/pipelines/runs", headers={"X-API-Key": key}).json()
            (stored,) = listed["runs"]  # admitted all the same
            run_id = stored["pipeline_logging_id"]
            assert wait_for_run(http, key, run_id)["status"] == "COMPLETE"
    finally:
        stack.stop()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONVERGENCE_RUN_HEARTBEAT_SECONDS", "0"),
        ("CONVERGENCE_RUN_LEASE_SECONDS", "-30"),
        ("CONVERGENCE_CLAIM_POLL_MAX_SECONDS", "0"),
        ("CONVERGENCE_CLAIM_POLL_SECONDS", "soon"),
        ("CONVERGENCE_QUEUE_SAMPLE_SECONDS", "0"),
    ],
)
def test_a_timing_setting_out_of_range_stops_the_server_with_its_name(
    name: str, value: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "convergence_server", "serve"],
        env={**os.environ, **stack_env(tmp_path), name: value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert name in result.stderr, result.stderr
