"""Who is calling (authentication) and whether they may touch a tenant (authorization)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from convergence_server.clock import Clock, system_clock
from convergence_server.domain.keys import key_matches, parse_key
from convergence_server.errors import PermissionDenied, Unauthenticated, echo
from convergence_server.storage import Store
from convergence_server.storage.records import ApiKeyRecord

log = logging.getLogger(__name__)

INVALID_KEY_MESSAGE = "Invalid or missing API key"
# Responses to a key this close to its expiry carry a `warning` header.
EXPIRY_WARNING = timedelta(days=14)
# How far back each look for changed keys reaches before the previous one: a change is
# stamped when its statement runs and seen when its transaction commits, later (BigQuery
# jobs may take minutes with their retries). Keys changed within it are read again.
SYNC_OVERLAP = timedelta(minutes=5)


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str
    scope: str = "FULL"
    expires_at: datetime | None = None


class KeyRejected(Unauthenticated):
    """A key the store knows, refused (wrong secret, revoked, expired): its tenant's audit
    log counts the failure."""

    def __init__(self, message: str, tenant_id: str, key_id: str, event: str) -> None:
        super().__init__(message)
        self.tenant_id = tenant_id
        self.key_id = key_id
        self.event = event


class KeyExpired(KeyRejected):
    reason = "API_KEY_EXPIRED"


class KeyRevoked(KeyRejected):
    reason = "API_KEY_REVOKED"


class KeyReadOnly(PermissionDenied):
    reason = "API_KEY_READ_ONLY"


class KeyRecordCache:
    """Recently read key records, so that a busy key costs one store read per `ttl` seconds.

    Only records are cached, never a verdict: every request still hashes the presented key
    and compares it with the record's hash. The price is that a key revoked on another
    replica keeps working for up to `ttl` seconds. A key id the store does not know is
    remembered as unknown for as long (a negative entry), so repeating it costs no read;
    key ids are random, so one issued later never meets its own negative entry. It holds
    at most `size` entries, the least recently used going first.
    """

    def __init__(
        self, ttl: float, size: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._records: OrderedDict[str, tuple[float, ApiKeyRecord | None]] = OrderedDict()

    def get(self, key_id: str) -> tuple[bool, ApiKeyRecord | None]:
        """(known, record): `known` False when the store must be asked; a known None is a
        key id the store did not have."""
        entry = self._records.get(key_id)
        if entry is None or entry[0] <= self._clock():
            return False, None
        self._records.move_to_end(key_id)
        return True, entry[1]

    def forget(self, key_id: str) -> None:
        self._records.pop(key_id, None)

    def live(self) -> bool:
        """Whether any record is still served from the cache (not yet expired)."""
        now = self._clock()
        return any(expires > now for expires, _ in self._records.values())

    def put(self, key_id: str, record: ApiKeyRecord | None) -> None:
        if self._ttl <= 0:
            return
        self._records[key_id] = (self._clock() + self._ttl, record)
        self._records.move_to_end(key_id)
        while len(self._records) > self._size:
            self._records.popitem(last=False)


class Authenticator:
    def __init__(
        self,
        store: Store,
        pepper: bytes,
        cache: KeyRecordCache,
        clock: Clock = system_clock,
        used: Callable[[str], None] = lambda key_id: None,
    ) -> None:
        self._store = store
        self._pepper = pepper
        self._cache = cache
        self._clock = clock
        # Notes a successful use (`AccessLog.used`).
        self._used = used
        self._sync: asyncio.Task[None] | None = None

    def forget(self, key_id: str) -> None:
        """Drops a changed key's cached record: the next call reads the store."""
        self._cache.forget(key_id)

    async def authenticate(self, api_key: str) -> Caller:
        parsed = parse_key(api_key)
        if parsed is None:
            raise Unauthenticated(INVALID_KEY_MESSAGE)
        tenant_id, key_id = parsed
        known, record = self._cache.get(key_id)
        if not known:
            record = await self._store.get_api_key(key_id)
            self._cache.put(key_id, record)
        if record is None:
            raise Unauthenticated(INVALID_KEY_MESSAGE)
        # The hash is compared even when the prefix names another tenant, so that a
        # mismatch costs the same time as a wrong secret. Only the holder of the secret
        # learns that the key was revoked or expired.
        if (
            not key_matches(self._pepper, record.salt, record.key_hash, api_key)
            or record.tenant_id != tenant_id
        ):
            raise KeyRejected(INVALID_KEY_MESSAGE, record.tenant_id, key_id, "auth.failed")
        if record.revoked_at is not None:
            raise KeyRevoked(
                f"API key {key_id} was revoked at {_when(record.revoked_at)}; use another "
                "of the tenant's keys",
                record.tenant_id,
                key_id,
                "auth.failed",
            )
        if record.expires_at is not None and record.expires_at <= self._clock():
            ended = "its rotation's grace period ended" if record.replaced_by else "it expired"
            raise KeyExpired(
                f"API key {key_id} expired at {_when(record.expires_at)} ({ended}); use "
                "another of the tenant's keys or create a new one",
                record.tenant_id,
                key_id,
                "api_key.expired",
            )
        self._used(key_id)
        return Caller(record.tenant_id, record.key_id, record.scope, record.expires_at)

    def start_sync(self, seconds: float) -> None:
        """Every `seconds`, drops the cached records of keys changed since the last look
        (revoked or rotated through another server): the bound on how long such a key may
        still work here."""
        if seconds > 0:
            self._sync = asyncio.create_task(self._synchronize(seconds), name="key-sync")

    async def _synchronize(self, seconds: float) -> None:
        since: datetime | None = None
        while True:
            await asyncio.sleep(seconds)
            if since is not None and not self._cache.live():
                continue  # nothing cached to drop; `since` stays, so nothing is missed
            try:
                async with asyncio.timeout(max(30.0, 4 * seconds)):
                    changed, now = await self._store.changed_api_keys(since)
                for key_id in changed:
                    self._cache.forget(key_id)
                since = now - SYNC_OVERLAP
            except Exception:
                log.warning("cannot read the changed API keys; trying again", exc_info=True)

    async def stop_sync(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def authorize_tenant(caller: Caller, tenant_id: str) -> None:
    """Refuses a caller acting on a tenant other than its own."""
    if caller.tenant_id != tenant_id:
        raise PermissionDenied(
            f"Tenant ID mismatch: authenticated as '{caller.tenant_id}' "
            f"but requested '{echo(tenant_id)}'"
        )
