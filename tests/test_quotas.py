"""Plan quotas: exact daily and concurrent limits under contention, the request rate,
UTC midnight, and slots freed after a crash."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2, status_pb2

from convergence.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from convergence_server.stack import Stack
from tests.conftest import StackFactory, dump_store, onboard, trigger, wait_for_run

QUICK = ("test", "runs", "quick")
QUICK_PATH = "test/runs/quick"
CONCURRENT_BODY = {
    "error": "Rate limit exceeded",
    "message": "Concurrent pipeline limit reached. You have 5 pipelines pending or running "
    "(limit: 5)",
    "retry_after": 10,
}


def seconds_to_midnight(now: datetime) -> int:
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return math.ceil((midnight - now).total_seconds())


@pytest.fixture(scope="module")
def idle(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Stack:
    """No workers: admitted runs stay PENDING and keep their slots."""
    return stack_factory(
        data_dir=tmp_path_factory.mktemp("quotas"), CONVERGENCE_WORKERS="0", **pipeline_env
    )


def fire(stack: Stack, key: str, tenant_id: str, count: int) -> list[tuple[int, dict[str, object]]]:
    """`count` triggers at once, alternately over REST and gRPC: (HTTP-like status, body)."""
    path = f"/api/v1/pipelines/run/{tenant_id}/{'/'.join(QUICK)}"
    request = pipeline_service_pb2.RunPipelineRequest(
        tenant_id=tenant_id, provider=QUICK[0], domain=QUICK[1], template=QUICK[2]
    )
    with (
        httpx.Client(base_url=stack.http_url, timeout=30) as http,
        grpc.insecure_channel(stack.grpc_target) as channel,
    ):
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)

        def one(i: int) -> tuple[int, dict[str, object]]:
            if i % 2:
                response = http.post(path, headers={"X-API-Key": key}, json={})
                body = response.json()
                if response.status_code == 429:
                    assert response.headers["retry-after"] == str(body["retry_after"])
                return response.status_code, body
            try:
                reply = stub.RunPipeline(request, metadata=[("x-api-key", key)])
                return 200, {"pipeline_logging_id": reply.pipeline_logging_id}
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                status = status_pb2.Status.FromString(
                    dict(error.trailing_metadata())["grpc-status-details-bin"]
                )
                retry, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
                for detail in status.details:
                    detail.Unpack(retry) or detail.Unpack(failure)
                assert failure.violations[0].description == error.details()
                body = {
                    "error": "Rate limit exceeded",
                    "message": error.details(),
                    "retry_after": retry.retry_delay.seconds,
                }
                return 429, body

        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(one, range(count)))


@pytest.mark.parametrize("repetition", range(10))
def test_exactly_5_concurrent_and_25_a_day(idle: Stack, repetition: int) -> None:
    with httpx.Client(base_url=idle.http_url, timeout=30) as http:
        tenant_id, key = onboard(http)  # PROFESSIONAL: 25 a day, 5 at once
        auth = {"X-API-Key": key}
        # The key's rate allows 300 calls a minute: this test makes 293, so none is refused
        # for the rate however fast it runs (its bucket need not refill).
        results = fire(idle, key, tenant_id, 190)
        admitted = [body["pipeline_logging_id"] for status, body in results if status == 200]
        refused = [body for status, body in results if status != 200]
        assert len(admitted) == 5
        assert refused == [CONCURRENT_BODY] * 185

        total = 5
        while total < 22:  # free the slots (cancel), take them again
            for run_id in admitted:
                cancel = http.post(f"/api/v1/pipelines/runs/{run_id}:cancel", headers=auth)
                assert cancel.status_code == 200
            take = min(5, 22 - total)
            admitted = [
                body["pipeline_logging_id"]
                for status, body in fire(idle, key, tenant_id, take)
                if status == 200
            ]
            assert len(admitted) == take
            total += take
        for run_id in admitted:
            http.post(f"/api/v1/pipelines/runs/{run_id}:cancel", headers=auth)
        # 22 used, none active: of 60 at once, exactly the day's last 3 get in.
        over = fire(idle, key, tenant_id, 60)
        admitted = [body["pipeline_logging_id"] for status, body in over if status == 200]
        assert len(admitted) == 3
        refusals = [body for status, body in over if status != 200]
        assert len(refusals) == 57
        expected_wait = seconds_to_midnight(datetime.now(UTC))
        for body in refusals:
            assert body["message"] == (
                "Daily pipeline quota exceeded. You have run 25 pipelines today (limit: 25)"
            )
            assert abs(int(body["retry_after"]) - expected_wait) <= 5  # type: ignore[call-overload]
        for run_id in admitted:
            http.post(f"/api/v1/pipelines/runs/{run_id}:cancel", headers=auth)

        usage = http.get(f"/api/v1/tenants/{tenant_id}/usage", headers=auth).json()
        assert usage["pipelines_run_today"] == 25
        assert usage["pipelines_failed_today"] == 25  # all cancelled
        assert usage["max_concurrent_reached"] == 5
        assert usage["concurrent_pipelines_running"] == 0
        assert (usage["daily_limit"], usage["remaining_today"]) == (25, 0)
        assert (usage["concurrent_limit"], usage["remaining_concurrent"]) == (5, 5)


def test_the_request_rate_is_per_key(idle: Stack) -> None:
    with httpx.Client(base_url=idle.http_url, timeout=30) as http:
        _, key = onboard(http, plan="STARTER")  # 60 requests a minute
        _, other = onboard(http, plan="STARTER")
        answers = [http.get("/health", headers={"X-API-Key": key}) for _ in range(75)]
        ok = [a for a in answers if a.status_code == 200]
        limited = [a for a in answers if a.status_code == 429]
        assert len(ok) in range(60, 63)  # the bucket refills a token a second meanwhile
        assert len(ok) + len(limited) == 75
        assert ok[0].headers["x-ratelimit-limit"] == "60"
        assert int(ok[-1].headers["x-ratelimit-remaining"]) <= 1
        body = limited[0].json()
        assert body["error"] == "Rate limit exceeded"
        assert "allows 60 requests per minute" in body["message"]
        assert body["retry_after"] == 1 and limited[0].headers["retry-after"] == "1"
        assert http.get("/health", headers={"X-API-Key": other}).status_code == 200


def test_the_daily_count_restarts_at_utc_midnight(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path: Path,
) -> None:
    offset_file = tmp_path / "clock-offset"
    now = datetime.now(UTC)
    late = datetime.combine(now.date(), datetime.min.time(), UTC) + timedelta(hours=23, minutes=59)
    offset_file.write_text(str((late - now).total_seconds()))
    stack = stack_factory(
        data_dir=tmp_path / "data",
        CONVERGENCE_WORKERS="0",
        CONVERGENCE_CLOCK_OFFSET_FILE=str(offset_file),
        **pipeline_env,
    )
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan="STARTER")  # 6 a day, 1 at once
        auth = {"X-API-Key": key}
        runs = []
        for _ in range(6):
            runs.append(trigger(http, key, tenant_id, QUICK_PATH)["pipeline_logging_id"])
            if len(runs) < 6:  # the 6th stays PENDING across midnight
                http.post(f"/api/v1/pipelines/runs/{runs[-1]}:cancel", headers=auth)
        path = f"/api/v1/pipelines/run/{tenant_id}/{QUICK_PATH}"
        refused = http.post(path, headers=auth, json={})
        assert refused.status_code == 429
        assert refused.json()["message"].startswith("Daily pipeline quota exceeded")
        assert 1 <= refused.json()["retry_after"] <= 60

        next_day = late + timedelta(minutes=2)
        offset_file.write_text(str((next_day - datetime.now(UTC)).total_seconds()))
        time.sleep(0.05)
        # Yesterday's run ends today: it counts as yesterday's failure, today's slot frees.
        assert (
            http.post(f"/api/v1/pipelines/runs/{runs[-1]}:cancel", headers=auth).status_code == 200
        )
        after = http.post(path, headers=auth, json={})
        assert after.status_code == 200, after.text
    stack.stop()
    rows = {
        row[1]: row
        for row in dump_store(stack)["tenants.tenant_usage_quotas"]
        if row[0] == tenant_id
    }
    # tenant_id, usage_date, run, succeeded, failed, concurrent, max concurrent, limits
    # Yesterday's row kept its concurrency; it only gained the late failure.
    assert rows[late.date()][2:9] == (6, 0, 6, 1, 1, 6, 1)
    assert rows[next_day.date()][2:9] == (1, 0, 0, 1, 1, 6, 1)


def test_a_crash_frees_the_slots_of_the_runs_it_interrupted(
    stack_factory: StackFactory, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**pipeline_env, "CONVERGENCE_WORKERS": "2"}
    stack = stack_factory(data_dir=tmp_path / "data", **env)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan="STARTER")  # 1 at once
        run_id = trigger(http, key, tenant_id, "test/runs/slow")["pipeline_logging_id"]
        assert wait_for_run(http, key, run_id, ("RUNNING",))["status"] == "RUNNING"
        path = f"/api/v1/pipelines/run/{tenant_id}/{QUICK_PATH}"
        blocked = http.post(path, headers={"X-API-Key": key}, json={})
        assert blocked.status_code == 429
        fragile_id, fragile_key = onboard(http, plan="STARTER")
        fragile = trigger(http, fragile_key, fragile_id, "test/runs/fragile")
        wait_for_run(http, fragile_key, fragile["pipeline_logging_id"], ("RUNNING",))
    stack.kill_server()
    stack.stop()
    restarted = stack_factory(data_dir=tmp_path / "data", **env)
    with httpx.Client(base_url=restarted.http_url, timeout=30) as http:
        assert wait_for_run(http, key, run_id)["status"] == "COMPLETE"
        again = trigger(http, key, tenant_id, QUICK_PATH)["pipeline_logging_id"]
        assert wait_for_run(http, key, again)["status"] == "COMPLETE"
        # A run its template does not retry ended FAILED (or completed): its slot is free.
        ended = wait_for_run(http, fragile_key, fragile["pipeline_logging_id"])
        assert ended["status"] in ("FAILED", "COMPLETE")
        admitted = trigger(http, fragile_key, fragile_id, QUICK_PATH)["pipeline_logging_id"]
        assert wait_for_run(http, fragile_key, admitted)["status"] == "COMPLETE"


def test_the_7th_team_member_of_a_professional_tenant_is_refused(idle: Stack) -> None:
    with httpx.Client(base_url=idle.http_url, timeout=30) as http:
        tenant_id, key = onboard(http)  # PROFESSIONAL: a team of 6
        for n in range(6):
            ok = http.get("/health", headers={"X-API-Key": key, "X-User-ID": f"user_{n}"})
            assert ok.status_code == 200
        seventh = http.get("/health", headers={"X-API-Key": key, "X-User-ID": "user_6"})
        assert seventh.status_code == 403
        assert seventh.json()["error"] == "Authorization failed"
        assert seventh.json()["message"].startswith(
            "Team size limit reached: plan PROFESSIONAL allows 6 team members"
        )
        auth = {"X-API-Key": key}
        team = http.get(f"/api/v1/tenants/{tenant_id}/members", headers=auth).json()
        assert team["team_size"] == 6
        assert [m["user_id"] for m in team["members"]] == [f"user_{n}" for n in range(6)]
        # Known members keep working; removing one makes room.
        assert http.get("/health", headers={**auth, "X-User-ID": "user_0"}).status_code == 200
        removed = http.delete(f"/api/v1/tenants/{tenant_id}/members/user_0", headers=auth)
        assert removed.status_code == 200
        assert http.get("/health", headers={**auth, "X-User-ID": "user_6"}).status_code == 200
        gone = http.delete(f"/api/v1/tenants/{tenant_id}/members/nobody", headers=auth)
        assert gone.status_code == 404


def test_a_plan_change_applies_on_the_next_call(idle: Stack) -> None:
    with httpx.Client(base_url=idle.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan="STARTER")  # 1 at once
        other_id, other_key = onboard(http, plan="STARTER")
        auth = {"X-API-Key": key}
        path = f"/api/v1/pipelines/run/{tenant_id}/{QUICK_PATH}"
        assert http.post(path, headers=auth, json={}).status_code == 200
        assert http.post(path, headers=auth, json={}).status_code == 429
        changed = http.put(
            f"/api/v1/tenants/{tenant_id}/subscription",
            headers=auth,
            json={"subscription_plan": "SCALE"},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["subscription_plan"] == "SCALE"
        assert http.post(path, headers=auth, json={}).status_code == 200
        usage = http.get(f"/api/v1/tenants/{tenant_id}/usage", headers=auth).json()
        assert (usage["subscription_plan"], usage["daily_limit"], usage["concurrent_limit"]) == (
            "SCALE",
            100,
            10,
        )
        assert usage["concurrent_pipelines_running"] == 2
        bad = http.put(
            f"/api/v1/tenants/{tenant_id}/subscription",
            headers=auth,
            json={"subscription_plan": "GOLD"},
        )
        assert bad.status_code == 400
        assert bad.json()["details"]["field"] == "subscription_plan"
        for forbidden in (
            http.get(f"/api/v1/tenants/{other_id}/usage", headers=auth),
            http.put(
                f"/api/v1/tenants/{other_id}/subscription",
                headers=auth,
                json={"subscription_plan": "SCALE"},
            ),
            http.get(f"/api/v1/tenants/{other_id}/members", headers=auth),
        ):
            assert forbidden.status_code == 403
        assert (
            http.get(f"/api/v1/tenants/{other_id}/usage", headers={"X-API-Key": other_key}).json()[
                "subscription_plan"
            ]
            == "STARTER"
        )


def test_the_request_rate_over_grpc(idle: Stack) -> None:
    from convergence.v1 import health_service_pb2, health_service_pb2_grpc

    with httpx.Client(base_url=idle.http_url, timeout=30) as http:
        _, key = onboard(http, plan="STARTER")
    with grpc.insecure_channel(idle.grpc_target) as channel:
        stub = health_service_pb2_grpc.HealthServiceStub(channel)
        _, call = stub.GetHealth.with_call(
            health_service_pb2.GetHealthRequest(), metadata=[("x-api-key", key)]
        )
        assert dict(call.trailing_metadata())["x-ratelimit-limit"] == "60"
        refused = None
        for _ in range(80):
            try:
                stub.GetHealth(health_service_pb2.GetHealthRequest(), metadata=[("x-api-key", key)])
            except grpc.RpcError as error:
                refused = error
                break
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = status_pb2.Status.FromString(
        dict(refused.trailing_metadata())["grpc-status-details-bin"]
    )
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.seconds >= 1
