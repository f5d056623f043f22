"""Fault points: named places where the server can be made to die, or wait, on purpose.

Tests set `CONVERGENCE_FAULT_POINTS` (e.g. `after_publish`) to widen a crash or race
window deterministically:
- `reached(point)`: the server kills itself with SIGKILL, leaving the store exactly as a
  power cut there would;
- `await held(point)`: the call waits while the file `<data dir>/hold/<point>` exists
  (at most `HOLD_SECONDS`), so a test can keep calls in progress as long as it needs;
- `failing(point)`: true while that file exists, for the call to fail there as if the
  store's answer had been lost.
Unset in production, where reaching a point costs one set lookup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

# After a run's writes and their publication record commit, before the run's end is written.
AFTER_PUBLISH = "after_publish"
# After a run's steps, before its publication (embedded store: a day written into place
# waits in the run's open transaction).
BEFORE_PUBLISH = "before_publish"
# Embedded store: in the transaction admitting a schedule's slot run, after the run's
# insert, before the schedule's record of the slot (the crash must leave neither).
AFTER_SLOT_RUN = "after_slot_run"
# Inside an authenticated call, counted as in progress, before the servicer runs.
HOLD_CALLS = "hold_calls"
# BigQuery store: after a publication compared a day with the one published, before its
# transaction (held: another replica may publish the day meanwhile).
BEFORE_PUBLISH_TRANSACTION = "before_publish_transaction"
# Before a run checks, between its steps, whether a cancel was asked (held: the run waits
# there, however quick its steps, until the test has asked).
BETWEEN_STEPS = "between_steps"
# In CancelRun, after the run was read, before it is changed (held: another cancel of
# the same run reads it meanwhile).
BEFORE_CANCEL = "before_cancel"
# After an admission's store call, before it is answered (failing: the call fails as if
# the store's answer had been lost on the way; a run it admitted is stored all the same).
AFTER_ADMISSION = "after_admission"
# In the executor, after a claim's store call returned a run, before the run starts (held:
# the server is asked to stop meanwhile).
AFTER_CLAIM = "after_claim"
# In the admission of a new team member, after its plan was read, before its store call
# (held: a plan change comes meanwhile), and after it (held: the call is cancelled
# meanwhile).
BEFORE_MEMBER_ADMISSION = "before_member_admission"
AFTER_MEMBER_ADMISSION = "after_member_admission"
# A run's publication, after its last check for a cancel (held: a cancel comes before the
# publication), and after the publication committed, before the run's end is written
# (held: a cancel comes too late).
BEFORE_PUBLICATION = "before_publication"
AFTER_PUBLICATION = "after_publication"
# A run's load step, after its local source was checked and opened, before it is read
# (held: the test swaps a folder of the source for a link meanwhile).
BEFORE_SOURCE_READ = "before_source_read"
KNOWN = frozenset(
    {
        BEFORE_SOURCE_READ,
        AFTER_PUBLICATION,
        BEFORE_PUBLICATION,
        AFTER_MEMBER_ADMISSION,
        BEFORE_MEMBER_ADMISSION,
        AFTER_ADMISSION,
        AFTER_CLAIM,
        AFTER_PUBLISH,
        AFTER_SLOT_RUN,
        BEFORE_CANCEL,
        BEFORE_PUBLISH,
        HOLD_CALLS,
        BEFORE_PUBLISH_TRANSACTION,
        BETWEEN_STEPS,
    }
)
# Long enough for the slowest test to release its hold itself (a shared emulator on a
# busy machine takes minutes), short enough that a forgotten hold ends on its own.
HOLD_SECONDS = 900.0

_armed: frozenset[str] = frozenset()
_hold_dir = Path()


def arm(points: tuple[str, ...], data_dir: Path = Path()) -> None:
    unknown = set(points) - KNOWN
    if unknown:
        raise SystemExit(f"CONVERGENCE_FAULT_POINTS: unknown point(s) {sorted(unknown)}")
    global _armed, _hold_dir
    _armed = frozenset(points)
    _hold_dir = data_dir / "hold"
    if _armed:
        log.warning("fault points armed (testing only): %s", ", ".join(sorted(_armed)))


def reached(point: str) -> None:
    if point in _armed:
        log.error("fault point %s reached: killing the server", point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


async def held(point: str) -> None:
    if point not in _armed:
        return
    if (_hold_dir / point).exists():
        log.warning("fault point %s: holding", point)
    deadline = time.monotonic() + HOLD_SECONDS
    while (_hold_dir / point).exists() and time.monotonic() < deadline:  # noqa: ASYNC110 - a file, polled
        await asyncio.sleep(0.02)


def failing(point: str) -> bool:
    """Whether a call should fail at `point` now: it is armed and its file exists."""
    return point in _armed and (_hold_dir / point).exists()


def held_here(point: str) -> None:
    """`held` for code running on a worker thread (it blocks the thread)."""
    if point not in _armed:
        return
    if (_hold_dir / point).exists():
        log.warning("fault point %s: holding", point)
    deadline = time.monotonic() + HOLD_SECONDS
    while (_hold_dir / point).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
