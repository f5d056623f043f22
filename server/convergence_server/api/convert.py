"""Translation between protobuf messages and domain objects."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from convergence.v1 import (
    access_service_pb2,
    pipeline_pb2,
    run_pb2,
    schedule_pb2,
    tenant_pb2,
    tenant_service_pb2,
)
from convergence_server.domain.onboarding import (
    CheckStatus,
    DryRunReport,
    OnboardedTenant,
    TenantApplication,
)
from convergence_server.domain.schedules import SlotOutcome, slot_of
from convergence_server.engine.templates import Template, parameter_text
from convergence_server.errors import FieldViolation, InvalidArgument
from convergence_server.storage.records import (
    ApiKeyRecord,
    AuditRecord,
    DqRecord,
    MemberRecord,
    RunRecord,
    ScheduleRecord,
    StepRecord,
    WebhookRecord,
)

_CHECK_STATUS = {
    CheckStatus.PASSED: tenant_pb2.ValidationCheck.PASSED,
    CheckStatus.FAILED: tenant_pb2.ValidationCheck.FAILED,
    CheckStatus.WARNING: tenant_pb2.ValidationCheck.WARNING,
}


def to_json(message: Message) -> dict[str, Any]:
    """The message as Envoy's transcoder prints it (snake_case, zero values included)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def application(
    request: tenant_service_pb2.DryRunOnboardingRequest | tenant_service_pb2.OnboardTenantRequest,
) -> TenantApplication:
    return TenantApplication(
        tenant_id=request.tenant_id,
        company_name=request.company_name,
        admin_email=request.admin_email,
        subscription_plan=request.subscription_plan,
    )


def dry_run_response(report: DryRunReport) -> tenant_service_pb2.DryRunOnboardingResponse:
    response = tenant_service_pb2.DryRunOnboardingResponse
    return response(
        status=response.SUCCESS if report.ready else response.FAILED,
        ready_for_onboarding=report.ready,
        validation_summary=tenant_pb2.ValidationSummary(
            total_checks=len(report.results),
            passed=report.count(CheckStatus.PASSED),
            failed=report.count(CheckStatus.FAILED),
        ),
        message=report.message,
        validation_results=[
            tenant_pb2.ValidationCheck(
                check_name=r.check_name,
                status=_CHECK_STATUS[r.status],
                message=r.message,
                field=r.field,
            )
            for r in report.results
        ],
    )


def onboard_response(tenant: OnboardedTenant) -> tenant_service_pb2.OnboardTenantResponse:
    return tenant_service_pb2.OnboardTenantResponse(
        tenant_id=tenant.tenant_id,
        api_key=tenant.api_key,
        subscription_plan=tenant.subscription_plan,
        dataset_created=True,
        tables_created=list(tenant.tables_created),
        message=f"Tenant {tenant.company_name} onboarded successfully.",
    )


_SCOPES = {"FULL": access_service_pb2.ApiKey.FULL, "READ_ONLY": access_service_pb2.ApiKey.READ_ONLY}


def scope_name(scope: access_service_pb2.ApiKey.Scope.ValueType) -> str:
    """The scope a request names (unset: FULL); INVALID_ARGUMENT for an unknown number."""
    if scope == access_service_pb2.ApiKey.SCOPE_UNSPECIFIED:
        return "FULL"
    try:
        return access_service_pb2.ApiKey.Scope.Name(scope)
    except ValueError:
        raise InvalidArgument(
            "Invalid scope", [FieldViolation("scope", "must be FULL or READ_ONLY")]
        ) from None


def when(moment: datetime | None) -> str:
    return "never" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def api_key(record: ApiKeyRecord, now: datetime) -> access_service_pb2.ApiKey:
    return access_service_pb2.ApiKey(
        key_id=record.key_id,
        tenant_id=record.tenant_id,
        name=record.name,
        prefix=record.prefix,
        scope=_SCOPES[record.scope],
        created_at=_timestamp(record.created_at),
        created_by=record.created_by,
        expires_at=_timestamp(record.expires_at),
        last_used_at=_timestamp(record.last_used_at),
        revoked_at=_timestamp(record.revoked_at),
        replaced_by=record.replaced_by,
        state=record.state(now),
    )


def audit_event(record: AuditRecord) -> access_service_pb2.AuditEvent:
    return access_service_pb2.AuditEvent(
        event_id=record.event_id,
        tenant_id=record.tenant_id,
        event_time=_timestamp(record.event_time),
        event=record.event,
        actor_key_id=record.actor_key_id,
        actor_user_id=record.actor_user_id,
        target=record.target,
        detail=record.detail,
        request_id=record.request_id,
        client_address=record.client_address,
        count=_int32(record.count),
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    """As `Timestamp.FromDatetime` (a naive time is UTC), at a third of its cost."""
    if moment is None:
        return None
    since = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000
    )


