"""The tests' BigQuery emulator (tests/fixtures/bigquery_emulator_main.py): its cheap lookups
of one table answer as the emulator's own do, and its DuckDB uses one thread."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.bigquery_emulator import EMULATOR_DIR, EMULATOR_PYTHON, LAUNCHER

# Run by the emulator's Python: makes tables and views, then asks both lookups about each
# name (the launcher's `_own_*` are the emulator's own lookups).
COMPARE = """
import importlib.util, json, sys
from pathlib import Path
from local_bigquery.settings import settings
settings.data_dir = Path(sys.argv[2])
settings.default_project_id = "p"
spec = importlib.util.spec_from_file_location("launcher", sys.argv[1])
launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launcher)
import duckdb
from local_bigquery.catalog import tables
from local_bigquery.engine import database
from local_bigquery.errors import BigQueryError
from local_bigquery.sql.rules import partitions
from sqlglot import exp
for statement in (
    'CREATE SCHEMA p.d', 'CREATE SCHEMA p.other',
    'CREATE TABLE p.d.runs (id INTEGER, state VARCHAR)',
    "INSERT INTO p.d.runs SELECT i, 'PENDING' FROM range(5) r(i)",
    'CREATE TABLE p.d."Mixed" (id INTEGER)',
    'CREATE TABLE p.d.empty (id INTEGER)',
    'CREATE TABLE p.other.runs (id INTEGER)',
    'CREATE VIEW p.d.pending AS SELECT * FROM p.d.runs',
    'CREATE TABLE p.d.changed AS SELECT range AS id FROM range(10)',
    'DELETE FROM p.d.changed WHERE id < 3',
    'UPDATE p.d.changed SET id = 100 WHERE id = 5',
    'CREATE TABLE emulator._results."p:job_1" AS SELECT 1 AS x UNION ALL SELECT 2',
    'CREATE TABLE p.d.strict (id INTEGER NOT NULL, note VARCHAR, tags STRUCT(id INTEGER))',
    'CREATE VIEW p.d.vanished AS SELECT 1 AS x',
    'DROP VIEW p.d.vanished',
    'CREATE TABLE p.d.grown (id INTEGER NOT NULL, gone VARCHAR)',
    'ALTER TABLE p.d.grown ADD COLUMN added VARCHAR',
    'ALTER TABLE p.d.grown DROP COLUMN gone',
    'ALTER TABLE p.d.grown ALTER COLUMN id DROP NOT NULL',
    'CREATE TABLE p.d.unhidden (x INTEGER, "_PARTITIONTIME" TIMESTAMPTZ)',
    'ALTER TABLE p.d.unhidden DROP COLUMN "_PARTITIONTIME"',
    'CREATE TABLE p.d.dropped (id INTEGER)',
    'DROP TABLE p.d.dropped',
    'CREATE TABLE p.d.again (id INTEGER NOT NULL)',
    'DROP TABLE p.d.again',
    'CREATE TABLE p.d.again (other VARCHAR, "_PARTITIONTIME" TIMESTAMPTZ)',
    'CREATE VIEW p.d.again_view AS SELECT * FROM p.d.again',
    'CREATE VIEW p.d.replaced AS SELECT 1 AS x',
    'DROP VIEW p.d.replaced',
    'CREATE TABLE p.d.replaced (x INTEGER NOT NULL)',
    'CREATE SCHEMA p.gone',
    'CREATE TABLE p.gone.runs (id INTEGER)',
    'DROP SCHEMA p.gone CASCADE',
):
    database.execute(statement)
names = [
    ("p", "d", "runs"), ("p", "d", "Mixed"), ("p", "d", "mixed"), ("p", "d", "empty"),
    ("p", "d", "pending"), ("p", "d", "missing"), ("p", "other", "runs"),
    ("p", "other", "pending"), ("p", "gone", "runs"), ("q", "d", "runs"),
    ("p", "d", "changed"), ("emulator", "_results", "p:job_1"),
    ("emulator", "_results", "p:job_2"), ("p", "d", "strict"), ("p", "d", "grown"),
    ("p", "d", "dropped"), ("p", "d", "again"), ("p", "d", "replaced"), ("p", "d", "unhidden"),
    ("p", "d", "vanished"),
    ("p", "d", "again_view"),
]
logical = [("p", "_results", n[2][2:]) if n[0] == "emulator" else n for n in names]


