"""The one exception tree of the service; every layer raises these.

    ConvergenceError                    INTERNAL (never raised bare)
    ├── InvalidArgument                 INVALID_ARGUMENT
    ├── Unauthenticated                 API_KEY_INVALID
    ├── PermissionDenied                TENANT_MISMATCH
    ├── NotFound                        NOT_FOUND
    ├── AlreadyExists                   ALREADY_EXISTS
    ├── FailedPrecondition              FAILED_PRECONDITION
    ├── QuotaExceeded                   QUOTA_EXCEEDED
    ├── Unavailable                     UNAVAILABLE
    ├── DeadlineExceeded                DEADLINE_EXCEEDED
    ├── domain.onboarding.OnboardingRefused   ONBOARDING_VALIDATION_FAILED, ALREADY_EXISTS or
    │                                   UNAVAILABLE; carries the dry-run report
    └── (subclasses with a reason of their own) domain.auth.KeyRejected and its KeyRevoked
        (API_KEY_REVOKED) and KeyExpired (API_KEY_EXPIRED); domain.auth.KeyReadOnly
        (API_KEY_READ_ONLY); domain.accounts.TeamSizeExceeded (TEAM_SIZE_EXCEEDED)

Each `reason` is a value of the `ErrorReason` enum (protos/convergence/v1/error_reason.proto),
which gives its gRPC code, HTTP status and REST title; `api.errors` turns an error into
those, and nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass

# Request values quoted back in messages are cut to this length, so that a huge input
# cannot inflate a response (or the trailers that carry an error). A field name carries a
# request value only when that value matches a bounded pattern (`parameters.NAME`).
MAX_ECHO = 64


def echo(value: str) -> str:
    """`value` as it may be quoted back to a caller."""
    return value if len(value) <= MAX_ECHO else value[:MAX_ECHO] + "..."


class ConvergenceError(Exception):
    """Base of every error the service raises on purpose."""

    reason = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its name and what is wrong with it."""

    field: str
    issue: str


class InvalidArgument(ConvergenceError):
    """A request field is malformed; `violations` names each bad field."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or []


class Unauthenticated(ConvergenceError):
    reason = "API_KEY_INVALID"


class PermissionDenied(ConvergenceError):
    reason = "TENANT_MISMATCH"


class NotFound(ConvergenceError):
    reason = "NOT_FOUND"


class AlreadyExists(ConvergenceError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(ConvergenceError):
    reason = "FAILED_PRECONDITION"


class QuotaExceeded(ConvergenceError):
    """A plan limit refuses the call; `retry_after` is an honest wait in whole seconds."""

    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, subject: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.subject = subject
        # None: waiting does not lift the limit (a count of things kept, not a rate).
        self.retry_after = None if retry_after is None else max(1, retry_after)


class Unavailable(ConvergenceError):
    reason = "UNAVAILABLE"


class DeadlineExceeded(ConvergenceError):
    reason = "DEADLINE_EXCEEDED"
