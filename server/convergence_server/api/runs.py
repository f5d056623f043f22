"""RunService: declared in full; run records come with pipeline execution."""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from convergence_server.api.context import require_caller
from convergence_server.errors import NotImplementedYet

_MESSAGE = "Pipeline runs are not available in this version yet"


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    async def GetRun(
        self, request: run_service_pb2.GetRunRequest, context: ServicerContext[Any, Any]
    ) -> run_pb2.Run:
        require_caller()
        raise NotImplementedYet(_MESSAGE)

    async def ListRuns(
        self, request: run_service_pb2.ListRunsRequest, context: ServicerContext[Any, Any]
    ) -> run_service_pb2.ListRunsResponse:
        require_caller()
        raise NotImplementedYet(_MESSAGE)
