"""Run, step and data-quality records in the embedded store (a part of DuckDBStore).

Run state changes are conditional UPDATEs (`... WHERE status = 'RUNNING'`), so a late
writer can never move a finished run back; on BigQuery the same port is served by
append-only events instead (see the BigQuery adapter).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta

import duckdb

from convergence_server import faults
from convergence_server.storage import schema
from convergence_server.storage.identifiers import quote_identifier
from convergence_server.storage.records import (
    Admission,
    Cancellation,
    DqRecord,
    RunCursor,
    RunFilter,
    RunLimits,
    RunRecord,
    StepRecord,
    UsageRecord,
)
from convergence_server.storage.rows import (
    DQ_CHECKS,
    DQ_COLUMNS,
    EPOCH,
    FAIR_QUEUE,
    RUN_COLUMNS,
    STEP_COLUMNS,
    aware,
    dq_from_row,
    dq_values,
    naive,
    run_from_row,
    step_from_row,
)

CENTRAL = quote_identifier("tenants")
RUNS = f"{CENTRAL}.tenant_pipeline_runs"
STEPS = f"{CENTRAL}.tenant_step_logs"
KEYS = f"{CENTRAL}.tenant_idempotency_keys"
# Usage rows are never deleted: an admission relies on a row it has written being there.
USAGE = f"{CENTRAL}.tenant_usage_quotas"
PUBLICATIONS = f"{CENTRAL}.tenant_run_publications"
DQ_RESULTS = f"{CENTRAL}.tenant_dq_results"
# The central tables' column types (`schema`) in DuckDB.
DUCKDB_TYPES = {
    "STRING": "VARCHAR",
    "INT64": "BIGINT",
    "BOOL": "BOOLEAN",
    "TIMESTAMP": "TIMESTAMP",
    "DATE": "DATE",
    "BYTES": "BLOB",
    "JSON": "JSON",
}
_RUN_TYPES = {c.name: DUCKDB_TYPES[c.type] for c in schema.TENANT_PIPELINE_RUNS.columns}
_RUN_NAMES = RUN_COLUMNS.split(", ")


def create_table_sql(dataset: str, table: schema.Table) -> str:
    """The table (`schema`), created in `dataset` if it is not there."""
    columns = [
        f"{quote_identifier(c.name)} {DUCKDB_TYPES[c.type]}{' NOT NULL' if c.required else ''}"
        for c in table.columns
    ]
    if table.primary_key:
        columns.append(f"PRIMARY KEY ({', '.join(map(quote_identifier, table.primary_key))})")
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(dataset)}.{quote_identifier(table.name)} "
        f"({', '.join(columns)})"
    )


def rollback(cur: duckdb.DuckDBPyConnection) -> None:
    """Rolls back the open transaction, if any: a commit that failed (a full disk) has
    already ended it, and that failure, not this one, is what the caller must see."""
    with contextlib.suppress(duckdb.TransactionException):
        cur.rollback()


@contextlib.contextmanager
def _transaction(cur: duckdb.DuckDBPyConnection) -> Iterator[None]:
    cur.begin()
    try:
        yield
        cur.commit()
    except BaseException:
        rollback(cur)
        raise


def changed(
    cur: duckdb.DuckDBPyConnection,
    statement: str,
    params: Sequence[object] | Mapping[str, object],
) -> int:
    """How many rows an INSERT, UPDATE or DELETE changed: DuckDB answers the count itself.

    Never RETURNING for a conditional UPDATE: DuckDB (2.0.1) does not check an UPDATE with
    RETURNING for write conflicts, so it changes a row that a concurrent transaction has
    changed (committed or not) as if its condition still held; without RETURNING the
    second writer gets a `TransactionException` (tests/test_storage.py). RETURNING also
    costs an UPDATE more than twice its time."""
    row = cur.execute(statement, params).fetchone()
    return int(row[0]) if row else 0


def insert_run(cur: duckdb.DuckDBPyConnection, run: RunRecord) -> None:
    insert_runs(cur, [run])


def insert_runs(
    cur: duckdb.DuckDBPyConnection, runs: Sequence[RunRecord], before: str = ""
) -> None:
    """One statement for them all, after the statements `before` (without parameters: DuckDB
    binds them only in the last statement of a call) in the same call.

    Binding the values is most of an INSERT's cost, so it names only the columns some run
    has a value for (a new run has no start, end or worker yet): the others are NULL, as
    the tables have no defaults. Runs written together: one list a column (8 runs by VALUES
    bind 176 values, and their admission costs 6% more; 16 runs, 29% more); one run alone:
    by VALUES (1.2 ms against 1.7 for its lists)."""
    columns = [
        (name, values)
        for name, values in zip(_RUN_NAMES, zip(*map(_run_values, runs), strict=True), strict=True)
        if any(value is not None for value in values)
    ]
    names = ", ".join(name for name, _ in columns)
    if len(runs) == 1:
        marks = ", ".join("?" for _ in columns)
        statement = f"INSERT INTO {RUNS} ({names}) VALUES ({marks})"
        cur.execute(before + statement, [values[0] for _, values in columns])
    else:
        lists = ", ".join(f"unnest(?::{_RUN_TYPES[name]}[])" for name, _ in columns)
        statement = f"INSERT INTO {RUNS} ({names}) SELECT {lists}"
        cur.execute(before + statement, [list(values) for _, values in columns])


def _run_values(run: RunRecord) -> list[object]:
    return [
        run.pipeline_logging_id,
        run.pipeline_id,
        run.tenant_id,
        run.provider,
        run.domain,
        run.template,
        run.status,
        run.trigger_type,
        run.trigger_by,
        run.user_id or None,
        json.dumps(run.parameters, sort_keys=True),
        naive(run.created_at),
        naive(run.start_time),
        naive(run.end_time),
        run.duration_ms,
        run.error_message or None,
        run.idempotency_key or None,
        run.attempt,
        run.cancel_requested,
        run.worker_id or None,
        run.warnings,
        run.trace_id or None,
    ]


def create_run(
    cur: duckdb.DuckDBPyConnection,
    run: RunRecord,
    keys_valid_from: datetime,
    limits: RunLimits | None,
    known: Counts,
    also: Callable[[duckdb.DuckDBPyConnection], bool] | None = None,
) -> tuple[Admission, Counts]:
    """Inserts the run, returns the run its idempotency key already started, or refuses
    it over a limit; the caller holds the tenant's lock, so the counts cannot move. Unless
    refused, `also` runs in the same transaction (`Admission.progressed` is its answer); a
    new run whose `also` answers False is not stored (refused "stale"). Returns the
    answer and the counts after it (`known`, completed from the database)."""
    tenant_id, day = run.tenant_id, _day(run)
    cur.begin()
    try:
        if run.idempotency_key:
            row = cur.execute(
                f"SELECT pipeline_logging_id, created_at FROM {KEYS} "
                "WHERE tenant_id = ? AND idempotency_key = ?",
                [run.tenant_id, run.idempotency_key],
            ).fetchone()
            existing = None
            if row is not None and aware(row[1]) >= keys_valid_from:  # type: ignore[operator]
                existing = get_run(cur, run.tenant_id, row[0])
            if existing is not None:
                progressed = also(cur) if also is not None else False
                cur.commit()
                return Admission(existing, created=False, progressed=progressed), known
            if row is not None:  # expired, or its run is gone: the key is free again
                cur.execute(
                    f"DELETE FROM {KEYS} WHERE tenant_id = ? AND idempotency_key = ?",
                    [run.tenant_id, run.idempotency_key],
                )
        counts = _counts(cur, known, [tenant_id], [day])
        active, today = counts.active[tenant_id], counts.created[tenant_id, day]
        if limits is not None:
            refusal = "daily" if today >= limits.daily else ""
            if not refusal and active >= limits.concurrent:
                refusal = "concurrent"
            if refusal:
                cur.rollback()
                used = today if refusal == "daily" else active
                return Admission(None, created=False, refused=refusal, used=used), counts
        if run.idempotency_key:
            cur.execute(
                f"INSERT INTO {KEYS} VALUES (?, ?, ?, ?)",
                [
                    run.tenant_id,
                    run.idempotency_key,
                    run.pipeline_logging_id,
                    naive(run.created_at),
                ],
            )
        insert_run(cur, run)
        _count_usage(cur, run.tenant_id, run.created_at, limits, started=1, active=active + 1)
        progressed = False
        if also is not None:
            faults.reached(faults.AFTER_SLOT_RUN)
            progressed = also(cur)
            if not progressed:  # read before the schedule moved on: no new run from it
                cur.rollback()
                return Admission(None, created=False, refused="stale"), counts
        cur.commit()
    except BaseException:
        rollback(cur)
        raise
    counts.active[tenant_id] = active + 1
    counts.created[tenant_id, day] = today + 1
    counts.usage_rows.add((tenant_id, day))
    return Admission(run, created=True, progressed=progressed), counts


@dataclass(frozen=True)
class Counts:
    """What an admission checks, as far as the caller knows them exactly: each tenant's
    active runs (PENDING and RUNNING), and its runs created on a UTC day. What is missing
    is counted in the database."""

    active: dict[str, int] = field(default_factory=dict)
    created: dict[tuple[str, date], int] = field(default_factory=dict)
    # The tenants' usage rows (tenant, UTC day) known to exist: none is ever deleted.
    usage_rows: set[tuple[str, date]] = field(default_factory=set)

    def cover(self, tenants: Sequence[str], days: Sequence[date]) -> bool:
        """Whether these tenants' counts on these days are all known."""
        return all(t in self.active and all((t, d) in self.created for d in days) for t in tenants)


