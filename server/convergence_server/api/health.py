"""HealthService: liveness, plus an API-key check when a key is sent."""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import health_service_pb2, health_service_pb2_grpc
from convergence_server import __version__
from convergence_server.api.context import current_caller
from convergence_server.errors import Unavailable
from convergence_server.storage import Store


class HealthServicer(health_service_pb2_grpc.HealthServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def GetHealth(
        self, request: health_service_pb2.GetHealthRequest, context: ServicerContext[Any, Any]
    ) -> health_service_pb2.GetHealthResponse:
        failure = await self._store.write_failure()
        if failure is not None:
            raise Unavailable(f"The store cannot write: {failure}")
        caller = current_caller()
        response = health_service_pb2.GetHealthResponse(
            status="healthy",
            version=__version__,
            store=self._store.kind,
            authenticated=caller is not None,
        )
        if caller is not None:
            response.tenant_id = caller.tenant_id
        return response
