"""The embedded store: one DuckDB file, where a dataset is a schema.

DuckDB calls block, so each runs on a small thread pool, every thread with its own cursor
on the one database connection. Timestamps are stored as naive UTC.

Storage faults: a write the file system refuses (disk full, read-only, permissions) raises
`Unavailable` with the reason, and the store reports itself not writable
(`write_failure`) until a probe write succeeds again. A failed checkpoint makes DuckDB
invalidate the open database; the store then reopens the file (committed data is in it and
its write-ahead log), so a live server recovers once space returns, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TypeVar

import duckdb

from convergence_server.errors import AlreadyExists, DeadlineExceeded, Unavailable
from convergence_server.storage import duckdb_accounts as accounts
from convergence_server.storage import duckdb_runs as runs
from convergence_server.storage import duckdb_schedules as schedules
from convergence_server.storage import schema
from convergence_server.storage.duckdb_warehouse import (
    DuckDBWarehouse,
    attach_stages,
    drop_stage_tables,
)
from convergence_server.storage.identifiers import quote_identifier
from convergence_server.storage.locks import GroupCommit, KeyedTurns
from convergence_server.storage.queue_index import Changing, QueueIndex
from convergence_server.storage.records import (
    Admission,
    ApiKeyRecord,
    AuditFilter,
    AuditRecord,
    Cancellation,
    DqRecord,
    MemberAdmission,
    MemberRecord,
    RunCursor,
    RunFilter,
    RunLimits,
    RunRecord,
    ScheduleRecord,
    SkipRecord,
    StepRecord,
    TenantRecord,
    TenantUsage,
    WebhookRecord,
)
from convergence_server.storage.rows import latest_execution, naive
from convergence_server.storage.run_cache import Change, RunCache

T = TypeVar("T")
log = logging.getLogger(__name__)

CENTRAL = quote_identifier(schema.CENTRAL_DATASET)
WORKER_THREADS = 4
# DuckDB folds its write-ahead log into the database file (a checkpoint) once the log is
# this large. Its default, 16 MB, made nearly every publication of a day of cost rows pay a
# checkpoint of its own (0.2-1 s, growing with the table); commits stay durable either way,
# and a restart replays at most this much log.
CHECKPOINT_THRESHOLD = "256MB"
# The database file is attached under this name, with row groups of ROW_GROUP_SIZE rows
# (DuckDB's default is 122,880). An insert of at least one row group is written to the file
# compressed, as row groups, when it commits; a smaller one goes to the write-ahead log
# uncompressed (about 650 bytes a FOCUS row) and is written again at the next checkpoint.
# With this size, publishing a day of 67,000 cost rows commits in milliseconds instead of
# 0.2-0.5 s plus a checkpoint every few days. The size is an option of each attachment,
# not stored in the file.
STORE = "convergence_store"
ROW_GROUP_SIZE = 32768
CONFLICT_RETRIES = 6
PROBE = f"{CENTRAL}.store_write_probe"
# How the file system says no: these are faults of the machine, not of the request.
_WRITE_FAULTS = (
    "could not write",
    "no space left",
    "read-only file system",
    "permission denied",
    "disk quota exceeded",
    "could not fsync",
    "could not truncate",
)


def _write_fault(exc: BaseException) -> str | None:
    """The file system's reason when `exc` is a refused write (e.g. "No space left on
    device"), else None."""
    lines = str(exc).strip().splitlines()
    for line in lines:
        if any(fault in line.lower() for fault in _WRITE_FAULTS):
            return line.rsplit(":", 1)[-1].strip(' "') or line.strip()
    if isinstance(exc, duckdb.IOException):
        return lines[0] if lines else type(exc).__name__
    return None


def _invalidated(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.FatalException) or "database has been invalidated" in str(exc)


