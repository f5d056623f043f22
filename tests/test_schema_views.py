"""A shared schema's views read the published tables, never a run's staging tables: a view
written by a run stays readable after the run has dropped its stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import httpx

from tests.conftest import (
    UNMETERED,
    StackFactory,
    database_path,
    onboard,
    trigger,
    wait_for_run,
)

SCHEMA = """\
name: tally_book
description: Counts per day.
columns:
  - {name: day, type: DATE}
  - {name: n, type: INT64}
views:
  - name: tally_book_totals
    sql: "SELECT SUM(n) AS total, COUNT(*) AS days FROM {dataset}.tally_book_rows"
"""
TEMPLATE = """\
description: Writes one row per day into a table of the tally_book schema.
steps:
  - name: count
    kind: query
    sql: SELECT CAST(@date AS DATE) AS day, CAST(2 AS INT64) AS n
    destination: tally_book_rows
    write_mode: replace_partition
    partition_column: day
    schema: tally_book
"""


def test_a_schema_view_reads_the_published_table(
    stack_factory: StackFactory, config_dir: Path, tmp_path: Path
) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(config_dir, configs)
    (configs / "schemas" / "tally_book.yml").write_text(SCHEMA)
    (configs / "test" / "runs" / "tally_book.yml").write_text(TEMPLATE)
    stack = stack_factory(data_dir=tmp_path / "data", CONVERGENCE_CONFIG_DIR=str(configs))
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        for day in ("2024-03-05", "2024-03-06"):
            run_id = trigger(http, key, tenant_id, "test/runs/tally_book", date=day)
            run = wait_for_run(http, key, str(run_id["pipeline_logging_id"]))
            assert run["status"] == "COMPLETE", run
    stack.stop()
    with duckdb.connect(str(database_path(stack)), read_only=True) as db:
        assert db.execute(f'SELECT * FROM "{tenant_id}".tally_book_totals').fetchall() == [(4, 2)]
