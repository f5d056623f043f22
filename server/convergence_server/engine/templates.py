"""Pipeline templates: `configs/{provider}/{domain}/{template}.yml`, parsed and validated.

The format (documented in configs/README.md):

    description: str                       required
    schedule: str                          optional cron hint
    parameters: {name: {type, default, description}}
    steps: [ {name, kind: load|query|dq, retry: {attempts, backoff_seconds}, ...} ]

A bad template raises `TemplateError` naming the file, the field and why; the server
validates every template at start-up, and `convergence-server validate` does the same.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlglot
import yaml
from sqlglot import exp

from convergence_server.storage.warehouse import SchemaColumn

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)
PARAMETER_TYPES = ("date", "string", "integer", "number", "boolean")
LOAD_FORMATS = ("csv", "ndjson", "parquet")
WRITE_MODES = {"load": ("truncate", "append"), "query": ("append", "truncate", "replace_partition")}
DQ_TYPES = (
    "not_null",
    "unique",
    "unique_rows",
    "one_value_per",
    "row_count",
    "accepted_values",
    "expression",
    "columns_present",
)
SEVERITIES = ("error", "warn")
PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)\}")
_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}", re.ASCII)
MAX_ATTEMPTS = 10
# A replace_partition step refuses to publish a partition that would lose more than this
# share of its published rows or of its published total, unless the run allows it.
DEFAULT_MAX_SHRINK = 0.2
# Column types a total may sum.
NUMBERS = ("NUMERIC", "BIGNUMERIC", "INT64", "INTEGER", "FLOAT64")
# The parameter every template has that lets a run publish a smaller partition anyway.
ALLOW_SHRINK = "allow_shrink"
# Dates a run or a listing accepts. Every real usage day fits (cloud billing exports start
# in the 2000s), every date and the day after it fit in each backend with room to spare
# (BigQuery partitions span 1960 to 2159), and a typo such as 0202 or 9999 is refused.
MIN_DATE = date(2000, 1, 1)
MAX_DATE = date(2099, 12, 31)
DATE_ISSUE = f"must be a date YYYY-MM-DD from {MIN_DATE} to {MAX_DATE}"
# What a trigger may pass: at most this many parameters, each value at most this long
# (names are bounded by NAME_PATTERN).
MAX_PARAMETERS = 50
MAX_PARAMETER_VALUE = 2048
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_INTEGER = re.compile(r"-?\d{1,18}", re.ASCII)
_NUMBER = re.compile(r"[+-]?(\d{1,300}(\.\d{0,300})?|\.\d{1,300})([eE][+-]?\d{1,3})?", re.ASCII)
# Control, invisible format, surrogate and private-use characters.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co"})
HIDDEN_ISSUE = "must not contain control or invisible format characters"


def has_hidden_characters(text: str) -> bool:
    """Whether `text` holds a character a reader cannot see (NUL, newline, RTL override...)."""
    return any(unicodedata.category(ch) in _HIDDEN_CATEGORIES for ch in text)


def parse_date(value: str) -> date:
    """`YYYY-MM-DD` within MIN_DATE..MAX_DATE; ValueError(DATE_ISSUE) otherwise."""
    try:
        if not _DAY.fullmatch(value):
            raise ValueError
        day = date.fromisoformat(value)
    except ValueError:
        raise ValueError(DATE_ISSUE) from None
    return in_date_range(day)


def in_date_range(day: date) -> date:
    if not MIN_DATE <= day <= MAX_DATE:
        raise ValueError(DATE_ISSUE)
    return day


def parameter_text(value: Any) -> str:
    """A parameter's value as runs record it and the API shows it: dates ISO, booleans
    true/false, numbers in their shortest form (1e9 as 1000000000, not 1000000000.0)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text.removesuffix(".0")
    return value.isoformat() if isinstance(value, date) else str(value)


