"""The synchronous client: one method per RPC, typed errors, retries and whole listings.

`AsyncClient` (`convergence.aio`) is the same over `grpc.aio`; what the two share (request
building, the key headers, the bookkeeping of a watch) is here.
"""

from __future__ import annotations

import contextlib
import datetime
import time
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Protocol, Self, TypeAlias, TypeVar

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from convergence._retry import Backoff, RetryPolicy
from convergence.errors import ConvergenceError, DeadlineExceeded, Unavailable, from_rpc_error
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

__all__ = ["Client"]

Metadata = tuple[tuple[str, str | bytes], ...]
Day = str | datetime.date
Instant = datetime.datetime | timestamp_pb2.Timestamp
RunStatus: TypeAlias = run_pb2.Run.Status.ValueType | str
Scope: TypeAlias = access_service_pb2.ApiKey.Scope.ValueType | str
TERMINAL = frozenset({run_pb2.Run.COMPLETE, run_pb2.Run.FAILED})

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class PageRequest(Protocol):
    page_token: str


class Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


PageRequestT = TypeVar("PageRequestT", bound=PageRequest)
PageT = TypeVar("PageT", bound=Page)


def key_metadata(api_key: str | None, user_id: str | None) -> Metadata:
    """The headers of authenticated calls: `x-api-key`, and `x-user-id` when set."""
    metadata: Metadata = ()
    if api_key:
        metadata += (("x-api-key", api_key),)
    if user_id:
        metadata += (("x-user-id", user_id),)
    return metadata


def converted(error: grpc.RpcError) -> ConvergenceError:
    """The typed error for `error`, with `error` as its cause."""
    typed = from_rpc_error(error)
    typed.__cause__ = error
    return typed


# The messages' scalar fields have no presence: a field left out and one sent with its zero
# value ("", 0, False) are the same message. So an argument that is None ("not given") is
# sent as the zero value, and means what leaving the field out means.


def day(value: Day | None) -> str:
    """A `YYYY-MM-DD` day from a string, a date or a datetime; None: unset."""
    if value is None:
        return ""
    return value if isinstance(value, str) else value.strftime("%Y-%m-%d")


