"""The embedded store's copy of recent runs and their steps, so that GetRun, ListRunSteps
and each WatchRun update are answered without a query.

It is exact because one process owns the store (`Store.exclusive`): every change of a run
or of its steps goes through the store's methods, which wrap it in `change` (the run's
entries are dropped before the write; the state it committed, or one derived from the
entries before it, is kept after it only if no other change of the run overlapped it,
since overlapping changes may commit in one order and come back in the other) and, for a
change whose run is not known before it (a claim), in `claim`. A read that missed fills an
entry only if no change of that run (and no claim) began or ended while it read, so an
older state read from the database never replaces a newer one; a new run is kept as its
admission stored it unless a change of it began or ended since the admission was sent
(`created`), and a claimed run unless a change of it began or ended since the claim began
(`claimed`). A change that fails drops everything: whatever it may have committed is read
again; one whose caller was cancelled while its write went on in its thread (`outlive`)
also keeps every entry from being filled or derived until that write has ended. Bounded:
the least recently used entries go first.

Everything runs on the event loop's thread; no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from convergence_server.storage.records import RunRecord, StepRecord

CAPACITY = 10_000  # runs, and as many runs' step lists

V = TypeVar("V")


class Lru(Generic[V]):
    def __init__(self, capacity: int) -> None:
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._capacity = capacity

    def get(self, key: str) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class Marks:
    """The tick of each run's latest mark. The oldest are forgotten beyond `bound`, none of
    them later than `floor`: a tick at or below it cannot tell what was marked after it."""

    def __init__(self, bound: int) -> None:
        self._ticks: OrderedDict[str, int] = OrderedDict()
        self._bound = bound
        self.floor = 0

    def mark(self, run_id: str, tick: int) -> None:
        self._ticks[run_id] = tick
        self._ticks.move_to_end(run_id)
        if len(self._ticks) > self._bound:
            _, forgotten = self._ticks.popitem(last=False)
            self.floor = max(self.floor, forgotten)

    def get(self, run_id: str) -> int:
        """The run's latest mark, 0 when none is remembered."""
        return self._ticks.get(run_id, 0)


@dataclass
class Change:
    """A change of a run in progress: its entries as they were before it (None when not
    kept), and what the change sets for them once committed, as it committed them or
    derived from those (kept unless another change of the run began or ended meanwhile)."""

    run_before: RunRecord | None
    steps_before: list[StepRecord] | None
    run: RunRecord | None = None
    steps: list[StepRecord] | None = None


