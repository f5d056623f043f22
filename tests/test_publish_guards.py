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
DAY, LATER, FIRST, SECOND = "2024-03-05", "2024-03-06", "2024-03-07", "2024-03-08"
HEADER = "id,account,currency,day,amount\n"


def ledger_rows(day: str, count: int = 10, cents: str = "25") -> str:
    return "".join(f"{i},acct-1,USD,{day},{i}.{cents}\n" for i in range(1, count + 1))


CLEAN = HEADER + ledger_rows(DAY)


class Outcomes:
    tenant: CostTenant
    runs: dict[str, dict[str, object]]
    checks: dict[str, dict[str, dict[str, object]]]


def ledger(
    tenant: CostTenant, name: str, text: str, day: str = DAY, **parameters: str
) -> dict[str, object]:
    source = tenant.source(name, text)
    return tenant.run(LEDGER, day, source_uri=source, **parameters)


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
        # DAY: published clean, then only refused runs.
        o.runs["clean"] = ledger(tenant, "clean.csv", CLEAN)
        lines = CLEAN.splitlines(keepends=True)
        # The third line again under a new id.
        o.runs["copy"] = ledger(tenant, "copy.csv", CLEAN + "99" + lines[3][lines[3].index(",") :])
        o.runs["currency"] = ledger(tenant, "eur.csv", CLEAN + f"11,acct-1,EUR,{DAY},3.00\n")
        partial = "".join(lines[:5])  # 4 of the day's 10 rows
        o.runs["partial"] = ledger(tenant, "partial.csv", partial)
        o.runs["empty"] = ledger(tenant, "empty.csv", HEADER + ledger_rows(LATER, 1))
        # LATER: a shrink within the 20% a step may shrink by default, then one allowed.
        later = HEADER + ledger_rows(LATER)
        o.runs["later"] = ledger(tenant, "later.csv", later, LATER)
        o.runs["smaller"] = ledger(tenant, "smaller.csv", HEADER + ledger_rows(LATER, 9), LATER)
        o.runs["allowed"] = ledger(
            tenant, "fewer.csv", HEADER + ledger_rows(LATER, 4), LATER, allow_shrink="true"
        )
        # A reused load: a version (modification time, size) is loaded once, so content
        # changed behind its back is not seen; a new version is.
        path = Path(tenant.folder / "two_days.csv")
        o.runs["first"] = ledger(
            tenant, path.name, HEADER + ledger_rows(FIRST) + ledger_rows(SECOND), FIRST
        )
        before = path.stat()
        path.write_text(HEADER + ledger_rows(FIRST, cents="50") + ledger_rows(SECOND, cents="50"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        o.runs["same_version"] = tenant.run(LEDGER, SECOND, source_uri=str(path))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        o.runs["new_version"] = tenant.run(LEDGER, FIRST, source_uri=str(path))
        o.checks = {
            name: {c["check_name"]: c for c in tenant.checks(str(run["pipeline_logging_id"]))}
            for name, run in o.runs.items()
        }
        tenant.stack.stop()
        yield o


def status(o: Outcomes, name: str) -> object:
    return o.runs[name]["status"]


def test_a_clean_file_publishes_with_its_warning(outcomes: Outcomes) -> None:
    run = outcomes.runs["clean"]
    assert run["status"] == "COMPLETE" and run["warnings"] == 1
    checks = outcomes.checks["clean"]
    assert {n: c["status"] for n, c in checks.items()} == {
        "no_copies": "PASSED",
        "ids_present": "PASSED",
        "memo_short": "FAILED",
        "one_currency": "PASSED",
    }
    # A check whose SQL fails (here: no column memo) is a failed check, not a failed step.
    assert "the check cannot run" in str(checks["memo_short"]["message"])
    assert "memo" in str(checks["memo_short"]["message"])


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


def day_total(o: Outcomes, day: str) -> tuple[object, ...]:
    (row,) = o.tenant.query(
        f"SELECT COUNT(*), SUM(amount) FROM {{t}}.ledger WHERE day = DATE '{day}'"
    )
    return row


def test_refused_runs_left_the_published_day_alone(outcomes: Outcomes) -> None:
    assert [status(outcomes, n) for n in ("copy", "currency", "partial", "empty")] == ["FAILED"] * 4
    assert day_total(outcomes, DAY) == (10, Decimal("57.5"))  # 1.25 + ... + 10.25
    assert day_total(outcomes, LATER) == (4, Decimal("11"))  # the allowed run's 4 rows


def test_a_reused_load_reads_each_version_once(outcomes: Outcomes) -> None:
    for name in ("first", "same_version", "new_version"):
        assert status(outcomes, name) == "COMPLETE"
        # The file's checks ran when the version was loaded; every run reading it shows them.
        assert outcomes.checks[name]["no_copies"]["status"] == "PASSED"
    # The same version: the rows loaded first (.25), not the file's new content (.50).
    assert day_total(outcomes, SECOND) == (10, Decimal("57.5"))
    # A new version: loaded again.
    assert day_total(outcomes, FIRST) == (10, Decimal("60"))
    # Each file's newest version is kept, with the one before it for runs still reading it.
    sources = outcomes.tenant.query(
        "SELECT table_name FROM information_schema.tables "
        f"WHERE table_schema = '{outcomes.tenant.tenant_id}' AND starts_with(table_name, '_src_')"
    )
    files = ("clean", "copy", "eur", "partial", "empty", "later", "smaller", "fewer", "two_days")
    assert len(sources) == len(files) + 1


def test_the_destination_is_a_view_of_the_loaded_file(outcomes: Outcomes) -> None:
    """raw_ledger shows the rows of the version the last published run read."""
    assert day_total(outcomes, FIRST) == (10, Decimal("60"))
    ((rows, kind),) = outcomes.tenant.query(
        "SELECT (SELECT COUNT(*) FROM {t}.raw_ledger), (SELECT table_type FROM "
        "information_schema.tables WHERE table_schema = '"
        + outcomes.tenant.tenant_id
        + "' AND table_name = 'raw_ledger')"
    )
    assert (rows, kind) == (20, "VIEW")


def test_an_optional_column_is_added_as_null(outcomes: Outcomes) -> None:
    ((rows, notes),) = outcomes.tenant.query(
        f"SELECT COUNT(*), COUNT(note) FROM {{t}}.ledger WHERE day = DATE '{DAY}'"
    )
    assert (rows, notes) == (10, 0)


def test_query_steps_stage_and_publish_whole_tables(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A query step's stage (in memory on the embedded store) is read by the run's later
    steps and checks, and replaces the table when the run publishes; no stage outlives it."""
    data_dir = tmp_path_factory.mktemp("tally")
    with cost_tenant(stack_factory, pipeline_env, sources_dir, data_dir) as tenant:
        first = tenant.run("test/runs/tally", DAY, upto="3")
        second = tenant.run("test/runs/tally", DAY, upto="2")
        tenant.stack.stop()
        assert (first["status"], second["status"]) == ("COMPLETE", "COMPLETE"), (first, second)
        assert sorted(n for (n,) in tenant.query("SELECT n FROM {t}.tally")) == [1, 2, 2, 4]
        leftovers = tenant.query(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE '\\_stage\\_%'"
            " ESCAPE '\\'"
        )
        assert leftovers == []
