"""Prometheus metrics (prometheus-client), served on a port of their own
(`CONVERGENCE_METRICS_PORT`), never on the public listener.

Labels carry only bounded values: a gRPC method of this service, a status code name, a
template (`provider/domain/template`, from the configured catalog), a step type, a quota
name, an authentication failure reason, a store operation and adapter, a slot outcome. No
run, key, tenant or user id is ever a label.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from functools import wraps
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

REGISTRY = CollectorRegistry()
# The process's memory, CPU and open files, Python's version and garbage collections.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
# From a fast point read to a store call that waits out a slow emulator.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_RUN_SECONDS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

RPC_SECONDS = Histogram(
    "convergence_rpc_duration_seconds",
    "gRPC calls served (REST ones transcoded by Envoy included), by method and status code.",
    ["method", "code"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
RUNS_ENDED = Counter(
    "convergence_runs_ended_total",
    "Runs this server ended, by template and final status.",
    ["template", "status"],
    registry=REGISTRY,
)
RUN_SECONDS = Histogram(
    "convergence_run_duration_seconds",
    "From a run's claim by a worker to its end, by template and final status.",
    ["template", "status"],
    buckets=_RUN_SECONDS,
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "convergence_step_duration_seconds",
    "Steps run by this server's workers, by step type and status.",
    ["step_type", "status"],
    buckets=_RUN_SECONDS,
    registry=REGISTRY,
)
QUEUE_PENDING = Gauge(
    "convergence_queue_pending_runs",
    "PENDING runs of every tenant, as last sampled from the store.",
    registry=REGISTRY,
)
QUEUE_OLDEST_SECONDS = Gauge(
    "convergence_queue_oldest_pending_seconds",
    "Age of the oldest PENDING run (0 when none), as last sampled from the store.",
    registry=REGISTRY,
)
CLAIM_POLL_SECONDS = Gauge(
    "convergence_claim_poll_interval_seconds",
    "How long this server's idle workers wait before they look again for runs they were not "
    "woken for: CONVERGENCE_CLAIM_POLL_SECONDS after they last found or were given one, "
    "doubling with each look that finds none, up to CONVERGENCE_CLAIM_POLL_MAX_SECONDS.",
    registry=REGISTRY,
)
WEBHOOK_EVENTS = Counter(
    "convergence_webhook_events_total",
    "Tenants' webhook events (run.failed, schedule.slots_skipped), by type and outcome: "
    "delivered, failed (every attempt failed), dropped (too many pending), abandoned (at a "
    "stop).",
    ["event", "outcome"],
    registry=REGISTRY,
)
QUOTA_REFUSALS = Counter(
    "convergence_quota_refusals_total",
    "Calls refused by a limit (429), by quota: requests_per_minute, daily_pipeline_runs, "
    "concurrent_pipeline_runs, max_schedules, failed_authentications, ...",
    ["quota"],
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "convergence_auth_failures_total",
    "Calls refused for their API key (401), by ErrorInfo reason.",
    ["reason"],
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "convergence_store_operation_seconds",
    "Store calls, by operation (the store method) and adapter (embedded or bigquery).",
    ["operation", "adapter"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
SCHEDULE_SLOTS = Counter(
    "convergence_schedule_slots_total",
    "Schedule slots this server's ticker handled, by outcome (STARTED, SKIPPED, ...).",
    ["outcome"],
    registry=REGISTRY,
)


def run_ended(
    provider: str, domain: str, template: str, status: str, seconds: float | None
) -> None:
    """Counts a run this server ended (`seconds`: from its claim, when a worker ran it)."""
    labels = (f"{provider}/{domain}/{template}", status)
    RUNS_ENDED.labels(*labels).inc()
    if seconds is not None:
        RUN_SECONDS.labels(*labels).observe(seconds)


def quota_name(subject: str) -> str:
    """The quota of a QuotaFailure subject (`tenant:acme:daily_pipeline_runs`)."""
    return subject.rsplit(":", 1)[-1]


def serve(host: str, port: int) -> int:
    """Serves `/metrics` on its own thread; returns the bound port (`port` may be 0)."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_address[1])


T = TypeVar("T")


def timed_store(store: T, adapter: str) -> T:
    """`store` with each coroutine method timed into STORE_SECONDS (by method name)."""
    return _TimedStore(store, adapter)  # type: ignore[return-value]


class _TimedStore:
    def __init__(self, store: Any, adapter: str) -> None:
        self._store = store
        self._adapter = adapter

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value) or name.startswith("_"):
            return value
        histogram = STORE_SECONDS.labels(name, self._adapter)

        @wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            if not isinstance(result, Awaitable):
                return result
            return _observed(result, histogram)

        setattr(self, name, call)  # looked up once per method
        return call


async def _observed(awaitable: Awaitable[Any], histogram: Any) -> Any:
    started = time.perf_counter()
    try:
        return await awaitable
    finally:
        histogram.observe(time.perf_counter() - started)
