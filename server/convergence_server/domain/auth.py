"""Who is calling (authentication) and whether they may touch a tenant (authorization)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from convergence_server.domain.keys import key_matches, parse_key
from convergence_server.errors import PermissionDenied, Unauthenticated, echo
from convergence_server.storage import Store
from convergence_server.storage.records import ApiKeyRecord

INVALID_KEY_MESSAGE = "Invalid or missing API key"


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str


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

    def put(self, key_id: str, record: ApiKeyRecord | None) -> None:
        if self._ttl <= 0:
            return
        self._records[key_id] = (self._clock() + self._ttl, record)
        self._records.move_to_end(key_id)
        while len(self._records) > self._size:
            self._records.popitem(last=False)


class Authenticator:
    def __init__(self, store: Store, pepper: bytes, cache: KeyRecordCache) -> None:
        self._store = store
        self._pepper = pepper
        self._cache = cache

    async def authenticate(self, api_key: str) -> Caller:
        parsed = parse_key(api_key)
        if parsed is None:
            raise Unauthenticated(INVALID_KEY_MESSAGE)
        tenant_id, key_id = parsed
        known, record = self._cache.get(key_id)
        if not known:
            record = await self._store.get_api_key(key_id)
            self._cache.put(key_id, record)
        # The hash is compared even when the prefix names another tenant, so that a
        # mismatch costs the same time as a wrong secret.
        if (
            record is None
            or record.revoked_at is not None
            or not key_matches(self._pepper, record.salt, record.key_hash, api_key)
            or record.tenant_id != tenant_id
        ):
            raise Unauthenticated(INVALID_KEY_MESSAGE)
        return Caller(tenant_id=record.tenant_id, key_id=record.key_id)


def authorize_tenant(caller: Caller, tenant_id: str) -> None:
    """Refuses a caller acting on a tenant other than its own."""
    if caller.tenant_id != tenant_id:
        raise PermissionDenied(
            f"Tenant ID mismatch: authenticated as '{caller.tenant_id}' "
            f"but requested '{echo(tenant_id)}'"
        )
