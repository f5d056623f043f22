"""Pipeline runs: triggering (validated, idempotent), reading (with steps and checks),
listing, cancelling, watching."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from convergence_server import faults, logs, metrics
from convergence_server.domain.auth import Caller, authorize_tenant
from convergence_server.domain.quotas import (
    PlanBook,
    concurrency_wait,
    concurrent_exceeded,
    daily_exceeded,
)
from convergence_server.engine.runner import SourcePolicy, SourceRefused, resolve_source
from convergence_server.engine.templates import (
    HIDDEN_ISSUE,
    NAME_PATTERN,
    PLACEHOLDER,
    Catalog,
    ParameterError,
    Template,
    has_hidden_characters,
    parameter_text,
    parse_date,
)
from convergence_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unavailable,
    echo,
)
from convergence_server.storage import Store
from convergence_server.storage.identifiers import IDENTIFIER_PATTERN
from convergence_server.storage.records import (
    Admission,
    DqRecord,
    RunCursor,
    RunFilter,
    RunLimits,
    RunRecord,
    ScheduleRecord,
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
ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)
_TENANT_ID = re.compile(IDENTIFIER_PATTERN.strip("^$"), re.ASCII)
MAX_TRIGGER_BY = 256
SHARED_WATCH_POLL_SECONDS = 1.0
EXCLUSIVE_WATCH_POLL_SECONDS = 15.0
# A pipeline id is TENANT-PROVIDER-DOMAIN-TEMPLATE: at most 50 + 3 * 64 + 3 characters.
MAX_PIPELINE_ID = 256
# Page tokens: the cursor (JSON) and its HMAC-SHA256 under a key of the server's, both
# base64url, joined by a dot. A token is read only once its MAC has been checked.
PAGE_TOKEN_LABEL = b"convergence page token"
MAX_PAGE_TOKEN = 512
_PAGE_TOKEN = re.compile(r"([A-Za-z0-9_-]{1,400})\.([A-Za-z0-9_-]{43})", re.ASCII)
FOREIGN_TOKEN_ISSUE = "is not a token this server issued"


def page_token_key(pepper: bytes) -> bytes:
    """The key that signs page tokens, derived from the key pepper: the same on every
    replica, and of no use for the API key hashes the pepper also protects."""
    return hmac.new(pepper, PAGE_TOKEN_LABEL, hashlib.sha256).digest()


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
    # The Idempotency-Key header, which must agree with the field when both are given.
    idempotency_header: str = ""


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


def invalid(field: str, issue: str, message: str | None = None) -> InvalidArgument:
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


Snapshot = tuple[RunRecord, list[StepRecord]]


@dataclass(eq=False)
class _Feed:
    """One watched run: its latest snapshot, and what its watchers wait on."""

    wake: asyncio.Queue[None]
    snapshot: Snapshot | None = None
    version: int = 0  # bumped when the snapshot changes
    reads: int = 0  # reads of the store done
    reading: bool = False
    error: BaseException | None = None
    watchers: int = 0
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class RunFeeds:
    """One poll of the store per watched run, however many watch it: each WatchRun stream
    follows its run's feed, which reads the run and its steps when a watcher joins, at
    every change this process makes (`RunEvents`) and every `poll_seconds` besides, until
    the run has ended."""

    def __init__(self, store: Store, events: RunEvents, poll_seconds: float) -> None:
        self._store = store
        self._events = events
        self._poll_seconds = poll_seconds
        self._feeds: dict[str, _Feed] = {}

    async def follow(self, tenant_id: str, run_id: str) -> AsyncGenerator[Snapshot, None]:
        """The run now (read after the call), then each change, until it has ended."""
        feed = self._feeds.get(run_id)
        if feed is None or feed.task is None or feed.task.done():
            # A feed that stopped (its run ended, or the store failed) reads no more: a
            # new one reads for this watcher; the old one's watchers finish with it.
            feed = _Feed(self._events.subscribe(run_id))
            self._feeds[run_id] = feed
            feed.task = asyncio.create_task(self._poll(feed, tenant_id, run_id))
        feed.watchers += 1
        # A read that began before this call may predate what the caller has seen.
        fresh = feed.reads + (2 if feed.reading else 1)
        feed.wake.put_nowait(None)
        seen = -1
        try:
            while True:
                changed = feed.changed
                snapshot = feed.snapshot
                # An end is final: however early its read began, nothing came after it.
                if (
                    snapshot is not None
                    and feed.version > seen
                    and (feed.reads >= fresh or snapshot[0].status in TERMINAL)
                ):
                    seen = feed.version
                    yield snapshot
                    # The one this watcher got: the feed may have read the end meanwhile,
                    # which is then this watcher's next update.
                    if snapshot[0].status in TERMINAL:
                        return
                    continue
                if feed.error is not None:
                    raise feed.error
                await changed.wait()
        finally:
            feed.watchers -= 1
            if not feed.watchers:
                if feed.task is not None:
                    feed.task.cancel()
                self._events.unsubscribe(run_id, feed.wake)
                if self._feeds.get(run_id) is feed:
                    del self._feeds[run_id]

    async def _poll(self, feed: _Feed, tenant_id: str, run_id: str) -> None:
        while True:
            feed.reading = True
            try:
                run, steps = await self._store.run_with_steps(tenant_id, run_id)
                if run is None:
                    raise NotFound(f"No run {run_id}")
            except Exception as exc:
                feed.error = exc
                feed.notify()
                return
            finally:
                feed.reading = False
            feed.reads += 1
            if feed.snapshot != (run, steps):
                feed.snapshot = (run, steps)
                feed.version += 1
            feed.notify()
            if run.status in TERMINAL:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(feed.wake.get(), self._poll_seconds)
            while not feed.wake.empty():  # changes made meanwhile: one read sees them all
                feed.wake.get_nowait()


class Runs:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        plans: PlanBook,
        events: RunEvents,
        wake_executor: Callable[[], None],
        *,
        sources: SourcePolicy,
        page_tokens: PageTokens,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        watch_poll_seconds: float | None = None,
        on_failed: Callable[[RunRecord], None] = lambda run: None,
    ) -> None:
        self._on_failed = on_failed  # a run ended FAILED (the webhook's alert)
        self._store = store
        self._catalog = catalog
        self._plans = plans
        self._events = events
        self._wake_executor = wake_executor
        self._sources = sources
        self._page_tokens = page_tokens
        self._clock = clock
        # A watcher wakes at every change this process makes (`RunEvents`) and polls the
        # store besides: often when other replicas share it, rarely when it is this
        # process's alone (a poll per watcher per second is what 50 watchers cost most).
        self._feeds = RunFeeds(
            store,
            events,
            watch_poll_seconds
            or (EXCLUSIVE_WATCH_POLL_SECONDS if store.exclusive else SHARED_WATCH_POLL_SECONDS),
        )

    # -- triggering ---------------------------------------------------------------------

    def template(self, request: TriggerRequest) -> Template:
        for field in ("provider", "domain", "template"):
            value = getattr(request, field)
            if not NAME_PATTERN.fullmatch(value):
                raise invalid(field, f"must match {NAME_PATTERN.pattern}")
        template = self._catalog.get(request.provider, request.domain, request.template)
        if template is None:
            raise NotFound(
                f"No pipeline template {request.provider}/{request.domain}/{request.template}"
            )
        return template

    async def trigger(self, caller: Caller, request: TriggerRequest) -> Triggered:
        """Checks the whole request (template, parameters, sources, labels) before the run
        is created: a refused trigger creates nothing and spends no quota."""
        if not _TENANT_ID.fullmatch(request.tenant_id):
            raise invalid("tenant_id", f"must match pattern {IDENTIFIER_PATTERN}")
        authorize_tenant(caller, request.tenant_id)
        template = self.template(request)
        given = dict(request.parameters)
        if request.date:
            if "date" in given and given["date"] != request.date:
                raise invalid("date", "is given twice with different values")
            given["date"] = request.date
        values = self.check_parameters(caller.tenant_id, template, given, self._clock().date())
        if len(request.trigger_by) > MAX_TRIGGER_BY:
            raise invalid("trigger_by", f"must be at most {MAX_TRIGGER_BY} characters")
        if has_hidden_characters(request.trigger_by):
            raise invalid("trigger_by", HIDDEN_ISSUE)
        header, key = request.idempotency_header, request.idempotency_key
        if header and key and header != key:
            raise InvalidArgument(
                "Conflicting idempotency keys",
                [FieldViolation("idempotency_key", "differs from the Idempotency-Key header")],
            )
        key = key or header
        if key and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise invalid("idempotency_key", f"must match {_IDEMPOTENCY_KEY.pattern}")
        now = self._clock()
        run = new_run(
            caller.tenant_id, template, values, "api", request.trigger_by, request.user_id, key, now
        )
        admission = await self.admit(run, now - IDEMPOTENCY_WINDOW)
        if admission.refused:
            raise await self.refusal(run.tenant_id, admission, now)
        stored = admission.run
        assert stored is not None
        if not admission.created and (stored.pipeline_id, stored.parameters) != (
            run.pipeline_id,
            run.parameters,
        ):
            raise FailedPrecondition(
                f"Idempotency key {echo(key)!r} was used within 24 hours for another request "
                f"(run {stored.pipeline_logging_id}); use a new key for a different run"
            )
        return Triggered(stored, admission.created)

    def check_parameters(
        self, tenant_id: str, template: Template, given: dict[str, str], today: date
    ) -> dict[str, Any]:
        """The run's typed parameter values, checked as a trigger checks them (every value,
        and every load step's source): raises `InvalidArgument` naming the bad one."""
        try:
            values = template.resolve_parameters(given, today)
        except ParameterError as exc:
            raise _parameterinvalid(exc.name, exc.issue) from None
        self._check_sources(tenant_id, template, given, values)
        return values

    async def admit(
        self, run: RunRecord, keys_valid_from: datetime, progress: ScheduleRecord | None = None
    ) -> Admission:
        """Stores the PENDING run within its tenant's plan limits (or finds the run its
        idempotency key started since `keys_valid_from`), with a schedule's `progress` in
        the same transaction (see `Store.create_run`), and wakes the executor."""
        plan = await self._plans.plan_of(run.tenant_id)
        limits = RunLimits(plan.daily_pipeline_runs, plan.concurrent_pipeline_runs)
        try:
            admission = await self._store.create_run(run, keys_valid_from, limits, progress)
            if faults.failing(faults.AFTER_ADMISSION):
                raise Unavailable(f"fault point {faults.AFTER_ADMISSION}: the answer was lost")
        except Exception:
            # A commit that failed as seen from here may have landed: look all the same
            # (a replay of its idempotency key would not say it was created).
            self._wake_executor()
            raise
        if admission.created:
            self._wake_executor()
        return admission

    async def refusal(self, tenant_id: str, admission: Admission, now: datetime) -> QuotaExceeded:
        """The error a refused admission answers with (its limit, when to try again)."""
        plan = await self._plans.plan_of(tenant_id)
        if admission.refused == "daily":
            return daily_exceeded(tenant_id, admission.used, plan.daily_pipeline_runs, now)
        wait = concurrency_wait(await self._store.typical_run_ms(tenant_id))
        return concurrent_exceeded(tenant_id, admission.used, plan.concurrent_pipeline_runs, wait)

    def _check_sources(
        self, tenant_id: str, template: Template, given: dict[str, str], values: dict[str, Any]
    ) -> None:
        """Every load step's source, as the run will resolve it, is one the tenant may read."""
        folders = self._sources.for_tenant(tenant_id)
        for step in template.steps:
            if step.kind != "load":
                continue
            try:
                resolve_source(step.source, values, folders)
            except SourceRefused as exc:
                used = [n for n in PLACEHOLDER.findall(step.source) if n in template.parameters]
                if not used:
                    raise FailedPrecondition(
                        f"The source of step {step.name} is not available: it {exc.issue}"
                    ) from None
                # The caller's own values first: one of them is the likelier culprit.
                name = next((n for n in used if n in given), used[0])
                raise _parameterinvalid(name, exc.issue) from None

    # -- reading ------------------------------------------------------------------------

    async def get(self, caller: Caller, run_id: str) -> RunRecord:
        run = await self._store.get_run(caller.tenant_id, _run_id(run_id))
        if run is None:
            raise NotFound(f"No run {run_id}")
        return run

    async def steps(self, caller: Caller, run_id: str) -> list[StepRecord]:
        # One read of both where the store can (on BigQuery one query job).
        run, steps = await self._store.run_with_steps(caller.tenant_id, _run_id(run_id))
        if run is None:
            raise NotFound(f"No run {run_id}")
        return steps

    async def checks(self, caller: Caller, run_id: str) -> list[DqRecord]:
        """The data-quality results of the run's current attempt (the one its `warnings`
        counts), in the order they ran."""
        # One read of both where the store can (on BigQuery one query job).
        run, checks = await self._store.run_with_checks(caller.tenant_id, _run_id(run_id))
        if run is None:
            raise NotFound(f"No run {run_id}")
        return checks

    async def list_runs(self, caller: Caller, query: RunQuery) -> RunPage:
        limit = query.limit or DEFAULT_LIMIT
        if not 1 <= limit <= MAX_LIMIT:
            raise invalid("limit", f"must be from 1 to {MAX_LIMIT}")
        if len(query.pipeline_id) > MAX_PIPELINE_ID:
            raise invalid("pipeline_id", f"must be at most {MAX_PIPELINE_ID} characters")
        where = RunFilter(
            tenant_id=caller.tenant_id,
            status=query.status,
            pipeline_id=query.pipeline_id,
            created_from=_day_start(query.start_date, "start_date"),
            created_before=_day_end(query.end_date, "end_date"),
        )
        if (
            where.created_from
            and where.created_before
            and where.created_before <= where.created_from
        ):
            raise invalid("end_date", "must not be before start_date")
        after = None
        if query.page_token:
            after = RunCursor(*self._page_tokens.read(query.page_token, _scope(where)))
        runs = await self._store.list_runs(where, after, limit + 1)
        more = len(runs) > limit
        runs = runs[:limit]
        token = ""
        if more:
            last = runs[-1]
            token = self._page_tokens.issue(
                last.created_at, last.pipeline_logging_id, _scope(where)
            )
        return RunPage(runs, token)

    # -- cancelling and watching ----------------------------------------------------------

    async def cancel(self, caller: Caller, run_id: str) -> RunRecord:
        run = await self.get(caller, run_id)
        run_id = run.pipeline_logging_id
        if run.status in TERMINAL:
            raise FailedPrecondition(f"Run {run_id} has already ended ({run.status})")
        await faults.held(faults.BEFORE_CANCEL)
        cancel = await self._store.request_cancel(caller.tenant_id, run_id, self._clock(), run)
        if cancel.published:
            raise FailedPrecondition(
                f"Run {run_id} has published its results and is ending (COMPLETE): "
                "too late to cancel"
            )
        if cancel.run is not None and cancel.run.status == COMPLETE:  # ended meanwhile
            raise FailedPrecondition(f"Run {run_id} has already ended (COMPLETE)")
        self._events.publish(run_id)
        if cancel.ended and cancel.run is not None:  # by this call: another cancel alerts alone
            metrics.run_ended(run.provider, run.domain, run.template, FAILED, None)  # never ran
            self._on_failed(cancel.run)
        return cancel.run or run

    async def watch(self, caller: Caller, run_id: str) -> AsyncIterator[Snapshot]:
        """The run and its steps now, then at every change, until it has ended."""
        run = await self.get(caller, run_id)
        feed = self._feeds.follow(caller.tenant_id, run.pipeline_logging_id)
        async with contextlib.aclosing(feed):
            async for snapshot in feed:
                yield snapshot


