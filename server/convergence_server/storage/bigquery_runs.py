"""Run, step and data-quality records in the BigQuery store (a part of BigQueryStore).

A run's state is append-only (see `bigquery_store`): each change is a row of
`tenant_run_events` holding the run's whole state after it, appended in the tenant's
transaction only when the newest state passes the change's guard; step logs are rows of
`tenant_step_events`, heartbeats rows of `tenant_run_heartbeats`.
"""

from __future__ import annotations

import json
import statistics
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from google.api_core import exceptions as api_exceptions

from convergence_server.storage import schema
from convergence_server.storage.bigquery_central import Central, typed, within
from convergence_server.storage.bigquery_client import PUBLISH_TIMEOUT, Runner
from convergence_server.storage.bigquery_schedules import (
    fresh_sql,
    progress_sql,
    schedule_params,
)
from convergence_server.storage.bigquery_schema import (
    HEARTBEATS,
    RUN_EVENTS,
    STEP_EVENTS,
    USAGE_COLUMNS,
    counters_table,
    latest_events_sql,
    latest_steps_sql,
    next_seq_sql,
    runs_sql,
    usage_touch_sql,
)
from convergence_server.storage.locks import GroupCommit
from convergence_server.storage.records import (
    Admission,
    Cancellation,
    DqRecord,
    RunCursor,
    RunFilter,
    RunLimits,
    RunRecord,
    ScheduleRecord,
    StepRecord,
    TenantUsage,
    UsageRecord,
)
from convergence_server.storage.rows import (
    DQ_CHECKS,
    DQ_COLUMNS,
    FAIR_QUEUE,
    RUN_COLUMNS,
    STEP_COLUMNS,
    dq_from_row,
    dq_values,
    run_from_row,
    step_from_row,
)

SELECT_RUN = RUN_COLUMNS.replace("parameters", "TO_JSON_STRING(parameters) AS parameters")
RUN_EVENT_NAMES = [c.name for c in RUN_EVENTS.columns]
STEP_EVENT_NAMES = [c.name for c in STEP_EVENTS.columns]
OWNER_GUARD = "status = 'RUNNING' AND IFNULL(worker_id, '') = @worker_id AND attempt = @attempt"
# The event of a run whose publication has begun (`begin_publication`).
PUBLISHING = "publishing"
# Each run's `created_at` is its admitting replica's clock: replicas' clocks must agree
# within half of this (see `Horizon`).
HORIZON_MARGIN = timedelta(days=1)
# The events of one run, named as BigQuery finds them cheapest: its partition (every event
# of a run holds the run's `created_at`) and its cluster (tenant, then run).
OF_RUN = "tenant_id = @tenant_id AND created_at = @created_at AND pipeline_logging_id = @run_id"
# Its steps: they start after the run was created, by clocks that agree within the margin.
STEPS_OF_RUN = (
    "tenant_id = @tenant_id AND pipeline_logging_id = @run_id "
    f"AND step_start_time >= TIMESTAMP_SUB(@created_at, INTERVAL {HORIZON_MARGIN.days} DAY)"
)
RUNS_NAMED = (
    "tenant_id IN UNNEST(@tenants) AND created_at >= @oldest "
    "AND pipeline_logging_id IN UNNEST(@ids)"
)
INTERRUPTED = "Interrupted: the run stopped while this step was running"


# -- admission ------------------------------------------------------------------------------


MAX_BATCH = 100  # triggers in one admission transaction (about 25 parameters each)


@dataclass(frozen=True)
class Trigger:
    run: RunRecord
    keys_valid_from: datetime
    limits: RunLimits | None
    progress: ScheduleRecord | None

    def plain(self) -> bool:
        """No idempotency key and no schedule progress: admitted by the limits alone."""
        return not self.run.idempotency_key and self.progress is None

    def joins(self, first: Trigger) -> bool:
        """Whether this trigger goes into the same transaction as the plain `first`."""
        return self.plain() and self.limits == first.limits and _day(self.run) == _day(first.run)


class AdmissionTurns:
    """A tenant's triggers take turns in this process: one admission transaction at a time,
    so they never conflict with each other (only with another replica's). Triggers that
    arrive while one is written wait and go together in the next turn, in arrival order
    (`GroupCommit`): consecutive plain triggers of one day and the same limits are admitted
    or refused in one transaction, each exactly as its own transaction would have; a
    trigger with an idempotency key or schedule progress runs its own. A burst of N plain
    triggers of one tenant is thus at most two transactions (the first, then the rest, at
    most `MAX_BATCH` in one), not N."""

    def __init__(self) -> None:
        self._tenants: dict[str, GroupCommit[Trigger, Admission | Exception]] = {}

    async def admit(
        self,
        db: Central,
        run: RunRecord,
        keys_valid_from: datetime,
        limits: RunLimits | None,
        progress: ScheduleRecord | None,
    ) -> Admission:
        tenant = run.tenant_id.lower()
        turns = self._tenants.get(tenant)
        if turns is None:
            turns = self._tenants[tenant] = GroupCommit(
                lambda triggers: _admit_in_order(db, triggers), max_batch=MAX_BATCH
            )
        answer = await turns.submit(Trigger(run, keys_valid_from, limits, progress))
        if isinstance(answer, Exception):
            raise answer
        return answer


