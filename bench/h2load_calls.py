"""Calls through the API layers, measured with h2load: a client whose own cost is small.

`python -m bench.h2load_calls` needs `h2load` (Debian's `nghttp2-client`). It starts, on
loopback only, the bare grpc.aio echo server of `bench.api_overhead` and the real stack
(gRPC server + Envoy, fresh temporary data directory, an unmetered plan), onboards a
tenant, completes one run, then measures each scenario with one h2load process:
`-n N -c C -m 1` (C connections with one request in flight on each: a closed loop of C),
after a warm-up of W requests on the same settings.

- the echo, gRPC (h2c): the baseline;
- GetRun + API key, gRPC direct (h2c; the gRPC framing of the request is written here);
- GetRun + API key, gRPC via Envoy;
- GET run + API key, REST via Envoy, over HTTP/2 (h2c) and over HTTP/1.1 (`--h1`).

With `--rounds R` the scenarios are measured R times, their order reversed every other round
(the machine's drift between scenarios measured minutes apart moved the echo alone 2-3
times more than the code did); each row is then the scenario's round of median req/s, and
GetRun's ratio to the echo is given round by round, with its median.

With `--triggers` it measures instead, on a stack with no workers (`CONVERGENCE_WORKERS=0`)
and the configs of `bench.pipelines` (the `test/runs/quick` template, the BENCH plan whose
limits never bind): the authenticated GetHealth (the baseline), then RunPipeline of
`test/runs/quick` over direct gRPC, each call a new run persisted PENDING with its quota
reserved.

A call counts only when it succeeded. gRPC answers errors with HTTP 200, so for the calls to
our server the count is the server's request log's OK lines for the run (the production
default logs one line per call); for REST, h2load's own 2xx count as well. The client's CPU
is h2load's user + system time (from `wait4`), the servers' from Linux's /proc. The exit
status is 1 when a call failed or a server logged a warning or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import pipelines
from bench.api_overhead import (
    ECHO_PAYLOAD,
    UNMETERED_PLAN,
    _cpu_seconds,
    completed_run,
    log_problems,
    log_sizes,
    onboard,
    start_bench_stack,
    start_echo_server,
)
from bench.echo_server import FULL_METHOD as ECHO_METHOD
from convergence.v1 import health_service_pb2, run_service_pb2
from convergence_server.config import REPO_ROOT

H2LOAD = "h2load"
GET_RUN = "/convergence.v1.RunService/GetRun"
GET_HEALTH = "/convergence.v1.HealthService/GetHealth"
RUN_PIPELINE = "/convergence.v1.PipelineService/RunPipeline"
TIMEOUT = 600  # one h2load run, at most (seconds)


@dataclass(frozen=True)
class Scenario:
    name: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None  # a POST's body (gRPC); None: a GET
    http1: bool = False
    ok_marker: str = ""  # counted in the server's log: the call's OK request lines


@dataclass(frozen=True)
class Outcome:
    name: str
    requests: int
    succeeded: int
    seconds: float
    latencies_us: list[int]
    client_cpu: float
    server_cpu: float

    @property
    def rate(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: int) -> float:
        cuts = statistics.quantiles(self.latencies_us, n=100, method="inclusive")
        return cuts[q - 1] / 1000


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message: flag 0, 4-byte big-endian length, the bytes."""
    return struct.pack(">BI", 0, len(message)) + message


def h2load(scenario: Scenario, requests: int, clients: int, work: Path, log: Path | None) -> str:
    """Runs h2load once (one thread: the client stays small); returns what it printed."""
    command = [H2LOAD, "-n", str(requests), "-c", str(clients), "-m", "1", "-t", "1"]
    for name, value in scenario.headers.items():
        command += ["-H", f"{name}: {value}"]
    if scenario.body is not None:
        body = work / "body.bin"
        body.write_bytes(scenario.body)
        command += ["-d", str(body)]
    if scenario.http1:
        command.append("--h1")
    if log is not None:
        command += ["--log-file", str(log)]
    command.append(scenario.url)
    done = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT,
        check=False,
    )
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {output[-2000:]}")
    return output


def parse(output: str, pattern: str) -> float:
    match = re.search(pattern, output)
    if match is None:
        raise RuntimeError(f"h2load printed no {pattern!r}:\n{output}")
    return float(match.group(1))


def children_cpu() -> float:
    """CPU seconds of this process's finished children (the h2load runs)."""
    usage = os.times()
    return usage.children_user + usage.children_system


def count_ok(log_dir: Path, since: dict[str, int], marker: str) -> int:
    """The server's OK request lines naming `marker`, written after `since`."""
    with (log_dir / "server.log").open("rb") as log:
        log.seek(since.get("server.log", 0))
        text = log.read().decode(errors="replace")
    return sum('"grpc_code": "OK"' in line and marker in line for line in text.splitlines())


