"""The executor: a bounded pool of workers in the server process that runs PENDING runs.

Each worker claims the oldest PENDING run (an atomic PENDING -> RUNNING update), runs it
with the engine and ends it COMPLETE or FAILED. A heartbeat marks the runs this process
holds; runs found RUNNING without a fresh heartbeat (their server died) are recovered:
run again when their template allows (`on_crash: retry`, at most `MAX_ATTEMPTS` times),
else ended FAILED. A store that one process owns alone (the embedded one) recovers every
RUNNING run at start-up; PENDING runs simply wait for a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from convergence_server import logs
from convergence_server.domain.runs import COMPLETE, FAILED, RUNNING, RunEvents
from convergence_server.engine.runner import (
    DqResult,
    PipelineRun,
    RunCancelled,
    StepFailed,
    StepOutcome,
)
from convergence_server.engine.templates import Catalog, ParameterError, Step
from convergence_server.storage import Store
from convergence_server.storage.records import DqRecord, RunRecord, StepRecord
from convergence_server.storage.warehouse import TransientError

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
FINISH_ATTEMPTS = 6
IDLE_POLL_SECONDS = 1.0
CANCELLED_MESSAGE = "Cancelled by request while running; its changes were rolled back"


@dataclass(frozen=True)
class ExecutorSettings:
    workers: int = 4
    heartbeat_seconds: float = 5.0
    lease_seconds: float = 30.0
    sample_data: Path = Path("configs/sample_data")
    source_roots: tuple[Path, ...] = ()
    gcs_source_roots: tuple[str, ...] = ()


class _Observer:
    """Persists a run's progress as the engine reports it."""

    def __init__(self, store: Store, run: RunRecord, events: RunEvents) -> None:
        self._store = store
        self._run = run
        self._events = events
        self._step_ids: dict[int, str] = {}

    async def cancel_requested(self) -> bool:
        return await self._store.cancel_requested(self._run.pipeline_logging_id)

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
        self, index: int, step: Step, started: datetime, outcome: StepOutcome
    ) -> None:
        ended = datetime.now(UTC)
        record = replace(
            self._record(index, step, started),
            status=FAILED if outcome.error else COMPLETE,
            rows_processed=outcome.rows,
            step_end_time=ended,
            duration_ms=int((ended - started).total_seconds() * 1000),
            error_message=outcome.error,
            attempts=outcome.attempts,
        )
        await self._store.save_step(record)
        self._events.publish(self._run.pipeline_logging_id)

    async def dq_checked(self, step: Step, results: list[DqResult]) -> None:
        now = datetime.now(UTC)
        day = self._run.parameters.get("date")
        await self._store.add_dq_results(
            [
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
                )
                for r in results
            ]
        )


