"""The rows the store keeps, as the domain sees them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime


@dataclass(frozen=True)
class TenantRecord:
    tenant_id: str
    company_name: str
    admin_email: str
    subscription_plan: str
    created_at: datetime
    status: str = "ACTIVE"


@dataclass(frozen=True)
class ApiKeyRecord:
    """A tenant's API key as stored: never the key, only its salted, peppered hash."""

    key_id: str
    tenant_id: str
    salt: bytes
    key_hash: bytes
    created_at: datetime
    revoked_at: datetime | None = None
    name: str = ""
    scope: str = "FULL"  # or READ_ONLY
    created_by: str = ""
    expires_at: datetime | None = None
    replaced_by: str = ""
    last_used_at: datetime | None = None

    @property
    def prefix(self) -> str:
        """The key's first characters, not secret: `{tenant_id}_api_{key_id}`."""
        return f"{self.tenant_id}_api_{self.key_id}"

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "REVOKED"
        if self.expires_at is not None and self.expires_at <= now:
            return "EXPIRED"
        return "ACTIVE"


@dataclass(frozen=True)
class AuditRecord:
    """A row of `tenants.tenant_audit_log`."""

    event_id: str
    tenant_id: str
    event_time: datetime
    event: str
    actor_key_id: str = ""
    actor_user_id: str = ""
    target: str = ""
    detail: str = ""
    request_id: str = ""
    client_address: str = ""
    count: int = 1


@dataclass(frozen=True)
class WebhookRecord:
    """A row of `tenants.tenant_webhooks`: a tenant's webhook as set at `updated_at`
    (`deleted`: none from then on)."""

    tenant_id: str
    url: str
    secret_id: str
    updated_at: datetime
    updated_by: str = ""
    deleted: bool = False


@dataclass(frozen=True)
class AuditFilter:
    """Which audit rows to list: one tenant's, of some events (all when empty), in
    [start, end)."""

    tenant_id: str
    events: frozenset[str] = frozenset()
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class RunRecord:
    """A row of `tenants.tenant_pipeline_runs`."""

    pipeline_logging_id: str
    pipeline_id: str
    tenant_id: str
    provider: str
    domain: str
    template: str
    status: str
    trigger_type: str
    trigger_by: str
    user_id: str
    parameters: dict[str, str]
    created_at: datetime
    start_time: datetime | None = None
    end_time: datetime | None = None
    duration_ms: int | None = None
    error_message: str = ""
    idempotency_key: str = ""
    attempt: int = 1
    cancel_requested: bool = False
    worker_id: str = ""
    # The failed `warn` checks of the current attempt (0 again when the run is requeued).
    warnings: int = 0
    # The trace (32 hex digits) of the request that created the run, "" when none came.
    trace_id: str = ""


@dataclass(frozen=True)
class RunFilter:
    """Which of a tenant's runs to list; `created_*` bound the creation time."""

    tenant_id: str
    status: str = ""
    pipeline_id: str = ""
    created_from: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True)
class RunCursor:
    """Where a page of runs (newest first) ended: the last run's creation time and id."""

    created_at: datetime
    pipeline_logging_id: str


@dataclass(frozen=True)
class StepRecord:
    """A row of `tenants.tenant_step_logs`."""

    step_logging_id: str
    pipeline_logging_id: str
    pipeline_id: str
    tenant_id: str
    step_name: str
    step_type: str
    step_index: int
    status: str
    step_start_time: datetime
    rows_processed: int = 0
    step_end_time: datetime | None = None
    duration_ms: int | None = None
    error_message: str = ""
    attempts: int = 0
    run_attempt: int = 1
    # The step's failed `warn` checks (dq steps only).
    warnings: int = 0


