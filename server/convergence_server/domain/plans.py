"""The subscription plan catalog, read from `configs/plans.yml`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Plan:
    name: str
    daily_pipeline_runs: int
    concurrent_pipeline_runs: int
    team_size: int
    requests_per_minute: int
    open_streams: int
    requests_in_flight: int
    max_schedules: int


class PlanCatalogError(ValueError):
    """The plan file is malformed; the message names the file, the field and why."""


_LIMITS = tuple(f.name for f in fields(Plan) if f.name != "name")


def load_plans(path: Path) -> dict[str, Plan]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PlanCatalogError(f"{path}: cannot read: {exc}") from exc
    plans = document.get("plans") if isinstance(document, dict) else None
    if not isinstance(plans, dict) or not plans:
        raise PlanCatalogError(f"{path}: 'plans' must be a non-empty mapping of plan names")
    catalog: dict[str, Plan] = {}
    for name, limits in plans.items():
        where = f"{path}: plans.{name}"
        if not isinstance(name, str) or not name.isupper() or not name.isidentifier():
            raise PlanCatalogError(f"{where}: plan names are UPPER_CASE identifiers")
        if not isinstance(limits, dict):
            raise PlanCatalogError(f"{where}: must be a mapping of limits")
        unknown = set(limits) - set(_LIMITS)
        if unknown:
            raise PlanCatalogError(f"{where}: unknown field(s) {sorted(unknown)}")
        for limit in _LIMITS:
            value = limits.get(limit)
            if type(value) is not int or value < 1:
                raise PlanCatalogError(f"{where}.{limit}: must be a positive integer")
        if limits["concurrent_pipeline_runs"] > limits["daily_pipeline_runs"]:
            raise PlanCatalogError(
                f"{where}.concurrent_pipeline_runs: cannot exceed daily_pipeline_runs"
            )
        catalog[name] = Plan(name=name, **limits)
    return catalog
