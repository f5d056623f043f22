"""What the cost templates' tests share: a tenant on its own pipeline stack with its own
source folder, edited copies of the sample exports, runs over REST, their data-quality
checks, and SQL on the tenant's tables once the stack is stopped."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import httpx

from convergence_server.config import REPO_ROOT
from convergence_server.stack import Stack
from tests.conftest import UNMETERED, StackFactory, database_path, onboard, trigger, wait_for_run

SAMPLES = REPO_ROOT / "configs" / "sample_data"
AWS = "aws/cost/cost_usage"
AZURE = "azure/cost/cost_management"
GCP = "gcp/cost/cost_billing"

Row = dict[str, Any]


def read_csv(path: Path) -> tuple[list[str], list[Row]]:
    with path.open(newline="", encoding="utf-8-sig") as source:
        reader = csv.DictReader(source)
        return list(reader.fieldnames or []), list(reader)


def csv_text(header: list[str], rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_ndjson(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ndjson_text(rows: list[Row]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


class CostTenant:
    """One tenant (plan UNMETERED) on `stack`, reading sources from its own folder."""

    def __init__(self, stack: Stack, http: httpx.Client, folder: Path) -> None:
        self.stack = stack
        self.http = http
        self.tenant_id, self.key = onboard(http, plan=UNMETERED)
        self.folder = folder / self.tenant_id  # a tenant reads only its own folder
        self.folder.mkdir()

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}

    def source(self, name: str, text: str) -> str:
        """Writes a source file in the tenant's folder; returns its path for `source_uri`."""
        path = self.folder / name
        path.write_text(text)
        return str(path)

    def run(self, template: str, day: str, **parameters: str) -> dict[str, Any]:
        """Triggers `template` for `day` and waits for its end; returns the run."""
        body: dict[str, object] = {"date": day}
        if parameters:
            body["parameters"] = parameters
        triggered = trigger(self.http, self.key, self.tenant_id, template, **body)
        return wait_for_run(self.http, self.key, str(triggered["pipeline_logging_id"]))

    def checks(self, run_id: str) -> list[dict[str, Any]]:
        """The run's data-quality results, through the REST API."""
        response = self.http.get(f"/api/v1/pipelines/runs/{run_id}/checks", headers=self.headers)
        assert response.status_code == 200, response.text
        return list(response.json().get("checks", []))

    def failed_checks(self, run_id: str) -> dict[str, str]:
        """{check name: severity} of the checks that failed in the run."""
        return {
            c["check_name"]: c["severity"] for c in self.checks(run_id) if c["status"] == "FAILED"
        }

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """SQL on the store once the stack is stopped; `{t}` is the tenant's dataset."""
        with duckdb.connect(str(database_path(self.stack)), read_only=True) as db:
            db.execute("SET TimeZone = 'UTC'")
            return db.execute(sql.replace("{t}", f'"{self.tenant_id}"')).fetchall()


@contextmanager
def cost_tenant(
    stack_factory: StackFactory, pipeline_env: dict[str, str], sources_dir: Path, data_dir: Path
) -> Iterator[CostTenant]:
    """A pipeline stack of its own with one tenant; the caller stops the stack (`.stack.stop()`)
    before reading tables with `query`."""
    stack = stack_factory(data_dir=data_dir, **pipeline_env)
    with httpx.Client(base_url=stack.http_url, timeout=60) as http:
        yield CostTenant(stack, http, sources_dir)


Edit = Callable[[list[Row]], list[Row]]
