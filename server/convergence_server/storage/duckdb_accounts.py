"""Tenants, API keys, the audit log, webhooks, plans and team members in the embedded store
(a part of DuckDBStore): each function runs its statements on the cursor it is given, on
one of the store's threads. The store decides which calls take turns: a tenant's key
revocations and rotations, plan changes and member admissions take the tenant's turn, as
its admissions do (DuckDB conflicts only on the same row, so two revokes of a tenant's
last two keys would not see each other otherwise), and DDL takes the store's DDL lock.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import duckdb

from convergence_server.errors import AlreadyExists, DeadlineExceeded
from convergence_server.storage import duckdb_runs as runs
from convergence_server.storage import schema
from convergence_server.storage.duckdb_runs import CENTRAL, create_table_sql
from convergence_server.storage.identifiers import quote_identifier
from convergence_server.storage.records import (
    ApiKeyRecord,
    AuditFilter,
    AuditRecord,
    MemberAdmission,
    MemberRecord,
    TenantRecord,
    WebhookRecord,
)
from convergence_server.storage.rows import (
    AUDIT_COLUMNS,
    KEY_COLUMNS,
    WEBHOOK_COLUMNS,
    audit_from_row,
    key_from_row,
    naive,
    webhook_from_row,
)
from convergence_server.storage.sql import to_duckdb

PROFILES = f"{CENTRAL}.tenant_profiles"
MEMBERS = f"{CENTRAL}.tenant_members"
KEYS = f"{CENTRAL}.tenant_api_keys"
AUDIT = f"{CENTRAL}.tenant_audit_log"
WEBHOOKS = f"{CENTRAL}.tenant_webhooks"
_KEY_SELECT = f"SELECT {KEY_COLUMNS} FROM {KEYS}"


class Abandoned(Exception):
    """The caller of a transaction went away before it committed."""


def comprehensive_view_sql(tenant_id: str) -> str:
    """The tenant's comprehensive view (`schema.comprehensive_view_sql`), in DuckDB SQL."""
    quote_identifier(tenant_id)
    (statement,) = to_duckdb(
        schema.comprehensive_view_sql(tenant_id, schema.CENTRAL_DATASET, tenant_id)
    )
    return statement


# -- tenants ------------------------------------------------------------------------------


