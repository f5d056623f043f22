"""Interceptors, one concern each, outermost first:

1. `ErrorInterceptor`: turns every exception into a status (via `api.errors`, the one place).
2. `RequestContextInterceptor`: request id, method and X-User-ID, for logs and servicers.
3. `AuthInterceptor`: who is calling, from `x-api-key` (or, for the scheduler trigger
   alone, the operator's `x-scheduler-token`); what a caller without a valid key may cost
   (the open endpoints and failed authentications, per client address: see
   `domain.clients`); a READ_ONLY key may call only the reads of `READ_ONLY_METHODS`. What
   else the caller may do (its own tenant only) is decided by the servicers. Failures with
   a key the store knows are counted into its tenant's audit log.
4. `QuotaInterceptor`: the plan's request rate per API key, and the tenant's calls in
   progress and open streams; the trigger reserves the daily and concurrent run limits
   atomically with the insert of the run (see `domain.quotas`).
5. `FieldBehaviorInterceptor`: the REQUIRED and OUTPUT_ONLY fields the protos declare.

Each wraps the method handler's behaviour (unary and server-streaming methods; others are
refused), so its code runs inside the call's own task and the context variables it sets
are seen by everything the call runs. A request that does not parse as its protobuf
message reaches no servicer: it is refused with INVALID_ARGUMENT (400).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from grpc.aio import ServerInterceptor, ServicerContext

from convergence_server import errors, faults, logs, metrics
from convergence_server.api import fields
from convergence_server.api.context import caller_var, operator_var
from convergence_server.api.errors import Abort, to_abort
from convergence_server.clock import Clock, system_clock
from convergence_server.domain.access import AccessLog, Actor
from convergence_server.domain.accounts import Accounts, Seat
from convergence_server.domain.auth import (
    EXPIRY_WARNING,
    INVALID_KEY_MESSAGE,
    Authenticator,
    KeyReadOnly,
    KeyRejected,
)
from convergence_server.domain.clients import ClientLimits
from convergence_server.domain.keys import parse_key
from convergence_server.domain.quotas import PlanBook, RateLimiter, TenantLoad

log = logging.getLogger(__name__)
# One line per call: method, REST path, status, duration, and the call's context.
REQUESTS = logging.getLogger("convergence_server.requests")
# Codes that are the service's fault, logged at ERROR; a caller's mistakes at WARNING.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

Behavior = Callable[[Any, "ServicerContext[Any, Any]"], Awaitable[Any]]
StreamBehavior = Callable[[Any, "ServicerContext[Any, Any]"], AsyncIterator[Any]]
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
# Managing the account itself: a full team must still be able to see and change it.
ACCOUNT_METHODS = frozenset(
    f"/convergence.v1.TenantService/{name}"
    for name in ("GetUsage", "UpdateSubscription", "ListMembers", "RemoveMember")
)
# A tenant's key, or the operator's token (`x-scheduler-token`) for every tenant.
OPERATOR_METHODS = frozenset({"/convergence.v1.PipelineService/TriggerScheduledPipelines"})
OPERATOR_TOKEN_HEADER = "x-scheduler-token"
# No key needed, but a key that is sent must be valid (the guide's "verify your key" step).
KEY_OPTIONAL_METHODS = frozenset({"/convergence.v1.HealthService/GetHealth"})
# What a READ_ONLY key may call: reads of runs, usage, team, pipelines, schedules, keys and
# the audit log.
READ_ONLY_METHODS = frozenset(
    {
        "/convergence.v1.HealthService/GetHealth",
        "/convergence.v1.TenantService/GetUsage",
        "/convergence.v1.TenantService/ListMembers",
        "/convergence.v1.PipelineService/ListPipelines",
        *(
            f"/convergence.v1.RunService/{name}"
            for name in ("GetRun", "ListRuns", "ListRunSteps", "ListRunChecks", "WatchRun")
        ),
        "/convergence.v1.ScheduleService/GetSchedule",
        "/convergence.v1.ScheduleService/ListSchedules",
        *(
            f"/convergence.v1.AccessService/{name}"
            for name in ("ListApiKeys", "GetApiKey", "ListAuditLog")
        ),
    }
)
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}", re.ASCII)
_USER_ID = re.compile(r"[A-Za-z0-9._@+-]{1,128}", re.ASCII)


# The call's metadata as a dict, read once per call: the interceptors and handlers look up
# about ten keys a call, and each `invocation_metadata()` builds its tuple anew.
_metadata_var: contextvars.ContextVar[tuple[object, dict[str, str]]] = contextvars.ContextVar(
    "metadata"
)


def metadata_value(context: ServicerContext[Any, Any], key: str) -> str | None:
    """The first value of the metadata key `key`, or None."""
    held = _metadata_var.get(None)
    if held is None or held[0] is not context:
        values: dict[str, str] = {}
        for name, value in context.invocation_metadata() or ():
            if name not in values:
                values[name] = value if isinstance(value, str) else value.decode("ascii", "replace")
        held = (context, values)
        _metadata_var.set(held)
    return held[1].get(key)


def is_transcoded(context: ServicerContext[Any, Any]) -> bool:
    """Whether the call is a REST request that Envoy's transcoder turned into gRPC."""
    return metadata_value(context, "x-envoy-original-path") is not None