def cursor_of(connection: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A new cursor whose unqualified names are in the store's database file (a cursor
    starts in DuckDB's in-memory database)."""
    cursor = connection.cursor()
    cursor.execute(f"USE {STORE}")
    return cursor


@dataclasses.dataclass(frozen=True)
class _RunChange:
    """A change of one run in progress, as the run cache and the fair queue follow it."""

    cached: Change
    queued: Changing


def _first_try(known: RunRecord | None) -> Callable[[], RunRecord | None]:
    """`known` to a store call's first try only: a try again follows a write conflict, a
    change of the row that `known` (as last committed before the call) may not hold."""
    tries = iter([known])
    return lambda: next(tries, None)


class DuckDBStore:
    kind = "embedded"
    exclusive = True

    def __init__(
        self,
        connection: duckdb.DuckDBPyConnection,
        warehouse_threads: int,
        reopen: Callable[[], duckdb.DuckDBPyConnection] | None = None,
    ) -> None:
        self._connection = connection
        self._reopen_connection = reopen
        # Bumped when the database is reopened: each thread's cursor of an older one is
        # replaced on its next call.
        self._generation = 0
        self._reopen_lock = threading.Lock()
        self._write_failure: str | None = None
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="duckdb")
        self._warehouse_executor = ThreadPoolExecutor(
            warehouse_threads, thread_name_prefix="duckdb-pipelines"
        )
        self._publish_turns = KeyedTurns()
        # Per tenant: a publication's transaction and a cancel of a run take turns.
        self._publications = KeyedTurns()
        self._tenant_turns = KeyedTurns()
        # DuckDB's catalog changes (CREATE SCHEMA ...) are serialized here: onboarding is rare.
        self._ddl_lock = threading.Lock()
        # Triggers that arrive together are admitted in one transaction.
        self._admissions: GroupCommit[runs.AdmissionRequest, Admission] = GroupCommit(self._admit)
        # Recent runs and their steps, as last written or read (reads without a query).
        self._cache = RunCache()
        # The fair queue's order, kept as runs change (claims without the window query; its
        # count of a tenant's active runs is what an admission in the tenant's turn checks).
        self._queue = QueueIndex()
        # Each tenant's runs created on its latest UTC day of admissions, as they committed
        # (only admissions, in the tenant's turn, create runs; none is deleted).
        self._created: dict[str, tuple[date, int]] = {}
        # Each tenant's latest UTC day whose usage row is known to exist (none is deleted).
        self._usage_days: dict[str, date] = {}
        # The step rows of each execution claimed here, as committed (by step id): only its
        # worker writes them, through `save_step`, so a step's first row is one INSERT, its
        # end an UPDATE of what changed, and a run whose steps all ended needs no query to
        # close them when it ends.
        self._step_rows: dict[str, dict[str, StepRecord]] = {}
        # The newest creation time of a stored run: where the first page of runs ends.
        self._newest_run: datetime | None = None

    @classmethod
    def open(
        cls, path: Path, warehouse_threads: int = WORKER_THREADS, memory_limit: str = ""
    ) -> DuckDBStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        # DuckDB's buffer pool would otherwise grow to 80% of the machine's memory.
        settings: dict[str, str | bool | int | float | list[str]] = (
            {"memory_limit": memory_limit} if memory_limit else {}
        )
        settings["checkpoint_threshold"] = CHECKPOINT_THRESHOLD
        # Where DuckDB spills: its default for a database file (the main database here is
        # in memory, whose default would be ./.tmp).
        settings["temp_directory"] = f"{path}.tmp"
        # Results without ORDER BY come in no particular order (as on BigQuery): DuckDB then
        # need not hold a parallel scan's output back to restore the file's row order, which
        # made loading a 778 MiB CSV under the 256MB memory limit 2.8 times slower.
        settings["preserve_insertion_order"] = False

        def connect() -> duckdb.DuckDBPyConnection:
            connection = duckdb.connect(":memory:", config=settings)
            try:
                connection.execute(
                    f"ATTACH $path AS {STORE} (ROW_GROUP_SIZE {ROW_GROUP_SIZE})",
                    {"path": str(path)},
                )
                attach_stages(connection)
                # Every cursor's default (a statement of its own on each cursor otherwise).
                connection.execute("SET GLOBAL TimeZone = 'UTC'")
            except BaseException:
                connection.close()
                raise
            return connection

        try:
            connection = connect()
        except duckdb.IOException as exc:
            raise SystemExit(f"cannot open the embedded store {path}: {exc}") from None
        except duckdb.Error as exc:  # e.g. a memory_limit DuckDB cannot parse
            raise SystemExit(f"cannot open the embedded store {path}: {exc}") from None
        store = cls(connection, max(1, warehouse_threads), connect)
        store._migrate()
        cursor = cursor_of(connection)  # closed: no transaction of it stays open
        try:
            store._newest_run = runs.newest_run(cursor)
            store._queue.load(store._queue.mark(), *runs.queue_state(cursor))
        finally:
            cursor.close()
        return store

    # -- plumbing ---------------------------------------------------------------------------

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        held: tuple[int, duckdb.DuckDBPyConnection] | None = getattr(self._local, "cursor", None)
        if held is not None and held[0] == self._generation:
            return held[1]
        if held is not None:
            with contextlib.suppress(duckdb.Error):
                held[1].close()
        cursor = cursor_of(self._connection)
        self._local.cursor = (self._generation, cursor)
        return cursor

    def _fault(self, exc: BaseException, generation: int) -> Unavailable | None:
        """The `Unavailable` a storage fault becomes (reopening an invalidated database),
        or None when `exc` is no fault of the machine."""
        if _invalidated(exc) or isinstance(exc, duckdb.ConnectionException):
            log.error("embedded store invalidated, reopening it: %s", exc)
            self._write_failure = _write_fault(exc) or "the database had to be reopened"
            self._reopen(generation)
            return Unavailable(f"The store cannot write: {self._write_failure}; try again")
        reason = _write_fault(exc)
        if reason is not None:
            if self._write_failure is None:
                log.error("embedded store cannot write: %s", reason)
            self._write_failure = reason
            return Unavailable(f"The store cannot write: {reason}; try again")
        return None

    def _reopen(self, generation: int) -> None:
        with self._reopen_lock:
            if generation != self._generation or self._reopen_connection is None:
                return  # another thread reopened it already
            # Closed first: while it is open, connecting to the file returns it again.
            with contextlib.suppress(duckdb.Error):
                self._connection.close()
            try:
                self._connection = self._reopen_connection()
            except duckdb.Error as exc:  # the next call finds it closed and tries again
                log.error("cannot reopen the embedded store yet: %s", exc)
                return
            self._generation += 1

    def _submit(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> asyncio.Future[T]:
        def run() -> T:
            generation = self._generation
            for attempt in range(CONFLICT_RETRIES):
                try:
                    return fn(self._cursor())
                except duckdb.Error as exc:
                    fault = self._fault(exc, generation)
                    if fault is not None:
                        raise fault from exc
                    if not isinstance(exc, duckdb.TransactionException):
                        raise
                    # Two writers touched the same row at once; the statement (or the
                    # transaction `fn` ran) did not apply: run it again.
                    if attempt == CONFLICT_RETRIES - 1:
                        raise
                    time.sleep(0.002 * 2**attempt)
            raise AssertionError("unreachable")  # pragma: no cover

        return asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def write_failure(self) -> str | None:
        """Why the store cannot write now, or None. After a failure, each call probes with
        a real write (a few kilobytes committed, then deleted) until one succeeds."""
        if self._write_failure is None:
            return None

        def probe(cur: duckdb.DuckDBPyConnection) -> None:
            cur.execute(f"INSERT INTO {PROBE} VALUES (?, ?)", [uuid.uuid4().hex, "x" * 16384])
            cur.execute(f"DELETE FROM {PROBE}")

        try:
            await self._call(probe)
        except Unavailable:
            return self._write_failure
        log.warning("embedded store writes again")
        self._write_failure = None
        return None

    async def _call(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        call = self._submit(fn)
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            if not call.done():  # it goes on in its thread: the run cache must know
                self._cache.outlive(call)
            elif not call.cancelled():
                call.exception()  # retrieved: the caller was cancelled as it ended
            raise

    def _migrate(self) -> None:
        cur = cursor_of(self._connection)
        cur.begin()
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {CENTRAL}")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {CENTRAL}.schema_migrations "
            "(version BIGINT PRIMARY KEY, description VARCHAR NOT NULL, "
            "applied_at TIMESTAMP NOT NULL)"
        )
        row = cur.execute(f"SELECT max(version) FROM {CENTRAL}.schema_migrations").fetchone()
        applied = (row[0] if row else None) or 0
        for migration in schema.MIGRATIONS:
            if migration.version <= applied:
                continue
            for table in migration.creates:
                cur.execute(runs.create_table_sql(schema.CENTRAL_DATASET, table))
            for table, names in migration.adds:
                columns = {c.name: c for c in table.columns}
                for name in names:
                    cur.execute(
                        f"ALTER TABLE {CENTRAL}.{quote_identifier(table.name)} ADD COLUMN "
                        f"IF NOT EXISTS {quote_identifier(name)} "
                        f"{runs.DUCKDB_TYPES[columns[name].type]}"
                    )
            for fill in migration.fills:
                column = quote_identifier(fill.column)
                cur.execute(
                    f"UPDATE {CENTRAL}.{quote_identifier(fill.table.name)} "
                    f"SET {column} = ? WHERE {column} IS NULL",
                    [fill.value],
                )
            cur.execute(
                f"INSERT INTO {CENTRAL}.schema_migrations VALUES (?, ?, ?)",
                [migration.version, migration.description, naive(datetime.now(UTC))],
            )
        cur.execute(f"CREATE TABLE IF NOT EXISTS {PROBE} (probe_id VARCHAR, payload VARCHAR)")
        cur.commit()
        cur.close()

    # -- Store ------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda cur: cur.execute("SELECT 1").fetchone())

    async def schema_version(self) -> int:
        def query(cur: duckdb.DuckDBPyConnection) -> int:
            row = cur.execute(f"SELECT max(version) FROM {CENTRAL}.schema_migrations").fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        return await self._call(query)

    async def central_table_columns(self) -> dict[str, frozenset[str]]:
        def query(cur: duckdb.DuckDBPyConnection) -> dict[str, frozenset[str]]:
            rows = cur.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = ?",
                [schema.CENTRAL_DATASET],
            ).fetchall()
            tables: dict[str, set[str]] = {}
            for table, column in rows:
                tables.setdefault(table, set()).add(column)
            return {name: frozenset(columns) for name, columns in tables.items()}

        return await self._call(query)

    async def probe_dataset_creation(self) -> None:
        scratch = quote_identifier(f"_convergence_probe_{uuid.uuid4().hex}")

        def probe(cur: duckdb.DuckDBPyConnection) -> None:
            with self._ddl_lock:
                cur.begin()
                try:
                    cur.execute(f"CREATE SCHEMA {scratch}")
                    cur.execute(f"DROP SCHEMA {scratch}")
                finally:
                    cur.rollback()

        await self._call(probe)

    async def dataset_exists(self, dataset_id: str) -> bool:
        def query(cur: duckdb.DuckDBPyConnection) -> bool:
            row = cur.execute(
                "SELECT count(*) FROM information_schema.schemata "
                "WHERE lower(schema_name) = lower(?)",
                [dataset_id],
            ).fetchone()
            return bool(row and row[0])

        return await self._call(query)

    # -- tenants, keys, the audit log: `duckdb_accounts` ------------------------------------

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        return await self._call(lambda cur: accounts.get_tenant(cur, tenant_id))

    async def tenant_ids_equal_ignoring_case(self, tenant_id: str) -> list[str]:
        return await self._call(lambda cur: accounts.tenant_ids_equal_ignoring_case(cur, tenant_id))

    async def create_tenant(
        self, tenant: TenantRecord, key: ApiKeyRecord, commit_by: float | None = None
    ) -> tuple[str, ...]:
        # Set when the caller stops waiting (deadline, disconnect, shutdown): the worker
        # thread then rolls back instead of committing a tenant whose key nobody received.
        abandoned = threading.Event()

        def create(cur: duckdb.DuckDBPyConnection) -> tuple[str, ...]:
            with self._ddl_lock:
                return accounts.create_tenant(cur, tenant, key, abandoned, commit_by)

        def delete(cur: duckdb.DuckDBPyConnection) -> None:
            with self._ddl_lock:
                accounts.delete_tenant(cur, tenant.tenant_id)

        future = self._submit(create)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            abandoned.set()
            with contextlib.suppress(accounts.Abandoned, AlreadyExists, DeadlineExceeded):
                await future
                # It committed before it could see the flag: undo it.
                await self._call(delete)
                log.warning("onboarding of %s abandoned after commit: undone", tenant.tenant_id)
            raise

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        return await self._call(lambda cur: accounts.get_api_key(cur, key_id))

    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        return await self._call(lambda cur: accounts.list_api_keys(cur, tenant_id))

    async def create_api_key(self, key: ApiKeyRecord, audit: AuditRecord) -> None:
        await self._call(lambda cur: accounts.create_api_key(cur, key, audit))

    async def revoke_api_key(
        self,
        tenant_id: str,
        key_id: str,
        now: datetime,
        audit: AuditRecord,
        keep_one: bool = True,
    ) -> ApiKeyRecord | None:
        # One key change per tenant at a time: two revokes of its last two FULL keys must
        # not both see the other one still active (DuckDB conflicts only on the same row).
        async with self._tenant_turns.get(tenant_id):
            return await self._call(
                lambda cur: accounts.revoke_api_key(cur, tenant_id, key_id, now, audit, keep_one)
            )

    async def rotate_api_key(
        self,
        tenant_id: str,
        key_id: str,
        new_key: ApiKeyRecord,
        grace_until: datetime,
        audit: AuditRecord,
    ) -> ApiKeyRecord | None:
        async with self._tenant_turns.get(tenant_id):
            return await self._call(
                lambda cur: accounts.rotate_api_key(
                    cur, tenant_id, key_id, new_key, grace_until, audit
                )
            )

    async def record_key_use(self, uses: dict[str, datetime]) -> None:
        if uses:
            await self._call(lambda cur: accounts.record_key_use(cur, uses))

    async def changed_api_keys(self, since: datetime | None) -> tuple[list[str], datetime]:
        # One process owns the file: its own changes reach its cache directly.
        return [], datetime.now(UTC)

    async def add_audit(self, records: list[AuditRecord]) -> None:
        if records:
            await self._call(lambda cur: accounts.add_audit(cur, records))

    async def list_audit(
        self, where: AuditFilter, after: tuple[datetime, str] | None, limit: int
    ) -> list[AuditRecord]:
        return await self._call(lambda cur: accounts.list_audit(cur, where, after, limit))

    # -- runs ----------------------------------------------------------------------------

    async def create_run(
        self,
        run: RunRecord,
        keys_valid_from: datetime,
        limits: RunLimits | None = None,
        progress: ScheduleRecord | None = None,
    ) -> Admission:
        with self._queue.changing():
            if progress is None:
                request = runs.AdmissionRequest(run, keys_valid_from, limits)
                admission = await self._admissions.submit(request)
            else:
                also = functools.partial(schedules.write_schedule, schedule=progress)

                def admit(
                    known: runs.Counts, cur: duckdb.DuckDBPyConnection
                ) -> tuple[list[Admission], runs.Counts]:
                    answer, counts = runs.create_run(cur, run, keys_valid_from, limits, known, also)
                    return [answer], counts

                # One admission at a time per tenant: the counts it checks cannot move under it.
                async with self._tenant_turns.get(run.tenant_id):
                    (admission,) = await self._counted([run.tenant_id], admit)
        if admission.created and (self._newest_run is None or run.created_at > self._newest_run):
            self._newest_run = run.created_at
        return admission

    async def _admit(self, requests: list[runs.AdmissionRequest]) -> list[Admission]:
        tenant_ids = sorted({r.run.tenant_id for r in requests})
        # In the turns of every tenant of the batch: no count it reads can move under it.
        async with self._tenant_turns.all_of(tenant_ids):
            return await self._counted(
                tenant_ids, lambda known, cur: runs.admit_batch(cur, requests, known)
            )

    async def _counted(
        self,
        tenant_ids: list[str],
        admit: Callable[
            [runs.Counts, duckdb.DuckDBPyConnection], tuple[list[Admission], runs.Counts]
        ],
    ) -> list[Admission]:
        """Runs an admission in the tenants' turns with the counts known here, and keeps
        what it committed: its runs in the fair queue, its counts of created runs."""
        known = runs.Counts()
        for tenant_id in tenant_ids:
            if (active := self._queue.active(tenant_id)) is not None:
                known.active[tenant_id] = active
            if (created := self._created.get(tenant_id)) is not None:
                known.created[tenant_id, created[0]] = created[1]
            if (day := self._usage_days.get(tenant_id)) is not None:
                known.usage_rows.add((tenant_id, day))
        stamp = self._cache.stamp()
        with self._queue.changing(creates=True) as queued:
            try:
                answers, counts = await self._call(functools.partial(admit, known))
            except BaseException:  # what it committed is unknown: counted again next time
                for tenant_id in tenant_ids:
                    self._created.pop(tenant_id, None)
                raise
            for answer in answers:
                if answer.created and answer.run is not None:
                    self._queue.apply(queued, answer.run)
                    # For the GetRun that follows a trigger, and for the run's claim.
                    self._cache.created(stamp, runs.as_stored(answer.run))
        for (tenant_id, day), count in counts.created.items():
            if tenant_id not in self._created or self._created[tenant_id][0] <= day:
                self._created[tenant_id] = (day, count)
        for tenant_id, day in counts.usage_rows:
            self._usage_days[tenant_id] = max(day, self._usage_days.get(tenant_id, day))
        return answers

    async def usage(self, tenant_id: str, day: date) -> TenantUsage:
        known = self._queue.active(tenant_id)

        def read(cur: duckdb.DuckDBPyConnection) -> TenantUsage:
            active = runs.active_runs(cur, tenant_id) if known is None else known
            team = cur.execute(
                f"SELECT COUNT(*) FROM {accounts.MEMBERS} WHERE tenant_id = ?", [tenant_id]
            ).fetchone()
            return TenantUsage(runs.get_usage(cur, tenant_id, day), active, team[0] if team else 0)

        return await self._call(read)

    # -- webhooks, plans and members: `duckdb_accounts` -------------------------------------

    async def get_webhook(self, tenant_id: str) -> WebhookRecord | None:
        return await self._call(lambda cur: accounts.get_webhook(cur, tenant_id))

    async def save_webhook(self, webhook: WebhookRecord, audit: AuditRecord) -> None:
        await self._call(lambda cur: accounts.save_webhook(cur, webhook, audit))

    async def update_plan(
        self, tenant_id: str, plan: str, team_size: int, now: datetime
    ) -> int | None:
        # In the tenant's turn, as admissions are: no member joins while the team is counted.
        async with self._tenant_turns.get(tenant_id):
            return await self._call(
                lambda cur: accounts.update_plan(cur, tenant_id, plan, team_size, now)
            )

    async def admit_member(
        self, tenant_id: str, user_id: str, plan: str, team_size: int, now: datetime
    ) -> MemberAdmission:
        async with self._tenant_turns.get(tenant_id):
            return await self._call(
                lambda cur: accounts.admit_member(cur, tenant_id, user_id, plan, team_size, now)
            )

    async def list_members(self, tenant_id: str) -> list[MemberRecord]:
        return await self._call(lambda cur: accounts.list_members(cur, tenant_id))

    async def remove_member(self, tenant_id: str, user_id: str) -> bool:
        return await self._call(lambda cur: accounts.remove_member(cur, tenant_id, user_id))

    # -- schedules --------------------------------------------------------------------------

    async def create_schedule(self, schedule: ScheduleRecord, max_schedules: int) -> int:
        async with self._tenant_turns.get(schedule.tenant_id):
            return await self._call(
                lambda cur: schedules.create_schedule(cur, schedule, max_schedules)
            )

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> ScheduleRecord | None:
        return await self._call(lambda cur: schedules.get_schedule(cur, tenant_id, schedule_id))

    async def list_schedules(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[ScheduleRecord]:
        return await self._call(lambda cur: schedules.list_schedules(cur, tenant_id, after, limit))

    async def save_schedule(self, schedule: ScheduleRecord, skip: SkipRecord | None = None) -> bool:
        async with self._tenant_turns.get(schedule.tenant_id):
            return await self._call(lambda cur: schedules.save_schedule(cur, schedule, skip))

    async def due_schedules(
        self,
        tenant_id: str | None,
        now: datetime,
        limit: int,
        after: tuple[str, datetime, str] | None = None,
        paused: bool = True,
    ) -> list[ScheduleRecord]:
        return await self._call(
            lambda cur: schedules.due_schedules(cur, tenant_id, now, limit, after, paused)
        )

    async def typical_run_ms(self, tenant_id: str) -> int | None:
        return await self._call(lambda cur: runs.typical_run_ms(cur, tenant_id))

    async def get_run(self, tenant_id: str, run_id: str) -> RunRecord | None:
        run = self._cache.run(run_id)
        if run is None:
            stamp = self._cache.stamp()
            run = await self._call(lambda cur: runs.find_run(cur, run_id))
            if run is None:
                return None
            self._cache.fill_run(stamp, run)
        return run if run.tenant_id == tenant_id else None

    async def list_runs(
        self, where: RunFilter, after: RunCursor | None, limit: int
    ) -> list[RunRecord]:
        newest = self._newest_run
        return await self._call(lambda cur: runs.list_runs(cur, where, after, limit, newest))

    @contextlib.asynccontextmanager
    async def _changing(self, run_id: str) -> AsyncIterator[_RunChange]:
        """Around a change of a run: its cached state and the fair queue follow it."""
        async with self._cache.change(run_id) as cached:
            with self._queue.changing((run_id,)) as queued:
                yield _RunChange(cached, queued)

    def _committed(self, change: _RunChange, run: RunRecord) -> None:
        """The run's state, as the change just committed it."""
        self._queue.apply(change.queued, run)
        change.cached.run = run  # kept if no other change of the run overlapped

    async def claim_next_run(self, worker_id: str, now: datetime) -> RunRecord | None:
        if not self._queue.valid and (mark := self._queue.mark()) is not None:
            self._queue.load(mark, *await self._call(runs.queue_state))
        async with self._cache.claim() as began:
            with self._queue.changing() as queued:
                chosen = self._queue.next_run()
                run = None
                if chosen is not None:
                    known = _first_try(self._cache.run(chosen))  # kept since its admission
                    run = await self._call(
                        lambda cur: runs.claim_run(cur, chosen, worker_id, now, known())
                    )
                if run is None:  # none known here, or taken meanwhile: the query decides
                    run = await self._call(lambda cur: runs.claim_next_run(cur, worker_id, now))
                if run is not None:
                    self._queue.apply(queued, run)
            if run is not None:
                self._cache.claimed(began, run)
                self._step_rows[run.pipeline_logging_id] = {}
            return run

    async def finish_run(
        self, run: RunRecord, status: str, now: datetime, error_message: str = ""
    ) -> RunRecord | None:
        owner = (run.worker_id, run.attempt)

        # In the tenant's turn, like admissions: both update its usage row.
        steps = self._step_rows.pop(run.pipeline_logging_id, None)
        steps_open = steps is None or any(s.status == "RUNNING" for s in steps.values())
        async with self._tenant_turns.get(run.tenant_id):
            known = _first_try(self._cache.run(run.pipeline_logging_id))  # the change drops it
            async with self._changing(run.pipeline_logging_id) as change:
                active = self._queue.active(run.tenant_id)  # exact in the tenant's turn
                ended = await self._call(
                    lambda cur: runs.finish_run(
                        cur,
                        run.pipeline_logging_id,
                        status,
                        now,
                        error_message,
                        owner,
                        active,
                        steps_open,
                        known(),
                    )
                )
                if ended is not None:
                    self._committed(change, ended)
                return ended

    async def request_cancel(
        self, tenant_id: str, run_id: str, now: datetime, known: RunRecord | None = None
    ) -> Cancellation:
        # Not during a publication of the tenant's (the first turn): a publication checks
        # that no cancel was asked, a cancel that the run has not published (neither sees
        # the other's uncommitted write).
        async with (
            self._publications.get(tenant_id),
            self._tenant_turns.get(tenant_id),
            self._changing(run_id) as change,
        ):
            active = self._queue.active(tenant_id)  # exact in the tenant's turn
            cancel = await self._call(
                lambda cur: runs.request_cancel(cur, tenant_id, run_id, now, active)
            )
            if cancel.run is not None:
                self._committed(change, cancel.run)
            return cancel

    async def cancel_requested(self, run: RunRecord, stored: bool = False) -> bool:
        # One process owns the file: what it keeps of a run is as stored.
        run_id = run.pipeline_logging_id
        known = self._cache.run(run_id)  # as last committed: a cancel drops it until then
        if known is not None:
            return known.cancel_requested
        return await self._call(lambda cur: runs.cancel_requested(cur, run_id))

    async def heartbeat(self, run_ids: list[str], worker_id: str) -> None:
        await self._call(lambda cur: runs.heartbeat(cur, run_ids, worker_id))

    async def stale_runs(self, stale_before: datetime) -> list[RunRecord]:
        return await self._call(lambda cur: runs.stale_runs(cur, stale_before))

    async def pending_runs(self, now: datetime) -> tuple[int, datetime | None]:
        return await self._call(runs.pending_runs)

    async def requeue_run(self, run: RunRecord, now: datetime, count_attempt: bool) -> bool:
        self._step_rows.pop(run.pipeline_logging_id, None)  # its steps are closed with it
        async with self._changing(run.pipeline_logging_id) as change:
            requeued = await self._call(lambda cur: runs.requeue_run(cur, run, now, count_attempt))
            if requeued:  # the run's new state is read again when asked for
                pending = dataclasses.replace(run, status="PENDING", start_time=None)
                self._queue.apply(change.queued, pending)
            return requeued

    async def published(self, run_id: str) -> bool:
        return await self._call(lambda cur: runs.published_by(cur, run_id)) is not None

    async def save_step(self, step: StepRecord) -> None:
        run_id = step.pipeline_logging_id
        rows = self._step_rows.get(run_id)
        new = rows is not None and step.step_logging_id not in rows
        written = None if rows is None else rows.get(step.step_logging_id)
        async with self._cache.change(run_id, steps_only=True) as change:
            try:
                await self._call(lambda cur: runs.save_step(cur, step, new, written))
            except BaseException:  # what it committed is unknown
                self._step_rows.pop(run_id, None)
                raise
            if change.steps_before is not None:
                change.steps = runs.with_step(change.steps_before, step)  # or None
        if rows is not None:
            rows[step.step_logging_id] = step

    async def save_steps(self, steps: Sequence[StepRecord]) -> None:
        # One write per step here: DuckDB's cost is per statement, not per commit.
        for step in steps:
            await self.save_step(step)

    async def run_with_steps(
        self, tenant_id: str, run_id: str
    ) -> tuple[RunRecord | None, list[StepRecord]]:
        run = await self.get_run(tenant_id, run_id)
        if run is None:
            return None, []
        return run, latest_execution(run, await self.list_steps(tenant_id, run_id))

    async def list_steps(self, tenant_id: str, run_id: str) -> list[StepRecord]:
        steps = self._cache.steps(run_id)
        if steps is None:
            stamp = self._cache.stamp()
            steps = await self._call(lambda cur: runs.list_run_steps(cur, run_id))
            self._cache.fill_steps(stamp, run_id, steps)
        return [step for step in steps if step.tenant_id == tenant_id]

    async def add_dq_results(self, run: RunRecord, results: list[DqRecord]) -> None:
        if results:
            async with self._cache.change(run.pipeline_logging_id) as change:
                await self._call(lambda cur: runs.add_dq_results(cur, run, results))
                change.steps = change.steps_before  # no step written
                if not any(r.warns for r in results):  # nor the run
                    change.run = change.run_before

    async def run_with_checks(
        self, tenant_id: str, run_id: str
    ) -> tuple[RunRecord | None, list[DqRecord]]:
        run = await self.get_run(tenant_id, run_id)
        if run is None:
            return None, []
        return run, await self.list_dq_results(tenant_id, run_id, run.attempt)

    async def list_dq_results(self, tenant_id: str, run_id: str, attempt: int) -> list[DqRecord]:
        return await self._call(lambda cur: runs.list_dq_results(cur, tenant_id, run_id, attempt))

    def warehouse(self, dataset: str) -> DuckDBWarehouse:
        """The tenant dataset as the pipeline engine sees it.

        Pipeline SQL runs on its own threads, so that long steps never hold back the API's
        store calls (auth, triggers, run bookkeeping).
        """
        generation = self._generation
        return DuckDBWarehouse(
            dataset,
            lambda: cursor_of(self._connection),
            STORE,
            self._warehouse_executor,
            self._publish_turns,
            lambda exc: self._fault(exc, generation),
            self._publications,
        )

    async def drop_stage_tables(self) -> int:
        """Drops staging tables left by runs that were interrupted (start-up clean-up)."""
        return await self._call(drop_stage_tables)

    async def close(self) -> None:
        def close() -> None:
            self._warehouse_executor.shutdown(wait=True, cancel_futures=True)
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._connection.close()

        # Off the event loop: a thread still busy must not stall the server's bounded stop.
        await asyncio.to_thread(close)
