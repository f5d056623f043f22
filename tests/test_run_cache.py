"""The embedded store's run cache never lets a state read from the database before a change
replace the state that change wrote: each interleaving of a read that missed with a change
is played out step by step (the cache is driven as the store drives it)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

from convergence_server.storage.records import RunRecord, StepRecord
from convergence_server.storage.run_cache import RunCache

OLD = RunRecord(
    pipeline_logging_id="r1",
    pipeline_id="p",
    tenant_id="t",
    provider="test",
    domain="runs",
    template="quick",
    status="PENDING",
    trigger_type="manual",
    trigger_by="api",
    user_id="",
    parameters={},
    created_at=datetime(2026, 1, 1, tzinfo=UTC),
)
NEW = replace(OLD, status="RUNNING", worker_id="w")
STEP = StepRecord(
    step_logging_id="s1",
    pipeline_logging_id="r1",
    pipeline_id="p",
    tenant_id="t",
    step_name="one",
    step_type="query",
    step_index=0,
    status="RUNNING",
    step_start_time=OLD.created_at,
)
ENDED = replace(STEP, status="COMPLETE", step_end_time=OLD.created_at)


def test_a_read_that_began_before_a_change_does_not_fill() -> None:
    async def play() -> None:
        cache = RunCache()
        stamp = cache.stamp()  # a read misses and queries: it gets OLD
        async with cache.change("r1") as change:
            change.run = NEW  # as committed
        cache.fill_run(stamp, OLD)  # the read comes back after the change
        assert cache.run("r1") == NEW

    asyncio.run(play())


def test_a_read_during_a_change_that_only_drops_does_not_fill() -> None:
    async def play() -> None:
        cache = RunCache()
        cache.fill_run(cache.stamp(), OLD)
        async with cache.change("r1"):  # a requeue: nothing is put after
            assert cache.run("r1") is None
            stamp = cache.stamp()  # a read that may see the state before the commit
            cache.fill_run(stamp, OLD)
            assert cache.run("r1") is None
        cache.fill_run(stamp, OLD)
        assert cache.run("r1") is None
        fresh = cache.stamp()  # a read after the change fills
        cache.fill_run(fresh, NEW)
        assert cache.run("r1") == NEW

    asyncio.run(play())


def test_a_claim_blocks_fills_of_every_run_while_it_runs() -> None:
    async def play() -> None:
        cache = RunCache()
        stamp = cache.stamp()
        async with cache.claim() as began:
            cache.claimed(began, NEW)
        cache.fill_run(stamp, OLD)
        assert cache.run("r1") == NEW

    asyncio.run(play())


def test_a_failed_change_drops_everything() -> None:
    async def play() -> None:
        cache = RunCache()
        other = replace(OLD, pipeline_logging_id="r2")
        cache.fill_run(cache.stamp(), other)
        try:
            async with cache.change("r1"):
                raise RuntimeError("the write failed after its commit, maybe")
        except RuntimeError:
            pass
        assert cache.run("r2") is None

    asyncio.run(play())


def test_steps_follow_the_same_rule_and_a_forgotten_change_still_counts() -> None:
    async def play() -> None:
        cache = RunCache(capacity=2)  # remembers the changes of 8 runs
        stamp = cache.stamp()
        async with cache.change("r1", steps_only=True):
            pass
        for n in range(20):  # r1's change is forgotten among others
            async with cache.change(f"other{n}"):
                pass
        cache.fill_steps(stamp, "r1", [STEP])
        assert cache.steps("r1") is None
        cache.fill_steps(cache.stamp(), "r1", [STEP])
        assert cache.steps("r1") == [STEP]

    asyncio.run(play())


def test_a_creation_does_not_replace_a_claim_that_came_first() -> None:
    """An admission keeps its new run once its caller is back on the event loop; a claim by
    the fair-queue query may have found the committed row and put its own state first."""

    async def play() -> None:
        cache = RunCache()
        stamp = cache.stamp()  # the admission's INSERT is sent
        async with cache.claim() as began:  # the query claims the committed row meanwhile
            cache.claimed(began, NEW)
        cache.created(stamp, OLD)  # the admission's caller comes back
        assert cache.run("r1") == NEW

        alone = RunCache()
        stamp = alone.stamp()
        alone.created(stamp, OLD)
        assert alone.run("r1") == OLD

    asyncio.run(play())


def test_a_derived_step_list_is_kept_only_when_no_other_change_overlapped() -> None:
    """A step's write derives the run's step list from the one kept before it; another
    change of the run (a requeue closing its steps) that began or ended meanwhile, or is
    still going on, voids it."""

    async def play() -> None:
        cache = RunCache()
        cache.fill_steps(cache.stamp(), "r1", [STEP])
        async with cache.change("r1", steps_only=True) as change:
            assert change.steps_before == [STEP] and cache.steps("r1") is None
            change.steps = [ENDED]
        assert cache.steps("r1") == [ENDED]

        async with cache.change("r1", steps_only=True) as change:
            async with cache.change("r1"):  # began and ended meanwhile
                pass
            change.steps = [STEP]
        assert cache.steps("r1") is None

        cache.fill_steps(cache.stamp(), "r1", [STEP])
        requeue = cache.change("r1")
        await requeue.__aenter__()  # began before, still going on
        async with cache.change("r1", steps_only=True) as change:
            assert change.steps_before is None  # dropped by the requeue
            change.steps = [ENDED]
        await requeue.__aexit__(None, None, None)
        assert cache.steps("r1") is None

        cache.fill_run(cache.stamp(), NEW)
        async with cache.change("r1") as change:  # a dq step's warnings
            assert change.run_before == NEW and cache.run("r1") is None
            change.run = replace(NEW, warnings=1)
        assert cache.run("r1") == replace(NEW, warnings=1)

    asyncio.run(play())


def test_a_write_left_running_by_a_cancelled_caller_keeps_fills_out_until_it_ends() -> None:
    async def play() -> None:
        cache = RunCache()
        write = asyncio.get_running_loop().create_future()
        try:
            async with cache.change("r1", steps_only=True):
                raise asyncio.CancelledError  # the caller is cancelled; its write goes on
        except asyncio.CancelledError:
            cache.outlive(write)
        stamp = cache.stamp()  # a read before the write commits
        cache.fill_steps(stamp, "r1", [STEP])
        assert cache.steps("r1") is None
        write.set_result(None)
        await asyncio.sleep(0)  # its callbacks run
        cache.fill_steps(stamp, "r1", [STEP])  # that read, back after the write ended
        assert cache.steps("r1") is None
        cache.fill_steps(cache.stamp(), "r1", [ENDED])
        assert cache.steps("r1") == [ENDED]

    asyncio.run(play())


def test_overlapping_changes_of_a_run_keep_neither_state() -> None:
    """Two changes of a run may commit in one order and come back in the other: neither's
    state is kept, committed or derived; nor a claim's, when a change of its run began or
    ended since the claim began."""

    async def play() -> None:
        cache = RunCache()
        cache.fill_run(cache.stamp(), NEW)
        outer = cache.change("r1")
        (await outer.__aenter__()).run = replace(NEW, warnings=1)  # committed second
        async with cache.change("r1") as inner:  # a cancel, committed first, back first
            inner.run = replace(NEW, cancel_requested=True)
        assert cache.run("r1") is None
        await outer.__aexit__(None, None, None)
        assert cache.run("r1") is None

        async with cache.claim() as began:
            async with cache.change("r1") as cancel:  # after the claim's commit
                cancel.run = replace(NEW, cancel_requested=True)
            cache.claimed(began, NEW)  # the claim's caller comes back last
        assert cache.run("r1") is None

    asyncio.run(play())
