"""The Azure EA template stops corrupted exports and keeps a published day as it was.

One stack: the sample day (2023-09-02) is published from the clean export, then each
corrupted copy of the export is run for the same day and must fail with the named check,
or, for a partial re-export, be refused by the shrink guard. Once the stack is stopped the
published day must still hold exactly the clean rows and total. Two more days come from
edited copies: 2023-09-03 to publish a partial re-export on purpose (allow_shrink=true),
2023-09-04 to normalize the charge types the sample lacks (purchases, refunds, unused
reservations, tax, rounding) and hold them to the FOCUS rules of test_focus_rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StackFactory
from tests.cost_support import (
    AZURE,
    SAMPLES,
    CostTenant,
    Row,
    cost_tenant,
    csv_text,
    read_csv,
)
from tests.test_focus_rules import ROW_RULES, Rule

DAY = "2023-09-02"
PARTIAL_DAY = "2023-09-03"
CHARGES_DAY = "2023-09-04"
HEADER, ROWS = read_csv(SAMPLES / "azure_ea_sample.csv")
KEPT_BY_A_PARTIAL_EXPORT = 13  # of 27 rows: more than the 20% the publish step lets go


def edited(change: Callable[[list[Row]], list[Row]]) -> str:
    """The sample export after `change` (which gets a copy of every row)."""
    return csv_text(HEADER, change([dict(row) for row in ROWS]))


def setting(index: int, **values: str) -> Callable[[list[Row]], list[Row]]:
    def change(rows: list[Row]) -> list[Row]:
        rows[index].update(values)
        return rows

    return change


def on_day(day: str, rows: list[Row]) -> list[Row]:
    """`rows` moved to `day`, written the EA way (M/D/YYYY)."""
    moved = date.fromisoformat(day)
    for row in rows:
        row["Date"] = f"{moved.month}/{moved.day}/{moved.year}"
    return rows


def charge_types(rows: list[Row]) -> list[Row]:
    """One row of each ChargeType an EA actual-cost export may carry besides Usage."""
    base = rows[0]
    order = "/providers/Microsoft.Capacity/reservationOrders/0000-order"
    no_resource = {"ResourceId": "", "ResourceName": "", "AvailabilityZone": ""}
    purchase = {
        **base,
        **no_resource,
        "ChargeType": "Purchase",
        "Frequency": "OneTime",
        "PricingModel": "Reservation",
        "ConsumedService": "Microsoft.Capacity",
        "MeterCategory": "",
        "ProductName": "Reserved VM Instance, Standard_D2s_v3, Central US, 1 Year",
        "Quantity": "1",
        "UnitPrice": "700",
        "PayGPrice": "700",
        "CostInBillingCurrency": "700",
        "UnitOfMeasure": "1 Hour",
        "benefitId": order,
        "benefitName": "vm-reservation",
    }
    refund = {
        **purchase,
        "ChargeType": "Refund",
        "Quantity": "-1",
        "CostInBillingCurrency": "-350",
    }
    unused = {
        **base,
        "ChargeType": "UnusedReservation",
        "PricingModel": "Reservation",
        "Quantity": "4",
        "CostInBillingCurrency": "0.4",
        "benefitId": f"{order}/reservations/0000-reservation",
        "benefitName": "vm-reservation",
    }
    tax = {
        **base,
        **no_resource,
        "ChargeType": "Tax",
        "Frequency": "Recurring",
        "ConsumedService": "",
        "MeterCategory": "",
        "MeterId": "",
        "ProductName": "Sales tax",
        "UnitOfMeasure": "",
        "Quantity": "",
        "UnitPrice": "",
        "PayGPrice": "",
        "CostInBillingCurrency": "12.5",
    }
    rounding = {**tax, "ChargeType": "RoundingAdjustment", "CostInBillingCurrency": "-0.01"}
    return on_day(CHARGES_DAY, [rows[1], purchase, refund, unused, tax, rounding])


@dataclass(frozen=True)
class Corruption:
    name: str
    export: str  # the corrupted export's text
    step: str  # the step that fails
    check: str  # the check that names the problem


CORRUPTIONS = [
    Corruption(
        "exact duplicate rows",
        edited(lambda rows: [*rows, rows[4], rows[9]]),
        "check_export_day",
        "no_duplicate_rows",
    ),
    Corruption(
        "a negative usage cost",
        edited(setting(2, CostInBillingCurrency="-0.035351812")),
        "check_export_day",
        "usage_cost_not_negative",
    ),
    Corruption(
        "day and month swapped",
        edited(setting(3, Date="2/9/2023")),
        "check_export",
        "usage_within_billing_period",
    ),
    Corruption(
        "another currency for the same billing account",
        edited(setting(5, BillingCurrencyCode="USD")),
        "quality",
        "one_billing_currency",
    ),
    Corruption(
        "a cost of 9.9e28",
        edited(setting(6, CostInBillingCurrency="9.9E+28")),
        "check_export_day",
        "amounts_plausible",
    ),
    Corruption(
        "a cost that is not a number",
        edited(setting(7, CostInBillingCurrency="0,0035")),
        "check_export_day",
        "amounts_are_numbers",
    ),
    Corruption(
        "a date that does not exist",
        edited(setting(8, Date="2/30/2023")),
        "check_export",
        "usage_date_parses",
    ),
]


class Story:
    tenant: CostTenant
    clean: dict[str, Any]
    corrupted: dict[str, dict[str, Any]]
    checks: dict[str, dict[str, str]]  # run id -> {failed check: severity}, over REST
    partial: dict[str, Any]
    partial_day_clean: dict[str, Any]
    partial_day_allowed: dict[str, Any]
    charges: dict[str, Any]


@pytest.fixture(scope="module")
def story(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Story]:
    s = Story()
    data_dir = tmp_path_factory.mktemp("focus_azure")
    with cost_tenant(stack_factory, pipeline_env, sources_dir, data_dir) as tenant:
        s.tenant = tenant

        def run(day: str, name: str, text: str, **parameters: str) -> dict[str, Any]:
            uri = tenant.source(name, text)
            return tenant.run(AZURE, day, source_uri=uri, **parameters)

        s.clean = tenant.run(AZURE, DAY)
        s.corrupted = {c.name: run(DAY, f"ea_{i}.csv", c.export) for i, c in enumerate(CORRUPTIONS)}
        partial = edited(lambda rows: rows[:KEPT_BY_A_PARTIAL_EXPORT])
        s.partial = run(DAY, "ea_partial.csv", partial)
        s.partial_day_clean = run(
            PARTIAL_DAY, "ea_next_day.csv", edited(lambda rows: on_day(PARTIAL_DAY, rows))
        )
        s.partial_day_allowed = run(
            PARTIAL_DAY,
            "ea_next_day_partial.csv",
            edited(lambda rows: on_day(PARTIAL_DAY, rows[:KEPT_BY_A_PARTIAL_EXPORT])),
            allow_shrink="true",
        )
        s.charges = run(CHARGES_DAY, "ea_charge_types.csv", edited(charge_types))
        runs = [*s.corrupted.values(), s.partial]
        s.checks = {
            str(r["pipeline_logging_id"]): tenant.failed_checks(r["pipeline_logging_id"])
            for r in runs
        }
        tenant.stack.stop()
    yield s


def published_total(rows: list[Row]) -> Decimal:
    """SUM(BilledCost) of `rows` once published: each cost held as NUMERIC (9 decimals)."""
    nano = Decimal("1e-9")
    return sum(
        (Decimal(r["CostInBillingCurrency"]).quantize(nano, ROUND_HALF_UP) for r in rows),
        Decimal(0),
    )


def day_totals(story: Story, day: str) -> tuple[int, Decimal]:
    ((rows, total),) = story.tenant.query(
        "SELECT COUNT(*), SUM(BilledCost) FROM {t}.focus_azure_cost "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{day}'"
    )
    return int(rows), Decimal(str(total or 0))


def stored_failures(story: Story, run: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(step, check, severity) of the run's failed checks, as the store recorded them."""
    found = story.tenant.query(
        "SELECT pipeline_logging_id, step_name, check_name, severity "
        "FROM tenants.tenant_dq_results WHERE status = 'FAILED'"
    )
    return {
        (step, check, sev) for rid, step, check, sev in found if rid == run["pipeline_logging_id"]
    }


