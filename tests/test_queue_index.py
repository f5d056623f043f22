"""The embedded store claims runs in the fair queue's order from memory (`QueueIndex`), and
admits them against counts kept in memory: after every change of seeded random histories
(runs queued with equal and out-of-order creation times, claimed, ended, cancelled, handed
back; the store reopened; the index dropped), the run it claims is the one the fair-queue
query (`rows.FAIR_QUEUE`) picks from the database, and each admission is answered as the
counts queried from the database say."""

from __future__ import annotations

import asyncio
import collections
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from convergence_server.storage import duckdb_runs
from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.queue_index import QueueIndex
from convergence_server.storage.records import Admission, RunFilter, RunLimits, RunRecord
from tests.test_store_contract import new_run, tenant

BASE = datetime(2026, 3, 1, 12, tzinfo=UTC)
STEPS = 120


def query_choice(store: DuckDBStore) -> str | None:
    """The run the fair-queue query would claim now."""

    def choose(cur: object) -> str | None:
        row = cur.execute(duckdb_runs._NEXT_RUN).fetchone()  # type: ignore[attr-defined]
        return None if row is None else str(row[0])

    return asyncio.run(store._call(choose))  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(4))
def test_claims_follow_the_fair_queue_query(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "store.duckdb"
    store = DuckDBStore.open(path)
    tenants = [tenant(store) for _ in range(4)]
    running: list[RunRecord] = []
    pending: list[RunRecord] = []
    clock = BASE
    from_memory = 0
    try:
        for _ in range(STEPS):
            clock += timedelta(seconds=rng.choice([0, 1, 30]))  # equal times happen
            action = rng.choices(
                ["queue", "claim", "end", "cancel", "hand back", "reopen", "forget"],
                weights=[8, 6, 4, 1, 1, 1, 1],
            )[0]
            if action == "queue":
                # Out of order too: a run created before others already queued.
                created = clock - timedelta(seconds=rng.choice([0, 0, 45]))
                run = new_run(rng.choice(tenants), created)
                assert asyncio.run(store.create_run(run, BASE)).created
                pending.append(run)
            elif action == "claim":
                expected = query_choice(store)
                if store._queue.valid:  # what the store claims when its choice is free
                    assert store._queue.next_run() == expected
                    from_memory += 1
                claimed = asyncio.run(store.claim_next_run("worker-q", clock))
                assert (claimed and claimed.pipeline_logging_id) == expected
                if claimed is not None:
                    pending = [r for r in pending if r.pipeline_logging_id != expected]
                    running.append(claimed)
            elif action == "end" and running:
                ended = running.pop(rng.randrange(len(running)))
                status = rng.choice(["COMPLETE", "FAILED"])
                assert asyncio.run(store.finish_run(ended, status, clock)) is not None
            elif action == "cancel" and pending:
                gone = pending.pop(rng.randrange(len(pending)))
                cancel = asyncio.run(
                    store.request_cancel(gone.tenant_id, gone.pipeline_logging_id, clock)
                )
                assert cancel.ended and cancel.run is not None and cancel.run.status == "FAILED"
            elif action == "hand back" and running:
                back = running.pop(rng.randrange(len(running)))
                assert asyncio.run(store.requeue_run(back, clock, count_attempt=False))
                pending.append(back)
            elif action == "reopen":
                asyncio.run(store.close())
                store = DuckDBStore.open(path)
            elif action == "forget":  # as after a change that failed: read again
                store._queue.valid = False
        while (expected := query_choice(store)) is not None:
            claimed = asyncio.run(store.claim_next_run("worker-q", clock))
            assert claimed is not None and claimed.pipeline_logging_id == expected
        assert from_memory >= 10  # the index decided most claims, not the query
    finally:
        asyncio.run(store.close())


def counted(store: DuckDBStore, tenant_id: str, day: datetime) -> tuple[int, int]:
    """The tenant's active runs and its runs created on `day`'s UTC day, by query."""

    def count(cur: object) -> tuple[int, int]:
        active = duckdb_runs.active_runs(cur, tenant_id)  # type: ignore[arg-type]
        row = cur.execute(  # type: ignore[attr-defined]
            f"SELECT COUNT(*) FROM {duckdb_runs.RUNS} WHERE tenant_id = ? "
            "AND CAST(created_at AS DATE) = ?",
            [tenant_id, day.date()],
        ).fetchone()
        return active, int(row[0])

    return asyncio.run(store._call(count))  # type: ignore[arg-type]


async def admit_together(
    store: DuckDBStore, batch: list[RunRecord], limits: RunLimits
) -> list[Admission]:
    """Triggers that arrive together: admitted in one group commit, in this order."""
    return await asyncio.gather(*(store.create_run(r, BASE, limits) for r in batch))


@pytest.mark.parametrize("seed", range(4))
def test_admissions_count_as_the_database_does(tmp_path: Path, seed: int) -> None:
    """Admissions check a tenant's active runs and today's runs from memory (the fair queue
    and the store's counts of created runs): after every change of a seeded random history
    (admissions alone and in groups, across midnight, claims, ends, cancels, hand-backs,
    reopening, forgotten counts), each admission is answered as the counts queried from the
    database say, and an ended run leaves the usage row with the queried concurrency."""
    rng = random.Random(seed)
    path = tmp_path / "store.duckdb"
    store = DuckDBStore.open(path)
    tenants = [tenant(store) for _ in range(3)]
    limits = RunLimits(daily=4, concurrent=3)
    running: list[RunRecord] = []
    clock = BASE.replace(hour=20)
    refused: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(STEPS):
            clock += timedelta(minutes=rng.choice([0, 20, 60]))  # midnight comes
            action = rng.choices(
                ["admit", "group", "claim", "end", "cancel", "hand back", "reopen", "forget"],
                weights=[6, 3, 5, 5, 2, 1, 1, 1],
            )[0]
            if action in ("admit", "group"):
                batch = [new_run(rng.choice(tenants), clock) for _ in range(rng.randint(1, 5))]
                batch = batch[:1] if action == "admit" else batch
                expected = []
                counts = {t: list(counted(store, t, clock)) for t in tenants}
                for run in batch:
                    active, today = counts[run.tenant_id]
                    if today >= limits.daily:
                        expected.append("daily")
                    elif active >= limits.concurrent:
                        expected.append("concurrent")
                    else:
                        expected.append("")
                        counts[run.tenant_id] = [active + 1, today + 1]

                answers = asyncio.run(admit_together(store, batch, limits))
                assert [a.refused for a in answers] == expected
                refused.update(a.refused for a in answers if a.refused)
            elif action == "claim":
                claimed = asyncio.run(store.claim_next_run("worker-c", clock))
                if claimed is not None:
                    running.append(claimed)
            elif action in ("end", "cancel"):
                gone = None
                if action == "end" and running:
                    ended = running.pop(rng.randrange(len(running)))
                    gone = asyncio.run(store.finish_run(ended, "COMPLETE", clock))
                elif action == "cancel":
                    waiting = [
                        r
                        for t in tenants
                        for r in asyncio.run(
                            store.list_runs(RunFilter(tenant_id=t, status="PENDING"), None, 5)
                        )
                    ]
                    if waiting:
                        victim = rng.choice(waiting)
                        gone = asyncio.run(
                            store.request_cancel(
                                victim.tenant_id, victim.pipeline_logging_id, clock
                            )
                        ).run
                if gone is not None:
                    usage = asyncio.run(store.usage(gone.tenant_id, clock.date())).row
                    active, _ = counted(store, gone.tenant_id, clock)
                    assert usage is not None and usage.concurrent_pipelines_running == active
            elif action == "hand back" and running:
                back = running.pop(rng.randrange(len(running)))
                assert asyncio.run(store.requeue_run(back, clock, count_attempt=False))
            elif action == "reopen":
                asyncio.run(store.close())
                store = DuckDBStore.open(path)
            elif action == "forget":  # as after a change that failed: counted again
                store._queue.valid = False
                store._created.clear()
        assert refused["daily"] >= 3 and refused["concurrent"] >= 3  # both limits were met
    finally:
        asyncio.run(store.close())


def test_reports_of_one_run_out_of_order_are_kept_or_make_the_index_read_again() -> None:
    """A claim by the fair-queue query may report a new run before its admission does: the
    claim's state is the newer, and kept. Two other changes of one run that overlap (a
    cancel and a requeue) may have committed in either order: the index is read again."""
    made = new_run("t1", BASE)
    claimed = replace(made, status="RUNNING", worker_id="w")
    index = QueueIndex()
    assert index.load(index.mark(), [], [])
    with index.changing(creates=True) as admission:
        with index.changing() as claim:
            index.apply(claim, claimed)
        index.apply(admission, made)
    assert index.valid and index.active("t1") == 1 and index.next_run() is None
    second = new_run("t1", BASE + timedelta(seconds=1))  # reported in order, during the claim
    with index.changing() as claim:
        with index.changing(creates=True) as admission:
            index.apply(admission, second)
        index.apply(claim, replace(second, status="RUNNING", worker_id="w"))
    assert index.valid and index.active("t1") == 2 and index.next_run() is None

    run_id = made.pipeline_logging_id
    with index.changing((run_id,)) as cancel:
        with index.changing((run_id,)) as requeue:
            index.apply(requeue, made)
        index.apply(cancel, claimed)
    assert not index.valid
