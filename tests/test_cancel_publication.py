"""A cancel that meets a run's publication, on both stores: a cancel asked after the run's
last step boundary but before its publication ends it FAILED with nothing published; one
asked once the publication has committed is refused (409) and the run ends COMPLETE.
Never both: a cancel accepted and the run's results published.

Fault points hold the run just before its publication and just after it, so each case
meets the publication every time (the window is otherwise a few milliseconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from convergence_server import faults
from convergence_server.stack import Stack
from tests.conftest import (
    UNMETERED,
    StackFactory,
    eventually,
    new_prefix,
    onboard,
    trigger,
    wait_for_run,
)
from tests.test_abuse import server_log
from tests.test_crash_safety import stored_count, table_exists

pytestmark = pytest.mark.timeout(900)


# (template, day, parameters, destination): a staged publication, and rows written into
# place by their step (the embedded store's CUR normalization: a transaction left open
# from the step to the publication).
class Pipeline(NamedTuple):
    template: str
    day: str
    parameters: dict[str, str]
    table: str


PIPELINES = [
    pytest.param(Pipeline("test/runs/quick", "2025-11-19", {}, "quick_rows"), id="staged"),
    pytest.param(
        Pipeline(
            "aws/cost/cost_usage",
            "2023-11-04",
            {"source_uri": "{sample_data}/aws_cur_sample.csv"},
            "focus_aws_cost",
        ),
        id="in_place",
    ),
]
POINTS = ",".join(
    [
        faults.BEFORE_PUBLICATION,
        faults.AFTER_PUBLICATION,
        faults.BEFORE_CANCEL,
        faults.BEFORE_PUBLISH_TRANSACTION,
    ]
)


class Held:
    """A stack whose runs can be held before or after their publication."""

    def __init__(self, stack: Stack, rows: Callable[[str, str], int]) -> None:
        self.stack = stack
        self.rows = rows  # the rows of a tenant's table, at the end of a test
        self.holds = stack.run_dir.parent / "hold"
        self.holds.mkdir(exist_ok=True)


@pytest.fixture(params=["embedded", "bigquery"])
def held(
    request: pytest.FixtureRequest,
    stack_factory: StackFactory,
    pipeline_env: dict[str, str],
    tmp_path: Path,
) -> Iterator[Held]:
    if request.param == "embedded":
        stack = stack_factory(tmp_path, **pipeline_env, CONVERGENCE_FAULT_POINTS=POINTS)

        def rows(tenant_id: str, table: str) -> int:
            stack.stop()  # the server holds the file while it runs
            if not table_exists(stack, tenant_id, table):
                return 0
            return stored_count(stack, f'SELECT COUNT(*) FROM "{tenant_id}"."{table}"')

        yield Held(stack, rows)
    else:
        emulator = request.getfixturevalue("emulator")
        prefix = new_prefix()
        stack = stack_factory(
            tmp_path, **pipeline_env, **emulator.env(prefix), CONVERGENCE_FAULT_POINTS=POINTS
        )

        def published(tenant_id: str, table: str) -> int:
            dataset = f"{prefix}{tenant_id}"
            tables = emulator.query(
                f"SELECT COUNT(*) AS n FROM `{dataset}.INFORMATION_SCHEMA.TABLES` "
                f"WHERE table_name = '{table}'"
            )
            if not tables[0]["n"]:
                return 0
            return int(emulator.query(f"SELECT COUNT(*) AS n FROM `{dataset}.{table}`")[0]["n"])

        yield Held(stack, published)
    stack.stop()


@pytest.fixture(params=PIPELINES)
def pipeline(request: pytest.FixtureRequest) -> Pipeline:
    return request.param


def cancel_held_at(
    held: Held, point: str, pipeline: Pipeline
) -> tuple[str, httpx.Response, dict[str, Any]]:
    """A new tenant's run held at `point`, cancelled there, then let go: the tenant, the
    cancel's answer and the run once it has ended."""
    log_line = f"fault point {point}: holding"
    before = server_log(held.stack).count(log_line)
    with httpx.Client(base_url=held.stack.http_url, timeout=300) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        (held.holds / point).touch()
        try:
            run = trigger(
                http,
                key,
                tenant_id,
                pipeline.template,
                date=pipeline.day,
                parameters=pipeline.parameters,
            )
            run_id = run["pipeline_logging_id"]
            eventually(
                lambda: server_log(held.stack).count(log_line) > before,
                f"the run held at {point}",
                timeout=300,
            )
            answer = http.post(
                f"/api/v1/pipelines/runs/{run_id}:cancel", headers={"X-API-Key": key}, json={}
            )
        finally:
            (held.holds / point).unlink()
        return tenant_id, answer, wait_for_run(http, key, run_id)


