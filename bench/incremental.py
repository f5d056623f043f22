"""Daily runs over one billing-period file: reloading it every run against loading it once.

`python -m bench.incremental` writes a `--rows` AWS CUR CSV whose rows spread over `--days`
days (copies of the sample with their own line-item IDs and usage accounts), then runs
`aws/cost/cost_usage` once per day, one run after another, twice on the same stack and
tenant:

- reload: a copy of the template without `reuse: true`, so each run loads the whole file;
- reuse: the shipped template (`reuse: true`): the first run loads the file, the others
  read the rows already loaded, since the file's version (size, modification time) has
  not changed.

Baselines, measured in the same run: a raw DuckDB `CREATE TABLE AS SELECT * FROM
read_csv(..., all_varchar = true)` of the file in a fresh file database (as in
`bench.pipelines` part 3), and a run that loads the whole file: the first reload run, and
the median reload run (each reload run does the same work; one run alone varies by a
third on a busy machine). The goal: all the reuse runs together cost less than twice one
full load. Each run's
duration_ms is the server's own; the server's CPU seconds cover each scenario from its
first trigger to its last run's end.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import yaml

from bench.api_overhead import _cpu_seconds
from bench.pipelines import (
    COST,
    Session,
    make_workspace,
    open_session,
    raw_file_load,
    run_request,
    wait_for_run,
    write_cur,
)
from convergence.v1 import pipeline_service_pb2_grpc, run_pb2

FIRST_DAY = date(2023, 11, 7)  # the days stay inside the sample's billing period
RELOAD = ("aws", "cost", "cost_usage_reload")


@dataclass(frozen=True)
class Scenario:
    name: str
    runs: list[run_pb2.Run]
    wall: float
    server_cpu: float

    @property
    def seconds(self) -> float:
        return sum(r.duration_ms for r in self.runs) / 1000


def add_reload_template(configs: Path) -> None:
    """configs/aws/cost/cost_usage_reload.yml: the AWS template, loading the file every run."""
    template = yaml.safe_load((configs / "aws" / "cost" / "cost_usage.yml").read_text())
    for step in template["steps"]:
        step.pop("reuse", None)
    (configs / "aws" / "cost" / "cost_usage_reload.yml").write_text(yaml.safe_dump(template))


def daily_runs(
    session: Session, name: str, template: tuple[str, str, str], source: Path, days: int
) -> Scenario:
    print(f"running: {name}", file=sys.stderr, flush=True)
    stub = pipeline_service_pb2_grpc.PipelineServiceStub(session.channel)
    cpu, start = _cpu_seconds(session.stack.server.pid), time.perf_counter()
    runs = []
    for k in range(days):
        request = run_request(
            session.tenant, template, FIRST_DAY + timedelta(days=k), {"source_uri": str(source)}
        )
        response = stub.RunPipeline(request, timeout=30, metadata=session.tenant.metadata)
        runs.append(wait_for_run(session, response.pipeline_logging_id, 600, poll=0.2))
    wall = time.perf_counter() - start
    return Scenario(name, runs, wall, _cpu_seconds(session.stack.server.pid) - cpu)


def render(rows: int, mib: float, baseline: float, scenarios: Sequence[Scenario]) -> str:
    reload = [r.duration_ms / 1000 for r in scenarios[0].runs]
    first, typical = reload[0], statistics.median(reload)
    lines = [
        f"{rows:,} rows over {len(reload)} days, {mib:,.0f} MiB CSV; baselines: a raw DuckDB "
        f"load of the file {baseline:.1f} s; a run that loads the whole file: the first reload "
        f"run {first:.1f} s, the median reload run {typical:.1f} s",
        "",
        "| scenario | runs COMPLETE | first run s | other runs s (mean) | all runs s "
        "| ratio to the raw load | ratio to the first reload run "
        "| ratio to the median reload run | server CPU s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scenarios:
        durations = [r.duration_ms / 1000 for r in s.runs]
        rest = durations[1:] or [0.0]
        complete = sum(r.status == run_pb2.Run.COMPLETE for r in s.runs)
        lines.append(
            f"| {s.name} | {complete}/{len(s.runs)} | {durations[0]:.1f} | "
            f"{sum(rest) / len(rest):.2f} | {s.seconds:.1f} | {s.seconds / baseline:.2f} | "
            f"{s.seconds / first:.2f} | {s.seconds / typical:.2f} | {s.server_cpu:.1f} | "
            f"{s.wall:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.incremental", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the CUR file")
    parser.add_argument("--days", type=int, default=15, help="days the rows spread over")
    parser.add_argument("--workers", type=int, default=4, help="CONVERGENCE_WORKERS")
    args = parser.parse_args(argv)
    if args.rows < args.days or not 1 <= args.days <= 20:
        parser.error("--days must be 1 to 20 and --rows at least --days")
    with contextlib.ExitStack() as resources:
        workspace = make_workspace(resources)
        add_reload_template(workspace.configs)
        session = open_session(resources, workspace, "incremental", workers=args.workers)
        # A tenant's runs read only its own folder of a source root.
        source = workspace.sources / session.tenant.tenant_id / "aws_cur.csv"
        source.parent.mkdir()
        print(f"writing {args.rows:,} CUR rows", file=sys.stderr, flush=True)
        write_cur(source, args.rows, FIRST_DAY, args.days)
        baseline = raw_file_load("baseline: raw DuckDB load", source, workspace)
        scenarios = [
            daily_runs(session, "reload: every run loads the file", RELOAD, source, args.days),
            daily_runs(session, "reuse: the file loaded once", COST, source, args.days),
        ]
        problems = session.problems()
        mib = source.stat().st_size / 2**20
    print(render(args.rows, mib, baseline.seconds, scenarios))
    failed = [r for s in scenarios for r in s.runs if r.status != run_pb2.Run.COMPLETE]
    for run in failed[:5]:
        status = run_pb2.Run.Status.Name(run.status)
        print(f"run {run.pipeline_logging_id} ended {status}: {run.error_message}", file=sys.stderr)
    for line in problems[:20]:
        print(f"logged {line}", file=sys.stderr)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
