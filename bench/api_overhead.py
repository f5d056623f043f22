"""What the API layers cost per call: interceptors, auth, Envoy and its JSON transcoding.

`make bench` runs `python -m bench.api_overhead`. It starts, on loopback only, a bare
grpc.aio echo server (`bench/echo_server.py`, the baseline) and the real stack (gRPC
server + Envoy, on a fresh temporary data directory), onboards one tenant for an API
key, then runs every scenario as a closed loop: each of C worker threads warms up,
waits for the others, then sends its share of N requests one after another, timing
each with `time.perf_counter`. The gRPC scenarios share one sync channel; the REST
scenarios give every worker its own keep-alive `httpx.Client`. Client cost is included
in every latency; the last column splits the CPU each request cost between this client
and the servers (read from Linux's /proc). Every process started here is stopped on the
way out, even on error. The exit status is 1 when a call failed or a server logged a
warning or an error during the scenarios.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import httpx

from bench.echo_server import FULL_METHOD as ECHO_METHOD
from convergence.v1 import (
    health_service_pb2,
    health_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
)
from convergence_server.config import REPO_ROOT
from convergence_server.stack import Stack, start_stack

TIMEOUT = 10.0
START_TIMEOUT = 30.0
ECHO_SERVER = Path(__file__).with_name("echo_server.py")
# About the size of a serialized GetHealthResponse, so both directions carry similar bytes.
ECHO_PAYLOAD = b"x" * 32
HEALTH_REQUEST = health_service_pb2.GetHealthRequest()
UNMETERED = "UNMETERED"
UNMETERED_PLAN = (
    f"  {UNMETERED}:\n    daily_pipeline_runs: 1000000\n"
    "    concurrent_pipeline_runs: 100000\n    team_size: 1000\n"
    "    requests_per_minute: 10000000\n    open_streams: 1000\n"
    "    requests_in_flight: 1000\n    max_schedules: 1000\n"
)
TENANT = {
    "company_name": "Bench Corporation",
    "admin_email": "admin@bench.example.com",
    # Limits that never bind (as the tests' plan): a scenario measures calls, not refusals.
    "subscription_plan": UNMETERED,
}
# No proxy may sit between the client and loopback, whatever the environment says.
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]

Call = Callable[[], object]
CallFactory = Callable[[contextlib.ExitStack], Call]
"""Builds one worker's call; whatever it opens (a client) it registers on the ExitStack."""


@dataclass(frozen=True)
class Scenario:
    name: str
    factory: CallFactory


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used so far by this process (the client) and by the servers it started."""

    client: float
    servers: float

    @classmethod
    def sample(cls, server_pids: Sequence[int]) -> CpuTimes:
        return cls(time.process_time(), sum(_cpu_seconds(pid) for pid in server_pids))

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.client - other.client, self.servers - other.servers)


def _cpu_seconds(pid: int) -> float:
    """user + system CPU of a running process, from Linux's /proc (NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Result:
    name: str
    concurrency: int
    latencies: list[float]  # seconds, successful calls only
    elapsed: float
    errors: Counter[str]
    cpu: CpuTimes  # used during the timed requests

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed

    def percentile_ms(self, q: int) -> float:
        if len(self.latencies) < 2:
            return 1000 * (self.latencies[0] if self.latencies else math.nan)
        return 1000 * statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]

    def cpu_ms(self) -> str:
        """CPU per request: client / all servers (the echo server, or the server and Envoy)."""
        calls = len(self.latencies) + self.errors.total()
        return f"{1000 * self.cpu.client / calls:.2f} / {1000 * self.cpu.servers / calls:.2f}"


@dataclass(frozen=True)
class _WorkerOutcome:
    latencies: list[float]
    errors: Counter[str]
    finished: float


# --- the closed-loop runner, one for every scenario ---------------------------------------


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError):
        call = cast(grpc.Call, exc)  # a failed sync call raises an error that is also its Call
        return f"gRPC {call.code().name}: {call.details()}"
    return f"{type(exc).__name__}: {exc}"


def _timed_calls(call: Call, count: int) -> tuple[list[float], Counter[str]]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    for _ in range(count):
        start = time.perf_counter()
        try:
            call()
        except Exception as exc:
            errors[_describe(exc)] += 1
            continue
        latencies.append(time.perf_counter() - start)
    return latencies, errors


