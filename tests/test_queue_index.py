"""The embedded store claims runs in the fair queue's order from memory (`QueueIndex`): after
every change of a seeded random history (runs queued with equal and out-of-order creation
times, claimed, ended, cancelled, handed back; the store reopened; the index dropped), the
run it claims is the one the fair-queue query (`rows.FAIR_QUEUE`) picks from the database."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from convergence_server.storage import duckdb_runs
from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.records import RunRecord
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
                cancelled = asyncio.run(
                    store.request_cancel(gone.tenant_id, gone.pipeline_logging_id, clock)
                )
                assert cancelled is not None and cancelled.status == "FAILED"
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
