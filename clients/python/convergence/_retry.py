"""When to call again: exponential backoff with full jitter, bounded by attempts and time.

Two refusals are retried: UNAVAILABLE (the service could not take the call; not for a call
that creates something without an idempotency key, which may have been done), and
RESOURCE_EXHAUSTED that carries a retry time (`RetryInfo`: a rate, or a slot that frees
when a run ends), after at least that time. A refusal without one (a count of things
kept) is final: waiting would not lift it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from convergence.errors import ConvergenceError, QuotaExceeded, Unavailable

__all__ = ["Backoff", "RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How a call that failed for a passing reason is tried again.

    The n-th retry waits a random time between 0 and `min(maximum, initial * 2**(n-1))`
    seconds (after the server's `RetryInfo` delay, when it gives one). A call is tried at
    most `max_attempts` times, and not retried when the wait would end more than
    `deadline` seconds after its first attempt started. `RetryPolicy(max_attempts=1)`
    turns retries off.
    """

    max_attempts: int = 5
    initial: float = 0.2
    maximum: float = 10.0
    deadline: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 < self.initial <= self.maximum:
            raise ValueError("initial must be above 0 and at most maximum")
        if self.deadline <= 0:
            raise ValueError("deadline must be above 0")


def server_delay(error: ConvergenceError, repeatable: bool = True) -> float | None:
    """The least wait before trying again, or None when the error is final (UNAVAILABLE
    too when the call must not be repeated: it may have been done)."""
    if isinstance(error, Unavailable):
        return 0.0 if repeatable else None
    if isinstance(error, QuotaExceeded) and error.retry_after is not None:
        return error.retry_after
    return None


class Backoff:
    """The retries of one operation: how many are left, and how long to wait for each."""

    def __init__(
        self,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._jitter = jitter
        self.restart()

    def restart(self) -> None:
        """Starts afresh: the operation made progress (a stream delivered a message)."""
        self._started = self._clock()
        self._attempts = 1

    def remaining(self) -> float:
        """Seconds left before the policy's deadline."""
        return self._policy.deadline - (self._clock() - self._started)

    def timeout(self, timeout: float | None) -> float | None:
        """The deadline of the next attempt: the call's own, cut to the time left."""
        remaining = max(self.remaining(), 0.0)
        return remaining if timeout is None else min(timeout, remaining)

    def wait(self, error: ConvergenceError, repeatable: bool = True) -> float | None:
        """How long to wait before trying again after `error`; None: raise it."""
        floor = server_delay(error, repeatable)
        if floor is None or self._attempts >= self._policy.max_attempts:
            return None
        cap = min(self._policy.maximum, self._policy.initial * 2 ** (self._attempts - 1))
        wait = floor + self._jitter(0.0, cap)
        if wait >= self.remaining():
            return None
        self._attempts += 1
        return wait
