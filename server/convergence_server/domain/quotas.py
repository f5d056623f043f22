"""Plan limits: daily runs, concurrent runs, request rate, team size.

Daily and concurrent limits are reserved by the store atomically with the insert of the
PENDING run (`Store.create_run` takes the limits); a concurrency slot is a run's own
PENDING or RUNNING state, so every terminal transition frees it and it cannot leak. The
request rate is a token bucket per API key; calls in progress and open streams are
counted per tenant in the server's memory (`TenantLoad`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from convergence_server.domain.plans import Plan
from convergence_server.errors import NotFound, QuotaExceeded
from convergence_server.storage import Store

log = logging.getLogger(__name__)


def seconds_until_midnight(now: datetime) -> int:
    midnight = datetime.combine(
        now.astimezone(UTC).date() + timedelta(days=1), datetime.min.time(), UTC
    )
    return math.ceil((midnight - now).total_seconds())


def daily_exceeded(tenant_id: str, used: int, limit: int, now: datetime) -> QuotaExceeded:
    return QuotaExceeded(
        f"Daily pipeline quota exceeded. You have run {used} pipelines today (limit: {limit})",
        f"tenant:{tenant_id}:daily_pipeline_runs",
        seconds_until_midnight(now),
    )


def concurrent_exceeded(tenant_id: str, active: int, limit: int, wait: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"Concurrent pipeline limit reached. You have {active} pipelines pending or running "
        f"(limit: {limit})",
        f"tenant:{tenant_id}:concurrent_pipeline_runs",
        wait,
    )


class RateLimiter:
    """Token buckets by name: `rate` requests a minute, bursts up to `rate`.

    In the server's memory: exact for the embedded store, which one process owns alone.
    It holds at most `size` buckets; the least recently used goes first (a bucket unused
    for a minute is full again anyway, so forgetting it changes nothing).
    """

    def __init__(
        self, monotonic: Callable[[], float] = time.monotonic, size: int = 100_000
    ) -> None:
        self._monotonic = monotonic
        self._size = size
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, name: str, per_minute: int, now: float) -> float:
        tokens, last = self._buckets.get(name, (float(per_minute), now))
        return min(float(per_minute), tokens + (now - last) * per_minute / 60.0)

    def _keep(self, name: str, tokens: float, now: float) -> None:
        self._buckets[name] = (tokens, now)
        self._buckets.move_to_end(name)
        if len(self._buckets) > self._size:
            self._buckets.popitem(last=False)

    def take(self, name: str, per_minute: int) -> tuple[bool, int, int]:
        """(allowed, tokens left, seconds until the next token when refused)."""
        now = self._monotonic()
        with self._lock:
            tokens = self._tokens(name, per_minute, now)
            if tokens >= 1:
                self._keep(name, tokens - 1, now)
                return True, int(tokens - 1), 0
            self._keep(name, tokens, now)
            return False, 0, math.ceil((1 - tokens) * 60.0 / per_minute)

    def wait(self, name: str, per_minute: int) -> int:
        """Seconds until `name` has a token again; 0 when it has one now (nothing taken)."""
        now = self._monotonic()
        with self._lock:
            if name not in self._buckets:
                return 0
            tokens = self._tokens(name, per_minute, now)
        return 0 if tokens >= 1 else math.ceil((1 - tokens) * 60.0 / per_minute)


class TenantLoad:
    """Each tenant's calls in progress and open streams, against its plan's caps.

    `enter` admits a call or refuses it with `QuotaExceeded`; `leave` (in a `finally`)
    frees its place, so a call that fails or a client that goes away frees it too.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def enter(self, tenant_id: str, kind: str, limit: int, plan: str) -> None:
        key = (tenant_id, kind)
        count = self._counts.get(key, 0)
        if count >= limit:
            what = "streams open" if kind == "open_streams" else "calls in progress"
            raise QuotaExceeded(
                f"Too many {what}: plan {plan} allows {limit} at once per tenant",
                f"tenant:{tenant_id}:{kind}",
                1,
            )
        self._counts[key] = count + 1

    def leave(self, tenant_id: str, kind: str) -> None:
        key = (tenant_id, kind)
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)


DEFAULT_RUN_SECONDS = 10
MAX_RETRY_ESTIMATE = 300


def concurrency_wait(typical_run_ms: int | None) -> int:
    """How long a slot typically takes to free: the tenant's median run, 1 s to 5 min."""
    if typical_run_ms is None:
        return DEFAULT_RUN_SECONDS
    return min(MAX_RETRY_ESTIMATE, max(1, math.ceil(typical_run_ms / 1000)))


class PlanBook:
    """Each tenant's plan, read from the store and kept a few seconds.

    A plan change made through this server takes effect on the next call (`forget`), one
    made through another within the few seconds; a team's admission is checked against
    the stored plan itself (`Store.admit_member`).
    """

    def __init__(
        self,
        store: Store,
        plans: dict[str, Plan],
        ttl: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.plans = plans
        self._ttl = ttl
        self._monotonic = monotonic
        self._cache: dict[str, tuple[float, str, Plan]] = {}
        self._generations: dict[str, int] = {}

    async def plan_of(self, tenant_id: str) -> Plan:
        return (await self.stored_plan(tenant_id))[1]

    async def stored_plan(self, tenant_id: str) -> tuple[str, Plan]:
        """The plan's name in the tenant's profile, and the plan that applies: the same
        but for a plan withdrawn from plans.yml."""
        cached = self._cache.get(tenant_id)
        if cached is not None and cached[0] > self._monotonic():
            return cached[1], cached[2]
        generation = self._generations.get(tenant_id, 0)
        tenant = await self._store.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound(f"No tenant {tenant_id}")
        name = tenant.subscription_plan
        plan = self.plan_named(name)
        if self._generations.get(tenant_id, 0) == generation:  # no change meanwhile
            self._cache[tenant_id] = (self._monotonic() + self._ttl, name, plan)
        return name, plan

    def plan_named(self, name: str) -> Plan:
        """The plan that applies to a tenant whose profile names `name`: that plan, or for
        one withdrawn from plans.yml the most restrictive one, until the tenant chooses
        another (it must still be able to call UpdateSubscription)."""
        plan = self.plans.get(name)
        if plan is None:
            log.warning("a tenant has the unknown plan %s", name)
            plan = min(self.plans.values(), key=lambda p: p.daily_pipeline_runs)
        return plan

    def forget(self, tenant_id: str) -> None:
        """The tenant's plan changed: the next call reads it again."""
        self._generations[tenant_id] = self._generations.get(tenant_id, 0) + 1
        self._cache.pop(tenant_id, None)
