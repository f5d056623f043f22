"""The service's notion of "now", injectable so that tests can cross a UTC midnight.

`CONVERGENCE_CLOCK_OFFSET_FILE` (testing only) names a file holding a number of seconds
to add to the system clock; it is re-read when it changes, so a running server can be
moved across midnight. Time keeps flowing normally from the shifted point.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class OffsetFileClock:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: float | None = None
        self._offset = timedelta()

    def __call__(self) -> datetime:
        try:
            stamp = os.stat(self._path).st_mtime
            if stamp != self._stamp:
                self._offset = timedelta(seconds=float(self._path.read_text().strip() or 0))
                self._stamp = stamp
        except (OSError, ValueError):
            self._offset = timedelta()
        return datetime.now(UTC) + self._offset


def make_clock(offset_file: str) -> Clock:
    return OffsetFileClock(Path(offset_file)) if offset_file else system_clock