def logged_ok(log_dir: Path, since: dict[str, int], marker: str, done: int) -> int:
    """How many of `done` calls the server logged OK after `since`. A request line is
    written as its call ends: the last ones may still be on the way (waited for 10 s)."""
    deadline = time.monotonic() + 10
    while (ok := count_ok(log_dir, since, marker)) < done and time.monotonic() < deadline:
        time.sleep(0.1)
    return min(done, ok)


def measure(
    scenario: Scenario, args: argparse.Namespace, work: Path, log_dir: Path, pids: Sequence[int]
) -> Outcome:
    print(f"running: {scenario.name}", file=sys.stderr, flush=True)
    h2load(scenario, args.warmup, args.concurrency, work, None)
    before = log_sizes(log_dir)
    client, servers = children_cpu(), sum(_cpu_seconds(p) for p in pids)
    log = work / "requests.log"
    output = h2load(scenario, args.requests, args.concurrency, work, log)
    client = children_cpu() - client
    servers = sum(_cpu_seconds(p) for p in pids) - servers
    succeeded = int(parse(output, r"(\d+) succeeded"))
    if scenario.ok_marker:
        succeeded = logged_ok(log_dir, before, scenario.ok_marker, succeeded)
    # --log-file: one line per request: its start, status and duration (microseconds).
    latencies = [int(line.split("\t")[2]) for line in log.read_text().splitlines() if line]
    seconds = parse(output, r"finished in ([\d.]+)s")
    return Outcome(scenario.name, args.requests, succeeded, seconds, latencies, client, servers)


def echo_scenario(echo: str) -> Scenario:
    """The bare grpc.aio echo at `echo` (host:port): the baseline."""
    headers = {"content-type": "application/grpc", "te": "trailers"}
    return Scenario(
        "baseline: bare grpc.aio echo",
        f"http://{echo}{ECHO_METHOD}",
        headers,
        grpc_frame(ECHO_PAYLOAD),
    )


def scenarios(
    echo: str, grpc_target: str, http_url: str, api_key: str, run_id: str
) -> list[Scenario]:
    """The baseline first; GetRun gRPC direct second (the REST rows' reference)."""
    grpc_headers = {"content-type": "application/grpc", "te": "trailers"}
    keyed = {**grpc_headers, "x-api-key": api_key}
    get_run = grpc_frame(
        run_service_pb2.GetRunRequest(pipeline_logging_id=run_id).SerializeToString()
    )
    envoy = http_url.removeprefix("http://")
    rest = f"{http_url}/api/v1/pipelines/runs/{run_id}"
    return [
        echo_scenario(echo),
        Scenario(
            "GetRun + API key, gRPC direct",
            f"http://{grpc_target}{GET_RUN}",
            keyed,
            get_run,
            ok_marker=GET_RUN,
        ),
        Scenario(
            "GetRun + API key, gRPC via Envoy",
            f"http://{envoy}{GET_RUN}",
            keyed,
            get_run,
            ok_marker=GET_RUN,
        ),
        Scenario(
            "GET run + API key, REST via Envoy, HTTP/2",
            rest,
            {"x-api-key": api_key},
            ok_marker=run_id,
        ),
        Scenario(
            "GET run + API key, REST via Envoy, HTTP/1.1",
            rest,
            {"x-api-key": api_key},
            http1=True,
            ok_marker=run_id,
        ),
    ]


def trigger_scenarios(grpc_target: str, tenant: pipelines.Tenant) -> list[Scenario]:
    """The authenticated GetHealth first (the baseline), then RunPipeline (a new run each)."""
    headers = {"content-type": "application/grpc", "te": "trailers", "x-api-key": tenant.api_key}
    health = health_service_pb2.GetHealthRequest().SerializeToString()
    trigger = pipelines.run_request(tenant, pipelines.QUICK).SerializeToString()
    return [
        Scenario(
            "baseline: GetHealth + API key, gRPC direct",
            f"http://{grpc_target}{GET_HEALTH}",
            headers,
            grpc_frame(health),
            ok_marker=GET_HEALTH,
        ),
        Scenario(
            "RunPipeline test/runs/quick + API key, gRPC direct",
            f"http://{grpc_target}{RUN_PIPELINE}",
            headers,
            grpc_frame(trigger),
            ok_marker=RUN_PIPELINE,
        ),
    ]


def measure_triggers(args: argparse.Namespace) -> tuple[list[Outcome], list[str]]:
    with contextlib.ExitStack() as resources:
        workspace = pipelines.make_workspace(resources)
        session = pipelines.open_session(resources, workspace, "triggers", workers=0)
        outcomes = [
            measure(s, args, workspace.root, session.log_dir, (session.stack.server.pid,))
            for s in trigger_scenarios(session.stack.grpc_target, session.tenant)
        ]
        return outcomes, session.problems()


