"""Google Cloud Billing export to FOCUS: the published costs add up to the invoice, and a
corrupted copy of the export fails its run, naming the check (or the shrink limit) that
stopped it, and leaves the published day as the clean run published it.

One stack. The first tenant publishes every usage day of the sample's invoice month, then
runs each corrupted copy of the export for DAY; a second tenant publishes DAY, then a partial
re-run of it with allow_shrink=true, and a day of April usage billed late in the May export,
with its correction. The figures expected are computed here, with exact decimals, from the
sample file; the tables are read once the stack is stopped.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StackFactory
from tests.cost_support import (
    GCP,
    SAMPLES,
    CostTenant,
    Row,
    cost_tenant,
    ndjson_text,
    read_ndjson,
)

SAMPLE = SAMPLES / "gcp_billing_export_sample.jsonl"
INVOICE_MONTH = "202405"
MONTH_DAYS = ["2024-05-01", "2024-05-02", "2024-05-03", "2024-05-04", "2024-05-05"]
DAY = "2024-05-03"  # usage with credits, tax and an adjustment
LATE_DAY = "2024-04-30"  # usage of the previous invoice month
TABLE = "focus_gcp_cost"


def sample() -> list[Row]:
    """The sample's rows, numbers as exact decimals."""
    return [
        json.loads(line, parse_float=Decimal, parse_int=Decimal)
        for line in SAMPLE.read_text().splitlines()
        if line.strip()
    ]


def usage_day(row: Row) -> str:
    return str(row["usage_start_time"])[:10]  # RFC 3339 in UTC


def credits_of(row: Row) -> list[Decimal]:
    return [Decimal(str(c["amount"])) for c in row.get("credits") or []]


@dataclass(frozen=True)
class Day:
    """What a day of the export should publish: a row per exported row and per credit."""

    rows: int
    billed: Decimal
    effective: Decimal


def expected_day(rows: list[Row], day: str) -> Day:
    of_day = [r for r in rows if usage_day(r) == day]
    credits = [amount for r in of_day for amount in credits_of(r)]
    total = sum((Decimal(str(r["cost"])) for r in of_day), Decimal(0)) + sum(credits, Decimal(0))
    return Day(len(of_day) + len(credits), total, total)


# -- corrupted copies of the export: each edits rows of DAY -----------------------------------


def rows_of_day(rows: list[Row], cost_type: str = "regular") -> list[Row]:
    return [r for r in rows if usage_day(r) == DAY and r["cost_type"] == cost_type]


def with_first(edit: Callable[[Row], None]) -> Callable[[list[Row]], list[Row]]:
    """A corruption that edits the first regular row of DAY that has credits."""

    def corrupt(rows: list[Row]) -> list[Row]:
        edited = copy.deepcopy(rows)
        edit(next(r for r in rows_of_day(edited) if r["credits"]))
        return edited

    return corrupt


def duplicated(rows: list[Row]) -> list[Row]:
    return [*rows, *copy.deepcopy(rows_of_day(rows)[:2])]


def negated(row: Row) -> None:
    row["cost"] = -row["cost"] - 1


def moved_to_june(row: Row) -> None:
    for field in ("usage_start_time", "usage_end_time"):
        row[field] = str(row[field]).replace("2024-05-", "2024-06-")  # invoice month stays May


def set_field(field: str, value: object) -> Callable[[Row], None]:
    def edit(row: Row) -> None:
        row[field] = value

    return edit


def partial(rows: list[Row]) -> list[Row]:
    """A re-run of the export that lost every other row of DAY."""
    lost = {id(r) for r in [r for r in rows if usage_day(r) == DAY][::2]}
    return [r for r in rows if id(r) not in lost]


def late_usage_and_its_correction(rows: list[Row]) -> list[Row]:
    """The export plus April usage billed late on the May invoice, and a correction that
    negates it (the same row, amounts negated, with adjustment_info)."""
    late = copy.deepcopy(next(r for r in rows_of_day(rows) if r["credits"]))
    for field in ("usage_start_time", "usage_end_time"):
        late[field] = str(late[field]).replace(DAY, LATE_DAY)
    correction = copy.deepcopy(late)
    correction["export_time"] = "2024-05-20T10:00:00Z"
    for record, field in [
        (correction, "cost"),
        (correction, "cost_at_list"),
        (correction["usage"], "amount"),
        (correction["usage"], "amount_in_pricing_units"),
        *((credit, "amount") for credit in correction["credits"]),
    ]:
        record[field] = -record[field]
    correction["adjustment_info"] = {
        "id": "adj-usage-0430",
        "description": "Usage reported twice",
        "mode": "COMPLETE_NEGATION",
        "type": "USAGE_CORRECTION",
    }
    return [*rows, late, correction]


