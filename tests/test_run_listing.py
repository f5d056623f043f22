"""Listing runs: keyset pages over thousands of runs, filters, and bad paging input."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import grpc
import httpx
import pytest

from convergence.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from tests.conftest import UNMETERED, StackFactory, onboard, trigger, wait_for_run

RUNS = 2_500
Listing = tuple[httpx.Client, str, str, set[str]]


@pytest.fixture(scope="module")
def idle(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Listing]:
    """A stack without workers (runs stay PENDING), and a tenant with RUNS runs."""
    stack = stack_factory(
        data_dir=tmp_path_factory.mktemp("listing"), CONVERGENCE_WORKERS="0", **pipeline_env
    )
    http = httpx.Client(base_url=stack.http_url, timeout=30)
    tenant_id, key = onboard(http, plan=UNMETERED)
    request = pipeline_service_pb2.RunPipelineRequest(
        tenant_id=tenant_id, provider="test", domain="runs", template="quick"
    )
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)

        def fire(_: int) -> str:
            reply = stub.RunPipeline(request, metadata=[("x-api-key", key)])
            return str(reply.pipeline_logging_id)

        with ThreadPoolExecutor(8) as pool:
            created = set(pool.map(fire, range(RUNS)))
    assert len(created) == RUNS
    yield http, tenant_id, key, created
    http.close()


def test_pages_cover_every_run_once_newest_first(
    idle: Listing,
) -> None:
    http, _, key, created = idle
    seen: list[dict[str, object]] = []
    token = ""
    pages = 0
    while True:
        params = {"limit": "100", **({"page_token": token} if token else {})}
        page = http.get("/api/v1/pipelines/runs", params=params, headers={"X-API-Key": key})
        assert page.status_code == 200, page.text
        body = page.json()
        seen += body["runs"]
        pages += 1
        token = body["next_page_token"]
        if not token:
            break
    ids = [r["pipeline_logging_id"] for r in seen]
    assert len(ids) == len(set(ids)) == RUNS
    order = [(datetime.fromisoformat(r["created_at"]), r["pipeline_logging_id"]) for r in seen]
    assert order == sorted(order, reverse=True)
    assert set(ids) == created
    assert pages == RUNS // 100
    assert all(r["status"] == "PENDING" for r in seen)


def test_default_and_maximum_limits(idle: Listing) -> None:
    http, _, key, _ = idle
    auth = {"X-API-Key": key}
    assert len(http.get("/api/v1/pipelines/runs", headers=auth).json()["runs"]) == 50
    assert len(http.get("/api/v1/pipelines/runs?limit=1000", headers=auth).json()["runs"]) == 1000
    for bad in ("0", "1001", "-1"):
        response = http.get(f"/api/v1/pipelines/runs?limit={bad}", headers=auth)
        if bad == "0":
            assert response.status_code == 200  # 0 means the default
            continue
        assert response.status_code == 400
        assert response.json()["details"]["field"] == "limit"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("page_token=garbage", "page_token"),
        (f"page_token={'W1tb' * 1250}", "page_token"),  # base64 of 3,750 "["
        ("start_date=2025-13-01", "start_date"),
        ("end_date=9999-12-31", "end_date"),
        ("end_date=yesterday", "end_date"),
        ("start_date=2025-12-03&end_date=2025-12-01", "end_date"),  # reversed, as elsewhere
        ("status=DONE", None),
    ],
)
def test_bad_listing_input(idle: Listing, query: str, field: str | None) -> None:
    http, _, key, _ = idle
    response = http.get(f"/api/v1/pipelines/runs?{query}", headers={"X-API-Key": key})
    assert response.status_code == 400, response.text
    if field:
        assert response.json()["details"]["field"] == field


def test_a_token_only_serves_the_filters_it_was_made_for(
    idle: Listing,
) -> None:
    http, tenant_id, key, _ = idle
    auth = {"X-API-Key": key}
    token = http.get("/api/v1/pipelines/runs?limit=10", headers=auth).json()["next_page_token"]
    response = http.get(
        f"/api/v1/pipelines/runs?limit=10&status=PENDING&page_token={token}", headers=auth
    )
    assert response.status_code == 400
    assert response.json()["details"]["field"] == "page_token"
    by_pipeline = http.get(
        f"/api/v1/pipelines/runs?limit=5&pipeline_id={tenant_id}-test-runs-quick", headers=auth
    ).json()["runs"]
    assert len(by_pipeline) == 5


def test_status_and_date_filters_over_rest(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    auth = {"X-API-Key": key}
    done = trigger(api, key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
    assert wait_for_run(api, key, done)["status"] == "COMPLETE"
    failed = trigger(api, key, tenant_id, "test/runs/slow", parameters={"size": "0"})
    # size=0 counts nothing, which the template's last check refuses.
    assert wait_for_run(api, key, failed["pipeline_logging_id"])["status"] == "FAILED"

    complete = api.get("/api/v1/pipelines/runs?limit=10&status=COMPLETE", headers=auth).json()
    assert [r["pipeline_logging_id"] for r in complete["runs"]] == [done]
    failures = api.get("/api/v1/pipelines/runs?status=FAILED", headers=auth).json()["runs"]
    assert [r["pipeline_logging_id"] for r in failures] == [failed["pipeline_logging_id"]]
    listed = api.get(
        "/api/v1/pipelines/runs?start_date=2000-01-01&end_date=2000-01-02", headers=auth
    )
    assert listed.json()["runs"] == []
