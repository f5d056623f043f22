"""A tenant's account: its plan, today's usage against the plan, and its team."""

from __future__ import annotations

from dataclasses import dataclass
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


class Accounts:
    def __init__(
        self, store: Store, plans: PlanBook, clock: Clock, access: AccessLog | None = None
    ) -> None:
        self._access = access
        self._store = store
        self._plans = plans
        self._clock = clock
        # (tenant, user) pairs known to be members: most calls need no store read.
        self._members: set[tuple[str, str]] = set()
        # Removals per tenant: a member admitted while one was removed is not cached.
        self._removals: dict[str, int] = {}

    async def admit_user(self, caller: Caller, user_id: str) -> None:
        """Counts `user_id` in the caller's team, refusing a new one beyond the plan."""
        if (caller.tenant_id, user_id) in self._members:
            return
        removals = self._removals.get(caller.tenant_id, 0)
        plan = await self._plans.plan_of(caller.tenant_id)
        known = {m.user_id for m in await self._store.list_members(caller.tenant_id)}
        admitted, _ = await self._store.admit_member(
            caller.tenant_id, user_id, plan.team_size, self._clock()
        )
        if not admitted:
            raise TeamSizeExceeded(
                f"Team size limit reached: plan {plan.name} allows {plan.team_size} team "
                f"members (distinct X-User-ID values) and '{echo(user_id)}' would be one more. "
                f"Remove a member (DELETE /api/v1/tenants/{caller.tenant_id}/members/USER_ID) "
                "or change the plan."
            )
        if user_id not in known:
            await self._audit(caller, "member.added", user_id)
        if self._removals.get(caller.tenant_id, 0) == removals:  # none removed meanwhile
            self._members.add((caller.tenant_id, user_id))

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
        self._members.discard((tenant_id, user_id))
        await self._audit(caller, "member.removed", user_id)