async def _admit_in_order(db: Central, triggers: list[Trigger]) -> list[Admission | Exception]:
    """Each trigger's admission, in order: a failed transaction fails its own triggers
    only (those before it may be admitted already)."""
    answers: list[Admission | Exception] = []
    while len(answers) < len(triggers):
        first = triggers[len(answers)]
        group = [first]
        if first.plain():
            for later in triggers[len(answers) + 1 :]:
                if not later.joins(first):
                    break
                group.append(later)
        try:
            if len(group) == 1:
                answers.append(
                    await create_run(
                        db, first.run, first.keys_valid_from, first.limits, first.progress
                    )
                )
            else:
                answers += await create_runs(db, [t.run for t in group], first.limits)
        except Exception as exc:
            answers += [exc] * len(group)
    return answers


def _day(run: RunRecord) -> date:
    return run.created_at.astimezone(UTC).date()


def _of(run: RunRecord) -> dict[str, Any]:
    """The parameters of `OF_RUN`."""
    return {
        "tenant_id": run.tenant_id,
        "created_at": run.created_at,
        "run_id": run.pipeline_logging_id,
    }


async def create_runs(
    db: Central, made: list[RunRecord], limits: RunLimits | None
) -> list[Admission]:
    """Plain triggers of one tenant, day and limits in one transaction: the first ones the
    limits allow are admitted, the rest refused, as one transaction each in this order
    would. Each admitted run's event has its own sequence number."""
    tenant_id, day = made[0].tenant_id, _day(made[0])
    counters = counters_table(db, tenant_id)
    params: dict[str, Any] = {
        "day": day,
        "batch": len(made),
        "limited": limits is not None,
        "daily_limit": limits.daily if limits else 0,
        "concurrent_limit": limits.concurrent if limits else 0,
    }
    rows = []
    for i, run in enumerate(made):
        params.update({f"r{i}_{k}": v for k, v in _run_params(run).items()})
        values = _created_event(f"r{i}_", i)
        rows.append(f"SELECT {i} AS i, " + ", ".join(f"{v} AS {c}" for c, v in values.items()))
    columns = ", ".join(RUN_EVENT_NAMES)
    script = f"""
            DECLARE next_seq INT64;
            DECLARE active_now INT64;
            DECLARE created_today INT64;
            DECLARE admitted INT64;
            BEGIN TRANSACTION;
            UPDATE {counters} SET seq = seq + @batch, updated_at = CURRENT_TIMESTAMP()
            WHERE TRUE;
            SET next_seq = (SELECT seq FROM {counters}) - @batch + 1;
            SET active_now = (SELECT active_runs FROM {counters});
            SET created_today = (SELECT IF(runs_day = @day, runs_today, 0) FROM {counters});
            SET admitted = IF(@limited, GREATEST(0, LEAST(@batch,
              @daily_limit - created_today, @concurrent_limit - active_now)), @batch);
            IF admitted > 0 THEN
              INSERT INTO {db.table(RUN_EVENTS.name)} ({columns})
              SELECT {columns} FROM ({" UNION ALL ".join(rows)}) WHERE i < admitted;
              UPDATE {counters} SET {_admitted_sql("active_runs + admitted")},
                active_runs = active_runs + admitted,
                runs_today = IF(runs_day = @day, runs_today + admitted, admitted),
                runs_day = @day
              WHERE TRUE;
            END IF;
            COMMIT TRANSACTION;
            SELECT admitted, created_today, active_now;
        """
    ((admitted, today, active),) = await db.call(lambda: db.transaction(script, params))
    answers = [Admission(run, created=True) for run in made[:admitted]]
    if admitted < len(made):  # each refused as the first trigger past the limit was
        assert limits is not None
        today, active = int(today) + admitted, int(active) + admitted
        daily = today >= limits.daily
        refusal = Admission(
            None,
            created=False,
            refused="daily" if daily else "concurrent",
            used=today if daily else active,
        )
        answers += [refusal] * (len(made) - admitted)
    return answers


def _admitted_sql(after: str) -> str:
    """The counters' SET clauses of an admission that brings the active runs to `after`."""
    return f"""{usage_touch_sql(after)},
                daily_limit = IF(@limited, @daily_limit, daily_limit),
                concurrent_limit = IF(@limited, @concurrent_limit, concurrent_limit)"""


