"""The AWS CUR template bills what the invoice says and stops corrupted exports.

One stack, two tenants. The first runs a CUR of an account with an EDP discount (the sample
with lineItem/NetUnblendedCost and lineItem/NetUnblendedRate added, 10% off, billing period
to 2023-11-03) day by day: its FOCUS rows must add up to the invoice and follow FOCUS 1.0's
rules for Tax rows. The second publishes a day from the sample, then runs a corrupted copy of
the CUR for that day: each corruption must fail its run with the named checks, leaving the
published day exactly as the clean run left it, or publish with a warning the run reports.
A usage start in another form than the CUR's own counts on the day it is in UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StackFactory, trigger, wait_for_run
from tests.cost_support import AWS, SAMPLES, CostTenant, Row, cost_tenant, csv_text, read_csv

HEADER, SAMPLE = read_csv(SAMPLES / "aws_cur_sample.csv")
START, COST, RATE = "lineItem/UsageStartDate", "lineItem/UnblendedCost", "lineItem/UnblendedRate"
NET_COST, NET_RATE = "lineItem/NetUnblendedCost", "lineItem/NetUnblendedRate"
# NUMERIC keeps 9 decimals; loading rounds a longer value half away from zero.
NUMERIC = Decimal("1e-9")
EDP = Decimal("0.9")  # 10% off every charge but tax
INVOICE_DAYS = ("2023-11-01", "2023-11-02", "2023-11-03")
NO_PRODUCT_NAME_DAY = "2023-11-11"
OTHER_FORMS_DAY = "2023-11-04"
# Usage starts of the sample rewritten in forms other than the CUR's own (UTC, `Z`), each the
# same instant: the first three stay on OTHER_FORMS_DAY whatever day their text begins
# with; the last, whose text begins with that day, is the next day's.
OTHER_FORMS = {
    "2023-11-04T00:00:00.000Z": "2023-11-03T24:00:00Z",
    "2023-11-04T01:00:00.000Z": "2023-11-03T20:00:00-05:00",
    "2023-11-04T17:00:00.000Z": "2023-11-04 17:00:00",
    "2023-11-05T04:00:00.000Z": "2023-11-04T23:00:00-05:00",
}
PARTIAL_DAY = "2023-11-12"
TAX_NULL_COLUMNS = (
    "PricingQuantity",
    "PricingUnit",
    "ConsumedQuantity",
    "ConsumedUnit",
    "SkuId",
    "SkuPriceId",
    "ListUnitPrice",
    "ContractedUnitPrice",
    "PricingCategory",
)


def day_of(row: Row) -> str:
    return str(row[START])[:10]


def rows_of(rows: list[Row], day: str) -> list[Row]:
    return [r for r in rows if day_of(r) == day]


def billed(row: Row) -> Decimal:
    return Decimal(row[COST]).quantize(NUMERIC, ROUND_HALF_UP)


def first_usage(rows: list[Row], day: str) -> Row:
    """The day's first Usage line item with a cost above zero."""
    return next(
        r
        for r in rows_of(rows, day)
        if r["lineItem/LineItemType"] == "Usage" and Decimal(r[COST]) > 0
    )


def with_edp_discount(rows: list[Row]) -> list[Row]:
    """The rows with AWS's Net* columns for a 10% EDP discount (taxes are not discounted)."""
    out = []
    for row in rows:
        rate = EDP if row["lineItem/LineItemType"] != "Tax" else Decimal(1)
        net = (Decimal(row[COST]) * rate).quantize(NUMERIC, ROUND_HALF_UP)
        net_rate = "" if not row[RATE] else f"{Decimal(row[RATE]) * rate:f}"
        out.append({**row, NET_COST: f"{net:f}", NET_RATE: net_rate})
    return out


# -- corruptions: each edits fresh copies of the sample's rows, on its own day --------------


def blank_line_item_id(rows: list[Row], day: str) -> list[Row]:
    first_usage(rows, day)["identity/LineItemId"] = ""
    return rows


def copy_a_row(rows: list[Row], day: str) -> list[Row]:
    return [*rows, dict(first_usage(rows, day))]


def reissue_a_row(rows: list[Row], day: str) -> list[Row]:
    copy = dict(first_usage(rows, day))
    copy["identity/LineItemId"] = "reissued" + str(copy["identity/LineItemId"])[8:]
    return [*rows, copy]


def negate_a_usage_cost(rows: list[Row], day: str) -> list[Row]:
    row = first_usage(rows, day)
    row[COST] = f"-{row[COST]}"
    return rows


def date_a_row_2019(rows: list[Row], day: str) -> list[Row]:
    row = first_usage(rows, day)
    for column in (START, "lineItem/UsageEndDate"):
        row[column] = str(row[column]).replace("2023-", "2019-", 1)
    return rows


