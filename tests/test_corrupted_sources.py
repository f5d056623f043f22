"""A corrupted source fails its run at the right step, with a clear error and DQ rows,
and leaves the tenant's tables exactly as the last good run left them."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import duckdb
import httpx
import pytest

from convergence_server.config import REPO_ROOT
from convergence_server.stack import Stack
from tests.conftest import UNMETERED, StackFactory, database_path, onboard, trigger, wait_for_run

AWS = "aws/cost/cost_usage"
DAY = "2023-11-04"
SAMPLE = REPO_ROOT / "configs" / "sample_data" / "aws_cur_sample.csv"


def sample_rows() -> list[dict[str, str]]:
    with SAMPLE.open(newline="") as source:
        return list(csv.DictReader(source))


# Amounts BigQuery's SAFE_CAST refuses that DuckDB's TRY_CAST would take (as 1000, 10,
# 1e10): each must fail its run as "twelve dollars" does, on either store.
LAX_COSTS = ("1_000", "1_0", "1e1_0")


def corrupt(target: Path, *, drop: str = "", bad_cost: str = "") -> Path:
    rows = sample_rows()
    columns = [c for c in rows[0] if c != drop]
    if bad_cost:
        first_of_day = next(r for r in rows if r["lineItem/UsageStartDate"].startswith(DAY))
        first_of_day["lineItem/UnblendedCost"] = bad_cost
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    target.write_text(out.getvalue())
    return target


class Story:
    stack: Stack
    tenant_id: str
    good: dict[str, object]
    missing_column: dict[str, object]
    bad_cost: dict[str, object]
    lax_costs: dict[str, dict[str, object]]
    steps: dict[str, list[dict[str, object]]]


@pytest.fixture(scope="module")
def story(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Story:
    s = Story()
    s.stack = stack_factory(data_dir=tmp_path_factory.mktemp("corrupted"), **pipeline_env)
    with httpx.Client(base_url=s.stack.http_url, timeout=30) as http:
        s.tenant_id, key = onboard(http, plan=UNMETERED)
        folder = sources_dir / s.tenant_id  # a tenant reads only its own folder
        folder.mkdir()
        missing = corrupt(folder / "cur_missing_cost.csv", drop="lineItem/UnblendedCost")
        bad = corrupt(folder / "cur_bad_cost.csv", bad_cost="twelve dollars")

        def run(**parameters: str) -> dict[str, object]:
            triggered = trigger(http, key, s.tenant_id, AWS, date=DAY, parameters=parameters)
            return wait_for_run(http, key, triggered["pipeline_logging_id"])

        s.good = run()
        s.missing_column = run(source_uri=str(missing))
        s.bad_cost = run(source_uri=str(bad))
        s.lax_costs = {
            cost: run(source_uri=str(corrupt(folder / f"cur_lax_{i}.csv", bad_cost=cost)))
            for i, cost in enumerate(LAX_COSTS)
        }
        s.steps = {
            name: http.get(
                f"/api/v1/pipelines/runs/{r['pipeline_logging_id']}/steps",
                headers={"X-API-Key": key},
            ).json()["steps"]
            for name, r in (("missing", s.missing_column), ("bad", s.bad_cost))
        }
    s.stack.stop()
    return s


def step_states(steps: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(step["step_name"], step["status"]) for step in steps]


def test_a_missing_column_fails_right_after_the_load(story: Story) -> None:
    assert story.good["status"] == "COMPLETE"
    run = story.missing_column
    assert run["status"] == "FAILED"
    message = str(run["error_message"])
    assert message.startswith("step check_export failed: data quality check(s) failed")
    assert "export_columns_present" in message and "lineItem_UnblendedCost" in message
    assert step_states(story.steps["missing"]) == [
        ("load_export", "COMPLETE"),
        ("check_export", "FAILED"),
    ]


def test_a_non_numeric_cost_fails_the_quality_step(story: Story) -> None:
    run = story.bad_cost
    assert run["status"] == "FAILED"
    message = str(run["error_message"])
    assert message.startswith("step quality failed: data quality check(s) failed")
    assert "billed_cost_present (1 rows with NULL BilledCost)" in message
    states = step_states(story.steps["bad"])
    assert states[-1] == ("quality", "FAILED")
    assert all(status == "COMPLETE" for _, status in states[:-1])


def test_an_amount_bigquery_would_not_read_as_a_number_fails_the_run(story: Story) -> None:
    for cost, run in story.lax_costs.items():
        assert run["status"] == "FAILED", (cost, run)
        assert "billed_cost_present (1 rows with NULL BilledCost)" in str(run["error_message"])
    with duckdb.connect(str(database_path(story.stack)), read_only=True) as db:
        published = db.execute(
            "SELECT pipeline_logging_id FROM tenants.tenant_run_publications WHERE tenant_id = ?",
            [story.tenant_id],
        ).fetchall()
    assert published == [(story.good["pipeline_logging_id"],)]


def test_failed_checks_are_dq_rows(story: Story) -> None:
    with duckdb.connect(str(database_path(story.stack)), read_only=True) as db:
        failed = db.execute(
            "SELECT pipeline_logging_id, step_name, check_name, severity, observed_value "
            "FROM tenants.tenant_dq_results WHERE tenant_id = ? AND status = 'FAILED' "
            "ORDER BY step_name",
            [story.tenant_id],
        ).fetchall()
    assert (
        story.missing_column["pipeline_logging_id"],
        "check_export",
        "export_columns_present",
        "error",
        "missing: lineItem_UnblendedCost",
    ) in failed
    assert (
        story.bad_cost["pipeline_logging_id"],
        "quality",
        "billed_cost_present",
        "error",
        "1",
    ) in failed


def test_nothing_half_written(story: Story) -> None:
    """The tables hold what the good run published: the failed runs published nothing."""
    with duckdb.connect(str(database_path(story.stack)), read_only=True) as db:
        schema = f'"{story.tenant_id}"'
        (raw,) = db.execute(f"SELECT COUNT(*) FROM {schema}.raw_aws_cur").fetchone() or (0,)
        (nulls,) = db.execute(
            f"SELECT COUNT(*) FROM {schema}.focus_aws_cost WHERE BilledCost IS NULL"
        ).fetchone() or (0,)
        (day_rows,) = db.execute(f"SELECT COUNT(*) FROM {schema}.focus_aws_cost").fetchone() or (0,)
        columns = {
            r[0]
            for r in db.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = ? AND table_name = 'raw_aws_cur'",
                [story.tenant_id],
            ).fetchall()
        }
    rows = sample_rows()
    assert raw == len(rows)
    assert "lineItem_UnblendedCost" in columns
    assert nulls == 0
    assert day_rows == sum(1 for r in rows if r["lineItem/UsageStartDate"].startswith(DAY))


def test_a_tenant_reads_only_its_own_source_folder(
    stack_factory: StackFactory, pipeline_env: dict[str, str], sources_dir: Path
) -> None:
    bucket = "gs://convergence-test-sources/exports"
    stack = stack_factory(**pipeline_env, CONVERGENCE_GCS_SOURCE_ROOTS=bucket)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_a, _ = onboard(http, plan=UNMETERED)
        tenant_b, key_b = onboard(http, plan=UNMETERED)
        (sources_dir / tenant_a).mkdir()
        secret = corrupt(sources_dir / tenant_a / "private_cur.csv")
        (sources_dir / tenant_b).mkdir()
        link = sources_dir / tenant_b / "link.csv"
        link.symlink_to(secret)
        attempts = {
            "another tenant's file": str(secret),
            "a symlink out of the folder": str(link),
            "a path climbing out": f"{sources_dir / tenant_b}/../{tenant_a}/private_cur.csv",
            "the sample folder, climbing out": "{sample_data}/../../README.md",
            "a remote URL": "https://example.com/cur.csv",
            "an S3 object": "s3://convergence-test-sources/cur.csv",
            "a bucket not allowed": "gs://someone-elses-bucket/cur.csv",
            "another tenant's bucket folder": f"{bucket}/{tenant_a}/cur.csv",
            "a bucket path climbing out": f"{bucket}/{tenant_b}/../{tenant_a}/cur.csv",
            # Allowed, but only the BigQuery store reads gs:// (its load jobs do).
            "its own bucket folder, on the embedded store": f"{bucket}/{tenant_b}/cur.csv",
        }
        for what, uri in attempts.items():
            # Refused at the door: no run is created, no daily run is spent.
            response = http.post(
                f"/api/v1/pipelines/run/{tenant_b}/{AWS}",
                headers={"X-API-Key": key_b},
                json={"date": DAY, "parameters": {"source_uri": uri}},
            )
            assert response.status_code == 400, (what, response.text)
            details = response.json()["details"]
            assert details["field"] == "parameters.source_uri", what
            if ".." in uri:
                assert details["issue"] == "must not climb out of its folder with '..'", what
            elif uri.startswith(("https://", "s3://")):
                assert details["issue"] == "must be a local path or a gs:// URI", what
            elif what.startswith("its own bucket"):
                assert (
                    details["issue"] == "needs the BigQuery store (only its load jobs read gs://)"
                )
            else:
                assert details["issue"] == "is outside the allowed source folders", what
        runs = http.get("/api/v1/pipelines/runs", headers={"X-API-Key": key_b}).json()["runs"]
        assert runs == []


def test_a_header_no_format_has_fails_its_load_saying_why(
    api: httpx.Client, sources_dir: Path
) -> None:
    """A file of another format read as CSV (a JSON line taken for a header) fails its
    load step with what is wrong, not an internal error."""
    tenant_id, key = onboard(api, plan=UNMETERED)
    folder = sources_dir / tenant_id
    folder.mkdir()
    source = folder / "one_long_header.csv"
    source.write_text("x" * 2000 + "\n1\n")
    triggered = trigger(api, key, tenant_id, AWS, date=DAY, parameters={"source_uri": str(source)})
    done = wait_for_run(api, key, triggered["pipeline_logging_id"])
    assert done["status"] == "FAILED", done
    assert done["error_message"].startswith("step load_export failed: a column name is 2000 "), done
    assert "(at most 300)" in done["error_message"]


def run_on(
    api: httpx.Client, key: str, tenant_id: str, source: Path, content: bytes
) -> dict[str, object]:
    """The tenant's AWS run of DAY on `source`, written with `content`, once it has ended."""
    source.write_bytes(content)
    run = trigger(api, key, tenant_id, AWS, date=DAY, parameters={"source_uri": str(source)})
    return wait_for_run(api, key, run["pipeline_logging_id"])


