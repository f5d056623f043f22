"""One request log line per call, with Cloud Logging's fields, the call's context and its
trace, and never a key."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import duckdb
import httpx

from tests.conftest import (
    GUIDE_TENANT,
    StackFactory,
    database_path,
    onboard,
    trigger,
)

REQUEST_LOGGER = "convergence_server.requests"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def request_lines(log: Path) -> dict[str, list[dict[str, object]]]:
    """The request log lines by request id."""
    lines: dict[str, list[dict[str, object]]] = {}
    for text in log.read_text().splitlines():
        entry = json.loads(text)
        if entry.get("logger") == REQUEST_LOGGER:
            lines.setdefault(str(entry.get("request_id")), []).append(entry)
    return lines


def test_each_call_logs_one_line_with_its_outcome(
    stack_factory: StackFactory, pipeline_env: dict[str, str]
) -> None:
    stack = stack_factory(**pipeline_env)
    calls: list[tuple[httpx.Response, int, str]] = []  # response, status, path
    with httpx.Client(base_url=stack.http_url, timeout=120) as http:
        tenant_id, key = onboard(http)
        starter_id, starter_key = onboard(http, plan="STARTER")
        own = {
            "X-API-Key": key,
            "X-User-ID": "ana@acme.com",
            "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
        }

        def call(method: str, path: str, status: int, **kwargs: object) -> None:
            response = http.request(method, path, **kwargs)  # type: ignore[arg-type]
            assert response.status_code == status, response.text
            calls.append((response, status, path))

        call("GET", "/health", 200, headers=own)
        call("POST", f"/api/v1/tenants/{tenant_id}/api-keys", 400, headers=own, json={})
        call("GET", "/api/v1/pipelines", 401, headers={"X-API-Key": key[:-4] + "abcd"})
        call("GET", f"/api/v1/pipelines/runs/{uuid.uuid4()}", 404, headers=own)
        body = {"tenant_id": tenant_id, **GUIDE_TENANT}
        call("POST", "/api/v1/tenants/onboard", 409, json=body)
        trigger(http, starter_key, starter_id, "test/runs/slow", parameters={"size": "30000000"})
        path = f"/api/v1/pipelines/run/{starter_id}/test/runs/quick"
        call("POST", path, 429, headers={"X-API-Key": starter_key}, json={})
    stack.stop()
    # A store damaged behind the server's back: the key table is gone, a call fails (500).
    with duckdb.connect(str(database_path(stack))) as db:
        db.execute("DROP TABLE tenants.tenant_api_keys")
    stack = stack_factory(data_dir=stack.run_dir.parent, **pipeline_env)
    with httpx.Client(base_url=stack.http_url, timeout=120) as http:
        call("GET", "/health", 500, headers={"X-API-Key": key})
    stack.stop()

    log = stack.run_dir.parent / "logs" / "server.log"
    lines = request_lines(log)
    for response, status, path in calls:
        request_id = response.headers["x-request-id"]
        [line] = lines[request_id]  # exactly one
        http_request = line["httpRequest"]
        assert isinstance(http_request, dict)
        assert http_request["status"] == status, line
        assert http_request["requestUrl"] == path, line
        assert http_request["requestMethod"] == response.request.method, line
        assert str(http_request["latency"]).endswith("s") and http_request["remoteIp"], line
        assert line["method"] and isinstance(line["duration_ms"], float), line
        expected = "INFO" if status < 400 else "ERROR" if status >= 500 else "WARNING"
        assert line["severity"] == expected, line
    first = lines[calls[0][0].headers["x-request-id"]][0]
    assert (first["tenant_id"], first["user_id"]) == (tenant_id, "ana@acme.com")
    assert first["logging.googleapis.com/trace"] == f"projects/your-project/traces/{TRACE}"
    assert first["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    secret = key.rsplit("_", 1)[-1]
    assert secret not in log.read_text()


def test_request_log_off_writes_no_request_line(stack_factory: StackFactory) -> None:
    stack = stack_factory(CONVERGENCE_REQUEST_LOG="off")
    with httpx.Client(base_url=stack.http_url, timeout=120) as http:
        assert http.get("/health").status_code == 200
        assert http.get(f"/api/v1/pipelines/runs/{uuid.uuid4()}").status_code == 401
    stack.stop()
    assert request_lines(stack.run_dir.parent / "logs" / "server.log") == {}
