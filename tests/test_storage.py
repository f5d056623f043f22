"""The embedded store's schema: created once, versioned, idempotent at every start."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest

from convergence_server.errors import Unavailable
from convergence_server.storage import duckdb_runs, duckdb_schedules, schema
from convergence_server.storage.duckdb_store import DuckDBStore, cursor_of
from convergence_server.storage.records import (
    ApiKeyRecord,
    DqRecord,
    RunLimits,
    RunRecord,
    StepRecord,
    TenantRecord,
)
from convergence_server.storage.warehouse import STAGE_PREFIX, Publication
from tests.conftest import fill, small_disk
from tests.test_schedule_store import new_schedule, next_version
from tests.test_store_contract import LONG_AGO, new_run, run, tenant


def test_schema_is_created_once_and_reopening_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    for _ in range(3):
        store = DuckDBStore.open(path)
        assert asyncio.run(store.schema_version()) == schema.SCHEMA_VERSION
        asyncio.run(store.close())

    with duckdb.connect(str(path), read_only=True) as db:
        versions = db.execute("SELECT version FROM tenants.schema_migrations").fetchall()
        assert versions == [(m.version,) for m in schema.MIGRATIONS]
        for table in schema.CENTRAL_TABLES:
            columns = db.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'tenants' AND table_name = ?",
                [table.name],
            ).fetchall()
            assert {c[0] for c in columns} == table.column_names


def test_the_guides_usage_query_runs_on_the_central_table(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    asyncio.run(DuckDBStore.open(path).close())
    with duckdb.connect(str(path)) as db:
        db.execute(
            "INSERT INTO tenants.tenant_usage_quotas VALUES "
            "('acme_corp', current_date, 5, 4, 1, 2, 3, 25, 5, now()::timestamp)"
        )
        row = db.execute(
            "SELECT tenant_id, usage_date, pipelines_run_today, daily_limit, "
            "(pipelines_run_today / daily_limit * 100) AS usage_percent, "
            "concurrent_pipelines_running, concurrent_limit "
            "FROM tenants.tenant_usage_quotas "
            "WHERE tenant_id = 'acme_corp' AND usage_date = CURRENT_DATE"
        ).fetchone()
    assert row is not None and row[4] == 20.0


def test_a_database_invalidated_by_a_full_disk_is_reopened(tmp_path: Path) -> None:
    """DuckDB invalidates the open database when a checkpoint cannot be written; the store
    answers Unavailable, reopens the file, and works again once space returns."""
    with small_disk(tmp_path / "disk", "32m") as disk:
        store = DuckDBStore.open(disk / "store.duckdb")

        async def scenario() -> None:
            tenant = TenantRecord("acme_corp", "Acme", "a@acme.com", "STARTER", datetime.now(UTC))
            key = ApiKeyRecord("k1", "acme_corp", b"salt", b"hash", tenant.created_at)
            await store.create_tenant(tenant, key)
            filler = fill(disk)
            # The checkpoint moves the log into the full file: DuckDB gives up on it.
            with pytest.raises(Unavailable):
                await store._call(lambda cur: cur.execute("CHECKPOINT"))
            assert await store.write_failure() is not None
            os.remove(filler)
            assert await store.write_failure() is None
            assert await store.update_plan("acme_corp", "SCALE", 3, datetime.now(UTC)) == 0
            assert (await store.get_tenant("acme_corp")).subscription_plan == "SCALE"  # type: ignore[union-attr]
            await store.close()

        asyncio.run(scenario())


def test_a_conditional_write_never_applies_over_a_concurrent_change(tmp_path: Path) -> None:
    """Claims (of the in-memory queue's choice and of the fair-queue query's) and a
    schedule's write over its version are conditional UPDATEs. While another transaction
    holds a change of the same row (here a cancel of the run, a newer schedule version),
    they conflict instead of applying as if their condition still held: a cancelled run is
    never also claimed, and of two writers from one schedule version one is written."""
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    assert run(store.create_run(made, LONG_AGO)).created
    schedule = new_schedule(tenant_id)
    run(store.create_schedule(schedule, 10))
    holder, other = cursor_of(store._connection), cursor_of(store._connection)
    now = datetime.now(UTC)
    try:
        holder.begin()
        holder.execute(
            f"UPDATE {duckdb_runs.RUNS} SET status = 'FAILED', end_time = ? "
            "WHERE pipeline_logging_id = ? AND status = 'PENDING'",
            [duckdb_runs.naive(now), made.pipeline_logging_id],
        )
        with pytest.raises(duckdb.TransactionException):
            duckdb_runs.claim_next_run(other, "worker-a", now)
        with pytest.raises(duckdb.TransactionException):
            duckdb_runs.claim_run(other, made.pipeline_logging_id, "worker-a", now)
        holder.commit()
        assert run(store.claim_next_run("worker-a", now)) is None
        # Read from the file: the cancel above went around the store and its run cache.
        cancelled = duckdb_runs.find_run(other, made.pipeline_logging_id)
        assert cancelled is not None and cancelled.status == "FAILED"

        holder.begin()
        first = next_version(schedule, last_skip_reason="first")
        assert duckdb_schedules.write_schedule(holder, first)
        with pytest.raises(duckdb.TransactionException):
            duckdb_schedules.write_schedule(other, next_version(schedule, last_skip_reason="2nd"))
        holder.commit()
        stored = run(store.get_schedule(tenant_id, schedule.schedule_id))
        assert stored is not None and (stored.version, stored.last_skip_reason) == (2, "first")
    finally:
        holder.close()
        other.close()
        run(store.close())


def test_the_runs_kept_in_memory_are_the_runs_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admitted run is kept as a read of its row gives it, and a claim and an end derive
    the run from what is kept instead of reading it back (a read back fails here): each
    must be exactly what the file holds. The times are given in another zone, parameters
    out of order, and the run lasts 1.002 ms across two millisecond boundaries, which DuckDB
    counts as 2 (whole milliseconds since 1970)."""
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    tenant_id = tenant(store)
    zone = timezone(timedelta(hours=2))
    start = datetime(2026, 3, 1, 11, 0, 0, 999, tzinfo=zone)
    made = replace(
        new_run(tenant_id, start - timedelta(seconds=1)),
        user_id="someone@example.com",
        parameters={"note": "a 'quoted' value", "date": "2026-02-28"},
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )
    reader = cursor_of(store._connection)
    find_run = duckdb_runs.find_run

    def kept_and_stored() -> tuple[str, str]:
        run_id = made.pipeline_logging_id
        kept = run(store.get_run(tenant_id, run_id))
        return repr(kept), repr(find_run(reader, run_id))

    def no_read_back(cur: object, run_id: str) -> None:
        raise AssertionError(f"run {run_id} read back")

    try:
        assert run(store.create_run(made, LONG_AGO)).created
        kept, stored = kept_and_stored()
        assert kept == stored

        monkeypatch.setattr(duckdb_runs, "find_run", no_read_back)
        claimed = run(store.claim_next_run("worker-a", start))
        monkeypatch.undo()
        assert claimed is not None and claimed.start_time == start
        kept, stored = kept_and_stored()
        assert repr(claimed) == kept == stored

        monkeypatch.setattr(duckdb_runs, "find_run", no_read_back)
        ended = run(store.finish_run(claimed, "FAILED", start + timedelta(microseconds=1002), "x"))
        monkeypatch.undo()
        assert ended is not None and (ended.status, ended.duration_ms) == ("FAILED", 2)
        kept, stored = kept_and_stored()
        assert repr(ended) == kept == stored
    finally:
        reader.close()
        run(store.close())


