"""Interceptors, one concern each, outermost first:

1. `ErrorInterceptor`: turns every exception into a status (via `api.errors`, the one place).
2. `RequestContextInterceptor`: request id, method and X-User-ID, for logs and servicers.
3. `AuthInterceptor`: who is calling, from `x-api-key`. What the caller may do is decided by
   the servicers.

Each wraps the method handler's behaviour, so its code runs inside the call's own task and
the context variables it sets are seen by everything the call runs.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from grpc.aio import ServerInterceptor, ServicerContext

from convergence_server import errors, logs
from convergence_server.api.context import caller_var
from convergence_server.api.errors import to_abort
from convergence_server.domain.auth import INVALID_KEY_MESSAGE, Authenticator

log = logging.getLogger(__name__)

Behavior = Callable[[Any, "ServicerContext[Any, Any]"], Awaitable[Any]]
Continuation = Callable[
    [grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]
]

SERVICE_PREFIX = "/convergence.v1."
# Onboarding is how a tenant gets its key: a key sent there is ignored.
OPEN_METHODS = frozenset(
    {
        "/convergence.v1.TenantService/DryRunOnboarding",
        "/convergence.v1.TenantService/OnboardTenant",
    }
)
# No key needed, but a key that is sent must be valid (the guide's "verify your key" step).
KEY_OPTIONAL_METHODS = frozenset({"/convergence.v1.HealthService/GetHealth"})
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}", re.ASCII)
_USER_ID = re.compile(r"[A-Za-z0-9._@+-]{1,128}", re.ASCII)


def metadata_value(context: ServicerContext[Any, Any], key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def is_transcoded(context: ServicerContext[Any, Any]) -> bool:
    """Whether the call is a REST request that Envoy's transcoder turned into gRPC."""
    return metadata_value(context, "x-envoy-original-path") is not None


async def _refuse(request: Any, context: ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming methods are not served")


def _refusing(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind that refuses the call.

    The interceptors wrap unary methods only; a streaming method would bypass them (and
    authentication with them), so until they wrap it, it is refused: fail closed.
    """
    kinds = {
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    kind = next(k for k in kinds if getattr(handler, k) is not None)
    return kinds[kind](
        _refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _WrappingInterceptor(ServerInterceptor):  # type: ignore[type-arg]
    """Wraps the unary-unary behaviour of this service's methods with `around`."""

    async def around(
        self, behavior: Behavior, request: Any, context: ServicerContext[Any, Any]
    ) -> Any:
        raise NotImplementedError

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        if handler.unary_unary is None:
            return _refusing(handler)
        behavior = cast(Behavior, handler.unary_unary)  # coroutines, on an aio server

        async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> Any:
            logs.method_var.set(method)
            return await self.around(behavior, request, context)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class ErrorInterceptor(_WrappingInterceptor):
    async def around(
        self, behavior: Behavior, request: Any, context: ServicerContext[Any, Any]
    ) -> Any:
        try:
            return await behavior(request, context)
        except errors.ConvergenceError as exc:
            abort = to_abort(exc, _request_id(), is_transcoded(context))
            if isinstance(exc, errors.Unavailable):
                log.warning("unavailable: %s", exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            request_id = _request_id()
            log.exception("unexpected error (request_id=%s)", request_id)
            abort = to_abort(None, request_id, is_transcoded(context))
        await context.abort(abort.code, abort.details, abort.trailing_metadata)


def _request_id() -> str:
    request_id = logs.request_id_var.get()
    if not request_id:
        request_id = f"req_{uuid.uuid4().hex}"
        logs.request_id_var.set(request_id)
    return request_id


class RequestContextInterceptor(_WrappingInterceptor):
    async def around(
        self, behavior: Behavior, request: Any, context: ServicerContext[Any, Any]
    ) -> Any:
        incoming = metadata_value(context, "x-request-id")
        if incoming and _REQUEST_ID.fullmatch(incoming):
            logs.request_id_var.set(incoming)
        if not is_transcoded(context):
            # Envoy echoes the id to REST clients; gRPC clients get it as initial
            # metadata. (A transcoded call must send none: its error body rides on a
            # trailers-only response.)
            await context.send_initial_metadata((("x-request-id", _request_id()),))
        user_id = metadata_value(context, "x-user-id")
        if user_id is not None:
            if not _USER_ID.fullmatch(user_id):
                raise errors.InvalidArgument(
                    "Invalid X-User-ID header",
                    [errors.FieldViolation("X-User-ID", f"must match {_USER_ID.pattern}")],
                )
            logs.user_id_var.set(user_id)
        return await behavior(request, context)


class AuthInterceptor(_WrappingInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def around(
        self, behavior: Behavior, request: Any, context: ServicerContext[Any, Any]
    ) -> Any:
        method = logs.method_var.get()
        key = metadata_value(context, "x-api-key")
        if method in OPEN_METHODS:
            pass
        elif key:
            caller = await self._authenticator.authenticate(key)
            caller_var.set(caller)
            logs.tenant_id_var.set(caller.tenant_id)
        elif method not in KEY_OPTIONAL_METHODS:
            raise errors.Unauthenticated(INVALID_KEY_MESSAGE)
        return await behavior(request, context)
