"""What a caller without a valid key may cost, counted by client address (an IPv6 client
by its /64: a subscriber is given a /64 at least, and could take a new address of it for
every call).

- The open endpoints (dry-run and onboard need no key) take a token from the client's
  bucket and from one bucket shared by all clients, on every protocol: a flood from one
  address is refused early, a flood from many addresses is capped in total.
- Failed authentications take a token from the client address's bucket and from the key
  id's bucket; while either is empty, that address (or that key id) is refused with 429
  before its key is even looked up, so a key cannot be guessed and a stream of unknown key
  ids cannot turn into a stream of store reads.

The price of the key id's bucket: someone who knows a key id (the 12 characters after
`_api_`, not secret) and fails on purpose can hold that key off for about a minute. The
key id alone grants nothing, and it is not shown to anyone but the key's holder.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from convergence_server.domain.quotas import RateLimiter
from convergence_server.errors import QuotaExceeded


@dataclass(frozen=True)
class ClientLimitSettings:
    """Per minute: open calls per client address, open calls in total, failed
    authentications per client address and per key id."""

    open_per_client: int = 10
    open_total: int = 300
    auth_failures: int = 20


@functools.lru_cache(maxsize=4096)  # on every keyed call (`check_failures`): 3-18 us a parse
def client_network(address: str) -> str:
    """What the limits count by: an IPv4 address, or the /64 of an IPv6 one (an IPv4 address
    mapped into IPv6 is that IPv4 address); anything else as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ClientLimits:
    def __init__(self, settings: ClientLimitSettings, limiter: RateLimiter) -> None:
        self._settings = settings
        self._limiter = limiter

    def admit_open(self, address: str) -> None:
        """Admits one dry-run or onboard call from `address`, or raises `QuotaExceeded`."""
        network = client_network(address)
        client = f"from your {'network' if '/' in network else 'address'} {network}"
        buckets = (
            (f"open:{network}", self._settings.open_per_client, client),
            ("open:*", self._settings.open_total, "from all clients together"),
        )
        for name, per_minute, whom in buckets:
            allowed, _, wait = self._limiter.take(name, per_minute)
            if not allowed:
                raise QuotaExceeded(
                    f"Too many onboarding requests {whom} (limit: {per_minute} per minute); "
                    "retry later",
                    f"{name}:requests_per_minute",
                    wait,
                )

    def _buckets(self, address: str, key_id: str | None) -> list[str]:
        names = [f"auth:{client_network(address)}"]
        if key_id:
            names.append(f"key:{key_id}")
        return names

    def check_failures(self, address: str, key_id: str | None) -> None:
        """Refuses an address or key id that failed authentication too often lately."""
        for name in self._buckets(address, key_id):
            wait = self._limiter.wait(name, self._settings.auth_failures)
            if wait:
                raise QuotaExceeded(
                    "Too many failed authentications; retry later",
                    f"{name}:failed_authentications",
                    wait,
                )

    def failed(self, address: str, key_id: str | None) -> None:
        """Counts one failed authentication against the address and the key id."""
        for name in self._buckets(address, key_id):
            self._limiter.take(name, self._settings.auth_failures)
