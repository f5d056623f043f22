"""Schedules through the real stack: each slot starts exactly once, whatever triggers it.

Time is moved with the clock file (`CONVERGENCE_CLOCK_OFFSET_FILE` holding an instant), to
dates in the past, so that no lease or day boundary of the real clock is crossed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from convergence_server.stack import Stack
from tests.conftest import (
    UNMETERED,
    StackFactory,
    dump_store,
    onboard,
    wait_for_run,
)

QUICK = {"provider": "test", "domain": "runs", "template": "quick"}
TOKEN = "s" * 40
# Set just before a schedule is created: its first slot, 10:01, is 55 s away.
BASE = datetime(2026, 6, 1, 10, 0, 5, tzinfo=UTC)


class Clock:
    """The stack's clock: the instant written is what the server reads at that moment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, instant: datetime) -> None:
        self.path.write_text(instant.isoformat())


@pytest.fixture(scope="module")
def clock(tmp_path_factory: pytest.TempPathFactory) -> Clock:
    clock = Clock(tmp_path_factory.mktemp("clock") / "clock")
    clock.set(BASE)
    return clock


@pytest.fixture(scope="module")
def sched(stack_factory: StackFactory, pipeline_env: dict[str, str], clock: Clock) -> Stack:
    return stack_factory(
        **pipeline_env,
        CONVERGENCE_CLOCK_OFFSET_FILE=str(clock.path),
        CONVERGENCE_SCHEDULER_TOKEN=TOKEN,
    )


@pytest.fixture(scope="module")
def http(sched: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sched.http_url, timeout=60) as client:
        yield client


def send(http: httpx.Client, method: str, path: str, key: str, **kwargs: object) -> httpx.Response:
    """One request; a 429 of the plan's request rate (STARTER: 60 a minute) waits as told."""
    deadline = time.monotonic() + 120
    while True:
        response = http.request(method, path, headers={"X-API-Key": key}, **kwargs)  # type: ignore[arg-type]
        limited = response.status_code == 429 and "Request rate" in response.text
        if not limited or time.monotonic() > deadline:
            return response
        time.sleep(float(response.json()["retry_after"]))


def create(http: httpx.Client, key: str, **fields: object) -> dict[str, object]:
    response = send(http, "POST", "/api/v1/schedules", key, json={**QUICK, **fields})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def fire(http: httpx.Client, key: str) -> dict[str, object]:
    response = send(http, "POST", "/api/v1/scheduler/trigger", key, json={})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def scheduled_runs(http: httpx.Client, key: str) -> list[dict[str, object]]:
    response = send(http, "GET", "/api/v1/pipelines/runs", key, params={"limit": 1000})
    assert response.status_code == 200, response.text
    return [r for r in response.json()["runs"] if r["trigger_type"] == "scheduler"]


def slot_times(http: httpx.Client, key: str) -> list[str]:
    return sorted(str(r["slot_time"]) for r in scheduled_runs(http, key))


def settle(http: httpx.Client, key: str) -> None:
    """Waits until every scheduled run of the tenant has ended, COMPLETE."""
    deadline = time.monotonic() + 120
    while True:
        statuses = {str(r["status"]) for r in scheduled_runs(http, key)}
        if statuses <= {"COMPLETE"}:
            return
        assert "FAILED" not in statuses and time.monotonic() < deadline, statuses
        time.sleep(0.2)