def new_run(
    tenant_id: str,
    template: Template,
    values: dict[str, Any],
    trigger_type: str,
    trigger_by: str,
    user_id: str,
    idempotency_key: str,
    now: datetime,
) -> RunRecord:
    """A PENDING run of `template` with the resolved parameter `values`."""
    return RunRecord(
        pipeline_logging_id=str(uuid.uuid4()),
        pipeline_id=f"{tenant_id}-{template.provider}-{template.domain}-{template.name}",
        tenant_id=tenant_id,
        provider=template.provider,
        domain=template.domain,
        template=template.name,
        status=PENDING,
        trigger_type=trigger_type,
        trigger_by=trigger_by,
        user_id=user_id,
        parameters={k: parameter_text(v) for k, v in values.items()},
        created_at=now,
        idempotency_key=idempotency_key,
        trace_id=logs.trace_var.get()[0],  # the creating request's, if it carried one
    )


def _parameterinvalid(name: str, issue: str) -> InvalidArgument:
    """A bad parameter, named boundedly: `date` is a request field of its own, a name that
    cannot be a parameter's is not repeated in the field."""
    if not name:
        return invalid("parameters", issue, "Invalid parameters")
    if not NAME_PATTERN.fullmatch(name):
        return invalid("parameters", f"{echo(name)!r} {issue}", f"Invalid parameter {echo(name)!r}")
    field = name if name == "date" else f"parameters.{name}"
    return invalid(field, issue, f"Invalid parameter {name}")