def test_a_file_that_is_not_valid_csv_fails_its_load_naming_the_line(
    api: httpx.Client, sources_dir: Path
) -> None:
    """Read as BigQuery's load jobs read CSV: no dialect is guessed (a file with one short
    row was once taken for a file of one column), a bad row is named by its line, and two
    columns of one name are refused rather than one of them read."""
    tenant_id, key = onboard(api, plan=UNMETERED)
    folder = sources_dir / tenant_id
    folder.mkdir()
    text = SAMPLE.read_text()
    header, first, *rest = text.splitlines(keepends=True)
    cases = {
        "short_row": (header + first.rsplit(",", 3)[0] + "\n" + "".join(rest)).encode(),
        "extra_field": (header + first.rstrip("\n") + ",extra\n" + "".join(rest)).encode(),
        "unterminated_quote": (header + '"' + first + "".join(rest)).encode(),
        "latin1": (header + first).encode() + "Caf\u00e9\n".encode("latin-1"),
        "utf16": text.encode("utf-16"),
        "empty": b"",
        "blank_first_row": b"\n" + text.encode(),
        "duplicate_column": (header.rstrip("\n") + ",lineItem/UnblendedCost\n").encode()
        + "".join(line.rstrip("\n") + ",1\n" for line in [first, *rest]).encode(),
    }
    expected = {
        "short_row": "the file is not valid CSV: line 2: Expected Number of Columns",
        "extra_field": "the file is not valid CSV: line 2: Expected Number of Columns",
        "unterminated_quote": "the file is not valid CSV: line 2",
        "latin1": "the file is not UTF-8 text (line 3)",
        "utf16": "the file is not UTF-8 text (line 1)",
        "empty": "the file is empty or begins with an empty row",
        "blank_first_row": "the file is empty or begins with an empty row",
        "duplicate_column": "two columns have the same name once sanitized: "
        "'lineItem_UnblendedCost'",
    }
    for name, content in cases.items():
        done = run_on(api, key, tenant_id, folder / f"{name}.csv", content)
        assert done["status"] == "FAILED", (name, done)
        assert done["error_message"].startswith(f"step load_export failed: {expected[name]}"), (
            name,
            done["error_message"],
        )


def test_valid_csv_of_every_line_ending_and_a_byte_order_mark_still_loads(
    api: httpx.Client, sources_dir: Path
) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    folder = sources_dir / tenant_id
    folder.mkdir()
    text = SAMPLE.read_text()
    variants = {
        "crlf": text.replace("\n", "\r\n").encode(),
        "cr": text.replace("\n", "\r").encode(),
        "bom": b"\xef\xbb\xbf" + text.encode(),
        "no_final_line_break": text.rstrip("\n").encode(),
    }
    for name, content in variants.items():
        done = run_on(api, key, tenant_id, folder / f"{name}.csv", content)
        assert done["status"] == "COMPLETE", (name, done)
