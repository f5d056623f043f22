"""Tenants, API keys, the audit log, webhooks, plans and team members in the BigQuery
store (a part of BigQueryStore).

A tenant's onboarding creates its dataset first (the dataset's name is the tenant's lock),
then its objects, then its rows in one transaction, and undoes all of it on any failure.
Keys are rows changed in place under conditions written in SQL (see below); a change of
keys and a webhook's new settings each commit with their audit row. A plan change and a
member's admission both update the tenant's counters row, so on every server the team a
plan is checked against is the team it applies to.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from google.api_core import exceptions as api_exceptions

from convergence_server.errors import AlreadyExists, DeadlineExceeded
from convergence_server.storage import schema
from convergence_server.storage.bigquery_central import Central, log, typed
from convergence_server.storage.bigquery_client import RETRY
from convergence_server.storage.bigquery_schema import COUNTERS, counters_table
from convergence_server.storage.bigquery_warehouse import create_table_sql
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
    AUDIT_NAMES,
    EPOCH,
    KEY_COLUMNS,
    WEBHOOK_COLUMNS,
    audit_from_row,
    key_from_row,
    webhook_from_row,
)

# -- tenants ----------------------------------------------------------------------------


async def get_tenant(db: Central, tenant_id: str) -> TenantRecord | None:
    rows = await db.call(
        lambda: db.query(
            "SELECT tenant_id, company_name, admin_email, subscription_plan, created_at, "
            f"status FROM {db.table('tenant_profiles')} WHERE tenant_id = @t",
            t=tenant_id,
        )
    )
    return TenantRecord(*rows[0]) if rows else None


async def tenant_ids_equal_ignoring_case(db: Central, tenant_id: str) -> list[str]:
    rows = await db.call(
        lambda: db.query(
            f"SELECT tenant_id FROM {db.table('tenant_profiles')} "
            "WHERE LOWER(tenant_id) = LOWER(@t)",
            t=tenant_id,
        )
    )
    return [row[0] for row in rows]


async def create_tenant(
    db: Central,
    dataset: str,
    tenant: TenantRecord,
    key: ApiKeyRecord,
    commit_by: float | None = None,
) -> tuple[str, ...]:
    """Creates the dataset (its name is the tenant's lock: a second creation fails),
    its objects, then the tenant's rows in one transaction; undone on any failure."""
    abandoned = threading.Event()

    def create() -> tuple[str, ...]:
        client = db.runner.client
        try:
            client.create_dataset(dataset, retry=RETRY)
        except api_exceptions.Conflict as exc:
            raise AlreadyExists(
                f"Tenant '{tenant.tenant_id}' or its dataset already exists"
            ) from exc
        try:
            _fill_dataset(db, dataset, tenant)
            if abandoned.is_set():
                raise asyncio.CancelledError
            if commit_by is not None and time.monotonic() > commit_by:
                raise DeadlineExceeded("The deadline passed before onboarding finished")
            try:
                taken = _tenant_rows(db, tenant, key)
            except BaseException:
                # It may have committed before the failure reached us.
                _delete_tenant(db, dataset, tenant, key)
                raise
            if taken:
                raise AlreadyExists(f"Tenant '{tenant.tenant_id}' already exists")
        except BaseException:
            _delete_tenant(db, dataset, tenant, key, rows=False)
            raise
        return schema.TENANT_DATASET_OBJECTS

    task = asyncio.ensure_future(db.call(create))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        abandoned.set()
        with contextlib.suppress(asyncio.CancelledError, AlreadyExists, DeadlineExceeded):
            await task
            # It committed before it could see the flag: undo it.
            await db.call(lambda: _delete_tenant(db, dataset, tenant, key))
            log.warning("onboarding of %s abandoned after commit: undone", tenant.tenant_id)
        raise


def _tenant_rows(db: Central, tenant: TenantRecord, key: ApiKeyRecord) -> bool:
    """Stores the tenant's profile, key and counters in one transaction, unless the
    tenant id is taken; returns whether it was."""
    rows = db.transaction(
        f"""
        DECLARE taken BOOL;
        BEGIN TRANSACTION;
        SET taken = EXISTS (SELECT 1 FROM {db.table("tenant_profiles")}
                            WHERE tenant_id = @tenant_id);
        IF NOT taken THEN
          INSERT INTO {db.table("tenant_profiles")}
            (tenant_id, company_name, admin_email, subscription_plan, status,
             created_at, updated_at)
          VALUES (@tenant_id, @company_name, @admin_email, @plan, @status,
                  @now, @now);
          {_insert_key_sql(db, "k_")}
          INSERT INTO {counters_table(db, tenant.tenant_id)}
            (tenant_id, seq, active_runs, runs_day, runs_today, updated_at)
          VALUES (@tenant_id, 0, 0, NULL, 0, @now);
        END IF;
        COMMIT TRANSACTION;
        SELECT taken;
        """,
        {
            "tenant_id": tenant.tenant_id,
            "company_name": tenant.company_name,
            "admin_email": tenant.admin_email,
            "plan": tenant.subscription_plan,
            "status": tenant.status,
            "now": tenant.created_at,
            **_key_params(key, "k_"),
        },
    )
    return bool(rows[0][0])


def _fill_dataset(db: Central, dataset: str, tenant: TenantRecord) -> None:
    counters = replace(COUNTERS, name=f"{COUNTERS.name}_{tenant.tenant_id}")
    db.query(create_table_sql(db.name, counters))
    table = schema.ONBOARDING_VALIDATION_TEST
    db.query(create_table_sql(dataset, table))
    db.query(
        f"INSERT INTO `{dataset}.{table.name}` (validation_id, tenant_id, validated_at, "
        "message) VALUES (@id, @tenant_id, @now, @message)",
        id=str(uuid.uuid4()),
        tenant_id=tenant.tenant_id,
        now=tenant.created_at,
        message="Dataset writable: onboarding validation row written.",
    )
    quote_identifier(tenant.tenant_id)
    db.query(schema.comprehensive_view_sql(dataset, db.name, tenant.tenant_id))


def _delete_tenant(
    db: Central, dataset: str, tenant: TenantRecord, key: ApiKeyRecord, rows: bool = True
) -> None:
    """Removes what this onboarding created: its rows (told apart by the key and the
    creation time) and, unless only the rows, the dataset."""
    if rows:
        db.transaction(
            f"""
            BEGIN TRANSACTION;
            DELETE FROM {db.table("tenant_api_keys")} WHERE key_id = @key_id;
            DELETE FROM {db.table("tenant_profiles")}
            WHERE tenant_id = @tenant_id AND created_at = @now;
            COMMIT TRANSACTION;
            """,
            {"tenant_id": tenant.tenant_id, "key_id": key.key_id, "now": tenant.created_at},
        )
    db.runner.client.delete_table(
        counters_table(db, tenant.tenant_id).strip("`"), not_found_ok=True, retry=RETRY
    )
    db.runner.client.delete_dataset(dataset, delete_contents=True, not_found_ok=True, retry=RETRY)


# -- API keys and the audit log --------------------------------------------------------
#
# Keys are rows of `tenant_api_keys`, changed in place (revoked, rotated, last used):
# every UPDATE of them is conditional on the row's state, in SQL. A change and its audit
# row commit in one transaction; two changes of keys conflict (BigQuery detects it per
# table) and the loser runs again, seeing the winner's change. `changed_at` is set by
# BigQuery's clock, so that replicas comparing it with `changed_api_keys`' time never
# depend on their own clocks.


async def get_api_key(db: Central, key_id: str) -> ApiKeyRecord | None:
    rows = await db.call(
        lambda: db.query(
            f"SELECT {KEY_COLUMNS} FROM {db.table('tenant_api_keys')} WHERE key_id = @k",
            k=key_id,
        )
    )
    return key_from_row(rows[0]) if rows else None


def _insert_key_sql(db: Central, prefix: str) -> str:
    """Inserts the key of the `_key_params` named with `prefix`."""
    p = prefix
    return f"""
        INSERT INTO {db.table("tenant_api_keys")} ({KEY_COLUMNS}, changed_at)
        VALUES (@{p}key_id, @{p}tenant_id, @{p}salt, @{p}key_hash, @{p}created_at, NULL,
                @{p}name, @{p}scope, @{p}created_by, @{p}expires_at, NULL, NULL,
                CURRENT_TIMESTAMP());"""


def _insert_audit_sql(db: Central, prefix: str) -> str:
    """Appends the audit rows of the `_audit_params` named with `prefix` (one array per
    column: the statement's size and parameter count do not grow with the rows)."""
    values = [
        {
            "event_time": f"TIMESTAMP_MICROS(CAST(@{prefix}event_time[OFFSET(i)] AS INT64))",
            "event_count": f"CAST(@{prefix}event_count[OFFSET(i)] AS INT64)",
        }.get(name, f"@{prefix}{name}[OFFSET(i)]")
        for name in AUDIT_NAMES
    ]
    return f"""
        INSERT INTO {db.table(schema.TENANT_AUDIT_LOG.name)} ({AUDIT_COLUMNS})
        SELECT {", ".join(values)}
        FROM UNNEST(@{prefix}event_id) AS event_id WITH OFFSET AS i;"""


async def list_api_keys(db: Central, tenant_id: str) -> list[ApiKeyRecord]:
    rows = await db.call(
        lambda: db.query(
            f"SELECT {KEY_COLUMNS} FROM {db.table('tenant_api_keys')} WHERE tenant_id = @t "
            "ORDER BY created_at DESC, key_id DESC",
            t=tenant_id,
        )
    )
    return [key_from_row(row) for row in rows]


async def create_api_key(db: Central, key: ApiKeyRecord, audit: AuditRecord) -> None:
    script = f"""
        BEGIN TRANSACTION;
        {_insert_key_sql(db, "k_")}
        {_insert_audit_sql(db, "a_")}
        COMMIT TRANSACTION;
    """
    params = {**_key_params(key, "k_"), **_audit_params([audit], "a_")}
    await db.call(lambda: db.transaction(script, params))


async def revoke_api_key(
    db: Central,
    tenant_id: str,
    key_id: str,
    now: datetime,
    audit: AuditRecord,
    keep_one: bool = True,
) -> ApiKeyRecord | None:
    keys = db.table("tenant_api_keys")
    another = f"""
          AND EXISTS (SELECT 1 FROM {keys} AS other
                      WHERE other.tenant_id = @tenant_id AND other.key_id != @key_id
                        AND other.revoked_at IS NULL AND other.replaced_by IS NULL
                        AND IFNULL(other.scope, 'FULL') != 'READ_ONLY'
                        AND (other.expires_at IS NULL OR other.expires_at > @now))"""
    update = f"""
        UPDATE {keys} SET revoked_at = @now, changed_at = CURRENT_TIMESTAMP()
        WHERE key_id = @key_id AND tenant_id = @tenant_id AND revoked_at IS NULL
          {another if keep_one else ""};"""
    params = {"now": now, **_audit_params([audit], "a_")}
    return await _change_key(db, tenant_id, key_id, update, _insert_audit_sql(db, "a_"), params)


async def rotate_api_key(
    db: Central,
    tenant_id: str,
    key_id: str,
    new_key: ApiKeyRecord,
    grace_until: datetime,
    audit: AuditRecord,
) -> ApiKeyRecord | None:
    update = f"""
        UPDATE {db.table("tenant_api_keys")} SET replaced_by = @k_key_id,
          changed_at = CURRENT_TIMESTAMP(),
          expires_at = LEAST(COALESCE(expires_at, @grace_until), @grace_until)
        WHERE key_id = @key_id AND tenant_id = @tenant_id AND revoked_at IS NULL
          AND replaced_by IS NULL AND (expires_at IS NULL OR expires_at > @k_created_at);"""
    then = _insert_key_sql(db, "k_") + _insert_audit_sql(db, "a_")
    params = {
        "grace_until": grace_until,
        **_key_params(new_key, "k_"),
        **_audit_params([audit], "a_"),
    }
    return await _change_key(db, tenant_id, key_id, update, then, params)


async def _change_key(
    db: Central, tenant_id: str, key_id: str, update: str, then: str, params: dict[str, Any]
) -> ApiKeyRecord | None:
    """Runs a conditional UPDATE of one key (`@key_id`, `@tenant_id`) and, if it changed the
    key, the statements `then`, in one transaction; returns the key as stored after."""
    keys = db.table("tenant_api_keys")
    script = f"""
        DECLARE changed BOOL DEFAULT FALSE;
        BEGIN TRANSACTION;
        {update}
        SET changed = @@row_count > 0;
        IF changed THEN
          {then}
        END IF;
        COMMIT TRANSACTION;
        SELECT {KEY_COLUMNS} FROM {keys} WHERE key_id = @key_id AND tenant_id = @tenant_id;
    """
    values = {"key_id": key_id, "tenant_id": tenant_id, **params}
    rows = await db.call(lambda: db.transaction(script, values))
    return key_from_row(rows[0]) if rows else None


async def record_key_use(db: Central, uses: dict[str, datetime]) -> None:
    if not uses:
        return
    sql = (
        f"UPDATE {db.table('tenant_api_keys')} AS k SET last_used_at = u.used_at "
        "FROM (SELECT key_id, TIMESTAMP_MICROS(CAST(@times[OFFSET(i)] AS INT64)) AS used_at "
        "FROM UNNEST(@ids) AS key_id WITH OFFSET AS i) AS u "
        "WHERE k.key_id = u.key_id AND (k.last_used_at IS NULL OR k.last_used_at < u.used_at)"
    )
    params = {"ids": list(uses), "times": [str(_micros(t)) for t in uses.values()]}
    # One statement, safe to run again: it conflicts with a key's change (the same
    # table) and then waits its turn like one.
    await db.call(lambda: db.transaction(sql, params))


async def changed_api_keys(db: Central, since: datetime | None) -> tuple[list[str], datetime]:
    if since is None:
        rows = await db.call(lambda: db.query("SELECT CURRENT_TIMESTAMP()"))
        return [], rows[0][0]
    rows = await db.call(
        lambda: db.query(
            f"SELECT ARRAY(SELECT key_id FROM {db.table('tenant_api_keys')} "
            "WHERE changed_at >= @since), CURRENT_TIMESTAMP()",
            since=since,
        )
    )
    return list(rows[0][0] or []), rows[0][1]


async def add_audit(db: Central, records: list[AuditRecord]) -> None:
    if records:
        sql, params = _insert_audit_sql(db, ""), _audit_params(records, "")
        await db.call(lambda: db.runner.query(sql, params))


async def list_audit(
    db: Central, where: AuditFilter, after: tuple[datetime, str] | None, limit: int
) -> list[AuditRecord]:
    conditions = ["tenant_id = @tenant_id"]
    params: dict[str, Any] = {"tenant_id": where.tenant_id}
    if where.events:
        conditions.append("event IN UNNEST(@events)")
        params["events"] = sorted(where.events)
    if where.start is not None:
        conditions.append("event_time >= @start")
        params["start"] = where.start
    if where.end is not None:
        conditions.append("event_time < @end")
        params["end"] = where.end
    if after is not None:
        conditions.append(
            "(event_time < @after_at OR (event_time = @after_at AND event_id < @after_id))"
        )
        params.update(after_at=after[0], after_id=after[1])
    sql = (
        f"SELECT {AUDIT_COLUMNS} FROM {db.table(schema.TENANT_AUDIT_LOG.name)} "
        f"WHERE {' AND '.join(conditions)} "
        f"ORDER BY event_time DESC, event_id DESC LIMIT {int(limit)}"
    )
    rows = await db.call(lambda: db.runner.query(sql, params))
    return [audit_from_row(r) for r in rows]


# -- webhooks and plans ------------------------------------------------------------------


async def get_webhook(db: Central, tenant_id: str) -> WebhookRecord | None:
    rows = await db.call(
        lambda: db.query(
            f"SELECT {WEBHOOK_COLUMNS} FROM {db.table(schema.TENANT_WEBHOOKS.name)} "
            "WHERE tenant_id = @t ORDER BY updated_at DESC, secret_id DESC LIMIT 1",
            t=tenant_id,
        )
    )
    found = webhook_from_row(rows[0]) if rows else None
    return None if found is None or found.deleted else found


async def save_webhook(db: Central, webhook: WebhookRecord, audit: AuditRecord) -> None:
    script = f"""
        BEGIN TRANSACTION;
        INSERT INTO {db.table(schema.TENANT_WEBHOOKS.name)} ({WEBHOOK_COLUMNS})
        VALUES (@w_tenant_id, @w_url, @w_secret_id, @w_updated_at, @w_updated_by,
                @w_deleted);
        {_insert_audit_sql(db, "a_")}
        COMMIT TRANSACTION;
    """
    values = typed(
        schema.TENANT_WEBHOOKS,
        {
            "tenant_id": webhook.tenant_id,
            "url": webhook.url,
            "secret_id": webhook.secret_id,
            "updated_at": webhook.updated_at,
            "updated_by": webhook.updated_by or None,
            "deleted": webhook.deleted,
        },
    )
    params = {**{f"w_{k}": v for k, v in values.items()}, **_audit_params([audit], "a_")}
    await db.call(lambda: db.transaction(script, params))


async def update_plan(
    db: Central, tenant_id: str, plan: str, team_size: int, now: datetime
) -> int | None:
    if await get_tenant(db, tenant_id) is None:  # nor its counters table
        return None
    # The counters row's UPDATE makes this and `admit_member` of the tenant conflict:
    # on every server, the team counted here is the team the new plan applies to.
    rows = await db.call(
        lambda: db.transaction(
            f"""
            DECLARE team INT64;
            DECLARE found BOOL;
            BEGIN TRANSACTION;
            UPDATE {counters_table(db, tenant_id)} SET seq = seq + 1, updated_at = @now
            WHERE TRUE;
            SET found = EXISTS (SELECT 1 FROM {db.table("tenant_profiles")}
                                WHERE tenant_id = @t);
            SET team = (SELECT COUNT(*) FROM {db.table("tenant_members")}
                        WHERE tenant_id = @t);
            IF found AND team <= @team_size THEN
              UPDATE {db.table("tenant_profiles")} SET subscription_plan = @plan,
                updated_at = @now WHERE tenant_id = @t;
            END IF;
            COMMIT TRANSACTION;
            SELECT found, team;
            """,
            {"plan": plan, "team_size": team_size, "now": now, "t": tenant_id},
        )
    )
    return int(rows[0][1]) if rows[0][0] else None


# -- team members ---------------------------------------------------------------------


async def admit_member(
    db: Central, tenant_id: str, user_id: str, plan: str, team_size: int, now: datetime
) -> MemberAdmission:
    members = db.table("tenant_members")
    rows = await db.call(
        lambda: db.transaction(
            f"""
            DECLARE known INT64;
            DECLARE total INT64;
            DECLARE stored_plan STRING;
            DECLARE added BOOL DEFAULT FALSE;
            BEGIN TRANSACTION;
            UPDATE {counters_table(db, tenant_id)} SET seq = seq + 1, updated_at = @now
            WHERE TRUE;
            SET known = (SELECT COUNT(*) FROM {members}
                         WHERE tenant_id = @tenant_id AND user_id = @user_id);
            SET total = (SELECT COUNT(*) FROM {members} WHERE tenant_id = @tenant_id);
            SET stored_plan = (SELECT subscription_plan FROM {db.table("tenant_profiles")}
                               WHERE tenant_id = @tenant_id);
            IF known = 0 AND total < @team_size AND stored_plan = @plan THEN
              INSERT INTO {members} (tenant_id, user_id, first_seen_at)
              VALUES (@tenant_id, @user_id, @now);
              SET known = 1;
              SET added = TRUE;
            END IF;
            COMMIT TRANSACTION;
            SELECT known, added, stored_plan;
            """,
            {
                "tenant_id": tenant_id,
                "user_id": user_id,
                "plan": plan,
                "team_size": team_size,
                "now": now,
            },
        )
    )
    return MemberAdmission(bool(rows[0][0]), bool(rows[0][1]), rows[0][2] or "")


async def list_members(db: Central, tenant_id: str) -> list[MemberRecord]:
    rows = await db.call(
        lambda: db.query(
            "SELECT tenant_id, user_id, first_seen_at "
            f"FROM {db.table('tenant_members')} WHERE tenant_id = @t ORDER BY user_id",
            t=tenant_id,
        )
    )
    return [MemberRecord(*row) for row in rows]


async def remove_member(db: Central, tenant_id: str, user_id: str) -> bool:
    changed = await db.call(
        lambda: db.runner.execute(
            f"DELETE FROM {db.table('tenant_members')} WHERE tenant_id = @t AND user_id = @u",
            {"t": tenant_id, "u": user_id},
        )
    )
    return changed > 0


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch (a TIMESTAMP passed in an array of strings)."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def _key_params(key: ApiKeyRecord, prefix: str) -> dict[str, Any]:
    """The key's columns as the parameters of `_insert_key_sql`."""
    values = typed(
        schema.TENANT_API_KEYS,
        {
            "key_id": key.key_id,
            "tenant_id": key.tenant_id,
            "salt": key.salt,
            "key_hash": key.key_hash,
            "created_at": key.created_at,
            "name": key.name,
            "scope": key.scope,
            "created_by": key.created_by,
            "expires_at": key.expires_at,
        },
    )
    return {f"{prefix}{name}": value for name, value in values.items()}


def _audit_params(records: Sequence[AuditRecord], prefix: str) -> dict[str, Any]:
    """The rows as the parameters of `_insert_audit_sql`: an array of strings per column."""
    columns: dict[str, list[str]] = {name: [] for name in AUDIT_NAMES}
    for r in records:
        for name, value in (
            ("event_id", r.event_id),
            ("tenant_id", r.tenant_id),
            ("event_time", str(_micros(r.event_time))),
            ("event", r.event),
            ("actor_key_id", r.actor_key_id),
            ("actor_user_id", r.actor_user_id),
            ("target", r.target),
            ("detail", r.detail),
            ("request_id", r.request_id),
            ("client_address", r.client_address),
            ("event_count", str(int(r.count))),
        ):
            columns[name].append(value)
    return {f"{prefix}{name}": values for name, values in columns.items()}
