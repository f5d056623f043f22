"""Concurrent reads of the same thing share one query (the BigQuery store's reads, each a
query job: seconds, and a billed minimum).

A read asked while the same read is in flight does not take that read's answer: the read
in flight may have begun before a write the caller saw acknowledged. It waits for the next
read of that key instead, which begins when the one in flight ends and is shared by every
call that arrived meanwhile. So each answer comes from a query that began after its call
did (a caller reads its own writes, as without sharing), and however many callers poll the
same run or list, at most one query per key is in flight and one waits: about one query
per query's duration, not one per call.

A caller that goes away (cancelled) does not cancel the shared read; the others still get
it. A failed read fails every call that shared it. Everything runs on the event loop's
thread; no lock is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

V = TypeVar("V")


@dataclass
class _Reads(Generic[V]):
    running: asyncio.Task[V] | None = None
    waiting: asyncio.Task[V] | None = None  # begins when `running` ends


class SharedReads:
    def __init__(self) -> None:
        self._keys: dict[Hashable, _Reads[Any]] = {}

    def in_flight(self) -> int:
        """Keys with a read in flight or waiting (for tests)."""
        return len(self._keys)

    async def read(self, key: Hashable, read: Callable[[], Awaitable[V]]) -> V:
        """`read()`'s answer, from a call of it that began after this one was asked."""
        reads: _Reads[V] | None = self._keys.get(key)
        if reads is None:
            reads = self._keys[key] = _Reads()
            reads.running = self._start(key, reads, None, read)
            task = reads.running
        elif reads.waiting is not None:
            task = reads.waiting
        else:
            task = reads.waiting = self._start(key, reads, reads.running, read)
        return await asyncio.shield(task)

    def _start(
        self,
        key: Hashable,
        reads: _Reads[V],
        after: asyncio.Task[V] | None,
        read: Callable[[], Awaitable[V]],
    ) -> asyncio.Task[V]:
        async def run() -> V:
            if after is not None:
                await asyncio.wait([after])
                reads.running, reads.waiting = reads.waiting, None
            try:
                return await read()
            finally:
                if reads.waiting is None:
                    del self._keys[key]

        task = asyncio.get_running_loop().create_task(run())
        # Retrieved even when every caller went away (no "exception never retrieved").
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return task
