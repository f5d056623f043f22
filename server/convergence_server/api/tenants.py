"""TenantService: dry-run and onboarding."""

from __future__ import annotations

import logging
from typing import Any

from grpc.aio import ServicerContext

from convergence.v1 import tenant_service_pb2, tenant_service_pb2_grpc
from convergence_server.api import convert
from convergence_server.domain.onboarding import Onboarding

log = logging.getLogger(__name__)


class TenantServicer(tenant_service_pb2_grpc.TenantServiceServicer):
    def __init__(self, onboarding: Onboarding) -> None:
        self._onboarding = onboarding

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
