"""API keys as a resource of the tenant, and its audit log, through REST (Envoy), gRPC, SQL
and the operator command, on the embedded store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from convergence.v1 import access_service_pb2, access_service_pb2_grpc
from convergence_server.config import REPO_ROOT
from tests.conftest import (
    StackFactory,
    database_path,
    dump_store,
    eventually,
    onboard,
    stack_env,
    trigger,
)

QUICK = "test/runs/quick"
FLUSH = {"CONVERGENCE_AUDIT_FLUSH_SECONDS": "0.2"}


def keys_path(tenant_id: str, suffix: str = "") -> str:
    return f"/api/v1/tenants/{tenant_id}/api-keys{suffix}"


def create_key(http: httpx.Client, key: str, tenant_id: str, **body: Any) -> httpx.Response:
    return http.post(keys_path(tenant_id), headers={"X-API-Key": key}, json=body)


def rotate(
    http: httpx.Client, key: str, tenant_id: str, key_id: str, **body: Any
) -> httpx.Response:
    return http.post(
        keys_path(tenant_id, f"/{key_id}:rotate"), headers={"X-API-Key": key}, json=body
    )


def onboarding_key_id(http: httpx.Client, key: str, tenant_id: str) -> str:
    listed = http.get(keys_path(tenant_id), headers={"X-API-Key": key}).json()["keys"]
    return str(listed[-1]["key_id"])


def usage(http: httpx.Client, key: str, tenant_id: str) -> httpx.Response:
    return http.get(f"/api/v1/tenants/{tenant_id}/usage", headers={"X-API-Key": key})


def audit(http: httpx.Client, key: str, tenant_id: str, **params: Any) -> list[dict[str, Any]]:
    response = http.get(
        f"/api/v1/tenants/{tenant_id}/audit-log", headers={"X-API-Key": key}, params=params
    )
    assert response.status_code == 200, response.text
    return list(response.json().get("events", []))


def assert_refused(response: httpx.Response, status: int, error: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    for word in words:
        assert word in body["message"], body


@pytest.fixture(scope="module")
def keyed(stack_factory: StackFactory, pipeline_env: dict[str, str]) -> Iterator[Any]:
    stack = stack_factory(**pipeline_env, **FLUSH)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        yield stack, http


def test_create_list_get_revoke_and_the_audit_trail(keyed: Any) -> None:
    _, http = keyed
    tenant_id, first = onboard(http)
    created = create_key(http, first, tenant_id, name="prod-etl")
    assert created.status_code == 200, created.text
    body = created.json()
    secret, new = body["api_key"], body["key"]
    assert secret.startswith(f"{tenant_id}_api_{new['key_id']}")
    assert new["name"] == "prod-etl" and new["scope"] == "FULL" and new["state"] == "ACTIVE"
    assert new["prefix"] == f"{tenant_id}_api_{new['key_id']}"
    assert new["created_by"].startswith("key:")
    assert usage(http, secret, tenant_id).status_code == 200

    listed = http.get(keys_path(tenant_id), headers={"X-API-Key": secret})
    assert listed.status_code == 200, listed.text
    keys = listed.json()["keys"]
    assert [k["name"] for k in keys] == ["prod-etl", "onboarding"]  # newest first
    for text in (listed.text, created.text.replace(secret, "")):
        assert secret not in text and first not in text
    assert not any("hash" in name or "salt" in name for k in keys for name in k)
    first_id = keys[1]["key_id"]
    got = http.get(keys_path(tenant_id, f"/{first_id}"), headers={"X-API-Key": secret})
    assert got.status_code == 200 and got.json()["created_by"] == "onboarding"
    # Last use is written in batches; both keys have been used.
    eventually(
        lambda: all(
            k.get("last_used_at")
            for k in http.get(keys_path(tenant_id), headers={"X-API-Key": secret}).json()["keys"]
        ),
        "last_used_at of both keys",
    )

    revoked = http.post(keys_path(tenant_id, f"/{first_id}:revoke"), headers={"X-API-Key": secret})
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["state"] == "REVOKED" and revoked.json()["revoked_at"]
    # The very next request with the revoked key is refused, and says why.
    assert_refused(usage(http, first, tenant_id), 401, "Authentication failed", "revoked")
    # Revoking it again changes nothing.
    again = http.post(keys_path(tenant_id, f"/{first_id}:revoke"), headers={"X-API-Key": secret})
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    # A revoked key cannot be rotated.
    rotate = http.post(
        keys_path(tenant_id, f"/{first_id}:rotate"), headers={"X-API-Key": secret}, json={}
    )
    assert_refused(rotate, 409, "Conflict", "revoked")
    # The last active key stays.
    last = http.post(
        keys_path(tenant_id, f"/{new['key_id']}:revoke"), headers={"X-API-Key": secret}
    )
    assert_refused(last, 409, "Conflict", "last active key")
    assert usage(http, secret, tenant_id).status_code == 200

    events = eventually(
        lambda: (
            (rows := audit(http, secret, tenant_id))
            and any(r["event"] == "auth.failed" for r in rows)
            and rows
        ),
        "the counted failed authentication",
    )
    order = [e["event"] for e in reversed(events) if e["event"] != "auth.failed"]
    assert order[:4] == [
        "tenant.onboarded",
        "api_key.created",
        "api_key.created",
        "api_key.revoked",
    ], order
    created_row = next(e for e in events if e["event"] == "api_key.created")
    assert created_row["target"] == new["key_id"] and created_row["actor_key_id"] == first_id
    assert created_row["request_id"] and created_row["client_address"]
    failed = [e for e in events if e["event"] == "auth.failed"]
    assert failed[0]["target"] == first_id and failed[0]["count"] >= 1
    only = audit(http, secret, tenant_id, event="api_key.revoked")
    assert [e["event"] for e in only] == ["api_key.revoked"]
    later = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert audit(http, secret, tenant_id, start_time=later) == []
    assert len(audit(http, secret, tenant_id, end_time=later)) == len(events)
    paged = audit(http, secret, tenant_id, limit=2)
    assert paged == events[:2]
    for text in (str(events),):
        assert secret not in text and first not in text


def test_a_read_only_key_reads_but_changes_nothing(keyed: Any) -> None:
    _, http = keyed
    tenant_id, full = onboard(http)
    response = create_key(http, full, tenant_id, name="dashboard", scope="READ_ONLY")
    assert response.status_code == 200, response.text
    reader = response.json()["api_key"]
    assert response.json()["key"]["scope"] == "READ_ONLY"
    run = trigger(http, full, tenant_id, QUICK)
    headers = {"X-API-Key": reader}
    for path in (
        f"/api/v1/pipelines/runs/{run['pipeline_logging_id']}",
        "/api/v1/pipelines/runs",
        f"/api/v1/tenants/{tenant_id}/usage",
        keys_path(tenant_id),
        f"/api/v1/tenants/{tenant_id}/audit-log",
    ):
        assert http.get(path, headers=headers).status_code == 200, path
    refusals = [
        http.post(f"/api/v1/pipelines/run/{tenant_id}/{QUICK}", headers=headers, json={}),
        http.post(f"/api/v1/pipelines/runs/{run['pipeline_logging_id']}:cancel", headers=headers),
        http.put(
            f"/api/v1/tenants/{tenant_id}/subscription",
            headers=headers,
            json={"subscription_plan": "SCALE"},
        ),
        create_key(http, reader, tenant_id, name="escalate"),
        http.post(keys_path(tenant_id, "/x:revoke"), headers=headers),
    ]
    for refused in refusals:
        assert_refused(refused, 403, "Authorization failed", "read-only")
    keys = http.get(keys_path(tenant_id), headers=headers).json()["keys"]
    assert len(keys) == 2  # nothing created


def test_bad_requests_are_refused_with_the_documented_body(keyed: Any) -> None:
    _, http = keyed
    tenant_id, key = onboard(http)
    other_id, other = onboard(http)
    headers = {"X-API-Key": key}
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    cases = [
        (create_key(http, key, tenant_id, name=""), 400, "name"),
        (create_key(http, key, tenant_id, name="a b"), 400, "name"),
        (create_key(http, key, tenant_id, name="x" * 65), 400, "name"),
        (create_key(http, key, tenant_id, name="ok", scope=7), 400, "scope"),
        (create_key(http, key, tenant_id, name="ok", expires_at=past), 400, "expires_at"),
        (
            http.post(keys_path(tenant_id, "/nosuchkey123:rotate"), headers=headers, json={}),
            404,
            "",
        ),
        (http.get(keys_path(tenant_id, "/nosuchkey123"), headers=headers), 404, ""),
        (
            http.get(f"/api/v1/tenants/{tenant_id}/audit-log?event=nope", headers=headers),
            400,
            "event",
        ),
        (
            http.get(f"/api/v1/tenants/{tenant_id}/audit-log?limit=5000", headers=headers),
            400,
            "limit",
        ),
        (
            http.get(f"/api/v1/tenants/{tenant_id}/audit-log?page_token=abc", headers=headers),
            400,
            "page_token",
        ),
    ]
    for response, status, field in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) >= {"error", "message"}, body
        if field:
            assert body["details"]["field"] == field, body
    first_id = http.get(keys_path(tenant_id), headers=headers).json()["keys"][0]["key_id"]
    grace = http.post(
        keys_path(tenant_id, f"/{first_id}:rotate"), headers=headers, json={"grace_seconds": -1}
    )
    assert grace.status_code == 400 and grace.json()["details"]["field"] == "grace_seconds"
    # Another tenant's keys and log: 403, and its keys unchanged.
    for response in (
        http.get(keys_path(other_id), headers=headers),
        http.get(f"/api/v1/tenants/{other_id}/audit-log", headers=headers),
        create_key(http, key, other_id, name="intruder"),
    ):
        assert_refused(response, 403, "Authorization failed")
    others = http.get(keys_path(other_id), headers={"X-API-Key": other}).json()["keys"]
    assert [k["name"] for k in others] == ["onboarding"]
    mine = http.get(keys_path(tenant_id), headers=headers).json()["keys"]
    assert [k["name"] for k in mine] == ["onboarding"]  # no bad request created one


def test_rotation_grace_and_expiry_follow_the_clock(
    stack_factory: StackFactory, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    offset_file = tmp_path / "clock-offset"
    offset_file.write_text("0")

    def move_to(moment: datetime) -> None:
        offset_file.write_text(str((moment - datetime.now(UTC)).total_seconds()))
        os.utime(offset_file)

    stack = stack_factory(
        data_dir=tmp_path / "data",
        CONVERGENCE_CLOCK_OFFSET_FILE=str(offset_file),
        **pipeline_env,
        **FLUSH,
    )
    start = datetime.now(UTC)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, old = onboard(http)
        headers = {"X-API-Key": old}
        old_id = onboarding_key_id(http, old, tenant_id)
        rotated = rotate(http, old, tenant_id, old_id, grace_seconds=3600)
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["api_key"]
        assert rotated.json()["key"]["name"] == "onboarding"
        twice = http.post(keys_path(tenant_id, f"/{old_id}:rotate"), headers=headers, json={})
        assert_refused(twice, 409, "Conflict", "rotated already")
        # During the grace period both work.
        assert usage(http, old, tenant_id).status_code == 200
        assert usage(http, new, tenant_id).status_code == 200
        listed = http.get(keys_path(tenant_id), headers={"X-API-Key": new}).json()["keys"]
        assert listed[1]["replaced_by"] == listed[0]["key_id"] and listed[1]["expires_at"]

        move_to(start + timedelta(hours=2))
        assert_refused(usage(http, old, tenant_id), 401, "Authentication failed", "expired")
        assert usage(http, new, tenant_id).status_code == 200

        # A key that expires in 10 days warns; after its expiry it is refused as expired.
        expires = (start + timedelta(hours=2, days=10)).isoformat()
        short = create_key(http, new, tenant_id, name="short", expires_at=expires)
        assert short.status_code == 200, short.text
        short_key = short.json()["api_key"]
        warned = usage(http, short_key, tenant_id)
        assert warned.status_code == 200 and "expires at" in warned.headers["warning"]
        assert "warning" not in usage(http, new, tenant_id).headers
        move_to(start + timedelta(days=11))
        assert_refused(usage(http, short_key, tenant_id), 401, "Authentication failed", "expired")
        assert usage(http, new, tenant_id).status_code == 200
        states = {
            k["key_id"]: k["state"]
            for k in http.get(keys_path(tenant_id), headers={"X-API-Key": new}).json()["keys"]
        }
        short_id = short.json()["key"]["key_id"]
        assert states == {old_id: "EXPIRED", short_id: "EXPIRED", listed[0]["key_id"]: "ACTIVE"}
        # Revoking ends a grace period at once.
        again = http.post(
            keys_path(tenant_id, f"/{listed[0]['key_id']}:rotate"),
            headers={"X-API-Key": new},
            json={},
        )
        assert again.status_code == 200, again.text
        newest = again.json()["api_key"]
        assert usage(http, new, tenant_id).status_code == 200  # in its 24 h grace
        revoke = http.post(
            keys_path(tenant_id, f"/{listed[0]['key_id']}:revoke"),
            headers={"X-API-Key": newest},
        )
        assert revoke.status_code == 200, revoke.text
        assert_refused(usage(http, new, tenant_id), 401, "Authentication failed", "revoked")
        # The expired keys' use is in the audit log, counted per key.
        eventually(
            lambda: (
                {e["target"] for e in audit(http, newest, tenant_id, event="api_key.expired")}
                == {old_id, short_id}
            ),
            "the expired keys' audit rows",
        )


def test_keys_over_grpc(keyed: Any) -> None:
    stack, http = keyed
    tenant_id, key = onboard(http)
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = access_service_pb2_grpc.AccessServiceStub(channel)
        metadata = (("x-api-key", key),)
        created = stub.CreateApiKey(
            access_service_pb2.CreateApiKeyRequest(
                tenant_id=tenant_id, name="ci", scope=access_service_pb2.ApiKey.READ_ONLY
            ),
            metadata=metadata,
        )
        assert created.api_key and created.key.scope == access_service_pb2.ApiKey.READ_ONLY
        listed = stub.ListApiKeys(
            access_service_pb2.ListApiKeysRequest(tenant_id=tenant_id), metadata=metadata
        )
        assert [k.name for k in listed.keys] == ["ci", "onboarding"]
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateApiKey(
                access_service_pb2.CreateApiKeyRequest(tenant_id=tenant_id, name="x"),
                metadata=(("x-api-key", created.api_key),),
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as last:
            stub.RevokeApiKey(
                access_service_pb2.RevokeApiKeyRequest(
                    tenant_id=tenant_id, key_id=listed.keys[1].key_id
                ),
                metadata=metadata,
            )
        # A read-only key cannot manage keys: it does not count as the key that remains.
        assert last.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "last active" in (last.value.details() or "")
        onboarding_id = listed.keys[1].key_id
        rotated = stub.RotateApiKey(
            access_service_pb2.RotateApiKeyRequest(
                tenant_id=tenant_id, key_id=onboarding_id, grace_seconds=0
            ),
            metadata=metadata,
        )
        assert rotated.api_key and rotated.key.name == "onboarding"
        old = stub.GetApiKey(
            access_service_pb2.GetApiKeyRequest(tenant_id=tenant_id, key_id=onboarding_id),
            metadata=(("x-api-key", rotated.api_key),),
        )
        assert old.replaced_by == rotated.key.key_id and old.state == "EXPIRED"
        with pytest.raises(grpc.RpcError) as expired:
            stub.ListApiKeys(
                access_service_pb2.ListApiKeysRequest(tenant_id=tenant_id), metadata=metadata
            )
        assert expired.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in (expired.value.details() or "")
        log = stub.ListAuditLog(
            access_service_pb2.ListAuditLogRequest(tenant_id=tenant_id, event=["api_key.rotated"]),
            metadata=(("x-api-key", rotated.api_key),),
        )
        assert [e.target for e in log.events] == [onboarding_id]


def test_the_operator_revokes_a_tenants_only_key_and_issues_a_new_one(
    stack_factory: StackFactory, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    stack = stack_factory(data_dir=data_dir, **pipeline_env)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, lost = onboard(http)
        lost_id = http.get(keys_path(tenant_id), headers={"X-API-Key": lost}).json()["keys"][0]
        # Secrets from create and rotate, both retired, for the scan at the end.
        created = create_key(http, lost, tenant_id, name="ci").json()
        rotated = http.post(
            keys_path(tenant_id, f"/{created['key']['key_id']}:rotate"),
            headers={"X-API-Key": lost},
            json={"grace_seconds": 0},
        ).json()
        retired = http.post(
            keys_path(tenant_id, f"/{rotated['key']['key_id']}:revoke"),
            headers={"X-API-Key": lost},
        )
        assert retired.status_code == 200, retired.text
        # Through the API, the only key cannot be revoked.
        refused = http.post(
            keys_path(tenant_id, f"/{lost_id['key_id']}:revoke"), headers={"X-API-Key": lost}
        )
        assert_refused(refused, 409, "Conflict", "last active key")
    stack.stop()
    env = {**os.environ, **stack_env(data_dir), "PYTHONPATH": os.pathsep.join(sys.path)}

    def keys_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "convergence_server", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )

    # The operator revokes it (leaked, say): the tenant has no working key left.
    revoked = keys_command("revoke", tenant_id, lost_id["key_id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    assert keys_command("revoke", tenant_id, "nosuchkey123").returncode == 1
    command = [sys.executable, "-m", "convergence_server", "keys", "issue"]
    unknown = subprocess.run(
        [*command, "no_such_tenant", "--name", "recovery"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert unknown.returncode == 1 and "No tenant" in unknown.stderr
    issued = subprocess.run(
        [*command, tenant_id, "--name", "recovery"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert issued.returncode == 0, issued.stderr
    secret = issued.stdout.strip()
    assert secret.startswith(f"{tenant_id}_api_") and "shown only this once" in issued.stderr

    stack = stack_factory(data_dir=data_dir, **pipeline_env)
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        assert_refused(usage(http, lost, tenant_id), 401, "Authentication failed", "revoked")
        assert usage(http, secret, tenant_id).status_code == 200
        run = trigger(http, secret, tenant_id, QUICK)
        assert run["pipeline_logging_id"]
        rows = audit(http, secret, tenant_id, event="api_key.created")
        assert rows[0]["detail"] == "recovery (operator)" and rows[0]["actor_key_id"] == ""
    stack.stop()
    # Readable with SQL; the secrets are nowhere in the database file or the logs.
    sql = subprocess.run(
        [
            sys.executable,
            "-m",
            "convergence_server",
            "sql",
            f"SELECT event FROM tenants.tenant_audit_log WHERE tenant_id = '{tenant_id}' "
            "ORDER BY event_time",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert sql.returncode == 0, sql.stderr
    assert "tenant.onboarded" in sql.stdout and "api_key.created" in sql.stdout
    stored, rows = database_path(stack).read_bytes(), repr(dump_store(stack))
    for key in (lost, secret, created["api_key"], rotated["api_key"]):
        token = key.split("_api_")[1][12:]
        assert token.encode() not in stored and token not in rows
        for log in (data_dir / "logs").glob("*"):
            assert token not in log.read_text(errors="replace")


def test_account_changes_quota_refusals_and_schedules_are_audited(keyed: Any) -> None:
    _, http = keyed
    tenant_id, key = onboard(http, plan="STARTER")  # 60 requests a minute per key
    auth = {"X-API-Key": key}
    alice = {**auth, "X-User-ID": "alice"}
    assert usage(http, key, tenant_id).status_code == 200
    assert http.get(f"/api/v1/tenants/{tenant_id}/members", headers=alice).status_code == 200
    assert http.get("/api/v1/pipelines/runs", headers=alice).status_code == 200  # a member now
    removed = http.delete(f"/api/v1/tenants/{tenant_id}/members/alice", headers=auth)
    assert removed.status_code == 200, removed.text
    plan = http.put(
        f"/api/v1/tenants/{tenant_id}/subscription",
        headers=auth,
        json={"subscription_plan": "SCALE"},
    )
    assert plan.status_code == 200, plan.text
    assert plan.json()["message"].startswith("Plan changed to SCALE")
    same = http.put(  # the plan it has: nothing changes, no event
        f"/api/v1/tenants/{tenant_id}/subscription",
        headers=auth,
        json={"subscription_plan": "SCALE"},
    )
    assert same.status_code == 200, same.text
    assert same.json()["message"] == "The plan is SCALE already: nothing changed."
    body = {"provider": "test", "domain": "runs", "template": "quick", "cron": "0 6 * * *"}
    schedule = http.post("/api/v1/schedules", headers=auth, json=body)
    assert schedule.status_code == 200, schedule.text
    schedule_id = schedule.json()["schedule_id"]
    updated = http.patch(
        f"/api/v1/schedules/{schedule_id}", headers=auth, json={"cron": "0 7 * * *"}
    )
    assert updated.status_code == 200, updated.text
    backfill = http.post(
        f"/api/v1/schedules/{schedule_id}:backfill",
        headers=auth,
        json={"start_date": "2024-01-01", "end_date": "2024-01-02"},
    )
    assert backfill.status_code == 200, backfill.text
    for verb in ("pause", "pause", "resume", "resume"):  # each second one: no change, no event
        changed = http.post(f"/api/v1/schedules/{schedule_id}:{verb}", headers=auth)
        assert changed.status_code == 200, changed.text
        assert changed.json()["paused"] is (verb == "pause")
    assert http.delete(f"/api/v1/schedules/{schedule_id}", headers=auth).status_code == 200
    back = http.put(
        f"/api/v1/tenants/{tenant_id}/subscription",
        headers=auth,
        json={"subscription_plan": "STARTER"},
    )
    assert back.status_code == 200
    # The plan's rate is per key: another one reads the log while the first is refused.
    reader = create_key(http, key, tenant_id, name="auditor", scope="READ_ONLY").json()["api_key"]
    # Past the plan's rate: refusals are counted into one row per minute and quota.
    for _ in range(200):
        if usage(http, key, tenant_id).status_code == 429:
            break
    else:
        raise AssertionError("the request rate was never refused")

    def events() -> list[str]:
        rows = audit(http, reader, tenant_id)
        return [e["event"] for e in reversed(rows)]

    seen = eventually(
        lambda: (found := events()) and "quota.refused" in found and found,
        "the quota refusal",
        interval=1.0,  # the reading key has 60 requests a minute too
    )
    assert [e for e in seen if e != "quota.refused"] == [
        "tenant.onboarded",
        "api_key.created",
        "member.added",
        "member.removed",
        "subscription.changed",
        "schedule.created",
        "schedule.updated",
        "schedule.backfilled",
        "schedule.paused",
        "schedule.resumed",
        "schedule.deleted",
        "subscription.changed",
        "api_key.created",
    ], seen


def test_a_key_replaced_by_a_rotation_does_not_keep_its_tenant_in(keyed: Any) -> None:
    """Revoking the new key while the rotated one is in its grace period would leave only
    a key about to stop working: refused like revoking the last active key."""
    _, http = keyed
    tenant_id, key = onboard(http)
    headers = {"X-API-Key": key}
    old_id = onboarding_key_id(http, key, tenant_id)
    rotated = rotate(http, key, tenant_id, old_id, grace_seconds=60)
    assert rotated.status_code == 200, rotated.text
    new_id = rotated.json()["key"]["key_id"]
    refused = http.post(keys_path(tenant_id, f"/{new_id}:revoke"), headers=headers)
    assert_refused(refused, 409, "Conflict", "last active key", "rotation")
    states = {
        k["key_id"]: k["state"]
        for k in http.get(keys_path(tenant_id), headers=headers).json()["keys"]
    }
    assert states == {old_id: "ACTIVE", new_id: "ACTIVE"}
    # The key being replaced may go at once: its replacement stays.
    assert http.post(keys_path(tenant_id, f"/{old_id}:revoke"), headers=headers).status_code == 200
    assert usage(http, rotated.json()["api_key"], tenant_id).status_code == 200


def test_a_key_that_expires_at_the_end_of_time_can_be_rotated(keyed: Any) -> None:
    """Its replacement lives as long, from now, as far as a timestamp goes: not a 500 (the
    old key's lifetime, from a later moment, ends after the last time Python can hold)."""
    _, http = keyed
    tenant_id, key = onboard(http)
    last = "9999-12-31T23:59:59.999999Z"
    far = create_key(http, key, tenant_id, name="far", expires_at=last)
    assert far.status_code == 200, far.text
    far_id = far.json()["key"]["key_id"]
    rotated = rotate(http, key, tenant_id, far_id)
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["key"]["expires_at"] == "9999-12-31T23:59:59Z"
    again = rotate(http, key, tenant_id, rotated.json()["key"]["key_id"])
    assert again.status_code == 200, again.text
    assert again.json()["key"]["expires_at"] == "9999-12-31T23:59:59Z"


def test_the_longest_key_lifetime_applies_to_new_keys(
    stack_factory: StackFactory, pipeline_env: dict[str, str]
) -> None:
    stack = stack_factory(**pipeline_env, CONVERGENCE_KEY_MAX_DAYS="90")
    with httpx.Client(base_url=stack.http_url, timeout=30) as http:
        tenant_id, key = onboard(http)
        capped = create_key(http, key, tenant_id, name="ci")
        assert capped.status_code == 200, capped.text
        expires = datetime.fromisoformat(capped.json()["key"]["expires_at"].replace("Z", "+00:00"))
        assert timedelta(days=89) < expires - datetime.now(UTC) <= timedelta(days=90)
        too_long = (datetime.now(UTC) + timedelta(days=91)).isoformat()
        refused = create_key(http, key, tenant_id, name="ci", expires_at=too_long)
        assert refused.status_code == 400 and refused.json()["details"]["field"] == "expires_at"
        assert "90 days" in refused.json()["message"]
    stack.stop()


# A statement that changes or removes rows of the audit table, as the server's code names it
# (its SQL is upper case).
AUDIT_CHANGE = re.compile(
    r"\b(?:UPDATE|DELETE\s+FROM|MERGE(?:\s+INTO)?|TRUNCATE(?:\s+TABLE)?|DROP\s+TABLE"
    r"(?:\s+IF\s+EXISTS)?)\s+[^;\n]{0,80}?(?:\bAUDIT\b|tenant_audit_log)"
)


def test_no_code_path_changes_or_removes_audit_rows() -> None:
    """The audit log is append-only on both stores: the server's code only inserts into it
    (the stores do not forbid more; README says how to keep a copy no one can change)."""
    for sample in (
        'f"DELETE FROM {AUDIT} WHERE tenant_id = ?"',
        "UPDATE {self._t('tenant_audit_log')} SET detail = ''",
        "TRUNCATE TABLE tenants.tenant_audit_log",
    ):
        assert AUDIT_CHANGE.search(sample), sample
    assert not AUDIT_CHANGE.search('f"INSERT INTO {AUDIT} ({AUDIT_COLUMNS}) VALUES (?)"')
    found = [
        f"{path.relative_to(REPO_ROOT)}: {match.group(0)}"
        for path in sorted((REPO_ROOT / "server" / "convergence_server").rglob("*.py"))
        for match in AUDIT_CHANGE.finditer(path.read_text())
    ]
    assert found == []
