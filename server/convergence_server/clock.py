"""The service's notion of "now", injectable so that tests can cross a UTC midnight.

`CONVERGENCE_CLOCK_OFFSET_FILE` (testing only) names a file holding either a number of
seconds to add to the system clock, or an ISO-8601 instant with its offset (e.g.
`2026-03-08T06:59:30+00:00`) that the clock reads at the moment the file was written. It is
re-read when it changes, so a running server can be moved across midnight or to a
schedule's slot. Time keeps flowing normally from the shifted point.
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
                text = self._path.read_text().strip()
                # Empty: caught between the truncation and the write of a new value (which
                # may keep the same mtime): the old offset holds until it is read whole.
                if text:
                    self._offset = _offset(text, stamp)
                    self._stamp = stamp
        except ValueError:
            pass  # read again next time; the old offset holds meanwhile
        except OSError:
            self._offset = timedelta()
        return datetime.now(UTC) + self._offset


def _offset(text: str, written: float) -> timedelta:
    try:
        return timedelta(seconds=float(text))
    except ValueError:
        instant = datetime.fromisoformat(text)
        if instant.tzinfo is None:
            raise ValueError("the instant needs its UTC offset") from None
        return instant - datetime.fromtimestamp(written, UTC)


def make_clock(offset_file: str) -> Clock:
    return OffsetFileClock(Path(offset_file)) if offset_file else system_clock
