"""Health that tells the truth: while the store does not answer, the standard gRPC health
status is NOT_SERVING and `/health` fails; both recover with the store."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convergence_server.stack import Stack
from tests.bigquery_emulator import Emulator, start_emulator
from tests.conftest import StackFactory, eventually, new_prefix

pytestmark = pytest.mark.timeout(900)
# How long a state may take to follow the store (its calls time out first).
STORE_WAIT = 300


@pytest.fixture
def own_emulator(tmp_path: Path) -> Iterator[Emulator]:
    """An emulator of this test's own: it is frozen (SIGSTOP) under a running server."""
    (tmp_path / "emulator").mkdir()
    started = start_emulator(tmp_path / "emulator")
    yield started
    os.kill(started.process.pid, signal.SIGCONT)
    started.stop()


def grpc_health(stack: Stack) -> int:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        request = health_pb2.HealthCheckRequest()
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=30).status)


def envoy_clusters(stack: Stack) -> str:
    """The health flags of the server's host in Envoy's admin `/clusters`."""
    text = httpx.get(f"http://127.0.0.1:{stack.admin_port}/clusters", timeout=30).text
    return "\n".join(line for line in text.splitlines() if "::health_flags::" in line)


def test_a_store_that_stops_answering_makes_the_server_not_serving_until_it_is_back(
    stack_factory: StackFactory, own_emulator: Emulator
) -> None:
    stack = stack_factory(**own_emulator.env(new_prefix()))
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        assert grpc_health(stack) == serving
        assert http.get("/health").status_code == 200

        os.kill(own_emulator.process.pid, signal.SIGSTOP)  # BigQuery stops answering
        eventually(lambda: grpc_health(stack) == not_serving, timeout=STORE_WAIT)
        # Envoy's active health check sees it too (with one server, its panic mode still
        # routes there: there is nothing to fail over to).
        eventually(lambda: "/failed_active_hc" in envoy_clusters(stack), timeout=STORE_WAIT)
        down = http.get("/health")
        assert down.status_code == 503, down.text
        assert down.json()["error"] == "Service unavailable"
        assert "The store is unavailable" in down.json()["message"], down.text

        os.kill(own_emulator.process.pid, signal.SIGCONT)
        eventually(lambda: grpc_health(stack) == serving, timeout=STORE_WAIT)
        eventually(lambda: http.get("/health").status_code == 200, timeout=STORE_WAIT)
        eventually(lambda: "/failed_active_hc" not in envoy_clusters(stack), timeout=STORE_WAIT)
    stack.stop()
