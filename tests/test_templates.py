"""Every shipped template runs to COMPLETE from a REST trigger, and its output matches
figures computed here, independently, from the source files.

The module runs its own stack, triggers each template (the cost ones twice for the same
day), stops the stack, then reads the tenant's tables.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime
from decimal import Decimal

import duckdb
import httpx
import pytest

from convergence_server.config import REPO_ROOT
from convergence_server.stack import Stack
from tests.conftest import UNMETERED, StackFactory, database_path, onboard, trigger, wait_for_run

SAMPLES = REPO_ROOT / "configs" / "sample_data"
CENT = Decimal("0.01")
AWS_DAY, AZURE_DAY, GCP_DAY, INVENTORY_DAY, AUDIT_DAY = (
    "2023-11-04",
    "2023-09-02",
    "2024-05-03",
    "2024-05-02",
    "2024-05-04",
)
RUNS = [
    ("aws/cost/cost_usage", AWS_DAY),
    ("azure/cost/cost_management", AZURE_DAY),
    ("gcp/cost/cost_billing", GCP_DAY),
    ("gcp/compute/vm_inventory", INVENTORY_DAY),
    ("gcp/security/audit_logs", AUDIT_DAY),
]
Sums = dict[tuple[str, str, str], Decimal]


class Outcome:
    tenant_id: str
    runs: dict[str, list[dict[str, object]]]
    stack: Stack


@pytest.fixture(scope="module")
def outcome(
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Outcome:
    stack = stack_factory(data_dir=tmp_path_factory.mktemp("templates"), **pipeline_env)
    result = Outcome()
    result.stack, result.runs = stack, defaultdict(list)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        result.tenant_id, key = onboard(http, plan=UNMETERED)
        for template, day in [*RUNS, *RUNS[:3]]:  # cost days run twice: no duplicates
            run_id = trigger(http, key, result.tenant_id, template, date=day)["pipeline_logging_id"]
            result.runs[template].append(wait_for_run(http, key, run_id))
    stack.stop()
    return result


def query(outcome: Outcome, sql: str) -> list[tuple[object, ...]]:
    with duckdb.connect(str(database_path(outcome.stack)), read_only=True) as db:
        db.execute("SET TimeZone = 'UTC'")
        return db.execute(sql.replace("{t}", f'"{outcome.tenant_id}"')).fetchall()


def cents(sums: Iterable[tuple[object, object, object, object]]) -> Sums:
    return {(str(a), str(s), str(d)): Decimal(str(v)).quantize(CENT) for a, s, d, v in sums}


def focus_sums(outcome: Outcome, table: str, day: str) -> Sums:
    return cents(
        query(
            outcome,
            f"SELECT SubAccountId, ServiceName, CAST(ChargePeriodStart AS DATE), "
            f"SUM(BilledCost) FROM {{t}}.{table} "
            f"WHERE CAST(ChargePeriodStart AS DATE) = DATE '{day}' GROUP BY ALL",
        )
    )


def test_every_template_completes(outcome: Outcome) -> None:
    for template, runs in outcome.runs.items():
        assert [r["status"] for r in runs] == ["COMPLETE"] * len(runs), (template, runs)


def test_aws_cur_to_focus_to_the_cent(outcome: Outcome) -> None:
    sums: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    rows = 0
    with (SAMPLES / "aws_cur_sample.csv").open(newline="") as source:
        for line in csv.DictReader(source):
            day = line["lineItem/UsageStartDate"][:10]
            if day == AWS_DAY:
                rows += 1
                name = line["product/ProductName"]
                name = "Amazon CloudWatch" if name == "AmazonCloudWatch" else name
                key = (line["lineItem/UsageAccountId"], name, day)
                sums[key] += Decimal(line["lineItem/UnblendedCost"])
    assert focus_sums(outcome, "focus_aws_cost", AWS_DAY) == {
        k: v.quantize(CENT) for k, v in sums.items()
    }
    (count,) = query(outcome, "SELECT COUNT(*) FROM {t}.focus_aws_cost")[0]
    assert count == rows  # the day ran twice: replaced, not duplicated


# The sample's ConsumedService namespaces (in any case) and their display names.
AZURE_SERVICE_NAMES = {
    "microsoft.compute": "Virtual Machines",
    "microsoft.datafactory": "Azure Data Factory",
    "microsoft.eventhub": "Event Hubs",
    "microsoft.network": "Virtual Network",
    "microsoft.storage": "Storage Accounts",
}


def test_azure_ea_to_focus_to_the_cent(outcome: Outcome) -> None:
    sums: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    with (SAMPLES / "azure_ea_sample.csv").open(newline="") as source:
        lines = list(csv.DictReader(source))
    for line in lines:
        day = datetime.strptime(line["Date"], "%m/%d/%Y").date().isoformat()
        if day == AZURE_DAY:
            service = AZURE_SERVICE_NAMES[line["ConsumedService"].lower()]
            key = (line["SubscriptionId"], service, day)
            sums[key] += Decimal(line["CostInBillingCurrency"])
    assert focus_sums(outcome, "focus_azure_cost", AZURE_DAY) == {
        k: v.quantize(CENT) for k, v in sums.items()
    }
    (count,) = query(outcome, "SELECT COUNT(*) FROM {t}.focus_azure_cost")[0]
    assert count == len(lines)


def test_gcp_billing_to_focus_to_the_cent(outcome: Outcome) -> None:
    sums: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    effective: Decimal = Decimal(0)
    rows = 0
    for text in (SAMPLES / "gcp_billing_export_sample.jsonl").read_text().splitlines():
        line = json.loads(text, parse_float=Decimal)
        start = datetime.fromisoformat(line["usage_start_time"].replace("Z", "+00:00"))
        day = start.astimezone(UTC).date().isoformat()
        if day == GCP_DAY:
            rows += 1 + len(line.get("credits") or [])  # each credit is a row of its own
            project = (line.get("project") or {}).get("id")
            credits = sum((Decimal(c["amount"]) for c in line.get("credits") or []), Decimal(0))
            sums[(str(project), line["service"]["description"], day)] += (
                Decimal(line["cost"]) + credits
            )
            effective += Decimal(line["cost"]) + credits
    assert focus_sums(outcome, "focus_gcp_cost", GCP_DAY) == {
        k: v.quantize(CENT) for k, v in sums.items()
    }
    ((count, total_effective),) = query(
        outcome, "SELECT COUNT(*), SUM(EffectiveCost) FROM {t}.focus_gcp_cost"
    )
    assert count == rows
    assert Decimal(str(total_effective)).quantize(CENT) == effective.quantize(CENT)


def test_focus_cost_view_unions_every_cloud(outcome: Outcome) -> None:
    by_provider = dict(
        query(outcome, "SELECT ProviderName, COUNT(*) FROM {t}.focus_cost GROUP BY 1")  # type: ignore[arg-type]
    )
    tables = {
        provider: query(outcome, f"SELECT COUNT(*) FROM {{t}}.{table}")[0][0]
        for provider, table in (
            ("AWS", "focus_aws_cost"),
            ("Microsoft", "focus_azure_cost"),
            ("Google Cloud", "focus_gcp_cost"),
        )
    }
    assert by_provider == tables


def test_vm_inventory_snapshot(outcome: Outcome) -> None:
    expected = Counter()
    for text in (SAMPLES / "gcp_vm_inventory_sample.jsonl").read_text().splitlines():
        line = json.loads(text)
        if line["snapshot_date"] == INVENTORY_DAY:
            expected[str(line["id"])] += 1
    rows = query(
        outcome,
        f"SELECT instance_id FROM {{t}}.vm_inventory WHERE snapshot_date = DATE '{INVENTORY_DAY}'",
    )
    assert Counter(str(r[0]) for r in rows) == expected


def test_audit_log_entries(outcome: Outcome) -> None:
    expected = set()
    for text in (SAMPLES / "gcp_audit_logs_sample.jsonl").read_text().splitlines():
        line = json.loads(text)
        if line["timestamp"][:10] == AUDIT_DAY:
            expected.add(line["insertId"])
    rows = query(
        outcome, "SELECT insert_id, CAST(log_timestamp AS DATE) FROM {t}.audit_log_entries"
    )
    assert {r[0] for r in rows} == expected
    assert {r[1] for r in rows} == {date.fromisoformat(AUDIT_DAY)}


def test_runs_leave_no_staging_tables(outcome: Outcome) -> None:
    leftovers = query(
        outcome,
        "SELECT table_name FROM information_schema.tables WHERE table_name LIKE '\\_stage%' "
        "ESCAPE '\\'",
    )
    assert leftovers == []
