"""The storage port: what the domain needs from a backend. Adapters take and return records."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Protocol

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
from convergence_server.storage.warehouse import Warehouse


class Store(Protocol):
    """A backend holding the central dataset and one dataset per tenant.

    Every method may raise `convergence_server.errors.Unavailable` when the backend
    cannot be reached.
    """

    kind: str
    # True when one server process owns the store alone (the embedded file): at start-up,
    # every RUNNING run was left by a stopped process.
    exclusive: bool

    async def ping(self) -> None:
        """Returns when the backend answers a trivial query."""

    async def schema_version(self) -> int:
        """The newest migration applied to the central dataset."""

    async def central_table_columns(self) -> dict[str, frozenset[str]]:
        """The column names of every table in the central dataset, by table name."""

    async def probe_dataset_creation(self) -> None:
        """Creates and drops a scratch dataset, proving the permission to create one."""

    async def dataset_exists(self, dataset_id: str) -> bool:
        """Whether a dataset of that name exists (as the backend compares names)."""

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None: ...

    async def tenant_ids_equal_ignoring_case(self, tenant_id: str) -> list[str]:
        """Existing tenant ids equal to `tenant_id` when case is ignored."""

    async def create_tenant(
        self, tenant: TenantRecord, key: ApiKeyRecord, commit_by: float | None = None
    ) -> tuple[str, ...]:
        """Atomically stores the tenant and its key and creates its dataset.

        Returns the names of the objects created in the dataset. Raises `AlreadyExists`
        when the tenant or its dataset exists, and `DeadlineExceeded` when the commit would
        come after `commit_by` (a `time.monotonic()` value). On any failure, and when the
        awaiting task is cancelled, nothing is left behind.
        """

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    # -- API keys and the audit log ------------------------------------------------------

    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        """The tenant's keys, newest first (creation time, then id)."""

    async def create_api_key(self, key: ApiKeyRecord, audit: AuditRecord) -> None:
        """Stores a new key and its audit row in one transaction."""

    async def revoke_api_key(
        self,
        tenant_id: str,
        key_id: str,
        now: datetime,
        audit: AuditRecord,
        keep_one: bool = True,
    ) -> ApiKeyRecord | None:
        """Revokes the key (with its audit row, in one transaction) unless it is revoked
        already or, with `keep_one`, no other FULL key of the tenant would stay active (not
        revoked, not expired at `now`, not replaced by a rotation, whose grace ends; a
        read-only key cannot manage keys); returns the key as stored after, None when the
        tenant has no such key. The caller tells a refusal from the key's state. Atomic per
        tenant: two revokes cannot both pass the check."""

    async def rotate_api_key(
        self,
        tenant_id: str,
        key_id: str,
        new_key: ApiKeyRecord,
        grace_until: datetime,
        audit: AuditRecord,
    ) -> ApiKeyRecord | None:
        """In one transaction, if the key is active at `new_key.created_at` and not rotated
        already (no `replaced_by`): stores
        `new_key`, makes the old one expire at `grace_until` (or its own earlier expiry) and
        names `new_key` as its replacement, and appends `audit`. Returns the old key as
        stored after, None when the tenant has no such key (unchanged when it is not
        active)."""

    async def record_key_use(self, uses: dict[str, datetime]) -> None:
        """Sets each key's `last_used_at` (a later time only), in one statement."""

    async def changed_api_keys(self, since: datetime | None) -> tuple[list[str], datetime]:
        """Ids of the keys revoked or rotated at or after `since` (none when None), and the
        store's time now (by its own clock), the next look's `since`."""

    async def add_audit(self, records: list[AuditRecord]) -> None:
        """Appends rows to the audit log."""

    async def list_audit(
        self, where: AuditFilter, after: tuple[datetime, str] | None, limit: int
    ) -> list[AuditRecord]:
        """Audit rows newest first (event time, then id), strictly after `after`."""

    # -- webhooks ------------------------------------------------------------------------

    async def get_webhook(self, tenant_id: str) -> WebhookRecord | None:
        """The tenant's webhook as last saved; None when it has none (or it was deleted)."""

    async def save_webhook(self, webhook: WebhookRecord, audit: AuditRecord) -> None:
        """Appends `webhook` (the setting from now on) and its audit row in one transaction."""

    # -- runs: every state change is conditional on the current state --------------------

    async def create_run(
        self,
        run: RunRecord,
        keys_valid_from: datetime,
        limits: RunLimits | None = None,
        progress: ScheduleRecord | None = None,
    ) -> Admission:
        """Stores a PENDING run, atomically with its admission against `limits` (runs
        created on its UTC day, and the tenant's PENDING or RUNNING runs, must stay below
        them) and with its usage row. With an idempotency key used since
        `keys_valid_from`, returns that key's run instead, uncounted.

        `progress` is a schedule once the run's slot is done: unless the run is refused, it
        is written in the same transaction, as `save_schedule` writes it (only over the
        stored version `progress.version - 1`; `Admission.progressed` says if it was). A
        new run is not stored when its progress is stale: refused "stale" (a run found by
        its key is returned all the same)."""

    async def usage(self, tenant_id: str, day: date) -> TenantUsage:
        """The tenant's usage row of a UTC day, its runs in use and its team's size (on
        BigQuery one query job for today's row)."""

    async def update_plan(
        self, tenant_id: str, plan: str, team_size: int, now: datetime
    ) -> int | None:
        """Sets the tenant's plan unless its team has more than `team_size` members (the
        new plan's); returns the team's size, None when there is no such tenant. Atomic
        with the tenant's `admit_member`: no member is admitted under the old plan while
        the team is counted."""

    async def admit_member(
        self, tenant_id: str, user_id: str, plan: str, team_size: int, now: datetime
    ) -> MemberAdmission:
        """Adds the user to the (existing) tenant's team unless that would exceed
        `team_size`, the team size under `plan`, or the tenant's plan is no longer `plan`
        (changed meanwhile, perhaps through another server: the answer names the new one).
        Atomic per tenant."""

    async def list_members(self, tenant_id: str) -> list[MemberRecord]: ...

    async def remove_member(self, tenant_id: str, user_id: str) -> bool:
        """False when the user was not a member."""

    # -- schedules: a change is written only over the version it was made from ------------

    async def create_schedule(self, schedule: ScheduleRecord, max_schedules: int) -> int:
        """Stores the schedule unless its tenant already has `max_schedules` (deleted ones
        do not count), atomically per tenant; returns how many the tenant had before."""

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> ScheduleRecord | None:
        """The tenant's schedule, unless there is none or it was deleted."""

    async def list_schedules(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[ScheduleRecord]:
        """The tenant's schedules (not deleted), oldest first (creation time, then id),
        strictly after `after` (a creation time and id)."""

    async def save_schedule(self, schedule: ScheduleRecord, skip: SkipRecord | None = None) -> bool:
        """Writes `schedule` over the stored version `schedule.version - 1`, and appends
        `skip` in the same transaction; False, writing nothing, when the stored version is
        another one (a concurrent change came first)."""

    async def due_schedules(
        self,
        tenant_id: str | None,
        now: datetime,
        limit: int,
        after: tuple[str, datetime, str] | None = None,
        paused: bool = True,
    ) -> list[ScheduleRecord]:
        """Schedules (not deleted; paused ones too unless `paused` is False) with a slot due
        at `now` (`next_slot` not after it) or a backfill in progress, of one tenant or of
        all; ordered by tenant, creation and id, strictly after `after` (those three)."""

    async def typical_run_ms(self, tenant_id: str) -> int | None:
        """The median duration of the tenant's recent ended runs, if it has any."""

    async def get_run(self, tenant_id: str, run_id: str) -> RunRecord | None: ...

    async def list_runs(
        self, where: RunFilter, after: RunCursor | None, limit: int
    ) -> list[RunRecord]:
        """Newest first (creation time, then id), strictly after `after`."""

    async def claim_next_run(self, worker_id: str, now: datetime) -> RunRecord | None:
        """Moves the first PENDING run of the fair queue (`rows.FAIR_QUEUE`: tenants in turn)
        to RUNNING for `worker_id`; None when none waits."""

    async def finish_run(
        self, run: RunRecord, status: str, now: datetime, error_message: str = ""
    ) -> RunRecord | None:
        """Ends `run` COMPLETE or FAILED if it is still RUNNING for the same worker and
        attempt (closing any step left RUNNING); None when it is not."""

    async def request_cancel(
        self, tenant_id: str, run_id: str, now: datetime, known: RunRecord | None = None
    ) -> Cancellation:
        """Ends a PENDING run FAILED, or flags a RUNNING one to stop; the run after, and
        whether this call ended it (of concurrent cancels of a PENDING run, one). `known`:
        the run as the caller just read it from this store (BigQuery then names its
        partition without reading it again; its state is checked in the change itself; a
        record of another run or tenant is ignored)."""

    async def cancel_requested(self, run: RunRecord, stored: bool = False) -> bool:
        """Whether a cancel of `run` (as its worker claimed it) was asked; with `stored`, as
        the store has it now (a replica's memory of a run it executes learns of a cancel
        asked on another replica only at its next heartbeat)."""

    async def heartbeat(self, run_ids: list[str], worker_id: str) -> None:
        """Marks the runs `worker_id` executes as alive, with the store's current time (all
        of them: a store may forget what it keeps of a run of `worker_id` not named)."""

    async def stale_runs(self, stale_before: datetime) -> list[RunRecord]:
        """RUNNING runs whose last heartbeat is older than `stale_before`."""

    async def pending_runs(self, now: datetime) -> tuple[int, datetime | None]:
        """How many runs of every tenant are PENDING, and the oldest one's creation time;
        `now` is the caller's clock (by which BigQuery bounds the partitions it reads)."""

    async def requeue_run(self, run: RunRecord, now: datetime, count_attempt: bool) -> bool:
        """Puts `run` back to PENDING if it is still RUNNING for the same worker and attempt;
        `count_attempt` uses up an attempt (after a crash, not after a clean stop)."""

    async def published(self, run_id: str) -> bool:
        """Whether an execution of the run published its writes (`Warehouse.publish`
        records that in its transaction): such a run must end COMPLETE, never run again."""

    async def write_failure(self) -> str | None:
        """Why the store cannot write now (a full disk...), or None when it can."""

    async def save_step(self, step: StepRecord) -> None:
        """Inserts or replaces a step log row (by its id)."""

    async def save_steps(self, steps: Sequence[StepRecord]) -> None:
        """`save_step` for steps of one run at once (a step boundary: one step's end and
        the next one's start), as one write where the store can."""

    async def list_steps(self, tenant_id: str, run_id: str) -> list[StepRecord]: ...

    async def run_with_steps(
        self, tenant_id: str, run_id: str
    ) -> tuple[RunRecord | None, list[StepRecord]]:
        """`get_run` and `list_steps` of one run (a WatchRun update, ListRunSteps), read
        together where the store can: on BigQuery one query job for a run this replica
        does not execute. No steps are read for a run not found."""

    async def add_dq_results(self, run: RunRecord, results: list[DqRecord]) -> None:
        """Appends the results of one `dq` step of an execution of `run` and, in the same
        transaction, adds their failed `warn` checks to the run's `warnings` if the run is
        still RUNNING for the same worker and attempt (`requeue_run` sets it back to 0)."""

    async def run_with_checks(
        self, tenant_id: str, run_id: str
    ) -> tuple[RunRecord | None, list[DqRecord]]:
        """`get_run` and `list_dq_results` of the run's current attempt (ListRunChecks),
        read together where the store can: on BigQuery one query job for a run this replica
        does not execute. No checks are read for a run not found."""

    async def list_dq_results(self, tenant_id: str, run_id: str, attempt: int) -> list[DqRecord]:
        """The run's results of `attempt`, in the order they ran (by step, then by
        `check_index`); a check recorded twice in the attempt (an execution handed back
        at a stop, then run again) appears once, as recorded last."""

    def warehouse(self, dataset: str) -> Warehouse:
        """The tenant's dataset, for one pipeline run (close it after)."""

    async def drop_stage_tables(self) -> int:
        """Drops staging tables left behind by interrupted runs."""

    async def close(self) -> None: ...
