"""The OpenAPI document: valid, one operation per REST binding, served by Envoy exactly as
shipped, and true to the live API (schemathesis through Envoy)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from convergence_server.config import REPO_ROOT
from convergence_server.envoy import DESCRIPTOR, OPENAPI_DOCUMENT, transcoded_services
from convergence_server.openapi import build_document, client_version, render
from convergence_server.stack import Stack
from tests.conftest import UNMETERED, StackFactory, onboard, trigger, wait_for_run

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Generated requests per operation: valid ones (half of them on the seeded resources), then
# invalid ones. About 750 requests in all, a minute on a busy machine.
POSITIVE_EXAMPLES = 20
NEGATIVE_EXAMPLES = 5
REQUEST_TIMEOUT = 10.0
# Failing cases reported per operation and kind (the rest are counted).
SHOWN_FAILURES = 3
_PATH_VARIABLE = re.compile(r"\{([^}=]+)(?:=[^}]*)?\}")
_README_ROW = re.compile(r"^\| `([A-Z]+) ([^`?]+)[^`]*` \| `(\w+)\.(\w+)`", re.MULTILINE)


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(OPENAPI_DOCUMENT.read_text(encoding="utf-8"))
    return loaded


def bindings() -> dict[tuple[str, str], str]:
    """(HTTP method, OpenAPI path) -> `Service_Method`, straight from the descriptor set."""
    services = set(transcoded_services())
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes()).file
    found: dict[tuple[str, str], str] = {}
    for file in files:
        for service in file.service:
            if f"{file.package}.{service.name}" not in services:
                continue
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                if rule.WhichOneof("pattern") is None:
                    continue
                for n, binding in enumerate([rule, *rule.additional_bindings]):
                    kind = binding.WhichOneof("pattern")
                    verb, template = (
                        (binding.custom.kind, binding.custom.path)
                        if kind == "custom"
                        else (str(kind), getattr(binding, str(kind)))
                    )
                    path = _PATH_VARIABLE.sub(r"{\1}", template)
                    found[(verb.upper(), path)] = f"{service.name}_{method.name}" + (
                        f"_{n}" if n else ""
                    )
    return found


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {
        (verb.upper(), path): operation["operationId"]
        for path, item in doc["paths"].items()
        for verb, operation in item.items()
    }


def test_the_document_is_valid_and_current() -> None:
    doc = document()
    validate(doc)
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["version"] == client_version()
    # `make proto` wrote it from the descriptor set Envoy serves: regenerating changes nothing.
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes()).file
    fresh = render(build_document(files, transcoded_services(), client_version()))
    assert OPENAPI_DOCUMENT.read_text(encoding="utf-8") == fresh, "stale: run `make proto`"


def test_every_rest_binding_and_documented_path_has_its_operation() -> None:
    expected = bindings()
    assert len(expected) >= 30
    assert operations(document()) == expected
    # The README's API table names the same paths and methods.
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    api = readme.split("\n## API\n", 1)[1].split("\n### ", 1)[0]
    rows = {
        (verb, path): f"{service}_{method}"
        for verb, path, service, method in _README_ROW.findall(api)
    }
    assert rows == expected


def test_every_operation_documents_the_error_body() -> None:
    doc = document()
    responses = doc["components"]["responses"]
    for path, item in doc["paths"].items():
        for verb, operation in item.items():
            errors = {s: ref for s, ref in operation["responses"].items() if s != "200"}
            assert {"400", "429", "500", "503"} <= set(errors), (verb, path)
            for status, ref in errors.items():
                response = responses[ref["$ref"].rsplit("/", 1)[1]]
                schema = response["content"]["application/json"]["schema"]["$ref"]
                assert schema.endswith(("/Error", "/OnboardingError")), (verb, path, status)
                assert ("Retry-After" in response["headers"]) == (status == "429")
    error = doc["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"error", "message", "request_id", "details", "retry_after"}
    report = doc["components"]["schemas"]["OnboardingError"]["properties"]
    assert {"validation_results", "ready_for_onboarding", "validation_summary"} <= set(report)


@dataclass
class Live:
    stack: Stack
    http: httpx.Client
    tenant_id: str
    key: str
    # Path parameters naming what exists (the seeded run, schedule, key, member; a template).
    known: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def live(stack_factory: StackFactory, pipeline_env: dict[str, str]) -> Iterator[Live]:
    """A stack with one tenant on a plan whose limits never bind (generated requests come
    fast and with many X-User-IDs), and a run, a schedule, a spare key and a member, so
    that generated requests also reach resources that exist."""
    stack = stack_factory(**pipeline_env)
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        auth = {"X-API-Key": key}
        started = trigger(http, key, tenant_id, "test/runs/checks", date="2024-01-02")
        run = wait_for_run(http, key, started["pipeline_logging_id"], timeout=300)
        assert run["status"] == "COMPLETE", run
        body = {"provider": "test", "domain": "runs", "template": "quick", "cron": "0 6 * * *"}
        schedule = http.post("/api/v1/schedules", headers=auth, json=body)
        assert schedule.status_code == 200, schedule.text
        spare = http.post(
            f"/api/v1/tenants/{tenant_id}/api-keys", headers=auth, json={"name": "spare"}
        )
        assert spare.status_code == 200, spare.text
        member = http.get("/api/v1/pipelines", headers={**auth, "X-User-ID": "member_1"})
        assert member.status_code == 200, member.text
        yield Live(
            stack,
            http,
            tenant_id,
            key,
            {
                "tenant_id": tenant_id,
                "pipeline_logging_id": str(run["pipeline_logging_id"]),
                "schedule_id": schedule.json()["schedule_id"],
                "key_id": spare.json()["key"]["key_id"],
                "user_id": "member_1",
                "provider": "test",
                "domain": "runs",
                "template": "quick",
            },
        )


@pytest.mark.timeout(600)  # starts the stack and runs a pipeline first (the `live` fixture)
def test_envoy_serves_the_shipped_document(live: Live) -> None:
    response = live.http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == OPENAPI_DOCUMENT.read_bytes()


@dataclass
class Findings:
    sent: int = 0
    failures: dict[str, list[str]] = field(default_factory=dict)
    # Operation -> HTTP status -> how many responses had it.
    statuses: dict[str, Counter[int]] = field(default_factory=dict)

    def add(self, where: str, report: str) -> None:
        self.failures.setdefault(where, []).append(report)

    def report(self) -> str:
        parts = []
        for where, reports in self.failures.items():
            parts.append(f"=== {where}: {len(reports)} failing case(s)")
            parts.extend(reports[:SHOWN_FAILURES])
        return "\n".join(parts)


def _explore(
    strategy: st.SearchStrategy[Case], examples: int, send: Callable[[Case], None]
) -> None:
    # Derandomized: the same cases on every run. Failures are collected rather than raised,
    # so every operation runs and nothing is shrunk.
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Case) -> None:
        send(case)

    run()


@pytest.mark.timeout(600)  # about a minute; far longer on a loaded machine
def test_the_live_api_keeps_to_the_document(live: Live) -> None:
    schema = schemathesis.openapi.from_url(f"{live.stack.http_url}/openapi.json")
    headers = {"X-API-Key": live.key}
    findings = Findings()
    started = time.monotonic()
    with requests.Session() as session:
        # Deletions last: until then, the other operations find the seeded resources.
        every = sorted(
            (result.ok() for result in schema.get_all_operations()),
            key=lambda operation: operation.method.upper() == "DELETE",
        )
        for operation in every:

            def send(case: Case, where: str = operation.label) -> None:
                findings.sent += 1
                try:
                    response = case.call(
                        base_url=live.stack.http_url,
                        session=session,
                        headers=headers,
                        timeout=REQUEST_TIMEOUT,
                    )
                except requests.RequestException as exc:
                    findings.add(where, f"{case.as_curl_command(headers)}\n  -> {exc!r}")
                    return
                findings.statuses.setdefault(where, Counter())[response.status_code] += 1
                try:
                    case.validate_response(response, checks=CHECKS, headers=headers)
                except FailureGroup as exc:
                    findings.add(where, str(exc))

            names = {parameter.name for parameter in operation.path_parameters}
            real = {name: value for name, value in live.known.items() if name in names} or None
            # Another tenant's id is only ever a 403: the other path parameters are generated
            # with the tenant's own.
            own = {"tenant_id": live.tenant_id} if "tenant_id" in names else None
            valid = st.one_of(
                operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real),
                operation.as_strategy(GenerationMode.POSITIVE, path_parameters=own),
            )
            _explore(valid, POSITIVE_EXAMPLES, send)
            invalid = operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=own)
            _explore(invalid, NEGATIVE_EXAMPLES, send)
    elapsed = time.monotonic() - started
    print(f"schemathesis: {findings.sent} requests in {elapsed:.0f} s")
    for where, statuses in findings.statuses.items():
        print(f"  {where}: {dict(sorted(statuses.items()))}")
    if findings.failures:
        pytest.fail(findings.report(), pytrace=False)
