"""HealthService: liveness, plus an API-key check when a key is sent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import health_service_pb2, health_service_pb2_grpc
from convergence_server import __version__
from convergence_server.api.context import current_caller
from convergence_server.errors import Unavailable
from convergence_server.storage import Store


@dataclass
class StoreState:
    """Why the store cannot serve, as the server's store watcher last found (app.py), which
    also sets the standard gRPC health status; None while it serves."""

    failure: str | None = None


class HealthServicer(health_service_pb2_grpc.HealthServiceServicer):
    def __init__(self, store: Store, state: StoreState) -> None:
        self._store = store
        self._state = state

    async def GetHealth(
        self, request: health_service_pb2.GetHealthRequest, context: ServicerContext[Any, Any]
    ) -> health_service_pb2.GetHealthResponse:
        if self._state.failure is not None:
            raise Unavailable(f"The store is unavailable: {self._state.failure}")
        failure = await self._store.write_failure()  # known at once, before the watcher
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
