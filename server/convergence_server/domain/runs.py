"""Pipeline runs: triggering (validated, idempotent), reading, listing, cancelling, watching."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from convergence_server.domain.auth import Caller
from convergence_server.domain.quotas import (
    PlanBook,
    concurrency_wait,
    concurrent_exceeded,
    daily_exceeded,
)
from convergence_server.engine.templates import NAME_PATTERN, Catalog, ParameterError, Template
from convergence_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    echo,
)
from convergence_server.storage import Store
from convergence_server.storage.records import (
    RunCursor,
    RunFilter,
    RunLimits,
    RunRecord,
    StepRecord,
)

PENDING, RUNNING, COMPLETE, FAILED = "PENDING", "RUNNING", "COMPLETE", "FAILED"
TERMINAL = frozenset({COMPLETE, FAILED})
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
IDEMPOTENCY_WINDOW = timedelta(hours=24)
TRIGGERED_MESSAGE = "Pipeline triggered successfully (async mode)"
REPLAYED_MESSAGE = "Pipeline already triggered with this idempotency key (original run returned)"
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)
MAX_TRIGGER_BY = 256


@dataclass(frozen=True)
class TriggerRequest:
    tenant_id: str
    provider: str
    domain: str
    template: str
    trigger_by: str
    date: str
    parameters: dict[str, str]
    idempotency_key: str
    user_id: str


@dataclass(frozen=True)
class Triggered:
    run: RunRecord
    created: bool

    @property
    def message(self) -> str:
        return TRIGGERED_MESSAGE if self.created else REPLAYED_MESSAGE


@dataclass(frozen=True)
class RunQuery:
    limit: int = 0
    status: str = ""
    pipeline_id: str = ""
    start_date: str = ""
    end_date: str = ""
    page_token: str = ""


@dataclass(frozen=True)
class RunPage:
    runs: list[RunRecord]
    next_page_token: str


def _invalid(field: str, issue: str, message: str | None = None) -> InvalidArgument:
    return InvalidArgument(message or f"Invalid {field}", [FieldViolation(field, issue)])


class RunEvents:
    """In-process notifications of run changes, for watchers (a hint: they poll too)."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[None]]] = {}

    def publish(self, run_id: str) -> None:
        for queue in self._queues.get(run_id, ()):
            queue.put_nowait(None)

    def subscribe(self, run_id: str) -> asyncio.Queue[None]:
        queue: asyncio.Queue[None] = asyncio.Queue()
        self._queues.setdefault(run_id, set()).add(queue)
        return queue

    def unsubscribe(self, run_id: str, queue: asyncio.Queue[None]) -> None:
        queues = self._queues.get(run_id, set())
        queues.discard(queue)
        if not queues:
            self._queues.pop(run_id, None)


