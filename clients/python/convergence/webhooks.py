"""Verifying the webhook events Convergence sends (README: "Failure alerts").

    event = verify_event(signing_secret, request_body, request.headers["Convergence-Signature"])

Each event is signed with the tenant's signing secret (`whsec_...`, returned by
`set_webhook`): the `Convergence-Signature` header is `t=<unix seconds>,v1=<hex>`, the hex
being HMAC-SHA256 of `"<t>." + body` under the secret. A receiver recomputes it over the raw
body, compares in constant time and refuses old timestamps (a replayed delivery). The same
event may arrive twice (a retry after an answer that was lost): its `id` (also the
`Convergence-Delivery` header) tells.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

DEFAULT_TOLERANCE_SECONDS = 300


class InvalidSignature(ValueError):
    """The body was not signed with the secret, or the signature is too old."""


def verify_event(
    secret: str,
    body: bytes,
    header: str,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> dict[str, Any]:
    """The event, once its signature is checked; raises `InvalidSignature` otherwise."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        raise InvalidSignature("the header has no timestamp") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance_seconds:
        raise InvalidSignature("the signature is too old (or from the future)")
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    if not any(hmac.compare_digest(expected, given) for given in fields.get("v1", [])):
        raise InvalidSignature("no signature matches")
    event: dict[str, Any] = json.loads(body)
    return event
