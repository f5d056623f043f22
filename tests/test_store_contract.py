"""The storage contract: the same tests, the same answers, on every adapter of the port.

The embedded store runs on a DuckDB file; the BigQuery store runs on the real
google-cloud-bigquery client against the local emulator. Each test makes its own tenants,
and leaves no run PENDING or RUNNING (a claim may take any tenant's PENDING run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from unittest.mock import Mock

import duckdb
import pytest
from google.api_core.exceptions import ServiceUnavailable

from convergence_server.errors import AlreadyExists, Unavailable
from convergence_server.storage import Store, bigquery_runs, schema
from convergence_server.storage.bigquery_store import BigQueryStore
from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.records import (
    ApiKeyRecord,
    AuditFilter,
    AuditRecord,
    DqRecord,
    MemberAdmission,
    RunCursor,
    RunFilter,
    RunLimits,
    RunRecord,
    StepRecord,
    TenantRecord,
    TenantUsage,
    UsageRecord,
    WebhookRecord,
)
from tests.bigquery_emulator import PROJECT, Emulator
from tests.conftest import new_prefix

T = TypeVar("T")
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def open_store(kind: str, tmp_path: Path, emulator: Emulator | None, prefix: str) -> Store:
    if kind == "embedded":
        return DuckDBStore.open(tmp_path / "store.duckdb")
    assert emulator is not None
    return BigQueryStore.open(PROJECT, "US", prefix, emulator.endpoint)


@pytest.fixture(scope="module", params=["embedded", "bigquery"])
def adapter(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, str]]:
    """Which adapter, where its file lives, and its dataset prefix."""
    kind: str = request.param
    yield kind, tmp_path_factory.mktemp(kind), new_prefix()


@pytest.fixture(scope="module")
def store(adapter: tuple[str, Path, str], request: pytest.FixtureRequest) -> Iterator[Store]:
    kind, path, prefix = adapter
    emulator = request.getfixturevalue("emulator") if kind == "bigquery" else None
    opened = open_store(kind, path, emulator, prefix)
    yield opened
    run(opened.close())


def tenant(store: Store, plan: str = "PROFESSIONAL") -> str:
    tenant_id = f"c_{uuid.uuid4().hex[:12]}"
    now = datetime.now(UTC)
    record = TenantRecord(tenant_id, "Contract Co", "ops@contract.example", plan, now)
    key = ApiKeyRecord(f"k_{uuid.uuid4().hex[:12]}", tenant_id, b"salt", b"hash", now)
    assert run(store.create_tenant(record, key)) == schema.TENANT_DATASET_OBJECTS
    return tenant_id


def imposter(tenant_id: str) -> tuple[TenantRecord, ApiKeyRecord]:
    """Another onboarding of an id already taken, with a key of its own."""
    now = datetime.now(UTC)
    again = TenantRecord(tenant_id, "Imposter", "x@imposter.example", "SCALE", now)
    return again, ApiKeyRecord(f"k_imposter_{uuid.uuid4().hex[:8]}", tenant_id, b"s", b"h", now)


def new_run(tenant_id: str, created_at: datetime | None = None, key: str = "") -> RunRecord:
    return RunRecord(
        pipeline_logging_id=str(uuid.uuid4()),
        pipeline_id="test-runs-quick",
        tenant_id=tenant_id,
        provider="test",
        domain="runs",
        template="quick",
        status="PENDING",
        trigger_type="manual",
        trigger_by="api",
        user_id="",
        parameters={"date": "2026-01-02"},
        created_at=created_at or datetime.now(UTC),
        idempotency_key=key,
    )


def usage_row(store: Store, tenant_id: str, day: date) -> UsageRecord | None:
    return run(store.usage(tenant_id, day)).row


def active_runs(store: Store, tenant_id: str) -> int:
    return run(store.usage(tenant_id, datetime.now(UTC).date())).active_runs


def claim(store: Store, tenant_id: str) -> RunRecord:
    """Claims runs until one of `tenant_id`'s comes (each test leaves none waiting)."""
    claimed = run(store.claim_next_run("worker-a", datetime.now(UTC)))
    assert claimed is not None and claimed.tenant_id == tenant_id
    return claimed


# -- schema -----------------------------------------------------------------------------


def test_schema_is_versioned_and_reopening_changes_nothing(
    store: Store, adapter: tuple[str, Path, str], request: pytest.FixtureRequest
) -> None:
    assert run(store.schema_version()) == schema.SCHEMA_VERSION
    columns = run(store.central_table_columns())
    for table in schema.CENTRAL_TABLES:
        assert table.column_names <= columns[table.name], table.name
    if adapter[0] == "bigquery":  # the embedded file cannot be opened twice at once
        kind, path, prefix = adapter
        again = open_store(kind, path, request.getfixturevalue("emulator"), prefix)
        assert run(again.schema_version()) == schema.SCHEMA_VERSION
        assert run(again.central_table_columns()) == columns
        run(again.close())


# -- tenants and keys -------------------------------------------------------------------


def test_a_tenant_is_stored_with_its_key_and_dataset(store: Store) -> None:
    tenant_id = tenant(store)
    stored = run(store.get_tenant(tenant_id))
    assert stored is not None
    assert (stored.company_name, stored.subscription_plan, stored.status) == (
        "Contract Co",
        "PROFESSIONAL",
        "ACTIVE",
    )
    assert run(store.dataset_exists(tenant_id))
    assert not run(store.dataset_exists(f"{tenant_id}_other"))
    assert run(store.tenant_ids_equal_ignoring_case(tenant_id.upper())) == [tenant_id]
    assert run(store.get_tenant("c_nobody")) is None
    assert run(store.get_api_key("k_nobody")) is None


def test_a_second_tenant_of_the_same_id_is_refused_and_changes_nothing(store: Store) -> None:
    tenant_id = tenant(store)
    again, key = imposter(tenant_id)
    with pytest.raises(AlreadyExists):
        run(store.create_tenant(again, key))
    stored = run(store.get_tenant(tenant_id))
    assert stored is not None and stored.company_name == "Contract Co"
    assert run(store.get_api_key(key.key_id)) is None
    assert run(store.dataset_exists(tenant_id))


def test_the_api_key_record_round_trips(store: Store) -> None:
    tenant_id = f"c_{uuid.uuid4().hex[:12]}"
    now = datetime.now(UTC).replace(microsecond=123456)
    key = ApiKeyRecord(f"k_{uuid.uuid4().hex[:12]}", tenant_id, b"\x00salt\xff", b"\x01h", now)
    record = TenantRecord(tenant_id, "Keys Co", "k@keys.example", "STARTER", now)
    run(store.create_tenant(record, key))
    assert run(store.get_api_key(key.key_id)) == key
    assert run(store.get_tenant(tenant_id)) == record


def test_a_plan_change_is_stored(store: Store) -> None:
    tenant_id = tenant(store)
    assert run(store.update_plan(tenant_id, "SCALE", 3, datetime.now(UTC))) == 0
    stored = run(store.get_tenant(tenant_id))
    assert stored is not None and stored.subscription_plan == "SCALE"
    assert run(store.update_plan("c_nobody", "SCALE", 3, datetime.now(UTC))) is None


def test_a_plan_change_is_refused_for_a_team_beyond_its_size(store: Store) -> None:
    """The team is counted with the change, in one step: the plan stays when it is larger
    than the new plan allows, and the caller learns its size."""
    tenant_id = tenant(store)
    now = datetime.now(UTC)
    for user_id in ("ann", "bob", "cat"):
        assert run(store.admit_member(tenant_id, user_id, "PROFESSIONAL", 5, now)).added
    assert run(store.update_plan(tenant_id, "STARTER", 2, now)) == 3
    stored = run(store.get_tenant(tenant_id))
    assert stored is not None and stored.subscription_plan == "PROFESSIONAL"
    assert run(store.update_plan(tenant_id, "STARTER", 3, now)) == 3  # exactly full: allowed
    stored = run(store.get_tenant(tenant_id))
    assert stored is not None and stored.subscription_plan == "STARTER"


def test_team_members_are_admitted_up_to_the_team_size(store: Store) -> None:
    tenant_id = tenant(store)
    now = datetime.now(UTC)

    def admit(user_id: str) -> tuple[bool, bool]:
        """(a member now, added by this call)"""
        answer = run(store.admit_member(tenant_id, user_id, "PROFESSIONAL", 2, now))
        assert answer.plan == "PROFESSIONAL"
        return answer.member, answer.added

    assert admit("ann") == (True, True)
    assert admit("ann") == (True, False)
    assert admit("bob") == (True, True)
    assert admit("cat") == (False, False)
    assert admit("ann") == (True, False)  # the team full
    assert [m.user_id for m in run(store.list_members(tenant_id))] == ["ann", "bob"]
    assert run(store.remove_member(tenant_id, "ann"))
    assert not run(store.remove_member(tenant_id, "ann"))
    assert admit("cat") == (True, True)


def test_no_member_is_admitted_under_a_plan_the_tenant_no_longer_has(store: Store) -> None:
    """A server whose copy of the plan is out of date (changed through another) offers
    the old plan's size: the store refuses, whatever the size, adds no one, and names the
    plan the tenant has now."""
    tenant_id = tenant(store)
    now = datetime.now(UTC)
    assert run(store.admit_member(tenant_id, "ann", "PROFESSIONAL", 5, now)).added
    assert run(store.update_plan(tenant_id, "STARTER", 3, now)) == 1
    stale = run(store.admit_member(tenant_id, "bob", "PROFESSIONAL", 5, now))
    assert stale == MemberAdmission(member=False, added=False, plan="STARTER")
    known = run(store.admit_member(tenant_id, "ann", "PROFESSIONAL", 5, now))
    assert known == MemberAdmission(member=True, added=False, plan="STARTER")
    assert [m.user_id for m in run(store.list_members(tenant_id))] == ["ann"]
    assert run(store.admit_member(tenant_id, "bob", "STARTER", 3, now)).added


# -- API keys and the audit log ----------------------------------------------------------


def test_usage_reads_the_days_row_the_runs_in_use_and_the_team_together(store: Store) -> None:
    """What GetUsage shows, in one read: on BigQuery one query job."""
    tenant_id = tenant(store)
    today = datetime.now(UTC).date()
    assert run(store.usage(tenant_id, today)) == TenantUsage(None, 0, 0)
    now = datetime.now(UTC)
    for user_id in ("ann", "bob"):
        run(store.admit_member(tenant_id, user_id, "PROFESSIONAL", 5, now))
    made = [new_run(tenant_id) for _ in range(2)]
    for one in made:
        assert run(store.create_run(one, LONG_AGO, RunLimits(daily=5, concurrent=5))).created
    usage, jobs = jobs_of(store, lambda: store.usage(tenant_id, today))
    assert jobs in (None, 1)
    assert (usage.active_runs, usage.team_members) == (2, 2)
    assert usage.row is not None
    assert (usage.row.pipelines_run_today, usage.row.concurrent_pipelines_running) == (2, 2)
    assert run(store.usage("c_nobody", today)) == TenantUsage(None, 0, 0)
    for one in made:
        run(store.request_cancel(tenant_id, one.pipeline_logging_id, datetime.now(UTC)))
    assert run(store.usage(tenant_id, today)).active_runs == 0


def new_key(tenant_id: str, created_at: datetime, **fields: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        f"k_{uuid.uuid4().hex[:12]}", tenant_id, b"\x00salt\xff", b"\x01hash", created_at, **fields
    )


