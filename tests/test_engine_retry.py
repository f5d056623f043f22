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
    Interrupted,
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
    def __init__(self, stop_at_check: int = 0, stop: str = "cancel") -> None:
        self.outcomes: list[StepOutcome] = []
        # What was reported, in order: ("started", step name) or ("finished", step name,
        # the next step's name when its start was reported with this end).
        self.reports: list[tuple[object, ...]] = []
        # At which check between steps (1: before the first step) a cancel or a stop of
        # the server shows (0: never).
        self._stop_at, self._stop, self._checks = stop_at_check, stop, 0

    async def cancel_requested(self) -> bool:
        return self._stop == "cancel" and self._checks == self._stop_at

    def stopping(self) -> bool:
        self._checks += 1  # asked first at each check
        return self._stop == "stop" and self._checks == self._stop_at

    async def step_started(self, index: int, step: Step, at: datetime) -> None:
        self.reports.append(("started", step.name))

    async def step_finished(
        self,
        index: int,
        step: Step,
        started: datetime,
        outcome: StepOutcome,
        following: tuple[Step, datetime] | None = None,
    ) -> None:
        self.outcomes.append(outcome)
        self.reports.append(("finished", step.name, following and following[0].name))

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
        ("started", "s0"),
        ("finished", "s0", "s1"),
        ("finished", "s1", "s2"),
        ("finished", "s2", None),
    ]
    assert len(warehouse.published) == 3


@pytest.mark.parametrize(("stop", "raised"), [("cancel", RunCancelled), ("stop", Interrupted)])
def test_a_cancel_or_stop_at_a_boundary_reports_the_end_alone_and_publishes_nothing(
    tmp_path: Path, stop: str, raised: type[Exception]
) -> None:
    recorder, warehouse = Recorder(stop_at_check=2, stop=stop), ScriptedWarehouse([])
    with pytest.raises(raised):
        run(tmp_path, [], THREE_STEPS, recorder, warehouse)
    assert recorder.reports == [("started", "s0"), ("finished", "s0", None)]
    assert warehouse.published == []
