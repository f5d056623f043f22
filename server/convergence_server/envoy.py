"""Renders Envoy's bootstrap from `envoy/envoy.yaml.tmpl` for a running gRPC server."""

from __future__ import annotations

from string import Template

from convergence_server.config import REPO_ROOT, Config

ENVOY_DIR = REPO_ROOT / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
LUA_FILTER = ENVOY_DIR / "error_body.lua"
DESCRIPTOR = REPO_ROOT / "build" / "convergence.pb"
# The onboarding bucket holds this many seconds' worth of requests.
OPEN_BURST_SECONDS = 5


def render_config(config: Config, grpc_port: int) -> str:
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
        OPEN_RATE=config.open_requests_per_second,
        OPEN_BURST=config.open_requests_per_second * OPEN_BURST_SECONDS,
    )