def test_a_cancel_before_the_publication_stops_it(held: Held, pipeline: Pipeline) -> None:
    tenant_id, accepted, ended = cancel_held_at(held, faults.BEFORE_PUBLICATION, pipeline)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["run"]["status"] == "RUNNING"
    assert ended["status"] == "FAILED", ended
    assert ended["error_message"].startswith("Cancelled"), ended
    assert held.rows(tenant_id, pipeline.table) == 0


def test_a_cancel_after_the_publication_is_refused(held: Held, pipeline: Pipeline) -> None:
    tenant_id, refused, ended = cancel_held_at(held, faults.AFTER_PUBLICATION, pipeline)
    assert refused.status_code == 409, refused.text
    assert "too late to cancel" in refused.json()["message"]
    assert ended["status"] == "COMPLETE", ended
    assert held.rows(tenant_id, pipeline.table) > 0


def test_a_cancel_of_a_run_that_ended_meanwhile_is_refused(held: Held) -> None:
    """The cancel read the run RUNNING; the run ended COMPLETE before the cancel changed
    it: 409 on both stores (BigQuery answered 200 with the ended run)."""
    staged = PIPELINES[0].values[0]
    cancelling = held.holds / faults.BEFORE_CANCEL
    line = f"fault point {faults.BEFORE_CANCEL}: holding"
    before = server_log(held.stack).count(line)
    with httpx.Client(base_url=held.stack.http_url, timeout=300) as http:
        tenant_id, key = onboard(http, plan=UNMETERED)
        (held.holds / faults.AFTER_PUBLICATION).touch()
        cancelling.touch()
        try:
            run = trigger(http, key, tenant_id, staged.template, date=staged.day)
            run_id = run["pipeline_logging_id"]
            wait_for_run(http, key, run_id, ("RUNNING",))
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(
                    http.post,
                    f"/api/v1/pipelines/runs/{run_id}:cancel",
                    headers={"X-API-Key": key},
                    json={},
                )
                eventually(lambda: server_log(held.stack).count(line) > before, "the cancel held")
                (held.holds / faults.AFTER_PUBLICATION).unlink()
                assert wait_for_run(http, key, run_id)["status"] == "COMPLETE"
                cancelling.unlink()
                refused = answer.result(300)
        finally:
            for hold in (cancelling, held.holds / faults.AFTER_PUBLICATION):
                hold.unlink(missing_ok=True)
    assert refused.status_code == 409, refused.text


@pytest.mark.parametrize("held", ["bigquery"], indirect=True)
def test_a_cancel_while_bigquery_publishes_outside_its_transaction_is_refused(
    held: Held,
) -> None:
    """BigQuery creates destinations and replaces landing tables and views before the
    publication's transaction (DDL cannot be in one): from then on a cancel is refused,
    since those changes would not be rolled back."""
    staged = PIPELINES[0].values[0]
    tenant_id, refused, ended = cancel_held_at(held, faults.BEFORE_PUBLISH_TRANSACTION, staged)
    assert refused.status_code == 409, refused.text
    assert "too late to cancel" in refused.json()["message"]
    assert ended["status"] == "COMPLETE", ended
    assert held.rows(tenant_id, staged.table) > 0
