"""The guide's monitoring SQL, verbatim, on both stores (`convergence-server sql`).

`your-project` is the configured project: on the embedded store the name is dropped, on
BigQuery (the emulator, whose project is `test-project`) the SQL names that project. The
BigQuery stack uses no dataset prefix, so the central dataset is `tenants`, as in the guide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from tests.conftest import UNMETERED, StackFactory, onboard, trigger, wait_for_run

History = tuple[dict[str, str], str, str, str]


def sql(env: dict[str, str], query: str) -> list[dict[str, object]]:
    project = env.get("CONVERGENCE_PROJECT", "your-project")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convergence_server",
            "sql",
            "--format",
            "json",
            query.replace("your-project", project),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module", params=["embedded", "bigquery"])
def history(
    request: pytest.FixtureRequest,
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[History]:
    """A store holding one COMPLETE and one FAILED run of one tenant (the embedded store
    stopped, as its file allows one process at a time), and the settings that reach it."""
    data_dir = tmp_path_factory.mktemp("monitoring")
    env = {"CONVERGENCE_DATA_DIR": str(data_dir)}
    if request.param == "bigquery":
        env.update(request.getfixturevalue("emulator").env(prefix=""))
    stack = stack_factory(data_dir=data_dir, **pipeline_env, **env)
    with httpx.Client(base_url=stack.http_url, timeout=300) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        done = trigger(http, key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
        failed = trigger(http, key, tenant_id, "test/runs/slow", parameters={"size": "0"})
        wait_for_run(http, key, done, timeout=180)
        wait_for_run(http, key, failed["pipeline_logging_id"], timeout=180)
    if request.param == "embedded":
        stack.stop()
    yield env, tenant_id, str(done), str(failed["pipeline_logging_id"])
    stack.stop()


def test_pipeline_runs_query(history: History) -> None:
    env, tenant_id, done, failed = history
    rows = sql(
        env,
        f"""SELECT * FROM `your-project.tenants.tenant_pipeline_runs`
            WHERE tenant_id = '{tenant_id}'
            ORDER BY start_time DESC
            LIMIT 10;""",
    )
    assert {r["pipeline_logging_id"]: r["status"] for r in rows} == {
        done: "COMPLETE",
        failed: "FAILED",
    }
    # What a run does not have is NULL on both stores (BigQuery once stored '' for a run
    # triggered without an idempotency key).
    assert all(r["idempotency_key"] is None and r["user_id"] is None for r in rows), rows


def test_step_logs_query(history: History) -> None:
    env, tenant_id, _, failed = history
    rows = sql(
        env,
        f"""SELECT * FROM `your-project.tenants.tenant_step_logs`
            WHERE tenant_id = '{tenant_id}'
              AND pipeline_logging_id = '{failed}'
            ORDER BY step_start_time;""",
    )
    assert [(r["step_name"], r["status"]) for r in rows] == [
        ("count_1", "COMPLETE"),
        ("count_2", "COMPLETE"),
        ("count_3", "COMPLETE"),
        ("counted", "FAILED"),
    ]
    assert "counted_something" in str(rows[-1]["error_message"])


def test_dq_results_query(history: History) -> None:
    env, tenant_id, _, failed = history
    rows = sql(
        env,
        f"""SELECT * FROM `your-project.tenants.tenant_dq_results`
            WHERE tenant_id = '{tenant_id}'
            ORDER BY ingestion_date DESC;""",
    )
    checks = {(r["pipeline_logging_id"], r["check_name"]): r["status"] for r in rows}
    assert checks == {(failed, "three_rows"): "PASSED", (failed, "counted_something"): "FAILED"}


def test_tenant_comprehensive_view_query(history: History) -> None:
    env, tenant_id, _, failed = history
    rows = sql(
        env,
        f"""SELECT *
            FROM `your-project.{tenant_id}.tenant_comprehensive_view`
            WHERE status = 'FAILED'
            ORDER BY start_time DESC;""",
    )
    assert [r["pipeline_logging_id"] for r in rows] == [failed]
    assert rows[0]["steps_failed"] == 1 and rows[0]["dq_checks_failed"] == 1


def test_usage_queries_return_the_right_figures(history: History) -> None:
    env, tenant_id, _, _ = history
    current = sql(
        env,
        f"""SELECT
              tenant_id,
              usage_date,
              pipelines_run_today,
              daily_limit,
              (pipelines_run_today / daily_limit * 100) as usage_percent,
              concurrent_pipelines_running,
              concurrent_limit
            FROM `your-project.tenants.tenant_usage_quotas`
            WHERE tenant_id = '{tenant_id}'
              AND usage_date = CURRENT_DATE();""",
    )
    monthly = sql(
        env,
        f"""SELECT
              DATE_TRUNC(usage_date, MONTH) as month,
              SUM(pipelines_run_today) as total_pipelines,
              AVG(pipelines_run_today) as avg_daily_pipelines,
              MAX(concurrent_pipelines_running) as peak_concurrent
            FROM `your-project.tenants.tenant_usage_quotas`
            WHERE tenant_id = '{tenant_id}'
              AND usage_date >= DATE_SUB(CURRENT_DATE(), INTERVAL 6 MONTH)
            GROUP BY month
            ORDER BY month DESC;""",
    )
    # Two runs today (one COMPLETE, one FAILED), none running now; the UNMETERED plan.
    assert len(current) == 1
    row = current[0]
    assert (row["pipelines_run_today"], row["daily_limit"], row["concurrent_limit"]) == (
        2,
        1_000_000,
        100_000,
    )
    assert row["usage_percent"] == pytest.approx(2 / 1_000_000 * 100)
    assert row["concurrent_pipelines_running"] == 0
    assert len(monthly) == 1
    assert monthly[0]["total_pipelines"] == 2
    this_month = datetime.now(UTC).date().replace(day=1).isoformat()
    assert monthly[0]["month"] == this_month  # a DATE, as BigQuery's


def test_safe_cast_reads_text_as_bigquery_does(history: History) -> None:
    """SAFE_CAST of text to a number takes what BigQuery takes (spaces around a literal),
    not what DuckDB alone would ("1_000", ".5" as an integer), under every name BigQuery
    gives INT64; a cast of a cast is checked once, however deep."""
    env = history[0]
    if env.get("CONVERGENCE_STORE") == "bigquery":
        pytest.skip('the local emulator casts as DuckDB does ("1_000" as 1000), not as BigQuery')
    deep = "' 7 '"
    for depth in range(12):
        deep = f"SAFE_CAST({deep} AS {'FLOAT64' if depth % 2 else 'NUMERIC'})"
    (row,) = sql(
        env,
        "SELECT SAFE_CAST('1_000' AS NUMERIC) AS underscore, "
        "SAFE_CAST(' 12 ' AS NUMERIC) AS spaced, SAFE_CAST('.5' AS INT64) AS half, "
        "SAFE_CAST('1_0' AS INTEGER) AS integer_alias, SAFE_CAST('0x10' AS INT64) AS hex, "
        "SAFE_CAST('-inf' AS FLOAT64) < 0 AS minus_inf, "
        f"SAFE_CAST(SAFE_CAST('2.0' AS FLOAT64) AS INT64) AS of_a_float, {deep} = 7 AS deep, "
        "SAFE_CAST('0' AS NUMERIC) AS zero, SAFE_CAST('0.12423215' AS NUMERIC) AS fraction",
    )
    assert row == {
        "underscore": None,
        "spaced": "12",  # a NUMERIC as BigQuery writes it
        "half": None,
        "integer_alias": None,
        "hex": 16,
        "minus_inf": True,
        "of_a_float": 2,
        "deep": True,
        "zero": "0",
        "fraction": "0.12423215",
    }
