"""Several server processes on one BigQuery store admit exactly a tenant's limits.

Two stacks (server + Envoy each) share the emulator and the dataset prefix, as replicas
behind a load balancer would. Their workers are off, so admitted runs stay PENDING and
keep their concurrency slots for the whole burst.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.bigquery_emulator import Emulator
from tests.conftest import StackFactory, new_prefix, onboard

BURST = 12
PROFESSIONAL_CONCURRENT = 5


def test_two_replicas_admit_exactly_the_concurrent_limit(
    stack_factory: StackFactory, pipeline_env: dict[str, str], emulator: Emulator
) -> None:
    env = {**pipeline_env, **emulator.env(new_prefix()), "CONVERGENCE_WORKERS": "0"}
    replicas = [stack_factory(**env), stack_factory(**env)]
    clients = [httpx.Client(base_url=s.http_url, timeout=120) for s in replicas]
    try:
        tenant_id, key = onboard(clients[0], plan="PROFESSIONAL")

        def fire(i: int) -> httpx.Response:
            return clients[i % 2].post(
                f"/api/v1/pipelines/run/{tenant_id}/test/runs/quick",
                headers={"X-API-Key": key},
                json={},
            )

        with ThreadPoolExecutor(BURST) as pool:
            responses = list(pool.map(fire, range(BURST)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * PROFESSIONAL_CONCURRENT + [429] * (
            BURST - PROFESSIONAL_CONCURRENT
        ), [r.text for r in responses]
        # Both replicas took part, and both see the same runs and the same usage.
        admitted_by = {i % 2 for i, r in enumerate(responses) if r.status_code == 200}
        refused_by = {i % 2 for i, r in enumerate(responses) if r.status_code == 429}
        assert admitted_by | refused_by == {0, 1}
        for client in clients:
            runs = client.get(
                "/api/v1/pipelines/runs", headers={"X-API-Key": key}, params={"limit": 50}
            ).json()["runs"]
            assert len(runs) == PROFESSIONAL_CONCURRENT
            assert {r["status"] for r in runs} == {"PENDING"}
            usage = client.get(
                f"/api/v1/tenants/{tenant_id}/usage", headers={"X-API-Key": key}
            ).json()
            assert usage["pipelines_run_today"] == PROFESSIONAL_CONCURRENT, usage
    finally:
        for client in clients:
            client.close()
        for replica in replicas:
            replica.stop()
