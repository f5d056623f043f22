"""What running pipelines costs: triggering, queueing to a worker, and a 1M-row cost run.

`make bench` runs `python -m bench.pipelines` after `bench.api_overhead`. Every part starts
its own stack (gRPC server + Envoy on loopback, embedded store, a fresh temporary data
directory) on a temporary copy of `configs/` that adds the test template `test/runs/quick`
(`tests/fixtures/templates/quick.yml`, one step writing one row) and a `BENCH` plan with
limits too high to matter, so that plan quotas never shape the numbers. Each part has a
baseline measured in the same run:

1. triggers: RunPipeline of `test/runs/quick` over direct gRPC on a stack with
   CONVERGENCE_WORKERS=0 (only the trigger path: validate, idempotency, insert PENDING),
   with the closed-loop runner of `bench.api_overhead`; baseline: the authenticated
   GetHealth on the same stack, channel and concurrency.
2. latency: on a stack with workers, `--burst` triggers of `test/runs/quick` sent at once
   (gRPC futures, one day each, as a backfill would); per run, the server's start_time
   (the moment a worker claimed it) and end_time minus the client's wall clock when its
   trigger was sent and when it returned (same machine, same clock). Baseline: the same
   for `--sequential` runs triggered one after another, each awaited (GetRun every 20 ms)
   before the next, so nothing else is in flight. A worker may claim a run before its
   trigger's response reaches the client, so returned -> RUNNING can be negative; the
   ratio compares sent -> RUNNING.
3. cost: a `--rows` AWS CUR CSV (the sample's rows repeated with unique line-item IDs and
   every usage period moved to one day) through `aws/cost/cost_usage` for that day, on a
   stack of its own; the run's duration_ms and its steps' durations. Baseline: a raw DuckDB
   `CREATE TABLE AS SELECT * FROM read_csv(..., all_varchar = true)` of the same file in
   this process, in a fresh file database (as the store is) once before and once after
   the run (their mean); also once in memory, for reference.

Every process and file started or written here is stopped or removed on the way out, even
on error. The exit status is 1 when a call or run failed or a server logged a warning or
an error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import grpc
import httpx
from google.protobuf import timestamp_pb2

from bench.api_overhead import (
    GRPC_OPTIONS,
    TIMEOUT,
    Load,
    Result,
    Scenario,
    _cpu_seconds,
    check_key,
    health_call,
    log_problems,
    log_sizes,
    render,
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
from convergence_server.stack import Stack, start_stack

QUICK_TEMPLATE = REPO_ROOT / "tests" / "fixtures" / "templates" / "quick.yml"
SAMPLE_CUR = REPO_ROOT / "configs" / "sample_data" / "aws_cur_sample.csv"
QUICK = ("test", "runs", "quick")
COST = ("aws", "cost", "cost_usage")
BENCH_PLAN = """
  BENCH:  # added by bench/pipelines.py to its temporary copy: limits that never bind
    daily_pipeline_runs: 1000000
    concurrent_pipeline_runs: 1000000
    team_size: 1000
    requests_per_minute: 100000000
    open_streams: 100000
    requests_in_flight: 100000
    max_schedules: 100000
