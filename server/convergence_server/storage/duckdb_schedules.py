"""Schedules and their skipped slots in the embedded store (a part of DuckDBStore).

A change is written only over the version it was made from (`... WHERE version = ?`), so
of two processes that computed the same change, one writes it and the other learns that it
lost; its skip row, if any, goes in the same transaction as the change.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import duckdb

from convergence_server.storage.duckdb_runs import CENTRAL, changed, rollback
from convergence_server.storage.records import ScheduleRecord, SkipRecord
from convergence_server.storage.rows import (
    SCHEDULE_COLUMNS,
    aware,
    naive,
    schedule_from_row,
    schedule_values,
)

SCHEDULES = f"{CENTRAL}.tenant_schedules"
SKIPS = f"{CENTRAL}.tenant_schedule_skips"
_PLACEHOLDERS = ", ".join("?" * len(SCHEDULE_COLUMNS.split(", ")))
_KEY = ("schedule_id", "tenant_id")
_SELECT = f"SELECT {SCHEDULE_COLUMNS.replace('parameters', 'CAST(parameters AS VARCHAR)')}"


def _values(schedule: ScheduleRecord) -> list[Any]:
    values = schedule_values(schedule)
    return [naive(v) if isinstance(v, datetime) else v for v in values]


def _from_row(row: Sequence[Any]) -> ScheduleRecord:
    return schedule_from_row([aware(v) if isinstance(v, datetime) else v for v in row])


def create_schedule(
    cur: duckdb.DuckDBPyConnection, schedule: ScheduleRecord, max_schedules: int
) -> int:
    """Stores the schedule unless the tenant has `max_schedules`; returns how many it had.
    The caller holds the tenant's turn, so the count cannot move."""
    row = cur.execute(
        f"SELECT COUNT(*) FROM {SCHEDULES} WHERE tenant_id = ? AND NOT deleted",
        [schedule.tenant_id],
    ).fetchone()
    count = int(row[0]) if row else 0
    if count < max_schedules:
        cur.execute(
            f"INSERT INTO {SCHEDULES} ({SCHEDULE_COLUMNS}) VALUES ({_PLACEHOLDERS})",
            _values(schedule),
        )
    return count


def get_schedule(
    cur: duckdb.DuckDBPyConnection, tenant_id: str, schedule_id: str
) -> ScheduleRecord | None:
    row = cur.execute(
        f"{_SELECT} FROM {SCHEDULES} WHERE tenant_id = ? AND schedule_id = ? AND NOT deleted",
        [tenant_id, schedule_id],
    ).fetchone()
    return _from_row(row) if row else None


def list_schedules(
    cur: duckdb.DuckDBPyConnection,
    tenant_id: str,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[ScheduleRecord]:
    where = "tenant_id = ? AND NOT deleted"
    params: list[Any] = [tenant_id]
    if after is not None:
        where += " AND (created_at, schedule_id) > (?, ?)"
        params += [naive(after[0]), after[1]]
    rows = cur.execute(
        f"{_SELECT} FROM {SCHEDULES} WHERE {where} ORDER BY created_at, schedule_id LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [_from_row(r) for r in rows]


def save_schedule(
    cur: duckdb.DuckDBPyConnection, schedule: ScheduleRecord, skip: SkipRecord | None
) -> bool:
    cur.begin()
    try:
        written = write_schedule(cur, schedule, skip)
        cur.commit()
    except BaseException:
        rollback(cur)
        raise
    return written


def write_schedule(
    cur: duckdb.DuckDBPyConnection, schedule: ScheduleRecord, skip: SkipRecord | None = None
) -> bool:
    """Writes the schedule over its stored version `schedule.version - 1`, and the skip,
    in the caller's transaction; False, writing nothing, when the version is another."""
    columns = SCHEDULE_COLUMNS.split(", ")
    kept = [(c, v) for c, v in zip(columns, _values(schedule), strict=True) if c not in _KEY]
    if not changed(
        cur,
        f"UPDATE {SCHEDULES} SET {', '.join(f'{c} = ?' for c, _ in kept)} "
        "WHERE tenant_id = ? AND schedule_id = ? AND version = ?",
        [*(v for _, v in kept), schedule.tenant_id, schedule.schedule_id, schedule.version - 1],
    ):
        return False
    if skip is not None:
        cur.execute(
            f"INSERT INTO {SKIPS} VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                skip.schedule_id,
                skip.tenant_id,
                naive(skip.first_slot),
                naive(skip.last_slot),
                skip.slot_count,
                skip.reason,
                naive(skip.recorded_at),
            ],
        )
    return True


def due_schedules(
    cur: duckdb.DuckDBPyConnection,
    tenant_id: str | None,
    now: datetime,
    limit: int,
    after: tuple[str, datetime, str] | None = None,
    paused: bool = True,
) -> list[ScheduleRecord]:
    where = "NOT deleted AND (next_slot <= ? OR backfill_left > 0)"
    params: list[Any] = [naive(now)]
    if tenant_id is not None:
        where += " AND tenant_id = ?"
        params.append(tenant_id)
    if not paused:
        where += " AND NOT paused"
    if after is not None:
        where += " AND (tenant_id, created_at, schedule_id) > (?, ?, ?)"
        params += [after[0], naive(after[1]), after[2]]
    rows = cur.execute(
        f"{_SELECT} FROM {SCHEDULES} WHERE {where} ORDER BY tenant_id, created_at, schedule_id "
        "LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [_from_row(r) for r in rows]
