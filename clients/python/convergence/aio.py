"""The asyncio client: `AsyncClient`, the twin of `convergence.client.Client`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Self

import grpc

from convergence._retry import Backoff, RetryPolicy
from convergence.client import (
    TERMINAL,
    Day,
    Instant,
    PageRequestT,
    PageT,
    RequestT,
    ResponseT,
    RunStatus,
    Scope,
    Watch,
    converted,
    create_api_key_request,
    create_schedule_request,
    day,
    key_metadata,
    list_audit_log_request,
    list_runs_request,
    run_request,
    schedule_update,
)
from convergence.v1 import (
    access_service_pb2,
    access_service_pb2_grpc,
    health_service_pb2,
    health_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    schedule_pb2,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)

__all__ = ["AsyncClient"]


class AsyncClient:
    """The asyncio client: `Client`'s methods, each a coroutine, over a `grpc.aio` channel.

    The listings (`list_runs`, `list_schedules`, `list_audit_log`) and `watch_run` are async
    iterators. Create it inside a running event loop; `async with` (or `await close()`)
    closes the channel, unless it was the caller's.
    """

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        user_id: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30,
    ) -> None:
        if channel is not None and credentials is not None:
            raise ValueError("pass either credentials or a channel, not both")
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.aio.insecure_channel(target)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials)
            )
        self._channel = channel
        self._metadata = key_metadata(api_key, user_id)
        self._retry = retry or RetryPolicy()
        self._timeout = timeout
        self._health = health_service_pb2_grpc.HealthServiceStub(channel)
        self._tenants = tenant_service_pb2_grpc.TenantServiceStub(channel)
        self._pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        self._runs = run_service_pb2_grpc.RunServiceStub(channel)
        self._schedules = schedule_service_pb2_grpc.ScheduleServiceStub(channel)
        self._access = access_service_pb2_grpc.AccessServiceStub(channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel, unless it was the caller's."""
        if self._owns_channel:
            await self._channel.close(None)

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        *,
        authenticated: bool = True,
        repeatable: bool = True,
    ) -> ResponseT:
        """Calls `method`, retrying as the policy says. A call that is not `repeatable` (it
        creates something, without an idempotency key) is not retried after UNAVAILABLE:
        the server may have done it before the connection failed."""
        backoff = Backoff(self._retry)
        while True:
            try:
                return await method(
                    request,
                    timeout=backoff.timeout(self._timeout),
                    metadata=self._metadata if authenticated else None,
                )
            except grpc.RpcError as rpc_error:
                error = converted(rpc_error)
            wait = backoff.wait(error, repeatable)
            if wait is None:
                raise error
            await asyncio.sleep(wait)

    async def _pages(
        self, method: grpc.aio.UnaryUnaryMultiCallable[PageRequestT, PageT], request: PageRequestT
    ) -> AsyncIterator[PageT]:
        while True:
            page = await self._call(method, request)
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    # HealthService

    async def get_health(self) -> health_service_pb2.GetHealthResponse:
        """The service's health; with a key, the tenant it belongs to."""
        return await self._call(self._health.GetHealth, health_service_pb2.GetHealthRequest())

    # TenantService

    async def dry_run_onboarding(
        self, tenant_id: str, company_name: str, admin_email: str, subscription_plan: str
    ) -> tenant_service_pb2.DryRunOnboardingResponse:
        """Validates a proposed tenant (needs no key); a refusal's `report` has every check."""
        request = tenant_service_pb2.DryRunOnboardingRequest(
            tenant_id=tenant_id,
            company_name=company_name,
            admin_email=admin_email,
            subscription_plan=subscription_plan,
        )
        return await self._call(self._tenants.DryRunOnboarding, request, authenticated=False)

    async def onboard_tenant(
        self, tenant_id: str, company_name: str, admin_email: str, subscription_plan: str
    ) -> tenant_service_pb2.OnboardTenantResponse:
        """Onboards a tenant (needs no key); the response's `api_key` is shown only once."""
        request = tenant_service_pb2.OnboardTenantRequest(
            tenant_id=tenant_id,
            company_name=company_name,
            admin_email=admin_email,
            subscription_plan=subscription_plan,
        )
        return await self._call(
            self._tenants.OnboardTenant, request, authenticated=False, repeatable=False
        )

    async def get_usage(self, tenant_id: str) -> tenant_service_pb2.GetUsageResponse:
        """Today's usage (UTC) against the plan, with the headroom left."""
        request = tenant_service_pb2.GetUsageRequest(tenant_id=tenant_id)
        return await self._call(self._tenants.GetUsage, request)

    async def update_subscription(
        self, tenant_id: str, subscription_plan: str
    ) -> tenant_service_pb2.UpdateSubscriptionResponse:
        """Changes the tenant's plan, from the next call on."""
        request = tenant_service_pb2.UpdateSubscriptionRequest(
            tenant_id=tenant_id, subscription_plan=subscription_plan
        )
        return await self._call(self._tenants.UpdateSubscription, request)

    async def list_members(self, tenant_id: str) -> tenant_service_pb2.ListMembersResponse:
        """The tenant's team: every distinct `x-user-id` that called with its keys."""
        request = tenant_service_pb2.ListMembersRequest(tenant_id=tenant_id)
        return await self._call(self._tenants.ListMembers, request)

    async def remove_member(
        self, tenant_id: str, user_id: str
    ) -> tenant_service_pb2.RemoveMemberResponse:
        """Removes a member, freeing a place in the team."""
        request = tenant_service_pb2.RemoveMemberRequest(tenant_id=tenant_id, user_id=user_id)
        return await self._call(self._tenants.RemoveMember, request)

    async def get_webhook(self, tenant_id: str) -> tenant_service_pb2.Webhook:
        """The tenant's webhook (its URL; never the signing secret)."""
        request = tenant_service_pb2.GetWebhookRequest(tenant_id=tenant_id)
        return await self._call(self._tenants.GetWebhook, request)

    async def set_webhook(
        self, tenant_id: str, url: str, rotate_secret: bool = False
    ) -> tenant_service_pb2.SetWebhookResponse:
        """Sets the URL called when a run fails or a schedule skips slots; the response
        carries the signing secret (a new one with `rotate_secret`)."""
        request = tenant_service_pb2.SetWebhookRequest(
            tenant_id=tenant_id, url=url, rotate_secret=rotate_secret
        )
        return await self._call(self._tenants.SetWebhook, request)

    async def delete_webhook(self, tenant_id: str) -> tenant_service_pb2.DeleteWebhookResponse:
        """Deletes the tenant's webhook: no event is sent from now on."""
        request = tenant_service_pb2.DeleteWebhookRequest(tenant_id=tenant_id)
        return await self._call(self._tenants.DeleteWebhook, request)

    async def test_webhook(self, tenant_id: str) -> tenant_service_pb2.TestWebhookResponse:
        """Sends a `webhook.test` event now and reports what the receiver answered."""
        request = tenant_service_pb2.TestWebhookRequest(tenant_id=tenant_id)
        return await self._call(self._tenants.TestWebhook, request)

    # PipelineService

    async def run_pipeline(
        self,
        tenant_id: str,
        provider: str,
        domain: str,
        template: str,
        *,
        date: Day | None = None,
        parameters: Mapping[str, str] | None = None,
        trigger_by: str | None = None,
        idempotency_key: str | None = None,
    ) -> pipeline_service_pb2.RunPipelineResponse:
        """Starts a run of `provider/domain/template` (PENDING at first).

        Without an `idempotency_key` the client makes one (a UUID) and sends it with every
        retry, so a trigger retried after a lost answer still starts one run.
        """
        request = run_request(
            tenant_id, provider, domain, template, date, parameters, trigger_by, idempotency_key
        )
        return await self._call(self._pipelines.RunPipeline, request)

    async def list_pipelines(self) -> pipeline_service_pb2.ListPipelinesResponse:
        """The templates the tenant can run, with their parameters."""
        return await self._call(
            self._pipelines.ListPipelines, pipeline_service_pb2.ListPipelinesRequest()
        )

    async def trigger_scheduled_pipelines(
        self,
    ) -> pipeline_service_pb2.TriggerScheduledPipelinesResponse:
        """Starts the runs the tenant's schedules make due now, each slot at most once."""
        request = pipeline_service_pb2.TriggerScheduledPipelinesRequest()
        return await self._call(self._pipelines.TriggerScheduledPipelines, request)

    # RunService

    async def get_run(self, run_id: str) -> run_pb2.Run:
        """One run of the key's tenant."""
        request = run_service_pb2.GetRunRequest(pipeline_logging_id=run_id)
        return await self._call(self._runs.GetRun, request)

    async def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        pipeline_id: str | None = None,
        start_date: Day | None = None,
        end_date: Day | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[run_pb2.Run]:
        """Every run that matches, newest first, fetched `page_size` at a time (1 to 1000;
        the server's default, 50, when None) as the iteration goes."""
        request = list_runs_request(
            status=status,
            pipeline_id=pipeline_id,
            start_date=start_date,
            end_date=end_date,
            page_size=page_size,
        )
        async for page in self._pages(self._runs.ListRuns, request):
            for item in page.runs:
                yield item

    async def list_run_steps(self, run_id: str) -> run_service_pb2.ListRunStepsResponse:
        """The run's steps that have started, in template order."""
        request = run_service_pb2.ListRunStepsRequest(pipeline_logging_id=run_id)
        return await self._call(self._runs.ListRunSteps, request)

    async def list_run_checks(self, run_id: str) -> run_service_pb2.ListRunChecksResponse:
        """The data-quality checks of the run's latest attempt, in the order they ran."""
        request = run_service_pb2.ListRunChecksRequest(pipeline_logging_id=run_id)
        return await self._call(self._runs.ListRunChecks, request)

    async def cancel_run(self, run_id: str) -> run_service_pb2.CancelRunResponse:
        """Cancels a run (it ends FAILED); FailedPrecondition when it has already ended."""
        request = run_service_pb2.CancelRunRequest(pipeline_logging_id=run_id)
        return await self._call(self._runs.CancelRun, request)

    async def watch_run(
        self,
        run_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the stream's gRPC deadline)
    ) -> AsyncGenerator[run_service_pb2.WatchRunResponse, None]:
        """The run and its steps now, then at every change, until the run has ended.

        A stream the server ends early (UNAVAILABLE: its longest life) is opened again.
        `timeout` bounds the whole watch: past it, `TimeoutError`.
        """
        request = run_service_pb2.WatchRunRequest(pipeline_logging_id=run_id)
        watch = Watch(self._retry, run_id, timeout)
        while True:
            call = self._runs.WatchRun(request, timeout=watch.open(), metadata=self._metadata)
            try:
                async for update in call:
                    watch.seen(update)
                    yield update
                    if watch.ended:
                        return
                error = watch.cut_short()
            except grpc.RpcError as rpc_error:
                error = converted(rpc_error)
            finally:
                call.cancel()
            await asyncio.sleep(watch.wait(error))

    async def wait_for_run(
        self,
        run_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 (the watch's gRPC deadline)
    ) -> run_pb2.Run:
        """The run once it has ended (COMPLETE or FAILED); `TimeoutError` after `timeout`
        seconds (None: as long as it takes)."""
        async with contextlib.aclosing(self.watch_run(run_id, timeout=timeout)) as updates:
            async for update in updates:
                if update.run.status in TERMINAL:
                    return update.run
        raise AssertionError("a watch ends only once the run has ended")

    # ScheduleService

    async def create_schedule(
        self,
        provider: str,
        domain: str,
        template: str,
        *,
        cron: str | None = None,
        time_zone: str | None = None,
        parameters: Mapping[str, str] | None = None,
        catch_up: str | None = None,
        catch_up_max: int | None = None,
        created_by: str | None = None,
        paused: bool | None = None,
    ) -> schedule_pb2.Schedule:
        """Creates a schedule of `provider/domain/template` (cron: the template's default)."""
        request = create_schedule_request(
            provider,
            domain,
            template,
            cron=cron,
            time_zone=time_zone,
            parameters=parameters,
            catch_up=catch_up,
            catch_up_max=catch_up_max,
            created_by=created_by,
            paused=paused,
        )
        return await self._call(self._schedules.CreateSchedule, request, repeatable=False)

    async def get_schedule(self, schedule_id: str) -> schedule_pb2.Schedule:
        """One schedule of the key's tenant."""
        request = schedule_service_pb2.GetScheduleRequest(schedule_id=schedule_id)
        return await self._call(self._schedules.GetSchedule, request)

    async def list_schedules(
        self, *, page_size: int | None = None
    ) -> AsyncIterator[schedule_pb2.Schedule]:
        """Every schedule of the tenant, oldest first, fetched `page_size` at a time."""
        request = schedule_service_pb2.ListSchedulesRequest(limit=page_size or 0)
        async for page in self._pages(self._schedules.ListSchedules, request):
            for item in page.schedules:
                yield item

    async def update_schedule(
        self,
        schedule_id: str,
        *,
        cron: str | None = None,
        time_zone: str | None = None,
        parameters: Mapping[str, str] | None = None,
        catch_up: str | None = None,
        catch_up_max: int | None = None,
    ) -> schedule_pb2.Schedule:
        """Changes the fields given (None leaves a field as it is; an empty value clears it)."""
        request = schedule_update(schedule_id, cron, time_zone, parameters, catch_up, catch_up_max)
        return await self._call(self._schedules.UpdateSchedule, request)

    async def delete_schedule(
        self, schedule_id: str
    ) -> schedule_service_pb2.DeleteScheduleResponse:
        """Deletes a schedule; the runs it started are kept."""
        request = schedule_service_pb2.DeleteScheduleRequest(schedule_id=schedule_id)
        return await self._call(self._schedules.DeleteSchedule, request)

    async def pause_schedule(self, schedule_id: str) -> schedule_pb2.Schedule:
        """Pauses a schedule: no slot starts while it is paused."""
        request = schedule_service_pb2.PauseScheduleRequest(schedule_id=schedule_id)
        return await self._call(self._schedules.PauseSchedule, request)

    async def resume_schedule(self, schedule_id: str) -> schedule_pb2.Schedule:
        """Resumes a paused schedule."""
        request = schedule_service_pb2.ResumeScheduleRequest(schedule_id=schedule_id)
        return await self._call(self._schedules.ResumeSchedule, request)

    async def backfill_schedule(
        self, schedule_id: str, start_date: Day, end_date: Day
    ) -> schedule_service_pb2.BackfillScheduleResponse:
        """Makes the schedule's slots of those days (both included) due again."""
        request = schedule_service_pb2.BackfillScheduleRequest(
            schedule_id=schedule_id, start_date=day(start_date), end_date=day(end_date)
        )
        return await self._call(self._schedules.BackfillSchedule, request, repeatable=False)

    # AccessService

    async def create_api_key(
        self,
        tenant_id: str,
        name: str,
        *,
        scope: Scope | None = None,
        expires_at: Instant | None = None,
    ) -> access_service_pb2.CreateApiKeyResponse:
        """Creates a key (scope FULL by default); its secret, `api_key`, is shown only once."""
        request = create_api_key_request(tenant_id, name, scope=scope, expires_at=expires_at)
        return await self._call(self._access.CreateApiKey, request, repeatable=False)

    async def list_api_keys(self, tenant_id: str) -> access_service_pb2.ListApiKeysResponse:
        """The tenant's keys, newest first (never a secret)."""
        request = access_service_pb2.ListApiKeysRequest(tenant_id=tenant_id)
        return await self._call(self._access.ListApiKeys, request)

    async def get_api_key(self, tenant_id: str, key_id: str) -> access_service_pb2.ApiKey:
        """One key of the tenant."""
        request = access_service_pb2.GetApiKeyRequest(tenant_id=tenant_id, key_id=key_id)
        return await self._call(self._access.GetApiKey, request)

    async def revoke_api_key(self, tenant_id: str, key_id: str) -> access_service_pb2.ApiKey:
        """Revokes a key, at once."""
        request = access_service_pb2.RevokeApiKeyRequest(tenant_id=tenant_id, key_id=key_id)
        return await self._call(self._access.RevokeApiKey, request)

    async def rotate_api_key(
        self, tenant_id: str, key_id: str, *, grace_seconds: int | None = None
    ) -> access_service_pb2.CreateApiKeyResponse:
        """Replaces a key; the old one works `grace_seconds` more (None: 24 hours)."""
        request = access_service_pb2.RotateApiKeyRequest(
            tenant_id=tenant_id, key_id=key_id, grace_seconds=grace_seconds
        )
        return await self._call(self._access.RotateApiKey, request, repeatable=False)

    async def list_audit_log(
        self,
        tenant_id: str,
        *,
        events: Sequence[str] | None = None,
        start_time: Instant | None = None,
        end_time: Instant | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[access_service_pb2.AuditEvent]:
        """Every audit event that matches, newest first, fetched `page_size` at a time."""
        request = list_audit_log_request(
            tenant_id, events=events, start_time=start_time, end_time=end_time, page_size=page_size
        )
        async for page in self._pages(self._access.ListAuditLog, request):
            for item in page.events:
                yield item
