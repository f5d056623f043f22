"""What metrics and request logs cost on the API: the same calls against two stacks.

`make bench` runs `python -m bench.observability`. It starts, on loopback only, two stacks
on the embedded store (no workers; the tenants on a plan whose limits never bind): the
baseline with neither (`CONVERGENCE_REQUEST_LOG=off`, no `CONVERGENCE_METRICS_PORT`), and
one with both (metrics served, every store call timed, one log line per call), onboards a
tenant on each, and runs the authenticated GetHealth over gRPC and over REST through Envoy
as closed loops (`bench.api_overhead`'s machinery: C worker threads, N timed calls, the
servers' CPU read from /proc). Each round alternates which stack goes first (three
rounds); the report gives the median rate of each and the observed stack's as a ratio of
the baseline's. Goal: at least 0.90. The exit status is 1 when a call failed or a server
logged a warning or an error.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx

from bench.api_overhead import (
    GRPC_OPTIONS,
    TENANT,
    TIMEOUT,
    Load,
    Result,
    Scenario,
    describe_machine,
    health_call,
    log_problems,
    log_sizes,
    parse_args,
    report_errors,
    rest_get,
    run_scenario,
    shared,
)
from bench.interceptors import UNMETERED, make_workspace
from convergence_server.stack import start_stack

PLAIN = {"CONVERGENCE_REQUEST_LOG": "off"}
OBSERVED = {"CONVERGENCE_REQUEST_LOG": "on", "CONVERGENCE_METRICS_PORT": "0"}
VARIANTS = (("baseline", PLAIN), ("metrics + request log", OBSERVED))
CALLS = ("GetHealth + API key, gRPC direct", "GET /health + API key, REST via Envoy")
ROUNDS = 3


@dataclass
class Variant:
    name: str
    pids: tuple[int, ...]
    log_dir: Path
    logs_before: dict[str, int]
    scenarios: list[Scenario]
    rates: list[list[float]] = field(default_factory=lambda: [[] for _ in CALLS])


def start(resources: contextlib.ExitStack, name: str, env: dict[str, str]) -> Variant:
    """A stack with `env`, and a tenant of the UNMETERED plan (no rate limit binds)."""
    workspace = make_workspace(resources)
    stack = start_stack({**workspace.env(), **env}, log_dir=workspace.log_dir)
    resources.callback(stack.stop)
    tenant = {
        **TENANT,
        "tenant_id": f"bench_{uuid.uuid4().hex[:12]}",
        "subscription_plan": UNMETERED,
    }
    with httpx.Client(base_url=stack.http_url, timeout=TIMEOUT, trust_env=False) as client:
        key = str(
            client.post("/api/v1/tenants/onboard", json=tenant).raise_for_status().json()["api_key"]
        )
    channel = grpc.insecure_channel(stack.grpc_target, options=GRPC_OPTIONS)
    resources.enter_context(channel)
    direct = shared(health_call(channel, key))
    rest = rest_get(stack.http_url, "/health", {"X-API-Key": key})
    return Variant(
        name,
        (stack.server.pid, stack.envoy.pid),
        workspace.log_dir,
        log_sizes(workspace.log_dir),
        [
            Scenario(f"{label} [{name}]", call)
            for label, call in zip(CALLS, (direct, rest), strict=True)
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, "python -m bench.observability", __doc__)
    results: list[Result] = []
    with contextlib.ExitStack() as resources:
        variants = [start(resources, name, env) for name, env in VARIANTS]
        for round_ in range(ROUNDS):  # which stack goes first alternates
            for variant in variants if round_ % 2 == 0 else reversed(variants):
                load = Load(args.requests, args.concurrency, args.warmup, variant.pids)
                for rates, scenario in zip(variant.rates, variant.scenarios, strict=True):
                    print(f"running: {scenario.name}", file=sys.stderr, flush=True)
                    results.append(run_scenario(scenario, load))
                    rates.append(results[-1].rate)
        problems = [p for v in variants for p in log_problems(v.log_dir, v.logs_before)]
    baseline, observed = variants
    rows = [
        "| calls | baseline req/s | metrics + request log req/s | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, plain_rates, seen_rates in zip(CALLS, baseline.rates, observed.rates, strict=True):
        plain, seen = statistics.median(plain_rates), statistics.median(seen_rates)
        rows.append(f"| {label} | {plain:,.0f} | {seen:,.0f} | {seen / plain:.2f} |")
    table = "\n".join(rows)
    print(f"{describe_machine(args)}; median of {ROUNDS} rounds each\n\n{table}")
    if args.output is not None:
        args.output.write_text(table + "\n")
    return 1 if report_errors(results, problems) else 0


if __name__ == "__main__":
    sys.exit(main())
