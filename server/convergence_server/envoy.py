"""Renders Envoy's bootstrap from `envoy/envoy.yaml.tmpl` for a running gRPC server.

The edge limits are constants here (envoy/README.md explains each). The gRPC server's
metadata limit must stay above the largest metadata Envoy forwards for a request it
accepted: `UPSTREAM_METADATA_BYTES`.
"""

from __future__ import annotations

from string import Template

from convergence_server.config import REPO_ROOT, Config

ENVOY_DIR = REPO_ROOT / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
LUA_FILTER = ENVOY_DIR / "error_body.lua"
DESCRIPTOR = REPO_ROOT / "build" / "convergence.pb"

# A client has this long to send a request's headers once their first byte arrived (408).
REQUEST_HEADERS_TIMEOUT_SECONDS = 10.0
# The request line (URL included) and headers together, and the number of headers (431).
MAX_REQUEST_HEADERS_KB = 16
MAX_HEADERS_COUNT = 64
# Open client connections; more are closed as soon as they are accepted.
MAX_DOWNSTREAM_CONNECTIONS = 10_000
# Envoy's heap budget: near it, Envoy refuses new requests (503) and connections.
MAX_HEAP_BYTES = 512 << 20
# WatchRun's idle timeout and longest life at Envoy exceed the server's own stream limit
# by this much, so that only the server ends a quiet watch.
WATCH_MARGIN_SECONDS = 60
# Upper bound of the gRPC metadata (HPACK size: name + value + 32 bytes per entry) of a
# request Envoy forwards: the client's headers and URL (the transcoder moves the URL to
# `x-envoy-original-path`, the new `:path` is short), their entries' overhead, and what
# Envoy adds (x-request-id, x-forwarded-*, x-envoy-*, te, content-type; under 1 KiB).
UPSTREAM_METADATA_BYTES = MAX_REQUEST_HEADERS_KB * 1024 + (MAX_HEADERS_COUNT + 16) * 32 + 1024


def render_config(
    config: Config,
    grpc_port: int,
    *,
    request_headers_timeout: float = REQUEST_HEADERS_TIMEOUT_SECONDS,
    max_downstream_connections: int = MAX_DOWNSTREAM_CONNECTIONS,
) -> str:
    """The bootstrap YAML. The keyword limits exist so that tests can reach them quickly."""
    if not DESCRIPTOR.exists():
        raise FileNotFoundError(f"{DESCRIPTOR} is missing: run `make proto`")
    return Template(TEMPLATE.read_text()).substitute(
        LISTEN_HOST=config.http_host,
        LISTEN_PORT=config.http_port,
        ADMIN_HOST="127.0.0.1",
        ADMIN_PORT=config.envoy_admin_port,
        GRPC_HOST=config.grpc_host,
        GRPC_PORT=grpc_port,
        DESCRIPTOR_PATH=DESCRIPTOR,
        LUA_PATH=LUA_FILTER,
        MAX_REQUEST_BYTES=config.max_request_bytes,
        XFF_TRUSTED_HOPS=config.xff_trusted_hops,
        REQUEST_HEADERS_TIMEOUT=_duration(request_headers_timeout),
        MAX_REQUEST_HEADERS_KB=MAX_REQUEST_HEADERS_KB,
        MAX_HEADERS_COUNT=MAX_HEADERS_COUNT,
        MAX_DOWNSTREAM_CONNECTIONS=max_downstream_connections,
        MAX_HEAP_BYTES=MAX_HEAP_BYTES,
        WATCH_TIMEOUT=_duration(config.stream_max_seconds + WATCH_MARGIN_SECONDS),
    )


def _duration(seconds: float) -> str:
    """A protobuf Duration as YAML: `10s`, `0.5s`, `3660s`."""
    return f"{round(seconds, 3):.3f}".rstrip("0").rstrip(".") + "s"