def instant(value: Instant | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp from a datetime (a naive one is taken as UTC) or a Timestamp."""
    if not isinstance(value, datetime.datetime):
        return value
    converted = timestamp_pb2.Timestamp()
    converted.FromDatetime(value)
    return converted


def run_status(value: RunStatus | None) -> run_pb2.Run.Status.ValueType:
    """A run status from its value or its name; None: any status."""
    if isinstance(value, str):
        return run_pb2.Run.Status.Value(value)
    return run_pb2.Run.STATUS_UNSPECIFIED if value is None else value


def key_scope(value: Scope | None) -> access_service_pb2.ApiKey.Scope.ValueType:
    """A key scope from its value or its name; None: the server's default (FULL)."""
    if isinstance(value, str):
        return access_service_pb2.ApiKey.Scope.Value(value)
    return access_service_pb2.ApiKey.SCOPE_UNSPECIFIED if value is None else value


def run_request(
    tenant_id: str,
    provider: str,
    domain: str,
    template: str,
    date: Day | None,
    parameters: Mapping[str, str] | None,
    trigger_by: str | None,
    idempotency_key: str | None,
) -> pipeline_service_pb2.RunPipelineRequest:
    """A trigger that is safe to send again: without a key of the caller's, a fresh one, so
    that every retry of this trigger names the same run."""
    return pipeline_service_pb2.RunPipelineRequest(
        tenant_id=tenant_id,
        provider=provider,
        domain=domain,
        template=template,
        date=day(date),
        parameters=parameters,
        trigger_by=trigger_by or "",
        idempotency_key=idempotency_key or str(uuid.uuid4()),
    )


def schedule_update(
    schedule_id: str,
    cron: str | None,
    time_zone: str | None,
    parameters: Mapping[str, str] | None,
    catch_up: str | None,
    catch_up_max: int | None,
) -> schedule_service_pb2.UpdateScheduleRequest:
    """An update of the fields given (`None`: unchanged; an empty value clears a field)."""
    given = {
        "cron": cron,
        "time_zone": time_zone,
        "parameters": parameters,
        "catch_up": catch_up,
        "catch_up_max": catch_up_max,
    }
    return schedule_service_pb2.UpdateScheduleRequest(
        schedule_id=schedule_id,
        schedule=schedule_pb2.Schedule(
            cron=cron or "",
            time_zone=time_zone or "",
            parameters=parameters,
            catch_up=catch_up or "",
            catch_up_max=catch_up_max or 0,
        ),
        update_mask=field_mask_pb2.FieldMask(
            paths=[name for name, value in given.items() if value is not None]
        ),
    )


def list_runs_request(
    *,
    status: RunStatus | None,
    pipeline_id: str | None,
    start_date: Day | None,
    end_date: Day | None,
    page_size: int | None,
) -> run_service_pb2.ListRunsRequest:
    """The first page of a run listing; a filter that is None is left out."""
    return run_service_pb2.ListRunsRequest(
        status=run_status(status),
        pipeline_id=pipeline_id or "",
        start_date=day(start_date),
        end_date=day(end_date),
        limit=page_size or 0,
    )


def create_schedule_request(
    provider: str,
    domain: str,
    template: str,
    *,
    cron: str | None,
    time_zone: str | None,
    parameters: Mapping[str, str] | None,
    catch_up: str | None,
    catch_up_max: int | None,
    created_by: str | None,
    paused: bool | None,
) -> schedule_service_pb2.CreateScheduleRequest:
    """A new schedule; a field that is None takes the server's default."""
    return schedule_service_pb2.CreateScheduleRequest(
        provider=provider,
        domain=domain,
        template=template,
        cron=cron or "",
        time_zone=time_zone or "",
        parameters=parameters,
        catch_up=catch_up or "",
        catch_up_max=catch_up_max or 0,
        created_by=created_by or "",
        paused=paused or False,
    )


def create_api_key_request(
    tenant_id: str, name: str, *, scope: Scope | None, expires_at: Instant | None
) -> access_service_pb2.CreateApiKeyRequest:
    """A new key of `scope` (None: FULL) that expires at `expires_at` (None: never)."""
    return access_service_pb2.CreateApiKeyRequest(
        tenant_id=tenant_id, name=name, scope=key_scope(scope), expires_at=instant(expires_at)
    )


def list_audit_log_request(
    tenant_id: str,
    *,
    events: Sequence[str] | None,
    start_time: Instant | None,
    end_time: Instant | None,
    page_size: int | None,
) -> access_service_pb2.ListAuditLogRequest:
    """The first page of an audit-log listing; a filter that is None is left out."""
    return access_service_pb2.ListAuditLogRequest(
        tenant_id=tenant_id,
        event=events,
        start_time=instant(start_time),
        end_time=instant(end_time),
        limit=page_size or 0,
    )


class Watch:
    """The bookkeeping of a watch: the caller's deadline, the waits between streams, and
    whether the run has ended. A stream that delivered something resets the retries: only
    streams that fail one after another without news count against the policy."""

    def __init__(self, policy: RetryPolicy, run_id: str, timeout: float | None) -> None:
        self._run_id = run_id
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._backoff = Backoff(policy)
        self._delivered = False
        self.ended = False

    def open(self) -> float | None:
        """A stream opens now: its gRPC deadline (what is left of the caller's)."""
        self._delivered = False
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def seen(self, update: run_service_pb2.WatchRunResponse) -> None:
        self._delivered = True
        self.ended = update.run.status in TERMINAL

    def cut_short(self) -> ConvergenceError:
        """The error for a stream that ended before the run did."""
        return Unavailable(
            f"The watch of run {self._run_id} ended before the run did",
            code=grpc.StatusCode.UNAVAILABLE,
        )

    def wait(self, error: ConvergenceError) -> float:
        """Seconds to wait before watching again; raises `error`, or `TimeoutError` once the
        caller's deadline is spent."""
        if self._delivered:
            self._backoff.restart()
        if isinstance(error, DeadlineExceeded) and self._deadline is not None:
            raise self._timed_out() from error
        wait = self._backoff.wait(error)
        if wait is None:
            raise error
        if self._deadline is not None and time.monotonic() + wait >= self._deadline:
            raise self._timed_out() from error
        return wait

    def _timed_out(self) -> TimeoutError:
        return TimeoutError(f"Run {self._run_id} did not end within {self._timeout:g} s")


class Client:
    """A connection to a Convergence server (its gRPC port, or Envoy's).

    Calls send `api_key` as `x-api-key` and `user_id` as `x-user-id` (the open onboarding
    calls send neither, and need neither). The channel is insecure unless `credentials`
    are given (`grpc.ssl_channel_credentials()`); a `channel` of the caller's is used as it
    is and left open by `close()`. Every unary call has `timeout` seconds, and is retried as
    `retry` says (`RetryPolicy()` by default). Failures raise `convergence.errors` types.
    """

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        user_id: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30,
    ) -> None:
        if channel is not None and credentials is not None:
            raise ValueError("pass either credentials or a channel, not both")
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.insecure_channel(target)
                if credentials is None
                else grpc.secure_channel(target, credentials)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel, unless it was the caller's."""
        if self._owns_channel:
            self._channel.close()

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT],
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
                return method(
                    request,
                    timeout=backoff.timeout(self._timeout),
                    metadata=self._metadata if authenticated else None,
                )
            except grpc.RpcError as rpc_error:
                error = converted(rpc_error)
            wait = backoff.wait(error, repeatable)
            if wait is None:
                raise error
            time.sleep(wait)

    def _pages(
        self, method: grpc.UnaryUnaryMultiCallable[PageRequestT, PageT], request: PageRequestT
    ) -> Iterator[PageT]:
        while True:
            page = self._call(method, request)
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    # HealthService

    def get_health(self) -> health_service_pb2.GetHealthResponse:
        """The service's health; with a key, the tenant it belongs to."""
        return self._call(self._health.GetHealth, health_service_pb2.GetHealthRequest())

    # TenantService

    def dry_run_onboarding(
        self, tenant_id: str, company_name: str, admin_email: str, subscription_plan: str
    ) -> tenant_service_pb2.DryRunOnboardingResponse:
        """Validates a proposed tenant (needs no key); a refusal's `report` has every check."""
        request = tenant_service_pb2.DryRunOnboardingRequest(
            tenant_id=tenant_id,
            company_name=company_name,
            admin_email=admin_email,
            subscription_plan=subscription_plan,
        )
        return self._call(self._tenants.DryRunOnboarding, request, authenticated=False)

    def onboard_tenant(
        self, tenant_id: str, company_name: str, admin_email: str, subscription_plan: str
    ) -> tenant_service_pb2.OnboardTenantResponse:
        """Onboards a tenant (needs no key); the response's `api_key` is shown only once."""
        request = tenant_service_pb2.OnboardTenantRequest(
            tenant_id=tenant_id,
            company_name=company_name,
            admin_email=admin_email,
            subscription_plan=subscription_plan,
        )
        return self._call(
            self._tenants.OnboardTenant, request, authenticated=False, repeatable=False
        )

    def get_usage(self, tenant_id: str) -> tenant_service_pb2.GetUsageResponse:
        """Today's usage (UTC) against the plan, with the headroom left."""
        request = tenant_service_pb2.GetUsageRequest(tenant_id=tenant_id)
        return self._call(self._tenants.GetUsage, request)

    def update_subscription(
        self, tenant_id: str, subscription_plan: str
    ) -> tenant_service_pb2.UpdateSubscriptionResponse:
        """Changes the tenant's plan, from the next call on."""
        request = tenant_service_pb2.UpdateSubscriptionRequest(
            tenant_id=tenant_id, subscription_plan=subscription_plan
        )
        return self._call(self._tenants.UpdateSubscription, request)

    def list_members(self, tenant_id: str) -> tenant_service_pb2.ListMembersResponse:
        """The tenant's team: every distinct `x-user-id` that called with its keys."""
        request = tenant_service_pb2.ListMembersRequest(tenant_id=tenant_id)
        return self._call(self._tenants.ListMembers, request)

    def remove_member(
        self, tenant_id: str, user_id: str
    ) -> tenant_service_pb2.RemoveMemberResponse:
        """Removes a member, freeing a place in the team."""
        request = tenant_service_pb2.RemoveMemberRequest(tenant_id=tenant_id, user_id=user_id)
        return self._call(self._tenants.RemoveMember, request)

    def get_webhook(self, tenant_id: str) -> tenant_service_pb2.Webhook:
        """The tenant's webhook (its URL; never the signing secret)."""
        request = tenant_service_pb2.GetWebhookRequest(tenant_id=tenant_id)
        return self._call(self._tenants.GetWebhook, request)

    def set_webhook(
        self, tenant_id: str, url: str, rotate_secret: bool = False
    ) -> tenant_service_pb2.SetWebhookResponse:
        """Sets the URL called when a run fails or a schedule skips slots; the response
        carries the signing secret (a new one with `rotate_secret`)."""
        request = tenant_service_pb2.SetWebhookRequest(
            tenant_id=tenant_id, url=url, rotate_secret=rotate_secret
        )
        return self._call(self._tenants.SetWebhook, request)

    def delete_webhook(self, tenant_id: str) -> tenant_service_pb2.DeleteWebhookResponse:
        """Deletes the tenant's webhook: no event is sent from now on."""
        request = tenant_service_pb2.DeleteWebhookRequest(tenant_id=tenant_id)
        return self._call(self._tenants.DeleteWebhook, request)

    def test_webhook(self, tenant_id: str) -> tenant_service_pb2.TestWebhookResponse:
        """Sends a `webhook.test` event now and reports what the receiver answered."""
        request = tenant_service_pb2.TestWebhookRequest(tenant_id=tenant_id)
        return self._call(self._tenants.TestWebhook, request)

    # PipelineService

    def run_pipeline(
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
        return self._call(self._pipelines.RunPipeline, request)

    def list_pipelines(self) -> pipeline_service_pb2.ListPipelinesResponse:
        """The templates the tenant can run, with their parameters."""
        return self._call(
            self._pipelines.ListPipelines, pipeline_service_pb2.ListPipelinesRequest()
        )

    def trigger_scheduled_pipelines(
        self,
    ) -> pipeline_service_pb2.TriggerScheduledPipelinesResponse:
        """Starts the runs the tenant's schedules make due now, each slot at most once."""
        request = pipeline_service_pb2.TriggerScheduledPipelinesRequest()
        return self._call(self._pipelines.TriggerScheduledPipelines, request)

    # RunService

    def get_run(self, run_id: str) -> run_pb2.Run:
        """One run of the key's tenant."""
        request = run_service_pb2.GetRunRequest(pipeline_logging_id=run_id)
        return self._call(self._runs.GetRun, request)

    def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        pipeline_id: str | None = None,
        start_date: Day | None = None,
        end_date: Day | None = None,
        page_size: int | None = None,
    ) -> Iterator[run_pb2.Run]:
        """Every run that matches, newest first, fetched `page_size` at a time (1 to 1000;
        the server's default, 50, when None) as the iteration goes."""
        request = list_runs_request(
            status=status,
            pipeline_id=pipeline_id,
            start_date=start_date,
            end_date=end_date,
            page_size=page_size,
        )
        for page in self._pages(self._runs.ListRuns, request):
            yield from page.runs

    def list_run_steps(self, run_id: str) -> run_service_pb2.ListRunStepsResponse:
        """The run's steps that have started, in template order."""
        request = run_service_pb2.ListRunStepsRequest(pipeline_logging_id=run_id)
        return self._call(self._runs.ListRunSteps, request)

    def list_run_checks(self, run_id: str) -> run_service_pb2.ListRunChecksResponse:
        """The data-quality checks of the run's latest attempt, in the order they ran."""
        request = run_service_pb2.ListRunChecksRequest(pipeline_logging_id=run_id)
        return self._call(self._runs.ListRunChecks, request)

    def cancel_run(self, run_id: str) -> run_service_pb2.CancelRunResponse:
        """Cancels a run (it ends FAILED); FailedPrecondition when it has already ended."""
        request = run_service_pb2.CancelRunRequest(pipeline_logging_id=run_id)
        return self._call(self._runs.CancelRun, request)

    def watch_run(
        self, run_id: str, *, timeout: float | None = None
    ) -> Generator[run_service_pb2.WatchRunResponse, None, None]:
        """The run and its steps now, then at every change, until the run has ended.

        A stream the server ends early (UNAVAILABLE: its longest life) is opened again.
        `timeout` bounds the whole watch: past it, `TimeoutError`.
        """
        request = run_service_pb2.WatchRunRequest(pipeline_logging_id=run_id)
        watch = Watch(self._retry, run_id, timeout)
        while True:
            call = self._runs.WatchRun(request, timeout=watch.open(), metadata=self._metadata)
            try:
                for update in call:
                    watch.seen(update)
                    yield update
                    if watch.ended:
                        return
                error = watch.cut_short()
            except grpc.RpcError as rpc_error:
                error = converted(rpc_error)
            finally:
                call.cancel()  # type: ignore[no-untyped-call]  # unannotated in grpc-stubs
            time.sleep(watch.wait(error))

    def wait_for_run(self, run_id: str, timeout: float | None = None) -> run_pb2.Run:
        """The run once it has ended (COMPLETE or FAILED); `TimeoutError` after `timeout`
        seconds (None: as long as it takes)."""
        with contextlib.closing(self.watch_run(run_id, timeout=timeout)) as updates:
            for update in updates:
                if update.run.status in TERMINAL:
                    return update.run
        raise AssertionError("a watch ends only once the run has ended")

    # ScheduleService

    def create_schedule(
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
        return self._call(self._schedules.CreateSchedule, request, repeatable=False)

    def get_schedule(self, schedule_id: str) -> schedule_pb2.Schedule:
        """One schedule of the key's tenant."""
        request = schedule_service_pb2.GetScheduleRequest(schedule_id=schedule_id)
        return self._call(self._schedules.GetSchedule, request)

    def list_schedules(self, *, page_size: int | None = None) -> Iterator[schedule_pb2.Schedule]:
        """Every schedule of the tenant, oldest first, fetched `page_size` at a time."""
        request = schedule_service_pb2.ListSchedulesRequest(limit=page_size or 0)
        for page in self._pages(self._schedules.ListSchedules, request):
            yield from page.schedules

    def update_schedule(
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
        return self._call(self._schedules.UpdateSchedule, request)

    def delete_schedule(self, schedule_id: str) -> schedule_service_pb2.DeleteScheduleResponse:
        """Deletes a schedule; the runs it started are kept."""
        request = schedule_service_pb2.DeleteScheduleRequest(schedule_id=schedule_id)
        return self._call(self._schedules.DeleteSchedule, request)

    def pause_schedule(self, schedule_id: str) -> schedule_pb2.Schedule:
        """Pauses a schedule: no slot starts while it is paused."""
        request = schedule_service_pb2.PauseScheduleRequest(schedule_id=schedule_id)
        return self._call(self._schedules.PauseSchedule, request)

    def resume_schedule(self, schedule_id: str) -> schedule_pb2.Schedule:
        """Resumes a paused schedule."""
        request = schedule_service_pb2.ResumeScheduleRequest(schedule_id=schedule_id)
        return self._call(self._schedules.ResumeSchedule, request)

    def backfill_schedule(
        self, schedule_id: str, start_date: Day, end_date: Day
    ) -> schedule_service_pb2.BackfillScheduleResponse:
        """Makes the schedule's slots of those days (both included) due again."""
        request = schedule_service_pb2.BackfillScheduleRequest(
            schedule_id=schedule_id, start_date=day(start_date), end_date=day(end_date)
        )
        return self._call(self._schedules.BackfillSchedule, request, repeatable=False)

    # AccessService

    def create_api_key(
        self,
        tenant_id: str,
        name: str,
        *,
        scope: Scope | None = None,
        expires_at: Instant | None = None,
    ) -> access_service_pb2.CreateApiKeyResponse:
        """Creates a key (scope FULL by default); its secret, `api_key`, is shown only once."""
        request = create_api_key_request(tenant_id, name, scope=scope, expires_at=expires_at)
        return self._call(self._access.CreateApiKey, request, repeatable=False)

    def list_api_keys(self, tenant_id: str) -> access_service_pb2.ListApiKeysResponse:
        """The tenant's keys, newest first (never a secret)."""
        request = access_service_pb2.ListApiKeysRequest(tenant_id=tenant_id)
        return self._call(self._access.ListApiKeys, request)

    def get_api_key(self, tenant_id: str, key_id: str) -> access_service_pb2.ApiKey:
        """One key of the tenant."""
        request = access_service_pb2.GetApiKeyRequest(tenant_id=tenant_id, key_id=key_id)
        return self._call(self._access.GetApiKey, request)

    def revoke_api_key(self, tenant_id: str, key_id: str) -> access_service_pb2.ApiKey:
        """Revokes a key, at once."""
        request = access_service_pb2.RevokeApiKeyRequest(tenant_id=tenant_id, key_id=key_id)
        return self._call(self._access.RevokeApiKey, request)

    def rotate_api_key(
        self, tenant_id: str, key_id: str, *, grace_seconds: int | None = None
    ) -> access_service_pb2.CreateApiKeyResponse:
        """Replaces a key; the old one works `grace_seconds` more (None: 24 hours)."""
        request = access_service_pb2.RotateApiKeyRequest(
            tenant_id=tenant_id, key_id=key_id, grace_seconds=grace_seconds
        )
        return self._call(self._access.RotateApiKey, request, repeatable=False)

    def list_audit_log(
        self,
        tenant_id: str,
        *,
        events: Sequence[str] | None = None,
        start_time: Instant | None = None,
        end_time: Instant | None = None,
        page_size: int | None = None,
    ) -> Iterator[access_service_pb2.AuditEvent]:
        """Every audit event that matches, newest first, fetched `page_size` at a time."""
        request = list_audit_log_request(
            tenant_id, events=events, start_time=start_time, end_time=end_time, page_size=page_size
        )
        for page in self._pages(self._access.ListAuditLog, request):
            yield from page.events
