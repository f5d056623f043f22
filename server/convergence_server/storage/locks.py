"""Named locks within one process (the embedded store is one process's alone), and group
commits."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")


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

    @contextlib.asynccontextmanager
    async def all_of(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """The turns of every key, taken in a fixed order (no two holders wait on each
        other: every other holder takes one key's turn at a time)."""
        async with contextlib.AsyncExitStack() as held:
            for key in sorted({k.lower() for k in keys}):
                await held.enter_async_context(self.get(key))
            yield


class GroupCommit(Generic[Request, Answer]):
    """Requests that arrive while a batch is being written wait, and are written together in
    the next one, in arrival order: one transaction for many callers when they are many, no
    wait at all for one alone. A caller that stops waiting does not stop its batch."""

    def __init__(
        self, write: Callable[[list[Request]], Awaitable[list[Answer]]], max_batch: int = 256
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._waiting: list[tuple[Request, asyncio.Future[Answer]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, request: Request) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="group-commit")
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            try:
                answers = await self._write([request for request, _ in batch])
            except BaseException as exc:  # every caller of the batch sees the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
