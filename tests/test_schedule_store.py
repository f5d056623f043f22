"""The storage contract for schedules: the same tests, the same answers, on every adapter.

As in `test_store_contract`, the embedded store runs on a DuckDB file and the BigQuery store
on the real google-cloud-bigquery client against the local emulator. Each test makes its
own tenants; `due_schedules` of every tenant is checked on this test's tenants only.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from google.api_core.exceptions import Forbidden

from convergence_server.storage import Store, bigquery_schedules, schema
from convergence_server.storage.bigquery_store import BigQueryStore
from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.records import RunLimits, ScheduleRecord, SkipRecord
from convergence_server.storage.rows import aware
from tests import test_store_contract as contract
from tests.bigquery_emulator import Emulator
from tests.conftest import new_prefix
from tests.test_store_contract import LONG_AGO, run, tenant

# The contract's fixtures: the same two adapters, opened the same way.
adapter, store = contract.adapter, contract.store

T = TypeVar("T")
# Microseconds included: every timestamp must come back to the microsecond.
BASE = datetime(2026, 3, 1, 6, 0, 0, 123456, tzinfo=UTC)
SKIP_COLUMNS = "schedule_id, tenant_id, first_slot, last_slot, slot_count, reason, recorded_at"


def new_schedule(tenant_id: str, created_at: datetime = BASE, **changes: Any) -> ScheduleRecord:
    schedule = ScheduleRecord(
        schedule_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        provider="test",
        domain="runs",
        template="quick",
        cron="0 6 * * *",
        time_zone="Europe/Paris",
        parameters={"date": "{slot_date-1}", "note": 'quotes " and \\ and é'},
        catch_up="latest",
        catch_up_max=3,
        paused=False,
        created_by="ann",
        created_at=created_at,
        updated_at=created_at,
        last_slot=created_at,
        next_slot=created_at + timedelta(days=1),
    )
    return replace(schedule, **changes)


def create(store: Store, *schedules: ScheduleRecord, max_schedules: int = 100) -> list[int]:
    return [run(store.create_schedule(s, max_schedules)) for s in schedules]


def next_version(schedule: ScheduleRecord, **changes: Any) -> ScheduleRecord:
    return replace(schedule, version=schedule.version + 1, **changes)


def ids(schedules: list[ScheduleRecord]) -> list[str]:
    return [s.schedule_id for s in schedules]


def skips(store: Store, schedule_id: str) -> list[SkipRecord]:
    """The schedule's rows of `tenants.tenant_schedule_skips`, oldest first."""
    table = schema.TENANT_SCHEDULE_SKIPS.name
    if isinstance(store, DuckDBStore):
        rows = run(
            store._call(
                lambda cur: cur.execute(
                    f"SELECT {SKIP_COLUMNS} FROM {schema.CENTRAL_DATASET}.{table} "
                    "WHERE schedule_id = ? ORDER BY first_slot",
                    [schedule_id],
                ).fetchall()
            )
        )
    else:
        assert isinstance(store, BigQueryStore)
        rows = run(
            store._call(
                lambda: store._query(
                    f"SELECT {SKIP_COLUMNS} FROM {store._t(table)} "
                    "WHERE schedule_id = @id ORDER BY first_slot",
                    id=schedule_id,
                )
            )
        )
    return [SkipRecord(*(utc(v) for v in row)) for row in rows]


def utc(value: Any) -> Any:
    """A value of a row, a timestamp aware (the embedded store's are naive UTC)."""
    return aware(value) if isinstance(value, datetime) else value


# -- creation and the limit -------------------------------------------------------------


def test_schedules_are_created_up_to_the_limit_and_deleted_ones_do_not_count(
    store: Store,
) -> None:
    tenant_id = tenant(store)
    made = [new_schedule(tenant_id, BASE + timedelta(minutes=i)) for i in range(4)]
    assert create(store, *made, max_schedules=3) == [0, 1, 2, 3]
    assert run(store.get_schedule(tenant_id, made[3].schedule_id)) is None
    assert ids(run(store.list_schedules(tenant_id, None, 10))) == ids(made[:3])

    assert run(store.save_schedule(next_version(made[0], deleted=True)))
    assert run(store.get_schedule(tenant_id, made[0].schedule_id)) is None
    assert ids(run(store.list_schedules(tenant_id, None, 10))) == ids(made[1:3])
    # Its slot is free again; another tenant's schedules never count.
    assert create(store, made[3], max_schedules=3) == [2]
    assert create(store, new_schedule(tenant(store)), max_schedules=3) == [0]
    assert create(store, new_schedule(tenant_id), max_schedules=3) == [3]
    assert ids(run(store.list_schedules(tenant_id, None, 10))) == ids(made[1:])


