"""The errors a call raises, one class per kind of failure, built from the gRPC status and its
`google.rpc` details (`ErrorInfo`, `BadRequest`, `QuotaFailure`, `RetryInfo`)::

    ConvergenceError            code, message, reason, request_id, report
    ├── InvalidArgument         field_violations     INVALID_ARGUMENT, OUT_OF_RANGE (400)
    ├── Unauthenticated                              UNAUTHENTICATED (401)
    ├── PermissionDenied                             PERMISSION_DENIED (403)
    ├── NotFound                                     NOT_FOUND (404)
    ├── AlreadyExists                                ALREADY_EXISTS (409)
    ├── FailedPrecondition                           FAILED_PRECONDITION, ABORTED (409)
    ├── QuotaExceeded           retry_after, subject RESOURCE_EXHAUSTED (429)
    ├── Unavailable                                  UNAVAILABLE (503)
    ├── DeadlineExceeded                             DEADLINE_EXCEEDED (504)
    └── Internal                                     INTERNAL, UNKNOWN, DATA_LOSS (500)

Any other status (CANCELLED, UNIMPLEMENTED) is a plain `ConvergenceError`. The original
`grpc.RpcError` is the exception's `__cause__`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict, TypeVar, Unpack, cast

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from convergence.v1 import tenant_service_pb2

__all__ = [
    "AlreadyExists",
    "ConvergenceError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


_M = TypeVar("_M", bound=message.Message)


class _Context(TypedDict, total=False):
    code: grpc.StatusCode
    reason: str
    request_id: str
    report: tenant_service_pb2.DryRunOnboardingResponse | None


class ConvergenceError(Exception):
    """A call the service refused or could not complete.

    `reason` is the `ErrorInfo` reason (e.g. `API_KEY_REVOKED`, `QUOTA_EXCEEDED`), empty when
    the status carries none; `request_id` finds the call in the server's logs; `report` is the
    dry-run report that onboarding refusals carry.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        request_id: str = "",
        report: tenant_service_pb2.DryRunOnboardingResponse | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.request_id = request_id
        self.report = report

    def __str__(self) -> str:
        suffix = f" (request_id {self.request_id})" if self.request_id else ""
        return f"{self.code.name}: {self.message}{suffix}"


class InvalidArgument(ConvergenceError):
    """A request field is invalid: `field_violations` lists (field, issue) pairs."""

    def __init__(
        self,
        message: str,
        *,
        field_violations: Iterable[tuple[str, str]] = (),
        **context: Unpack[_Context],
    ) -> None:
        super().__init__(message, **context)
        self.field_violations = list(field_violations)


class Unauthenticated(ConvergenceError):
    """No API key, or one that is unknown, revoked or expired (see `reason`)."""


class PermissionDenied(ConvergenceError):
    """The key may not do this: another tenant, a read-only key, a full team."""


class NotFound(ConvergenceError):
    """No such run, template, schedule, key or member for the key's tenant."""


class AlreadyExists(ConvergenceError):
    """The tenant (or its dataset) already exists."""


class FailedPrecondition(ConvergenceError):
    """The resource is not in a state that allows the call (an ended run, a rotated key)."""


class QuotaExceeded(ConvergenceError):
    """A plan or rate limit refused the call.

    `retry_after` is the server's wait in seconds (`RetryInfo`), `None` when waiting does
    not lift the limit (a count of things kept, e.g. schedules); `subject` names the limit
    (`QuotaFailure`, e.g. `tenant:acme_corp:concurrent_pipeline_runs`).
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        subject: str = "",
        **context: Unpack[_Context],
    ) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after
        self.subject = subject


class Unavailable(ConvergenceError):
    """The service cannot answer now (unreachable, store not writable, a stream's end of
    life); worth retrying."""


class DeadlineExceeded(ConvergenceError):
    """The call's deadline passed before the answer came."""


class Internal(ConvergenceError):
    """The server failed unexpectedly; `request_id` finds its stack trace in the logs."""


_CLASSES: dict[grpc.StatusCode, type[ConvergenceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The `google.rpc.Status` in the error's trailers, if it has one that matches it."""
    try:
        # Sync errors are `grpc.Call`s; `grpc.aio.AioRpcError` has the same three methods.
        status: status_pb2.Status | None = rpc_status.from_call(cast(grpc.Call, error))
    except ValueError:  # a status that contradicts the call's own code or message
        return None
    return status


def _find(details: Iterable[any_pb2.Any], empty: _M) -> _M | None:
    """The first detail of `empty`'s type, unpacked into it."""
    for detail in details:
        if detail.Unpack(empty):
            return empty
    return None


def from_rpc_error(error: grpc.RpcError) -> ConvergenceError:
    """The typed error for a failed call (sync or asyncio)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (error.details() if callable(getattr(error, "details", None)) else None) or ""
    status = _rich_status(error)
    details = list(status.details) if status is not None else []
    info = _find(details, error_details_pb2.ErrorInfo())
    context: _Context = {
        "code": code,
        "reason": info.reason if info else "",
        "request_id": info.metadata.get("request_id", "") if info else "",
        "report": _find(details, tenant_service_pb2.DryRunOnboardingResponse()),
    }
    cls = _CLASSES.get(code, ConvergenceError)
    if cls is InvalidArgument:
        bad = _find(details, error_details_pb2.BadRequest())
        violations = [(v.field, v.description) for v in bad.field_violations] if bad else []
        return InvalidArgument(message, field_violations=violations, **context)
    if cls is QuotaExceeded:
        failure = _find(details, error_details_pb2.QuotaFailure())
        retry = _find(details, error_details_pb2.RetryInfo())
        return QuotaExceeded(
            message,
            retry_after=retry.retry_delay.ToTimedelta().total_seconds() if retry else None,
            subject=failure.violations[0].subject if failure and failure.violations else "",
            **context,
        )
    return cls(message, **context)
