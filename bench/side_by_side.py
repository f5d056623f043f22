"""Two or more servers measured side by side, for changes smaller than this machine's drift.

`python -m bench.side_by_side [--calls getrun|triggers] SIDE SIDE...` starts one stack per
SIDE at once (on loopback, each with its own temporary data directory, the configs and the
`BENCH` plan of `bench.pipelines`), then measures them in turns: each round runs
`--requests` calls of the authenticated GetHealth and of the measured call against every
side, the sides' order reversed every other round, with h2load (`-c C -m 1`, one thread;
Debian's `nghttp2-client`). A side's rounds are spread over the whole run, so a machine
that gets faster or slower over the minutes moves every side alike; the medians are
printed, with every round's rate.

A SIDE is a source tree (the server is started from `TREE/server`), optionally followed by
`:NAME=VALUE,...` environment settings for its server, e.g. `.` against
`.:CONVERGENCE_REQUEST_LOG=off`, or a worktree of another commit against this one.

- `getrun`: GetRun of a run that ended, over direct gRPC, concurrency 8 (a stack with one
  worker, which runs the run first);
- `triggers`: RunPipeline of `test/runs/quick`, concurrency 16, no workers.

With `--echo`, the bare grpc.aio echo of `bench.api_overhead` is measured in every round
too (before the sides in even rounds, after them in odd ones), and each side's median
GetRun is given as a ratio to the echo's median.

The server's CPU per call comes from /proc. This measures relative costs only: the
absolute rates are those of several stacks sharing the machine. gRPC answers an error with
HTTP 200, which h2load counts as done: a call to a side counts only when its server logged
it OK (the default request log; with `CONVERGENCE_REQUEST_LOG=off`, h2load's count), and
the command exits with status 1, naming the calls, when one did not succeed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import pipelines
from bench.api_overhead import _cpu_seconds, log_sizes, start_echo_server
from bench.h2load_calls import (
    GET_RUN,
    H2LOAD,
    Scenario,
    echo_scenario,
    grpc_frame,
    h2load,
    logged_ok,
    parse,
    trigger_scenarios,
)
from convergence.v1 import pipeline_service_pb2_grpc, run_service_pb2

WARMUP = 1000
ECHO = "bare grpc.aio echo"
RATE = r"finished in [\d.]+m?s, ([\d.]+) req/s"


@dataclass(frozen=True)
class Side:
    label: str
    tree: Path
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Side:
        tree, _, settings = text.partition(":")
        env = dict(s.split("=", 1) for s in settings.split(",") if s)
        return cls(text, Path(tree).resolve(), env)


def _scenarios(session: pipelines.Session, calls: str) -> list[tuple[str, Scenario]]:
    health, trigger = trigger_scenarios(session.stack.grpc_target, session.tenant)
    if calls == "triggers":
        return [("GetHealth", health), ("RunPipeline", trigger)]
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(session.channel)
    run = stub.RunPipeline(
        pipelines.run_request(session.tenant, pipelines.QUICK), metadata=session.tenant.metadata
    )
    pipelines.wait_for_run(session, run.pipeline_logging_id, timeout=120, poll=0.05)
    request = run_service_pb2.GetRunRequest(pipeline_logging_id=run.pipeline_logging_id)
    get_run = Scenario(
        "GetRun",
        f"http://{session.stack.grpc_target}{GET_RUN}",
        health.headers,
        grpc_frame(request.SerializeToString()),
        ok_marker=GET_RUN,
    )
    return [("GetHealth", health), ("GetRun", get_run)]


def measure(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The table's rows, and the calls that did not succeed."""
    sides = [Side.parse(s) for s in args.sides]
    concurrency = 16 if args.calls == "triggers" else 8
    rates: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    failed: list[str] = []
    with contextlib.ExitStack() as resources:
        workspace = pipelines.make_workspace(resources)
        plans: dict[str, tuple[int, Path | None, list[tuple[str, Scenario]]]] = {}
        for number, side in enumerate(sides):
            # The side's server is started from its tree, with its settings.
            path = f"{side.tree / 'server'}{os.pathsep}{side.tree / 'clients' / 'python'}"
            session = pipelines.open_session(
                resources,
                workspace,
                f"side{number}",
                workers=int(args.calls == "getrun"),
                **{"PYTHONPATH": path, **side.env},
            )
            # Without request lines (`CONVERGENCE_REQUEST_LOG=off`), h2load's count stands.
            logs = side.env.get("CONVERGENCE_REQUEST_LOG", "on").lower() == "on"
            plans[side.label] = (
                session.stack.server.pid,
                session.log_dir if logs else None,
                _scenarios(session, args.calls),
            )
        labels = [side.label for side in sides]
        if args.echo:
            echo, echo_pid = start_echo_server(resources)
            plans[ECHO] = (echo_pid, None, [("echo", echo_scenario(echo))])
            labels.insert(0, ECHO)
        for _, _, scenarios in plans.values():
            for _, scenario in scenarios:
                h2load(scenario, WARMUP, concurrency, workspace.root, None)
        for round_ in range(args.rounds):
            for label in labels if round_ % 2 == 0 else labels[::-1]:
                pid, log_dir, scenarios = plans[label]
                for name, scenario in scenarios:
                    before, logged = _cpu_seconds(pid), log_sizes(log_dir) if log_dir else {}
                    output = h2load(scenario, args.requests, concurrency, workspace.root, None)
                    spent = _cpu_seconds(pid) - before
                    done = int(parse(output, r"(\d+) succeeded"))
                    if log_dir is not None and scenario.ok_marker:
                        done = logged_ok(log_dir, logged, scenario.ok_marker, done)
                    if bad := args.requests - done:
                        failed.append(f"{name} of `{label}`, round {round_ + 1}: {bad} calls")
                    rates.setdefault((name, label), []).append(parse(output, RATE))
                    cpu.setdefault((name, label), []).append(1000 * spent / args.requests)
    rows = [
        "| call | side | req/s, median | server CPU ms per call, median | req/s in each round |",
        "|---|---|---:|---:|---|",
    ]
    order = {"echo": 0, "GetHealth": 1}
    for name, label in sorted(rates, key=lambda key: (order.get(key[0], 2), key[0])):
        each = rates[name, label]
        rows.append(
            f"| {name} | `{label}` | {statistics.median(each):,.0f} | "
            f"{statistics.median(cpu[name, label]):.3f} | {', '.join(f'{r:.0f}' for r in each)} |"
        )
    if ("echo", ECHO) in rates and args.calls == "getrun":
        echo_rate = statistics.median(rates["echo", ECHO])
        rows.append("")
        rows.extend(
            f"GetRun of `{label}` / the echo: {statistics.median(each) / echo_rate:.2f}"
            for (name, label), each in rates.items()
            if name == "GetRun"
        )
    return rows, failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.side_by_side", description=__doc__)
    parser.add_argument("sides", nargs="+", help="TREE or TREE:NAME=VALUE,...")
    parser.add_argument("--calls", choices=("getrun", "triggers"), default="getrun")
    parser.add_argument("--echo", action="store_true", help="measure the echo in every round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8000, help="calls per scenario a round")
    args = parser.parse_args(argv)
    if len(args.sides) < 2 or args.rounds < 1 or args.requests < 1:
        parser.error("give at least two sides, a positive --rounds and --requests")
    if shutil.which(H2LOAD) is None:
        parser.error("h2load is not installed (Debian: apt-get install nghttp2-client)")
    print(
        f"{args.calls}: {args.rounds} rounds of {args.requests} calls per scenario and side; "
        f"nproc {os.cpu_count()}\n"
    )
    rows, failed = measure(args)
    print("\n".join(rows))
    for calls in failed:
        print(f"did not succeed: {calls}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
