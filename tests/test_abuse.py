"""No tenant, anonymous caller or malformed request can hurt anyone else.

Client addresses: every loopback address (127.0.0.0/8) reaches the stack, so an HTTP
client bound to 127.0.0.N is a client of its own as far as Envoy and the server can tell.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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
from convergence_server import faults
from convergence_server.domain import keys
from convergence_server.stack import Stack
from tests.conftest import (
    GUIDE_TENANT,
    StackFactory,
    eventually,
    new_tenant_id,
    onboard,
    raw_http,
    trigger,
)

BILLING = "gcp/cost/cost_billing"
RUN_METHOD = "/convergence.v1.RunService/GetRun"


def client(stack: Stack, address: str = "127.0.0.1") -> httpx.Client:
    """A REST client whose connections come from `address`."""
    return httpx.Client(
        base_url=stack.http_url,
        timeout=60,
        transport=httpx.HTTPTransport(local_address=address),
    )


def server_log(stack: Stack) -> str:
    return (stack.run_dir.parent / "logs" / "server.log").read_text(errors="replace")


def assert_429(response: httpx.Response, message: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"] == "Rate limit exceeded"
    assert message in body["message"]
    assert isinstance(body["retry_after"], int) and body["retry_after"] >= 1
    assert response.headers["retry-after"] == str(body["retry_after"])


def dry_run_payload() -> dict[str, str]:
    return {"tenant_id": new_tenant_id(), **GUIDE_TENANT}


def grpc_refusal(target: str, forwarded: str = "") -> str:
    """A dry-run over gRPC: '' when admitted, else the refusal's message (a 429-like refusal
    that says when to retry). `forwarded`: the client address, as Envoy forwards it."""
    metadata = (("x-envoy-external-address", forwarded),) if forwarded else ()
    with grpc.insecure_channel(target) as channel:
        try:
            tenant_service_pb2_grpc.TenantServiceStub(channel).DryRunOnboarding(
                tenant_service_pb2.DryRunOnboardingRequest(**dry_run_payload()),
                metadata=metadata,
                timeout=60,
            )
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            status = rpc_status.from_call(error)
            assert status is not None
            infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert infos, "a refusal says when to retry"
            return str(error.details())
    return ""


def grpc_dry_run(target: str) -> grpc.StatusCode:
    refused = grpc_refusal(target)
    return grpc.StatusCode.RESOURCE_EXHAUSTED if refused else grpc.StatusCode.OK


# -- open endpoints and failed authentication -------------------------------------------

PER_CLIENT = 3
TOTAL = 6
FAILURES = 5


class Guarded:
    def __init__(self, stack: Stack, tenants: list[tuple[str, str]]) -> None:
        self.stack = stack
        self.tenants = tenants


@pytest.fixture(scope="module")
def guarded(stack_factory: StackFactory) -> Guarded:
    """A stack with small limits for anonymous callers; two tenants onboarded first, each
    from an address of its own (two of the `TOTAL` open calls)."""
    stack = stack_factory(
        CONVERGENCE_OPEN_REQUESTS_PER_MINUTE_PER_CLIENT=str(PER_CLIENT),
        CONVERGENCE_OPEN_REQUESTS_PER_MINUTE=str(TOTAL),
        CONVERGENCE_AUTH_FAILURES_PER_MINUTE=str(FAILURES),
        CONVERGENCE_WORKERS="0",
        CONVERGENCE_STREAM_MAX_SECONDS="3",
    )
    tenants = []
    for address in ("127.0.0.20", "127.0.0.21"):
        with client(stack, address) as http:
            tenants.append(onboard(http, plan="STARTER"))
    return Guarded(stack, tenants)


def test_anonymous_floods_are_refused_on_every_protocol(guarded: Guarded) -> None:
    stack = guarded.stack
    # One address over REST: its own limit.
    with client(stack, "127.0.0.22") as http:
        answers = [http.post("/api/v1/tenants/dryrun", json=dry_run_payload()) for _ in range(10)]
    refused = [a for a in answers if a.status_code != 200]
    assert len(answers) - len(refused) <= PER_CLIENT + 1  # one token may refill meanwhile
    for answer in refused:
        assert_429(answer, "from your address 127.0.0.22 ")  # the address Envoy saw

    # gRPC straight to the server's port and through Envoy's (both from 127.0.0.1).
    direct = [grpc_dry_run(stack.grpc_target) for _ in range(6)]
    via_envoy = [grpc_dry_run(stack.envoy_grpc_target) for _ in range(6)]
    assert direct.count(grpc.StatusCode.OK) + via_envoy.count(grpc.StatusCode.OK) <= PER_CLIENT
    assert via_envoy[-1] == direct[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED

    # A new address finds the total spent by the others.
    with client(stack, "127.0.0.23") as http:
        answers = [http.post("/api/v1/tenants/onboard", json=dry_run_payload()) for _ in range(6)]
    assert any(
        a.status_code == 429 and "all clients together" in a.json()["message"] for a in answers
    )

    # Tenants' own calls are not affected.
    with client(stack) as http:
        for _, key in guarded.tenants:
            assert http.get("/health", headers={"X-API-Key": key}).status_code == 200


def test_failed_authentications_are_throttled_per_address(guarded: Guarded) -> None:
    (tenant_id, key), _ = guarded.tenants
    with client(guarded.stack, "127.0.0.30") as http:
        wrong = [
            http.get("/health", headers={"X-API-Key": f"{tenant_id}_api_{uuid.uuid4().hex * 2}"})
            for _ in range(FAILURES + 3)
        ]
        right_from_there = http.get("/health", headers={"X-API-Key": key})
    statuses = [w.status_code for w in wrong]
    assert statuses[:FAILURES] == [401] * FAILURES
    assert set(statuses[FAILURES:]) == {429}
    assert_429(wrong[-1], "Too many failed authentications")
    assert_429(right_from_there, "Too many failed authentications")
    with client(guarded.stack, "127.0.0.31") as http:
        assert http.get("/health", headers={"X-API-Key": key}).status_code == 200


def test_failed_authentications_are_throttled_per_key_id(guarded: Guarded) -> None:
    """Guessing one key's secret from many addresses stops after `FAILURES` tries."""
    (_, other_key), (_, key) = guarded.tenants
    guess = key[: -keys.SECRET_LENGTH] + "x" * keys.SECRET_LENGTH
    answers = []
    for n in range(FAILURES + 2):
        with client(guarded.stack, f"127.0.0.{40 + n}") as http:
            answers.append(http.get("/health", headers={"X-API-Key": guess}))
    assert [a.status_code for a in answers] == [401] * FAILURES + [429, 429]
    with client(guarded.stack, "127.0.0.60") as http:
        assert http.get("/health", headers={"X-API-Key": other_key}).status_code == 200