def claimed_run(tmp_path: Path) -> tuple[DuckDBStore, RunRecord]:
    """A store holding one tenant's run, claimed by worker-a."""
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    assert run(store.create_run(new_run(tenant(store)), LONG_AGO)).created
    claimed = run(store.claim_next_run("worker-a", datetime.now(UTC)))
    assert claimed is not None
    return store, claimed


def test_a_steps_end_updates_what_changed_and_a_changed_identity_the_whole_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's end sets only its progress columns when the rest of its row is as last
    written here (the UPDATE of every column fails here meanwhile); any other change of the
    row (its start time here) writes every column. Both leave the row as given."""
    store, claimed = claimed_run(tmp_path)
    tenant_id = claimed.tenant_id
    start = datetime(2026, 3, 1, 9, 0, 0, 1, tzinfo=UTC)
    first = StepRecord(
        str(uuid.uuid4()),
        claimed.pipeline_logging_id,
        claimed.pipeline_id,
        tenant_id,
        "one_row",
        "query",
        0,
        "RUNNING",
        start,
    )
    ended = replace(
        first,
        status="FAILED",
        rows_processed=7,
        step_end_time=start + timedelta(seconds=2),
        duration_ms=2000,
        error_message="it broke",
        attempts=2,
        warnings=1,
    )
    moved = replace(ended, step_start_time=start + timedelta(seconds=1), duration_ms=1000)
    reader = cursor_of(store._connection)
    try:
        for step in (first, ended, moved):
            if step is ended:
                monkeypatch.setattr(duckdb_runs, "_UPDATE_STEP", "SELECT no_such_column")
            run(store.save_step(step))
            monkeypatch.undo()
            (stored,) = duckdb_runs.list_run_steps(reader, claimed.pipeline_logging_id)
            assert stored == step
    finally:
        reader.close()
        run(store.close())


def test_step_lists_and_dq_results_follow_writes_without_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a run's step list was read, each step written keeps it as a read of the file
    gives it (order, ties, zones, a later attempt's steps only), and dq results without a
    failed `warn` check keep the run and its steps: neither is read again. Failed `warn`
    checks (the run's warnings), and a listed step's row written under another attempt,
    are read again."""
    store, claimed = claimed_run(tmp_path)
    tenant_id = claimed.tenant_id
    run_id = claimed.pipeline_logging_id
    start = datetime(2026, 3, 1, 9, 0, 0, 1, tzinfo=timezone(timedelta(hours=-5)))

    def step(index: int, attempt: int = 1, **changes: object) -> StepRecord:
        made = StepRecord(
            f"s{index}-{attempt}",
            run_id,
            claimed.pipeline_id,
            tenant_id,
            f"step_{index}",
            "query",
            index,
            "RUNNING",
            start + timedelta(seconds=index),
            run_attempt=attempt,
        )
        return replace(made, **changes)

    def ended(made: StepRecord) -> StepRecord:
        end = made.step_start_time + timedelta(milliseconds=1500)
        return replace(made, status="COMPLETE", rows_processed=3, step_end_time=end)

    def no_read(*args: object) -> None:
        raise AssertionError("read again")

    reader = cursor_of(store._connection)
    list_run_steps = duckdb_runs.list_run_steps
    try:
        assert run(store.list_steps(tenant_id, run_id)) == []  # read once: now kept
        monkeypatch.setattr(duckdb_runs, "list_run_steps", no_read)
        monkeypatch.setattr(duckdb_runs, "find_run", no_read)
        tie = replace(step(2), step_logging_id="s2-0")  # the same index and start (a retry)
        writes = [step(1), ended(step(1)), step(0), ended(step(0)), step(2), tie]
        writes += [step(0, attempt=2), step(1, status="FAILED"), ended(step(0, attempt=2))]
        for made in writes:
            run(store.save_step(made))
            kept = run(store.list_steps(tenant_id, run_id))
            stored = list_run_steps(reader, run_id)
            assert repr(kept) == repr(stored), made
        assert [s.step_logging_id for s in kept] == ["s0-2"]

        check = DqRecord(
            "dq-1", run_id, claimed.pipeline_id, tenant_id, "checks", "rows", "row_count",
            "warn", "PASSED", "1", "> 0", "", date(2026, 3, 1), start,
        )  # fmt: skip
        run(store.add_dq_results(claimed, [check]))
        kept_run = run(store.get_run(tenant_id, run_id))
        assert repr(run(store.list_steps(tenant_id, run_id))) == repr(kept)
        monkeypatch.undo()
        assert repr(kept_run) == repr(duckdb_runs.find_run(reader, run_id))

        failed = [replace(check, dq_result_id=f"dq-{n}", status="FAILED") for n in (2, 3)]
        run(store.add_dq_results(claimed, failed))
        read = run(store.get_run(tenant_id, run_id))
        assert read is not None and read.warnings == 2
        assert repr(read) == repr(duckdb_runs.find_run(reader, run_id))

        run(store.save_step(replace(step(0), step_logging_id="s0-2")))  # attempt 2's, as 1
        kept = run(store.list_steps(tenant_id, run_id))
        assert len(kept) == 5 and repr(kept) == repr(list_run_steps(reader, run_id))
    finally:
        reader.close()
        run(store.close())


