"""A tenant's account: its plan, today's usage against the plan, and its team."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

from convergence_server.clock import Clock
from convergence_server.domain.access import AccessLog, actor_of
from convergence_server.domain.auth import Caller, authorize_tenant
from convergence_server.domain.quotas import PlanBook
from convergence_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    echo,
)
from convergence_server.storage import Store
from convergence_server.storage.records import MemberRecord

log = logging.getLogger(__name__)


class TeamSizeExceeded(PermissionDenied):
    """A new X-User-ID would take the team beyond the plan's size."""

    reason = "TEAM_SIZE_EXCEEDED"


@dataclass(frozen=True)
class Usage:
    tenant_id: str
    usage_date: date
    plan: str
    run_today: int
    succeeded_today: int
    failed_today: int
    concurrent_running: int
    max_concurrent: int
    daily_limit: int
    concurrent_limit: int
    requests_per_minute: int
    team_size: int
    team_members: int

    @property
    def remaining_today(self) -> int:
        return max(0, self.daily_limit - self.run_today)

    @property
    def remaining_concurrent(self) -> int:
        return max(0, self.concurrent_limit - self.concurrent_running)


@dataclass(frozen=True)
class Seat:
    """A team seat taken for one call, until its outcome keeps it or gives it back."""

    caller: Caller
    user_id: str
    removals: int  # the tenant's member removals when it was taken


