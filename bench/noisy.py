"""Noisy neighbour: a quiet tenant's latency while another tenant, or anonymous clients,
push the server as hard as they can.

`make bench` runs `python -m bench.noisy`. On loopback only, on the configs of
`bench.pipelines` (the shipped templates plus `test/runs/quick` and the BENCH plan, whose
limits never bind), it starts two stacks (gRPC server + Envoy on ports the OS picks, the
embedded store on a fresh temporary data directory) and onboards on each a quiet tenant
(`--quiet-plan`, BENCH: its own request rate never binds) and a noisy one (`--noisy-plan`,
SCALE: a real plan, whose limits are what protects the quiet one).

What is measured: the quiet tenant's GetRun of one of its runs, over direct gRPC with its
key, on a channel of its own in this process: a closed loop, one call after another for
`--seconds` (a fixed time, not a fixed count: a SCALE key's bucket holds a minute of
requests, and how long the noisy tenant's burst lasts depends on what it calls; each
window must cover the same share of the flood), p50 and p99 in ms, and the p50 of each
second of the loop. Were the quiet plan's request rate one a closed loop could exceed, the
loop is paced at 80% of it. The noisy traffic comes from a second process started for each
scenario (in this one, its threads would share the GIL with the quiet loop): it sets up,
then floods until told to stop; the quiet loop starts `--ramp` s into the flood. Per
scenario: the noisy calls and their statuses (each 429 named by the limit that refused it),
the noisy process's CPU, and the CPU of the server and of Envoy during the quiet loop, from
Linux's /proc (100% = one core busy).

Stack `runs` (`--workers` workers; the open endpoints' limits raised, for the cost part):
  0. alone: nothing else running; the baseline of (a).
  a. trigger flood: `--threads` threads call RunPipeline of `test/runs/quick` (a new day
     each) with the noisy key, as fast as they can; the runs admitted execute on the
     workers, the others get 429 (request rate, concurrent runs or daily runs).
Stack `reads` (no workers, so that a run stays PENDING and a WatchRun of it stays open;
the open endpoints' default limits):
  0. alone, again: the baseline of (b) and (c).
  b. streams and reads: the noisy tenant opens WatchRun streams on its PENDING run, its
     plan's `open_streams` and 5 more (refused), and holds them, while `--threads` threads
     call GetRun and ListRuns with its key as fast as they can.
  c. anonymous dry-runs: `--threads` threads POST /api/v1/tenants/dryrun through Envoy,
     each from a loopback address of its own (127.0.0.101, ...), and a quarter as many call
     DryRunOnboarding straight to the server's port, as fast as they can, a new tenant id
     each time.
The goal: each scenario's quiet p99 within 3x of its stack's idle p99.

Cost, on stack `runs` before its scenarios: server CPU per DryRunOnboarding (a new tenant
id each call) and per GetHealth (no key), with the closed-loop runner of
`bench.api_overhead` (`--cost-requests` calls each, 2 threads); nothing is refused.

Every process started here is stopped on the way out, even on error. The exit status is 1
when a quiet call failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import cast
from unittest import mock

import grpc
import httpx

from bench.api_overhead import (
    GRPC_OPTIONS,
    START_TIMEOUT,
    TIMEOUT,
    Load,
    Result,
    Scenario,
    _cpu_seconds,
    _describe,
    health_call,
    log_problems,
    log_sizes,
    render,
    run_scenario,
    shared,
)
from bench.pipelines import (
    FIRST_DAY,
    QUICK,
    Session,
    Tenant,
    Workspace,
    make_workspace,
    run_request,
    start_pipeline_stack,
    wait_for_run,
)
from convergence.v1 import (
    pipeline_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)
from convergence_server.domain.plans import Plan, load_plans
from convergence_server.stack import Stack, die_with_parent

GOAL = 3.0  # the quiet p99 under abuse, at most this times the idle p99
EXTRA_STREAMS = 5  # WatchRun streams tried beyond the plan's open_streams
PACE_SHARE = 0.8  # of the quiet plan's request rate, when the loop must be paced
UNPACED_PER_SECOND = 2000  # more than a closed loop of GetRun reaches here
WARMUP_SECONDS = 0.5  # of quiet calls on each stack before its baseline
FLOOD_MARGIN_SECONDS = 30  # a flood not told to stop stops this long after the quiet loop
RAISED = "1000000000"  # the open endpoints' limits on stack `runs`
APPLICANT = {"company_name": "Noisy Bench Ltd", "admin_email": "admin@noisy.example.com"}
# What each 429 says, and the limit it names in the report.
REFUSALS = (
    ("Request rate exceeded", "rate"),
    ("Concurrent pipeline limit", "concurrent runs"),
    ("Daily pipeline quota", "daily runs"),
    ("calls in progress", "in flight"),
    ("streams open", "streams"),
    ("from your address", "per address"),
    ("from all clients together", "all clients"),
    ("failed authentications", "auth failures"),
)
HTTP_STATUS = {
    grpc.StatusCode.OK: "200",
    grpc.StatusCode.INVALID_ARGUMENT: "400",
    grpc.StatusCode.UNAUTHENTICATED: "401",
    grpc.StatusCode.PERMISSION_DENIED: "403",
    grpc.StatusCode.NOT_FOUND: "404",
    grpc.StatusCode.ALREADY_EXISTS: "409",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "429",
    grpc.StatusCode.UNAVAILABLE: "503",
    grpc.StatusCode.DEADLINE_EXCEEDED: "504",
}

Tally = Counter[tuple[str, str]]
"""Noisy calls by (method, status): "200", "429 rate", "503"..."""


# --- statuses -------------------------------------------------------------------------------


def _refusal(message: str) -> str:
    return next((f"429 {label}" for needle, label in REFUSALS if needle in message), "429")


def grpc_status(error: grpc.RpcError) -> str:
    call = cast(grpc.Call, error)  # a failed sync call raises an error that is also its Call
    status = HTTP_STATUS.get(call.code(), call.code().name)
    return _refusal(call.details() or "") if status == "429" else status


def rest_status(response: httpx.Response) -> str:
    if response.status_code != 429:
        return str(response.status_code)
    try:
        return _refusal(str(response.json().get("message", "")))
    except (ValueError, AttributeError):
        return "429"


# --- the noisy process ----------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbour:
    """What the noisy process does; pickled to it."""

    kind: str  # "triggers", "reads" or "dryruns"
    grpc_target: str
    http_url: str
    tenant: Tenant
    run_id: str  # reads: the PENDING run watched and read
    threads: int
    streams: int  # reads: WatchRun streams tried before the flood
    seconds: float  # the flood stops by itself after this long, even if never told to


@dataclass(frozen=True)
class NeighbourReport:
    tally: Tally
    seconds: float  # of flood
    cpu: float  # the noisy process's CPU seconds during the flood
    error: str = ""


Call = Callable[[], object]
Flood = Callable[[Event, float], Tally]
"""One thread's loop: calls until the event is set or the deadline; its calls by status."""