def client_address(context: ServicerContext[Any, Any], trusted_proxies: frozenset[str]) -> str:
    """The caller's IP address: the TCP peer's, or, when the peer is a trusted proxy
    (Envoy), the address Envoy determined (`x-envoy-external-address`)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer
    if host in trusted_proxies:
        forwarded = metadata_value(context, "x-envoy-external-address")
        if forwarded:
            try:
                return str(ipaddress.ip_address(forwarded.strip()))
            except ValueError:
                pass
    return host


async def _refuse(request: Any, context: ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this kind of method is not served")


class _Undecodable:
    """Stands for a request whose bytes are not its protobuf message."""


UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, returning `UNDECODABLE` instead of raising (gRPC would answer
    UNKNOWN and log the traceback at ERROR, once per bad request)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return UNDECODABLE

    return deserialize


def _decoded(request: Any) -> Any:
    if request is UNDECODABLE:
        raise errors.InvalidArgument(
            "The request is not a valid protobuf message for this method",
            [errors.FieldViolation("body", "does not parse as the method's request message")],
        )
    return request


Call = Callable[[], Awaitable[Any]]
StreamCall = Callable[[], AsyncIterator[Any]]


class HandlerCache(ServerInterceptor):  # type: ignore[type-arg]
    """Outermost: the handler the interceptors below build for a method is the same for
    every call of it (their wrappers depend on the method alone), so it is built once per
    method instead of once per call. Methods the server does not have are not kept."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is not None:
                self._handlers[method] = handler
        return handler


