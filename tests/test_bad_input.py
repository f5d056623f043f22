"""Bad input gets a clear 4xx with the documented body and leaves the store unchanged.

The module runs its own stack whose stored rows are recorded first. Each test checks the
answers to one kind of bad input; the last one sends every kind again, stops the stack
and compares the store with the record, so it holds on its own as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from convergence_server.stack import Stack
from tests.conftest import GUIDE_TENANT, StackFactory, dump_store, onboard, raw_get, schemas

PATTERN_BODY = {
    "error": "Validation error",
    "message": "Invalid tenant_id format",
    "details": {"field": "tenant_id", "issue": "must match pattern ^[a-zA-Z0-9_]{3,50}$"},
}
BAD_TENANT_IDS = [
    "../../etc/passwd",
    "..",
    "acme'corp",
    'acme"corp',
    "acme;DROP SCHEMA tenants CASCADE;--",
    "acmé_corp",
    "租户_tenant",
    "ab",
    "a" * 51,
    "",
    "acme corp",
    "acme\ncorp",
    "acme_corp\n",
]
ONBOARDING_PATHS = ["/api/v1/tenants/dryrun", "/api/v1/tenants/onboard"]
RESERVED = [
    "tenants",
    "information_schema",
    "SELECT",
    "table",
    "_hidden",
    # The embedded store's own databases (DuckDB catalogs): a dataset named like one
    # cannot be told apart from it.
    "memory",
    "convergence_store",
    "convergence_stages",
    "Convergence_Next",
]
# Bodies the transcoder refuses, and the field each 400 names.
MALFORMED_JSON = [
    (b'{"tenant_id": "acme_corp",', "body"),
    (b"not json", "body"),
    (b'{"tenant_id": {"a": 1}}', "tenant_id"),
    (b'{"tenant_id": 7}', "tenant_id"),
    (b"[1]", "body"),
]
BAD_FIELDS = [
    ("company_name", ""),
    ("company_name", "Acme\u0000Corp"),
    ("company_name", "x" * 201),
    ("admin_email", "admin"),
    ("admin_email", "admin@@acme.com"),
    ("subscription_plan", "GOLD"),
    ("subscription_plan", "professional"),
]


class State:
    stack: Stack
    http: httpx.Client
    key: str
    tenant_id: str
    before: dict[str, list[tuple[object, ...]]]
    schemas: set[str]


@pytest.fixture(scope="module")
def state(stack_factory: StackFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[State]:
    data_dir: Path = tmp_path_factory.mktemp("bad_input")
    first = stack_factory(data_dir=data_dir)
    with httpx.Client(base_url=first.http_url, timeout=10) as http:
        tenant_id, key = onboard(http)
    first.stop()
    s = State()
    s.before, s.schemas = dump_store(first), schemas(first)
    s.tenant_id, s.key = tenant_id, key
    s.stack = stack_factory(data_dir=data_dir)
    with httpx.Client(base_url=s.stack.http_url, timeout=10) as http:
        s.http = http
        yield s


def assert_envoy_error(
    response: httpx.Response, status: int, error: str, field: str | None = None
) -> None:
    """Envoy's own refusal, in the documented shape: a 400 names the `field` at fault."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body.keys() == {"error", "message", "request_id"} | ({"details"} if field else set())
    assert body["error"] == error
    assert body["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    if field:
        assert body["details"]["field"] == field, body
        assert body["details"]["issue"], body


@pytest.mark.parametrize("path", ONBOARDING_PATHS)
@pytest.mark.parametrize("tenant_id", BAD_TENANT_IDS, ids=repr)
def test_bad_tenant_id(state: State, path: str, tenant_id: str) -> None:
    response = state.http.post(path, json={"tenant_id": tenant_id, **GUIDE_TENANT})
    assert response.status_code == 400
    body = response.json()
    assert {k: body[k] for k in ("error", "message", "details")} == PATTERN_BODY


@pytest.mark.parametrize("tenant_id", RESERVED)
def test_reserved_tenant_id(state: State, tenant_id: str) -> None:
    response = state.http.post(
        "/api/v1/tenants/onboard", json={"tenant_id": tenant_id, **GUIDE_TENANT}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["message"] == f"tenant_id '{tenant_id}' is reserved"
    assert body["details"]["field"] == "tenant_id"


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_bad_fields(state: State, field: str, value: str) -> None:
    payload = {"tenant_id": "valid_but_refused", **GUIDE_TENANT, field: value}
    response = state.http.post("/api/v1/tenants/onboard", json=payload)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "Validation error"
    assert body["details"]["field"] == field
    assert body["details"]["issue"]


@pytest.mark.parametrize(("raw", "field"), MALFORMED_JSON)
def test_malformed_json(state: State, raw: bytes, field: str) -> None:
    response = state.http.post(
        "/api/v1/tenants/onboard", content=raw, headers={"content-type": "application/json"}
    )
    assert_envoy_error(response, 400, "Validation error", field)


def test_unknown_query_parameter(state: State) -> None:
    assert_envoy_error(state.http.get("/health?verbose=1"), 400, "Validation error", "verbose")
    response = state.http.get("/api/v1/pipelines/runs?limit=10&colour=red")
    assert_envoy_error(response, 400, "Validation error", "colour")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (b"a\\=1", "a\\"),
        (b'a"b=1', 'a"b'),
        (b'""=1', '""'),
        (b"a%5C=1", "a%5C"),
        (b"D" * 100 + b"\\=1", "D" * 64 + "..."),
    ],
)
def test_an_unknown_query_parameter_is_named_whatever_its_characters(
    state: State, query: bytes, field: str
) -> None:
    """Sent as they are (quotes and backslashes are not percent-encoded here): the rest of
    the message stays whole."""
    response = raw_get(state.stack.http_port, b"/health?" + query)
    assert_envoy_error(response, 400, "Validation error", field)
    message = response.json()["message"]
    assert message.endswith('" in the type "convergence.v1.GetHealthRequest".'), message
    assert "D" * 65 not in message


