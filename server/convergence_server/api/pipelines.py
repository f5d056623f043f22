"""PipelineService: list templates, trigger runs."""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from convergence_server import logs
from convergence_server.api import convert
from convergence_server.api.context import operator_var, require_caller
from convergence_server.api.interceptors import metadata_value
from convergence_server.domain.runs import Runs, TriggerRequest
from convergence_server.domain.schedules import MAX_REPORTED_SLOTS, STARTED, Schedules
from convergence_server.engine.templates import Catalog


class PipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    def __init__(self, runs: Runs, catalog: Catalog, schedules: Schedules) -> None:
        self._runs = runs
        self._catalog = catalog
        self._schedules = schedules

    async def ListPipelines(
        self,
        request: pipeline_service_pb2.ListPipelinesRequest,
        context: ServicerContext[Any, Any],
    ) -> pipeline_service_pb2.ListPipelinesResponse:
        require_caller()
        return pipeline_service_pb2.ListPipelinesResponse(
            pipelines=[
                convert.pipeline_template(t) for _, t in sorted(self._catalog.templates.items())
            ]
        )

    async def RunPipeline(
        self, request: pipeline_service_pb2.RunPipelineRequest, context: ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.RunPipelineResponse:
        triggered = await self._runs.trigger(
            require_caller(),
            TriggerRequest(
                tenant_id=request.tenant_id,
                provider=request.provider,
                domain=request.domain,
                template=request.template,
                trigger_by=request.trigger_by,
                date=request.date,
                parameters=dict(request.parameters),
                idempotency_key=request.idempotency_key,
                user_id=logs.user_id_var.get(),
                idempotency_header=metadata_value(context, "idempotency-key") or "",
            ),
        )
        run = triggered.run
        return pipeline_service_pb2.RunPipelineResponse(
            pipeline_logging_id=run.pipeline_logging_id,
            pipeline_id=run.pipeline_id,
            tenant_id=run.tenant_id,
            status=convert.run_status(run.status),
            message=triggered.message,
        )

    async def TriggerScheduledPipelines(
        self,
        request: pipeline_service_pb2.TriggerScheduledPipelinesRequest,
        context: ServicerContext[Any, Any],
    ) -> pipeline_service_pb2.TriggerScheduledPipelinesResponse:
        tenant_id = None if operator_var.get() else require_caller().tenant_id
        outcomes = await self._schedules.trigger(tenant_id)
        started = [o.run for o in outcomes if o.outcome == STARTED and o.run is not None]
        message = "No schedule had a due slot"
        if outcomes:
            message = f"Started {len(started)} run(s); `slots` says what became of each due slot"
        if len(outcomes) > MAX_REPORTED_SLOTS:
            message += f" (the first {MAX_REPORTED_SLOTS} of {len(outcomes)} are listed)"
        return pipeline_service_pb2.TriggerScheduledPipelinesResponse(
            runs=[convert.run(r) for r in started[:MAX_REPORTED_SLOTS]],
            message=message,
            slots=[convert.slot_result(o) for o in outcomes[:MAX_REPORTED_SLOTS]],
        )
