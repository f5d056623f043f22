"""Per-step retry: transient warehouse errors are retried with exponential backoff,
others fail the step at once; and what the engine reports at a step boundary. The
warehouse here is a scripted stand-in for the port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from convergence_server.engine.runner import (
    DqResult,
    PipelineRun,
    RunCancelled,
    StepFailed,
    StepOutcome,
)
from convergence_server.engine.templates import Catalog, Step, parse_template
from convergence_server.storage.warehouse import Publication, TransientError, WarehouseError

TEMPLATE = """
description: One query with a retry policy.
steps:
  - name: compute
    kind: query
    sql: SELECT 1 AS n
    destination: numbers
    write_mode: truncate
    retry: {attempts: 3, backoff_seconds: 0.5}
"""


class ScriptedWarehouse:
    """Fails `create_as` with the scripted errors, in order, then succeeds."""

    dataset = "acme_corp"

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.published: list[Publication] = []
        self.dropped: list[str] = []

    async def create_as(
        self, table: str, sql: str, params: Mapping[str, Any], into: Publication | None = None
    ) -> int:
        if self.failures:
            raise self.failures.pop(0)
        return 1

    async def publish_all(self, writes: Sequence[Publication]) -> None:
        self.published += writes

    async def drop(self, tables: Sequence[str]) -> None:
        self.dropped += tables

    async def load(self, table: str, uri: str, fmt: str) -> int:
        raise NotImplementedError

    async def insert_into(self, table: str, sql: str, params: Mapping[str, Any]) -> int:
        raise NotImplementedError

    async def count(self, sql: str, params: Mapping[str, Any]) -> int:
        raise NotImplementedError

    async def columns(self, table: str) -> list[str]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class Recorder:
    def __init__(self, cancelled_at_check: int = 0) -> None:
        self.outcomes: list[StepOutcome] = []
        # What was reported, in order: ("started", index) or ("finished", index, the next
        # step's index when its start was reported with this end).
        self.reports: list[tuple[object, ...]] = []
        self._cancelled_at = cancelled_at_check  # 0: never; 1: before the first step...
        self._checks = 0

    async def cancel_requested(self) -> bool:
        self._checks += 1
        return self._checks == self._cancelled_at

    def stopping(self) -> bool:
        return False

    async def step_started(self, index: int, step: Step, at: datetime) -> None:
        self.reports.append(("started", index))

    async def step_finished(
        self,
        index: int,
        step: Step,
        started: datetime,
        outcome: StepOutcome,
        following: tuple[Step, datetime] | None = None,
    ) -> None:
        self.outcomes.append(outcome)
        self.reports.append(("finished", index, None if following is None else index + 1))

    async def dq_checked(self, step: Step, results: list[DqResult]) -> None:
        pass


def run(
    tmp_path: Path,
    failures: list[Exception],
    text: str = TEMPLATE,
    recorder: Recorder | None = None,
    warehouse: ScriptedWarehouse | None = None,
) -> tuple[ScriptedWarehouse, Recorder, list[float]]:
    path = tmp_path / "template.yml"
    path.write_text(text)
    template = parse_template(path, "test", "retry", "template")
    recorder = recorder or Recorder()
    warehouse = warehouse or ScriptedWarehouse(failures)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    pipeline = PipelineRun(
        template=template,
        catalog=Catalog({template.key: template}, {}),
        parameters={},
        warehouse=warehouse,
        observer=recorder,
        run_id="00000000-0000-4000-8000-000000000000",
        attempt=1,
        sample_data=tmp_path,
        source_roots=(tmp_path,),
        publish=warehouse.publish_all,
        sleep=sleep,
    )
    with contextlib.suppress(StepFailed):
        asyncio.run(pipeline.execute())
    return warehouse, recorder, sleeps


def test_transient_errors_are_retried_with_backoff(tmp_path: Path) -> None:
    warehouse, recorder, sleeps = run(tmp_path, [TransientError("conflict")] * 2)
    assert recorder.outcomes == [StepOutcome(rows=1, attempts=3)]
    assert sleeps == [0.5, 1.0]
    assert [p.destination for p in warehouse.published] == ["numbers"]
    assert warehouse.dropped == [p.stage for p in warehouse.published]


def test_retries_run_out(tmp_path: Path) -> None:
    warehouse, recorder, _ = run(tmp_path, [TransientError("conflict")] * 3)
    assert recorder.outcomes == [StepOutcome(0, 3, "conflict (after 3 attempts)")]
    assert warehouse.published == []
    assert len(warehouse.dropped) == 1  # the stage is dropped, nothing is published


@pytest.mark.parametrize("error", [WarehouseError("Binder Error: no column x")])
def test_other_errors_are_not_retried(tmp_path: Path, error: Exception) -> None:
    warehouse, recorder, sleeps = run(tmp_path, [error])
    assert recorder.outcomes == [StepOutcome(0, 1, "Binder Error: no column x")]
    assert sleeps == []
    assert warehouse.published == []


THREE_STEPS = "description: Three queries.\nsteps:\n" + "".join(
    f"  - {{name: s{i}, kind: query, sql: SELECT 1 AS n, destination: t{i}, "
    "write_mode: truncate}\n"
    for i in range(3)
)


def test_a_steps_end_and_the_next_ones_start_are_reported_together(tmp_path: Path) -> None:
    warehouse, recorder, _ = run(tmp_path, [], THREE_STEPS)
    assert recorder.reports == [
        ("started", 0),
        ("finished", 0, 1),
        ("finished", 1, 2),
        ("finished", 2, None),
    ]
    assert len(warehouse.published) == 3


def test_a_cancel_at_a_boundary_reports_the_end_alone_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    recorder, warehouse = Recorder(cancelled_at_check=2), ScriptedWarehouse([])
    with pytest.raises(RunCancelled):
        run(tmp_path, [], THREE_STEPS, recorder, warehouse)
    assert recorder.reports == [("started", 0), ("finished", 0, None)]
    assert warehouse.published == []