"""
TERMINAL = (run_pb2.Run.COMPLETE, run_pb2.Run.FAILED)
FIRST_DAY = date(2024, 1, 1)  # quick runs get one day each from here
CUR_DAY = date(2023, 11, 7)  # every row of the generated CUR falls on this day
CUR_ID, CUR_START, CUR_END, CUR_ACCOUNT = (
    "identity/LineItemId",
    "lineItem/UsageStartDate",
    "lineItem/UsageEndDate",
    "lineItem/UsageAccountId",
)
# Stands for each copy's own usage account in a line of the generated CUR.
ACCOUNT_MARK = "@ACCOUNT@"


# --- the workspace and the stacks -----------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    root: Path
    configs: Path
    sources: Path


def make_workspace(resources: contextlib.ExitStack) -> Workspace:
    """A temporary folder with configs/ + test/runs/quick.yml + the BENCH plan, and sources/."""
    root = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="bench-pipelines-")))
    configs = root / "configs"
    shutil.copytree(REPO_ROOT / "configs", configs)
    (configs / "test" / "runs").mkdir(parents=True)
    shutil.copy(QUICK_TEMPLATE, configs / "test" / "runs" / "quick.yml")
    with (configs / "plans.yml").open("a") as plans:
        plans.write(BENCH_PLAN)
    (root / "sources").mkdir()
    return Workspace(root, configs, root / "sources")


def start_pipeline_stack(
    resources: contextlib.ExitStack, workspace: Workspace, name: str, workers: int, **extra: str
) -> Stack:
    """A stack on `workspace`'s configs; `extra` adds to (or overrides) its environment."""
    data_dir = workspace.root / name
    env = {
        "CONVERGENCE_DATA_DIR": str(data_dir),
        "CONVERGENCE_GRPC_HOST": "127.0.0.1",
        "CONVERGENCE_GRPC_PORT": "0",
        "CONVERGENCE_HTTP_HOST": "127.0.0.1",
        "CONVERGENCE_HTTP_PORT": "0",
        "CONVERGENCE_ENVOY_ADMIN_PORT": "0",
        "CONVERGENCE_STORE": "embedded",
        "CONVERGENCE_LOG_LEVEL": "INFO",
        "CONVERGENCE_CONFIG_DIR": str(workspace.configs),
        "CONVERGENCE_SOURCE_ROOTS": str(workspace.sources),
        "CONVERGENCE_WORKERS": str(workers),
        **extra,
    }
    stack = start_stack(env, log_dir=data_dir / "logs")
    resources.callback(stack.stop)
    return stack


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    api_key: str

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return (("x-api-key", self.api_key),)


def onboard_tenant(url: str) -> Tenant:
    """Onboards a fresh tenant on the BENCH plan over REST."""
    tenant_id = f"bench_{uuid.uuid4().hex[:12]}"
    body = {
        "tenant_id": tenant_id,
        "company_name": "Bench Corporation",
        "admin_email": "admin@bench.example.com",
        "subscription_plan": "BENCH",
    }
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
        response = client.post("/api/v1/tenants/onboard", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"onboarding failed: {response.status_code} {response.text}")
    return Tenant(tenant_id, str(response.json()["api_key"]))


@dataclass
class Session:
    """A stack, a direct channel to it, one tenant; and where its log stood at the start."""

    stack: Stack
    channel: grpc.Channel
    tenant: Tenant
    log_marks: dict[str, int] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.stack.run_dir.parent / "logs"

    def problems(self) -> list[str]:
        return log_problems(self.log_dir, self.log_marks)


def open_session(
    resources: contextlib.ExitStack, workspace: Workspace, name: str, workers: int, **extra: str
) -> Session:
    stack = start_pipeline_stack(resources, workspace, name, workers, **extra)
    channel = resources.enter_context(
        grpc.insecure_channel(stack.grpc_target, options=GRPC_OPTIONS)
    )
    tenant = onboard_tenant(stack.http_url)
    check_key(channel, tenant.api_key)
    session = Session(stack, channel, tenant)
    session.log_marks = log_sizes(session.log_dir)
    return session


# --- the calls ------------------------------------------------------------------------------


def run_request(
    tenant: Tenant,
    template: tuple[str, str, str],
    day: date | None = None,
    parameters: dict[str, str] | None = None,
    idempotent: bool = False,
) -> pipeline_service_pb2.RunPipelineRequest:
    provider, domain, name = template
    return pipeline_service_pb2.RunPipelineRequest(
        tenant_id=tenant.tenant_id,
        provider=provider,
        domain=domain,
        template=name,
        trigger_by="bench",
        date=day.isoformat() if day else "",
        parameters=parameters or {},
        idempotency_key=uuid.uuid4().hex if idempotent else "",
    )


def trigger_call(session: Session, idempotent: bool) -> Callable[[], object]:
    """RunPipeline of the quick template; a fresh idempotency key per call when asked."""
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(session.channel)
    metadata = session.tenant.metadata

    def call() -> object:
        request = run_request(session.tenant, QUICK, idempotent=idempotent)
        return stub.RunPipeline(request, timeout=TIMEOUT, metadata=metadata)

    return call


