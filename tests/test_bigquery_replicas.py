"""Several server processes on one BigQuery store: exact admission, each schedule slot
started once, and crash takeover.

Stacks (server + Envoy each) share the emulator and the dataset prefix, as replicas behind
a load balancer would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from convergence_server import faults
from convergence_server.stack import Stack
from tests.bigquery_emulator import Emulator
from tests.conftest import (
    UNMETERED,
    StackFactory,
    eventually,
    new_prefix,
    onboard,
    trigger,
    wait_for_run,
)
from tests.test_abuse import call_with, holding, server_log
from tests.test_metrics import Samples, scrape_until, value
from tests.test_publish_guards import CLEAN, DAY
from tests.test_schedules import BASE, Clock, assert_each_slot_once, create, fire, slot_times

STORE_CALLS = "convergence_store_operation_seconds_count"
POLL_INTERVAL = "convergence_claim_poll_interval_seconds"

# The local emulator runs every job in one Python process: slow on a busy machine.
pytestmark = pytest.mark.timeout(900)

BURST = 12
DAILY = "test/runs/daily"  # the ledger's publication without checks: fewer emulator jobs
PROFESSIONAL_CONCURRENT = 5


@contextlib.contextmanager
def replicas(stack_factory: StackFactory, **env: str) -> Iterator[list[httpx.Client]]:
    """Two replicas on one BigQuery store (`env` names it). Workers are off, so admitted
    runs stay PENDING and keep their slots all along."""
    with replica_stacks(stack_factory, **env) as (_, opened):
        yield opened


@contextlib.contextmanager
def replica_stacks(
    stack_factory: StackFactory, **env: str
) -> Iterator[tuple[list[Stack], list[httpx.Client]]]:
    """`replicas`, with their stacks."""
    started = [stack_factory(**env, CONVERGENCE_WORKERS="0") for _ in range(2)]
    opened = [httpx.Client(base_url=s.http_url, timeout=300) for s in started]
    try:
        yield started, opened
    finally:
        for client in opened:
            client.close()
        for replica in started:
            replica.stop()


@pytest.fixture(scope="module")
def pair(
    stack_factory: StackFactory, pipeline_env: dict[str, str], emulator: Emulator
) -> Iterator[tuple[list[Stack], list[httpx.Client]]]:
    """Two replicas, their schedule tickers off (each tick is a query on the shared
    emulator: two replicas ticking slowed every other test of the module)."""
    env = {
        **pipeline_env,
        **emulator.env(new_prefix()),
        # Key records stay cached for an hour: only the sync of changed keys (every
        # CONVERGENCE_KEY_SYNC_SECONDS, 5 by default) can end a revoked key's use sooner.
        "CONVERGENCE_KEY_CACHE_SECONDS": "3600",
        "CONVERGENCE_KEY_SYNC_SECONDS": "5",
        # A member removed through one replica is seen by the other within a second.
        "CONVERGENCE_MEMBER_CACHE_SECONDS": "1",
        "CONVERGENCE_FAULT_POINTS": faults.BEFORE_MEMBER_ADMISSION,
    }
    with replica_stacks(stack_factory, **env) as both:
        yield both


@pytest.fixture(scope="module")
def clients(pair: tuple[list[Stack], list[httpx.Client]]) -> list[httpx.Client]:
    return pair[1]


def test_two_replicas_admit_exactly_the_concurrent_limit(clients: list[httpx.Client]) -> None:
    tenant_id, key = onboard(clients[0], plan="PROFESSIONAL")

    def fire(i: int) -> httpx.Response:
        return clients[i % 2].post(
            f"/api/v1/pipelines/run/{tenant_id}/test/runs/quick",
            headers={"X-API-Key": key},
            json={},
        )

    with ThreadPoolExecutor(BURST) as pool:
        responses = list(pool.map(fire, range(BURST)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * PROFESSIONAL_CONCURRENT + [429] * (BURST - PROFESSIONAL_CONCURRENT), [
        r.text for r in responses
    ]
    # Both replicas took part, and both see the same runs and the same usage.
    admitted_by = {i % 2 for i, r in enumerate(responses) if r.status_code == 200}
    refused_by = {i % 2 for i, r in enumerate(responses) if r.status_code == 429}
    assert admitted_by | refused_by == {0, 1}
    for client in clients:
        runs = client.get(
            "/api/v1/pipelines/runs", headers={"X-API-Key": key}, params={"limit": 50}
        ).json()["runs"]
        assert len(runs) == PROFESSIONAL_CONCURRENT
        assert {r["status"] for r in runs} == {"PENDING"}
        usage = client.get(f"/api/v1/tenants/{tenant_id}/usage", headers={"X-API-Key": key}).json()
        assert usage["pipelines_run_today"] == PROFESSIONAL_CONCURRENT, usage


def test_two_replicas_with_their_tickers_start_each_slot_once(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    emulator: Emulator,
    tmp_path: Path,
) -> None:
    """Both replicas tick, and are triggered, on one store: each slot runs once."""
    clock = Clock(tmp_path / "clock")
    clock.path.write_text("0")  # the real time, until the test moves it
    with replicas(
        stack_factory,
        **pipeline_env,
        **emulator.env(new_prefix()),
        CONVERGENCE_CLOCK_OFFSET_FILE=str(clock.path),
        CONVERGENCE_SCHEDULER_TICK_SECONDS="0.2",
    ) as clients:
        _, key = onboard(clients[0], plan=UNMETERED)
        clock.set(BASE)
        schedule = create(clients[0], key, cron="* * * * *", catch_up="all", catch_up_max=100)
        first = datetime.fromisoformat(str(schedule["next_slot_time"]))
        clock.set(first + timedelta(minutes=2, seconds=1))  # 3 slots due; the 4th in 59 s
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: fire(clients[i % 2], key), range(4)))
        eventually(lambda: len(slot_times(clients[1], key)) >= 3, "3 slots", interval=0.5)
        time.sleep(2)  # more ticks of both replicas: none may add a run
        for client in clients:
            assert_each_slot_once(slot_times(client, key), first, at_least=3)


def test_a_killed_replicas_run_is_taken_over_by_another(
    stack_factory: StackFactory, pipeline_env: dict[str, str], emulator: Emulator
) -> None:
    """Replica A dies (kill -9) mid-run; replica B sees the run's heartbeats stop, puts it
    back to PENDING after the lease, runs it again and publishes it once. B looks for
    runs on its own once an hour only: the run it put back wakes its workers."""
    prefix = new_prefix()
    env = {
        **pipeline_env,
        **emulator.env(prefix),
        "CONVERGENCE_WORKERS": "1",
        "CONVERGENCE_RUN_HEARTBEAT_SECONDS": "1",
        "CONVERGENCE_RUN_LEASE_SECONDS": "4",
    }
    first = stack_factory(**env)
    with httpx.Client(base_url=first.http_url, timeout=300) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run_id = trigger(http, key, tenant_id, "test/runs/slow", parameters={"size": "1000"})[
            "pipeline_logging_id"
        ]
        assert wait_for_run(http, key, run_id, ("RUNNING",), timeout=60)["status"] == "RUNNING"
    first.kill_server()  # mid-run: its heartbeats stop, the run stays RUNNING
    first.stop()
    second = stack_factory(**{**env, "CONVERGENCE_CLAIM_POLL_SECONDS": "3600"})
    try:
        with httpx.Client(base_url=second.http_url, timeout=300) as http:
            ended = wait_for_run(http, key, run_id, timeout=240)
            steps = http.get(
                f"/api/v1/pipelines/runs/{run_id}/steps", headers={"X-API-Key": key}
            ).json()["steps"]
        assert ended["status"] == "COMPLETE", ended
        assert [s["status"] for s in steps] == ["COMPLETE"] * 4
        rows = emulator.query(f"SELECT COUNT(*) AS n FROM `{prefix}{tenant_id}.slow_counts`")
        assert rows == [{"n": 3}]  # three counting steps, published once
        history = emulator.query(
            f"SELECT event, attempt, worker_id FROM `{prefix}tenants.tenant_run_events` "
            f"WHERE pipeline_logging_id = '{run_id}' ORDER BY event_seq",
        )
        assert [(h["event"], h["attempt"]) for h in history] == [
            ("created", 1),
            ("claimed", 1),
            ("requeued", 2),
            ("claimed", 2),
            ("publishing", 2),
            ("finished", 2),
        ]
        assert history[1]["worker_id"] != history[3]["worker_id"]  # claimed by A, then B
    finally:
        second.stop()


def test_a_run_another_replica_admitted_is_found_by_the_claim_poll(
    stack_factory: StackFactory, pipeline_env: dict[str, str], emulator: Emulator, tmp_path: Path
) -> None:
    """Replica A admits a run and has no workers; replica B, whose workers were never woken
    for it and looked at their start before it existed, finds it by their claim poll (once
    a second here, slowing to every 4 s while it finds nothing), runs it (held before its
    first step until the test lets it go) and polls every second again from then.

    B beats every second and looks for other replicas' runs to recover every half lease
    (every second beat here), not at each beat: each look is a query job."""
    env = {**pipeline_env, **emulator.env(new_prefix())}
    admitting = stack_factory(**env, CONVERGENCE_WORKERS="0")
    hold = tmp_path / "hold" / faults.BETWEEN_STEPS
    hold.parent.mkdir()
    polling = stack_factory(
        tmp_path,
        **{
            **env,
            "CONVERGENCE_WORKERS": "1",
            "CONVERGENCE_CLAIM_POLL_SECONDS": "1",
            "CONVERGENCE_CLAIM_POLL_MAX_SECONDS": "4",
            "CONVERGENCE_RUN_HEARTBEAT_SECONDS": "1",
            "CONVERGENCE_RUN_LEASE_SECONDS": "4",
            "CONVERGENCE_METRICS_PORT": "0",
            "CONVERGENCE_FAULT_POINTS": faults.BETWEEN_STEPS,
        },
    )
    assert value(scrape_until(polling, lambda s: value(s, POLL_INTERVAL) == 4), POLL_INTERVAL) == 4
    hold.touch()
    with httpx.Client(base_url=admitting.http_url, timeout=300) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run_id = trigger(http, key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
        assert wait_for_run(http, key, run_id, ("RUNNING",), timeout=240)["status"] == "RUNNING"
        # Found by a poll, not woken: its one worker busy, B looks at nothing meanwhile.
        found = scrape_until(polling, lambda s: value(s, POLL_INTERVAL) == 1)
        assert value(found, POLL_INTERVAL) == 1
        hold.unlink()
        ended = wait_for_run(http, key, run_id, timeout=240)
    assert ended["status"] == "COMPLETE", ended

    def calls(samples: Samples, operation: str) -> float:
        return value(samples, STORE_CALLS, operation=operation, adapter="bigquery")

    samples = scrape_until(polling, lambda s: calls(s, "heartbeat") >= 6)
    beats, looks = calls(samples, "heartbeat"), calls(samples, "stale_runs")
    assert 1 <= looks <= (beats + 1) // 2, (beats, looks)


def test_a_day_another_replica_publishes_meanwhile_is_not_shrunk(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    emulator: Emulator,
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Replica A compares its 4 rows with the published day (none yet) and is held before
    its publishing transaction; replica B publishes 10 rows for the day meanwhile. A's
    transaction finds the day changed, A compares again and refuses to shrink it."""
    prefix = new_prefix()
    env = {**pipeline_env, **emulator.env(prefix)}
    held = tmp_path_factory.mktemp("replica_a")
    (held / "hold").mkdir()
    (held / "hold" / "before_publish_transaction").touch()
    # Runs keep their worker however slow the shared emulator is: a lease lost to late
    # heartbeats would hand the run to the other replica, which is not what this tests.
    env["CONVERGENCE_RUN_LEASE_SECONDS"] = "600"
    first = stack_factory(
        data_dir=held,
        **env,
        CONVERGENCE_WORKERS="1",
        CONVERGENCE_FAULT_POINTS="before_publish_transaction",
    )
    second = None
    try:
        with httpx.Client(base_url=first.http_url, timeout=300) as http:
            tenant_id, key = onboard(http, plan=UNMETERED)
            folder = sources_dir / tenant_id
            folder.mkdir()
            (folder / "few.csv").write_text("".join(CLEAN.splitlines(keepends=True)[:5]))
            (folder / "all.csv").write_text(CLEAN)

            def start(client: httpx.Client, name: str) -> object:
                body = {"source_uri": str(folder / name)}
                return trigger(client, key, tenant_id, DAILY, date=DAY, parameters=body)[
                    "pipeline_logging_id"
                ]

            few = start(http, "few.csv")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # every step done: the run is publishing
                steps = http.get(
                    f"/api/v1/pipelines/runs/{few}/steps", headers={"X-API-Key": key}
                ).json()["steps"]
                if [s["status"] for s in steps] == ["COMPLETE"] * 2:
                    break
                time.sleep(0.5)
            second = stack_factory(**env)  # runs the next run: the first's worker is held
            with httpx.Client(base_url=second.http_url, timeout=300) as other:
                done = wait_for_run(other, key, start(other, "all.csv"), timeout=600)
            assert done["status"] == "COMPLETE", done
            # The premise: A is still held before its transaction while B published.
            held_run = http.get(f"/api/v1/pipelines/runs/{few}", headers={"X-API-Key": key})
            assert held_run.json()["status"] == "RUNNING", held_run.text
            (held / "hold" / "before_publish_transaction").unlink()
            ended = wait_for_run(http, key, few, timeout=600)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert ended["status"] == "FAILED", ended
    assert "from 10 rows (amount total 57.5" in str(ended["error_message"]), ended
    rows = emulator.query(f"SELECT COUNT(*) AS n FROM `{prefix}{tenant_id}.daily`")
    assert rows == [{"n": 10}]