def get_tenant(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> TenantRecord | None:
    row = cur.execute(
        "SELECT tenant_id, company_name, admin_email, subscription_plan, created_at, "
        f"status FROM {PROFILES} WHERE tenant_id = ?",
        [tenant_id],
    ).fetchone()
    if row is None:
        return None
    return TenantRecord(row[0], row[1], row[2], row[3], row[4].replace(tzinfo=UTC), row[5])


def tenant_ids_equal_ignoring_case(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> list[str]:
    rows = cur.execute(
        f"SELECT tenant_id FROM {PROFILES} WHERE lower(tenant_id) = lower(?)", [tenant_id]
    ).fetchall()
    return [row[0] for row in rows]


def create_tenant(
    cur: duckdb.DuckDBPyConnection,
    tenant: TenantRecord,
    key: ApiKeyRecord,
    abandoned: threading.Event,
    commit_by: float | None,
) -> tuple[str, ...]:
    """The tenant's rows, key, dataset and its objects, in one transaction; rolled back
    when `abandoned` is set or `commit_by` (monotonic) has passed before it commits."""
    dataset = quote_identifier(tenant.tenant_id)
    now = naive(tenant.created_at)
    cur.begin()
    try:
        cur.execute(
            f"INSERT INTO {PROFILES} VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                tenant.tenant_id,
                tenant.company_name,
                tenant.admin_email,
                tenant.subscription_plan,
                tenant.status,
                now,
                now,
            ],
        )
        _insert_key(cur, key)
        cur.execute(f"CREATE SCHEMA {dataset}")
        cur.execute(create_table_sql(tenant.tenant_id, schema.ONBOARDING_VALIDATION_TEST))
        cur.execute(
            f"INSERT INTO {dataset}.{schema.ONBOARDING_VALIDATION_TEST.name} VALUES (?, ?, ?, ?)",
            [
                str(uuid.uuid4()),
                tenant.tenant_id,
                now,
                "Dataset writable: onboarding validation row written.",
            ],
        )
        cur.execute(comprehensive_view_sql(tenant.tenant_id))
        if abandoned.is_set():
            raise Abandoned
        if commit_by is not None and time.monotonic() > commit_by:
            raise DeadlineExceeded("The deadline passed before onboarding finished")
        cur.commit()
    except (duckdb.ConstraintException, duckdb.CatalogException) as exc:
        runs.rollback(cur)
        if "already exists" in str(exc) or "Duplicate key" in str(exc):
            raise AlreadyExists(
                f"Tenant '{tenant.tenant_id}' or its dataset already exists"
            ) from exc
        raise
    except BaseException:
        runs.rollback(cur)
        raise
    return schema.TENANT_DATASET_OBJECTS


def delete_tenant(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> None:
    cur.begin()
    cur.execute(f"DELETE FROM {KEYS} WHERE tenant_id = ?", [tenant_id])
    cur.execute(f"DELETE FROM {PROFILES} WHERE tenant_id = ?", [tenant_id])
    cur.execute(f"DROP SCHEMA IF EXISTS {quote_identifier(tenant_id)} CASCADE")
    cur.commit()


# -- API keys and the audit log -----------------------------------------------------------


def get_api_key(cur: duckdb.DuckDBPyConnection, key_id: str) -> ApiKeyRecord | None:
    row = cur.execute(f"{_KEY_SELECT} WHERE key_id = ?", [key_id]).fetchone()
    return None if row is None else key_from_row(row)


def list_api_keys(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> list[ApiKeyRecord]:
    rows = cur.execute(
        f"{_KEY_SELECT} WHERE tenant_id = ? ORDER BY created_at DESC, key_id DESC", [tenant_id]
    ).fetchall()
    return [key_from_row(row) for row in rows]


def create_api_key(cur: duckdb.DuckDBPyConnection, key: ApiKeyRecord, audit: AuditRecord) -> None:
    cur.begin()
    try:
        _insert_key(cur, key)
        add_audit(cur, [audit])
        cur.commit()
    except BaseException:
        runs.rollback(cur)
        raise


def revoke_api_key(
    cur: duckdb.DuckDBPyConnection,
    tenant_id: str,
    key_id: str,
    now: datetime,
    audit: AuditRecord,
    keep_one: bool,
) -> ApiKeyRecord | None:
    another = (
        f"AND EXISTS (SELECT 1 FROM {KEYS} AS other WHERE other.tenant_id = $tenant "
        "AND other.key_id <> $key AND other.revoked_at IS NULL "
        "AND other.replaced_by IS NULL AND other.scope IS DISTINCT FROM 'READ_ONLY' "
        "AND (other.expires_at IS NULL OR other.expires_at > $now)) "
    )
    statement = (
        f"UPDATE {KEYS} SET revoked_at = $now, changed_at = $now "
        "WHERE key_id = $key AND tenant_id = $tenant AND revoked_at IS NULL "
        f"{another if keep_one else ''}"
    )
    params = {"now": naive(now), "key": key_id, "tenant": tenant_id}
    return _change_key(cur, statement, params, lambda: add_audit(cur, [audit]))


def rotate_api_key(
    cur: duckdb.DuckDBPyConnection,
    tenant_id: str,
    key_id: str,
    new_key: ApiKeyRecord,
    grace_until: datetime,
    audit: AuditRecord,
) -> ApiKeyRecord | None:
    statement = (
        f"UPDATE {KEYS} SET replaced_by = $new, changed_at = $now, "
        "expires_at = LEAST(COALESCE(expires_at, $grace), $grace) "
        "WHERE key_id = $key AND tenant_id = $tenant AND revoked_at IS NULL "
        "AND replaced_by IS NULL AND (expires_at IS NULL OR expires_at > $now)"
    )
    params = {
        "new": new_key.key_id,
        "now": naive(new_key.created_at),
        "grace": naive(grace_until),
        "key": key_id,
        "tenant": tenant_id,
    }

    def then() -> None:
        _insert_key(cur, new_key)
        add_audit(cur, [audit])

    return _change_key(cur, statement, params, then)


def record_key_use(cur: duckdb.DuckDBPyConnection, uses: dict[str, datetime]) -> None:
    cur.execute(
        f"UPDATE {KEYS} AS k SET last_used_at = u.used_at "
        "FROM (SELECT UNNEST($ids) AS key_id, UNNEST($times) AS used_at) AS u "
        "WHERE k.key_id = u.key_id "
        "AND (k.last_used_at IS NULL OR k.last_used_at < u.used_at)",
        {"ids": list(uses), "times": [naive(t) for t in uses.values()]},
    )


def add_audit(cur: duckdb.DuckDBPyConnection, records: Sequence[AuditRecord]) -> None:
    runs.insert_rows(
        cur,
        AUDIT,
        AUDIT_COLUMNS,
        [
            [
                r.event_id,
                r.tenant_id,
                naive(r.event_time),
                r.event,
                r.actor_key_id,
                r.actor_user_id,
                r.target,
                r.detail,
                r.request_id,
                r.client_address,
                r.count,
            ]
            for r in records
        ],
    )


def list_audit(
    cur: duckdb.DuckDBPyConnection,
    where: AuditFilter,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[AuditRecord]:
    clauses = ["tenant_id = $tenant"]
    params: dict[str, Any] = {"tenant": where.tenant_id, "limit": limit}
    if where.events:
        clauses.append("list_contains($events, event)")
        params["events"] = sorted(where.events)
    if where.start is not None:
        clauses.append("event_time >= $start")
        params["start"] = naive(where.start)
    if where.end is not None:
        clauses.append("event_time < $end")
        params["end"] = naive(where.end)
    if after is not None:
        clauses.append("(event_time, event_id) < ($after_time, $after_id)")
        params["after_time"], params["after_id"] = naive(after[0]), after[1]
    rows = cur.execute(
        f"SELECT {AUDIT_COLUMNS} FROM {AUDIT} WHERE {' AND '.join(clauses)} "
        "ORDER BY event_time DESC, event_id DESC LIMIT $limit",
        params,
    ).fetchall()
    return [audit_from_row(r) for r in rows]


def _change_key(
    cur: duckdb.DuckDBPyConnection,
    statement: str,
    params: dict[str, Any],
    then: Callable[[], None],
) -> ApiKeyRecord | None:
    """Runs a conditional UPDATE of one key (`$key`, `$tenant`) and, if it changed the key,
    `then`, in one transaction; returns the key as stored after."""
    cur.begin()
    try:
        if runs.changed(cur, statement, params):
            then()
        row = cur.execute(
            f"{_KEY_SELECT} WHERE key_id = ? AND tenant_id = ?", [params["key"], params["tenant"]]
        ).fetchone()
        cur.commit()
    except BaseException:
        runs.rollback(cur)
        raise
    return None if row is None else key_from_row(row)


def _insert_key(cur: duckdb.DuckDBPyConnection, key: ApiKeyRecord) -> None:
    cur.execute(
        f"INSERT INTO {KEYS} ({KEY_COLUMNS}, changed_at) "
        "VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, NULL, NULL, ?)",
        [
            key.key_id,
            key.tenant_id,
            key.salt,
            key.key_hash,
            naive(key.created_at),
            key.name,
            key.scope,
            key.created_by,
            naive(key.expires_at),
            naive(key.created_at),
        ],
    )


# -- webhooks and plans --------------------------------------------------------------------


def get_webhook(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> WebhookRecord | None:
    row = cur.execute(
        f"SELECT {WEBHOOK_COLUMNS} FROM {WEBHOOKS} WHERE tenant_id = ? "
        "ORDER BY updated_at DESC, secret_id DESC LIMIT 1",
        [tenant_id],
    ).fetchone()
    found = webhook_from_row(row) if row else None
    return None if found is None or found.deleted else found


def save_webhook(
    cur: duckdb.DuckDBPyConnection, webhook: WebhookRecord, audit: AuditRecord
) -> None:
    cur.begin()
    try:
        cur.execute(
            f"INSERT INTO {WEBHOOKS} ({WEBHOOK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            [
                webhook.tenant_id,
                webhook.url,
                webhook.secret_id,
                naive(webhook.updated_at),
                webhook.updated_by or None,
                webhook.deleted,
            ],
        )
        add_audit(cur, [audit])
        cur.commit()
    except BaseException:
        runs.rollback(cur)
        raise


def update_plan(
    cur: duckdb.DuckDBPyConnection, tenant_id: str, plan: str, team_size: int, now: datetime
) -> int | None:
    """Changes the tenant's plan if its team fits in `team_size`; the team counted, or None
    when the tenant does not exist."""
    row = cur.execute(
        f"SELECT (SELECT COUNT(*) FROM {MEMBERS} WHERE tenant_id = $t) "
        f"FROM {PROFILES} WHERE tenant_id = $t",
        {"t": tenant_id},
    ).fetchone()
    if row is None:
        return None
    if row[0] <= team_size:
        cur.execute(
            f"UPDATE {PROFILES} SET subscription_plan = ?, updated_at = ? WHERE tenant_id = ?",
            [plan, naive(now), tenant_id],
        )
    return int(row[0])


# -- team members -------------------------------------------------------------------------


def admit_member(
    cur: duckdb.DuckDBPyConnection,
    tenant_id: str,
    user_id: str,
    plan: str,
    team_size: int,
    now: datetime,
) -> MemberAdmission:
    known, team, current = cur.execute(
        f"SELECT COUNT(*) FILTER (WHERE user_id = $u), COUNT(*), "
        f"(SELECT subscription_plan FROM {PROFILES} WHERE tenant_id = $t) "
        f"FROM {MEMBERS} WHERE tenant_id = $t",
        {"u": user_id, "t": tenant_id},
    ).fetchone() or (0, 0, None)
    current = current or ""
    if known:
        return MemberAdmission(True, False, current)
    if team >= team_size or current != plan:
        return MemberAdmission(False, False, current)
    cur.execute(f"INSERT INTO {MEMBERS} VALUES (?, ?, ?)", [tenant_id, user_id, naive(now)])
    return MemberAdmission(True, True, current)


def list_members(cur: duckdb.DuckDBPyConnection, tenant_id: str) -> list[MemberRecord]:
    rows = cur.execute(
        f"SELECT tenant_id, user_id, first_seen_at FROM {MEMBERS} WHERE tenant_id = ? "
        "ORDER BY user_id",
        [tenant_id],
    ).fetchall()
    return [MemberRecord(r[0], r[1], r[2].replace(tzinfo=UTC)) for r in rows]


def remove_member(cur: duckdb.DuckDBPyConnection, tenant_id: str, user_id: str) -> bool:
    return bool(
        runs.changed(
            cur, f"DELETE FROM {MEMBERS} WHERE tenant_id = ? AND user_id = ?", [tenant_id, user_id]
        )
    )
