"""What starting every tenant's due schedule costs: one operator-wide trigger against one
manual trigger per tenant, in the same run, on the same stack.

`make bench` runs `python -m bench.scheduler`. On loopback only, on the configs of
`bench.pipelines` (the shipped templates plus `test/runs/quick` and the BENCH plan, whose
limits never bind), it starts one stack (gRPC server + Envoy on ports the OS picks, the
embedded store on a fresh temporary data directory) with:
- `CONVERGENCE_WORKERS=0`: runs stay PENDING, so every figure is admission only (check,
  store the run in the tenant's admission transaction), never execution;
- `CONVERGENCE_CLOCK_OFFSET_FILE`: the server's clock starts at a fixed past instant
  (`BASE`, 10:00 UTC) and is moved an hour on in each round;
- `CONVERGENCE_SCHEDULER_TICK_SECONDS=0` (the built-in ticker off: only the calls below
  start slots) and a fresh `CONVERGENCE_SCHEDULER_TOKEN` for the operator-wide trigger;
- `CONVERGENCE_KEY_CACHE_SECONDS=0`: every call with a tenant's key reads its record, as
  for a tenant whose one trigger an hour finds nothing cached, whatever the setup's timing;
- the open endpoints' limits raised, so that onboarding `--tenants` tenants is not refused.

Setup (not timed): `--threads` threads onboard `--tenants` tenants on BENCH over REST and
give each one schedule of `test/runs/quick` at `0 * * * *` (created at 10:00 UTC).

Then `--rounds` rounds. Each moves the clock 30 s past the next hour (11:00:30, 12:00:30,
...), so that every schedule has exactly one due slot, and measures A, B and B' below (in
the reverse order every other round, so that a drift of the machine's load or the tables'
growth favours neither side). Before each measurement the benchmark waits
`COLD_SECONDS`, longer than the server keeps a tenant's plan, so that neither side finds
the other's reads cached.

Measured, each as wall time on this process's clock and the CPU seconds the server, Envoy
and this client used meanwhile (from Linux's /proc):
- A. one operator-wide trigger: POST /api/v1/scheduler/trigger with `x-scheduler-token`,
  until it returns; it must report exactly one STARTED slot per tenant and as many
  runs, each for the round's slot. A second trigger right after it must start
  nothing (also timed: what a trigger with nothing due costs).
- B. the baseline: one manual trigger per tenant, POST /api/v1/pipelines/run/{tenant}/
  test/runs/quick with that tenant's key, sent by `--threads` threads, each on an httpx
  client of its own, taking the next tenant until none is left; until the last returns,
  each must answer 200. Each tenant gets one run (for a day of its own), as in A.
- B'. the same with an `Idempotency-Key` header: a schedule's run carries its slot's key,
  whose lookup and insert are part of its admission transaction, so B' is the manual
  equivalent of what A admits.
Ratios are baseline (B) seconds / this one's, of the same round.

Every process and file started or written here is stopped or removed on the way out, even
on error. The exit status is 1 when a check failed, a call was refused or a server logged
a warning or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import secrets
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar
from unittest import mock

import httpx

from bench.api_overhead import START_TIMEOUT, TIMEOUT, _cpu_seconds, log_problems, log_sizes
from bench.noisy import loadavg, percentile_ms
from bench.pipelines import QUICK, Tenant, make_workspace, start_pipeline_stack
from convergence_server.stack import Stack

BASE = datetime(2026, 6, 1, 10, 0, 0, tzinfo=UTC)  # the server's clock during setup
CRON = "0 * * * *"
DUE_AFTER = timedelta(seconds=30)  # the server's clock, past the slot, when it is triggered
FIRST_MANUAL_DAY = date(2026, 5, 1)  # B and B' take a day each from here, per round
COLD_SECONDS = 6.0  # longer than PlanBook's 5 s: no tenant's plan is still cached
TRIGGER_TIMEOUT = 300.0  # Envoy's stream_idle_timeout: a silent REST call gets 504 then
RAISED = "1000000000"  # the open endpoints' limits: onboarding is never refused
TRIGGER_PATH = "/api/v1/scheduler/trigger"
APPLICANT = {
    "company_name": "Scheduler Bench Ltd",
    "admin_email": "admin@scheduler.example.com",
    "subscription_plan": "BENCH",
}

Job = TypeVar("Job")
Out = TypeVar("Out")


# --- the stack and its clock ----------------------------------------------------------------


class Clock:
    """The server's clock: the instant written is what it reads at that moment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, instant: datetime) -> None:
        self.path.write_text(instant.isoformat())


