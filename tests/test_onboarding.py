"""The guide's onboarding steps, over REST through Envoy and over gRPC."""

from __future__ import annotations

import re

import grpc
import httpx
from google.protobuf import json_format

from convergence.v1 import (
    health_service_pb2,
    health_service_pb2_grpc,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)
from convergence_server.stack import Stack
from tests.conftest import GUIDE_TENANT, StackFactory, dump_store, new_tenant_id, schemas

KEY_PATTERN = r"^{tenant}_api_[A-Za-z0-9]{{52}}$"
CHECK_NAMES = [
    "tenant_id_format",
    "tenant_id_not_reserved",
    "tenant_not_onboarded",
    "tenant_id_case_unique",
    "dataset_absent",
    "company_name_valid",
    "admin_email_valid",
    "subscription_plan_known",
    "plan_limits_configured",
    "store_reachable",
    "central_tables_present",
    "schema_version_current",
    "dataset_create_permission",
    "templates_loadable",
    "key_hashing_configured",
]


def test_dry_run_returns_the_documented_report(http: httpx.Client) -> None:
    tenant_id = new_tenant_id()
    response = http.post("/api/v1/tenants/dryrun", json={"tenant_id": tenant_id, **GUIDE_TENANT})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    results = body.pop("validation_results")
    assert body == {
        "status": "SUCCESS",
        "ready_for_onboarding": True,
        "validation_summary": {"total_checks": 15, "passed": 15, "failed": 0},
        "message": "All validations passed. Safe to proceed with onboarding.",
    }
    assert [r["check_name"] for r in results] == CHECK_NAMES
    assert all(r["status"] == "PASSED" and r["message"] for r in results)


def test_dry_run_creates_nothing(stack_factory: StackFactory) -> None:
    stack = stack_factory()
    stack.stop()
    before, before_schemas = dump_store(stack), schemas(stack)
    stack = stack_factory(data_dir=stack.run_dir.parent)
    with httpx.Client(base_url=stack.http_url, timeout=10) as http:
        for _ in range(3):
            payload = {"tenant_id": new_tenant_id(), **GUIDE_TENANT}
            assert http.post("/api/v1/tenants/dryrun", json=payload).status_code == 200
    stack.stop()
    assert dump_store(stack) == before
    assert schemas(stack) == before_schemas


def test_onboarding_ignores_a_stale_key(http: httpx.Client) -> None:
    payload = {"tenant_id": new_tenant_id(), **GUIDE_TENANT}
    stale = {"X-API-Key": "old_tenant_api_" + "x" * 52}
    assert http.post("/api/v1/tenants/dryrun", json=payload, headers=stale).status_code == 200
    assert http.post("/api/v1/tenants/onboard", json=payload, headers=stale).status_code == 200


def test_onboard_returns_the_documented_response_and_a_working_key(http: httpx.Client) -> None:
    tenant_id = new_tenant_id()
    response = http.post("/api/v1/tenants/onboard", json={"tenant_id": tenant_id, **GUIDE_TENANT})

    assert response.status_code == 200
    body = response.json()
    api_key = body.pop("api_key")
    assert re.fullmatch(KEY_PATTERN.format(tenant=tenant_id), api_key)
    assert body == {
        "tenant_id": tenant_id,
        "subscription_plan": "PROFESSIONAL",
        "dataset_created": True,
        "tables_created": ["tenant_comprehensive_view", "onboarding_validation_test"],
        "message": "Tenant Acme Corporation onboarded successfully.",
    }

    health = http.get("/health", headers={"X-API-Key": api_key})
    assert health.status_code == 200
    assert health.json() == {
        "status": "healthy",
        "version": "0.1.0",
        "store": "embedded",
        "authenticated": True,
        "tenant_id": tenant_id,
    }


def test_health_without_a_key(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "healthy",
        "version": "0.1.0",
        "store": "embedded",
        "authenticated": False,
    }
    assert "grpc-status" not in response.headers


def test_onboarding_over_grpc(channel: grpc.Channel) -> None:
    tenants = tenant_service_pb2_grpc.TenantServiceStub(channel)
    tenant_id = new_tenant_id()

    report = tenants.DryRunOnboarding(
        tenant_service_pb2.DryRunOnboardingRequest(tenant_id=tenant_id, **GUIDE_TENANT)
    )
    assert report.status == tenant_service_pb2.DryRunOnboardingResponse.SUCCESS
    assert report.ready_for_onboarding
    assert report.validation_summary.total_checks == 15
    assert report.validation_summary.passed == 15

    onboarded = tenants.OnboardTenant(
        tenant_service_pb2.OnboardTenantRequest(tenant_id=tenant_id, **GUIDE_TENANT)
    )
    assert onboarded.tenant_id == tenant_id
    assert onboarded.dataset_created
    assert list(onboarded.tables_created) == [
        "tenant_comprehensive_view",
        "onboarding_validation_test",
    ]

    health = health_service_pb2_grpc.HealthServiceStub(channel).GetHealth(
        health_service_pb2.GetHealthRequest(), metadata=[("x-api-key", onboarded.api_key)]
    )
    assert health.authenticated
    assert health.tenant_id == tenant_id


def test_grpc_and_rest_print_the_same_json(http: httpx.Client, channel: grpc.Channel) -> None:
    payload = {"tenant_id": new_tenant_id(), **GUIDE_TENANT}
    rest = http.post("/api/v1/tenants/dryrun", json=payload).json()
    reply = tenant_service_pb2_grpc.TenantServiceStub(channel).DryRunOnboarding(
        tenant_service_pb2.DryRunOnboardingRequest(**payload)
    )
    assert rest == json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def test_grpc_through_envoy(stack_grpc_via_envoy: grpc.Channel) -> None:
    health = health_service_pb2_grpc.HealthServiceStub(stack_grpc_via_envoy).GetHealth(
        health_service_pb2.GetHealthRequest()
    )
    assert health.status == "healthy"
    # A streaming call (reflection) is not held back by Envoy's request buffering.
    assert "convergence.v1.RunService" in reflected_services(stack_grpc_via_envoy)


def test_direct_grpc_calls_get_a_request_id(channel: grpc.Channel) -> None:
    _, call = health_service_pb2_grpc.HealthServiceStub(channel).GetHealth.with_call(
        health_service_pb2.GetHealthRequest()
    )
    assert dict(call.trailing_metadata())["x-request-id"].startswith("req_")


def test_envoy_health_checks_the_server(stack: Stack) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.admin_port}", timeout=5) as admin:
        clusters = admin.get("/clusters").text
    line = f"convergence_grpc::127.0.0.1:{stack.grpc_port}::health_flags::healthy"
    assert line in clusters


def reflected_services(channel: grpc.Channel) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return {s.name for s in reply.list_services_response.service}


def test_server_reflection_lists_every_service(channel: grpc.Channel) -> None:
    assert {
        "convergence.v1.HealthService",
        "convergence.v1.TenantService",
        "convergence.v1.PipelineService",
        "convergence.v1.RunService",
        "grpc.health.v1.Health",
    } <= reflected_services(channel)