def test_an_ipv6_client_is_limited_by_its_64(stack_factory: StackFactory) -> None:
    """A client given an IPv6 /64 could take a new address of it for every call: the open
    endpoints and failed authentications count its /64 as one client. The addresses are
    the ones Envoy forwards to the server (`x-envoy-external-address`), sent here from
    loopback, as Envoy does."""
    stack = stack_factory(
        CONVERGENCE_OPEN_REQUESTS_PER_MINUTE_PER_CLIENT=str(PER_CLIENT),
        CONVERGENCE_OPEN_REQUESTS_PER_MINUTE="1000",
        CONVERGENCE_AUTH_FAILURES_PER_MINUTE=str(FAILURES),
        CONVERGENCE_WORKERS="0",
    )

    def health(channel: grpc.Channel, address: str, key: str) -> grpc.StatusCode:
        try:
            health_service_pb2_grpc.HealthServiceStub(channel).GetHealth(
                health_service_pb2.GetHealthRequest(),
                metadata=(("x-envoy-external-address", address), ("x-api-key", key)),
                timeout=60,
            )
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    with grpc.insecure_channel(stack.grpc_target) as channel:
        target = stack.grpc_target
        rotating = [grpc_refusal(target, f"2001:db8:1:2::{n:x}") for n in range(1, 8)]
        admitted = rotating.count("")
        assert 1 <= admitted <= PER_CLIENT + 1  # one token may refill meanwhile
        assert "from your network 2001:db8:1:2::/64 " in rotating[-1]
        assert grpc_refusal(target, "2001:db8:1:3::1") == ""  # the next /64: another client
        assert grpc_refusal(target, "::ffff:192.0.2.7") == ""  # IPv4, mapped: its address

        def wrong() -> str:  # a key id of its own each time: only the address can add up
            return f"{new_tenant_id()}_api_{uuid.uuid4().hex * 2}"

        failures = [health(channel, f"2001:db8:5:6::{n:x}", wrong()) for n in range(FAILURES + 2)]
        assert failures[:FAILURES] == [grpc.StatusCode.UNAUTHENTICATED] * FAILURES
        assert set(failures[FAILURES:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert health(channel, "2001:db8:5:7::1", wrong()) == grpc.StatusCode.UNAUTHENTICATED


def test_a_stream_ends_after_its_longest_life(guarded: Guarded) -> None:
    (tenant_id, key), _ = guarded.tenants
    with client(guarded.stack, "127.0.0.70") as http:
        run_id = trigger(http, key, tenant_id, BILLING)["pipeline_logging_id"]  # no workers
    with grpc.insecure_channel(guarded.stack.grpc_target) as channel:
        stream = run_service_pb2_grpc.RunServiceStub(channel).WatchRun(
            run_service_pb2.WatchRunRequest(pipeline_logging_id=str(run_id)),
            metadata=[("x-api-key", key)],
            timeout=120,
        )
        with pytest.raises(grpc.RpcError) as ended:
            list(stream)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "longest life" in (ended.value.details() or "")


# -- streams and calls in progress per tenant -------------------------------------------


@pytest.fixture(scope="module")
def busy(stack_factory: StackFactory, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """A stack that runs nothing (runs stay PENDING, so watches stay open) and can hold
    calls in progress, and new members' admissions (fault points)."""
    return stack_factory(
        data_dir=tmp_path_factory.mktemp("busy"),
        CONVERGENCE_WORKERS="0",
        CONVERGENCE_FAULT_POINTS=",".join(
            (faults.HOLD_CALLS, faults.BEFORE_MEMBER_ADMISSION, faults.AFTER_MEMBER_ADMISSION)
        ),
    )


@contextlib.contextmanager
def holding(stack: Stack, point: str) -> Iterator[Callable[[int], None]]:
    """Holds `point` while in the block; gives a wait for the server's n-th hold there."""
    hold = stack.run_dir.parent / "hold" / point
    hold.parent.mkdir(exist_ok=True)
    before = server_log(stack).count(f"fault point {point}: holding")

    def held(n: int = 1) -> None:
        line = f"fault point {point}: holding"
        eventually(lambda: server_log(stack).count(line) >= before + n, f"{point} held")

    hold.touch()
    try:
        yield held
    finally:
        hold.unlink(missing_ok=True)


def watch(channel: grpc.Channel, key: str, run_id: object) -> Iterator[object]:
    stream: Iterator[object] = run_service_pb2_grpc.RunServiceStub(channel).WatchRun(
        run_service_pb2.WatchRunRequest(pipeline_logging_id=str(run_id)),
        metadata=[("x-api-key", key)],
        timeout=300,
    )
    return stream


def get_run_latencies(channel: grpc.Channel, key: str, run_id: object, count: int) -> list[float]:
    stub = run_service_pb2_grpc.RunServiceStub(channel)
    request = run_service_pb2.GetRunRequest(pipeline_logging_id=str(run_id))
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        stub.GetRun(request, metadata=[("x-api-key", key)], timeout=60)
        latencies.append(time.perf_counter() - start)
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def test_streams_are_capped_per_tenant_and_freed_when_clients_go(busy: Stack) -> None:
    with client(busy) as http:
        tenant_id, key = onboard(http, plan="STARTER")  # open_streams: 5
        run_id = trigger(http, key, tenant_id, BILLING)["pipeline_logging_id"]
        channels = [grpc.insecure_channel(busy.grpc_target) for _ in range(5)]
        try:
            streams = [watch(ch, key, run_id) for ch in channels]
            for stream in streams:
                next(stream)  # open and served
            with (
                grpc.insecure_channel(busy.grpc_target) as extra,
                pytest.raises(grpc.RpcError) as refused,
            ):
                next(watch(extra, key, run_id))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "streams open" in (refused.value.details() or "")
            rest = http.get(f"/api/v1/pipelines/runs/{run_id}:watch", headers={"X-API-Key": key})
            assert_429(rest, "Too many streams open")
        finally:
            for ch in channels[:1]:
                ch.close()  # the client goes away
        with grpc.insecure_channel(busy.grpc_target) as again:

            def reopens() -> bool:
                try:
                    next(watch(again, key, run_id))
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False
                return True

            eventually(reopens)
        for ch in channels[1:]:
            ch.close()


def test_calls_in_progress_are_capped_per_tenant(busy: Stack) -> None:
    """Twelve calls at once while calls are held: ten are admitted, two refused."""
    hold = busy.run_dir.parent / "hold" / "hold_calls"
    with client(busy) as http:
        _, key = onboard(http, plan="STARTER")  # requests_in_flight: 10
        _, other_key = onboard(http, plan="STARTER")
    hold.parent.mkdir(exist_ok=True)
    hold.touch()
    try:
        with ThreadPoolExecutor(12) as pool, client(busy) as http:
            calls = [
                pool.submit(http.get, "/api/v1/pipelines", headers={"X-API-Key": key})
                for _ in range(12)
            ]
            eventually(lambda: sum(f.done() for f in calls) == 2)
            for refused in (f.result() for f in calls if f.done()):
                assert_429(refused, "Too many calls in progress")
            # Another tenant's call is admitted (and held, like every call meanwhile).
            with grpc.insecure_channel(busy.grpc_target) as channel:
                with pytest.raises(grpc.RpcError) as held:
                    run_service_pb2_grpc.RunServiceStub(channel).ListRuns(
                        run_service_pb2.ListRunsRequest(),
                        metadata=[("x-api-key", other_key)],
                        timeout=1,
                    )
                assert held.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            hold.unlink()
            statuses = sorted(f.result(60).status_code for f in calls)
            assert statuses == [200] * 10 + [429] * 2
    finally:
        hold.unlink(missing_ok=True)


def test_a_refused_call_takes_no_team_seat(busy: Stack) -> None:
    """A new X-User-ID is seated before its call runs (concurrent new users cannot exceed
    the team) and the seat is given back when the call is refused: while the call is held,
    the seat counts; after, the team is as if the call had never been made."""
    missing = f"/api/v1/pipelines/runs/{uuid.uuid4()}"
    with client(busy) as http:
        tenant_id, key = onboard(http, plan="STARTER")  # a team of 2, 10 calls at once
        other_id, _ = onboard(http, plan="STARTER")

        def call(user: str, path: str = "/api/v1/pipelines") -> httpx.Response:
            return http.get(path, headers={"X-API-Key": key, "X-User-ID": user})

        def members() -> list[str]:
            team = http.get(f"/api/v1/tenants/{tenant_id}/members", headers={"X-API-Key": key})
            return [m["user_id"] for m in team.json()["members"]]

        assert call("ann").status_code == 200
        # Refused calls of every kind: none takes a seat.
        assert call("bob", missing).status_code == 404
        assert call("bob", f"/api/v1/tenants/{other_id}/audit-log").status_code == 403
        bad = http.post(
            f"/api/v1/pipelines/run/{tenant_id}/{BILLING}",
            headers={"X-API-Key": key, "X-User-ID": "bob"},
            json={"parameters": {"no_such_parameter": "1"}},
        )
        assert bad.status_code == 400, bad.text
        with grpc.insecure_channel(busy.grpc_target) as channel:
            watch = run_service_pb2_grpc.RunServiceStub(channel).WatchRun(
                run_service_pb2.WatchRunRequest(pipeline_logging_id=str(uuid.uuid4())),
                metadata=[("x-api-key", key), ("x-user-id", "bob")],
                timeout=60,
            )
            with pytest.raises(grpc.RpcError) as unknown:
                next(watch)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert members() == ["ann"]

        with ThreadPoolExecutor(10) as pool, client(busy) as held_http:
            # bob's call is held in progress: it has the second seat, carl none.
            with holding(busy, faults.HOLD_CALLS) as held:
                refused = pool.submit(
                    held_http.get, missing, headers={"X-API-Key": key, "X-User-ID": "bob"}
                )
                held()
                full = call("carl")
                assert full.status_code == 403, full.text
                assert full.json()["message"].startswith("Team size limit reached")
            assert refused.result(60).status_code == 404
            # ... and gave it back.
            assert call("carl").status_code == 200
            assert members() == ["ann", "carl"]

            # A user's refused call does not unseat its call still in progress: dave's
            # first call is held, his second refused (ten calls are in progress).
            removed = http.delete(
                f"/api/v1/tenants/{tenant_id}/members/carl", headers={"X-API-Key": key}
            )
            assert removed.status_code == 200
            with holding(busy, faults.HOLD_CALLS) as held:
                calls = [
                    pool.submit(
                        held_http.get,
                        "/api/v1/pipelines",
                        headers={"X-API-Key": key, "X-User-ID": user},
                    )
                    for user in ["dave"] + ["ann"] * 9
                ]
                held(10)
                assert_429(call("dave"), "Too many calls in progress")
            assert [f.result(60).status_code for f in calls] == [200] * 10
        assert members() == ["ann", "dave"]
        assert call("erin").status_code == 403
        events = http.get(
            f"/api/v1/tenants/{tenant_id}/audit-log",
            headers={"X-API-Key": key},
            params={"event": "member.added"},
        )
        assert events.status_code == 200, events.text
        assert sorted(e["target"] for e in events.json()["events"]) == ["ann", "carl", "dave"]


def test_a_call_cancelled_while_its_user_is_admitted_leaves_no_member(busy: Stack) -> None:
    """The store's admission of a new user finishes even if the call is cancelled meanwhile
    (a deadline, a client gone): the call never runs, so the user is no member."""
    with client(busy) as http:
        tenant_id, key = onboard(http, plan="STARTER")
        with (
            holding(busy, faults.AFTER_MEMBER_ADMISSION) as held,
            grpc.insecure_channel(busy.grpc_target) as channel,
            ThreadPoolExecutor(1) as pool,
        ):
            call = pool.submit(
                pipeline_service_pb2_grpc.PipelineServiceStub(channel).ListPipelines,
                pipeline_service_pb2.ListPipelinesRequest(),
                metadata=[("x-api-key", key), ("x-user-id", "zed")],
                timeout=3,
            )
            held()
            with pytest.raises(grpc.RpcError) as late:
                call.result(120)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        auth = {"X-API-Key": key}
        team = f"/api/v1/tenants/{tenant_id}/members"

        def members() -> list[object] | None:
            listed = http.get(team, headers=auth)
            return listed.json()["members"] if listed.status_code == 200 else None

        # The removal follows the call's end: looked for once a second (60 calls a minute).
        eventually(lambda: members() == [], "no member", timeout=60, interval=1.0)
        assert call_with(http, key, "ann").status_code == 200  # both seats free
        assert call_with(http, key, "bob").status_code == 200
        events = http.get(
            f"/api/v1/tenants/{tenant_id}/audit-log", headers=auth, params={"event": "member.added"}
        ).json()["events"]
        assert sorted(e["target"] for e in events) == ["ann", "bob"]


def test_a_user_removed_during_their_first_call_is_not_audited_as_added(busy: Stack) -> None:
    with client(busy) as http:
        tenant_id, key = onboard(http, plan="STARTER")
        auth = {"X-API-Key": key}
        with ThreadPoolExecutor(1) as pool:
            with holding(busy, faults.AFTER_MEMBER_ADMISSION) as held:
                first = pool.submit(call_with, http, key, "eve")
                held()  # eve is stored, her call not run yet
                removed = http.delete(f"/api/v1/tenants/{tenant_id}/members/eve", headers=auth)
                assert removed.status_code == 200, removed.text
            assert first.result(60).status_code == 200
        events = http.get(f"/api/v1/tenants/{tenant_id}/audit-log", headers=auth).json()
        assert [e["event"] for e in events["events"] if e["target"] == "eve"] == ["member.removed"]
        assert (
            http.get(f"/api/v1/tenants/{tenant_id}/members", headers=auth).json()["members"] == []
        )


def test_a_plan_change_waits_for_a_new_members_admission(busy: Stack) -> None:
    """A new user admitted under the old plan while a smaller plan is chosen: the change
    is refused (the team would be too large), never both accepted."""
    with client(busy) as http:
        tenant_id, key = onboard(http)  # PROFESSIONAL: a team of 6
        for user in ("ann", "bob"):
            assert call_with(http, key, user).status_code == 200
        with ThreadPoolExecutor(2) as pool:
            with holding(busy, faults.BEFORE_MEMBER_ADMISSION) as held:
                carl = pool.submit(call_with, http, key, "carl")  # the plan read: a team of 6
                held()
                change = pool.submit(
                    http.put,
                    f"/api/v1/tenants/{tenant_id}/subscription",
                    headers={"X-API-Key": key},
                    json={"subscription_plan": "STARTER"},  # a team of 2
                )
                with contextlib.suppress(TimeoutError):
                    change.result(2)  # it may not end while the admission is held
            assert carl.result(60).status_code == 200
            refused = change.result(60)
        assert refused.status_code == 409, refused.text
        assert "Your team has 3 members and plan STARTER allows 2" in refused.json()["message"]
        usage = http.get(f"/api/v1/tenants/{tenant_id}/usage", headers={"X-API-Key": key})
        assert usage.json()["subscription_plan"] == "PROFESSIONAL"


def call_with(http: httpx.Client, key: str, user: str) -> httpx.Response:
    return http.get("/api/v1/pipelines", headers={"X-API-Key": key, "X-User-ID": user})


def test_a_tenant_holding_its_streams_and_hammering_does_not_slow_another(busy: Stack) -> None:
    with client(busy) as http:
        tenant_id, key = onboard(http, plan="STARTER")  # 5 streams, 60 requests a minute
        quiet_id, quiet_key = onboard(http)  # 300 requests a minute
        run_id = trigger(http, key, tenant_id, BILLING)["pipeline_logging_id"]
        quiet_run = trigger(http, quiet_key, quiet_id, BILLING)["pipeline_logging_id"]
    with grpc.insecure_channel(busy.grpc_target) as quiet:
        idle = get_run_latencies(quiet, quiet_key, quiet_run, 150)
    stop = threading.Event()

    def hammer() -> None:
        with grpc.insecure_channel(busy.grpc_target) as channel:
            stub = run_service_pb2_grpc.RunServiceStub(channel)
            request = run_service_pb2.GetRunRequest(pipeline_logging_id=str(run_id))
            while not stop.is_set():
                with contextlib.suppress(grpc.RpcError):
                    stub.GetRun(request, metadata=[("x-api-key", key)], timeout=60)

    channels = [grpc.insecure_channel(busy.grpc_target) for _ in range(5)]
    hammers = [threading.Thread(target=hammer) for _ in range(4)]
    try:
        for stream in [watch(ch, key, run_id) for ch in channels]:
            next(stream)
        for thread in hammers:
            thread.start()
        with grpc.insecure_channel(busy.grpc_target) as quiet:
            abused = get_run_latencies(quiet, quiet_key, quiet_run, 100)
    finally:
        stop.set()
        for thread in hammers:
            thread.join(60)
        for ch in channels:
            ch.close()
    # Generous: the real ratio is in bench/RESULTS.md (noisy neighbour).
    assert p99(abused) <= max(10 * p99(idle), 0.5), (p99(idle), p99(abused))


# -- secrets and malformed requests -----------------------------------------------------


def test_keys_never_reach_logs_or_bodies(stack: Stack) -> None:
    with client(stack) as http:
        _, key = onboard(http)
    secret = key[-keys.SECRET_LENGTH :].encode()
    variants = [
        key.encode() + b"\xa0",
        b"\xa0" + key.encode(),
        key.encode() + b"\xff\xfe" + b"x" * 300,
        key.encode() + b"," + key.encode(),
        key.encode()[:-5],
        key.upper().encode(),
    ]
    replies = []
    for value in variants:
        for header in (b"X-API-Key", b"Authorization", b"X-User-ID", b"X-Request-ID"):
            replies.append(
                raw_http(
                    stack.http_port,
                    b"GET /api/v1/pipelines HTTP/1.1\r\nHost: x\r\n"
                    + header
                    + b": "
                    + value
                    + b"\r\nConnection: close\r\n\r\n",
                )
            )
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = tenant_service_pb2_grpc.TenantServiceStub(channel)
        for metadata in (
            [("x-request-id", key)],
            [("x-user-id", key)],
            [("authorization", f"Bearer {key}")],
            [("x-api-key", key[:-1] + "!")],
        ):
            with pytest.raises(grpc.RpcError) as raised:
                stub.GetUsage(
                    tenant_service_pb2.GetUsageRequest(tenant_id="acme_corp"),
                    metadata=metadata,
                    timeout=30,
                )
            replies.append(repr(raised.value).encode())
    for reply in replies:
        assert secret not in reply and secret.lower() not in reply.lower(), reply[:300]
        assert b" 50" not in reply.split(b"\r\n", 1)[0], reply[:300]  # never a 5xx
    log = server_log(stack) + (stack.run_dir.parent / "logs" / "envoy.log").read_text(
        errors="replace"
    )
    assert secret.decode() not in log
    assert secret.decode().lower() not in log.lower()
    assert "Invalid encoding" not in log


def test_a_corrupt_protobuf_is_invalid_argument_without_a_traceback(stack: Stack) -> None:
    for target in (stack.grpc_target, stack.envoy_grpc_target):
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                RUN_METHOD, request_serializer=lambda raw: raw, response_deserializer=bytes
            )
            with pytest.raises(grpc.RpcError) as raised:
                call(b"\x0a\x01\xff", timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf message" in (raised.value.details() or "")
    errors = [
        line
        for line in server_log(stack).splitlines()
        if json.loads(line).get("severity") == "ERROR" and RUN_METHOD in line
    ]
    assert errors == []
