"""`convergence-server sql`: the guide's BigQuery SQL, verbatim, on the embedded store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb

from convergence_server.storage.sql import SqlError, to_duckdb


def run_sql(database: Path, query: str, project: str, fmt: str) -> int:
    """Runs `query` read-only and prints the result; returns the exit status."""
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
    if fmt == "json":
        for row in rows:
            print(json.dumps(dict(zip(columns, row, strict=True)), default=str))
    else:
        print("\t".join(columns))
        for row in rows:
            print("\t".join("NULL" if v is None else str(v) for v in row))
    return 0
