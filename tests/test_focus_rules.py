"""Every row the cost templates publish meets the FOCUS 1.0 requirements that can be read
from a single table.

The module runs the three cost templates on their sample exports (several days each, a tax
day included), stops the stack, then counts, per table and per rule, the rows that break
the rule: every count must be 0. Each rule names the FOCUS 1.0 column section it comes from
(https://focus.finops.org/focus-specification/v1-0/, "Column: <name>"); a few are this
project's own and say so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StackFactory
from tests.cost_support import AWS, AZURE, GCP, CostTenant, cost_tenant

# 2023-11-01 carries the CUR's Tax lines; 2024-05-03 GCP's adjustment; every GCP day has tax.
RUNS = [
    (AWS, "2023-11-01"),
    (AWS, "2023-11-04"),
    (AWS, "2023-11-14"),
    (AZURE, "2023-09-02"),
    (GCP, "2024-05-01"),
    (GCP, "2024-05-02"),
    (GCP, "2024-05-03"),
]
TABLES = ["focus_aws_cost", "focus_azure_cost", "focus_gcp_cost"]

# Column: ServiceCategory, allowed values (FOCUS 1.0).
SERVICE_CATEGORIES = (
    "AI and Machine Learning",
    "Analytics",
    "Business Applications",
    "Compute",
    "Databases",
    "Developer Tools",
    "Multicloud",
    "Identity",
    "Integration",
    "Internet of Things",
    "Management and Governance",
    "Media",
    "Migration",
    "Mobile",
    "Networking",
    "Security",
    "Storage",
    "Web",
    "Other",
)


def _listed(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


@dataclass(frozen=True)
class Rule:
    """`requirement`: SQL every row must make TRUE (NULL counts as broken, as in a DQ check)."""

    name: str
    requirement: str


def _not_null(*columns: str) -> list[Rule]:
    return [Rule(f"{c}_not_null", f"{c} IS NOT NULL") for c in columns]


ROW_RULES: list[Rule] = [
    # Columns: BilledCost, EffectiveCost, ListCost, ContractedCost ("MUST NOT be null"),
    # BillingCurrency, BillingAccountId, ChargeCategory, ChargePeriodStart, ChargePeriodEnd,
    # BillingPeriodStart, BillingPeriodEnd, ProviderName, PublisherName, InvoiceIssuerName,
    # ServiceName, ServiceCategory ("MUST NOT be null" / "MUST NOT contain null values").
    *_not_null(
        "BilledCost",
        "EffectiveCost",
        "ListCost",
        "ContractedCost",
        "BillingCurrency",
        "ChargeCategory",
        "ChargePeriodStart",
        "ChargePeriodEnd",
        "BillingPeriodStart",
        "BillingPeriodEnd",
        "BillingAccountId",
        "ProviderName",
        "PublisherName",
        "InvoiceIssuerName",
        "ServiceName",
        "ServiceCategory",
    ),
    # Column: BillingCurrency: "MUST match the currency format" (Attribute: Currency Code
    # Format, an ISO 4217 alphabetic code).
    Rule("BillingCurrency_iso_4217", "REGEXP_MATCHES(BillingCurrency, '^[A-Z]{3}$')"),
    # Column: ChargeCategory: "MUST be one of the allowed values".
    Rule(
        "ChargeCategory_allowed",
        f"ChargeCategory IN ({_listed(('Usage', 'Purchase', 'Tax', 'Credit', 'Adjustment'))})",
    ),
    # Column: ChargeClass: "MUST be null when the row does not represent a correction", and
    # its one allowed value is "Correction".
    Rule("ChargeClass_null_or_correction", "ChargeClass IS NULL OR ChargeClass = 'Correction'"),
    # Columns: ChargePeriodStart (inclusive start) and ChargePeriodEnd (exclusive end) of
    # one charge period: an exclusive end after the inclusive start.
    Rule("ChargePeriod_ends_after_start", "ChargePeriodEnd > ChargePeriodStart"),
    # Columns: BillingPeriodStart / BillingPeriodEnd, the same for the billing period.
    Rule("BillingPeriod_ends_after_start", "BillingPeriodEnd > BillingPeriodStart"),
    # Column: ChargeFrequency: "MUST be one of the allowed values" (when present).
    Rule(
        "ChargeFrequency_allowed",
        "ChargeFrequency IS NULL OR ChargeFrequency IN ('One-Time', 'Recurring', 'Usage-Based')",
    ),
    # Columns: PricingQuantity, PricingUnit, SkuId, SkuPriceId, ListUnitPrice,
    # ContractedUnitPrice: each "MUST be null when ChargeCategory is 'Tax'".
    *[
        Rule(f"{c}_null_on_tax", f"ChargeCategory <> 'Tax' OR {c} IS NULL")
        for c in (
            "PricingQuantity",
            "PricingUnit",
            "SkuId",
            "SkuPriceId",
            "ListUnitPrice",
            "ContractedUnitPrice",
        )
    ],
    # Columns: ConsumedQuantity and ConsumedUnit: "MUST be null for other ChargeCategory
    # values" than "Usage".
    *[
        Rule(f"{c}_null_unless_usage", f"ChargeCategory = 'Usage' OR {c} IS NULL")
        for c in ("ConsumedQuantity", "ConsumedUnit")
    ],
    # Column: PricingUnit "complements the PricingQuantity metric" and shares its
    # nullability rule (not null for Usage and Purchase outside corrections, null for Tax):
    # a quantity without its unit, or a unit without a quantity, cannot be priced.
    Rule(
        "PricingUnit_null_iff_PricingQuantity_null",
        "(PricingUnit IS NULL) = (PricingQuantity IS NULL)",
    ),
    # Columns: CommitmentDiscountStatus, CommitmentDiscountCategory, CommitmentDiscountType:
    # "MUST be null when CommitmentDiscountId is null".
    *[
        Rule(f"{c}_null_without_id", f"CommitmentDiscountId IS NOT NULL OR {c} IS NULL")
        for c in (
            "CommitmentDiscountStatus",
            "CommitmentDiscountCategory",
            "CommitmentDiscountType",
        )
    ],
    # Column: CommitmentDiscountStatus / CommitmentDiscountCategory: allowed values.
    Rule(
        "CommitmentDiscountStatus_allowed",
        "CommitmentDiscountStatus IS NULL OR CommitmentDiscountStatus IN ('Used', 'Unused')",
    ),
    Rule(
        "CommitmentDiscountCategory_allowed",
        "CommitmentDiscountCategory IS NULL OR CommitmentDiscountCategory IN ('Spend', 'Usage')",
    ),
    # Column: ResourceName: "MUST be null when ResourceId is null".
    Rule("ResourceName_null_without_ResourceId", "ResourceId IS NOT NULL OR ResourceName IS NULL"),
    # Column: SubAccountName: "MUST be null when SubAccountId is null".
    Rule(
        "SubAccountName_null_without_SubAccountId",
        "SubAccountId IS NOT NULL OR SubAccountName IS NULL",
    ),
    # Column: ServiceCategory: "MUST be one of the allowed values".
    Rule("ServiceCategory_allowed", f"ServiceCategory IN ({_listed(SERVICE_CATEGORIES)})"),
    # This project's rule: ServiceName is the service's display name (Column: ServiceName,
    # "an offering that can be purchased from a provider"), not the provider's code for it,
    # which x_ServiceCode keeps.
    Rule(
        "ServiceName_is_not_the_code",
        "x_ServiceCode IS NULL OR LOWER(ServiceName) <> LOWER(x_ServiceCode)",
    ),
]

# Rules over a whole table: each SQL counts the offending groups (`{table}` is filled in).
TABLE_RULES: dict[str, str] = {
    # This project's rule: one spelling per service, so a GROUP BY ServiceName adds up a
    # service's cost in one line (microsoft.compute and Microsoft.Compute are one service).
    "ServiceName_one_spelling": (
        "SELECT COUNT(*) FROM (SELECT LOWER(ServiceName) FROM {table} "
        "GROUP BY LOWER(ServiceName) HAVING COUNT(DISTINCT ServiceName) > 1)"
    ),
}


class Published:
    tenant: CostTenant
    runs: list[tuple[str, str, dict[str, Any]]]


@pytest.fixture(scope="module")
def published(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    sources_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Published]:
    result = Published()
    data_dir = tmp_path_factory.mktemp("focus_rules")
    with cost_tenant(stack_factory, pipeline_env, sources_dir, data_dir) as tenant:
        result.tenant = tenant
        result.runs = [(t, day, tenant.run(t, day)) for t, day in RUNS]
        tenant.stack.stop()
    yield result


def test_every_run_completes(published: Published) -> None:
    for template, day, run in published.runs:
        assert run["status"] == "COMPLETE", (template, day, run)


@pytest.mark.parametrize("table", TABLES)
def test_the_rules_have_rows_to_judge(published: Published, table: str) -> None:
    ((count,),) = published.tenant.query(f"SELECT COUNT(*) FROM {{t}}.{table}")
    assert count > 0


@pytest.mark.parametrize("rule", ROW_RULES, ids=lambda r: r.name)
@pytest.mark.parametrize("table", TABLES)
def test_every_row_meets_the_rule(published: Published, table: str, rule: Rule) -> None:
    broken = published.tenant.query(
        f"SELECT COUNT(*) FROM {{t}}.{table} WHERE ({rule.requirement}) IS NOT TRUE"
    )[0][0]
    if broken:
        examples = published.tenant.query(
            f"SELECT * FROM {{t}}.{table} WHERE ({rule.requirement}) IS NOT TRUE LIMIT 2"
        )
        pytest.fail(f"{broken} row(s) of {table} break {rule.name}: {examples}")


@pytest.mark.parametrize("rule", sorted(TABLE_RULES))
@pytest.mark.parametrize("table", TABLES)
def test_every_table_meets_the_rule(published: Published, table: str, rule: str) -> None:
    sql = TABLE_RULES[rule].format(table=f"{{t}}.{table}")
    ((broken,),) = published.tenant.query(sql)
    assert broken == 0, f"{broken} group(s) of {table} break {rule}"