@dataclass
class _Pending:
    """The calls in progress of a user not known to be a member yet."""

    calls: int = 0
    added: bool = False  # one of them added the user: the first to succeed audits it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Accounts:
    def __init__(
        self,
        store: Store,
        plans: PlanBook,
        clock: Clock,
        access: AccessLog | None = None,
        member_cache_seconds: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._access = access
        self._store = store
        self._plans = plans
        self._clock = clock
        self._member_cache_seconds = member_cache_seconds
        self._monotonic = monotonic
        # (tenant, user) pairs known to be members, until when: most calls need no store
        # read, and a member removed through another server is seen within the bound.
        self._members: dict[tuple[str, str], float] = {}
        # Removals per tenant: a member admitted while one was removed is not cached.
        self._removals: dict[str, int] = {}
        # Users seated for calls in progress, not yet known to be members.
        self._pending: dict[tuple[str, str], _Pending] = {}

    async def admit_user(self, caller: Caller, user_id: str) -> Seat | None:
        """Seats `user_id` in the caller's team for the call about to run, refusing a new
        one beyond the plan. The seat is taken before the call, so that concurrent new
        users never exceed the team; the call's outcome then keeps it (`keep`) or gives
        it back (`give_back`): a refused call takes no seat. None: a known member."""
        pair = (caller.tenant_id, user_id)
        if self._members.get(pair, 0.0) > self._monotonic():
            return None
        pending = self._pending.setdefault(pair, _Pending())
        pending.calls += 1
        try:
            async with pending.lock:
                removals = self._removals.get(caller.tenant_id, 0)
                plan = await self._plans.plan_of(caller.tenant_id)
                known = {m.user_id for m in await self._store.list_members(caller.tenant_id)}
                admitted = user_id in known
                if not admitted:
                    admitted, _ = await self._store.admit_member(
                        caller.tenant_id, user_id, plan.team_size, self._clock()
                    )
                if not admitted:
                    raise TeamSizeExceeded(
                        f"Team size limit reached: plan {plan.name} allows {plan.team_size} "
                        f"team members (distinct X-User-ID values) and '{echo(user_id)}' "
                        f"would be one more. Remove a member (DELETE /api/v1/tenants/"
                        f"{caller.tenant_id}/members/USER_ID) or change the plan."
                    )
                pending.added |= user_id not in known
        except BaseException:
            self._done(pair, pending)
            raise
        return Seat(caller, user_id, removals)

    async def keep(self, seat: Seat) -> None:
        """The seated call succeeded: its user is a member (audited once, when new)."""
        pair = (seat.caller.tenant_id, seat.user_id)
        pending = self._pending[pair]
        if pending.added:
            pending.added = False
            await self._audit(seat.caller, "member.added", seat.user_id)
        if self._removals.get(pair[0], 0) == seat.removals:  # none removed meanwhile
            self._members[pair] = self._monotonic() + self._member_cache_seconds
        self._done(pair, pending)

    async def give_back(self, seat: Seat) -> None:
        """The seated call was refused: a user it added, and that no other call of the
        user's has kept or still holds, is no member after all."""
        pair = (seat.caller.tenant_id, seat.user_id)
        pending = self._pending[pair]
        try:
            async with pending.lock:
                if pending.calls == 1 and pending.added:
                    pending.added = False
                    await self._store.remove_member(*pair)
        except Exception:  # the call's own error is what its caller must see
            log.exception("team seat of %s in %s not given back", *reversed(pair))
        finally:
            self._done(pair, pending)

    def _done(self, pair: tuple[str, str], pending: _Pending) -> None:
        pending.calls -= 1
        if not pending.calls:
            del self._pending[pair]

    async def _audit(self, caller: Caller, event: str, target: str, detail: str = "") -> None:
        if self._access is not None:
            await self._access.record(caller.tenant_id, event, actor_of(caller), target, detail)

    async def usage(self, caller: Caller, tenant_id: str) -> Usage:
        authorize_tenant(caller, tenant_id)
        plan = await self._plans.plan_of(tenant_id)
        today = self._clock().date()
        current = await self._store.usage(tenant_id, today)
        row = current.row
        return Usage(
            tenant_id=tenant_id,
            usage_date=today,
            plan=plan.name,
            run_today=row.pipelines_run_today if row else 0,
            succeeded_today=row.pipelines_succeeded_today if row else 0,
            failed_today=row.pipelines_failed_today if row else 0,
            concurrent_running=current.active_runs,
            max_concurrent=row.max_concurrent_reached if row else 0,
            daily_limit=plan.daily_pipeline_runs,
            concurrent_limit=plan.concurrent_pipeline_runs,
            requests_per_minute=plan.requests_per_minute,
            team_size=plan.team_size,
            team_members=current.team_members,
        )

    async def change_plan(self, caller: Caller, tenant_id: str, plan_name: str) -> str:
        authorize_tenant(caller, tenant_id)
        if plan_name not in self._plans.plans:
            raise InvalidArgument(
                "Unknown subscription_plan",
                [
                    FieldViolation(
                        "subscription_plan",
                        f"must be one of {', '.join(sorted(self._plans.plans))}",
                    )
                ],
            )
        team = len(await self._store.list_members(tenant_id))
        allowed = self._plans.plans[plan_name].team_size
        if team > allowed:
            raise FailedPrecondition(
                f"Your team has {team} members and plan {plan_name} allows {allowed}: "
                "remove members first"
            )
        old = (await self._plans.plan_of(tenant_id)).name
        if not await self._store.update_plan(tenant_id, plan_name, self._clock()):
            raise NotFound(f"No tenant {tenant_id}")
        self._plans.forget(tenant_id)
        await self._audit(caller, "subscription.changed", plan_name, f"{old} -> {plan_name}")
        return plan_name

    async def members(self, caller: Caller, tenant_id: str) -> tuple[list[MemberRecord], int]:
        authorize_tenant(caller, tenant_id)
        plan = await self._plans.plan_of(tenant_id)
        return await self._store.list_members(tenant_id), plan.team_size

    async def remove_member(self, caller: Caller, tenant_id: str, user_id: str) -> None:
        authorize_tenant(caller, tenant_id)
        if not await self._store.remove_member(tenant_id, user_id):
            raise NotFound(f"No member {echo(user_id)}")
        self._removals[tenant_id] = self._removals.get(tenant_id, 0) + 1
        self._members.pop((tenant_id, user_id), None)
        await self._audit(caller, "member.removed", user_id)
