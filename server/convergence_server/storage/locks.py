"""Named locks within one process (the embedded store is one process's alone)."""

from __future__ import annotations

import threading


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def get(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key.lower(), threading.Lock())
