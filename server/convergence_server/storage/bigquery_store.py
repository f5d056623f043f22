"""The BigQuery store: a central dataset and one dataset per tenant, in one project.

Written for BigQuery's strengths and limits rather than as a port of the embedded store:

- **Run state is append-only.** Every change of a run (created, claimed, finished, requeued,
  cancel requested, publishing) is a row of `tenant_run_events` holding the run's whole
  state after the change; the view `tenant_pipeline_runs` shows each run's newest row.
  Step logs work the same way (`tenant_step_events`, view `tenant_step_logs`), heartbeats
  are rows of `tenant_run_heartbeats`. No row is ever updated in place, so nothing waits on the
  streaming buffer and no table takes an UPDATE per heartbeat.
- **One transaction per change, serialized per tenant only.** Each change is one
  multi-statement transaction that first updates the tenant's own one-row table
  `tenant_run_counters_{tenant_id}` (its event sequence, its PENDING or RUNNING runs, its
  runs today). Two transactions of one tenant therefore conflict; BigQuery aborts one, and
  it runs again (`Central.transaction`). BigQuery detects conflicts per table, and no
  transaction updates or deletes rows of any other table (the rest is appends), so
  different tenants never wait on each other; but for plan changes, which update the
  tenant's `tenant_profiles` row in the transaction that counts its team (rare: two at
  once conflict, and one runs again). Admission (daily and concurrent limits,
  idempotency key, the PENDING row) is thus exact across any number of server processes,
  and a run's events have a total order (`event_seq`).
- **Usage is derived.** `tenant_usage_quotas` is a view over the `created` and `finished`
  events, which carry the tenant's concurrency after them and the admission's limits.
  Idempotency keys are appended; a key's newest row is its state.
- **Bounded DML.** A run costs one transaction to be created (shared with the tenant's
  triggers that arrive together: `bigquery_runs.AdmissionTurns`), one to be claimed, one to
  begin its publication and one to publish its writes (with its publication record), one to
  end, plus one INSERT per
  step boundary (a step's end and the next one's start together: a run of n steps makes
  n + 1) and one per heartbeat tick of its server. A `dq` step's results are one
  INSERT too, or, when `warn` checks failed, one transaction that also appends the run's
  new `warnings`. The UPDATEs in transactions hit the tenant's counters row, and a plan
  change's its `tenant_profiles` row (with the count of its team); outside them, member
  removals delete from `tenant_members`, and superseded schedule versions are deleted
  (below).
- **Schedules are versioned rows.** Every change of a schedule appends its whole state,
  one `version` higher, to `tenant_schedule_events`; the view `tenant_schedules` shows each
  schedule's newest version. A change is appended, in the tenant's transaction, only when
  the newest stored version is the one it was made from, so of two replicas recording the
  same progress exactly one writes it (and its skipped slots, `tenant_schedule_skips`).
  The versions a newer one superseded are deleted at most once an hour
  (`bigquery_schedules.Compaction`), so reading schedules costs what the live ones hold,
  not every slot they ever ran.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, TypeVar

from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from convergence_server.storage import bigquery_accounts as accounts
from convergence_server.storage import bigquery_runs as runs
from convergence_server.storage import bigquery_schedules as schedules
from convergence_server.storage import schema
from convergence_server.storage.bigquery_central import Central
from convergence_server.storage.bigquery_client import (
    RETRY,
    UNAVAILABLE,
    Runner,
    make_client,
)
from convergence_server.storage.bigquery_schema import migrate
from convergence_server.storage.bigquery_warehouse import BigQueryWarehouse
from convergence_server.storage.identifiers import quote_identifier
from convergence_server.storage.locks import KeyedLocks
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
from convergence_server.storage.rows import latest_execution
from convergence_server.storage.run_cache import CAPACITY, Lru
from convergence_server.storage.shared_reads import SharedReads
from convergence_server.storage.warehouse import STAGE_PREFIX

T = TypeVar("T")
log = logging.getLogger(__name__)

THREADS = 16
ENDED = ("COMPLETE", "FAILED")
TYPICAL_RUN_SECONDS = 60.0


class BigQueryStore:
    """The `Store` port on BigQuery. Runs, steps and data-quality results are served by
    `bigquery_runs`, schedules by `bigquery_schedules`, tenants, keys, the audit log,
    webhooks, plans and members by `bigquery_accounts`, all over the central dataset's
    tables and views of `bigquery_schema`."""

    kind = "bigquery"
    exclusive = False

    def __init__(self, client: bigquery.Client, prefix: str, pipeline_threads: int = 4) -> None:
        self._client = client
        self._bq = Runner(client, THREADS)
        # Pipeline jobs wait on their own threads, so that long steps never hold back the
        # API's calls (auth, triggers, run bookkeeping) or the heartbeats.
        self._pipelines = Runner(client, max(1, pipeline_threads), "bigquery-pipelines")
        self.project = client.project
        self._prefix = prefix
        self.central = f"{prefix}{schema.CENTRAL_DATASET}"
        self._publish_locks = KeyedLocks()
        self._db = Central(self._bq, self.central)
        self._admissions = runs.AdmissionTurns()
        # How far back the reads of the runs not ended look (see `runs.Horizon`).
        self._horizon = runs.Horizon()
        self._compaction = schedules.Compaction()
        # Runs that ended, as read or written here: an ended run never changes again (every
        # change of a run is guarded by PENDING or RUNNING), so each replica reads it once.
        self._ended: Lru[RunRecord] = Lru(CAPACITY)
        # Where the last full first page of each filter ended (see `list_runs`).
        self._first_pages: Lru[datetime] = Lru(CAPACITY)
        # Each tenant's median run, until when it is kept (see `typical_run_ms`).
        self._typical: Lru[tuple[float, int | None]] = Lru(CAPACITY)
        # Runs executing here, as last written here. Only their worker changes them, but for
        # a cancel asked on another replica and a recovery by another replica after lost
        # heartbeats: each heartbeat reads those back (`heartbeat`), so reads served from
        # here are at most one heartbeat behind another replica's change.
        self._executing: dict[str, RunRecord] = {}
        # Their steps, served from here too once the attempt has one written here (`_Steps`).
        self._steps: dict[str, _Steps] = {}
        # Runs a cancel here flagged, as it left them: a claim here that committed before
        # the cancel, but whose caller comes back after it, takes the flag from here.
        self._flagged: Lru[RunRecord] = Lru(CAPACITY)
        # Reads polled by many callers at once (a run, its steps and checks, a list of
        # runs, a day's usage) share their query jobs: see `shared_reads`.
        self._reads = SharedReads()

    @classmethod
    def open(
        cls, project: str, location: str, prefix: str, endpoint: str = "", pipeline_threads: int = 4
    ) -> BigQueryStore:
        store = cls(make_client(project, location, endpoint), prefix, pipeline_threads)
        try:
            migrate(store._db)
        except UNAVAILABLE as exc:
            raise SystemExit(f"cannot reach BigQuery for project {project}: {exc}") from None
        return store

    # -- plumbing ---------------------------------------------------------------------------

    def _t(self, table: str) -> str:
        return self._db.table(table)

    def dataset_of(self, tenant_id: str) -> str:
        quote_identifier(tenant_id)
        return f"{self._prefix}{tenant_id}"

    async def _call(self, fn: Callable[[], T]) -> T:
        return await self._db.call(fn)

    def _query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return self._db.query(sql, **params)

    # -- Store: catalogue -------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda: self._query("SELECT 1"))

    async def schema_version(self) -> int:
        rows = await self._call(
            lambda: self._query(f"SELECT MAX(version) AS v FROM {self._t('schema_migrations')}")
        )
        return int(rows[0][0] or 0) if rows else 0

    async def central_table_columns(self) -> dict[str, frozenset[str]]:
        rows = await self._call(
            lambda: self._query(
                "SELECT table_name, column_name "
                f"FROM `{self.project}.{self.central}`.INFORMATION_SCHEMA.COLUMNS"
            )
        )
        tables: dict[str, set[str]] = {}
        for row in rows:
            tables.setdefault(row[0], set()).add(row[1])
        return {name: frozenset(columns) for name, columns in tables.items()}

    async def probe_dataset_creation(self) -> None:
        scratch = f"{self._prefix}_convergence_probe_{uuid.uuid4().hex}"

        def probe() -> None:
            self._bq.client.create_dataset(scratch, retry=RETRY)
            self._bq.client.delete_dataset(
                scratch, delete_contents=True, not_found_ok=True, retry=RETRY
            )

        await self._call(probe)

    async def dataset_exists(self, dataset_id: str) -> bool:
        def exists() -> bool:
            try:
                self._bq.client.get_dataset(self.dataset_of(dataset_id), retry=RETRY)
            except (api_exceptions.NotFound, ValueError):  # ValueError: not a valid name
                return False
            return True

        return await self._call(exists)

    # -- tenants, keys, the audit log, webhooks, plans, members: `bigquery_accounts` -----

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        return await accounts.get_tenant(self._db, tenant_id)

    async def tenant_ids_equal_ignoring_case(self, tenant_id: str) -> list[str]:
        return await accounts.tenant_ids_equal_ignoring_case(self._db, tenant_id)

    async def create_tenant(
        self, tenant: TenantRecord, key: ApiKeyRecord, commit_by: float | None = None
    ) -> tuple[str, ...]:
        dataset = self.dataset_of(tenant.tenant_id)
        return await accounts.create_tenant(self._db, dataset, tenant, key, commit_by)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        return await accounts.get_api_key(self._db, key_id)

    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        return await accounts.list_api_keys(self._db, tenant_id)

    async def create_api_key(self, key: ApiKeyRecord, audit: AuditRecord) -> None:
        await accounts.create_api_key(self._db, key, audit)

    async def revoke_api_key(
        self,
        tenant_id: str,
        key_id: str,
        now: datetime,
        audit: AuditRecord,
        keep_one: bool = True,
    ) -> ApiKeyRecord | None:
        return await accounts.revoke_api_key(self._db, tenant_id, key_id, now, audit, keep_one)

    async def rotate_api_key(
        self,
        tenant_id: str,
        key_id: str,
        new_key: ApiKeyRecord,
        grace_until: datetime,
        audit: AuditRecord,
    ) -> ApiKeyRecord | None:
        return await accounts.rotate_api_key(
            self._db, tenant_id, key_id, new_key, grace_until, audit
        )

    async def record_key_use(self, uses: dict[str, datetime]) -> None:
        await accounts.record_key_use(self._db, uses)

    async def changed_api_keys(self, since: datetime | None) -> tuple[list[str], datetime]:
        return await accounts.changed_api_keys(self._db, since)

    async def add_audit(self, records: list[AuditRecord]) -> None:
        await accounts.add_audit(self._db, records)

    async def list_audit(
        self, where: AuditFilter, after: tuple[datetime, str] | None, limit: int
    ) -> list[AuditRecord]:
        return await accounts.list_audit(self._db, where, after, limit)

    async def get_webhook(self, tenant_id: str) -> WebhookRecord | None:
        return await accounts.get_webhook(self._db, tenant_id)

    async def save_webhook(self, webhook: WebhookRecord, audit: AuditRecord) -> None:
        await accounts.save_webhook(self._db, webhook, audit)

    async def update_plan(
        self, tenant_id: str, plan: str, team_size: int, now: datetime
    ) -> int | None:
        return await accounts.update_plan(self._db, tenant_id, plan, team_size, now)

    async def admit_member(
        self, tenant_id: str, user_id: str, plan: str, team_size: int, now: datetime
    ) -> MemberAdmission:
        return await accounts.admit_member(self._db, tenant_id, user_id, plan, team_size, now)

    async def list_members(self, tenant_id: str) -> list[MemberRecord]:
        return await accounts.list_members(self._db, tenant_id)

    async def remove_member(self, tenant_id: str, user_id: str) -> bool:
        return await accounts.remove_member(self._db, tenant_id, user_id)

    # -- schedules --------------------------------------------------------------------------

    async def create_schedule(self, schedule: ScheduleRecord, max_schedules: int) -> int:
        return await schedules.create_schedule(self._db, schedule, max_schedules)

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> ScheduleRecord | None:
        return await schedules.get_schedule(self._db, tenant_id, schedule_id)

    async def list_schedules(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[ScheduleRecord]:
        return await schedules.list_schedules(self._db, tenant_id, after, limit)

    async def save_schedule(self, schedule: ScheduleRecord, skip: SkipRecord | None = None) -> bool:
        return await schedules.save_schedule(self._db, schedule, skip)

    async def due_schedules(
        self,
        tenant_id: str | None,
        now: datetime,
        limit: int,
        after: tuple[str, datetime, str] | None = None,
        paused: bool = True,
    ) -> list[ScheduleRecord]:
        return await schedules.due_schedules(
            self._db, self._compaction, tenant_id, now, limit, after, paused
        )

    # -- runs -------------------------------------------------------------------------------

    async def create_run(
        self,
        run: RunRecord,
        keys_valid_from: datetime,
        limits: RunLimits | None = None,
        progress: ScheduleRecord | None = None,
    ) -> Admission:
        try:
            return await self._admissions.admit(self._db, run, keys_valid_from, limits, progress)
        finally:  # stored or not (a failed commit may have landed), the claims must see it
            self._horizon.admitted(run.created_at)

    async def usage(self, tenant_id: str, day: date) -> TenantUsage:
        return await self._reads.read(
            ("usage", tenant_id, day), lambda: runs.usage(self._db, tenant_id, day)
        )

    async def typical_run_ms(self, tenant_id: str) -> int | None:
        # Read on every concurrency refusal (its Retry-After), over the tenant's history:
        # kept a minute, so that refusals cost a tenant one query a minute at most.
        kept = self._typical.get(tenant_id)
        if kept is not None and time.monotonic() < kept[0]:
            return kept[1]
        typical = await self._reads.read(
            ("typical", tenant_id), lambda: runs.typical_run_ms(self._db, tenant_id)
        )
        self._typical.put(tenant_id, (time.monotonic() + TYPICAL_RUN_SECONDS, typical))
        return typical

    async def get_run(self, tenant_id: str, run_id: str) -> RunRecord | None:
        run = self._ended.get(run_id) or self._executing.get(run_id)
        if run is not None:
            return run if run.tenant_id == tenant_id else None
        return self._keep(
            await self._reads.read(
                ("run", tenant_id, run_id), lambda: runs.get_run(self._db, tenant_id, run_id)
            )
        )

    def _keep(self, run: RunRecord | None) -> RunRecord | None:
        """The run, remembered if it has ended."""
        if run is not None and run.status in ENDED:
            self._ended.put(run.pipeline_logging_id, run)
        return run

    async def list_runs(
        self, where: RunFilter, after: RunCursor | None, limit: int
    ) -> list[RunRecord]:
        # A first page is read from where this filter's last full first page ended: runs
        # are never deleted, so it holds a full page again unless runs left the filter.
        first = f"{where!r}/{limit}" if after is None else None
        since = self._first_pages.get(first) if first else None
        found = await self._reads.read(
            ("runs", where, after, limit),
            lambda: runs.list_runs(self._db, where, after, limit, since),
        )
        if first and len(found) == limit:
            self._first_pages.put(first, found[-1].created_at)
        for run in found:
            self._keep(run)
        return list(found)

    async def cancel_requested(self, run: RunRecord, stored: bool = False) -> bool:
        """A run executing here answers from memory: a cancel asked here sets its flag at
        once, one asked on another replica shows from this replica's next heartbeat, which
        reads the run back. So a step boundary costs no query job. Others (a run let go
        after a failed heartbeat) are read from the run's partition."""
        mine = self._executing.get(run.pipeline_logging_id)
        if mine is not None and (mine.cancel_requested or not stored):
            return mine.cancel_requested
        if await runs.cancel_requested(self._db, run):
            self._cancelled(run.pipeline_logging_id)
            return True
        return False

    def _cancelled(self, run_id: str) -> None:
        """Flags a run executing here as cancel-requested (a flag that is never taken back:
        a read that answers after a newer change of the run here cannot undo that)."""
        mine = self._executing.get(run_id)
        if mine is not None:
            self._executing[run_id] = replace(mine, cancel_requested=True)

    async def pending_runs(self, now: datetime) -> tuple[int, datetime | None]:
        return await runs.pending_runs(self._db, self._horizon, now)

    async def stale_runs(self, stale_before: datetime) -> list[RunRecord]:
        return await runs.stale_runs(self._db, self._horizon, stale_before)

    async def claim_next_run(self, worker_id: str, now: datetime) -> RunRecord | None:
        run = await runs.claim_next_run(self._db, self._horizon, worker_id, now)
        if run is not None:
            flagged = self._flagged.get(run.pipeline_logging_id)
            if flagged is not None and (flagged.worker_id, flagged.attempt) == (
                run.worker_id,
                run.attempt,
            ):  # this very execution was flagged after the claim committed
                run = replace(run, cancel_requested=True)
            self._executing[run.pipeline_logging_id] = run
            self._steps[run.pipeline_logging_id] = _Steps(run.attempt)
        return run

    def _let_go(self, run_id: str) -> None:
        """The run is no longer executing here: reads of it go to BigQuery."""
        self._executing.pop(run_id, None)
        self._steps.pop(run_id, None)

    async def finish_run(
        self, run: RunRecord, status: str, now: datetime, error_message: str = ""
    ) -> RunRecord | None:
        self._let_go(run.pipeline_logging_id)
        return self._keep(await runs.finish_run(self._db, run, status, now, error_message))

    async def request_cancel(
        self, tenant_id: str, run_id: str, now: datetime, known: RunRecord | None = None
    ) -> Cancellation:
        try:
            cancel = await runs.request_cancel(self._db, tenant_id, run_id, now, known)
        except BaseException:  # it may have committed: reads of the run go to BigQuery
            self._let_go(run_id)
            raise
        changed = self._keep(cancel.run)
        if changed is not None and changed.cancel_requested:
            self._cancelled(run_id)
            self._flagged.put(run_id, changed)
        return cancel

    async def heartbeat(self, run_ids: list[str], worker_id: str) -> None:
        named = set(run_ids)
        for run_id, mine in list(self._executing.items()):
            if mine.worker_id == worker_id and run_id not in named:  # let go without an end
                self._let_go(run_id)
        try:
            await runs.heartbeat(self._db, run_ids, worker_id)
            served = [self._executing[r] for r in run_ids if r in self._executing]
            stored = {run.pipeline_logging_id: run for run in await runs.runs_now(self._db, served)}
        except BaseException:  # not refreshed: reads of these runs go to BigQuery
            for run_id in run_ids:
                self._let_go(run_id)
            raise
        for run_id in run_ids:
            known, theirs = self._executing.get(run_id), stored.get(run_id)
            if known is None:
                continue
            if theirs is None or (theirs.status, theirs.worker_id, theirs.attempt) != (
                "RUNNING",
                known.worker_id,
                known.attempt,
            ):  # recovered by another replica, or gone: no longer this replica's to answer
                self._let_go(run_id)
            elif theirs.cancel_requested:
                self._cancelled(run_id)

    async def requeue_run(self, run: RunRecord, now: datetime, count_attempt: bool) -> bool:
        self._let_go(run.pipeline_logging_id)
        return await runs.requeue_run(self._db, run, now, count_attempt)

    async def published(self, run_id: str) -> bool:
        return await runs.published(self._db, run_id)

    async def write_failure(self) -> str | None:
        return None  # BigQuery's failures surface per call, as Unavailable

    async def save_step(self, step: StepRecord) -> None:
        await self.save_steps([step])

    async def save_steps(self, steps: Sequence[StepRecord]) -> None:
        """One INSERT for all of `steps` (of one run)."""
        if not steps:
            return
        run_id = steps[0].pipeline_logging_id
        mine = self._steps.get(run_id)
        if mine is None or any(step.run_attempt != mine.attempt for step in steps):
            await runs.save_steps(self._db, steps)
            return
        mine.writing.update(step.step_logging_id for step in steps)
        try:
            await runs.save_steps(self._db, steps)
        except BaseException:  # they may be stored or not: reads of the run go to BigQuery
            self._steps.pop(run_id, None)
            raise
        for step in steps:
            mine.written[step.step_logging_id] = step

    async def list_steps(self, tenant_id: str, run_id: str) -> list[StepRecord]:
        mine, steps = self._executing.get(run_id), self._steps.get(run_id)
        if mine is None or steps is None or not steps.written:  # BigQuery's newest attempt
            return await self._read_steps(tenant_id, run_id)
        if mine.tenant_id != tenant_id:
            return []
        if steps.earlier is None:
            # Once per claim: what the attempt had before it (a run handed back keeps its
            # attempt), without the steps written here, which are answered as written.
            found = await self._read_steps(tenant_id, run_id)
            steps.earlier = [
                s
                for s in found
                if s.run_attempt == steps.attempt and s.step_logging_id not in steps.writing
            ]
        return sorted(
            [*steps.earlier, *steps.written.values()],
            key=lambda s: (s.step_index, s.step_start_time),
        )

    async def run_with_steps(
        self, tenant_id: str, run_id: str
    ) -> tuple[RunRecord | None, list[StepRecord]]:
        if run_id in self._executing:  # answered here, from memory once its steps are
            run = await self.get_run(tenant_id, run_id)
            if run is None:
                return None, []
            return run, latest_execution(run, await self.list_steps(tenant_id, run_id))
        found, steps = await self._reads.read(
            ("run and steps", tenant_id, run_id),
            lambda: runs.run_with_steps(self._db, tenant_id, run_id),
        )
        run = self._keep(found)
        return run, [] if run is None else latest_execution(run, steps)

    async def _read_steps(self, tenant_id: str, run_id: str) -> list[StepRecord]:
        return list(
            await self._reads.read(
                ("steps", tenant_id, run_id), lambda: runs.list_steps(self._db, tenant_id, run_id)
            )
        )

    async def add_dq_results(self, run: RunRecord, results: list[DqRecord]) -> None:
        changed = await runs.add_dq_results(self._db, run, results)
        mine = self._executing.get(run.pipeline_logging_id)
        if changed is not None and mine is not None:  # only this worker adds warnings
            warnings = max(mine.warnings, changed.warnings)
            self._executing[run.pipeline_logging_id] = replace(mine, warnings=warnings)

    async def run_with_checks(
        self, tenant_id: str, run_id: str
    ) -> tuple[RunRecord | None, list[DqRecord]]:
        if run_id in self._executing:  # the run from memory, its checks from BigQuery
            run = await self.get_run(tenant_id, run_id)
            if run is None:
                return None, []
            return run, await self.list_dq_results(tenant_id, run_id, run.attempt)
        run, checks = await self._reads.read(
            ("run and checks", tenant_id, run_id),
            lambda: runs.run_with_checks(self._db, tenant_id, run_id),
        )
        return self._keep(run), list(checks)

    async def list_dq_results(self, tenant_id: str, run_id: str, attempt: int) -> list[DqRecord]:
        return list(
            await self._reads.read(
                ("checks", tenant_id, run_id, attempt),
                lambda: runs.list_dq_results(self._db, tenant_id, run_id, attempt),
            )
        )

    # -- pipelines --------------------------------------------------------------------------

    def warehouse(self, dataset: str) -> BigQueryWarehouse:
        return BigQueryWarehouse(
            self._pipelines,
            self.dataset_of(dataset),
            self._publish_locks.get(dataset),
            functools.partial(runs.publish, self._db, self._pipelines),
            functools.partial(runs.begin_publication, self._db, self._pipelines),
        )

    async def drop_stage_tables(self) -> int:
        def drop() -> int:
            client, dropped = self._bq.client, 0
            for dataset in client.list_datasets(retry=RETRY):
                if not dataset.dataset_id.startswith(self._prefix):
                    continue
                for table in client.list_tables(dataset.dataset_id, retry=RETRY):
                    if table.table_id.startswith(STAGE_PREFIX):
                        client.delete_table(table, not_found_ok=True, retry=RETRY)
                        dropped += 1
            return dropped

        return await self._call(drop)

    async def close(self) -> None:
        self._pipelines.close()
        self._bq.close()
        self._client.close()  # type: ignore[no-untyped-call]


@dataclass
class _Steps:
    """The steps of a run's attempt executing here: those written here, as written (and
    those being written, by id), and the ones the attempt had before, read once."""

    attempt: int
    writing: set[str] = field(default_factory=set)
    written: dict[str, StepRecord] = field(default_factory=dict)
    earlier: list[StepRecord] | None = None