def z(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def assert_each_slot_once(times: list[str], first: datetime, at_least: int) -> None:
    """The runs' slots are every minute from `first`, each once, at least `at_least` of
    them (time flows on in the server while a busy machine waits: later slots may come)."""
    assert len(times) >= at_least, times
    assert times == [z(first + timedelta(minutes=m)) for m in range(len(times))]


def test_an_every_minute_schedule_starts_one_run_per_simulated_minute(
    http: httpx.Client, clock: Clock
) -> None:
    _, key = onboard(http, plan=UNMETERED)
    clock.set(BASE)
    schedule = create(http, key, cron="* * * * *", created_by="ops@acme.com")
    assert schedule["next_slot_time"] == "2026-06-01T10:01:00Z"
    assert fire(http, key)["slots"] == []  # nothing due yet
    for minute in range(1, 11):
        clock.set(BASE + timedelta(minutes=minute))
        slots = fire(http, key)["slots"]
        assert [(s["outcome"], s["slot_time"]) for s in slots] == [
            ("STARTED", z(BASE.replace(second=0) + timedelta(minutes=minute)))
        ]
        assert fire(http, key)["slots"] == []  # the same minute again: nothing more
    expected = [z(BASE.replace(second=0) + timedelta(minutes=m)) for m in range(1, 11)]
    assert slot_times(http, key) == expected
    run = scheduled_runs(http, key)[0]
    assert run["schedule_id"] == schedule["schedule_id"]
    assert run["trigger_by"] == "ops@acme.com"
    settle(http, key)
    # Its steps were timed by the server's clock, as the run was (2026-06-01, not today).
    path, headers = f"/api/v1/pipelines/runs/{run['pipeline_logging_id']}", {"X-API-Key": key}
    ended = http.get(path, headers=headers).json()
    steps = http.get(f"{path}/steps", headers=headers).json()["steps"]
    assert steps
    for step in steps:
        assert ended["start_time"] <= step["step_start_time"] <= step["step_end_time"], step
        assert step["step_end_time"] <= ended["end_time"], (ended, step)


def test_twenty_concurrent_triggers_start_each_slot_once(http: httpx.Client, clock: Clock) -> None:
    _, key = onboard(http, plan=UNMETERED)
    clock.set(BASE)
    create(http, key, cron="*/5 * * * *", catch_up="all", catch_up_max=10)
    create(http, key, cron="* * * * *", catch_up="all", catch_up_max=10)
    clock.set(
        BASE + timedelta(minutes=12)
    )  # 2 + 10 slots due (10:05, 10:10; 10:01..10:12 newest 10)
    with ThreadPoolExecutor(20) as pool:
        bodies = list(pool.map(lambda _: fire(http, key), range(20)))
    started = [s for b in bodies for s in b["slots"] if s["outcome"] == "STARTED"]
    assert len(started) == 12
    times = slot_times(http, key)
    assert len(times) == 12
    assert len({(r["schedule_id"], r["slot_time"]) for r in scheduled_runs(http, key)}) == 12
    settle(http, key)


def test_the_operator_token_triggers_every_tenant_and_bad_tokens_are_refused(
    http: httpx.Client, clock: Clock, sched: Stack
) -> None:
    keys = [onboard(http, plan=UNMETERED)[1] for _ in range(3)]
    clock.set(BASE)
    for key in keys:
        create(http, key, cron="0 11 * * *")
    clock.set(BASE + timedelta(hours=1))
    for headers in ({"X-Scheduler-Token": "x" * 40}, {"X-Scheduler-Token": ""}, {}):
        refused = http.post("/api/v1/scheduler/trigger", headers=headers, json={})
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"] == "Authentication failed"
        assert "x" * 40 not in refused.text
    assert all(slot_times(http, key) == [] for key in keys)
    response = http.post("/api/v1/scheduler/trigger", headers={"X-Scheduler-Token": TOKEN}, json={})
    assert response.status_code == 200, response.text
    for key in keys:
        assert slot_times(http, key) == ["2026-06-01T11:00:00Z"]
    # A tenant's key triggers only that tenant's schedules.
    again = fire(http, keys[0])
    assert again["slots"] == []
    for key in keys:
        settle(http, key)
    # Neither token, right or wrong, is ever logged.
    logged = (sched.run_dir.parent / "logs" / "server.log").read_text()
    assert TOKEN not in logged and "x" * 40 not in logged


def test_paused_and_deleted_schedules_never_fire_and_resume_does_not_replay(
    http: httpx.Client, clock: Clock
) -> None:
    _, key = onboard(http, plan=UNMETERED)
    clock.set(BASE)
    auth = {"X-API-Key": key}
    latest = create(http, key, cron="*/10 * * * *")
    replay = create(http, key, cron="*/10 * * * *", catch_up="all")
    gone = create(http, key, cron="*/10 * * * *")
    for schedule in (latest, replay):
        paused = http.post(f"/api/v1/schedules/{schedule['schedule_id']}:pause", headers=auth)
        assert paused.status_code == 200 and paused.json()["paused"] is True
    deleted = http.delete(f"/api/v1/schedules/{gone['schedule_id']}", headers=auth)
    assert deleted.status_code == 200, deleted.text
    clock.set(BASE + timedelta(minutes=35))  # 10:10, 10:20, 10:30 due
    outcomes = sorted(s["outcome"] for s in fire(http, key)["slots"])
    assert outcomes == ["PAUSED", "PAUSED"]
    # The operator-wide trigger leaves paused schedules out (they would fill its pages).
    everyone = http.post(
        "/api/v1/scheduler/trigger", headers={"X-Scheduler-Token": TOKEN}, json={}
    ).json()
    mine = {latest["schedule_id"], replay["schedule_id"], gone["schedule_id"]}
    assert [s for s in everyone["slots"] if s["schedule_id"] in mine] == []
    assert slot_times(http, key) == []
    assert http.get(f"/api/v1/schedules/{gone['schedule_id']}", headers=auth).status_code == 404

    for schedule in (latest, replay):
        resumed = http.post(f"/api/v1/schedules/{schedule['schedule_id']}:resume", headers=auth)
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
    skipped = http.get(f"/api/v1/schedules/{latest['schedule_id']}", headers=auth).json()
    assert skipped["skipped_slots"] == 3
    assert "paused" in skipped["last_skip_reason"]
    fire(http, key)
    runs = scheduled_runs(http, key)
    # `latest` skipped the paused period; `all` replayed it.
    assert sorted(
        str(r["slot_time"]) for r in runs if r["schedule_id"] == replay["schedule_id"]
    ) == [
        "2026-06-01T10:10:00Z",
        "2026-06-01T10:20:00Z",
        "2026-06-01T10:30:00Z",
    ]
    assert [r for r in runs if r["schedule_id"] == latest["schedule_id"]] == []
    clock.set(BASE + timedelta(minutes=45))
    fire(http, key)
    latest_runs = [
        str(r["slot_time"])
        for r in scheduled_runs(http, key)
        if r["schedule_id"] == latest["schedule_id"]
    ]
    assert latest_runs == ["2026-06-01T10:40:00Z"]
    assert all(r["schedule_id"] != gone["schedule_id"] for r in scheduled_runs(http, key))
    settle(http, key)


def test_missed_slots_follow_the_catch_up_policy_and_are_recorded(
    stack_factory: StackFactory, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    clock = Clock(tmp_path / "clock")
    clock.set(BASE)
    stack = stack_factory(**pipeline_env, CONVERGENCE_CLOCK_OFFSET_FILE=str(clock.path))
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        _, key = onboard(http, plan=UNMETERED)
        clock.set(BASE)
        auth = {"X-API-Key": key}
        none = create(http, key, cron="0 * * * *", catch_up="none")
        latest = create(http, key, cron="0 * * * *", catch_up="latest")
        three = create(http, key, cron="0 * * * *", catch_up="all", catch_up_max=3)
        # 11:00 .. 15:00 missed (the server was down); 15:00 is 30 minutes late.
        clock.set(BASE + timedelta(hours=5, minutes=30))
        slots = fire(http, key)["slots"]
        by_schedule: dict[object, list[tuple[object, object]]] = {}
        for s in slots:
            by_schedule.setdefault(s["schedule_id"], []).append((s["outcome"], s["slot_time"]))
        assert by_schedule[none["schedule_id"]] == [("SKIPPED", "2026-06-01T15:00:00Z")]
        assert by_schedule[latest["schedule_id"]] == [
            ("SKIPPED", "2026-06-01T14:00:00Z"),
            ("STARTED", "2026-06-01T15:00:00Z"),
        ]
        assert by_schedule[three["schedule_id"]] == [
            ("SKIPPED", "2026-06-01T12:00:00Z"),
            ("STARTED", "2026-06-01T13:00:00Z"),
            ("STARTED", "2026-06-01T14:00:00Z"),
            ("STARTED", "2026-06-01T15:00:00Z"),
        ]
        counts = {s["schedule_id"]: s["skipped_count"] for s in slots if s["outcome"] == "SKIPPED"}
        assert counts == {none["schedule_id"]: 5, latest["schedule_id"]: 4, three["schedule_id"]: 2}
        shown = http.get(f"/api/v1/schedules/{none['schedule_id']}", headers=auth).json()
        assert shown["skipped_slots"] == 5 and "10 minutes" in shown["last_skip_reason"]
        assert shown["next_slot_time"] == "2026-06-01T16:00:00Z"
        assert fire(http, key)["slots"] == []  # recorded once
        settle(http, key)
    stack.stop()
    # The skipped slots are rows too, for SQL.
    skips = dump_store(stack)["tenants.tenant_schedule_skips"]
    assert sorted((r[0], str(r[2]), str(r[3]), r[4]) for r in skips) == sorted(
        [
            (none["schedule_id"], "2026-06-01 11:00:00", "2026-06-01 15:00:00", 5),
            (latest["schedule_id"], "2026-06-01 11:00:00", "2026-06-01 14:00:00", 4),
            (three["schedule_id"], "2026-06-01 11:00:00", "2026-06-01 12:00:00", 2),
        ]
    )


def test_a_slot_refused_by_the_daily_quota_runs_the_next_utc_day_once(
    http: httpx.Client, clock: Clock
) -> None:
    day = datetime(2026, 6, 10, 5, 0, tzinfo=UTC)
    tenant_id, key = onboard(http, plan="STARTER")  # 6 runs a day, 1 at once
    clock.set(day)
    for _ in range(6):  # the day's quota, used by hand
        response = http.post(
            f"/api/v1/pipelines/run/{tenant_id}/test/runs/quick",
            headers={"X-API-Key": key},
            json={},
        )
        assert response.status_code == 200, response.text
        wait_for_run(http, key, response.json()["pipeline_logging_id"])
    create(http, key, cron="0 6 * * *", catch_up="all", catch_up_max=3)
    clock.set(day + timedelta(hours=1, minutes=1))
    (refused,) = fire(http, key)["slots"]
    assert refused["outcome"] == "QUOTA_EXCEEDED"
    assert refused["slot_time"] == "2026-06-10T06:00:00Z"
    assert 0 < refused["retry_after_seconds"] <= 18 * 3600
    assert "Daily pipeline quota exceeded" in refused["reason"]
    assert fire(http, key)["slots"][0]["outcome"] == "QUOTA_EXCEEDED"  # still due, still refused
    # A second schedule, refused too, then given another cron: its due slot is recorded as
    # skipped, never silently dropped.
    moved = create(http, key, cron="3 6 * * *")
    clock.set(day + timedelta(hours=1, minutes=4))
    assert fire(http, key)["slots"][-1]["outcome"] == "QUOTA_EXCEEDED"
    changed = send(
        http, "PATCH", f"/api/v1/schedules/{moved['schedule_id']}", key, json={"cron": "0 9 * * *"}
    ).json()
    assert (changed["skipped_slots"], changed["last_skip_reason"]) == (
        1,
        "the cron or time zone changed",
    )
    send(http, "DELETE", f"/api/v1/schedules/{moved['schedule_id']}", key)
    clock.set(datetime(2026, 6, 11, 0, 0, 30, tzinfo=UTC))
    (started,) = fire(http, key)["slots"]
    assert (started["outcome"], started["slot_time"]) == ("STARTED", "2026-06-10T06:00:00Z")
    settle(http, key)
    assert fire(http, key)["slots"] == []
    clock.set(datetime(2026, 6, 11, 6, 0, 30, tzinfo=UTC))
    fire(http, key)
    assert slot_times(http, key) == ["2026-06-10T06:00:00Z", "2026-06-11T06:00:00Z"]
    settle(http, key)


def test_a_backfill_of_30_days_runs_each_slot_once_within_the_daily_quota(
    http: httpx.Client, clock: Clock
) -> None:
    start = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    _, key = onboard(http, plan="STARTER")  # 6 runs a day, 1 at once
    clock.set(start)
    auth = {"X-API-Key": key}
    # Daily in June only: no slot of its own comes due in July, while the backfill runs.
    schedule = create(http, key, cron="0 3 * 6 *", parameters={"date": "{slot_date-1}"})
    response = http.post(
        f"/api/v1/schedules/{schedule['schedule_id']}:backfill",
        headers=auth,
        json={"start_date": "2026-06-01", "end_date": "2026-06-30"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["slots"] == 30
    assert response.json()["schedule"]["backfill_slots_left"] == 30
    again = http.post(
        f"/api/v1/schedules/{schedule['schedule_id']}:backfill",
        headers=auth,
        json={"start_date": "2026-06-01", "end_date": "2026-06-02"},
    )
    assert again.status_code == 409, again.text
    days = 0
    while len(slot_times(http, key)) < 30:
        assert days < 8, slot_times(http, key)
        # Within the day: one run at a time (the plan's concurrency), until the daily quota.
        for _ in range(10):
            outcomes = [s["outcome"] for s in fire(http, key)["slots"]]
            settle(http, key)
            if "STARTED" not in outcomes:
                break
        days += 1
        # 02:00 on the next day: before that day's own 03:00 slot.
        clock.set(datetime(2026, 7, 1 + days, 2, 0, tzinfo=UTC))
    times = slot_times(http, key)
    assert times == [f"2026-06-{d:02d}T03:00:00Z" for d in range(1, 31)]
    assert days == 5  # 6 a day
    runs = scheduled_runs(http, key)
    assert {r["parameters"]["date"] for r in runs} == {
        (datetime(2026, 6, d) - timedelta(days=1)).date().isoformat() for d in range(1, 31)
    }
    shown = send(http, "GET", f"/api/v1/schedules/{schedule['schedule_id']}", key).json()
    assert shown["backfill_slots_left"] == 0
    assert shown["next_slot_time"] == "2027-06-01T03:00:00Z"


@pytest.mark.parametrize(
    ("zone", "cron", "start", "end", "expected"),
    [
        # New York, spring forward (2026-03-08 02:00 EST -> 03:00 EDT).
        (
            "America/New_York",
            "30 2 * * *",
            "2026-03-06T12:00:00Z",
            "2026-03-10T12:00:00Z",
            [
                "2026-03-07T07:30:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-09T06:30:00Z",
                "2026-03-10T06:30:00Z",
            ],
        ),
        (
            "America/New_York",
            "0 * * * *",
            "2026-03-08T04:30:00Z",
            "2026-03-08T08:30:00Z",
            [
                "2026-03-08T05:00:00Z",
                "2026-03-08T06:00:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-08T08:00:00Z",
            ],
        ),
        # New York, fall back (2026-11-01 02:00 EDT -> 01:00 EST).
        (
            "America/New_York",
            "30 1 * * *",
            "2026-10-31T12:00:00Z",
            "2026-11-02T12:00:00Z",
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"],
        ),
        (
            "America/New_York",
            "0 * * * *",
            "2026-11-01T03:30:00Z",
            "2026-11-01T07:30:00Z",
            [
                "2026-11-01T04:00:00Z",
                "2026-11-01T05:00:00Z",
                "2026-11-01T06:00:00Z",
                "2026-11-01T07:00:00Z",
            ],
        ),
        # Berlin, spring forward (2026-03-29 02:00 CET -> 03:00 CEST) and fall back
        # (2026-10-25 03:00 CEST -> 02:00 CET).
        (
            "Europe/Berlin",
            "30 2 * * *",
            "2026-03-28T00:00:00Z",
            "2026-03-30T12:00:00Z",
            ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"],
        ),
        (
            "Europe/Berlin",
            "0 * * * *",
            "2026-03-28T23:30:00Z",
            "2026-03-29T02:30:00Z",
            ["2026-03-29T00:00:00Z", "2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z"],
        ),
        (
            "Europe/Berlin",
            "30 2 * * *",
            "2026-10-24T12:00:00Z",
            "2026-10-26T12:00:00Z",
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
        ),
        (
            "Europe/Berlin",
            "30 * * * *",
            "2026-10-24T23:45:00Z",
            "2026-10-25T02:45:00Z",
            [
                "2026-10-25T00:30:00Z",
                "2026-10-25T01:30:00Z",
                "2026-10-25T02:30:00Z",
            ],
        ),
    ],
)
def test_time_zones_and_dst_give_the_exact_slots(
    http: httpx.Client,
    clock: Clock,
    zone: str,
    cron: str,
    start: str,
    end: str,
    expected: list[str],
) -> None:
    """The clock walks from `start` to `end` in half-hours, triggering at each step."""
    moment, last = datetime.fromisoformat(start), datetime.fromisoformat(end)
    _, key = onboard(http, plan=UNMETERED)
    clock.set(moment)
    create(http, key, cron=cron, time_zone=zone, catch_up="all")
    while moment < last:
        moment += timedelta(minutes=30)
        clock.set(moment)
        fire(http, key)
    assert slot_times(http, key) == expected
    settle(http, key)


def test_the_ticker_and_triggers_together_start_each_slot_once(
    stack_factory: StackFactory, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    clock = Clock(tmp_path / "clock")
    clock.set(BASE)
    stack = stack_factory(
        **pipeline_env,
        CONVERGENCE_CLOCK_OFFSET_FILE=str(clock.path),
        CONVERGENCE_SCHEDULER_TICK_SECONDS="0.05",
    )
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        _, key = onboard(http, plan=UNMETERED)
        clock.set(BASE)
        create(http, key, cron="* * * * *", catch_up="all", catch_up_max=100)
        for minute in range(1, 6):
            clock.set(BASE + timedelta(minutes=minute))
            with ThreadPoolExecutor(5) as pool:
                list(pool.map(lambda _: fire(http, key), range(5)))
        deadline = time.monotonic() + 60
        while len(slot_times(http, key)) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # more ticks: none may add a run
        first = BASE.replace(second=0) + timedelta(minutes=1)
        assert_each_slot_once(slot_times(http, key), first, at_least=5)
        settle(http, key)
    stack.stop()


def test_a_crash_between_the_run_and_the_slot_record_starts_the_slot_once(
    stack_factory: StackFactory, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    """The fault point kills the server (SIGKILL) inside the transaction that admits the
    slot's run, after the run's insert and before the schedule's record of the slot: the
    store keeps neither, and after a restart the slot starts, once."""
    clock = Clock(tmp_path / "clock")
    data_dir = tmp_path / "data"
    env = {**pipeline_env, "CONVERGENCE_CLOCK_OFFSET_FILE": str(clock.path)}
    crashing = stack_factory(data_dir=data_dir, **env, CONVERGENCE_FAULT_POINTS="after_slot_run")
    with httpx.Client(base_url=crashing.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        clock.set(BASE)
        schedule = create(http, key, cron="0 11 * * *")
        clock.set(BASE + timedelta(hours=1))
        crashed = http.post("/api/v1/scheduler/trigger", headers={"X-API-Key": key}, json={})
        assert crashed.status_code == 503, crashed.text  # Envoy answers for the dead server
    try:
        crashing.server.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail("the fault point did not kill the server")
    crashing.stop()
    stored = dump_store(crashing)
    assert [r for r in stored["tenants.tenant_pipeline_runs"] if r[2] == tenant_id] == []
    (row,) = [r for r in stored["tenants.tenant_schedules"] if r[0] == schedule["schedule_id"]]
    assert str(row[14]).startswith("2026-06-01 10:00")  # last_slot: still its creation

    restarted = stack_factory(data_dir=data_dir, **env)
    with httpx.Client(base_url=restarted.http_url, timeout=60) as http:
        (started,) = fire(http, key)["slots"]
        assert (started["outcome"], started["slot_time"]) == ("STARTED", "2026-06-01T11:00:00Z")
        assert fire(http, key)["slots"] == []
        assert slot_times(http, key) == ["2026-06-01T11:00:00Z"]
        settle(http, key)
    restarted.stop()