def _run_id(run_id: str) -> str:
    """The run id as stored (lower case), or INVALID_ARGUMENT."""
    if not ID_PATTERN.fullmatch(run_id.lower()):
        raise invalid("pipeline_logging_id", "must be a run id (a UUID, as the trigger returns it)")
    return run_id.lower()


def _day_start(value: str, field: str) -> datetime | None:
    if not value:
        return None
    try:
        day = parse_date(value)
    except ValueError as exc:
        raise invalid(field, str(exc)) from None
    return datetime.combine(day, datetime.min.time(), UTC)


def _day_end(value: str, field: str) -> datetime | None:
    start = _day_start(value, field)
    return None if start is None else start + timedelta(days=1)


def _scope(where: RunFilter) -> str:
    return json.dumps(
        [
            where.tenant_id,
            where.status,
            where.pipeline_id,
            str(where.created_from),
            str(where.created_before),
        ]
    )


def _digest(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """Issues and reads page tokens: a position in a listing (the creation time and id of
    a page's last item) that only this service can have made, and only for the same
    `scope` (the tenant, the listing and its filters)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(self, created: datetime, item_id: str, scope: str) -> str:
        if created.tzinfo is None:  # the stores keep UTC
            created = created.replace(tzinfo=UTC)
        payload = json.dumps(
            {"c": created.isoformat(), "i": item_id, "f": _digest(scope)},
            separators=(",", ":"),
        ).encode()
        return f"{_b64encode(payload)}.{_b64encode(self._mac(payload))}"

    def read(self, token: str, scope: str) -> tuple[datetime, str]:
        foreign = invalid("page_token", FOREIGN_TOKEN_ISSUE)
        matched = _PAGE_TOKEN.fullmatch(token) if len(token) <= MAX_PAGE_TOKEN else None
        if matched is None:
            raise foreign
        try:
            payload = _b64decode(matched[1])
        except (binascii.Error, ValueError):
            raise foreign from None
        # Only the one encoding this service writes: base64's unused low bits (a token's
        # last character has spare ones) must not make two strings the same token.
        expected = f"{_b64encode(payload)}.{_b64encode(self._mac(payload))}"
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise foreign
        try:  # signed by this service: still read defensively
            fields = json.loads(payload)
            created, item_id, digest = datetime.fromisoformat(fields["c"]), fields["i"], fields["f"]
            if created.tzinfo is None or not ID_PATTERN.fullmatch(item_id):
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise foreign from None
        if digest != _digest(scope):
            raise invalid("page_token", "was issued for other filters; keep the filters unchanged")
        return created, item_id
