"""The documented error bodies, over REST, and the matching gRPC statuses."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import duckdb
import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from convergence.v1 import (
    health_service_pb2,
    health_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)
from tests.conftest import (
    GUIDE_TENANT,
    StackFactory,
    database_path,
    dump_store,
    new_tenant_id,
    onboard,
    schemas,
)

BAD_TENANT_BODY = {
    "error": "Validation error",
    "message": "Invalid tenant_id format",
    "details": {"field": "tenant_id", "issue": "must match pattern ^[a-zA-Z0-9_]{3,50}$"},
}
REPORT_FIELDS = {"status", "ready_for_onboarding", "validation_summary", "validation_results"}
UNAUTHENTICATED_BODY = {"error": "Authentication failed", "message": "Invalid or missing API key"}


def error_fields(body: dict[str, object]) -> dict[str, object]:
    """The documented error keys; onboarding errors add the dry-run report beside them."""
    return {k: v for k, v in body.items() if k in ("error", "message", "details", "request_id")}


@pytest.mark.parametrize("path", ["/api/v1/tenants/dryrun", "/api/v1/tenants/onboard"])
def test_bad_tenant_id_is_400_with_field_and_issue(http: httpx.Client, path: str) -> None:
    response = http.post(path, json={"tenant_id": "a-b", **GUIDE_TENANT})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    # The documented error, and beside it the dry-run report the guide says to review.
    assert error_fields(body) == BAD_TENANT_BODY
    assert body.keys() == {*BAD_TENANT_BODY, *REPORT_FIELDS}
    assert body["status"] == "FAILED"
    assert body["ready_for_onboarding"] is False
    assert body["validation_summary"] == {"total_checks": 15, "passed": 14, "failed": 1}
    failed = [r["check_name"] for r in body["validation_results"] if r["status"] == "FAILED"]
    assert failed == ["tenant_id_format"]
    for leaked in ("grpc-status", "grpc-message", "x-error-body", "x-http-status"):
        assert leaked not in response.headers


def test_every_bad_field_is_reported(http: httpx.Client, channel: grpc.Channel) -> None:
    payload = {
        "tenant_id": "ok_tenant_" + new_tenant_id()[2:10],
        "company_name": " ",
        "admin_email": "not-an-email",
        "subscription_plan": "GOLD",
    }
    body = http.post("/api/v1/tenants/dryrun", json=payload).json()
    failed = {r["check_name"] for r in body["validation_results"] if r["status"] == "FAILED"}
    assert failed == {"company_name_valid", "admin_email_valid", "subscription_plan_known"}
    assert body["details"] == {"field": "company_name", "issue": "must be 1 to 200 characters"}

    with pytest.raises(grpc.RpcError) as raised:
        tenant_service_pb2_grpc.TenantServiceStub(channel).DryRunOnboarding(
            tenant_service_pb2.DryRunOnboardingRequest(**payload)
        )
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata())["grpc-status-details-bin"]
    )
    bad_request = error_details_pb2.BadRequest()
    report = tenant_service_pb2.DryRunOnboardingResponse()
    for detail in status.details:
        detail.Unpack(bad_request) or detail.Unpack(report)
    assert [v.field for v in bad_request.field_violations] == [
        "company_name",
        "admin_email",
        "subscription_plan",
    ]
    assert report.validation_summary.failed == 3


def test_missing_and_invalid_keys_are_401(http: httpx.Client) -> None:
    tenant_id, key = onboard(http)
    for headers in (
        {},
        {"X-API-Key": "nope"},
        {"X-API-Key": key[:-1] + ("A" if key[-1] != "A" else "B")},
    ):
        response = http.get("/api/v1/pipelines/runs", headers=headers)
        assert response.status_code == 401, headers
        assert response.json() == UNAUTHENTICATED_BODY
    # /health needs no key, but a key that is sent must be valid.
    assert http.get("/health", headers={"X-API-Key": "nope"}).status_code == 401
    # A valid key naming another tenant in its prefix is no key at all.
    other_id, _ = onboard(http)
    forged = key.replace(tenant_id, other_id, 1)
    assert http.get("/health", headers={"X-API-Key": forged}).status_code == 401


def test_grpc_missing_key_is_unauthenticated(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        run_service_pb2_grpc.RunServiceStub(channel).ListRuns(run_service_pb2.ListRunsRequest())
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tenant_mismatch_is_403(http: httpx.Client, channel: grpc.Channel) -> None:
    tenant_a, key_a = onboard(http)
    tenant_b, _ = onboard(http)
    response = http.post(
        f"/api/v1/pipelines/run/{tenant_b}/gcp/cost/cost_billing",
        headers={"X-API-Key": key_a},
        json={"trigger_by": "john@acme.com", "date": "2025-11-18"},
    )
    assert response.status_code == 403
    assert response.json() == {
        "error": "Authorization failed",
        "message": f"Tenant ID mismatch: authenticated as '{tenant_a}' but requested '{tenant_b}'",
    }
    with pytest.raises(grpc.RpcError) as raised:
        pipeline_service_pb2_grpc.PipelineServiceStub(channel).RunPipeline(
            pipeline_service_pb2.RunPipelineRequest(
                tenant_id=tenant_b, provider="gcp", domain="cost", template="cost_billing"
            ),
            metadata=[("x-api-key", key_a)],
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_scheduler_trigger_without_schedules_starts_nothing(
    http: httpx.Client, channel: grpc.Channel
) -> None:
    """The guide's Cloud Scheduler call, for a tenant with no schedule: 200, nothing due."""
    _, key = onboard(http)
    response = http.post("/api/v1/scheduler/trigger", headers={"X-API-Key": key}, json={})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "runs": [],
        "message": "No schedule had a due slot",
        "slots": [],
    }
    answer = pipeline_service_pb2_grpc.PipelineServiceStub(channel).TriggerScheduledPipelines(
        pipeline_service_pb2.TriggerScheduledPipelinesRequest(), metadata=[("x-api-key", key)]
    )
    assert list(answer.slots) == [] and list(answer.runs) == []


