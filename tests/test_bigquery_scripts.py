"""The BigQuery store's scripts name their variables as BigQuery allows.

The emulator parses SQL with sqlglot, which takes some of BigQuery's reserved keywords as
names (e.g. `current`); BigQuery refuses such a script outright. So every variable a
script declares is checked here against BigQuery's reserved keywords (GoogleSQL lexical
structure, "Reserved keywords").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

STORAGE = Path(__file__).resolve().parent.parent / "server" / "convergence_server" / "storage"
RESERVED = frozenset(
    [
        "ALL",
        "AND",
        "ANY",
        "ARRAY",
        "AS",
        "ASC",
        "ASSERT_ROWS_MODIFIED",
        "AT",
        "BETWEEN",
        "BY",
        "CASE",
        "CAST",
        "COLLATE",
        "CONTAINS",
        "CREATE",
        "CROSS",
        "CUBE",
        "CURRENT",
        "DEFAULT",
        "DEFINE",
        "DESC",
        "DISTINCT",
        "ELSE",
        "END",
        "ENUM",
        "ESCAPE",
        "EXCEPT",
        "EXCLUDE",
        "EXISTS",
        "EXTRACT",
        "FALSE",
        "FETCH",
        "FOLLOWING",
        "FOR",
        "FROM",
        "FULL",
        "GROUP",
        "GROUPING",
        "GROUPS",
        "HASH",
        "HAVING",
        "IF",
        "IGNORE",
        "IN",
        "INNER",
        "INTERSECT",
        "INTERVAL",
        "INTO",
        "IS",
        "JOIN",
        "LATERAL",
        "LEFT",
        "LIKE",
        "LIMIT",
        "LOOKUP",
        "MERGE",
        "NATURAL",
        "NEW",
        "NO",
        "NOT",
        "NULL",
        "NULLS",
        "OF",
        "ON",
        "OR",
        "ORDER",
        "OUTER",
        "OVER",
        "PARTITION",
        "PRECEDING",
        "PROTO",
        "QUALIFY",
        "RANGE",
        "RECURSIVE",
        "RESPECT",
        "RIGHT",
        "ROLLUP",
        "ROWS",
        "SELECT",
        "SET",
        "SOME",
        "STRUCT",
        "TABLESAMPLE",
        "THEN",
        "TO",
        "TREAT",
        "TRUE",
        "UNBOUNDED",
        "UNION",
        "UNNEST",
        "USING",
        "WHEN",
        "WHERE",
        "WINDOW",
        "WITH",
        "WITHIN",
    ]
)
DECLARE = re.compile(r"\bDECLARE\s+([A-Za-z_][A-Za-z_0-9]*(?:\s*,\s*[A-Za-z_][A-Za-z_0-9]*)*)")
SOURCES = sorted(STORAGE.glob("bigquery_*.py"))


def declared(source: str) -> list[str]:
    return [name.strip() for names in DECLARE.findall(source) for name in names.split(",")]


def test_the_check_finds_declarations() -> None:
    assert declared("DECLARE a INT64;\n DECLARE b, c STRING;") == ["a", "b", "c"]
    assert any(declared(path.read_text()) for path in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_script_variable_is_a_reserved_keyword(path: Path) -> None:
    names = declared(path.read_text())
    assert not [n for n in names if n.upper() in RESERVED], names
