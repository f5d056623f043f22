"""WatchRun's shared feeds, driven on a real embedded store: a watcher that joins while
another still holds the feed of a run that has just ended gets the end, not a wait; a
watcher that takes its next update after the run ended gets the end too, and so does one
that joins while the read that finds the end is in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convergence_server.domain.runs import RunEvents, RunFeeds, Snapshot
from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.records import ApiKeyRecord, RunLimits, RunRecord, TenantRecord
from tests.test_store_contract import LONG_AGO, new_run

DEADLINE = 60.0  # seconds: a watcher that waits this long has been forgotten
TENANT = "feeds_t"

Scenario = Callable[[DuckDBStore, RunEvents, RunFeeds, RunRecord], Awaitable[None]]


class HeldReads:
    """The store, its feeds' reads of a run held while `release` is clear: a read in
    flight, for as long as the test needs."""

    def __init__(self, store: DuckDBStore) -> None:
        self._store = store
        self.release = asyncio.Event()
        self.release.set()
        self.reading = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def run_with_steps(self, tenant_id: str, run_id: str) -> Any:
        self.reading.set()
        await self.release.wait()
        return await self._store.run_with_steps(tenant_id, run_id)


def play(tmp_path: Path, scenario: Scenario, held: bool = False) -> None:
    """`scenario` on a PENDING run of a fresh store, its changes announced as events; with
    `held`, the feeds read through `HeldReads` (the scenario gets it as `store`)."""

    async def run() -> None:
        store = DuckDBStore.open(tmp_path / "store.duckdb")
        try:
            now = datetime.now(UTC)
            tenant = TenantRecord(TENANT, "Feeds", "ops@feeds.example", "SCALE", now)
            await store.create_tenant(tenant, ApiKeyRecord("k" * 12, TENANT, b"s", b"h", now))
            made = new_run(TENANT)
            await store.create_run(made, LONG_AGO, RunLimits(10, 10))
            events = RunEvents()
            reads: Any = HeldReads(store) if held else store
            feeds = RunFeeds(reads, events, poll_seconds=3600)  # changes come as events
            await scenario(reads, events, feeds, made)
        finally:
            await store.close()

    asyncio.run(run())


async def watch_then_cancel(
    store: DuckDBStore, events: RunEvents, feeds: RunFeeds, run: RunRecord
) -> AsyncGenerator[Snapshot, None]:
    """A watcher of the PENDING run, after its first update; then the run is ended (FAILED)
    and that announced."""
    stream = feeds.follow(TENANT, run.pipeline_logging_id)
    snapshot = await asyncio.wait_for(anext(stream), DEADLINE)
    assert snapshot[0].status == "PENDING"
    await store.request_cancel(TENANT, run.pipeline_logging_id, datetime.now(UTC))
    events.publish(run.pipeline_logging_id)
    return stream


async def assert_ended(*streams: AsyncGenerator[Snapshot, None]) -> None:
    """Each stream has nothing more, and is closed."""
    for stream in streams:
        assert [s async for s in stream] == []
        await stream.aclose()


def test_a_watcher_joining_after_the_end_gets_the_end(tmp_path: Path) -> None:
    async def scenario(
        store: DuckDBStore, events: RunEvents, feeds: RunFeeds, run: RunRecord
    ) -> None:
        first = await watch_then_cancel(store, events, feeds, run)
        ended = await asyncio.wait_for(anext(first), DEADLINE)
        assert ended[0].status == "FAILED"
        # `first` still holds the feed (its stream has not ended yet) when `second` joins.
        second = feeds.follow(TENANT, run.pipeline_logging_id)
        seen = await asyncio.wait_for(anext(second), DEADLINE)
        assert seen[0].status == "FAILED"
        await assert_ended(first, second)

    play(tmp_path, scenario)


def test_a_watcher_that_takes_its_next_update_late_still_gets_the_end(tmp_path: Path) -> None:
    """The run ends while a watcher has not yet asked for its next update (its stream's
    last write still going out): the end is its next update, not the end of its stream."""

    async def scenario(
        store: DuckDBStore, events: RunEvents, feeds: RunFeeds, run: RunRecord
    ) -> None:
        slow = await watch_then_cancel(store, events, feeds, run)
        # Another watcher's first update comes from a read made after it asked: once it has
        # the end, so has the feed, while `slow` still waits at its last update.
        other = feeds.follow(TENANT, run.pipeline_logging_id)
        assert (await asyncio.wait_for(anext(other), DEADLINE))[0].status == "FAILED"
        ended = await asyncio.wait_for(anext(slow, None), DEADLINE)
        assert ended is not None, "the stream ended without the run's end"
        assert ended[0].status == "FAILED"
        await assert_ended(slow, other)

    play(tmp_path, scenario)


def test_a_watcher_that_joins_while_the_end_is_being_read_gets_it(tmp_path: Path) -> None:
    """A watcher joins while the feed's read is in flight: it waits for a read begun after
    it, unless that read finds the run ended, which nothing can come after (the feed stops
    there: no other read would come)."""

    async def scenario(
        store: HeldReads, events: RunEvents, feeds: RunFeeds, run: RunRecord
    ) -> None:
        first = feeds.follow(TENANT, run.pipeline_logging_id)
        assert (await asyncio.wait_for(anext(first), DEADLINE))[0].status == "PENDING"
        # A read held before it reads the store (the feed may still be reading for its
        # first watcher's join: held or not, its next read is this one). Ended meanwhile,
        # the run is what it finds: the end's read.
        store.release.clear()
        store.reading.clear()
        events.publish(run.pipeline_logging_id)
        await asyncio.wait_for(store.reading.wait(), DEADLINE)
        await store.request_cancel(TENANT, run.pipeline_logging_id, datetime.now(UTC))
        other = feeds.follow(TENANT, run.pipeline_logging_id)
        joined = asyncio.create_task(anext(other))
        for _ in range(3):
            await asyncio.sleep(0)  # `other` joins while the read is in flight
        store.release.set()
        assert (await asyncio.wait_for(joined, DEADLINE))[0].status == "FAILED"
        assert (await asyncio.wait_for(anext(first), DEADLINE))[0].status == "FAILED"
        await assert_ended(first, other)

    play(tmp_path, scenario, held=True)  # type: ignore[arg-type]
