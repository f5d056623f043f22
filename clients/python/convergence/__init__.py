"""The Python client of the Convergence service.

`Client` (blocking) and `AsyncClient` (asyncio) have a method per RPC that returns the
`convergence.v1` messages, raise the types of `convergence.errors`, retry what is worth
retrying (`RetryPolicy`), list every page of a listing and watch a run to its end. The
generated messages and stubs are in `convergence.v1` (written by `make proto`).
"""

from convergence._retry import RetryPolicy
from convergence.aio import AsyncClient
from convergence.client import Client
from convergence.errors import (
    AlreadyExists,
    ConvergenceError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Client",
    "ConvergenceError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
]
