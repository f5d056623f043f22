"""A run's data-quality checks and warnings, over REST (through Envoy) and gRPC, on both
stores: a failed `warn` check publishes with `warnings`, a failed `error` check fails the
run, and `ListRunChecks` shows each check with its failed rows and samples."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from convergence.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from convergence_server.stack import Stack
from tests.conftest import UNMETERED, StackFactory, new_prefix, onboard, trigger, wait_for_run

CHECKS = "test/runs/checks"
QUICK = "test/runs/quick"
DAY = "2026-01-02"
# The template's rows: n = 1, 2, 3 on DAY; n = 2 has no label.
UNLABELLED = {"n": "2", "label": None, "day": DAY}
THIRD = {"n": "3", "label": "item 3", "day": DAY}


@pytest.fixture(scope="module", params=["embedded", "bigquery"])
def checks_stack(
    request: pytest.FixtureRequest, stack_factory: StackFactory, pipeline_env: dict[str, str]
) -> Iterator[Stack]:
    env = dict(pipeline_env)
    if request.param == "bigquery":
        env.update(request.getfixturevalue("emulator").env(new_prefix()))
    stack = stack_factory(**env)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def http(checks_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=checks_stack.http_url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def runs(checks_stack: Stack) -> Iterator[run_service_pb2_grpc.RunServiceStub]:
    with grpc.insecure_channel(checks_stack.grpc_target) as channel:
        yield run_service_pb2_grpc.RunServiceStub(channel)


def run_to_end(http: httpx.Client, key: str, tenant_id: str, **parameters: str) -> dict[str, Any]:
    body: dict[str, object] = {"date": DAY}
    if parameters:
        body["parameters"] = parameters
    run_id = trigger(http, key, tenant_id, CHECKS, **body)["pipeline_logging_id"]
    return wait_for_run(http, key, run_id, timeout=300)


def rest_checks(http: httpx.Client, key: str, run_id: object) -> list[dict[str, Any]]:
    response = http.get(f"/api/v1/pipelines/runs/{run_id}/checks", headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    body: dict[str, list[dict[str, Any]]] = response.json()
    assert list(body) == ["checks"]
    return body["checks"]


def outcomes(checks: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(step, name, type, severity, status, failed rows or None, samples) of each check."""
    return [
        (
            c["step_name"],
            c["check_name"],
            c["check_type"],
            c["severity"],
            c["status"],
            c.get("failed_rows"),
            c["sample_rows"],
        )
        for c in checks
    ]


@pytest.fixture(scope="module")
def warned(http: httpx.Client) -> tuple[str, dict[str, Any]]:
    """A tenant's key and its run of the checks template that ended (a warn check fails)."""
    tenant_id, key = onboard(http, plan=UNMETERED)
    return key, run_to_end(http, key, tenant_id)


def test_a_failed_warn_check_publishes_and_counts_as_a_warning(
    http: httpx.Client,
    runs: run_service_pb2_grpc.RunServiceStub,
    warned: tuple[str, dict[str, Any]],
) -> None:
    key, run = warned
    assert (run["status"], run["warnings"], run["error_message"]) == ("COMPLETE", 1, ""), run

    checks = rest_checks(http, key, run["pipeline_logging_id"])
    assert outcomes(checks) == [
        ("validate", "has_rows", "row_count", "error", "PASSED", None, []),
        ("validate", "labelled", "not_null", "warn", "FAILED", 1, [UNLABELLED]),
        ("validate", "below_three", "expression", "error", "PASSED", 0, []),
    ]
    labelled = checks[1]
    assert (labelled["observed_value"], labelled["expected_value"]) == ("1", "0")
    assert "label" in labelled["message"]
    assert {c["run_attempt"] for c in checks} == {1}
    assert all(c["created_at"] for c in checks)
    # A check that counts no rows prints no failed_rows at all (not 0).
    assert "failed_rows" not in checks[0]

    steps = http.get(
        f"/api/v1/pipelines/runs/{run['pipeline_logging_id']}/steps",
        headers={"X-API-Key": key},
    ).json()["steps"]
    assert [(s["step_name"], s["warnings"]) for s in steps] == [
        ("numbers", 0),
        ("validate", 1),
        ("tail", 0),
    ]
    listed = http.get("/api/v1/pipelines/runs", headers={"X-API-Key": key}).json()["runs"]
    assert [(r["pipeline_logging_id"], r["warnings"]) for r in listed] == [
        (run["pipeline_logging_id"], 1)
    ]

    # gRPC returns the same checks; a sample row is a Struct.
    metadata = (("x-api-key", key),)
    answer = runs.ListRunChecks(
        run_service_pb2.ListRunChecksRequest(pipeline_logging_id=run["pipeline_logging_id"]),
        metadata=metadata,
    )
    assert [(c.check_name, c.status, c.HasField("failed_rows")) for c in answer.checks] == [
        ("has_rows", run_pb2.RunCheck.PASSED, False),
        ("labelled", run_pb2.RunCheck.FAILED, True),
        ("below_three", run_pb2.RunCheck.PASSED, True),
    ]
    assert answer.checks[1].failed_rows == 1
    assert [json_format.MessageToDict(s) for s in answer.checks[1].sample_rows] == [UNLABELLED]
    got = runs.GetRun(
        run_service_pb2.GetRunRequest(pipeline_logging_id=run["pipeline_logging_id"]),
        metadata=metadata,
    )
    assert (got.status, got.warnings) == (run_pb2.Run.COMPLETE, 1)


