"""GENERATED sample data, NOT real data: writes the three gcp_*_sample.jsonl files.

Every record is invented by this script (seeded, so re-running it rewrites byte-identical
files). The shapes follow Google's public documentation:

- gcp_billing_export_sample.jsonl: rows of the Cloud Billing standard usage cost export to
  BigQuery (`gcp_billing_export_v1_*`), one JSON object per row (RECORDs as objects,
  REPEATED fields as arrays, TIMESTAMPs as RFC 3339 strings in UTC), for 5 usage days in
  May 2024: 3 projects, 6 Google services plus a Marketplace product sold by a third party,
  credits (sustained use, free trial, promotion), tax rows, an adjustment and a rounding error.
- gcp_vm_inventory_sample.jsonl: Compute Engine `instances.aggregatedList` items (the
  `Instance` resource: int64 fields such as `id` and `diskSizeGb` are JSON strings, as the
  API sends them), one instance per line, plus the two flat fields a collector adds:
  `project_id` and `snapshot_date`. 3 daily snapshots of about 40 instances in 3 projects.
- gcp_audit_logs_sample.jsonl: Cloud Audit Logs `LogEntry` objects with an `AuditLog`
  `protoPayload`, about 200 entries over 5 days.

Usage: python configs/sample_data/generate_gcp_samples.py  (standard library only)
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent
SEED = 20240501

BILLING_ACCOUNT = "01A2B3-C4D5E6-F7A8B9"
INVOICE_MONTH = "202405"
BILLING_DAYS = [date(2024, 5, 1) + timedelta(days=i) for i in range(5)]
INVENTORY_DAYS = [date(2024, 5, 1) + timedelta(days=i) for i in range(3)]
AUDIT_DAYS = BILLING_DAYS

PROJECTS: list[dict[str, Any]] = [
    {
        "id": "acme-prod-web",
        "number": "412345678901",
        "name": "Acme Prod Web",
        "labels": [{"key": "env", "value": "prod"}, {"key": "cost-center", "value": "cc-100"}],
    },
    {
        "id": "acme-data-lake",
        "number": "412345678902",
        "name": "Acme Data Lake",
        "labels": [{"key": "env", "value": "prod"}, {"key": "cost-center", "value": "cc-200"}],
    },
    {
        "id": "acme-dev-sandbox",
        "number": "412345678903",
        "name": "Acme Dev Sandbox",
        "labels": [{"key": "env", "value": "dev"}],
    },
]

GIB = 1024**3
MONTH = 30 * 24 * 3600

# service id, service, sku id, sku description, usage unit, pricing unit, usage units per
# pricing unit, list and effective price per pricing unit, kind of usage (drives the
# generated amounts, credits and resources).
# fmt: off
SKUS = [
    ("6F81-5844-456A", "Compute Engine", "CP-COMPUTEENGINE-VMIMAGE-E2-STANDARD-CORE",
     "E2 Instance Core running in Americas", "seconds", "hour", 3600, 0.021811, 0.021811,
     "vm"),
    ("6F81-5844-456A", "Compute Engine", "CP-COMPUTEENGINE-VMIMAGE-E2-STANDARD-RAM",
     "E2 Instance Ram running in Americas", "byte-seconds", "gibibyte hour", 3600 * GIB,
     0.002923, 0.002923, "vm"),
    ("6F81-5844-456A", "Compute Engine", "D973-5D65-BAB2", "Storage PD Capacity",
     "byte-seconds", "gibibyte month", MONTH * GIB, 0.04, 0.04, "disk"),
    ("95FF-2EF5-5EA1", "Cloud Storage", "E5F0-6A5D-7BAD", "Standard Storage US Multi-region",
     "byte-seconds", "gibibyte month", MONTH * GIB, 0.026, 0.026, "storage"),
    ("95FF-2EF5-5EA1", "Cloud Storage", "1CF8-DCB3-2D2D",
     "Multi-Region Standard Class A Operations", "requests", "count", 1, 0.000005, 0.000005,
     "ops"),
    ("24E6-581D-38E5", "BigQuery", "3362-E469-6BEF", "Analysis", "bytes", "tebibyte",
     1024**4, 6.25, 6.25, "bq"),
    ("24E6-581D-38E5", "BigQuery", "5CB5-5F58-A5B3", "Active Logical Storage", "byte-seconds",
     "gibibyte month", MONTH * GIB, 0.02, 0.02, "storage"),
    ("9662-B51E-5089", "Cloud SQL", "D6A5-5F5C-D5F3",
     "Cloud SQL for PostgreSQL: Zonal - vCPU in Americas", "seconds", "hour", 3600, 0.0413,
     0.0413, "vm"),
    ("E505-1604-58F8", "Networking", "9DE9-9092-B3BC",
     "Network Internet Egress from Americas to Americas", "bytes", "gibibyte", GIB, 0.12,
     0.12, "egress"),
    ("5490-F7B7-8DF6", "Cloud Logging", "143F-A1B0-E0BE", "Log Volume", "bytes", "gibibyte",
     GIB, 0.5, 0.5, "logs"),
]
# fmt: on

# Which SKUs each project uses, with a scale factor for the amount used.
PROJECT_SKUS = {
    "acme-prod-web": [(0, 8), (1, 32), (2, 400), (4, 2), (7, 2), (8, 1), (9, 1)],
    "acme-data-lake": [(3, 5000), (4, 4), (5, 1), (6, 800), (0, 2), (1, 8), (9, 2)],
    "acme-dev-sandbox": [(0, 2), (1, 4), (2, 50), (3, 20), (5, 1)],
}

REGIONS = {
    "acme-prod-web": ("us-central1", "us-central1-a"),
    "acme-data-lake": ("us-east1", "us-east1-b"),
    "acme-dev-sandbox": ("us-west1", "us-west1-a"),
}


def _ts(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z (as Cloud Logging writes it; BigQuery reads it as a TIMESTAMP)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + (
        f".{moment.microsecond:06d}Z" if moment.microsecond else "Z"
    )


def _stable_id(*parts: str) -> int:
    """A fixed numeric id for a name (Python's hash() changes between runs)."""
    digest = hashlib.sha256("/".join(parts).encode()).hexdigest()
    return 10**18 + int(digest[:15], 16) % (8 * 10**18)


def _money(value: float) -> float:
    return round(value, 6)


def billing_rows(rng: random.Random) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for day in BILLING_DAYS:
        day_start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        for project in PROJECTS:
            region, zone = REGIONS[str(project["id"])]
            project_cost = 0.0
            for sku_index, scale in PROJECT_SKUS[str(project["id"])]:
                (
                    service_id,
                    service,
                    sku_id,
                    sku,
                    unit,
                    pricing_unit,
                    per_pricing_unit,
                    list_price,
                    price,
                    kind,
                ) = SKUS[sku_index]
                # Hourly rows for a few hours of the day, as the export has one row per
                # usage hour (fewer hours here to keep the file small).
                hours = sorted(rng.sample(range(24), rng.randint(2, 5)))
                for hour in hours:
                    start = day_start + timedelta(hours=hour)
                    pricing_amount = round(scale * rng.uniform(0.4, 1.2) / 24, 6)
                    if kind in ("bq", "egress", "logs"):
                        pricing_amount = round(pricing_amount * rng.uniform(0.01, 0.2), 6)
                    usage_amount = pricing_amount * per_pricing_unit
                    cost = _money(pricing_amount * price)
                    cost_at_list = _money(pricing_amount * list_price)
                    credits: list[dict[str, object]] = []
                    if kind == "vm" and project["id"] != "acme-dev-sandbox":
                        credits.append(
                            {
                                "name": "Sustained Usage Discount",
                                "amount": _money(-cost * 0.2),
                                "full_name": None,
                                "id": "",
                                "type": "SUSTAINED_USAGE_DISCOUNT",
                            }
                        )
                    if project["id"] == "acme-dev-sandbox" and kind in ("vm", "disk"):
                        credits.append(
                            {
                                "name": "Free Trial Credit",
                                "amount": _money(-cost),
                                "full_name": "Free Trial Credit",
                                "id": "free-trial-0001",
                                "type": "FREE_TIER",
                            }
                        )
                    if project["id"] == "acme-data-lake" and kind == "bq" and hour % 2 == 0:
                        credits.append(
                            {
                                "name": "Promotional credit: BigQuery onboarding",
                                "amount": _money(-cost * 0.5),
                                "full_name": "Promotional credit: BigQuery onboarding",
                                "id": "promo-bq-2024",
                                "type": "PROMOTION",
                            }
                        )
                    labels = [
                        {"key": "app", "value": "web" if "web" in str(project["id"]) else "etl"}
                    ]
                    if kind == "vm":
                        labels.append({"key": "team", "value": rng.choice(["core", "data"])})
                    resource: dict[str, str | None] = {"name": None, "global_name": None}
                    if kind == "vm" and service == "Compute Engine":
                        instance = f"{str(project['id']).split('-')[1]}-vm-{rng.randint(1, 3)}"
                        resource = {
                            "name": instance,
                            "global_name": "//compute.googleapis.com/projects/"
                            f"{project['id']}/zones/{zone}/instances/"
                            f"{_stable_id(str(project['id']), instance)}",
                        }
                    elif kind in ("storage", "ops") and service == "Cloud Storage":
                        bucket = f"{project['id']}-bucket"
                        resource = {
                            "name": bucket,
                            "global_name": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
                        }
                    multi_region = service in ("BigQuery", "Cloud Storage", "Cloud Logging")
                    location = (
                        {"location": "US", "country": "US", "region": None, "zone": None}
                        if multi_region
                        else {
                            "location": region,
                            "country": "US",
                            "region": region,
                            "zone": zone if kind == "vm" else None,
                        }
                    )
                    rows.append(
                        {
                            "billing_account_id": BILLING_ACCOUNT,
                            "service": {"id": service_id, "description": service},
                            "sku": {"id": sku_id, "description": sku},
                            "usage_start_time": _ts(start),
                            "usage_end_time": _ts(start + timedelta(hours=1)),
                            "project": project,
                            "labels": labels,
                            "system_labels": (
                                [
                                    {
                                        "key": "compute.googleapis.com/machine_spec",
                                        "value": "e2-standard-4",
                                    },
                                    {"key": "compute.googleapis.com/cores", "value": "4"},
                                ]
                                if kind == "vm" and service == "Compute Engine"
                                else []
                            ),
                            "location": location,
                            "resource": resource,
                            "tags": [],
                            "price": {
                                "effective_price": price,
                                "tier_start_amount": 0.0,
                                "unit": pricing_unit,
                                "pricing_unit_quantity": 1.0,
                            },
                            "subscription": {"instance_id": None},
                            "transaction_type": "GOOGLE",
                            "seller_name": None,
                            "export_time": _ts(
                                start
                                + timedelta(hours=rng.randint(4, 20), minutes=rng.randint(0, 59))
                            ),
                            "cost": cost,
                            "cost_at_list": cost_at_list,
                            "currency": "USD",
                            "currency_conversion_rate": 1.0,
                            "usage": {
                                "amount": round(usage_amount, 3),
                                "unit": unit,
                                "amount_in_pricing_units": pricing_amount,
                                "pricing_unit": pricing_unit,
                            },
                            "credits": credits,
                            "invoice": {"month": INVOICE_MONTH, "publisher_type": "GOOGLE"},
                            "cost_type": "regular",
                            "adjustment_info": {
                                "id": None,
                                "description": None,
                                "mode": None,
                                "type": None,
                            },
                        }
                    )
                    project_cost += cost
            # One tax row per project and day (the standard export allocates tax to projects).
            rows.append(
                _special_row(
                    project,
                    day_start,
                    "tax",
                    _money(project_cost * 0.0725),
                    ("Tax", "TAX-US-SALES", "US sales tax"),
                    rng,
                )
            )
    # One adjustment (a goodwill credit issued as a negative cost) and one rounding error.
    rows.append(
        _special_row(
            PROJECTS[0],
            datetime(2024, 5, 3, tzinfo=UTC),
            "adjustment",
            -1.25,
            ("Compute Engine", "6F81-5844-456A-ADJ", "Billing adjustment: goodwill"),
            rng,
        )
    )
    rows.append(
        _special_row(
            PROJECTS[1],
            datetime(2024, 5, 5, tzinfo=UTC),
            "rounding_error",
            0.000012,
            ("Invoice", "ROUNDING-ERROR", "Rounding error"),
            rng,
        )
    )
    # A Marketplace SKU sold by a third party (seller_name set, Google only resells it).
    marketplace = _special_row(
        PROJECTS[1],
        datetime(2024, 5, 2, tzinfo=UTC),
        "regular",
        12.5,
        (
            "Example Analytics Suite",
            "MP-EXAMPLE-SUITE-STD",
            "Example Analytics Suite Standard plan",
        ),
        rng,
    )
    marketplace["transaction_type"] = "THIRD_PARTY_RESELLER"
    marketplace["seller_name"] = "Example Software Inc."
    marketplace["usage"] = {
        "amount": 1.0,
        "unit": "month",
        "amount_in_pricing_units": 1.0,
        "pricing_unit": "month",
    }
    marketplace["price"] = {
        "effective_price": 12.5,
        "tier_start_amount": 0.0,
        "unit": "month",
        "pricing_unit_quantity": 1.0,
    }
    marketplace["cost_at_list"] = 12.5
    rows.append(marketplace)
    return rows


def _special_row(
    project: dict[str, object],
    day_start: datetime,
    cost_type: str,
    cost: float,
    service_sku: tuple[str, str, str],
    rng: random.Random,
) -> dict[str, object]:
    service, sku_id, sku = service_sku
    service_ids = {
        "Tax": "A8F4-3F5E-6A2B",
        "Compute Engine": "6F81-5844-456A",
        "Invoice": "B5D3-2C4E-1F0A",
        "Example Analytics Suite": "M4P1-0000-EX01",
    }
    return {
        "billing_account_id": BILLING_ACCOUNT,
        "service": {"id": service_ids[service], "description": service},
        "sku": {"id": sku_id, "description": sku},
        "usage_start_time": _ts(day_start),
        "usage_end_time": _ts(day_start + timedelta(days=1)),
        "project": project,
        "labels": [],
        "system_labels": [],
        "location": {"location": None, "country": None, "region": None, "zone": None},
        "resource": {"name": None, "global_name": None},
        "tags": [],
        "price": {
            "effective_price": None,
            "tier_start_amount": None,
            "unit": None,
            "pricing_unit_quantity": None,
        },
        "subscription": {"instance_id": None},
        "transaction_type": "GOOGLE",
        "seller_name": None,
        "export_time": _ts(day_start + timedelta(days=1, hours=rng.randint(1, 9))),
        "cost": cost,
        "cost_at_list": cost,
        "currency": "USD",
        "currency_conversion_rate": 1.0,
        "usage": {
            "amount": None,
            "unit": None,
            "amount_in_pricing_units": None,
            "pricing_unit": None,
        },
        "credits": [],
        "invoice": {"month": INVOICE_MONTH, "publisher_type": "GOOGLE"},
        "cost_type": cost_type,
        "adjustment_info": (
            {
                "id": "adj-0001",
                "description": "Goodwill credit",
                "mode": "MANUAL_ADJUSTMENT",
                "type": "GENERAL_ADJUSTMENT",
            }
            if cost_type == "adjustment"
            else {"id": None, "description": None, "mode": None, "type": None}
        ),
    }


MACHINE_TYPES = [
    "e2-micro",
    "e2-small",
    "e2-medium",
    "e2-standard-4",
    "n2-standard-8",
    "c3-standard-4",
]
IMAGES = ["debian-12", "ubuntu-2204-lts", "cos-stable", "rhel-9"]


def _instance_id(rng: random.Random) -> str:
    # Compute Engine ids are uint64 sent as decimal strings; most exceed the int64 range.
    return str(rng.randint(10**18, 18 * 10**18))


def vm_inventory(rng: random.Random) -> list[dict[str, object]]:
    """About 40 instances in 3 projects; each snapshot day sees creations, deletions and
    status changes."""
    fleet: list[dict[str, object]] = []
    counts = {"acme-prod-web": 18, "acme-data-lake": 14, "acme-dev-sandbox": 8}
    for project, count in counts.items():
        _, zone = REGIONS[project]
        for index in range(count):
            fleet.append(
                _new_instance(
                    rng,
                    project,
                    zone,
                    index,
                    datetime(2024, 4, 30, tzinfo=UTC)
                    - timedelta(days=rng.randint(1, 400), minutes=rng.randint(0, 1439)),
                )
            )
    rows: list[dict[str, object]] = []
    for day_number, day in enumerate(INVENTORY_DAYS):
        if day_number:
            # A day later: a couple of instances deleted, a couple created, some stopped.
            for _ in range(2):
                fleet.pop(rng.randrange(len(fleet)))
            for project in ("acme-prod-web", "acme-dev-sandbox"):
                fleet.append(
                    _new_instance(
                        rng,
                        project,
                        REGIONS[project][1],
                        100 + day_number * 10 + rng.randint(0, 9),
                        datetime(day.year, day.month, day.day, tzinfo=UTC)
                        - timedelta(hours=rng.randint(2, 20)),
                    )
                )
            for instance in rng.sample(fleet, 3):
                instance["status"] = rng.choice(["RUNNING", "TERMINATED", "STOPPING"])
        for instance in fleet:
            row = json.loads(json.dumps(instance))
            row["project_id"] = row.pop("_project")
            row["snapshot_date"] = day.isoformat()
            rows.append(row)
    return rows


def _new_instance(
    rng: random.Random, project: str, zone: str, index: int, created: datetime
) -> dict[str, object]:
    region = zone.rsplit("-", 1)[0]
    base = f"https://www.googleapis.com/compute/v1/projects/{project}"
    role = rng.choice(["web", "api", "worker", "db", "batch"])
    name = f"{role}-{index:03d}"
    machine = rng.choice(MACHINE_TYPES)
    preemptible = project == "acme-dev-sandbox" and rng.random() < 0.5
    status = rng.choices(["RUNNING", "TERMINATED", "STOPPED", "SUSPENDED"], [80, 12, 6, 2])[0]
    labels: dict[str, str] = {"env": "dev" if "dev" in project else "prod", "role": role}
    if rng.random() < 0.6:
        labels["team"] = rng.choice(["core", "data", "platform"])
    if rng.random() < 0.2:
        labels["backup"] = "daily"
    disks = [
        {
            "kind": "compute#attachedDisk",
            "type": "PERSISTENT",
            "mode": "READ_WRITE",
            "source": f"{base}/zones/{zone}/disks/{name}",
            "deviceName": name,
            "index": 0,
            "boot": True,
            "autoDelete": True,
            "licenses": [
                f"https://www.googleapis.com/compute/v1/projects/debian-cloud/global/"
                f"licenses/{rng.choice(IMAGES)}"
            ],
            "interface": "SCSI",
            "guestOsFeatures": [{"type": "UEFI_COMPATIBLE"}, {"type": "VIRTIO_SCSI_MULTIQUEUE"}],
            "diskSizeGb": str(rng.choice([10, 20, 50, 100])),
            "architecture": "X86_64",
        }
    ]
    for extra in range(rng.choice([0, 0, 1, 2])):
        disks.append(
            {
                "kind": "compute#attachedDisk",
                "type": "PERSISTENT",
                "mode": "READ_WRITE",
                "source": f"{base}/zones/{zone}/disks/{name}-data-{extra + 1}",
                "deviceName": f"{name}-data-{extra + 1}",
                "index": extra + 1,
                "boot": False,
                "autoDelete": False,
                "interface": "SCSI",
                "diskSizeGb": str(rng.choice([100, 200, 500, 1000])),
            }
        )
    access_configs = []
    if role in ("web", "api") or rng.random() < 0.15:
        access_configs.append(
            {
                "kind": "compute#accessConfig",
                "type": "ONE_TO_ONE_NAT",
                "name": "External NAT",
                # Documentation address ranges (RFC 5737), never real hosts.
                "natIP": rng.choice(["198.51.100.", "203.0.113."]) + str(rng.randint(1, 254)),
                "networkTier": "PREMIUM",
            }
        )
    interface: dict[str, object] = {
        "kind": "compute#networkInterface",
        "network": f"{base}/global/networks/default",
        "subnetwork": f"{base}/regions/{region}/subnetworks/default",
        "networkIP": f"10.{rng.randint(128, 191)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}",
        "name": "nic0",
        "fingerprint": f"{rng.getrandbits(64):016x}",
        "stackType": "IPV4_ONLY",
    }
    if access_configs:
        interface["accessConfigs"] = access_configs
    return {
        "_project": project,
        "kind": "compute#instance",
        "id": _instance_id(rng),
        "creationTimestamp": created.astimezone(timezone_pacific(created)).isoformat(
            timespec="milliseconds"
        ),
        "name": name,
        "tags": {"items": [role], "fingerprint": f"{rng.getrandbits(64):016x}"},
        "machineType": f"{base}/zones/{zone}/machineTypes/{machine}",
        "status": status,
        "zone": f"{base}/zones/{zone}",
        "canIpForward": False,
        "networkInterfaces": [interface],
        "disks": disks,
        "metadata": {"kind": "compute#metadata", "fingerprint": f"{rng.getrandbits(64):016x}"},
        "serviceAccounts": [
            {
                "email": f"{project.split('-')[1]}-sa@{project}.iam.gserviceaccount.com",
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            }
        ],
        "selfLink": f"{base}/zones/{zone}/instances/{name}",
        "scheduling": {
            "onHostMaintenance": "TERMINATE" if preemptible else "MIGRATE",
            "automaticRestart": not preemptible,
            "preemptible": preemptible,
            "provisioningModel": "SPOT" if preemptible else "STANDARD",
        },
        "cpuPlatform": "Intel Broadwell" if status == "RUNNING" else "Unknown CPU Platform",
        "labels": labels,
        "labelFingerprint": f"{rng.getrandbits(64):016x}",
        "startRestricted": False,
        "deletionProtection": role == "db",
        "shieldedInstanceConfig": {
            "enableSecureBoot": False,
            "enableVtpm": True,
            "enableIntegrityMonitoring": True,
        },
        "fingerprint": f"{rng.getrandbits(64):016x}",
        "lastStartTimestamp": created.astimezone(timezone_pacific(created)).isoformat(
            timespec="milliseconds"
        ),
    }


def timezone_pacific(moment: datetime) -> timezone:
    """Compute Engine writes timestamps in US Pacific time with an offset (-07:00 / -08:00);
    a fixed rule (DST from mid-March to early November) is enough for sample data."""
    daylight = 3 <= moment.month <= 10
    return timezone(timedelta(hours=-7 if daylight else -8))


AUDIT_METHODS = [
    # service, method, resource type, resource name template, log, severity
    (
        "compute.googleapis.com",
        "v1.compute.instances.insert",
        "gce_instance",
        "projects/{p}/zones/{z}/instances/{n}",
        "activity",
        "NOTICE",
    ),
    (
        "compute.googleapis.com",
        "v1.compute.instances.stop",
        "gce_instance",
        "projects/{p}/zones/{z}/instances/{n}",
        "activity",
        "NOTICE",
    ),
    (
        "compute.googleapis.com",
        "v1.compute.instances.delete",
        "gce_instance",
        "projects/{p}/zones/{z}/instances/{n}",
        "activity",
        "NOTICE",
    ),
    (
        "compute.googleapis.com",
        "v1.compute.firewalls.patch",
        "gce_firewall_rule",
        "projects/{p}/global/firewalls/allow-{n}",
        "activity",
        "NOTICE",
    ),
    (
        "storage.googleapis.com",
        "storage.buckets.create",
        "gcs_bucket",
        "projects/_/buckets/{p}-{n}",
        "activity",
        "NOTICE",
    ),
    (
        "storage.googleapis.com",
        "storage.objects.get",
        "gcs_bucket",
        "projects/_/buckets/{p}-bucket/objects/exports/{n}.csv",
        "data_access",
        "INFO",
    ),
    (
        "storage.googleapis.com",
        "storage.setIamPermissions",
        "gcs_bucket",
        "projects/_/buckets/{p}-bucket",
        "activity",
        "NOTICE",
    ),
    (
        "bigquery.googleapis.com",
        "google.cloud.bigquery.v2.JobService.InsertJob",
        "bigquery_project",
        "projects/{p}/jobs/job_{n}",
        "data_access",
        "INFO",
    ),
    (
        "bigquery.googleapis.com",
        "google.cloud.bigquery.v2.TableService.InsertTable",
        "bigquery_dataset",
        "projects/{p}/datasets/analytics/tables/t_{n}",
        "activity",
        "NOTICE",
    ),
    (
        "iam.googleapis.com",
        "google.iam.admin.v1.CreateServiceAccountKey",
        "service_account",
        "projects/-/serviceAccounts/1{n}",
        "activity",
        "NOTICE",
    ),
    (
        "cloudresourcemanager.googleapis.com",
        "SetIamPolicy",
        "project",
        "projects/{p}",
        "activity",
        "NOTICE",
    ),
    (
        "compute.googleapis.com",
        "v1.compute.instances.reset",
        "gce_instance",
        "projects/{p}/zones/{z}/instances/{n}",
        "system_event",
        "INFO",
    ),
]

PRINCIPALS = [
    "alice@acme.example",
    "bob@acme.example",
    "carol@acme.example",
    "deploy-bot@acme-prod-web.iam.gserviceaccount.com",
    "etl-runner@acme-data-lake.iam.gserviceaccount.com",
]
AGENTS = [
    "google-cloud-sdk gcloud/475.0.0 command/gcloud.compute.instances.create",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
    "Terraform/1.8.2 (+https://www.terraform.io) terraform-provider-google/5.27.0",
    "google-api-python-client/2.127.0 gl-python/3.11.9",
]


def audit_logs(rng: random.Random) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for day in AUDIT_DAYS:
        for _ in range(rng.randint(36, 44)):
            project = str(rng.choice(PROJECTS)["id"])
            zone = REGIONS[project][1]
            service, method, resource_type, template, log, severity = rng.choice(AUDIT_METHODS)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(
                seconds=rng.randint(0, 86399), microseconds=rng.randint(0, 999999)
            )
            suffix = f"{rng.randint(1, 999):03d}"
            resource_name = template.format(p=project, z=zone, n=suffix)
            denied = log != "system_event" and rng.random() < 0.08
            labels: dict[str, str] = {"project_id": project}
            if resource_type == "gce_instance":
                labels.update({"zone": zone, "instance_id": _instance_id(rng)})
            elif resource_type == "gcs_bucket":
                labels.update({"bucket_name": resource_name.split("/")[3], "location": "us"})
            elif resource_type == "bigquery_dataset":
                labels["dataset_id"] = "analytics"
            elif resource_type == "service_account":
                labels.update({"email_id": PRINCIPALS[3], "unique_id": resource_name[-4:]})
            if log == "system_event":
                principal = "system@google.com"
                caller = {}
            else:
                principal = rng.choice(PRINCIPALS)
                caller = {
                    "callerIp": rng.choice(["203.0.113.", "198.51.100.", "192.0.2."])
                    + str(rng.randint(1, 254))
                    if rng.random() < 0.8
                    else "private",
                    "callerSuppliedUserAgent": rng.choice(AGENTS),
                    "requestAttributes": {"time": _ts(moment), "auth": {}},
                    "destinationAttributes": {},
                }
            payload: dict[str, object] = {
                "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
                "status": ({"code": 7, "message": "PERMISSION_DENIED"} if denied else {}),
                "authenticationInfo": {"principalEmail": principal},
                "requestMetadata": caller,
                "serviceName": service,
                "methodName": method,
                "authorizationInfo": [
                    {
                        "resource": resource_name
                        if not resource_name.startswith("projects/_")
                        else resource_name.replace("projects/_/", ""),
                        "permission": ".".join(
                            (service.split(".")[0], resource_type, method.split(".")[-1])
                        ).lower(),
                        "granted": not denied,
                        "resourceAttributes": {},
                    }
                ],
                "resourceName": resource_name,
                "resourceLocation": {"currentLocations": [zone if "compute" in service else "us"]},
            }
            insert_id = f"{rng.getrandbits(40):x}{rng.choice('abcdefghij')}"
            rows.append(
                {
                    "protoPayload": payload,
                    "insertId": insert_id,
                    "resource": {"type": resource_type, "labels": labels},
                    "timestamp": _ts(moment),
                    "severity": "ERROR" if denied else severity,
                    "logName": f"projects/{project}/logs/cloudaudit.googleapis.com%2F{log}",
                    "operation": {
                        "id": f"operation-{rng.getrandbits(48):x}",
                        "producer": service,
                        "first": True,
                        "last": True,
                    },
                    "receiveTimestamp": _ts(moment + timedelta(milliseconds=rng.randint(50, 900))),
                }
            )
    rows.sort(key=lambda row: str(row["timestamp"]))
    return rows


def write_jsonl(name: str, rows: list[dict[str, object]]) -> None:
    path = OUT_DIR / name
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({len(rows)} lines)")


def main() -> None:
    write_jsonl("gcp_billing_export_sample.jsonl", billing_rows(random.Random(SEED)))
    write_jsonl("gcp_vm_inventory_sample.jsonl", vm_inventory(random.Random(SEED + 1)))
    write_jsonl("gcp_audit_logs_sample.jsonl", audit_logs(random.Random(SEED + 2)))


if __name__ == "__main__":
    main()
