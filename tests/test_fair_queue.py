"""The fair run queue, end to end: tenants take turns at the workers.

Three tenants fill their plan's concurrency with slow runs, then a fourth tenant queues one
run. The fourth's worst case is made certain rather than likely: every run is queued while
the server has no workers, then the server restarts with two. First come, first served
would start the fourth's run last, after all fifteen others; the fair queue starts it as
soon as each tenant queued before it has had one turn, before their remaining backlogs.
The outcome is read from the runs' states and start times, never from elapsed time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import TERMINAL, StackFactory, onboard, trigger

WORKERS = "2"
PLAN = "PROFESSIONAL"
PLAN_CONCURRENT_RUNS = 5  # configs/plans.yml: runs PENDING or RUNNING at once
SLOW = "test/runs/slow"
QUICK = "test/runs/quick"
# Enough counting that a run holds its worker for a moment; the order does not depend on it.
SLOW_SIZE = "200000"
DRAIN_DEADLINE = 120.0
# Each tenant's list of runs is read this often while they run (below the plan's rate).
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    key: str
    run_ids: list[str]


@dataclass(frozen=True)
class Drained:
    busy: list[Tenant]
    newcomer: Tenant
    # Every run of the four tenants once ended, by id.
    runs: dict[str, dict[str, object]]
    # The status of each busy tenant's trigger beyond its plan's concurrency.
    over_limit: list[int]

    def started_in_order(self) -> list[str]:
        """Run ids by start time: the order the workers claimed them in."""
        unstarted = [run for run in self.runs.values() if "start_time" not in run]
        assert not unstarted, unstarted
        return sorted(
            self.runs,
            key=lambda run_id: datetime.fromisoformat(str(self.runs[run_id]["start_time"])),
        )


def queued_run(http: httpx.Client, key: str, tenant_id: str, template: str, **body: object) -> str:
    return str(trigger(http, key, tenant_id, template, **body)["pipeline_logging_id"])


def queue_runs(http: httpx.Client) -> tuple[list[Tenant], Tenant, list[int]]:
    """Three tenants queue slow runs up to their plan's concurrency (and try one more),
    then a fourth queues one quick run."""
    busy, over_limit = [], []
    slow = {"parameters": {"size": SLOW_SIZE}}
    for _ in range(3):
        tenant_id, key = onboard(http, plan=PLAN)
        run_ids = [
            queued_run(http, key, tenant_id, SLOW, **slow) for _ in range(PLAN_CONCURRENT_RUNS)
        ]
        refused = http.post(
            f"/api/v1/pipelines/run/{tenant_id}/{SLOW}", headers={"X-API-Key": key}, json=slow
        )
        over_limit.append(refused.status_code)
        busy.append(Tenant(tenant_id, key, run_ids))
    tenant_id, key = onboard(http, plan=PLAN)
    return busy, Tenant(tenant_id, key, [queued_run(http, key, tenant_id, QUICK)]), over_limit


def wait_until_ended(http: httpx.Client, tenants: list[Tenant]) -> dict[str, dict[str, object]]:
    """Every run of `tenants`, once all have ended (or as they are at the deadline)."""
    deadline = time.monotonic() + DRAIN_DEADLINE
    while True:
        runs: dict[str, dict[str, object]] = {}
        for tenant in tenants:
            listed = http.get(
                "/api/v1/pipelines/runs", headers={"X-API-Key": tenant.key}, params={"limit": 50}
            )
            if listed.status_code == 200:
                runs.update({str(r["pipeline_logging_id"]): r for r in listed.json()["runs"]})
        expected = {run_id for tenant in tenants for run_id in tenant.run_ids}
        ended = expected <= runs.keys() and all(runs[i]["status"] in TERMINAL for i in expected)
        if ended or time.monotonic() > deadline:
            return runs
        time.sleep(POLL_SECONDS)


@pytest.fixture(scope="module")
def drained(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Drained:
    """The four tenants' runs, queued on a server without workers, then run by two."""
    data_dir: Path = tmp_path_factory.mktemp("fair_queue")
    queueing = stack_factory(data_dir=data_dir, **pipeline_env, CONVERGENCE_WORKERS="0")
    with httpx.Client(base_url=queueing.http_url, timeout=30) as http:
        busy, newcomer, over_limit = queue_runs(http)
    queueing.stop()
    working = stack_factory(data_dir=data_dir, **pipeline_env, CONVERGENCE_WORKERS=WORKERS)
    with httpx.Client(base_url=working.http_url, timeout=30) as http:
        runs = wait_until_ended(http, [*busy, newcomer])
    working.stop()
    return Drained(busy, newcomer, runs, over_limit)


def test_the_busy_tenants_queued_up_to_their_plan_limit(drained: Drained) -> None:
    assert drained.over_limit == [429, 429, 429]
    assert {str(r["status"]) for r in drained.runs.values()} == {"COMPLETE"}, drained.runs


def test_a_tenant_within_its_limits_starts_before_other_tenants_backlogs(
    drained: Drained,
) -> None:
    order = drained.started_in_order()
    (late,) = drained.newcomer.run_ids
    first_turns = [tenant.run_ids[0] for tenant in drained.busy]
    backlogs = {run_id for tenant in drained.busy for run_id in tenant.run_ids[1:]}
    # Each tenant queued before it had one turn, in the order they queued; then its run,
    # though queued after all fifteen of theirs.
    assert order[:4] == [*first_turns, late]
    assert all(order.index(late) < order.index(run_id) for run_id in backlogs)


def test_each_tenants_runs_start_in_the_order_it_queued_them(drained: Drained) -> None:
    order = drained.started_in_order()
    for tenant in drained.busy:
        assert [run_id for run_id in order if run_id in tenant.run_ids] == tenant.run_ids