# case: (corruption, step that fails, check that fails)
CHECKED: dict[str, tuple[Callable[[list[Row]], list[Row]], str, str]] = {
    "duplicated_rows": (duplicated, "check_export", "no_duplicate_rows"),
    "negative_usage_cost": (with_first(negated), "check_export", "usage_cost_not_negative"),
    "june_usage_in_may_invoice": (
        with_first(moved_to_june),
        "check_export",
        "usage_not_after_invoice_month",
    ),
    "second_currency": (
        with_first(set_field("currency", "EUR")),
        "quality",
        "one_currency_per_account",
    ),
    "huge_cost": (with_first(set_field("cost", 9.9e28)), "check_export", "amounts_plausible"),
    "unparsable_cost": (
        with_first(set_field("cost", "twelve dollars")),
        "check_export",
        "amounts_are_numbers",
    ),
    "unparsable_date": (
        with_first(set_field("usage_start_time", "2024-05-3T25:00:00Z")),
        "check_export",
        "usage_start_parses",
    ),
}


def list_price_below_cost(rows: list[Row]) -> list[Row]:
    """A usage row whose list cost is a tenth of its cost: suspicious, not wrong."""
    edited = copy.deepcopy(rows)
    row = next(r for r in rows_of_day(edited) if Decimal(str(r["cost"])) > Decimal("0.001"))
    row["cost_at_list"] = row["cost"] / 10
    return edited


class Story:
    tenant: CostTenant
    month: dict[str, dict[str, Any]]
    corrupted: dict[str, dict[str, Any]]
    failed_over_rest: dict[str, dict[str, str]]
    shrunk: dict[str, Any]
    other: CostTenant
    other_clean: dict[str, Any]
    other_allowed: dict[str, Any]
    other_late: dict[str, Any]
    warned: dict[str, Any]
    warned_checks: dict[str, str]


@pytest.fixture(scope="module")
def story(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Story]:
    s = Story()
    rows = read_ndjson(SAMPLE)  # as JSON numbers: a copy keeps every digit of the sample
    data_dir = tmp_path_factory.mktemp("focus_gcp")
    with cost_tenant(stack_factory, pipeline_env, sources_dir, data_dir) as tenant:
        s.tenant = tenant
        s.month = {day: tenant.run(GCP, day) for day in MONTH_DAYS}
        s.corrupted, s.failed_over_rest = {}, {}
        for case, (corrupt, _, _) in CHECKED.items():
            uri = tenant.source(f"{case}.jsonl", ndjson_text(corrupt(rows)))
            run = s.corrupted[case] = tenant.run(GCP, DAY, source_uri=uri)
            s.failed_over_rest[case] = tenant.failed_checks(str(run["pipeline_logging_id"]))
        partial_uri = tenant.source("partial.jsonl", ndjson_text(partial(rows)))
        s.shrunk = tenant.run(GCP, DAY, source_uri=partial_uri)
        warned_uri = tenant.source("warned.jsonl", ndjson_text(list_price_below_cost(rows)))
        s.warned = tenant.run(GCP, DAY, source_uri=warned_uri)  # same costs: no shrink
        s.warned_checks = tenant.failed_checks(str(s.warned["pipeline_logging_id"]))

        s.other = CostTenant(tenant.stack, tenant.http, sources_dir)
        s.other_clean = s.other.run(GCP, DAY)
        partial_uri = s.other.source("partial.jsonl", ndjson_text(partial(rows)))
        s.other_allowed = s.other.run(GCP, DAY, source_uri=partial_uri, allow_shrink="true")
        late_uri = s.other.source("late.jsonl", ndjson_text(late_usage_and_its_correction(rows)))
        s.other_late = s.other.run(GCP, LATE_DAY, source_uri=late_uri)
        tenant.stack.stop()
    yield s


