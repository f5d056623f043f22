"""Named locks within one process (the embedded store is one process's alone)."""

from __future__ import annotations

import asyncio
import threading


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def get(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key.lower(), threading.Lock())


class KeyedTurns:
    """Named asyncio locks, taken on the event loop before a store call enters its thread
    pool: a caller waiting for its turn holds no thread, so a tenant with many calls queued
    on its own lock cannot fill the pool that every other tenant's calls share."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key.lower(), asyncio.Lock())
