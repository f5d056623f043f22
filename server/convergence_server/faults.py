"""Fault points: named places where the server can be made to die as a crash would.

Tests set `CONVERGENCE_FAULT_POINTS` (e.g. `after_publish`) to widen a crash window
deterministically: the server kills itself with SIGKILL when it reaches the point, leaving
the store exactly as a power cut there would. Unset in production, where reaching a point
costs one set lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

# After a run's writes and their publication record commit, before the run's end is written.
AFTER_PUBLISH = "after_publish"
KNOWN = frozenset({AFTER_PUBLISH})

_armed: frozenset[str] = frozenset()


def arm(points: tuple[str, ...]) -> None:
    unknown = set(points) - KNOWN
    if unknown:
        raise SystemExit(f"CONVERGENCE_FAULT_POINTS: unknown point(s) {sorted(unknown)}")
    global _armed
    _armed = frozenset(points)
    if _armed:
        log.warning("fault points armed (testing only): %s", ", ".join(sorted(_armed)))


def reached(point: str) -> None:
    if point in _armed:
        log.error("fault point %s reached: killing the server", point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