def _int32(value: int | None) -> int:
    return max(0, min(value or 0, 2**31 - 1))


def run_status(name: str) -> run_pb2.Run.Status.ValueType:
    return run_pb2.Run.Status.Value(name)


def run(record: RunRecord) -> run_pb2.Run:
    slot = slot_of(record)
    return run_pb2.Run(
        pipeline_logging_id=record.pipeline_logging_id,
        pipeline_id=record.pipeline_id,
        tenant_id=record.tenant_id,
        status=run_status(record.status),
        trigger_type=record.trigger_type,
        trigger_by=record.trigger_by,
        user_id=record.user_id,
        start_time=_timestamp(record.start_time),
        end_time=_timestamp(record.end_time),
        duration_ms=_int32(record.duration_ms),
        error_message=record.error_message,
        parameters=record.parameters,
        created_at=_timestamp(record.created_at),
        schedule_id=slot[0] if slot else "",
        slot_time=_timestamp(slot[1]) if slot else None,
        warnings=_int32(record.warnings),
        trace_id=record.trace_id,
    )


def schedule(record: ScheduleRecord) -> schedule_pb2.Schedule:
    return schedule_pb2.Schedule(
        schedule_id=record.schedule_id,
        tenant_id=record.tenant_id,
        provider=record.provider,
        domain=record.domain,
        template=record.template,
        cron=record.cron,
        time_zone=record.time_zone,
        parameters=record.parameters,
        catch_up=record.catch_up,
        catch_up_max=record.catch_up_max,
        paused=record.paused,
        created_by=record.created_by,
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
        next_slot_time=_timestamp(record.next_slot),
        last_slot_time=_timestamp(record.last_slot),
        skipped_slots=_int32(record.skipped_slots),
        last_skip_reason=record.last_skip_reason,
        backfill_slots_left=_int32(record.backfill_left),
    )


def slot_result(outcome: SlotOutcome) -> schedule_pb2.SlotResult:
    return schedule_pb2.SlotResult(
        schedule_id=outcome.schedule_id,
        tenant_id=outcome.tenant_id,
        slot_time=_timestamp(outcome.slot),
        outcome=schedule_pb2.SlotResult.Outcome.Value(outcome.outcome),
        pipeline_logging_id=outcome.run.pipeline_logging_id if outcome.run else "",
        reason=outcome.reason,
        retry_after_seconds=_int32(outcome.retry_after),
        skipped_count=_int32(outcome.skipped_count),
    )


def run_step(record: StepRecord) -> run_pb2.RunStep:
    return run_pb2.RunStep(
        step_name=record.step_name,
        step_type=record.step_type,
        step_index=record.step_index,
        status=run_status(record.status),
        rows_processed=_int32(record.rows_processed),
        step_start_time=_timestamp(record.step_start_time),
        step_end_time=_timestamp(record.step_end_time),
        duration_ms=_int32(record.duration_ms),
        error_message=record.error_message,
        attempts=record.attempts,
        warnings=_int32(record.warnings),
    )


def run_check(record: DqRecord) -> run_pb2.RunCheck:
    check = run_pb2.RunCheck(
        step_name=record.step_name,
        check_name=record.check_name,
        check_type=record.check_type,
        severity=record.severity,
        status=run_pb2.RunCheck.Status.Value(record.status),
        observed_value=record.observed_value,
        expected_value=record.expected_value,
        message=record.message,
        failed_rows=None if record.failed_rows is None else _int32(record.failed_rows),
        run_attempt=record.run_attempt,
        created_at=_timestamp(record.created_at),
    )
    for sample in record.sample_rows:
        check.sample_rows.add().update(json.loads(sample))
    return check


def pipeline_template(template: Template) -> pipeline_pb2.PipelineTemplate:
    return pipeline_pb2.PipelineTemplate(
        provider=template.provider,
        domain=template.domain,
        template=template.name,
        description=template.description,
        schedule=template.schedule,
        parameters=[
            pipeline_pb2.TemplateParameter(
                name=p.name,
                type=p.type,
                default="" if p.default is None else parameter_text(p.default),
                description=p.description,
            )
            for p in template.parameters.values()
        ],
        steps=[s.name for s in template.steps],
    )


def webhook(record: WebhookRecord) -> tenant_service_pb2.Webhook:
    return tenant_service_pb2.Webhook(
        tenant_id=record.tenant_id,
        url=record.url,
        update_time=_timestamp(record.updated_at),
        updated_by=record.updated_by,
    )


def member(record: MemberRecord) -> tenant_pb2.TeamMember:
    return tenant_pb2.TeamMember(
        user_id=record.user_id, first_seen_at=_timestamp(record.first_seen_at)
    )