def _channel(resources: contextlib.ExitStack, target: str) -> grpc.Channel:
    return resources.enter_context(grpc.insecure_channel(target, options=GRPC_OPTIONS))


def _flood(method: str, call: Call, stop: Event, deadline: float) -> Tally:
    """Calls `call` until `stop` (or the monotonic `deadline`); a gRPC status or an HTTP
    response is counted."""
    tally: Tally = Counter()
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            result = call()
        except grpc.RpcError as error:
            tally[method, grpc_status(error)] += 1
        except Exception as exc:
            tally[method, f"client {type(exc).__name__}"] += 1
        else:
            status = rest_status(result) if isinstance(result, httpx.Response) else "200"
            tally[method, status] += 1
    return tally


def _trigger(channel: grpc.Channel, spec: Neighbour, first: int) -> Call:
    """RunPipeline of test/runs/quick, each call for a day no other thread takes."""
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
    days = itertools.count(first, spec.threads)

    def call() -> object:
        request = run_request(spec.tenant, QUICK, FIRST_DAY + timedelta(days=next(days)))
        return stub.RunPipeline(request, timeout=TIMEOUT, metadata=spec.tenant.metadata)

    return call


def trigger_floods(resources: contextlib.ExitStack, spec: Neighbour) -> list[Flood]:
    """Every thread triggers, on a channel of its own."""
    return [
        functools.partial(
            _flood, "RunPipeline", _trigger(_channel(resources, spec.grpc_target), spec, i)
        )
        for i in range(spec.threads)
    ]


