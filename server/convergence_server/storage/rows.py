"""Run, step, DQ result, API key and audit rows as both stores select them: the column
lists and their mapping to records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from convergence_server.storage.records import (
    ApiKeyRecord,
    AuditRecord,
    DqRecord,
    RunRecord,
    ScheduleRecord,
    StepRecord,
    WebhookRecord,
)

RUN_COLUMNS = (
    "pipeline_logging_id, pipeline_id, tenant_id, provider, domain, template, status, "
    "trigger_type, trigger_by, user_id, parameters, created_at, start_time, end_time, "
    "duration_ms, error_message, idempotency_key, attempt, cancel_requested, worker_id, "
    "warnings, trace_id"
)
STEP_COLUMNS = (
    "step_logging_id, pipeline_logging_id, pipeline_id, tenant_id, step_name, step_type, "
    "step_index, status, step_start_time, rows_processed, step_end_time, duration_ms, "
    "error_message, attempts, run_attempt, warnings"
)
DQ_COLUMNS = (
    "dq_result_id, pipeline_logging_id, pipeline_id, tenant_id, step_name, check_name, "
    "check_type, severity, status, observed_value, expected_value, message, ingestion_date, "
    "created_at, run_attempt, check_index, failed_rows, sample_rows"
)

KEY_COLUMNS = (
    "key_id, tenant_id, salt, key_hash, created_at, revoked_at, name, scope, created_by, "
    "expires_at, replaced_by, last_used_at"
)
AUDIT_NAMES = (
    "event_id",
    "tenant_id",
    "event_time",
    "event",
    "actor_key_id",
    "actor_user_id",
    "target",
    "detail",
    "request_id",
    "client_address",
    "event_count",
)
AUDIT_COLUMNS = ", ".join(AUDIT_NAMES)

WEBHOOK_COLUMNS = "tenant_id, url, secret_id, updated_at, updated_by, deleted"

SCHEDULE_COLUMNS = (
    "schedule_id, tenant_id, provider, domain, template, cron, time_zone, parameters, "
    "catch_up, catch_up_max, paused, created_by, created_at, updated_at, last_slot, "
    "next_slot, version, deleted, skipped_slots, last_skip_reason, backfill_after, "
    "backfill_until, backfill_left"
)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def naive(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC).replace(tzinfo=None)


def aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=UTC)


def run_from_row(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        pipeline_logging_id=row[0],
        pipeline_id=row[1],
        tenant_id=row[2],
        provider=row[3] or "",
        domain=row[4] or "",
        template=row[5] or "",
        status=row[6],
        trigger_type=row[7],
        trigger_by=row[8] or "",
        user_id=row[9] or "",
        parameters=json.loads(row[10]) if row[10] else {},
        created_at=aware(row[11]) or datetime.now(UTC),
        start_time=aware(row[12]),
        end_time=aware(row[13]),
        duration_ms=row[14],
        error_message=row[15] or "",
        idempotency_key=row[16] or "",
        attempt=row[17] or 1,
        cancel_requested=bool(row[18]),
        worker_id=row[19] or "",
        warnings=row[20] or 0,
        trace_id=row[21] or "",
    )


def schedule_values(schedule: ScheduleRecord) -> list[Any]:
    """The schedule's values in `SCHEDULE_COLUMNS` order (parameters as JSON text)."""
    return [
        schedule.schedule_id,
        schedule.tenant_id,
        schedule.provider,
        schedule.domain,
        schedule.template,
        schedule.cron,
        schedule.time_zone,
        json.dumps(schedule.parameters, sort_keys=True),
        schedule.catch_up,
        schedule.catch_up_max,
        schedule.paused,
        schedule.created_by,
        schedule.created_at,
        schedule.updated_at,
        schedule.last_slot,
        schedule.next_slot,
        schedule.version,
        schedule.deleted,
        schedule.skipped_slots,
        schedule.last_skip_reason,
        schedule.backfill_after,
        schedule.backfill_until,
        schedule.backfill_left,
    ]


def schedule_from_row(row: Sequence[Any]) -> ScheduleRecord:
    """A schedule from a row of `SCHEDULE_COLUMNS` (timestamps aware, parameters JSON)."""
    parameters = row[7]
    if isinstance(parameters, str):
        parameters = json.loads(parameters) if parameters else {}
    return ScheduleRecord(
        schedule_id=row[0],
        tenant_id=row[1],
        provider=row[2],
        domain=row[3],
        template=row[4],
        cron=row[5],
        time_zone=row[6],
        parameters=dict(parameters or {}),
        catch_up=row[8],
        catch_up_max=int(row[9]),
        paused=bool(row[10]),
        created_by=row[11] or "",
        created_at=row[12],
        updated_at=row[13],
        last_slot=row[14],
        next_slot=row[15],
        version=int(row[16]),
        deleted=bool(row[17]),
        skipped_slots=int(row[18]),
        last_skip_reason=row[19] or "",
        backfill_after=row[20],
        backfill_until=row[21],
        backfill_left=int(row[22]),
    )


def step_from_row(row: Sequence[Any]) -> StepRecord:
    return StepRecord(
        step_logging_id=row[0],
        pipeline_logging_id=row[1],
        pipeline_id=row[2],
        tenant_id=row[3],
        step_name=row[4],
        step_type=row[5],
        step_index=row[6],
        status=row[7],
        step_start_time=aware(row[8]) or datetime.now(UTC),
        rows_processed=row[9] or 0,
        step_end_time=aware(row[10]),
        duration_ms=row[11],
        error_message=row[12] or "",
        attempts=row[13] or 0,
        run_attempt=row[14] or 1,
        warnings=row[15] or 0,
    )