def render(
    outcomes: Sequence[Outcome],
    baseline_name: str = "the echo",
    direct_name: str | None = "GetRun gRPC direct",
) -> str:
    baseline = outcomes[0].rate
    direct = outcomes[1].rate if direct_name else 0.0
    rows = [
        f"| scenario | requests | succeeded | req/s | p50 ms | p99 ms | ratio to {baseline_name} "
        + (f"| ratio to {direct_name} " if direct_name else "")
        + "| CPU ms/req client (h2load) / servers |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if direct_name else "") + "---:|",
    ]
    for o in outcomes:
        rows.append(
            f"| {o.name} | {o.requests} | {o.succeeded} | {o.rate:,.0f} | "
            f"{o.percentile_ms(50):.2f} | {o.percentile_ms(99):.2f} | {o.rate / baseline:.2f} | "
            + (f"{o.rate / direct:.2f} | " if direct_name else "")
            + f"{1000 * o.client_cpu / o.requests:.3f} / "
            f"{1000 * o.server_cpu / o.requests:.3f} |"
        )
    return "\n".join(rows)


def measure_calls(args: argparse.Namespace) -> tuple[list[list[Outcome]], list[str]]:
    """Each scenario's outcome in each round (the scenarios' order reversed every other
    round, so that a machine getting faster or slower moves every scenario alike)."""
    with contextlib.ExitStack() as resources:
        work = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        configs = work / "configs"
        shutil.copytree(REPO_ROOT / "configs", configs)
        with (configs / "plans.yml").open("a") as plans:
            plans.write(UNMETERED_PLAN)
        echo, echo_pid = start_echo_server(resources)
        data_dir = work / "data"
        stack = start_bench_stack(resources, data_dir, CONVERGENCE_CONFIG_DIR=str(configs))
        api_key = onboard(stack.http_url)
        run_id = completed_run(stack.http_url, api_key)
        log_dir = data_dir / "logs"
        logs_before = log_sizes(log_dir)
        pids = (echo_pid, stack.server.pid, stack.envoy.pid)
        measured = scenarios(echo, stack.grpc_target, stack.http_url, api_key, run_id)
        rounds: list[list[Outcome]] = []
        for number in range(args.rounds):
            order = measured if number % 2 == 0 else measured[::-1]
            outcome = {s.name: measure(s, args, work, log_dir, pids) for s in order}
            rounds.append([outcome[s.name] for s in measured])
        return rounds, log_problems(log_dir, logs_before)


def median_outcomes(rounds: Sequence[Sequence[Outcome]]) -> list[Outcome]:
    """Each scenario's round of median rate (the lower of the two middle ones)."""
    return [
        sorted(each, key=lambda o: o.rate)[(len(each) - 1) // 2]
        for each in zip(*rounds, strict=True)
    ]


def ratios_to_baseline(rounds: Sequence[Sequence[Outcome]], index: int) -> list[float]:
    """Scenario `index`'s rate over the baseline's, round by round."""
    return [r[index].rate / r[0].rate if r[0].rate else 0.0 for r in rounds]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.h2load_calls", description=__doc__)
    parser.add_argument("--requests", type=int, default=20000, help="timed requests per scenario")
    parser.add_argument("--concurrency", type=int, default=8, help="connections, one call each")
    parser.add_argument("--warmup", type=int, default=2000, help="warm-up requests per scenario")
    parser.add_argument(
        "--triggers", action="store_true", help="GetHealth and RunPipeline (see above)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of the calls' scenarios, alternating their order; medians reported",
    )
    args = parser.parse_args(argv)
    if args.requests < 2 or args.concurrency < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--requests must be at least 2, --concurrency, --warmup and --rounds positive")
    if args.triggers and args.rounds != 1:
        parser.error("--rounds is for the calls' scenarios, not --triggers")
    if shutil.which(H2LOAD) is None:
        parser.error("h2load is not installed (Debian: apt-get install nghttp2-client)")
    if args.triggers:
        outcomes, problems = measure_triggers(args)
        table = render(outcomes, "GetHealth", None)
    else:
        rounds, problems = measure_calls(args)
        outcomes = [o for each in rounds for o in each]
        table = render(median_outcomes(rounds))
        if args.rounds > 1:
            ratios = ratios_to_baseline(rounds, 1)
            table = (
                f"Each row: the scenario's round of median req/s, of {args.rounds}.\n\n{table}\n\n"
                f"GetRun gRPC direct / the echo, round by round: "
                f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}"
            )
    version = subprocess.run([H2LOAD, "--version"], capture_output=True, text=True, check=False)
    print(
        f"{args.requests} requests per scenario, {args.concurrency} connections with one call "
        f"each, warm-up {args.warmup}; nproc {os.cpu_count()}, {version.stdout.strip()}\n"
    )
    print(table)
    failed = [o for o in outcomes if o.succeeded < o.requests]
    for o in failed:
        print(f"{o.name}: {o.requests - o.succeeded} calls did not succeed", file=sys.stderr)
    for line in problems[:20]:
        print(f"logged {line}", file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
