"""Failure alerts: a tenant's webhook is called, signed, when one of its runs fails or a
schedule skips slots, with retries; a delivery that never succeeds is in the audit log.
The receiver is a loopback HTTP server of this test process."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from convergence import Client, InvalidArgument, NotFound
from convergence.webhooks import InvalidSignature, verify_event
from convergence_server.domain import webhooks
from convergence_server.domain.webhooks import Attempt, Delivery, post_event
from convergence_server.stack import Stack
from convergence_server.storage.records import WebhookRecord
from tests.conftest import (
    UNMETERED,
    StackFactory,
    dump_store,
    eventually,
    onboard,
    trigger,
    wait_for_run,
)
from tests.test_metrics import scrape, value

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
BASE = datetime(2026, 6, 1, 10, 0, 5, tzinfo=UTC)
QUICK = {"provider": "test", "domain": "runs", "template": "quick"}


class Receiver:
    """Records every POST; answers with the next of `answers` (then 200)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.answers: list[int] = []
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.received.append((dict(self.headers.items()), body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wrap(self, context: ssl.SSLContext) -> None:
        """Serves HTTPS from now on (connections are accepted on the serving thread: a
        handshake that fails there ends only that connection)."""
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)

    def expect(self, *answers: int) -> None:
        with self._lock:
            self.answers = list(answers)
            self.received = []

    def wait_for(self, count: int, timeout: float = 120) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                received = list(self.received)
            if len(received) >= count or time.monotonic() > deadline:
                return received
            time.sleep(0.05)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def clock_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clock") / "clock"
    path.write_text(BASE.isoformat())
    return path


@pytest.fixture(scope="module")
def hooks(stack_factory: StackFactory, pipeline_env: dict[str, str], clock_file: Path) -> Stack:
    """A stack whose webhooks may call this machine (the receiver), retrying quickly."""
    return stack_factory(
        **pipeline_env,
        CONVERGENCE_WEBHOOK_ALLOW_PRIVATE="1",
        CONVERGENCE_WEBHOOK_RETRY_SECONDS="0.1,0.2",
        CONVERGENCE_METRICS_PORT="0",
        CONVERGENCE_CLOCK_OFFSET_FILE=str(clock_file),
    )


def set_webhook(http: httpx.Client, key: str, tenant_id: str, **body: object) -> httpx.Response:
    return http.put(f"/api/v1/tenants/{tenant_id}/webhook", headers={"X-API-Key": key}, json=body)


def events(http: httpx.Client, key: str, tenant_id: str, kind: str) -> list[dict[str, object]]:
    response = http.get(
        f"/api/v1/tenants/{tenant_id}/audit-log",
        headers={"X-API-Key": key},
        params={"event": kind},
    )
    assert response.status_code == 200, response.text
    rows: list[dict[str, object]] = response.json()["events"]
    return rows


def failing_run(
    http: httpx.Client, key: str, tenant_id: str, sources_dir: Path, **headers: str
) -> dict[str, object]:
    """Triggers an AWS cost run on an export that is not one: it fails its checks."""
    folder = sources_dir / tenant_id
    folder.mkdir(exist_ok=True)
    (folder / "not_a_cur.csv").write_text("a,b\n1,2\n")
    response = http.post(
        f"/api/v1/pipelines/run/{tenant_id}/aws/cost/cost_usage",
        headers={"X-API-Key": key, **headers},
        json={"date": "2023-11-04", "parameters": {"source_uri": str(folder / "not_a_cur.csv")}},
    )
    assert response.status_code == 200, response.text
    run = wait_for_run(http, key, response.json()["pipeline_logging_id"])
    assert run["status"] == "FAILED", run
    return run


def test_set_get_rotate_test_and_delete(hooks: Stack, receiver: Receiver) -> None:
    with httpx.Client(base_url=hooks.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        url = f"{receiver.url}/hook?token=receiver-own-token"
        created = set_webhook(http, key, tenant_id, url=url)
        assert created.status_code == 200, created.text
        secret = created.json()["signing_secret"]
        assert secret.startswith("whsec_") and created.json()["webhook"]["url"] == url
        shown = http.get(f"/api/v1/tenants/{tenant_id}/webhook", headers={"X-API-Key": key})
        assert shown.status_code == 200 and shown.json()["url"] == url
        assert secret not in shown.text and shown.json()["updated_by"].startswith("key:")
        # Set again: the same secret; rotated: another one, and the old one no longer signs.
        assert set_webhook(http, key, tenant_id, url=url).json()["signing_secret"] == secret
        rotated = set_webhook(http, key, tenant_id, url=url, rotate_secret=True).json()
        new_secret = rotated["signing_secret"]
        assert new_secret != secret
        receiver.expect(200)
        tested = http.post(
            f"/api/v1/tenants/{tenant_id}/webhook:test", headers={"X-API-Key": key}, json={}
        )
        assert tested.status_code == 200, tested.text
        assert tested.json()["delivered"] is True and tested.json()["status_code"] == 200
        [(headers, body)] = receiver.wait_for(1)
        assert headers["Convergence-Event"] == "webhook.test"
        assert headers["Convergence-Delivery"] == tested.json()["event_id"]
        event = verify_event(new_secret, body, headers["Convergence-Signature"])
        assert (event["type"], event["tenant_id"]) == ("webhook.test", tenant_id)
        with pytest.raises(InvalidSignature):
            verify_event(secret, body, headers["Convergence-Signature"])
        with pytest.raises(InvalidSignature):
            verify_event(new_secret, body + b" ", headers["Convergence-Signature"])
        # A receiver that refuses: reported, not an error of the call.
        receiver.expect(410)
        refused = http.post(
            f"/api/v1/tenants/{tenant_id}/webhook:test", headers={"X-API-Key": key}, json={}
        ).json()
        assert (refused["delivered"], refused["status_code"]) == (False, 410)
        deleted = http.delete(f"/api/v1/tenants/{tenant_id}/webhook", headers={"X-API-Key": key})
        assert deleted.status_code == 200, deleted.text
        gone = http.get(f"/api/v1/tenants/{tenant_id}/webhook", headers={"X-API-Key": key})
        assert gone.status_code == 404
        assert gone.json()["message"] == f"Tenant {tenant_id} has no webhook"
        # The audit log names the receiver's host, never its path or query.
        audit = events(http, key, tenant_id, "webhook.set") + events(
            http, key, tenant_id, "webhook.deleted"
        )
        assert len(audit) == 4
        assert {row["target"] for row in audit} == {"http://127.0.0.1"}
        assert "receiver-own-token" not in json.dumps(audit)
        assert sum("new signing secret" in str(row["detail"]) for row in audit) == 2


def test_a_failed_run_is_posted_signed_and_retried(
    hooks: Stack, receiver: Receiver, sources_dir: Path
) -> None:
    with httpx.Client(base_url=hooks.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        secret = set_webhook(http, key, tenant_id, url=f"{receiver.url}/alerts").json()[
            "signing_secret"
        ]
        before = scrape(hooks)
        receiver.expect(500, 503, 200)  # delivered at the third attempt
        run = failing_run(
            http, key, tenant_id, sources_dir, traceparent=f"00-{TRACE}-00f067aa0ba902b7-01"
        )
        attempts = receiver.wait_for(3)
        assert len(attempts) == 3
        assert len({h["Convergence-Delivery"] for h, _ in attempts}) == 1  # one event
        headers, body = attempts[-1]
        event = verify_event(secret, body, headers["Convergence-Signature"])
        assert event["type"] == headers["Convergence-Event"] == "run.failed"
        assert event["id"] == headers["Convergence-Delivery"]
        data = event["data"]["run"]
        assert data["pipeline_logging_id"] == run["pipeline_logging_id"]
        assert data["status"] == "FAILED" and data["error_message"] == run["error_message"]
        # The trigger's trace: on the run, in its alert, on its log lines.
        assert run["trace_id"] == data["trace_id"] == TRACE
        assert receiver.wait_for(4, timeout=1) == attempts  # delivered: no fourth attempt
        delivered = {"event": "run.failed", "outcome": "delivered"}
        counted = value(before, "convergence_webhook_events_total", **delivered)
        eventually(
            lambda: value(scrape(hooks), "convergence_webhook_events_total", **delivered) > counted,
            "the delivery's count",
        )
    log = hooks.run_dir.parent / "logs" / "server.log"
    run_lines = [
        json.loads(line)
        for line in log.read_text().splitlines()
        if run["pipeline_logging_id"] in line and '"convergence_server.domain.executor"' in line
    ]
    assert run_lines and all(
        line["logging.googleapis.com/trace"] == f"projects/your-project/traces/{TRACE}"
        for line in run_lines
    )


def test_two_cancels_of_one_pending_run_count_and_post_its_end_once(
    stack_factory: StackFactory, pipeline_env: dict[str, str], receiver: Receiver
) -> None:
    """Both cancels read the run PENDING before either changes it (held between the two):
    one ends it, the other finds it ended. The end is counted and posted once."""
    stack = stack_factory(
        **pipeline_env,
        CONVERGENCE_WORKERS="0",  # the run stays PENDING
        CONVERGENCE_WEBHOOK_ALLOW_PRIVATE="1",
        CONVERGENCE_METRICS_PORT="0",
        CONVERGENCE_FAULT_POINTS="before_cancel",
    )
    hold = stack.run_dir.parent / "hold" / "before_cancel"
    log = stack.run_dir.parent / "logs" / "server.log"
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        assert set_webhook(http, key, tenant_id, url=f"{receiver.url}/alerts").status_code == 200
        run_id = trigger(http, key, tenant_id, "test/runs/quick")["pipeline_logging_id"]
        before = scrape(stack)
        receiver.expect()
        hold.parent.mkdir(exist_ok=True)
        hold.touch()

        def cancel() -> httpx.Response:
            with httpx.Client(base_url=stack.http_url, timeout=120) as own:
                return own.post(
                    f"/api/v1/pipelines/runs/{run_id}:cancel", headers={"X-API-Key": key}
                )

        with ThreadPoolExecutor(2) as pool:
            cancels = [pool.submit(cancel) for _ in range(2)]
            deadline = time.monotonic() + 120
            while log.read_text().count("fault point before_cancel: holding") < 2:
                assert time.monotonic() < deadline, "the cancels did not both reach the hold"
                time.sleep(0.05)
            hold.unlink()
            answers = [future.result() for future in cancels]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert [a.json()["run"]["status"] for a in answers] == ["FAILED", "FAILED"]
    ended = {"template": "test/runs/quick", "status": "FAILED"}
    counted = value(scrape(stack), "convergence_runs_ended_total", **ended)
    assert counted - value(before, "convergence_runs_ended_total", **ended) == 1
    [(headers, body)] = receiver.wait_for(1)
    assert json.loads(body)["data"]["run"]["pipeline_logging_id"] == run_id
    assert receiver.wait_for(2, timeout=2) == [(headers, body)]  # no second alert


def test_a_delivery_that_keeps_failing_is_audited(
    hooks: Stack, receiver: Receiver, sources_dir: Path
) -> None:
    with httpx.Client(base_url=hooks.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        set_webhook(http, key, tenant_id, url=f"{receiver.url}/down")
        receiver.expect(500, 500, 500, 500)
        run = failing_run(http, key, tenant_id, sources_dir)
        assert run["trace_id"] == ""
        assert len(receiver.wait_for(3)) == 3
        [row] = eventually(lambda: events(http, key, tenant_id, "webhook.failed"), "webhook.failed")
        assert row["detail"] == "run.failed to http://127.0.0.1: 3 attempts, the last: HTTP 500"
        assert str(row["target"]).startswith("evt_")
        assert len(receiver.wait_for(4, timeout=1)) == 3  # no attempt beyond the retries


def test_skipped_slots_are_posted(hooks: Stack, receiver: Receiver, clock_file: Path) -> None:
    with httpx.Client(base_url=hooks.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        auth = {"X-API-Key": key}
        secret = set_webhook(http, key, tenant_id, url=f"{receiver.url}/slots").json()[
            "signing_secret"
        ]
        clock_file.write_text(BASE.isoformat())
        schedule = http.post(
            "/api/v1/schedules",
            headers=auth,
            json={**QUICK, "cron": "0 * * * *", "catch_up": "none"},
        ).json()
        receiver.expect()
        # 11:00 .. 15:00 missed; 15:00 is 30 minutes late: all five skipped.
        clock_file.write_text((BASE + timedelta(hours=5, minutes=30)).isoformat())
        fired = http.post("/api/v1/scheduler/trigger", headers=auth, json={})
        assert fired.status_code == 200, fired.text
        [(headers, body)] = receiver.wait_for(1)
        event = verify_event(secret, body, headers["Convergence-Signature"])
        assert event["type"] == "schedule.slots_skipped"
        assert event["data"]["schedule"] == {
            "schedule_id": schedule["schedule_id"],
            "last_slot": "2026-06-01T15:00:00.000Z",
            "skipped_slots": 5,
            "reason": event["data"]["schedule"]["reason"],
        }
        assert "10 minutes" in event["data"]["schedule"]["reason"]


def test_grpc_client_and_no_secret_in_the_store(hooks: Stack, receiver: Receiver) -> None:
    with httpx.Client(base_url=hooks.http_url, timeout=60) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
    with Client(hooks.grpc_target, api_key=key) as client:
        with pytest.raises(NotFound):
            client.get_webhook(tenant_id)
        with pytest.raises(InvalidArgument) as refused:
            client.set_webhook(tenant_id, "ftp://127.0.0.1/x")
        assert "https://" in str(refused.value)
        done = client.set_webhook(tenant_id, f"{receiver.url}/grpc")
        assert client.get_webhook(tenant_id).url == f"{receiver.url}/grpc"
        receiver.expect(204)
        assert client.test_webhook(tenant_id).status_code == 204
        secret = done.signing_secret
    hooks.stop()
    stored = json.dumps(dump_store(hooks), default=str)
    assert secret not in stored and secret.removeprefix("whsec_") not in stored
    assert f"{receiver.url}/grpc" in stored


BAD_URLS = {
    "http://hooks.example.com/x": "must be an https:// URL",
    "https://127.0.0.1/x": "must not point to a private, loopback or link-local address",
    "https://[::1]:8443/x": "must not point to a private, loopback or link-local address",
    "https://169.254.169.254/latest": "must not point to a private, loopback or link-local address",
    "https://10.1.2.3/x": "must not point to a private, loopback or link-local address",
    "https://user:pw@hooks.example.com/x": (
        "must not carry credentials (put a token in the path or query instead)"
    ),
    "https://hooks.example.com:99999/x": "is not a valid URL (Port out of range 0-65535)",
    "hooks.example.com/x": "must be an https:// URL",
    "https://hooks.example.com/x y": "must not contain spaces or control characters",
    "https://" + "a" * 2048: "must be at most 2048 characters",
}


def test_bad_webhooks_are_400_and_store_nothing(http: httpx.Client) -> None:
    tenant_id, key = onboard(http)
    auth = {"X-API-Key": key}
    for url, issue in BAD_URLS.items():
        response = set_webhook(http, key, tenant_id, url=url)
        assert response.status_code == 400, (url, response.text)
        assert response.json()["error"] == "Validation error"
        assert response.json()["details"] == {"field": "url", "issue": issue}, url
    missing = set_webhook(http, key, tenant_id)
    assert missing.status_code == 400 and missing.json()["details"]["field"] == "url"
    assert http.get(f"/api/v1/tenants/{tenant_id}/webhook", headers=auth).status_code == 404
    assert events(http, key, tenant_id, "webhook.set") == []
    # A host name is resolved when called: `localhost` is refused then, not stored as sent.
    assert set_webhook(http, key, tenant_id, url="https://localhost:1/x").status_code == 200
    tested = http.post(f"/api/v1/tenants/{tenant_id}/webhook:test", headers=auth, json={})
    assert tested.json()["delivered"] is False
    assert "private, loopback or link-local" in tested.json()["error"]
    # A read-only key and another tenant's key may not change it.
    read_only = http.post(
        f"/api/v1/tenants/{tenant_id}/api-keys",
        headers=auth,
        json={"name": "ro", "scope": "READ_ONLY"},
    ).json()["api_key"]
    public = "https://hooks.example.com/x"
    assert set_webhook(http, read_only, tenant_id, url=public).status_code == 403
    other_id, other_key = onboard(http)
    assert set_webhook(http, other_key, tenant_id, url=public).status_code == 403
    assert (
        http.delete(
            f"/api/v1/tenants/{tenant_id}/webhook", headers={"X-API-Key": other_key}
        ).status_code
        == 403
    )
    shown = http.get(f"/api/v1/tenants/{tenant_id}/webhook", headers=auth).json()
    assert shown["url"] == "https://localhost:1/x"
    del other_id


def resolve_made_up_name(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[str]:
    """Replaces the system resolver for the made-up name `hooks.test` alone: it answers each
    of `answers` in turn (then the last again). Returns the list of the name's lookups."""
    resolve = socket.getaddrinfo
    asked: list[str] = []

    def made_up(host: object, port: object, *args: object, **kwargs: object) -> object:
        if host != "hooks.test":
            return resolve(host, port, *args, **kwargs)  # type: ignore[arg-type]
        asked.append(host)
        address = answers[min(len(asked), len(answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", made_up)
    return asked


def test_an_attempt_posts_to_the_address_it_checked_not_to_a_second_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: the receiver's name answers one address when the attempt checks it and
    another after (as a name could answer a public address, then a private one). The event
    goes to the address checked, and the name is resolved once. Both addresses are loopback
    ones of this machine (private addresses allowed here)."""
    checked = Receiver("127.0.0.1")
    other = Receiver("127.0.0.2", checked.port)
    asked = resolve_made_up_name(monkeypatch, "127.0.0.1", "127.0.0.2")
    try:
        delivery = post_event(
            f"http://hooks.test:{checked.port}/hook?token=t",
            {"Content-Type": "application/json"},
            b"{}",
            allow_private=True,
        )
        assert delivery.status_code == 200, delivery
        assert (len(checked.received), len(other.received), asked) == (1, 0, ["hooks.test"])
        headers, body = checked.received[0]
        assert (headers["Host"], body) == (f"hooks.test:{checked.port}", b"{}")
    finally:
        checked.close()
        other.close()


def test_an_https_receiver_with_an_untrusted_certificate_gets_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The address is pinned but TLS still checks the name's certificate: a self-signed one
    for `hooks.test` is refused before anything is sent."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    request = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=hooks.test"
    names = "-addext subjectAltName=DNS:hooks.test"
    subprocess.run(
        ["openssl", *f"{request} {names} -keyout {key} -out {cert}".split()],
        check=True,
        capture_output=True,
    )
    receiver = Receiver("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    receiver.wrap(context)
    resolve_made_up_name(monkeypatch, "127.0.0.1")
    try:
        delivery = post_event(
            f"https://hooks.test:{receiver.port}/hook", {}, b"{}", allow_private=True
        )
        assert (delivery.status_code, delivery.error) == (0, "SSLError"), delivery
        assert receiver.received == []
    finally:
        receiver.close()


class Trickler:
    """A receiver that answers one byte at a time, each well within a read's timeout, for
    up to `seconds`: left alone, an attempt to it would last that long."""

    def __init__(self, seconds: float = 300) -> None:
        self.trickling = threading.Event()  # its answer has begun
        self.closed = threading.Event()  # the sender ended the connection
        self._seconds = seconds
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(4096)
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                self.trickling.set()
                deadline = time.monotonic() + self._seconds
                while time.monotonic() < deadline:
                    connection.sendall(b"a")
                    time.sleep(0.05)
            except OSError:
                self.closed.set()

    def close(self) -> None:
        self._listener.close()


def test_an_attempt_that_ends_takes_its_connection_with_it() -> None:
    """A receiver can trickle its answer so that no read ever times out; ending the attempt
    (the Notifier does at its bound) ends the connection: the sender thread returns at once
    and its place is free for other deliveries, instead of staying with the receiver."""
    trickler = Trickler()
    attempt = Attempt()
    deliveries: list[Delivery] = []
    sender = threading.Thread(
        target=lambda: deliveries.append(
            post_event(trickler.url, {}, b"{}", allow_private=True, attempt=attempt)
        ),
        daemon=True,
    )
    sender.start()
    try:
        assert trickler.trickling.wait(60)
        attempt.stop()
        sender.join(60)
        assert not sender.is_alive(), "the sender thread is still reading"
        assert deliveries[0].status_code == 0 and deliveries[0].error, deliveries
        assert trickler.closed.wait(60)
    finally:
        attempt.stop()
        trickler.close()


def test_the_notifier_ends_an_attempt_at_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attempt that reaches its bound (twice ATTEMPT_SECONDS, shortened here) is answered
    as unanswered, and its connection ends with it."""
    monkeypatch.setattr(webhooks, "ATTEMPT_SECONDS", 0.5)
    trickler = Trickler()
    notifier = webhooks.Notifier(
        store=None,  # type: ignore[arg-type]  # an attempt reads nothing from the store
        pepper=b"pepper",
        access=None,  # type: ignore[arg-type]
        clock=lambda: datetime.now(UTC),
        settings=webhooks.WebhookSettings(retry_seconds=(), allow_private=True),
    )
    hook = WebhookRecord("c_trickled", trickler.url, "s1", datetime.now(UTC))
    event = webhooks.Event("e1", "c_trickled", webhooks.TEST, b"{}")
    try:
        delivery = asyncio.run(notifier.attempt(hook, event))
        assert (delivery.status_code, delivery.error) == (0, "no answer within 1 s")
        assert trickler.closed.wait(60)
    finally:
        trickler.close()