def _worker(
    factory: CallFactory, warmup: int, count: int, barrier: threading.Barrier
) -> _WorkerOutcome:
    with contextlib.ExitStack() as resources:
        try:
            call = factory(resources)
            for _ in range(warmup):
                call()
        except BaseException:
            barrier.abort()  # the other workers must not wait for this one forever
            raise
        barrier.wait()
        latencies, errors = _timed_calls(call, count)
        finished = time.perf_counter()
    return _WorkerOutcome(latencies, errors, finished)


@dataclass(frozen=True)
class Load:
    requests: int
    concurrency: int
    warmup: int
    server_pids: Sequence[int]  # whose CPU time is reported


def run_scenario(scenario: Scenario, load: Load) -> Result:
    """Warms up, then sends `load.requests` calls from its workers in a closed loop."""
    requests, concurrency = load.requests, load.concurrency
    started: list[tuple[float, CpuTimes]] = []

    def start() -> None:
        started.append((time.perf_counter(), CpuTimes.sample(load.server_pids)))

    barrier = threading.Barrier(concurrency, action=start)
    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    per_worker = -(-load.warmup // concurrency)  # rounded up, so every worker warms up
    with ThreadPoolExecutor(concurrency, thread_name_prefix="bench") as pool:
        futures = [
            pool.submit(_worker, scenario.factory, per_worker, share, barrier) for share in shares
        ]
        outcomes = [future.result() for future in futures]
    cpu = CpuTimes.sample(load.server_pids) - started[0][1]
    return Result(
        name=scenario.name,
        concurrency=concurrency,
        latencies=[latency for o in outcomes for latency in o.latencies],
        elapsed=max(o.finished for o in outcomes) - started[0][0],
        errors=sum((o.errors for o in outcomes), Counter()),
        cpu=cpu,
    )


# --- the calls ----------------------------------------------------------------------------


def shared(call: Call) -> CallFactory:
    """Every worker makes the same call (on a channel the gRPC scenarios share)."""
    return lambda _resources: call


def rest_get(base_url: str, path: str, headers: dict[str, str] | None = None) -> CallFactory:
    """Every worker gets its own keep-alive httpx.Client; a non-2xx status is an error."""

    def factory(resources: contextlib.ExitStack) -> Call:
        client = resources.enter_context(
            httpx.Client(base_url=base_url, headers=headers, timeout=TIMEOUT, trust_env=False)
        )
        return lambda: client.get(path).raise_for_status()

    return factory


def health_call(channel: grpc.Channel, api_key: str | None = None) -> Call:
    stub = health_service_pb2_grpc.HealthServiceStub(channel)
    metadata = (("x-api-key", api_key),) if api_key else None
    return functools.partial(stub.GetHealth, HEALTH_REQUEST, timeout=TIMEOUT, metadata=metadata)


def get_run_call(channel: grpc.Channel, api_key: str, run_id: str) -> Call:
    stub = run_service_pb2_grpc.RunServiceStub(channel)
    request = run_service_pb2.GetRunRequest(pipeline_logging_id=run_id)
    metadata = (("x-api-key", api_key),)
    return functools.partial(stub.GetRun, request, timeout=TIMEOUT, metadata=metadata)


def scenarios(
    echo_channel: grpc.Channel,
    direct: grpc.Channel,
    via_envoy: grpc.Channel,
    url: str,
    api_key: str,
    run_id: str,
) -> list[Scenario]:
    """The baseline comes first: every other rate is reported relative to it."""
    # No serializers: bytes in, bytes out, like the echo server's identity serializers.
    echo_method = echo_channel.unary_unary(
        ECHO_METHOD, request_serializer=None, response_deserializer=None
    )
    echo = functools.partial(echo_method, ECHO_PAYLOAD, timeout=TIMEOUT)
    key_header = {"X-API-Key": api_key}
    return [
        Scenario("baseline: bare grpc.aio echo", shared(echo)),
        Scenario("GetHealth, gRPC direct", shared(health_call(direct))),
        Scenario("GetHealth, gRPC via Envoy", shared(health_call(via_envoy))),
        Scenario("GET /health, REST via Envoy", rest_get(url, "/health")),
        Scenario("GetHealth + API key, gRPC direct", shared(health_call(direct, api_key))),
        Scenario("GET /health + API key, REST via Envoy", rest_get(url, "/health", key_header)),
        Scenario("GetRun + API key, gRPC direct", shared(get_run_call(direct, api_key, run_id))),
        Scenario(
            "GET run + API key, REST via Envoy",
            rest_get(url, f"/api/v1/pipelines/runs/{run_id}", key_header),
        ),
    ]


# --- the processes ------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _read_port(process: subprocess.Popen[bytes]) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stdout], [], [], 0.1)[0]:
            return int(process.stdout.readline())
    raise RuntimeError(f"the echo server did not start (exit code {process.poll()})")


def start_echo_server(resources: contextlib.ExitStack) -> tuple[str, int]:
    """Starts `echo_server.py`, stopped when `resources` closes; returns (target, pid)."""
    process = subprocess.Popen(
        [sys.executable, str(ECHO_SERVER)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    resources.callback(_stop, process)
    return f"127.0.0.1:{_read_port(process)}", process.pid


def start_bench_stack(resources: contextlib.ExitStack, data_dir: Path, **extra: str) -> Stack:
    env = {
        "CONVERGENCE_DATA_DIR": str(data_dir),
        "CONVERGENCE_GRPC_HOST": "127.0.0.1",
        "CONVERGENCE_GRPC_PORT": "0",
        "CONVERGENCE_HTTP_HOST": "127.0.0.1",
        "CONVERGENCE_HTTP_PORT": "0",
        "CONVERGENCE_ENVOY_ADMIN_PORT": "0",
        "CONVERGENCE_STORE": "embedded",
        "CONVERGENCE_LOG_LEVEL": "INFO",
        **extra,
    }
    stack = start_stack(env, log_dir=data_dir / "logs")
    resources.callback(stack.stop)
    return stack


def onboard(url: str) -> str:
    """Onboards a fresh tenant over REST; returns its API key."""
    tenant = {"tenant_id": f"bench_{uuid.uuid4().hex[:12]}", **TENANT}
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
        response = client.post("/api/v1/tenants/onboard", json=tenant)
    if response.status_code != 200:
        raise RuntimeError(f"onboarding failed: {response.status_code} {response.text}")
    return str(response.json()["api_key"])


def completed_run(url: str, api_key: str) -> str:
    """Runs the bundled AWS sample for a day; returns the run's id once it is COMPLETE."""
    tenant_id = api_key.rsplit("_api_", 1)[0]
    headers = {"X-API-Key": api_key}
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False, headers=headers) as client:
        response = client.post(
            f"/api/v1/pipelines/run/{tenant_id}/aws/cost/cost_usage", json={"date": "2023-11-04"}
        )
        run_id = str(response.raise_for_status().json()["pipeline_logging_id"])
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            status = client.get(f"/api/v1/pipelines/runs/{run_id}").json()["status"]
            if status == "COMPLETE":
                return run_id
            if status == "FAILED":
                break
            time.sleep(0.1)
    raise RuntimeError(f"the sample run {run_id} did not complete")


def check_key(channel: grpc.Channel, api_key: str) -> None:
    """The authenticated scenarios measure nothing unless the key really authenticates."""
    response = health_call(channel, api_key)()
    if not isinstance(response, health_service_pb2.GetHealthResponse) or not (
        response.authenticated
    ):
        raise RuntimeError(f"the API key did not authenticate: {response}")


LOGS = ("server.log", "envoy.log")
REQUEST_LOG = "convergence_server.requests"


def log_sizes(log_dir: Path) -> dict[str, int]:
    return {name: (log_dir / name).stat().st_size for name in LOGS if (log_dir / name).exists()}


def log_problems(log_dir: Path, since: dict[str, int]) -> list[str]:
    """Warnings and errors the server and Envoy logged after `since` (from `log_sizes`)."""
    lines: list[str] = []
    for name in LOGS:
        path = log_dir / name
        if not path.exists():
            continue
        with path.open("rb") as log:
            log.seek(since.get(name, 0))
            text = log.read().decode(errors="replace")
        lines += [
            f"{name}: {line}"
            for line in text.splitlines()
            if line
            and '"severity": "INFO"' not in line
            and '"severity": "DEBUG"' not in line
            # A request refused for the caller's reason (a 4xx) is the caller's outcome.
            and not ('"severity": "WARNING"' in line and f'"logger": "{REQUEST_LOG}"' in line)
        ]
    return lines


# --- the report ---------------------------------------------------------------------------


def _count(result: Result) -> str:
    failed = result.errors.total()
    return f"{len(result.latencies)} ({failed} failed)" if failed else str(len(result.latencies))


def _ratio(rate: float, baseline: float) -> str:
    return f"{rate / baseline:.2f}" if baseline else "n/a"


def render(results: Sequence[Result]) -> str:
    """req/s, p50 and p99 count successful calls only; failures show beside the count."""
    baseline = results[0].rate
    rows = [
        "| scenario | requests | concurrency | req/s | p50 ms | p99 ms | ratio to baseline "
        "| CPU ms/req client / servers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.name} | {_count(r)} | {r.concurrency} | {r.rate:,.0f} | "
            f"{r.percentile_ms(50):.2f} | {r.percentile_ms(99):.2f} | {_ratio(r.rate, baseline)} | "
            f"{r.cpu_ms()} |"
        )
    return "\n".join(rows)


def describe_machine(args: argparse.Namespace) -> str:
    return (
        f"{args.requests} requests per scenario, concurrency {args.concurrency}, "
        f"warm-up {args.warmup}; nproc {os.cpu_count()}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, httpx {httpx.__version__}"
    )


def report_errors(results: Sequence[Result], problems: Sequence[str]) -> bool:
    """Prints failed calls and what was logged meanwhile to stderr; True when any."""
    for r in results:
        for message, count in r.errors.most_common():
            print(f"errors in {r.name!r}: {count} x {message}", file=sys.stderr)
    for line in problems[:20]:
        print(f"logged {line}", file=sys.stderr)
    if len(problems) > 20:
        print(f"... and {len(problems) - 20} more logged lines", file=sys.stderr)
    return any(r.errors for r in results) or bool(problems)


# --- the command --------------------------------------------------------------------------


def parse_args(
    argv: Sequence[str] | None,
    prog: str = "python -m bench.api_overhead",
    description: str | None = __doc__,
) -> argparse.Namespace:
    """The options every closed-loop benchmark takes."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per scenario")
    parser.add_argument("--concurrency", type=int, default=4, help="worker threads")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per scenario")
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--requests and --concurrency must be positive, --warmup not negative")
    return args


def run_all(args: argparse.Namespace) -> tuple[list[Result], list[str]]:
    """Starts everything, runs every scenario, stops everything (also on error)."""
    with contextlib.ExitStack() as resources:
        data_dir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        configs = data_dir / "configs"
        shutil.copytree(REPO_ROOT / "configs", configs)
        with (configs / "plans.yml").open("a") as plans:
            plans.write(UNMETERED_PLAN)
        echo_target, echo_pid = start_echo_server(resources)
        stack = start_bench_stack(resources, data_dir, CONVERGENCE_CONFIG_DIR=str(configs))
        api_key = onboard(stack.http_url)
        echo, direct, via_envoy = (
            resources.enter_context(grpc.insecure_channel(target, options=GRPC_OPTIONS))
            for target in (echo_target, stack.grpc_target, stack.envoy_grpc_target)
        )
        check_key(direct, api_key)
        run_id = completed_run(stack.http_url, api_key)
        logs_before = log_sizes(data_dir / "logs")
        load = Load(
            args.requests,
            args.concurrency,
            args.warmup,
            (echo_pid, stack.server.pid, stack.envoy.pid),
        )
        results = []
        for scenario in scenarios(echo, direct, via_envoy, stack.http_url, api_key, run_id):
            print(f"running: {scenario.name}", file=sys.stderr, flush=True)
            results.append(run_scenario(scenario, load))
        return results, log_problems(data_dir / "logs", logs_before)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results, problems = run_all(args)
    table = render(results)
    print(f"{describe_machine(args)}\n\n{table}")
    if args.output is not None:
        args.output.write_text(table + "\n")
    return 1 if report_errors(results, problems) else 0


if __name__ == "__main__":
    sys.exit(main())
