"""Who is calling (authentication) and whether they may touch a tenant (authorization)."""

from __future__ import annotations

from dataclasses import dataclass

from convergence_server.domain.keys import key_matches, parse_key
from convergence_server.errors import PermissionDenied, Unauthenticated
from convergence_server.storage import Store

INVALID_KEY_MESSAGE = "Invalid or missing API key"
_MAX_ECHO = 64


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str


class Authenticator:
    def __init__(self, store: Store, pepper: bytes) -> None:
        self._store = store
        self._pepper = pepper

    async def authenticate(self, api_key: str) -> Caller:
        parsed = parse_key(api_key)
        if parsed is None:
            raise Unauthenticated(INVALID_KEY_MESSAGE)
        tenant_id, key_id = parsed
        record = await self._store.get_api_key(key_id)
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
        requested = tenant_id if len(tenant_id) <= _MAX_ECHO else tenant_id[:_MAX_ECHO] + "..."
        raise PermissionDenied(
            f"Tenant ID mismatch: authenticated as '{caller.tenant_id}' but requested '{requested}'"
        )