@pytest.mark.parametrize(
    ("query", "field"),
    [("status=complete", "status"), ("status=DONE", "status"), ("limit=ten", "limit")],
)
def test_a_query_parameter_of_the_wrong_type_is_named(state: State, query: str, field: str) -> None:
    response = state.http.get(f"/api/v1/pipelines/runs?{query}", headers={"X-API-Key": state.key})
    assert_envoy_error(response, 400, "Validation error", field)


def test_envoys_messages_quote_at_most_64_characters_of_the_input(state: State) -> None:
    """As the server's own: a long value or parameter name is cut (even one that begins
    with quotes of its own), and bytes of a body that is not UTF-8 are not echoed (the
    answer stays valid JSON)."""
    auth = {"X-API-Key": state.key}
    value = state.http.get(f"/api/v1/pipelines/runs?status={'B' * 500}", headers=auth)
    assert_envoy_error(value, 400, "Validation error", "status")
    assert "B" * 64 + "..." in value.json()["message"]
    quoted = state.http.get(f'/api/v1/pipelines/runs?status=""{"B" * 500}', headers=auth)
    assert_envoy_error(quoted, 400, "Validation error", "status")
    name = state.http.get(f"/api/v1/pipelines/runs?{'C' * 300}=1", headers=auth)
    assert_envoy_error(name, 400, "Validation error", "C" * 64 + "...")
    conflicting = state.http.post(
        f"/api/v1/pipelines/run/{state.tenant_id}/gcp/cost/cost_billing",
        headers=auth,
        json={"tenant_id": "B" * 500 + '"', "trigger_by": "john@acme.com"},
    )
    assert_envoy_error(conflicting, 400, "Validation error", "tenant_id")
    assert conflicting.json()["message"].endswith('"' + "B" * 64 + '..." in the body.')
    for response in (value, quoted, name, conflicting):
        body = response.json()
        echoed = body["message"] + body["details"]["issue"] + body["details"]["field"]
        assert "B" * 65 not in echoed and "C" * 65 not in echoed, body
        assert int(response.headers["content-length"]) == len(response.content)
    raw = state.http.post(
        "/api/v1/tenants/onboard",
        content=b'{"tenant_id": "\xff\xfe' + "\u00e9".encode() + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_envoy_error(raw, 400, "Validation error", "body")
    raw.content.decode("utf-8")  # strictly UTF-8


def test_a_path_envoy_cannot_normalize_is_named(state: State) -> None:
    """Whether the client sent its own request id or not (Envoy's reply differs)."""
    for path in ("/api/v1/pipelines/runs/%00", f"/api/v1/tenants/{state.tenant_id}%00/usage"):
        for headers in ({}, {"X-Request-Id": "client-chosen-id"}):
            response = state.http.get(path, headers={"X-API-Key": state.key, **headers})
            assert_envoy_error(response, 400, "Validation error", "path")
            assert "%00" in response.json()["details"]["issue"]
            assert response.json()["message"] == "Malformed request (path_normalization_failed)"


def test_a_body_field_of_the_wrong_type_is_named(state: State) -> None:
    response = state.http.post(
        f"/api/v1/pipelines/run/{state.tenant_id}/gcp/cost/cost_billing",
        headers={"X-API-Key": state.key},
        json={"trigger_by": "john@acme.com", "date": 20240101},
    )
    assert_envoy_error(response, 400, "Validation error", "date")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/v1/tenants/onboard"),
        ("GET", "/api/v1/tenants/onboard"),
        ("PUT", "/health"),
        ("GET", "/api/v1/nothing/here"),
    ],
)
def test_wrong_method_or_path(state: State, method: str, path: str) -> None:
    assert_envoy_error(state.http.request(method, path), 404, "Not found")