def test_parallel_creations_stop_exactly_at_the_limit(store: Store) -> None:
    tenant_id = tenant(store)

    async def burst() -> list[int]:
        made = [new_schedule(tenant_id) for _ in range(4)]
        return list(await asyncio.gather(*(store.create_schedule(s, 2) for s in made)))

    assert sorted(run(burst())) == [0, 1, 2, 2]
    assert len(run(store.list_schedules(tenant_id, None, 10))) == 2


# -- reading ----------------------------------------------------------------------------


def test_every_field_round_trips_exactly(store: Store) -> None:
    tenant_id = tenant(store)
    full = new_schedule(
        tenant_id,
        cron="*/15 9-17 * * 1-5",
        time_zone="America/New_York",
        parameters={"date": "{slot_date+2}", "empty": "", "ünïcode": "日本語", "n": "1"},
        catch_up="all",
        catch_up_max=50,
        paused=True,
        created_by="",
        updated_at=BASE + timedelta(seconds=1, microseconds=1),
        last_slot=BASE + timedelta(hours=3, microseconds=999999),
        next_slot=BASE + timedelta(hours=4, microseconds=7),
        skipped_slots=12,
        last_skip_reason="the schedule was paused",
        backfill_after=BASE - timedelta(days=30, microseconds=5),
        backfill_until=BASE - timedelta(days=1, microseconds=3),
        backfill_left=29,
    )
    bare = new_schedule(tenant_id, parameters={}, last_slot=None, next_slot=None)
    create(store, full, bare)
    assert run(store.get_schedule(tenant_id, full.schedule_id)) == full
    assert run(store.get_schedule(tenant_id, bare.schedule_id)) == bare
    listed = {s.schedule_id: s for s in run(store.list_schedules(tenant_id, None, 10))}
    assert listed == {full.schedule_id: full, bare.schedule_id: bare}
    changed = next_version(full, parameters={"only": "this"}, backfill_after=None, paused=False)
    assert run(store.save_schedule(changed))
    assert run(store.get_schedule(tenant_id, full.schedule_id)) == changed
    due = run(store.due_schedules(tenant_id, BASE + timedelta(days=1), 10))
    assert due == [changed]


def test_a_schedule_is_found_only_in_its_tenant(store: Store) -> None:
    tenant_id, other = tenant(store), tenant(store)
    mine = new_schedule(tenant_id)
    create(store, mine)
    assert run(store.get_schedule(other, mine.schedule_id)) is None
    assert run(store.get_schedule(tenant_id, str(uuid.uuid4()))) is None
    assert run(store.list_schedules(other, None, 10)) == []
    assert not run(store.save_schedule(next_version(mine, tenant_id=other)))
    assert run(store.get_schedule(tenant_id, mine.schedule_id)) == mine


def test_schedules_list_oldest_first_in_pages(store: Store) -> None:
    tenant_id = tenant(store)
    made = [new_schedule(tenant_id, BASE + timedelta(minutes=i)) for i in range(5)]
    # Two created at the same moment are ordered by id.
    twins = sorted(
        (new_schedule(tenant_id, BASE + timedelta(minutes=2)) for _ in range(2)),
        key=lambda s: s.schedule_id,
    )
    everything = [*made[:3], *twins, *made[3:]]
    everything.sort(key=lambda s: (s.created_at, s.schedule_id))
    create(store, *reversed(everything))
    create(store, new_schedule(tenant(store), BASE))

    assert run(store.list_schedules(tenant_id, None, 10)) == everything
    pages: list[ScheduleRecord] = []
    after: tuple[datetime, str] | None = None
    while page := run(store.list_schedules(tenant_id, after, 3)):
        assert len(page) <= 3
        pages += page
        after = (page[-1].created_at, page[-1].schedule_id)
    assert ids(pages) == ids(everything)
    # Strictly after the cursor: the first twin's cursor gives the second twin next.
    first_twin = everything.index(twins[0])
    cursor = (twins[0].created_at, twins[0].schedule_id)
    assert ids(run(store.list_schedules(tenant_id, cursor, 2))) == ids(
        everything[first_twin + 1 : first_twin + 3]
    )
    assert run(store.list_schedules(tenant_id, (BASE + timedelta(days=1), ""), 10)) == []