class Runs:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        plans: PlanBook,
        events: RunEvents,
        wake_executor: Callable[[], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        watch_poll_seconds: float = 1.0,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._plans = plans
        self._events = events
        self._wake_executor = wake_executor
        self._clock = clock
        self._watch_poll_seconds = watch_poll_seconds

    # -- triggering ---------------------------------------------------------------------

    def template(self, request: TriggerRequest) -> Template:
        for field in ("provider", "domain", "template"):
            value = getattr(request, field)
            if not NAME_PATTERN.fullmatch(value):
                raise _invalid(field, f"must match {NAME_PATTERN.pattern}")
        template = self._catalog.get(request.provider, request.domain, request.template)
        if template is None:
            raise NotFound(
                f"No pipeline template {request.provider}/{request.domain}/{request.template}"
            )
        return template

    async def trigger(self, caller: Caller, request: TriggerRequest) -> Triggered:
        template = self.template(request)
        given = dict(request.parameters)
        if request.date:
            if "date" in given and given["date"] != request.date:
                raise _invalid("date", "is given twice with different values")
            given["date"] = request.date
        try:
            values = template.resolve_parameters(given, self._clock().date())
        except ParameterError as exc:
            field = exc.name if exc.name == "date" else f"parameters.{exc.name}"
            raise _invalid(field, exc.issue, f"Invalid parameter {echo(exc.name)}") from None
        if len(request.trigger_by) > MAX_TRIGGER_BY:
            raise _invalid("trigger_by", f"must be at most {MAX_TRIGGER_BY} characters")
        key = request.idempotency_key
        if key and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise _invalid("idempotency_key", f"must match {_IDEMPOTENCY_KEY.pattern}")
        now = self._clock()
        run = RunRecord(
            pipeline_logging_id=str(uuid.uuid4()),
            pipeline_id=f"{caller.tenant_id}-{template.provider}-{template.domain}-{template.name}",
            tenant_id=caller.tenant_id,
            provider=template.provider,
            domain=template.domain,
            template=template.name,
            status=PENDING,
            trigger_type="api",
            trigger_by=request.trigger_by,
            user_id=request.user_id,
            parameters={
                k: v.isoformat() if isinstance(v, date) else str(v) for k, v in values.items()
            },
            created_at=now,
            idempotency_key=key,
        )
        plan = await self._plans.plan_of(caller.tenant_id)
        limits = RunLimits(plan.daily_pipeline_runs, plan.concurrent_pipeline_runs)
        admission = await self._store.create_run(run, now - IDEMPOTENCY_WINDOW, limits)
        if admission.refused == "daily":
            raise daily_exceeded(caller.tenant_id, admission.used, limits.daily, now)
        if admission.refused == "concurrent":
            wait = concurrency_wait(await self._store.typical_run_ms(caller.tenant_id))
            raise concurrent_exceeded(caller.tenant_id, admission.used, limits.concurrent, wait)
        stored, created = admission.run, admission.created
        assert stored is not None
        if created:
            self._wake_executor()
        elif (stored.pipeline_id, stored.parameters) != (run.pipeline_id, run.parameters):
            raise FailedPrecondition(
                f"Idempotency key {key!r} was used within 24 hours for another request "
                f"(run {stored.pipeline_logging_id}); use a new key for a different run"
            )
        return Triggered(stored, created)

    # -- reading ------------------------------------------------------------------------

    async def get(self, caller: Caller, run_id: str) -> RunRecord:
        run = (
            await self._store.get_run(caller.tenant_id, run_id)
            if _RUN_ID.fullmatch(run_id)
            else None
        )
        if run is None:
            raise NotFound(f"No run {echo(run_id)}")
        return run

    async def steps(self, caller: Caller, run_id: str) -> list[StepRecord]:
        await self.get(caller, run_id)
        return await self._store.list_steps(caller.tenant_id, run_id)

    async def list_runs(self, caller: Caller, query: RunQuery) -> RunPage:
        limit = query.limit or DEFAULT_LIMIT
        if not 1 <= limit <= MAX_LIMIT:
            raise _invalid("limit", f"must be from 1 to {MAX_LIMIT}")
        where = RunFilter(
            tenant_id=caller.tenant_id,
            status=query.status,
            pipeline_id=query.pipeline_id,
            created_from=_day_start(query.start_date, "start_date"),
            created_before=_day_end(query.end_date, "end_date"),
        )
        after = _decode_token(query.page_token, where) if query.page_token else None
        runs = await self._store.list_runs(where, after, limit + 1)
        more = len(runs) > limit
        runs = runs[:limit]
        token = _encode_token(runs[-1], where) if more else ""
        return RunPage(runs, token)

    # -- cancelling and watching ----------------------------------------------------------

    async def cancel(self, caller: Caller, run_id: str) -> RunRecord:
        run = await self.get(caller, run_id)
        if run.status in TERMINAL:
            raise FailedPrecondition(f"Run {run_id} has already ended ({run.status})")
        updated = await self._store.request_cancel(caller.tenant_id, run_id, self._clock())
        self._events.publish(run_id)
        return updated or run

    async def watch(
        self, caller: Caller, run_id: str
    ) -> AsyncIterator[tuple[RunRecord, list[StepRecord]]]:
        """The run and its steps now, then at every change, until it has ended."""
        run = await self.get(caller, run_id)
        queue = self._events.subscribe(run_id)
        try:
            last: tuple[RunRecord, list[StepRecord]] | None = None
            while True:
                steps = await self._store.list_steps(caller.tenant_id, run_id)
                if last is None or (run, steps) != last:
                    last = (run, steps)
                    yield run, steps
                if run.status in TERMINAL:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue.get(), self._watch_poll_seconds)
                run = await self.get(caller, run_id)
        finally:
            self._events.unsubscribe(run_id, queue)


def _text(value: object) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def _parse_day(value: str, field: str) -> date:
    try:
        if not _DAY.fullmatch(value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise _invalid(field, "must be a date YYYY-MM-DD") from None


def _day_start(value: str, field: str) -> datetime | None:
    if not value:
        return None
    return datetime.combine(_parse_day(value, field), datetime.min.time(), UTC)


def _day_end(value: str, field: str) -> datetime | None:
    start = _day_start(value, field)
    return None if start is None else start + timedelta(days=1)


def _filter_digest(where: RunFilter) -> str:
    text = json.dumps(
        [where.status, where.pipeline_id, str(where.created_from), str(where.created_before)]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _encode_token(last: RunRecord, where: RunFilter) -> str:
    payload = {
        "c": last.created_at.isoformat(),
        "i": last.pipeline_logging_id,
        "f": _filter_digest(where),
    }
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _decode_token(token: str, where: RunFilter) -> RunCursor:
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor = RunCursor(datetime.fromisoformat(payload["c"]), str(payload["i"]))
        digest = payload["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise _invalid("page_token", "is not a token this server issued") from None
    if digest != _filter_digest(where):
        raise _invalid("page_token", "was issued for other filters; keep the filters unchanged")
    return cursor
