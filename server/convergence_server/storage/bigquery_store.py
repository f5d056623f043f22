"""The BigQuery store: a central dataset and one dataset per tenant, in one project.

Written for BigQuery's strengths and limits rather than as a port of the embedded store:

- **Run state is append-only.** Every change of a run (created, claimed, finished, requeued,
  cancel requested) is a row of `tenant_run_events` holding the run's whole state after the
  change; the view `tenant_pipeline_runs` shows each run's newest row. Step logs work the
  same way (`tenant_step_events`, view `tenant_step_logs`), heartbeats are rows of
  `tenant_run_heartbeats`. No row is ever updated in place, so nothing waits on the
  streaming buffer and no table takes an UPDATE per heartbeat.
- **One transaction per change, serialized per tenant only.** Each change is one
  multi-statement transaction that first updates the tenant's own one-row table
  `tenant_run_counters_{tenant_id}` (its event sequence, its PENDING or RUNNING runs, its
  runs today). Two transactions of one tenant therefore conflict; BigQuery aborts one, and
  it is retried here. BigQuery detects conflicts per table, and no transaction updates or
  deletes rows of any other table (the rest is appends), so different tenants never wait
  on each other. Admission (daily and concurrent limits, idempotency key, the PENDING row)
  is thus exact across any number of server processes, and a run's events have a total
  order (`event_seq`).
- **Usage is derived.** `tenant_usage_quotas` is a view over the `created` and `finished`
  events, which carry the tenant's concurrency after them and the admission's limits.
  Idempotency keys are appended; a key's newest row is its state.
- **Bounded DML.** A run costs one transaction to be created, one to be claimed, one to
  publish its writes (with its publication record) and one to end, plus one INSERT per
  step boundary and one per heartbeat tick of its server. A `dq` step's results are one
  INSERT too, or, when `warn` checks failed, one transaction that also appends the run's
  new `warnings`. The only UPDATEs in transactions hit the tenant's counters row; outside
  them, plan changes update `tenant_profiles` and member removals delete from
  `tenant_members`.
- **Schedules are versioned rows.** Every change of a schedule appends its whole state,
  one `version` higher, to `tenant_schedule_events`; the view `tenant_schedules` shows each
  schedule's newest version. A change is appended, in the tenant's transaction, only when
  the newest stored version is the one it was made from, so of two replicas recording the
  same progress exactly one writes it (and its skipped slots, `tenant_schedule_skips`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from convergence_server.errors import AlreadyExists, DeadlineExceeded, Unavailable
from convergence_server.storage import schema
from convergence_server.storage.bigquery_client import (
    PUBLISH_TIMEOUT,
    RETRY,
    STARTUP_RETRY,
    STORE_JOB_TIMEOUT,
    UNAVAILABLE,
    Null,
    Runner,
    is_conflict,
    is_transient,
    make_client,
)
from convergence_server.storage.bigquery_warehouse import BigQueryWarehouse, create_table_sql
from convergence_server.storage.identifiers import quote_identifier
from convergence_server.storage.locks import KeyedLocks
from convergence_server.storage.records import (
    Admission,
    ApiKeyRecord,
    AuditFilter,
    AuditRecord,
    DqRecord,
    MemberRecord,
    RunCursor,
    RunFilter,
    RunLimits,
    RunRecord,
    ScheduleRecord,
    SkipRecord,
    StepRecord,
    TenantRecord,
    UsageRecord,
    WebhookRecord,
)
from convergence_server.storage.rows import (
    AUDIT_COLUMNS,
    AUDIT_NAMES,
    DQ_COLUMNS,
    DQ_OF_ATTEMPT,
    FAIR_QUEUE,
    KEY_COLUMNS,
    RUN_COLUMNS,
    SCHEDULE_COLUMNS,
    STEP_COLUMNS,
    WEBHOOK_COLUMNS,
    audit_from_row,
    dq_from_row,
    dq_values,
    key_from_row,
    run_from_row,
    schedule_from_row,
    schedule_values,
    step_from_row,
    webhook_from_row,
)
from convergence_server.storage.warehouse import STAGE_PREFIX

T = TypeVar("T")
log = logging.getLogger(__name__)

THREADS = 16
CONFLICT_RETRIES = 40
# Each run's state changes, and each step's; the central tables of those names are views.
EVENT_COLUMNS = (
    schema.Column("event_seq", "INT64", required=True),
    schema.Column("event", "STRING", required=True),
    schema.Column("event_time", "TIMESTAMP", required=True),
    # On `created` and `finished` events, what the usage view derives the tenant's daily
    # row from: the day it counts on, the tenant's PENDING or RUNNING runs after the
    # change, and (on `created`, when admitted against them) the limits.
    schema.Column("usage_day", "DATE"),
    schema.Column("active_after", "INT64"),
    schema.Column("daily_limit", "INT64"),
    schema.Column("concurrent_limit", "INT64"),
)
USAGE_COLUMNS = {c.name: c.type for c in EVENT_COLUMNS[3:]}
RUN_EVENTS = schema.Table(
    "tenant_run_events",
    (*schema.TENANT_PIPELINE_RUNS.columns, *EVENT_COLUMNS),
    partition_by="created_at",
    cluster_by=("tenant_id", "pipeline_logging_id"),
)
STEP_EVENTS = schema.Table(
    "tenant_step_events",
    (*schema.TENANT_STEP_LOGS.columns, schema.Column("recorded_at", "TIMESTAMP", required=True)),
    partition_by="step_start_time",
    cluster_by=("tenant_id", "pipeline_logging_id"),
)
HEARTBEATS = schema.Table(
    "tenant_run_heartbeats",
    (
        schema.Column("pipeline_logging_id", "STRING", required=True),
        schema.Column("worker_id", "STRING", required=True),
        schema.Column("beat_at", "TIMESTAMP", required=True),
    ),
    partition_by="beat_at",
    cluster_by=("pipeline_logging_id",),
    # Only the newest beats matter (a lease is seconds): a week of them is plenty.
    partition_expiration_days=7,
)
# Each schedule's versions, a row per change; the central table of that name is a view of
# each schedule's newest.
SCHEDULE_EVENTS = schema.Table(
    "tenant_schedule_events",
    (*schema.TENANT_SCHEDULES.columns, schema.Column("recorded_at", "TIMESTAMP", required=True)),
    cluster_by=("tenant_id", "schedule_id"),
)
# One per tenant (`tenant_run_counters_{tenant_id}`, one row): BigQuery detects transaction
# conflicts per table, so only one tenant's changes ever take turns.
COUNTERS = schema.Table(
    "tenant_run_counters",
    (
        schema.Column("tenant_id", "STRING", required=True),
        schema.Column("seq", "INT64", required=True),
        schema.Column("active_runs", "INT64", required=True),
        schema.Column("runs_day", "DATE"),
        schema.Column("runs_today", "INT64", required=True),
        schema.Column("updated_at", "TIMESTAMP", required=True),
    ),
)
# Tables that the embedded store keeps as tables and this one derives, as views, from
# append-only tables (created in their place).
EVENT_BACKED = {
    schema.TENANT_PIPELINE_RUNS.name: (RUN_EVENTS, HEARTBEATS),
    schema.TENANT_STEP_LOGS.name: (STEP_EVENTS,),
    schema.TENANT_USAGE_QUOTAS.name: (),
    schema.TENANT_SCHEDULES.name: (SCHEDULE_EVENTS,),
}
MIGRATIONS_TABLE = schema.Table(
    "schema_migrations",
    (
        schema.Column("version", "INT64", required=True),
        schema.Column("description", "STRING", required=True),
        schema.Column("applied_at", "TIMESTAMP", required=True),
    ),
)
SELECT_RUN = RUN_COLUMNS.replace("parameters", "TO_JSON_STRING(parameters) AS parameters")
RUN_EVENT_NAMES = [c.name for c in RUN_EVENTS.columns]
STEP_EVENT_NAMES = [c.name for c in STEP_EVENTS.columns]
SELECT_SCHEDULE = SCHEDULE_COLUMNS.replace("parameters", "TO_JSON_STRING(parameters) AS parameters")
SCHEDULE_NAMES = SCHEDULE_COLUMNS.split(", ")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
OWNER_GUARD = "status = 'RUNNING' AND IFNULL(worker_id, '') = @worker_id AND attempt = @attempt"
INTERRUPTED = "Interrupted: the run stopped while this step was running"


class BigQueryStore:
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

    @classmethod
    def open(
        cls, project: str, location: str, prefix: str, endpoint: str = "", pipeline_threads: int = 4
    ) -> BigQueryStore:
        store = cls(make_client(project, location, endpoint), prefix, pipeline_threads)
        try:
            store._migrate()
        except UNAVAILABLE as exc:
            raise SystemExit(f"cannot reach BigQuery for project {project}: {exc}") from None
        return store

    # -- plumbing ---------------------------------------------------------------------------

    def _t(self, table: str) -> str:
        return f"`{self.central}.{table}`"

    def dataset_of(self, tenant_id: str) -> str:
        quote_identifier(tenant_id)
        return f"{self._prefix}{tenant_id}"

    async def _call(self, fn: Callable[[], T]) -> T:
        def run() -> T:
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.error("BigQuery unavailable or busy: %s", exc)
                raise Unavailable("BigQuery is unavailable or busy; try again") from exc

        return await self._bq.call(run)

    def _query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return self._bq.query(sql, params)

    def _transaction(
        self,
        script: str,
        params: Mapping[str, Any],
        runner: Runner | None = None,
        timeout: float = STORE_JOB_TIMEOUT,
    ) -> list[tuple[Any, ...]]:
        """Runs a transaction script, again while it conflicts with a concurrent one."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                return (runner or self._bq).query(script, params, rerun=False, timeout=timeout)
            except api_exceptions.GoogleAPICallError as exc:
                if not is_conflict(exc) or attempt == CONFLICT_RETRIES - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * min(2**attempt, 16))
        raise AssertionError("unreachable")  # pragma: no cover

    def _migrate(self) -> None:
        client = self._bq.client
        client.create_dataset(self.central, exists_ok=True, retry=STARTUP_RETRY)
        self._query(create_table_sql(self.central, MIGRATIONS_TABLE))
        rows = self._query(f"SELECT MAX(version) AS v FROM {self._t('schema_migrations')}")
        applied = (rows[0][0] if rows else None) or 0
        created: set[str] = set()  # at their newest shape: later columns are there already
        for migration in schema.MIGRATIONS:
            if migration.version <= applied:
                continue
            for table in migration.creates:
                created.add(table.name)
                for physical in EVENT_BACKED.get(table.name, (table,)):
                    self._query(create_table_sql(self.central, physical))
            for table, names in migration.adds:
                if table.name in created:
                    continue
                physical = EVENT_BACKED.get(table.name, (table,))[0]
                types = {c.name: c.type for c in table.columns}
                for name in names:
                    self._query(
                        f"ALTER TABLE {self._t(physical.name)} "
                        f"ADD COLUMN IF NOT EXISTS {name} {types[name]}"
                    )
            self._query(
                f"INSERT INTO {self._t('schema_migrations')} (version, description, applied_at) "
                "SELECT @v, @d, CURRENT_TIMESTAMP() FROM UNNEST([1]) "
                f"WHERE NOT EXISTS (SELECT 1 FROM {self._t('schema_migrations')} "
                "WHERE version = @v)",
                v=migration.version,
                d=migration.description,
            )
        self._query(self._runs_view_sql())
        self._query(self._steps_view_sql())
        self._query(self._usage_view_sql())
        self._query(self._schedules_view_sql())

    def _runs_view_sql(self) -> str:
        """Each run's newest state, its heartbeat the newest of its current worker's."""
        columns = [
            "IF(b.beat_at > e.heartbeat_at OR e.heartbeat_at IS NULL, b.beat_at, e.heartbeat_at)"
            " AS heartbeat_at"
            if c.name == "heartbeat_at"
            else f"e.{c.name}"
            for c in schema.TENANT_PIPELINE_RUNS.columns
        ]
        return (
            f"CREATE OR REPLACE VIEW {self._t(schema.TENANT_PIPELINE_RUNS.name)} AS "
            f"SELECT {', '.join(columns)} FROM ({self._latest_events_sql()}) AS e "
            "LEFT JOIN (SELECT pipeline_logging_id, worker_id, MAX(beat_at) AS beat_at "
            f"FROM {self._t(HEARTBEATS.name)} GROUP BY pipeline_logging_id, worker_id) AS b "
            "ON b.pipeline_logging_id = e.pipeline_logging_id AND b.worker_id = e.worker_id"
        )

    def _latest_events_sql(self, where: str = "TRUE") -> str:
        return (
            f"SELECT * FROM {self._t(RUN_EVENTS.name)} WHERE {where} QUALIFY ROW_NUMBER() "
            # tenant_id leads the window, so that a filter on it reaches the clustered table.
            "OVER (PARTITION BY tenant_id, pipeline_logging_id ORDER BY event_seq DESC) = 1"
        )

    def _latest_steps_sql(self, where: str = "TRUE") -> str:
        """Each step's newest row; an ended step outranks a RUNNING row written after it."""
        return (
            f"SELECT * FROM {self._t(STEP_EVENTS.name)} WHERE {where} QUALIFY ROW_NUMBER() "
            "OVER (PARTITION BY tenant_id, pipeline_logging_id, step_logging_id "
            "ORDER BY IF(status = 'RUNNING', 0, 1) DESC, "
            "recorded_at DESC) = 1"
        )

    def _steps_view_sql(self) -> str:
        columns = ", ".join(c.name for c in schema.TENANT_STEP_LOGS.columns)
        return (
            f"CREATE OR REPLACE VIEW {self._t(schema.TENANT_STEP_LOGS.name)} AS "
            f"SELECT {columns} FROM ({self._latest_steps_sql()})"
        )

    def _latest_schedules_sql(self, where: str = "TRUE") -> str:
        """Each schedule's newest version among the rows passing `where` (which must keep or
        drop a schedule's rows together: filter on its tenant or id here, on the rest after)."""
        return (
            f"SELECT * FROM {self._t(SCHEDULE_EVENTS.name)} WHERE {where} QUALIFY ROW_NUMBER() "
            # tenant_id leads the window, so that a filter on it reaches the clustered table.
            "OVER (PARTITION BY tenant_id, schedule_id ORDER BY version DESC) = 1"
        )

    def _schedules_view_sql(self) -> str:
        columns = ", ".join(c.name for c in schema.TENANT_SCHEDULES.columns)
        return (
            f"CREATE OR REPLACE VIEW {self._t(schema.TENANT_SCHEDULES.name)} AS "
            f"SELECT {columns} FROM ({self._latest_schedules_sql()})"
        )

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

    # -- tenants and keys -------------------------------------------------------------------

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        rows = await self._call(
            lambda: self._query(
                "SELECT tenant_id, company_name, admin_email, subscription_plan, created_at, "
                f"status FROM {self._t('tenant_profiles')} WHERE tenant_id = @t",
                t=tenant_id,
            )
        )
        return TenantRecord(*rows[0]) if rows else None

    async def tenant_ids_equal_ignoring_case(self, tenant_id: str) -> list[str]:
        rows = await self._call(
            lambda: self._query(
                f"SELECT tenant_id FROM {self._t('tenant_profiles')} "
                "WHERE LOWER(tenant_id) = LOWER(@t)",
                t=tenant_id,
            )
        )
        return [row[0] for row in rows]

    async def create_tenant(
        self, tenant: TenantRecord, key: ApiKeyRecord, commit_by: float | None = None
    ) -> tuple[str, ...]:
        """Creates the dataset (its name is the tenant's lock: a second creation fails),
        its objects, then the tenant's rows in one transaction; undone on any failure."""
        dataset = self.dataset_of(tenant.tenant_id)
        abandoned = threading.Event()

        def create() -> tuple[str, ...]:
            client = self._bq.client
            try:
                client.create_dataset(dataset, retry=RETRY)
            except api_exceptions.Conflict as exc:
                raise AlreadyExists(
                    f"Tenant '{tenant.tenant_id}' or its dataset already exists"
                ) from exc
            try:
                self._fill_dataset(dataset, tenant)
                if abandoned.is_set():
                    raise asyncio.CancelledError
                if commit_by is not None and time.monotonic() > commit_by:
                    raise DeadlineExceeded("The deadline passed before onboarding finished")
                try:
                    taken = self._tenant_rows(tenant, key)
                except BaseException:
                    # It may have committed before the failure reached us.
                    self._delete_tenant(tenant, key)
                    raise
                if taken:
                    raise AlreadyExists(f"Tenant '{tenant.tenant_id}' already exists")
            except BaseException:
                self._delete_tenant(tenant, key, rows=False)
                raise
            return schema.TENANT_DATASET_OBJECTS

        task = asyncio.ensure_future(self._call(create))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            abandoned.set()
            with contextlib.suppress(asyncio.CancelledError, AlreadyExists, DeadlineExceeded):
                await task
                # It committed before it could see the flag: undo it.
                await self._call(lambda: self._delete_tenant(tenant, key))
                log.warning("onboarding of %s abandoned after commit: undone", tenant.tenant_id)
            raise

    def _tenant_rows(self, tenant: TenantRecord, key: ApiKeyRecord) -> bool:
        """Stores the tenant's profile, key and counters in one transaction, unless the
        tenant id is taken; returns whether it was."""
        rows = self._transaction(
            f"""
            DECLARE taken BOOL;
            BEGIN TRANSACTION;
            SET taken = EXISTS (SELECT 1 FROM {self._t("tenant_profiles")}
                                WHERE tenant_id = @tenant_id);
            IF NOT taken THEN
              INSERT INTO {self._t("tenant_profiles")}
                (tenant_id, company_name, admin_email, subscription_plan, status,
                 created_at, updated_at)
              VALUES (@tenant_id, @company_name, @admin_email, @plan, @status,
                      @now, @now);
              {self._insert_key_sql("k_")}
              INSERT INTO {self._counters(tenant.tenant_id)}
                (tenant_id, seq, active_runs, runs_day, runs_today, updated_at)
              VALUES (@tenant_id, 0, 0, NULL, 0, @now);
            END IF;
            COMMIT TRANSACTION;
            SELECT taken;
            """,
            {
                "tenant_id": tenant.tenant_id,
                "company_name": tenant.company_name,
                "admin_email": tenant.admin_email,
                "plan": tenant.subscription_plan,
                "status": tenant.status,
                "now": tenant.created_at,
                **_key_params(key, "k_"),
            },
        )
        return bool(rows[0][0])

    def _fill_dataset(self, dataset: str, tenant: TenantRecord) -> None:
        counters = replace(COUNTERS, name=f"{COUNTERS.name}_{tenant.tenant_id}")
        self._query(create_table_sql(self.central, counters))
        table = schema.ONBOARDING_VALIDATION_TEST
        self._query(create_table_sql(dataset, table))
        self._query(
            f"INSERT INTO `{dataset}.{table.name}` (validation_id, tenant_id, validated_at, "
            "message) VALUES (@id, @tenant_id, @now, @message)",
            id=str(uuid.uuid4()),
            tenant_id=tenant.tenant_id,
            now=tenant.created_at,
            message="Dataset writable: onboarding validation row written.",
        )
        quote_identifier(tenant.tenant_id)
        self._query(schema.comprehensive_view_sql(dataset, self.central, tenant.tenant_id))

    def _delete_tenant(self, tenant: TenantRecord, key: ApiKeyRecord, rows: bool = True) -> None:
        """Removes what this onboarding created: its rows (told apart by the key and the
        creation time) and, unless only the rows, the dataset."""
        if rows:
            self._transaction(
                f"""
                BEGIN TRANSACTION;
                DELETE FROM {self._t("tenant_api_keys")} WHERE key_id = @key_id;
                DELETE FROM {self._t("tenant_profiles")}
                WHERE tenant_id = @tenant_id AND created_at = @now;
                COMMIT TRANSACTION;
                """,
                {"tenant_id": tenant.tenant_id, "key_id": key.key_id, "now": tenant.created_at},
            )
        self._bq.client.delete_table(
            self._counters(tenant.tenant_id).strip("`"), not_found_ok=True, retry=RETRY
        )
        self._bq.client.delete_dataset(
            self.dataset_of(tenant.tenant_id), delete_contents=True, not_found_ok=True, retry=RETRY
        )

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = await self._call(
            lambda: self._query(
                f"SELECT {KEY_COLUMNS} FROM {self._t('tenant_api_keys')} WHERE key_id = @k",
                k=key_id,
            )
        )
        return key_from_row(rows[0]) if rows else None

    # -- API keys and the audit log -----------------------------------------------------
    #
    # Keys are rows of `tenant_api_keys`, changed in place (revoked, rotated, last used):
    # every UPDATE of them is conditional on the row's state, in SQL. A change and its audit
    # row commit in one transaction; two changes of keys conflict (BigQuery detects it per
    # table) and the loser runs again, seeing the winner's change. `changed_at` is set by
    # BigQuery's clock, so that replicas comparing it with `changed_api_keys`' time never
    # depend on their own clocks.

    def _insert_key_sql(self, prefix: str) -> str:
        """Inserts the key of the `_key_params` named with `prefix`."""
        p = prefix
        return f"""
            INSERT INTO {self._t("tenant_api_keys")} ({KEY_COLUMNS}, changed_at)
            VALUES (@{p}key_id, @{p}tenant_id, @{p}salt, @{p}key_hash, @{p}created_at, NULL,
                    @{p}name, @{p}scope, @{p}created_by, @{p}expires_at, NULL, NULL,
                    CURRENT_TIMESTAMP());"""

    def _insert_audit_sql(self, prefix: str) -> str:
        """Appends the audit rows of the `_audit_params` named with `prefix` (one array per
        column: the statement's size and parameter count do not grow with the rows)."""
        values = [
            {
                "event_time": f"TIMESTAMP_MICROS(CAST(@{prefix}event_time[OFFSET(i)] AS INT64))",
                "event_count": f"CAST(@{prefix}event_count[OFFSET(i)] AS INT64)",
            }.get(name, f"@{prefix}{name}[OFFSET(i)]")
            for name in AUDIT_NAMES
        ]
        return f"""
            INSERT INTO {self._t(schema.TENANT_AUDIT_LOG.name)} ({AUDIT_COLUMNS})
            SELECT {", ".join(values)}
            FROM UNNEST(@{prefix}event_id) AS event_id WITH OFFSET AS i;"""

    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        rows = await self._call(
            lambda: self._query(
                f"SELECT {KEY_COLUMNS} FROM {self._t('tenant_api_keys')} WHERE tenant_id = @t "
                "ORDER BY created_at DESC, key_id DESC",
                t=tenant_id,
            )
        )
        return [key_from_row(row) for row in rows]

    async def create_api_key(self, key: ApiKeyRecord, audit: AuditRecord) -> None:
        script = f"""
            BEGIN TRANSACTION;
            {self._insert_key_sql("k_")}
            {self._insert_audit_sql("a_")}
            COMMIT TRANSACTION;
        """
        params = {**_key_params(key, "k_"), **_audit_params([audit], "a_")}
        await self._call(lambda: self._transaction(script, params))

    async def revoke_api_key(
        self,
        tenant_id: str,
        key_id: str,
        now: datetime,
        audit: AuditRecord,
        keep_one: bool = True,
    ) -> ApiKeyRecord | None:
        keys = self._t("tenant_api_keys")
        another = f"""
              AND EXISTS (SELECT 1 FROM {keys} AS other
                          WHERE other.tenant_id = @tenant_id AND other.key_id != @key_id
                            AND other.revoked_at IS NULL
                            AND IFNULL(other.scope, 'FULL') != 'READ_ONLY'
                            AND (other.expires_at IS NULL OR other.expires_at > @now))"""
        script = f"""
            DECLARE changed BOOL DEFAULT FALSE;
            BEGIN TRANSACTION;
            UPDATE {keys} SET revoked_at = @now, changed_at = CURRENT_TIMESTAMP()
            WHERE key_id = @key_id AND tenant_id = @tenant_id AND revoked_at IS NULL
              {another if keep_one else ""};
            SET changed = @@row_count > 0;
            IF changed THEN
              {self._insert_audit_sql("a_")}
            END IF;
            COMMIT TRANSACTION;
            SELECT {KEY_COLUMNS} FROM {keys} WHERE key_id = @key_id AND tenant_id = @tenant_id;
        """
        params = {
            "key_id": key_id,
            "tenant_id": tenant_id,
            "now": now,
            **_audit_params([audit], "a_"),
        }
        rows = await self._call(lambda: self._transaction(script, params))
        return key_from_row(rows[0]) if rows else None

    async def rotate_api_key(
        self,
        tenant_id: str,
        key_id: str,
        new_key: ApiKeyRecord,
        grace_until: datetime,
        audit: AuditRecord,
    ) -> ApiKeyRecord | None:
        keys = self._t("tenant_api_keys")
        script = f"""
            DECLARE changed BOOL DEFAULT FALSE;
            BEGIN TRANSACTION;
            UPDATE {keys} SET replaced_by = @k_key_id, changed_at = CURRENT_TIMESTAMP(),
              expires_at = LEAST(COALESCE(expires_at, @grace_until), @grace_until)
            WHERE key_id = @key_id AND tenant_id = @tenant_id AND revoked_at IS NULL
              AND replaced_by IS NULL AND (expires_at IS NULL OR expires_at > @k_created_at);
            SET changed = @@row_count > 0;
            IF changed THEN
              {self._insert_key_sql("k_")}
              {self._insert_audit_sql("a_")}
            END IF;
            COMMIT TRANSACTION;
            SELECT {KEY_COLUMNS} FROM {keys} WHERE key_id = @key_id AND tenant_id = @tenant_id;
        """
        params = {
            "key_id": key_id,
            "tenant_id": tenant_id,
            "grace_until": grace_until,
            **_key_params(new_key, "k_"),
            **_audit_params([audit], "a_"),
        }
        rows = await self._call(lambda: self._transaction(script, params))
        return key_from_row(rows[0]) if rows else None

    async def record_key_use(self, uses: dict[str, datetime]) -> None:
        if not uses:
            return
        sql = (
            f"UPDATE {self._t('tenant_api_keys')} AS k SET last_used_at = u.used_at "
            "FROM (SELECT key_id, TIMESTAMP_MICROS(CAST(@times[OFFSET(i)] AS INT64)) AS used_at "
            "FROM UNNEST(@ids) AS key_id WITH OFFSET AS i) AS u "
            "WHERE k.key_id = u.key_id AND (k.last_used_at IS NULL OR k.last_used_at < u.used_at)"
        )
        params = {"ids": list(uses), "times": [str(_micros(t)) for t in uses.values()]}
        # One statement, safe to run again: it conflicts with a key's change (the same
        # table) and then waits its turn like one.
        await self._call(lambda: self._transaction(sql, params))

    async def changed_api_keys(self, since: datetime | None) -> tuple[list[str], datetime]:
        if since is None:
            rows = await self._call(lambda: self._query("SELECT CURRENT_TIMESTAMP()"))
            return [], rows[0][0]
        rows = await self._call(
            lambda: self._query(
                f"SELECT ARRAY(SELECT key_id FROM {self._t('tenant_api_keys')} "
                "WHERE changed_at >= @since), CURRENT_TIMESTAMP()",
                since=since,
            )
        )
        return list(rows[0][0] or []), rows[0][1]

    async def add_audit(self, records: list[AuditRecord]) -> None:
        if records:
            sql, params = self._insert_audit_sql(""), _audit_params(records, "")
            await self._call(lambda: self._bq.query(sql, params))

    async def list_audit(
        self, where: AuditFilter, after: tuple[datetime, str] | None, limit: int
    ) -> list[AuditRecord]:
        conditions = ["tenant_id = @tenant_id"]
        params: dict[str, Any] = {"tenant_id": where.tenant_id}
        if where.events:
            conditions.append("event IN UNNEST(@events)")
            params["events"] = sorted(where.events)
        if where.start is not None:
            conditions.append("event_time >= @start")
            params["start"] = where.start
        if where.end is not None:
            conditions.append("event_time < @end")
            params["end"] = where.end
        if after is not None:
            conditions.append(
                "(event_time < @after_at OR (event_time = @after_at AND event_id < @after_id))"
            )
            params.update(after_at=after[0], after_id=after[1])
        sql = (
            f"SELECT {AUDIT_COLUMNS} FROM {self._t(schema.TENANT_AUDIT_LOG.name)} "
            f"WHERE {' AND '.join(conditions)} "
            f"ORDER BY event_time DESC, event_id DESC LIMIT {int(limit)}"
        )
        rows = await self._call(lambda: self._bq.query(sql, params))
        return [audit_from_row(r) for r in rows]

    # -- webhooks ---------------------------------------------------------------------------

    async def get_webhook(self, tenant_id: str) -> WebhookRecord | None:
        rows = await self._call(
            lambda: self._query(
                f"SELECT {WEBHOOK_COLUMNS} FROM {self._t(schema.TENANT_WEBHOOKS.name)} "
                "WHERE tenant_id = @t ORDER BY updated_at DESC, secret_id DESC LIMIT 1",
                t=tenant_id,
            )
        )
        found = webhook_from_row(rows[0]) if rows else None
        return None if found is None or found.deleted else found

    async def save_webhook(self, webhook: WebhookRecord, audit: AuditRecord) -> None:
        script = f"""
            BEGIN TRANSACTION;
            INSERT INTO {self._t(schema.TENANT_WEBHOOKS.name)} ({WEBHOOK_COLUMNS})
            VALUES (@w_tenant_id, @w_url, @w_secret_id, @w_updated_at, @w_updated_by,
                    @w_deleted);
            {self._insert_audit_sql("a_")}
            COMMIT TRANSACTION;
        """
        values = _typed(
            schema.TENANT_WEBHOOKS,
            {
                "tenant_id": webhook.tenant_id,
                "url": webhook.url,
                "secret_id": webhook.secret_id,
                "updated_at": webhook.updated_at,
                "updated_by": webhook.updated_by or None,
                "deleted": webhook.deleted,
            },
        )
        params = {**{f"w_{k}": v for k, v in values.items()}, **_audit_params([audit], "a_")}
        await self._call(lambda: self._transaction(script, params))

    async def update_plan(self, tenant_id: str, plan: str, now: datetime) -> bool:
        def update() -> bool:
            job = self._bq.job(
                f"UPDATE {self._t('tenant_profiles')} SET subscription_plan = @plan, "
                "updated_at = @now WHERE tenant_id = @t",
                {"plan": plan, "now": now, "t": tenant_id},
            )
            return bool(job.num_dml_affected_rows)

        return await self._call(update)

    # -- team members -----------------------------------------------------------------------

    async def admit_member(
        self, tenant_id: str, user_id: str, team_size: int, now: datetime
    ) -> tuple[bool, int]:
        members = self._t("tenant_members")
        rows = await self._call(
            lambda: self._transaction(
                f"""
                DECLARE known INT64;
                DECLARE total INT64;
                BEGIN TRANSACTION;
                UPDATE {self._counters(tenant_id)} SET seq = seq + 1, updated_at = @now
                WHERE TRUE;
                SET known = (SELECT COUNT(*) FROM {members}
                             WHERE tenant_id = @tenant_id AND user_id = @user_id);
                SET total = (SELECT COUNT(*) FROM {members} WHERE tenant_id = @tenant_id);
                IF known = 0 AND total < @team_size THEN
                  INSERT INTO {members} (tenant_id, user_id, first_seen_at)
                  VALUES (@tenant_id, @user_id, @now);
                  SET known = 1;
                  SET total = total + 1;
                END IF;
                COMMIT TRANSACTION;
                SELECT known, total;
                """,
                {"tenant_id": tenant_id, "user_id": user_id, "team_size": team_size, "now": now},
            )
        )
        return bool(rows[0][0]), int(rows[0][1])

    async def list_members(self, tenant_id: str) -> list[MemberRecord]:
        rows = await self._call(
            lambda: self._query(
                "SELECT tenant_id, user_id, first_seen_at "
                f"FROM {self._t('tenant_members')} WHERE tenant_id = @t ORDER BY user_id",
                t=tenant_id,
            )
        )
        return [MemberRecord(*row) for row in rows]

    async def remove_member(self, tenant_id: str, user_id: str) -> bool:
        def remove() -> bool:
            job = self._bq.job(
                f"DELETE FROM {self._t('tenant_members')} WHERE tenant_id = @t AND user_id = @u",
                {"t": tenant_id, "u": user_id},
            )
            return bool(job.num_dml_affected_rows)

        return await self._call(remove)

    # -- schedules --------------------------------------------------------------------------

    def _insert_schedule_sql(self, prefix: str = "") -> str:
        """Appends the schedule of the `_schedule_params` (named with `prefix`) as its
        newest version."""
        values = [
            f"PARSE_JSON(@{prefix}parameters)" if name == "parameters" else f"@{prefix}{name}"
            for name in SCHEDULE_NAMES
        ]
        return (
            f"INSERT INTO {self._t(SCHEDULE_EVENTS.name)} ({SCHEDULE_COLUMNS}, recorded_at) "
            f"VALUES ({', '.join(values)}, CURRENT_TIMESTAMP());"
        )

    async def create_schedule(self, schedule: ScheduleRecord, max_schedules: int) -> int:
        latest = self._latest_schedules_sql("tenant_id = @tenant_id")
        script = f"""
            DECLARE next_seq INT64;
            DECLARE schedules INT64;
            BEGIN TRANSACTION;
            {self._next_seq_sql(schedule.tenant_id)}
            SET schedules = (SELECT COUNT(*) FROM ({latest}) WHERE NOT deleted);
            IF schedules < @max_schedules THEN
              {self._insert_schedule_sql()}
            END IF;
            COMMIT TRANSACTION;
            SELECT schedules;
        """
        params = {**_schedule_params(schedule), "max_schedules": max_schedules}
        rows = await self._call(lambda: self._transaction(script, params))
        return int(rows[0][0])

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> ScheduleRecord | None:
        found = await self._schedules(
            "tenant_id = @tenant_id AND schedule_id = @schedule_id",
            {"tenant_id": tenant_id, "schedule_id": schedule_id},
        )
        return found[0] if found else None

    async def list_schedules(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[ScheduleRecord]:
        params: dict[str, Any] = {"tenant_id": tenant_id}
        then = "TRUE"
        if after is not None:
            then = (
                "(created_at > @after_at OR (created_at = @after_at AND schedule_id > @after_id))"
            )
            params.update(after_at=after[0], after_id=after[1])
        return await self._schedules(
            "tenant_id = @tenant_id", params, then, "created_at, schedule_id", limit
        )

    async def save_schedule(self, schedule: ScheduleRecord, skip: SkipRecord | None = None) -> bool:
        skip_sql = (
            f"""
              INSERT INTO {self._t(schema.TENANT_SCHEDULE_SKIPS.name)}
                (schedule_id, tenant_id, first_slot, last_slot, slot_count, reason, recorded_at)
              VALUES (@skip_schedule_id, @skip_tenant_id, @skip_first_slot, @skip_last_slot,
                      @skip_slot_count, @skip_reason, @skip_recorded_at);"""
            if skip is not None
            else ""
        )
        # The newest version is read in the transaction that takes the tenant's sequence:
        # a concurrent change of the tenant commits before it (and is seen) or conflicts.
        script = f"""
            DECLARE next_seq INT64;
            DECLARE from_newest BOOL;
            BEGIN TRANSACTION;
            {self._next_seq_sql(schedule.tenant_id)}
            SET from_newest = IFNULL((
              SELECT MAX(version) FROM {self._t(SCHEDULE_EVENTS.name)}
              WHERE tenant_id = @tenant_id AND schedule_id = @schedule_id) = @version - 1, FALSE);
            IF from_newest THEN
              {self._insert_schedule_sql()}
              {skip_sql}
            END IF;
            COMMIT TRANSACTION;
            SELECT from_newest;
        """
        params = _schedule_params(schedule)
        if skip is not None:
            params.update(
                skip_schedule_id=skip.schedule_id,
                skip_tenant_id=skip.tenant_id,
                skip_first_slot=skip.first_slot,
                skip_last_slot=skip.last_slot,
                skip_slot_count=skip.slot_count,
                skip_reason=skip.reason,
                skip_recorded_at=skip.recorded_at,
            )
        rows = await self._call(lambda: self._transaction(script, params))
        return bool(rows[0][0])

    async def due_schedules(
        self,
        tenant_id: str | None,
        now: datetime,
        limit: int,
        after: tuple[str, datetime, str] | None = None,
        paused: bool = True,
    ) -> list[ScheduleRecord]:
        params: dict[str, Any] = {"now": now}
        within = "TRUE"
        if tenant_id is not None:
            within = "tenant_id = @tenant_id"
            params["tenant_id"] = tenant_id
        then = "(next_slot <= @now OR backfill_left > 0)"
        if not paused:
            then += " AND NOT paused"
        if after is not None:
            then += (
                " AND (tenant_id > @after_tenant OR (tenant_id = @after_tenant AND"
                " (created_at > @after_at OR"
                " (created_at = @after_at AND schedule_id > @after_id))))"
            )
            params.update(after_tenant=after[0], after_at=after[1], after_id=after[2])
        return await self._schedules(
            within, params, then, "tenant_id, created_at, schedule_id", limit
        )

    async def _schedules(
        self,
        within: str,
        params: Mapping[str, Any],
        then: str = "TRUE",
        order: str = "",
        limit: int | None = None,
    ) -> list[ScheduleRecord]:
        """The newest versions of the schedules `within` selects (by tenant or id) that are
        not deleted and pass `then`."""
        sql = (
            f"SELECT {SELECT_SCHEDULE} FROM ({self._latest_schedules_sql(within)}) "
            f"WHERE NOT deleted AND {then}"
        )
        if order:
            sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = await self._call(lambda: self._bq.query(sql, params))
        return [schedule_from_row(row) for row in rows]

    # -- runs: admission --------------------------------------------------------------------

    async def create_run(
        self,
        run: RunRecord,
        keys_valid_from: datetime,
        limits: RunLimits | None = None,
        progress: ScheduleRecord | None = None,
    ) -> Admission:
        day = run.created_at.astimezone(UTC).date()
        counters, keys = self._counters(run.tenant_id), self._t("tenant_idempotency_keys")
        values = {c: f"@{c}" for c in RUN_EVENT_NAMES}
        values.update(
            event_seq="next_seq",
            event="'created'",
            event_time="CURRENT_TIMESTAMP()",
            parameters="PARSE_JSON(@parameters)",
            usage_day="@day",
            active_after="active_now + 1",
            daily_limit="IF(@limited, @daily_limit, NULL)",
            concurrent_limit="IF(@limited, @concurrent_limit, NULL)",
        )
        # Idempotency keys are only appended: the newest row of a key is its state.
        script = f"""
            DECLARE next_seq INT64;
            DECLARE active_now INT64;
            DECLARE created_today INT64;
            DECLARE existing_run STRING;
            DECLARE outcome STRING DEFAULT 'created';
            DECLARE progressed BOOL DEFAULT FALSE;
            DECLARE fresh BOOL DEFAULT TRUE;
            BEGIN TRANSACTION;
            {self._next_seq_sql(run.tenant_id)}
            {self._fresh_sql() if progress is not None else ""}
            SET active_now = (SELECT active_runs FROM {counters});
            SET created_today = (SELECT IF(runs_day = @day, runs_today, 0) FROM {counters});
            IF @idempotency_key != '' THEN
              SET existing_run = (
                SELECT k.pipeline_logging_id FROM (
                  SELECT * FROM {keys}
                  WHERE tenant_id = @tenant_id AND idempotency_key = @idempotency_key
                  ORDER BY created_at DESC LIMIT 1) AS k
                WHERE k.created_at >= @keys_valid_from
                  AND EXISTS (SELECT 1 FROM {self._t(RUN_EVENTS.name)} AS e
                              WHERE e.tenant_id = @tenant_id
                                AND e.pipeline_logging_id = k.pipeline_logging_id));
            END IF;
            IF existing_run IS NOT NULL THEN
              SET outcome = 'existing';
            ELSEIF @limited AND created_today >= @daily_limit THEN
              SET outcome = 'daily';
            ELSEIF @limited AND active_now >= @concurrent_limit THEN
              SET outcome = 'concurrent';
            ELSEIF NOT fresh THEN
              SET outcome = 'stale';
            ELSE
              IF @idempotency_key != '' THEN
                INSERT INTO {keys} (tenant_id, idempotency_key, pipeline_logging_id, created_at)
                VALUES (@tenant_id, @idempotency_key, @pipeline_logging_id, @created_at);
              END IF;
              INSERT INTO {self._t(RUN_EVENTS.name)} ({", ".join(RUN_EVENT_NAMES)})
              VALUES ({", ".join(values.values())});
              UPDATE {counters} SET active_runs = active_runs + 1,
                runs_today = IF(runs_day = @day, runs_today + 1, 1), runs_day = @day
              WHERE TRUE;
            END IF;
            {self._progress_sql() if progress is not None else ""}
            COMMIT TRANSACTION;
            SELECT outcome, existing_run, created_today, active_now, progressed;
        """
        params = _run_params(run)
        params.update(
            day=day,
            keys_valid_from=keys_valid_from,
            limited=limits is not None,
            daily_limit=limits.daily if limits else 0,
            concurrent_limit=limits.concurrent if limits else 0,
            now=run.created_at,
        )
        if progress is not None:
            params.update({f"s_{k}": v for k, v in _schedule_params(progress).items()})
        rows = await self._call(lambda: self._transaction(script, params))
        outcome, existing, today, active, progressed = rows[0]
        if outcome == "existing":
            found = await self.get_run(run.tenant_id, existing)
            return Admission(found, created=False, progressed=bool(progressed))
        if outcome == "daily":
            return Admission(None, created=False, refused="daily", used=int(today))
        if outcome in ("concurrent", "stale"):
            return Admission(None, created=False, refused=outcome, used=int(active))
        return Admission(run, created=True, progressed=bool(progressed))

    def _fresh_sql(self) -> str:
        """In an admission's transaction: whether the schedule of the `s_` parameters was
        made from the stored version (a new run is admitted only from a fresh reading)."""
        return f"""
            SET fresh = IFNULL((
              SELECT MAX(version) FROM {self._t(SCHEDULE_EVENTS.name)}
              WHERE tenant_id = @s_tenant_id AND schedule_id = @s_schedule_id)
              = @s_version - 1, FALSE);
        """

    def _progress_sql(self) -> str:
        """In an admission's transaction: the schedule of the `s_` parameters, written as
        `save_schedule` writes it, unless the run was refused or the reading was stale."""
        return f"""
            IF outcome IN ('created', 'existing') AND fresh THEN
              {self._insert_schedule_sql("s_")}
              SET progressed = TRUE;
            END IF;
        """

    def _counters(self, tenant_id: str) -> str:
        """The tenant's own counters table (one row)."""
        quote_identifier(tenant_id)
        return self._t(f"{COUNTERS.name}_{tenant_id}")

    def _next_seq_sql(self, tenant_id: str) -> str:
        """The statements that take the tenant's next sequence number into `next_seq`; the
        UPDATE is what makes two transactions of one tenant conflict (and only those: the
        table is the tenant's own)."""
        counters = self._counters(tenant_id)
        return f"""
            UPDATE {counters} SET seq = seq + 1, updated_at = CURRENT_TIMESTAMP() WHERE TRUE;
            SET next_seq = (SELECT seq FROM {counters});
        """

    def _usage_view_sql(self) -> str:
        """`tenant_usage_quotas` from the `created` and `finished` events, row for row what
        the embedded store keeps in a table: a day's row counts the runs created that day
        and how those ended; its concurrency is the tenant's after the day's last change,
        its peak the highest after any; its limits those of the last admission so far."""
        events = self._t(RUN_EVENTS.name)
        return f"""
            CREATE OR REPLACE VIEW {self._t(schema.TENANT_USAGE_QUOTAS.name)} AS
            WITH touches AS (
              SELECT tenant_id, usage_day, event, event_seq, event_time, active_after,
                LAST_VALUE(daily_limit IGNORE NULLS) OVER so_far AS daily_limit,
                LAST_VALUE(concurrent_limit IGNORE NULLS) OVER so_far AS concurrent_limit
              FROM {events}
              WHERE event IN ('created', 'finished')
              WINDOW so_far AS (PARTITION BY tenant_id ORDER BY event_seq
                                ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
            ),
            last_touch AS (
              SELECT * FROM touches WHERE TRUE
              QUALIFY ROW_NUMBER() OVER (
                PARTITION BY tenant_id, usage_day ORDER BY event_seq DESC) = 1
            ),
            days AS (
              SELECT tenant_id, usage_day, COUNTIF(event = 'created') AS runs,
                     MAX(active_after) AS peak, MAX(event_time) AS updated_at
              FROM touches GROUP BY tenant_id, usage_day
            ),
            ends AS (
              SELECT tenant_id, DATE(created_at) AS created_day,
                     COUNTIF(status = 'COMPLETE') AS ok, COUNTIF(status != 'COMPLETE') AS bad
              FROM {events} WHERE event = 'finished'
              GROUP BY tenant_id, created_day
            )
            SELECT d.tenant_id, d.usage_day AS usage_date,
                   d.runs AS pipelines_run_today,
                   IFNULL(e.ok, 0) AS pipelines_succeeded_today,
                   IFNULL(e.bad, 0) AS pipelines_failed_today,
                   l.active_after AS concurrent_pipelines_running,
                   d.peak AS max_concurrent_reached,
                   IFNULL(l.daily_limit, 0) AS daily_limit,
                   IFNULL(l.concurrent_limit, 0) AS concurrent_limit,
                   d.updated_at
            FROM days AS d
            JOIN last_touch AS l ON l.tenant_id = d.tenant_id AND l.usage_day = d.usage_day
            LEFT JOIN ends AS e ON e.tenant_id = d.tenant_id AND e.created_day = d.usage_day
        """

    async def get_usage(self, tenant_id: str, day: date) -> UsageRecord | None:
        rows = await self._call(
            lambda: self._query(
                "SELECT tenant_id, usage_date, pipelines_run_today, pipelines_succeeded_today, "
                "pipelines_failed_today, concurrent_pipelines_running, max_concurrent_reached, "
                f"daily_limit, concurrent_limit FROM {self._t('tenant_usage_quotas')} "
                "WHERE tenant_id = @t AND usage_date = @d",
                t=tenant_id,
                d=day,
            )
        )
        return UsageRecord(*rows[0]) if rows else None

    async def active_runs(self, tenant_id: str) -> int:
        def active() -> int:
            try:
                rows = self._query(f"SELECT active_runs FROM {self._counters(tenant_id)}")
            except api_exceptions.NotFound:  # no such tenant
                return 0
            return int(rows[0][0]) if rows else 0

        return await self._call(active)

    async def typical_run_ms(self, tenant_id: str) -> int | None:
        rows = await self._call(
            lambda: self._query(
                f"SELECT duration_ms FROM {self._t('tenant_pipeline_runs')} "
                "WHERE tenant_id = @t AND status IN ('COMPLETE', 'FAILED') "
                "AND start_time IS NOT NULL ORDER BY end_time DESC LIMIT 20",
                t=tenant_id,
            )
        )
        durations = [row[0] for row in rows if row[0] is not None]
        return int(statistics.median(durations)) if durations else None

    # -- runs: reading ----------------------------------------------------------------------

    async def get_run(self, tenant_id: str, run_id: str) -> RunRecord | None:
        rows = await self._call(
            lambda: self._query(
                f"SELECT {SELECT_RUN} FROM {self._t('tenant_pipeline_runs')} "
                "WHERE pipeline_logging_id = @id AND tenant_id = @t",
                id=run_id,
                t=tenant_id,
            )
        )
        return run_from_row(rows[0]) if rows else None

    async def list_runs(
        self, where: RunFilter, after: RunCursor | None, limit: int
    ) -> list[RunRecord]:
        conditions = ["tenant_id = @tenant_id"]
        params: dict[str, Any] = {"tenant_id": where.tenant_id}
        if where.status:
            conditions.append("status = @status")
            params["status"] = where.status
        if where.pipeline_id:
            conditions.append("pipeline_id = @pipeline_id")
            params["pipeline_id"] = where.pipeline_id
        if where.created_from:
            conditions.append("created_at >= @created_from")
            params["created_from"] = where.created_from
        if where.created_before:
            conditions.append("created_at < @created_before")
            params["created_before"] = where.created_before
        if after is not None:
            conditions.append(
                "(created_at < @after_at OR (created_at = @after_at AND pipeline_logging_id < "
                "@after_id))"
            )
            params.update(after_at=after.created_at, after_id=after.pipeline_logging_id)
        sql = (
            f"SELECT {SELECT_RUN} FROM {self._t('tenant_pipeline_runs')} "
            f"WHERE {' AND '.join(conditions)} "
            f"ORDER BY created_at DESC, pipeline_logging_id DESC LIMIT {int(limit)}"
        )
        rows = await self._call(lambda: self._bq.query(sql, params))
        return [run_from_row(row) for row in rows]

    async def cancel_requested(self, run_id: str) -> bool:
        latest = self._latest_events_sql("pipeline_logging_id = @id")
        rows = await self._call(
            lambda: self._query(f"SELECT cancel_requested FROM ({latest})", id=run_id)
        )
        return bool(rows and rows[0][0])

    async def pending_runs(self) -> tuple[int, datetime | None]:
        rows = await self._call(
            lambda: self._query(
                f"SELECT COUNT(*), MIN(created_at) FROM {self._t('tenant_pipeline_runs')} "
                "WHERE status = 'PENDING'"
            )
        )
        return int(rows[0][0]), rows[0][1]

    async def stale_runs(self, stale_before: datetime) -> list[RunRecord]:
        rows = await self._call(
            lambda: self._query(
                f"SELECT {SELECT_RUN} FROM {self._t('tenant_pipeline_runs')} "
                "WHERE status = 'RUNNING' AND (heartbeat_at IS NULL OR heartbeat_at < @before) "
                "ORDER BY created_at",
                before=stale_before,
            )
        )
        return [run_from_row(row) for row in rows]

    # -- runs: state changes ----------------------------------------------------------------

    def _change(
        self,
        run: RunRecord,
        event: str,
        guard: str,
        changes: Mapping[str, str],
        params: Mapping[str, Any],
        then: str = "",
        before: str = "",
    ) -> RunRecord | None:
        """Appends the run's next state if its newest one passes `guard`, and runs `then`
        in the same transaction (and `before`, first, whether or not the guard passes);
        returns the new state, or None when the guard failed."""
        # The usage columns are set only by the changes the usage view counts.
        unset = {c: f"CAST(NULL AS {t})" for c, t in USAGE_COLUMNS.items()}
        values = [{**unset, **changes}.get(c, c) for c in RUN_EVENT_NAMES]
        values[RUN_EVENT_NAMES.index("event_seq")] = "next_seq"
        values[RUN_EVENT_NAMES.index("event")] = f"'{event}'"
        values[RUN_EVENT_NAMES.index("event_time")] = "CURRENT_TIMESTAMP()"
        latest = self._latest_events_sql("pipeline_logging_id = @run_id AND tenant_id = @tenant_id")
        then_block = (
            f"""
            SET changed = EXISTS (SELECT 1 FROM {self._t(RUN_EVENTS.name)}
                                  WHERE pipeline_logging_id = @run_id AND event_seq = next_seq);
            IF changed THEN {then} END IF;"""
            if then
            else ""
        )
        script = f"""
            DECLARE next_seq INT64;
            DECLARE changed BOOL;
            BEGIN TRANSACTION;
            {self._next_seq_sql(run.tenant_id)}
            {before}
            INSERT INTO {self._t(RUN_EVENTS.name)} ({", ".join(RUN_EVENT_NAMES)})
            SELECT {", ".join(values)} FROM ({latest}) WHERE {guard};
            {then_block}
            COMMIT TRANSACTION;
            SELECT {SELECT_RUN} FROM {self._t(RUN_EVENTS.name)}
            WHERE pipeline_logging_id = @run_id AND event_seq = next_seq;
        """
        rows = self._transaction(
            script,
            {"run_id": run.pipeline_logging_id, "tenant_id": run.tenant_id, **params},
        )
        return run_from_row(rows[0]) if rows else None

    async def claim_next_run(self, worker_id: str, now: datetime) -> RunRecord | None:
        def claim() -> RunRecord | None:
            # The head of the fair queue, then the runs the queue would give after it: a
            # run another replica claims first fails the guard below, and the next is tried.
            waiting = self._query(
                FAIR_QUEUE.format(columns=SELECT_RUN, runs=f"({self._latest_events_sql()})")
                + " LIMIT 10"
            )
            for row in waiting:
                claimed = self._change(
                    run_from_row(row),
                    "claimed",
                    "status = 'PENDING'",
                    {
                        "status": "'RUNNING'",
                        "start_time": "@now",
                        "worker_id": "@worker_id",
                        # BigQuery's clock, as for the heartbeats that follow: a claim
                        # that waited on conflicts does not start out stale.
                        "heartbeat_at": "CURRENT_TIMESTAMP()",
                    },
                    {"now": now, "worker_id": worker_id},
                )
                if claimed is not None:
                    return claimed
            return None

        return await self._call(claim)

    async def finish_run(
        self, run: RunRecord, status: str, now: datetime, error_message: str = ""
    ) -> RunRecord | None:
        return await self._call(lambda: self._finish(run, status, now, error_message, owned=True))

    def _finish(
        self, run: RunRecord, status: str, now: datetime, error_message: str, owned: bool
    ) -> RunRecord | None:
        """Ends the run: RUNNING for the same worker and attempt when `owned`, else PENDING.

        The `finished` event counts (in the usage view) as a success or failure of the day
        the run was created, and sets today's concurrency, as the embedded store does."""
        counters = self._counters(run.tenant_id)
        then = f"""
            UPDATE {counters} SET active_runs = active_runs - 1 WHERE TRUE;
            {self._interrupt_steps_sql() if owned else ""}
        """
        return self._change(
            run,
            "finished",
            OWNER_GUARD if owned else "status = 'PENDING'",
            {
                "status": "@status",
                "end_time": "@now",
                "error_message": "NULLIF(@error_message, '')",
                "duration_ms": "IF(start_time IS NULL, 0, "
                "TIMESTAMP_DIFF(@now, start_time, MILLISECOND))",
                "usage_day": "@day",
                "active_after": f"(SELECT active_runs - 1 FROM {counters})",
            },
            {
                "status": status,
                "now": now,
                "error_message": error_message,
                "worker_id": run.worker_id,
                "attempt": run.attempt,
                "day": now.astimezone(UTC).date(),
            },
            then,
        )

    def _interrupt_steps_sql(self) -> str:
        """Closes step rows left RUNNING by an execution that ended without finishing them."""
        columns = [
            {
                "status": "'FAILED'",
                "step_end_time": "@now",
                "error_message": f"'{INTERRUPTED}'",
                "recorded_at": "CURRENT_TIMESTAMP()",
            }.get(c, c)
            for c in STEP_EVENT_NAMES
        ]
        return f"""
            INSERT INTO {self._t(STEP_EVENTS.name)} ({", ".join(STEP_EVENT_NAMES)})
            SELECT {", ".join(columns)}
            FROM ({self._latest_steps_sql("pipeline_logging_id = @run_id")})
            WHERE status = 'RUNNING';
        """

    async def request_cancel(self, tenant_id: str, run_id: str, now: datetime) -> RunRecord | None:
        run = await self.get_run(tenant_id, run_id)
        if run is None:
            return None

        def cancel() -> None:
            if self._finish(run, "FAILED", now, "Cancelled before it started", owned=False):
                return
            self._change(
                run,
                "cancel_requested",
                "status = 'RUNNING'",
                {"cancel_requested": "TRUE"},
                {},
            )

        await self._call(cancel)
        return await self.get_run(tenant_id, run_id)

    async def heartbeat(self, run_ids: list[str], worker_id: str) -> None:
        if not run_ids:
            return
        await self._call(
            lambda: self._bq.job(
                f"INSERT INTO {self._t(HEARTBEATS.name)} (pipeline_logging_id, worker_id, beat_at) "
                "SELECT id, @worker_id, CURRENT_TIMESTAMP() FROM UNNEST(@ids) AS id",
                {"worker_id": worker_id, "ids": list(run_ids)},
            )
        )

    async def requeue_run(self, run: RunRecord, now: datetime, count_attempt: bool) -> bool:
        requeued = await self._call(
            lambda: self._change(
                run,
                "requeued",
                OWNER_GUARD,
                {
                    "status": "'PENDING'",
                    "attempt": "attempt + @extra",
                    "start_time": "CAST(NULL AS TIMESTAMP)",
                    "worker_id": "CAST(NULL AS STRING)",
                    "heartbeat_at": "CAST(NULL AS TIMESTAMP)",
                    "warnings": "0",
                },
                {
                    "worker_id": run.worker_id,
                    "attempt": run.attempt,
                    "extra": int(count_attempt),
                    "now": now,
                },
                self._interrupt_steps_sql(),
            )
        )
        return requeued is not None

    async def published(self, run_id: str) -> bool:
        rows = await self._call(
            lambda: self._query(
                f"SELECT COUNT(*) FROM {self._t(schema.TENANT_RUN_PUBLICATIONS.name)} "
                "WHERE pipeline_logging_id = @id",
                id=run_id,
            )
        )
        return bool(rows and rows[0][0])

    async def write_failure(self) -> str | None:
        return None  # BigQuery's failures surface per call, as Unavailable

    def _publish(self, run: RunRecord, statements: list[str], params: Mapping[str, Any]) -> bool:
        """The publishing transaction (see `Warehouse.publish`), blocking: the staged
        writes and the publication record commit together, only while the run is RUNNING
        for this worker and attempt. It takes the tenant's sequence like every run change,
        so it conflicts with (and is ordered against) a concurrent claim or requeue: a
        replica whose lease ran out cannot publish next to the one that took the run over."""
        publications = self._t(schema.TENANT_RUN_PUBLICATIONS.name)
        latest = self._latest_events_sql("pipeline_logging_id = @run_id AND tenant_id = @tenant_id")
        body = "\n".join(statements)
        script = f"""
            DECLARE next_seq INT64;
            DECLARE owned BOOL;
            BEGIN TRANSACTION;
            {self._next_seq_sql(run.tenant_id)}
            SET owned = EXISTS (SELECT 1 FROM ({latest}) WHERE {OWNER_GUARD})
              AND NOT EXISTS (SELECT 1 FROM {publications} WHERE pipeline_logging_id = @run_id);
            IF owned THEN
              INSERT INTO {publications}
                (pipeline_logging_id, tenant_id, run_attempt, worker_id, published_at)
              VALUES (@run_id, @tenant_id, @attempt, @worker_id, CURRENT_TIMESTAMP());
              {body}
            END IF;
            COMMIT TRANSACTION;
            SELECT owned OR EXISTS (
              SELECT 1 FROM {publications} WHERE pipeline_logging_id = @run_id
                AND run_attempt = @attempt AND worker_id = @worker_id);
        """
        rows = self._transaction(
            script,
            {
                **params,
                "run_id": run.pipeline_logging_id,
                "tenant_id": run.tenant_id,
                "worker_id": run.worker_id,
                "attempt": run.attempt,
            },
            self._pipelines,
            PUBLISH_TIMEOUT,
        )
        return bool(rows and rows[0][0])

    # -- steps and data quality -------------------------------------------------------------

    async def save_step(self, step: StepRecord) -> None:
        names = STEP_COLUMNS.split(", ")
        await self._call(
            lambda: self._bq.query(
                f"INSERT INTO {self._t(STEP_EVENTS.name)} ({STEP_COLUMNS}, recorded_at) "
                f"VALUES ({', '.join('@' + n for n in names)}, CURRENT_TIMESTAMP())",
                _typed(
                    schema.TENANT_STEP_LOGS,
                    {
                        **{n: getattr(step, n) for n in names},
                        "error_message": step.error_message or None,
                    },
                ),
            )
        )

    async def list_steps(self, tenant_id: str, run_id: str) -> list[StepRecord]:
        rows = await self._call(
            lambda: self._query(
                f"SELECT {STEP_COLUMNS} FROM {self._t('tenant_step_logs')} "
                "WHERE tenant_id = @t AND pipeline_logging_id = @id AND run_attempt = ("
                f"SELECT MAX(run_attempt) FROM {self._t(STEP_EVENTS.name)} "
                "WHERE tenant_id = @t AND pipeline_logging_id = @id) "
                "ORDER BY step_index, step_start_time",
                t=tenant_id,
                id=run_id,
            )
        )
        return [step_from_row(row) for row in rows]

    async def add_dq_results(self, run: RunRecord, results: list[DqRecord]) -> None:
        if not results:
            return
        names = DQ_COLUMNS.split(", ")
        params: dict[str, Any] = {}
        rows = []
        for i, result in enumerate(results):
            rows.append("(" + ", ".join(f"@{n}_{i}" for n in names) + ")")
            values = _typed(
                schema.TENANT_DQ_RESULTS, dict(zip(names, dq_values(result), strict=True))
            )
            params.update({f"{n}_{i}": v for n, v in values.items()})
        insert = (
            f"INSERT INTO {self._t(schema.TENANT_DQ_RESULTS.name)} ({DQ_COLUMNS}) "
            f"VALUES {', '.join(rows)};"
        )
        warnings = sum(r.warns for r in results)
        if not warnings:  # the run is unchanged: no need to take the tenant's sequence
            await self._call(lambda: self._bq.query(insert, params))
            return
        params.update(worker_id=run.worker_id, attempt=run.attempt, warnings=warnings)
        await self._call(
            lambda: self._change(
                run,
                "dq_checked",
                OWNER_GUARD,
                {"warnings": "IFNULL(warnings, 0) + @warnings"},
                params,
                before=insert,
            )
        )

    async def list_dq_results(self, tenant_id: str, run_id: str, attempt: int) -> list[DqRecord]:
        sql = DQ_OF_ATTEMPT.format(
            results=self._t(schema.TENANT_DQ_RESULTS.name), tenant="@t", run="@id", attempt="@a"
        )
        rows = await self._call(lambda: self._query(sql, t=tenant_id, id=run_id, a=attempt))
        return [dq_from_row(row) for row in rows]

    # -- pipelines --------------------------------------------------------------------------

    def warehouse(self, dataset: str) -> BigQueryWarehouse:
        return BigQueryWarehouse(
            self._pipelines,
            self.dataset_of(dataset),
            self._publish_locks.get(dataset),
            self._publish,
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


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch (a TIMESTAMP passed in an array of strings)."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def _key_params(key: ApiKeyRecord, prefix: str) -> dict[str, Any]:
    """The key's columns as the parameters of `_insert_key_sql`."""
    values = _typed(
        schema.TENANT_API_KEYS,
        {
            "key_id": key.key_id,
            "tenant_id": key.tenant_id,
            "salt": key.salt,
            "key_hash": key.key_hash,
            "created_at": key.created_at,
            "name": key.name,
            "scope": key.scope,
            "created_by": key.created_by,
            "expires_at": key.expires_at,
        },
    )
    return {f"{prefix}{name}": value for name, value in values.items()}


def _audit_params(records: Sequence[AuditRecord], prefix: str) -> dict[str, Any]:
    """The rows as the parameters of `_insert_audit_sql`: an array of strings per column."""
    columns: dict[str, list[str]] = {name: [] for name in AUDIT_NAMES}
    for r in records:
        for name, value in (
            ("event_id", r.event_id),
            ("tenant_id", r.tenant_id),
            ("event_time", str(_micros(r.event_time))),
            ("event", r.event),
            ("actor_key_id", r.actor_key_id),
            ("actor_user_id", r.actor_user_id),
            ("target", r.target),
            ("detail", r.detail),
            ("request_id", r.request_id),
            ("client_address", r.client_address),
            ("event_count", str(int(r.count))),
        ):
            columns[name].append(value)
    return {f"{prefix}{name}": values for name, values in columns.items()}


def _typed(table: schema.Table, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` as query parameters, a None being a NULL of its column's type (BigQuery
    does not put a NULL STRING into an INT64 or TIMESTAMP column)."""
    types = {c.name: c.type for c in table.columns}
    return {k: Null(types.get(k, "STRING")) if v is None else v for k, v in values.items()}


def _schedule_params(schedule: ScheduleRecord) -> dict[str, Any]:
    """The schedule's columns as query parameters of their names (parameters as JSON text)."""
    values = dict(zip(SCHEDULE_NAMES, schedule_values(schedule), strict=True))
    return _typed(schema.TENANT_SCHEDULES, values)


def _run_params(run: RunRecord) -> dict[str, Any]:
    return _typed(
        schema.TENANT_PIPELINE_RUNS,
        {
            "pipeline_logging_id": run.pipeline_logging_id,
            "pipeline_id": run.pipeline_id,
            "tenant_id": run.tenant_id,
            "status": run.status,
            "trigger_type": run.trigger_type,
            "trigger_by": run.trigger_by,
            "user_id": run.user_id or None,
            "parameters": json.dumps(run.parameters, sort_keys=True),
            "created_at": run.created_at,
            "start_time": run.start_time,
            "end_time": run.end_time,
            "duration_ms": run.duration_ms,
            "error_message": run.error_message or None,
            "provider": run.provider,
            "domain": run.domain,
            "template": run.template,
            "idempotency_key": run.idempotency_key,
            "attempt": run.attempt,
            "worker_id": run.worker_id or None,
            "heartbeat_at": None,
            "cancel_requested": run.cancel_requested,
            "warnings": run.warnings,
            "trace_id": run.trace_id or None,
        },
    )