class TemplateError(ValueError):
    """A template is malformed; the message names the file, the field and why."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    default: Any = None
    description: str = ""
    # An integer's or a number's bounds (inclusive), when the template gives them.
    minimum: float | None = None
    maximum: float | None = None

    def resolve(self, raw: str | None, today: date) -> Any:
        """The typed value of `raw` (the default when None); ValueError says why not."""
        value = self.default if raw is None else raw
        if value is None:
            raise ValueError("is required")
        if self.type == "date":
            if value == "today":
                return in_date_range(today)
            if value == "yesterday":
                return in_date_range(today - timedelta(days=1))
            if isinstance(value, date):
                return in_date_range(value)
            return parse_date(str(value))
        if self.type == "integer":
            if isinstance(value, bool) or not _INTEGER.fullmatch(str(value)):
                raise ValueError("must be an integer")
            return self._bounded(int(value))
        if self.type == "number":
            number = float(value) if _NUMBER.fullmatch(str(value)) else math.nan
            if not math.isfinite(number):
                raise ValueError("must be a number")
            return self._bounded(number)
        if self.type == "boolean":
            if str(value).lower() not in ("true", "false"):
                raise ValueError("must be true or false")
            return str(value).lower() == "true"
        return str(value)

    def _bounded(self, value: float) -> Any:
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {_shown(self.minimum)}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {_shown(self.maximum)}")
        return value


def _shown(bound: float) -> str:
    """A bound as the template wrote it (1234567, not 1.23457e+06)."""
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 1
    backoff_seconds: float = 1.0


@dataclass(frozen=True)
class DqCheck:
    name: str
    type: str
    severity: str
    column: str = ""
    columns: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    sql: str = ""
    # unique_rows: columns left out of the comparison (e.g. a line id minted per copy).
    ignore_columns: tuple[str, ...] = ()
    # one_value_per: `column` may hold one value among the rows sharing these columns.
    per: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    retry: RetryPolicy
    # load
    source: str = ""
    format: str = ""
    # Columns a file may lack: they are added as NULL STRING columns after the load.
    optional_columns: tuple[str, ...] = ()
    # Load each version of a local file once (its path, size and modification time) and
    # let later runs read the rows already loaded.
    reuse: bool = False
    # load and query
    destination: str = ""
    write_mode: str = ""
    # query
    sql: str = ""
    partition_column: str = ""
    schema: str = ""
    # replace_partition: the largest share of a published partition's rows (or of its
    # `total_column` sum) a run may take away without `allow_shrink`.
    max_shrink: float = DEFAULT_MAX_SHRINK
    total_column: str = ""
    # dq
    table: str = ""
    where: str = ""
    checks: tuple[DqCheck, ...] = ()


@dataclass(frozen=True)
class Template:
    provider: str
    domain: str
    name: str
    path: Path
    description: str
    schedule: str
    parameters: Mapping[str, Parameter]
    steps: tuple[Step, ...]
    # What recovery does with a run the server was executing when it stopped: run it
    # again ("retry": safe, since runs publish atomically) or end it FAILED ("fail").
    on_crash: str = "retry"

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.domain}/{self.name}"

    def resolve_parameters(self, given: Mapping[str, str], today: date) -> dict[str, Any]:
        """Typed values for every parameter; raises `ParameterError` naming the bad one."""
        if len(given) > MAX_PARAMETERS:
            raise ParameterError("", f"must hold at most {MAX_PARAMETERS} parameters")
        for name in sorted(given):
            if name not in self.parameters:
                raise ParameterError(name, "is not a parameter of this pipeline")
            if len(given[name]) > MAX_PARAMETER_VALUE:
                raise ParameterError(name, f"must be at most {MAX_PARAMETER_VALUE} characters")
            if has_hidden_characters(given[name]):
                raise ParameterError(name, HIDDEN_ISSUE)
        values = {}
        for name, parameter in self.parameters.items():
            try:
                values[name] = parameter.resolve(given.get(name), today)
            except ValueError as exc:
                raise ParameterError(name, str(exc)) from None
        return values


class ParameterError(ValueError):
    """A bad parameter: `name` (empty for the parameters as a whole) and what is wrong.

    `name` may be any string a caller sent: quote it bounded (`errors.echo`).
    """

    def __init__(self, name: str, issue: str) -> None:
        super().__init__(f"{name or 'parameters'} {issue}")
        self.name = name
        self.issue = issue


def today_utc() -> date:
    return datetime.now(UTC).date()


class _Reader:
    """Reads one template document, naming the file and field in every error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, why: str) -> TemplateError:
        return TemplateError(f"{self.path}: {where}: {why}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be a mapping")
        return value

    def only(self, value: dict[str, Any], where: str, allowed: set[str]) -> None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(where, f"unknown field(s) {unknown}")

    def text(self, value: Any, where: str, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, "must be a non-empty string")
        return value

    def name(self, value: Any, where: str) -> str:
        text = self.text(value, where)
        if not NAME_PATTERN.fullmatch(text):
            raise self.fail(where, f"must match {NAME_PATTERN.pattern}")
        return text

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(where, f"must be one of {', '.join(choices)}")
        return str(value)

    def column(self, value: Any, where: str) -> str:
        text = self.text(value, where)
        if not _COLUMN.fullmatch(text):
            raise self.fail(where, "must be a column name")
        return text


