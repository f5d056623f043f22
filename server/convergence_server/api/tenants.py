"""TenantService: dry-run and onboarding, plan, usage, team, webhook."""

from __future__ import annotations

import logging
from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import tenant_service_pb2, tenant_service_pb2_grpc
from convergence_server.api import convert
from convergence_server.api.context import require_caller
from convergence_server.domain.accounts import Accounts
from convergence_server.domain.onboarding import Onboarding
from convergence_server.domain.webhooks import Webhooks

log = logging.getLogger(__name__)


class TenantServicer(tenant_service_pb2_grpc.TenantServiceServicer):
    def __init__(self, onboarding: Onboarding, accounts: Accounts, webhooks: Webhooks) -> None:
        self._onboarding = onboarding
        self._accounts = accounts
        self._webhooks = webhooks

    async def DryRunOnboarding(
        self,
        request: tenant_service_pb2.DryRunOnboardingRequest,
        context: ServicerContext[Any, Any],
    ) -> tenant_service_pb2.DryRunOnboardingResponse:
        report = await self._onboarding.dry_run(convert.application(request))
        return convert.dry_run_response(report)

    async def OnboardTenant(
        self, request: tenant_service_pb2.OnboardTenantRequest, context: ServicerContext[Any, Any]
    ) -> tenant_service_pb2.OnboardTenantResponse:
        tenant = await self._onboarding.onboard(
            convert.application(request), context.time_remaining()
        )
        log.info("tenant onboarded", extra={"fields": {"tenant_id": tenant.tenant_id}})
        return convert.onboard_response(tenant)

    async def GetUsage(
        self, request: tenant_service_pb2.GetUsageRequest, context: ServicerContext[Any, Any]
    ) -> tenant_service_pb2.GetUsageResponse:
        usage = await self._accounts.usage(require_caller(), request.tenant_id)
        return tenant_service_pb2.GetUsageResponse(
            tenant_id=usage.tenant_id,
            usage_date=usage.usage_date.isoformat(),
            subscription_plan=usage.plan,
            pipelines_run_today=usage.run_today,
            pipelines_succeeded_today=usage.succeeded_today,
            pipelines_failed_today=usage.failed_today,
            concurrent_pipelines_running=usage.concurrent_running,
            max_concurrent_reached=usage.max_concurrent,
            daily_limit=usage.daily_limit,
            concurrent_limit=usage.concurrent_limit,
            remaining_today=usage.remaining_today,
            remaining_concurrent=usage.remaining_concurrent,
            requests_per_minute=usage.requests_per_minute,
            team_size=usage.team_size,
            team_members=usage.team_members,
        )

    async def UpdateSubscription(
        self,
        request: tenant_service_pb2.UpdateSubscriptionRequest,
        context: ServicerContext[Any, Any],
    ) -> tenant_service_pb2.UpdateSubscriptionResponse:
        plan = request.subscription_plan
        changed = await self._accounts.change_plan(require_caller(), request.tenant_id, plan)
        return tenant_service_pb2.UpdateSubscriptionResponse(
            tenant_id=request.tenant_id,
            subscription_plan=plan,
            message=f"Plan changed to {plan}; its limits apply from the next call."
            if changed
            else f"The plan is {plan} already: nothing changed.",
        )

    async def ListMembers(
        self, request: tenant_service_pb2.ListMembersRequest, context: ServicerContext[Any, Any]
    ) -> tenant_service_pb2.ListMembersResponse:
        members, team_size = await self._accounts.members(require_caller(), request.tenant_id)
        return tenant_service_pb2.ListMembersResponse(
            members=[convert.member(m) for m in members], team_size=team_size
        )

    async def RemoveMember(
        self, request: tenant_service_pb2.RemoveMemberRequest, context: ServicerContext[Any, Any]
    ) -> tenant_service_pb2.RemoveMemberResponse:
        await self._accounts.remove_member(require_caller(), request.tenant_id, request.user_id)
        return tenant_service_pb2.RemoveMemberResponse()

    async def GetWebhook(
        self, request: tenant_service_pb2.GetWebhookRequest, context: ServicerContext[Any, Any]
    ) -> tenant_service_pb2.Webhook:
        return convert.webhook(await self._webhooks.get(require_caller(), request.tenant_id))

    async def SetWebhook(
        self, request: tenant_service_pb2.SetWebhookRequest, context: ServicerContext[Any, Any]
    ) -> tenant_service_pb2.SetWebhookResponse:
        done = await self._webhooks.set(
            require_caller(), request.tenant_id, request.url, request.rotate_secret
        )
        return tenant_service_pb2.SetWebhookResponse(
            webhook=convert.webhook(done.webhook), signing_secret=done.signing_secret
        )

    async def DeleteWebhook(
        self, request: tenant_service_pb2.DeleteWebhookRequest, context: ServicerContext[Any, Any]
    ) -> tenant_service_pb2.DeleteWebhookResponse:
        await self._webhooks.delete(require_caller(), request.tenant_id)
        return tenant_service_pb2.DeleteWebhookResponse()

    async def TestWebhook(
        self, request: tenant_service_pb2.TestWebhookRequest, context: ServicerContext[Any, Any]
    ) -> tenant_service_pb2.TestWebhookResponse:
        event_id, result = await self._webhooks.test(require_caller(), request.tenant_id)
        return tenant_service_pb2.TestWebhookResponse(
            event_id=event_id,
            delivered=result.ok,
            status_code=result.status_code,
            error=result.error,
        )