def test_the_clean_export_publishes_the_day(story: Story) -> None:
    assert story.clean["status"] == "COMPLETE", story.clean
    assert day_totals(story, DAY) == (len(ROWS), published_total(ROWS))


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=lambda c: c.name)
def test_a_corrupted_export_fails_with_the_named_check(
    story: Story, corruption: Corruption
) -> None:
    run = story.corrupted[corruption.name]
    assert run["status"] == "FAILED", run
    message = str(run["error_message"])
    assert message.startswith(f"step {corruption.step} failed: data quality check(s) failed")
    assert corruption.check in message
    assert (corruption.step, corruption.check, "error") in stored_failures(story, run)
    assert story.checks[str(run["pipeline_logging_id"])].get(corruption.check) == "error"


def test_a_partial_reexport_is_refused_by_the_shrink_guard(story: Story) -> None:
    run = story.partial
    assert run["status"] == "FAILED", run
    message = str(run["error_message"])
    for named in ("focus_azure_cost", DAY, "allow_shrink"):
        assert named in message, message
    assert f"{len(ROWS)} rows" in message and f"{KEPT_BY_A_PARTIAL_EXPORT} rows" in message


def test_failed_runs_leave_the_published_day_as_it_was(story: Story) -> None:
    """Every run for DAY after the clean one failed: the day holds the clean rows only."""
    assert day_totals(story, DAY) == (len(ROWS), published_total(ROWS))
    assert story.tenant.query(
        "SELECT DISTINCT BillingCurrency FROM {t}.focus_azure_cost "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{DAY}'"
    ) == [("CAD",)]


