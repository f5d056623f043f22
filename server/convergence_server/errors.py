"""The one exception tree of the service; every layer raises these.

    ConvergenceError                    500 INTERNAL (never raised bare)
    ├── InvalidArgument                 400 INVALID_ARGUMENT   "Validation error"
    ├── Unauthenticated                 401 UNAUTHENTICATED    "Authentication failed"
    ├── PermissionDenied                403 PERMISSION_DENIED  "Authorization failed"
    ├── NotFound                        404 NOT_FOUND          "Not found"
    ├── AlreadyExists                   409 ALREADY_EXISTS     "Conflict"
    ├── FailedPrecondition              409 FAILED_PRECONDITION "Conflict"
    ├── QuotaExceeded                   429 RESOURCE_EXHAUSTED "Rate limit exceeded"
    ├── Unavailable                     503 UNAVAILABLE        "Service unavailable"
    ├── DeadlineExceeded                504 DEADLINE_EXCEEDED  "Deadline exceeded"
    ├── domain.onboarding.OnboardingRefused   400 / 409 / 503, carries the dry-run report
    └── (subclasses with their own ErrorInfo reason) domain.auth.KeyRejected 401 and its
        KeyRevoked (API_KEY_REVOKED) and KeyExpired (API_KEY_EXPIRED); domain.auth.KeyReadOnly
        403 (API_KEY_READ_ONLY)

`api.errors` turns them into a gRPC status and the documented REST body; nothing else does.
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