def _read(channel: grpc.Channel, spec: Neighbour, method: str) -> Call:
    stub = run_service_pb2_grpc.RunServiceStub(channel)
    if method == "GetRun":
        get = run_service_pb2.GetRunRequest(pipeline_logging_id=spec.run_id)
        return lambda: stub.GetRun(get, timeout=TIMEOUT, metadata=spec.tenant.metadata)
    listing = run_service_pb2.ListRunsRequest(limit=100)
    return lambda: stub.ListRuns(listing, timeout=TIMEOUT, metadata=spec.tenant.metadata)


def read_floods(resources: contextlib.ExitStack, spec: Neighbour) -> list[Flood]:
    """Half the threads call GetRun of the watched run, half ListRuns (limit 100), each on
    a channel of its own."""
    floods: list[Flood] = []
    for i in range(spec.threads):
        method = ("GetRun", "ListRuns")[i % 2]
        call = _read(_channel(resources, spec.grpc_target), spec, method)
        floods.append(functools.partial(_flood, method, call))
    return floods


def applicant() -> dict[str, str]:
    """A dry-run's body: a tenant id nobody has, each time."""
    tenant_id = f"noisy_{uuid.uuid4().hex[:12]}"
    return {"tenant_id": tenant_id, **APPLICANT, "subscription_plan": "STARTER"}


def _rest_dry_run(resources: contextlib.ExitStack, url: str, address: str) -> Call:
    client = resources.enter_context(
        httpx.Client(
            base_url=url,
            timeout=TIMEOUT,
            trust_env=False,
            transport=httpx.HTTPTransport(local_address=address),
        )
    )
    return lambda: client.post("/api/v1/tenants/dryrun", json=applicant())


def _grpc_dry_run(channel: grpc.Channel) -> Call:
    stub = tenant_service_pb2_grpc.TenantServiceStub(channel)

    def call() -> object:
        request = tenant_service_pb2.DryRunOnboardingRequest(**applicant())
        return stub.DryRunOnboarding(request, timeout=TIMEOUT)

    return call