def test_a_key_revoked_through_one_replica_is_refused_by_the_other(
    clients: list[httpx.Client],
) -> None:
    tenant_id, key = onboard(clients[0])
    created = clients[0].post(
        f"/api/v1/tenants/{tenant_id}/api-keys", headers={"X-API-Key": key}, json={"name": "ci"}
    )
    assert created.status_code == 200, created.text
    other, other_id = created.json()["api_key"], created.json()["key"]["key_id"]
    usage = f"/api/v1/tenants/{tenant_id}/usage"
    # The second replica reads the key's record now, and would keep it for an hour.
    assert clients[1].get(usage, headers={"X-API-Key": other}).status_code == 200
    revoked = clients[0].post(
        f"/api/v1/tenants/{tenant_id}/api-keys/{other_id}:revoke", headers={"X-API-Key": key}
    )
    assert revoked.status_code == 200, revoked.text
    # The replica that revoked it refuses it at once; the other within the sync bound
    # (5 s plus a query; waited for generously here, far below the cache's hour).
    assert clients[0].get(usage, headers={"X-API-Key": other}).status_code == 401
    refused = eventually(
        lambda: (r := clients[1].get(usage, headers={"X-API-Key": other})).status_code == 401 and r,
        "the revocation on the other replica",
        timeout=180,
        interval=0.5,
    )
    assert "revoked" in refused.json()["message"]
    assert clients[1].get(usage, headers={"X-API-Key": key}).status_code == 200