def _parameters(r: _Reader, document: dict[str, Any]) -> dict[str, Parameter]:
    raw = r.mapping(document.get("parameters") or {}, "parameters")
    raw.setdefault("date", {"type": "date", "default": "yesterday"})
    if ALLOW_SHRINK in raw:
        raise r.fail(f"parameters.{ALLOW_SHRINK}", "is reserved: every template has it")
    raw[ALLOW_SHRINK] = {
        "type": "boolean",
        "default": False,
        "description": "Publish a day even if it has fewer rows or a smaller total than the "
        "day already published (a partial export otherwise fails the run).",
    }
    parameters = {}
    for name, spec in raw.items():
        where = f"parameters.{name}"
        r.name(name, where)
        spec = r.mapping(spec, where)
        r.only(spec, where, {"type", "default", "description", "min", "max"})
        kind = r.choice(spec.get("type"), f"{where}.type", PARAMETER_TYPES)
        bounds = {}
        for bound in ("min", "max"):
            value = spec.get(bound)
            if value is None:
                continue
            if kind not in ("integer", "number"):
                raise r.fail(f"{where}.{bound}", "applies to integer and number parameters only")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise r.fail(f"{where}.{bound}", "must be a number")
            if not math.isfinite(value):
                raise r.fail(f"{where}.{bound}", "must be a finite number")
            bounds["minimum" if bound == "min" else "maximum"] = value
        if bounds.get("minimum", -math.inf) > bounds.get("maximum", math.inf):
            raise r.fail(f"{where}.max", "must not be less than min")
        parameter = Parameter(
            name, kind, spec.get("default"), str(spec.get("description", "")), **bounds
        )
        if parameter.default is not None:
            try:
                parameter.resolve(None, today_utc())
            except ValueError as exc:
                raise r.fail(f"{where}.default", str(exc)) from None
        parameters[name] = parameter
    if parameters["date"].type != "date":
        raise r.fail("parameters.date.type", "must be date")
    return parameters


def _check(r: _Reader, spec: Any, where: str) -> DqCheck:
    spec = r.mapping(spec, where)
    r.only(
        spec,
        where,
        {
            "name",
            "type",
            "severity",
            "column",
            "columns",
            "values",
            "min",
            "max",
            "sql",
            "ignore_columns",
            "per",
        },
    )
    kind = r.choice(spec.get("type"), f"{where}.type", DQ_TYPES)
    check = DqCheck(
        name=r.name(spec.get("name"), f"{where}.name"),
        type=kind,
        severity=r.choice(spec.get("severity", "error"), f"{where}.severity", SEVERITIES),
    )
    if kind in ("not_null", "accepted_values", "one_value_per"):
        check = replace(check, column=r.column(spec.get("column"), f"{where}.column"))
    if kind == "one_value_per":
        check = replace(check, per=_columns(r, spec.get("per"), f"{where}.per"))
    if kind == "unique_rows" and spec.get("ignore_columns") is not None:
        ignored = _columns(r, spec.get("ignore_columns"), f"{where}.ignore_columns")
        check = replace(check, ignore_columns=ignored)
    if kind in ("unique", "columns_present"):
        check = replace(check, columns=_columns(r, spec.get("columns"), f"{where}.columns"))
    for field, owner in (("ignore_columns", "unique_rows"), ("per", "one_value_per")):
        if field in spec and kind != owner:
            raise r.fail(f"{where}.{field}", f"does not go with type {kind}")
    if kind == "accepted_values":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise r.fail(f"{where}.values", "must be a non-empty list")
        check = replace(check, values=tuple(str(v) for v in values))
    if kind == "row_count":
        bounds = {k: spec.get(k) for k in ("min", "max") if spec.get(k) is not None}
        if not bounds or any(type(v) is not int or v < 0 for v in bounds.values()):
            raise r.fail(where, "row_count needs min and/or max, whole numbers >= 0")
        check = replace(check, minimum=bounds.get("min"), maximum=bounds.get("max"))
    if kind == "expression":
        check = replace(check, sql=r.text(spec.get("sql"), f"{where}.sql"))
    return check