def test_a_step_write_whose_caller_is_cancelled_is_never_cached_before_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's write held in its thread while its caller is cancelled (a client's
    deadline, a stop): a read meanwhile gets the row before it, which must not be kept,
    nor the next step's list derived from it."""
    store, claimed = claimed_run(tmp_path)
    tenant_id = claimed.tenant_id
    run_id = claimed.pipeline_logging_id
    first = StepRecord(
        "s0", run_id, claimed.pipeline_id, tenant_id, "one", "query", 0, "RUNNING",
        datetime(2026, 3, 1, tzinfo=UTC),
    )  # fmt: skip
    second = replace(first, step_logging_id="s1", step_name="two", step_index=1)
    save_step = duckdb_runs.save_step
    started, release, committed = threading.Event(), threading.Event(), threading.Event()

    def held(*args: Any) -> None:
        started.set()
        assert release.wait(60)
        save_step(*args)
        committed.set()

    async def play() -> None:
        await store.save_step(first)
        assert [s.status for s in await store.list_steps(tenant_id, run_id)] == ["RUNNING"]
        monkeypatch.setattr(duckdb_runs, "save_step", held)
        write = asyncio.create_task(store.save_step(replace(first, status="COMPLETE")))
        assert await asyncio.to_thread(started.wait, 60)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        monkeypatch.undo()
        before = await store.list_steps(tenant_id, run_id)  # the row before the write
        assert [s.status for s in before] == ["RUNNING"]
        release.set()
        assert await asyncio.to_thread(committed.wait, 60)
        await store.save_step(second)
        kept = await store.list_steps(tenant_id, run_id)
        assert [s.status for s in kept] == ["COMPLETE", "RUNNING"]

    reader = cursor_of(store._connection)
    try:
        run(play())
        assert repr(run(store.list_steps(tenant_id, run_id))) == repr(
            duckdb_runs.list_run_steps(reader, run_id)
        )
    finally:
        release.set()
        reader.close()
        run(store.close())


