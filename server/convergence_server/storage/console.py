"""`convergence-server sql`: the guide's BigQuery SQL, verbatim, on the configured store.

On the embedded store the SQL is transpiled to DuckDB and `your-project` names the file;
on BigQuery it runs as it is, in the configured project.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from convergence_server.config import Config
from convergence_server.storage.sql import SqlError, to_duckdb


def run_sql(config: Config, query: str, fmt: str) -> int:
    """Runs `query` and prints the result; returns the exit status."""
    if config.store == "bigquery":
        return _run_bigquery(config, query, fmt)
    return _run_embedded(config.database_path, query, config.project, fmt)


def _run_bigquery(config: Config, query: str, fmt: str) -> int:
    from google.api_core import exceptions as api_exceptions

    from convergence_server.storage.bigquery_client import make_client, message

    client = make_client(config.project, config.bigquery_location, config.bigquery_endpoint)
    try:
        result = client.query(query).result()
        columns = [field.name for field in result.schema or []]
        rows = [tuple(row.values()) for row in result]
    except api_exceptions.GoogleAPICallError as exc:
        print(f"error: {message(exc)}", file=sys.stderr)
        return 1
    finally:
        client.close()  # type: ignore[no-untyped-call]
    _print(columns, rows, fmt)
    return 0


def _run_embedded(database: Path, query: str, project: str, fmt: str) -> int:
    """Runs `query` read-only on the embedded file (the server must be stopped)."""
    try:
        statements = to_duckdb(query, project)
        with duckdb.connect(str(database), read_only=True) as db:
            db.execute("SET TimeZone = 'UTC'")
            result = None
            for statement in statements:
                result = db.execute(statement)
            if result is None or result.description is None:
                return 0
            columns = [d[0] for d in result.description]
            rows = result.fetchall()
    except duckdb.IOException as exc:
        print(
            f"cannot open {database}: {exc} (is the server running? stop it first)", file=sys.stderr
        )
        return 2
    except (duckdb.Error, SqlError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print(columns, rows, fmt)
    return 0


def _shown(value: Any) -> Any:
    """A NUMERIC as BigQuery writes it, on either store: no trailing zeros, no exponent
    (DuckDB's DECIMAL(38, 9) zero is 0E-9)."""
    if isinstance(value, Decimal):
        return "0" if value == 0 else format(value.normalize(), "f")
    return value


def _print(columns: list[str], rows: list[tuple[Any, ...]], fmt: str) -> None:
    if fmt == "json":
        for row in rows:
            shown = {c: _shown(v) for c, v in zip(columns, row, strict=True)}
            print(json.dumps(shown, default=str))
    else:
        print("\t".join(columns))
        for row in rows:
            print("\t".join("NULL" if v is None else str(_shown(v)) for v in row))
