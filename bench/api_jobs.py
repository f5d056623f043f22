"""BigQuery query jobs per API call, through the REST API a customer calls.

`python -m bench.api_jobs` starts, on loopback only, the local BigQuery emulator of the tests
and one stack on it (gRPC server + Envoy, no workers, so that runs stay PENDING; the
configs and the `BENCH` plan of `bench.pipelines`), onboards a tenant, then makes each call
`--repeat` times and counts the jobs the emulator was asked to start meanwhile (its request
log: `jobs.query` and `jobs.insert`). The server's own background reads (the key sync, the
health probe, audit flushes) fall between calls now and then: the table shows the fewest
and the most jobs seen per call; the fewest is the call's own cost. The server has no
workers (no claim poll) and beats once an hour (no recovery reads between calls).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from bench import pipelines
from tests.bigquery_emulator import Emulator, start_emulator
from tests.conftest import new_prefix

JOB_REQUEST = re.compile(rb'"POST /bigquery/v2/projects/[^/]+/(queries|jobs)\?')
SETTLE_SECONDS = 0.5


def jobs_started(emulator_log: Path) -> int:
    return len(JOB_REQUEST.findall(emulator_log.read_bytes()))


def settled(emulator_log: Path) -> int:
    """The count once the emulator's log has not grown for `SETTLE_SECONDS` (at most 10 s)."""
    deadline = time.monotonic() + 10
    count = jobs_started(emulator_log)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_SECONDS)
        now = jobs_started(emulator_log)
        if now == count:
            break
        count = now
    return count


Call = tuple[str, Callable[[], str], Callable[[str], httpx.Response]]


def calls(http: httpx.Client, tenant_id: str) -> list[Call]:
    """The calls measured: a label, what to prepare (not counted), the call."""
    trigger = f"/api/v1/pipelines/run/{tenant_id}/test/runs/quick"

    def new_run() -> str:
        response = http.post(trigger, json={})
        response.raise_for_status()
        return str(response.json()["pipeline_logging_id"])

    run_id = new_run()
    runs = "/api/v1/pipelines/runs"
    tenant = f"/api/v1/tenants/{tenant_id}"
    nothing: Callable[[], str] = lambda: ""  # noqa: E731
    return [
        ("RunPipeline (a new PENDING run)", nothing, lambda _: http.post(trigger, json={})),
        ("GetRun (PENDING)", nothing, lambda _: http.get(f"{runs}/{run_id}")),
        ("ListRuns (first page of 50)", nothing, lambda _: http.get(runs, params={"limit": 50})),
        ("ListRunSteps (a PENDING run)", nothing, lambda _: http.get(f"{runs}/{run_id}/steps")),
        ("ListRunChecks (a PENDING run)", nothing, lambda _: http.get(f"{runs}/{run_id}/checks")),
        ("GetUsage", nothing, lambda _: http.get(f"{tenant}/usage")),
        ("ListMembers", nothing, lambda _: http.get(f"{tenant}/members")),
        ("ListApiKeys", nothing, lambda _: http.get(f"{tenant}/api-keys")),
        ("ListAuditLog", nothing, lambda _: http.get(f"{tenant}/audit-log")),
        ("ListSchedules", nothing, lambda _: http.get("/api/v1/schedules")),
        ("ListPipelines", nothing, lambda _: http.get("/api/v1/pipelines")),
        ("CancelRun (a PENDING run)", new_run, lambda run: http.post(f"{runs}/{run}:cancel")),
    ]


def measure(emulator: Emulator, log: Path, repeat: int) -> list[tuple[str, int, int]]:
    with contextlib.ExitStack() as resources:
        workspace = pipelines.make_workspace(resources)
        stack = pipelines.start_pipeline_stack(
            resources,
            workspace,
            "api-jobs",
            workers=0,
            **{
                **emulator.env(new_prefix()),
                "CONVERGENCE_RUN_HEARTBEAT_SECONDS": "3600",
                "CONVERGENCE_RUN_LEASE_SECONDS": "86400",
            },
        )
        tenant = pipelines.onboard_tenant(stack.http_url)
        headers = {"X-API-Key": tenant.api_key}
        rows = []
        with httpx.Client(base_url=stack.http_url, headers=headers, timeout=300) as http:
            for label, prepare, call in calls(http, tenant.tenant_id):
                counts = []
                for _ in range(repeat):
                    prepared = prepare()
                    before = settled(log)
                    response = call(prepared)
                    if response.status_code != 200:
                        raise RuntimeError(f"{label}: {response.status_code} {response.text}")
                    counts.append(settled(log) - before)
                rows.append((label, min(counts), max(counts)))
        return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_jobs", description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="calls of each kind")
    args = parser.parse_args(argv)
    os.environ["PYTHONUNBUFFERED"] = "1"  # the emulator's request log, line by line
    with tempfile.TemporaryDirectory(prefix="bench-api-jobs-") as tmp:
        emulator = start_emulator(Path(tmp))
        try:
            rows = measure(emulator, Path(tmp) / "emulator.log", args.repeat)
        finally:
            emulator.stop()
    print(f"BigQuery query jobs per API call (REST via Envoy, {args.repeat} calls each)\n")
    print("| call | jobs, fewest | jobs, most |")
    print("|---|---:|---:|")
    for label, fewest, most in rows:
        print(f"| {label} | {fewest} | {most} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
