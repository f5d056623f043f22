"""Translation between protobuf messages and domain objects."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from convergence.v1 import tenant_pb2, tenant_service_pb2
from convergence_server.domain.onboarding import (
    CheckStatus,
    DryRunReport,
    OnboardedTenant,
    TenantApplication,
)

_CHECK_STATUS = {
    CheckStatus.PASSED: tenant_pb2.ValidationCheck.PASSED,
    CheckStatus.FAILED: tenant_pb2.ValidationCheck.FAILED,
    CheckStatus.WARNING: tenant_pb2.ValidationCheck.WARNING,
}


def to_json(message: Message) -> dict[str, Any]:
    """The message as Envoy's transcoder prints it (snake_case, zero values included)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def application(
    request: tenant_service_pb2.DryRunOnboardingRequest | tenant_service_pb2.OnboardTenantRequest,
) -> TenantApplication:
    return TenantApplication(
        tenant_id=request.tenant_id,
        company_name=request.company_name,
        admin_email=request.admin_email,
        subscription_plan=request.subscription_plan,
    )


def dry_run_response(report: DryRunReport) -> tenant_service_pb2.DryRunOnboardingResponse:
    response = tenant_service_pb2.DryRunOnboardingResponse
    return response(
        status=response.SUCCESS if report.ready else response.FAILED,
        ready_for_onboarding=report.ready,
        validation_summary=tenant_pb2.ValidationSummary(
            total_checks=len(report.results),
            passed=report.count(CheckStatus.PASSED),
            failed=report.count(CheckStatus.FAILED),
        ),
        message=report.message,
        validation_results=[
            tenant_pb2.ValidationCheck(
                check_name=r.check_name,
                status=_CHECK_STATUS[r.status],
                message=r.message,
                field=r.field,
            )
            for r in report.results
        ],
    )


def onboard_response(tenant: OnboardedTenant) -> tenant_service_pb2.OnboardTenantResponse:
    return tenant_service_pb2.OnboardTenantResponse(
        tenant_id=tenant.tenant_id,
        api_key=tenant.api_key,
        subscription_plan=tenant.subscription_plan,
        dataset_created=True,
        tables_created=list(tenant.tables_created),
        message=f"Tenant {tenant.company_name} onboarded successfully.",
    )