def test_a_member_removed_through_one_replica_is_no_member_of_the_other(
    clients: list[httpx.Client],
) -> None:
    tenant_id, key = onboard(clients[0], plan="STARTER")  # a team of 2

    def call(replica: int, user: str) -> httpx.Response:
        headers = {"X-API-Key": key, "X-User-ID": user}
        return clients[replica].get("/api/v1/pipelines", headers=headers)

    assert call(1, "ann").status_code == 200  # the second replica knows ann now
    removed = clients[0].delete(
        f"/api/v1/tenants/{tenant_id}/members/ann", headers={"X-API-Key": key}
    )
    assert removed.status_code == 200, removed.text
    for user in ("bob", "carl"):  # the team is full without ann
        assert call(0, user).status_code == 200
    refused = eventually(
        lambda: (r := call(1, "ann")).status_code == 403 and r,
        "ann refused by the other replica",
        timeout=180,
        interval=0.5,
    )
    assert refused.json()["message"].startswith("Team size limit reached")
    team = clients[1].get(f"/api/v1/tenants/{tenant_id}/members", headers={"X-API-Key": key})
    assert [m["user_id"] for m in team.json()["members"]] == ["bob", "carl"]


def test_a_plan_lowered_through_one_replica_bounds_the_team_on_the_other(
    pair: tuple[list[Stack], list[httpx.Client]],
) -> None:
    """A replica admitting a new user under the plan it read, while another lowers the
    plan: the store finds the plan changed, and the user is admitted, or refused, under the
    new one (here the team is full by then)."""
    stacks, clients = pair
    tenant_id, key = onboard(clients[0])  # PROFESSIONAL: a team of 6
    assert call_with(clients[1], key, "ann").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        with holding(stacks[1], faults.BEFORE_MEMBER_ADMISSION) as held:
            bob = pool.submit(call_with, clients[1], key, "bob")
            held()  # bob's admission has read PROFESSIONAL
            lowered = clients[0].put(
                f"/api/v1/tenants/{tenant_id}/subscription",
                headers={"X-API-Key": key},
                json={"subscription_plan": "STARTER"},  # a team of 2
            )
            assert lowered.status_code == 200, lowered.text
            assert call_with(clients[0], key, "carl").status_code == 200  # the team full
        refused = bob.result(300)
    assert refused.status_code == 403, refused.text
    assert "plan STARTER allows 2 team members" in refused.json()["message"]
    team = clients[1].get(f"/api/v1/tenants/{tenant_id}/members", headers={"X-API-Key": key})
    assert [m["user_id"] for m in team.json()["members"]] == ["ann", "carl"]