def audit_row(
    tenant_id: str, event: str, at: datetime, target: str = "", **fields: Any
) -> AuditRecord:
    return AuditRecord(str(uuid.uuid4()), tenant_id, at, event, target=target, **fields)


def test_api_keys_are_created_listed_revoked_and_audited(store: Store) -> None:
    tenant_id = tenant(store)
    (onboarded,) = run(store.list_api_keys(tenant_id))
    assert (onboarded.name, onboarded.scope, onboarded.created_by) == ("", "FULL", "")
    assert (onboarded.expires_at, onboarded.replaced_by, onboarded.last_used_at) == (None, "", None)
    ids, looked_at = run(store.changed_api_keys(None))
    assert ids == [] and looked_at.tzinfo is not None
    now = (onboarded.created_at + timedelta(seconds=1)).replace(microsecond=654321)

    # Every field round-trips.
    made = new_key(
        tenant_id,
        now,
        name="ci-deploy",
        scope="READ_ONLY",
        created_by=f"key:{onboarded.key_id} user:ann",
        expires_at=now + timedelta(days=1, microseconds=7),
    )
    created = audit_row(
        tenant_id,
        "api_key.created",
        now,
        made.key_id,
        actor_key_id=onboarded.key_id,
        actor_user_id="ann",
        detail="ci-deploy",
        request_id="req-1",
        client_address="192.0.2.7",
    )
    run(store.create_api_key(made, created))
    assert run(store.get_api_key(made.key_id)) == made

    # Neither an expired key nor a read-only one can stand in for the tenant's last full
    # key: its revocation is refused, and the key stays as it was.
    expired = new_key(tenant_id, now - timedelta(hours=2), expires_at=now - timedelta(hours=1))
    earlier = now - timedelta(seconds=1)
    run(
        store.create_api_key(
            expired, audit_row(tenant_id, "api_key.created", earlier, expired.key_id)
        )
    )
    refused = run(
        store.revoke_api_key(
            tenant_id, onboarded.key_id, now, audit_row(tenant_id, "api_key.revoked", now)
        )
    )
    assert refused == onboarded

    # Another full key is active: the revocation applies, once.
    spare = new_key(tenant_id, now + timedelta(seconds=1), name="spare")
    spared = audit_row(tenant_id, "api_key.created", spare.created_at, spare.key_id)
    run(store.create_api_key(spare, spared))
    assert run(store.list_api_keys(tenant_id)) == [spare, made, onboarded, expired]
    assert run(store.list_api_keys("c_nobody")) == []
    revoked_at = now + timedelta(seconds=2)
    revoked = run(
        store.revoke_api_key(
            tenant_id,
            onboarded.key_id,
            revoked_at,
            audit_row(tenant_id, "api_key.revoked", revoked_at, onboarded.key_id),
        )
    )
    assert revoked == replace(onboarded, revoked_at=revoked_at)
    again = run(
        store.revoke_api_key(
            tenant_id,
            onboarded.key_id,
            revoked_at + timedelta(seconds=1),
            audit_row(tenant_id, "api_key.revoked", revoked_at, "again"),
        )
    )
    assert again == revoked
    assert run(store.get_api_key(onboarded.key_id)) == revoked
    for owner, key_id in (("c_someone_else", made.key_id), (tenant_id, "k_nobody")):
        audit = audit_row(owner, "api_key.revoked", revoked_at, "nobody")
        assert run(store.revoke_api_key(owner, key_id, revoked_at, audit)) is None
    assert run(store.get_api_key(made.key_id)) == made

    # Written in the changes' transactions: the refused and repeated ones wrote no row.
    logged = run(store.list_audit(AuditFilter(tenant_id), None, 10))
    assert [(r.event, r.target) for r in logged] == [
        ("api_key.revoked", onboarded.key_id),
        ("api_key.created", spare.key_id),
        ("api_key.created", made.key_id),
        ("api_key.created", expired.key_id),
    ]
    assert logged[2] == created
    assert run(store.list_audit(AuditFilter("c_someone_else"), None, 10)) == []

    # Replicas learn of the revocation from BigQuery; the embedded store has no replicas.
    changed, now_then = run(store.changed_api_keys(looked_at - timedelta(seconds=60)))
    assert now_then >= looked_at
    if store.kind == "bigquery":
        assert onboarded.key_id in changed and spare.key_id in changed
    else:
        assert changed == []


def test_api_keys_rotate_within_a_grace_period_and_record_their_last_use(store: Store) -> None:
    tenant_id = tenant(store)
    (old,) = run(store.list_api_keys(tenant_id))
    now = (old.created_at + timedelta(seconds=1)).replace(microsecond=250000)

    # Last use only moves forward, in one statement for many keys (unknown ones skipped).
    run(store.record_key_use({}))
    run(store.record_key_use({old.key_id: now, "k_nobody": now}))
    run(store.record_key_use({old.key_id: now - timedelta(minutes=1)}))
    used = run(store.get_api_key(old.key_id))
    assert used == replace(old, last_used_at=now)

    # The old key expires at the end of the grace period (it had no expiry of its own).
    grace = now + timedelta(hours=1)
    first = new_key(tenant_id, now, name="rotated", expires_at=now + timedelta(minutes=30))
    rotated = run(
        store.rotate_api_key(
            tenant_id,
            old.key_id,
            first,
            grace,
            audit_row(tenant_id, "api_key.rotated", now, old.key_id, detail=first.key_id),
        )
    )
    assert rotated == replace(used, replaced_by=first.key_id, expires_at=grace)
    assert run(store.get_api_key(first.key_id)) == first
    assert run(store.get_api_key(old.key_id)) == rotated

    # A key expiring before the grace period ends keeps its own expiry.
    later = now + timedelta(minutes=1)
    second = new_key(tenant_id, later, name="rotated")
    kept = run(
        store.rotate_api_key(
            tenant_id,
            first.key_id,
            second,
            later + timedelta(days=1),
            audit_row(tenant_id, "api_key.rotated", later, first.key_id),
        )
    )
    assert kept == replace(first, replaced_by=second.key_id)

    # Keys replaced by a rotation (working until their grace ends) do not keep the tenant
    # in: the revocation of their last replacement is refused, and it stays as it was.
    refusal = audit_row(tenant_id, "api_key.revoked", later, second.key_id)
    assert run(store.revoke_api_key(tenant_id, second.key_id, later, refusal)) == second

    # A revoked key is not rotated: returned as it is, and no new key is stored.
    revoked_at = later + timedelta(seconds=1)
    run(
        store.revoke_api_key(
            tenant_id,
            first.key_id,
            revoked_at,
            audit_row(tenant_id, "api_key.revoked", revoked_at, first.key_id),
        )
    )
    third = new_key(tenant_id, revoked_at + timedelta(seconds=1))
    audit = audit_row(tenant_id, "api_key.rotated", third.created_at, "refused")
    refused = run(store.rotate_api_key(tenant_id, first.key_id, third, grace, audit))
    assert refused == replace(kept, revoked_at=revoked_at)
    assert run(store.get_api_key(third.key_id)) is None
    assert run(store.rotate_api_key("c_someone_else", second.key_id, third, grace, audit)) is None
    assert run(store.get_api_key(third.key_id)) is None
    assert [k.key_id for k in run(store.list_api_keys(tenant_id))] == [
        second.key_id,
        first.key_id,
        old.key_id,
    ]
    logged = run(store.list_audit(AuditFilter(tenant_id), None, 10))
    assert [(r.event, r.target) for r in logged] == [
        ("api_key.revoked", first.key_id),
        ("api_key.rotated", first.key_id),
        ("api_key.rotated", old.key_id),
    ]


def test_the_audit_log_lists_newest_first_in_pages_and_filters(store: Store) -> None:
    tenant_id = f"c_{uuid.uuid4().hex[:12]}"  # rows need no tenant: no onboarding here
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    events = ["auth.failed", "quota.refused", "auth.failed", "member.added", "auth.failed"]
    rows = [
        audit_row(tenant_id, event, base + timedelta(minutes=i), f"t{i}", count=i + 1)
        for i, event in enumerate(events)
    ]
    # Two rows of one time: the id orders them.
    tied = replace(rows[1], event_id=f"{rows[1].event_id[:-1]}!", target="tied")
    full = replace(
        rows[3],
        actor_key_id="k_actor",
        actor_user_id="ann",
        detail="added ann",
        request_id="req-9",
        client_address="2001:db8::1",
    )
    rows[3] = full
    stranger = audit_row(f"{tenant_id}x", "auth.failed", base, "elsewhere")
    run(store.add_audit([*rows, tied, stranger]))
    run(store.add_audit([]))

    newest_first = sorted([*rows, tied], key=lambda r: (r.event_time, r.event_id), reverse=True)
    everything = run(store.list_audit(AuditFilter(tenant_id), None, 10))
    assert everything == newest_first
    assert everything[1] == full and everything[1].count == 4

    pages, after = [], None
    while True:
        page = run(store.list_audit(AuditFilter(tenant_id), after, 4))
        pages.append(page)
        if len(page) < 4:
            break
        after = (page[-1].event_time, page[-1].event_id)
    assert [len(p) for p in pages] == [4, 2]
    assert [r for p in pages for r in p] == newest_first

    auth = run(store.list_audit(AuditFilter(tenant_id, frozenset({"auth.failed"})), None, 10))
    assert [r.target for r in auth] == ["t4", "t2", "t0"]
    window = AuditFilter(
        tenant_id,
        frozenset({"auth.failed", "quota.refused"}),
        start=base + timedelta(minutes=1),
        end=base + timedelta(minutes=4),
    )
    assert sorted(r.target for r in run(store.list_audit(window, None, 10))) == [
        "t1",
        "t2",
        "tied",
    ]


# -- admission --------------------------------------------------------------------------


def test_admission_refuses_over_the_concurrent_then_the_daily_limit(store: Store) -> None:
    tenant_id = tenant(store)
    limits = RunLimits(daily=3, concurrent=2)
    first, second = new_run(tenant_id), new_run(tenant_id)
    assert run(store.create_run(first, LONG_AGO, limits)).created
    assert run(store.create_run(second, LONG_AGO, limits)).created
    refused = run(store.create_run(new_run(tenant_id), LONG_AGO, limits))
    assert (refused.created, refused.refused, refused.used, refused.run) == (
        False,
        "concurrent",
        2,
        None,
    )
    assert active_runs(store, tenant_id) == 2
    cancel = run(store.request_cancel(tenant_id, first.pipeline_logging_id, datetime.now(UTC)))
    cancelled = cancel.run
    assert cancel.ended and cancelled is not None and cancelled.status == "FAILED"
    assert cancelled.error_message == "Cancelled before it started"
    assert run(store.create_run(new_run(tenant_id), LONG_AGO, limits)).created
    run(store.request_cancel(tenant_id, second.pipeline_logging_id, datetime.now(UTC)))
    daily = run(store.create_run(new_run(tenant_id), LONG_AGO, limits))
    assert (daily.refused, daily.used) == ("daily", 3)

    usage = usage_row(store, tenant_id, datetime.now(UTC).date())
    assert usage is not None
    assert (usage.pipelines_run_today, usage.pipelines_failed_today) == (3, 2)
    assert (usage.concurrent_pipelines_running, usage.max_concurrent_reached) == (1, 2)
    assert (usage.daily_limit, usage.concurrent_limit) == (3, 2)
    for waiting in run(store.list_runs(RunFilter(tenant_id, status="PENDING"), None, 10)):
        run(store.request_cancel(tenant_id, waiting.pipeline_logging_id, datetime.now(UTC)))
    assert active_runs(store, tenant_id) == 0


