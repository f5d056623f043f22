"""What the interceptor chain costs: GetRun with authentication and quotas vs without.

`make bench` runs `python -m bench.interceptors`. On loopback only, on a temporary copy of
`configs/` that adds the test template `test/runs/quick` and an `UNMETERED` plan whose
limits never bind (as `tests/conftest.py` does), and on one temporary data directory:

0. setup: the stack (gRPC server + Envoy, embedded store, CONVERGENCE_WORKERS=0) starts;
   two UNMETERED tenants are onboarded over REST, the second gets 99 more API keys (100 in
   all), and each triggers one `test/runs/quick` run, which stays PENDING (no workers); the
   stack stops, so that every measured server below is freshly started on the same data.
1. real, before: the stack again, with the standard chain (errors, request context, auth,
   quotas). GetRun of the first tenant's run over direct gRPC with its key (`x-api-key`),
   and again with `x-user-id` too (which adds the team-size check); GetRun of the second
   tenant's run with its onboarding key (a tenant with 100 keys); then one of the second
   tenant's other keys is revoked on that server and the same call runs again.
2. bare: the stack is stopped and `bench/interceptor_server.py` serves the same data
   directory with the same CONVERGENCE_* settings: `create_server` with only `FixedCaller`,
   which sets the caller to that tenant. GetRun of the same run, with no metadata.
3. real, after: the stack again, the same two scenarios, to see drift; the ratio uses the
   mean of before and after: ratio = real req/s / bare req/s (the goal is >= 0.8).

Every scenario runs with the closed-loop runner of `bench.api_overhead` (C worker threads
on one sync channel, warm-up, then N timed calls; client cost is included). The last
column splits CPU per request between this client and the gRPC server process (Envoy is
running but not on the path). Every process started here is stopped on the way out, even
on error. The exit status is 1 when a call failed or a server logged a warning or error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import httpx

from bench import api_overhead
from bench.api_overhead import (
    GRPC_OPTIONS,
    TIMEOUT,
    Call,
    Load,
    Result,
    Scenario,
    _count,
    _stop,
    describe_machine,
    log_problems,
    log_sizes,
    report_errors,
    run_scenario,
    shared,
)
from convergence.v1 import (
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from convergence_server.config import REPO_ROOT
from convergence_server.domain.keys import parse_key
from convergence_server.stack import Stack, _read_ready_line, spawn, start_stack

BARE_SERVER = Path(__file__).with_name("interceptor_server.py")
QUICK_TEMPLATE = REPO_ROOT / "tests" / "fixtures" / "templates" / "quick.yml"
UNMETERED = "UNMETERED"
# The same plan as tests/conftest.py's config_dir: limits that never bind.
UNMETERED_PLAN = (
    f"  {UNMETERED}:\n    daily_pipeline_runs: 1000000\n"
    "    concurrent_pipeline_runs: 100000\n    team_size: 1000\n"
    "    requests_per_minute: 10000000\n    open_streams: 1000\n"
    "    requests_in_flight: 1000\n    max_schedules: 1000\n"
)
USER_ID = "bench-user@example.com"
GOAL = 0.8


# --- the workspace and the servers --------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    configs: Path
    data_dir: Path

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def bare_log_dir(self) -> Path:
        return self.data_dir / "logs-bare"  # its log is server.log there, as log_problems reads

    def env(self) -> dict[str, str]:
        """The CONVERGENCE_* settings every server here runs with (real and bare alike)."""
        return {
            "CONVERGENCE_DATA_DIR": str(self.data_dir),
            "CONVERGENCE_GRPC_HOST": "127.0.0.1",
            "CONVERGENCE_GRPC_PORT": "0",
            "CONVERGENCE_HTTP_HOST": "127.0.0.1",
            "CONVERGENCE_HTTP_PORT": "0",
            "CONVERGENCE_ENVOY_ADMIN_PORT": "0",
            "CONVERGENCE_STORE": "embedded",
            "CONVERGENCE_LOG_LEVEL": "INFO",
            "CONVERGENCE_CONFIG_DIR": str(self.configs),
            "CONVERGENCE_WORKERS": "0",
        }


def make_workspace(resources: contextlib.ExitStack) -> Workspace:
    """A temporary folder: configs/ + test/runs/quick.yml + the UNMETERED plan, and data/."""
    root = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="bench-intercept-")))
    configs = root / "configs"
    shutil.copytree(REPO_ROOT / "configs", configs)
    with (configs / "plans.yml").open("a") as plans:
        plans.write(UNMETERED_PLAN)
    (configs / "test" / "runs").mkdir(parents=True)
    shutil.copy(QUICK_TEMPLATE, configs / "test" / "runs" / "quick.yml")
    return Workspace(configs, root / "data")


def start_real(resources: contextlib.ExitStack, workspace: Workspace) -> Stack:
    stack = start_stack(workspace.env(), log_dir=workspace.log_dir)
    resources.callback(stack.stop)
    return stack


def start_bare(
    resources: contextlib.ExitStack, workspace: Workspace, tenant: Tenant
) -> tuple[str, int]:
    """Starts `interceptor_server.py` for `tenant`, stopped when `resources` closes."""
    workspace.bare_log_dir.mkdir(parents=True, exist_ok=True)
    log_path = workspace.bare_log_dir / "server.log"
    log = resources.enter_context(log_path.open("ab"))
    process = spawn(
        [sys.executable, str(BARE_SERVER), tenant.tenant_id, tenant.key_id],
        env={"GRPC_VERBOSITY": "ERROR", **os.environ, **workspace.env()},
        stdout=subprocess.PIPE,
        stderr=log,
    )
    resources.callback(_stop, process)
    port = int(_read_ready_line(process, log_path)["grpc_port"])
    return f"127.0.0.1:{port}", process.pid


# --- the tenant, its run, the calls ---------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    api_key: str

    @property
    def key_id(self) -> str:
        parsed = parse_key(self.api_key)
        if parsed is None:
            raise RuntimeError("the onboarding returned a malformed API key")
        return parsed[1]


def onboard_unmetered(url: str) -> Tenant:
    tenant_id = f"bench_{uuid.uuid4().hex[:12]}"
    body = {
        "tenant_id": tenant_id,
        "company_name": "Bench Corporation",
        "admin_email": "admin@bench.example.com",
        "subscription_plan": UNMETERED,
    }
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
        response = client.post("/api/v1/tenants/onboard", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"onboarding failed: {response.status_code} {response.text}")
    return Tenant(tenant_id, str(response.json()["api_key"]))


def trigger_quick(channel: grpc.Channel, tenant: Tenant) -> str:
    """Triggers one `test/runs/quick` run (it stays PENDING: no workers); returns its id."""
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
    request = pipeline_service_pb2.RunPipelineRequest(
        tenant_id=tenant.tenant_id,
        provider="test",
        domain="runs",
        template="quick",
        trigger_by="bench",
    )
    response = stub.RunPipeline(request, timeout=TIMEOUT, metadata=key_metadata(tenant))
    return str(response.pipeline_logging_id)


Metadata = tuple[tuple[str, str], ...]


def key_metadata(tenant: Tenant, user_id: str | None = None) -> Metadata:
    key = (("x-api-key", tenant.api_key),)
    return (*key, ("x-user-id", user_id)) if user_id else key


def get_run_call(channel: grpc.Channel, run_id: str, metadata: Metadata = ()) -> Call:
    stub = run_service_pb2_grpc.RunServiceStub(channel)
    request = run_service_pb2.GetRunRequest(pipeline_logging_id=run_id)
    return functools.partial(stub.GetRun, request, timeout=TIMEOUT, metadata=metadata or None)


def check_real(channel: grpc.Channel, run_id: str, tenant: Tenant) -> None:
    """The chain is on: no key is refused, a key returns the PENDING run with quota headers."""
    try:
        get_run_call(channel, run_id)()
    except grpc.RpcError as exc:
        if cast(grpc.Call, exc).code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
    else:
        raise RuntimeError("the real server answered GetRun without an API key")
    stub = run_service_pb2_grpc.RunServiceStub(channel)
    request = run_service_pb2.GetRunRequest(pipeline_logging_id=run_id)
    run, call = stub.GetRun.with_call(request, timeout=TIMEOUT, metadata=key_metadata(tenant))
    trailers = dict(call.trailing_metadata() or ())
    if run.status != run_pb2.Run.PENDING or "x-ratelimit-limit" not in trailers:
        raise RuntimeError(f"unexpected GetRun answer: {run.status=} {trailers=}")


def check_bare(channel: grpc.Channel, run_id: str) -> None:
    """Without metadata the bare server returns the same PENDING run."""
    run = get_run_call(channel, run_id)()
    if not isinstance(run, run_pb2.Run) or run.pipeline_logging_id != run_id:
        raise RuntimeError(f"unexpected GetRun answer from the bare server: {run}")


# --- the phases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    results: list[Result]
    problems: list[str]


@dataclass(frozen=True)
class Setup:
    """The 1-key tenant and its run; the tenant with `KEYS` keys, its run, and the id of one
    of its other keys, revoked between two of the measured scenarios."""

    tenant: Tenant
    run_id: str
    crowded: Tenant
    crowded_run_id: str
    doomed_key_id: str


KEYS = 100


def real_scenarios(channel: grpc.Channel, setup: Setup) -> list[Scenario]:
    tenant, run_id = setup.tenant, setup.run_id
    crowded = get_run_call(channel, setup.crowded_run_id, key_metadata(setup.crowded))
    return [
        Scenario("GetRun + API key", shared(get_run_call(channel, run_id, key_metadata(tenant)))),
        Scenario(
            "GetRun + API key + X-User-ID",
            shared(get_run_call(channel, run_id, key_metadata(tenant, USER_ID))),
        ),
        Scenario(f"GetRun + API key, tenant with {KEYS} keys", shared(crowded)),
    ]


def revoke(url: str, tenant: Tenant, key_id: str) -> None:
    path = f"/api/v1/tenants/{tenant.tenant_id}/api-keys/{key_id}:revoke"
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
        response = client.post(path, headers={"X-API-Key": tenant.api_key})
    if response.status_code != 200:
        raise RuntimeError(f"revoking failed: {response.status_code} {response.text}")


def run_all(load: Load, scenarios: Sequence[Scenario]) -> list[Result]:
    results = []
    for scenario in scenarios:
        print(f"running: {scenario.name}", file=sys.stderr, flush=True)
        results.append(run_scenario(scenario, load))
    return results


def measure_real(args: argparse.Namespace, workspace: Workspace, setup: Setup) -> Measured:
    with contextlib.ExitStack() as resources:
        stack = start_real(resources, workspace)
        channel = resources.enter_context(
            grpc.insecure_channel(stack.grpc_target, options=GRPC_OPTIONS)
        )
        check_real(channel, setup.run_id, setup.tenant)
        marks = log_sizes(workspace.log_dir)
        load = Load(args.requests, args.concurrency, args.warmup, (stack.server.pid,))
        results = run_all(load, real_scenarios(channel, setup))
        # One of the crowded tenant's other keys revoked (again, after: a no-op) on this
        # server, then the same calls.
        revoke(stack.http_url, setup.crowded, setup.doomed_key_id)
        crowded = get_run_call(channel, setup.crowded_run_id, key_metadata(setup.crowded))
        name = f"GetRun + API key, tenant with {KEYS} keys, after a revocation"
        results += run_all(load, [Scenario(name, shared(crowded))])
        return Measured(results, log_problems(workspace.log_dir, marks))


def measure_bare(args: argparse.Namespace, workspace: Workspace, setup: Setup) -> Measured:
    tenant, run_id = setup.tenant, setup.run_id
    with contextlib.ExitStack() as resources:
        target, pid = start_bare(resources, workspace, tenant)
        channel = resources.enter_context(grpc.insecure_channel(target, options=GRPC_OPTIONS))
        check_bare(channel, run_id)
        marks = log_sizes(workspace.bare_log_dir)
        load = Load(args.requests, args.concurrency, args.warmup, (pid,))
        scenario = Scenario("GetRun, interceptors off", shared(get_run_call(channel, run_id)))
        results = run_all(load, [scenario])
        return Measured(results, log_problems(workspace.bare_log_dir, marks))


def prepare(workspace: Workspace) -> Setup:
    """Onboards two UNMETERED tenants, gives the second `KEYS` keys in all, and triggers a
    run of each, on a stack of its own."""
    with contextlib.ExitStack() as resources:
        stack = start_real(resources, workspace)
        tenant, crowded = onboard_unmetered(stack.http_url), onboard_unmetered(stack.http_url)
        path = f"/api/v1/tenants/{crowded.tenant_id}/api-keys"
        with httpx.Client(base_url=stack.http_url, timeout=TIMEOUT, trust_env=False) as client:
            for k in range(KEYS - 1):
                response = client.post(
                    path, headers={"X-API-Key": crowded.api_key}, json={"name": f"bench-{k}"}
                )
                if response.status_code != 200:
                    raise RuntimeError(f"creating a key failed: {response.text}")
        doomed = str(response.json()["key"]["key_id"])
        with grpc.insecure_channel(stack.grpc_target, options=GRPC_OPTIONS) as channel:
            return Setup(
                tenant,
                trigger_quick(channel, tenant),
                crowded,
                trigger_quick(channel, crowded),
                doomed,
            )


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    requests: str
    concurrency: int
    rate: float
    p50: float
    p99: float
    cpu: tuple[float, float]  # ms per request: client, server

    @classmethod
    def of(cls, result: Result, name: str) -> Row:
        calls = len(result.latencies) + result.errors.total()
        return cls(
            name,
            _count(result),
            result.concurrency,
            result.rate,
            result.percentile_ms(50),
            result.percentile_ms(99),
            (1000 * result.cpu.client / calls, 1000 * result.cpu.servers / calls),
        )

    @classmethod
    def mean(cls, rows: Sequence[Row], name: str) -> Row:
        return cls(
            name,
            " + ".join(r.requests for r in rows),
            rows[0].concurrency,
            statistics.fmean(r.rate for r in rows),
            statistics.fmean(r.p50 for r in rows),
            statistics.fmean(r.p99 for r in rows),
            (
                statistics.fmean(r.cpu[0] for r in rows),
                statistics.fmean(r.cpu[1] for r in rows),
            ),
        )


@dataclass(frozen=True)
class Report:
    bare: Row
    rows: list[Row]  # the real scenarios: before, after and their mean, each
    ratios: dict[str, float]  # scenario -> ratio of the mean to bare

    def render(self) -> str:
        lines = [
            "| scenario | requests | concurrency | req/s | p50 ms | p99 ms | ratio to bare "
            "| CPU ms/req client / server |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in (self.bare, *self.rows):
            ratio = row.rate / self.bare.rate
            name = f"**{row.name}**" if "mean" in row.name else row.name
            shown = f"**{ratio:.2f}**" if "mean" in row.name else f"{ratio:.2f}"
            lines.append(
                f"| {name} | {row.requests} | {row.concurrency} | {row.rate:,.0f} | "
                f"{row.p50:.2f} | {row.p99:.2f} | {shown} | "
                f"{row.cpu[0]:.2f} / {row.cpu[1]:.2f} |"
            )
        return "\n".join(lines)

    def verdict(self) -> str:
        parts = [
            f"{name}: {ratio:.3f} ({'meets' if ratio >= GOAL else 'misses'} the goal >= {GOAL})"
            for name, ratio in self.ratios.items()
        ]
        return "ratio = mean real req/s / bare req/s; " + "; ".join(parts)


def build_report(before: Measured, bare: Measured, after: Measured) -> Report:
    base = Row.of(bare.results[0], "baseline: GetRun, interceptors off (FixedCaller only)")
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    for first, second in zip(before.results, after.results, strict=True):
        pair = [Row.of(first, f"{first.name}, before"), Row.of(second, f"{second.name}, after")]
        mean = Row.mean(pair, f"{first.name}, mean of before/after")
        rows += [*pair, mean]
        ratios[first.name] = mean.rate / base.rate
    return Report(base, rows, ratios)


# --- the command ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return api_overhead.parse_args(argv, prog="python -m bench.interceptors", description=__doc__)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as resources:
        workspace = make_workspace(resources)
        setup = prepare(workspace)
        before = measure_real(args, workspace, setup)
        bare = measure_bare(args, workspace, setup)
        after = measure_real(args, workspace, setup)
    report = build_report(before, bare, after)
    table = report.render()
    print(f"{describe_machine(args)}\n\n{table}\n\n{report.verdict()}")
    if args.output is not None:
        args.output.write_text(table + "\n")
    results = [*before.results, *bare.results, *after.results]
    problems = [*before.problems, *bare.problems, *after.problems]
    return 1 if report_errors(results, problems) else 0


if __name__ == "__main__":
    sys.exit(main())