def published_day(tenant: CostTenant, day: str) -> Day:
    ((rows, billed, effective),) = tenant.query(
        f"SELECT COUNT(*), SUM(BilledCost), SUM(EffectiveCost) FROM {{t}}.{TABLE} "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{day}'"
    )
    return Day(rows, Decimal(str(billed)), Decimal(str(effective)))


# -- the clean month ---------------------------------------------------------------------------


def test_every_clean_run_completes(story: Story) -> None:
    for day, run in story.month.items():
        assert run["status"] == "COMPLETE", (day, run)
    assert story.other_clean["status"] == "COMPLETE", story.other_clean


def test_billed_cost_adds_up_to_the_invoice(story: Story) -> None:
    """SUM(BilledCost) over the invoice month is what the invoice charges: costs plus
    credits (negative). EffectiveCost adds up to the same."""
    rows = [r for r in sample() if r["invoice"]["month"] == INVOICE_MONTH]
    invoice = sum((Decimal(str(r["cost"])) for r in rows), Decimal(0)) + sum(
        (amount for r in rows for amount in credits_of(r)), Decimal(0)
    )
    ((billed, effective),) = story.tenant.query(
        f"SELECT SUM(BilledCost), SUM(EffectiveCost) FROM {{t}}.{TABLE} "
        "WHERE BillingPeriodStart = TIMESTAMPTZ '2024-05-01 00:00:00 America/Los_Angeles'"
    )
    assert Decimal(str(billed)) == invoice
    assert Decimal(str(effective)) == invoice
    assert invoice == Decimal("116.391597")  # the sample's costs 117.842916, credits -1.451319
    for day in MONTH_DAYS:
        assert published_day(story.tenant, day) == expected_day(rows, day), day


def test_each_credit_is_a_row_of_its_own(story: Story) -> None:
    credits = [amount for r in sample() for amount in credits_of(r)]
    ((count, billed, effective, listed),) = story.tenant.query(
        f"SELECT COUNT(*), SUM(BilledCost), SUM(ABS(EffectiveCost)), SUM(ABS(ListCost)) "
        f"FROM {{t}}.{TABLE} WHERE ChargeCategory = 'Credit'"
    )
    assert count == len(credits) > 0
    assert Decimal(str(billed)) == sum(credits, Decimal(0))
    # The row a credit reduces carries it in its EffectiveCost (and its list price).
    assert effective == 0 and listed == 0


def test_tax_rows_have_no_sku_prices_or_quantities(story: Story) -> None:
    taxes = sum(1 for r in sample() if r["cost_type"] == "tax")
    ((count, with_any),) = story.tenant.query(
        f"SELECT COUNT(*), COUNT(COALESCE(SkuId, SkuPriceId, PricingUnit, ConsumedUnit, "
        f"PricingCategory, CAST(PricingQuantity AS VARCHAR), CAST(ConsumedQuantity AS VARCHAR), "
        f"CAST(ListUnitPrice AS VARCHAR), CAST(ContractedUnitPrice AS VARCHAR))) "
        f"FROM {{t}}.{TABLE} WHERE ChargeCategory = 'Tax'"
    )
    assert count == taxes > 0
    assert with_any == 0
    ((consumed,),) = story.tenant.query(
        f"SELECT COUNT(COALESCE(ConsumedUnit, CAST(ConsumedQuantity AS VARCHAR))) "
        f"FROM {{t}}.{TABLE} WHERE ChargeCategory <> 'Usage'"
    )
    assert consumed == 0


def test_usage_rows_have_list_unit_prices(story: Story) -> None:
    """Every usage row with a list cost and a quantity has a ListUnitPrice, which times the
    PricingQuantity gives its ListCost (to the 9 decimals of NUMERIC)."""
    usage = [r for r in sample() if r["cost_type"] == "regular"]
    priced = [
        r
        for r in usage
        if r.get("cost_at_list") is not None
        and (r["usage"].get("amount_in_pricing_units") or 0) != 0
    ]
    ((count, with_price, off),) = story.tenant.query(
        f"SELECT COUNT(*), COUNT(ListUnitPrice), "
        f"MAX(ABS(ListUnitPrice * PricingQuantity - ListCost)) "
        f"FROM {{t}}.{TABLE} WHERE ChargeCategory = 'Usage'"
    )
    assert count == len(usage)
    assert with_price == len(priced) > 0
    assert Decimal(str(off)) < Decimal("0.000001")