def test_an_idempotency_key_replays_its_run_uncounted_until_it_expires(store: Store) -> None:
    tenant_id = tenant(store)
    limits = RunLimits(daily=10, concurrent=10)
    original = new_run(tenant_id, key="nightly-2026-01-02")
    assert run(store.create_run(original, LONG_AGO, limits)).created
    replay = run(store.create_run(new_run(tenant_id, key="nightly-2026-01-02"), LONG_AGO, limits))
    assert not replay.created and replay.run is not None
    assert replay.run.pipeline_logging_id == original.pipeline_logging_id
    # Keys used before `keys_valid_from` have expired: the same key starts a new run.
    later = datetime.now(UTC) + timedelta(seconds=1)
    fresh = new_run(tenant_id, key="nightly-2026-01-02")
    assert run(store.create_run(fresh, later, limits)).created
    usage = usage_row(store, tenant_id, datetime.now(UTC).date())
    assert usage is not None and usage.pipelines_run_today == 2
    for made in (original, fresh):
        run(store.request_cancel(tenant_id, made.pipeline_logging_id, datetime.now(UTC)))


def test_parallel_triggers_admit_exactly_the_concurrent_limit(store: Store) -> None:
    tenant_id = tenant(store)
    limits = RunLimits(daily=100, concurrent=3)

    async def burst() -> list[bool]:
        made = [new_run(tenant_id) for _ in range(8)]
        results = await asyncio.gather(*(store.create_run(r, LONG_AGO, limits) for r in made))
        return [a.created for a in results]

    assert sum(run(burst())) == 3
    assert active_runs(store, tenant_id) == 3
    usage = usage_row(store, tenant_id, datetime.now(UTC).date())
    assert usage is not None and usage.pipelines_run_today == 3
    for waiting in run(store.list_runs(RunFilter(tenant_id), None, 10)):
        run(store.request_cancel(tenant_id, waiting.pipeline_logging_id, datetime.now(UTC)))


def test_a_burst_of_tenants_keys_and_limits_is_admitted_exactly(store: Store) -> None:
    """Triggers of three tenants at once (the embedded store commits them together): each
    tenant's limit holds, a key sent twice in the burst starts one run, a key of an earlier
    run finds it, and the usage rows count what was admitted."""
    first, second, third = tenant(store), tenant(store), tenant(store)
    earlier = new_run(first, key="early")
    run(store.create_run(earlier, LONG_AGO, RunLimits(100, 100)))

    async def burst() -> list[tuple[RunRecord, Any]]:
        made = [new_run(first, key="early"), new_run(first, key="twice")]
        made += [new_run(first, key="twice")] + [new_run(first) for _ in range(4)]
        made += [new_run(second) for _ in range(3)] + [new_run(third) for _ in range(2)]
        limits = {first: RunLimits(100, 4), second: RunLimits(2, 100), third: None}
        answers = await asyncio.gather(
            *(store.create_run(r, LONG_AGO, limits[r.tenant_id]) for r in made)
        )
        return list(zip(made, answers, strict=True))

    outcomes = run(burst())
    by_tenant = {t: [a for r, a in outcomes if r.tenant_id == t] for t in (first, second, third)}
    replay = outcomes[0][1]
    assert replay.run == earlier and not replay.created
    twice = [a for r, a in outcomes if r.idempotency_key == "twice"]
    assert len({a.run.pipeline_logging_id for a in twice if a.run is not None}) <= 1
    # first: 4 slots, one taken by `earlier`: 3 new runs, the rest refused as concurrent.
    assert sum(a.created for a in by_tenant[first]) == 3
    assert {a.refused for a in by_tenant[first] if not a.created and a.run is None} == {
        "concurrent"
    }
    assert sum(a.created for a in by_tenant[second]) == 2
    assert {a.refused for a in by_tenant[second] if not a.created} == {"daily"}
    assert sum(a.created for a in by_tenant[third]) == 2
    if store.exclusive:  # one process admits them in the order they came
        assert all(a.run is not None for a in twice)
        assert [a.created for a in by_tenant[second]] == [True, True, False]
        assert [a.created or a.run is not None for a in by_tenant[first]] == [
            True,
            True,
            True,
            True,
            True,
            False,
            False,
        ]
    today = datetime.now(UTC).date()
    for tenant_id, runs_today in ((first, 4), (second, 2), (third, 2)):
        usage = usage_row(store, tenant_id, today)
        assert usage is not None and usage.pipelines_run_today == runs_today, tenant_id
        assert active_runs(store, tenant_id) == runs_today
        assert usage.concurrent_pipelines_running == runs_today
        for waiting in run(store.list_runs(RunFilter(tenant_id), None, 10)):
            run(store.request_cancel(tenant_id, waiting.pipeline_logging_id, datetime.now(UTC)))


def test_bursts_after_the_first_are_counted_row_for_row(store: Store) -> None:
    """The embedded store writes a burst whose counts and usage row it knows in one call
    (the row's values written into the statement): each later burst still adds exactly
    what it admitted, sets the concurrency and takes the limits it was checked against."""
    tenant_id = tenant(store)
    today = datetime.now(UTC).date()

    def burst(count: int, limits: RunLimits | None) -> list[bool]:
        async def together() -> list[bool]:
            made = [new_run(tenant_id) for _ in range(count)]
            answers = await asyncio.gather(*(store.create_run(r, LONG_AGO, limits) for r in made))
            return [a.created for a in answers]

        return run(together())

    assert burst(3, RunLimits(daily=10, concurrent=5)) == [True] * 3
    assert usage_row(store, tenant_id, today) == UsageRecord(tenant_id, today, 3, 0, 0, 3, 3, 10, 5)
    created = burst(4, RunLimits(daily=10, concurrent=6))
    assert sum(created) == 3
    if store.exclusive:  # one process admits them in the order they came
        assert created == [True, True, True, False]
    assert usage_row(store, tenant_id, today) == UsageRecord(tenant_id, today, 6, 0, 0, 6, 6, 10, 6)
    for waiting in run(store.list_runs(RunFilter(tenant_id), None, 2)):
        run(store.request_cancel(tenant_id, waiting.pipeline_logging_id, datetime.now(UTC)))
    assert burst(2, None) == [True, True]  # no limits: none checked, the row's kept
    assert usage_row(store, tenant_id, today) == UsageRecord(tenant_id, today, 8, 0, 2, 6, 6, 10, 6)
    assert burst(3, RunLimits(daily=9, concurrent=20)) == [True, False, False]
    assert usage_row(store, tenant_id, today) == UsageRecord(tenant_id, today, 9, 0, 2, 7, 7, 9, 20)
    for waiting in run(store.list_runs(RunFilter(tenant_id, status="PENDING"), None, 10)):
        run(store.request_cancel(tenant_id, waiting.pipeline_logging_id, datetime.now(UTC)))


def test_a_run_ending_days_after_it_was_created_counts_on_both_days(store: Store) -> None:
    """Its creation and its success count on the day it was created; its end sets the
    concurrency of the day it ends, whose row takes the tenant's last limits."""
    tenant_id = tenant(store)
    today = datetime.now(UTC)
    old = new_run(tenant_id, today - timedelta(days=2))
    assert run(store.create_run(old, LONG_AGO, RunLimits(daily=10, concurrent=5))).created
    claimed = claim(store, tenant_id)
    assert run(store.finish_run(claimed, "COMPLETE", today)) is not None
    assert usage_row(store, tenant_id, today.date() - timedelta(days=1)) is None
    assert usage_row(store, tenant_id, today.date()) == UsageRecord(
        tenant_id, today.date(), 0, 0, 0, 0, 0, 10, 5
    )
    assert run(store.create_run(new_run(tenant_id), LONG_AGO, RunLimits(20, 8))).created
    assert usage_row(store, tenant_id, today.date()) == UsageRecord(
        tenant_id, today.date(), 1, 0, 0, 1, 1, 20, 8
    )
    assert usage_row(store, tenant_id, old.created_at.date()) == UsageRecord(
        tenant_id, old.created_at.date(), 1, 1, 0, 1, 1, 10, 5
    )
    assert usage_row(store, tenant_id, today.date() + timedelta(days=1)) is None
    cancelled = run(store.list_runs(RunFilter(tenant_id, status="PENDING"), None, 10))
    run(store.request_cancel(tenant_id, cancelled[0].pipeline_logging_id, today))


# -- execution --------------------------------------------------------------------------


def test_a_claimed_run_ends_only_for_its_worker_and_once(store: Store) -> None:
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    claimed = claim(store, tenant_id)
    assert (claimed.pipeline_logging_id, claimed.status, claimed.worker_id) == (
        made.pipeline_logging_id,
        "RUNNING",
        "worker-a",
    )
    assert claimed.start_time is not None
    assert run(store.claim_next_run("worker-b", datetime.now(UTC))) is None
    stranger = replace(claimed, worker_id="worker-b")
    assert run(store.finish_run(stranger, "COMPLETE", datetime.now(UTC))) is None
    ended_at = claimed.start_time + timedelta(milliseconds=1500)
    ended = run(store.finish_run(claimed, "COMPLETE", ended_at))
    assert ended is not None
    assert (ended.status, ended.duration_ms, ended.end_time) == ("COMPLETE", 1500, ended_at)
    assert run(store.finish_run(claimed, "FAILED", datetime.now(UTC), "late")) is None
    stored = run(store.get_run(tenant_id, made.pipeline_logging_id))
    assert stored == ended
    assert run(store.get_run("c_someone_else", made.pipeline_logging_id)) is None
    usage = usage_row(store, tenant_id, datetime.now(UTC).date())
    assert usage is not None
    assert (usage.pipelines_succeeded_today, usage.concurrent_pipelines_running) == (1, 0)
    assert run(store.typical_run_ms(tenant_id)) == 1500