def test_a_cancel_asked_of_another_replica_stops_a_run_at_its_publication(
    stack_factory: StackFactory, pipeline_env: dict[str, str], emulator: Emulator
) -> None:
    """The replica executing the run learns of a cancel asked elsewhere at its next
    heartbeat (an hour here); its publication, refused for the cancel, reads the stored
    flag and ends the run FAILED at once, rather than leave it RUNNING until its lease
    ran out (an hour too)."""
    env = {
        **pipeline_env,
        **emulator.env(new_prefix()),
        "CONVERGENCE_WORKERS": "1",
        "CONVERGENCE_FAULT_POINTS": faults.BEFORE_PUBLICATION,
        "CONVERGENCE_RUN_LEASE_SECONDS": "3600",
        "CONVERGENCE_RUN_HEARTBEAT_SECONDS": "3600",
    }
    stacks = [stack_factory(**env) for _ in range(2)]
    holds = [s.run_dir.parent / "hold" / faults.BEFORE_PUBLICATION for s in stacks]
    for hold in holds:
        hold.parent.mkdir(exist_ok=True)
        hold.touch()
    line = f"fault point {faults.BEFORE_PUBLICATION}: holding"
    clients = [httpx.Client(base_url=s.http_url, timeout=300) for s in stacks]
    try:
        tenant_id, key = onboard(clients[0], plan=UNMETERED)
        run_id = trigger(clients[0], key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
        executing = (
            eventually(
                lambda: [i + 1 for i, s in enumerate(stacks) if line in server_log(s)],
                "the run held before its publication",
                timeout=300,
            )[0]
            - 1
        )
        other = clients[1 - executing]
        cancelled = other.post(
            f"/api/v1/pipelines/runs/{run_id}:cancel", headers={"X-API-Key": key}, json={}
        )
        assert cancelled.status_code == 200, cancelled.text
        for hold in holds:
            hold.unlink()
        ended = wait_for_run(other, key, run_id, timeout=300)
    finally:
        for client in clients:
            client.close()
        for stack in stacks:
            stack.stop()
    assert ended["status"] == "FAILED", ended
    assert str(ended["error_message"]).startswith("Cancelled"), ended
