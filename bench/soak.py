"""A memory soak: steady mixed load from 4 tenants; the server's and Envoy's RSS over time.

`python -m bench.soak --minutes 30` starts its own stack (gRPC server + Envoy on loopback
ports the OS picks, the embedded store in a fresh temporary data directory) on the configs
of `bench.pipelines`: the shipped templates plus `test/runs/quick` and the BENCH plan,
whose limits never bind, so nothing is refused. It onboards 4 tenants, then until the
deadline sends about `--rate` requests a second in all. Each tenant's thread, paced, repeats
a cycle of 20 REST calls through Envoy, with its key and one X-User-ID: 1 trigger
(alternately `aws/cost/cost_usage` for a day of 2023-11-01..14 and `test/runs/quick`, each
with a fresh Idempotency-Key; every fourth trigger replays the previous one), 7 GET /health,
4 GetRun and 2 ListRunSteps of one of its 20 latest runs, 3 ListRuns, 2 GetUsage and 1
GetRun of an unknown run (404 expected). Every 15 s another thread triggers a quick run over
direct gRPC and follows it with WatchRun until it ends.

Every 10 s it reads VmRSS of the server and of Envoy from /proc. It reports the RSS 10 s
in, after the warm-up (the first 20% of the run, at least 2 minutes for runs of 10 minutes
or more) and at the end, each of those two the median of the samples over a window (10% of
the run, at least a minute: one sample swings by tens of MiB with the runs in flight), the
peak (VmHWM) and the growth after the warm-up; requests and
errors (any status other than the expected one, or a transport failure: counted, never
raised); the runs; the store's file size at the end; then one JSON line. Like every variable
of this environment, CONVERGENCE_DUCKDB_MEMORY_LIMIT reaches the server (`start_stack`
passes os.environ on). Exit status 0, unless the stack does not start.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import duckdb
import grpc
import httpx

from bench.api_overhead import GRPC_OPTIONS, TIMEOUT, _describe, log_problems, log_sizes
from bench.pipelines import (
    QUICK,
    Tenant,
    make_workspace,
    memory_mib,
    onboard_tenant,
    peak_rss_mib,
    run_request,
    start_pipeline_stack,
)
from convergence.v1 import (
    pipeline_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
)
from convergence_server.stack import Stack, StackError

TENANTS = 4
SAMPLE_EVERY = 10.0  # seconds between RSS samples
WATCH_EVERY = 15.0  # seconds between gRPC trigger + WatchRun pairs
AWS_DAYS = [date(2023, 11, 1) + timedelta(days=i) for i in range(14)]  # the AWS sample's days
MEMORY_LIMIT = "CONVERGENCE_DUCKDB_MEMORY_LIMIT"


# --- counting -----------------------------------------------------------------------------


@dataclass
class Tally:
    """Calls and errors by kind, shared by the load threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, op: str, error: str = "") -> None:
        with self.lock:
            self.calls[op] += 1
            if error:
                self.errors[f"{op}: {error}"] += 1

    def totals(self) -> tuple[int, int]:
        with self.lock:
            return self.calls.total(), self.errors.total()


def _reason(response: httpx.Response) -> str:
    """A failed response's status and message (never its request id: errors are grouped)."""
    try:
        message = str(response.json().get("message", ""))
    except (ValueError, AttributeError):
        message = response.text
    return f"HTTP {response.status_code} {message[:100]}"


# --- the load -----------------------------------------------------------------------------