def test_a_run_keeps_its_trace_through_its_changes(store: Store) -> None:
    tenant_id = tenant(store)
    made = replace(new_run(tenant_id), trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    claimed = claim(store, tenant_id)
    ended = run(store.finish_run(claimed, "FAILED", datetime.now(UTC), "broken"))
    assert ended is not None and ended.trace_id == made.trace_id
    assert run(store.get_run(tenant_id, made.pipeline_logging_id)) == ended


def test_webhook_settings_are_appended_and_the_newest_is_read(store: Store) -> None:
    tenant_id = tenant(store)
    assert run(store.get_webhook(tenant_id)) is None
    first = WebhookRecord(tenant_id, "https://a.example/x", "s1", datetime.now(UTC), "key:k1")
    audit = AuditRecord(str(uuid.uuid4()), tenant_id, datetime.now(UTC), "webhook.set")
    run(store.save_webhook(first, audit))
    assert run(store.get_webhook(tenant_id)) == first
    later = replace(first, url="https://b.example/y", updated_at=first.updated_at + timedelta(1))
    run(store.save_webhook(later, replace(audit, event_id=str(uuid.uuid4()))))
    assert run(store.get_webhook(tenant_id)) == later
    assert run(store.get_webhook(tenant(store))) is None  # another tenant's is its own
    gone = replace(later, url="", deleted=True, updated_at=later.updated_at + timedelta(1))
    run(
        store.save_webhook(
            gone, replace(audit, event_id=str(uuid.uuid4()), event="webhook.deleted")
        )
    )
    assert run(store.get_webhook(tenant_id)) is None
    rows = run(store.list_audit(AuditFilter(tenant_id), None, 10))
    assert sorted(r.event for r in rows) == ["webhook.deleted", "webhook.set", "webhook.set"]


def test_a_running_run_is_flagged_for_cancellation(store: Store) -> None:
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    claimed = claim(store, tenant_id)
    assert not run(store.cancel_requested(claimed))
    cancel = run(store.request_cancel(tenant_id, made.pipeline_logging_id, datetime.now(UTC)))
    flagged = cancel.run
    assert flagged is not None and (flagged.status, flagged.cancel_requested) == ("RUNNING", True)
    assert not cancel.ended
    assert run(store.cancel_requested(claimed))
    ended = run(store.finish_run(claimed, "FAILED", datetime.now(UTC), "Cancelled"))
    assert ended is not None and ended.status == "FAILED"
    assert run(store.request_cancel(tenant_id, "no-such-run", datetime.now(UTC))).run is None


def step_of(
    made: RunRecord, index: int, status: str, started: datetime, attempt: int = 1
) -> StepRecord:
    """Step `index` of the run's `attempt`, started `index` seconds after `started`."""
    return StepRecord(
        step_logging_id=f"{made.pipeline_logging_id}-{attempt}-{index}",
        pipeline_logging_id=made.pipeline_logging_id,
        pipeline_id=made.pipeline_id,
        tenant_id=made.tenant_id,
        step_name=f"step_{index}",
        step_type="query",
        step_index=index,
        status=status,
        step_start_time=started + timedelta(seconds=index),
        run_attempt=attempt,
    )


def test_steps_and_dq_results_are_kept_per_attempt(store: Store) -> None:
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    claimed = claim(store, tenant_id)
    started = datetime.now(UTC)

    def step(index: int, status: str, attempt: int = 1) -> StepRecord:
        return step_of(made, index, status, started, attempt)

    run(store.save_step(step(0, "RUNNING")))
    # A step boundary: the end of one and the start of the next, written together.
    ended = replace(step(0, "COMPLETE"), rows_processed=7, attempts=1)
    run(store.save_steps([ended, step(1, "RUNNING")]))
    # The server crashes mid-step: the run goes back to PENDING, its RUNNING step closes.
    assert run(store.requeue_run(claimed, datetime.now(UTC), count_attempt=True))
    steps = run(store.list_steps(tenant_id, made.pipeline_logging_id))
    assert [(s.step_name, s.status, s.rows_processed) for s in steps] == [
        ("step_0", "COMPLETE", 7),
        ("step_1", "FAILED", 0),
    ]
    assert steps[1].error_message.startswith("Interrupted")
    again = claim(store, tenant_id)
    assert again.attempt == 2
    run(store.save_step(step(0, "RUNNING", attempt=2)))
    assert [s.run_attempt for s in run(store.list_steps(tenant_id, made.pipeline_logging_id))] == [
        2
    ]
    dq = DqRecord(
        dq_result_id=str(uuid.uuid4()),
        pipeline_logging_id=made.pipeline_logging_id,
        pipeline_id=made.pipeline_id,
        tenant_id=tenant_id,
        step_name="step_0",
        check_name="has_rows",
        check_type="row_count",
        severity="error",
        status="PASSED",
        observed_value="7",
        expected_value="1..",
        message="7 rows",
        ingestion_date=started.date(),
        created_at=started,
        run_attempt=2,
    )
    failed = replace(dq, dq_result_id=str(uuid.uuid4()), status="FAILED", check_index=1)
    run(store.add_dq_results(again, [dq, failed]))
    assert run(store.finish_run(again, "COMPLETE", datetime.now(UTC))) is not None
    assert [s.status for s in run(store.list_steps(tenant_id, made.pipeline_logging_id))] == [
        "FAILED"
    ]


@pytest.mark.parametrize("skew", [timedelta(0), timedelta(minutes=11)])
def test_a_run_handed_back_lists_the_steps_of_its_latest_execution(
    store: Store, skew: timedelta
) -> None:
    """A stop hands the run back in its attempt; once it is claimed again, the run is read
    with the steps its new execution writes, not those the interrupted one began (the
    attempt's step rows keep them). With `skew`, the interrupted execution ran on a clock
    ahead (another replica's): the new one's steps, timed after its claim, still show."""
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run_id = made.pipeline_logging_id
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    claimed = claim(store, tenant_id)
    began = datetime.now(UTC) - timedelta(minutes=1) + skew  # its steps 0 and 1 s later
    run(store.save_step(step_of(made, 0, "RUNNING", began)))
    run(store.save_steps([step_of(made, 0, "COMPLETE", began), step_of(made, 1, "RUNNING", began)]))
    assert run(store.requeue_run(claimed, began, count_attempt=False))
    interrupted = run(store.run_with_steps(tenant_id, run_id))[1]
    assert [(s.step_index, s.status) for s in interrupted] == [(0, "COMPLETE"), (1, "FAILED")]

    again = claim(store, tenant_id)
    assert again.attempt == claimed.attempt and again.start_time is not None
    first = replace(
        step_of(made, 0, "RUNNING", again.start_time + timedelta(milliseconds=1)),
        step_logging_id=str(uuid.uuid4()),
    )
    run(store.save_step(first))
    assert len(run(store.list_steps(tenant_id, run_id))) == 3  # the attempt's rows
    ended = replace(first, status="FAILED", step_end_time=first.step_start_time)
    run(store.save_step(ended))
    assert run(store.finish_run(again, "FAILED", datetime.now(UTC), "step_0 failed")) is not None
    listed = run(store.run_with_steps(tenant_id, run_id))[1]
    if skew:
        assert ended in listed
    else:
        assert listed == [ended]


def test_a_step_has_one_row_however_it_is_saved(store: Store) -> None:
    """A step saved before its run was claimed, then by the run's worker; another closed
    by its worker; a third left RUNNING: one row each, and only the third is closed as
    interrupted when the run ends."""
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    started = datetime.now(UTC)

    def step(index: int, status: str) -> StepRecord:
        return step_of(made, index, status, started)

    run(store.save_step(step(0, "RUNNING")))
    claimed = claim(store, tenant_id)
    run(store.save_step(replace(step(0, "COMPLETE"), rows_processed=3)))
    run(store.save_step(step(1, "RUNNING")))
    run(store.save_steps([replace(step(1, "COMPLETE"), rows_processed=4), step(2, "RUNNING")]))
    assert run(store.finish_run(claimed, "FAILED", datetime.now(UTC), "boom")) is not None
    steps = run(store.list_steps(tenant_id, made.pipeline_logging_id))
    assert [(s.step_name, s.status, s.rows_processed) for s in steps] == [
        ("step_0", "COMPLETE", 3),
        ("step_1", "COMPLETE", 4),
        ("step_2", "FAILED", 0),
    ]
    assert steps[2].error_message.startswith("Interrupted")


def jobs_of(store: Store, call: Callable[[], Coroutine[Any, Any, T]]) -> tuple[T, int | None]:
    """`call()`'s answer, and the query jobs it started on BigQuery (None: the embedded
    store, which has no jobs)."""
    if not isinstance(store, BigQueryStore):
        return run(call()), None
    with query_jobs(store) as sent:
        answer = run(call())
    return answer, len(sent)


@contextlib.contextmanager
def query_jobs(store: Store) -> Iterator[list[str]]:
    """The SQL of each query job the BigQuery `store` starts meanwhile (by `jobs.insert`
    or `jobs.query`)."""
    client = store._bq.client  # type: ignore[attr-defined]
    jobs: list[str] = []
    started = {name: getattr(client, name) for name in ("query", "query_and_wait")}

    def counted(start: Callable[..., Any]) -> Callable[..., Any]:
        def count(sql: str, *args: Any, **kwargs: Any) -> Any:
            jobs.append(sql)
            return start(sql, *args, **kwargs)

        return count

    for name, start in started.items():
        setattr(client, name, counted(start))
    try:
        yield jobs
    finally:
        for name, start in started.items():
            setattr(client, name, start)


@contextlib.contextmanager
def replicas(emulator: Emulator, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two BigQuery stores on one dataset prefix, as two server processes would have."""
    prefix = new_prefix()
    first, second = (open_store("bigquery", tmp_path, emulator, prefix) for _ in range(2))
    try:
        yield first, second
    finally:
        run(first.close())
        run(second.close())


def test_each_bigquery_replica_reads_an_ended_run_once(emulator: Emulator, tmp_path: Path) -> None:
    """An ended run never changes again, so a replica answers it from memory after one
    query job (the one that ended it, none at all); a run still going elsewhere is read
    every time, and a cached run is still another tenant's secret."""
    with replicas(emulator, tmp_path) as (ending, reading):
        tenant_id = tenant(ending)
        made = new_run(tenant_id)
        run(ending.create_run(made, LONG_AGO, RunLimits(10, 10)))
        claimed = claim(ending, tenant_id)
        with query_jobs(reading) as jobs:
            for _ in range(2):  # RUNNING on another replica: read each time
                found = run(reading.get_run(tenant_id, made.pipeline_logging_id))
                assert found is not None and found.status == "RUNNING"
        assert len(jobs) == 2
        ended = run(ending.finish_run(claimed, "COMPLETE", datetime.now(UTC)))
        assert ended is not None
        with query_jobs(reading) as jobs:
            for _ in range(3):
                assert run(reading.get_run(tenant_id, made.pipeline_logging_id)) == ended
            assert run(reading.get_run("another_tenant", made.pipeline_logging_id)) is None
        assert len(jobs) == 1
        with query_jobs(ending) as jobs:
            assert run(ending.get_run(tenant_id, made.pipeline_logging_id)) == ended
        assert jobs == []


def test_a_cancel_of_a_run_the_caller_read_changes_it_in_one_job(store: Store) -> None:
    """CancelRun reads the run, then asks the store to cancel it as read: on BigQuery the
    change names the run's partition and answers its state after, with no read of its
    own (one transaction job to end a PENDING run or flag a RUNNING one, two if it was
    claimed since it was read). It says whether it ended the run: of two cancels of a run
    both read PENDING, the first."""
    tenant_id = tenant(store)
    first = new_run(tenant_id)
    run(store.create_run(first, LONG_AGO, RunLimits(10, 10)))
    claimed = claim(store, tenant_id)
    started_since = new_run(tenant_id)
    run(store.create_run(started_since, LONG_AGO, RunLimits(10, 10)))
    read_pending = run(store.get_run(tenant_id, started_since.pipeline_logging_id))
    assert read_pending is not None
    started = claim(store, tenant_id)
    assert started.pipeline_logging_id == started_since.pipeline_logging_id
    waiting = new_run(tenant_id)
    run(store.create_run(waiting, LONG_AGO, RunLimits(10, 10)))
    read = run(store.get_run(tenant_id, waiting.pipeline_logging_id))
    assert read is not None
    misnamed = new_run(tenant_id)
    run(store.create_run(misnamed, LONG_AGO, RunLimits(10, 10)))
    now = datetime.now(UTC)
    # A record of another tenant's run is not taken for the run named.
    other = run(store.request_cancel("another_tenant", read.pipeline_logging_id, now, read))
    assert other.run is None and not other.ended
    cases = (
        (read, "FAILED", False, True, 1),
        (claimed, "RUNNING", True, False, 1),
        (read_pending, "RUNNING", True, False, 2),
        # A record naming another partition changes nothing there: read, then cancelled.
        (
            replace(misnamed, created_at=misnamed.created_at - timedelta(days=3)),
            *("FAILED", False, True, 4),
        ),
        # A second cancel of a run read PENDING (two cancels at once): the first one ended
        # it, this one did not (it alone would alert and count the end twice).
        (read, "FAILED", False, False, 3),
    )
    for known, status, flagged, ended, jobs in cases:
        cancel, sent = jobs_of(
            store, lambda k=known: store.request_cancel(tenant_id, k.pipeline_logging_id, now, k)
        )
        after = cancel.run
        assert after is not None and (after.status, after.cancel_requested) == (status, flagged)
        assert cancel.ended is ended
        assert after == stored_run(store, tenant_id, known.pipeline_logging_id)
        assert sent in (None, jobs)
    for running in (claimed, started):
        assert run(store.finish_run(running, "FAILED", now, "Cancelled")) is not None


def stored_run(store: Store, tenant_id: str, run_id: str) -> RunRecord | None:
    """The run as stored (on BigQuery read there, not answered from the replica's memory)."""
    if isinstance(store, BigQueryStore):
        return run(bigquery_runs.get_run(store._db, tenant_id, run_id))  # type: ignore[attr-defined]
    return run(store.get_run(tenant_id, run_id))


def pending_run(store: Store) -> tuple[str, str]:
    """A new tenant with one PENDING run: their ids."""
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    return tenant_id, made.pipeline_logging_id


def test_a_run_is_read_with_its_steps(store: Store) -> None:
    tenant_id, run_id = pending_run(store)
    assert run(store.run_with_steps(tenant_id, run_id)) == (
        run(store.get_run(tenant_id, run_id)),
        [],
    )
    claimed = claim(store, tenant_id)
    first = step_of(claimed, 0, "RUNNING", datetime.now(UTC), claimed.attempt)
    run(store.save_step(first))
    ended = replace(first, status="COMPLETE", rows_processed=3, step_end_time=datetime.now(UTC))
    run(
        store.save_steps(
            [ended, step_of(claimed, 1, "RUNNING", datetime.now(UTC), claimed.attempt)]
        )
    )
    run(store.finish_run(claimed, "COMPLETE", datetime.now(UTC)))
    got, steps = run(store.run_with_steps(tenant_id, run_id))
    assert got == run(store.get_run(tenant_id, run_id)) and got is not None
    assert got.status == "COMPLETE"
    assert steps == run(store.list_steps(tenant_id, run_id))
    assert [(s.step_index, s.status) for s in steps] == [(0, "COMPLETE"), (1, "FAILED")]
    assert run(store.run_with_steps("another_tenant", run_id)) == (None, [])
    assert run(store.run_with_steps(tenant_id, str(uuid.uuid4()))) == (None, [])


def test_a_run_is_read_with_the_checks_of_its_attempt(store: Store) -> None:
    """ListRunChecks: the run and its current attempt's checks (on BigQuery one query job
    for a run this replica does not execute)."""
    tenant_id, run_id = pending_run(store)
    assert run(store.run_with_checks(tenant_id, run_id)) == (
        run(store.get_run(tenant_id, run_id)),
        [],
    )
    first, now = claim(store, tenant_id), datetime.now(UTC)
    run(store.add_dq_results(first, [dq_result(first, "checks", 0, "rows", now)]))
    assert run(store.requeue_run(first, now, count_attempt=True))
    again = claim(store, tenant_id)
    checks = [
        dq_result(again, "checks", i, name, now + timedelta(seconds=1))
        for i, name in enumerate(("rows", "labels"))
    ]
    run(store.add_dq_results(again, checks))
    assert run(store.finish_run(again, "COMPLETE", now)) is not None
    (got, found), jobs = jobs_of(store, lambda: store.run_with_checks(tenant_id, run_id))
    assert got == stored_run(store, tenant_id, run_id) and got is not None
    assert (got.status, got.attempt) == ("COMPLETE", 2)
    assert found == run(store.list_dq_results(tenant_id, run_id, 2))
    assert [(c.check_name, c.run_attempt) for c in found] == [("rows", 2), ("labels", 2)]
    assert jobs in (None, 1)
    assert run(store.run_with_checks("another_tenant", run_id)) == (None, [])
    assert run(store.run_with_checks(tenant_id, str(uuid.uuid4()))) == (None, [])


def test_a_bigquery_replica_answers_the_runs_it_executes(
    emulator: Emulator, tmp_path: Path
) -> None:
    """The replica executing a run answers it, and whether its cancel was asked, without a
    query job, exact for the changes made there (its claim, its warnings, a cancel asked
    there); another replica's cancel or recovery shows from its next heartbeat, which reads
    them back."""
    with replicas(emulator, tmp_path) as (executing, other):
        tenant_id = tenant(executing)
        made, now = new_run(tenant_id), datetime.now(UTC)
        run_id = made.pipeline_logging_id
        run(executing.create_run(made, LONG_AGO, RunLimits(10, 10)))
        claimed = claim(executing, tenant_id)
        warned = dq_result(claimed, "checks", 0, "labels", now, severity="warn", status="FAILED")
        run(executing.add_dq_results(claimed, [warned]))
        with query_jobs(executing) as jobs:
            for _ in range(3):
                assert run(executing.get_run(tenant_id, run_id)) == replace(claimed, warnings=1)
            assert run(executing.get_run("another_tenant", run_id)) is None
            assert not run(executing.cancel_requested(claimed))
        assert jobs == []
        assert run(other.get_run(tenant_id, run_id)) == replace(claimed, warnings=1)
        with query_jobs(other) as jobs:  # not executing it there: read from its partition
            assert not run(other.cancel_requested(claimed))
        assert len(jobs) == 1 and "@created_at" in jobs[0]

        asked = run(other.request_cancel(tenant_id, run_id, now)).run
        assert asked is not None and asked.cancel_requested
        assert run(other.cancel_requested(claimed))
        with query_jobs(executing) as jobs:  # one heartbeat behind
            before = run(executing.get_run(tenant_id, run_id))
            assert before is not None and not before.cancel_requested
            assert not run(executing.cancel_requested(claimed))
        assert jobs == []
        run(executing.heartbeat([run_id], "worker-a"))
        with query_jobs(executing) as jobs:
            assert run(executing.get_run(tenant_id, run_id)) == replace(asked, warnings=1)
            assert run(executing.cancel_requested(claimed))
        assert jobs == []

        assert run(other.requeue_run(asked, now, count_attempt=True))  # its lease ran out
        run(executing.heartbeat([run_id], "worker-a"))
        with query_jobs(executing) as jobs:
            requeued = run(executing.get_run(tenant_id, run_id))
        assert requeued is not None and (requeued.status, requeued.attempt) == ("PENDING", 2)
        assert len(jobs) == 1
        assert run(executing.finish_run(claimed, "COMPLETE", now)) is None  # not its run now

        let_go = claim(executing, tenant_id)  # attempt 2
        run(executing.heartbeat([], "worker-b"))  # another worker's: not a word on this run
        with query_jobs(executing) as jobs:
            assert run(executing.get_run(tenant_id, let_go.pipeline_logging_id)) == let_go
        assert jobs == []
        run(executing.heartbeat([], "worker-a"))  # its worker no longer names it
        with query_jobs(executing) as jobs:
            assert run(executing.get_run(tenant_id, let_go.pipeline_logging_id)) == let_go
        assert len(jobs) == 1


def test_a_bigquery_replica_keeps_a_cancel_asked_there_whatever_the_order_its_calls_end(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim committed, its caller not yet back, while a cancel on the same replica flags
    the run: the claimed run kept there has the flag. A cancel that committed but whose
    caller got no answer (gone, timed out) leaves the run to be read from BigQuery. Either
    way GetRun and the worker's check say what BigQuery says, not one heartbeat later."""
    prefix = new_prefix()
    store = open_store("bigquery", tmp_path, emulator, prefix)
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run_id = made.pipeline_logging_id
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    claim_next_run, request_cancel = bigquery_runs.claim_next_run, bigquery_runs.request_cancel

    async def cancelled_before_the_claim_is_back() -> RunRecord | None:
        committed, resume = asyncio.Event(), asyncio.Event()

        async def held(*args: Any) -> RunRecord | None:
            claimed = await claim_next_run(*args)
            committed.set()
            await resume.wait()
            return claimed

        monkeypatch.setattr(bigquery_runs, "claim_next_run", held)
        claiming = asyncio.create_task(store.claim_next_run("worker-a", datetime.now(UTC)))
        await asyncio.wait_for(committed.wait(), 60)
        seen = await store.get_run(tenant_id, run_id)
        asked = await store.request_cancel(tenant_id, run_id, datetime.now(UTC), seen)
        assert asked.run is not None and asked.run.cancel_requested
        resume.set()
        return await claiming

    try:
        claimed = run(cancelled_before_the_claim_is_back())
        assert claimed is not None and claimed.cancel_requested
        assert run(store.cancel_requested(claimed))
        assert run(store.get_run(tenant_id, run_id)) == run(
            bigquery_runs.get_run(store._db, tenant_id, run_id)  # type: ignore[attr-defined]
        )
        assert run(store.finish_run(claimed, "FAILED", datetime.now(UTC), "Cancelled"))
        monkeypatch.undo()

        again = new_run(tenant_id)
        run(store.create_run(again, LONG_AGO, RunLimits(10, 10)))
        executing = claim(store, tenant_id)

        async def answer_lost(*args: Any) -> Any:
            await request_cancel(*args)
            raise asyncio.CancelledError  # the caller went away after the commit

        monkeypatch.setattr(bigquery_runs, "request_cancel", answer_lost)
        with pytest.raises(asyncio.CancelledError):
            run(store.request_cancel(tenant_id, again.pipeline_logging_id, datetime.now(UTC)))
        assert run(store.cancel_requested(executing))
        found = run(store.get_run(tenant_id, again.pipeline_logging_id))
        assert found is not None and found.cancel_requested
        assert run(store.finish_run(executing, "FAILED", datetime.now(UTC), "Cancelled"))
    finally:
        run(store.close())


def test_a_bigquery_replica_answers_the_steps_of_runs_it_executes(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Once the attempt it executes has a step written there, the replica answers the
    run's steps from memory, exactly as BigQuery would: after reading once the steps the
    attempt had before its claim (a run handed back keeps its attempt). A step write that
    failed (it may be stored or not) sends reads to BigQuery again."""
    with replicas(emulator, tmp_path) as (executing, other):
        tenant_id = tenant(executing)
        made, started = new_run(tenant_id), datetime.now(UTC)
        run_id = made.pipeline_logging_id
        run(executing.create_run(made, LONG_AGO, RunLimits(10, 10)))

        def step(index: int, status: str) -> StepRecord:
            return replace(step_of(made, index, status, started), step_logging_id=str(uuid.uuid4()))

        def listed(jobs: int) -> list[StepRecord]:
            with query_jobs(executing) as sent:
                found = run(executing.list_steps(tenant_id, run_id))
            assert len(sent) == jobs
            assert found == run(other.list_steps(tenant_id, run_id))
            return found

        claimed = claim(executing, tenant_id)
        assert claimed.start_time is not None
        started = claimed.start_time  # its steps start after their claim
        assert listed(1) == []  # nothing written here yet: BigQuery's newest attempt
        first = step(0, "RUNNING")
        run(executing.save_step(first))
        assert listed(1) == [first]  # the attempt's earlier steps, read once
        ended, second = replace(first, status="COMPLETE", rows_processed=5), step(1, "RUNNING")
        with query_jobs(executing) as jobs:  # a step boundary: one INSERT
            run(executing.save_steps([ended, second]))
        assert len(jobs) == 1
        assert listed(0) == [ended, second]
        assert run(executing.list_steps("another_tenant", run_id)) == []
        for store, jobs in ((executing, 0), (other, 1)):  # a WatchRun update
            with query_jobs(store) as sent:
                found = run(store.run_with_steps(tenant_id, run_id))
            assert len(sent) == jobs, sent
            assert found == (run(other.get_run(tenant_id, run_id)), [ended, second])

        # A stopping server hands the run back: the same attempt, its RUNNING step closed.
        assert run(executing.requeue_run(claimed, started, count_attempt=False))
        again = claim(executing, tenant_id)
        assert again.attempt == claimed.attempt
        before = listed(1)
        assert [(s.status, s.error_message[:11]) for s in before] == [
            ("COMPLETE", ""),
            ("FAILED", "Interrupted"),
        ]
        restarted = replace(step(1, "RUNNING"), step_start_time=started + timedelta(minutes=1))
        run(executing.save_step(restarted))
        assert listed(1) == [*before, restarted]
        assert listed(0) == [*before, restarted]

        client = executing._bq.client  # type: ignore[attr-defined]
        query, client.query_and_wait = (
            client.query_and_wait,
            Mock(side_effect=ServiceUnavailable("")),
        )
        with pytest.raises(Unavailable):
            run(executing.save_step(replace(restarted, status="COMPLETE")))
        client.query_and_wait = query
        assert listed(1) == [*before, restarted]
        assert listed(1) == [*before, restarted]


def test_a_bigquery_admission_that_fails_fails_its_own_triggers_only(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Triggers of a tenant that arrive together are admitted in order, a transaction for
    consecutive plain ones and one for a trigger with an idempotency key: when the keyed
    one's transaction fails, its caller alone sees the failure, and the triggers before and
    after it are admitted."""
    store = open_store("bigquery", tmp_path, emulator, new_prefix())
    try:
        tenant_id = tenant(store)
        client = store._bq.client  # type: ignore[attr-defined]
        send = client.query_and_wait

        def query(sql: str, *args: Any, **kwargs: Any) -> Any:
            values = {p.name: p.value for p in kwargs["job_config"].query_parameters}
            if values.get("idempotency_key") == "k1":
                raise ServiceUnavailable("the keyed admission's transaction")
            return send(sql, *args, **kwargs)

        client.query_and_wait = query
        made = [new_run(tenant_id), new_run(tenant_id), new_run(tenant_id, key="k1")]
        made.append(new_run(tenant_id))

        async def together() -> list[Any]:
            limits = RunLimits(10, 10)
            admissions = (store.create_run(r, LONG_AGO, limits) for r in made)
            return await asyncio.gather(*admissions, return_exceptions=True)

        with query_jobs(store) as jobs:
            answers = run(together())
        client.query_and_wait = send
        assert [a.created for a in answers[:2]] == [True, True], answers
        assert isinstance(answers[2], Unavailable) and answers[3].created, answers
        assert len(jobs) == 3, jobs  # the first two together, the keyed one, the last
        pending = run(store.list_runs(RunFilter(tenant_id, status="PENDING"), None, 10))
        assert sorted(ids(pending)) == sorted(ids([made[0], made[1], made[3]]))
        assert active_runs(store, tenant_id) == 3
        for waiting in pending:
            run(store.request_cancel(tenant_id, waiting.pipeline_logging_id, datetime.now(UTC)))
    finally:
        run(store.close())


def test_a_bigquery_replica_reads_only_the_partitions_of_runs_not_ended(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Claim polls read the run events from a horizon on (their partitioning column is
    `created_at`), learnt from the runs not ended at most once a minute and from every
    partition once an hour: a run that a replica whose clock is days behind admitted is
    not read by another replica until then, and is claimed then."""
    with replicas(emulator, tmp_path) as (admitting, claiming):
        tenant_id = tenant(admitting)
        now = datetime.now(UTC)
        first = new_run(tenant_id)
        run(admitting.create_run(first, LONG_AGO, None))
        with query_jobs(claiming) as jobs:
            claimed = run(claiming.claim_next_run("worker-b", now))
        assert claimed is not None and claimed.pipeline_logging_id == first.pipeline_logging_id
        assert "@horizon" not in jobs[0] and "@horizon" in jobs[1], jobs  # learnt, then bound
        run(claiming.finish_run(claimed, "COMPLETE", now))

        behind = new_run(tenant_id, now - timedelta(days=3))
        run(admitting.create_run(behind, LONG_AGO, None))
        for later in (timedelta(seconds=1), timedelta(minutes=2)):  # bound, then learnt bound
            assert run(claiming.claim_next_run("worker-b", now + later)) is None
            assert run(claiming.pending_runs(now + later))[0] == 0
        assert run(admitting.pending_runs(now)) == (1, behind.created_at)  # its own admission

        an_hour_on = now + timedelta(minutes=61)  # every partition again
        assert run(claiming.pending_runs(an_hour_on)) == (1, behind.created_at)
        late = run(claiming.claim_next_run("worker-b", an_hour_on))
        assert late is not None and late.pipeline_logging_id == behind.pipeline_logging_id
        assert run(claiming.cancel_requested(late)) is False
        run(claiming.heartbeat([late.pipeline_logging_id], "worker-b"))
        ended = run(claiming.finish_run(late, "COMPLETE", an_hour_on))
        assert ended is not None and ended.status == "COMPLETE"


def assert_usage_from_counters(store: Store, expected: UsageRecord) -> None:
    """The BigQuery `store` reads `expected` with one query job, not from the usage view."""
    with query_jobs(store) as jobs:
        assert usage_row(store, expected.tenant_id, expected.usage_date) == expected
    assert len(jobs) == 1 and "tenant_usage_quotas" not in jobs[0], jobs


def test_a_bigquery_replica_reads_todays_usage_from_the_counters_and_todays_partition(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Today's usage is one query job over the tenant's counters and today's partition of
    the run events: an event in an older partition (here one made up, which the usage
    view counts) is not read."""
    store = open_store("bigquery", tmp_path, emulator, new_prefix())
    try:
        tenant_id = tenant(store)
        made = new_run(tenant_id)
        run(store.create_run(made, LONG_AGO, RunLimits(daily=10, concurrent=5)))
        events = store._db.table("tenant_run_events")  # type: ignore[attr-defined]
        store._query(  # type: ignore[attr-defined]
            f"INSERT INTO {events} SELECT * REPLACE ('ghost' AS pipeline_logging_id, "
            "TIMESTAMP_SUB(created_at, INTERVAL 30 DAY) AS created_at, 'finished' AS event, "
            f"99 AS active_after) FROM {events} WHERE tenant_id = @t",
            t=tenant_id,
        )
        today = made.created_at.date()
        view = store._query(  # type: ignore[attr-defined]
            "SELECT max_concurrent_reached FROM "
            f"{store._db.table('tenant_usage_quotas')} "  # type: ignore[attr-defined]
            "WHERE tenant_id = @t AND usage_date = @d",
            t=tenant_id,
            d=today,
        )
        assert view == [(99,)]
        assert_usage_from_counters(store, UsageRecord(tenant_id, today, 1, 0, 0, 1, 1, 10, 5))
        run(store.request_cancel(tenant_id, made.pipeline_logging_id, datetime.now(UTC)))
    finally:
        run(store.close())


@contextlib.contextmanager
def migrated_from(
    version: int, store: Store, prefix: str, emulator: Emulator, tmp_path: Path
) -> Iterator[Store]:
    """The BigQuery `store` (of dataset `prefix`) closed as a store of schema `version`
    (its later migrations forgotten), and opened again: migrated to the newest."""
    db = store._db  # type: ignore[attr-defined]
    try:
        db.query(f"DELETE FROM {db.table('schema_migrations')} WHERE version > @v", v=version)
    finally:
        run(store.close())
    again = open_store("bigquery", tmp_path, emulator, prefix)
    try:
        assert run(again.schema_version()) == schema.SCHEMA_VERSION
        yield again
    finally:
        run(again.close())


def test_a_bigquery_store_of_schema_9_fills_the_tenants_usage_counters(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Migration 10 adds the usage columns to the counters of the tenants there are and
    fills them from the usage view: today's usage reads the same after it (and a tenant
    with no run yet has none)."""
    prefix = new_prefix()
    store = open_store("bigquery", tmp_path, emulator, prefix)
    tenant_id, idle = tenant(store), tenant(store)
    made = new_run(tenant_id)
    for _ in range(2):
        run(store.create_run(new_run(tenant_id), LONG_AGO, RunLimits(10, 5)))
    run(store.create_run(made, LONG_AGO, RunLimits(10, 5)))
    for waiting in run(store.list_runs(RunFilter(tenant_id, status="PENDING"), None, 10)):
        if waiting.pipeline_logging_id != made.pipeline_logging_id:
            run(store.request_cancel(tenant_id, waiting.pipeline_logging_id, datetime.now(UTC)))
    today = made.created_at.date()
    expected = UsageRecord(tenant_id, today, 3, 0, 2, 1, 3, 10, 5)
    assert usage_row(store, tenant_id, today) == expected
    db = store._db  # type: ignore[attr-defined]
    for owner in (tenant_id, idle):
        counters = db.table(f"tenant_run_counters_{owner}")
        for name in ("usage_day", "usage_peak", "daily_limit", "concurrent_limit"):
            db.query(f"ALTER TABLE {counters} DROP COLUMN {name}")
    with migrated_from(9, store, prefix, emulator, tmp_path) as store:
        assert_usage_from_counters(store, expected)
        assert usage_row(store, idle, today) is None
        run(store.request_cancel(tenant_id, made.pipeline_logging_id, datetime.now(UTC)))


def forget_attempts(kind: str, store: Store, tmp_path: Path, tenant_id: str) -> None:
    """The tenant's runs, steps and checks as written before schema versions 2 and 3 (no
    attempt), and the store closed as one of schema 11, which left them so."""
    tables = {
        "tenant_pipeline_runs": "attempt",
        "tenant_step_logs": "run_attempt",
        "tenant_dq_results": "run_attempt",
    }
    if kind == "bigquery":
        db = store._db  # type: ignore[attr-defined]
        tables["tenant_run_events"] = tables.pop("tenant_pipeline_runs")
        tables["tenant_step_events"] = tables.pop("tenant_step_logs")
        for table, column in tables.items():
            db.query(
                f"UPDATE {db.table(table)} SET {column} = NULL WHERE tenant_id = @t", t=tenant_id
            )
        db.query(f"DELETE FROM {db.table('schema_migrations')} WHERE version > 11")
        run(store.close())
        return
    run(store.close())
    with duckdb.connect(str(tmp_path / "store.duckdb")) as db:
        for table, column in tables.items():
            db.execute(
                f"UPDATE tenants.{table} SET {column} = NULL WHERE tenant_id = ?", [tenant_id]
            )
        db.execute("DELETE FROM tenants.schema_migrations WHERE version > 11")


@pytest.mark.parametrize("kind", ["embedded", "bigquery"])
def test_runs_in_flight_before_attempts_were_recorded_end_after_the_upgrade(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Migration 12 gives the runs, steps and checks written before attempts were recorded
    the attempt reads gave them (1). Before it, a run RUNNING or PENDING at the upgrade
    could never be requeued or ended (the guards compare attempts, and NULL matches
    nothing), and the steps of such runs were not listed."""
    emulator = request.getfixturevalue("emulator") if kind == "bigquery" else None
    prefix = new_prefix()
    store = open_store(kind, tmp_path, emulator, prefix)
    tenant_id = tenant(store)
    limits = RunLimits(10, 10)
    running, waiting = new_run(tenant_id), new_run(tenant_id)
    run(store.create_run(running, LONG_AGO, limits))
    claimed = claim(store, tenant_id)
    started = datetime.now(UTC)
    run(store.save_step(replace(step_of(running, 0, "COMPLETE", started), rows_processed=3)))
    run(store.add_dq_results(claimed, [dq_result(claimed, "step_0", 0, "has_rows", started)]))
    run(store.create_run(waiting, LONG_AGO, limits))
    forget_attempts(kind, store, tmp_path, tenant_id)

    store = open_store(kind, tmp_path, emulator, prefix)
    try:
        assert run(store.schema_version()) == schema.SCHEMA_VERSION
        run_id = running.pipeline_logging_id
        assert [(s.step_name, s.run_attempt) for s in run(store.list_steps(tenant_id, run_id))] == [
            ("step_0", 1)
        ]
        assert [c.check_name for c in run(store.list_dq_results(tenant_id, run_id, 1))] == [
            "has_rows"
        ]
        # The server that ran it is gone: its run goes back to the queue, an attempt used.
        (stale,) = run(store.stale_runs(datetime.now(UTC) + timedelta(hours=1)))
        assert (stale.pipeline_logging_id, stale.attempt) == (run_id, 1)
        assert run(store.requeue_run(stale, datetime.now(UTC), count_attempt=True))
        ended = []
        for _ in range(2):
            again = claim(store, tenant_id)
            ended.append(run(store.finish_run(again, "COMPLETE", datetime.now(UTC))))
        assert sorted((e.pipeline_logging_id, e.status, e.attempt) for e in ended if e) == sorted(
            [(run_id, "COMPLETE", 2), (waiting.pipeline_logging_id, "COMPLETE", 1)]
        )
        assert active_runs(store, tenant_id) == 0
    finally:
        run(store.close())


@pytest.mark.parametrize(
    ("version", "clustered"),
    [
        (
            10,
            {
                schema.TENANT_RUN_PUBLICATIONS.name: ["pipeline_logging_id"],
                schema.TENANT_IDEMPOTENCY_KEYS.name: ["tenant_id", "idempotency_key"],
            },
        ),
        (12, {schema.TENANT_MEMBERS.name: ["tenant_id"]}),
    ],
)
def test_a_bigquery_store_clusters_tables_by_what_reads_them(
    emulator: Emulator, tmp_path: Path, version: int, clustered: dict[str, list[str]]
) -> None:
    """Tables are read by the columns they are clustered by (a publication by its run, a
    key by its tenant and key, members by tenant), created so, or changed so by the
    migration after `version` (11, 13)."""
    prefix = new_prefix()

    def clustering(store: Store) -> dict[str, list[str] | None]:
        db = store._db  # type: ignore[attr-defined]
        return {
            name: db.runner.client.get_table(f"{db.name}.{name}").clustering_fields
            for name in clustered
        }

    store = open_store("bigquery", tmp_path, emulator, prefix)
    assert clustering(store) == clustered
    db = store._db  # type: ignore[attr-defined]
    for name in clustered:
        table = db.runner.client.get_table(f"{db.name}.{name}")
        table.clustering_fields = None
        db.runner.client.update_table(table, ["clustering_fields"])
    assert clustering(store) == dict.fromkeys(clustered)
    with migrated_from(version, store, prefix, emulator, tmp_path) as store:
        assert clustering(store) == clustered


def test_a_bigquery_first_page_of_runs_reads_from_where_the_last_one_ended(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A replica reads a filter's first page from the partitions where its last full first
    page ended (one query job), and the older ones too when runs left the filter since;
    every page is the one a replica without that memory reads."""
    with replicas(emulator, tmp_path) as (listing, fresh):
        tenant_id = tenant(listing)
        base = datetime.now(UTC) - timedelta(days=30)
        made = [new_run(tenant_id, base + timedelta(days=i)) for i in range(4)]
        for r in made:
            run(listing.create_run(r, LONG_AGO, None))

        def page(where: RunFilter, jobs: int) -> list[str]:
            with query_jobs(listing) as started:
                found = ids(run(listing.list_runs(where, None, 2)))
            assert found == ids(run(fresh.list_runs(where, None, 2)))
            assert len(started) == jobs, started
            return found

        everything, pending = RunFilter(tenant_id), RunFilter(tenant_id, status="PENDING")
        assert page(everything, 1) == ids(made[:1:-1])
        assert page(everything, 1) == ids(made[:1:-1])  # from made[2]'s partition on
        newer = new_run(tenant_id)
        run(listing.create_run(newer, LONG_AGO, None))
        assert page(everything, 1) == ids([newer, made[3]])
        assert page(pending, 1) == ids([newer, made[3]])
        for r in (newer, made[3]):  # they leave the filter: the older partitions are read
            run(listing.request_cancel(tenant_id, r.pipeline_logging_id, datetime.now(UTC)))
        assert page(pending, 2) == ids([made[2], made[1]])


def test_a_bigquery_replica_reads_a_tenants_typical_run_once_a_minute(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Each concurrency refusal's Retry-After reads the tenant's median run, over its
    history: a replica reads it once and keeps it a minute."""
    store = open_store("bigquery", tmp_path, emulator, new_prefix())
    try:
        tenant_id = tenant(store)
        run(store.create_run(new_run(tenant_id), LONG_AGO, None))
        claimed = claim(store, tenant_id)
        ended = run(store.finish_run(claimed, "COMPLETE", claimed.start_time + timedelta(7)))
        assert ended is not None and ended.duration_ms == 7 * 86_400_000
        with query_jobs(store) as jobs:
            assert [run(store.typical_run_ms(tenant_id)) for _ in range(3)] == [
                ended.duration_ms
            ] * 3
        assert len(jobs) == 1, jobs
    finally:
        run(store.close())


def test_concurrent_bigquery_reads_share_a_query_job_begun_after_them(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Calls of the same read that arrive while it is in flight share the next one, which
    begins when it ends: one query job for them all, and each still sees every write
    acknowledged before it was asked (the read in flight is held after its query ran)."""
    store = open_store("bigquery", tmp_path, emulator, new_prefix())
    client = store._bq.client  # type: ignore[attr-defined]
    query, jobs = client.query_and_wait, []
    first_ran, release = threading.Event(), threading.Event()

    def held_once(sql: str, *args: Any, **kwargs: Any) -> Any:
        jobs.append(sql)
        rows = query(sql, *args, **kwargs)  # the job has ended: its rows are here
        if len(jobs) == 1:
            first_ran.set()
            assert release.wait(120)
        return rows

    async def scenario(tenant_id: str) -> tuple[list[RunRecord], list[list[RunRecord]]]:
        early, late = new_run(tenant_id), new_run(tenant_id)
        await store.create_run(early, LONG_AGO, RunLimits(10, 10))
        listed = RunFilter(tenant_id)
        client.query_and_wait = held_once
        in_flight = asyncio.create_task(store.list_runs(listed, None, 50))
        assert await asyncio.to_thread(first_ran.wait, 120)
        await store.create_run(late, LONG_AGO, RunLimits(10, 10))
        after = [asyncio.create_task(store.list_runs(listed, None, 50)) for _ in range(10)]
        await asyncio.sleep(0)  # each asks for its read
        release.set()
        return await in_flight, await asyncio.gather(*after)

    try:
        tenant_id = tenant(store)
        before, after = run(scenario(tenant_id))
        assert len(before) == 1
        assert all(len(found) == 2 and found[1] == before[0] for found in after)
        assert all(found == after[0] for found in after)
        assert jobs.count(jobs[0]) == 2, jobs  # the one held, and one for the ten after it
    finally:
        client.query_and_wait = query
        release.set()
        run(store.close())


def test_a_burst_of_triggers_is_admitted_in_few_bigquery_transactions(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Triggers of one tenant that arrive together are admitted in arrival order, exactly
    by the limits, in one transaction for each run of plain triggers (a trigger with an
    idempotency key runs its own); the usage view counts them one by one."""
    store = open_store("bigquery", tmp_path, emulator, new_prefix())

    async def burst(made: list[RunRecord], limits: RunLimits) -> list[Any]:
        return await asyncio.gather(*(store.create_run(r, LONG_AGO, limits) for r in made))

    try:
        plain_tenant, keyed_tenant = tenant(store), tenant(store)
        plain = [new_run(plain_tenant) for _ in range(8)]
        with query_jobs(store) as jobs:
            answers = run(burst(plain, RunLimits(daily=10, concurrent=3)))
        assert [(a.created, a.refused, a.used) for a in answers] == [(True, "", 0)] * 3 + [
            (False, "concurrent", 3)
        ] * 5
        assert [a.run for a in answers[:3]] == plain[:3]
        assert sum("BEGIN TRANSACTION" in sql for sql in jobs) == 1

        mixed = [new_run(keyed_tenant, key="k-2" if i == 2 else "") for i in range(8)]
        with query_jobs(store) as jobs:
            answers = run(burst(mixed, RunLimits(daily=4, concurrent=10)))
        assert [(a.created, a.refused, a.used) for a in answers] == [(True, "", 0)] * 4 + [
            (False, "daily", 4)
        ] * 4
        assert [a.run for a in answers[:4]] == mixed[:4]
        assert sum("BEGIN TRANSACTION" in sql for sql in jobs) == 3  # 2 plain, keyed, 5 plain

        for tenant_id, created in ((plain_tenant, 3), (keyed_tenant, 4)):
            listed = run(store.list_runs(RunFilter(tenant_id), None, 50))
            assert len(listed) == created
            usage = usage_row(store, tenant_id, datetime.now(UTC).date())
            assert usage is not None
            assert (
                usage.pipelines_run_today,
                usage.concurrent_pipelines_running,
                usage.max_concurrent_reached,
            ) == (created, created, created)
    finally:
        run(store.close())


def dq_result(
    of: RunRecord, step: str, index: int, name: str, at: datetime, **fields: Any
) -> DqRecord:
    """A passed `error` check of `of`'s attempt; `fields` change it."""
    record = DqRecord(
        dq_result_id=str(uuid.uuid4()),
        pipeline_logging_id=of.pipeline_logging_id,
        pipeline_id=of.pipeline_id,
        tenant_id=of.tenant_id,
        step_name=step,
        check_name=name,
        check_type="not_null",
        severity="error",
        status="PASSED",
        observed_value="0",
        expected_value="0",
        message="0 rows with NULL label",
        ingestion_date=at.date(),
        created_at=at,
        run_attempt=of.attempt,
        failed_rows=0,
        check_index=index,
    )
    return replace(record, **fields)


def test_dq_results_count_warnings_per_attempt_and_list_in_order(store: Store) -> None:
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    first = claim(store, tenant_id)
    assert first.warnings == 0
    at = datetime.now(UTC)
    samples = ('{"n": "2", "label": null}', '{"n": "5", "label": null}')
    warned = {"severity": "warn", "status": "FAILED", "failed_rows": 2, "sample_rows": samples}
    validate = [
        dq_result(first, "validate", 0, "has_rows", at, check_type="row_count", failed_rows=None),
        dq_result(first, "validate", 1, "labelled", at, **warned),
        dq_result(first, "validate", 2, "positive", at),
    ]
    run(store.add_dq_results(first, validate))
    later = at + timedelta(seconds=1)
    run(store.add_dq_results(first, [dq_result(first, "recheck", 0, "labelled", later, **warned)]))
    stored = run(store.get_run(tenant_id, made.pipeline_logging_id))
    assert stored is not None and stored.warnings == 2
    listed = run(store.list_dq_results(tenant_id, made.pipeline_logging_id, 1))
    assert [(r.step_name, r.check_name, r.status, r.failed_rows) for r in listed] == [
        ("validate", "has_rows", "PASSED", None),
        ("validate", "labelled", "FAILED", 2),
        ("validate", "positive", "PASSED", 0),
        ("recheck", "labelled", "FAILED", 2),
    ]
    assert [json.loads(s) for s in listed[1].sample_rows] == [json.loads(s) for s in samples]
    assert (listed[0].sample_rows, listed[0].check_type) == ((), "row_count")
    assert run(store.list_dq_results("c_someone_else", made.pipeline_logging_id, 1)) == []

    # Handed back at a stop: the same attempt runs again from the start, its warnings anew;
    # a check recorded again is listed as recorded last.
    assert run(store.requeue_run(first, datetime.now(UTC), count_attempt=False))
    handed_back = run(store.get_run(tenant_id, made.pipeline_logging_id))
    assert handed_back is not None and (handed_back.attempt, handed_back.warnings) == (1, 0)
    rerun = claim(store, tenant_id)
    again = at + timedelta(seconds=2)
    run(store.add_dq_results(rerun, [dq_result(rerun, "validate", 1, "labelled", again)]))
    listed = run(store.list_dq_results(tenant_id, made.pipeline_logging_id, 1))
    assert [(r.step_name, r.check_name, r.status) for r in listed] == [
        ("validate", "has_rows", "PASSED"),
        ("validate", "positive", "PASSED"),
        ("recheck", "labelled", "FAILED"),
        ("validate", "labelled", "PASSED"),
    ]

    # Lost in a crash: the next attempt starts with no checks and no warnings, and a late
    # result of the lost execution neither counts nor shows in it.
    assert run(store.requeue_run(rerun, datetime.now(UTC), count_attempt=True))
    second = claim(store, tenant_id)
    assert (second.attempt, second.warnings) == (2, 0)
    run(store.add_dq_results(rerun, [dq_result(rerun, "validate", 1, "labelled", again, **warned)]))
    assert run(store.list_dq_results(tenant_id, made.pipeline_logging_id, 2)) == []
    run(
        store.add_dq_results(
            second, [dq_result(second, "validate", 1, "labelled", later, **warned)]
        )
    )
    ended = run(store.finish_run(second, "COMPLETE", datetime.now(UTC)))
    assert ended is not None and (ended.status, ended.warnings) == ("COMPLETE", 1)
    listed = run(store.list_dq_results(tenant_id, made.pipeline_logging_id, 2))
    assert [(r.check_name, r.run_attempt, r.status) for r in listed] == [("labelled", 2, "FAILED")]


def test_a_run_without_heartbeats_goes_stale(store: Store) -> None:
    tenant_id = tenant(store)
    made = new_run(tenant_id)
    run(store.create_run(made, LONG_AGO, RunLimits(10, 10)))
    claimed = claim(store, tenant_id)
    soon = datetime.now(UTC) + timedelta(seconds=30)
    assert made.pipeline_logging_id in {r.pipeline_logging_id for r in run(store.stale_runs(soon))}
    assert made.pipeline_logging_id not in {
        r.pipeline_logging_id for r in run(store.stale_runs(claimed.start_time - timedelta(1)))
    }
    before_beat = datetime.now(UTC)
    run(store.heartbeat([made.pipeline_logging_id], "worker-a"))
    fresh = {r.pipeline_logging_id for r in run(store.stale_runs(before_beat))}
    assert made.pipeline_logging_id not in fresh
    assert run(store.requeue_run(claimed, datetime.now(UTC), count_attempt=False))
    assert not run(store.requeue_run(claimed, datetime.now(UTC), count_attempt=False))
    requeued = run(store.get_run(tenant_id, made.pipeline_logging_id))
    assert requeued is not None and (requeued.status, requeued.attempt) == ("PENDING", 1)
    run(store.request_cancel(tenant_id, made.pipeline_logging_id, datetime.now(UTC)))


# -- the fair queue ------------------------------------------------------------------------


def queue(store: Store, tenant_id: str, count: int, first_at: datetime) -> list[RunRecord]:
    """`count` PENDING runs of the tenant, created a second apart from `first_at`."""
    made = [new_run(tenant_id, first_at + timedelta(seconds=i)) for i in range(count)]
    for r in made:
        assert run(store.create_run(r, LONG_AGO, None)).created
    return made


def claim_next(store: Store) -> RunRecord:
    claimed = run(store.claim_next_run("worker-a", datetime.now(UTC)))
    assert claimed is not None
    return claimed


def ids(runs: list[RunRecord]) -> list[str]:
    return [r.pipeline_logging_id for r in runs]


def test_the_queue_serves_tenants_in_turn_not_first_come_first_served(store: Store) -> None:
    """The next run is the oldest PENDING run of the tenant with the fewest RUNNING runs;
    among equals, of the tenant waiting longest: since its oldest PENDING run was queued,
    or since its last run ended if that is later."""
    base = datetime.now(UTC) - timedelta(hours=1)
    a, b, c = (tenant(store) for _ in range(3))
    # Each queues three runs at once, a first: FIFO would start all of a's, then b's...
    queued = {t: queue(store, t, 3, base + timedelta(minutes=i)) for i, t in enumerate((a, b, c))}
    first_turns = [claim_next(store) for _ in range(3)]
    assert ids(first_turns) == ids([queued[t][0] for t in (a, b, c)])
    assert {r.status for r in first_turns} == {"RUNNING"}

    # A fourth tenant queues one run, after all of theirs: it has nothing RUNNING, they
    # have a run each, so it goes before their backlogs.
    newcomer = tenant(store)
    (late,) = queue(store, newcomer, 1, base + timedelta(minutes=30))
    newcomers_turn = claim_next(store)
    assert newcomers_turn.pipeline_logging_id == late.pipeline_logging_id
    # Equals take turns, in the order they have waited.
    second_turns = [claim_next(store) for _ in range(3)]
    assert ids(second_turns) == ids([queued[t][1] for t in (a, b, c)])

    # c's first run ends, then a's: both have one run RUNNING again, and b two. c has been
    # waiting longer than a (since its run ended), though a's last run was queued first.
    ended_at = datetime.now(UTC) - timedelta(minutes=2)
    assert run(store.finish_run(first_turns[2], "COMPLETE", ended_at)) is not None
    later = ended_at + timedelta(minutes=1)
    assert run(store.finish_run(first_turns[0], "COMPLETE", later)) is not None
    last_turns = [claim_next(store) for _ in range(3)]
    assert ids(last_turns) == ids([queued[t][2] for t in (c, a, b)])
    assert run(store.claim_next_run("worker-a", datetime.now(UTC))) is None
    for r in [first_turns[1], newcomers_turn, *second_turns, *last_turns]:
        assert run(store.finish_run(r, "COMPLETE", datetime.now(UTC))) is not None


def test_runs_list_newest_first_in_pages_and_filter(store: Store) -> None:
    tenant_id = tenant(store)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    made = [new_run(tenant_id, base + timedelta(minutes=i)) for i in range(5)]
    for r in made:
        run(store.create_run(r, LONG_AGO, None))
    everything = run(store.list_runs(RunFilter(tenant_id), None, 10))
    assert [r.pipeline_logging_id for r in everything] == [
        r.pipeline_logging_id for r in reversed(made)
    ]
    assert everything[0] == made[-1]
    first = run(store.list_runs(RunFilter(tenant_id), None, 2))
    cursor = RunCursor(first[-1].created_at, first[-1].pipeline_logging_id)
    second = run(store.list_runs(RunFilter(tenant_id), cursor, 2))
    assert [r.pipeline_logging_id for r in first + second] == [
        r.pipeline_logging_id for r in everything[:4]
    ]
    window = RunFilter(
        tenant_id, created_from=made[1].created_at, created_before=made[3].created_at
    )
    assert [r.pipeline_logging_id for r in run(store.list_runs(window, None, 10))] == [
        made[2].pipeline_logging_id,
        made[1].pipeline_logging_id,
    ]
    run(store.request_cancel(tenant_id, made[0].pipeline_logging_id, datetime.now(UTC)))
    failed = run(store.list_runs(RunFilter(tenant_id, status="FAILED"), None, 10))
    assert [r.pipeline_logging_id for r in failed] == [made[0].pipeline_logging_id]
    assert run(store.list_runs(RunFilter(tenant_id, pipeline_id="other"), None, 10)) == []
    for r in made[1:]:
        run(store.request_cancel(tenant_id, r.pipeline_logging_id, datetime.now(UTC)))


def test_pages_of_runs_far_apart_in_time_miss_none(store: Store) -> None:
    """Runs minutes, days and years apart (and one in the future of the others' clock):
    every page, from the top or deep, with or without a time range, has the next runs."""
    tenant_id = tenant(store)
    now = datetime.now(UTC).replace(microsecond=0)
    ages = [timedelta(0), timedelta(minutes=2), timedelta(hours=5), timedelta(days=3)]
    ages += [timedelta(days=100), timedelta(days=800), timedelta(days=-1)]
    made = [new_run(tenant_id, now - age) for age in ages]
    for r in made:
        run(store.create_run(r, LONG_AGO, None))
    newest_first = [r.pipeline_logging_id for r in sorted(made, key=lambda r: r.created_at)][::-1]
    for size in (1, 2, 3):
        seen: list[str] = []
        cursor = None
        while True:
            page = run(store.list_runs(RunFilter(tenant_id), cursor, size))
            seen += [r.pipeline_logging_id for r in page]
            if len(page) < size:
                break
            cursor = RunCursor(page[-1].created_at, page[-1].pipeline_logging_id)
        assert seen == newest_first, size
    ranged = RunFilter(
        tenant_id, created_from=now - timedelta(days=1000), created_before=now - timedelta(days=2)
    )
    assert [r.pipeline_logging_id for r in run(store.list_runs(ranged, None, 2))] == [
        made[3].pipeline_logging_id,
        made[4].pipeline_logging_id,
    ]
    for r in made:
        run(store.request_cancel(tenant_id, r.pipeline_logging_id, datetime.now(UTC)))


def test_pending_runs_are_counted_with_the_oldest_creation(store: Store) -> None:
    count, _ = run(store.pending_runs(datetime.now(UTC)))
    tenant_id = tenant(store)
    oldest = datetime(2001, 1, 1, tzinfo=UTC)
    made = [new_run(tenant_id, oldest), new_run(tenant_id, oldest + timedelta(hours=1))]
    for r in made:
        run(store.create_run(r, LONG_AGO, None))
    assert run(store.pending_runs(datetime.now(UTC))) == (count + 2, oldest)
    for r in made:
        run(store.request_cancel(tenant_id, r.pipeline_logging_id, datetime.now(UTC)))
    assert run(store.pending_runs(datetime.now(UTC)))[0] == count


def test_bigquery_refuses_a_known_tenant_whose_dataset_is_gone(emulator: Emulator) -> None:
    """The dataset is the tenant's lock on BigQuery; if it was dropped by hand, the rows
    still refuse a second tenant of that id, and the new dataset is removed again."""
    store = BigQueryStore.open(PROJECT, "US", new_prefix(), emulator.endpoint)
    try:
        tenant_id = tenant(store)
        operator = emulator.client()
        operator.delete_dataset(store.dataset_of(tenant_id), delete_contents=True)
        operator.close()  # type: ignore[no-untyped-call]
        again, key = imposter(tenant_id)
        with pytest.raises(AlreadyExists):
            run(store.create_tenant(again, key))
        assert run(store.get_api_key(key.key_id)) is None
        assert not run(store.dataset_exists(tenant_id))
        stored = run(store.get_tenant(tenant_id))
        assert stored is not None and stored.company_name == "Contract Co"
    finally:
        run(store.close())
