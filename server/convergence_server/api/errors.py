"""The one place where errors become a gRPC status and the documented REST body.

gRPC clients get the status code with `google.rpc` details (ErrorInfo, BadRequest, the
dry-run report). REST clients get the body of the integration guide: the server puts the
HTTP status and the ready-made JSON body in trailing metadata (`x-http-status`,
`x-error-body`), and Envoy's Lua filter (envoy/error_body.lua) turns them into the response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from convergence.v1 import error_reason_pb2
from convergence_server import errors
from convergence_server.api import convert
from convergence_server.domain.onboarding import OnboardingRefused

ERROR_DOMAIN = "convergence.v1"
INTERNAL_MESSAGE = "An unexpected error occurred"


@dataclass(frozen=True)
class Rendering:
    """How callers see an error reason (from its `ErrorReason` value in the protos)."""

    code: grpc.StatusCode
    http_status: int
    title: str


def _renderings() -> dict[str, Rendering]:
    by_number = {code.value[0]: code for code in grpc.StatusCode}
    renderings = {}
    for value in error_reason_pb2.ErrorReason.DESCRIPTOR.values:
        option = value.GetOptions().Extensions[error_reason_pb2.rendering]
        if option.code:  # the reasons only Envoy gives have no gRPC code
            renderings[value.name] = Rendering(
                by_number[option.code], option.http_status, option.title
            )
    return renderings


# ErrorInfo reason -> status and title: the `ErrorReason` enum of the protos, which Envoy's
# Lua filter and local replies render too (see envoy.py).
RENDERINGS = _renderings()
_INTERNAL = RENDERINGS["INTERNAL"]


def rendering(error: errors.ConvergenceError) -> Rendering:
    return RENDERINGS.get(error.reason, _INTERNAL)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


@dataclass(frozen=True)
class Abort:
    """What `ServicerContext.abort` needs to end a call with an error."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def to_abort(error: errors.ConvergenceError | None, request_id: str, rest: bool) -> Abort:
    """The status (with details and trailing metadata) to abort the call with.

    `None` stands for an unexpected exception: a generic 500 carrying the request id, which
    503s carry too. `rest` says the call came through Envoy's transcoder, which alone needs
    the REST status and body in the trailers (gRPC clients have a metadata size limit).
    """
    mapping = _INTERNAL if error is None else rendering(error)
    message = INTERNAL_MESSAGE if error is None else error.message
    body: dict[str, Any] = {"error": mapping.title, "message": message}
    details = [
        error_details_pb2.ErrorInfo(
            reason="INTERNAL" if error is None else error.reason,
            domain=ERROR_DOMAIN,
            metadata={"request_id": request_id},
        )
    ]
    if mapping.http_status in (500, 503):
        body["request_id"] = request_id
    if isinstance(error, errors.InvalidArgument | OnboardingRefused) and error.violations:
        first = error.violations[0]
        body["details"] = {"field": first.field, "issue": first.issue}
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.issue)
                    for v in error.violations
                ]
            )
        )
    retry_after: tuple[tuple[str, str], ...] = ()
    if isinstance(error, errors.QuotaExceeded):
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=error.subject, description=error.message
                    )
                ]
            )
        )
        # A limit that waiting does not lift (a count of things kept) says no retry time.
        if error.retry_after is not None:
            body["retry_after"] = error.retry_after
            retry_after = (("retry-after", str(error.retry_after)),)
            if not rest:
                # gRPC's own retry policy waits as long as this says (REST has Retry-After).
                retry_after += (("grpc-retry-pushback-ms", str(error.retry_after * 1000)),)
            delay = duration_pb2.Duration(seconds=error.retry_after)
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(error, OnboardingRefused):
        report = convert.dry_run_response(error.report)
        details.append(report)
        body.update(
            (name, value) for name, value in convert.to_json(report).items() if name != "message"
        )
    proto = status_pb2.Status(
        code=getattr(code_pb2, mapping.code.name),
        message=message,
        details=[_pack(d) for d in details],
    )
    status = rpc_status.to_status(proto)
    trailing = (*status.trailing_metadata, *retry_after)
    if rest:
        trailing += (
            ("x-http-status", str(mapping.http_status)),
            ("x-error-body", json.dumps(body, ensure_ascii=True)),
        )
    return Abort(status.code, status.details, trailing)
