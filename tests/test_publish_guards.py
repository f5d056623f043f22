"""What the engine guards for every template (tests/fixtures/templates/ledger.yml): checks
over whole rows and groups with samples of what failed, a publication that never silently
shrinks a published day, and a source file loaded once per version."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import StackFactory
from tests.cost_support import CostTenant, cost_tenant

LEDGER = "test/runs/ledger"
DAY = "2024-03-05"
HEADER = "id,account,currency,day,amount\n"
CLEAN = HEADER + "".join(f"{i},acct-1,USD,{DAY},{i}.25\n" for i in range(1, 11))


class Outcomes:
    tenant: CostTenant
    runs: dict[str, dict[str, object]]
    checks: dict[str, dict[str, dict[str, object]]]
    reloaded_day: list[tuple[object, ...]]


def ledger(tenant: CostTenant, name: str, text: str, **parameters: str) -> dict[str, object]:
    source = tenant.source(name, text)
    return tenant.run(LEDGER, DAY, source_uri=source, **parameters)


@pytest.fixture(scope="module")
def outcomes(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Outcomes]:
    o = Outcomes()
    o.runs = {}
    data_dir = tmp_path_factory.mktemp("guards")
    with cost_tenant(stack_factory, pipeline_env, sources_dir, data_dir) as tenant:
        o.tenant = tenant
        o.runs["clean"] = ledger(tenant, "clean.csv", CLEAN)
        lines = CLEAN.splitlines(keepends=True)
        # The third line again under a new id.
        o.runs["copy"] = ledger(tenant, "copy.csv", CLEAN + "99" + lines[3][lines[3].index(",") :])
        o.runs["currency"] = ledger(tenant, "eur.csv", CLEAN + f"11,acct-1,EUR,{DAY},3.00\n")
        partial = "".join(lines[:5])  # 4 of the day's 10 rows
        o.runs["partial"] = ledger(tenant, "partial.csv", partial)
        o.runs["empty"] = ledger(tenant, "empty.csv", HEADER + "1,acct-1,USD,2024-03-06,1.00\n")
        # 9 of 10 rows: within the 20% a step may shrink by default.
        o.runs["smaller"] = ledger(tenant, "smaller.csv", "".join(lines[:10]))
        o.runs["allowed"] = ledger(tenant, "partial.csv", partial, allow_shrink="true")
        # A reused load: the same version (path, size, modification time) is not read
        # again, so content changed behind its back is not seen; a new version is.
        path = Path(tenant.folder / "partial.csv")
        before = path.stat()
        path.write_text(partial.replace(".25", ".75"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        o.runs["same_version"] = tenant.run(LEDGER, DAY, source_uri=str(path))
        path.write_text(partial.replace(".25", ".50") + "")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        o.runs["new_version"] = tenant.run(LEDGER, DAY, source_uri=str(path))
        o.checks = {
            name: {c["check_name"]: c for c in tenant.checks(str(run["pipeline_logging_id"]))}
            for name, run in o.runs.items()
        }
        tenant.stack.stop()
        yield o


def status(o: Outcomes, name: str) -> object:
    return o.runs[name]["status"]


def test_a_clean_file_publishes_with_every_check_passed(outcomes: Outcomes) -> None:
    assert status(outcomes, "clean") == "COMPLETE"
    checks = outcomes.checks["clean"]
    assert {n: c["status"] for n, c in checks.items()} == {
        "no_copies": "PASSED",
        "ids_present": "PASSED",
        "one_currency": "PASSED",
    }


def test_a_row_copied_under_a_new_id_fails_with_a_sample(outcomes: Outcomes) -> None:
    assert status(outcomes, "copy") == "FAILED"
    assert "no_copies" in str(outcomes.runs["copy"]["error_message"])
    check = outcomes.checks["copy"]["no_copies"]
    assert check["status"] == "FAILED" and check["failed_rows"] == 2
    (sample,) = check["sample_rows"]
    sample = sample if isinstance(sample, dict) else json.loads(str(sample))
    assert sample["amount"] == "3.25" and sample["copies"] == "2" and "id" not in sample


def test_two_currencies_for_one_account_fail(outcomes: Outcomes) -> None:
    assert status(outcomes, "currency") == "FAILED"
    check = outcomes.checks["currency"]["one_currency"]
    assert check["status"] == "FAILED" and check["failed_rows"] == 11
    (sample,) = check["sample_rows"]
    sample = sample if isinstance(sample, dict) else json.loads(str(sample))
    assert sample["account"] == "acct-1" and sample["currency"] in ("EUR, USD", "USD, EUR")


def test_a_partial_export_is_refused_with_counts_and_totals(outcomes: Outcomes) -> None:
    run = outcomes.runs["partial"]
    assert run["status"] == "FAILED"
    error = str(run["error_message"])
    assert f"ledger for {DAY}" in error and "allow_shrink" in error
    assert "10 rows (amount total 57.500000000)" in error
    assert "4 rows (amount total 11.000000000)" in error


def test_an_empty_day_is_refused(outcomes: Outcomes) -> None:
    assert status(outcomes, "empty") == "FAILED"
    assert "to 0 rows" in str(outcomes.runs["empty"]["error_message"])


def test_a_shrink_within_the_limit_publishes(outcomes: Outcomes) -> None:
    assert status(outcomes, "smaller") == "COMPLETE"


def test_allow_shrink_publishes_and_is_recorded(outcomes: Outcomes) -> None:
    run = outcomes.runs["allowed"]
    assert run["status"] == "COMPLETE"
    assert dict(run["parameters"])["allow_shrink"] == "true"  # type: ignore[call-overload]


def test_a_reused_load_reads_each_version_once(outcomes: Outcomes) -> None:
    assert status(outcomes, "same_version") == "COMPLETE"
    assert status(outcomes, "new_version") == "COMPLETE"
    (total,) = outcomes.tenant.query(
        f"SELECT SUM(amount) FROM {{t}}.ledger WHERE day = DATE '{DAY}'"
    )[0]
    assert total == Decimal("12.00")  # 1.50 + 2.50 + 3.50 + 4.50: the new version's rows
    sources = outcomes.tenant.query(
        "SELECT table_name FROM information_schema.tables "
        f"WHERE table_schema = '{outcomes.tenant.tenant_id}' AND starts_with(table_name, '_src_')"
    )
    # One table per file still in use; the partial file's older version was dropped.
    assert len(sources) == len({"clean", "copy", "eur", "empty", "smaller", "partial"})


def test_refused_runs_left_the_published_day_alone(outcomes: Outcomes) -> None:
    """After the clean run and the one within limits, only allowed runs changed the day."""
    rows = outcomes.tenant.query(
        f"SELECT COUNT(*), COUNT(note) FROM {{t}}.ledger WHERE day = DATE '{DAY}'"
    )
    assert rows == [(4, 0)]  # the optional `note` column exists, NULL
