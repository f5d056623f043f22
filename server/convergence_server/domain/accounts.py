"""A tenant's account: its plan, today's usage against the plan, and its team."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

from convergence_server import faults
from convergence_server.clock import Clock
from convergence_server.domain.access import AccessLog, actor_of
from convergence_server.domain.auth import Caller, authorize_tenant
from convergence_server.domain.plans import Plan
from convergence_server.domain.quotas import PlanBook
from convergence_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    echo,
)
from convergence_server.storage import Store
from convergence_server.storage.locks import KeyedTurns
from convergence_server.storage.records import MemberRecord

log = logging.getLogger(__name__)
# An admission the store refused because the plan had changed is asked again under the new
# plan, this many times at most (each a plan change between a read and the admission).
PLAN_CHANGES_AWAITED = 3


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
    """A user not known to be a member, while calls of theirs are in progress here."""

    calls: int = 0  # in progress (seated, or waiting for `lock`): the entry lives as long
    seats: int = 0  # seated on the row one of them added, until their outcomes
    added: bool = False  # that row is not kept yet: the first call to succeed keeps it
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
        # Per tenant: admissions of new members and plan changes take turns.
        self._teams = KeyedTurns()
        # Removals of users admitted for calls cancelled meanwhile, in progress.
        self._undoing: set[asyncio.Future[None]] = set()

    async def admit_user(self, caller: Caller, user_id: str) -> Seat | None:
        """Seats a new `user_id` in the caller's team for the call about to run, refusing
        one beyond the plan. The seat is taken before the call, so that concurrent new
        users never exceed the team; the call's outcome then keeps it (`keep`) or gives
        it back (`give_back`): a refused call takes no seat. None: a member already."""
        pair = (caller.tenant_id, user_id)
        if self._is_member(pair):
            return None
        pending = self._pending.setdefault(pair, _Pending())
        pending.calls += 1
        seat = None
        try:
            async with pending.lock:
                seat = await self._seat(caller, user_id, pending)
        finally:
            if seat is None:
                self._done(pair, pending)
        return seat

    async def _seat(self, caller: Caller, user_id: str, pending: _Pending) -> Seat | None:
        """`admit_user` in the user's turn: the seat another call of theirs took here is
        shared; otherwise the store says whether the user is a member or may become one."""
        pair = (caller.tenant_id, user_id)
        removals = self._removals.get(caller.tenant_id, 0)
        if self._is_member(pair):
            return None
        if not pending.added:
            known = await self._store.list_members(caller.tenant_id)
            if any(m.user_id == user_id for m in known):  # a recheck: no write
                self._remember(pair, removals)
                return None
            async with self._teams.get(caller.tenant_id):  # not during a plan change
                plan, admitted, added = await self._admit_member(caller.tenant_id, user_id)
            if not admitted:
                raise TeamSizeExceeded(
                    f"Team size limit reached: plan {plan.name} allows {plan.team_size} team "
                    f"members (distinct X-User-ID values) and '{echo(user_id)}' would be one "
                    f"more. Remove a member (DELETE /api/v1/tenants/{caller.tenant_id}/"
                    "members/USER_ID) or change the plan."
                )
            if not added:  # another server added the user meanwhile
                self._remember(pair, removals)
                return None
            pending.added = True
        pending.seats += 1
        return Seat(caller, user_id, removals)

    async def _admit_member(self, tenant_id: str, user_id: str) -> tuple[Plan, bool, bool]:
        """The store's admission under the tenant's plan, asked again when the store finds
        the plan changed (through another server: this one's copy was out of date). Seen
        through: a call cancelled meanwhile (its client gone) never runs, so a user the
        store added for it is removed again."""

        async def admit() -> tuple[Plan, bool, bool]:
            name, plan = await self._plans.stored_plan(tenant_id)
            await faults.held(faults.BEFORE_MEMBER_ADMISSION)
            for _ in range(PLAN_CHANGES_AWAITED):
                answer = await self._store.admit_member(
                    tenant_id, user_id, name, plan.team_size, self._clock()
                )
                if answer.member or answer.plan == name:
                    await faults.held(faults.AFTER_MEMBER_ADMISSION)
                    return plan, answer.member, answer.added
                # The plan has changed (through another server): this one's copy is out
                # of date; the admission is asked again under the plan the store has.
                self._plans.forget(tenant_id)
                name, plan = answer.plan, self._plans.plan_named(answer.plan)
            raise Unavailable(
                "The tenant's plan kept changing while a new team member was admitted; try again"
            )

        admission = asyncio.ensure_future(admit())
        try:
            return await asyncio.shield(admission)
        except asyncio.CancelledError:
            # The call is gone: a user the store added for it is removed again, even when
            # this call is cancelled once more while that is done.
            undo = asyncio.ensure_future(self._undo(admission, tenant_id, user_id))
            self._undoing.add(undo)
            undo.add_done_callback(self._undoing.discard)
            await asyncio.shield(undo)
            raise

    async def _undo(
        self, admission: asyncio.Future[tuple[Plan, bool, bool]], tenant_id: str, user_id: str
    ) -> None:
        with contextlib.suppress(Exception):
            if (await admission)[2]:
                await self._store.remove_member(tenant_id, user_id)

    async def keep(self, seat: Seat) -> None:
        """The seated call succeeded: its user is a member (audited once)."""
        pair = (seat.caller.tenant_id, seat.user_id)
        pending = self._pending[pair]
        pending.seats -= 1
        if pending.added:
            pending.added = False
            # Not when the user was removed while the call ran: its row is gone.
            if self._removals.get(pair[0], 0) == seat.removals or any(
                m.user_id == seat.user_id for m in await self._store.list_members(pair[0])
            ):
                await self._audit(seat.caller, "member.added", seat.user_id)
        self._remember(pair, seat.removals)
        self._done(pair, pending)

    async def give_back(self, seat: Seat) -> None:
        """The seated call was refused: the user it added is no member after all, unless
        another call of theirs kept the seat or still holds it."""
        pair = (seat.caller.tenant_id, seat.user_id)
        pending = self._pending[pair]
        pending.seats -= 1
        try:
            async with pending.lock:
                if not pending.seats and pending.added:
                    pending.added = False
                    await self._store.remove_member(*pair)
        except Exception:  # the call's own error is what its caller must see
            log.exception("team seat of %s in %s not given back", *reversed(pair))
        finally:
            self._done(pair, pending)

    def _is_member(self, pair: tuple[str, str]) -> bool:
        return self._members.get(pair, 0.0) > self._monotonic()

    def _remember(self, pair: tuple[str, str], removals: int) -> None:
        """Takes the user for a member for a while, unless one was removed meanwhile."""
        if self._removals.get(pair[0], 0) == removals:
            self._members[pair] = self._monotonic() + self._member_cache_seconds

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

    async def change_plan(self, caller: Caller, tenant_id: str, plan_name: str) -> bool:
        """Moves the tenant to `plan_name`; False when it has that plan already."""
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
        # In the team's turn: no new member is admitted under the old plan meanwhile.
        async with self._teams.get(tenant_id):
            tenant = await self._store.get_tenant(tenant_id)
            if tenant is None:
                raise NotFound(f"No tenant {tenant_id}")
            old = tenant.subscription_plan
            if old == plan_name:  # no change, no event
                return False
            allowed = self._plans.plans[plan_name].team_size
            team = await self._store.update_plan(tenant_id, plan_name, allowed, self._clock())
            if team is None:
                raise NotFound(f"No tenant {tenant_id}")
            if team > allowed:
                raise FailedPrecondition(
                    f"Your team has {team} members and plan {plan_name} allows {allowed}: "
                    "remove members first"
                )
            self._plans.forget(tenant_id)
        await self._audit(caller, "subscription.changed", plan_name, f"{old} -> {plan_name}")
        return True

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