def _counts(
    cur: duckdb.DuckDBPyConnection, known: Counts, tenants: Sequence[str], days: Sequence[date]
) -> Counts:
    """`known`, completed for these tenants and days from the database (a copy: a
    transaction retried after a conflict starts again from what the caller knew)."""
    counts = Counts(dict(known.active), dict(known.created), set(known.usage_rows))
    unknown = [t for t in tenants if t not in counts.active]
    if unknown:
        # A list of literals, not an unnested array: DuckDB prunes row groups by it.
        counts.active.update(dict.fromkeys(unknown, 0))
        counts.active.update(
            cur.execute(
                f"SELECT tenant_id, COUNT(*) FROM {RUNS} "
                f"WHERE tenant_id IN ({', '.join('?' for _ in unknown)}) "
                "AND status IN ('PENDING', 'RUNNING') GROUP BY tenant_id",
                unknown,
            ).fetchall()
        )
    unknown = sorted({t for t in tenants for d in days if (t, d) not in counts.created})
    if unknown:
        for tenant_id in unknown:
            for day in days:
                counts.created.setdefault((tenant_id, day), 0)
        counts.created.update(
            ((tenant_id, day), count)
            for tenant_id, day, count in cur.execute(
                f"SELECT tenant_id, CAST(created_at AS DATE) AS day, COUNT(*) FROM {RUNS} "
                f"WHERE tenant_id IN ({', '.join('?' for _ in unknown)}) "
                "AND created_at >= ? AND created_at < ? GROUP BY ALL",
                [*unknown, _midnight(min(days)), _midnight(max(days) + timedelta(days=1))],
            ).fetchall()
        )
    return counts


@dataclass(frozen=True)
class AdmissionRequest:
    """One `create_run` (without schedule progress) waiting for the next group commit."""

    run: RunRecord
    keys_valid_from: datetime
    limits: RunLimits | None


