"""The tests' BigQuery emulator (tests/fixtures/bigquery_emulator_main.py): its cheap lookup
of one table answers as the emulator's own lookup does, and its DuckDB uses one thread."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.bigquery_emulator import EMULATOR_DIR, EMULATOR_PYTHON, LAUNCHER

# Run by the emulator's Python: makes tables and views, then asks both lookups about each
# name (the launcher's `_listing` is the emulator's own `objects`).
COMPARE = """
import importlib.util, json, sys
from pathlib import Path
from local_bigquery.settings import settings
settings.data_dir = Path(sys.argv[2])
settings.default_project_id = "p"
spec = importlib.util.spec_from_file_location("launcher", sys.argv[1])
launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launcher)
from local_bigquery.engine import database
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
):
    database.execute(statement)
names = [
    ("p", "d", "runs"), ("p", "d", "Mixed"), ("p", "d", "mixed"), ("p", "d", "empty"),
    ("p", "d", "pending"), ("p", "d", "missing"), ("p", "other", "runs"),
    ("p", "other", "pending"), ("p", "gone", "runs"), ("q", "d", "runs"),
    ("p", "d", "changed"), ("emulator", "_results", "p:job_1"),
    ("emulator", "_results", "p:job_2"),
]
print(json.dumps({
    "names": names,
    "emulator": [launcher._listing(*n) for n in names],
    "launcher": [database.objects(*n) for n in names],
    "listing": [database.objects("p", "d"), launcher._listing("p", "d")],
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
        check=True,
    )
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
    assert [name for name, _, _ in listing] == ["Mixed", "changed", "empty", "pending", "runs"]
    assert found["threads"] == 1