class _WrappingInterceptor(ServerInterceptor):  # type: ignore[type-arg]
    """Wraps the behaviour of this service's unary and server-streaming methods.

    Subclasses say what runs before the call (`before`) or around it (`around`,
    `around_stream`). Client-streaming methods would bypass them, and with them
    authentication, so they are refused: fail closed.
    """

    async def before(self, context: ServicerContext[Any, Any]) -> None:
        pass

    def accept(self, method: str, request: Any) -> Any:
        """The request to pass on (called within `around`, when the call goes on)."""
        return _decoded(request)

    async def around(self, call: Call, context: ServicerContext[Any, Any]) -> Any:
        await self.before(context)
        return await call()

    async def around_stream(
        self, call: StreamCall, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await self.before(context)
        async for item in call():
            yield item

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        codec = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary = cast(Behavior, handler.unary_unary)  # coroutines, on an aio server

            async def wrapped(request: Any, context: ServicerContext[Any, Any]) -> Any:
                logs.method_var.set(method)
                call = lambda: unary(self.accept(method, request), context)  # noqa: E731
                return await self.around(call, context)

            return grpc.unary_unary_rpc_method_handler(wrapped, **codec)
        if handler.unary_stream is not None:
            stream = cast(StreamBehavior, handler.unary_stream)

            async def wrapped_stream(
                request: Any, context: ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                logs.method_var.set(method)
                call = lambda: stream(self.accept(method, request), context)  # noqa: E731
                async for item in self.around_stream(call, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(wrapped_stream, **codec)
        kind = (
            grpc.stream_unary_rpc_method_handler
            if handler.stream_unary is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return kind(_refuse, **codec)


class ErrorInterceptor(_WrappingInterceptor):
    """Also counts quota refusals into the tenant's audit log (per minute and quota), and
    ends each call with its metrics and (unless `request_log` is off) its log line."""

    def __init__(self, access: AccessLog | None = None, request_log: bool = True) -> None:
        self._access = access
        self._request_log = request_log

    async def around(self, call: Call, context: ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        try:
            answer = await call()
        except Exception as exc:
            abort = self._abort_for(exc, context)
        else:
            _completed(started, context, self._request_log)
            return answer
        _completed(started, context, self._request_log, abort)
        await context.abort(abort.code, abort.details, abort.trailing_metadata)

    async def around_stream(
        self, call: StreamCall, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            async for item in call():
                yield item
        except Exception as exc:
            abort = self._abort_for(exc, context)
        else:
            _completed(started, context, self._request_log)
            return
        _completed(started, context, self._request_log, abort)
        await context.abort(abort.code, abort.details, abort.trailing_metadata)

    def _abort_for(self, exc: Exception, context: ServicerContext[Any, Any]) -> Abort:
        caller = caller_var.get()
        if isinstance(exc, errors.QuotaExceeded):
            metrics.QUOTA_REFUSALS.labels(metrics.quota_name(exc.subject)).inc()
            if caller and self._access is not None:
                address = logs.client_address_var.get()
                actor = Actor(caller.key_id, logs.user_id_var.get(), "", address)
                self._access.count(caller.tenant_id, "quota.refused", exc.subject, actor)
        elif isinstance(exc, errors.Unauthenticated):
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
        return _abort_for(exc, context)


def _completed(
    started: float,
    context: ServicerContext[Any, Any],
    request_log: bool,
    abort: Abort | None = None,
) -> None:
    """The call's metrics and its one request log line (never a key: none is logged)."""
    seconds = time.perf_counter() - started
    method = logs.method_var.get()
    code = grpc.StatusCode.OK if abort is None else abort.code
    metrics.RPC_SECONDS.labels(method, code.name).observe(seconds)
    if not request_log:
        return
    path = metadata_value(context, "x-envoy-original-path")
    status = 200
    if abort is not None and path is not None:
        status = int(dict(abort.trailing_metadata).get("x-http-status", 500))
    address = logs.client_address_var.get() or context.peer() or ""
    http_request = {
        # A transcoded REST call's method and path; a native call is an HTTP/2 POST.
        "requestMethod": metadata_value(context, "x-envoy-original-method") or "POST",
        "requestUrl": logs.redact(path if path is not None else method, 2048),
        "status": status,
        "latency": f"{seconds:.6f}s",
        "remoteIp": address,
    }
    severity = (
        logging.INFO
        if code == grpc.StatusCode.OK
        else logging.ERROR
        if code in _SERVER_FAULTS
        else logging.WARNING
    )
    REQUESTS.log(
        severity,
        "%s %s %s %.1f ms",
        http_request["requestMethod"],
        http_request["requestUrl"],
        status if path is not None else code.name,
        seconds * 1000,
        extra={
            "fields": {
                "httpRequest": http_request,
                "grpc_code": code.name,
                "duration_ms": round(seconds * 1000, 3),
            }
        },
    )


def _abort_for(exc: Exception, context: ServicerContext[Any, Any]) -> Abort:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, errors.ConvergenceError):
        if isinstance(exc, errors.Unavailable):
            log.warning("unavailable: %s", exc.message)
        return to_abort(exc, _request_id(), is_transcoded(context))
    request_id = _request_id()
    log.error("unexpected error (request_id=%s)", request_id, exc_info=exc)
    return to_abort(None, request_id, is_transcoded(context))


def _request_id() -> str:
    request_id = logs.request_id_var.get()
    if not request_id:
        request_id = f"req_{secrets.token_hex(16)}"
        logs.request_id_var.set(request_id)
    return request_id


class RequestContextInterceptor(_WrappingInterceptor):
    """Request id, method and X-User-ID for the call's logs and servicers.

    REST clients get the request id from Envoy (`x-request-id` response header); gRPC
    clients get it in the trailing metadata of a successful call (failed calls carry it in
    their ErrorInfo). Trailers cost nothing extra, unlike a separate initial-metadata frame.
    """

    async def before(self, context: ServicerContext[Any, Any]) -> None:
        logs.trace_var.set(
            logs.parse_trace(
                metadata_value(context, "traceparent"),
                metadata_value(context, "x-cloud-trace-context"),
            )
        )
        incoming = metadata_value(context, "x-request-id")
        # An id that may carry a key is not taken: it would be logged and echoed.
        if incoming and _REQUEST_ID.fullmatch(incoming) and logs.redact(incoming) == incoming:
            logs.request_id_var.set(incoming)
        user_id = metadata_value(context, "x-user-id")
        if user_id is not None:
            if not _USER_ID.fullmatch(user_id):
                raise errors.InvalidArgument(
                    "Invalid X-User-ID header",
                    [errors.FieldViolation("X-User-ID", f"must match {_USER_ID.pattern}")],
                )
            logs.user_id_var.set(user_id)

    def _tag(self, context: ServicerContext[Any, Any]) -> None:
        if not is_transcoded(context):
            earlier = tuple(context.trailing_metadata() or ())
            context.set_trailing_metadata((*earlier, ("x-request-id", _request_id())))

    async def around(self, call: Call, context: ServicerContext[Any, Any]) -> Any:
        await self.before(context)
        result = await call()
        self._tag(context)
        return result

    async def around_stream(
        self, call: StreamCall, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await self.before(context)
        async for item in call():
            yield item
        self._tag(context)


class AuthInterceptor(_WrappingInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        clients: ClientLimits,
        trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"}),
        scheduler_token: str = "",
        access: AccessLog | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._clients = clients
        self._trusted_proxies = trusted_proxies
        self._scheduler_token = scheduler_token.encode()
        self._access = access

    async def before(self, context: ServicerContext[Any, Any]) -> None:
        method = logs.method_var.get()
        address = client_address(context, self._trusted_proxies)
        logs.client_address_var.set(address)
        if method in OPEN_METHODS:
            self._clients.admit_open(address)
            return
        key = metadata_value(context, "x-api-key")
        if not key and method in OPERATOR_METHODS:
            token = metadata_value(context, OPERATOR_TOKEN_HEADER)
            if token is not None:
                self._operator(token, address)
                return
        if not key:
            if method not in KEY_OPTIONAL_METHODS:
                raise errors.Unauthenticated(INVALID_KEY_MESSAGE)
            return
        parsed = parse_key(key)
        key_id = parsed[1] if parsed else None
        self._clients.check_failures(address, key_id)
        try:
            caller = await self._authenticator.authenticate(key)
        except errors.Unauthenticated as exc:
            self._clients.failed(address, key_id)
            if isinstance(exc, KeyRejected) and self._access is not None:
                actor = Actor(exc.key_id, logs.user_id_var.get(), "", address)
                self._access.count(exc.tenant_id, exc.event, exc.key_id, actor)
            raise
        caller_var.set(caller)
        logs.tenant_id_var.set(caller.tenant_id)
        if caller.scope == "READ_ONLY" and method not in READ_ONLY_METHODS:
            raise KeyReadOnly(
                f"API key {caller.key_id} is read-only: it cannot call "
                f"{method.rsplit('/', 1)[-1]}; use a key with scope FULL"
            )

    def _operator(self, token: str, address: str) -> None:
        """The operator's token, compared in constant time; refused like a bad key."""
        self._clients.check_failures(address, None)
        given = token.encode("utf-8", "replace")
        if not self._scheduler_token or not hmac.compare_digest(given, self._scheduler_token):
            self._clients.failed(address, None)
            raise errors.Unauthenticated(
                "Invalid scheduler token"
                if self._scheduler_token
                else "No scheduler token is configured (CONVERGENCE_SCHEDULER_TOKEN); "
                "use a tenant's API key"
            )
        operator_var.set(True)


class QuotaInterceptor(_WrappingInterceptor):
    """Applies the caller's plan to authenticated calls: the request rate (a token bucket
    per API key), the team size (a new X-User-ID beyond it is refused), the calls in
    progress and the open streams (per tenant). A stream also ends, with UNAVAILABLE,
    after `stream_max_seconds`: the client watches again.

    Successful calls report the bucket in `x-ratelimit-limit` / `x-ratelimit-remaining`:
    response headers over REST, trailing metadata over gRPC.
    """

    def __init__(
        self,
        plans: PlanBook,
        limiter: RateLimiter,
        accounts: Accounts,
        load: TenantLoad | None = None,
        stream_max_seconds: float = 3600.0,
        clock: Clock = system_clock,
    ) -> None:
        self._plans = plans
        self._limiter = limiter
        self._accounts = accounts
        self._load = load or TenantLoad()
        self._stream_max_seconds = stream_max_seconds
        self._clock = clock

    async def _admit(
        self, kind: str
    ) -> tuple[str | None, Seat | None, tuple[tuple[str, str], ...]]:
        """Applies the caller's plan and takes its tenant a place of `kind` (calls in
        progress or open streams): the tenant id, to `leave` after, the team seat of a
        user not known yet, to `_settle` after, and the rate headers."""
        caller = caller_var.get()
        if caller is None:
            return None, None, ()
        plan = await self._plans.plan_of(caller.tenant_id)
        allowed, left, wait = self._limiter.take(caller.key_id, plan.requests_per_minute)
        if not allowed:
            raise errors.QuotaExceeded(
                f"Request rate exceeded: plan {plan.name} allows "
                f"{plan.requests_per_minute} requests per minute per API key",
                f"api_key:{caller.key_id}:requests_per_minute",
                wait,
            )
        user_id = logs.user_id_var.get()
        seat = None
        if user_id and logs.method_var.get() not in ACCOUNT_METHODS:
            seat = await self._accounts.admit_user(caller, user_id)
        try:
            self._load.enter(caller.tenant_id, kind, getattr(plan, kind), plan.name)
        except Exception:
            await self._settle(seat, refused=True)
            raise
        headers: tuple[tuple[str, str], ...] = (
            ("x-ratelimit-limit", str(plan.requests_per_minute)),
            ("x-ratelimit-remaining", str(left)),
        )
        expires = caller.expires_at
        if expires is not None and expires - self._clock() <= EXPIRY_WARNING:
            when = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
            headers += (
                (
                    "warning",
                    f'299 convergence "API key {caller.key_id} expires at {when}: '
                    'create a new key and revoke this one"',
                ),
            )
        return caller.tenant_id, seat, headers

    async def _settle(self, seat: Seat | None, refused: bool) -> None:
        """A refused call gives its seat back; any other outcome (a cancelled call may
        have done its work) keeps it."""
        if seat is not None:
            await (self._accounts.give_back if refused else self._accounts.keep)(seat)

    async def around(self, call: Call, context: ServicerContext[Any, Any]) -> Any:
        tenant_id, seat, headers = await self._admit("requests_in_flight")
        refused = False
        try:
            await faults.held(faults.HOLD_CALLS)
            result = await call()
        except Exception:
            refused = True
            raise
        finally:
            if tenant_id is not None:
                self._load.leave(tenant_id, "requests_in_flight")
            await self._settle(seat, refused)
        if headers:
            if is_transcoded(context):
                await context.send_initial_metadata(headers)
            else:
                context.set_trailing_metadata((*tuple(context.trailing_metadata() or ()), *headers))
        return result

    async def around_stream(
        self, call: StreamCall, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        """A stream keeps its seat once it has sent something (or ended without error)."""
        tenant_id, seat, _ = await self._admit("open_streams")
        deadline = asyncio.get_running_loop().time() + self._stream_max_seconds
        items = call().__aiter__()
        refused = False
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await anext(items)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise errors.Unavailable(
                        f"The stream reached its longest life ({self._stream_max_seconds:.0f} s);"
                        " open it again to go on"
                    ) from None
                except Exception:
                    refused = True
                    raise
                await self._settle(seat, refused=False)
                seat = None
                yield item
        finally:
            if tenant_id is not None:
                self._load.leave(tenant_id, "open_streams")
            await self._settle(seat, refused)
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()


class FieldBehaviorInterceptor(_WrappingInterceptor):
    """Innermost: the request's REQUIRED and OUTPUT_ONLY fields (see `api.fields`)."""

    def accept(self, method: str, request: Any) -> Any:
        request = _decoded(request)
        fields.enforce(method, request)
        return request
