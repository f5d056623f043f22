"""Run and step rows as both stores select them: the column lists and their mapping to records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from convergence_server.storage.records import RunRecord, StepRecord

RUN_COLUMNS = (
    "pipeline_logging_id, pipeline_id, tenant_id, provider, domain, template, status, "
    "trigger_type, trigger_by, user_id, parameters, created_at, start_time, end_time, "
    "duration_ms, error_message, idempotency_key, attempt, cancel_requested, worker_id"
)
STEP_COLUMNS = (
    "step_logging_id, pipeline_logging_id, pipeline_id, tenant_id, step_name, step_type, "
    "step_index, status, step_start_time, rows_processed, step_end_time, duration_ms, "
    "error_message, attempts, run_attempt"
)


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
    )
