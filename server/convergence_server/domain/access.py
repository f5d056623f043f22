"""A tenant's API keys as a resource, and its audit log.

Keys: create (a name, a scope, an optional expiry; the secret returned once), list, get,
revoke (refused for the last active key), rotate (a new key; the old one keeps working for
a grace period). Every change writes its audit row in the same transaction.

The audit log (`tenants.tenant_audit_log`) gets one row per account change, written when
it happens, and one row per minute for the frequent events (`quota.refused` per quota,
`auth.failed` per key id), counted in memory and appended by `AccessLog.flush`, which also
writes when each key was last used (at most once a minute per key, in one statement).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from convergence_server import logs
from convergence_server.clock import Clock
from convergence_server.domain.auth import Caller, authorize_tenant
from convergence_server.domain.keys import issue_key
from convergence_server.domain.runs import PageTokens
from convergence_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    echo,
)
from convergence_server.storage import Store
from convergence_server.storage.records import ApiKeyRecord, AuditFilter, AuditRecord

log = logging.getLogger(__name__)

SCOPES = ("FULL", "READ_ONLY")
DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE = 100, 1000
DEFAULT_GRACE = timedelta(hours=24)
MAX_GRACE = timedelta(days=30)
# The latest expiry a key can have: the end of the last day a protobuf Timestamp holds.
LATEST_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
# Distinct (tenant, event, target) counters kept per minute; beyond it, counted under "*".
MAX_COUNTERS = 10_000
EVENTS = frozenset(
    {
        "tenant.onboarded",
        "api_key.created",
        "api_key.rotated",
        "api_key.revoked",
        "api_key.expired",
        "subscription.changed",
        "member.added",
        "member.removed",
        "schedule.created",
        "schedule.updated",
        "schedule.paused",
        "schedule.resumed",
        "schedule.deleted",
        "schedule.backfilled",
        "quota.refused",
        "auth.failed",
        "webhook.set",
        "webhook.deleted",
        "webhook.failed",
    }
)


@dataclass(frozen=True)
class Actor:
    """Who made a request, as the audit log records it."""

    key_id: str = ""
    user_id: str = ""
    request_id: str = ""
    client_address: str = ""

    @property
    def label(self) -> str:
        """`key:KEY_ID` (with ` user:USER`), as a key's `created_by` says."""
        if not self.key_id:
            return "operator"
        return f"key:{self.key_id}" + (f" user:{self.user_id}" if self.user_id else "")


def actor_of(caller: Caller | None) -> Actor:
    """The current request's actor: the caller's key, its X-User-ID, request id, address."""
    return Actor(
        key_id=caller.key_id if caller else "",
        user_id=logs.user_id_var.get(),
        request_id=logs.request_id_var.get(),
        client_address=logs.client_address_var.get(),
    )


@dataclass(frozen=True)
class NewKey:
    """A key just created, with its secret (shown once)."""

    record: ApiKeyRecord
    secret: str


