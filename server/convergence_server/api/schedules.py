"""ScheduleService: create, read, list, change, pause, resume, backfill and delete schedules."""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import schedule_pb2, schedule_service_pb2, schedule_service_pb2_grpc
from convergence_server import logs
from convergence_server.api import convert
from convergence_server.api.context import require_caller
from convergence_server.domain.schedules import Schedules, ScheduleSpec


class ScheduleServicer(schedule_service_pb2_grpc.ScheduleServiceServicer):
    def __init__(self, schedules: Schedules) -> None:
        self._schedules = schedules

    async def CreateSchedule(
        self,
        request: schedule_service_pb2.CreateScheduleRequest,
        context: ServicerContext[Any, Any],
    ) -> schedule_pb2.Schedule:
        created = await self._schedules.create(
            require_caller(),
            ScheduleSpec(
                provider=request.provider,
                domain=request.domain,
                template=request.template,
                cron=request.cron,
                time_zone=request.time_zone,
                parameters=dict(request.parameters),
                catch_up=request.catch_up,
                catch_up_max=request.catch_up_max,
                created_by=request.created_by,
                paused=request.paused,
            ),
            logs.user_id_var.get(),
        )
        return convert.schedule(created)

    async def GetSchedule(
        self, request: schedule_service_pb2.GetScheduleRequest, context: ServicerContext[Any, Any]
    ) -> schedule_pb2.Schedule:
        return convert.schedule(await self._schedules.get(require_caller(), request.schedule_id))

    async def ListSchedules(
        self,
        request: schedule_service_pb2.ListSchedulesRequest,
        context: ServicerContext[Any, Any],
    ) -> schedule_service_pb2.ListSchedulesResponse:
        page = await self._schedules.page(require_caller(), request.limit, request.page_token)
        return schedule_service_pb2.ListSchedulesResponse(
            schedules=[convert.schedule(s) for s in page.schedules],
            next_page_token=page.next_page_token,
        )

    async def UpdateSchedule(
        self,
        request: schedule_service_pb2.UpdateScheduleRequest,
        context: ServicerContext[Any, Any],
    ) -> schedule_pb2.Schedule:
        caller = require_caller()
        given = request.schedule
        paths = list(request.update_mask.paths)
        if not paths:  # the fields given a value
            paths = [f.name for f, _ in given.ListFields()]
        changes: dict[str, Any] = {}
        for path in paths:
            if path not in given.DESCRIPTOR.fields_by_name:
                changes[path] = None  # refused by the domain, as any field that cannot change
            elif path == "parameters":
                changes[path] = dict(given.parameters)
            else:
                changes[path] = getattr(given, path)
        updated = await self._schedules.update(caller, request.schedule_id, changes)
        return convert.schedule(updated)

    async def DeleteSchedule(
        self,
        request: schedule_service_pb2.DeleteScheduleRequest,
        context: ServicerContext[Any, Any],
    ) -> schedule_service_pb2.DeleteScheduleResponse:
        deleted = await self._schedules.delete(require_caller(), request.schedule_id)
        return schedule_service_pb2.DeleteScheduleResponse(
            schedule_id=deleted.schedule_id,
            message=f"Schedule {deleted.schedule_id} deleted; it will not start runs again",
        )

    async def PauseSchedule(
        self,
        request: schedule_service_pb2.PauseScheduleRequest,
        context: ServicerContext[Any, Any],
    ) -> schedule_pb2.Schedule:
        return convert.schedule(await self._schedules.pause(require_caller(), request.schedule_id))

    async def ResumeSchedule(
        self,
        request: schedule_service_pb2.ResumeScheduleRequest,
        context: ServicerContext[Any, Any],
    ) -> schedule_pb2.Schedule:
        resumed = await self._schedules.resume(require_caller(), request.schedule_id)
        return convert.schedule(resumed)

    async def BackfillSchedule(
        self,
        request: schedule_service_pb2.BackfillScheduleRequest,
        context: ServicerContext[Any, Any],
    ) -> schedule_service_pb2.BackfillScheduleResponse:
        schedule, slots = await self._schedules.backfill(
            require_caller(), request.schedule_id, request.start_date, request.end_date
        )
        return schedule_service_pb2.BackfillScheduleResponse(
            schedule=convert.schedule(schedule), slots=slots
        )
