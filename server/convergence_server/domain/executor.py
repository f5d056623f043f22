"""The executor: a bounded pool of workers in the server process that runs PENDING runs.

Each worker claims the next run of the fair queue (tenants in turn, `rows.FAIR_QUEUE`; an
atomic PENDING -> RUNNING update), runs it with the engine and ends it COMPLETE or FAILED.
The run's writes are published in one transaction that also records the publication
(`Warehouse.publish`), and its end is written after: a run found RUNNING whose publication
is recorded is ended COMPLETE, never run again.

Runs found RUNNING that no worker holds are recovered: run again when their template allows
(`on_crash: retry`, at most `MAX_ATTEMPTS` times), else ended FAILED. On a store that one
process owns alone (the embedded one) that is every RUNNING run at start-up, and later any
that no worker of this process holds (a sweep every `heartbeat_seconds`); on a shared store,
runs whose heartbeat is older than the lease.

Stopping is bounded: no run is claimed once it begins (a worker waiting for its turn to
claim leaves at once; a claim already sent is awaited until the stop's deadline, as it may
return a run to hand back), running statements are interrupted, and each interrupted run is
handed back PENDING without using an attempt. What is still in a store call at the deadline
is abandoned. A run's end that the store refuses (a full disk) is retried with backoff until
the store accepts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from convergence_server import faults, logs, metrics
from convergence_server.domain.runs import COMPLETE, FAILED, RUNNING, RunEvents
from convergence_server.engine.runner import (
    DqResult,
    PipelineRun,
    RunCancelled,
    StepFailed,
    StepOutcome,
)
from convergence_server.engine.templates import Catalog, ParameterError, Step
from convergence_server.errors import Unavailable
from convergence_server.storage import Store
from convergence_server.storage.records import DqRecord, RunRecord, StepRecord
from convergence_server.storage.warehouse import (
    Interrupted,
    Publication,
    TransientError,
    Warehouse,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ATTEMPTS = 3
# A run's end or hand-back that the store refuses is tried again after 0.2 s, doubling to this.
MAX_PERSIST_BACKOFF = 10.0
# While stopping, running statements are interrupted again this often (an interrupt that
# falls between two statements has no effect).
INTERRUPT_EVERY_SECONDS = 0.1
# An idle worker never waits less than this before it looks again (no busy loop).
MIN_WAIT_SECONDS = 0.01
CANCELLED_MESSAGE = "Cancelled by request while running; its changes were rolled back"


@dataclass(frozen=True)
class ExecutorSettings:
    workers: int = 4
    heartbeat_seconds: float = 5.0
    lease_seconds: float = 30.0
    # How soon idle workers look for runs they were not woken for (another replica's
    # admissions, runs put back by recovery) after they last found one or were woken;
    # each look that finds nothing doubles the wait, up to `poll_max_seconds`. On
    # BigQuery each look is a query job.
    poll_seconds: float = 1.0
    poll_max_seconds: float = 30.0
    sample_data: Path = Path("configs/sample_data")
    source_roots: tuple[Path, ...] = ()
    gcs_source_roots: tuple[str, ...] = ()


class _Observer:
    """Persists a run's progress as the engine reports it."""

    def __init__(
        self,
        store: Store,
        run: RunRecord,
        events: RunEvents,
        stopping: asyncio.Event,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._run = run
        self._events = events
        self._stopping = stopping
        self._clock = clock
        self._step_ids: dict[int, str] = {}
        # The failed `warn` checks of each dq step, by step name (names are unique).
        self._warnings: dict[str, int] = {}

    async def cancel_requested(self) -> bool:
        await faults.held(faults.BETWEEN_STEPS)
        return await self._store.cancel_requested(self._run)

    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _record(self, index: int, step: Step, started: datetime) -> StepRecord:
        step_id = self._step_ids.setdefault(index, str(uuid.uuid4()))
        return StepRecord(
            step_logging_id=step_id,
            pipeline_logging_id=self._run.pipeline_logging_id,
            pipeline_id=self._run.pipeline_id,
            tenant_id=self._run.tenant_id,
            step_name=step.name,
            step_type=step.kind,
            step_index=index,
            status=RUNNING,
            step_start_time=started,
            run_attempt=self._run.attempt,
        )

    async def step_started(self, index: int, step: Step, at: datetime) -> None:
        await self._store.save_step(self._record(index, step, at))
        self._events.publish(self._run.pipeline_logging_id)

    async def step_finished(
        self,
        index: int,
        step: Step,
        started: datetime,
        outcome: StepOutcome,
        following: tuple[Step, datetime] | None = None,
    ) -> None:
        # At a boundary, the next step starts when this one ended.
        ended = following[1] if following is not None else self._clock()
        record = replace(
            self._record(index, step, started),
            status=FAILED if outcome.error else COMPLETE,
            rows_processed=outcome.rows,
            step_end_time=ended,
            duration_ms=int((ended - started).total_seconds() * 1000),
            error_message=outcome.error,
            attempts=outcome.attempts,
            warnings=self._warnings.get(step.name, 0),
        )
        records = [record]
        if following is not None:
            records.append(self._record(index + 1, *following))
        await self._store.save_steps(records)
        metrics.STEP_SECONDS.labels(step.kind, record.status).observe(
            (ended - started).total_seconds()
        )
        self._events.publish(self._run.pipeline_logging_id)

    async def dq_checked(self, step: Step, results: list[DqResult]) -> None:
        now = self._clock()
        day = self._run.parameters.get("date")
        records = [
            DqRecord(
                dq_result_id=str(uuid.uuid4()),
                pipeline_logging_id=self._run.pipeline_logging_id,
                pipeline_id=self._run.pipeline_id,
                tenant_id=self._run.tenant_id,
                step_name=step.name,
                check_name=r.check.name,
                check_type=r.check.type,
                severity=r.check.severity,
                status="PASSED" if r.passed else "FAILED",
                observed_value=r.observed,
                expected_value=r.expected,
                message=r.message,
                ingestion_date=datetime.fromisoformat(day).date() if day else now.date(),
                created_at=now,
                run_attempt=self._run.attempt,
                failed_rows=r.failed_rows,
                sample_rows=r.samples,
                check_index=index,
            )
            for index, r in enumerate(results)
        ]
        self._warnings[step.name] = sum(r.warns for r in records)
        await self._store.add_dq_results(self._run, records)
        # Watchers see the run's new `warnings` (and the checks) at once.
        self._events.publish(self._run.pipeline_logging_id)


class _Lost(Exception):
    """The run is no longer this worker's (another execution took it): nothing published."""


# What became of an execution that does not end the run (in place of COMPLETE or FAILED).
_HANDED_BACK = "handed back"
_LOST = "lost"


class Executor:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        events: RunEvents,
        settings: ExecutorSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_failed: Callable[[RunRecord], None] = lambda run: None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._events = events
        self._settings = settings
        self._clock = clock
        self._on_failed = on_failed  # a run ended FAILED (the webhook's alert)
        self._worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._keeper: asyncio.Task[None] | None = None
        # The runs this process holds, from their claim until their end is written, with
        # the warehouse of the one executing now (to interrupt it).
        self._in_flight: dict[str, Warehouse | None] = {}
        self._claiming = asyncio.Lock()
        # Workers waiting for their turn to claim: they have no store call to wait for.
        self._queued: set[asyncio.Task[None]] = set()
        self._next_poll = 0.0
        self._poll_interval = settings.poll_seconds  # the wait after the next empty look
        self._longest_poll = max(settings.poll_seconds, settings.poll_max_seconds)
        self._poll_sooner()

    def wake(self) -> None:
        """A run to claim (admitted here, or put back): look now, and poll soon again."""
        self._poll_sooner()
        self._wakeup.set()

    def _poll_sooner(self) -> None:
        self._poll_interval = self._settings.poll_seconds
        if self._settings.workers:  # a server without workers does not poll
            metrics.CLAIM_POLL_SECONDS.set(self._poll_interval)

    async def start(self) -> None:
        if self._store.exclusive:
            await self.recover(self._clock())
            await self._store.drop_stage_tables()
        self._workers = [
            asyncio.create_task(self._work(), name=f"run-worker-{i}")
            for i in range(self._settings.workers)
        ]
        self._keeper = asyncio.create_task(self._keep_alive(), name="run-heartbeat")

    async def stop(self, seconds: float) -> None:
        """Stops within `seconds`: claims nothing more, interrupts running statements and
        hands their runs back PENDING (no attempt used). What has not finished by then is
        abandoned: its run stays RUNNING and is recovered (the lease, or the next start)."""
        self._stopping.set()
        self._wakeup.set()
        if self._keeper is not None:
            self._keeper.cancel()
        for task in self._queued:
            task.cancel()
        deadline = time.monotonic() + seconds
        pending = {task for task in self._workers if not task.done()}
        while pending and time.monotonic() < deadline:
            for warehouse in list(self._in_flight.values()):
                if warehouse is not None:
                    warehouse.interrupt()
            _, pending = await asyncio.wait(
                pending, timeout=min(INTERRUPT_EVERY_SECONDS, max(0.0, deadline - time.monotonic()))
            )
        for task in pending:
            task.cancel()
        if pending:
            log.error(
                "stopped with %d worker(s) still busy after %.0f s (a store call, or a "
                "wait that does not end at a stop), holding %d run(s); they will be recovered",
                len(pending),
                seconds,
                len(self._in_flight),
                extra={"fields": {"runs": sorted(self._in_flight)}},
            )
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def recover(self, stale_before: datetime) -> None:
        """Ends or requeues RUNNING runs whose execution was lost (never this process's own):
        COMPLETE when their publication is recorded, else run again or FAILED."""
        async with self._claiming:  # a run claimed now is in `_in_flight` before we look
            stale = [
                run
                for run in await self._store.stale_runs(stale_before)
                if run.pipeline_logging_id not in self._in_flight
            ]
        for run in stale:
            template = self._catalog.get(run.provider, run.domain, run.template)
            retry = template is not None and template.on_crash == "retry"
            if await self._store.published(run.pipeline_logging_id):
                ended = await self._store.finish_run(run, COMPLETE, self._clock())
                if ended:
                    log.warning("run %s ended COMPLETE: it was published", run.pipeline_logging_id)
            elif run.cancel_requested:
                ended = await self._store.finish_run(run, FAILED, self._clock(), CANCELLED_MESSAGE)
            elif retry and run.attempt < MAX_ATTEMPTS:
                ended = None
                if await self._store.requeue_run(run, self._clock(), count_attempt=True):
                    log.warning("run %s requeued: its execution was lost", run.pipeline_logging_id)
                    self.wake()  # not left to the next poll
            else:
                ended = await self._store.finish_run(
                    run,
                    FAILED,
                    self._clock(),
                    f"The server stopped while the run was in progress (attempt {run.attempt})",
                )
            if ended:
                self._ended(ended)
            self._events.publish(run.pipeline_logging_id)

    async def _keep_alive(self) -> None:
        lease = timedelta(seconds=self._settings.lease_seconds)
        # Shared stores: other replicas' runs go stale a lease after their last beat, so
        # looking for them every half lease (in beats: at the first beat, then every
        # `every`-th) rather than at every beat finds them at most about half a lease
        # later, for a third of the reads at the defaults (each a query on BigQuery).
        every = max(1, int(self._settings.lease_seconds / 2 // self._settings.heartbeat_seconds))
        beats = 0
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            beats += 1
            if self._store.exclusive:
                # No other process can hold a run: any RUNNING run no worker here holds is
                # orphaned (its end could not be written, or its worker failed).
                stale_before = datetime.max.replace(tzinfo=UTC)
            else:
                try:
                    await self._store.heartbeat(sorted(self._in_flight), self._worker_id)
                except Exception:
                    log.exception("heartbeat failed")
                if (beats - 1) % every:
                    continue
                stale_before = self._clock() - lease
            try:
                await self.recover(stale_before)
            except Exception:
                log.exception("recovery failed")

    async def _work(self) -> None:
        while not self._stopping.is_set():
            run = await self._claim()
            if run is None:
                if self._stopping.is_set():
                    return
                self._wakeup.clear()
                due = max(self._next_poll - time.monotonic(), MIN_WAIT_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), due)
                continue
            self._wakeup.set()  # there may be more: let another idle worker look
            await self._execute(run)

    async def _claim(self) -> RunRecord | None:
        if self._stopping.is_set():
            return None
        worker = asyncio.current_task()
        assert worker is not None
        self._queued.add(worker)
        try:
            await self._claiming.acquire()
        finally:
            self._queued.discard(worker)
        try:
            # Idle workers take turns: the store sees one poll per interval per server
            # (on BigQuery each is a billed query), and a wake-up at once. An idle
            # server's interval doubles with each poll that finds nothing.
            if self._stopping.is_set() or (
                not self._wakeup.is_set() and time.monotonic() < self._next_poll
            ):
                return None
            try:
                run = await self._store.claim_next_run(self._worker_id, self._clock())
            except Exception as exc:
                log.warning("cannot claim a run: %s", exc)
                run = None
            if run is None:
                self._next_poll = time.monotonic() + self._poll_interval
                metrics.CLAIM_POLL_SECONDS.set(self._poll_interval)
                self._poll_interval = min(self._poll_interval * 2, self._longest_poll)
                return None
            self._poll_sooner()
            self._next_poll = time.monotonic() + self._poll_interval
            self._in_flight[run.pipeline_logging_id] = None
            await faults.held(faults.AFTER_CLAIM)
            return run
        finally:
            self._claiming.release()

    async def _execute(self, run: RunRecord) -> None:
        """Runs, then ends or hands back, the claimed run; never raises but CancelledError."""
        run_id = run.pipeline_logging_id
        logs.tenant_id_var.set(run.tenant_id)
        logs.trace_var.set((run.trace_id, ""))  # the run's lines join the trigger's trace
        self._events.publish(run_id)
        claimed = time.monotonic()
        try:
            status, error = await self._run_pipeline(run)
            if status == _HANDED_BACK:
                await self._persist(
                    lambda: self._store.requeue_run(run, self._clock(), count_attempt=False),
                    f"hand back run {run_id}",
                )
                log.info("run %s handed back: the server is stopping", run_id)
            elif status == _LOST:
                log.warning("run %s was no longer this worker's to publish", run_id)
            elif ended := await self._persist(
                lambda: self._store.finish_run(run, status, self._clock(), error),
                f"end run {run_id}",
            ):
                log.info("run %s ended %s", run_id, status, extra={"fields": {"error": error}})
                self._ended(ended, time.monotonic() - claimed)
            else:
                log.warning("run %s was no longer this worker's to end", run_id)
        except Exception:  # the sweep (or the next start) recovers the run
            log.exception("run %s: the executor failed", run_id)
        finally:
            self._in_flight.pop(run_id, None)
        self._events.publish(run_id)

    def _ended(self, run: RunRecord, seconds: float | None = None) -> None:
        """Counts a run this server ended (as stored after) and alerts when it failed."""
        metrics.run_ended(run.provider, run.domain, run.template, run.status, seconds)
        if run.status == FAILED:
            self._on_failed(run)

    async def _persist(self, write: Callable[[], Awaitable[T]], what: str) -> T:
        """Retries a store write until the store takes it: a run left RUNNING would hold
        its tenant's concurrency slot. Stopping ends the retries at its deadline."""
        delay = 0.2
        while True:
            try:
                return await write()
            except Exception as exc:
                log.warning("cannot %s yet (retrying in %.1f s): %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(MAX_PERSIST_BACKOFF, delay * 2)

    async def _publish(
        self, run: RunRecord, warehouse: Warehouse, writes: Sequence[Publication]
    ) -> None:
        await faults.held(faults.BEFORE_PUBLICATION)
        faults.reached(faults.BEFORE_PUBLISH)
        if not await warehouse.publish(writes, run):
            # Refused: the run is no longer this execution's, or a cancel came after its
            # last step boundary (the publication checks it, and a cancel that comes
            # after the publication is refused: never both).
            if await self._store.cancel_requested(run, stored=True):
                raise RunCancelled
            raise _Lost
        faults.reached(faults.AFTER_PUBLISH)
        await faults.held(faults.AFTER_PUBLICATION)

    async def _sleep(self, seconds: float) -> None:
        """A retry backoff that a stop cuts short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _run_pipeline(self, run: RunRecord) -> tuple[str, str]:
        """(status, error) to end the run with, or (_HANDED_BACK or _LOST, "")."""
        template = self._catalog.get(run.provider, run.domain, run.template)
        if template is None:
            return (
                FAILED,
                f"The template {run.provider}/{run.domain}/{run.template} no longer exists",
            )
        try:
            parameters = template.resolve_parameters(run.parameters, self._clock().date())
        except ParameterError as exc:
            return FAILED, f"Invalid parameter: {exc}"
        warehouse = self._store.warehouse(run.tenant_id)
        self._in_flight[run.pipeline_logging_id] = warehouse
        try:
            await PipelineRun(
                template=template,
                catalog=self._catalog,
                parameters=parameters,
                warehouse=warehouse,
                observer=_Observer(self._store, run, self._events, self._stopping, self._clock),
                run_id=run.pipeline_logging_id,
                attempt=run.attempt,
                sample_data=self._settings.sample_data,
                # The shared sample data, and in each source root the tenant's own folder.
                source_roots=(
                    self._settings.sample_data,
                    *(root / run.tenant_id for root in self._settings.source_roots),
                ),
                publish=lambda writes: self._publish(run, warehouse, writes),
                remote_roots=tuple(
                    f"{root}/{run.tenant_id}/" for root in self._settings.gcs_source_roots
                ),
                sleep=self._sleep,
                clock=self._clock,
            ).execute()
        except StepFailed as exc:
            return FAILED, str(exc)
        except RunCancelled:
            return FAILED, CANCELLED_MESSAGE
        except _Lost:
            return _LOST, ""
        except Interrupted:
            if self._stopping.is_set():
                return _HANDED_BACK, ""
            return FAILED, "The run was interrupted"
        except TransientError as exc:
            return FAILED, f"The warehouse stayed busy ({exc}); trigger the run again"
        except Unavailable as exc:  # its progress could not be recorded
            if self._stopping.is_set():
                return _HANDED_BACK, ""
            return FAILED, f"The store failed during the run: {exc.message}"
        except Exception:
            if self._stopping.is_set():
                return _HANDED_BACK, ""  # e.g. a statement that failed as it was interrupted
            log.exception("run %s failed unexpectedly", run.pipeline_logging_id)
            return FAILED, "Internal error while running the pipeline (see the server log)"
        finally:
            self._in_flight[run.pipeline_logging_id] = None
            await warehouse.close()
        return COMPLETE, ""
