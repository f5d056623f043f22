"""Schedules: pipelines that run themselves, each slot at most once.

A slot is an instant of the schedule's cron expression in its time zone (`domain.cron`).
A trigger (Cloud Scheduler's call, the operator's, or the server's own ticker, all the same
code) starts every due slot: past, after the schedule's `last_slot`, and kept by its
catch-up policy. Exactly once rests on two things, both in the store's admission
transaction: a slot's run is created with the idempotency key `schedule/{schedule_id}/{slot}`,
and the schedule's record of the slot (its new `last_slot`, or the backfill's place) is
written with it, over the version it was read at. A crash leaves both or neither; a
second trigger, replica or retry that read the schedule before the record finds the run
already there (ALREADY_STARTED) and its stale record refused, and stops; and no new run is
admitted from a reading older than the schedule (a pause, a change or a deletion since,
on any replica). The next trigger goes on from whatever won.

Nothing is lost: a slot refused by a plan limit is not passed, so it stays due and starts
at a later trigger, until the catch-up policy no longer keeps it; then it is recorded as
skipped, with the reason, in the schedule and in `tenants.tenant_schedule_skips`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from convergence_server import metrics
from convergence_server.domain.access import AccessLog, actor_of
from convergence_server.domain.auth import Caller
from convergence_server.domain.cron import Cron, CronError
from convergence_server.domain.quotas import PlanBook
from convergence_server.domain.runs import ID_PATTERN, PageTokens, Runs, invalid, new_run
from convergence_server.engine.templates import (
    ALLOW_SHRINK,
    HIDDEN_ISSUE,
    NAME_PATTERN,
    Catalog,
    Template,
    TemplateError,
    has_hidden_characters,
    parse_date,
)
from convergence_server.errors import (
    ConvergenceError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
)
from convergence_server.storage import Store
from convergence_server.storage.locks import KeyedTurns
from convergence_server.storage.records import RunRecord, ScheduleRecord, SkipRecord

CATCH_UP = ("none", "latest", "all")
DEFAULT_CATCH_UP = "latest"
DEFAULT_CATCH_UP_MAX = 24
MAX_CATCH_UP = 1000
# With `catch_up: none`, how late a trigger may come for a slot to still run.
ON_TIME = timedelta(minutes=10)
MAX_BACKFILL_SLOTS = 1000
# Slots of one schedule a trigger starts at most (the plan's limits usually stop it first).
MAX_SLOTS_PER_TRIGGER = 100
# Due schedules read at once; a trigger reads page after page until none is left.
DUE_PAGE = 2_000
# Slot results a trigger's answer lists at most (so that it stays well under a megabyte);
# its message counts them all.
MAX_REPORTED_SLOTS = 2_000
# Tenants processed at once by an operator-wide trigger.
TENANTS_AT_ONCE = 32
# A trigger starts no new slot after this long and answers with what it did: the slots
# left stay due for the next trigger (Envoy ends a REST call after 60 s).
TRIGGER_BUDGET_SECONDS = 30.0
# Skipped slots are counted up to this many (an every-minute schedule down for weeks).
MAX_SKIP_COUNT = 10_000
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_CREATED_BY = 256
KEY_PREFIX = "schedule/"
_BINDING = re.compile(r"\{slot_date(?:([+-])(\d{1,3}))?\}", re.ASCII)
_SLOT_KEY = re.compile(
    rf"{KEY_PREFIX}({ID_PATTERN.pattern})/(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ)", re.ASCII
)
log = logging.getLogger(__name__)
UPDATABLE = ("cron", "time_zone", "parameters", "catch_up", "catch_up_max")
# Fields an update may carry only with their current value (a schedule read and sent back
# whole), named as in the record too; `paused` changes by pause and resume.
FIXED = frozenset({"provider", "domain", "template", "created_by", "paused"})
# What the ticker counts down as a backfill runs: a copy read a moment ago may be behind,
# so an update's value is ignored, as OUTPUT_ONLY fields are.
IGNORED = frozenset({"backfill_slots_left"})

STARTED, ALREADY_STARTED, QUOTA_EXCEEDED, PAUSED, SKIPPED, FAILED = (
    "STARTED",
    "ALREADY_STARTED",
    "QUOTA_EXCEEDED",
    "PAUSED",
    "SKIPPED",
    "FAILED",
)


def slot_key(schedule_id: str, slot: datetime) -> str:
    """The idempotency key of a slot's run: no API caller can send it (`/` is refused)."""
    return f"{KEY_PREFIX}{schedule_id}/{slot.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def slot_of(run: RunRecord) -> tuple[str, datetime] | None:
    """The schedule id and slot of a run a schedule started, else None."""
    matched = _SLOT_KEY.fullmatch(run.idempotency_key)
    if matched is None:
        return None
    return matched[1], datetime.strptime(matched[2], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class ScheduleSpec:
    """A new schedule as the caller asks for it (empty values take the defaults)."""

    provider: str
    domain: str
    template: str
    cron: str
    time_zone: str
    parameters: dict[str, str]
    catch_up: str
    catch_up_max: int
    created_by: str
    paused: bool


@dataclass(frozen=True)
class SlotOutcome:
    """What a trigger did with one due slot (or one run of skipped slots)."""

    schedule_id: str
    tenant_id: str
    slot: datetime
    outcome: str
    run: RunRecord | None = None
    reason: str = ""
    retry_after: int = 0
    skipped_count: int = 0


@dataclass(frozen=True)
class SchedulePage:
    schedules: list[ScheduleRecord]
    next_page_token: str


def bind(parameters: dict[str, str], day: date) -> dict[str, str]:
    """The parameters with `{slot_date}` / `{slot_date-N}` / `{slot_date+N}` replaced."""

    def value(matched: re.Match[str]) -> str:
        shift = int(matched[2] or 0) * (-1 if matched[1] == "-" else 1)
        return (day + timedelta(days=shift)).isoformat()

    return {name: _BINDING.sub(value, text) for name, text in parameters.items()}


def check_schedule_hints(catalog: Catalog) -> None:
    """Raises `TemplateError` naming the first template whose `schedule:` (the default cron
    of its schedules) is not a valid 5-field cron expression."""
    for template in sorted(catalog.templates.values(), key=lambda t: t.key):
        if template.schedule:
            try:
                Cron.parse(template.schedule)
            except CronError as exc:
                raise TemplateError(f"{template.path}: schedule: {exc.issue}") from None


class Schedules:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        plans: PlanBook,
        runs: Runs,
        page_tokens: PageTokens,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        access: AccessLog | None = None,
        on_skipped: Callable[[SlotOutcome], None] = lambda outcome: None,
    ) -> None:
        self._access = access
        self._on_skipped = on_skipped  # slots that will never run (the webhook's alert)
        self._store = store
        self._catalog = catalog
        self._plans = plans
        self._runs = runs
        self._page_tokens = page_tokens
        self._clock = clock
        # One trigger at a time per tenant in this process (the ticker and calls), so they
        # do not redo each other's work; other processes are kept apart by the store.
        self._turns = KeyedTurns()
        self._turns_ended: dict[str, int] = {}

    # -- managing ---------------------------------------------------------------------------

    async def create(self, caller: Caller, spec: ScheduleSpec, user_id: str) -> ScheduleRecord:
        template = self._template(spec.provider, spec.domain, spec.template)
        cron_text = spec.cron or template.schedule
        if not cron_text:
            raise invalid("cron", "is required: the template suggests no schedule")
        created_by = spec.created_by or user_id
        if len(created_by) > MAX_CREATED_BY:
            raise invalid("created_by", f"must be at most {MAX_CREATED_BY} characters")
        if has_hidden_characters(created_by):
            raise invalid("created_by", HIDDEN_ISSUE)
        now = self._clock()
        draft = ScheduleRecord(
            schedule_id=str(uuid.uuid4()),
            tenant_id=caller.tenant_id,
            provider=template.provider,
            domain=template.domain,
            template=template.name,
            cron=cron_text,
            time_zone=spec.time_zone or "UTC",
            parameters=dict(spec.parameters),
            catch_up=spec.catch_up or DEFAULT_CATCH_UP,
            catch_up_max=spec.catch_up_max or DEFAULT_CATCH_UP_MAX,
            paused=spec.paused,
            created_by=created_by,
            created_at=now,
            updated_at=now,
            last_slot=now,
            next_slot=None,
        )
        schedule = self._checked(draft, template)
        plan = await self._plans.plan_of(caller.tenant_id)
        had = await self._store.create_schedule(schedule, plan.max_schedules)
        if had >= plan.max_schedules:
            raise QuotaExceeded(
                f"Schedule limit reached: plan {plan.name} allows {plan.max_schedules} "
                f"schedules and the tenant has {had}. Delete one "
                "(DELETE /api/v1/schedules/SCHEDULE_ID) or change the plan.",
                f"tenant:{caller.tenant_id}:max_schedules",
                None,
            )
        detail = f"{schedule.provider}/{schedule.domain}/{schedule.template} {schedule.cron}"
        return await self._audited(caller, "schedule.created", schedule, detail)

    async def _audited(
        self, caller: Caller, event: str, schedule: ScheduleRecord, detail: str = ""
    ) -> ScheduleRecord:
        if self._access is not None:
            actor = actor_of(caller)
            await self._access.record(caller.tenant_id, event, actor, schedule.schedule_id, detail)
        return schedule

    async def get(self, caller: Caller, schedule_id: str) -> ScheduleRecord:
        if not ID_PATTERN.fullmatch(schedule_id.lower()):
            raise invalid("schedule_id", "must be a schedule id (a UUID, as create returns it)")
        schedule = await self._store.get_schedule(caller.tenant_id, schedule_id.lower())
        if schedule is None:
            raise NotFound(f"No schedule {schedule_id}")
        return schedule

    async def page(self, caller: Caller, limit: int, page_token: str) -> SchedulePage:
        limit = limit or DEFAULT_LIMIT
        if not 1 <= limit <= MAX_LIMIT:
            raise invalid("limit", f"must be from 1 to {MAX_LIMIT}")
        scope = f"schedules:{caller.tenant_id}"
        after = self._page_tokens.read(page_token, scope) if page_token else None
        found = await self._store.list_schedules(caller.tenant_id, after, limit + 1)
        page = found[:limit]
        token = ""
        if len(found) > limit:
            token = self._page_tokens.issue(page[-1].created_at, page[-1].schedule_id, scope)
        return SchedulePage(page, token)

    async def update(
        self, caller: Caller, schedule_id: str, changes: dict[str, Any]
    ) -> ScheduleRecord:
        """Applies `changes` (field name to value): the fields of `UPDATABLE`, and those of
        `FIXED` with the value they have (sent back as read; another value is refused)."""
        for field in changes:
            if field not in UPDATABLE and field not in FIXED and field not in IGNORED:
                raise _unchangeable(field)
        updates = {k: v for k, v in changes.items() if k in UPDATABLE}

        def updated(schedule: ScheduleRecord) -> ScheduleRecord:
            for field, value in changes.items():
                if field in FIXED and getattr(schedule, field) != value:
                    raise _unchangeable(field)
            return self._updated(schedule, updates)

        before, schedule = await self._change(caller, schedule_id, updated)
        # The audit names the fields whose value changed; a change of nothing is no event.
        changed = [f for f in updates if getattr(before, f) != getattr(schedule, f)]
        if not changed:
            return schedule
        return await self._audited(caller, "schedule.updated", schedule, ", ".join(changed))

    async def delete(self, caller: Caller, schedule_id: str) -> ScheduleRecord:
        _, schedule = await self._change(caller, schedule_id, lambda s: replace(s, deleted=True))
        return await self._audited(caller, "schedule.deleted", schedule)

    async def pause(self, caller: Caller, schedule_id: str) -> ScheduleRecord:
        """Pauses; pausing a paused schedule changes nothing and is no event."""
        before, schedule = await self._change(
            caller, schedule_id, lambda s: replace(s, paused=True)
        )
        if before.paused:
            return schedule
        return await self._audited(caller, "schedule.paused", schedule)

    async def resume(self, caller: Caller, schedule_id: str) -> ScheduleRecord:
        """Unpauses. Only `catch_up: all` replays the paused period (up to its maximum):
        with `none` and `latest` the slots that came due while paused are skipped.
        Resuming a schedule that is not paused changes nothing and is no event."""

        def resumed(s: ScheduleRecord) -> ScheduleRecord:
            return replace(s, paused=False) if s.paused else s

        before, schedule = await self._change(caller, schedule_id, resumed, skip_paused=True)
        if not before.paused:
            return schedule
        return await self._audited(caller, "schedule.resumed", schedule)

    async def backfill(
        self, caller: Caller, schedule_id: str, start_date: str, end_date: str
    ) -> tuple[ScheduleRecord, int]:
        days = []
        for field, text in (("start_date", start_date), ("end_date", end_date)):
            if not text:
                raise invalid(field, "is required (YYYY-MM-DD)")
            try:
                days.append(parse_date(text))
            except ValueError as exc:
                raise invalid(field, str(exc)) from None
        first, last = days
        if last < first:
            raise invalid("end_date", "must not be before start_date")
        counted = 0

        def backfilled(s: ScheduleRecord) -> ScheduleRecord:
            nonlocal counted
            if s.backfill_left:
                raise FailedPrecondition(
                    f"A backfill of schedule {s.schedule_id} is in progress "
                    f"({s.backfill_left} slots left); start another when it has run"
                )
            zone, now = ZoneInfo(s.time_zone), self._clock()
            if last > now.astimezone(zone).date():
                raise invalid("end_date", "must not be after today in the schedule's time zone")
            start = datetime.combine(first, datetime.min.time(), zone).astimezone(UTC)
            end = datetime.combine(last + timedelta(days=1), datetime.min.time(), zone)
            after = start - timedelta(seconds=1)
            until = min(end.astimezone(UTC) - timedelta(seconds=1), now)
            slots = Cron.parse(s.cron, s.time_zone).slots(after, until, MAX_BACKFILL_SLOTS + 1)
            if len(slots) > MAX_BACKFILL_SLOTS:
                raise invalid(
                    "end_date",
                    f"the range holds more than {MAX_BACKFILL_SLOTS} slots; backfill less",
                )
            if not slots:
                raise invalid("start_date", "the range holds no slot of the schedule")
            template = self._template(s.provider, s.domain, s.template)
            for slot in (slots[0], slots[-1]):  # e.g. `{slot_date-1}` before 2000-01-01
                self._check_parameters(s, template, slot)
            counted = len(slots)
            return replace(
                s, backfill_after=after, backfill_until=slots[-1], backfill_left=len(slots)
            )

        _, schedule = await self._change(caller, schedule_id, backfilled)
        detail = f"{start_date}..{end_date}: {counted} slots"
        return await self._audited(caller, "schedule.backfilled", schedule, detail), counted

    async def _change(
        self,
        caller: Caller,
        schedule_id: str,
        change: Callable[[ScheduleRecord], ScheduleRecord],
        skip_paused: bool = False,
    ) -> tuple[ScheduleRecord, ScheduleRecord]:
        """Applies `change` to the stored schedule, in its tenant's turn (so it waits for a
        trigger of this process to finish with the tenant rather than racing it), again if
        another process's trigger recorded progress first. Returns the schedule as `change`
        last found it, and after (the same when nothing changed)."""
        async with self._turns.get(caller.tenant_id):
            for _ in range(20):
                current = await self.get(caller, schedule_id)
                changed = change(current)
                if changed == current:
                    return current, current
                now = self._clock()
                skip = None
                if skip_paused and current.paused and changed.catch_up != "all":
                    changed, skip = self._skip_until(changed, now, "the schedule was paused")
                elif (changed.cron, changed.time_zone) != (current.cron, current.time_zone):
                    # The old cron's slots still due are not replayed: they are skipped.
                    passed, skip = self._skip_until(current, now, "the cron or time zone changed")
                    changed = replace(
                        changed,
                        skipped_slots=passed.skipped_slots,
                        last_skip_reason=passed.last_skip_reason,
                    )
                changed = replace(changed, version=current.version + 1, updated_at=now)
                if await self._store.save_schedule(changed, skip):
                    self._turn_ended(caller.tenant_id)
                    return current, changed
            raise FailedPrecondition(
                f"Schedule {schedule_id} kept changing concurrently; try again"
            )

    def _updated(self, schedule: ScheduleRecord, changes: dict[str, Any]) -> ScheduleRecord:
        changed = replace(schedule, **changes)
        if not changed.catch_up:
            changed = replace(changed, catch_up=DEFAULT_CATCH_UP)
        if not changed.catch_up_max:
            changed = replace(changed, catch_up_max=DEFAULT_CATCH_UP_MAX)
        if not changed.time_zone:
            changed = replace(changed, time_zone="UTC")
        template = self._template(schedule.provider, schedule.domain, schedule.template)
        if not changed.cron:
            changed = replace(changed, cron=template.schedule)
        if (changed.cron, changed.time_zone) != (schedule.cron, schedule.time_zone):
            # A new cron counts from now: the old one's missed slots are not replayed.
            now = self._clock()
            changed = replace(changed, last_slot=max(schedule.last_slot or now, now))
        return self._checked(changed, template)

    def _template(self, provider: str, domain: str, name: str) -> Template:
        for field, value in (("provider", provider), ("domain", domain), ("template", name)):
            if not NAME_PATTERN.fullmatch(value):
                raise invalid(field, f"must match {NAME_PATTERN.pattern}")
        template = self._catalog.get(provider, domain, name)
        if template is None:
            raise invalid(
                "template",
                f"{provider}/{domain}/{name} is not a pipeline template "
                "(GET /api/v1/pipelines lists them)",
            )
        return template

    def _checked(self, schedule: ScheduleRecord, template: Template) -> ScheduleRecord:
        """The schedule with its next slot, once every field is valid."""
        if schedule.catch_up not in CATCH_UP:
            raise invalid("catch_up", f"must be one of {', '.join(CATCH_UP)}")
        if not 1 <= schedule.catch_up_max <= MAX_CATCH_UP:
            raise invalid("catch_up_max", f"must be from 1 to {MAX_CATCH_UP}")
        try:
            cron = Cron.parse(schedule.cron, schedule.time_zone)
        except CronError as exc:
            raise invalid(exc.field, exc.issue) from None
        if ALLOW_SHRINK in schedule.parameters:
            raise invalid(
                f"parameters.{ALLOW_SHRINK}",
                "is for one run that must replace a day with fewer rows, never for a schedule",
            )
        for name, text in schedule.parameters.items():
            if "{slot_date" in text and not _BINDING.fullmatch(text):
                raise invalid(
                    f"parameters.{name}" if NAME_PATTERN.fullmatch(name) else "parameters",
                    "binds the slot as {slot_date}, {slot_date-N} or {slot_date+N} (N <= 999)",
                )
        last = schedule.last_slot or schedule.created_at
        upcoming = cron.next_after(last)
        self._check_parameters(schedule, template, upcoming or last)
        return replace(schedule, cron=cron.expression, time_zone=cron.time_zone, next_slot=upcoming)

    def _check_parameters(
        self, schedule: ScheduleRecord, template: Template, slot: datetime
    ) -> None:
        """The schedule's parameters, bound to `slot`, are what a trigger accepts."""
        day = slot.astimezone(ZoneInfo(schedule.time_zone)).date()
        try:
            self._runs.check_parameters(
                schedule.tenant_id, template, bind(schedule.parameters, day), day
            )
        except InvalidArgument as exc:
            # A schedule has no `date` field of its own: name the parameter as sent.
            raise InvalidArgument(
                exc.message,
                [
                    FieldViolation("parameters.date" if v.field == "date" else v.field, v.issue)
                    for v in exc.violations
                ],
            ) from None

    # -- triggering -------------------------------------------------------------------------

    async def trigger(self, tenant_id: str | None) -> list[SlotOutcome]:
        """Starts the due slots of the tenant's schedules (reporting paused ones), or of
        every tenant's (paused ones left out), a page of due schedules at a time."""
        outcomes = await self._trigger(tenant_id, time.monotonic() + TRIGGER_BUDGET_SECONDS)
        for outcome in outcomes:
            metrics.SCHEDULE_SLOTS.labels(outcome.outcome).inc()
            if outcome.outcome == SKIPPED:
                self._on_skipped(outcome)
        return outcomes

    async def _trigger(self, tenant_id: str | None, deadline: float) -> list[SlotOutcome]:
        outcomes: list[SlotOutcome] = []
        after: tuple[str, datetime, str] | None = None
        while True:
            # Which tenants' turns ended so far: a tenant whose turn ends after this point
            # may have moved its schedules on, and they are read again in its turn.
            turns_seen = dict(self._turns_ended)
            now = self._clock()
            due = await self._store.due_schedules(
                tenant_id, now, DUE_PAGE, after, paused=tenant_id is not None
            )
            outcomes += await self._trigger_page(due, turns_seen, now, deadline)
            if len(due) < DUE_PAGE or time.monotonic() > deadline:
                return outcomes
            last = due[-1]
            after = (last.tenant_id, last.created_at, last.schedule_id)

    async def _trigger_page(
        self,
        due: list[ScheduleRecord],
        turns_seen: dict[str, int],
        now: datetime,
        deadline: float,
    ) -> list[SlotOutcome]:
        by_tenant: dict[str, list[ScheduleRecord]] = {}
        for schedule in due:
            by_tenant.setdefault(schedule.tenant_id, []).append(schedule)
        gate = asyncio.Semaphore(TENANTS_AT_ONCE)

        async def one(tenant: str, read: list[ScheduleRecord]) -> list[SlotOutcome]:
            async with gate, self._turns.get(tenant):
                if time.monotonic() > deadline:
                    return []  # its slots stay due
                try:
                    at = now
                    if self._turns_ended.get(tenant, 0) != turns_seen.get(tenant, 0):
                        at = self._clock()
                        read = await self._store.due_schedules(tenant, at, DUE_PAGE)
                    return await self._trigger_tenant(read, at, deadline)
                finally:
                    self._turn_ended(tenant)

        results = await asyncio.gather(*(one(t, read) for t, read in by_tenant.items()))
        return [outcome for outcomes in results for outcome in outcomes]

    def _turn_ended(self, tenant_id: str) -> None:
        """Counts a turn of the tenant that may have changed its schedules: a trigger that
        read them before reads them again."""
        self._turns_ended[tenant_id] = self._turns_ended.get(tenant_id, 0) + 1

    async def _trigger_tenant(
        self, due: list[ScheduleRecord], now: datetime, deadline: float
    ) -> list[SlotOutcome]:
        """One tenant's due schedules, in its turn."""
        outcomes: list[SlotOutcome] = []
        for schedule in due:
            if time.monotonic() > deadline:
                break
            processed = await self._process(schedule, now, deadline)
            outcomes.extend(processed)
            if any(o.outcome == QUOTA_EXCEEDED for o in processed):
                break  # the tenant's limit: its other schedules wait too
        return outcomes

    async def _process(
        self, schedule: ScheduleRecord, now: datetime, deadline: float
    ) -> list[SlotOutcome]:
        if schedule.paused:
            due = schedule.next_slot if schedule.next_slot and schedule.next_slot <= now else None
            slot = due or now
            return [
                SlotOutcome(
                    schedule.schedule_id,
                    schedule.tenant_id,
                    slot,
                    PAUSED,
                    reason="the schedule is paused",
                )
            ]
        try:
            cron = Cron.parse(schedule.cron, schedule.time_zone)
            template = self._template(schedule.provider, schedule.domain, schedule.template)
        except (CronError, ConvergenceError) as exc:
            reason = exc.issue if isinstance(exc, CronError) else exc.message
            slot = schedule.next_slot or now
            return [
                SlotOutcome(schedule.schedule_id, schedule.tenant_id, slot, FAILED, reason=reason)
            ]
        outcomes: list[SlotOutcome] = []
        progress, skip = self._skip_missed(schedule, cron, now)
        ended = progress.backfill_until is not None and progress.backfill_until <= now
        backfill: list[datetime] = []
        if progress.backfill_left and progress.backfill_after and progress.backfill_until:
            backfill = cron.slots(
                progress.backfill_after, min(progress.backfill_until, now), MAX_SLOTS_PER_TRIGGER
            )
            if not backfill and ended:
                # Nothing left in the range (its slots changed with the cron): it is done.
                progress = replace(
                    progress, backfill_after=None, backfill_until=None, backfill_left=0
                )
        if progress != schedule:
            # Written first, on its own: a concurrent writer that came first (the same
            # skip recorded by another trigger, or the tenant's change) goes on from there.
            progress = replace(progress, version=schedule.version + 1)
            if not await self._store.save_schedule(progress, skip):
                return []
            if skip is not None:
                outcomes.append(self._skipped(skip))
        regular = cron.slots(progress.last_slot or now, now, MAX_SLOTS_PER_TRIGGER)
        queue = [(slot, False) for slot in regular] + [(slot, True) for slot in backfill]
        for slot, from_backfill in queue:
            if time.monotonic() > deadline:
                break  # the slot stays due: the next trigger starts it
            if from_backfill:
                left = progress.backfill_left - 1
                done = replace(
                    progress,
                    backfill_after=slot if left else None,
                    backfill_until=progress.backfill_until if left else None,
                    backfill_left=left,
                )
            else:
                done = replace(progress, last_slot=slot, next_slot=cron.next_after(slot))
            done = replace(done, version=progress.version + 1)
            started = await self._start(done, template, slot)
            if started is None:
                break  # the schedule changed since it was read: whoever changed it goes on
            outcome, recorded = started
            outcomes.append(outcome)
            if outcome.outcome not in (STARTED, ALREADY_STARTED) or not recorded:
                # Refused: the slot stays due, and so do the ones after it. Not recorded:
                # another writer moved the schedule on first; the next trigger goes on
                # from there (the slot's run exists once, by its key).
                break
            progress = done
        return outcomes

    def _skip_missed(
        self, schedule: ScheduleRecord, cron: Cron, now: datetime
    ) -> tuple[ScheduleRecord, SkipRecord | None]:
        """The schedule past the due slots its catch-up policy no longer keeps."""
        after = schedule.last_slot or schedule.created_at
        keep = schedule.catch_up_max if schedule.catch_up == "all" else 1
        newest = cron.newest(after, now, keep + 1)
        kept = newest[-keep:]
        if schedule.catch_up == "none":
            kept = [s for s in kept if now - s <= ON_TIME]
        if len(kept) == len(newest):
            return schedule, None
        last_skipped = newest[len(newest) - len(kept) - 1]
        if schedule.catch_up == "none":
            reason = "missed: catch_up none runs a slot only within 10 minutes of its time"
        else:
            reason = (
                f"missed: catch_up {schedule.catch_up} runs only the newest "
                f"{keep} missed slot{'s' if keep > 1 else ''}"
            )
        return self._skip_until(schedule, last_skipped, reason, cron)

    def _skip_until(
        self, schedule: ScheduleRecord, until: datetime, reason: str, cron: Cron | None = None
    ) -> tuple[ScheduleRecord, SkipRecord | None]:
        """The schedule past its slots up to `until`, and the record of those it skipped
        (counted up to `MAX_SKIP_COUNT`)."""
        cron = cron or Cron.parse(schedule.cron, schedule.time_zone)
        after = schedule.last_slot or schedule.created_at
        last = max(after, until)
        passed = replace(schedule, last_slot=last, next_slot=cron.next_after(last))
        newest = cron.newest(after, until, 1)
        first = cron.next_after(after)
        if not newest or first is None:
            return passed, None
        count = len(cron.slots(after, until, MAX_SKIP_COUNT))
        record = SkipRecord(
            schedule_id=schedule.schedule_id,
            tenant_id=schedule.tenant_id,
            first_slot=first,
            last_slot=newest[0],
            slot_count=count,
            reason=reason,
            recorded_at=self._clock(),
        )
        passed = replace(
            passed, skipped_slots=schedule.skipped_slots + count, last_skip_reason=reason
        )
        return passed, record

    def _skipped(self, skip: SkipRecord) -> SlotOutcome:
        return SlotOutcome(
            skip.schedule_id,
            skip.tenant_id,
            skip.last_slot,
            SKIPPED,
            reason=skip.reason,
            skipped_count=skip.slot_count,
        )

    async def _start(
        self, done: ScheduleRecord, template: Template, slot: datetime
    ) -> tuple[SlotOutcome, bool] | None:
        """Starts the slot's run, once (its key finds a run an earlier trigger started),
        and records the schedule as `done` with it, in one transaction; says whether the
        record was written. None: no run, as the schedule changed since it was read (a
        pause, a change, a deletion, another trigger's progress)."""

        def result(outcome: str, **more: Any) -> tuple[SlotOutcome, bool]:
            return SlotOutcome(done.schedule_id, done.tenant_id, slot, outcome, **more), False

        day = slot.astimezone(ZoneInfo(done.time_zone)).date()
        try:
            given = bind(done.parameters, day)
            values = self._runs.check_parameters(done.tenant_id, template, given, day)
        except ConvergenceError as exc:
            return result(FAILED, reason=exc.message)
        now = self._clock()
        run = new_run(
            done.tenant_id,
            template,
            values,
            "scheduler",
            done.created_by,
            "",
            slot_key(done.schedule_id, slot),
            now,
        )
        admission = await self._runs.admit(run, slot - timedelta(days=1), done)
        if admission.refused == "stale":
            return None
        if admission.refused:
            refusal = await self._runs.refusal(done.tenant_id, admission, now)
            return result(
                QUOTA_EXCEEDED, reason=refusal.message, retry_after=refusal.retry_after or 0
            )
        outcome = STARTED if admission.created else ALREADY_STARTED
        return SlotOutcome(
            done.schedule_id, done.tenant_id, slot, outcome, run=admission.run
        ), admission.progressed


class Ticker:
    """The server's own scheduler: every `seconds`, the operator-wide trigger. Calls from
    Cloud Scheduler may come as well; each slot still starts once."""

    def __init__(self, schedules: Schedules, seconds: float) -> None:
        self._schedules = schedules
        self._seconds = seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._seconds > 0:
            self._task = asyncio.create_task(self._tick(), name="scheduler-ticker")

    async def _tick(self) -> None:
        while True:
            try:
                # Bounded: a store that hangs delays the next tick, never stops the ticker.
                async with asyncio.timeout(max(60.0, 4 * self._seconds)):
                    outcomes = await self._schedules.trigger(None)
                started = sum(1 for o in outcomes if o.outcome == STARTED)
                if started:
                    log.info("scheduler tick", extra={"fields": {"runs_started": started}})
            except Exception:
                log.exception("scheduler tick failed; trying again at the next tick")
            await asyncio.sleep(self._seconds)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _unchangeable(field: str) -> InvalidArgument:
    return InvalidArgument(
        f"Invalid update_mask: {field[:64]!r} cannot be changed",
        [
            FieldViolation(
                "update_mask",
                f"only {', '.join(UPDATABLE)} can change; "
                "create another schedule for another pipeline",
            )
        ],
    )