def latest_execution(run: RunRecord, steps: Sequence[StepRecord]) -> list[StepRecord]:
    """Of the steps of the run's latest attempt, those its latest execution wrote. A run
    handed back at a stop keeps its attempt and is executed again from its first step; each
    claim sets the run's `start_time` by the clock of the server that then times the
    execution's steps, so none of those is ever left out. (Steps of the execution before, on
    another server whose clock ran ahead, may still be listed.)"""
    if run.start_time is None:
        return list(steps)
    return [step for step in steps if step.step_start_time >= run.start_time]


def dq_values(result: DqRecord, created_at: datetime | None = None) -> list[Any]:
    """The result's values in `DQ_COLUMNS` order: its samples as one JSON array of
    objects (None when there are none), its creation time as given in `created_at` (as
    the store keeps it) or else as recorded."""
    samples = json.dumps([json.loads(s) for s in result.sample_rows], separators=(",", ":"))
    return [
        result.dq_result_id,
        result.pipeline_logging_id,
        result.pipeline_id,
        result.tenant_id,
        result.step_name,
        result.check_name,
        result.check_type,
        result.severity,
        result.status,
        result.observed_value,
        result.expected_value,
        result.message,
        result.ingestion_date,
        created_at or result.created_at,
        result.run_attempt,
        result.check_index,
        result.failed_rows,
        samples if result.sample_rows else None,
    ]


def dq_from_row(row: Sequence[Any]) -> DqRecord:
    samples = json.loads(row[17]) if row[17] else []
    return DqRecord(
        dq_result_id=row[0],
        pipeline_logging_id=row[1],
        pipeline_id=row[2],
        tenant_id=row[3],
        step_name=row[4],
        check_name=row[5],
        check_type=row[6],
        severity=row[7],
        status=row[8],
        observed_value=row[9] or "",
        expected_value=row[10] or "",
        message=row[11] or "",
        ingestion_date=row[12],
        created_at=aware(row[13]) or datetime.now(UTC),
        run_attempt=row[14] or 1,
        check_index=row[15] or 0,
        failed_rows=row[16],
        sample_rows=tuple(json.dumps(sample) for sample in samples),
    )


# The run's checks of the attempts `{attempts}` selects, in the order they ran: a step's
# results share their creation time and keep their position. A check recorded twice in one
# attempt (its execution was handed back at a stop and run again) is listed as recorded
# last. `{columns}`: `DQ_COLUMNS`, or on BigQuery `AS STRUCT` and them (an array of the
# run's row: uncorrelated, as BigQuery refuses a correlated subquery over another table
# that it cannot turn into a join).
DQ_CHECKS = """
    SELECT {columns} FROM {results}
    WHERE tenant_id = {tenant} AND pipeline_logging_id = {run} AND {attempts}
    QUALIFY ROW_NUMBER() OVER (
      PARTITION BY IFNULL(run_attempt, 1), step_name, check_name
      ORDER BY created_at DESC, dq_result_id DESC) = 1
    ORDER BY created_at, check_index
"""


# The fair queue, both stores' claim: PENDING runs in the order workers take them, over
# `{runs}` (the embedded store's live rows; BigQuery's latest state of each run). A run's
# turn is its tenant's RUNNING runs plus the tenant's PENDING runs ahead of it, so the next
# run is the oldest PENDING run of the tenant with the fewest RUNNING; equal turns go to
# the tenant waiting longest, since its oldest PENDING run was queued or, if later, since
# its last run that started ended (a tenant whose run just ended goes to the back).
FAIR_QUEUE = """
    SELECT {columns} FROM (
      SELECT *,
        COUNTIF(status = 'RUNNING') OVER (PARTITION BY tenant_id)
          + ROW_NUMBER() OVER (
              PARTITION BY tenant_id, status ORDER BY created_at, pipeline_logging_id)
          - 1 AS turn,
        MIN(IF(status = 'PENDING', created_at, NULL)) OVER (PARTITION BY tenant_id)
          AS queued_at,
        MAX(IF(start_time IS NULL, NULL, end_time)) OVER (PARTITION BY tenant_id)
          AS released_at
      FROM {runs}
    ) AS ranked
    WHERE status = 'PENDING'
    ORDER BY turn, GREATEST(queued_at, IFNULL(released_at, queued_at)), created_at,
      pipeline_logging_id
"""


def key_from_row(row: Sequence[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row[0],
        tenant_id=row[1],
        salt=bytes(row[2]),
        key_hash=bytes(row[3]),
        created_at=row[4].replace(tzinfo=UTC),
        revoked_at=aware(row[5]),
        name=row[6] or "",
        scope=row[7] or "FULL",  # NULL in the rows of keys made before schema version 8
        created_by=row[8] or "",
        expires_at=aware(row[9]),
        replaced_by=row[10] or "",
        last_used_at=aware(row[11]),
    )


def audit_from_row(row: Sequence[Any]) -> AuditRecord:
    return AuditRecord(
        event_id=row[0],
        tenant_id=row[1],
        event_time=row[2].replace(tzinfo=UTC),
        event=row[3],
        actor_key_id=row[4] or "",
        actor_user_id=row[5] or "",
        target=row[6] or "",
        detail=row[7] or "",
        request_id=row[8] or "",
        client_address=row[9] or "",
        count=int(row[10]),
    )


def webhook_from_row(row: Sequence[Any]) -> WebhookRecord:
    return WebhookRecord(
        tenant_id=row[0],
        url=row[1],
        secret_id=row[2],
        updated_at=row[3].replace(tzinfo=UTC),
        updated_by=row[4] or "",
        deleted=bool(row[5]),
    )
