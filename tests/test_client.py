"""The integrators' client (`convergence.Client`, `AsyncClient`) against real stacks: typed
errors, retries, idempotent triggers, whole listings, watches, and the wheel as an
integrator installs it."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from convergence import (
    AlreadyExists,
    AsyncClient,
    Client,
    ConvergenceError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from convergence.v1 import run_pb2
from convergence_server.config import REPO_ROOT
from convergence_server.stack import Stack
from tests.conftest import GUIDE_TENANT, UNMETERED, StackFactory, new_tenant_id, onboard

QUICK = ("test", "runs", "quick")
CHECKS = ("test", "runs", "checks")
NO_RETRY = RetryPolicy(max_attempts=1)
PENDING, COMPLETE, FAILED = run_pb2.Run.PENDING, run_pb2.Run.COMPLETE, run_pb2.Run.FAILED
CLIENT_DIR = REPO_ROOT / "clients" / "python"
# The README's example, as an integrator runs it: health, onboarding, a trigger, its end.
EXAMPLE = """\
import sys

from convergence import Client
from convergence.v1 import run_pb2

target, tenant_id = sys.argv[1], sys.argv[2]  # e.g. 127.0.0.1:50051 acme_corp
tenant = (tenant_id, "Acme Corporation", "admin@acme.com", "PROFESSIONAL")
with Client(target) as anonymous:
    print("service", anonymous.get_health().status)
    anonymous.dry_run_onboarding(*tenant)
    api_key = anonymous.onboard_tenant(*tenant).api_key
with Client(target, api_key=api_key, user_id="user_123") as client:
    started = client.run_pipeline(tenant_id, "aws", "cost", "cost_usage", date="2023-11-04")
    run = client.wait_for_run(started.pipeline_logging_id, timeout=600)
    print(run_pb2.Run.Status.Name(run.status), run.error_message)
"""


@pytest.fixture(scope="module")
def idle(stack_factory: StackFactory, pipeline_env: dict[str, str]) -> Stack:
    """No workers, so runs stay PENDING; streams live one second, so watches reopen."""
    return stack_factory(
        CONVERGENCE_WORKERS="0", CONVERGENCE_STREAM_MAX_SECONDS="1", **pipeline_env
    )


@pytest.fixture(scope="module")
def idle_http(idle: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=idle.http_url, timeout=30) as http:
        yield http


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Records the status of every attempt of the calls to `method`, as the wire saw it."""

    def __init__(self, method: str) -> None:
        self._method = method
        self.codes: list[grpc.StatusCode] = []
        self.requests: list[Any] = []
        self.refused = threading.Event()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith(self._method):
            self.requests.append(request)
            self.codes.append(outcome.code())
            if outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.refused.set()
        return outcome