def test_huge_tenant_id_still_gets_the_documented_400(
    http: httpx.Client, channel: grpc.Channel
) -> None:
    huge = "x" * 100_000
    response = http.post("/api/v1/tenants/onboard", json={"tenant_id": huge, **GUIDE_TENANT})
    assert response.status_code == 400
    assert error_fields(response.json()) == BAD_TENANT_BODY
    assert len(response.content) < 8_000
    with pytest.raises(grpc.RpcError) as raised:
        tenant_service_pb2_grpc.TenantServiceStub(channel).OnboardTenant(
            tenant_service_pb2.OnboardTenantRequest(tenant_id="y" * 3_000, **GUIDE_TENANT)
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_repeat_onboarding_is_409(http: httpx.Client) -> None:
    tenant_id, _ = onboard(http)
    response = http.post("/api/v1/tenants/onboard", json={"tenant_id": tenant_id, **GUIDE_TENANT})
    assert response.status_code == 409
    assert error_fields(response.json()) == {
        "error": "Conflict",
        "message": f"Tenant '{tenant_id}' already exists",
        "details": {"field": "tenant_id", "issue": "is already onboarded"},
    }
    # Same name in another letter case: the dataset names would collide.
    upper = http.post(
        "/api/v1/tenants/onboard", json={"tenant_id": tenant_id.upper(), **GUIDE_TENANT}
    )
    assert upper.status_code == 409


def test_parallel_onboarding_creates_exactly_one_tenant(stack_factory: StackFactory) -> None:
    stack = stack_factory()
    tenant_id = new_tenant_id()
    payload = {"tenant_id": tenant_id, **GUIDE_TENANT}
    with httpx.Client(base_url=stack.http_url, timeout=30) as http, ThreadPoolExecutor(10) as pool:
        responses = list(
            pool.map(lambda _: http.post("/api/v1/tenants/onboard", json=payload), range(10))
        )
    assert sorted(r.status_code for r in responses) == [200] + [409] * 9
    stack.stop()
    rows = dump_store(stack)
    assert [r[0] for r in rows["tenants.tenant_profiles"]] == [tenant_id]
    assert len(rows["tenants.tenant_api_keys"]) == 1
    assert tenant_id in schemas(stack)


def test_internal_error_is_500_with_a_logged_request_id(stack_factory: StackFactory) -> None:
    stack = stack_factory()
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        _, key = onboard(http)
    stack.stop()
    # Damage the store behind the server's back: the key table disappears.
    with duckdb.connect(str(database_path(stack))) as db:
        db.execute("DROP TABLE tenants.tenant_api_keys")
    stack = stack_factory(data_dir=stack.run_dir.parent)

    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        response = http.get("/health", headers={"X-API-Key": key})
        dry_run = http.post(
            "/api/v1/tenants/dryrun", json={"tenant_id": new_tenant_id(), **GUIDE_TENANT}
        )

    assert response.status_code == 500
    body = response.json()
    assert body == {
        "error": "Internal server error",
        "message": "An unexpected error occurred",
        "request_id": body["request_id"],
    }
    assert body["message"] == "An unexpected error occurred"
    assert response.headers["x-request-id"] == body["request_id"]
    stack.stop()
    log = (stack.run_dir.parent / "logs" / "server.log").read_text()
    logged = [json.loads(line) for line in log.splitlines() if body["request_id"] in line]
    assert (
        logged and logged[0]["severity"] == "ERROR" and "tenant_api_keys" in logged[0]["exception"]
    )
    # The dry-run reports the damage instead of failing with a 500.
    assert dry_run.status_code == 503
    assert dry_run.json()["error"] == "Service unavailable"
    assert dry_run.json()["message"] == "tenant_api_keys is missing"
    assert dry_run.json()["request_id"]


def test_grpc_health_service_is_registered(channel: grpc.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    custom = health_service_pb2_grpc.HealthServiceStub(channel).GetHealth(
        health_service_pb2.GetHealthRequest()
    )
    assert custom.status == "healthy"


def test_onboarding_abandoned_by_its_caller_leaves_nothing(
    http: httpx.Client, channel: grpc.Channel
) -> None:
    """A caller that gives up never received the key: no tenant may remain."""
    tenants = tenant_service_pb2_grpc.TenantServiceStub(channel)
    abandoned = 0
    for attempt in range(12):
        tenant_id = new_tenant_id()
        request = tenant_service_pb2.OnboardTenantRequest(tenant_id=tenant_id, **GUIDE_TENANT)
        try:
            tenants.OnboardTenant(request, timeout=0.002 * (attempt + 1))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            abandoned += 1
            payload = {"tenant_id": tenant_id, **GUIDE_TENANT}
            for _ in range(100):  # the server finishes undoing shortly after the deadline
                if http.post("/api/v1/tenants/dryrun", json=payload).status_code == 200:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"abandoned onboarding of {tenant_id} left the tenant behind")
    assert abandoned, "no attempt hit its deadline: shorten the timeouts"
