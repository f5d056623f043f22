"""Envoy at the edge: its limits hold, and every reply it makes itself has the documented body.

Real processes on 127.0.0.1 only. Most tests use the shared stack (server + Envoy). Some start
an extra Envoy from the same template: in front of the shared server with a short header
timeout and a small connection bound (so that a flood is cheap), in front of a gRPC upstream
that records what it receives (what Envoy tells the server), or in front of nothing at all.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2

from convergence.v1 import (
    health_service_pb2,
    health_service_pb2_grpc,
    run_pb2,
    run_service_pb2,
)
from convergence_server.config import Config
from convergence_server.envoy import (
    MAX_HEADERS_COUNT,
    MAX_REQUEST_HEADERS_KB,
    REQUEST_HEADERS_TIMEOUT_SECONDS,
    render_config,
)
from convergence_server.stack import Stack, envoy_binary, spawn, terminate
from tests.conftest import onboard

DEADLINE = 30.0
HEADER_LIMIT = MAX_REQUEST_HEADERS_KB * 1024
# The flood tests' Envoy: a short header timeout and a small connection bound.
SHORT_HEADER_TIMEOUT = 1.0
FLOOD_BOUND = 200
FLOOD = FLOOD_BOUND + 50
HALF_SENT = b"GET /health HTTP/1.1\r\nHost: edge\r\nX-Slow: still typin"
# The recording upstream's big answer: well over Envoy's 32 KiB per-connection buffers.
BIG_LIST = run_service_pb2.ListRunsResponse(
    runs=[
        run_pb2.Run(pipeline_logging_id=str(uuid.UUID(int=i)), error_message="x" * 300)
        for i in range(300)
    ]
)
REFUSED_DRY_RUN = "received metadata size exceeds soft limit"


# ---------------------------------------------------------------------------------------
# Raw HTTP/1, for requests no HTTP client library sends.


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


def parse(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


def complete(raw: bytes) -> bool:
    head, found, body = raw.partition(b"\r\n\r\n")
    return bool(found) and len(body) >= int(parse(head + found).headers.get("content-length", 0))


def exchange(port: int, request: bytes) -> Reply:
    """Sends `request` as is and reads the reply (Envoy closes the connection after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # Envoy may answer and close before reading it all
        raw = b""
        with contextlib.suppress(ConnectionResetError):  # the reply came first
            while not complete(raw) and (chunk := sock.recv(65536)):
                raw += chunk
    return parse(raw)


def get(path: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"GET {path} {version}", *headers, "", ""]
    return "\r\n".join(lines).encode()


def assert_documented(reply: Reply, status: int, error: str) -> dict[str, Any]:
    """The documented body, with a request id (the x-request-id, when Envoy made one); a
    400's names the field at fault (`request` when Envoy cannot tell which)."""
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    details = {"details"} if status == 400 else set()
    assert body.keys() == {"error", "message", "request_id", *details}, body
    if details:
        assert body["details"].keys() == {"field", "issue"}, body
        assert body["details"]["field"] and body["details"]["issue"], body
    assert body["error"] == error
    assert isinstance(body["message"], str) and body["message"]
    uuid.UUID(body["request_id"])
    if "x-request-id" in reply.headers:
        assert body["request_id"] == reply.headers["x-request-id"]
    return body


# ---------------------------------------------------------------------------------------
# Extra Envoys and a recording upstream.


@dataclass
class Envoy:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        terminate(self.process, 10)


def _until(check: Callable[[], Any], process: subprocess.Popen[bytes], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and process.poll() is None:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"envoy: {what}")


def _admin(admin: str, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as response:
            body: bytes = response.read()
            return body
    except (urllib.error.URLError, ConnectionError):
        return None


def start_envoy(
    run_dir: Path, grpc_port: int, config: Config | None = None, **limits: Any
) -> Envoy:
    """An Envoy from the project's template in front of `grpc_port`; ready when returned."""
    config = config or Config(http_port=0, envoy_admin_port=0, key_pepper=b"p" * 32)
    run_dir.mkdir(parents=True, exist_ok=True)
    bootstrap, admin_path = run_dir / "envoy.yaml", run_dir / "admin-address"
    bootstrap.write_text(render_config(config, grpc_port, **limits))
    with (run_dir / "envoy.log").open("wb") as log:
        process = spawn(
            [
                envoy_binary(),
                *("-c", str(bootstrap), "--disable-hot-restart", "--concurrency", "1"),
                *("--admin-address-path", str(admin_path), "--log-level", "warn"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    envoy = Envoy(process, 0)
    try:
        admin = _until(
            lambda: admin_path.exists() and admin_path.read_text().strip(), process, "no admin"
        )
        _until(lambda: _admin(admin, "/ready") == b"LIVE\n", process, "not ready")
        listeners = json.loads(_admin(admin, "/listeners?format=json") or b"{}")
        address = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        envoy.port = int(address["port_value"])
    except BaseException:
        envoy.stop()
        raise
    return envoy


@dataclass
class Recorder(grpc.GenericRpcHandler):
    """A gRPC upstream that records each call's metadata and gives canned answers."""

    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        metadata = dict(details.invocation_metadata)

        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls.append((method, metadata))
            if method == "/grpc.health.v1.Health/Check":
                return health_pb2.HealthCheckResponse(status=1).SerializeToString()
            if method == "/convergence.v1.RunService/ListRuns":
                return BIG_LIST.SerializeToString()
            if method == "/convergence.v1.TenantService/DryRunOnboarding":
                # As gRPC itself refuses a call: no x-error-body from the server's code.
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, REFUSED_DRY_RUN)
            return b""  # any empty message

        return grpc.unary_unary_rpc_method_handler(answer)

    def seen(self, probe: str) -> dict[str, str]:
        """The metadata of the call that carried `x-probe: probe`."""
        return next(md for _, md in self.calls if md.get("x-probe") == probe)


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[Recorder, int]]:
    handler = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield handler, port
    server.stop(0)


@pytest.fixture(scope="module")
def envoys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Envoy]]:
    """Starts extra Envoys; all are stopped at the end of the module."""
    started: list[Envoy] = []

    def make(grpc_port: int, config: Config | None = None, **limits: Any) -> Envoy:
        envoy = start_envoy(tmp_path_factory.mktemp("envoy"), grpc_port, config, **limits)
        started.append(envoy)
        return envoy

    yield make
    for envoy in started:
        envoy.stop()


@pytest.fixture(scope="module")
def recording(recorder: tuple[Recorder, int], envoys: Callable[..., Envoy]) -> Envoy:
    return envoys(recorder[1])


@pytest.fixture(scope="module")
def guarded(stack: Stack, envoys: Callable[..., Envoy]) -> Envoy:
    """In front of the shared server: a short header timeout, a small connection bound."""
    return envoys(
        stack.grpc_port,
        request_headers_timeout=SHORT_HEADER_TIMEOUT,
        max_downstream_connections=FLOOD_BOUND,
    )


# ---------------------------------------------------------------------------------------
# Envoy's own replies.

REFUSED = {
    "connect": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    "url over the limit": (get("/api/v1/pipelines/runs/" + "r" * HEADER_LIMIT, "Host: e"), 431),
    "header over the limit": (get("/health", "Host: e", "X-Pad: " + "p" * HEADER_LIMIT), 431),
    "too many headers": (
        get("/health", "Host: e", *(f"X-H{i}: 1" for i in range(MAX_HEADERS_COUNT))),
        431,
    ),
    "websocket": (get("/health", "Host: e", "Connection: Upgrade", "Upgrade: websocket"), 403),
    "http/1.0": (get("/health", version="HTTP/1.0"), 426),
    "not http": (b"HELLO\r\n\r\n", 400),
    "no host": (get("/health"), 400),
    "underscore in a header name": (get("/health", "Host: e", "X_Api_Key: k"), 400),
    "a header name gRPC refuses": (get("/health", "Host: e", "A+B: k"), 400),
    "chunked and a length": (
        get("/health", "Host: e", "Transfer-Encoding: chunked", "Content-Length: 3"),
        400,
    ),
}
TITLES = {
    400: "Validation error",
    403: "Authorization failed",
    405: "Method not allowed",
    426: "Upgrade required",
    431: "Request header fields too large",
}


@pytest.mark.parametrize("case", REFUSED)
def test_envoy_refuses_with_the_documented_body(stack: Stack, case: str) -> None:
    request, status = REFUSED[case]
    assert_documented(exchange(stack.http_port, request), status, TITLES[status])


@pytest.mark.parametrize("name", ["a+b", "x!", "~tilde", "q^o", "it's", "'quoted'"])
def test_a_header_name_grpc_refuses_is_400_naming_it(http: httpx.Client, name: str) -> None:
    """HTTP allows these names, gRPC metadata does not: passed on, the server's gRPC library
    would fail the call with a 500 before any of its code runs."""
    _, key = onboard(http)
    response = http.get("/api/v1/pipelines", headers={"X-API-Key": key, name: "1"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "Validation error"
    assert body["message"].startswith(f"Header name '{name}' is not accepted"), body
    assert body["details"]["field"] == name, body


def test_connect_is_refused_with_the_request_id(stack: Stack) -> None:
    reply = exchange(stack.http_port, REFUSED["connect"][0])
    body = assert_documented(reply, 405, "Method not allowed")
    assert body["request_id"] == reply.headers["x-request-id"]
    assert body["message"] == "CONNECT is not supported"


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_head_is_get_without_the_body(stack: Stack, http2: bool) -> None:
    """Load balancers probe with HEAD: each GET path answers it with GET's status and
    headers, and no body."""
    with httpx.Client(base_url=stack.http_url, timeout=30, http1=not http2, http2=http2) as http:
        _, key = onboard(http)
        for path, headers, status in [
            ("/health", {}, 200),
            ("/openapi.json", {}, 200),
            ("/api/v1/pipelines", {"X-API-Key": key}, 200),
            ("/api/v1/pipelines", {}, 401),
            (f"/api/v1/pipelines/runs/{uuid.uuid4()}", {"X-API-Key": key}, 404),
        ]:
            get = http.get(path, headers=headers)
            head = http.head(path, headers=headers)
            assert head.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert (get.status_code, head.status_code) == (status, status), head.headers
            assert head.content == b""
            assert head.headers["content-type"] == "application/json"
            assert head.headers["content-length"] == str(len(get.content))
        # Envoy's own 400 (a query value of the wrong type) comes to a HEAD without the
        # body that a GET's is reshaped from: no length, rather than a wrong one.
        path, headers = "/api/v1/pipelines/runs?limit=abc", {"X-API-Key": key}
        get, head = http.get(path, headers=headers), http.head(path, headers=headers)
        assert (get.status_code, head.status_code) == (400, 400)
        assert get.json()["details"]["field"] == "limit"
        assert head.content == b""
        assert head.headers["content-type"] == "application/json"
        assert "content-length" not in head.headers


def test_head_of_a_response_beyond_envoys_buffers_and_of_a_watch(stack: Stack) -> None:
    """A body beyond a connection's buffer (32 KiB) is dropped as well; a watch, whose
    response lasts as long as its run, refuses HEAD (405) rather than hold it."""
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        _, key = onboard(http, plan="SCALE")  # 200 schedules
        auth = {"X-API-Key": key}
        body = {"provider": "gcp", "domain": "cost", "template": "cost_billing"}
        for _ in range(100):
            assert http.post("/api/v1/schedules", headers=auth, json=body).status_code == 200
        page = "/api/v1/schedules?limit=100"
        size = len(http.get(page, headers=auth).content)
        assert size > 32 * 1024
        watch = f"/api/v1/pipelines/runs/{uuid.uuid4()}:watch"
        for http2 in (False, True):
            with httpx.Client(
                base_url=stack.http_url, timeout=60, http1=not http2, http2=http2
            ) as client:
                head = client.head(page, headers=auth)
                assert head.status_code == 200, head.headers
                assert (head.content, head.headers["content-length"]) == (b"", str(size))
                refused = client.head(watch, headers=auth)
                assert refused.status_code == 405, refused.headers
                # ":watch" in a query is no watch.
                listed = client.head("/api/v1/pipelines/runs?pipeline_id=a:watch", headers=auth)
                assert listed.status_code == 200, listed.headers


def test_the_limits_are_in_the_message(stack: Stack) -> None:
    body = exchange(stack.http_port, REFUSED["too many headers"][0]).json()
    assert f"{MAX_REQUEST_HEADERS_KB} KiB" in body["message"]
    assert f"{MAX_HEADERS_COUNT} headers" in body["message"]


@pytest.mark.parametrize("size", [HEADER_LIMIT + 1, 2 * HEADER_LIMIT, 4 * HEADER_LIMIT])
def test_an_oversized_url_is_431_never_429(stack: Stack, size: int) -> None:
    reply = exchange(stack.http_port, get("/api/v1/pipelines/runs/" + "r" * size, "Host: e"))
    assert_documented(reply, 431, "Request header fields too large")


def test_the_largest_requests_envoy_accepts_reach_the_server(
    stack: Stack, http: httpx.Client
) -> None:
    """A URL, or a URL and many headers, just inside Envoy's limits: the server answers (the
    id is not a run id), never with gRPC's own metadata refusal (a 429) or a 5xx."""
    _, key = onboard(http)
    fillers = {f"X-Fill-{i:02d}": "f" * 100 for i in range(MAX_HEADERS_COUNT - 10)}
    filled = sum(len(k) + len(v) for k, v in fillers.items())
    with httpx.Client(base_url=stack.http_url, timeout=10) as client:
        for length, headers in ((HEADER_LIMIT - 600, {}), (HEADER_LIMIT - filled - 600, fillers)):
            for _ in range(5):
                response = client.get(
                    "/api/v1/pipelines/runs/" + "r" * length, headers={"X-API-Key": key, **headers}
                )
                assert response.status_code == 400, (length, response.text)
                assert response.json()["details"]["field"] == "pipeline_logging_id"


def test_native_grpc_over_the_header_limit_is_reset_not_refused_by_the_server(
    stack: Stack,
) -> None:
    """HTTP/2 has no local reply for headers too large: Envoy resets the stream."""
    with grpc.insecure_channel(stack.envoy_grpc_target) as channel:
        stub = health_service_pb2_grpc.HealthServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetHealth(
                health_service_pb2.GetHealthRequest(),
                metadata=[("x-pad", "p" * HEADER_LIMIT)],
                timeout=10,
            )
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        stub.GetHealth(health_service_pb2.GetHealthRequest(), timeout=10)


# ---------------------------------------------------------------------------------------
# Floods of slow or silent connections.


def hold_connections(port: int, count: int, send: bytes) -> list[socket.socket]:
    """`count` connections that send `send` (maybe nothing) and then wait."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                held[-1].sendall(send)  # refused at once when over the connection bound
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


def closed_without_a_word(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def until_all_closed(held: list[socket.socket]) -> list[bytes]:
    """What each connection received before Envoy closed it (bounded wait)."""
    received = {sock: b"" for sock in held}
    open_ = set(held)
    deadline = time.monotonic() + DEADLINE
    try:
        while open_ and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_), [], [], 0.5)
            for sock in readable:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                received[sock] += chunk
                if not chunk:
                    open_.discard(sock)
        assert not open_, f"{len(open_)} of {len(held)} connections still open"
    finally:
        for sock in held:
            sock.close()
    return [received[sock] for sock in held]


def assert_served(envoy: Envoy) -> None:
    with httpx.Client(base_url=envoy.url, timeout=10) as client:
        assert client.get("/health").status_code == 200
    with grpc.insecure_channel(envoy.target) as channel:
        stub = health_service_pb2_grpc.HealthServiceStub(channel)
        stub.GetHealth(health_service_pb2.GetHealthRequest(), timeout=10)


def test_half_sent_requests_time_out_and_others_are_served(guarded: Envoy) -> None:
    assert_served(guarded)
    held = hold_connections(guarded.port, FLOOD, HALF_SENT)
    replies = until_all_closed(held)
    timed_out = [parse(raw) for raw in replies if raw]
    assert timed_out, "no connection got the header timeout"
    for reply in timed_out:
        body = assert_documented(reply, 408, "Request timeout")
        assert body["message"] == "Request headers not received within 1s"
    # The rest were over the bound: closed as soon as they were accepted, without a word.
    assert all(raw == b"" for raw in replies if not raw.startswith(b"HTTP/1.1 408"))
    assert_served(guarded)


def served(envoy: Envoy) -> bool:
    try:
        assert_served(envoy)
    except (httpx.HTTPError, grpc.RpcError, AssertionError):
        return False
    return True


def test_silent_connections_cannot_keep_others_out(guarded: Envoy) -> None:
    """No byte, no header timer: the connection idle timeout, shortened while connections
    fill the bound, makes room again though the flood's connections stay open on our side."""
    held = hold_connections(guarded.port, FLOOD, b"")
    try:
        deadline = time.monotonic() + DEADLINE
        while not served(guarded) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_served(guarded)
        # Envoy closed the excess at once, and more than that since, without a word.
        readable, _, _ = select.select(held, [], [], 0)
        assert len(readable) > FLOOD - FLOOD_BOUND
        assert all(closed_without_a_word(sock) for sock in readable)
    finally:
        for sock in held:
            sock.close()


# ---------------------------------------------------------------------------------------
# What the server is told, and errors shaped on the way back.

SPOOFS = {
    "X-Forwarded-For": "203.0.113.7",
    "X-Envoy-External-Address": "203.0.113.8",
    "X-Envoy-Internal": "true",
    "X-Envoy-Original-Path": "/forged",
}


def test_the_server_learns_the_client_address_and_no_forged_one(
    recorder: tuple[Recorder, int], recording: Envoy
) -> None:
    handler, _ = recorder
    with httpx.Client(base_url=recording.url, timeout=10) as client:
        for probe, headers in (("rest", SPOOFS), ("rest, plain", {})):
            sent = {**headers, "X-Request-ID": "chosen-by-the-client", "X-Probe": probe}
            assert client.get("/health", headers=sent).status_code == 200
    with grpc.insecure_channel(recording.target) as channel:
        call = channel.unary_unary("/convergence.v1.HealthService/GetHealth")
        for probe, headers in (("grpc", SPOOFS), ("grpc, plain", {})):
            metadata = [(k.lower(), v) for k, v in headers.items()]
            call(
                b"", metadata=[*metadata, ("x-request-id", "mine"), ("x-probe", probe)], timeout=10
            )
    for probe in ("rest", "rest, plain", "grpc", "grpc, plain"):
        metadata = handler.seen(probe)
        assert metadata["x-envoy-external-address"] == "127.0.0.1", probe
        assert "x-envoy-internal" not in metadata, probe
        uuid.UUID(metadata["x-request-id"])  # Envoy's own, not the client's
    for probe in ("rest", "grpc"):
        assert handler.seen(probe)["x-forwarded-for"].startswith("203.0.113.7,")  # appended
    assert handler.seen("rest")["x-envoy-original-path"] == "/health"  # the transcoder's
    assert "x-envoy-original-path" not in handler.seen("grpc")


def test_trusted_hops_take_the_address_a_proxy_appended(
    recorder: tuple[Recorder, int], envoys: Callable[..., Envoy]
) -> None:
    handler, port = recorder
    config = Config(http_port=0, envoy_admin_port=0, key_pepper=b"p" * 32, xff_trusted_hops=1)
    behind_a_proxy = envoys(port, config)
    with httpx.Client(base_url=behind_a_proxy.url, timeout=10) as client:
        forged_then_real = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
        client.get("/health", headers={**forged_then_real, "X-Probe": "hop"})
        client.get("/health", headers={"X-Probe": "direct"})
    assert handler.seen("hop")["x-envoy-external-address"] == "203.0.113.7"
    # Fewer entries than trusted hops: the TCP peer.
    assert handler.seen("direct")["x-envoy-external-address"] == "127.0.0.1"


def test_a_grpc_refusal_without_a_body_gets_the_documented_429(recording: Envoy) -> None:
    with httpx.Client(base_url=recording.url, timeout=10) as client:
        response = client.post("/api/v1/tenants/dryrun", json={"tenant_id": "acme_corp"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "error": "Rate limit exceeded",
        "message": REFUSED_DRY_RUN,
        "retry_after": 1,
        "request_id": response.headers["x-request-id"],
    }


def test_a_response_larger_than_the_connection_buffers_passes(recording: Envoy) -> None:
    with httpx.Client(base_url=recording.url, timeout=10) as client:
        response = client.get("/api/v1/pipelines/runs")
    assert response.status_code == 200
    assert len(response.content) > 4 * 32 * 1024
    assert len(response.json()["runs"]) == len(BIG_LIST.runs)


def test_an_unreachable_server_is_503_for_rest_and_unavailable_for_grpc(
    envoys: Callable[..., Envoy],
) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]
    nowhere = envoys(closed_port)
    with httpx.Client(base_url=nowhere.url, timeout=10) as client:
        reply = client.get("/health")
    assert reply.status_code == 503
    assert reply.json()["error"] == "Service unavailable"
    assert reply.json()["request_id"] == reply.headers["x-request-id"]
    with grpc.insecure_channel(nowhere.target) as channel:
        stub = health_service_pb2_grpc.HealthServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetHealth(health_service_pb2.GetHealthRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------------
# The rendered bootstrap.


def hcm(rendered: str) -> dict[str, Any]:
    bootstrap = yaml.safe_load(rendered)
    listener = bootstrap["static_resources"]["listeners"][0]
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def test_watch_streams_outlive_the_server_stream_limit() -> None:
    config = Config(key_pepper=b"p" * 32, stream_max_seconds=1800)
    manager = hcm(render_config(config, 50051))
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    watch = next(r for r in routes if r["match"].get("path", "").endswith("/WatchRun"))
    seconds = float(watch["route"]["idle_timeout"].rstrip("s"))
    assert seconds > config.stream_max_seconds
    assert float(watch["route"]["max_stream_duration"]["max_stream_duration"].rstrip("s")) > 1800
    assert float(manager["stream_idle_timeout"].rstrip("s")) < seconds


def test_rendered_limits() -> None:
    config = Config(key_pepper=b"p" * 32, xff_trusted_hops=2)
    rendered = render_config(config, 50051)
    manager = hcm(rendered)
    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 2
    assert manager["request_headers_timeout"] == f"{REQUEST_HEADERS_TIMEOUT_SECONDS:g}s"
    assert manager["max_request_headers_kb"] == MAX_REQUEST_HEADERS_KB
    assert "local_ratelimit" not in rendered
    shorter = hcm(render_config(config, 50051, request_headers_timeout=0.5))
    assert shorter["request_headers_timeout"] == "0.5s"
