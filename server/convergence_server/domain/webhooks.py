"""Failure alerts: a webhook per tenant, called when one of its runs fails or a schedule
skips slots.

The setting (`PUT/GET/DELETE /api/v1/tenants/{tenant_id}/webhook`) is a URL and a signing
secret. The secret is not stored: it is derived from the server's key pepper and a random
id kept with the setting, so the store alone cannot forge a delivery. It is returned when
the webhook is set (the same secret each time, a new one on `rotate_secret`).

Each event is POSTed as JSON with the headers

    Convergence-Event: run.failed
    Convergence-Delivery: <event id, the same on every attempt>
    Convergence-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

and retried after each of `retry_seconds` until the receiver answers 2xx (redirects are
not followed). The last failure is written to the tenant's audit log (`webhook.failed`).
Deliveries are kept in memory: a crash loses alerts not yet delivered (the run's FAILED
state is stored; ListRuns stays the source of truth). Only public addresses are called
unless private ones are allowed (a local setup), checked when the webhook is set and
again before each attempt, which then connects to an address it checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3
import urllib3.connection

from convergence_server import metrics
from convergence_server.clock import Clock
from convergence_server.domain.access import AccessLog, Actor, actor_of
from convergence_server.domain.auth import Caller, authorize_tenant
from convergence_server.errors import FieldViolation, InvalidArgument, NotFound, echo
from convergence_server.storage import Store
from convergence_server.storage.records import RunRecord, WebhookRecord

log = logging.getLogger(__name__)

RUN_FAILED, SLOTS_SKIPPED, TEST = "run.failed", "schedule.slots_skipped", "webhook.test"
ATTEMPT_SECONDS = 10.0  # one attempt: connection and answer
MAX_URL = 2048
# Events waiting or in delivery: per tenant, and for all tenants together; beyond, an
# event is dropped (logged, counted in the metrics).
MAX_PENDING_PER_TENANT, MAX_PENDING = 100, 10_000
SENDERS = 4  # attempts in flight at once


@dataclass(frozen=True)
class WebhookSettings:
    # The waits between attempts (one attempt more than waits).
    retry_seconds: tuple[float, ...]
    # Whether a webhook may call loopback, private or link-local addresses, and use http.
    allow_private: bool


@dataclass(frozen=True)
class Delivery:
    """What one attempt got: the receiver's HTTP status (0: none), or what failed."""

    status_code: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    def describe(self) -> str:
        return f"HTTP {self.status_code}" if self.status_code else self.error


@dataclass(frozen=True)
class Event:
    event_id: str
    tenant_id: str
    type: str
    body: bytes