# -- changes: compare and set ----------------------------------------------------------


def test_a_change_is_written_only_over_the_version_it_was_made_from(store: Store) -> None:
    tenant_id = tenant(store)
    original = new_schedule(tenant_id)
    create(store, original)
    slot = original.next_slot
    assert slot is not None
    skipped = SkipRecord(
        original.schedule_id,
        tenant_id,
        slot,
        slot + timedelta(days=2),
        3,
        "outside the catch-up policy",
        BASE + timedelta(days=3, microseconds=42),
    )
    moved = next_version(
        original,
        last_slot=slot + timedelta(days=2),
        next_slot=slot + timedelta(days=3),
        skipped_slots=3,
        last_skip_reason=skipped.reason,
    )
    assert run(store.save_schedule(moved, skipped))
    stored = run(store.get_schedule(tenant_id, original.schedule_id))
    assert stored == moved and stored.version == 2
    assert skips(store, original.schedule_id) == [skipped]

    # A change made from version 1 again (a replica that read it before) writes nothing.
    stale = next_version(original, paused=True, cron="0 7 * * *")
    stale_skip = replace(skipped, first_slot=slot + timedelta(days=5), reason="stale")
    assert not run(store.save_schedule(stale, stale_skip))
    assert not run(store.save_schedule(replace(moved, version=5, paused=True)))
    assert run(store.get_schedule(tenant_id, original.schedule_id)) == moved
    assert skips(store, original.schedule_id) == [skipped]

    unknown = new_schedule(tenant_id, version=2)
    assert not run(store.save_schedule(unknown, replace(skipped, schedule_id=unknown.schedule_id)))
    assert run(store.get_schedule(tenant_id, unknown.schedule_id)) is None
    assert skips(store, unknown.schedule_id) == []

    third = next_version(moved, catch_up_max=9)
    assert run(store.save_schedule(third))
    assert run(store.get_schedule(tenant_id, original.schedule_id)) == third


def test_of_concurrent_changes_from_one_version_exactly_one_is_written(store: Store) -> None:
    tenant_id = tenant(store)
    original = new_schedule(tenant_id)
    create(store, original)
    slot = original.next_slot
    assert slot is not None

    async def replicas() -> list[bool]:
        changes = [
            store.save_schedule(
                next_version(original, last_skip_reason=f"replica {i}", skipped_slots=i),
                SkipRecord(original.schedule_id, tenant_id, slot, slot, 1, f"replica {i}", BASE),
            )
            for i in range(5)
        ]
        return list(await asyncio.gather(*changes))

    written = run(replicas())
    assert written.count(True) == 1
    winner = written.index(True)
    stored = run(store.get_schedule(tenant_id, original.schedule_id))
    assert stored is not None
    assert (stored.version, stored.last_skip_reason) == (2, f"replica {winner}")
    assert [s.reason for s in skips(store, original.schedule_id)] == [f"replica {winner}"]


# -- due schedules ----------------------------------------------------------------------


def test_due_schedules_have_a_slot_past_or_a_backfill_in_progress(store: Store) -> None:
    tenant_id, other = tenant(store), tenant(store)
    now = BASE + timedelta(days=10)

    def at(minute: int, **changes: Any) -> ScheduleRecord:
        return new_schedule(tenant_id, BASE + timedelta(minutes=minute), **changes)

    past = at(0, next_slot=now - timedelta(hours=1))
    exactly_now = at(1, next_slot=now)
    paused = at(2, next_slot=now - timedelta(days=1), paused=True)
    backfilling = at(3, next_slot=now + timedelta(hours=1), backfill_left=4)
    backfilling_unscheduled = at(4, next_slot=None, backfill_left=1)
    future = at(5, next_slot=now + timedelta(microseconds=1))
    unscheduled = at(6, next_slot=None)
    deleted = at(7, next_slot=now - timedelta(hours=1))
    create(store, future, backfilling_unscheduled, exactly_now, unscheduled, deleted)
    create(store, backfilling, paused, past)
    assert run(store.save_schedule(next_version(deleted, deleted=True)))
    elsewhere = new_schedule(other, BASE, next_slot=now - timedelta(days=2))
    create(store, elsewhere)

    due = [past, exactly_now, paused, backfilling, backfilling_unscheduled]
    assert run(store.due_schedules(tenant_id, now, 100)) == due
    assert ids(run(store.due_schedules(tenant_id, now, 2))) == ids(due[:2])
    assert run(store.due_schedules(other, now, 100)) == [elsewhere]
    assert ids(run(store.due_schedules(tenant_id, BASE, 100))) == ids(due[3:])

    ours = {tenant_id, other}
    everyone = [s for s in run(store.due_schedules(None, now, 10_000)) if s.tenant_id in ours]
    by_tenant = {tenant_id: due, other: [elsewhere]}
    assert everyone == [s for t in sorted(ours) for s in by_tenant[t]]
    # Pages: strictly after a (tenant, creation, id) cursor; paused ones can be left out.
    first = due[0]
    cursor = (first.tenant_id, first.created_at, first.schedule_id)
    assert run(store.due_schedules(tenant_id, now, 100, cursor)) == due[1:]
    unpaused = [s for s in due if not s.paused]
    assert run(store.due_schedules(tenant_id, now, 100, paused=False)) == unpaused

    # Progress recorded (the slot ran, the backfill ended): no longer due.
    assert run(store.save_schedule(next_version(past, next_slot=now + timedelta(days=1))))
    assert run(store.save_schedule(next_version(backfilling, backfill_left=0)))
    assert ids(run(store.due_schedules(tenant_id, now, 100))) == ids(
        [exactly_now, paused, backfilling_unscheduled]
    )