def admit_batch(
    cur: duckdb.DuckDBPyConnection, requests: Sequence[AdmissionRequest], known: Counts
) -> tuple[list[Admission], Counts]:
    """`create_run` for each request, in their order, in one transaction: the counts are
    read once per tenant and day (unless `known`), each request is admitted or refused
    against them as they stand after the requests before it, and the admitted runs, their
    idempotency keys and usage rows are written with one statement each. The caller holds
    the turns of every tenant of the batch, so no count moves under it. Returns the
    answers and the counts after the batch.

    When its usage rows are known to exist, their UPDATEs (values written in) and the runs'
    INSERT are one call; when it also has nothing to read (its counts known, no idempotency
    key), BEGIN is in that call too, so the transaction is two calls with its commit. Each
    DuckDB call gives up the GIL and must take it back from a busy event loop: two calls
    instead of four made triggers about 5% faster (bench/RESULTS.md)."""
    tenants = sorted({r.run.tenant_id for r in requests})
    days = sorted({_day(r.run) for r in requests})
    of_tenants = f"tenant_id IN ({', '.join('?' for _ in tenants)})"
    wanted = sorted({r.run.idempotency_key for r in requests if r.run.idempotency_key})
    begun = bool(wanted) or not known.cover(tenants, days)
    if begun:
        cur.begin()
    try:
        counts = _counts(cur, known, tenants, days)
        active, created = counts.active, counts.created
        stored_keys: dict[tuple[str, str], tuple[str, datetime]] = {}
        if wanted:
            stored_keys = {
                (tenant_id, key): (run_id, aware(at) or at)
                for tenant_id, key, run_id, at in cur.execute(
                    f"SELECT tenant_id, idempotency_key, pipeline_logging_id, created_at "
                    f"FROM {KEYS} WHERE {of_tenants} "
                    f"AND idempotency_key IN ({', '.join('?' for _ in wanted)})",
                    [*tenants, *wanted],
                ).fetchall()
            }
        answers: list[Admission] = []
        admitted: dict[tuple[str, str], RunRecord] = {}  # by (tenant, key); "" for none
        freed: list[tuple[str, str]] = []
        # Per tenant and day: runs admitted, the tenant's active runs after the last one,
        # its time and limits (what that admission alone would have written).
        usage: dict[tuple[str, date], tuple[int, int, datetime, RunLimits | None]] = {}
        for request in requests:
            run, key = request.run, (request.run.tenant_id, request.run.idempotency_key)
            if run.idempotency_key:
                existing = admitted.get(key)
                found = stored_keys.get(key)
                if existing is None and found and found[1] >= request.keys_valid_from:
                    existing = get_run(cur, run.tenant_id, found[0])
                if existing is not None:
                    answers.append(Admission(existing, created=False))
                    continue
            day = (run.tenant_id, _day(run))
            today, now_active = created.get(day, 0), active[run.tenant_id]
            limits = request.limits
            if limits is not None and (today >= limits.daily or now_active >= limits.concurrent):
                daily = today >= limits.daily
                refusal = "daily" if daily else "concurrent"
                used = today if daily else now_active
                answers.append(Admission(None, created=False, refused=refusal, used=used))
                continue
            if run.idempotency_key and key in stored_keys:
                freed.append(key)  # expired, or its run is gone: the key is free again
                del stored_keys[key]
            admitted[key if run.idempotency_key else ("", run.pipeline_logging_id)] = run
            created[day] = today + 1
            active[run.tenant_id] = now_active + 1
            count = usage.get(day, (0, 0, run.created_at, None))[0]
            usage[day] = (count + 1, now_active + 1, run.created_at, limits)
            answers.append(Admission(run, created=True))
        if freed:
            cur.executemany(
                f"DELETE FROM {KEYS} WHERE tenant_id = ? AND idempotency_key = ?",
                [list(k) for k in freed],
            )
        keyed = [r for r in admitted.values() if r.idempotency_key]
        if keyed:
            cur.execute(
                f"INSERT INTO {KEYS} VALUES {', '.join('(?, ?, ?, ?)' for _ in keyed)}",
                [
                    value
                    for r in keyed
                    for value in (
                        r.tenant_id,
                        r.idempotency_key,
                        r.pipeline_logging_id,
                        naive(r.created_at),
                    )
                ],
            )
        updates = _inlined_updates(usage, counts.usage_rows) if admitted else None
        if updates is not None:
            before = "" if begun else "BEGIN TRANSACTION; "
            insert_runs(cur, list(admitted.values()), before + updates)
        elif admitted:
            if not begun:
                cur.begin()
            insert_runs(cur, list(admitted.values()))
            for (tenant_id, _), (count, after, moment, limits) in usage.items():
                _count_usage(cur, tenant_id, moment, limits, started=count, active=after)
        if begun or admitted:  # else all refused, nothing read: no transaction
            cur.commit()
    except BaseException:
        rollback(cur)
        raise
    counts.usage_rows.update(usage)
    return answers, counts


def _day(run: RunRecord) -> date:
    return run.created_at.astimezone(UTC).date()


def _midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time())