def dry_run_floods(resources: contextlib.ExitStack, spec: Neighbour) -> list[Flood]:
    """REST through Envoy, thread i from 127.0.0.(101 + i); and a quarter as many threads
    on gRPC straight to the server's port (from 127.0.0.1)."""
    floods: list[Flood] = [
        functools.partial(
            _flood,
            "POST /api/v1/tenants/dryrun",
            _rest_dry_run(resources, spec.http_url, f"127.0.0.{101 + i}"),
        )
        for i in range(spec.threads)
    ]
    for _ in range(max(1, spec.threads // 4)):
        call = _grpc_dry_run(_channel(resources, spec.grpc_target))
        floods.append(functools.partial(_flood, "DryRunOnboarding", call))
    return floods


def hold_streams(resources: contextlib.ExitStack, spec: Neighbour) -> Tally:
    """Opens `spec.streams` WatchRun streams, one channel each, and keeps those served open
    (the run is PENDING: nothing more comes) until `resources` closes."""
    tally: Tally = Counter()
    request = run_service_pb2.WatchRunRequest(pipeline_logging_id=spec.run_id)
    for _ in range(spec.streams):
        stub = run_service_pb2_grpc.RunServiceStub(_channel(resources, spec.grpc_target))
        stream = stub.WatchRun(request, timeout=600, metadata=spec.tenant.metadata)
        try:
            next(iter(stream))
        except grpc.RpcError as error:
            tally["WatchRun (held)", grpc_status(error)] += 1
            continue
        resources.callback(stream.cancel)
        tally["WatchRun (held)", "200"] += 1
    return tally


FLOODS = {"triggers": trigger_floods, "reads": read_floods, "dryruns": dry_run_floods}


def neighbour_main(
    spec: Neighbour, ready: Event, go: Event, stop: Event, out: Queue[NeighbourReport]
) -> None:
    """The noisy process: sets up, says `ready`, floods from `go` until `stop`, reports.
    It ends with this one, even if this one is killed."""
    die_with_parent()
    try:
        with contextlib.ExitStack() as resources:
            held = hold_streams(resources, spec)
            floods = FLOODS[spec.kind](resources, spec)
            ready.set()
            if not go.wait(START_TIMEOUT):
                raise TimeoutError("never told to start")
            deadline = time.monotonic() + spec.seconds
            cpu, start = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(len(floods), thread_name_prefix="noisy") as pool:
                tallies = list(pool.map(lambda flood: flood(stop, deadline), floods))
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        out.put(NeighbourReport(sum(tallies, held), seconds, cpu))
    except BaseException:
        out.put(NeighbourReport(Counter(), 0.0, 0.0, traceback.format_exc()))
        raise


class NeighbourProcess:
    """The noisy process seen from here; `kill` (registered on the ExitStack) ends it."""

    def __init__(self, resources: contextlib.ExitStack, spec: Neighbour) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process using gRPC
        self.ready, self.go, self.stop = context.Event(), context.Event(), context.Event()
        self.out: Queue[NeighbourReport] = context.Queue()
        self.process: BaseProcess = context.Process(
            target=neighbour_main,
            args=(spec, self.ready, self.go, self.stop, self.out),
            name=f"noisy-{spec.kind}",
            daemon=True,
        )
        self.process.start()
        resources.callback(self.kill)

    def start_flood(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready.wait(0.1):
            if not self.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the noisy process did not start:\n{self._failure()}")
        self.go.set()

    def _failure(self) -> str:
        try:
            return self.out.get(timeout=5).error
        except Exception:
            return f"(exit code {self.process.exitcode})"

    def finish(self) -> NeighbourReport:
        self.stop.set()
        report = self.out.get(timeout=START_TIMEOUT)
        self.process.join(START_TIMEOUT)
        if report.error:
            raise RuntimeError(f"the noisy process failed:\n{report.error}")
        return report

    def kill(self) -> None:
        self.stop.set()
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# --- the stacks and their tenants -----------------------------------------------------------


def start_noisy_stack(
    resources: contextlib.ExitStack, workspace: Workspace, name: str, workers: int, raised: bool
) -> Stack:
    """`start_pipeline_stack`; with `raised`, the open endpoints' limits never bind
    (`start_stack` passes this process's environment on)."""
    limits = {
        "CONVERGENCE_OPEN_REQUESTS_PER_MINUTE_PER_CLIENT": RAISED,
        "CONVERGENCE_OPEN_REQUESTS_PER_MINUTE": RAISED,
    }
    with mock.patch.dict(os.environ, limits if raised else {}):
        return start_pipeline_stack(resources, workspace, name, workers)


def onboard(url: str, plan: str) -> Tenant:
    """Onboards a fresh tenant on `plan` over REST."""
    tenant_id = f"bench_{uuid.uuid4().hex[:12]}"
    body = {"tenant_id": tenant_id, **APPLICANT, "subscription_plan": plan}
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
        response = client.post("/api/v1/tenants/onboard", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"onboarding failed: {response.status_code} {response.text}")
    return Tenant(tenant_id, str(response.json()["api_key"]))


def trigger(channel: grpc.Channel, tenant: Tenant) -> str:
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
    request = run_request(tenant, QUICK, FIRST_DAY - timedelta(days=1))
    return str(
        stub.RunPipeline(request, timeout=TIMEOUT, metadata=tenant.metadata).pipeline_logging_id
    )


@dataclass
class Neighbourhood:
    """A stack, the quiet tenant's channel and run, the noisy tenant and its run."""

    name: str
    stack: Stack
    channel: grpc.Channel
    quiet: Tenant
    quiet_run: str
    noisy: Tenant
    noisy_run: str
    log_marks: dict[str, int] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.stack.run_dir.parent / "logs"


def settle(
    resources: contextlib.ExitStack,
    workspace: Workspace,
    args: argparse.Namespace,
    name: str,
    workers: int,
    raised: bool,
) -> Neighbourhood:
    """Starts a stack, onboards both tenants, gives each a run (waited for when it runs)."""
    stack = start_noisy_stack(resources, workspace, name, workers, raised)
    channel = resources.enter_context(
        grpc.insecure_channel(stack.grpc_target, options=GRPC_OPTIONS)
    )
    quiet, noisy = (
        onboard(stack.http_url, args.quiet_plan),
        onboard(stack.http_url, args.noisy_plan),
    )
    quiet_run, noisy_run = trigger(channel, quiet), trigger(channel, noisy)
    if workers:
        for tenant, run_id in ((quiet, quiet_run), (noisy, noisy_run)):
            wait_for_run(Session(stack, channel, tenant), run_id, timeout=60, poll=0.05)
    place = Neighbourhood(name, stack, channel, quiet, quiet_run, noisy, noisy_run)
    place.log_marks = log_sizes(place.log_dir)
    return place


# --- the quiet loop and the scenarios -------------------------------------------------------


@dataclass(frozen=True)
class QuietLoop:
    seconds: float
    interval: float  # between the starts of two calls; 0: one right after the other


@dataclass(frozen=True)
class Outcome:
    stack: str
    name: str
    samples: list[tuple[float, float]]  # (seconds into the loop, latency) per successful call
    errors: Counter[str]  # failed quiet calls
    seconds: float  # of the quiet loop
    server_cpu: float  # seconds, during the quiet loop
    envoy_cpu: float
    noisy: NeighbourReport | None

    @property
    def latencies(self) -> list[float]:
        return [latency for _, latency in self.samples]

    def percentile_ms(self, q: int) -> float:
        return percentile_ms(self.latencies, q)

    def each_second_p50(self) -> list[float]:
        """The median latency of the calls started in each whole second of the loop."""
        seconds: dict[int, list[float]] = {}
        for at, latency in self.samples:
            seconds.setdefault(int(at), []).append(latency)
        return [percentile_ms(seconds.get(s, []), 50) for s in range(int(self.seconds))]


def percentile_ms(latencies: Sequence[float], q: int) -> float:
    if len(latencies) < 2:
        return 1000 * latencies[0] if latencies else math.nan
    return 1000 * statistics.quantiles(latencies, n=100, method="inclusive")[q - 1]


def quiet_loop(
    place: Neighbourhood, loop: QuietLoop
) -> tuple[list[tuple[float, float]], Counter[str]]:
    """GetRun of the quiet tenant's run, one call after another until the loop's time is
    up, each timed."""
    stub = run_service_pb2_grpc.RunServiceStub(place.channel)
    request = run_service_pb2.GetRunRequest(pipeline_logging_id=place.quiet_run)
    metadata = place.quiet.metadata
    samples: list[tuple[float, float]] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    next_at = 0.0
    while (now := time.perf_counter() - start) < loop.seconds:
        if loop.interval:
            time.sleep(max(0.0, next_at - now))
            now = time.perf_counter() - start
            next_at = max(next_at, now - loop.interval) + loop.interval  # no catching up
        try:
            stub.GetRun(request, timeout=TIMEOUT, metadata=metadata)
        except Exception as exc:
            errors[_describe(exc)] += 1
            continue
        samples.append((now, time.perf_counter() - start - now))
    return samples, errors


def measure(place: Neighbourhood, name: str, settings: Settings, spec: Neighbour | None) -> Outcome:
    """The quiet loop, alone or `settings.ramp` seconds into the flood `spec` describes."""
    print(f"running: [{place.name}] {name}", file=sys.stderr, flush=True)
    with contextlib.ExitStack() as resources:
        neighbour = NeighbourProcess(resources, spec) if spec else None
        if neighbour:
            neighbour.start_flood()
            time.sleep(settings.ramp)
        pids = (place.stack.server.pid, place.stack.envoy.pid)
        cpu = [_cpu_seconds(pid) for pid in pids]
        start = time.perf_counter()
        samples, errors = quiet_loop(place, settings.loop)
        seconds = time.perf_counter() - start
        server_cpu, envoy_cpu = (_cpu_seconds(pid) - c for pid, c in zip(pids, cpu, strict=True))
        report = neighbour.finish() if neighbour else None
    return Outcome(place.name, name, samples, errors, seconds, server_cpu, envoy_cpu, report)


def noisy_traffic(
    kind: str, place: Neighbourhood, settings: Settings, streams: int = 0
) -> Neighbour:
    stack = place.stack
    return Neighbour(
        kind,
        stack.grpc_target,
        stack.http_url,
        place.noisy,
        place.noisy_run,
        settings.threads,
        streams,
        seconds=settings.ramp + settings.loop.seconds + FLOOD_MARGIN_SECONDS,
    )


def warm_up(place: Neighbourhood, loop: QuietLoop) -> None:
    """A few quiet calls first: the first ones on a channel or a stack are slower."""
    quiet_loop(place, QuietLoop(max(WARMUP_SECONDS, 3 * loop.interval), loop.interval))


def measure_cost(place: Neighbourhood, args: argparse.Namespace) -> list[Result]:
    """Server CPU per GetHealth (no key) and per DryRunOnboarding; nothing is refused."""
    load = Load(args.cost_requests, 2, 20, (place.stack.server.pid,))
    results = []
    for scenario in (
        Scenario("baseline: GetHealth, no key, gRPC direct", shared(health_call(place.channel))),
        Scenario("DryRunOnboarding, gRPC direct", shared(_grpc_dry_run(place.channel))),
    ):
        print(f"running: [{place.name}] cost: {scenario.name}", file=sys.stderr, flush=True)
        results.append(run_scenario(scenario, load))
    return results


@dataclass(frozen=True)
class Settings:
    """The options, with what the plans decide."""

    loop: QuietLoop
    ramp: float
    threads: int
    streams: int  # WatchRun streams the noisy tenant tries in b: its plan's, and more


@dataclass
class Report:
    settings: Settings
    outcomes: list[Outcome] = field(default_factory=list)
    cost: list[Result] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def run_all(args: argparse.Namespace) -> Report:
    """Stack `runs`: cost, alone, a; stack `reads`: alone, b, c. Each stack is stopped
    before the next starts."""
    with contextlib.ExitStack() as resources:
        workspace = make_workspace(resources)
        plans = load_plans(workspace.configs / "plans.yml")
        for plan in (args.quiet_plan, args.noisy_plan):
            if plan not in plans:
                raise SystemExit(f"no plan {plan} in configs/plans.yml (nor BENCH)")
        settings = Settings(
            loop=quiet_pacing(plans[args.quiet_plan], args.seconds),
            ramp=args.ramp,
            threads=args.threads,
            streams=plans[args.noisy_plan].open_streams + EXTRA_STREAMS,
        )
        report = Report(settings)
        with contextlib.ExitStack() as stack_resources:
            place = settle(stack_resources, workspace, args, "runs", args.workers, raised=True)
            report.cost = measure_cost(place, args)
            warm_up(place, settings.loop)
            triggers = noisy_traffic("triggers", place, settings)
            report.outcomes += [
                measure(place, "0. alone", settings, None),
                measure(place, "a. trigger flood", settings, triggers),
            ]
            report.problems += [f"[runs] {p}" for p in log_problems(place.log_dir, place.log_marks)]
        with contextlib.ExitStack() as stack_resources:
            place = settle(stack_resources, workspace, args, "reads", 0, raised=False)
            warm_up(place, settings.loop)
            reads = noisy_traffic("reads", place, settings, settings.streams)
            dry_runs = noisy_traffic("dryruns", place, settings)
            report.outcomes += [
                measure(place, "0. alone", settings, None),
                measure(place, "b. streams held + reads", settings, reads),
                measure(place, "c. anonymous dry-runs", settings, dry_runs),
            ]
            report.problems += [
                f"[reads] {p}" for p in log_problems(place.log_dir, place.log_marks)
            ]
    return report


def quiet_pacing(plan: Plan, seconds: float) -> QuietLoop:
    """One call right after the other; paced at 80% of the quiet plan's request rate when
    a closed loop could exceed it."""
    per_second = plan.requests_per_minute / 60
    interval = 0.0 if per_second > UNPACED_PER_SECOND else 1 / (PACE_SHARE * per_second)
    return QuietLoop(seconds, interval)


# --- the report -----------------------------------------------------------------------------


def _mix(tally: Tally) -> str:
    by_status: Counter[str] = Counter()
    for (_, status), n in tally.items():
        by_status[status] += n
    return ", ".join(f"{status}: {n:,}" for status, n in sorted(by_status.items()))


def render_outcomes(outcomes: Sequence[Outcome]) -> str:
    """Ratios are to the quiet loop alone on the same stack; CPU: 100% is one core."""
    baselines = {o.stack: o for o in outcomes if o.noisy is None}
    rows = [
        "| stack | scenario | quiet calls | p50 ms | p99 ms | p50 ratio | p99 ratio "
        f"| p99 ≤ {GOAL:g}x idle | noisy requests (req/s) | noisy statuses "
        "| server CPU | Envoy CPU |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for o in outcomes:
        base = baselines[o.stack]
        p50, p99 = o.percentile_ms(50), o.percentile_ms(99)
        ratio50, ratio99 = p50 / base.percentile_ms(50), p99 / base.percentile_ms(99)
        calls = f"{len(o.samples):,}" + (f" ({o.errors.total()} failed)" if o.errors else "")
        if o.noisy is None:
            noisy, statuses, verdict = "—", "—", "(baseline)"
        else:
            total = o.noisy.tally.total()
            noisy = f"{total:,} ({total / o.noisy.seconds:,.0f})"
            statuses = _mix(o.noisy.tally)
            verdict = "yes" if ratio99 <= GOAL else "**no**"
        rows.append(
            f"| {o.stack} | {o.name} | {calls} | {p50:.2f} | {p99:.2f} | {ratio50:.2f} | "
            f"{ratio99:.2f} | {verdict} | {noisy} | {statuses} | "
            f"{100 * o.server_cpu / o.seconds:.0f}% | {100 * o.envoy_cpu / o.seconds:.0f}% |"
        )
    return "\n".join(rows)


def render_noisy(outcomes: Sequence[Outcome]) -> str:
    """The noisy calls by method; the noisy process's own CPU during its flood."""
    rows = [
        "| scenario | noisy call | requests | statuses | flood s | noisy client CPU |",
        "|---|---|---:|---|---:|---:|",
    ]
    for o in outcomes:
        if o.noisy is None:
            continue
        for i, method in enumerate(sorted({method for method, _ in o.noisy.tally})):
            tally: Tally = Counter({k: n for k, n in o.noisy.tally.items() if k[0] == method})
            first = i == 0
            rows.append(
                f"| {o.name if first else ''} | {method} | {tally.total():,} | {_mix(tally)} | "
                f"{f'{o.noisy.seconds:.1f}' if first else ''} | "
                f"{f'{100 * o.noisy.cpu / o.noisy.seconds:.0f}%' if first else ''} |"
            )
    return "\n".join(rows)


def render_timeline(outcomes: Sequence[Outcome]) -> str:
    """Whether a scenario's cost comes in a burst (e.g. while the noisy key's bucket lasts)."""
    rows = ["| stack | scenario | quiet p50 ms in each second of the loop |", "|---|---|---|"]
    for o in outcomes:
        each = " ".join(f"{p50:.1f}" for p50 in o.each_second_p50())
        rows.append(f"| {o.stack} | {o.name} | {each} |")
    return "\n".join(rows)


def render_cost(results: Sequence[Result]) -> str:
    health, dry_run = (
        1000 * r.cpu.servers / (len(r.latencies) + r.errors.total()) for r in results
    )
    return (
        f"{render(results)}\n\nServer CPU per DryRunOnboarding {dry_run:.2f} ms, per GetHealth "
        f"{health:.2f} ms: {dry_run / health:.1f}x."
    )


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def describe(args: argparse.Namespace, settings: Settings, load_before: str) -> str:
    loop = settings.loop
    paced = f"paced at {1 / loop.interval:.1f}/s" if loop.interval else "unpaced"
    return (
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"httpx {httpx.__version__}; load average {load_before} before, {loadavg()} after. "
        f"Quiet: plan {args.quiet_plan}, GetRun for {loop.seconds:g} s per scenario ({paced}); "
        f"noisy: plan {args.noisy_plan}, {settings.threads} threads, {settings.streams} streams "
        f"tried in b; ramp {settings.ramp:g} s; {args.workers} workers on stack `runs`."
    )


# --- the command ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.noisy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--seconds", type=float, default=12, help="length of the quiet loop per scenario")
    add("--ramp", type=float, default=1.0, help="seconds of flood before the quiet loop")
    add("--threads", type=int, default=8, help="noisy client threads")
    add("--workers", type=int, default=4, help="CONVERGENCE_WORKERS of stack `runs`")
    add("--quiet-plan", default="BENCH", help="the quiet tenant's plan")
    add("--noisy-plan", default="SCALE", help="the noisy tenant's plan")
    add("--cost-requests", type=int, default=400, help="calls per cost scenario")
    add("--output", type=Path, help="also write the markdown tables here")
    args = parser.parse_args(argv)
    if min(args.threads, args.workers, args.cost_requests) < 1:
        parser.error("--threads, --workers and --cost-requests must be positive")
    if args.seconds < 1 or args.ramp < 0:
        parser.error("--seconds must be 1 or more, --ramp not negative")
    return args


def _stop_on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: stacks stopped, temporary files removed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_term)
    load_before = loadavg()
    started = time.perf_counter()
    report = run_all(args)
    text = "\n\n".join(
        [
            describe(args, report.settings, load_before),
            f"Total wall time: {time.perf_counter() - started:.0f} s",
            f"## Quiet GetRun under noisy neighbours\n\n{render_outcomes(report.outcomes)}",
            f"## The noisy traffic\n\n{render_noisy(report.outcomes)}",
            f"## Quiet p50 over time\n\n{render_timeline(report.outcomes)}",
            f"## What a dry-run costs (stack `runs`)\n\n{render_cost(report.cost)}",
        ]
    )
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    failed = False
    for o in report.outcomes:
        for message, n in o.errors.most_common():
            print(f"quiet calls failed in {o.name!r}: {n} x {message}", file=sys.stderr)
            failed = True
    for line in report.problems[:20]:
        print(f"logged {line[:300]}", file=sys.stderr)
    if len(report.problems) > 20:
        print(f"... and {len(report.problems) - 20} more logged lines", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