def test_a_slot_run_and_its_schedule_progress_are_written_together(store: Store) -> None:
    """`create_run` with a schedule's progress: written with an admitted or found run, over
    the version it was made from only; never with a refused run; and no new run is
    admitted from a stale reading."""
    tenant_id = tenant(store)
    original = new_schedule(tenant_id)
    create(store, original)
    key = f"schedule/{original.schedule_id}/2026-03-02T05:00:00Z"
    first = next_version(original, last_slot=BASE + timedelta(days=1))
    admitted = run(store.create_run(contract.new_run(tenant_id, key=key), LONG_AGO, None, first))
    assert (admitted.created, admitted.progressed) == (True, True)
    assert run(store.get_schedule(tenant_id, original.schedule_id)) == first

    # The same slot again (a stale trigger): its run is found, the stale progress refused.
    again = run(store.create_run(contract.new_run(tenant_id, key=key), LONG_AGO, None, first))
    assert (again.created, again.progressed) == (False, False)
    assert again.run is not None and admitted.run is not None
    assert again.run.pipeline_logging_id == admitted.run.pipeline_logging_id
    # Found, with progress from the stored version: written.
    second = next_version(first, skipped_slots=7)
    found = run(store.create_run(contract.new_run(tenant_id, key=key), LONG_AGO, None, second))
    assert (found.created, found.progressed) == (False, True)
    assert run(store.get_schedule(tenant_id, original.schedule_id)) == second

    # A new slot's run from a stale reading (the schedule changed since: paused, deleted,
    # moved on by another trigger): refused, nothing written.
    stale_key = f"schedule/{original.schedule_id}/2026-03-04T05:00:00Z"
    stale = contract.new_run(tenant_id, key=stale_key)
    late = run(store.create_run(stale, LONG_AGO, None, next_version(first)))
    assert (late.refused, late.created, late.progressed, late.run) == ("stale", False, False, None)
    assert run(store.get_run(tenant_id, stale.pipeline_logging_id)) is None
    assert run(store.get_schedule(tenant_id, original.schedule_id)) == second

    # Refused by a limit: nothing written, neither run nor progress.
    full = RunLimits(daily=1000, concurrent=1)
    third = next_version(second, last_slot=BASE + timedelta(days=2))
    other = contract.new_run(tenant_id, key=f"schedule/{original.schedule_id}/2026-03-03T05:00:00Z")
    refused = run(store.create_run(other, LONG_AGO, full, third))
    assert (refused.refused, refused.progressed) == ("concurrent", False)
    assert run(store.get_schedule(tenant_id, original.schedule_id)) == second


# -- BigQuery: superseded versions ------------------------------------------------------


def versions(store: BigQueryStore) -> dict[str, list[int]]:
    """Each schedule's stored versions in `tenant_schedule_events`, oldest first."""
    rows = store._query(
        "SELECT schedule_id, version FROM "
        f"{store._t('tenant_schedule_events')} ORDER BY schedule_id, version"
    )
    stored: dict[str, list[int]] = {}
    for schedule_id, version in rows:
        stored.setdefault(schedule_id, []).append(version)
    return stored


def compacted(store: BigQueryStore, at: datetime) -> None:
    """Waits for the job deleting superseded versions in the hour of `at` to end."""
    job_id = bigquery_schedules.compaction_job_id(store._db, at)
    store._bq.client.get_job(job_id).result(timeout=120)


