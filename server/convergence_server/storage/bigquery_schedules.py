"""Schedules and their skipped slots in the BigQuery store (a part of BigQueryStore).

Schedules are versioned rows (see `bigquery_store`): a change appends the schedule's whole
state, in the tenant's transaction, only over the version it was made from; its skipped
slots go in the same transaction. The versions a newer one superseded are deleted at most
once an hour (`Compaction`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions as api_exceptions

from convergence_server.storage import schema
from convergence_server.storage.bigquery_central import Central, log, typed, within
from convergence_server.storage.bigquery_schema import (
    SCHEDULE_EVENTS,
    latest_schedules_sql,
    next_seq_sql,
)
from convergence_server.storage.records import ScheduleRecord, SkipRecord
from convergence_server.storage.rows import SCHEDULE_COLUMNS, schedule_from_row, schedule_values

SELECT_SCHEDULE = SCHEDULE_COLUMNS.replace("parameters", "TO_JSON_STRING(parameters) AS parameters")
SCHEDULE_NAMES = SCHEDULE_COLUMNS.split(", ")
COMPACT_EVERY = timedelta(hours=1)


class Compaction:
    """Deletes the versions of every schedule that a newer one superseded, once an hour,
    started by the first read of due schedules of a replica that has not started it in
    the last hour.

    Every slot a schedule runs appends its whole state as a new version, and each read of
    schedules reads every version stored (the table is clustered by tenant and schedule,
    not partitioned): the operator's trigger, once a minute, read the whole table. Without
    this, its cost would grow with every slot ever run (about 10 GB a call after a year of
    three 5-minute schedules for 100 tenants); with it, it is that of the live schedules
    and the versions of the last hour.

    Only a version whose schedule has a newer one stored is deleted, so the newest (a
    deleted schedule's tombstone too) stays: reads, and the version check of a change,
    answer as before. The DELETE runs outside the tenants' transactions, which only append
    to this table; BigQuery lets INSERTs run beside a DELETE, and a version appended
    meanwhile is newer than all the DELETE saw. Nobody waits for it: the job is named by
    the dataset and the hour (UTC), so the replicas start one a clock hour between them
    (the others find it started: `Conflict`), and BigQuery runs it to its end however
    long it takes. A job that failed is logged; the next is an hour later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ran_at: datetime | None = None

    def run(self, db: Central, now: datetime) -> None:
        """Starts the hour's job if this replica is due to (blocking for its insert only)."""
        with self._lock:
            if within(self._ran_at, COMPACT_EVERY, now):
                return
            self._ran_at = now
        events = db.table(SCHEDULE_EVENTS.name)
        try:
            db.runner.start(
                f"DELETE FROM {events} AS old WHERE EXISTS ("
                f"SELECT 1 FROM {events} AS newer WHERE newer.tenant_id = old.tenant_id"
                " AND newer.schedule_id = old.schedule_id AND newer.version > old.version)",
                compaction_job_id(db, now),
            )
        except api_exceptions.Conflict:
            pass  # started this hour already, by another replica or an earlier try here
        except Exception as exc:  # the reads go on
            log.warning("Superseded schedule versions not deleted: %r", exc)


def compaction_job_id(db: Central, now: datetime) -> str:
    """The id of the job that deletes superseded versions in the hour of `now`."""
    return f"compact_{db.name}_schedule_events_{now.astimezone(UTC):%Y%m%d%H}"


def schedule_params(schedule: ScheduleRecord) -> dict[str, Any]:
    """The schedule's columns as query parameters of their names (parameters as JSON text)."""
    values = dict(zip(SCHEDULE_NAMES, schedule_values(schedule), strict=True))
    return typed(schema.TENANT_SCHEDULES, values)


def insert_schedule_sql(db: Central, prefix: str = "") -> str:
    """Appends the schedule of the `schedule_params` (named with `prefix`) as its
    newest version."""
    values = [
        f"PARSE_JSON(@{prefix}parameters)" if name == "parameters" else f"@{prefix}{name}"
        for name in SCHEDULE_NAMES
    ]
    return (
        f"INSERT INTO {db.table(SCHEDULE_EVENTS.name)} ({SCHEDULE_COLUMNS}, recorded_at) "
        f"VALUES ({', '.join(values)}, CURRENT_TIMESTAMP());"
    )


def fresh_sql(db: Central) -> str:
    """In an admission's transaction: whether the schedule of the `s_` parameters was
    made from the stored version (a new run is admitted only from a fresh reading)."""
    return f"""
            SET fresh = IFNULL((
              SELECT MAX(version) FROM {db.table(SCHEDULE_EVENTS.name)}
              WHERE tenant_id = @s_tenant_id AND schedule_id = @s_schedule_id)
              = @s_version - 1, FALSE);
        """


def progress_sql(db: Central) -> str:
    """In an admission's transaction: the schedule of the `s_` parameters, written as
    `save_schedule` writes it, unless the run was refused or the reading was stale."""
    return f"""
            IF outcome IN ('created', 'existing') AND fresh THEN
              {insert_schedule_sql(db, "s_")}
              SET progressed = TRUE;
            END IF;
        """


async def create_schedule(db: Central, schedule: ScheduleRecord, max_schedules: int) -> int:
    latest = latest_schedules_sql(db, "tenant_id = @tenant_id")
    script = f"""
            DECLARE next_seq INT64;
            DECLARE schedules INT64;
            BEGIN TRANSACTION;
            {next_seq_sql(db, schedule.tenant_id)}
            SET schedules = (SELECT COUNT(*) FROM ({latest}) WHERE NOT deleted);
            IF schedules < @max_schedules THEN
              {insert_schedule_sql(db)}
            END IF;
            COMMIT TRANSACTION;
            SELECT schedules;
        """
    params = {**schedule_params(schedule), "max_schedules": max_schedules}
    rows = await db.call(lambda: db.transaction(script, params))
    return int(rows[0][0])


async def get_schedule(db: Central, tenant_id: str, schedule_id: str) -> ScheduleRecord | None:
    found = await _schedules(
        db,
        "tenant_id = @tenant_id AND schedule_id = @schedule_id",
        {"tenant_id": tenant_id, "schedule_id": schedule_id},
    )
    return found[0] if found else None


async def list_schedules(
    db: Central, tenant_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[ScheduleRecord]:
    params: dict[str, Any] = {"tenant_id": tenant_id}
    then = "TRUE"
    if after is not None:
        then = "(created_at > @after_at OR (created_at = @after_at AND schedule_id > @after_id))"
        params.update(after_at=after[0], after_id=after[1])
    return await _schedules(
        db, "tenant_id = @tenant_id", params, then, "created_at, schedule_id", limit
    )


async def save_schedule(db: Central, schedule: ScheduleRecord, skip: SkipRecord | None) -> bool:
    skip_sql = (
        f"""
              INSERT INTO {db.table(schema.TENANT_SCHEDULE_SKIPS.name)}
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
            {next_seq_sql(db, schedule.tenant_id)}
            SET from_newest = IFNULL((
              SELECT MAX(version) FROM {db.table(SCHEDULE_EVENTS.name)}
              WHERE tenant_id = @tenant_id AND schedule_id = @schedule_id) = @version - 1, FALSE);
            IF from_newest THEN
              {insert_schedule_sql(db)}
              {skip_sql}
            END IF;
            COMMIT TRANSACTION;
            SELECT from_newest;
        """
    params = schedule_params(schedule)
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
    rows = await db.call(lambda: db.transaction(script, params))
    return bool(rows[0][0])


async def due_schedules(
    db: Central,
    compaction: Compaction,
    tenant_id: str | None,
    now: datetime,
    limit: int,
    after: tuple[str, datetime, str] | None,
    paused: bool,
) -> list[ScheduleRecord]:
    params: dict[str, Any] = {"now": now}
    scope = "TRUE"
    if tenant_id is not None:
        scope = "tenant_id = @tenant_id"
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
    else:
        await db.call(lambda: compaction.run(db, now))
    return await _schedules(db, scope, params, then, "tenant_id, created_at, schedule_id", limit)


async def _schedules(
    db: Central,
    scope: str,
    params: Mapping[str, Any],
    then: str = "TRUE",
    order: str = "",
    limit: int | None = None,
) -> list[ScheduleRecord]:
    """The newest versions of the schedules `scope` selects (by tenant or id) that are
    not deleted and pass `then`."""
    sql = (
        f"SELECT {SELECT_SCHEDULE} FROM ({latest_schedules_sql(db, scope)}) "
        f"WHERE NOT deleted AND {then}"
    )
    if order:
        sql += f" ORDER BY {order}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    rows = await db.call(lambda: db.runner.query(sql, params))
    return [schedule_from_row(row) for row in rows]