def bill_half_the_day_in_euros(rows: list[Row], day: str) -> list[Row]:
    for row in rows_of(rows, day)[::2]:
        row["lineItem/CurrencyCode"] = "EUR"
    return rows


def inflate_a_cost(rows: list[Row], day: str) -> list[Row]:
    first_usage(rows, day)[COST] = "9.9E+28"
    return rows


def spell_out_a_cost(rows: list[Row], day: str) -> list[Row]:
    first_usage(rows, day)[COST] = "twelve dollars"
    return rows


def misspell_a_usage_date(rows: list[Row], day: str) -> list[Row]:
    first_usage(rows, day)[START] = f"{day}T25:00:00Z"
    return rows


def cut_a_list_price_tenfold(rows: list[Row], day: str) -> list[Row]:
    costliest = max(rows_of(rows, day), key=lambda r: Decimal(r[COST]))
    rate = Decimal(costliest["pricing/publicOnDemandRate"])
    costliest["pricing/publicOnDemandRate"] = f"{rate / 10:f}"
    return rows


def restate_usage_starts(rows: list[Row]) -> list[Row]:
    for old, new in OTHER_FORMS.items():
        next(r for r in rows if r[START] == old)[START] = new
    return rows


@dataclass(frozen=True)
class Corruption:
    day: str
    edit: Callable[[list[Row], str], list[Row]]
    failed_checks: dict[str, str]  # every check that fails: {name: severity}
    status: str = "FAILED"  # COMPLETE: published, with a warning per failed warn check


CORRUPTIONS = {
    "null line-item id": Corruption(
        "2023-11-02", blank_line_item_id, {"line_item_id_present": "error"}
    ),
    "exact duplicate row": Corruption(
        "2023-11-03",
        copy_a_row,
        {"line_item_ids_unique": "error", "no_duplicate_rows": "error"},
    ),
    "duplicate with a new line-item id": Corruption(
        "2023-11-05", reissue_a_row, {"no_duplicate_rows": "error"}
    ),
    "negative usage cost": Corruption(
        "2023-11-06", negate_a_usage_cost, {"usage_cost_not_negative": "error"}
    ),
    "usage dated 2019 instead of 2023": Corruption(
        "2023-11-07", date_a_row_2019, {"usage_within_billing_period": "error"}
    ),
    "EUR rows in a USD payer account": Corruption(
        "2023-11-08", bill_half_the_day_in_euros, {"one_currency_per_account": "error"}
    ),
    "a 9.9e28 USD cost": Corruption(
        "2023-11-09",
        inflate_a_cost,
        {"cost_magnitude_plausible": "error", "list_cost_covers_effective_cost": "warn"},
    ),
    "an unparsable cost": Corruption(
        "2023-11-10",
        spell_out_a_cost,
        {"billed_cost_present": "error", "effective_cost_present": "warn"},
    ),
    "an unparsable usage date": Corruption(
        "2023-11-14",
        misspell_a_usage_date,
        {"usage_start_parses": "error", "usage_within_billing_period": "error"},
    ),
    "a list price below the price paid": Corruption(
        "2023-11-13",
        cut_a_list_price_tenfold,
        {"list_cost_covers_effective_cost": "warn"},
        status="COMPLETE",
    ),
}


class Story:
    invoice: CostTenant
    tenant: CostTenant
    invoice_file: list[Row]
    invoice_runs: list[dict[str, Any]]
    clean: dict[str, dict[str, Any]]
    corrupted: dict[str, dict[str, Any]]
    corrupted_rows: dict[str, list[Row]]
    failed: dict[str, dict[str, str]]
    partial_rows: list[Row]
    no_product_name: dict[str, Any]
    other_forms: dict[str, Any]
    partial: dict[str, Any]
    partial_allowed: dict[str, Any]