class LostAnswer(grpc.RpcError):
    """What a caller sees when the network drops the answer to a call the server took."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Connection reset by peer"

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def result(self, timeout: float | None = None) -> Any:
        raise self


class LoseFirstAnswer(Recorder):
    """Lets the first call to `method` reach the server, then loses its answer."""

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = super().intercept_unary_unary(continuation, details, request)
        if details.method.endswith(self._method) and len(self.requests) == 1:
            outcome.result()  # the server has answered
            return LostAnswer()
        return outcome


def recorded_client(stack: Stack, key: str, recorder: Recorder) -> tuple[Client, grpc.Channel]:
    channel = grpc.intercept_channel(grpc.insecure_channel(stack.grpc_target), recorder)
    return Client(stack.grpc_target, api_key=key, channel=channel), channel


def raised(call: Callable[[], object]) -> ConvergenceError:
    with pytest.raises(ConvergenceError) as caught:
        call()
    return caught.value


def test_documented_errors_raise_typed_exceptions(pipelines: Stack, api: httpx.Client) -> None:
    tenant_id, key = onboard(api)
    other_id, _ = onboard(api)
    target = pipelines.grpc_target
    with (
        Client(target, retry=NO_RETRY) as anonymous,
        Client(target, api_key=key, retry=NO_RETRY) as client,
        Client(target, api_key=f"{tenant_id}_api_{'A' * 52}", retry=NO_RETRY) as wrong_key,
    ):
        bad = raised(lambda: anonymous.onboard_tenant("a-b", **GUIDE_TENANT))
        assert isinstance(bad, InvalidArgument)
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.message == "Invalid tenant_id format"
        assert ("tenant_id", "must match pattern ^[a-zA-Z0-9_]{3,50}$") in bad.field_violations
        assert bad.report is not None and not bad.report.ready_for_onboarding

        assert isinstance(raised(lambda: anonymous.get_run(str(uuid.uuid4()))), Unauthenticated)
        refused = raised(wrong_key.get_health)
        assert isinstance(refused, Unauthenticated)
        assert refused.message == "Invalid or missing API key"

        denied = raised(lambda: client.get_usage(other_id))
        assert isinstance(denied, PermissionDenied)
        assert denied.message == (
            f"Tenant ID mismatch: authenticated as '{tenant_id}' but requested '{other_id}'"
        )

        missing = raised(lambda: client.get_run(str(uuid.uuid4())))
        assert isinstance(missing, NotFound)
        assert missing.request_id and missing.reason

        again = raised(lambda: anonymous.onboard_tenant(tenant_id, **GUIDE_TENANT))
        assert isinstance(again, AlreadyExists)
        assert again.message == f"Tenant '{tenant_id}' already exists"


def test_async_client_raises_the_same_types(pipelines: Stack, api: httpx.Client) -> None:
    tenant_id, key = onboard(api)
    other_id, _ = onboard(api)

    async def main() -> list[ConvergenceError]:
        caught: list[ConvergenceError] = []
        async with AsyncClient(pipelines.grpc_target, api_key=key, retry=NO_RETRY) as client:
            for call in (
                client.get_run(str(uuid.uuid4())),
                client.get_usage(other_id),
                client.run_pipeline(tenant_id, *QUICK, date="1999-01-01"),
            ):
                try:
                    await call
                except ConvergenceError as error:
                    caught.append(error)
        return caught

    missing, denied, bad = asyncio.run(main())
    assert isinstance(missing, NotFound) and missing.request_id
    assert isinstance(denied, PermissionDenied)
    assert isinstance(bad, InvalidArgument) and bad.field_violations[0][0] == "date"


def test_a_quota_refusal_carries_its_retry_time(idle: Stack, idle_http: httpx.Client) -> None:
    tenant_id, key = onboard(idle_http, plan="STARTER")
    with Client(idle.grpc_target, api_key=key, retry=NO_RETRY) as client:
        client.run_pipeline(tenant_id, *QUICK)
        refused = raised(lambda: client.run_pipeline(tenant_id, *QUICK))

    assert isinstance(refused, QuotaExceeded)
    assert refused.retry_after == 10
    assert refused.subject == f"tenant:{tenant_id}:concurrent_pipeline_runs"
    assert refused.reason == "QUOTA_EXCEEDED"
    # gRPC's own retry policy reads the same wait from the trailers.
    assert isinstance(refused.__cause__, grpc.Call)
    trailers = dict(refused.__cause__.trailing_metadata() or ())
    assert trailers["grpc-retry-pushback-ms"] == "10000"


def test_a_refusal_with_a_retry_time_is_retried_and_starts_one_run(
    idle: Stack, idle_http: httpx.Client
) -> None:
    """STARTER runs one at a time: the second trigger is refused until the first ends."""
    tenant_id, key = onboard(idle_http, plan="STARTER")
    recorder = Recorder("/RunPipeline")
    client, channel = recorded_client(idle, key, recorder)
    with client, channel, ThreadPoolExecutor(1) as pool:
        first = client.run_pipeline(tenant_id, *QUICK)
        second = pool.submit(client.run_pipeline, tenant_id, *QUICK)
        assert recorder.refused.wait(60)
        client.cancel_run(first.pipeline_logging_id)
        started = second.result(timeout=120)
        runs = list(client.list_runs())

    # The first trigger, then the second one refused (again, if the cancel took longer than
    # the wait the server asked for) until it is admitted.
    first_code, *refusals, last_code = recorder.codes
    assert (first_code, last_code) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
    assert refusals and set(refusals) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # One key for the trigger and its retries.
    assert len({r.idempotency_key for r in recorder.requests[1:]}) == 1
    assert started.status == PENDING
    assert {r.pipeline_logging_id: r.status for r in runs} == {
        first.pipeline_logging_id: FAILED,
        started.pipeline_logging_id: PENDING,
    }


def test_a_refusal_without_a_retry_time_is_not_retried(
    idle: Stack, idle_http: httpx.Client
) -> None:
    """A count limit (STARTER keeps 10 schedules) is not lifted by waiting."""
    _, key = onboard(idle_http, plan="STARTER")
    recorder = Recorder("/CreateSchedule")
    client, channel = recorded_client(idle, key, recorder)
    with client, channel:
        for _ in range(10):
            client.create_schedule(*QUICK, cron="0 6 * * *")
        refused = raised(lambda: client.create_schedule(*QUICK, cron="0 6 * * *"))

    assert isinstance(refused, QuotaExceeded)
    assert refused.retry_after is None
    assert recorder.codes[10:] == [grpc.StatusCode.RESOURCE_EXHAUSTED]


def test_a_trigger_retried_after_a_lost_answer_starts_one_run(
    idle: Stack, idle_http: httpx.Client
) -> None:
    tenant_id, key = onboard(idle_http, plan=UNMETERED)
    recorder = LoseFirstAnswer("/RunPipeline")
    client, channel = recorded_client(idle, key, recorder)
    with client, channel:
        started = client.run_pipeline(tenant_id, *QUICK, date="2024-01-02")
        runs = list(client.list_runs())

    assert recorder.codes == [grpc.StatusCode.OK, grpc.StatusCode.OK]
    first, retried = recorder.requests
    assert first.idempotency_key and first.idempotency_key == retried.idempotency_key
    assert started.message == (
        "Pipeline already triggered with this idempotency key (original run returned)"
    )
    assert [r.pipeline_logging_id for r in runs] == [started.pipeline_logging_id]


def test_a_creation_without_an_idempotency_key_is_not_repeated_after_a_lost_answer(
    idle: Stack, idle_http: httpx.Client
) -> None:
    tenant_id, key = onboard(idle_http, plan=UNMETERED)
    recorder = LoseFirstAnswer("/CreateApiKey")
    client, channel = recorded_client(idle, key, recorder)
    with client, channel:
        lost = raised(lambda: client.create_api_key(tenant_id, "ci"))
        keys = client.list_api_keys(tenant_id).keys
    # The server made the key; the client says it cannot know, and made no second one.
    assert isinstance(lost, Unavailable)
    assert recorder.codes == [grpc.StatusCode.OK]
    assert sorted(k.name for k in keys) == ["ci", "onboarding"]


def test_the_same_idempotency_key_names_the_same_run(idle: Stack, idle_http: httpx.Client) -> None:
    tenant_id, key = onboard(idle_http, plan=UNMETERED)
    with Client(idle.grpc_target, api_key=key) as client:
        first = client.run_pipeline(tenant_id, *QUICK, idempotency_key="nightly-2024-01-02")
        again = client.run_pipeline(tenant_id, *QUICK, idempotency_key="nightly-2024-01-02")
        other = client.run_pipeline(tenant_id, *QUICK)
        runs = list(client.list_runs())
    assert again.pipeline_logging_id == first.pipeline_logging_id
    assert other.pipeline_logging_id != first.pipeline_logging_id
    assert len(runs) == 2


def test_list_runs_iterates_over_every_page(idle: Stack, idle_http: httpx.Client) -> None:
    tenant_id, key = onboard(idle_http, plan=UNMETERED)
    recorder = Recorder("/ListRuns")
    client, channel = recorded_client(idle, key, recorder)
    with client, channel, ThreadPoolExecutor(8) as pool:
        started = list(pool.map(lambda _: client.run_pipeline(tenant_id, *QUICK), range(250)))
        listed = list(client.list_runs(page_size=100))
        pending = list(client.list_runs(status="PENDING", page_size=100))

    triggered = {s.pipeline_logging_id for s in started}
    assert len(triggered) == 250
    assert [r.pipeline_logging_id for r in listed] == [r.pipeline_logging_id for r in pending]
    assert len(listed) == 250 and {r.pipeline_logging_id for r in listed} == triggered
    created = [r.created_at.ToDatetime() for r in listed]
    assert created == sorted(created, reverse=True)
    assert len(recorder.codes) == 6  # three pages per listing

    async def listed_async() -> list[str]:
        async with AsyncClient(idle.grpc_target, api_key=key) as aclient:
            return [r.pipeline_logging_id async for r in aclient.list_runs(page_size=90)]

    assert asyncio.run(listed_async()) == [r.pipeline_logging_id for r in listed]


def test_wait_and_watch_end_on_complete_and_on_failed(pipelines: Stack, api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    with Client(pipelines.grpc_target, api_key=key) as client:
        quick = client.run_pipeline(tenant_id, *QUICK)
        done = client.wait_for_run(quick.pipeline_logging_id, timeout=120)
        broken = client.run_pipeline(tenant_id, *CHECKS, parameters={"break_error": "true"})
        updates = list(client.watch_run(broken.pipeline_logging_id, timeout=120))

    assert done.status == COMPLETE and done.pipeline_logging_id == quick.pipeline_logging_id
    assert updates[-1].run.status == FAILED
    assert "below_three" in updates[-1].run.error_message
    assert all(u.run.status not in (COMPLETE, FAILED) for u in updates[:-1])
    assert [s.step_name for s in updates[-1].steps][:2] == ["numbers", "validate"]


def test_async_wait_and_watch_end_on_complete_and_on_failed(
    pipelines: Stack, api: httpx.Client
) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)

    async def main() -> tuple[run_pb2.Run, list[run_pb2.Run]]:
        async with AsyncClient(pipelines.grpc_target, api_key=key) as client:
            quick = await client.run_pipeline(tenant_id, *QUICK)
            done = await client.wait_for_run(quick.pipeline_logging_id, timeout=120)
            broken = await client.run_pipeline(
                tenant_id, *CHECKS, parameters={"break_error": "true"}
            )
            watched = [u.run async for u in client.watch_run(broken.pipeline_logging_id)]
            return done, watched

    done, watched = asyncio.run(main())
    assert done.status == COMPLETE
    assert watched[-1].status == FAILED
    assert all(r.status not in (COMPLETE, FAILED) for r in watched[:-1])


def test_a_watch_outlives_the_streams_the_server_ends(idle: Stack, idle_http: httpx.Client) -> None:
    """Streams end after a second here (UNAVAILABLE): the watch opens them again until the
    run ends, here by a cancel; `wait_for_run` gives up at its own timeout."""
    tenant_id, key = onboard(idle_http, plan=UNMETERED)
    with Client(idle.grpc_target, api_key=key) as client:
        run_id = client.run_pipeline(tenant_id, *QUICK).pipeline_logging_id
        with pytest.raises(TimeoutError):
            client.wait_for_run(run_id, timeout=2.5)
        seen = []
        for update in client.watch_run(run_id, timeout=120):
            seen.append(update.run.status)
            if seen == [PENDING, PENDING]:  # the first stream ended, the second began
                client.cancel_run(run_id)

    assert seen == [PENDING, PENDING, FAILED]


def test_an_async_watch_outlives_the_streams_the_server_ends(
    idle: Stack, idle_http: httpx.Client
) -> None:
    tenant_id, key = onboard(idle_http, plan=UNMETERED)

    async def main() -> list[run_pb2.Run]:
        async with AsyncClient(idle.grpc_target, api_key=key) as client:
            run_id = (await client.run_pipeline(tenant_id, *QUICK)).pipeline_logging_id
            with pytest.raises(TimeoutError):
                await client.wait_for_run(run_id, timeout=2.5)
            seen = []
            async for update in client.watch_run(run_id, timeout=120):
                seen.append(update.run)
                if len(seen) == 2:
                    await client.cancel_run(run_id)
            return seen

    seen = asyncio.run(main())
    assert [r.status for r in seen] == [PENDING, PENDING, FAILED]
    assert seen[-1].error_message.startswith("Cancelled")


def build_wheel(out: Path, *leave_out: str) -> subprocess.CompletedProcess[str]:
    """`pip wheel` of a copy of the client package (a build leaves files in its folder)."""
    source = out.with_name(f"{out.name}-source")
    shutil.copytree(
        CLIENT_DIR,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", *leave_out),
    )
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", str(source), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
        env=env,
    )


@pytest.mark.timeout(900)
def test_the_wheel_installs_runs_and_type_checks_in_a_fresh_virtualenv(
    pipelines: Stack, tmp_path: Path
) -> None:
    built = build_wheel(tmp_path / "dist")
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("convergence_client-*.whl")
    refused = build_wheel(tmp_path / "bare", "*_pb2*")
    assert refused.returncode != 0
    assert "run `make proto`" in refused.stdout + refused.stderr

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    installed = run(python, "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    script = tmp_path / "example.py"
    script.write_text(EXAMPLE)

    tenant_id = new_tenant_id()
    example = run(python, script, pipelines.grpc_target, tenant_id, cwd=tmp_path)
    assert example.returncode == 0, example.stderr
    assert example.stdout.splitlines() == ["service healthy", "COMPLETE "]

    mypy = f"mypy=={importlib.metadata.version('mypy')}"
    assert run(python, "-m", "pip", "install", "--quiet", mypy, cwd=tmp_path).returncode == 0
    # The README's sample of the raw stubs is type-checked too (not run: no key).
    readme = (REPO_ROOT / "README.md").read_text()
    raw_sample = readme.split("The raw stubs, for the lower level:\n\n```python\n", 1)[1]
    raw = tmp_path / "raw_stubs.py"
    raw.write_text(raw_sample.split("```", 1)[0])
    checked = run(python, "-m", "mypy", "--strict", script, raw, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