def active_runs(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> int:
    """The tenant's concurrency slots in use: its PENDING and RUNNING runs."""
    row = cur.execute(
        f"SELECT COUNT(*) FROM {RUNS} WHERE tenant_id = ? AND status IN ('PENDING', 'RUNNING')",
        [tenant_id],
    ).fetchone()
    return int(row[0]) if row else 0


def _count_usage(
    cur: duckdb.DuckDBPyConnection,
    tenant_id: str,
    moment: datetime,
    limits: RunLimits | None,
    *,
    active: int,
    started: int = 0,
) -> None:
    """Adds `started` runs to the tenant's usage row of `moment`'s UTC day and sets its
    current concurrency; a new row takes the limits given, else the tenant's last ones."""
    usage_day = moment.astimezone(UTC).date()
    # An UPDATE of the day's row, and an INSERT only for the day's first: DuckDB's
    # INSERT ... ON CONFLICT costs about twice an UPDATE, and a new row alone needs the
    # tenant's last limits when none are given.
    if changed(cur, *_usage_update(tenant_id, moment, limits, started=started, active=active)):
        return
    daily, concurrent = (
        (limits.daily, limits.concurrent) if limits else _last_limits(cur, tenant_id)
    )
    cur.execute(
        f"INSERT INTO {USAGE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [tenant_id, usage_day, started, 0, 0, active, active, daily, concurrent, naive(moment)],
    )


def _usage_update(
    tenant_id: str, moment: datetime, limits: RunLimits | None, *, started: int, active: int
) -> tuple[str, list[object]]:
    """The UPDATE of `_count_usage`, and its parameters."""
    new_limits = ", daily_limit = ?, concurrent_limit = ?" if limits else ""
    return (
        f"UPDATE {USAGE} SET pipelines_run_today = pipelines_run_today + ?, "
        "concurrent_pipelines_running = ?, "
        f"max_concurrent_reached = greatest(max_concurrent_reached, ?){new_limits}, "
        "updated_at = ? WHERE tenant_id = ? AND usage_date = ?",
        [
            started,
            active,
            active,
            *((limits.daily, limits.concurrent) if limits else ()),
            naive(moment),
            tenant_id,
            moment.astimezone(UTC).date(),
        ],
    )


def _inlined_updates(
    usage: Mapping[tuple[str, date], tuple[int, int, datetime, RunLimits | None]],
    rows: set[tuple[str, date]],
) -> str | None:
    """The UPDATEs of these usage rows, each followed by "; ", with their values written in
    (to share a call with a statement that has parameters); None unless every row is known
    to exist (an UPDATE of no row would lose the count unseen) and every value is plain."""
    if not set(usage) <= rows:
        return None
    updates = [
        _inline(*_usage_update(tenant_id, moment, limits, started=count, active=after))
        for (tenant_id, _), (count, after, moment, limits) in usage.items()
    ]
    return None if None in updates else "".join(f"{update}; " for update in updates)


# Text written into a statement as it is: nothing DuckDB could read as more than a value.
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9_-]+")


def _inline(statement: str, params: Sequence[object]) -> str | None:
    """`statement` with its parameters (`?`) written in as literals, or None when one of them
    is not a non-negative integer (a minus sign after one in the text would begin a
    comment), a date, a naive timestamp or plain text (`_PLAIN_TEXT`). Exact types only:
    a subclass could write itself as anything."""
    literals: list[str] = []
    for value in params:
        if type(value) is int and value >= 0:
            literals.append(str(value))
        elif type(value) is datetime and value.tzinfo is None:
            literals.append(f"TIMESTAMP '{value.isoformat(sep=' ')}'")
        elif type(value) is date:
            literals.append(f"DATE '{value.isoformat()}'")
        elif type(value) is str and _PLAIN_TEXT.fullmatch(value):
            literals.append(f"'{value}'")
        else:
            return None
    # Strict: as many placeholders as values, else ValueError.
    parts = statement.split("?")
    return "".join(part + literal for part, literal in zip(parts, [*literals, ""], strict=True))