class TenantLoad:
    """One tenant's paced REST cycle, until the deadline."""

    def __init__(
        self, url: str, tenant: Tenant, tally: Tally, deadline: float, interval: float
    ) -> None:
        self.tenant, self.tally, self.deadline, self.interval = tenant, tally, deadline, interval
        self.client = httpx.Client(
            base_url=url,
            headers={"X-API-Key": tenant.api_key, "X-User-ID": f"soak_{tenant.tenant_id}"},
            timeout=TIMEOUT,
            trust_env=False,
        )
        self.runs: deque[str] = deque(maxlen=20)
        self.triggers = 0
        self.last_trigger: tuple[str, dict[str, str], dict[str, str]] | None = None

    def call(
        self,
        op: str,
        method: str,
        path: str,
        expect: int = 200,
        json: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response | None:
        try:
            response = self.client.request(method, path, json=json, headers=headers)
        except httpx.HTTPError as exc:
            self.tally.add(op, f"{type(exc).__name__}: {exc}")
            return None
        self.tally.add(op, "" if response.status_code == expect else _reason(response))
        return response if response.status_code == expect else None

    def trigger(self) -> None:
        self.triggers += 1
        if self.last_trigger is not None and self.triggers % 4 == 0:
            path, body, headers = self.last_trigger  # a replay: the same run comes back
        else:
            template = "aws/cost/cost_usage" if self.triggers % 2 else "test/runs/quick"
            path = f"/api/v1/pipelines/run/{self.tenant.tenant_id}/{template}"
            day = AWS_DAYS[self.triggers % len(AWS_DAYS)].isoformat()
            body = {"trigger_by": "soak", "date": day}
            headers = {"Idempotency-Key": uuid.uuid4().hex}
            self.last_trigger = (path, body, headers)
        response = self.call("POST trigger", "POST", path, json=body, headers=headers)
        if response is not None:
            self.runs.append(str(response.json()["pipeline_logging_id"]))

    def get_run(self) -> None:
        if self.runs:
            self.call("GET run", "GET", f"/api/v1/pipelines/runs/{random.choice(self.runs)}")

    def steps(self) -> None:
        if self.runs:
            run_id = random.choice(self.runs)
            self.call("GET run steps", "GET", f"/api/v1/pipelines/runs/{run_id}/steps")

    def list_runs(self) -> None:
        status = random.choice(("", "&status=COMPLETE"))
        self.call("GET runs", "GET", f"/api/v1/pipelines/runs?limit=20{status}")

    def health(self) -> None:
        self.call("GET /health", "GET", "/health")

    def usage(self) -> None:
        self.call("GET usage", "GET", f"/api/v1/tenants/{self.tenant.tenant_id}/usage")

    def missing(self) -> None:
        self.call("GET unknown run (404)", "GET", f"/api/v1/pipelines/runs/{uuid.uuid4()}", 404)

    def run(self) -> None:
        t, h, r, lr, s, u, m = (
            self.trigger,
            self.health,
            self.get_run,
            self.list_runs,
            self.steps,
            self.usage,
            self.missing,
        )
        cycle = (t, h, r, lr, h, s, r, h, u, m, h, r, lr, h, s, r, h, lr, h, u)
        next_at = time.monotonic()
        with self.client:
            for op in itertools.cycle(cycle):
                now = time.monotonic()
                if now >= self.deadline:
                    return
                time.sleep(max(0.0, next_at - now))
                # Paced from the schedule, but a late call is not made up with a burst.
                next_at = max(next_at, time.monotonic() - self.interval) + self.interval
                try:
                    op()
                except Exception as exc:  # e.g. a 200 whose body is not the documented one
                    self.tally.add(f"client: {op.__name__}", f"{type(exc).__name__}: {exc}")


def watch_loop(
    channel: grpc.Channel, tenants: Sequence[Tenant], tally: Tally, deadline: float
) -> None:
    """Every WATCH_EVERY s: a quick run over gRPC, followed with WatchRun until it ends."""
    pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
    runs = run_service_pb2_grpc.RunServiceStub(channel)
    next_at = time.monotonic() + WATCH_EVERY
    for n in itertools.count():
        if next_at >= deadline:
            return
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += WATCH_EVERY
        tenant = tenants[n % len(tenants)]
        request = run_request(tenant, QUICK, AWS_DAYS[n % len(AWS_DAYS)])
        try:
            run_id = pipelines.RunPipeline(
                request, timeout=TIMEOUT, metadata=tenant.metadata
            ).pipeline_logging_id
        except Exception as exc:
            tally.add("gRPC RunPipeline", _describe(exc))
            continue
        tally.add("gRPC RunPipeline")
        status, error = run_pb2.Run.PENDING, ""
        try:
            watch = run_service_pb2.WatchRunRequest(pipeline_logging_id=run_id)
            for message in runs.WatchRun(watch, timeout=30, metadata=tenant.metadata):
                status = message.run.status
        except Exception as exc:
            error = _describe(exc)
        if not error and status != run_pb2.Run.COMPLETE:
            error = f"the run ended {run_pb2.Run.Status.Name(status)}"
        tally.add("gRPC WatchRun", error)


# --- memory -------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """The process's resident set size now (VmRSS)."""
    return memory_mib(pid, "VmRSS")


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the load started
    server: float  # MiB
    envoy: float

    def of(self, process: str) -> float:
        return self.server if process == "server" else self.envoy


def sample_until(stack: Stack, start: float, duration: float, tally: Tally) -> list[Sample]:
    """A sample every SAMPLE_EVERY s and one at the end; a progress line every minute."""
    times = [
        *itertools.takewhile(lambda t: t < duration, itertools.count(SAMPLE_EVERY, SAMPLE_EVERY)),
        duration,
    ]
    samples = []
    for at in times:
        time.sleep(max(0.0, start + at - time.monotonic()))
        samples.append(Sample(at, rss_mib(stack.server.pid), rss_mib(stack.envoy.pid)))
        if len(samples) % 6 == 0 or at == duration:
            calls, errors = tally.totals()
            print(
                f"[{at / 60:5.1f} min] server {samples[-1].server:,.1f} MiB, envoy "
                f"{samples[-1].envoy:,.1f} MiB; {calls:,} requests, {errors:,} errors",
                file=sys.stderr,
                flush=True,
            )
    return samples


# --- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    minutes: float
    warmup: float  # seconds
    samples: list[Sample]
    server_peak: float
    envoy_peak: float
    tally: Tally
    runs: dict[str, int]  # FAILED / PENDING / RUNNING runs at the end, over all tenants
    store_mib: float
    wal_mib: float
    logged: list[str]

    @property
    def window(self) -> float:
        """Seconds of samples each RSS figure after the warm-up is the median of: a single
        sample swings by tens of MiB with the runs in flight."""
        return max(60.0, 0.1 * self.minutes * 60)

    def median(self, process: str, start: float, stop: float) -> float:
        values = [s.of(process) for s in self.samples if start <= s.at <= stop]
        return statistics.median(values or [self.samples[-1].of(process)])

    def warm(self, process: str) -> float:
        """After the warm-up: the median over the window that follows it."""
        return self.median(process, self.warmup, self.warmup + self.window)

    def end(self, process: str) -> float:
        """At the end: the median over the last window."""
        last = self.samples[-1].at
        return self.median(process, last - self.window, last)

    def growth(self, process: str) -> float:
        return 100 * (self.end(process) - self.warm(process)) / self.warm(process)

    def markdown(self) -> str:
        first, window = self.samples[0], self.window / 60
        calls, errors = self.tally.totals()
        rows = [
            f"| process | RSS at {first.at:.0f} s, MiB "
            f"| after warm-up (median, {self.warmup / 60:.0f}-{self.warmup / 60 + window:.0f} min) "
            f"| end (median, last {window:.0f} min) | peak (VmHWM), MiB | growth after warm-up |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, process, peak in (
            ("server", "server", self.server_peak),
            ("envoy", "envoy", self.envoy_peak),
        ):
            rows.append(
                f"| {name} | {first.of(process):,.1f} | {self.warm(process):,.1f} | "
                f"{self.end(process):,.1f} | {peak:,.1f} | {self.growth(process):+.1f}% |"
            )
        rows += ["", "| call | requests | errors |", "|---|---:|---:|"]
        for op, count in sorted(self.tally.calls.items()):
            failed = sum(n for e, n in self.tally.errors.items() if e.startswith(f"{op}: "))
            rows.append(f"| {op} | {count:,} | {failed:,} |")
        rows.append(f"| **all** | {calls:,} ({calls / self.minutes / 60:.1f}/s) | {errors:,} |")
        runs = ", ".join(f"{n} {status}" for status, n in self.runs.items())
        rows += [
            "",
            f"Runs at the end: {runs}. Store at the end: convergence.duckdb "
            f"{self.store_mib:,.2f} MiB, WAL {self.wal_mib:,.2f} MiB. "
            f"Warnings/errors the server or Envoy logged: {len(self.logged)}.",
        ]
        return "\n".join(rows)

    def summary(self) -> dict[str, object]:
        first = self.samples[0]
        calls, errors = self.tally.totals()

        def rss(process: str, peak: float) -> dict[str, float | None]:
            values = (first.of(process), self.warm(process), self.end(process), peak)
            return dict(zip(("start", "warm", "end", "peak"), map(_round, values), strict=True))

        return {
            "minutes": self.minutes,
            "warmup_s": self.warmup,
            "server_rss_mib": rss("server", self.server_peak),
            "server_growth_after_warmup_pct": _round(self.growth("server")),
            "envoy_rss_mib": rss("envoy", self.envoy_peak),
            "envoy_growth_after_warmup_pct": _round(self.growth("envoy")),
            "requests": calls,
            "errors": errors,
            "runs": self.runs,
            "store_mib": round(self.store_mib, 2),
            "wal_mib": round(self.wal_mib, 2),
            "logged_problems": len(self.logged),
            "duckdb_memory_limit": os.environ.get(MEMORY_LIMIT, ""),
        }


def count_runs(url: str, tenants: Sequence[Tenant]) -> dict[str, int]:
    """Runs by status over all tenants (one page of up to 1000 each); -1 when unreadable."""
    counts: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=TIMEOUT, trust_env=False) as client:
        for status in ("COMPLETE", "FAILED", "PENDING", "RUNNING"):
            try:
                counts[status] = sum(
                    len(
                        client.get(
                            f"/api/v1/pipelines/runs?limit=1000&status={status}",
                            headers={"X-API-Key": t.api_key},
                        ).json()["runs"]
                    )
                    for t in tenants
                )
            except (httpx.HTTPError, ValueError, KeyError):
                counts[status] = -1
    return counts


