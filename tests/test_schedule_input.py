"""Bad schedule input: the documented 4xx over REST (Envoy) and gRPC, and nothing changes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2

from convergence.v1 import (
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    schedule_pb2,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
)
from convergence_server.stack import Stack
from tests.conftest import UNMETERED, onboard
from tests.test_input_validation import assert_refused, grpc_refusal

QUICK = {"provider": "test", "domain": "runs", "template": "quick"}
CRON_FIELDS = "must have 5 fields"

BAD_CREATES: list[tuple[dict[str, object], str]] = [
    ({"cron": "61 * * * *"}, "cron"),
    ({"cron": "* * * *"}, "cron"),
    ({"cron": "* * * * * *"}, "cron"),
    ({"cron": "@daily"}, "cron"),
    ({"cron": "0 0 30 2 *"}, "cron"),
    ({"cron": "0 6 * * *\u200b"}, "cron"),
    ({"cron": "x" * 5000}, "cron"),
    ({"time_zone": "Mars/Phobos"}, "time_zone"),
    ({"time_zone": "../../etc/passwd"}, "time_zone"),
    ({"time_zone": "Europe/Berlin" * 20}, "time_zone"),
    ({"template": "nope"}, "template"),
    ({"provider": "../etc"}, "provider"),
    ({"parameters": {"nope": "1"}}, "parameters.nope"),
    ({"parameters": {"date": "2026-13-01"}}, "parameters.date"),
    ({"parameters": {"date": "{slot_date-x}"}}, "parameters.date"),
    ({"parameters": {"date": "{slot_date-1}x"}}, "parameters.date"),
    ({"parameters": {"allow_shrink": "true"}}, "parameters.allow_shrink"),
    ({"catch_up": "sometimes"}, "catch_up"),
    ({"catch_up": "all", "catch_up_max": 5000}, "catch_up_max"),
    ({"catch_up_max": -1}, "catch_up_max"),
    ({"created_by": "ops\x07@acme.com"}, "created_by"),
    ({"created_by": "o" * 300}, "created_by"),
]


def auth(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture(scope="module")
def tenant(api: httpx.Client) -> tuple[str, str]:
    return onboard(api, plan=UNMETERED)


@pytest.fixture(scope="module")
def stub(pipelines: Stack) -> Iterator[schedule_service_pb2_grpc.ScheduleServiceStub]:
    with grpc.insecure_channel(pipelines.grpc_target) as channel:
        yield schedule_service_pb2_grpc.ScheduleServiceStub(channel)


def listed(api: httpx.Client, key: str) -> list[dict[str, object]]:
    response = api.get("/api/v1/schedules", headers=auth(key), params={"limit": 1000})
    assert response.status_code == 200, response.text
    schedules: list[dict[str, object]] = response.json()["schedules"]
    return schedules


@pytest.mark.parametrize(("fields", "field"), BAD_CREATES)
def test_a_bad_schedule_is_refused_over_rest_and_grpc_and_nothing_is_created(
    api: httpx.Client,
    stub: schedule_service_pb2_grpc.ScheduleServiceStub,
    tenant: tuple[str, str],
    fields: dict[str, object],
    field: str,
) -> None:
    _, key = tenant
    before = listed(api, key)
    body = {**QUICK, "cron": "0 6 * * *", **fields}
    assert_refused(api.post("/api/v1/schedules", headers=auth(key), json=body), field)
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateSchedule(
            schedule_service_pb2.CreateScheduleRequest(**body),  # type: ignore[arg-type]
            metadata=(("x-api-key", key),),
        )
    assert grpc_refusal(raised.value)[0][0] == field
    assert listed(api, key) == before


def test_the_cron_issue_names_what_is_wrong(api: httpx.Client, tenant: tuple[str, str]) -> None:
    _, key = tenant
    response = api.post("/api/v1/schedules", headers=auth(key), json={**QUICK, "cron": "0 6 * *"})
    body = assert_refused(response, "cron")
    assert CRON_FIELDS in str(body["details"])


def test_schedules_are_managed_over_rest_and_grpc(
    api: httpx.Client, stub: schedule_service_pb2_grpc.ScheduleServiceStub
) -> None:
    tenant_id, key = onboard(api, plan=UNMETERED)
    # The template's own `schedule:` is the default cron; UTC and `latest` the defaults.
    created = api.post(
        "/api/v1/schedules",
        headers={**auth(key), "X-User-ID": "ana@acme.com"},
        json={"provider": "gcp", "domain": "cost", "template": "cost_billing"},
    )
    assert created.status_code == 200, created.text
    schedule = created.json()
    assert schedule["tenant_id"] == tenant_id
    assert schedule["cron"] == "0 8 * * *"  # configs/gcp/cost/cost_billing.yml
    assert (schedule["time_zone"], schedule["catch_up"], schedule["catch_up_max"]) == (
        "UTC",
        "latest",
        24,
    )
    assert schedule["created_by"] == "ana@acme.com" and schedule["paused"] is False
    assert schedule["next_slot_time"].endswith("T08:00:00Z")
    sid = schedule["schedule_id"]

    patched = api.patch(
        f"/api/v1/schedules/{sid}",
        headers=auth(key),
        json={"cron": "30 6 * * 1-5", "time_zone": "Europe/Berlin"},
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["cron"], patched.json()["time_zone"]) == (
        "30 6 * * 1-5",
        "Europe/Berlin",
    )
    assert patched.json()["catch_up"] == "latest"  # untouched

    # gRPC sees the same schedule; an update mask names the fields to set.
    metadata = (("x-api-key", key),)
    got = stub.GetSchedule(
        schedule_service_pb2.GetScheduleRequest(schedule_id=sid), metadata=metadata
    )
    assert got.cron == "30 6 * * 1-5"
    updated = stub.UpdateSchedule(
        schedule_service_pb2.UpdateScheduleRequest(
            schedule_id=sid,
            schedule=schedule_pb2.Schedule(catch_up="all", catch_up_max=5),
            update_mask=field_mask_pb2.FieldMask(paths=["catch_up", "catch_up_max"]),
        ),
        metadata=metadata,
    )
    assert (updated.catch_up, updated.catch_up_max) == ("all", 5)

    # Pages: oldest first, the token signed for this tenant and listing.
    for _ in range(2):
        api.post("/api/v1/schedules", headers=auth(key), json={**QUICK, "cron": "0 1 * * *"})
    first = api.get("/api/v1/schedules", headers=auth(key), params={"limit": 2}).json()
    assert first["schedules"][0]["schedule_id"] == sid
    second = api.get(
        "/api/v1/schedules",
        headers=auth(key),
        params={"limit": 2, "page_token": first["next_page_token"]},
    ).json()
    assert len(second["schedules"]) == 1 and second["next_page_token"] == ""
    assert_refused(
        api.get("/api/v1/schedules", headers=auth(key), params={"page_token": "x.y"}),
        "page_token",
    )
    assert_refused(api.get("/api/v1/schedules", headers=auth(key), params={"limit": 5000}), "limit")

    # Another tenant sees none of it.
    _, other = onboard(api, plan=UNMETERED)
    assert api.get(f"/api/v1/schedules/{sid}", headers=auth(other)).status_code == 404
    assert listed(api, other) == []
    assert api.delete(f"/api/v1/schedules/{sid}", headers=auth(other)).status_code == 404

    # Bad changes: refused, and the schedule is as it was.
    before = api.get(f"/api/v1/schedules/{sid}", headers=auth(key)).json()
    for body, field in (
        ({"cron": "0 25 * * *"}, "cron"),
        ({"time_zone": "Nowhere/Land"}, "time_zone"),
        ({"provider": "aws"}, "update_mask"),
        ({"paused": True}, "update_mask"),
        ({"catch_up": "never"}, "catch_up"),
    ):
        assert_refused(api.patch(f"/api/v1/schedules/{sid}", headers=auth(key), json=body), field)
    assert api.get(f"/api/v1/schedules/{sid}", headers=auth(key)).json() == before

    # A schedule read and sent back whole, its cron changed: the fields that cannot change
    # are sent with the values they have (a backfill's count, which the ticker moves, may
    # be behind: it is ignored), and only the cron changes.
    edited = {**before, "cron": "0 7 * * *", "backfill_slots_left": 7}
    whole = api.patch(f"/api/v1/schedules/{sid}", headers=auth(key), json=edited)
    assert whole.status_code == 200, whole.text
    moved = ("cron", "updated_at", "next_slot_time", "last_slot_time")  # a new cron moves these
    assert whole.json()["cron"] == "0 7 * * *"
    assert {k: v for k, v in whole.json().items() if k not in moved} == {
        k: v for k, v in before.items() if k not in moved
    }
    before = whole.json()
    # The audit names the fields whose value changed; a change of nothing is no event.
    again = api.patch(f"/api/v1/schedules/{sid}", headers=auth(key), json=before)
    assert again.status_code == 200, again.text
    assert again.json() == before
    same = api.patch(f"/api/v1/schedules/{sid}", headers=auth(key), json={"catch_up": "all"})
    assert same.status_code == 200, same.text
    log = api.get(
        f"/api/v1/tenants/{tenant_id}/audit-log",
        headers=auth(key),
        params={"event": "schedule.updated"},
    )
    assert log.status_code == 200, log.text
    assert [(e["target"], e["detail"]) for e in log.json()["events"]] == [
        (sid, "cron"),
        (sid, "catch_up, catch_up_max"),
        (sid, "cron, time_zone"),
    ]

    # Ids: malformed is 400, unknown is 404.
    assert_refused(api.get("/api/v1/schedules/not-a-uuid", headers=auth(key)), "schedule_id")
    missing = api.get(f"/api/v1/schedules/{uuid.uuid4()}", headers=auth(key))
    assert missing.status_code == 404 and missing.json()["error"] == "Not found"

    deleted = api.delete(f"/api/v1/schedules/{sid}", headers=auth(key))
    assert deleted.status_code == 200 and deleted.json()["schedule_id"] == sid
    assert api.get(f"/api/v1/schedules/{sid}", headers=auth(key)).status_code == 404
    assert api.delete(f"/api/v1/schedules/{sid}", headers=auth(key)).status_code == 404


def test_bad_backfills_are_refused_and_change_nothing(
    api: httpx.Client, tenant: tuple[str, str]
) -> None:
    _, key = tenant
    created = api.post("/api/v1/schedules", headers=auth(key), json={**QUICK, "cron": "0 6 * * *"})
    sid = created.json()["schedule_id"]
    every_minute = api.post(
        "/api/v1/schedules", headers=auth(key), json={**QUICK, "cron": "* * * * *"}
    ).json()["schedule_id"]
    june = api.post(
        "/api/v1/schedules", headers=auth(key), json={**QUICK, "cron": "0 6 * 6 *"}
    ).json()["schedule_id"]
    bound = api.post(
        "/api/v1/schedules",
        headers=auth(key),
        json={**QUICK, "cron": "0 6 * * *", "parameters": {"date": "{slot_date-1}"}},
    ).json()["schedule_id"]
    cases = [
        (sid, {"start_date": "2026-02-30", "end_date": "2026-03-01"}, "start_date"),
        (sid, {"end_date": "2026-03-01"}, "start_date"),
        (sid, {"start_date": "2026-03-05", "end_date": "2026-03-01"}, "end_date"),
        (sid, {"start_date": "2026-03-01", "end_date": "2099-01-01"}, "end_date"),
        (sid, {"start_date": "1999-12-31", "end_date": "2026-01-01"}, "start_date"),
        (every_minute, {"start_date": "2026-03-01", "end_date": "2026-03-02"}, "end_date"),
        (june, {"start_date": "2026-01-01", "end_date": "2026-01-31"}, "start_date"),
        # `{slot_date-1}` of 2000-01-01 is before the first date a run accepts.
        (bound, {"start_date": "2000-01-01", "end_date": "2000-01-02"}, "parameters.date"),
    ]
    for schedule_id, body, field in cases:
        before = api.get(f"/api/v1/schedules/{schedule_id}", headers=auth(key)).json()
        response = api.post(
            f"/api/v1/schedules/{schedule_id}:backfill", headers=auth(key), json=body
        )
        assert_refused(response, field)
        assert api.get(f"/api/v1/schedules/{schedule_id}", headers=auth(key)).json() == before
    for schedule_id in (sid, every_minute, june, bound):
        api.delete(f"/api/v1/schedules/{schedule_id}", headers=auth(key))


def test_the_plans_schedule_limit_is_a_429_without_a_retry_time(
    api: httpx.Client, stub: schedule_service_pb2_grpc.ScheduleServiceStub
) -> None:
    _, key = onboard(api, plan="STARTER")  # max_schedules: 10
    for _ in range(10):
        response = api.post(
            "/api/v1/schedules", headers=auth(key), json={**QUICK, "cron": "0 6 * * *"}
        )
        assert response.status_code == 200, response.text
    refused = api.post("/api/v1/schedules", headers=auth(key), json={**QUICK, "cron": "0 6 * * *"})
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["error"] == "Rate limit exceeded"
    assert "allows 10 schedules" in body["message"]
    assert "retry_after" not in body and "retry-after" not in refused.headers
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateSchedule(
            schedule_service_pb2.CreateScheduleRequest(
                provider="test", domain="runs", template="quick", cron="0 6 * * *"
            ),
            metadata=(("x-api-key", key),),
        )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert len(listed(api, key)) == 10
    # Deleting one makes room.
    first = listed(api, key)[0]["schedule_id"]
    assert api.delete(f"/api/v1/schedules/{first}", headers=auth(key)).status_code == 200
    again = api.post("/api/v1/schedules", headers=auth(key), json={**QUICK, "cron": "0 6 * * *"})
    assert again.status_code == 200, again.text


def test_the_trigger_needs_a_valid_key_or_token_over_grpc(pipelines: Stack) -> None:
    with grpc.insecure_channel(pipelines.grpc_target) as channel:
        trigger = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        request = pipeline_service_pb2.TriggerScheduledPipelinesRequest()
        for metadata in ((), (("x-api-key", "nope_api_x"),), (("x-scheduler-token", "t" * 40),)):
            with pytest.raises(grpc.RpcError) as raised:
                trigger.TriggerScheduledPipelines(request, metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_bad_changes_and_backfills_are_refused_over_grpc_too(
    api: httpx.Client,
    stub: schedule_service_pb2_grpc.ScheduleServiceStub,
    tenant: tuple[str, str],
) -> None:
    _, key = tenant
    metadata = (("x-api-key", key),)
    created = stub.CreateSchedule(
        schedule_service_pb2.CreateScheduleRequest(
            provider="test", domain="runs", template="quick", cron="0 6 * * *"
        ),
        metadata=metadata,
    )
    sid = created.schedule_id
    calls = [
        (
            stub.UpdateSchedule,
            schedule_service_pb2.UpdateScheduleRequest(
                schedule_id=sid, schedule=schedule_pb2.Schedule(cron="0 6 * *")
            ),
            "cron",
        ),
        (
            stub.UpdateSchedule,
            schedule_service_pb2.UpdateScheduleRequest(
                schedule_id=sid,
                schedule=schedule_pb2.Schedule(template="other"),
                update_mask=field_mask_pb2.FieldMask(paths=["template"]),
            ),
            "update_mask",
        ),
        (
            stub.BackfillSchedule,
            schedule_service_pb2.BackfillScheduleRequest(
                schedule_id=sid, start_date="2026-1-1", end_date="2026-01-02"
            ),
            "start_date",
        ),
        (
            stub.GetSchedule,
            schedule_service_pb2.GetScheduleRequest(schedule_id="../x"),
            "schedule_id",
        ),
        (
            stub.ListSchedules,
            schedule_service_pb2.ListSchedulesRequest(page_token="forged.token"),
            "page_token",
        ),
    ]
    for method, request, field in calls:
        with pytest.raises(grpc.RpcError) as raised:
            method(request, metadata=metadata)
        assert grpc_refusal(raised.value)[0][0] == field
    after = stub.GetSchedule(
        schedule_service_pb2.GetScheduleRequest(schedule_id=sid), metadata=metadata
    )
    assert after == created
    with pytest.raises(grpc.RpcError) as raised:
        stub.DeleteSchedule(
            schedule_service_pb2.DeleteScheduleRequest(schedule_id=str(uuid.uuid4())),
            metadata=metadata,
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    stub.DeleteSchedule(
        schedule_service_pb2.DeleteScheduleRequest(schedule_id=sid), metadata=metadata
    )
