"""What a GetRun could cost at best on grpc.aio: the floor under the GetRun/echo goal.

`python -m bench.getrun_floor` starts, on loopback, the bare grpc.aio echo of
`bench.api_overhead` and three servers of `GetRun` that do no work of the service's: each
answers every call with one constant `Run` (a run's usual fields filled), from the
generated servicer, in a process of its own (`python -m bench.getrun_floor --serve MODE`):

- `constant`: no interceptors;
- `chain`: the real chain's shape around it (`HandlerCache` and five `_WrappingInterceptor`s
  that do nothing), what the service's interceptors cost before their own work;
- `key`: no interceptors; the servicer reads `x-api-key` from the metadata and hashes it as
  an authentication does (`metadata_value`, `hash_key`), the least a keyed call must do.

Then it measures them in turns with h2load (`-c 8 -m 1`, one thread; Debian's
`nghttp2-client`), `--rounds` rounds of `--requests` calls each, the order reversed every
other round, and prints each server's median req/s, its ratio to the echo's median and
its CPU per call (from /proc). Whatever the service does per call (its key check from the
cache, rate and in-flight limits, request log line, metrics, the run's lookup and
conversion) comes on top of these.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.api_overhead import _cpu_seconds, _read_port, _stop, start_echo_server
from bench.echo_server import serve_on_free_port
from bench.h2load_calls import GET_RUN, Scenario, echo_scenario, grpc_frame, h2load, parse
from bench.side_by_side import RATE, WARMUP

MODES = ("constant", "chain", "key")
CONCURRENCY = 8
RUN_ID = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
KEY = "acme_corp_" + "k" * 48  # the shape of a key: tenant, separator, token


async def _serve(mode: str) -> None:
    import grpc

    from convergence.v1 import run_pb2, run_service_pb2_grpc
    from convergence_server.api.interceptors import (
        HandlerCache,
        _WrappingInterceptor,
        metadata_value,
    )
    from convergence_server.domain.keys import hash_key

    run = run_pb2.Run(
        pipeline_logging_id=RUN_ID,
        pipeline_id="gcp/cost/billing",
        tenant_id="acme_corp",
        status=run_pb2.Run.Status.COMPLETE,
        trigger_type="api",
        duration_ms=1234,
    )
    run.start_time.GetCurrentTime()
    run.end_time.GetCurrentTime()
    pepper, salt = b"p" * 32, b"s" * 16

    class Constant(run_service_pb2_grpc.RunServiceServicer):
        async def GetRun(self, request: Any, context: Any) -> Any:
            if mode == "key":
                hash_key(pepper, salt, metadata_value(context, "x-api-key") or "")
            return run

    chain = [HandlerCache(), *(_WrappingInterceptor() for _ in range(5))]
    server = grpc.aio.server(
        interceptors=chain if mode == "chain" else None, options=[("grpc.so_reuseport", 0)]
    )
    run_service_pb2_grpc.add_RunServiceServicer_to_server(Constant(), server)
    await serve_on_free_port(server)


def _start(resources: contextlib.ExitStack, mode: str) -> tuple[str, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.getrun_floor", "--serve", mode],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    resources.callback(_stop, process)
    return f"127.0.0.1:{_read_port(process)}", process.pid


def measure(rounds: int, requests: int, work: Path) -> list[str]:
    from convergence.v1 import run_service_pb2

    body = grpc_frame(run_service_pb2.GetRunRequest(pipeline_logging_id=RUN_ID).SerializeToString())
    headers = {"content-type": "application/grpc", "te": "trailers", "x-api-key": KEY}
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with contextlib.ExitStack() as resources:
        echo, echo_pid = start_echo_server(resources)
        servers = {"echo": (echo_scenario(echo), echo_pid)}
        for mode in MODES:
            target, pid = _start(resources, mode)
            servers[mode] = (Scenario(mode, f"http://{target}{GET_RUN}", headers, body), pid)
        for scenario, _ in servers.values():
            h2load(scenario, WARMUP, CONCURRENCY, work, None)
        for round_ in range(rounds):
            for name in servers if round_ % 2 == 0 else list(servers)[::-1]:
                scenario, pid = servers[name]
                before = _cpu_seconds(pid)
                output = h2load(scenario, requests, CONCURRENCY, work, None)
                cpu.setdefault(name, []).append(1000 * (_cpu_seconds(pid) - before) / requests)
                rates.setdefault(name, []).append(parse(output, RATE))
    echo_rate = statistics.median(rates["echo"])
    rows = [
        "| server | req/s, median | ratio to the echo | server CPU ms per call, median "
        "| req/s in each round |",
        "|---|---:|---:|---:|---|",
    ]
    for name, each in rates.items():
        rate = statistics.median(each)
        rows.append(
            f"| {name} | {rate:,.0f} | {rate / echo_rate:.2f} | {statistics.median(cpu[name]):.3f} "
            f"| {', '.join(f'{r:.0f}' for r in each)} |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.getrun_floor", description=__doc__)
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve))
        return 0
    with tempfile.TemporaryDirectory() as work:
        rows = measure(args.rounds, args.requests, Path(work))
    print(f"{args.rounds} rounds of {args.requests} calls, concurrency {CONCURRENCY}\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