def _last_limits(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> tuple[int, int]:
    row = cur.execute(
        f"SELECT daily_limit, concurrent_limit FROM {USAGE} WHERE tenant_id = ? "
        "ORDER BY usage_date DESC LIMIT 1",
        [tenant_id],
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def record_finish(
    cur: duckdb.DuckDBPyConnection, run: RunRecord, now: datetime, active: int | None
) -> None:
    """Counts an ended run as a success or failure of the day it was started, and sets
    today's concurrency, `active` when the caller knows it (a run may end on a later day
    than it began: the earlier day's row keeps the concurrency it had then)."""
    created_day = run.created_at.astimezone(UTC).date()
    ok, bad = (1, 0) if run.status == "COMPLETE" else (0, 1)
    if active is None:
        active = active_runs(cur, run.tenant_id)
    counted = "pipelines_succeeded_today = pipelines_succeeded_today + ?, "
    counted += "pipelines_failed_today = pipelines_failed_today + ?"
    # One row has both when the run was created today: one statement.
    if created_day == now.astimezone(UTC).date() and changed(
        cur,
        f"UPDATE {USAGE} SET {counted}, concurrent_pipelines_running = ?, "
        "max_concurrent_reached = greatest(max_concurrent_reached, ?), updated_at = ? "
        "WHERE tenant_id = ? AND usage_date = ?",
        [ok, bad, active, active, naive(now), run.tenant_id, created_day],
    ):
        return
    cur.execute(
        f"UPDATE {USAGE} SET {counted}, updated_at = ? WHERE tenant_id = ? AND usage_date = ?",
        [ok, bad, naive(now), run.tenant_id, created_day],
    )
    _count_usage(cur, run.tenant_id, now, None, active=active)


def get_usage(cur: duckdb.DuckDBPyConnection, tenant_id: str, day: date) -> UsageRecord | None:
    row = cur.execute(
        "SELECT tenant_id, usage_date, pipelines_run_today, pipelines_succeeded_today, "
        "pipelines_failed_today, concurrent_pipelines_running, max_concurrent_reached, "
        f"daily_limit, concurrent_limit FROM {USAGE} WHERE tenant_id = ? AND usage_date = ?",
        [tenant_id, day],
    ).fetchone()
    return None if row is None else UsageRecord(*row)


def typical_run_ms(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> int | None:
    """The median duration of the tenant's last 20 ended runs that ran."""
    row = cur.execute(
        f"SELECT median(duration_ms) FROM (SELECT duration_ms FROM {RUNS} "
        "WHERE tenant_id = ? AND status IN ('COMPLETE', 'FAILED') AND start_time IS NOT NULL "
        "ORDER BY end_time DESC LIMIT 20)",
        [tenant_id],
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def pending_runs(cur: duckdb.DuckDBPyConnection) -> tuple[int, datetime | None]:
    row = cur.execute(
        f"SELECT COUNT(*), MIN(created_at) FROM {RUNS} WHERE status = 'PENDING'"
    ).fetchone()
    assert row is not None
    return int(row[0]), aware(row[1])


def find_run(cur: duckdb.DuckDBPyConnection, run_id: str) -> RunRecord | None:
    """The run of that id, whichever tenant's. By the id alone: DuckDB looks a lone key up in
    the primary key's index, but scans the whole table for the id and the tenant together."""
    row = cur.execute(
        f"SELECT {RUN_COLUMNS} FROM {RUNS} WHERE pipeline_logging_id = ?", [run_id]
    ).fetchone()
    return None if row is None else run_from_row(row)


def as_stored(run: RunRecord) -> RunRecord:
    """The run as a read of its row gives it back: times in UTC, parameters by name."""
    return replace(
        run,
        parameters=dict(sorted(run.parameters.items())),
        created_at=run.created_at.astimezone(UTC),
        start_time=run.start_time and run.start_time.astimezone(UTC),
        end_time=run.end_time and run.end_time.astimezone(UTC),
    )


def get_run(cur: duckdb.DuckDBPyConnection, tenant_id: str, run_id: str) -> RunRecord | None:
    run = find_run(cur, run_id)
    return run if run is not None and run.tenant_id == tenant_id else None


def newest_run(cur: duckdb.DuckDBPyConnection) -> datetime | None:
    """The newest creation time of any stored run."""
    row = cur.execute(f"SELECT max(created_at) FROM {RUNS}").fetchone()
    return aware(row[0]) if row else None


# How far back from the page's start `list_runs` looks first, then further (None: all).
LIST_WINDOWS = (
    timedelta(hours=1),
    timedelta(days=1),
    timedelta(days=31),
    timedelta(days=366),
    None,
)


def list_runs(
    cur: duckdb.DuckDBPyConnection,
    where: RunFilter,
    after: RunCursor | None,
    limit: int,
    newest: datetime | None = None,
) -> list[RunRecord]:
    """A page of the tenant's runs, newest first, strictly after `after`.

    Runs are stored in creation order, so each row group's `created_at` range is narrow:
    the page is looked for in a window that ends where it starts (`after`, `newest` (the
    newest creation time stored) or `created_before`) and widens until it holds `limit`
    runs. A window of `limit` runs has every run of the page: any run before it comes
    after them in the order. Row groups outside the window are skipped by their
    statistics, so a page deep in a million runs costs what the first one does.
    """
    start = after.created_at if after is not None else newest
    if where.created_before is not None and (start is None or where.created_before < start):
        start = where.created_before
    if start is None:
        return _list_runs(cur, where, after, limit, None)
    for window in LIST_WINDOWS:
        since = None if window is None else start - window
        page = _list_runs(cur, where, after, limit, since)
        if len(page) == limit or since is None:
            return page
        if where.created_from is not None and since <= where.created_from:
            return page  # the window already covers the whole range asked for
    raise AssertionError("unreachable")  # pragma: no cover


def _list_runs(
    cur: duckdb.DuckDBPyConnection,
    where: RunFilter,
    after: RunCursor | None,
    limit: int,
    since: datetime | None,
) -> list[RunRecord]:
    conditions: list[str] = ["tenant_id = ?"]
    values: list[object] = [where.tenant_id]
    if since is not None:
        conditions.append("created_at >= ?")
        values.append(naive(since))
    if where.status:
        conditions.append("status = ?")
        values.append(where.status)
    if where.pipeline_id:
        conditions.append("pipeline_id = ?")
        values.append(where.pipeline_id)
    if where.created_from:
        conditions.append("created_at >= ?")
        values.append(naive(where.created_from))
    if where.created_before:
        conditions.append("created_at < ?")
        values.append(naive(where.created_before))
    if after is not None:
        # The lone bound lets row-group statistics skip the newer runs.
        conditions.append("created_at <= ?")
        conditions.append("(created_at, pipeline_logging_id) < (?, ?)")
        values += [naive(after.created_at), naive(after.created_at), after.pipeline_logging_id]
    rows = cur.execute(
        f"SELECT {RUN_COLUMNS} FROM {RUNS} WHERE {' AND '.join(conditions)} "
        "ORDER BY created_at DESC, pipeline_logging_id DESC LIMIT ?",
        [*values, limit],
    ).fetchall()
    return [run_from_row(row) for row in rows]


# The rows that can move a run in the queue: the runs not ended (row-group statistics on
# `status` skip the ended history), and those that ended since the oldest PENDING run was
# queued (an earlier end is older than every tenant's `queued_at`, so it changes nothing).
_QUEUE_ROWS = f"""(
    SELECT tenant_id, pipeline_logging_id, status, created_at, start_time, end_time
    FROM {RUNS} WHERE status IN ('PENDING', 'RUNNING')
    UNION ALL
    SELECT tenant_id, pipeline_logging_id, status, created_at, start_time, end_time
    FROM {RUNS} WHERE end_time >= (SELECT MIN(created_at) FROM {RUNS} WHERE status = 'PENDING')
)"""
_NEXT_RUN = FAIR_QUEUE.format(columns="pipeline_logging_id", runs=_QUEUE_ROWS) + " LIMIT 1"


def claim_next_run(
    cur: duckdb.DuckDBPyConnection, worker_id: str, now: datetime
) -> RunRecord | None:
    """Moves the first PENDING run of the fair queue (`FAIR_QUEUE`) to RUNNING for this
    worker: chosen and claimed in one transaction, so a concurrent change of the chosen run
    conflicts (the caller retries)."""
    with _transaction(cur):
        row = cur.execute(_NEXT_RUN).fetchone()
        return None if row is None else _claim(cur, str(row[0]), worker_id, now)


def claim_run(
    cur: duckdb.DuckDBPyConnection,
    run_id: str,
    worker_id: str,
    now: datetime,
    known: RunRecord | None = None,
) -> RunRecord | None:
    """Moves this run to RUNNING for this worker if it is still PENDING (the in-memory
    queue's choice, `QueueIndex`). `known`: the run as last committed, PENDING, when the
    caller knows it (the claimed run is then derived from it, not read back)."""
    with _transaction(cur):
        return _claim(cur, run_id, worker_id, now, known)


def _claim(
    cur: duckdb.DuckDBPyConnection,
    run_id: str,
    worker_id: str,
    now: datetime,
    known: RunRecord | None = None,
) -> RunRecord | None:
    if not changed(
        cur,
        f"UPDATE {RUNS} SET status = 'RUNNING', start_time = ?, worker_id = ?, "
        "heartbeat_at = ? WHERE pipeline_logging_id = ? AND status = 'PENDING'",
        [naive(now), worker_id, naive(now), run_id],
    ):
        return None
    if known is not None and known.status == "PENDING":
        # The row was PENDING, as `known` is: only what this UPDATE set differs.
        return replace(known, status="RUNNING", start_time=now.astimezone(UTC), worker_id=worker_id)
    return find_run(cur, run_id)


def queue_state(
    cur: duckdb.DuckDBPyConnection,
) -> tuple[list[tuple[str, str, str, datetime]], list[tuple[str, datetime]]]:
    """What `QueueIndex.load` takes: the runs not ended, and each tenant's last end of a
    run that had started."""
    queued = cur.execute(
        f"SELECT tenant_id, pipeline_logging_id, status, created_at FROM {RUNS} "
        "WHERE status IN ('PENDING', 'RUNNING')"
    ).fetchall()
    released = cur.execute(
        f"SELECT tenant_id, MAX(end_time) FROM {RUNS} "
        "WHERE start_time IS NOT NULL AND end_time IS NOT NULL GROUP BY tenant_id"
    ).fetchall()
    return (
        [
            (tenant, run_id, status, created.replace(tzinfo=UTC))
            for tenant, run_id, status, created in queued
        ],
        [(tenant, moment.replace(tzinfo=UTC)) for tenant, moment in released],
    )


def finish_run(
    cur: duckdb.DuckDBPyConnection,
    run_id: str,
    status: str,
    now: datetime,
    error_message: str,
    owner: tuple[str, int] | None,
    active: int | None = None,
    steps_open: bool = True,
    known: RunRecord | None = None,
) -> RunRecord | None:
    """Ends the run; returns it, or None when it was not in the expected state.

    With `owner` (worker id, attempt) the run must be RUNNING for that worker and attempt,
    so a worker can only end its own execution, and its steps left RUNNING are closed
    (unless the caller knows none is: not `steps_open`); without, it must be PENDING.
    `active` is the tenant's active runs before it ends, when the caller knows them.
    `known`: the run as last committed, when the caller knows it; if it is in the expected
    state, the ended run is derived from it instead of read back.
    """
    if owner is None:
        guard, values = "status = 'PENDING'", []
    else:
        guard, values = "status = 'RUNNING' AND worker_id = ? AND attempt = ?", list(owner)
    ended = None
    with _transaction(cur):
        if changed(
            cur,
            f"UPDATE {RUNS} SET status = ?, end_time = ?, error_message = ?, "
            "duration_ms = CASE WHEN start_time IS NULL THEN 0 "
            "  ELSE CAST(date_diff('millisecond', start_time, ?) AS BIGINT) END "
            f"WHERE pipeline_logging_id = ? AND {guard}",
            [status, naive(now), error_message or None, naive(now), run_id, *values],
        ):
            ended = _ended(known, owner, status, now, error_message) or find_run(cur, run_id)
        if ended is not None:
            if owner is not None and steps_open:
                interrupt_steps(cur, run_id, now)
            record_finish(cur, ended, now, None if active is None else active - 1)
    return ended


def _ended(
    known: RunRecord | None,
    owner: tuple[str, int] | None,
    status: str,
    now: datetime,
    error_message: str,
) -> RunRecord | None:
    """The run as `finish_run`'s UPDATE left it, from `known` (as last committed) when that
    was in the state the UPDATE required, else None (read it back)."""
    if known is None:
        return None
    if owner is None:
        if known.status != "PENDING":
            return None
    elif (known.status, known.worker_id, known.attempt) != ("RUNNING", *owner):
        return None
    end = now.astimezone(UTC)
    duration = 0
    if known.start_time is not None:  # DuckDB's date_diff: whole milliseconds since 1970
        duration = _epoch_ms(end) - _epoch_ms(known.start_time)
    return replace(
        known, status=status, end_time=end, error_message=error_message or "", duration_ms=duration
    )


def _epoch_ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


# This execution of the run may publish: the run is RUNNING for its worker and attempt,
# and no cancel was asked.
_PUBLISHABLE = (
    "pipeline_logging_id = ? AND status = 'RUNNING' AND worker_id = ? AND attempt = ? "
    "AND NOT coalesce(cancel_requested, FALSE)"
)


def record_publication(cur: duckdb.DuckDBPyConnection, run: RunRecord, now: datetime) -> bool:
    """Inside the publishing transaction: records that this execution of `run` publishes;
    False when it may not (`publishable`; the caller serializes this with
    `request_cancel`)."""
    return bool(
        changed(
            cur,
            f"INSERT INTO {PUBLICATIONS} SELECT pipeline_logging_id, tenant_id, attempt, "
            f"worker_id, ? FROM {RUNS} WHERE {_PUBLISHABLE}",
            [naive(now), run.pipeline_logging_id, run.worker_id, run.attempt],
        )
    )


def publishable(cur: duckdb.DuckDBPyConnection, run: RunRecord) -> bool:
    """Whether this execution of `run` may publish, as last committed (`cur` in no
    transaction of its own)."""
    row = cur.execute(
        f"SELECT COUNT(*) FROM {RUNS} WHERE {_PUBLISHABLE}",
        [run.pipeline_logging_id, run.worker_id, run.attempt],
    ).fetchone()
    return bool(row and row[0])


def published_by(cur: duckdb.DuckDBPyConnection, run_id: str) -> tuple[int, str] | None:
    """The (attempt, worker) whose publication of the run is recorded, if any."""
    row = cur.execute(
        f"SELECT run_attempt, worker_id FROM {PUBLICATIONS} WHERE pipeline_logging_id = ?",
        [run_id],
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def interrupt_steps(cur: duckdb.DuckDBPyConnection, run_id: str, now: datetime) -> None:
    """Closes step rows left RUNNING by an execution that ended without finishing them."""
    cur.execute(
        f"UPDATE {STEPS} SET status = 'FAILED', step_end_time = ?, "
        "error_message = 'Interrupted: the run stopped while this step was running' "
        "WHERE pipeline_logging_id = ? AND status = 'RUNNING'",
        [naive(now), run_id],
    )


def request_cancel(
    cur: duckdb.DuckDBPyConnection,
    tenant_id: str,
    run_id: str,
    now: datetime,
    active: int | None = None,
) -> Cancellation:
    """A PENDING run ends FAILED now; a RUNNING one is flagged to stop at its next step,
    unless it has published its results (it ends COMPLETE). `active` as for `finish_run`."""
    if get_run(cur, tenant_id, run_id) is None:
        return Cancellation(None)
    message = "Cancelled before it started"
    cancelled = finish_run(cur, run_id, "FAILED", now, message, None, active)
    if cancelled is not None:
        return Cancellation(cancelled, ended=True)
    if published_by(cur, run_id) is not None:
        return Cancellation(get_run(cur, tenant_id, run_id), published=True)
    cur.execute(
        f"UPDATE {RUNS} SET cancel_requested = TRUE "
        "WHERE pipeline_logging_id = ? AND tenant_id = ? AND status = 'RUNNING'",
        [run_id, tenant_id],
    )
    return Cancellation(get_run(cur, tenant_id, run_id))


def cancel_requested(cur: duckdb.DuckDBPyConnection, run_id: str) -> bool:
    row = cur.execute(
        f"SELECT cancel_requested FROM {RUNS} WHERE pipeline_logging_id = ?", [run_id]
    ).fetchone()
    return bool(row and row[0])


def heartbeat(cur: duckdb.DuckDBPyConnection, run_ids: Sequence[str], worker_id: str) -> None:
    """Marks this worker's runs alive, with the time taken when the statement runs."""
    if run_ids:
        marks = ", ".join("?" for _ in run_ids)
        cur.execute(
            f"UPDATE {RUNS} SET heartbeat_at = ? WHERE status = 'RUNNING' AND worker_id = ? "
            f"AND pipeline_logging_id IN ({marks})",
            [naive(datetime.now(UTC)), worker_id, *run_ids],
        )


def stale_runs(cur: duckdb.DuckDBPyConnection, stale_before: datetime) -> list[RunRecord]:
    rows = cur.execute(
        f"SELECT {RUN_COLUMNS} FROM {RUNS} WHERE status = 'RUNNING' "
        "AND (heartbeat_at IS NULL OR heartbeat_at < ?) ORDER BY created_at",
        [naive(stale_before)],
    ).fetchall()
    return [run_from_row(row) for row in rows]


def requeue_run(
    cur: duckdb.DuckDBPyConnection,
    run: RunRecord,
    now: datetime,
    count_attempt: bool,
) -> bool:
    """Puts a run that `run.worker_id` holds back to PENDING, for another worker.

    `count_attempt` says the execution was lost (a crash), which uses up an attempt; a
    clean stop hands the run back without using one.
    """
    with _transaction(cur):  # with its steps closed: a PENDING run never has a RUNNING step
        requeued = changed(
            cur,
            f"UPDATE {RUNS} SET status = 'PENDING', attempt = attempt + ?, start_time = NULL, "
            "worker_id = NULL, heartbeat_at = NULL, warnings = 0 WHERE pipeline_logging_id = ? "
            "AND status = 'RUNNING' AND worker_id IS NOT DISTINCT FROM ? AND attempt = ?",
            [int(count_attempt), run.pipeline_logging_id, run.worker_id or None, run.attempt],
        )
        if requeued:
            interrupt_steps(cur, run.pipeline_logging_id, now)
    return bool(requeued)


def save_step(
    cur: duckdb.DuckDBPyConnection,
    step: StepRecord,
    new: bool,
    written: StepRecord | None = None,
) -> None:
    """Writes the step's row: an INSERT when the caller believes it `new` (an UPDATE if its
    key is taken after all), else an UPDATE, and an INSERT if there was nothing to update
    (DuckDB's INSERT OR REPLACE costs three times either). `written`: the row as the caller
    last committed it; when only the step's progress differs from it (its end), the UPDATE
    sets just that, in a statement of its own (a third cheaper than every column in a
    transaction)."""
    values = _step_values(step)
    row = list(values.values())
    if new:
        with contextlib.suppress(duckdb.ConstraintException):
            cur.execute(_INSERT_STEP, row)
            return
    if written is not None and all(
        values[name] == value
        for name, value in _step_values(written).items()
        if name not in _STEP_PROGRESS
    ):
        progress = [values[name] for name in _STEP_PROGRESS]
        if changed(cur, _UPDATE_STEP_PROGRESS, [*progress, step.step_logging_id]):
            return
    with _transaction(cur):
        if not changed(cur, _UPDATE_STEP, [*row[1:], step.step_logging_id]):
            cur.execute(_INSERT_STEP, row)


def _step_values(step: StepRecord) -> dict[str, object]:
    """The step's row, by column (`STEP_COLUMNS` order)."""
    return dict(
        zip(
            STEP_COLUMNS.split(", "),
            [
                step.step_logging_id,
                step.pipeline_logging_id,
                step.pipeline_id,
                step.tenant_id,
                step.step_name,
                step.step_type,
                step.step_index,
                step.status,
                naive(step.step_start_time),
                step.rows_processed,
                naive(step.step_end_time),
                step.duration_ms,
                step.error_message or None,
                step.attempts,
                step.run_attempt,
                step.warnings,
            ],
            strict=True,
        )
    )


# What changes in a step's row as it runs and ends; the other columns are its identity.
_STEP_PROGRESS = (
    "status",
    "rows_processed",
    "step_end_time",
    "duration_ms",
    "error_message",
    "attempts",
    "warnings",
)
_UPDATE_STEP_PROGRESS = (
    f"UPDATE {STEPS} SET "
    + ", ".join(f"{name} = ?" for name in _STEP_PROGRESS)
    + " WHERE step_logging_id = ?"
)


_UPDATE_STEP = (
    f"UPDATE {STEPS} SET "
    + ", ".join(f"{name} = ?" for name in STEP_COLUMNS.split(", ")[1:])
    + " WHERE step_logging_id = ?"
)
_INSERT_STEP = (
    f"INSERT INTO {STEPS} ({STEP_COLUMNS}) "
    f"VALUES ({', '.join('?' for _ in STEP_COLUMNS.split(', '))})"
)


def insert_rows(
    cur: duckdb.DuckDBPyConnection, table: str, columns: str, rows: Sequence[Sequence[object]]
) -> None:
    """Inserts the rows (values in `columns` order) with one INSERT per 200 rows: DuckDB's
    executemany runs one statement per row (20 rows: 30 ms against 6 ms)."""
    width = len(columns.split(", "))
    placeholders = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows), 200):
        chunk = rows[start : start + 200]
        cur.execute(
            f"INSERT INTO {table} ({columns}) VALUES {', '.join([placeholders] * len(chunk))}",
            [value for row in chunk for value in row],
        )


def list_run_steps(cur: duckdb.DuckDBPyConnection, run_id: str) -> list[StepRecord]:
    """The steps of the run's latest attempt (whichever tenant's: the caller checks)."""
    rows = cur.execute(
        f"SELECT {STEP_COLUMNS} FROM {STEPS} WHERE pipeline_logging_id = ? "
        f"AND run_attempt = (SELECT max(run_attempt) FROM {STEPS} WHERE pipeline_logging_id = ?) "
        "ORDER BY step_index, step_start_time, step_logging_id",  # `_listed_order`
        [run_id, run_id],
    ).fetchall()
    return [step_from_row(row) for row in rows]


def with_step(steps: Sequence[StepRecord], step: StepRecord) -> list[StepRecord] | None:
    """What `list_run_steps` reads once `step` is written over `steps`, the list it read
    before (in its order); None when that cannot be told without reading it (the step's
    row listed there with another attempt)."""
    stored = step_from_row(list(_step_values(step).values()))  # as a read gives it back
    if any(
        s.step_logging_id == stored.step_logging_id and s.run_attempt != stored.run_attempt
        for s in steps
    ):
        return None
    latest = max((s.run_attempt for s in steps), default=stored.run_attempt)
    if stored.run_attempt < latest:  # a row of an earlier attempt: not listed
        return list(steps)
    kept = [s for s in steps if s.run_attempt == stored.run_attempt]
    kept = [s for s in kept if s.step_logging_id != stored.step_logging_id] + [stored]
    return sorted(kept, key=_listed_order)


def _listed_order(step: StepRecord) -> tuple[int, datetime, str]:
    return step.step_index, step.step_start_time, step.step_logging_id


def add_dq_results(
    cur: duckdb.DuckDBPyConnection, run: RunRecord, results: Sequence[DqRecord]
) -> None:
    """Appends the results and, in the same transaction, adds their failed `warn` checks
    to the run's `warnings` if it is still RUNNING for the same worker and attempt."""
    warnings = sum(r.warns for r in results)
    with _transaction(cur):
        insert_rows(
            cur, DQ_RESULTS, DQ_COLUMNS, [dq_values(r, naive(r.created_at)) for r in results]
        )
        if warnings:
            cur.execute(
                f"UPDATE {RUNS} SET warnings = IFNULL(warnings, 0) + ? "
                "WHERE pipeline_logging_id = ? AND status = 'RUNNING' "
                "AND worker_id IS NOT DISTINCT FROM ? AND attempt = ?",
                [warnings, run.pipeline_logging_id, run.worker_id or None, run.attempt],
            )


def list_dq_results(
    cur: duckdb.DuckDBPyConnection, tenant_id: str, run_id: str, attempt: int
) -> list[DqRecord]:
    rows = cur.execute(
        DQ_CHECKS.format(
            columns=DQ_COLUMNS,
            results=DQ_RESULTS,
            tenant="?",
            run="?",
            attempts="IFNULL(run_attempt, 1) = ?",
        ),
        [tenant_id, run_id, attempt],
    ).fetchall()
    return [dq_from_row(row) for row in rows]
