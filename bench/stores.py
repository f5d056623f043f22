"""What each storage adapter's operations cost: trigger (admission), get run, list runs.

`make bench` runs `python -m bench.stores`. Both adapters are driven through the storage
port, in this process, as the domain calls them: the embedded store on a temporary DuckDB
file, the BigQuery store with the real google-cloud-bigquery client against the local
emulator (started here on loopback, stopped on the way out). Per adapter, in order:

0. baseline: `ping` (a trivial `SELECT 1` round trip), the adapter's own floor;
1. trigger: `create_run` with limits (one admission transaction: counters, limits,
   idempotency key, PENDING row, usage row);
2. get run: `get_run` of one of those runs;
3. list runs: `list_runs`, one page of 20 of the tenant's runs, newest first;
4. claim + end: `claim_next_run` then `finish_run` (two state changes).

Each operation runs N times one after another (after 3 warm-up calls); the table gives the
mean and p50 in ms and the ratio of the mean to the same adapter's baseline.

Then two bursts of 20 triggers of one tenant, with 2 allowed and with all 20 allowed, and,
on BigQuery, the query jobs that each read integrators poll costs (GetRun, a WatchRun
update: the run and its steps), counted on the client of the replica executing the run
and of another replica, and per call when 20 callers ask for the same run or list at once.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from convergence_server.storage import Store
from convergence_server.storage.bigquery_store import BigQueryStore
from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.records import (
    ApiKeyRecord,
    RunFilter,
    RunLimits,
    RunRecord,
    StepRecord,
    TenantRecord,
)
from tests.bigquery_emulator import PROJECT, start_emulator
from tests.test_store_contract import LONG_AGO, new_run, query_jobs


async def _time(n: int, op: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(3):
        await op()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await op()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def measure(store: Store, n: int) -> dict[str, list[float]]:
    tenant_id = f"bench_{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    await store.create_tenant(
        TenantRecord(tenant_id, "Bench", "bench@example.com", "SCALE", now),
        ApiKeyRecord(uuid.uuid4().hex, tenant_id, b"s", b"h", now),
    )
    limits = RunLimits(daily=1_000_000, concurrent=1_000_000)
    made: list[RunRecord] = []

    async def trigger() -> None:
        run = new_run(tenant_id, key=uuid.uuid4().hex)
        made.append(run)
        await store.create_run(run, LONG_AGO, limits)

    async def claim_and_end() -> None:
        run = await store.claim_next_run("bench-worker", datetime.now(UTC))
        assert run is not None
        await store.finish_run(run, "COMPLETE", datetime.now(UTC))

    results = {"baseline: ping (SELECT 1)": await _time(n, store.ping)}
    results["trigger (create_run)"] = await _time(n, trigger)
    last = made[-1].pipeline_logging_id
    results["get run"] = await _time(n, lambda: store.get_run(tenant_id, last))
    results["list runs (page of 20)"] = await _time(
        n, lambda: store.list_runs(RunFilter(tenant_id), None, 20)
    )
    results["claim + end (2 state changes)"] = await _time(n, claim_and_end)
    return results


async def burst(store: Store, size: int, concurrent: int) -> tuple[list[float], int]:
    """`size` triggers of one new tenant at once, `concurrent` of them allowed: each one's
    latency in ms, and how many were admitted."""
    tenant_id = f"burst_{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    await store.create_tenant(
        TenantRecord(tenant_id, "Bench", "bench@example.com", "STARTER", now),
        ApiKeyRecord(uuid.uuid4().hex, tenant_id, b"s", b"h", now),
    )
    limits = RunLimits(daily=1_000, concurrent=concurrent)

    async def one() -> tuple[float, bool]:
        start = time.perf_counter()
        admission = await store.create_run(new_run(tenant_id), LONG_AGO, limits)
        return (time.perf_counter() - start) * 1000, admission.created

    answers = await asyncio.gather(*(one() for _ in range(size)))
    return [ms for ms, _ in answers], sum(created for _, created in answers)


async def jobs_per_read(executing: Store, other: Store, n: int = 5) -> dict[str, float]:
    """Query jobs per call of GetRun and of a WatchRun update (`run_with_steps`)
    of one run, on `executing` (which claims it) and on `other`, over the run's life; of
    GetUsage (`usage`: the day's row, the runs in use, the team); per
    cancel check (as the executor makes between steps) and heartbeat of the executing
    replica; and per call of GetRun and ListRuns when `4 * n` callers ask at once (they
    share query jobs: `storage/shared_reads.py`)."""
    tenant_id = f"jobs_{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    await executing.create_tenant(
        TenantRecord(tenant_id, "Bench", "bench@example.com", "SCALE", now),
        ApiKeyRecord(uuid.uuid4().hex, tenant_id, b"s", b"h", now),
    )
    made = new_run(tenant_id)
    run_id = made.pipeline_logging_id
    await executing.create_run(made, LONG_AGO, RunLimits(daily=10, concurrent=10))
    counts: dict[str, float] = {}

    async def count(label: str, store: Store, read: Callable[[], Awaitable[object]]) -> None:
        with query_jobs(store) as jobs:
            for _ in range(n):
                await read()
        counts[label] = len(jobs) / n

    async def together(label: str, read: Callable[[], Awaitable[object]], callers: int) -> None:
        with query_jobs(other) as jobs:
            await asyncio.gather(*(read() for _ in range(callers)))
        counts[f"{label}, {callers} callers at once, any replica"] = len(jobs) / callers

    async def update(store: Store) -> None:
        await store.run_with_steps(tenant_id, run_id)

    await count(
        "GetRun of a PENDING run, any replica", other, lambda: other.get_run(tenant_id, run_id)
    )
    await together("GetRun of a PENDING run", lambda: other.get_run(tenant_id, run_id), 4 * n)
    today = now.date()
    await count("GetUsage, any replica", other, lambda: other.usage(tenant_id, today))
    listed = RunFilter(tenant_id)
    await together("ListRuns, first page", lambda: other.list_runs(listed, None, 50), 4 * n)
    claimed = await executing.claim_next_run("bench-worker", now)
    assert claimed is not None and claimed.pipeline_logging_id == run_id
    # Its first step, as the executor writes it; the executing replica then reads once
    # what the attempt had before its claim, and answers the rest from memory.
    await executing.save_step(
        StepRecord(
            str(uuid.uuid4()),
            run_id,
            made.pipeline_id,
            tenant_id,
            "first",
            "query",
            0,
            "RUNNING",
            datetime.now(UTC),
            run_attempt=claimed.attempt,
        )
    )
    await executing.list_steps(tenant_id, run_id)
    for name, store in (("executing replica", executing), ("another replica", other)):
        await count(
            f"GetRun of a RUNNING run, {name}", store, lambda s=store: s.get_run(tenant_id, run_id)
        )
        await count(f"WatchRun update of a RUNNING run, {name}", store, lambda s=store: update(s))
    await count(
        "cancel check at a step boundary, executing replica",
        executing,
        lambda: executing.cancel_requested(claimed),
    )
    await count(
        "heartbeat (any number of runs), executing replica",
        executing,
        lambda: executing.heartbeat([run_id], "bench-worker"),
    )
    await executing.finish_run(claimed, "COMPLETE", datetime.now(UTC))
    for name, store in (("executing replica", executing), ("another replica", other)):
        await count(
            f"GetRun of an ended run, {name}", store, lambda s=store: s.get_run(tenant_id, run_id)
        )
    return counts


def report_jobs(counts: dict[str, float]) -> None:
    print("\nbigquery: query jobs per call\n")
    print("| read | query jobs per call |")
    print("|---|---:|")
    for label, jobs in counts.items():
        print(f"| {label} | {jobs:g} |")


def report_burst(name: str, samples: list[float], admitted: int, concurrent: int) -> None:
    p99 = statistics.quantiles(samples, n=100)[98]
    print(
        f"\n{name}: a burst of {len(samples)} triggers of one tenant, {concurrent} allowed: "
        f"{admitted} admitted; latency p50 {statistics.median(samples):.0f} ms, "
        f"p99 {p99:.0f} ms, max {max(samples):.0f} ms"
    )


def report(name: str, results: dict[str, list[float]]) -> None:
    base = statistics.mean(next(iter(results.values())))
    print(f"\n{name}\n")
    print("| operation | n | mean ms | p50 ms | ratio to baseline |")
    print("|---|---:|---:|---:|---:|")
    for op, samples in results.items():
        mean = statistics.mean(samples)
        print(
            f"| {op} | {len(samples)} | {mean:.2f} | {statistics.median(samples):.2f} "
            f"| {mean / base:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedded", type=int, default=200, help="calls per embedded op")
    parser.add_argument("--bigquery", type=int, default=15, help="calls per BigQuery op")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convergence-bench-") as tmp:
        embedded = DuckDBStore.open(Path(tmp) / "store.duckdb")
        try:
            report("embedded (DuckDB file)", asyncio.run(measure(embedded, args.embedded)))
            for allowed in (2, 20):
                report_burst("embedded", *asyncio.run(burst(embedded, 20, allowed)), allowed)
        finally:
            asyncio.run(embedded.close())
        emulator = start_emulator(Path(tmp))
        try:
            store = BigQueryStore.open(PROJECT, "US", "bench_", emulator.endpoint)
            try:
                report("bigquery (local emulator)", asyncio.run(measure(store, args.bigquery)))
                for allowed in (2, 20):
                    report_burst("bigquery", *asyncio.run(burst(store, 20, allowed)), allowed)
            finally:
                asyncio.run(store.close())
            pair = [
                BigQueryStore.open(PROJECT, "US", "bench_jobs_", emulator.endpoint) for _ in "ab"
            ]
            try:
                report_jobs(asyncio.run(jobs_per_read(*pair)))
            finally:
                for store in pair:
                    asyncio.run(store.close())
        finally:
            emulator.stop()


if __name__ == "__main__":
    main()