def test_a_failed_error_check_fails_the_run_with_its_checks_listed(http: httpx.Client) -> None:
    tenant_id, key = onboard(http, plan=UNMETERED)
    run = run_to_end(http, key, tenant_id, break_error="true")
    assert run["status"] == "FAILED", run
    assert "below_three" in run["error_message"]
    # The warn check failed in this attempt too: it is counted though nothing published.
    assert run["warnings"] == 1
    assert outcomes(rest_checks(http, key, run["pipeline_logging_id"])) == [
        ("validate", "has_rows", "row_count", "error", "PASSED", None, []),
        ("validate", "labelled", "not_null", "warn", "FAILED", 1, [UNLABELLED]),
        ("validate", "below_three", "expression", "error", "FAILED", 1, [THIRD]),
    ]


def test_a_run_without_checks_lists_none_and_has_no_warnings(http: httpx.Client) -> None:
    tenant_id, key = onboard(http, plan=UNMETERED)
    run_id = trigger(http, key, tenant_id, QUICK, date=DAY)["pipeline_logging_id"]
    run = wait_for_run(http, key, run_id, timeout=300)
    assert (run["status"], run["warnings"]) == ("COMPLETE", 0), run
    assert rest_checks(http, key, run_id) == []


def test_watch_reports_the_warning_while_the_run_goes_on(
    http: httpx.Client, runs: run_service_pb2_grpc.RunServiceStub
) -> None:
    tenant_id, key = onboard(http, plan=UNMETERED)
    body = {"date": DAY, "parameters": {"tail_size": "3000000"}}
    run_id = str(trigger(http, key, tenant_id, CHECKS, **body)["pipeline_logging_id"])
    updates = list(
        runs.WatchRun(
            run_service_pb2.WatchRunRequest(pipeline_logging_id=run_id),
            metadata=(("x-api-key", key),),
            timeout=300,
        )
    )
    final = updates[-1]
    assert (final.run.status, final.run.warnings) == (run_pb2.Run.COMPLETE, 1)
    assert [(s.step_name, s.warnings) for s in final.steps] == [
        ("numbers", 0),
        ("validate", 1),
        ("tail", 0),
    ]
    warnings = [u.run.warnings for u in updates]
    assert warnings == sorted(warnings)  # 0 until the checks are recorded, then 1
    # The checks were reported while the last step still ran.
    assert any(u.run.status == run_pb2.Run.RUNNING and u.run.warnings == 1 for u in updates)

    rest = http.get(f"/api/v1/pipelines/runs/{run_id}:watch", headers={"X-API-Key": key})
    assert rest.status_code == 200
    assert rest.json()[-1]["run"]["warnings"] == 1


def test_checks_are_only_the_tenants_own_and_ids_are_checked(
    http: httpx.Client,
    runs: run_service_pb2_grpc.RunServiceStub,
    warned: tuple[str, dict[str, Any]],
) -> None:
    key_a, run = warned
    _, key_b = onboard(http, plan=UNMETERED)
    run_id = str(run["pipeline_logging_id"])
    path = f"/api/v1/pipelines/runs/{run_id}/checks"

    foreign = http.get(path, headers={"X-API-Key": key_b})
    assert foreign.status_code == 404, foreign.text
    assert foreign.json()["error"] == "Not found"
    assert http.get(path).status_code == 401

    malformed = http.get("/api/v1/pipelines/runs/not-a-run/checks", headers={"X-API-Key": key_a})
    assert malformed.status_code == 400, malformed.text
    body = malformed.json()
    assert body["error"] == "Validation error"
    assert body["details"]["field"] == "pipeline_logging_id"

    # A run id in capitals is the same run.
    upper = http.get(path.replace(run_id, run_id.upper()), headers={"X-API-Key": key_a})
    assert upper.status_code == 200
    assert len(upper.json()["checks"]) == 3

    for key, request_id, code in (
        (key_b, run_id, grpc.StatusCode.NOT_FOUND),
        (key_a, "not-a-run", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            runs.ListRunChecks(
                run_service_pb2.ListRunChecksRequest(pipeline_logging_id=request_id),
                metadata=(("x-api-key", key),),
            )
        assert raised.value.code() == code