def limit_text() -> str:
    return os.environ.get(MEMORY_LIMIT, "(unset: the server's default)")


def _round(value: float) -> float | None:
    """For JSON, which has no NaN (a process that had gone when sampled)."""
    return None if math.isnan(value) else round(value, 1)


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20 if path.exists() else 0.0


# --- the command --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=30, help="length of the load")
    parser.add_argument("--rate", type=float, default=28, help="REST requests a second, in all")
    args = parser.parse_args(argv)
    if args.minutes * 60 < 2 * SAMPLE_EVERY or args.rate <= 0:
        parser.error(f"--minutes must cover {2 * SAMPLE_EVERY:g} s at least, --rate be positive")
    return args


def soak(args: argparse.Namespace, stack: Stack, tenants: list[Tenant], log_dir: Path) -> Report:
    tally = Tally()
    duration = args.minutes * 60
    warmup = max(0.2 * duration, 120.0 if args.minutes >= 10 else 0.0)
    marks = log_sizes(log_dir)
    start = time.monotonic()
    deadline = start + duration
    loads: list[Callable[[], None]] = [
        TenantLoad(stack.http_url, t, tally, deadline, TENANTS / args.rate).run for t in tenants
    ]
    with grpc.insecure_channel(stack.grpc_target, options=GRPC_OPTIONS) as channel:
        loads.append(lambda: watch_loop(channel, tenants, tally, deadline))
        threads = [threading.Thread(target=load, daemon=True) for load in loads]
        for thread in threads:
            thread.start()
        samples = sample_until(stack, start, duration, tally)
        for thread in threads:
            thread.join(timeout=60)
    database = stack.run_dir.parent / "convergence.duckdb"
    return Report(
        minutes=args.minutes,
        warmup=warmup,
        samples=samples,
        server_peak=peak_rss_mib(stack.server.pid),
        envoy_peak=peak_rss_mib(stack.envoy.pid),
        tally=tally,
        runs=count_runs(stack.http_url, tenants),
        store_mib=_mib(database),
        wal_mib=_mib(database.with_name(database.name + ".wal")),
        logged=log_problems(log_dir, marks),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as resources:
        try:
            workspace = make_workspace(resources)
            stack = start_pipeline_stack(resources, workspace, "soak", workers=4)
            tenants = [onboard_tenant(stack.http_url) for _ in range(TENANTS)]
        except (StackError, RuntimeError, httpx.HTTPError, OSError) as exc:
            print(f"the stack did not start: {exc}", file=sys.stderr)
            return 1
        print(
            f"soak: {args.minutes:g} min, {TENANTS} tenants, ~{args.rate:g} REST req/s; "
            f"server pid {stack.server.pid}, envoy pid {stack.envoy.pid}; "
            f"{MEMORY_LIMIT}={limit_text()}",
            file=sys.stderr,
            flush=True,
        )
        report = soak(args, stack, tenants, workspace.root / "soak" / "logs")
    print(
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, grpcio {grpc.__version__}, "
        f"httpx {httpx.__version__}, DuckDB {duckdb.__version__}; {MEMORY_LIMIT}="
        f"{limit_text()}\n\n{report.markdown()}"
    )
    for error, count in report.tally.errors.most_common():
        print(f"error: {count} x {error}")
    for line in report.logged[:10]:
        print(f"logged {line[:300]}")
    if len(report.logged) > 10:
        print(f"... and {len(report.logged) - 10} more logged lines")
    print(json.dumps(report.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