def test_oversized_body(state: State) -> None:
    payload = {"tenant_id": "big_tenant", **GUIDE_TENANT, "company_name": "x" * (2 << 20)}
    assert_envoy_error(
        state.http.post("/api/v1/tenants/onboard", json=payload), 413, "Payload too large"
    )


def test_body_field_contradicting_path(state: State) -> None:
    response = state.http.post(
        f"/api/v1/pipelines/run/{state.tenant_id}/gcp/cost/cost_billing",
        headers={"X-API-Key": state.key},
        json={"tenant_id": "someone_else", "trigger_by": "john@acme.com"},
    )
    assert_envoy_error(response, 400, "Validation error", "tenant_id")
    assert "conflicting" in response.json()["message"]


def test_bad_user_id_header(state: State) -> None:
    response = state.http.get(
        "/health", headers={"X-API-Key": state.key, "X-User-ID": "bob smith;drop"}
    )
    assert response.status_code == 400
    assert response.json()["details"]["field"] == "X-User-ID"


def every_bad_request(state: State) -> Iterator[httpx.Response]:
    http = state.http
    for path in ONBOARDING_PATHS:
        for tenant_id in [*BAD_TENANT_IDS, *RESERVED, state.tenant_id.upper()]:
            yield http.post(path, json={"tenant_id": tenant_id, **GUIDE_TENANT})
        for field, value in BAD_FIELDS:
            yield http.post(path, json={"tenant_id": "new_tenant", **GUIDE_TENANT, field: value})
        for raw, _ in MALFORMED_JSON:
            yield http.post(path, content=raw, headers={"content-type": "application/json"})
        yield http.post(path, json={"tenant_id": "x" * (2 << 20)})
        yield http.post(f"{path}?dry=1", json={"tenant_id": "new_tenant", **GUIDE_TENANT})
        yield http.delete(path)
    yield http.post("/api/v1/tenants/onboard", json={"tenant_id": state.tenant_id, **GUIDE_TENANT})
    yield http.post(
        f"/api/v1/pipelines/run/{state.tenant_id}/gcp/cost/cost_billing",
        headers={"X-API-Key": state.key},
        json={"tenant_id": "someone_else"},
    )


def test_store_is_unchanged(state: State) -> None:
    for response in every_bad_request(state):
        assert 400 <= response.status_code < 500, (response.request.url, response.text)
        assert response.json()["error"]
    state.stack.stop()
    assert dump_store(state.stack) == state.before
    assert schemas(state.stack) == state.schemas
