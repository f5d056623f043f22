"""Renders Envoy's bootstrap from `envoy/envoy.yaml.tmpl` for a running gRPC server.

The edge limits are constants here (envoy/README.md explains each). The gRPC server's
metadata limit must stay above the largest metadata Envoy forwards for a request it
accepted: `UPSTREAM_METADATA_BYTES`.
"""

from __future__ import annotations

import json
from string import Template

import yaml

from convergence.v1 import error_reason_pb2
from convergence_server.config import REPO_ROOT, Config

ENVOY_DIR = REPO_ROOT / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
LUA_FILTER = ENVOY_DIR / "error_body.lua"
DESCRIPTOR = REPO_ROOT / "build" / "convergence.pb"
# Written by `make proto` (convergence_server.openapi); Envoy serves it at GET /openapi.json.
OPENAPI_DOCUMENT = REPO_ROOT / "clients" / "python" / "convergence" / "openapi.json"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"

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
# The title of a 4xx status no ErrorReason has (5xx ones get the 500's).
OTHER_CLIENT_ERROR = "Request error"


def error_titles() -> dict[int, str]:
    """HTTP status -> the `error` title of its REST body, from the `ErrorReason` enum (the
    server takes its titles from there too). Two titles for one status are refused."""
    titles: dict[int, str] = {}
    for value in error_reason_pb2.ErrorReason.DESCRIPTOR.values[1:]:
        rendering = value.GetOptions().Extensions[error_reason_pb2.rendering]
        known = titles.setdefault(rendering.http_status, rendering.title)
        if known != rendering.title:
            raise ValueError(
                f"HTTP {rendering.http_status} has two titles: {known!r}, {value.name}"
            )
    return titles


def render_lua(titles: dict[int, str]) -> str:
    """envoy/error_body.lua with its table of titles filled in."""
    source = LUA_FILTER.read_text()
    rows = "\n".join(
        f"  [{status}] = {json.dumps(title)}," for status, title in sorted(titles.items())
    )
    for marker, text in (("  --[[TITLES]]", rows), ("--[[TITLE_4XX]]", OTHER_CLIENT_ERROR)):
        if marker not in source:
            raise ValueError(f"{LUA_FILTER} lacks the marker {marker.strip()}")
        source = source.replace(marker, text)
    return source


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
    if not OPENAPI_DOCUMENT.exists():
        raise FileNotFoundError(f"{OPENAPI_DOCUMENT} is missing: run `make proto`")
    titles = error_titles()
    return Template(TEMPLATE.read_text()).substitute(
        {f"TITLE_{status}": title for status, title in titles.items()},
        TITLE_4XX=OTHER_CLIENT_ERROR,
        # A JSON string is a YAML double-quoted scalar: the rendered filter, inline.
        LUA_SOURCE=json.dumps(render_lua(titles)),
        LISTEN_HOST=config.http_host,
        LISTEN_PORT=config.http_port,
        ADMIN_HOST="127.0.0.1",
        ADMIN_PORT=config.envoy_admin_port,
        GRPC_HOST=config.grpc_host,
        GRPC_PORT=grpc_port,
        DESCRIPTOR_PATH=DESCRIPTOR,
        OPENAPI_PATH=OPENAPI_DOCUMENT,
        MAX_REQUEST_BYTES=config.max_request_bytes,
        XFF_TRUSTED_HOPS=config.xff_trusted_hops,
        REQUEST_HEADERS_TIMEOUT=_duration(request_headers_timeout),
        MAX_REQUEST_HEADERS_KB=MAX_REQUEST_HEADERS_KB,
        MAX_HEADERS_COUNT=MAX_HEADERS_COUNT,
        MAX_DOWNSTREAM_CONNECTIONS=max_downstream_connections,
        MAX_HEAP_BYTES=MAX_HEAP_BYTES,
        WATCH_TIMEOUT=_duration(config.stream_max_seconds + WATCH_MARGIN_SECONDS),
    )


def transcoded_services() -> list[str]:
    """The services the template's gRPC-JSON transcoder serves over REST (its `services`)."""
    template = Template(TEMPLATE.read_text())
    # Any value will do for the placeholders: only the filter's list is read.
    bootstrap = yaml.safe_load(template.substitute(dict.fromkeys(template.get_identifiers(), "0")))
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == TRANSCODER:
                        return [str(name) for name in http_filter["typed_config"]["services"]]
    raise ValueError(f"{TEMPLATE} has no {TRANSCODER} filter")


def _duration(seconds: float) -> str:
    """A protobuf Duration as YAML: `10s`, `0.5s`, `3660s`."""
    return f"{round(seconds, 3):.3f}".rstrip("0").rstrip(".") + "s"