def get_run(session: Session, run_id: str) -> run_pb2.Run:
    stub = run_service_pb2_grpc.RunServiceStub(session.channel)
    request = run_service_pb2.GetRunRequest(pipeline_logging_id=run_id)
    return stub.GetRun(request, timeout=TIMEOUT, metadata=session.tenant.metadata)


def list_runs(
    session: Session, status: run_pb2.Run.Status.ValueType = 0, limit: int = 1000
) -> list[run_pb2.Run]:
    stub = run_service_pb2_grpc.RunServiceStub(session.channel)
    request = run_service_pb2.ListRunsRequest(limit=limit, status=status)
    response = stub.ListRuns(request, timeout=TIMEOUT, metadata=session.tenant.metadata)
    return list(response.runs)


def list_steps(session: Session, run_id: str) -> list[run_pb2.RunStep]:
    stub = run_service_pb2_grpc.RunServiceStub(session.channel)
    request = run_service_pb2.ListRunStepsRequest(pipeline_logging_id=run_id)
    response = stub.ListRunSteps(request, timeout=TIMEOUT, metadata=session.tenant.metadata)
    return list(response.steps)


def wait_for_run(session: Session, run_id: str, timeout: float, poll: float) -> run_pb2.Run:
    """Polls GetRun until the run has ended; raises after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = get_run(session, run_id)
        if run.status in TERMINAL:
            return run
        time.sleep(poll)
    raise TimeoutError(f"run {run_id} did not end within {timeout:g} s")


def epoch(moment: timestamp_pb2.Timestamp) -> float:
    """A protobuf Timestamp as seconds since the epoch (time.time()'s scale)."""
    return moment.ToNanoseconds() / 1e9


def memory_mib(pid: int, field: str) -> float:
    """A memory figure of the process (`VmRSS`, `VmHWM`...) from Linux's /proc, in MiB;
    NaN once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM)."""
    return memory_mib(pid, "VmHWM")


# --- 1: triggers ----------------------------------------------------------------------------


def measure_triggers(
    args: argparse.Namespace, workspace: Workspace
) -> tuple[list[Result], list[str]]:
    with contextlib.ExitStack() as resources:
        session = open_session(resources, workspace, "triggers", workers=0)
        load = Load(args.requests, args.concurrency, args.warmup, (session.stack.server.pid,))
        health = health_call(session.channel, session.tenant.api_key)
        results: list[Result] = []
        for scenario in (
            Scenario("baseline: GetHealth + API key, gRPC direct", shared(health)),
            Scenario("RunPipeline test/runs/quick", shared(trigger_call(session, False))),
            Scenario(
                "RunPipeline test/runs/quick + idempotency key",
                shared(trigger_call(session, True)),
            ),
        ):
            print(f"running: {scenario.name}", file=sys.stderr, flush=True)
            results.append(run_scenario(scenario, load))
        return results, session.problems()


# --- 2: trigger -> RUNNING latency ------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """One run: the client's clock when its trigger was sent and returned; the server's."""

    sent: float
    returned: float
    run: run_pb2.Run

    def trigger(self) -> float:
        return self.returned - self.sent

    def sent_to_running(self) -> float:
        return epoch(self.run.start_time) - self.sent

    def returned_to_running(self) -> float:
        return epoch(self.run.start_time) - self.returned

    def returned_to_complete(self) -> float:
        return epoch(self.run.end_time) - self.returned


Metric = Callable[[Timing], float]


@dataclass(frozen=True)
class LatencyResult:
    name: str
    timings: list[Timing]
    failed: Counter[str]
    wall: float  # first trigger sent -> last run ended

    def percentile_ms(self, metric: Metric, q: int) -> float:
        data = [metric(t) for t in self.timings]
        if len(data) < 2:
            return 1000 * (data[0] if data else math.nan)
        return 1000 * statistics.quantiles(data, n=100, method="inclusive")[q - 1]

    def p50_p99(self, metric: Metric) -> str:
        return f"{self.percentile_ms(metric, 50):.1f} / {self.percentile_ms(metric, 99):.1f}"


def sequential_runs(session: Session, count: int) -> LatencyResult:
    """One run at a time: trigger, wait until it has ended, next."""
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(session.channel)
    timings: list[Timing] = []
    failed: Counter[str] = Counter()
    first = time.time()
    for i in range(count):
        request = run_request(session.tenant, QUICK, FIRST_DAY - timedelta(days=i + 1))
        sent = time.time()
        response = stub.RunPipeline(request, timeout=TIMEOUT, metadata=session.tenant.metadata)
        returned = time.time()
        run = wait_for_run(session, response.pipeline_logging_id, timeout=60, poll=0.02)
        if run.status == run_pb2.Run.FAILED:
            failed[run.error_message] += 1
        timings.append(Timing(sent, returned, run))
    wall = max(epoch(t.run.end_time) for t in timings) - first
    return LatencyResult(f"baseline: {count} runs one at a time", timings, failed, wall)


def fire(session: Session, count: int) -> list[tuple[float, float, str]]:
    """Sends `count` triggers at once; (sent, returned, run id) for each."""
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(session.channel)
    returned = [math.nan] * count
    lock = threading.Lock()

    def record(i: int, _future: object) -> None:
        with lock:
            returned[i] = time.time()

    sent: list[float] = []
    futures = []
    for i in range(count):
        request = run_request(session.tenant, QUICK, FIRST_DAY + timedelta(days=i))
        sent.append(time.time())
        future = stub.RunPipeline.future(request, timeout=TIMEOUT, metadata=session.tenant.metadata)
        future.add_done_callback(functools.partial(record, i))
        futures.append(future)
    ids = [future.result().pipeline_logging_id for future in futures]
    with lock:
        return list(zip(sent, returned, ids, strict=True))


def wait_for_all(session: Session, ids: set[str], timeout: float) -> dict[str, run_pb2.Run]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Whether any run is left first (a page of one), then the whole page once: a page
        # of 1,000 runs a second cost the server about 5% of its time during a burst.
        if not any(
            list_runs(session, s, limit=1) for s in (run_pb2.Run.PENDING, run_pb2.Run.RUNNING)
        ):
            runs = {
                r.pipeline_logging_id: r for r in list_runs(session) if r.pipeline_logging_id in ids
            }
            if len(runs) == len(ids) and all(r.status in TERMINAL for r in runs.values()):
                return runs
        # Seldom: the results are the server's own timestamps, not when this loop saw them.
        time.sleep(1.0)
    raise TimeoutError(f"{len(ids)} runs did not all end within {timeout:g} s")


def burst_runs(session: Session, count: int, timeout: float) -> LatencyResult:
    fired = fire(session, count)
    runs = wait_for_all(session, {run_id for _, _, run_id in fired}, timeout)
    timings = [Timing(sent, returned, runs[run_id]) for sent, returned, run_id in fired]
    failed = Counter(t.run.error_message for t in timings if t.run.status == run_pb2.Run.FAILED)
    wall = max(epoch(t.run.end_time) for t in timings) - fired[0][0]
    return LatencyResult(f"{count} triggered at once", timings, failed, wall)


def measure_latency(
    args: argparse.Namespace, workspace: Workspace
) -> tuple[list[LatencyResult], list[str]]:
    with contextlib.ExitStack() as resources:
        session = open_session(resources, workspace, "latency", workers=args.workers)
        print(f"running: {args.sequential} sequential runs", file=sys.stderr, flush=True)
        wait_for_run(session, trigger_runs_warmup(session), timeout=60, poll=0.02)
        baseline = sequential_runs(session, args.sequential)
        print(f"running: {args.burst} runs triggered at once", file=sys.stderr, flush=True)
        burst = burst_runs(session, args.burst, timeout=args.run_timeout)
        return [baseline, burst], session.problems()


def trigger_runs_warmup(session: Session) -> str:
    """One run before the timed ones: the first creates the destination table."""
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(session.channel)
    request = run_request(session.tenant, QUICK, FIRST_DAY - timedelta(days=1000))
    response = stub.RunPipeline(request, timeout=TIMEOUT, metadata=session.tenant.metadata)
    return str(response.pipeline_logging_id)


# --- 3: a 1M-row cost run -------------------------------------------------------------------


def _shifted(stamp: str, days: int) -> str:
    moment = datetime.fromisoformat(stamp) + timedelta(days=days)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def cur_templates(day: date) -> tuple[str, list[tuple[str, str]]]:
    """The sample's header line, and each row as (line-item ID, rest of the CSV line)."""
    with SAMPLE_CUR.open(newline="") as sample:
        reader = csv.DictReader(sample)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if header[0] != CUR_ID:
        raise RuntimeError(f"{SAMPLE_CUR}: the first column is not {CUR_ID}")
    templates = []
    for row in rows:
        days = (day - datetime.fromisoformat(row[CUR_START]).date()).days
        row[CUR_START] = _shifted(row[CUR_START], days)
        row[CUR_END] = _shifted(row[CUR_END], days)
        row[CUR_ACCOUNT] = ACCOUNT_MARK
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow([row[h] for h in header[1:]])
        templates.append((row[CUR_ID], line.getvalue()))
    head = io.StringIO()
    csv.writer(head, lineterminator="\n").writerow(header)
    return head.getvalue(), templates


def write_cur(path: Path, rows: int, day: date, days: int = 1) -> None:
    """`rows` rows: copies of the sample, each with its own line-item IDs and usage account
    (so that no two rows are copies of each other), the usage periods of copy `c` moved to
    `day` + `c % days`."""
    header, templates = cur_templates(day)
    by_day = [templates, *(cur_templates(day + timedelta(days=k))[1] for k in range(1, days))]
    with path.open("w", newline="", buffering=1 << 20) as out:
        out.write(header)
        written, copy = 0, 0
        while written < rows:
            batch = by_day[copy % days][: rows - written]
            account = f"{copy:012d}"
            out.write(
                "".join(
                    f"{item}-{copy:05d},{rest.replace(ACCOUNT_MARK, account)}"
                    for item, rest in batch
                )
            )
            written += len(batch)
            copy += 1


@dataclass(frozen=True)
class RawLoad:
    name: str
    seconds: float
    cpu: float
    rows: int


def raw_load(name: str, source: Path, database: str) -> RawLoad:
    """CREATE TABLE AS SELECT * FROM read_csv(all_varchar) in a fresh DuckDB, timed."""
    with duckdb.connect(database) as db:
        cpu, start = time.process_time(), time.perf_counter()
        db.execute(
            "CREATE TABLE t AS SELECT * FROM read_csv($source, header = true, all_varchar = true)",
            {"source": str(source)},
        )
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        row = db.execute("SELECT count(*) FROM t").fetchone()
    return RawLoad(name, elapsed, cpu, int(row[0]) if row else 0)


@dataclass(frozen=True)
class CostResult:
    rows: int
    file_mib: float
    baselines: list[RawLoad]  # the file-database loads first: the baseline is their mean
    run: run_pb2.Run
    steps: list[run_pb2.RunStep]
    server_cpu: float  # seconds, from the trigger until the run was seen ended
    peak_rss_mib: float

    @property
    def baseline(self) -> float:
        return statistics.mean(b.seconds for b in self.baselines[:2])


def cost_run(session: Session, source: Path, timeout: float) -> tuple[run_pb2.Run, float]:
    """The run once it has ended, and the server's CPU seconds until then."""
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(session.channel)
    request = run_request(session.tenant, COST, CUR_DAY, {"source_uri": str(source)})
    cpu = _cpu_seconds(session.stack.server.pid)
    response = stub.RunPipeline(request, timeout=TIMEOUT, metadata=session.tenant.metadata)
    run = wait_for_run(session, response.pipeline_logging_id, timeout, poll=0.5)
    return run, _cpu_seconds(session.stack.server.pid) - cpu


def write_source(path: Path, rows: int) -> None:
    """Writes the CUR file and flushes it, so that no write-back competes with the loads."""
    print(f"writing {rows:,} CUR rows", file=sys.stderr, flush=True)
    write_cur(path, rows, CUR_DAY)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def raw_file_load(name: str, source: Path, workspace: Workspace) -> RawLoad:
    print(f"running: {name}", file=sys.stderr, flush=True)
    database = workspace.root / "raw.duckdb"
    try:
        return raw_load(name, source, str(database))
    finally:
        database.unlink(missing_ok=True)


def measure_cost(args: argparse.Namespace, workspace: Workspace) -> tuple[CostResult, list[str]]:
    """Raw loads before and after the run (the box is noisy), the run on its own stack."""
    source = workspace.sources / "aws_cur.csv"
    try:
        write_source(source, args.rows)
        before = raw_file_load(
            "baseline: raw DuckDB load, file database, before", source, workspace
        )
        print("running: raw DuckDB load, in memory", file=sys.stderr, flush=True)
        in_memory = raw_load("raw DuckDB load, in memory", source, ":memory:")
        with contextlib.ExitStack() as resources:
            session = open_session(resources, workspace, "cost", workers=args.workers)
            # A tenant's runs read only its own folder of a source root.
            own = workspace.sources / session.tenant.tenant_id / source.name
            own.parent.mkdir()
            source = source.rename(own)
            print("running: aws/cost/cost_usage", file=sys.stderr, flush=True)
            run, cpu = cost_run(session, source, args.run_timeout)
            steps = list_steps(session, run.pipeline_logging_id)
            peak = peak_rss_mib(session.stack.server.pid)
            problems = session.problems()
        after = raw_file_load("baseline: raw DuckDB load, file database, after", source, workspace)
        size = source.stat().st_size / 2**20
    finally:
        source.unlink(missing_ok=True)
    baselines = [before, after, in_memory]
    return CostResult(args.rows, size, baselines, run, steps, cpu, peak), problems


# --- the report -----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:,.0f}"


def render_latency(results: Sequence[LatencyResult]) -> str:
    """p50 / p99 in ms of each interval; the ratio compares sent -> RUNNING medians."""
    baseline = results[0].percentile_ms(Timing.sent_to_running, 50)
    rows = [
        "| scenario | runs | failed | trigger call | sent→RUNNING | returned→RUNNING "
        "| returned→COMPLETE | sent→RUNNING p50, ratio to baseline | wall s | runs/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = r.percentile_ms(Timing.sent_to_running, 50) / baseline
        rows.append(
            f"| {r.name} | {len(r.timings)} | {r.failed.total()} | "
            f"{r.p50_p99(Timing.trigger)} | {r.p50_p99(Timing.sent_to_running)} | "
            f"{r.p50_p99(Timing.returned_to_running)} | "
            f"{r.p50_p99(Timing.returned_to_complete)} | {ratio:,.1f} | {r.wall:.2f} | "
            f"{len(r.timings) / r.wall:,.1f} |"
        )
    return "\n".join(rows)


def render_cost(result: CostResult) -> str:
    baseline = result.baseline
    total = result.run.duration_ms / 1000
    rows = [
        f"{result.rows:,} rows, {result.file_mib:,.0f} MiB CSV; run "
        f"{run_pb2.Run.Status.Name(result.run.status)}"
        f"{': ' + result.run.error_message if result.run.error_message else ''}; "
        f"server CPU {result.server_cpu:.1f} s, server peak RSS (VmHWM) "
        f"{result.peak_rss_mib:,.0f} MiB",
        "",
        "| what | rows | ms | share of run | ratio to baseline (mean of the two) | CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in result.baselines:
        rows.append(
            f"| {b.name} | {b.rows:,} | {_ms(b.seconds)} | | {b.seconds / baseline:.2f} | "
            f"{b.cpu:.1f} |"
        )
    rows.append(
        f"| pipeline run aws/cost/cost_usage (duration_ms) | | {result.run.duration_ms:,} | "
        f"100% | {total / baseline:.2f} | {result.server_cpu:.1f} |"
    )
    for s in result.steps:
        rows.append(
            f"| step {s.step_index} {s.step_name} ({s.step_type}) | {s.rows_processed:,} | "
            f"{s.duration_ms:,} | {s.duration_ms / result.run.duration_ms:.0%} | "
            f"{s.duration_ms / 1000 / baseline:.2f} | |"
        )
    rest = result.run.duration_ms - sum(s.duration_ms for s in result.steps)
    rows.append(
        f"| rest: publish (staged tables → destinations), bookkeeping | | {rest:,} | "
        f"{rest / result.run.duration_ms:.0%} | {rest / 1000 / baseline:.2f} | |"
    )
    return "\n".join(rows)


def describe_machine(args: argparse.Namespace) -> str:
    return (
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"DuckDB {duckdb.__version__}; workers {args.workers}"
    )


def report_problems(failures: Sequence[str], problems: Sequence[str]) -> bool:
    """Prints failures and what the servers logged to stderr; True when any."""
    for line in failures:
        print(line, file=sys.stderr)
    for line in problems[:20]:
        print(f"logged {line}", file=sys.stderr)
    if len(problems) > 20:
        print(f"... and {len(problems) - 20} more logged lines", file=sys.stderr)
    return bool(failures) or bool(problems)


# --- the command ----------------------------------------------------------------------------

PARTS = ("triggers", "latency", "cost")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipelines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    add("--requests", type=int, default=2000, help="1: timed calls per scenario")
    add("--concurrency", type=int, default=4, help="1: client threads")
    add("--warmup", type=int, default=100, help="1: warm-up calls per scenario")
    add("--workers", type=int, default=4, help="2, 3: CONVERGENCE_WORKERS")
    add("--sequential", type=int, default=20, help="2: baseline runs, one at a time")
    add("--burst", type=int, default=100, help="2: runs triggered at once")
    add("--rows", type=int, default=1_000_000, help="3: rows of the generated CUR file")
    add("--run-timeout", type=float, default=300, help="2, 3: seconds to wait for runs")
    add("--output", type=Path, help="also write the markdown tables here")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not set(args.parts) <= set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}")
    if min(args.requests, args.concurrency, args.workers, args.sequential, args.burst) < 1:
        parser.error("counts must be positive")
    if args.sequential + args.burst >= 1000:
        parser.error("--sequential + --burst must stay below 1000 (one page of ListRuns)")
    if args.rows < 1 or args.warmup < 0:
        parser.error("--rows must be positive, --warmup not negative")
    return args


@dataclass
class Report:
    sections: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _triggers(args: argparse.Namespace, workspace: Workspace, report: Report) -> None:
    results, problems = measure_triggers(args, workspace)
    report.sections.append(
        f"## 1. Triggers ({args.requests} per scenario, concurrency {args.concurrency}, "
        f"CONVERGENCE_WORKERS=0)\n\n{render(results)}"
    )
    for r in results:
        report.failures += [f"errors in {r.name!r}: {n} x {m}" for m, n in r.errors.items()]
    report.problems += [f"[triggers] {line}" for line in problems]


def _latency(args: argparse.Namespace, workspace: Workspace, report: Report) -> None:
    results, problems = measure_latency(args, workspace)
    report.sections.append(
        f"## 2. Trigger → RUNNING ({args.workers} workers)\n\n{render_latency(results)}"
    )
    for r in results:
        report.failures += [f"failed runs in {r.name!r}: {n} x {m}" for m, n in r.failed.items()]
    report.problems += [f"[latency] {line}" for line in problems]


def _cost(args: argparse.Namespace, workspace: Workspace, report: Report) -> None:
    result, problems = measure_cost(args, workspace)
    report.sections.append(f"## 3. AWS CUR → FOCUS, one day\n\n{render_cost(result)}")
    if result.run.status != run_pb2.Run.COMPLETE:
        report.failures.append(
            f"the cost run ended {result.run.status}: {result.run.error_message}"
        )
    report.problems += [f"[cost] {line}" for line in problems]


@contextlib.contextmanager
def timed(report: Report) -> Iterator[None]:
    start = time.perf_counter()
    yield
    report.sections.insert(0, f"Total wall time: {time.perf_counter() - start:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    parts = {"triggers": _triggers, "latency": _latency, "cost": _cost}
    report = Report()
    with timed(report), contextlib.ExitStack() as resources:
        workspace = make_workspace(resources)
        for name in args.parts:
            parts[name](args, workspace, report)
    text = "\n\n".join([describe_machine(args), *report.sections])
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 1 if report_problems(report.failures, report.problems) else 0


if __name__ == "__main__":
    sys.exit(main())