def test_a_bigquery_store_deletes_superseded_schedule_versions_once_an_hour(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Every slot run appends a schedule's version, and reads of schedules read every
    version stored: a replica's first page of due schedules starts a DELETE of the
    superseded ones, if it did not within the hour and no replica did in that clock hour.
    Each schedule's newest version stays (a deleted one's too), so every read and every
    version check answers as before."""
    prefix = new_prefix()
    store = contract.open_store("bigquery", tmp_path, emulator, prefix)
    replica = contract.open_store("bigquery", tmp_path, emulator, prefix)
    assert isinstance(store, BigQueryStore) and isinstance(replica, BigQueryStore)
    try:
        tenant_id, other = tenant(store), tenant(store)
        now = BASE + timedelta(days=10, minutes=30)  # 06:30: 59 minutes on is in 07:00's hour
        moving = new_schedule(tenant_id, next_slot=now - timedelta(hours=1))
        gone = new_schedule(tenant_id, BASE + timedelta(minutes=1))
        elsewhere = new_schedule(other, next_slot=now - timedelta(hours=1))
        create(store, moving, gone, elsewhere)
        for slot in range(1, 4):
            moving = next_version(moving, last_slot=BASE + timedelta(days=slot))
            assert run(store.save_schedule(moving))
        assert run(store.save_schedule(next_version(gone, deleted=True)))
        elsewhere = next_version(elsewhere, paused=True)
        assert run(store.save_schedule(elsewhere))
        assert versions(store) == {
            moving.schedule_id: [1, 2, 3, 4],
            gone.schedule_id: [1, 2],
            elsewhere.schedule_id: [1, 2],
        }

        def due(at: datetime, on: Store = store, **options: Any) -> list[ScheduleRecord]:
            return run(on.due_schedules(options.pop("tenant", None), at, 100, **options))

        both = sorted([moving, elsewhere], key=lambda s: s.tenant_id)
        assert due(now) == both
        compacted(store, now)
        newest = {moving.schedule_id: [4], gone.schedule_id: [2], elsewhere.schedule_id: [2]}
        assert versions(store) == newest
        assert run(store.get_schedule(tenant_id, moving.schedule_id)) == moving
        assert run(store.get_schedule(tenant_id, gone.schedule_id)) is None
        assert run(store.list_schedules(tenant_id, None, 10)) == [moving]
        assert due(now) == both
        # A change from the newest version is written.
        moving = next_version(moving, skipped_slots=1)
        assert run(store.save_schedule(moving))
        both = sorted([moving, elsewhere], key=lambda s: s.tenant_id)

        # Nothing more within the hour, for pages after the first, or by another replica
        # in the same clock hour (the hour's job is started already).
        assert due(now + timedelta(minutes=59)) == both
        cursor = (other, elsewhere.created_at, elsewhere.schedule_id)
        due(now + timedelta(hours=2), after=cursor)
        assert due(now + timedelta(minutes=20), replica) == both
        assert versions(store)[moving.schedule_id] == [4, 5]
        # An hour on, a tenant's own trigger starts it (for every tenant), as would the
        # other replica, in the next clock hour.
        later = now + timedelta(hours=1)
        due(later, tenant=other)
        compacted(store, later)
        assert versions(store) == {**newest, moving.schedule_id: [5]}
        assert run(store.get_schedule(tenant_id, moving.schedule_id)) == moving

        # A DELETE refused (here at the BigQuery client): the read goes on, and the next
        # try is an hour later.
        moving = next_version(moving, skipped_slots=2)
        assert run(store.save_schedule(moving))
        both = sorted([moving, elsewhere], key=lambda s: s.tenant_id)
        client = store._bq.client
        send = client.query

        def refuse_deletes(sql: str, *args: Any, **kwargs: Any) -> Any:
            if sql.startswith("DELETE"):
                raise Forbidden("not allowed to delete")
            return send(sql, *args, **kwargs)

        client.query = refuse_deletes  # type: ignore[method-assign]
        try:
            assert due(now + timedelta(hours=3)) == both
        finally:
            client.query = send  # type: ignore[method-assign]
        assert due(now + timedelta(hours=3, minutes=59)) == both
        assert versions(store)[moving.schedule_id] == [5, 6]
        due(now + timedelta(hours=4))
        compacted(store, now + timedelta(hours=4))
        assert versions(store)[moving.schedule_id] == [6]
    finally:
        run(replica.close())
        run(store.close())