def fields(lookup, name):
    try:
        return [field.dump() for field in lookup(*name)]
    except (BigQueryError, duckdb.Error) as error:  # as the emulator's own, e.g. no project
        return f"{type(error).__name__}: {error}"


def hidden(lookup, name):
    return lookup(exp.table_(name[2], db=name[1], catalog=name[0], quoted=True))

print(json.dumps({
    "names": names,
    "emulator": [launcher._own_objects(*n) for n in names],
    "launcher": [database.objects(*n) for n in names],
    "listing": [database.objects("p", "d"), launcher._own_objects("p", "d")],
    "columns": [[fields(tables.columns, n), fields(launcher._own_columns, n)] for n in logical],
    "hidden": [[hidden(partitions._hidden, n), hidden(launcher._own_hidden, n)] for n in names],
    "unsized": [launcher._without_sizes(database.objects)(*n) for n in names],
    "exists": [
        [tables.exists(*l), launcher._own_objects(*n) != []] for l, n in zip(logical, names)
    ],
    "threads": database.fetch("SELECT current_setting('threads')")[0][0],
}))
"""


def test_the_emulator_looks_up_one_table_as_its_own_lookup_does_on_one_thread(
    tmp_path: Path,
) -> None:
    answered = subprocess.run(
        [
            str(EMULATOR_PYTHON),
            "-c",
            COMPARE,
            str(LAUNCHER),
            str(tmp_path),
        ],
        env={"HOME": str(EMULATOR_DIR / "home"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert answered.returncode == 0, answered.stderr
    found = json.loads(answered.stdout)
    by_name = dict(zip(map(tuple, found["names"]), found["launcher"], strict=True))
    emulators = dict(zip(map(tuple, found["names"]), found["emulator"], strict=True))
    # Only the size of a table whose rows were deleted or updated differs: the row count
    # (as BigQuery's numRows) instead of DuckDB's estimate, which still counts them.
    assert by_name.pop(("p", "d", "changed")) == [["changed", "TABLE", 7]]
    assert emulators.pop(("p", "d", "changed"))[0][:2] == ["changed", "TABLE"]
    assert by_name == emulators
    assert by_name[("p", "d", "runs")] == [["runs", "TABLE", 5]]
    assert by_name[("p", "d", "pending")] == [["pending", "VIEW", 0]]
    # A query job's result (stored by the emulator in its own database).
    assert by_name[("emulator", "_results", "p:job_1")] == [["p:job_1", "TABLE", 2]]
    assert by_name[("p", "d", "mixed")] == by_name[("p", "d", "missing")] == []
    listing, emulators_listing = found["listing"]
    assert listing == emulators_listing
    assert [name for name, _, _ in listing] == [
        "Mixed",
        "again",
        "again_view",
        "changed",
        "empty",
        "grown",
        "pending",
        "replaced",
        "runs",
        "strict",
        "unhidden",
    ]
    # Columns (REQUIRED where NOT NULL) and the hidden ingestion time, as the emulator's own.
    for ours, emulators in found["columns"] + found["hidden"]:
        assert ours == emulators
    columns = dict(zip(map(tuple, found["names"]), found["columns"], strict=True))
    assert [(f["name"], f["mode"]) for f in columns[("p", "d", "grown")][0]] == [
        ("id", "NULLABLE"),
        ("added", "NULLABLE"),
    ]
    assert [f["mode"] for f in columns[("p", "d", "strict")][0]] == [
        "REQUIRED",
        "NULLABLE",
        "NULLABLE",
    ]
    assert "Not found" in columns[("p", "d", "dropped")][0]
    hidden = dict(zip(map(tuple, found["names"]), found["hidden"], strict=True))
    assert [name for name, (ours, _) in hidden.items() if ours] == [
        ("p", "d", "again"),
        ("p", "d", "again_view"),
    ]
    # A check that a table exists reads no size; its answer is the emulator's own.
    for ours, emulators in zip(found["unsized"], found["emulator"], strict=True):
        assert ours == [[name, kind, 0] for name, kind, _ in emulators]
    for ours, emulators in found["exists"]:
        assert ours == emulators
    assert found["threads"] == 1