class AccessLog:
    """Audit rows and key use, written to the store."""

    def __init__(self, store: Store, clock: Clock, flush_seconds: float = 60.0) -> None:
        self._store = store
        self._clock = clock
        self._flush_seconds = flush_seconds
        # (tenant, event, target, minute) -> (count, actor of the first event)
        self._counts: dict[tuple[str, str, str, datetime], tuple[int, Actor]] = {}
        # key id -> time of its latest use not yet written
        self._uses: dict[str, datetime] = {}
        # key id -> the minute its use was last noted (one write per minute at most)
        self._noted: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def row(
        self, tenant_id: str, event: str, actor: Actor, target: str = "", detail: str = ""
    ) -> AuditRecord:
        return AuditRecord(
            event_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            event_time=self._clock(),
            event=event,
            actor_key_id=actor.key_id,
            actor_user_id=actor.user_id,
            target=target,
            detail=detail,
            request_id=actor.request_id,
            client_address=actor.client_address,
        )

    async def record(
        self, tenant_id: str, event: str, actor: Actor, target: str = "", detail: str = ""
    ) -> None:
        """Appends one row now."""
        await self.write([self.row(tenant_id, event, actor, target, detail)])

    async def write(self, rows: list[AuditRecord]) -> None:
        """Appends rows now (one statement). The change they record has happened: a store
        that fails here is logged, not reported to the caller as a failed change."""
        try:
            await self._store.add_audit(rows)
        except Exception:
            log.exception("audit rows lost: %s", [(r.tenant_id, r.event, r.target) for r in rows])

    def count(self, tenant_id: str, event: str, target: str, actor: Actor) -> None:
        """Counts a frequent event into its minute's row."""
        minute = self._clock().replace(second=0, microsecond=0)
        key = (tenant_id, event, target, minute)
        if key not in self._counts and len(self._counts) >= MAX_COUNTERS:
            key = (tenant_id, event, "*", minute)
        count, first = self._counts.get(key, (0, actor))
        self._counts[key] = (count + 1, first)

    def used(self, key_id: str) -> None:
        """Notes a key's use; it is written with the next flush, once per minute."""
        now = self._clock()
        minute = now.replace(second=0, microsecond=0)
        if self._noted.get(key_id) == minute:
            return
        self._noted[key_id] = minute
        self._uses[key_id] = now
        if len(self._noted) > MAX_COUNTERS:
            self._noted.clear()

    async def flush(self) -> None:
        counts, self._counts = self._counts, {}
        uses, self._uses = self._uses, {}
        rows = [
            AuditRecord(
                event_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                event_time=minute,
                event=event,
                actor_key_id=actor.key_id,
                actor_user_id=actor.user_id,
                target=target,
                detail=f"{count} in the minute",
                client_address=actor.client_address,
                count=count,
            )
            for (tenant_id, event, target, minute), (count, actor) in counts.items()
        ]
        # What the store refuses is kept for the next flush (within MAX_COUNTERS).
        try:
            if rows:
                await self._store.add_audit(rows)
        except Exception:
            log.warning("cannot write %d counted audit rows yet", len(rows), exc_info=True)
            for key, (count, actor) in counts.items():
                if key in self._counts or len(self._counts) < MAX_COUNTERS:
                    later, first = self._counts.get(key, (0, actor))
                    self._counts[key] = (count + later, first)
        try:
            if uses:
                await self._store.record_key_use(uses)
        except Exception:
            log.warning("cannot record the last use of %d keys yet", len(uses), exc_info=True)
            for key_id, used in uses.items():
                self._uses.setdefault(key_id, used)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="access-log")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(30.0, self._flush_seconds)):
                    await self.flush()

    async def stop(self, seconds: float) -> None:
        """Stops the loop and writes what is pending, within `seconds`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(0.1, seconds)):
                await self.flush()


class Keys:
    """The tenant's keys, managed with one of its own (full) keys."""

    def __init__(
        self,
        store: Store,
        pepper: bytes,
        access: AccessLog,
        clock: Clock,
        page_tokens: PageTokens,
        max_days: int = 0,
        forget: Callable[[str], None] = lambda key_id: None,
    ) -> None:
        self._store = store
        self._page_tokens = page_tokens
        self._pepper = pepper
        self._access = access
        self._clock = clock
        self._max_days = max_days
        # Drops a key's record from this server's cache: a change applies to its next call.
        self._forget = forget

    def _expiry(self, requested: datetime | None, now: datetime) -> datetime | None:
        cap = self._longest_expiry(now)
        if requested is None:
            return cap
        if requested <= now:
            raise InvalidArgument(
                "expires_at is in the past",
                [FieldViolation("expires_at", "must be a time in the future")],
            )
        if cap is not None and requested > cap:
            raise InvalidArgument(
                f"Keys may live at most {self._max_days} days",
                [FieldViolation("expires_at", f"must be at most {self._max_days} days from now")],
            )
        return requested

    def _renewed_expiry(self, old: ApiKeyRecord, now: datetime) -> datetime | None:
        """A rotation's new key lives as long as the old one did, from `now`: no later than
        the last time a timestamp can hold, nor than the longest life keys may have now."""
        if old.expires_at is None:
            return None
        lifetime = old.expires_at - old.created_at
        expires = now + lifetime if LATEST_EXPIRY - now > lifetime else LATEST_EXPIRY
        cap = self._longest_expiry(now)
        return expires if cap is None else min(expires, cap)

    def _longest_expiry(self, now: datetime) -> datetime | None:
        """The latest expiry a key made `now` may have (`CONVERGENCE_KEY_MAX_DAYS`)."""
        return now + timedelta(days=self._max_days) if self._max_days > 0 else None

    async def create(
        self,
        caller: Caller,
        tenant_id: str,
        name: str,
        scope: str,
        expires_at: datetime | None,
    ) -> NewKey:
        authorize_tenant(caller, tenant_id)
        actor = actor_of(caller)
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                "Invalid key name",
                [FieldViolation("name", "must be 1 to 64 letters, digits, '.', '_' or '-'")],
            )
        now = self._clock()
        new = self.new_key(tenant_id, name, scope or "FULL", actor.label, now, expires_at)
        audit = self._access.row(tenant_id, "api_key.created", actor, new.record.key_id, name)
        await self._store.create_api_key(new.record, audit)
        return new

    async def issue(
        self, tenant_id: str, name: str, scope: str, expires_at: datetime | None
    ) -> NewKey:
        """The operator's key for a tenant (`convergence-server keys issue`): no caller, so
        no API path leads here."""
        if await self._store.get_tenant(tenant_id) is None:
            raise NotFound(f"No tenant {echo(tenant_id)}")
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                "Invalid key name",
                [FieldViolation("name", "must be 1 to 64 letters, digits, '.', '_' or '-'")],
            )
        new = self.new_key(tenant_id, name, scope, "operator", self._clock(), expires_at)
        audit = self._access.row(
            tenant_id, "api_key.created", Actor(), new.record.key_id, f"{name} (operator)"
        )
        await self._store.create_api_key(new.record, audit)
        return new

    async def revoke_any(self, tenant_id: str, key_id: str) -> ApiKeyRecord:
        """The operator's revocation (`convergence-server keys revoke`): also the tenant's
        last key (a leaked key must stop working even if none is left; `issue` gives it a
        new one)."""
        audit = self._access.row(tenant_id, "api_key.revoked", Actor(), key_id, "operator")
        record = await self._store.revoke_api_key(
            tenant_id, key_id, self._clock(), audit, keep_one=False
        )
        if record is None:
            raise NotFound(f"Tenant {echo(tenant_id)} has no API key {echo(key_id)}")
        return record

    def new_key(
        self,
        tenant_id: str,
        name: str,
        scope: str,
        created_by: str,
        now: datetime,
        expires_at: datetime | None,
    ) -> NewKey:
        if scope not in SCOPES:
            raise InvalidArgument(
                "Invalid scope", [FieldViolation("scope", f"must be one of {', '.join(SCOPES)}")]
            )
        issued = issue_key(tenant_id, self._pepper)
        record = ApiKeyRecord(
            key_id=issued.key_id,
            tenant_id=tenant_id,
            salt=issued.salt,
            key_hash=issued.key_hash,
            created_at=now,
            name=name,
            scope=scope,
            created_by=created_by,
            expires_at=self._expiry(expires_at, now),
        )
        return NewKey(record, issued.key)

    async def list_keys(self, caller: Caller, tenant_id: str) -> list[ApiKeyRecord]:
        authorize_tenant(caller, tenant_id)
        return await self._store.list_api_keys(tenant_id)

    async def get(self, caller: Caller, tenant_id: str, key_id: str) -> ApiKeyRecord:
        authorize_tenant(caller, tenant_id)
        record = await self._store.get_api_key(key_id)
        if record is None or record.tenant_id != tenant_id:
            raise NotFound(f"No API key {echo(key_id)}")
        return record

    async def revoke(self, caller: Caller, tenant_id: str, key_id: str) -> ApiKeyRecord:
        authorize_tenant(caller, tenant_id)
        now = self._clock()
        audit = self._access.row(tenant_id, "api_key.revoked", actor_of(caller), key_id)
        record = await self._store.revoke_api_key(tenant_id, key_id, now, audit)
        self._forget(key_id)
        if record is None:
            raise NotFound(f"No API key {echo(key_id)}")
        if record.revoked_at is None:
            raise FailedPrecondition(
                f"API key {key_id} is the tenant's last active key with scope FULL (a key "
                "replaced by a rotation does not count: it stops working when its grace ends): "
                f"create another key (POST /api/v1/tenants/{tenant_id}/api-keys) before "
                "revoking this one"
            )
        return record

    async def rotate(
        self,
        caller: Caller,
        tenant_id: str,
        key_id: str,
        grace: timedelta | None,
    ) -> tuple[ApiKeyRecord, NewKey]:
        """Returns the old key (as stored after) and the new one."""
        authorize_tenant(caller, tenant_id)
        actor = actor_of(caller)
        grace = DEFAULT_GRACE if grace is None else grace
        if not timedelta(0) <= grace <= MAX_GRACE:
            raise InvalidArgument(
                "Invalid grace period",
                [FieldViolation("grace_seconds", "must be 0 to 2592000 (30 days)")],
            )
        old = await self.get(caller, tenant_id, key_id)
        now = self._clock()
        if old.replaced_by:
            raise FailedPrecondition(
                f"API key {key_id} was rotated already (replaced by {old.replaced_by}): "
                "rotate or revoke its replacement"
            )
        if old.state(now) != "ACTIVE":
            raise FailedPrecondition(
                f"API key {key_id} is {old.state(now).lower()}: only an active key can be "
                "rotated; create a new key instead"
            )
        new = self.new_key(
            tenant_id, old.name, old.scope, actor.label, now, self._renewed_expiry(old, now)
        )
        detail = f"replaced by {new.record.key_id}; grace until {(now + grace).isoformat()}"
        audit = self._access.row(tenant_id, "api_key.rotated", actor, key_id, detail)
        stored = await self._store.rotate_api_key(tenant_id, key_id, new.record, now + grace, audit)
        self._forget(key_id)
        if stored is None:
            raise NotFound(f"No API key {echo(key_id)}")
        if stored.replaced_by != new.record.key_id:
            raise FailedPrecondition(
                f"API key {key_id} changed while it was rotated (revoked or expired): "
                "create a new key instead"
            )
        return stored, new

    async def audit_log(
        self, caller: Caller, where: AuditFilter, limit: int, page_token: str
    ) -> tuple[list[AuditRecord], str]:
        """A page of the audit log, newest first, and the token of the next page."""
        authorize_tenant(caller, where.tenant_id)
        limit = limit or DEFAULT_AUDIT_PAGE
        if not 1 <= limit <= MAX_AUDIT_PAGE:
            raise InvalidArgument(
                "Invalid limit", [FieldViolation("limit", f"must be from 1 to {MAX_AUDIT_PAGE}")]
            )
        unknown = sorted(where.events - EVENTS)
        if unknown:
            raise InvalidArgument(
                f"Unknown audit event {echo(unknown[0])}",
                [FieldViolation("event", f"must be among {', '.join(sorted(EVENTS))}")],
            )
        if where.start and where.end and where.start >= where.end:
            raise InvalidArgument(
                "start_time must be before end_time",
                [FieldViolation("end_time", "must be after start_time")],
            )
        scope = json.dumps(
            ["audit", where.tenant_id, sorted(where.events), str(where.start), str(where.end)]
        )
        after = self._page_tokens.read(page_token, scope) if page_token else None
        rows = await self._store.list_audit(where, after, limit + 1)
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = self._page_tokens.issue(rows[-1].event_time, rows[-1].event_id, scope)
        return rows, token
