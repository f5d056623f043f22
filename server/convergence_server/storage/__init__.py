"""Storage: one port (`Store`), an embedded DuckDB adapter, a BigQuery adapter, and the
schema they share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from convergence_server.storage.port import Store

if TYPE_CHECKING:
    from convergence_server.config import Config

__all__ = ["Store", "open_store"]


def open_store(config: Config) -> Store:
    """Opens (creating or migrating as needed) the configured store."""
    if config.store == "embedded":
        from convergence_server.storage.duckdb_store import DuckDBStore

        return DuckDBStore.open(config.database_path, config.workers, config.duckdb_memory_limit)
    if config.store == "bigquery":
        from convergence_server.storage.bigquery_store import BigQueryStore

        return BigQueryStore.open(
            config.project,
            config.bigquery_location,
            config.bigquery_dataset_prefix,
            config.bigquery_endpoint,
            config.workers,
        )
    raise SystemExit(
        f"CONVERGENCE_STORE={config.store!r} is not supported (supported: embedded, bigquery)"
    )