@dataclass(frozen=True)
class DqRecord:
    """A row of `tenants.tenant_dq_results`."""

    dq_result_id: str
    pipeline_logging_id: str
    pipeline_id: str
    tenant_id: str
    step_name: str
    check_name: str
    check_type: str
    severity: str
    status: str
    observed_value: str
    expected_value: str
    message: str
    ingestion_date: date
    created_at: datetime
    run_attempt: int = 1
    # Rows the check found at fault (None for checks that count no rows: columns_present,
    # row_count), and up to a few of them, each a JSON object of column to value.
    failed_rows: int | None = None
    sample_rows: tuple[str, ...] = ()
    # The check's position in its step: a step's checks are listed in this order.
    check_index: int = 0

    @property
    def warns(self) -> bool:
        """A failed `warn` check: reported, and counted in the run's `warnings`."""
        return self.status == "FAILED" and self.severity == "warn"


@dataclass(frozen=True)
class RunLimits:
    """The daily and concurrent run limits a trigger is admitted against."""

    daily: int
    concurrent: int


@dataclass(frozen=True)
class Admission:
    """What `Store.create_run` did: stored the run, found it (idempotent replay), or
    refused it over a limit (`refused` is "daily" or "concurrent", `used` the count) or
    because the schedule progress it was given is stale ("stale": the schedule changed
    since it was read); `progressed`: it also wrote that progress."""

    run: RunRecord | None
    created: bool
    refused: str = ""
    used: int = 0
    progressed: bool = False


@dataclass(frozen=True)
class UsageRecord:
    """A row of `tenants.tenant_usage_quotas`: one tenant's UTC day."""

    tenant_id: str
    usage_date: date
    pipelines_run_today: int
    pipelines_succeeded_today: int
    pipelines_failed_today: int
    concurrent_pipelines_running: int
    max_concurrent_reached: int
    daily_limit: int
    concurrent_limit: int


@dataclass(frozen=True)
class TenantUsage:
    """A tenant's usage as GetUsage shows it: its usage row of the day (None before the
    day's first change), its PENDING and RUNNING runs (its concurrency slots in use), and
    the size of its team."""

    row: UsageRecord | None
    active_runs: int
    team_members: int


@dataclass(frozen=True)
class Cancellation:
    """What a cancel did: the run after it (None: the tenant has no such run), whether this
    cancel ended it (a PENDING run ended FAILED here, not by a cancel that came first,
    which alone alerts and counts its end), and whether it came too late (the RUNNING run
    has published its results: it ends COMPLETE, not flagged)."""

    run: RunRecord | None
    ended: bool = False
    published: bool = False


@dataclass(frozen=True)
class MemberAdmission:
    """What `Store.admit_member` did: whether the user is a member now, whether this call
    added them, and the tenant's plan as stored."""

    member: bool
    added: bool
    plan: str


@dataclass(frozen=True)
class MemberRecord:
    """A row of `tenants.tenant_members`."""

    tenant_id: str
    user_id: str
    first_seen_at: datetime


@dataclass(frozen=True)
class ScheduleRecord:
    """A row of `tenants.tenant_schedules`: a schedule and how far it has got.

    `last_slot` is the newest slot processed (its run started, or skipped); the slots after
    it are due once past. `next_slot` is the first of them, kept so that due schedules are
    found by one indexed comparison. A backfill is the slots after `backfill_after` up to
    `backfill_until` (inclusive); both are None when no backfill is in progress.
    `version` grows by one at every change: a change is written only over the version it
    was made from.
    """

    schedule_id: str
    tenant_id: str
    provider: str
    domain: str
    template: str
    cron: str
    time_zone: str
    parameters: dict[str, str]
    catch_up: str
    catch_up_max: int
    paused: bool
    created_by: str
    created_at: datetime
    updated_at: datetime
    last_slot: datetime | None
    next_slot: datetime | None
    version: int = 1
    deleted: bool = False
    skipped_slots: int = 0
    last_skip_reason: str = ""
    backfill_after: datetime | None = None
    backfill_until: datetime | None = None
    backfill_left: int = 0


@dataclass(frozen=True)
class SkipRecord:
    """A row of `tenants.tenant_schedule_skips`: consecutive slots of a schedule that will
    never run, and why."""

    schedule_id: str
    tenant_id: str
    first_slot: datetime
    last_slot: datetime
    slot_count: int
    reason: str
    recorded_at: datetime
