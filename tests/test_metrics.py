"""Prometheus metrics on their own port: after a scripted workload, the counts match what
the workload did, and no label carries an unbounded value."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from convergence_server.stack import Stack
from tests.conftest import UNMETERED, StackFactory, onboard, trigger, wait_for_run

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def measured(stack_factory: StackFactory, pipeline_env: dict[str, str]) -> Stack:
    return stack_factory(**pipeline_env, CONVERGENCE_METRICS_PORT="0")


def scrape(stack: Stack) -> Samples:
    text = httpx.get(stack.metrics_url, timeout=30).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(stack: Stack, check: Callable[[Samples], bool]) -> Samples:
    """The metrics once `check` holds (a run's end is counted just after it is stored)."""
    deadline = time.monotonic() + 120
    while True:
        samples = scrape(stack)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_the_counts_match_the_workload(measured: Stack) -> None:
    rpc = "convergence_rpc_duration_seconds_count"
    ended = "convergence_runs_ended_total"
    with httpx.Client(base_url=measured.http_url, timeout=120) as http:
        before = scrape(measured)
        tenant_id, key = onboard(http, plan=UNMETERED)
        quick = [trigger(http, key, tenant_id, "test/runs/quick") for _ in range(2)]
        for run in quick:
            assert wait_for_run(http, key, run["pipeline_logging_id"])["status"] == "COMPLETE"
        starter_id, starter_key = onboard(http, plan="STARTER")  # one run at a time
        slow = trigger(
            http, starter_key, starter_id, "test/runs/slow", parameters={"size": "30000000"}
        )
        slow_id = slow["pipeline_logging_id"]
        # Cancelled while RUNNING: ended by the worker (a PENDING one is counted too).
        assert wait_for_run(http, starter_key, slow_id, ("RUNNING",))["status"] == "RUNNING"
        refused = http.post(
            f"/api/v1/pipelines/run/{starter_id}/test/runs/quick",
            headers={"X-API-Key": starter_key},
            json={},
        )
        assert refused.status_code == 429, refused.text
        http.post(f"/api/v1/pipelines/runs/{slow_id}:cancel", headers={"X-API-Key": starter_key})
        assert wait_for_run(http, starter_key, slow_id)["status"] == "FAILED"
        missing = http.get(f"/api/v1/pipelines/runs/{uuid.uuid4()}", headers={"X-API-Key": key})
        assert missing.status_code == 404
        bad_key = http.get("/api/v1/pipelines", headers={"X-API-Key": "nope"})
        assert bad_key.status_code == 401

    def grown(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    quick_ends = {"template": "test/runs/quick", "status": "COMPLETE"}
    slow_ends = {"template": "test/runs/slow", "status": "FAILED"}
    after = scrape_until(
        measured,
        lambda s: grown(s, ended, **quick_ends) >= 2 and grown(s, ended, **slow_ends) >= 1,
    )
    assert grown(after, ended, **quick_ends) == 2
    assert grown(after, ended, **slow_ends) == 1
    assert grown(after, "convergence_run_duration_seconds_count", **quick_ends) == 2
    assert grown(after, "convergence_quota_refusals_total", quota="concurrent_pipeline_runs") == 1
    assert grown(after, "convergence_auth_failures_total", reason="API_KEY_INVALID") == 1
    trigger_method = "/convergence.v1.PipelineService/RunPipeline"
    assert grown(after, rpc, method=trigger_method, code="OK") == 3
    assert grown(after, rpc, method=trigger_method, code="RESOURCE_EXHAUSTED") == 1
    assert grown(after, rpc, method="/convergence.v1.RunService/GetRun", code="NOT_FOUND") == 1
    assert grown(after, rpc, method="/convergence.v1.RunService/CancelRun", code="OK") == 1
    steps = "convergence_step_duration_seconds_count"
    assert grown(after, steps, step_type="query", status="COMPLETE") >= 2
    claims = {"operation": "claim_next_run", "adapter": "embedded"}
    assert grown(after, "convergence_store_operation_seconds_count", **claims) >= 3
    assert ("convergence_queue_pending_runs", frozenset()) in after

    # Bounded labels only: no tenant, key or run id.
    for name, labels in after:
        for label, text in labels:
            assert tenant_id not in text and starter_id not in text, (name, label, text)
            assert not UUID.search(text), (name, label, text)


def test_metrics_are_not_on_the_public_listener(measured: Stack) -> None:
    assert httpx.get(f"{measured.http_url}/metrics", timeout=30).status_code == 404


def test_no_metrics_port_unless_configured(stack: Stack, tmp_path: Path) -> None:
    assert stack.metrics_port is None


def test_the_oldest_pending_runs_age_grows_between_samples(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The queue is read from the store once an hour here: the oldest PENDING run's age
    still grows with the clock, at each scrape."""
    data_dir = tmp_path_factory.mktemp("queue")
    clock = tmp_path_factory.mktemp("clock") / "offset"
    clock.write_text("0")
    env = {**pipeline_env, "CONVERGENCE_WORKERS": "0", "CONVERGENCE_CLOCK_OFFSET_FILE": str(clock)}
    first = stack_factory(data_dir=data_dir, **env)
    with httpx.Client(base_url=first.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        trigger(http, key, tenant_id, "test/runs/quick")
    first.stop()
    # Restarted with the run PENDING: its first sample, at start, sees it.
    stack = stack_factory(
        data_dir=data_dir,
        **env,
        CONVERGENCE_METRICS_PORT="0",
        CONVERGENCE_QUEUE_SAMPLE_SECONDS="3600",
    )
    sampled = scrape_until(stack, lambda s: value(s, "convergence_queue_pending_runs") == 1)
    assert value(sampled, "convergence_queue_pending_runs") == 1
    assert value(sampled, "convergence_queue_oldest_pending_seconds") < 3600
    clock.write_text("7200")  # two hours on, and no sample since
    later = scrape(stack)
    assert value(later, "convergence_queue_pending_runs") == 1
    assert value(later, "convergence_queue_oldest_pending_seconds") >= 7200
