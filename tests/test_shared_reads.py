"""SharedReads: calls of one read that overlap share the next read to begin, never one
that began before them; failures and cancelled callers (the BigQuery store's use is in
tests/test_store_contract.py, on the emulator)."""

from __future__ import annotations

import asyncio

from convergence_server.storage.shared_reads import SharedReads


class Source:
    """A value that changes, read by calls that wait until the test lets them end."""

    def __init__(self) -> None:
        self.value = 0
        self.reads = 0
        self.gates: list[asyncio.Event] = []

    async def read(self) -> int:
        self.reads += 1
        seen = self.value  # what the database answers when the query begins
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if seen < 0:
            raise RuntimeError("unavailable")
        return seen

    def end(self, index: int) -> None:
        self.gates[index].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_overlapping_calls_share_one_read_begun_after_them() -> None:
    asyncio.run(overlapping())


async def overlapping() -> None:
    shared, source = SharedReads(), Source()
    first = asyncio.create_task(shared.read("k", source.read))
    await settle()
    source.value = 1  # a write acknowledged after the first read began
    later = [asyncio.create_task(shared.read("k", source.read)) for _ in range(5)]
    other = asyncio.create_task(shared.read("other key", source.read))
    await settle()
    assert source.reads == 2  # the first, and the other key's: the later five wait
    source.end(0)
    await settle()
    assert first.done() and first.result() == 0 and source.reads == 3
    source.value = 2
    latest = asyncio.create_task(shared.read("k", source.read))  # the shared read began
    await settle()
    source.end(2)
    answers = await asyncio.gather(*later)
    assert answers == [1] * 5
    await settle()
    assert source.reads == 4
    source.end(3)
    source.end(1)
    answers = await asyncio.gather(latest, other)
    assert answers == [2, 1]
    assert shared.in_flight() == 0


def test_a_failed_read_fails_every_call_that_shared_it() -> None:
    asyncio.run(failing())


async def failing() -> None:
    shared, source = SharedReads(), Source()
    source.value = -1
    calls = [asyncio.create_task(shared.read("k", source.read)) for _ in range(3)]
    await settle()
    source.end(0)
    await settle()
    source.end(1)
    failures = await asyncio.gather(*calls, return_exceptions=True)
    assert [str(failure) for failure in failures] == ["unavailable"] * 3
    assert source.reads == 2 and shared.in_flight() == 0


def test_a_caller_that_goes_away_does_not_cancel_the_shared_read() -> None:
    asyncio.run(leaving())


async def leaving() -> None:
    shared, source = SharedReads(), Source()
    first = asyncio.create_task(shared.read("k", source.read))
    await settle()
    gone, staying = (asyncio.create_task(shared.read("k", source.read)) for _ in range(2))
    await settle()
    gone.cancel()
    await settle()
    source.end(0)
    await settle()
    source.end(1)
    answers = await asyncio.gather(first, staying)
    assert answers == [0, 0] and gone.cancelled()
    assert source.reads == 2 and shared.in_flight() == 0
