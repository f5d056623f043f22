"""The central dataset's tables and each tenant dataset's objects, independent of the backend.

Column types are BigQuery's names; each adapter maps them to its own. `MIGRATIONS` is the
versioned history of the central dataset: an adapter applies, in order, every migration
newer than the version it has recorded, so start-up is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

CENTRAL_DATASET = "tenants"


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # STRING, INT64, BOOL, TIMESTAMP, DATE, BYTES, JSON
    required: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    partition_by: str | None = None
    cluster_by: tuple[str, ...] = ()
    # BigQuery drops a day's partition this many days after it (None: kept).
    partition_expiration_days: int | None = None

    @property
    def column_names(self) -> frozenset[str]:
        return frozenset(column.name for column in self.columns)


def _req(name: str, type_: str) -> Column:
    return Column(name, type_, required=True)


TENANT_PROFILES = Table(
    "tenant_profiles",
    (
        _req("tenant_id", "STRING"),
        _req("company_name", "STRING"),
        _req("admin_email", "STRING"),
        _req("subscription_plan", "STRING"),
        _req("status", "STRING"),
        _req("created_at", "TIMESTAMP"),
        _req("updated_at", "TIMESTAMP"),
    ),
    primary_key=("tenant_id",),
)

TENANT_API_KEYS = Table(
    "tenant_api_keys",
    (
        _req("key_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("salt", "BYTES"),
        _req("key_hash", "BYTES"),
        _req("created_at", "TIMESTAMP"),
        Column("revoked_at", "TIMESTAMP"),
        # Since version 8: keys as a resource (name, scope, expiry, rotation, last use).
        Column("name", "STRING"),
        Column("scope", "STRING"),  # FULL (NULL in older rows) or READ_ONLY
        Column("created_by", "STRING"),
        Column("expires_at", "TIMESTAMP"),
        Column("replaced_by", "STRING"),
        Column("last_used_at", "TIMESTAMP"),
        # When the row last changed in a way that matters to authentication (revoked,
        # expiry moved): servers drop their cached copy of keys changed since they looked.
        Column("changed_at", "TIMESTAMP"),
    ),
    primary_key=("key_id",),
    cluster_by=("tenant_id",),
)

# What happened to a tenant's account and who did it; the service only ever appends rows.
# `quota.refused` and `auth.failed` are counted per minute (and per quota or key) into one
# row each (`event_count`).
TENANT_AUDIT_LOG = Table(
    "tenant_audit_log",
    (
        _req("event_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("event_time", "TIMESTAMP"),
        _req("event", "STRING"),
        Column("actor_key_id", "STRING"),
        Column("actor_user_id", "STRING"),
        Column("target", "STRING"),
        Column("detail", "STRING"),
        Column("request_id", "STRING"),
        Column("client_address", "STRING"),
        _req("event_count", "INT64"),
    ),
    primary_key=("event_id",),
    partition_by="event_time",
    cluster_by=("tenant_id", "event"),
)

TENANT_PIPELINE_RUNS = Table(
    "tenant_pipeline_runs",
    (
        _req("pipeline_logging_id", "STRING"),
        _req("pipeline_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("status", "STRING"),
        _req("trigger_type", "STRING"),
        Column("trigger_by", "STRING"),
        Column("user_id", "STRING"),
        Column("parameters", "JSON"),
        _req("created_at", "TIMESTAMP"),
        Column("start_time", "TIMESTAMP"),
        Column("end_time", "TIMESTAMP"),
        Column("duration_ms", "INT64"),
        Column("error_message", "STRING"),
        # Since version 2: what ran, idempotency, execution bookkeeping.
        Column("provider", "STRING"),
        Column("domain", "STRING"),
        Column("template", "STRING"),
        Column("idempotency_key", "STRING"),
        Column("attempt", "INT64"),
        Column("worker_id", "STRING"),
        Column("heartbeat_at", "TIMESTAMP"),
        Column("cancel_requested", "BOOL"),
        # Since version 7: the failed `warn` checks of the current attempt.
        Column("warnings", "INT64"),
        # Since version 9: the trace of the request that created the run (32 hex digits).
        Column("trace_id", "STRING"),
    ),
    primary_key=("pipeline_logging_id",),
    partition_by="created_at",
    cluster_by=("tenant_id", "status"),
)

# Each tenant's webhook settings, a row per change (the newest is the setting): the
# service only appends. The signing secret is not stored: it is derived from the server's
# key pepper and `secret_id`.
TENANT_WEBHOOKS = Table(
    "tenant_webhooks",
    (
        _req("tenant_id", "STRING"),
        _req("url", "STRING"),
        _req("secret_id", "STRING"),
        _req("updated_at", "TIMESTAMP"),
        Column("updated_by", "STRING"),
        _req("deleted", "BOOL"),
    ),
    cluster_by=("tenant_id",),
)

TENANT_STEP_LOGS = Table(
    "tenant_step_logs",
    (
        _req("step_logging_id", "STRING"),
        _req("pipeline_logging_id", "STRING"),
        _req("pipeline_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("step_name", "STRING"),
        _req("step_type", "STRING"),
        _req("step_index", "INT64"),
        _req("status", "STRING"),
        Column("rows_processed", "INT64"),
        Column("step_start_time", "TIMESTAMP"),
        Column("step_end_time", "TIMESTAMP"),
        Column("duration_ms", "INT64"),
        Column("error_message", "STRING"),
        # Since version 2.
        Column("attempts", "INT64"),
        # Since version 3: which attempt of the run the step belongs to.
        Column("run_attempt", "INT64"),
        # Since version 7: the step's failed `warn` checks.
        Column("warnings", "INT64"),
    ),
    primary_key=("step_logging_id",),
    partition_by="step_start_time",
    cluster_by=("tenant_id", "pipeline_logging_id"),
)

TENANT_DQ_RESULTS = Table(
    "tenant_dq_results",
    (
        _req("dq_result_id", "STRING"),
        _req("pipeline_logging_id", "STRING"),
        _req("pipeline_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("step_name", "STRING"),
        _req("check_name", "STRING"),
        _req("check_type", "STRING"),
        _req("severity", "STRING"),
        _req("status", "STRING"),
        Column("observed_value", "STRING"),
        Column("expected_value", "STRING"),
        Column("message", "STRING"),
        _req("ingestion_date", "DATE"),
        _req("created_at", "TIMESTAMP"),
        # Since version 3.
        Column("run_attempt", "INT64"),
        # Since version 7: the check's position in its step, the rows it found at fault
        # (NULL when it counts none) and a few of them (a JSON array of objects; NULL when
        # none).
        Column("check_index", "INT64"),
        Column("failed_rows", "INT64"),
        Column("sample_rows", "STRING"),
    ),
    primary_key=("dq_result_id",),
    partition_by="ingestion_date",
    cluster_by=("tenant_id", "pipeline_logging_id"),
)

TENANT_USAGE_QUOTAS = Table(
    "tenant_usage_quotas",
    (
        _req("tenant_id", "STRING"),
        _req("usage_date", "DATE"),
        _req("pipelines_run_today", "INT64"),
        _req("pipelines_succeeded_today", "INT64"),
        _req("pipelines_failed_today", "INT64"),
        _req("concurrent_pipelines_running", "INT64"),
        _req("max_concurrent_reached", "INT64"),
        _req("daily_limit", "INT64"),
        _req("concurrent_limit", "INT64"),
        _req("updated_at", "TIMESTAMP"),
    ),
    primary_key=("tenant_id", "usage_date"),
    partition_by="usage_date",
    cluster_by=("tenant_id",),
)


TENANT_IDEMPOTENCY_KEYS = Table(
    "tenant_idempotency_keys",
    (
        _req("tenant_id", "STRING"),
        _req("idempotency_key", "STRING"),
        _req("pipeline_logging_id", "STRING"),
        _req("created_at", "TIMESTAMP"),
    ),
    primary_key=("tenant_id", "idempotency_key"),
    cluster_by=("tenant_id", "idempotency_key"),
)


TENANT_MEMBERS = Table(
    "tenant_members",
    (
        _req("tenant_id", "STRING"),
        _req("user_id", "STRING"),
        _req("first_seen_at", "TIMESTAMP"),
    ),
    primary_key=("tenant_id", "user_id"),
    cluster_by=("tenant_id",),
)


# One row per run whose staged writes were published, written in the publishing transaction
# itself: a run found RUNNING with a row here (its server died after publishing, before the
# run's end was written) is ended COMPLETE by recovery, never run and published again.
TENANT_RUN_PUBLICATIONS = Table(
    "tenant_run_publications",
    (
        _req("pipeline_logging_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("run_attempt", "INT64"),
        _req("worker_id", "STRING"),
        _req("published_at", "TIMESTAMP"),
    ),
    primary_key=("pipeline_logging_id",),
    cluster_by=("pipeline_logging_id",),
)


# Schedules (one row per schedule; see `records.ScheduleRecord`), and the slots they
# skipped (outside their catch-up policy), one row per run of consecutive slots.
TENANT_SCHEDULES = Table(
    "tenant_schedules",
    (
        _req("schedule_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("provider", "STRING"),
        _req("domain", "STRING"),
        _req("template", "STRING"),
        _req("cron", "STRING"),
        _req("time_zone", "STRING"),
        Column("parameters", "JSON"),
        _req("catch_up", "STRING"),
        _req("catch_up_max", "INT64"),
        _req("paused", "BOOL"),
        Column("created_by", "STRING"),
        _req("created_at", "TIMESTAMP"),
        _req("updated_at", "TIMESTAMP"),
        Column("last_slot", "TIMESTAMP"),
        Column("next_slot", "TIMESTAMP"),
        _req("version", "INT64"),
        _req("deleted", "BOOL"),
        _req("skipped_slots", "INT64"),
        Column("last_skip_reason", "STRING"),
        Column("backfill_after", "TIMESTAMP"),
        Column("backfill_until", "TIMESTAMP"),
        _req("backfill_left", "INT64"),
    ),
    primary_key=("schedule_id",),
    cluster_by=("tenant_id",),
)

TENANT_SCHEDULE_SKIPS = Table(
    "tenant_schedule_skips",
    (
        _req("schedule_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("first_slot", "TIMESTAMP"),
        _req("last_slot", "TIMESTAMP"),
        _req("slot_count", "INT64"),
        _req("reason", "STRING"),
        _req("recorded_at", "TIMESTAMP"),
    ),
    primary_key=("schedule_id", "first_slot"),
    partition_by="recorded_at",
    cluster_by=("tenant_id", "schedule_id"),
)


@dataclass(frozen=True)
class Fill:
    """`UPDATE table SET column = value WHERE column IS NULL`: a value for the rows written
    before `column` existed (idempotent, so replicas migrating at once agree)."""

    table: Table
    column: str
    value: int


@dataclass(frozen=True)
class Migration:
    """One schema version: tables to create, columns to add to existing tables, and
    values for the rows that predate a column.

    Tables are defined at their newest shape, so a fresh store gets every column at once
    and a later migration's `ADD COLUMN IF NOT EXISTS` does nothing there; an older store
    gets the missing columns.
    """

    version: int
    description: str
    creates: tuple[Table, ...] = ()
    adds: tuple[tuple[Table, tuple[str, ...]], ...] = ()
    # Existing tables whose clustering (BigQuery's; the rows written from then on) becomes
    # their definition's.
    clusters: tuple[Table, ...] = ()
    fills: tuple[Fill, ...] = ()


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "central tables: tenants, API keys, runs, step logs, DQ results, usage quotas",
        (
            TENANT_PROFILES,
            TENANT_API_KEYS,
            TENANT_PIPELINE_RUNS,
            TENANT_STEP_LOGS,
            TENANT_DQ_RESULTS,
            TENANT_USAGE_QUOTAS,
        ),
    ),
    Migration(
        2,
        "pipeline execution: run bookkeeping columns, step attempts, idempotency keys",
        creates=(TENANT_IDEMPOTENCY_KEYS,),
        adds=(
            (
                TENANT_PIPELINE_RUNS,
                (
                    "provider",
                    "domain",
                    "template",
                    "idempotency_key",
                    "attempt",
                    "worker_id",
                    "heartbeat_at",
                    "cancel_requested",
                ),
            ),
            (TENANT_STEP_LOGS, ("attempts",)),
        ),
    ),
    Migration(
        3,
        "step logs and DQ results record the run attempt they belong to",
        adds=((TENANT_STEP_LOGS, ("run_attempt",)), (TENANT_DQ_RESULTS, ("run_attempt",))),
    ),
    Migration(4, "team members (distinct X-User-ID values) per tenant", (TENANT_MEMBERS,)),
    Migration(5, "run publications: a run's writes are published once", (TENANT_RUN_PUBLICATIONS,)),
    Migration(6, "schedules and the slots they skipped", (TENANT_SCHEDULES, TENANT_SCHEDULE_SKIPS)),
    Migration(
        7,
        "failed warn checks per run and step; DQ results keep their order, failed rows, samples",
        adds=(
            (TENANT_PIPELINE_RUNS, ("warnings",)),
            (TENANT_STEP_LOGS, ("warnings",)),
            (TENANT_DQ_RESULTS, ("check_index", "failed_rows", "sample_rows")),
        ),
    ),
    Migration(
        8,
        "API keys as a resource (name, scope, expiry, rotation, last use) and the audit log",
        creates=(TENANT_AUDIT_LOG,),
        adds=(
            (
                TENANT_API_KEYS,
                (
                    "name",
                    "scope",
                    "created_by",
                    "expires_at",
                    "replaced_by",
                    "last_used_at",
                    "changed_at",
                ),
            ),
        ),
    ),
    Migration(
        9,
        "webhook settings per tenant; runs keep the trace of the request that created them",
        creates=(TENANT_WEBHOOKS,),
        adds=((TENANT_PIPELINE_RUNS, ("trace_id",)),),
    ),
    # The embedded store keeps usage in its table; the BigQuery store adds the tenants'
    # counters columns that answer a day's usage without reading the run events.
    Migration(10, "usage of the newest day kept with each tenant's run counters"),
    Migration(
        11,
        "run publications and idempotency keys clustered by the columns they are read by",
        clusters=(TENANT_RUN_PUBLICATIONS, TENANT_IDEMPOTENCY_KEYS),
    ),
    # Reads took a NULL attempt for 1, but the guards of a run's changes (`attempt = ?`)
    # never match NULL: a run in flight when its store was upgraded could not end.
    Migration(
        12,
        "runs, steps and checks written before versions 2 and 3 belong to the run's attempt 1",
        fills=(
            Fill(TENANT_PIPELINE_RUNS, "attempt", 1),
            Fill(TENANT_STEP_LOGS, "run_attempt", 1),
            Fill(TENANT_DQ_RESULTS, "run_attempt", 1),
        ),
    ),
    Migration(
        13,
        "team members clustered by tenant (admissions and usage read one tenant's)",
        clusters=(TENANT_MEMBERS,),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

CENTRAL_TABLES: tuple[Table, ...] = tuple(t for m in MIGRATIONS for t in m.creates)

# Each tenant's dataset, created at onboarding.
ONBOARDING_VALIDATION_TEST = Table(
    "onboarding_validation_test",
    (
        _req("validation_id", "STRING"),
        _req("tenant_id", "STRING"),
        _req("validated_at", "TIMESTAMP"),
        _req("message", "STRING"),
    ),
)
COMPREHENSIVE_VIEW = "tenant_comprehensive_view"
# In the order the onboarding response lists them.
TENANT_DATASET_OBJECTS: tuple[str, ...] = (COMPREHENSIVE_VIEW, ONBOARDING_VALIDATION_TEST.name)


def comprehensive_view_sql(dataset: str, central: str, tenant_id: str) -> str:
    """BigQuery SQL creating the tenant's `tenant_comprehensive_view` in `dataset`: every
    run of the tenant with its step and data-quality totals, read from `central`.

    The tenant id is embedded as a literal because view definitions cannot take
    parameters; callers pass ids already restricted to [A-Za-z0-9_]
    (`identifiers.quote_identifier`). The embedded store transpiles it like any BigQuery SQL.
    """
    return f"""
        CREATE VIEW `{dataset}.{COMPREHENSIVE_VIEW}` AS
        SELECT r.*,
               COALESCE(s.steps_total, 0) AS steps_total,
               COALESCE(s.steps_failed, 0) AS steps_failed,
               COALESCE(d.dq_checks_total, 0) AS dq_checks_total,
               COALESCE(d.dq_checks_failed, 0) AS dq_checks_failed
        FROM `{central}.tenant_pipeline_runs` AS r
        LEFT JOIN (
            SELECT pipeline_logging_id, COUNT(*) AS steps_total,
                   COUNTIF(status = 'FAILED') AS steps_failed
            FROM `{central}.tenant_step_logs`
            WHERE tenant_id = '{tenant_id}'
            GROUP BY pipeline_logging_id
        ) AS s USING (pipeline_logging_id)
        LEFT JOIN (
            SELECT pipeline_logging_id, COUNT(*) AS dq_checks_total,
                   COUNTIF(status = 'FAILED') AS dq_checks_failed
            FROM `{central}.tenant_dq_results`
            WHERE tenant_id = '{tenant_id}'
            GROUP BY pipeline_logging_id
        ) AS d USING (pipeline_logging_id)
        WHERE r.tenant_id = '{tenant_id}'
    """
