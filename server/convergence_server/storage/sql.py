"""BigQuery SQL, the language of templates and of integrators' queries, run on DuckDB.

`to_duckdb` transpiles with sqlglot, mapping BigQuery's bare NUMERIC to DECIMAL(38, 9)
(its real precision; DuckDB's bare DECIMAL keeps 3 decimals), taking for a number in
SAFE_CAST only the text BigQuery takes, and dropping the configured project from
`project.dataset.table` names. Named parameters (`@date`) become DuckDB's
`$date` and are always bound, never formatted into the text.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import sqlglot
from sqlglot import exp

_BIGQUERY_NUMERIC = exp.DataType.build("DECIMAL(38, 9)", dialect="duckdb")
_DECIMAL_TEXT = r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?"
_INTEGER_TEXT = r"[+-]?([0-9]+|0[xX][0-9a-fA-F]+)"
# The text BigQuery's SAFE_CAST takes for a number of each type: its literals, with spaces
# around (and, for FLOAT64, inf and nan; for INT64, hexadecimal). DuckDB's TRY_CAST takes
# more ("1_000" as 1000, ".5" as the integer 1): a corrupted amount must be NULL, as on
# BigQuery. BigQuery's INTEGER, INT, SMALLINT, TINYINT and BYTEINT are all INT64.
_NUMBER_TEXT = {
    exp.DataType.Type.DECIMAL: _DECIMAL_TEXT,
    exp.DataType.Type.BIGDECIMAL: _DECIMAL_TEXT,
    exp.DataType.Type.DOUBLE: f"{_DECIMAL_TEXT}|[+-]?(?i:inf|infinity|nan)",
    **dict.fromkeys(
        (
            exp.DataType.Type.BIGINT,
            exp.DataType.Type.INT,
            exp.DataType.Type.SMALLINT,
            exp.DataType.Type.TINYINT,
        ),
        _INTEGER_TEXT,
    ),
}
_INTEGERS = frozenset(
    {exp.DataType.Type.INT, exp.DataType.Type.SMALLINT, exp.DataType.Type.TINYINT}
)


class SqlError(ValueError):
    """The SQL could not be parsed or transpiled; the message says where."""


def _fix(
    node: exp.Expression, project: str | None, moved: Mapping[tuple[str, str], str]
) -> exp.Expression:
    if (
        isinstance(node, exp.DataType)
        and node.this == exp.DataType.Type.DECIMAL
        and not node.expressions
    ):
        return _BIGQUERY_NUMERIC.copy()
    if isinstance(node, exp.DataType) and node.this in _INTEGERS:
        return exp.DataType.build("BIGINT")
    if isinstance(node, exp.TryCast) and node.to.this in _NUMBER_TEXT and _text_to_check(node.this):
        # Only text is checked (the operand is read three times here: a column, in
        # practice): a number of another type converts as on BigQuery.
        value = node.this
        pattern = exp.Literal.string(rf"\s*({_NUMBER_TEXT[node.to.this]})\s*")
        matches = exp.func(
            "regexp_full_match", exp.cast(value.copy(), "VARCHAR"), pattern, dialect="duckdb"
        )
        text = exp.EQ(
            this=exp.func("typeof", value.copy(), dialect="duckdb"),
            expression=exp.Literal.string("VARCHAR"),
        )
        node.set("this", exp.If(this=exp.or_(exp.not_(text), matches), true=value))
    if isinstance(node, exp.Table) and project and node.catalog == project:
        node.set("catalog", None)
    if isinstance(node, exp.Table) and not node.catalog and (node.db, node.name) in moved:
        node.set("catalog", exp.to_identifier(moved[node.db, node.name]))
        node.set("db", exp.to_identifier("main"))
    return node


def _date_trunc(node: exp.Expression) -> exp.Expression:
    """BigQuery's DATE_TRUNC gives a DATE; DuckDB's, a TIMESTAMP. (A pass of its own, after
    `_fix`: what replaces a node is not visited again.)"""
    if isinstance(node, exp.DateTrunc) and not (
        isinstance(node.parent, exp.Cast) and node.parent.to.this == exp.DataType.Type.DATE
    ):
        return exp.cast(node, "DATE")
    return node


def _text_to_check(value: exp.Expression) -> bool:
    """Whether SAFE_CAST's operand may be text to check: not a number a cast already made
    (nor holding one: a nested cast is checked once, where it reads text), and no query
    (which the check would run again)."""
    for inner in value.find_all(exp.Cast, exp.Subquery, exp.Select):
        if not isinstance(inner, exp.Cast) or inner.to.this in _NUMBER_TEXT:
            return False
    return True


def to_duckdb(
    sql: str, project: str | None = None, moved: Mapping[tuple[str, str], str] | None = None
) -> list[str]:
    """The DuckDB statements for a BigQuery script (one or more statements). `moved` maps
    a (dataset, table) name to the attached database that holds the table (in its `main`
    schema)."""
    # Only the moved tables the text names are part of the cache key: a run's own staging
    # tables (in `moved`) would otherwise make every run's key new.
    named = sorted(item for item in (moved or {}).items() if item[0][1] in sql)
    return list(_transpiled(sql, project, tuple(named)))


# A run's SQL is mostly the same text each time (a template's step, a day's parameters
# bound, not formatted in): transpiling a large step takes sqlglot 40-140 ms.
@functools.lru_cache(maxsize=256)
def _transpiled(
    sql: str, project: str | None, moved_items: tuple[tuple[tuple[str, str], str], ...]
) -> tuple[str, ...]:
    moved = dict(moved_items)
    try:
        statements = sqlglot.parse(sql, read="bigquery")
    except sqlglot.errors.ParseError as exc:
        raise SqlError(f"cannot parse the SQL: {exc}") from None
    return tuple(
        statement.transform(_fix, project, moved).transform(_date_trunc).sql(dialect="duckdb")
        for statement in statements
        if statement is not None
    )


def quote(name: str) -> str:
    """A BigQuery identifier; callers pass names already checked against a strict pattern."""
    return f"`{name}`"
