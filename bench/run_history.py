"""Reads over a large run history on the embedded store: GetRun's lookup and ListRuns pages,
first and deep, with 1M runs stored for one tenant (and more for others).

`python -m bench.run_history [--runs 1000000] [--others 1000000] [--calls 200]` builds a
DuckDB store in a temporary folder (the runs are inserted by SQL, newest last, as the
service appends them), then, through the storage port as the domain calls it:

- baseline: `ping` (a `SELECT 1` round trip), the adapter's own floor;
- get run: `get_run` of a random stored run of the tenant;
- list runs, first page: `list_runs`, 50 of the tenant's newest runs;
- list runs, 10,000 deep: the page after the 10,000th newest run (its page token's cursor);
- list runs, 50% deep: the page after the middle run;
- trigger: `create_run` of a PENDING run for the tenant (an admission against its limits;
  the store counts the tenant's runs in the file at its first admission, printed apart,
  and from memory after).

Prints the mean, p50 and p99 in ms of each, and their ratio to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.records import RunCursor, RunFilter, RunLimits
from tests.test_store_contract import new_run

TENANT = "bench_history"
PAGE = 50


def fill(path: Path, runs: int, others: int) -> None:
    """`runs` ended runs of TENANT and `others` of 1,000 other tenants, interleaved in time
    (a run a second from 2025-01-01), inserted in creation order."""
    total = runs + others
    with duckdb.connect(str(path)) as db:
        db.execute(
            f"""
            INSERT INTO tenants.tenant_pipeline_runs (
              pipeline_logging_id, pipeline_id, tenant_id, status, trigger_type, trigger_by,
              parameters, created_at, start_time, end_time, duration_ms, provider, domain,
              template, attempt, warnings)
            SELECT uuid()::VARCHAR, 'p-test-runs-quick',
              -- exactly `runs` of them the tenant's, evenly spread
              CASE WHEN (i * {runs}) // {total} != ((i - 1) * {runs}) // {total}
                   THEN '{TENANT}' ELSE 'other_' || (i % 1000)::VARCHAR END,
              'COMPLETE', 'manual', 'api', '{{"date": "2025-01-01"}}',
              TIMESTAMP '2025-01-01' + to_seconds(i), TIMESTAMP '2025-01-01' + to_seconds(i),
              TIMESTAMP '2025-01-01' + to_seconds(i + 1), 1000, 'test', 'runs', 'quick', 1, 0
            FROM range(1, {total} + 1) AS t(i)
            """
        )
        stored = db.execute(
            "SELECT count(*) FROM tenants.tenant_pipeline_runs WHERE tenant_id = ?", [TENANT]
        ).fetchone()
        print(f"stored: {total:,} runs, {stored[0] if stored else 0:,} of {TENANT}")


def cursor_at(path: Path, depth: int) -> RunCursor:
    with duckdb.connect(str(path), read_only=True) as db:
        row = db.execute(
            "SELECT created_at, pipeline_logging_id FROM tenants.tenant_pipeline_runs "
            "WHERE tenant_id = ? ORDER BY created_at DESC, pipeline_logging_id DESC "
            "LIMIT 1 OFFSET ?",
            [TENANT, depth - 1],
        ).fetchone()
    assert row is not None
    return RunCursor(row[0].replace(tzinfo=UTC), row[1])


def run_ids(path: Path, n: int) -> list[str]:
    with duckdb.connect(str(path), read_only=True) as db:
        rows = db.execute(
            "SELECT pipeline_logging_id FROM tenants.tenant_pipeline_runs "
            "WHERE tenant_id = ? ORDER BY hash(pipeline_logging_id) LIMIT ?",
            [TENANT, n],
        ).fetchall()
    return [r[0] for r in rows]


async def _time(n: int, op: Callable[[int], Awaitable[object]]) -> list[float]:
    for i in range(3):
        await op(i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await op(i)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def measure(path: Path, calls: int, runs: int) -> dict[str, list[float]]:
    ids = run_ids(path, calls + 3)
    random.Random(7).shuffle(ids)
    deep = cursor_at(path, min(10_000, runs))
    middle = cursor_at(path, max(1, runs // 2))
    store = DuckDBStore.open(path)
    where = RunFilter(TENANT)
    try:
        results = {"baseline: ping (SELECT 1)": await _time(calls, lambda i: store.ping())}

        async def get(i: int) -> None:
            assert await store.get_run(TENANT, ids[i]) is not None

        results["get run"] = await _time(calls, get)
        results[f"list runs, first page of {PAGE}"] = await _time(
            calls, lambda i: store.list_runs(where, None, PAGE)
        )
        results["list runs, page 10,000 deep"] = await _time(
            calls, lambda i: store.list_runs(where, deep, PAGE)
        )
        results["list runs, page 50% deep"] = await _time(
            calls, lambda i: store.list_runs(where, middle, PAGE)
        )
        started = time.perf_counter()
        await trigger(store)
        print(f"first trigger (counts read from the file): {time.perf_counter() - started:.3f} s")
        results["trigger"] = await _time(calls, lambda i: trigger(store))
    finally:
        await store.close()
    return results


async def trigger(store: DuckDBStore) -> None:
    now = datetime.now(UTC)
    admission = await store.create_run(
        new_run(TENANT, now), now, RunLimits(daily=10**9, concurrent=10**9)
    )
    assert admission.created


def report(results: dict[str, list[float]]) -> None:
    base = statistics.mean(next(iter(results.values())))
    print("| operation | n | mean ms | p50 ms | p99 ms | ratio to baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for op, samples in results.items():
        mean = statistics.mean(samples)
        p99 = statistics.quantiles(samples, n=100)[98]
        print(
            f"| {op} | {len(samples)} | {mean:.2f} | {statistics.median(samples):.2f} "
            f"| {p99:.2f} | {mean / base:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="runs of the tenant")
    parser.add_argument("--others", type=int, default=1_000_000, help="runs of other tenants")
    parser.add_argument("--calls", type=int, default=200, help="calls per operation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convergence-bench-") as tmp:
        path = Path(tmp) / "store.duckdb"
        asyncio.run(DuckDBStore.open(path).close())  # the schema, by the store's migrations
        started = time.perf_counter()
        fill(path, args.runs, args.others)
        print(f"filled in {time.perf_counter() - started:.0f} s ({datetime.now(UTC):%H:%M} UTC)")
        report(asyncio.run(measure(path, args.calls, args.runs)))


if __name__ == "__main__":
    main()