@dataclass(frozen=True)
class Bench:
    stack: Stack
    clock: Clock
    token: str
    log_marks: dict[str, int] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.stack.run_dir.parent / "logs"

    def cpu(self) -> CpuSample:
        return CpuSample(
            _cpu_seconds(self.stack.server.pid),
            _cpu_seconds(self.stack.envoy.pid),
            time.process_time(),
        )


def start_bench_stack(resources: contextlib.ExitStack) -> Bench:
    workspace = make_workspace(resources)
    clock = Clock(workspace.root / "clock")
    clock.set(BASE)
    token = secrets.token_hex(24)
    settings = {
        "CONVERGENCE_CLOCK_OFFSET_FILE": str(clock.path),
        "CONVERGENCE_SCHEDULER_TOKEN": token,
        "CONVERGENCE_SCHEDULER_TICK_SECONDS": "0",
        "CONVERGENCE_KEY_CACHE_SECONDS": "0",
        "CONVERGENCE_OPEN_REQUESTS_PER_MINUTE_PER_CLIENT": RAISED,
        "CONVERGENCE_OPEN_REQUESTS_PER_MINUTE": RAISED,
    }
    # `start_stack` passes this process's environment on.
    with mock.patch.dict(os.environ, settings):
        stack = start_pipeline_stack(resources, workspace, "scheduler", workers=0)
    return Bench(stack, clock, token)


# --- CPU and threads ------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the server, Envoy and this process."""

    server: float
    envoy: float
    client: float

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(
            self.server - other.server, self.envoy - other.envoy, self.client - other.client
        )


@dataclass(frozen=True)
class FannedOut(Generic[Out]):
    results: list[Out]  # in the order of the jobs
    latencies: list[float]  # seconds, per job
    seconds: float  # from when every thread was ready until the last job returned
    cpu: CpuSample


def fan_out(
    bench: Bench, jobs: Sequence[Job], threads: int, call: Callable[[httpx.Client, Job], Out]
) -> FannedOut[Out]:
    """`threads` threads, each on a keep-alive httpx client of its own, take the next job
    until none is left; timed from when all are ready until the last call returns."""
    queue = iter(enumerate(jobs))
    taking = threading.Lock()
    results: dict[int, Out] = {}
    latencies: dict[int, float] = {}
    ready = threading.Barrier(threads + 1)

    def worker() -> None:
        with httpx.Client(base_url=bench.stack.http_url, timeout=TIMEOUT, trust_env=False) as http:
            ready.wait(START_TIMEOUT)
            while True:
                with taking:
                    taken = next(queue, None)
                if taken is None:
                    return
                i, job = taken
                sent = time.perf_counter()
                results[i] = call(http, job)
                latencies[i] = time.perf_counter() - sent

    with ThreadPoolExecutor(threads, thread_name_prefix="bench-client") as pool:
        workers = [pool.submit(worker) for _ in range(threads)]
        ready.wait(START_TIMEOUT)
        cpu, start = bench.cpu(), time.perf_counter()
        for done in workers:
            done.result()
        seconds = time.perf_counter() - start
        used = bench.cpu() - cpu
    order = range(len(jobs))
    return FannedOut([results[i] for i in order], [latencies[i] for i in order], seconds, used)


# --- setup ----------------------------------------------------------------------------------


