"""The guarded contract: one source of error titles, the field behaviours the protos
declare enforced by the server, and `make breaking` refusing a change that breaks
integrators."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from google.api import field_behavior_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.rpc import error_details_pb2, status_pb2

import convergence_server.app  # noqa: F401 - loads every error class
from convergence_server import errors
from convergence_server.api.errors import RENDERINGS
from convergence_server.config import REPO_ROOT, Config
from convergence_server.domain.onboarding import FailureKind
from convergence_server.envoy import OTHER_CLIENT_ERROR, error_titles, render_config, render_lua
from convergence_server.stack import Stack
from tests.conftest import UNMETERED, onboard

SERVICES = [
    service
    for path in sorted((REPO_ROOT / "protos" / "convergence" / "v1").glob("*_service.proto"))
    for service in importlib.import_module(
        f"convergence.v1.{path.stem}_pb2"
    ).DESCRIPTOR.services_by_name.values()
]


def _subclasses(cls: type[errors.ConvergenceError]) -> Iterator[type[errors.ConvergenceError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_reason_the_server_gives_is_in_the_enum() -> None:
    from convergence_server.domain.onboarding import _REFUSAL_REASONS

    reasons = {cls.reason for cls in _subclasses(errors.ConvergenceError)}
    reasons |= set(_REFUSAL_REASONS.values())
    assert reasons and reasons <= RENDERINGS.keys(), reasons - RENDERINGS.keys()
    assert set(_REFUSAL_REASONS) == set(FailureKind)


def test_the_server_lua_filter_and_envoy_replies_give_one_title_per_status() -> None:
    titles = error_titles()
    # The server: every reason's title is its status's.
    assert {r.http_status: r.title for r in RENDERINGS.values()}.items() <= titles.items()
    # The Lua filter.
    lua = dict(re.findall(r'^  \[(\d{3})\] = "([^"]+)",$', render_lua(titles), re.M))
    assert {int(status): title for status, title in lua.items()} == titles
    # Envoy's own replies: each mapper's title is that of the status it answers with.
    bootstrap = yaml.safe_load(render_config(Config(key_pepper=b"p" * 32), grpc_port=50051))
    [listener] = bootstrap["static_resources"]["listeners"]
    [manager] = [f for f in listener["filter_chains"][0]["filters"]]
    mappers = manager["typed_config"]["local_reply_config"]["mappers"]
    shaped = [m for m in mappers if "body_format_override" in m]  # not native gRPC's
    assert len(shaped) == len(mappers) - 1
    for mapper in shaped:
        status_filter = _status_filter(mapper["filter"])
        assert status_filter is not None, mapper
        op, status = status_filter["op"], status_filter["value"]["default_value"]
        status = mapper.get("status_code", status)
        expected = titles[status] if op == "EQ" else titles[500] if status >= 500 else None
        title = mapper["body_format_override"]["json_format"]["error"]
        assert title == (expected or OTHER_CLIENT_ERROR), mapper


def _status_filter(node: dict[str, Any]) -> dict[str, Any] | None:
    if "status_code_filter" in node:
        comparison: dict[str, Any] = node["status_code_filter"]["comparison"]
        return comparison
    for inner in node.get("and_filter", {}).get("filters", []):
        found = _status_filter(inner)
        if found is not None:
            return found
    return None


def test_live_titles_come_from_the_enum(stack: Stack, http: httpx.Client) -> None:
    titles = error_titles()
    _, key = onboard(http)
    answers = {
        # The server (through the Lua filter), then Envoy's own replies.
        f"/api/v1/pipelines/runs/{uuid.uuid4()}": 404,
        "/api/v1/tenants/someone_else/usage": 403,
        "/api/v1/no/such/path": 404,
    }
    for path, status in answers.items():
        response = http.get(path, headers={"X-API-Key": key})
        assert response.status_code == status, response.text
        assert response.json()["error"] == titles[status]


def _required(descriptor: Descriptor) -> list[str]:
    return [
        field.name
        for field in descriptor.fields
        if field_behavior_pb2.REQUIRED
        in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
    ]


def _call(channel: grpc.Channel, method: MethodDescriptor, key: str) -> grpc.RpcError:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    stub = kind(
        path,
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    with pytest.raises(grpc.RpcError) as raised:
        answer = stub(request_class(), metadata=(("x-api-key", key),), timeout=60)
        if method.server_streaming:
            list(answer)
    return raised.value


def test_every_required_field_is_enforced(pipelines: Stack, api: httpx.Client) -> None:
    """Each method, sent an empty request by a caller with a valid key, is refused with
    INVALID_ARGUMENT naming every field its request declares REQUIRED."""
    _, key = onboard(api, plan=UNMETERED)
    methods = [m for s in SERVICES for m in s.methods if _required(m.input_type)]
    assert len(methods) > 20
    with grpc.insecure_channel(pipelines.grpc_target) as channel:
        for method in methods:
            error = _call(channel, method, key)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, error)
            details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
            bad_request = error_details_pb2.BadRequest()
            for detail in status_pb2.Status.FromString(details).details:
                detail.Unpack(bad_request)
            named = {v.field for v in bad_request.field_violations}
            assert set(_required(method.input_type)) <= named, (method.name, named)


def test_a_missing_field_over_rest_is_the_documented_400(api: httpx.Client) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    keys = f"/api/v1/tenants/{tenant_id}/api-keys"
    before = api.get(keys, headers={"X-API-Key": key}).json()
    response = api.post(keys, headers={"X-API-Key": key}, json={})
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": "Validation error",
        "message": "name is required",
        "details": {"field": "name", "issue": "is required"},
    }
    assert api.get(keys, headers={"X-API-Key": key}).json() == before


def test_output_only_fields_sent_back_are_ignored(api: httpx.Client) -> None:
    """A schedule read, changed and sent back whole (no update_mask) updates what may
    change; the server's own fields in it are ignored, not refused and not applied."""
    tenant_id, key = onboard(api, plan=UNMETERED)
    headers = {"X-API-Key": key}
    created = api.post(
        "/api/v1/schedules",
        headers=headers,
        json={"provider": "test", "domain": "runs", "template": "quick", "cron": "0 6 * * *"},
    )
    assert created.status_code == 200, created.text
    schedule = created.json()
    changed = {
        **{k: schedule[k] for k in ("cron", "time_zone", "catch_up", "parameters")},
        "cron": "0 7 * * *",
        "schedule_id": "another",
        "tenant_id": "someone_else",
        "skipped_slots": 9,
        "next_slot_time": "2031-01-01T00:00:00Z",
    }
    updated = api.patch(
        f"/api/v1/schedules/{schedule['schedule_id']}", headers=headers, json=changed
    )
    assert updated.status_code == 200, updated.text
    body = updated.json()
    assert body["cron"] == "0 7 * * *"
    assert (body["schedule_id"], body["tenant_id"]) == (schedule["schedule_id"], tenant_id)
    assert body["skipped_slots"] == 0 and body["next_slot_time"] != "2031-01-01T00:00:00Z"


BUF = REPO_ROOT / "build" / "tools" / "node_modules" / ".bin" / "buf"
VENV = REPO_ROOT / ".venv"


@pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make lint`")
def test_make_breaking_refuses_a_renamed_field(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    for name in ("Makefile", "buf.yaml"):  # this checkout's, against the clone's HEAD
        shutil.copy(REPO_ROOT / name, clone / name)
    make = [
        *("make", "-C", str(clone), "AGAINST=HEAD", f"BUF={BUF}", f"VENV={VENV}"),
        *("-o", f"{VENV}/.installed"),
    ]
    unchanged = subprocess.run([*make, "breaking"], capture_output=True, text=True)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    run_proto = clone / "protos" / "convergence" / "v1" / "run.proto"
    text = run_proto.read_text()
    run_proto.write_text(text.replace(" error_message = 11", " failure_message = 11", 1))
    broken = subprocess.run([*make, "breaking"], capture_output=True, text=True)
    assert broken.returncode != 0
    assert 'changed name from "error_message" to "failure_message"' in broken.stdout, broken.stdout
    shutil.rmtree(clone)
