"""The embedded store's fair queue, kept in memory: which PENDING run a worker claims next,
without the window query of `rows.FAIR_QUEUE` (4-5 ms a claim, however few runs wait).

It follows the same order. A tenant's first PENDING run (by creation, then id) is its
candidate, at turn = its RUNNING runs; candidates are taken by turn, then by when the tenant
last had a slot: the later of its first PENDING run's creation and the last end of one of
its runs that had started; then by creation and id.

One process owns the embedded store, and every change of a run's status goes through the
store's methods, which report the committed state here (`apply`) within `changing`. A
change that fails leaves the index invalid (what it committed is unknown) until it is
loaded again from the database, which is only installed when no change began or ended
while it was read. So does a state reported by a change that overlapped another of the
same run (a cancel and a requeue, a cancel and a claim): such changes may commit in one
order and report in the other. Only an admission's report
needs no such care: a run's creation commits before any other change of it, so a state of
the new run reported first (its claim by the fair-queue query) is newer, and kept.

The store claims the index's choice with a guarded UPDATE (still PENDING), and falls back to
the query when the index is invalid, has no candidate, or its choice was taken meanwhile:
the index can make a claim cheaper, never wrong.

Everything runs on the event loop's thread; no lock is needed.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from convergence_server.storage.records import RunRecord
from convergence_server.storage.run_cache import Marks

log = logging.getLogger(__name__)

PENDING, RUNNING = "PENDING", "RUNNING"
# How many runs' latest reports are remembered (see `QueueIndex._changed`).
REMEMBERED = 50_000


@dataclass
class _Tenant:
    running: int = 0
    pending: list[tuple[datetime, str]] = field(default_factory=list)  # sorted
    released: datetime | None = None  # the last end of a run of it that had started


@dataclass(frozen=True)
class Changing:
    """A change in progress: the tick it began at, the runs it named, and whether it
    creates the runs it reports (an admission)."""

    began: int
    run_ids: tuple[str, ...]
    creates: bool = False


def _utc(moment: datetime) -> datetime:
    """Comparable with the database's times (UTC; a naive time is taken as UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class QueueIndex:
    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}
        self._where: dict[str, tuple[str, str, datetime]] = {}  # run -> tenant, status, created
        self.valid = False
        self._busy = 0  # changes in progress
        self._tick = 0  # counts the beginnings and ends of changes
        self._busy_runs: dict[str, int] = {}  # changes in progress of the runs they name
        # The tick at which each run was last reported (but by its admission), or a change
        # naming it ended.
        self._changed = Marks(REMEMBERED)

    # -- loading ----------------------------------------------------------------------------

    def mark(self) -> int | None:
        """Taken before reading the database for `load`; None while a change is running."""
        return None if self._busy else self._tick

    def load(
        self,
        mark: int | None,
        runs: Iterable[tuple[str, str, str, datetime]],
        released: Iterable[tuple[str, datetime]],
    ) -> bool:
        """Installs the state read after `mark`: (tenant, run id, status, created) of every
        PENDING and RUNNING run, and each tenant's last end of a started run. Refused (the
        index stays as it is) when a change began or ended since `mark`."""
        if mark is None or self._busy or mark != self._tick:
            return False
        self._tenants, self._where = {}, {}
        for tenant_id, moment in released:
            self._tenant(tenant_id).released = moment
        for tenant_id, run_id, status, created in runs:
            self._add(tenant_id, run_id, status, created)
        for tenant in self._tenants.values():
            tenant.pending.sort()
        self.valid = True
        return True

    # -- changes ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def changing(self, run_ids: Iterable[str] = (), creates: bool = False) -> Iterator[Changing]:
        """Around a store call that may change a run's status (see the module's doc): the
        runs it changes when known before (none for a claim, nor an admission, which
        `creates` its runs), and what `apply` takes."""
        self._busy += 1
        self._tick += 1
        change = Changing(self._tick, tuple(run_ids), creates)
        for run_id in change.run_ids:
            self._busy_runs[run_id] = self._busy_runs.get(run_id, 0) + 1
        try:
            yield change
        except BaseException:
            self.valid = False
            raise
        finally:
            self._busy -= 1
            self._tick += 1
            for run_id in change.run_ids:
                if self._busy_runs[run_id] == 1:
                    del self._busy_runs[run_id]
                else:
                    self._busy_runs[run_id] -= 1
                self._changed.mark(run_id, self._tick)

    def apply(self, change: Changing, run: RunRecord) -> None:
        """The run's state as `change` just committed it. Never raises: the change it
        reports has been committed; an index that cannot follow it (or that cannot tell
        whether another change of the run committed after it) is read again instead."""
        run_id = run.pipeline_logging_id
        reported = self._changed.get(run_id) > change.began  # by another change since
        forgotten = change.began <= self._changed.floor  # reports since may be forgotten
        others = self._busy_runs.get(run_id, 0) - (run_id in change.run_ids)
        self._tick += 1
        if not change.creates:  # a creation is older than any other report of its run
            self._changed.mark(run_id, self._tick)
        if not self.valid:
            return
        if change.creates and reported and not forgotten:
            return  # a newer state of the new run was reported first
        if forgotten or reported or (others and not change.creates):
            self.valid = False
            return
        try:
            self._apply(run)
        except Exception:
            log.exception("the run queue index is read again")
            self.valid = False

    def _apply(self, run: RunRecord) -> None:
        run_id = run.pipeline_logging_id
        known = self._where.get(run_id)
        status = run.status if run.status in (PENDING, RUNNING) else None
        if known is None and status is None:  # it ended, but was never queued here
            self.valid = False
            return
        if known is not None:
            self._remove(run_id, *known)
        if status is not None:
            self._add(run.tenant_id, run_id, status, _utc(run.created_at), in_order=True)
        elif run.start_time is not None and run.end_time is not None:
            tenant, ended = self._tenant(run.tenant_id), _utc(run.end_time)
            if tenant.released is None or ended > tenant.released:
                tenant.released = ended

    # -- the choice -------------------------------------------------------------------------

    def next_run(self) -> str | None:
        """The run the fair queue gives the next worker, or None (none known, or invalid)."""
        if not self.valid:
            return None
        best: tuple[int, datetime, datetime, str] | None = None
        for tenant in self._tenants.values():
            if not tenant.pending:
                continue
            queued, run_id = tenant.pending[0]
            since = queued if tenant.released is None else max(queued, tenant.released)
            key = (tenant.running, since, queued, run_id)
            if best is None or key < best:
                best = key
        return None if best is None else best[3]

    def active(self, tenant_id: str) -> int | None:
        """The tenant's PENDING and RUNNING runs, or None (invalid)."""
        if not self.valid:
            return None
        tenant = self._tenants.get(tenant_id)
        return 0 if tenant is None else tenant.running + len(tenant.pending)

    # -- plumbing ---------------------------------------------------------------------------

    def _tenant(self, tenant_id: str) -> _Tenant:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            tenant = self._tenants[tenant_id] = _Tenant()
        return tenant

    def _add(
        self, tenant_id: str, run_id: str, status: str, created: datetime, in_order: bool = False
    ) -> None:
        """Records the run; a PENDING one is put in its place `in_order`, else appended (a
        load sorts every list once)."""
        tenant = self._tenant(tenant_id)
        self._where[run_id] = (tenant_id, status, created)
        if status == RUNNING:
            tenant.running += 1
        elif in_order:
            bisect.insort(tenant.pending, (created, run_id))
        else:
            tenant.pending.append((created, run_id))

    def _remove(self, run_id: str, tenant_id: str, status: str, created: datetime) -> None:
        del self._where[run_id]
        tenant = self._tenants[tenant_id]
        if status == RUNNING:
            tenant.running -= 1
        else:
            at = bisect.bisect_left(tenant.pending, (created, run_id))
            del tenant.pending[at]
