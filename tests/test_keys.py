"""API keys: high-entropy, shown once, stored only as salted, peppered hashes."""

from __future__ import annotations

import asyncio
import hmac
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from convergence_server import metrics
from convergence_server.domain import keys
from convergence_server.domain.access import AccessLog
from convergence_server.domain.auth import Authenticator, KeyRecordCache
from convergence_server.errors import Unauthenticated
from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.records import ApiKeyRecord, TenantRecord
from tests.conftest import StackFactory, dump_store, onboard


def test_the_store_holds_no_plaintext_key(stack_factory: StackFactory) -> None:
    stack = stack_factory()
    with httpx.Client(base_url=stack.http_url, timeout=10) as http:
        issued = [onboard(http)[1] for _ in range(3)]
    stack.stop()

    secrets = [key for key in issued] + [key[-keys.SECRET_LENGTH :] for key in issued]
    for table, rows in dump_store(stack).items():
        for row in rows:
            for value in row:
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                for secret in secrets:
                    assert secret not in text, f"a key leaked into {table}"


def test_keys_are_long_random_and_parseable() -> None:
    issued = keys.issue_key("acme_corp", b"p" * 32)
    tenant_id, key_id = keys.parse_key(issued.key) or ("", "")
    assert (tenant_id, key_id) == ("acme_corp", issued.key_id)
    assert len(issued.key) == len("acme_corp_api_") + keys.KEY_ID_LENGTH + keys.SECRET_LENGTH
    assert keys.key_matches(b"p" * 32, issued.salt, issued.key_hash, issued.key)
    assert not keys.key_matches(b"q" * 32, issued.salt, issued.key_hash, issued.key)
    assert issued.key_hash != keys.issue_key("acme_corp", b"p" * 32).key_hash


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "acme_corp",
        "acme_corp_api_",
        "acme_corp_api_short",
        "_api_" + "a" * 52,
        "x_api_" + "é" * 52,
    ],
)
def test_malformed_keys_are_refused_before_any_lookup(candidate: str) -> None:
    assert keys.parse_key(candidate) is None


def test_key_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The authenticator compares the stored hash with hmac.compare_digest, never `==`."""
    compared: list[bytes] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    pepper = b"p" * 32
    issued = keys.issue_key("acme_corp", pepper)
    now = datetime.now(UTC)

    async def scenario() -> None:
        store = DuckDBStore.open(tmp_path / "store.duckdb")
        await store.create_tenant(
            TenantRecord("acme_corp", "Acme", "admin@acme.com", "STARTER", now),
            ApiKeyRecord(issued.key_id, "acme_corp", issued.salt, issued.key_hash, now),
        )
        authenticator = Authenticator(store, pepper, KeyRecordCache(ttl=0))
        monkeypatch.setattr(hmac, "compare_digest", recording)
        assert (await authenticator.authenticate(issued.key)).tenant_id == "acme_corp"
        with pytest.raises(Unauthenticated):
            # Another last character (the key's own may be "0").
            await authenticator.authenticate(
                issued.key[:-1] + ("1" if issued.key[-1] == "0" else "0")
            )
        await store.close()

    asyncio.run(scenario())
    assert compared == [issued.key_hash, issued.key_hash]


def test_a_cached_key_record_still_needs_the_right_secret(http: httpx.Client) -> None:
    _, key = onboard(http)
    assert http.get("/health", headers={"X-API-Key": key}).status_code == 200
    wrong_secret = key[: -keys.SECRET_LENGTH] + "x" * keys.SECRET_LENGTH
    assert http.get("/health", headers={"X-API-Key": wrong_secret}).status_code == 401
    assert http.get("/health", headers={"X-API-Key": key}).status_code == 200


def test_key_record_cache_expires_and_stays_bounded() -> None:
    now = [0.0]
    cache = KeyRecordCache(ttl=30, size=2, clock=lambda: now[0])
    records = [ApiKeyRecord(f"id{i}", "acme_corp", b"s", b"h", datetime.now(UTC)) for i in range(3)]
    for record in records:
        cache.put(record.key_id, record)
    assert cache.get("id0") == (False, None)  # evicted: the cache holds two
    assert cache.get("id2") == (True, records[2])
    cache.put("unknown", None)  # a key id the store does not have
    assert cache.get("unknown") == (True, None)
    now[0] = 30.0
    assert cache.get("id2") == (False, None)  # expired
    assert cache.get("unknown") == (False, None)
    disabled = KeyRecordCache(ttl=0)
    disabled.put("id0", records[0])
    assert disabled.get("id0") == (False, None)


def test_key_use_is_written_once_a_minute_per_key(tmp_path: Path) -> None:
    """A key used on every request costs no store write per request: its first use in a
    minute is noted, and the next flush writes what was noted (one call for every key)."""
    start = datetime(2026, 11, 30, 12, 0, 5, tzinfo=UTC)
    clock = [start]
    labels = {"operation": "record_key_use", "adapter": "embedded"}

    def writes() -> float:
        count = "convergence_store_operation_seconds_count"
        return metrics.REGISTRY.get_sample_value(count, labels) or 0.0

    async def last_used(store: DuckDBStore) -> datetime | None:
        (key,) = await store.list_api_keys("acme_corp")
        return key.last_used_at

    async def scenario() -> None:
        store = DuckDBStore.open(tmp_path / "store.duckdb")
        await store.create_tenant(
            TenantRecord("acme_corp", "Acme", "admin@acme.com", "STARTER", start),
            ApiKeyRecord("k1", "acme_corp", b"s", b"h", start),
        )
        access = AccessLog(metrics.timed_store(store, "embedded"), lambda: clock[0])
        before = writes()
        for second in range(5, 60):  # a request every second of the minute
            clock[0] = start.replace(second=second)
            access.used("k1")
        assert writes() == before  # nothing written per request
        await access.flush()
        assert writes() == before + 1 and await last_used(store) == start
        # Used again within the same minute: already noted, nothing to write.
        access.used("k1")
        await access.flush()
        assert writes() == before + 1 and await last_used(store) == start
        clock[0] = start + timedelta(minutes=1)
        access.used("k1")
        await access.flush()
        assert writes() == before + 2 and await last_used(store) == clock[0]
        await store.close()

    asyncio.run(scenario())