@pytest.fixture(scope="module")
def story(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Story:
    s = Story()
    data_dir = tmp_path_factory.mktemp("aws")
    with cost_tenant(stack_factory, pipeline_env, sources_dir, data_dir) as tenant:
        s.tenant, s.invoice = tenant, CostTenant(tenant.stack, tenant.http, sources_dir)
        to_date = [r for r in SAMPLE if day_of(r) in INVOICE_DAYS]
        cur = s.invoice.source(
            "aws_edp_cur.csv", csv_text([*HEADER, NET_COST, NET_RATE], with_edp_discount(to_date))
        )
        s.invoice_file = read_csv(Path(cur))[1]
        s.invoice_runs = [s.invoice.run(AWS, day, source_uri=cur) for day in INVOICE_DAYS]

        s.clean, s.corrupted, s.corrupted_rows, s.failed = {}, {}, {}, {}
        for name, case in CORRUPTIONS.items():
            rows = s.corrupted_rows[name] = case.edit([dict(r) for r in SAMPLE], case.day)
            uri = tenant.source(f"aws_{case.edit.__name__}.csv", csv_text(HEADER, rows))
            s.clean[name] = tenant.run(AWS, case.day)
            s.corrupted[name] = tenant.run(AWS, case.day, source_uri=uri)
            s.failed[name] = tenant.failed_checks(s.corrupted[name]["pipeline_logging_id"])

        without_name = [c for c in HEADER if c != "product/ProductName"]
        uri = tenant.source("aws_no_product_name.csv", csv_text(without_name, SAMPLE))
        s.no_product_name = tenant.run(AWS, NO_PRODUCT_NAME_DAY, source_uri=uri)

        restated = restate_usage_starts([dict(r) for r in SAMPLE])
        uri = tenant.source("aws_other_forms.csv", csv_text(HEADER, restated))
        s.other_forms = tenant.run(AWS, OTHER_FORMS_DAY, source_uri=uri)

        # A partial export: the CUR re-run while only a third of the day had arrived.
        day_rows = rows_of(SAMPLE, PARTIAL_DAY)
        s.partial_rows = day_rows[: len(day_rows) // 3]
        rest = [r for r in SAMPLE if day_of(r) != PARTIAL_DAY]
        uri = tenant.source("aws_partial_export.csv", csv_text(HEADER, rest + s.partial_rows))
        s.clean["partial export"] = tenant.run(AWS, PARTIAL_DAY)
        s.partial = tenant.run(AWS, PARTIAL_DAY, source_uri=uri)
        s.partial_allowed = tenant.run(AWS, PARTIAL_DAY, source_uri=uri, allow_shrink="true")
        tenant.stack.stop()
    return s


def published(tenant: CostTenant, day: str) -> tuple[int, Decimal]:
    ((count, total),) = tenant.query(
        "SELECT COUNT(*), COALESCE(SUM(BilledCost), 0) FROM {t}.focus_aws_cost "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{day}'"
    )
    return int(count), Decimal(total)


def warnings(run: dict[str, Any]) -> int:
    return int(run["warnings"])


def test_the_billed_cost_adds_up_to_the_invoice(story: Story) -> None:
    assert [(r["status"], warnings(r)) for r in story.invoice_runs] == [("COMPLETE", 0)] * 3
    invoice_total = sum((Decimal(r[NET_COST]) for r in story.invoice_file), Decimal(0))
    ((rows, billed_total, effective_total, contracted_total),) = story.invoice.query(
        "SELECT COUNT(*), SUM(BilledCost), SUM(EffectiveCost), SUM(ContractedCost) "
        "FROM {t}.focus_aws_cost WHERE BillingPeriodStart = TIMESTAMP '2023-11-01 00:00:00+00'"
    )
    assert rows == len(story.invoice_file)
    assert Decimal(billed_total) == invoice_total
    # No commitments in this CUR: the discount lowers the effective and contracted costs too.
    assert Decimal(effective_total) == Decimal(contracted_total) == invoice_total
    gross = sum((billed(r) for r in story.invoice_file), Decimal(0))
    assert invoice_total < gross


def test_tax_rows_carry_no_quantities_skus_or_unit_prices(story: Story) -> None:
    counts = ", ".join(f"COUNT({c})" for c in TAX_NULL_COLUMNS)
    filled = {
        category: dict(zip(("rows", *TAX_NULL_COLUMNS), values, strict=True))
        for category, *values in story.invoice.query(
            f"SELECT ChargeCategory, COUNT(*), {counts} FROM {{t}}.focus_aws_cost GROUP BY 1"
        )
    }
    types = [r["lineItem/LineItemType"] for r in story.invoice_file]
    assert set(filled) == {"Tax", "Usage"}
    # The sample's tax lines have a usage amount of 1.0 and nothing else of these.
    assert filled["Tax"] == {"rows": types.count("Tax")} | dict.fromkeys(TAX_NULL_COLUMNS, 0)
    usage = types.count("Usage")
    priced = sum(1 for r in story.invoice_file if r["pricing/term"])
    assert filled["Usage"] == {"rows": usage} | dict.fromkeys(TAX_NULL_COLUMNS, usage) | {
        "PricingCategory": priced  # from pricing/term, which free-tier lines leave empty
    }


# The one product whose name in the CUR is its code, and the name AWS gives it elsewhere.
NAMED = {"AmazonCloudWatch": "Amazon CloudWatch"}


def test_service_name_is_the_display_name_and_the_code_is_kept(story: Story) -> None:
    expected = {
        (r["lineItem/ProductCode"], NAMED.get(r["product/ProductName"], r["product/ProductName"]))
        for r in story.invoice_file
    }
    names = story.invoice.query(
        "SELECT DISTINCT x_ServiceCode, ServiceName FROM {t}.focus_aws_cost"
    )
    assert set(names) == expected
    assert ("AmazonS3", "Amazon Simple Storage Service") in expected


def test_without_product_names_the_service_name_is_the_code(story: Story) -> None:
    assert story.no_product_name["status"] == "COMPLETE"
    names = story.tenant.query(
        "SELECT DISTINCT x_ServiceCode, ServiceName FROM {t}.focus_aws_cost "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{NO_PRODUCT_NAME_DAY}'"
    )
    codes = {r["lineItem/ProductCode"] for r in rows_of(SAMPLE, NO_PRODUCT_NAME_DAY)}
    assert set(names) == {(code, NAMED.get(code, code)) for code in codes}


def test_a_usage_start_in_another_form_counts_on_its_utc_day(story: Story) -> None:
    run = story.other_forms
    assert (run["status"], warnings(run)) == ("COMPLETE", 0), run
    day_rows = rows_of(SAMPLE, OTHER_FORMS_DAY)  # the sample's own forms
    assert published(story.tenant, OTHER_FORMS_DAY) == (
        len(day_rows),
        sum(map(billed, day_rows), Decimal(0)),
    )
    ids = story.tenant.query(
        "SELECT x_SourceRowId FROM {t}.focus_aws_cost "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{OTHER_FORMS_DAY}'"
    )
    assert {i for (i,) in ids} == {
        f"{r['identity/LineItemId']}@{r['identity/TimeInterval']}" for r in day_rows
    }


def test_every_day_was_first_published_clean(story: Story) -> None:
    assert {name: (r["status"], warnings(r)) for name, r in story.clean.items()} == {
        name: ("COMPLETE", 0) for name in story.clean
    }


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupted_export_fails_or_warns(story: Story, name: str) -> None:
    """A failed run leaves the day as the clean run published it; a warned one publishes."""
    case, run = CORRUPTIONS[name], story.corrupted[name]
    assert run["status"] == case.status, run
    assert story.failed[name] == case.failed_checks
    errors = [c for c, severity in case.failed_checks.items() if severity == "error"]
    assert all(check in str(run["error_message"]) for check in errors)
    if case.status == "COMPLETE":
        assert warnings(run) == len(case.failed_checks)
    day_rows = rows_of(SAMPLE if errors else story.corrupted_rows[name], case.day)
    assert published(story.tenant, case.day) == (
        len(day_rows),
        sum(map(billed, day_rows), Decimal(0)),
    )


def test_a_warned_row_is_published_as_exported(story: Story) -> None:
    day = CORRUPTIONS["a list price below the price paid"].day
    costliest = max(rows_of(SAMPLE, day), key=lambda r: Decimal(r[COST]))
    ((list_cost, effective_cost),) = story.tenant.query(
        "SELECT ListCost, EffectiveCost FROM {t}.focus_aws_cost "
        f"WHERE x_SourceRowId = '{costliest['identity/LineItemId']}@"
        f"{costliest['identity/TimeInterval']}'"
    )
    assert list_cost < effective_cost == billed(costliest)


def test_a_partial_export_replaces_a_day_only_when_allowed(story: Story) -> None:
    refused, allowed = story.partial, story.partial_allowed
    assert refused["status"] == "FAILED", refused
    message = str(refused["error_message"])
    assert "focus_aws_cost" in message and PARTIAL_DAY in message and "allow_shrink" in message
    assert allowed["status"] == "COMPLETE", allowed
    kept = story.partial_rows
    assert published(story.tenant, PARTIAL_DAY) == (len(kept), sum(map(billed, kept), Decimal(0)))


def test_runs_of_one_tenant_at_once_publish_each_day_once(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Runs of a tenant's days, one day twice, triggered together: each writes its day into
    place in turn, so every day is published once, whatever the order."""
    days = ["2023-11-04", "2023-11-05", "2023-11-04", "2023-11-06", "2023-11-07"]
    data_dir = tmp_path_factory.mktemp("aws_at_once")
    with cost_tenant(stack_factory, pipeline_env, sources_dir, data_dir) as tenant:
        ids = [
            str(
                trigger(tenant.http, tenant.key, tenant.tenant_id, AWS, date=day)[
                    "pipeline_logging_id"
                ]
            )
            for day in days
        ]
        ended = [wait_for_run(tenant.http, tenant.key, run_id, timeout=120) for run_id in ids]
        tenant.stack.stop()
    assert [r["status"] for r in ended] == ["COMPLETE"] * len(days), ended
    for day in set(days):
        day_rows = rows_of(SAMPLE, day)
        assert published(tenant, day) == (len(day_rows), sum(map(billed, day_rows), Decimal(0)))