def _columns(r: _Reader, value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise r.fail(where, "must be a non-empty list of columns")
    return tuple(r.column(c, where) for c in value)


_STEP_FIELDS = {
    "load": {"source", "format", "destination", "write_mode", "optional_columns", "reuse"},
    "query": {
        "sql",
        "destination",
        "write_mode",
        "partition_column",
        "schema",
        "max_shrink",
        "total_column",
    },
    "dq": {"table", "where", "checks"},
}


def _step(r: _Reader, spec: Any, where: str, parameters: Mapping[str, Parameter]) -> Step:
    spec = r.mapping(spec, where)
    kind = r.choice(spec.get("kind"), f"{where}.kind", tuple(_STEP_FIELDS))
    r.only(spec, where, {"name", "kind", "retry"} | _STEP_FIELDS[kind])
    retry_spec = r.mapping(spec.get("retry") or {}, f"{where}.retry")
    r.only(retry_spec, f"{where}.retry", {"attempts", "backoff_seconds"})
    attempts = retry_spec.get("attempts", 1)
    backoff = retry_spec.get("backoff_seconds", 1.0)
    if type(attempts) is not int or not 1 <= attempts <= MAX_ATTEMPTS:
        raise r.fail(f"{where}.retry.attempts", f"must be a whole number from 1 to {MAX_ATTEMPTS}")
    if not isinstance(backoff, int | float) or not 0 <= backoff <= 60:
        raise r.fail(f"{where}.retry.backoff_seconds", "must be a number from 0 to 60")
    step = Step(
        name=r.name(spec.get("name"), f"{where}.name"),
        kind=kind,
        retry=RetryPolicy(attempts, float(backoff)),
    )
    if kind == "load":
        source = r.text(spec.get("source"), f"{where}.source")
        _placeholders(r, source, f"{where}.source", parameters)
        optional = spec.get("optional_columns")
        reuse = spec.get("reuse", False)
        if not isinstance(reuse, bool):
            raise r.fail(f"{where}.reuse", "must be true or false")
        step = replace(
            step,
            source=source,
            format=r.choice(spec.get("format"), f"{where}.format", LOAD_FORMATS),
            destination=r.name(spec.get("destination"), f"{where}.destination"),
            write_mode=r.choice(spec.get("write_mode"), f"{where}.write_mode", WRITE_MODES[kind]),
            optional_columns=()
            if optional is None
            else _columns(r, optional, f"{where}.optional_columns"),
            reuse=reuse,
        )
        if reuse and step.write_mode != "truncate":
            raise r.fail(f"{where}.reuse", "goes only with write_mode truncate")
    elif kind == "query":
        mode = r.choice(spec.get("write_mode"), f"{where}.write_mode", WRITE_MODES[kind])
        partition = spec.get("partition_column")
        if mode == "replace_partition":
            partition = r.column(partition, f"{where}.partition_column")
        else:
            for field in ("partition_column", "max_shrink", "total_column"):
                if spec.get(field) is not None:
                    raise r.fail(f"{where}.{field}", "only goes with replace_partition")
        max_shrink = spec.get("max_shrink", DEFAULT_MAX_SHRINK)
        if isinstance(max_shrink, bool) or not isinstance(max_shrink, int | float):
            raise r.fail(f"{where}.max_shrink", "must be a number from 0 to 1")
        if not 0 <= max_shrink <= 1:
            raise r.fail(f"{where}.max_shrink", "must be a number from 0 to 1")
        total = spec.get("total_column")
        step = replace(
            step,
            sql=r.text(spec.get("sql"), f"{where}.sql"),
            destination=r.name(spec.get("destination"), f"{where}.destination"),
            write_mode=mode,
            partition_column=partition or "",
            schema=r.name(spec["schema"], f"{where}.schema") if "schema" in spec else "",
            max_shrink=float(max_shrink),
            total_column="" if total is None else r.column(total, f"{where}.total_column"),
        )
    else:
        checks = spec.get("checks")
        if not isinstance(checks, list) or not checks:
            raise r.fail(f"{where}.checks", "must be a non-empty list")
        parsed = tuple(_check(r, c, f"{where}.checks[{i}]") for i, c in enumerate(checks))
        names = [c.name for c in parsed]
        if len(set(names)) != len(names):
            raise r.fail(f"{where}.checks", "check names must be unique")
        step = replace(
            step,
            table=r.name(spec.get("table"), f"{where}.table"),
            where=r.text(spec.get("where"), f"{where}.where", required=False),
            checks=parsed,
        )
    return step


def _placeholders(r: _Reader, text: str, where: str, parameters: Mapping[str, Parameter]) -> None:
    for name in PLACEHOLDER.findall(text):
        if name != "sample_data" and name not in parameters:
            raise r.fail(where, f"{{{name}}} is neither a parameter nor {{sample_data}}")


def _check_sql(r: _Reader, sql: str, where: str, parameters: Mapping[str, Parameter]) -> None:
    """The SQL parses as BigQuery SQL and uses only the template's parameters."""
    try:
        statements = sqlglot.parse(sql.replace("{dataset}", "`dataset`"), read="bigquery")
    except sqlglot.errors.ParseError as exc:
        raise r.fail(where, f"is not valid BigQuery SQL: {str(exc).splitlines()[0]}") from None
    for statement in statements:
        for parameter in statement.find_all(exp.Parameter) if statement else ():
            if parameter.name not in parameters:
                raise r.fail(where, f"@{parameter.name} is not a parameter of the template")


def _check_step_sql(
    r: _Reader, step: Step, where: str, parameters: Mapping[str, Parameter]
) -> None:
    if step.kind == "query":
        _check_sql(r, step.sql, f"{where}.sql", parameters)
    if step.where:
        _check_sql(r, f"SELECT 1 FROM t WHERE {step.where}", f"{where}.where", parameters)
    for i, check in enumerate(step.checks):
        if check.sql:
            condition = f"SELECT 1 FROM t WHERE {check.sql}"
            _check_sql(r, condition, f"{where}.checks[{i}].sql", parameters)


def parse_template(path: Path, provider: str, domain: str, name: str) -> Template:
    r = _Reader(path)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TemplateError(f"{path}: cannot read: {exc}") from exc
    document = r.mapping(document, "the template")
    r.only(document, "the template", {"description", "schedule", "parameters", "steps", "on_crash"})
    parameters = _parameters(r, document)
    raw_steps = document.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise r.fail("steps", "must be a non-empty list")
    steps = tuple(_step(r, s, f"steps[{i}]", parameters) for i, s in enumerate(raw_steps))
    for i, step in enumerate(steps):
        _check_step_sql(r, step, f"steps[{i}]", parameters)
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise r.fail("steps", "step names must be unique")
    written: set[str] = set()
    reused = {s.destination for s in steps if s.reuse}
    for i, step in enumerate(steps):
        if step.destination in written and step.destination in reused:
            raise r.fail(
                f"steps[{i}].destination",
                f"{step.destination} is loaded with reuse: true: no later step can write it",
            )
        if step.destination in written and step.write_mode != "append":
            raise r.fail(
                f"steps[{i}].write_mode",
                f"{step.destination} is written by an earlier step: a later one can only append",
            )
        if step.destination:
            written.add(step.destination)
    for i, step in enumerate(steps):
        if step.kind == "dq" and step.table not in written:
            raise r.fail(f"steps[{i}].table", f"{step.table} is not written by an earlier step")
    return Template(
        provider=provider,
        domain=domain,
        name=name,
        path=path,
        description=r.text(document.get("description"), "description"),
        schedule=r.text(document.get("schedule"), "schedule", required=False),
        parameters=parameters,
        steps=steps,
        on_crash=r.choice(document.get("on_crash", "retry"), "on_crash", ("retry", "fail")),
    )


@dataclass(frozen=True)
class SharedSchema:
    """An output shape several templates write (configs/schemas/NAME.yml).

    Every table written with it joins `union_view`, a view in the tenant's dataset that
    unions them all (e.g. `focus_cost` over each provider's FOCUS table). `views` are more
    views over it: (name, BigQuery SQL reading `{dataset}.{union_view}`).
    """

    name: str
    columns: tuple[SchemaColumn, ...]
    union_view: str
    views: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Catalog:
    """Every template, by `provider/domain/template`, and the shared output schemas."""

    templates: Mapping[str, Template]
    schemas: Mapping[str, SharedSchema]

    def get(self, provider: str, domain: str, name: str) -> Template | None:
        return self.templates.get(f"{provider}/{domain}/{name}")

    def tables_with_schema(self, schema: str) -> tuple[str, ...]:
        """The destination tables that templates write with this shared schema."""
        return tuple(
            sorted(
                {
                    s.destination
                    for t in self.templates.values()
                    for s in t.steps
                    if s.schema == schema
                }
            )
        )


def _load_schemas(config_dir: Path) -> dict[str, SharedSchema]:
    schemas = {}
    for path in sorted((config_dir / "schemas").glob("*.yml")):
        r = _Reader(path)
        try:
            document = r.mapping(yaml.safe_load(path.read_text()), "the schema")
        except (OSError, yaml.YAMLError) as exc:
            raise TemplateError(f"{path}: cannot read: {exc}") from exc
        r.only(document, "the schema", {"name", "description", "union_view", "columns", "views"})
        if document.get("name", path.stem) != path.stem:
            raise r.fail("name", f"must be the file's name, {path.stem}")
        columns = document.get("columns")
        if not isinstance(columns, list) or not columns:
            raise r.fail("columns", "must be a non-empty list")
        parsed = []
        for i, column in enumerate(columns):
            spec = r.mapping(column, f"columns[{i}]")
            parsed.append(
                SchemaColumn(
                    r.column(spec.get("name"), f"columns[{i}].name"),
                    r.text(spec.get("type"), f"columns[{i}].type"),
                    str(spec.get("description", "")),
                )
            )
        name = r.name(path.stem, "file name")
        view = r.name(document.get("union_view", f"{name}_all"), "union_view")
        views = []
        for i, spec in enumerate(document.get("views") or []):
            spec = r.mapping(spec, f"views[{i}]")
            r.only(spec, f"views[{i}]", {"name", "sql", "description"})
            sql = r.text(spec.get("sql"), f"views[{i}].sql")
            _check_sql(r, sql, f"views[{i}].sql", {})
            views.append((r.name(spec.get("name"), f"views[{i}].name"), sql))
        schemas[name] = SharedSchema(name, tuple(parsed), view, tuple(views))
    return schemas


def load_catalog(config_dir: Path) -> Catalog:
    """Every template under `config_dir`, raising `TemplateError` on the first bad one."""
    schemas = _load_schemas(config_dir)
    templates = {}
    for path in sorted(config_dir.glob("*/*/*.yml")):
        provider, domain = path.parent.parent.name, path.parent.name
        for part in (provider, domain, path.stem):
            if not NAME_PATTERN.fullmatch(part):
                raise TemplateError(f"{path}: name {part!r} must match {NAME_PATTERN.pattern}")
        template = parse_template(path, provider, domain, path.stem)
        for i, step in enumerate(template.steps):
            if step.schema and step.schema not in schemas:
                raise TemplateError(
                    f"{path}: steps[{i}].schema: no configs/schemas/{step.schema}.yml"
                )
            types = (
                {c.name: c.type.upper() for c in schemas[step.schema].columns}
                if step.schema
                else {}
            )
            if step.total_column and types and types.get(step.total_column) not in NUMBERS:
                raise TemplateError(
                    f"{path}: steps[{i}].total_column: must be a number column of "
                    f"schema {step.schema}"
                )
        templates[template.key] = template
    return Catalog(templates, schemas)
