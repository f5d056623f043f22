"""The rows the store keeps, as the domain sees them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class TenantRecord:
    tenant_id: str
    company_name: str
    admin_email: str
    subscription_plan: str
    created_at: datetime
    status: str = "ACTIVE"


@dataclass(frozen=True)
class ApiKeyRecord:
    """A tenant's API key as stored: never the key, only its salted, peppered hash."""

    key_id: str
    tenant_id: str
    salt: bytes
    key_hash: bytes
    created_at: datetime
    revoked_at: datetime | None = None
