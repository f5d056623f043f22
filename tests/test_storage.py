"""The embedded store's schema: created once, versioned, idempotent at every start."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from convergence_server.errors import Unavailable
from convergence_server.storage import schema
from convergence_server.storage.duckdb_store import DuckDBStore
from convergence_server.storage.records import ApiKeyRecord, TenantRecord
from tests.conftest import fill, small_disk


def test_schema_is_created_once_and_reopening_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    for _ in range(3):
        store = DuckDBStore.open(path)
        assert asyncio.run(store.schema_version()) == schema.SCHEMA_VERSION
        asyncio.run(store.close())

    with duckdb.connect(str(path), read_only=True) as db:
        versions = db.execute("SELECT version FROM tenants.schema_migrations").fetchall()
        assert versions == [(m.version,) for m in schema.MIGRATIONS]
        for table in schema.CENTRAL_TABLES:
            columns = db.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'tenants' AND table_name = ?",
                [table.name],
            ).fetchall()
            assert {c[0] for c in columns} == table.column_names


def test_the_guides_usage_query_runs_on_the_central_table(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    asyncio.run(DuckDBStore.open(path).close())
    with duckdb.connect(str(path)) as db:
        db.execute(
            "INSERT INTO tenants.tenant_usage_quotas VALUES "
            "('acme_corp', current_date, 5, 4, 1, 2, 3, 25, 5, now()::timestamp)"
        )
        row = db.execute(
            "SELECT tenant_id, usage_date, pipelines_run_today, daily_limit, "
            "(pipelines_run_today / daily_limit * 100) AS usage_percent, "
            "concurrent_pipelines_running, concurrent_limit "
            "FROM tenants.tenant_usage_quotas "
            "WHERE tenant_id = 'acme_corp' AND usage_date = CURRENT_DATE"
        ).fetchone()
    assert row is not None and row[4] == 20.0


def test_a_database_invalidated_by_a_full_disk_is_reopened(tmp_path: Path) -> None:
    """DuckDB invalidates the open database when a checkpoint cannot be written; the store
    answers Unavailable, reopens the file, and works again once space returns."""
    with small_disk(tmp_path / "disk", "32m") as disk:
        store = DuckDBStore.open(disk / "store.duckdb")

        async def scenario() -> None:
            tenant = TenantRecord("acme_corp", "Acme", "a@acme.com", "STARTER", datetime.now(UTC))
            key = ApiKeyRecord("k1", "acme_corp", b"salt", b"hash", tenant.created_at)
            await store.create_tenant(tenant, key)
            filler = fill(disk)
            # The checkpoint moves the log into the full file: DuckDB gives up on it.
            with pytest.raises(Unavailable):
                await store._call(lambda cur: cur.execute("CHECKPOINT"))
            assert await store.write_failure() is not None
            os.remove(filler)
            assert await store.write_failure() is None
            assert await store.update_plan("acme_corp", "SCALE", datetime.now(UTC))
            assert (await store.get_tenant("acme_corp")).subscription_plan == "SCALE"  # type: ignore[union-attr]
            await store.close()

        asyncio.run(scenario())
