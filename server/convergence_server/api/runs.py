"""RunService: read (with steps and checks), list, cancel and watch a tenant's runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from convergence_server.api import convert
from convergence_server.api.context import require_caller
from convergence_server.domain.runs import RunQuery, Runs
from convergence_server.errors import FieldViolation, InvalidArgument


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, runs: Runs) -> None:
        self._runs = runs

    async def GetRun(
        self, request: run_service_pb2.GetRunRequest, context: ServicerContext[Any, Any]
    ) -> run_pb2.Run:
        return convert.run(await self._runs.get(require_caller(), request.pipeline_logging_id))

    async def ListRuns(
        self, request: run_service_pb2.ListRunsRequest, context: ServicerContext[Any, Any]
    ) -> run_service_pb2.ListRunsResponse:
        try:
            status = run_pb2.Run.Status.Name(request.status) if request.status else ""
        except ValueError:
            raise InvalidArgument(
                "Invalid status",
                [FieldViolation("status", "must be PENDING, RUNNING, COMPLETE or FAILED")],
            ) from None
        page = await self._runs.list_runs(
            require_caller(),
            RunQuery(
                limit=request.limit,
                status=status,
                pipeline_id=request.pipeline_id,
                start_date=request.start_date,
                end_date=request.end_date,
                page_token=request.page_token,
            ),
        )
        return run_service_pb2.ListRunsResponse(
            runs=[convert.run(r) for r in page.runs], next_page_token=page.next_page_token
        )

    async def ListRunSteps(
        self, request: run_service_pb2.ListRunStepsRequest, context: ServicerContext[Any, Any]
    ) -> run_service_pb2.ListRunStepsResponse:
        steps = await self._runs.steps(require_caller(), request.pipeline_logging_id)
        return run_service_pb2.ListRunStepsResponse(steps=[convert.run_step(s) for s in steps])

    async def ListRunChecks(
        self, request: run_service_pb2.ListRunChecksRequest, context: ServicerContext[Any, Any]
    ) -> run_service_pb2.ListRunChecksResponse:
        checks = await self._runs.checks(require_caller(), request.pipeline_logging_id)
        return run_service_pb2.ListRunChecksResponse(checks=[convert.run_check(c) for c in checks])

    async def CancelRun(
        self, request: run_service_pb2.CancelRunRequest, context: ServicerContext[Any, Any]
    ) -> run_service_pb2.CancelRunResponse:
        run = await self._runs.cancel(require_caller(), request.pipeline_logging_id)
        return run_service_pb2.CancelRunResponse(run=convert.run(run))

    async def WatchRun(
        self, request: run_service_pb2.WatchRunRequest, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[run_service_pb2.WatchRunResponse]:
        async for run, steps in self._runs.watch(require_caller(), request.pipeline_logging_id):
            yield run_service_pb2.WatchRunResponse(
                run=convert.run(run), steps=[convert.run_step(s) for s in steps]
            )
