"""Storage: one port (`Store`), an embedded DuckDB adapter, and the schema both share."""

from __future__ import annotations

from pathlib import Path

from convergence_server.storage.port import Store

__all__ = ["Store", "open_store"]


def open_store(kind: str, database_path: Path, pipeline_threads: int) -> Store:
    """Opens (creating or migrating as needed) the configured store."""
    if kind == "embedded":
        from convergence_server.storage.duckdb_store import DuckDBStore

        return DuckDBStore.open(database_path, pipeline_threads)
    raise SystemExit(f"CONVERGENCE_STORE={kind!r} is not supported (supported: embedded)")
