"""Onboarding: the dry-run's fifteen checks, and the atomic creation of a tenant.

A check is one small coroutine returning a `CheckResult`; `Onboarding.dry_run` runs them
all (a failing store fails its checks, it does not abort the report) and `onboard` refuses
unless none failed. What decides the refusal's status is the first failed check's kind:
a bad request field (400), an existing tenant or dataset (409), a service not ready (503).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import email_validator

from convergence_server import logs
from convergence_server.domain.access import AccessLog, actor_of
from convergence_server.domain.keys import issue_key
from convergence_server.domain.plans import Plan
from convergence_server.engine.templates import TemplateError, load_catalog
from convergence_server.errors import AlreadyExists, ConvergenceError, FieldViolation, echo
from convergence_server.storage import Store
from convergence_server.storage.identifiers import IDENTIFIER_PATTERN
from convergence_server.storage.records import ApiKeyRecord, TenantRecord
from convergence_server.storage.schema import CENTRAL_TABLES, SCHEMA_VERSION

log = logging.getLogger(__name__)

MIN_PEPPER_BYTES = 32
MAX_COMPANY_NAME = 200
_TENANT_ID = re.compile(IDENTIFIER_PATTERN.strip("^$"), re.ASCII)

# Names a tenant dataset may not take: the service's own datasets and databases (and
# whatever begins with RESERVED_PREFIXES), the backends' system schemas and databases,
# and the reserved words (3+ letters) of BigQuery and of DuckDB.
RESERVED_PREFIXES = ("_", "pg_", "duckdb_", "convergence_")
RESERVED_TENANT_IDS = frozenset(
    """
    tenants information_schema main temp system memory pg_catalog sys public default admin root
    convergence api health null none all and any array asc assert_rows_modified between case
    cast collate contains create cross cube current define desc distinct else end enum
    escape except exclude exists extract false fetch following for from full group grouping
    groups hash having ignore inner intersect interval into join lateral left like limit
    lookup merge natural new not nulls order outer over partition preceding proto qualify
    range recursive respect right rollup rows select set some struct tablesample then treat
    true unbounded union unnest using when where window with within analyse analyze
    asymmetric both check column constraint deferrable describe foreign initially lambda
    leading offset only pivot pivot_longer pivot_wider placing primary references returning
    show summarize symmetric table trailing unique unpivot variadic
    """.split()  # noqa: SIM905 - a word list reads better as text
)
# A successful dataset-creation probe is trusted this long, so that anonymous dry-runs
# cannot keep the store busy creating and dropping scratch datasets.
PROBE_TTL_SECONDS = 60.0
# The checks of the service itself give every caller the same answer: a pass is kept this
# long, so that anonymous dry-runs cost the store only their own tenant's reads.
SERVICE_CHECKS = frozenset({"store_reachable", "central_tables_present", "schema_version_current"})
SERVICE_CHECK_TTL_SECONDS = 10.0
# The least time left before a caller's deadline for onboarding to commit: what remains
# must carry the response (and its one-time key) back.
COMMIT_MARGIN_SECONDS = 0.1


class CheckStatus(StrEnum):
    PASSED = "PASSED"
    FAILED = "FAILED"
    WARNING = "WARNING"


class FailureKind(StrEnum):
    INVALID = "invalid"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class CheckResult:
    check_name: str
    status: CheckStatus
    message: str
    field: str = ""
    kind: FailureKind = FailureKind.INVALID
    issue: str = ""


Check = Callable[["TenantApplication"], Awaitable[CheckResult]]


@dataclass(frozen=True)
class TenantApplication:
    tenant_id: str
    company_name: str
    admin_email: str
    subscription_plan: str


@dataclass(frozen=True)
class DryRunReport:
    results: tuple[CheckResult, ...]

    def count(self, status: CheckStatus) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if r.status is CheckStatus.FAILED)

    @property
    def ready(self) -> bool:
        return not self.failures

    @property
    def message(self) -> str:
        if not self.ready:
            return (
                f"{len(self.failures)} of {len(self.results)} validations failed. "
                "Fix the failed checks and retry the dry-run."
            )
        warnings = self.count(CheckStatus.WARNING)
        if warnings:
            return (
                f"All validations passed with {warnings} warning(s). "
                "Safe to proceed with onboarding."
            )
        return "All validations passed. Safe to proceed with onboarding."


class _TemplateFiles:
    """Whether the template files load, parsed again only when one of them changes.

    The dry-run is open to anyone: parsing every template (YAML and SQL) on each call cost
    about 0.3 s of CPU. A change is seen by name, size and modification time of the
    folder's YAML files, which one directory walk reads.
    """

    def __init__(self, config_dir: Path) -> None:
        self._config_dir = config_dir
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._result: tuple[int, str | None] = (0, None)

    def load(self) -> tuple[int, str | None]:
        """(templates loaded, the error when they do not load)."""
        stamp = tuple(
            (str(path), info.st_mtime_ns, info.st_size)
            for path in sorted(self._config_dir.rglob("*.yml"))
            for info in (path.stat(),)
        )
        if stamp != self._stamp:
            try:
                self._result = (len(load_catalog(self._config_dir).templates), None)
            except TemplateError as exc:
                self._result = (0, str(exc))
            self._stamp = stamp
        return self._result


_REFUSAL_REASONS = {
    FailureKind.INVALID: "ONBOARDING_VALIDATION_FAILED",
    FailureKind.CONFLICT: "ALREADY_EXISTS",
    FailureKind.UNAVAILABLE: "UNAVAILABLE",
}


class OnboardingRefused(ConvergenceError):
    """Checks failed; `kind` decides the reason (and so the status), `report` is the whole
    dry-run report."""

    def __init__(self, report: DryRunReport) -> None:
        order = (FailureKind.INVALID, FailureKind.CONFLICT, FailureKind.UNAVAILABLE)
        failures = sorted(report.failures, key=lambda r: order.index(r.kind))
        super().__init__(failures[0].message)
        self.kind = failures[0].kind
        self.reason = _REFUSAL_REASONS[self.kind]
        self.report = report
        self.violations = [
            FieldViolation(r.field, r.issue or r.message) for r in failures if r.field
        ]


@dataclass(frozen=True)
class OnboardedTenant:
    tenant_id: str
    company_name: str
    subscription_plan: str
    api_key: str
    tables_created: tuple[str, ...]


def _passed(message: str, field: str = "") -> CheckResult:
    return CheckResult("", CheckStatus.PASSED, message, field)


def _failed(message: str, kind: FailureKind, field: str = "", issue: str = "") -> CheckResult:
    return CheckResult("", CheckStatus.FAILED, message, field, kind, issue)


class Onboarding:
    def __init__(
        self,
        store: Store,
        plans: dict[str, Plan],
        config_dir: Path,
        pepper: bytes,
        access: AccessLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._access = access
        self._store = store
        self._plans = plans
        self._config_dir = config_dir
        self._pepper = pepper
        self._clock = clock
        self._probe_valid_until = 0.0
        self._passed_until: dict[str, tuple[float, CheckResult]] = {}
        self._templates = _TemplateFiles(config_dir)
        self._checks: tuple[tuple[str, Check], ...] = (
            ("tenant_id_format", self._tenant_id_format),
            ("tenant_id_not_reserved", self._tenant_id_not_reserved),
            ("tenant_not_onboarded", self._tenant_not_onboarded),
            ("tenant_id_case_unique", self._tenant_id_case_unique),
            ("dataset_absent", self._dataset_absent),
            ("company_name_valid", self._company_name_valid),
            ("admin_email_valid", self._admin_email_valid),
            ("subscription_plan_known", self._subscription_plan_known),
            ("plan_limits_configured", self._plan_limits_configured),
            ("store_reachable", self._store_reachable),
            ("central_tables_present", self._central_tables_present),
            ("schema_version_current", self._schema_version_current),
            ("dataset_create_permission", self._dataset_create_permission),
            ("templates_loadable", self._templates_loadable),
            ("key_hashing_configured", self._key_hashing_configured),
        )

    async def dry_run(self, app: TenantApplication) -> DryRunReport:
        """Runs every check; raises `OnboardingRefused` when any fails."""
        report = DryRunReport(tuple([await self._run(n, c, app) for n, c in self._checks]))
        if not report.ready:
            raise OnboardingRefused(report)
        return report

    async def _run(self, name: str, check: Check, app: TenantApplication) -> CheckResult:
        """One check; a backend that fails while checking fails the check, not the report."""
        kept = self._passed_until.get(name)
        if kept is not None and self._clock() < kept[0]:
            return kept[1]
        try:
            result = await check(app)
            if name in SERVICE_CHECKS and result.status is CheckStatus.PASSED:
                kept_result = dataclasses.replace(result, check_name=name)
                self._passed_until[name] = (self._clock() + SERVICE_CHECK_TTL_SECONDS, kept_result)
        except Exception:
            request_id = logs.request_id_var.get()
            log.exception("check %s could not run (request_id=%s)", name, request_id)
            result = _failed(
                f"could not run this check: the {self._store.kind} store failed "
                f"(request_id {request_id})",
                FailureKind.UNAVAILABLE,
            )
        return dataclasses.replace(result, check_name=name)

    async def onboard(
        self, app: TenantApplication, time_remaining: float | None = None
    ) -> OnboardedTenant:
        """Onboards the tenant; `time_remaining` is the caller's deadline, if it has one.

        The key is shown once, so a tenant must not exist unless its key can still reach
        the caller: the store commits only while at least `COMMIT_MARGIN_SECONDS` of the
        deadline remain, and undoes the creation when the caller goes away meanwhile.
        """
        commit_by = None
        if time_remaining is not None:
            commit_by = self._clock() + time_remaining - COMMIT_MARGIN_SECONDS
        await self.dry_run(app)
        issued = issue_key(app.tenant_id, self._pepper)
        now = datetime.now(UTC)
        tenant = TenantRecord(
            tenant_id=app.tenant_id,
            company_name=app.company_name.strip(),
            admin_email=app.admin_email.strip(),
            subscription_plan=app.subscription_plan,
            created_at=now,
        )
        key = ApiKeyRecord(
            issued.key_id,
            app.tenant_id,
            issued.salt,
            issued.key_hash,
            now,
            name="onboarding",
            created_by="onboarding",
        )
        try:
            tables = await self._store.create_tenant(tenant, key, commit_by)
        except AlreadyExists:
            raise AlreadyExists(f"Tenant '{echo(app.tenant_id)}' already exists") from None
        if self._access is not None:
            actor, access = actor_of(None), self._access
            await access.write(
                [
                    access.row(
                        app.tenant_id,
                        "tenant.onboarded",
                        actor,
                        app.tenant_id,
                        app.subscription_plan,
                    ),
                    access.row(
                        app.tenant_id, "api_key.created", actor, issued.key_id, "onboarding"
                    ),
                ]
            )
        return OnboardedTenant(
            app.tenant_id, tenant.company_name, app.subscription_plan, issued.key, tables
        )

    # -- request fields ---------------------------------------------------------------------

    async def _tenant_id_format(self, app: TenantApplication) -> CheckResult:
        if _TENANT_ID.fullmatch(app.tenant_id):
            return _passed("tenant_id is well-formed", "tenant_id")
        return _failed(
            "Invalid tenant_id format",
            FailureKind.INVALID,
            "tenant_id",
            f"must match pattern {IDENTIFIER_PATTERN}",
        )

    async def _tenant_id_not_reserved(self, app: TenantApplication) -> CheckResult:
        lowered = app.tenant_id.lower()
        if lowered in RESERVED_TENANT_IDS or lowered.startswith(RESERVED_PREFIXES):
            return _failed(
                f"tenant_id '{echo(app.tenant_id)}' is reserved",
                FailureKind.INVALID,
                "tenant_id",
                "is a reserved name (system dataset, SQL keyword or leading underscore)",
            )
        return _passed("tenant_id is not a reserved name", "tenant_id")

    async def _company_name_valid(self, app: TenantApplication) -> CheckResult:
        company = app.company_name.strip()
        if not company or len(company) > MAX_COMPANY_NAME:
            issue = f"must be 1 to {MAX_COMPANY_NAME} characters"
        elif any(unicodedata.category(ch).startswith("C") for ch in company):
            issue = "must not contain control or invisible format characters"
        else:
            return _passed("company_name is valid", "company_name")
        return _failed("Invalid company_name", FailureKind.INVALID, "company_name", issue)

    async def _admin_email_valid(self, app: TenantApplication) -> CheckResult:
        try:
            email_validator.validate_email(app.admin_email.strip(), check_deliverability=False)
        except email_validator.EmailNotValidError as exc:
            return _failed(
                "Invalid admin_email", FailureKind.INVALID, "admin_email", echo(str(exc))
            )
        return _passed("admin_email is a valid address", "admin_email")

    async def _subscription_plan_known(self, app: TenantApplication) -> CheckResult:
        if app.subscription_plan in self._plans:
            return _passed(f"plan {echo(app.subscription_plan)} exists", "subscription_plan")
        return _failed(
            "Unknown subscription_plan",
            FailureKind.INVALID,
            "subscription_plan",
            f"must be one of {', '.join(sorted(self._plans))}",
        )

    async def _plan_limits_configured(self, app: TenantApplication) -> CheckResult:
        plan = self._plans.get(app.subscription_plan)
        if plan is None:
            return CheckResult(
                "", CheckStatus.WARNING, "not checked: the plan is unknown", "subscription_plan"
            )
        return _passed(
            f"{plan.name}: {plan.daily_pipeline_runs} runs/day, "
            f"{plan.concurrent_pipeline_runs} concurrent, team of {plan.team_size}, "
            f"{plan.requests_per_minute} requests/min",
            "subscription_plan",
        )

    # -- the tenant's state -----------------------------------------------------------------

    async def _tenant_not_onboarded(self, app: TenantApplication) -> CheckResult:
        if await self._store.get_tenant(app.tenant_id) is not None:
            return _failed(
                f"Tenant '{echo(app.tenant_id)}' already exists",
                FailureKind.CONFLICT,
                "tenant_id",
                "is already onboarded",
            )
        return _passed("tenant is not onboarded yet", "tenant_id")

    async def _tenant_id_case_unique(self, app: TenantApplication) -> CheckResult:
        same = await self._store.tenant_ids_equal_ignoring_case(app.tenant_id)
        if any(t != app.tenant_id for t in same):
            # Never the other tenant's spelling: that would tell anyone its exact id.
            return _failed(
                "tenant_id differs only in letter case from an existing tenant; "
                "choose another tenant_id",
                FailureKind.CONFLICT,
                "tenant_id",
                "differs only in letter case from an existing tenant",
            )
        return _passed("no tenant differs from this one only in case", "tenant_id")

    async def _dataset_absent(self, app: TenantApplication) -> CheckResult:
        if await self._store.dataset_exists(app.tenant_id):
            return _failed(
                f"Dataset '{echo(app.tenant_id)}' already exists",
                FailureKind.CONFLICT,
                "tenant_id",
                "names a dataset that already exists",
            )
        return _passed(f"dataset '{echo(app.tenant_id)}' does not exist yet", "tenant_id")

    # -- the service itself -----------------------------------------------------------------

    async def _store_reachable(self, _: TenantApplication) -> CheckResult:
        await self._store.ping()
        return _passed(f"{self._store.kind} store answers")

    async def _central_tables_present(self, _: TenantApplication) -> CheckResult:
        present = await self._store.central_table_columns()
        problems = []
        for table in CENTRAL_TABLES:
            missing = table.column_names - present.get(table.name, frozenset())
            if table.name not in present:
                problems.append(f"{table.name} is missing")
            elif missing:
                problems.append(f"{table.name} lacks {', '.join(sorted(missing))}")
        if problems:
            return _failed("; ".join(problems), FailureKind.UNAVAILABLE)
        return _passed(f"{len(CENTRAL_TABLES)} central tables have their columns")

    async def _schema_version_current(self, _: TenantApplication) -> CheckResult:
        version = await self._store.schema_version()
        if version != SCHEMA_VERSION:
            return _failed(
                f"store schema is at version {version}, the server expects {SCHEMA_VERSION}",
                FailureKind.UNAVAILABLE,
            )
        return _passed(f"store schema is at version {version}")

    async def _dataset_create_permission(self, _: TenantApplication) -> CheckResult:
        if self._clock() >= self._probe_valid_until:
            await self._store.probe_dataset_creation()
            self._probe_valid_until = self._clock() + PROBE_TTL_SECONDS
        return _passed("a scratch dataset can be created and dropped")

    async def _templates_loadable(self, _: TenantApplication) -> CheckResult:
        # On a thread: parsing every template (after a start or a change of the files)
        # takes about a second, which the event loop's other callers must not wait for.
        count, problem = await asyncio.to_thread(self._templates.load)
        if problem is not None:
            return _failed(problem, FailureKind.UNAVAILABLE)
        return _passed(f"{count} pipeline template(s) load")

    async def _key_hashing_configured(self, _: TenantApplication) -> CheckResult:
        if len(self._pepper) < MIN_PEPPER_BYTES:
            return _failed(
                f"the key pepper must be at least {MIN_PEPPER_BYTES} bytes",
                FailureKind.UNAVAILABLE,
            )
        return _passed("API keys are hashed with HMAC-SHA256, salted and peppered")