class Executor:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        events: RunEvents,
        settings: ExecutorSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._events = events
        self._settings = settings
        self._clock = clock
        self._worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[str] = set()
        self._claiming = asyncio.Lock()
        self._next_poll = 0.0

    def wake(self) -> None:
        self._wakeup.set()

    async def start(self) -> None:
        if self._store.exclusive:
            await self.recover(self._clock())
            await self._store.drop_stage_tables()
        self._tasks = [
            asyncio.create_task(self._work(), name=f"run-worker-{i}")
            for i in range(self._settings.workers)
        ]
        self._tasks.append(asyncio.create_task(self._keep_alive(), name="run-heartbeat"))

    async def stop(self) -> None:
        """Stops the workers; runs they held return to PENDING for the next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def recover(self, stale_before: datetime) -> None:
        """Ends or requeues runs whose execution was lost (never this process's own)."""
        for run in await self._store.stale_runs(stale_before):
            if run.pipeline_logging_id in self._in_flight:
                continue
            template = self._catalog.get(run.provider, run.domain, run.template)
            retry = template is not None and template.on_crash == "retry"
            if run.cancel_requested:
                await self._store.finish_run(run, FAILED, self._clock(), CANCELLED_MESSAGE)
            elif retry and run.attempt < MAX_ATTEMPTS:
                if await self._store.requeue_run(run, self._clock(), count_attempt=True):
                    log.warning("run %s requeued: its server stopped", run.pipeline_logging_id)
            else:
                await self._store.finish_run(
                    run,
                    FAILED,
                    self._clock(),
                    f"The server stopped while the run was in progress (attempt {run.attempt})",
                )
            self._events.publish(run.pipeline_logging_id)

    async def _keep_alive(self) -> None:
        lease = timedelta(seconds=self._settings.lease_seconds)
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            try:
                await self._store.heartbeat(sorted(self._in_flight), self._worker_id)
                if not self._store.exclusive:  # an exclusive store recovers at start-up
                    await self.recover(self._clock() - lease)
            except Exception:
                log.exception("heartbeat failed")

    async def _work(self) -> None:
        while True:
            try:
                async with self._claiming:
                    run = None
                    # Idle workers take turns: the store sees one poll a second per server
                    # (on BigQuery each is a billed query), and a wake-up at once.
                    if self._wakeup.is_set() or time.monotonic() >= self._next_poll:
                        self._next_poll = time.monotonic() + IDLE_POLL_SECONDS
                        run = await self._store.claim_next_run(self._worker_id, self._clock())
            except Exception:
                log.exception("cannot claim a run")
                run = None
            if run is None:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), IDLE_POLL_SECONDS)
                continue
            self._wakeup.set()  # there may be more: let another idle worker look
            try:
                await self._execute(run)
            except asyncio.CancelledError:
                raise
            except Exception:  # a store failure must not cost the pool a worker
                log.exception("run %s: the executor failed", run.pipeline_logging_id)

    async def _execute(self, run: RunRecord) -> None:
        run_id = run.pipeline_logging_id
        self._in_flight.add(run_id)
        logs.tenant_id_var.set(run.tenant_id)
        self._events.publish(run_id)
        try:
            status, error = await self._run_pipeline(run)
        except asyncio.CancelledError:
            # The server is stopping: hand the run back so that it is not lost.
            await asyncio.shield(self._store.requeue_run(run, self._clock(), count_attempt=False))
            raise
        finally:
            self._in_flight.discard(run_id)
        if await self._finish(run, status, error) is None:
            log.warning("run %s was no longer this worker's to end", run_id)
        else:
            log.info("run %s ended %s", run_id, status, extra={"fields": {"error": error}})
        self._events.publish(run_id)

    async def _finish(self, run: RunRecord, status: str, error: str) -> RunRecord | None:
        """Ends the run, retrying a failing store: a run left RUNNING would hold its slot."""
        for attempt in range(FINISH_ATTEMPTS):
            try:
                return await self._store.finish_run(run, status, self._clock(), error)
            except Exception:
                if attempt == FINISH_ATTEMPTS - 1:
                    raise
                log.warning("cannot end run %s yet", run.pipeline_logging_id, exc_info=True)
                await asyncio.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run_pipeline(self, run: RunRecord) -> tuple[str, str]:
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
        try:
            await PipelineRun(
                template=template,
                catalog=self._catalog,
                parameters=parameters,
                warehouse=warehouse,
                observer=_Observer(self._store, run, self._events),
                run_id=run.pipeline_logging_id,
                attempt=run.attempt,
                sample_data=self._settings.sample_data,
                # The shared sample data, and in each source root the tenant's own folder.
                source_roots=(
                    self._settings.sample_data,
                    *(root / run.tenant_id for root in self._settings.source_roots),
                ),
                remote_roots=tuple(
                    f"{root}/{run.tenant_id}/" for root in self._settings.gcs_source_roots
                ),
            ).execute()
        except StepFailed as exc:
            return FAILED, str(exc)
        except RunCancelled:
            return FAILED, CANCELLED_MESSAGE
        except TransientError as exc:
            return FAILED, f"The warehouse stayed busy ({exc}); trigger the run again"
        except Exception:
            log.exception("run %s failed unexpectedly", run.pipeline_logging_id)
            return FAILED, "Internal error while running the pipeline (see the server log)"
        finally:
            await warehouse.close()
        return COMPLETE, ""