class Held:
    """`duckdb_runs.<name>` held in its thread, before its call or after it has committed,
    until released: the window in which another change of the run runs to its end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, after: bool) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        real = getattr(duckdb_runs, name)

        def held(*args: Any, **kwargs: Any) -> Any:
            if not after:
                self.started.set()
                assert self.release.wait(60)
            answer = real(*args, **kwargs)
            if after:
                self.started.set()
                assert self.release.wait(60)
            return answer

        monkeypatch.setattr(duckdb_runs, name, held)
        self._monkeypatch = monkeypatch

    async def entered(self) -> None:
        """Waits until the held call is in its window; later calls are not held."""
        assert await asyncio.to_thread(self.started.wait, 60)
        self._monkeypatch.undo()


def as_stored(store: DuckDBStore, run_id: str) -> RunRecord | None:
    reader = cursor_of(store._connection)
    try:
        return duckdb_runs.find_run(reader, run_id)
    finally:
        reader.close()


def warn_failed(claimed: RunRecord) -> DqRecord:
    return DqRecord(
        "dq-warn", claimed.pipeline_logging_id, claimed.pipeline_id, claimed.tenant_id,
        "checks", "rows", "row_count", "warn", "FAILED", "0", "> 0", "0 rows",
        date(2026, 3, 1), datetime(2026, 3, 1, tzinfo=UTC),
    )  # fmt: skip


@pytest.mark.parametrize("first", ["dq_results", "requeue"])
def test_a_change_overlapping_a_cancel_leaves_the_run_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """A write of the run (a failed `warn` check's count, a requeue) is held in its thread
    while a cancel flags the run: the write then conflicts and is tried again, so it
    commits after the cancel, whose caller comes back first. What GetRun answers, and what
    the worker asks (`cancel_requested`) and ends the run from, is what the file holds."""
    store, claimed = claimed_run(tmp_path)
    tenant_id, run_id = claimed.tenant_id, claimed.pipeline_logging_id

    async def play() -> None:
        assert await store.get_run(tenant_id, run_id) == claimed  # kept in memory
        if first == "dq_results":
            hold = Held(monkeypatch, "add_dq_results", after=False)
            write = asyncio.create_task(store.add_dq_results(claimed, [warn_failed(claimed)]))
        else:
            hold = Held(monkeypatch, "requeue_run", after=False)
            write = asyncio.create_task(store.requeue_run(claimed, datetime.now(UTC), True))
        await hold.entered()
        cancel = await store.request_cancel(tenant_id, run_id, datetime.now(UTC))
        assert cancel.run is not None and cancel.run.cancel_requested
        hold.release.set()
        await write
        assert await store.get_run(tenant_id, run_id) == as_stored(store, run_id)
        assert await store.cancel_requested(claimed)
        if first == "dq_results":
            ended = await store.finish_run(claimed, "COMPLETE", datetime.now(UTC))
            assert ended is not None and ended.warnings == 1
            assert ended == as_stored(store, run_id) == await store.get_run(tenant_id, run_id)

    try:
        run(play())
    finally:
        run(store.close())


def test_a_cancel_after_a_claims_commit_is_not_lost_when_the_claim_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim committed and held before its caller is back; a cancel flags the RUNNING run
    meanwhile. The claim's state (not flagged) must not replace the cancel's: the worker
    would not see the cancel."""
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    made = new_run(tenant(store))
    assert run(store.create_run(made, LONG_AGO)).created
    tenant_id, run_id = made.tenant_id, made.pipeline_logging_id

    async def play() -> None:
        hold = Held(monkeypatch, "claim_run", after=True)
        claim = asyncio.create_task(store.claim_next_run("worker-a", datetime.now(UTC)))
        await hold.entered()
        cancel = await store.request_cancel(tenant_id, run_id, datetime.now(UTC))
        assert cancel.run is not None and not cancel.ended and cancel.run.cancel_requested
        hold.release.set()
        claimed = await claim
        assert claimed is not None and claimed.status == "RUNNING"
        assert await store.cancel_requested(claimed)
        assert await store.get_run(tenant_id, run_id) == as_stored(store, run_id)

    try:
        run(play())
    finally:
        run(store.close())


def test_a_requeue_reported_after_a_cancel_it_followed_leaves_the_run_in_the_fair_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel commits its flag and is held before its caller is back; a requeue of the run
    (its server lost) then commits and is reported first. The fair queue must not keep the
    run RUNNING: it would never offer it while another tenant has a run waiting, and would
    count its tenant one run too busy. The requeued run, the older, is claimed first."""
    store, claimed = claimed_run(tmp_path)
    tenant_id, run_id = claimed.tenant_id, claimed.pipeline_logging_id
    later = new_run(tenant(store), claimed.created_at + timedelta(seconds=1))
    assert run(store.create_run(later, LONG_AGO)).created

    async def play() -> None:
        hold = Held(monkeypatch, "request_cancel", after=True)
        cancel = asyncio.create_task(store.request_cancel(tenant_id, run_id, datetime.now(UTC)))
        await hold.entered()
        assert await store.requeue_run(claimed, datetime.now(UTC), count_attempt=True)
        hold.release.set()
        await cancel
        assert await store.get_run(tenant_id, run_id) == as_stored(store, run_id)
        first = await store.claim_next_run("worker-b", datetime.now(UTC))
        assert first is not None and first.pipeline_logging_id == run_id
        second = await store.claim_next_run("worker-b", datetime.now(UTC))
        assert second is not None and second.pipeline_logging_id == later.pipeline_logging_id
        for each in (first, second):
            assert await store.finish_run(each, "FAILED", datetime.now(UTC), "Cancelled")

    try:
        run(play())
    finally:
        run(store.close())


def test_a_publication_is_recorded_once_and_answered_again_to_its_execution(
    tmp_path: Path,
) -> None:
    """A publication records itself first. Publishing again (a retry whose first try did
    commit) answers True to the execution that published, without writing the rows
    twice; another execution of the run is refused and writes nothing."""
    store, claimed = claimed_run(tmp_path)
    tenant_id = claimed.tenant_id

    async def publish(execution: RunRecord) -> bool:
        warehouse = store.warehouse(tenant_id)
        try:
            stage = f"{STAGE_PREFIX}rows"
            assert await warehouse.create_as(stage, "SELECT 1 AS n UNION ALL SELECT 2", {}) == 2
            return await warehouse.publish([Publication(stage, "rows", "append")], execution)
        finally:
            await warehouse.close()

    assert run(publish(claimed))
    assert run(publish(claimed))
    assert not run(publish(replace(claimed, attempt=claimed.attempt + 1)))
    reader = cursor_of(store._connection)
    try:
        assert reader.execute(f'SELECT COUNT(*) FROM "{tenant_id}".rows').fetchone() == (2,)
        assert duckdb_runs.published_by(reader, claimed.pipeline_logging_id) == (
            claimed.attempt,
            "worker-a",
        )
    finally:
        reader.close()
        run(store.close())


def test_only_plain_values_are_written_into_a_statement() -> None:
    """An admission's usage UPDATE may be sent with its values written in (one DuckDB call
    fewer): integers, dates, naive timestamps and plain text only; anything else keeps
    its parameters."""
    statement = "UPDATE t SET a = ?, b = ?, c = ? WHERE tenant_id = ?"
    moment = datetime(2026, 12, 4, 3, 5, 7, 123456)
    assert duckdb_runs._inline(statement, [7, moment.date(), moment, "c_ab-9"]) == (
        "UPDATE t SET a = 7, b = DATE '2026-12-04', c = TIMESTAMP '2026-12-04 03:05:07.123456' "
        "WHERE tenant_id = 'c_ab-9'"
    )

    class Sly(str):
        def __str__(self) -> str:
            return "x'; DROP TABLE t; --"

    refused = ["o'brien", "a b", "", "x\\", "é", Sly("plain"), True, 1.5, None, -1]
    for value in [*refused, moment.replace(tzinfo=UTC)]:
        assert duckdb_runs._inline(statement, [1, moment.date(), moment, value]) is None, value
    # A minus sign in the text before a negative value would begin a comment: refused.
    assert duckdb_runs._inline("UPDATE t SET a = a -? WHERE tenant_id = ?", [-1, "x"]) is None
    connection = duckdb.connect()
    connection.execute("CREATE TABLE t (a BIGINT, b DATE, c TIMESTAMP, tenant_id VARCHAR)")
    connection.execute("INSERT INTO t VALUES (0, NULL, NULL, 'c_ab-9')")
    written = duckdb_runs._inline(statement, [7, moment.date(), moment, "c_ab-9"])
    assert written is not None
    connection.execute(written)
    assert connection.execute("SELECT * FROM t").fetchall() == [
        (7, moment.date(), moment, "c_ab-9")
    ]


def test_an_admission_whose_one_call_fails_changes_no_usage(tmp_path: Path) -> None:
    """A later admission of a day (its counts and usage row known) sends BEGIN, the usage
    UPDATE and the runs' INSERT in one call: when the INSERT fails there, the UPDATE is
    rolled back with it, and the next admission counts from the file again."""
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    tenant_id = tenant(store)
    today = datetime.now(UTC).date()
    limits = RunLimits(daily=10, concurrent=10)
    first = new_run(tenant_id)
    assert run(store.create_run(first, LONG_AGO, limits)).created
    counted = run(store.usage(tenant_id, today)).row
    assert counted is not None and counted.pipelines_run_today == 1
    again = replace(new_run(tenant_id), pipeline_logging_id=first.pipeline_logging_id)
    with pytest.raises(duckdb.ConstraintException):
        run(store.create_run(again, LONG_AGO, limits))
    assert run(store.usage(tenant_id, today)).row == counted
    assert run(store.create_run(new_run(tenant_id), LONG_AGO, limits)).created
    assert run(store.usage(tenant_id, today)).row == replace(
        counted, pipelines_run_today=2, concurrent_pipelines_running=2, max_concurrent_reached=2
    )
    run(store.close())


def test_a_day_after_the_usage_row_known_gets_its_own_row(tmp_path: Path) -> None:
    """The store knows a tenant's usage row of an earlier day only: the first admission of
    a later day inserts that day's row, and the next ones update it."""
    store = DuckDBStore.open(tmp_path / "store.duckdb")
    tenant_id = tenant(store)
    now = datetime.now(UTC)
    limits = RunLimits(daily=10, concurrent=10)
    yesterday = new_run(tenant_id, now - timedelta(days=1))
    assert run(store.create_run(yesterday, LONG_AGO, limits)).created
    for _ in range(3):
        assert run(store.create_run(new_run(tenant_id, now), LONG_AGO, limits)).created
    row = run(store.usage(tenant_id, now.date())).row
    assert (row.pipelines_run_today, row.concurrent_pipelines_running) == (3, 4)  # type: ignore[union-attr]
    earlier = run(store.usage(tenant_id, now.date() - timedelta(days=1))).row
    assert earlier is not None and earlier.pipelines_run_today == 1
    run(store.close())