def _created_event(prefix: str, index: int) -> dict[str, str]:
    """Column -> SQL of the `created` event of the admission's `index`-th run, whose values
    are the parameters named `prefix` + column."""
    values = {c: f"@{prefix}{c}" for c in RUN_EVENT_NAMES}
    values.update(
        event_seq=f"next_seq + {index}",
        event="'created'",
        event_time="CURRENT_TIMESTAMP()",
        parameters=f"PARSE_JSON(@{prefix}parameters)",
        usage_day="@day",
        active_after=f"active_now + {index + 1}",
        daily_limit="IF(@limited, @daily_limit, NULL)",
        concurrent_limit="IF(@limited, @concurrent_limit, NULL)",
    )
    return values


async def create_run(
    db: Central,
    run: RunRecord,
    keys_valid_from: datetime,
    limits: RunLimits | None,
    progress: ScheduleRecord | None,
) -> Admission:
    day = _day(run)
    counters, keys = counters_table(db, run.tenant_id), db.table("tenant_idempotency_keys")
    values = _created_event("", 0)
    # Idempotency keys are only appended: the newest row of a key is its state. A key's
    # row holds its run's created_at, so the run is looked for from `keys_valid_from` on.
    script = f"""
            DECLARE next_seq INT64;
            DECLARE active_now INT64;
            DECLARE created_today INT64;
            DECLARE existing_run STRING;
            DECLARE outcome STRING DEFAULT 'created';
            DECLARE progressed BOOL DEFAULT FALSE;
            DECLARE fresh BOOL DEFAULT TRUE;
            BEGIN TRANSACTION;
            {next_seq_sql(db, run.tenant_id)}
            {fresh_sql(db) if progress is not None else ""}
            SET active_now = (SELECT active_runs FROM {counters});
            SET created_today = (SELECT IF(runs_day = @day, runs_today, 0) FROM {counters});
            IF @idempotency_key != '' THEN
              SET existing_run = (
                SELECT k.pipeline_logging_id FROM (
                  SELECT * FROM {keys}
                  WHERE tenant_id = @tenant_id AND idempotency_key = @idempotency_key
                  ORDER BY created_at DESC LIMIT 1) AS k
                WHERE k.created_at >= @keys_valid_from
                  AND EXISTS (SELECT 1 FROM {db.table(RUN_EVENTS.name)} AS e
                              WHERE e.tenant_id = @tenant_id
                                AND e.created_at >= @keys_valid_from
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
              INSERT INTO {db.table(RUN_EVENTS.name)} ({", ".join(RUN_EVENT_NAMES)})
              VALUES ({", ".join(values.values())});
              UPDATE {counters} SET {_admitted_sql("active_runs + 1")},
                active_runs = active_runs + 1,
                runs_today = IF(runs_day = @day, runs_today + 1, 1), runs_day = @day
              WHERE TRUE;
            END IF;
            {progress_sql(db) if progress is not None else ""}
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
        params.update({f"s_{k}": v for k, v in schedule_params(progress).items()})
    rows = await db.call(lambda: db.transaction(script, params))
    outcome, existing, today, active, progressed = rows[0]
    if outcome == "existing":
        found = await get_run(db, run.tenant_id, existing)
        return Admission(found, created=False, progressed=bool(progressed))
    if outcome == "daily":
        return Admission(None, created=False, refused="daily", used=int(today))
    if outcome in ("concurrent", "stale"):
        return Admission(None, created=False, refused=outcome, used=int(active))
    return Admission(run, created=True, progressed=bool(progressed))


async def usage(db: Central, tenant_id: str, day: date) -> TenantUsage:
    """The tenant's usage row of `day`, runs in use and team size. The newest
    usage day (today, as the API asks) is read from the tenant's counters and the run events
    of that day's partition (its runs' ends), so a poll of it reads no more as the history
    grows; an older day from the usage view (a second query), which reads the tenant's
    whole history."""

    def newest() -> list[tuple[Any, ...]]:
        try:
            return db.query(
                "SELECT c.usage_day, IF(c.runs_day = @d, c.runs_today, 0), e.ok, e.bad, "
                "c.active_runs, c.usage_peak, IFNULL(c.daily_limit, 0), "
                "IFNULL(c.concurrent_limit, 0), m.n "
                f"FROM (SELECT COUNT(*) AS n FROM {db.table('tenant_members')} "
                "WHERE tenant_id = @t) AS m "
                f"LEFT JOIN {counters_table(db, tenant_id)} AS c ON TRUE "
                "CROSS JOIN (SELECT COUNTIF(status = 'COMPLETE') AS ok, "
                "COUNTIF(status != 'COMPLETE') AS bad "
                f"FROM {db.table(RUN_EVENTS.name)} WHERE tenant_id = @t AND event = 'finished' "
                "AND created_at >= @since AND created_at < @until) AS e",
                t=tenant_id,
                d=day,
                since=_start_of(day),
                until=_start_of(day + timedelta(days=1)),
            )
        except api_exceptions.NotFound:  # no such tenant
            return []

    rows = await db.call(newest)
    if not rows:
        return TenantUsage(None, 0, 0)
    usage_day, *counts, team = rows[0]
    active, row = int(counts[3] or 0), None
    if usage_day == day:
        row = UsageRecord(tenant_id, day, *(int(v) for v in counts))
    elif usage_day is not None and usage_day > day:  # an older day than the counters'
        older = await db.call(
            lambda: db.query(
                "SELECT tenant_id, usage_date, pipelines_run_today, pipelines_succeeded_today, "
                "pipelines_failed_today, concurrent_pipelines_running, max_concurrent_reached, "
                f"daily_limit, concurrent_limit FROM {db.table('tenant_usage_quotas')} "
                "WHERE tenant_id = @t AND usage_date = @d",
                t=tenant_id,
                d=day,
            )
        )
        row = UsageRecord(*older[0]) if older else None
    return TenantUsage(row, active, int(team))


def _start_of(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def typical_run_ms(db: Central, tenant_id: str) -> int | None:
    rows = await db.call(
        lambda: db.query(
            f"SELECT duration_ms FROM ({latest_events_sql(db, 'tenant_id = @t')}) "
            "WHERE status IN ('COMPLETE', 'FAILED') "
            "AND start_time IS NOT NULL ORDER BY end_time DESC LIMIT 20",
            t=tenant_id,
        )
    )
    durations = [row[0] for row in rows if row[0] is not None]
    return int(statistics.median(durations)) if durations else None


# -- reading --------------------------------------------------------------------------------


async def get_run(db: Central, tenant_id: str, run_id: str) -> RunRecord | None:
    latest = latest_events_sql(db, "tenant_id = @t AND pipeline_logging_id = @id")
    rows = await db.call(
        lambda: db.query(f"SELECT {SELECT_RUN} FROM ({latest})", id=run_id, t=tenant_id)
    )
    return run_from_row(rows[0]) if rows else None


async def list_runs(
    db: Central,
    where: RunFilter,
    after: RunCursor | None,
    limit: int,
    since: datetime | None = None,
) -> list[RunRecord]:
    """A page of runs, newest first. With `since`, the partitions from `since` on are read
    first, and the older ones only when those hold fewer than `limit` runs: a page that
    ended at `since` before holds at least as many now, unless runs left its filter."""
    # Conditions on what every event of a run holds (its tenant and creation) go to the
    # event table, where BigQuery prunes by them; the rest to each run's newest state.
    conditions, events = [], ["tenant_id = @tenant_id"]
    params: dict[str, Any] = {"tenant_id": where.tenant_id}
    if where.status:
        conditions.append("status = @status")
        params["status"] = where.status
    if where.pipeline_id:
        conditions.append("pipeline_id = @pipeline_id")
        params["pipeline_id"] = where.pipeline_id
    if where.created_from:
        events.append("created_at >= @created_from")
        params["created_from"] = where.created_from
    if where.created_before:
        events.append("created_at < @created_before")
        params["created_before"] = where.created_before
    if after is not None:
        events.append("created_at <= @after_at")
        conditions.append(
            "(created_at < @after_at OR (created_at = @after_at AND pipeline_logging_id < "
            "@after_id))"
        )
        params.update(after_at=after.created_at, after_id=after.pipeline_logging_id)

    def page(window: str, count: int) -> list[RunRecord]:
        sql = (
            f"SELECT {SELECT_RUN} FROM ({latest_events_sql(db, ' AND '.join([*events, window]))}) "
            f"WHERE {' AND '.join(conditions or ['TRUE'])} "
            f"ORDER BY created_at DESC, pipeline_logging_id DESC LIMIT {int(count)}"
        )
        bound = {**params, "since": since} if since is not None else params
        return [run_from_row(row) for row in db.runner.query(sql, bound)]

    def read() -> list[RunRecord]:
        if since is None:
            return page("TRUE", limit)
        found = page("created_at >= @since", limit)
        if len(found) < limit:
            found += page("created_at < @since", limit - len(found))
        return found

    return await db.call(read)


async def cancel_requested(db: Central, run: RunRecord) -> bool:
    """Whether a cancel of the run was asked, read from its partition and cluster (for a
    run not held by this replica: the ones it holds are answered from memory)."""
    latest = latest_events_sql(db, OF_RUN)
    rows = await db.call(lambda: db.query(f"SELECT cancel_requested FROM ({latest})", **_of(run)))
    return bool(rows and rows[0][0])


# -- the runs not ended ---------------------------------------------------------------------

HORIZON_LEARN = timedelta(minutes=1)
HORIZON_RESCAN = timedelta(hours=1)
ACTIVE = "status IN ('PENDING', 'RUNNING')"


class Horizon:
    """How far back a replica's reads of the runs not ended look: its claim polls (every
    second while idle), recovery (every heartbeat) and the queue's gauges (every 10 s).
    Without a bound each would read every partition of `tenant_run_events`, a cost that
    grows with every tenant's history.

    Every event row of a run holds its `created_at`, the table's partitioning column. At
    most once a minute a read learns the oldest `created_at` of the runs not ended. Until
    the next, the runs not ended are among those, and among the runs admitted since the
    learning began, whose `created_at` (their admitting replica's clock) is no earlier than
    that beginning, give or take the clocks' disagreement: reads need only the partitions
    from the earliest of those instants (or of now, for a clock set back), less
    `HORIZON_MARGIN`. The runs this replica admits lower the bound to their `created_at`
    themselves, whatever it is. A learning reads within the bound it replaces; the first,
    and one an hour, read every partition: a run that another replica whose clock is off by
    more than the margin admitted below the bound waits at most that long."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._learning = threading.Lock()
        self._oldest: datetime | None = None  # of the runs not ended, or the learning's start
        self._learned_at: datetime | None = None
        self._rescanned_at: datetime | None = None
        self._admitted: datetime | None = None  # the oldest admitted here since it began

    def admitted(self, created_at: datetime) -> None:
        """A run this replica admitted, or may have: called after its admission's
        transaction, whatever came of it."""
        with self._lock:
            if self._oldest is not None:
                self._oldest = min(self._oldest, created_at)
            self._admitted = min(self._admitted or created_at, created_at)

    def where(self, now: datetime) -> tuple[str, dict[str, Any]]:
        """The condition on the run events of a read of runs not ended, at `now`, and its
        parameters: TRUE until the first learning."""
        if self._oldest is None:
            return "TRUE", {}
        return "created_at >= @horizon", {"horizon": min(self._oldest, now) - HORIZON_MARGIN}

    def learn(self, db: Central, now: datetime) -> None:
        """Learns the oldest run not ended, if a minute has passed since the last time
        (blocking; a clock set back counts as due; one learning at a time)."""
        with self._learning:
            if within(self._learned_at, HORIZON_LEARN, now):
                return
            rescan = not within(self._rescanned_at, HORIZON_RESCAN, now)
            with self._lock:  # admissions from here on are in `_admitted`, the rest in the bound
                self._admitted = None
                where, params = ("TRUE", {}) if rescan else self.where(now)
            ((oldest,),) = db.query(
                f"SELECT MIN(created_at) FROM ({latest_events_sql(db, where)}) WHERE {ACTIVE}",
                **params,
            )
            with self._lock:
                self._oldest = min(oldest or now, now, self._admitted or now)
                self._learned_at = now
                if rescan:
                    self._rescanned_at = now


async def pending_runs(db: Central, horizon: Horizon, now: datetime) -> tuple[int, datetime | None]:
    def pending() -> list[tuple[Any, ...]]:
        horizon.learn(db, now)
        where, params = horizon.where(now)
        return db.query(
            f"SELECT COUNT(*), MIN(created_at) FROM ({latest_events_sql(db, where)}) "
            "WHERE status = 'PENDING'",
            **params,
        )

    ((count, oldest),) = await db.call(pending)
    return int(count), oldest


async def stale_runs(db: Central, horizon: Horizon, stale_before: datetime) -> list[RunRecord]:
    where, params = horizon.where(stale_before)
    rows = await db.call(
        lambda: db.query(
            # Only beats since `before` can make a run not stale.
            f"SELECT {SELECT_RUN} FROM ({runs_sql(db, where, 'beat_at >= @before')}) "
            "WHERE status = 'RUNNING' AND (heartbeat_at IS NULL OR heartbeat_at < @before) "
            "ORDER BY created_at",
            before=stale_before,
            **params,
        )
    )
    return [run_from_row(row) for row in rows]


# -- state changes --------------------------------------------------------------------------


def _change(
    db: Central,
    run: RunRecord,
    event: str,
    guard: str,
    changes: Mapping[str, str],
    params: Mapping[str, Any],
    then: str = "",
    before: str = "",
    runner: Runner | None = None,
) -> RunRecord | None:
    """Appends the run's next state if its newest one passes `guard`, and runs `then`
    in the same transaction (and `before`, first, whether or not the guard passes);
    returns the new state, or None when the guard failed. Blocking, on `runner` (the
    store's by default)."""
    # The usage columns are set only by the changes the usage view counts.
    unset = {c: f"CAST(NULL AS {t})" for c, t in USAGE_COLUMNS.items()}
    values = [{**unset, **changes}.get(c, c) for c in RUN_EVENT_NAMES]
    values[RUN_EVENT_NAMES.index("event_seq")] = "next_seq"
    values[RUN_EVENT_NAMES.index("event")] = f"'{event}'"
    values[RUN_EVENT_NAMES.index("event_time")] = "CURRENT_TIMESTAMP()"
    latest = latest_events_sql(db, OF_RUN)
    then_block = (
        f"""
            SET changed = EXISTS (SELECT 1 FROM {db.table(RUN_EVENTS.name)}
                                  WHERE {OF_RUN} AND event_seq = next_seq);
            IF changed THEN {then} END IF;"""
        if then
        else ""
    )
    script = f"""
            DECLARE next_seq INT64;
            DECLARE changed BOOL;
            BEGIN TRANSACTION;
            {next_seq_sql(db, run.tenant_id)}
            {before}
            INSERT INTO {db.table(RUN_EVENTS.name)} ({", ".join(RUN_EVENT_NAMES)})
            SELECT {", ".join(values)} FROM ({latest}) WHERE {guard};
            {then_block}
            COMMIT TRANSACTION;
            SELECT {SELECT_RUN} FROM {db.table(RUN_EVENTS.name)}
            WHERE {OF_RUN} AND event_seq = next_seq;
        """
    rows = db.transaction(script, {**_of(run), **params}, runner)
    return run_from_row(rows[0]) if rows else None


async def claim_next_run(
    db: Central, horizon: Horizon, worker_id: str, now: datetime
) -> RunRecord | None:
    def claim() -> RunRecord | None:
        # The head of the fair queue, then the runs the queue would give after it: a
        # run another replica claims first fails the guard below, and the next is tried.
        # Runs that ended before the horizon no longer weigh in the tenants' order (the
        # end of a run that lasted longer than `HORIZON_MARGIN`).
        horizon.learn(db, now)
        where, params = horizon.where(now)
        runs = f"({latest_events_sql(db, where)})"
        waiting = db.query(FAIR_QUEUE.format(columns=SELECT_RUN, runs=runs) + " LIMIT 10", **params)
        for row in waiting:
            claimed = _change(
                db,
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

    return await db.call(claim)


async def finish_run(
    db: Central, run: RunRecord, status: str, now: datetime, error_message: str
) -> RunRecord | None:
    return await db.call(lambda: _finish(db, run, status, now, error_message, owned=True))


def _finish(
    db: Central, run: RunRecord, status: str, now: datetime, error_message: str, owned: bool
) -> RunRecord | None:
    """Ends the run: RUNNING for the same worker and attempt when `owned`, else PENDING.

    The `finished` event counts (in the usage view) as a success or failure of the day
    the run was created, and sets today's concurrency, as the embedded store does."""
    counters = counters_table(db, run.tenant_id)
    then = f"""
            UPDATE {counters} SET {usage_touch_sql("active_runs - 1")},
              active_runs = active_runs - 1
            WHERE TRUE;
            {_interrupt_steps_sql(db) if owned else ""}
        """
    return _change(
        db,
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


def _interrupt_steps_sql(db: Central) -> str:
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
            INSERT INTO {db.table(STEP_EVENTS.name)} ({", ".join(STEP_EVENT_NAMES)})
            SELECT {", ".join(columns)}
            FROM ({latest_steps_sql(db, STEPS_OF_RUN)})
            WHERE status = 'RUNNING';
        """


async def request_cancel(
    db: Central, tenant_id: str, run_id: str, now: datetime, known: RunRecord | None = None
) -> Cancellation:
    """Ends the run FAILED if PENDING, else flags it if RUNNING (each change guarded by that
    state, in its transaction); its state after. `known`, the run as the caller read it
    from this store, names the run's partition without a read. The change for the state
    it was read in is tried first: one transaction unless the run changed since."""
    if known is not None and (known.tenant_id, known.pipeline_logging_id) != (tenant_id, run_id):
        known = None
    run = known or await get_run(db, tenant_id, run_id)
    if run is None:
        return Cancellation(None)

    def end(run: RunRecord) -> Cancellation | None:
        ended = _finish(db, run, "FAILED", now, "Cancelled before it started", owned=False)
        return None if ended is None else Cancellation(ended, ended=True)

    def flag(run: RunRecord) -> Cancellation | None:
        changes = {"cancel_requested": "TRUE"}
        publications = db.table(schema.TENANT_RUN_PUBLICATIONS.name)
        guard = (
            f"status = 'RUNNING' AND event != '{PUBLISHING}' AND NOT EXISTS "
            f"(SELECT 1 FROM {publications} WHERE pipeline_logging_id = @run_id)"
        )
        flagged = _change(db, run, "cancel_requested", guard, changes, {})
        return None if flagged is None else Cancellation(flagged)

    def cancel(run: RunRecord) -> Cancellation | None:
        first, then = (flag, end) if run.status == "RUNNING" else (end, flag)
        return first(run) or then(run)

    changed = await db.call(lambda: cancel(run))
    if changed is None and known is not None:
        # Neither guard held: the run has ended since, unless `known` named it wrongly.
        found = await get_run(db, tenant_id, run_id)
        if found is None or found.status not in ("PENDING", "RUNNING"):
            return Cancellation(found)
        changed = await db.call(lambda: cancel(found))
    if changed is not None:
        return changed
    after = await get_run(db, tenant_id, run_id)
    # RUNNING, yet not flagged: it is publishing or has published (it ends COMPLETE).
    too_late = after is not None and after.status == "RUNNING" and not after.cancel_requested
    return Cancellation(after, published=too_late)


async def heartbeat(db: Central, run_ids: list[str], worker_id: str) -> None:
    if not run_ids:
        return
    await db.call(
        lambda: db.runner.execute(
            f"INSERT INTO {db.table(HEARTBEATS.name)} (pipeline_logging_id, worker_id, beat_at) "
            "SELECT id, @worker_id, CURRENT_TIMESTAMP() FROM UNNEST(@ids) AS id",
            {"worker_id": worker_id, "ids": list(run_ids)},
        )
    )


async def runs_now(db: Central, runs: list[RunRecord]) -> list[RunRecord]:
    """The newest state of each of the runs (of any tenant) that exists."""
    if not runs:
        return []
    rows = await db.call(
        lambda: db.query(
            f"SELECT {SELECT_RUN} FROM ({latest_events_sql(db, RUNS_NAMED)})",
            tenants=sorted({run.tenant_id for run in runs}),
            ids=[run.pipeline_logging_id for run in runs],
            oldest=min(run.created_at for run in runs),
        )
    )
    return [run_from_row(row) for row in rows]


async def requeue_run(db: Central, run: RunRecord, now: datetime, count_attempt: bool) -> bool:
    requeued = await db.call(
        lambda: _change(
            db,
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
            _interrupt_steps_sql(db),
        )
    )
    return requeued is not None


async def published(db: Central, run_id: str) -> bool:
    rows = await db.call(
        lambda: db.query(
            f"SELECT COUNT(*) FROM {db.table(schema.TENANT_RUN_PUBLICATIONS.name)} "
            "WHERE pipeline_logging_id = @id",
            id=run_id,
        )
    )
    return bool(rows and rows[0][0])


def begin_publication(db: Central, pipelines: Runner, run: RunRecord) -> bool:
    """Before a publication's writes that cannot be in its transaction (tables created,
    truncated tables replaced by copy jobs, views): marks the run publishing, if this
    execution may publish (RUNNING for its worker and attempt, no cancel asked). A cancel
    is refused from then on, as once the run has published. Blocking, on `pipelines`."""
    guard = f"{OWNER_GUARD} AND NOT IFNULL(cancel_requested, FALSE)"
    params = {"worker_id": run.worker_id, "attempt": run.attempt}
    return _change(db, run, PUBLISHING, guard, {}, params, runner=pipelines) is not None


def publish(
    db: Central,
    pipelines: Runner,
    run: RunRecord,
    statements: list[str],
    params: Mapping[str, Any],
) -> bool:
    """The publishing transaction (see `Warehouse.publish`), blocking, on the `pipelines`
    runner: the staged writes and the publication record commit together, only while the
    run is RUNNING for this worker and attempt, and no cancel was asked. It takes the
    tenant's sequence like every run change, so it conflicts with (and is ordered against)
    a concurrent claim, requeue or cancel: a replica whose lease ran out cannot publish
    next to the one that took the run over, and a cancel flags a run that has not
    published (`request_cancel`) or none."""
    publications = db.table(schema.TENANT_RUN_PUBLICATIONS.name)
    latest = latest_events_sql(db, OF_RUN)
    body = "\n".join(statements)
    script = f"""
            DECLARE next_seq INT64;
            DECLARE owned BOOL;
            BEGIN TRANSACTION;
            {next_seq_sql(db, run.tenant_id)}
            SET owned = EXISTS (SELECT 1 FROM ({latest})
                                WHERE {OWNER_GUARD} AND NOT IFNULL(cancel_requested, FALSE))
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
    rows = db.transaction(
        script,
        {
            **params,
            **_of(run),
            "worker_id": run.worker_id,
            "attempt": run.attempt,
        },
        pipelines,
        PUBLISH_TIMEOUT,
    )
    return bool(rows and rows[0][0])


# -- steps and data quality -----------------------------------------------------------------


async def save_steps(db: Central, steps: Sequence[StepRecord]) -> None:
    """Appends a row for each of `steps`, in one INSERT."""
    names = STEP_COLUMNS.split(", ")
    params: dict[str, Any] = {}
    rows = []
    for i, step in enumerate(steps):
        values = {n: getattr(step, n) for n in names}
        values["error_message"] = step.error_message or None
        params |= {f"{n}_{i}": v for n, v in typed(schema.TENANT_STEP_LOGS, values).items()}
        rows.append(f"({', '.join(f'@{n}_{i}' for n in names)}, CURRENT_TIMESTAMP())")
    await db.call(
        lambda: db.runner.query(
            f"INSERT INTO {db.table(STEP_EVENTS.name)} ({STEP_COLUMNS}, recorded_at) "
            f"VALUES {', '.join(rows)}",
            params,
        )
    )


def _steps_sql(db: Central, columns: str) -> str:
    """The steps of run `@id` of tenant `@t` (its newest attempt's), in order."""
    latest = latest_steps_sql(db, "tenant_id = @t AND pipeline_logging_id = @id")
    return (
        f"SELECT {columns} FROM ({latest}) WHERE run_attempt = ("
        f"SELECT MAX(run_attempt) FROM {db.table(STEP_EVENTS.name)} "
        "WHERE tenant_id = @t AND pipeline_logging_id = @id) "
        "ORDER BY step_index, step_start_time"
    )


async def list_steps(db: Central, tenant_id: str, run_id: str) -> list[StepRecord]:
    rows = await db.call(lambda: db.query(_steps_sql(db, STEP_COLUMNS), t=tenant_id, id=run_id))
    return [step_from_row(row) for row in rows]


async def run_with_steps(
    db: Central, tenant_id: str, run_id: str
) -> tuple[RunRecord | None, list[StepRecord]]:
    """The run and its steps in one query: the steps as an array of the run's row."""
    latest = latest_events_sql(db, "tenant_id = @t AND pipeline_logging_id = @id")
    steps = _steps_sql(db, f"AS STRUCT {STEP_COLUMNS}")
    rows = await db.call(
        lambda: db.query(
            f"SELECT {SELECT_RUN}, ARRAY({steps}) AS steps FROM ({latest})", t=tenant_id, id=run_id
        )
    )
    if not rows:
        return None, []
    *run, steps_found = rows[0]
    names = STEP_COLUMNS.split(", ")
    return run_from_row(run), [step_from_row([s[n] for n in names]) for s in steps_found or []]


async def add_dq_results(db: Central, run: RunRecord, results: list[DqRecord]) -> RunRecord | None:
    """Appends the results; returns the run's new state when they changed it (failed `warn`
    checks add to its `warnings`), else None."""
    if not results:
        return None
    names = DQ_COLUMNS.split(", ")
    params: dict[str, Any] = {}
    rows = []
    for i, result in enumerate(results):
        rows.append("(" + ", ".join(f"@{n}_{i}" for n in names) + ")")
        values = typed(schema.TENANT_DQ_RESULTS, dict(zip(names, dq_values(result), strict=True)))
        params.update({f"{n}_{i}": v for n, v in values.items()})
    insert = (
        f"INSERT INTO {db.table(schema.TENANT_DQ_RESULTS.name)} ({DQ_COLUMNS}) "
        f"VALUES {', '.join(rows)};"
    )
    warnings = sum(r.warns for r in results)
    if not warnings:  # the run is unchanged: no need to take the tenant's sequence
        await db.call(lambda: db.runner.query(insert, params))
        return None
    params.update(worker_id=run.worker_id, attempt=run.attempt, warnings=warnings)
    return await db.call(
        lambda: _change(
            db,
            run,
            "dq_checked",
            OWNER_GUARD,
            {"warnings": "IFNULL(warnings, 0) + @warnings"},
            params,
            before=insert,
        )
    )


def _checks_sql(db: Central, columns: str, attempts: str) -> str:
    """The checks of run `@id` of tenant `@t` of `attempts`, in the order they ran."""
    results = db.table(schema.TENANT_DQ_RESULTS.name)
    return DQ_CHECKS.format(
        columns=columns, results=results, tenant="@t", run="@id", attempts=attempts
    )


async def list_dq_results(db: Central, tenant_id: str, run_id: str, attempt: int) -> list[DqRecord]:
    sql = _checks_sql(db, DQ_COLUMNS, "IFNULL(run_attempt, 1) = @a")
    rows = await db.call(lambda: db.query(sql, t=tenant_id, id=run_id, a=attempt))
    return [dq_from_row(row) for row in rows]


async def run_with_checks(
    db: Central, tenant_id: str, run_id: str
) -> tuple[RunRecord | None, list[DqRecord]]:
    """The run and its current attempt's checks in one query: the checks of every attempt
    as an array of the run's row (rarely more than one), those of its attempt kept."""
    latest = latest_events_sql(db, "tenant_id = @t AND pipeline_logging_id = @id")
    checks = _checks_sql(db, f"AS STRUCT {DQ_COLUMNS}", "TRUE")
    rows = await db.call(
        lambda: db.query(
            f"SELECT {SELECT_RUN}, ARRAY({checks}) AS checks FROM ({latest})",
            t=tenant_id,
            id=run_id,
        )
    )
    if not rows:
        return None, []
    *found, every = rows[0]
    run = run_from_row(found)
    names = DQ_COLUMNS.split(", ")
    checks_found = (dq_from_row([c[n] for n in names]) for c in every or [])
    return run, [check for check in checks_found if check.run_attempt == run.attempt]


def _run_params(run: RunRecord) -> dict[str, Any]:
    return typed(
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
            "idempotency_key": run.idempotency_key or None,
            "attempt": run.attempt,
            "worker_id": run.worker_id or None,
            "heartbeat_at": None,
            "cancel_requested": run.cancel_requested,
            "warnings": run.warnings,
            "trace_id": run.trace_id or None,
        },
    )