class RunCache:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self._runs: Lru[RunRecord] = Lru(capacity)
        self._steps: Lru[list[StepRecord]] = Lru(capacity)
        self._tick = 0  # counts the beginnings and ends of changes
        self._changed = Marks(4 * capacity)  # each run's latest change beginning or end
        self._busy: dict[str, int] = {}  # changes in progress, per run
        self._claiming = 0  # claims in progress
        self._claimed = 0  # the tick of the latest claim's beginning or end
        self._outliving = 0  # writes of cancelled callers still going on
        self._outlived = 0  # the tick of the latest one's beginning or end

    # -- reads ------------------------------------------------------------------------------

    def run(self, run_id: str) -> RunRecord | None:
        return self._runs.get(run_id)

    def steps(self, run_id: str) -> list[StepRecord] | None:
        found = self._steps.get(run_id)
        return None if found is None else list(found)

    def stamp(self) -> int:
        """Taken before a read of the database; `fill_*` compares it with what changed."""
        self._tick += 1
        return self._tick

    def fill_run(self, stamp: int, run: RunRecord) -> None:
        if self._unchanged(stamp, run.pipeline_logging_id):
            self._runs.put(run.pipeline_logging_id, run)

    def fill_steps(self, stamp: int, run_id: str, steps: list[StepRecord]) -> None:
        if self._unchanged(stamp, run_id):
            self._steps.put(run_id, list(steps))

    def _unchanged(self, stamp: int, run_id: str) -> bool:
        """No change of the run, and no claim, began or ended since `stamp`, or is going on."""
        return self._untouched(stamp, run_id) and not self._claiming and self._claimed < stamp

    def _untouched(self, stamp: int, run_id: str) -> bool:
        """No change of the run (nor a write of a cancelled caller) began or ended since
        `stamp`, or is going on."""
        return (
            stamp > self._changed.floor
            and self._changed.get(run_id) < stamp
            and run_id not in self._busy
            and self._no_outlived_write_since(stamp)
        )

    def _no_outlived_write_since(self, stamp: int) -> bool:
        """No write of a cancelled caller is going on, nor ended since `stamp`."""
        return not self._outliving and self._outlived < stamp

    # -- changes ----------------------------------------------------------------------------

    def claimed(self, began: int, run: RunRecord) -> None:
        """The run as a claim that began at tick `began` (`claim`) just committed it: kept
        unless a change of the run (or a write of a cancelled caller) began or ended since,
        or is going on (a cancel may have flagged it after the claim's commit)."""
        run_id = run.pipeline_logging_id
        kept = self._untouched(began, run_id)
        self._mark(run_id)
        if kept:
            self._runs.put(run_id, run)
        else:
            self._runs.drop(run_id)

    def created(self, stamp: int, run: RunRecord) -> None:
        """A new run as its creation committed, `stamp` taken before that: kept unless a
        change of it began or ended since (a claim by the fair-queue query can find the
        row, and put its own state, before the creation's caller gets here)."""
        if self._untouched(stamp, run.pipeline_logging_id):
            self._runs.put(run.pipeline_logging_id, run)

    @contextlib.asynccontextmanager
    async def change(self, run_id: str, steps_only: bool = False) -> AsyncIterator[Change]:
        """Around a write of the run and its steps (or its steps only): their entries are
        dropped first."""
        self._mark(run_id)
        began = self._tick
        self._busy[run_id] = self._busy.get(run_id, 0) + 1
        # The lists kept are never changed in place: the one before is handed over as is.
        change = Change(None if steps_only else self._runs.get(run_id), self._steps.get(run_id))
        if not steps_only:
            self._runs.drop(run_id)
        self._steps.drop(run_id)
        try:
            yield change
        except BaseException:
            self.clear()
            raise
        else:
            alone = (
                self._changed.get(run_id) == began
                and self._busy[run_id] == 1
                and self._no_outlived_write_since(began)
            )
            # A claim may change a PENDING run it did not know before (never a step, nor
            # a run RUNNING or ended).
            unclaimed = not self._claiming and self._claimed < began
            if not alone:
                self._runs.drop(run_id)
                self._steps.drop(run_id)
            elif change.run is not None and (unclaimed or change.run.status != "PENDING"):
                self._runs.put(run_id, change.run)
            if alone and change.steps is not None:
                self._steps.put(run_id, change.steps)
        finally:
            self._busy[run_id] -= 1
            if not self._busy[run_id]:
                del self._busy[run_id]
            self._mark(run_id)

    @contextlib.asynccontextmanager
    async def claim(self) -> AsyncIterator[int]:
        """Around a write whose run is known only after it (a claim); gives the tick it
        began at, for `claimed`."""
        self._tick += 1
        self._claimed = self._tick
        self._claiming += 1
        try:
            yield self._claimed
        except BaseException:
            self.clear()
            raise
        finally:
            self._claiming -= 1
            self._tick += 1
            self._claimed = self._tick

    def outlive(self, write: asyncio.Future[Any]) -> None:
        """A write whose caller was cancelled goes on in its thread (after its change or
        claim failed, which cleared the cache): until it ends, what it commits is unknown."""
        self._outliving += 1
        self._tick += 1
        self._outlived = self._tick

        def ended(done: asyncio.Future[Any]) -> None:
            if not done.cancelled():
                done.exception()  # retrieved: the cancelled caller reported the call
            self._outliving -= 1
            self._tick += 1
            self._outlived = self._tick

        write.add_done_callback(ended)

    def clear(self) -> None:
        self._runs.clear()
        self._steps.clear()

    def _mark(self, run_id: str) -> None:
        self._tick += 1
        self._changed.mark(run_id, self._tick)
