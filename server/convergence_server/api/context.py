"""Per-call state set by the interceptors and read by the servicers."""

from __future__ import annotations

import contextvars

from convergence_server.domain.auth import Caller
from convergence_server.errors import Unauthenticated

caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
# True when the call carries the operator's scheduler token (it acts for every tenant).
operator_var: contextvars.ContextVar[bool] = contextvars.ContextVar("operator", default=False)


def current_caller() -> Caller | None:
    return caller_var.get()


def require_caller() -> Caller:
    caller = caller_var.get()
    if caller is None:
        raise Unauthenticated("Invalid or missing API key")
    return caller