def signing_secret(pepper: bytes, tenant_id: str, secret_id: str) -> str:
    digest = hmac.new(
        pepper, b"webhook\0" + tenant_id.encode() + b"\0" + secret_id.encode(), hashlib.sha256
    ).digest()
    return "whsec_" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Convergence-Signature` header's value, as a receiver recomputes it."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def _refused_address(address: str, allow_private: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return not (allow_private or ip.is_global) or ip.is_multicast or ip.is_unspecified


def _url_issue(url: str, allow_private: bool) -> str:
    """Why `url` cannot be a webhook ("" when it can); no name resolution."""
    if len(url) > MAX_URL:
        return f"must be at most {MAX_URL} characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        return "must be an https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (put a token in the path or query instead)"
    if parts.fragment:
        return "must not have a fragment"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "must not contain spaces or control characters"
    with contextlib.suppress(ValueError):
        if _refused_address(parts.hostname, allow_private):
            return "must not point to a private, loopback or link-local address"
    return ""


class Attempt:
    """One delivery attempt's connection, which another thread can end (`stop`): each read
    has its own timeout, so a receiver that trickles its answer a byte at a time would
    otherwise keep a sender thread, and with it a place of every tenant's deliveries, for
    as long as it likes. (A TLS handshake needs no watching: Python bounds the whole of it
    by the socket's timeout, the connect timeout here.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._stopped = False

    def stopped(self) -> bool:
        return self._stopped

    def watch(self, connection: socket.socket) -> None:
        with self._lock:
            self._socket = connection
            if self._stopped:
                self._end()

    def stop(self) -> None:
        """Ends the connection: the sender thread's read or write in progress fails now."""
        with self._lock:
            self._stopped = True
            self._end()

    def _end(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):  # closed already
                self._socket.shutdown(socket.SHUT_RDWR)


class _Watched:
    """Connections whose socket, once connected, their attempt can end."""

    def __init__(self, *args: Any, attempt: Attempt, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attempt = attempt

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._attempt.watch(self.sock)  # type: ignore[attr-defined]


class _WatchedHTTP(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, urllib3.connection.HTTPSConnection):
    pass


def post_event(
    url: str,
    headers: dict[str, str],
    body: bytes,
    allow_private: bool,
    attempt: Attempt | None = None,
) -> Delivery:
    """One delivery attempt: the name resolved once, each address checked, the event POSTed
    to a checked address (redirects not followed, the answer's body not read). `attempt`
    can end it from another thread."""
    attempt = attempt or Attempt()
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = list(
            dict.fromkeys(
                str(info[4][0])
                for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
            )
        )
    except (OSError, ValueError) as exc:
        return Delivery(error=f"cannot resolve the host: {exc}")
    if any(_refused_address(a, allow_private) for a in addresses):
        return Delivery(error="the host resolves to a private, loopback or link-local address")
    # The connection goes to an address just checked, never to the name resolved again
    # (a second answer could be another address: DNS rebinding); TLS checks the name.
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {**headers, "Host": parts.netloc}
    for address in addresses:  # in the resolver's order, as a client would try them
        if attempt.stopped():
            break
        pool = _pinned_pool(parts.scheme, address, port, str(parts.hostname), attempt)
        try:
            answer = pool.urlopen(
                "POST",
                path,
                body=body,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,  # the receiver's body is not read
            )
            answer.release_conn()
            if attempt.stopped():  # ended from outside: what was read may be cut short
                return Delivery(error="stopped")
            return Delivery(status_code=answer.status)
        except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError):
            continue  # this address cannot be reached: the next one
        except urllib3.exceptions.HTTPError as exc:
            return Delivery(error=type(exc).__name__)
        finally:
            pool.close()
    return Delivery(error="ConnectionError")  # no address could be reached


def _pinned_pool(
    scheme: str, address: str, port: int, hostname: str, attempt: Attempt
) -> urllib3.HTTPConnectionPool:
    """A connection pool to `address` that speaks to it as `hostname` (TLS server name and
    certificate check), without proxies or anything else from the environment."""
    timeout = urllib3.Timeout(connect=ATTEMPT_SECONDS / 2, read=ATTEMPT_SECONDS)
    pool: urllib3.HTTPConnectionPool
    if scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            address,
            port,
            timeout=timeout,
            server_hostname=hostname,
            assert_hostname=hostname,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            attempt=attempt,
        )
        pool.ConnectionCls = _WatchedHTTPS
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, attempt=attempt)
        pool.ConnectionCls = _WatchedHTTP
    return pool


def _host(url: str) -> str:
    """The URL's scheme and host: what logs and the audit log show of it (its path and
    query may carry the receiver's own token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}"


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Notifier:
    """Delivers the events of tenants that have a webhook, with retries."""

    def __init__(
        self,
        store: Store,
        pepper: bytes,
        access: AccessLog,
        clock: Clock,
        settings: WebhookSettings,
    ) -> None:
        self._store = store
        self._pepper = pepper
        self._access = access
        self._clock = clock
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: Counter[str] = Counter()
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self._sending = asyncio.Semaphore(SENDERS)
        self._stopping = False

    # -- events ----------------------------------------------------------------------------

    def run_failed(self, run: RunRecord) -> None:
        data = {
            "pipeline_logging_id": run.pipeline_logging_id,
            "pipeline_id": run.pipeline_id,
            "status": "FAILED",
            "trigger_type": run.trigger_type,
            "trigger_by": run.trigger_by,
            "user_id": run.user_id,
            "parameters": run.parameters,
            "error_message": run.error_message,
            "attempt": run.attempt,
            "created_at": _iso(run.created_at),
            "start_time": _iso(run.start_time),
            "end_time": _iso(run.end_time),
            "trace_id": run.trace_id,
        }
        self._enqueue(run.tenant_id, RUN_FAILED, {"run": data})

    def slots_skipped(
        self, tenant_id: str, schedule_id: str, last_slot: datetime, count: int, reason: str
    ) -> None:
        data = {
            "schedule_id": schedule_id,
            "last_slot": _iso(last_slot),
            "skipped_slots": count,
            "reason": reason,
        }
        self._enqueue(tenant_id, SLOTS_SKIPPED, {"schedule": data})

    def event(self, tenant_id: str, event_type: str, data: dict[str, Any]) -> Event:
        event_id = f"evt_{uuid.uuid4().hex}"
        document = {
            "id": event_id,
            "type": event_type,
            "created_at": _iso(self._clock()),
            "tenant_id": tenant_id,
            "data": data,
        }
        body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        return Event(event_id, tenant_id, event_type, body)

    def _enqueue(self, tenant_id: str, event_type: str, data: dict[str, Any]) -> None:
        if self._stopping:
            return
        if (
            self._pending[tenant_id] >= MAX_PENDING_PER_TENANT
            or sum(self._pending.values()) >= MAX_PENDING
        ):
            log.warning(
                "webhook event %s of tenant %s dropped: too many pending", event_type, tenant_id
            )
            metrics.WEBHOOK_EVENTS.labels(event_type, "dropped").inc()
            return
        event = self.event(tenant_id, event_type, data)
        self._pending[tenant_id] += 1
        task = asyncio.create_task(self._deliver(event), name=f"webhook-{event.event_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- delivery --------------------------------------------------------------------------

    async def _deliver(self, event: Event) -> None:
        try:
            webhook = await self._store.get_webhook(event.tenant_id)
            if webhook is None:
                return
            delays = (0.0, *self._settings.retry_seconds)
            result = Delivery()
            for attempt, delay in enumerate(delays, 1):
                await asyncio.sleep(delay)
                result = await self.attempt(webhook, event)
                if result.ok:
                    metrics.WEBHOOK_EVENTS.labels(event.type, "delivered").inc()
                    return
                log.warning(
                    "webhook %s of tenant %s: attempt %d of %d failed: %s",
                    _host(webhook.url),
                    event.tenant_id,
                    attempt,
                    len(delays),
                    result.describe(),
                )
            metrics.WEBHOOK_EVENTS.labels(event.type, "failed").inc()
            await self._access.record(
                event.tenant_id,
                "webhook.failed",
                Actor(),
                target=event.event_id,
                detail=f"{event.type} to {_host(webhook.url)}: {len(delays)} attempts, "
                f"the last: {result.describe()}",
            )
        except asyncio.CancelledError:
            metrics.WEBHOOK_EVENTS.labels(event.type, "abandoned").inc()
            raise
        except Exception:
            log.exception("webhook event %s of tenant %s lost", event.type, event.tenant_id)
            metrics.WEBHOOK_EVENTS.labels(event.type, "failed").inc()
        finally:
            self._pending[event.tenant_id] -= 1
            if self._pending[event.tenant_id] <= 0:
                del self._pending[event.tenant_id]

    async def attempt(self, webhook: WebhookRecord, event: Event) -> Delivery:
        """One POST of `event` to `webhook`, signed now."""
        secret = signing_secret(self._pepper, webhook.tenant_id, webhook.secret_id)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Convergence-Webhooks/1",
            "Convergence-Event": event.type,
            "Convergence-Delivery": event.event_id,
            "Convergence-Signature": signature(secret, int(time.time()), event.body),
        }
        loop = asyncio.get_running_loop()
        attempt = Attempt()
        async with self._sending:
            try:
                async with asyncio.timeout(ATTEMPT_SECONDS * 2):
                    return await loop.run_in_executor(
                        self._senders,
                        post_event,
                        webhook.url,
                        headers,
                        event.body,
                        self._settings.allow_private,
                        attempt,
                    )
            except TimeoutError:
                return Delivery(error=f"no answer within {ATTEMPT_SECONDS * 2:.0f} s")
            finally:  # the sender thread lets its place go now (at most a connect later)
                attempt.stop()

    async def stop(self, seconds: float) -> None:
        """Stops delivering: attempts in progress get `seconds`, pending events are
        dropped (and logged)."""
        self._stopping = True
        tasks = list(self._tasks)
        if tasks:
            log.warning("stopping with %d webhook event(s) not yet delivered", len(tasks))
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=max(0.1, seconds))
        self._senders.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class WebhookSet:
    webhook: WebhookRecord
    signing_secret: str


class Webhooks:
    """A tenant's webhook setting, managed with one of its full keys."""

    def __init__(
        self,
        store: Store,
        pepper: bytes,
        access: AccessLog,
        notifier: Notifier,
        clock: Clock,
        settings: WebhookSettings,
    ) -> None:
        self._store = store
        self._pepper = pepper
        self._access = access
        self._notifier = notifier
        self._clock = clock
        self._settings = settings

    async def get(self, caller: Caller, tenant_id: str) -> WebhookRecord:
        authorize_tenant(caller, tenant_id)
        webhook = await self._store.get_webhook(tenant_id)
        if webhook is None:
            raise NotFound(f"Tenant {echo(tenant_id)} has no webhook")
        return webhook

    async def set(
        self, caller: Caller, tenant_id: str, url: str, rotate_secret: bool
    ) -> WebhookSet:
        authorize_tenant(caller, tenant_id)
        url = url.strip()
        issue = _url_issue(url, self._settings.allow_private)
        if issue:
            raise InvalidArgument(
                f"Invalid webhook URL: it {issue}", [FieldViolation("url", issue)]
            )
        current = await self._store.get_webhook(tenant_id)
        rotated = current is None or rotate_secret
        actor = actor_of(caller)
        webhook = WebhookRecord(
            tenant_id=tenant_id,
            url=url,
            secret_id=current.secret_id if current and not rotated else secrets.token_hex(16),
            updated_at=self._clock(),
            updated_by=actor.label,
        )
        detail = f"calls {_host(url)}" + ("; a new signing secret" if rotated else "")
        audit = self._access.row(tenant_id, "webhook.set", actor, _host(url), detail)
        await self._store.save_webhook(webhook, audit)
        secret = signing_secret(self._pepper, tenant_id, webhook.secret_id)
        return WebhookSet(webhook, secret)

    async def delete(self, caller: Caller, tenant_id: str) -> None:
        current = await self.get(caller, tenant_id)
        actor = actor_of(caller)
        gone = WebhookRecord(
            tenant_id=tenant_id,
            url="",
            secret_id=current.secret_id,
            updated_at=self._clock(),
            updated_by=actor.label,
            deleted=True,
        )
        audit = self._access.row(tenant_id, "webhook.deleted", actor, _host(current.url))
        await self._store.save_webhook(gone, audit)

    async def test(self, caller: Caller, tenant_id: str) -> tuple[str, Delivery]:
        """Sends one `webhook.test` event now (no retry); its id and what the receiver said."""
        webhook = await self.get(caller, tenant_id)
        event = self._notifier.event(tenant_id, TEST, {"message": "A test event"})
        return event.event_id, await self._notifier.attempt(webhook, event)