# -- corrupted exports ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CHECKED))
def test_a_corrupted_export_fails_the_named_check(story: Story, case: str) -> None:
    _, step, check = CHECKED[case]
    run = story.corrupted[case]
    assert run["status"] == "FAILED", run
    message = str(run["error_message"])
    assert message.startswith(f"step {step} failed: data quality check(s) failed"), message
    assert check in message
    assert story.failed_over_rest[case].get(check) == "error", story.failed_over_rest[case]


@pytest.mark.parametrize("case", sorted(CHECKED))
def test_the_failed_check_is_recorded(story: Story, case: str) -> None:
    _, step, check = CHECKED[case]
    run_id = story.corrupted[case]["pipeline_logging_id"]
    failed = story.tenant.query(
        "SELECT step_name, check_name, severity FROM tenants.tenant_dq_results "
        f"WHERE pipeline_logging_id = '{run_id}' AND status = 'FAILED'"
    )
    assert (step, check, "error") in failed


def test_a_partial_export_is_refused_by_the_shrink_limit(story: Story) -> None:
    run = story.shrunk
    assert run["status"] == "FAILED", run
    message = str(run["error_message"])
    assert TABLE in message and DAY in message and "allow_shrink" in message, message


def test_a_list_price_below_the_cost_publishes_with_a_warning(story: Story) -> None:
    assert (story.warned["status"], story.warned["warnings"]) == ("COMPLETE", 1), story.warned
    assert story.warned_checks == {"list_cost_not_below_effective_cost": "warn"}


def test_failed_runs_leave_the_published_day_unchanged(story: Story) -> None:
    assert published_day(story.tenant, DAY) == expected_day(sample(), DAY)


def test_allow_shrink_publishes_the_partial_export(story: Story) -> None:
    assert story.other_allowed["status"] == "COMPLETE", story.other_allowed
    kept = partial(sample())
    assert published_day(story.other, DAY) == expected_day(kept, DAY)
    assert expected_day(kept, DAY).rows < expected_day(sample(), DAY).rows


def test_credits_are_not_flagged(story: Story) -> None:
    """The clean runs' checks all passed, warnings included: credits and credit rows are
    legitimate."""
    run_ids = [str(r["pipeline_logging_id"]) for r in story.month.values()]
    failed = story.tenant.query(
        "SELECT pipeline_logging_id, check_name FROM tenants.tenant_dq_results "
        f"WHERE status = 'FAILED' AND pipeline_logging_id IN ({', '.join(map(repr, run_ids))})"
    )
    assert failed == []
    credits_per_day: dict[str, int] = defaultdict(int)
    for r in sample():
        credits_per_day[usage_day(r)] += len(r.get("credits") or [])
    assert all(credits_per_day[day] > 0 for day in MONTH_DAYS)  # every day had some to judge


def test_late_usage_and_its_correction_are_legitimate(story: Story) -> None:
    """April usage on the May invoice passes every check, warnings included; its correction
    (negative usage with adjustment_info) is ChargeClass Correction, and the two cancel out."""
    run = story.other_late
    assert run["status"] == "COMPLETE", run
    failed = story.other.query(
        "SELECT check_name FROM tenants.tenant_dq_results "
        f"WHERE pipeline_logging_id = '{run['pipeline_logging_id']}' AND status = 'FAILED'"
    )
    assert failed == []
    published = story.other.query(
        f"SELECT ChargeCategory, ChargeClass, COUNT(*), SUM(BilledCost), "
        f"COUNT(DISTINCT BillingPeriodStart), MIN(BillingPeriodStart) "
        f"FROM {{t}}.{TABLE} WHERE CAST(ChargePeriodStart AS DATE) = DATE '{LATE_DAY}' "
        "GROUP BY ChargeCategory, ChargeClass"
    )
    late = next(r for r in rows_of_day(sample()) if r["credits"])
    cost, credits = Decimal(str(late["cost"])), sum(credits_of(late), Decimal(0))
    count = len(late["credits"])
    assert {(c, k): (n, Decimal(str(b))) for c, k, n, b, _, _ in published} == {
        ("Usage", None): (1, cost),
        ("Usage", "Correction"): (1, -cost),
        ("Credit", None): (count, credits),
        ("Credit", "Correction"): (count, -credits),
    }
    billing_periods = {(n, str(start)) for *_, n, start in published}
    assert billing_periods == {(1, "2024-05-01 07:00:00+00:00")}  # the May invoice
