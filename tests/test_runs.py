"""Runs: triggering, the run lifecycle, listing, steps, cancelling, watching, isolation."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from convergence.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from convergence_server.stack import Stack
from tests.conftest import UNMETERED, StackFactory, onboard, trigger, wait_for_run

QUICK = "test/runs/quick"
SLOW = "test/runs/slow"


def test_trigger_returns_the_documented_response_and_the_run_completes(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    response = api.post(
        f"/api/v1/pipelines/run/{tenant_id}/{QUICK}",
        headers={"X-API-Key": key, "X-User-ID": "user_123"},
        json={"trigger_by": "john@acme.com", "date": "2025-11-18"},
    )
    assert response.status_code == 200
    body = response.json()
    run_id = body.pop("pipeline_logging_id")
    assert uuid.UUID(run_id).version == 4
    assert body == {
        "pipeline_id": f"{tenant_id}-test-runs-quick",
        "tenant_id": tenant_id,
        "status": "PENDING",
        "message": "Pipeline triggered successfully (async mode)",
    }
    run = wait_for_run(api, key, run_id)
    assert run["status"] == "COMPLETE", run
    assert run["trigger_type"] == "api"
    assert run["trigger_by"] == "john@acme.com"
    assert run["user_id"] == "user_123"
    assert run["parameters"] == {"date": "2025-11-18", "allow_shrink": "false"}
    assert run["end_time"] >= run["start_time"]
    assert isinstance(run["duration_ms"], int)

    steps = api.get(f"/api/v1/pipelines/runs/{run_id}/steps", headers={"X-API-Key": key})
    assert [(s["step_name"], s["status"], s["rows_processed"]) for s in steps.json()["steps"]] == [
        ("one_row", "COMPLETE", 1)
    ]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("test/runs/quick", {"date": "18-11-2025"}, 400, "date"),
        ("test/runs/quick", {"date": "2025-02-30"}, 400, "date"),
        ("test/runs/quick", {"parameters": {"colour": "red"}}, 400, "parameters.colour"),
        ("test/runs/slow", {"parameters": {"size": "many"}}, 400, "parameters.size"),
        (
            "test/runs/quick",
            {"date": "2025-11-18", "parameters": {"date": "2025-11-19"}},
            400,
            "date",
        ),
        ("test/runs/quick", {"idempotency_key": "has space"}, 400, "idempotency_key"),
        ("test/runs/Quick", {}, 400, "template"),
        ("test/..%2F..%2Fetc/quick", {}, 400, "domain"),
        ("gcp/cost/no_such_template", {}, 404, None),
    ],
)
def test_bad_triggers_are_refused_and_start_nothing(
    api: httpx.Client, path: str, body: dict[str, object], status: int, field: str | None
) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    response = api.post(
        f"/api/v1/pipelines/run/{tenant_id}/{path}", headers={"X-API-Key": key}, json=body
    )
    assert response.status_code == status, response.text
    error = response.json()
    if field:
        assert error["error"] == "Validation error"
        assert error["details"]["field"] == field
    else:
        assert error["error"] == "Not found"
    runs = api.get("/api/v1/pipelines/runs", headers={"X-API-Key": key}).json()
    assert runs == {"runs": [], "next_page_token": ""}


def test_idempotent_triggers_create_exactly_one_run(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    headers = {"X-API-Key": key, "Idempotency-Key": f"nightly-{uuid.uuid4()}"}

    def fire(_: int) -> httpx.Response:
        return api.post(
            f"/api/v1/pipelines/run/{tenant_id}/{QUICK}",
            headers=headers,
            json={"date": "2025-11-18"},
        )

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(fire, range(20)))
    assert {r.status_code for r in responses} == {200}
    ids = {r.json()["pipeline_logging_id"] for r in responses}
    assert len(ids) == 1
    messages = sorted(r.json()["message"] for r in responses)
    assert messages.count("Pipeline triggered successfully (async mode)") == 1
    listed = api.get("/api/v1/pipelines/runs", headers={"X-API-Key": key}).json()["runs"]
    assert [r["pipeline_logging_id"] for r in listed] == list(ids)
    # The request field works like the header.
    again = api.post(
        f"/api/v1/pipelines/run/{tenant_id}/{QUICK}",
        headers={"X-API-Key": key},
        json={"idempotency_key": headers["Idempotency-Key"], "date": "2025-11-18"},
    )
    assert again.json()["pipeline_logging_id"] in ids
    # The same key for a different request is a conflict, not a silent replay.
    other = api.post(
        f"/api/v1/pipelines/run/{tenant_id}/{QUICK}", headers=headers, json={"date": "2025-11-19"}
    )
    assert other.status_code == 409
    assert "was used within 24 hours for another request" in other.json()["message"]


def test_cancel_a_pending_and_a_running_run(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    auth = {"X-API-Key": key}
    # Several slow runs: the last ones wait as PENDING behind the busy workers.
    run_ids = [trigger(api, key, tenant_id, SLOW)["pipeline_logging_id"] for _ in range(6)]
    running = wait_for_run(api, key, run_ids[0], ("RUNNING", "COMPLETE", "FAILED"))
    assert running["status"] == "RUNNING"

    cancelled = api.post(f"/api/v1/pipelines/runs/{run_ids[0]}:cancel", headers=auth, json={})
    assert cancelled.status_code == 200
    pending = api.post(f"/api/v1/pipelines/runs/{run_ids[-1]}:cancel", headers=auth, json={})
    assert pending.status_code == 200

    first = wait_for_run(api, key, run_ids[0])
    assert first["status"] == "FAILED"
    assert first["error_message"].startswith("Cancelled")
    ran = api.get(f"/api/v1/pipelines/runs/{run_ids[0]}/steps", headers=auth).json()["steps"]
    assert "counted" not in [s["step_name"] for s in ran]  # it stopped at a step boundary
    last = wait_for_run(api, key, run_ids[-1])
    assert last["status"] == "FAILED"
    assert last["error_message"] == "Cancelled before it started"
    assert "start_time" not in last
    steps = api.get(f"/api/v1/pipelines/runs/{run_ids[-1]}/steps", headers=auth).json()
    assert steps == {"steps": []}
    # Ended runs cannot be cancelled again.
    again = api.post(f"/api/v1/pipelines/runs/{run_ids[-1]}:cancel", headers=auth, json={})
    assert again.status_code == 409
    for run_id in run_ids[1:-1]:  # the others: cancelled, or ended before the request
        outcome = api.post(f"/api/v1/pipelines/runs/{run_id}:cancel", headers=auth, json={})
        assert outcome.status_code in (200, 409)
        assert wait_for_run(api, key, run_id)["status"] in ("COMPLETE", "FAILED")


def test_watch_streams_the_run_to_its_end(api: httpx.Client, pipelines: Stack) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    run_id = trigger(api, key, tenant_id, SLOW, parameters={"size": "500000"})[
        "pipeline_logging_id"
    ]
    with grpc.insecure_channel(pipelines.grpc_target) as channel:
        stream = run_service_pb2_grpc.RunServiceStub(channel).WatchRun(
            run_service_pb2.WatchRunRequest(pipeline_logging_id=str(run_id)),
            metadata=[("x-api-key", key)],
            timeout=120,
        )
        updates = list(stream)
    assert updates[-1].run.status == run_pb2.Run.COMPLETE
    assert [s.step_name for s in updates[-1].steps] == ["count_1", "count_2", "count_3", "counted"]
    statuses = [u.run.status for u in updates]
    assert statuses == sorted(statuses)  # PENDING/RUNNING before COMPLETE, never back
    assert len(updates) >= 3

    # Over REST, the same stream arrives as one JSON array once the run has ended.
    rest = api.get(f"/api/v1/pipelines/runs/{run_id}:watch", headers={"X-API-Key": key})
    assert rest.status_code == 200
    assert json.loads(rest.text)[-1]["run"]["status"] == "COMPLETE"


def test_a_tenant_sees_nothing_of_another(api: httpx.Client, pipelines: Stack) -> None:
    tenant_a, key_a = onboard(api, plan=UNMETERED)
    _, key_b = onboard(api, plan=UNMETERED)
    run_id = trigger(api, key_a, tenant_a, QUICK)["pipeline_logging_id"]
    as_b = {"X-API-Key": key_b}
    for response in (
        api.get(f"/api/v1/pipelines/runs/{run_id}", headers=as_b),
        api.get(f"/api/v1/pipelines/runs/{run_id}/steps", headers=as_b),
        api.get(f"/api/v1/pipelines/runs/{run_id}:watch", headers=as_b),
        api.post(f"/api/v1/pipelines/runs/{run_id}:cancel", headers=as_b, json={}),
    ):
        assert response.status_code == 404, response.request.url
        assert response.json()["error"] == "Not found"
    assert api.get("/api/v1/pipelines/runs", headers=as_b).json()["runs"] == []
    forbidden = api.post(f"/api/v1/pipelines/run/{tenant_a}/{QUICK}", headers=as_b, json={})
    assert forbidden.status_code == 403
    with grpc.insecure_channel(pipelines.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            list(
                run_service_pb2_grpc.RunServiceStub(channel).WatchRun(
                    run_service_pb2.WatchRunRequest(pipeline_logging_id=str(run_id)),
                    metadata=[("x-api-key", key_b)],
                )
            )
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as unauthenticated:
            list(
                run_service_pb2_grpc.RunServiceStub(channel).WatchRun(
                    run_service_pb2.WatchRunRequest(pipeline_logging_id=str(run_id))
                )
            )
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_list_pipelines(api: httpx.Client) -> None:
    _, key = onboard(api, plan=UNMETERED)
    pipelines = api.get("/api/v1/pipelines", headers={"X-API-Key": key}).json()["pipelines"]
    keys = {f"{p['provider']}/{p['domain']}/{p['template']}" for p in pipelines}
    assert {
        "gcp/cost/cost_billing",
        "gcp/compute/vm_inventory",
        "gcp/security/audit_logs",
        "aws/cost/cost_usage",
        "azure/cost/cost_management",
        QUICK,
    } <= keys
    quick = next(p for p in pipelines if p["template"] == "quick")
    (date, allow_shrink) = quick["parameters"]
    assert date == {"name": "date", "type": "date", "default": "yesterday", "description": ""}
    assert allow_shrink["name"] == "allow_shrink" and allow_shrink["default"] == "false"


def test_many_watchers_of_a_run_share_one_poll(
    stack_factory: StackFactory, pipeline_env: dict[str, str]
) -> None:
    """20 streams watch one PENDING run (no workers); its cancel reaches all of them from
    one read of the store, not one per watcher (the store calls are counted in /metrics)."""
    stack = stack_factory(**pipeline_env, CONVERGENCE_WORKERS="0", CONVERGENCE_METRICS_PORT="0")
    watchers = 20
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        run_id = str(trigger(http, key, tenant_id, QUICK)["pipeline_logging_id"])
        with grpc.insecure_channel(stack.grpc_target) as channel:
            stub = run_service_pb2_grpc.RunServiceStub(channel)
            streams = [
                stub.WatchRun(
                    run_service_pb2.WatchRunRequest(pipeline_logging_id=run_id),
                    metadata=[("x-api-key", key)],
                    timeout=120,
                )
                for _ in range(watchers)
            ]
            firsts = [next(stream) for stream in streams]  # every watcher has joined
            assert {f.run.status for f in firsts} == {run_pb2.Run.PENDING}
            before = steps_reads(stack)
            cancelled = http.post(
                f"/api/v1/pipelines/runs/{run_id}:cancel", headers={"X-API-Key": key}, json={}
            )
            assert cancelled.status_code == 200, cancelled.text
            lasts = [list(stream) for stream in streams]
    assert all(updates[-1].run.status == run_pb2.Run.FAILED for updates in lasts)
    # One read for the cancel; a poll may come too. One read per watcher would be 20.
    assert steps_reads(stack) - before <= 3


def steps_reads(stack: Stack) -> float:
    text = httpx.get(stack.metrics_url, timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "convergence_store_operation_seconds_count"
                and sample.labels.get("operation") == "list_steps"
            ):
                total += sample.value
    return total
