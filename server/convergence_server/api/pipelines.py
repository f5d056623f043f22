"""PipelineService: declared in full; runs are not executed by this version yet.

The methods authenticate and authorize like the finished ones will (a foreign tenant gets
403), then answer UNIMPLEMENTED rather than pretend a run was started.
"""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from convergence_server.api.context import require_caller
from convergence_server.domain.auth import authorize_tenant
from convergence_server.errors import NotImplementedYet


class PipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    async def RunPipeline(
        self, request: pipeline_service_pb2.RunPipelineRequest, context: ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.RunPipelineResponse:
        authorize_tenant(require_caller(), request.tenant_id)
        raise NotImplementedYet("Pipeline execution is not available in this version yet")

    async def TriggerScheduledPipelines(
        self,
        request: pipeline_service_pb2.TriggerScheduledPipelinesRequest,
        context: ServicerContext[Any, Any],
    ) -> pipeline_service_pb2.TriggerScheduledPipelinesResponse:
        require_caller()
        raise NotImplementedYet("Scheduled pipelines are not available in this version yet")