def test_allow_shrink_publishes_a_partial_reexport(story: Story) -> None:
    assert story.partial_day_clean["status"] == "COMPLETE", story.partial_day_clean
    assert story.partial_day_allowed["status"] == "COMPLETE", story.partial_day_allowed
    kept = ROWS[:KEPT_BY_A_PARTIAL_EXPORT]
    assert day_totals(story, PARTIAL_DAY) == (len(kept), published_total(kept))


def test_case_variants_of_a_service_give_one_name(story: Story) -> None:
    spellings = {
        r["ConsumedService"] for r in ROWS if r["ConsumedService"].lower() == "microsoft.compute"
    }
    assert spellings == {"microsoft.compute", "Microsoft.Compute"}  # the sample mixes them
    names = story.tenant.query(
        "SELECT x_ServiceCode, ServiceName, COUNT(*) FROM {t}.focus_azure_cost "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{DAY}' GROUP BY ALL ORDER BY 1"
    )
    assert names == [
        ("microsoft.compute", "Virtual Machines", 16),
        ("microsoft.datafactory", "Azure Data Factory", 2),
        ("microsoft.eventhub", "Event Hubs", 1),
        ("microsoft.network", "Virtual Network", 3),
        ("microsoft.storage", "Storage Accounts", 5),
    ]


def test_charge_types_besides_usage(story: Story) -> None:
    assert story.charges["status"] == "COMPLETE", story.charges
    columns = (
        "ChargeCategory, ChargeClass, ServiceName, BilledCost, ListCost, PricingQuantity, "
        "PricingUnit, ConsumedQuantity, ConsumedUnit, SkuId, CommitmentDiscountStatus"
    )
    rows = story.tenant.query(
        f"SELECT {columns} FROM {{t}}.focus_azure_cost "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{CHARGES_DAY}' ORDER BY BilledCost"
    )
    d, peering, queues = Decimal, ROWS[0]["MeterId"], ROWS[1]["MeterId"]
    # fmt: off
    assert rows == [
        ("Purchase", "Correction", "Azure Reservations", d(-350), d(-700), d(-1), "1 Hour",
         None, None, peering, None),
        ("Adjustment", None, "Sales tax", d("-0.01"), d("-0.01"), None, None,
         None, None, None, None),
        ("Usage", None, "Storage Accounts", d("0.000056490"), d("0.00516"), d("0.0129"), "10K",
         d("0.0129"), "Units", queues, None),
        ("Usage", None, "Virtual Machines", d("0.4"), d("1.6"), d(4), "1 GB",
         d(4), "GB", peering, "Unused"),
        ("Tax", None, "Sales tax", d("12.5"), d("12.5"), None, None,
         None, None, None, None),
        ("Purchase", None, "Azure Reservations", d(700), d(700), d(1), "1 Hour",
         None, None, peering, None),
    ]
    # fmt: on


@pytest.mark.parametrize("rule", ROW_RULES, ids=lambda r: r.name)
def test_charge_types_meet_the_focus_rules(story: Story, rule: Rule) -> None:
    ((broken,),) = story.tenant.query(
        f"SELECT COUNT(*) FROM {{t}}.focus_azure_cost "
        f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{CHARGES_DAY}' "
        f"AND ({rule.requirement}) IS NOT TRUE"
    )
    assert broken == 0
