"""A check that runs out of the embedded store's memory (which every run shares, up to
CONVERGENCE_DUCKDB_MEMORY_LIMIT) is tried again, whatever its step's retry policy: another
run finishing may free the memory. Only when every attempt runs out does the run fail,
saying why."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from convergence_server.engine.runner import OUT_OF_MEMORY_ATTEMPTS
from tests.conftest import UNMETERED, StackFactory, onboard, trigger, wait_for_run

# A check whose subquery holds one string of every number up to @size at once: no spilling
# to disk helps it. No retry policy of its own.
HUNGRY = """
description: Three numbers, then a check that needs more memory than the store allows.
parameters:
  size: {type: integer, default: 20000000, description: How many numbers the check joins.}
steps:
  - name: numbers
    kind: query
    sql: SELECT n FROM UNNEST([1, 2, 3]) AS n
    destination: hungry_numbers
    write_mode: truncate
  - name: validate
    kind: dq
    table: hungry_numbers
    checks:
      - name: shorter_than_all_numbers
        type: expression
        sql: >-
          n < (SELECT LENGTH(STRING_AGG(CAST(x AS STRING), ','))
               FROM UNNEST(GENERATE_ARRAY(1, @size)) AS x)
        severity: error
"""


def test_a_check_out_of_memory_is_tried_again_then_fails_saying_why(
    stack_factory: StackFactory,
    config_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    configs = tmp_path_factory.mktemp("hungry") / "configs"
    shutil.copytree(config_dir, configs)
    (configs / "test" / "runs" / "hungry.yml").write_text(HUNGRY)
    stack = stack_factory(
        data_dir=tmp_path_factory.mktemp("hungry_data"),
        CONVERGENCE_CONFIG_DIR=str(configs),
        CONVERGENCE_DUCKDB_MEMORY_LIMIT="48MB",
    )
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        small = trigger(http, key, tenant_id, "test/runs/hungry", parameters={"size": "10"})
        assert wait_for_run(http, key, small["pipeline_logging_id"])["status"] == "COMPLETE"
        run_id = trigger(http, key, tenant_id, "test/runs/hungry")["pipeline_logging_id"]
        done = wait_for_run(http, key, run_id, timeout=120)
        steps = http.get(f"/api/v1/pipelines/runs/{run_id}/steps", headers={"X-API-Key": key})
    assert done["status"] == "FAILED", done
    message = str(done["error_message"])
    assert "memory limit (CONVERGENCE_DUCKDB_MEMORY_LIMIT) was reached" in message, message
    assert f"(after {OUT_OF_MEMORY_ATTEMPTS} attempts)" in message, message
    validate = steps.json()["steps"][-1]
    assert (validate["step_name"], validate["status"]) == ("validate", "FAILED")
    assert validate["attempts"] == OUT_OF_MEMORY_ATTEMPTS
