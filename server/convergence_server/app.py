"""`create_server(config)`: the whole service, wired once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as GrpcHealthServicer
from grpc_reflection.v1alpha import reflection

from convergence.v1 import (
    access_service_pb2,
    access_service_pb2_grpc,
    health_service_pb2,
    health_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)
from convergence_server import faults, metrics
from convergence_server.api.access import AccessServicer
from convergence_server.api.health import HealthServicer, StoreState
from convergence_server.api.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    FieldBehaviorInterceptor,
    HandlerCache,
    QuotaInterceptor,
    RequestContextInterceptor,
)
from convergence_server.api.pipelines import PipelineServicer
from convergence_server.api.runs import RunServicer
from convergence_server.api.schedules import ScheduleServicer
from convergence_server.api.tenants import TenantServicer
from convergence_server.clock import Clock, make_clock, system_clock
from convergence_server.config import Config
from convergence_server.domain.access import AccessLog, Keys
from convergence_server.domain.accounts import Accounts
from convergence_server.domain.auth import Authenticator, KeyRecordCache
from convergence_server.domain.clients import ClientLimits, ClientLimitSettings
from convergence_server.domain.executor import Executor, ExecutorSettings
from convergence_server.domain.onboarding import MIN_PEPPER_BYTES, Onboarding
from convergence_server.domain.plans import load_plans
from convergence_server.domain.quotas import PlanBook, RateLimiter
from convergence_server.domain.runs import PageTokens, RunEvents, Runs, page_token_key
from convergence_server.domain.schedules import Schedules, Ticker, check_schedule_hints
from convergence_server.domain.webhooks import Notifier, Webhooks, WebhookSettings
from convergence_server.engine.runner import SourcePolicy
from convergence_server.engine.templates import load_catalog
from convergence_server.storage import Store, open_store
from convergence_server.storage.schema import MIGRATIONS

log = logging.getLogger(__name__)

# How often the standard gRPC health status is brought up to date with the store's.
HEALTH_CHECK_SECONDS = 1.0
# How often the store is asked for its schema's version (a query; on BigQuery a small job),
# and how long any health check waits for the store before it counts as not answering.
STORE_PROBE_SECONDS = 30.0
STORE_PROBE_TIMEOUT = 10.0
LATEST_SCHEMA = MIGRATIONS[-1].version
MAX_METADATA_BYTES = 64 * 1024

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (health_service_pb2, "HealthService"),
        (tenant_service_pb2, "TenantService"),
        (pipeline_service_pb2, "PipelineService"),
        (run_service_pb2, "RunService"),
        (schedule_service_pb2, "ScheduleService"),
        (access_service_pb2, "AccessService"),
    )
)


@dataclass
class ConvergenceServer:
    """The running service: a grpc.aio server and what it owns."""

    server: grpc.aio.Server
    store: Store
    executor: Executor
    health: GrpcHealthServicer
    port: int
    ticker: Ticker
    authenticator: Authenticator
    access: AccessLog
    notifier: Notifier
    key_sync_seconds: float = 0.0
    shutdown_seconds: float = 8.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    queue_sample_seconds: float = 10.0
    clock: Clock = system_clock
    store_state: StoreState = field(default_factory=StoreState)
    _monitor: asyncio.Task[None] | None = None
    _sampler: asyncio.Task[None] | None = None
    _probe: asyncio.Task[str | None] | None = None

    async def start(self) -> None:
        await self.executor.start()
        await self.server.start()
        self.ticker.start()
        self.access.start()
        self.authenticator.start_sync(self.key_sync_seconds)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._monitor = asyncio.create_task(self._watch_store(), name="store-health")
        log.info("serving", extra={"fields": {"grpc_port": self.port}})

    async def _watch_store(self) -> None:
        """NOT_SERVING while the store refuses writes (a full disk), does not answer, or
        lacks migrations this server needs; SERVING again after. `/health` says the same."""
        serving = True
        next_probe = time.monotonic() + STORE_PROBE_SECONDS
        while True:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            try:
                failure = await asyncio.wait_for(self.store.write_failure(), STORE_PROBE_TIMEOUT)
            except Exception as exc:
                failure = f"the store does not answer: {exc or type(exc).__name__}"
            # A probe at a time (one stuck in an unanswered call is not piled upon), every
            # STORE_PROBE_SECONDS, or at every check while the store is failing.
            if self._probe is None and (not serving or time.monotonic() >= next_probe):
                self._probe = asyncio.create_task(self._probe_store(), name="store-probe")
                next_probe = time.monotonic() + STORE_PROBE_SECONDS
            if self._probe is not None:
                done, _ = await asyncio.wait({self._probe}, timeout=STORE_PROBE_TIMEOUT)
                if done:
                    failure = failure or self._probe.result()
                    self._probe = None
                else:
                    failure = failure or (
                        f"the store did not answer within {STORE_PROBE_TIMEOUT:.0f} s"
                    )
            self.store_state.failure = failure
            if (failure is None) != serving:
                serving = failure is None
                status = health_pb2.HealthCheckResponse
                await self.health.set("", status.SERVING if serving else status.NOT_SERVING)
                log.warning("health: %s", "SERVING" if serving else f"NOT_SERVING ({failure})")

    async def _probe_store(self) -> str | None:
        """Why the store cannot serve this server, from a query: its schema's version."""
        try:
            version = await self.store.schema_version()
        except Exception as exc:
            return f"the store does not answer: {exc or type(exc).__name__}"
        if version < LATEST_SCHEMA:
            return (
                f"the store's schema is at version {version}, this server needs "
                f"{LATEST_SCHEMA}: its migrations have not run"
            )
        return None

    async def _sample_queue(self) -> None:
        """The queue's gauges, from the store every `queue_sample_seconds` (on BigQuery one
        query per sample). The oldest run's age is taken when scraped: it grows between
        samples as the run waits."""
        oldest: datetime | None = None

        def age() -> float:
            return 0.0 if oldest is None else max(0.0, (self.clock() - oldest).total_seconds())

        metrics.QUEUE_OLDEST_SECONDS.set_function(age)
        while True:
            try:
                pending, oldest = await self.store.pending_runs(self.clock())
            except Exception as exc:
                log.warning("cannot sample the queue for the metrics: %s", exc)
            else:
                metrics.QUEUE_PENDING.set(pending)
            await asyncio.sleep(self.queue_sample_seconds)

    async def stop(self) -> None:
        """Stops within `shutdown_seconds`: refuses new calls, lets calls in progress end,
        interrupts running steps and hands their runs back PENDING, closes the store."""
        deadline = time.monotonic() + self.shutdown_seconds
        for task in (self._monitor, self._sampler, self._probe):
            if task is not None:
                task.cancel()
        await self.ticker.stop()
        await self.authenticator.stop_sync()
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(
            self.server.stop(self.shutdown_seconds * 0.4),
            # Leave a fifth of the time to close the store.
            self.executor.stop(self.shutdown_seconds * 0.8),
        )
        # Webhook attempts in progress, then the counted audit rows and keys' last use.
        await self.notifier.stop((deadline - time.monotonic()) / 4)
        await self.access.stop((deadline - time.monotonic()) / 2)
        await asyncio.wait_for(self.store.close(), max(0.1, deadline - time.monotonic()))

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def serve_until_signalled(self) -> None:
        """Starts, reports the bound port, and stops on SIGINT or SIGTERM within the bound.

        The one JSON line on stdout tells a launcher the port (the config may ask for 0).
        A stop that overruns its bound (a thread stuck in a store call) ends the process
        anyway: whatever it held is recovered as after a crash.
        """
        await self.start()
        ready: dict[str, object] = {"event": "serving", "grpc_port": self.port}
        if self.metrics_port is not None:
            ready["metrics_port"] = metrics.serve(self.metrics_host, self.metrics_port)
            self._sampler = asyncio.create_task(self._sample_queue(), name="queue-metrics")
        print(json.dumps(ready), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        bound = self.shutdown_seconds + 2

        def overdue() -> None:
            # Logged from a thread of its own: the log may be what is stuck (a full pipe).
            message = ("still running %.0f s after the signal: exiting", bound)
            note = threading.Thread(target=log.error, args=message, daemon=True)
            note.start()
            note.join(1)
            os._exit(1)

        # A thread, not the loop, holds the bound: it fires even when the loop is blocked,
        # or the process hangs in its exit (joining a thread a library never ended).
        watchdog = threading.Timer(bound, overdue)
        watchdog.daemon = True

        def on_signal(*_: object) -> None:
            # A Python handler rather than the loop's: it runs even while the loop is blocked
            # in a system call, and arms the bound from the signal itself.
            if watchdog.ident is None:
                watchdog.start()
            loop.call_soon_threadsafe(stop.set)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        await stop.wait()
        log.info("stopping", extra={"fields": {"within_seconds": self.shutdown_seconds}})
        try:
            await asyncio.wait_for(self.stop(), self.shutdown_seconds + 1)
        except Exception:
            log.exception("could not stop cleanly within %.0f s: exiting", self.shutdown_seconds)
            with contextlib.suppress(Exception):
                logging.shutdown()
            os._exit(1)
        log.info("stopped")


def create_server(
    config: Config, interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] | None = None
) -> ConvergenceServer:
    """Builds the server: validates configuration, opens the store, binds the port.

    `interceptors` replaces the standard chain (error mapping, request context, auth,
    quotas); only the benchmarks do that, to measure what the chain costs.
    """
    if len(config.key_pepper) < MIN_PEPPER_BYTES:
        shared = " (set it, the same on every replica)" if config.store == "bigquery" else ""
        raise SystemExit(
            f"CONVERGENCE_KEY_PEPPER must be at least {MIN_PEPPER_BYTES} bytes{shared}"
        )
    faults.arm(config.fault_points, config.data_dir)
    plans = load_plans(config.plans_path)
    catalog = load_catalog(config.config_dir)
    check_schedule_hints(catalog)
    store = open_store(config)
    if config.metrics_port is not None:  # timing every store call costs a little
        store = metrics.timed_store(store, config.store)
    clock = make_clock(config.clock_offset_file)
    events = RunEvents()
    access = AccessLog(store, clock, config.audit_flush_seconds)
    webhook_settings = WebhookSettings(config.webhook_retry_seconds, config.webhook_allow_private)
    notifier = Notifier(store, config.key_pepper, access, clock, webhook_settings)
    executor = Executor(
        store,
        catalog,
        events,
        ExecutorSettings(
            workers=config.workers,
            heartbeat_seconds=config.heartbeat_seconds,
            lease_seconds=config.lease_seconds,
            poll_seconds=config.claim_poll_seconds,
            poll_max_seconds=config.claim_poll_max_seconds,
            sample_data=config.sample_data_dir,
            source_roots=config.source_roots,
            gcs_source_roots=config.gcs_source_roots,
        ),
        clock=clock,
        on_failed=notifier.run_failed,
    )
    plan_book = PlanBook(store, plans)
    page_tokens = PageTokens(page_token_key(config.key_pepper))
    accounts = Accounts(store, plan_book, clock, access, config.member_cache_seconds)
    runs = Runs(
        store,
        catalog,
        plan_book,
        events,
        executor.wake,
        sources=SourcePolicy(
            sample_data=config.sample_data_dir,
            source_roots=config.source_roots,
            gcs_source_roots=config.gcs_source_roots,
            reads_gcs=config.store == "bigquery",
        ),
        page_tokens=page_tokens,
        clock=clock,
        on_failed=notifier.run_failed,
    )
    schedules = Schedules(
        store,
        catalog,
        plan_book,
        runs,
        page_tokens,
        clock,
        access,
        on_skipped=lambda slot: notifier.slots_skipped(
            slot.tenant_id, slot.schedule_id, slot.slot, slot.skipped_count, slot.reason
        ),
    )
    authenticator = Authenticator(
        store, config.key_pepper, KeyRecordCache(config.key_cache_seconds), clock, access.used
    )
    keys = Keys(
        store,
        config.key_pepper,
        access,
        clock,
        page_tokens,
        max_days=config.key_max_days,
        forget=authenticator.forget,
    )
    server = grpc.aio.server(
        interceptors=[
            HandlerCache(),
            ErrorInterceptor(access, config.request_log),
            RequestContextInterceptor(),
            AuthInterceptor(
                authenticator,
                ClientLimits(
                    ClientLimitSettings(
                        open_per_client=config.open_requests_per_minute_per_client,
                        open_total=config.open_requests_per_minute,
                        auth_failures=config.auth_failures_per_minute,
                    ),
                    RateLimiter(),
                ),
                frozenset(config.trusted_proxies),
                config.scheduler_token,
                access,
            ),
            QuotaInterceptor(
                plan_book,
                RateLimiter(),
                accounts,
                stream_max_seconds=config.stream_max_seconds,
                clock=clock,
            ),
            FieldBehaviorInterceptor(),
        ]
        if interceptors is None
        else list(interceptors),
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            # Above what Envoy lets through (envoy.yaml.tmpl), so an oversized header is
            # refused there with the documented body, not here with a bare status.
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    onboarding = Onboarding(store, plans, config.config_dir, config.key_pepper, access=access)
    store_state = StoreState()
    health_service_pb2_grpc.add_HealthServiceServicer_to_server(
        HealthServicer(store, store_state), server
    )
    tenant_service_pb2_grpc.add_TenantServiceServicer_to_server(
        TenantServicer(
            onboarding,
            accounts,
            Webhooks(store, config.key_pepper, access, notifier, clock, webhook_settings),
        ),
        server,
    )
    pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(
        PipelineServicer(runs, catalog, schedules), server
    )
    schedule_service_pb2_grpc.add_ScheduleServiceServicer_to_server(
        ScheduleServicer(schedules), server
    )
    run_service_pb2_grpc.add_RunServiceServicer_to_server(RunServicer(runs), server)
    access_service_pb2_grpc.add_AccessServiceServicer_to_server(AccessServicer(keys, clock), server)
    health = GrpcHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{config.grpc_host}:{config.grpc_port}")
    if port == 0:
        raise SystemExit(f"cannot bind the gRPC port {config.grpc_host}:{config.grpc_port}")
    return ConvergenceServer(
        server,
        store,
        executor,
        health,
        port,
        Ticker(schedules, config.tick_seconds),
        authenticator,
        access,
        notifier,
        config.key_sync_seconds if not store.exclusive else 0.0,
        config.shutdown_seconds,
        config.metrics_host,
        config.metrics_port,
        config.queue_sample_every,
        clock=clock,
        store_state=store_state,
    )