def _checked(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise RuntimeError(f"{what} failed: {response.status_code} {response.text[:500]}")
    body: dict[str, Any] = response.json()
    return body


def onboard_with_schedule(http: httpx.Client, _: int) -> Tenant:
    """A fresh tenant on BENCH, with one schedule of test/runs/quick at the top of each hour."""
    tenant_id = f"sched_{uuid.uuid4().hex[:12]}"
    body = {"tenant_id": tenant_id, **APPLICANT}
    onboarded = _checked(http.post("/api/v1/tenants/onboard", json=body), "onboarding")
    tenant = Tenant(tenant_id, str(onboarded["api_key"]))
    provider, domain, template = QUICK
    schedule = {"provider": provider, "domain": domain, "template": template, "cron": CRON}
    created = _checked(
        http.post("/api/v1/schedules", json=schedule, headers={"X-API-Key": tenant.api_key}),
        "CreateSchedule",
    )
    if created.get("next_slot_time") != _z(slot(0)):
        raise RuntimeError(f"the schedule's next slot is {created.get('next_slot_time')}")
    return tenant


def set_up(bench: Bench, tenants: int, threads: int) -> list[Tenant]:
    print(f"setup: onboarding {tenants} tenants with a schedule each", file=sys.stderr, flush=True)
    onboarded = fan_out(bench, range(tenants), threads, onboard_with_schedule)
    print(f"setup: done in {onboarded.seconds:.1f} s", file=sys.stderr, flush=True)
    return onboarded.results


def slot(round_: int) -> datetime:
    """The one slot of every schedule that is due in round `round_` (from 0)."""
    return BASE + timedelta(hours=round_ + 1)


def _z(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- A: the operator-wide trigger -----------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    name: str
    runs: int  # runs started
    seconds: float
    cpu: CpuSample
    latencies: list[float] = field(default_factory=list)  # per call, for many calls
    response_bytes: int = 0
    problems: list[str] = field(default_factory=list)  # failed checks


def operator_trigger(
    bench: Bench, name: str, tenants: Sequence[Tenant], due: datetime, expected: int
) -> Measured:
    """One POST /api/v1/scheduler/trigger with the operator token; checks that it started
    `expected` runs, one per tenant, each for the slot `due`."""
    print(f"running: {name}", file=sys.stderr, flush=True)
    headers = {"x-scheduler-token": bench.token}
    with httpx.Client(
        base_url=bench.stack.http_url, timeout=TRIGGER_TIMEOUT, trust_env=False
    ) as http:
        http.get("/health").raise_for_status()  # the connection is open before the clock runs
        cpu, start = bench.cpu(), time.perf_counter()
        response = http.post(TRIGGER_PATH, headers=headers, json={})
        seconds = time.perf_counter() - start
        used = bench.cpu() - cpu
    body = _checked(response, name)
    slots = body.get("slots", [])
    started = [s for s in slots if s.get("outcome") == "STARTED"]
    problems = []
    if len(started) != expected or len(body.get("runs", [])) != expected:
        outcomes = Counter(str(s.get("outcome")) for s in slots)
        problems.append(
            f"{name}: expected {expected} STARTED slots and runs, got {len(started)} STARTED "
            f"({dict(outcomes)}) and {len(body.get('runs', []))} runs"
        )
    if expected:
        wanted = {t.tenant_id for t in tenants}
        got = Counter(str(s.get("tenant_id")) for s in started)
        run_ids = {str(s.get("pipeline_logging_id")) for s in started}
        listed = {str(r.get("pipeline_logging_id")) for r in body.get("runs", [])}
        if set(got) != wanted or max(got.values(), default=0) != 1 or run_ids != listed:
            problems.append(f"{name}: not exactly one started run per tenant")
        if {s.get("slot_time") for s in started} != {_z(due)}:
            problems.append(f"{name}: a started slot is not the one at {_z(due)}")
    return Measured(
        name, len(started), seconds, used, response_bytes=len(response.content), problems=problems
    )


# --- B: one manual trigger per tenant -------------------------------------------------------


def manual_trigger(day: date, idempotent: bool) -> Callable[[httpx.Client, Tenant], str]:
    """RunPipeline of test/runs/quick for `day` with the tenant's key; the answer's status
    ("200", or the status and the start of its message), never an exception."""
    provider, domain, template = QUICK

    def call(http: httpx.Client, tenant: Tenant) -> str:
        headers = {"X-API-Key": tenant.api_key}
        if idempotent:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        path = f"/api/v1/pipelines/run/{tenant.tenant_id}/{provider}/{domain}/{template}"
        try:
            response = http.post(
                path, headers=headers, json={"trigger_by": "bench", "date": day.isoformat()}
            )
        except httpx.HTTPError as exc:
            return f"client {type(exc).__name__}"
        if response.status_code != 200:
            return f"{response.status_code} {response.text[:120]}"
        return "200" if response.json().get("status") == "PENDING" else "200 not PENDING"

    return call


def manual_triggers(
    bench: Bench, name: str, tenants: Sequence[Tenant], threads: int, day: date, idempotent: bool
) -> Measured:
    print(f"running: {name}", file=sys.stderr, flush=True)
    sent = fan_out(bench, tenants, threads, manual_trigger(day, idempotent))
    statuses = Counter(sent.results)
    problems = [
        f"{name}: {n} x {status}" for status, n in statuses.most_common() if status != "200"
    ]
    return Measured(name, statuses["200"], sent.seconds, sent.cpu, sent.latencies, 0, problems)


# --- the run --------------------------------------------------------------------------------

OPERATOR, NOTHING_DUE, MANUAL, MANUAL_KEYED = (
    "A. one operator-wide trigger (REST)",
    "A again: nothing due (REST)",
    "baseline B: one manual trigger per tenant (REST)",
    "B'. the same + Idempotency-Key",
)


@dataclass
class Report:
    tenants: int
    threads: int
    setup_seconds: float = 0.0
    rounds: list[list[Measured]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def cool_down() -> None:
    """Lets every plan the server cached expire, so that each measurement starts cold."""
    time.sleep(COLD_SECONDS)


def measure_round(
    bench: Bench, tenants: Sequence[Tenant], threads: int, round_: int
) -> list[Measured]:
    """Moves the clock past the round's slot, then A (and a second trigger), B and B', each
    after a cool-down; every other round in the reverse order, so that a drift of the
    machine's load, or the tables' growth, does not favour one side."""
    due = slot(round_)
    bench.clock.set(due + DUE_AFTER)
    first_day = FIRST_MANUAL_DAY + timedelta(days=2 * round_)

    def operator() -> list[Measured]:
        return [
            operator_trigger(bench, OPERATOR, tenants, due, len(tenants)),
            operator_trigger(bench, NOTHING_DUE, tenants, due, expected=0),
        ]

    def manual(name: str, day: date, idempotent: bool) -> Callable[[], list[Measured]]:
        return lambda: [manual_triggers(bench, name, tenants, threads, day, idempotent)]

    steps = [
        operator,
        manual(MANUAL, first_day, idempotent=False),
        manual(MANUAL_KEYED, first_day + timedelta(days=1), idempotent=True),
    ]
    measured: list[Measured] = []
    print(f"round {round_ + 1}", file=sys.stderr, flush=True)
    for step in steps if round_ % 2 == 0 else reversed(steps):
        cool_down()
        measured += step()
    return measured


def run_all(args: argparse.Namespace) -> Report:
    report = Report(args.tenants, args.threads)
    with contextlib.ExitStack() as resources:
        bench = start_bench_stack(resources)
        started = time.perf_counter()
        tenants = set_up(bench, args.tenants, args.threads)
        report.setup_seconds = time.perf_counter() - started
        bench.log_marks.update(log_sizes(bench.log_dir))
        for round_ in range(args.rounds):
            report.rounds.append(measure_round(bench, tenants, args.threads, round_))
        for measured in (m for round_ in report.rounds for m in round_):
            report.problems += measured.problems
        report.problems += [f"logged {p}" for p in log_problems(bench.log_dir, bench.log_marks)]
    return report


# --- the report -----------------------------------------------------------------------------


def _percentile_ms(latencies: Sequence[float], q: int) -> str:
    return f"{percentile_ms(latencies, q):.1f}" if len(latencies) >= 2 else "—"


def _by_name(measured: Sequence[Measured], name: str) -> Measured:
    return next(m for m in measured if m.name == name)


def render(report: Report) -> str:
    """One row per measurement; ratios are to the baseline (B) of the same round."""
    rows = [
        "| round | scenario | runs started | wall s | runs/s | ratio to baseline "
        "(baseline s / s) | server CPU s | server CPU ms/run | Envoy CPU s | client CPU s "
        "| call p50 / p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for number, measured in enumerate(report.rounds, 1):
        baseline = _by_name(measured, MANUAL)
        for name in (MANUAL, MANUAL_KEYED, OPERATOR, NOTHING_DUE):
            m = _by_name(measured, name)
            rate = f"{m.runs / m.seconds:,.0f}" if m.runs else "—"
            per_run = f"{1000 * m.cpu.server / m.runs:.2f}" if m.runs else "—"
            ratio = f"{baseline.seconds / m.seconds:.2f}" if m.runs else "—"
            calls = (
                f"{_percentile_ms(m.latencies, 50)} / {_percentile_ms(m.latencies, 99)}"
                if m.latencies
                else f"(one call; {m.response_bytes:,} bytes)"
            )
            rows.append(
                f"| {number} | {m.name} | {m.runs:,} | {m.seconds:.2f} | {rate} | {ratio} | "
                f"{m.cpu.server:.2f} | {per_run} | {m.cpu.envoy:.2f} | {m.cpu.client:.2f} | "
                f"{calls} |"
            )
    return "\n".join(rows)


def summary(report: Report) -> str:
    """B / A and B' / A of each round: above 1, the operator-wide trigger was faster."""
    parts = []
    for number, measured in enumerate(report.rounds, 1):
        a = _by_name(measured, OPERATOR).seconds
        b, keyed = (_by_name(measured, n).seconds for n in (MANUAL, MANUAL_KEYED))
        parts.append(f"round {number}: B/A {b / a:.2f}, B'/A {keyed / a:.2f}")
    return "Time of the manual triggers / time of the operator-wide trigger: " + "; ".join(parts)


def describe(report: Report, load_before: str) -> str:
    return (
        f"nproc {os.cpu_count()}, Python {platform.python_version()}, httpx {httpx.__version__}; "
        f"load average {load_before} before, {loadavg()} after. {report.tenants} tenants on "
        f"BENCH, one schedule each (`{CRON}`, one due slot); manual triggers from "
        f"{report.threads} client threads; CONVERGENCE_WORKERS=0 (admission only). "
        f"Setup (not timed): {report.setup_seconds:.0f} s."
    )


# --- the command ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scheduler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--tenants", type=int, default=1000, help="tenants, each with one due schedule")
    add("--threads", type=int, default=16, help="client threads (setup and manual triggers)")
    add("--rounds", type=int, default=2, help="rounds of A, B and B' (one due slot each)")
    add("--output", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if not 1 <= args.tenants <= 10_000 or not 1 <= args.threads <= 256:
        parser.error("--tenants must be 1 to 10000, --threads 1 to 256")
    if not 1 <= args.rounds <= 12:
        parser.error("--rounds must be 1 to 12")
    return args


def _stop_on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: the stack stopped, temporary files removed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_term)
    load_before = loadavg()
    started = time.perf_counter()
    report = run_all(args)
    text = "\n\n".join(
        [
            describe(report, load_before),
            f"Total wall time: {time.perf_counter() - started:.0f} s",
            f"## Starting {report.tenants:,} due schedules\n\n{render(report)}",
            summary(report),
        ]
    )
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    for line in report.problems[:20]:
        print(line[:300], file=sys.stderr)
    if len(report.problems) > 20:
        print(f"... and {len(report.problems) - 20} more", file=sys.stderr)
    unmeasured = any(math.isnan(m.cpu.server) for round_ in report.rounds for m in round_)
    return 1 if report.problems or unmeasured else 0


if __name__ == "__main__":
    sys.exit(main())
