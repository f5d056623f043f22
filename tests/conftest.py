"""Fixtures: real stacks (gRPC server + Envoy) on loopback ports the OS picks."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import duckdb
import grpc
import httpx
import pytest

from convergence_server.config import REPO_ROOT
from convergence_server.stack import Stack, start_stack
from tests.bigquery_emulator import Emulator, start_emulator

FIXTURES = Path(__file__).parent / "fixtures"
T = TypeVar("T")
TERMINAL = ("COMPLETE", "FAILED")

GUIDE_TENANT = {
    "company_name": "Acme Corporation",
    "admin_email": "admin@acme.com",
    "subscription_plan": "PROFESSIONAL",
}


def stack_env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "CONVERGENCE_DATA_DIR": str(data_dir),
        "CONVERGENCE_GRPC_PORT": "0",
        "CONVERGENCE_HTTP_PORT": "0",
        "CONVERGENCE_ENVOY_ADMIN_PORT": "0",
        "CONVERGENCE_LOG_LEVEL": "INFO",
        # Tests onboard in bursts; the open endpoints' limits have tests of their own.
        "CONVERGENCE_OPEN_REQUESTS_PER_MINUTE_PER_CLIENT": "1000000",
        "CONVERGENCE_OPEN_REQUESTS_PER_MINUTE": "1000000",
        "CONVERGENCE_AUTH_FAILURES_PER_MINUTE": "1000000",
        # Schedules start only when a test triggers them, unless it turns the ticker on.
        "CONVERGENCE_SCHEDULER_TICK_SECONDS": "0",
        **extra,
    }


StackFactory = Callable[..., Stack]


# The stacks running for the current module and test, in the order they started: each
# stops at the end of the test that started it, or of the module whose fixture did (an
# idle stack still polls its queue and holds a server and Envoy in memory).
_STACKS: list[Stack] = []


@pytest.fixture(scope="session")
def stack_factory(tmp_path_factory: pytest.TempPathFactory) -> StackFactory:
    """Starts a stack, stopped at the end of the test or module fixture that started it."""

    def make(data_dir: Path | None = None, **extra: str) -> Stack:
        _STACKS.append(_start(data_dir or tmp_path_factory.mktemp("data"), **extra))
        return _STACKS[-1]

    return make


def _start(data_dir: Path, **extra: str) -> Stack:
    return start_stack(stack_env(data_dir, **extra), log_dir=data_dir / "logs")


def _stop_stacks_started_after(count: int) -> None:
    while len(_STACKS) > count:
        _STACKS.pop().stop()


@pytest.fixture(scope="module", autouse=True)
def _stop_the_modules_stacks() -> Iterator[None]:
    count = len(_STACKS)
    yield
    _stop_stacks_started_after(count)


@pytest.fixture(autouse=True)
def _stop_the_tests_stacks() -> Iterator[None]:
    count = len(_STACKS)
    yield
    _stop_stacks_started_after(count)


@pytest.fixture(scope="session")
def _session_stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """Starts the stacks that session fixtures share; they stop at the session's end."""
    started: list[Stack] = []

    def make(**extra: str) -> Stack:
        started.append(_start(tmp_path_factory.mktemp("data"), **extra))
        return started[-1]

    yield make
    for stack in started:
        stack.stop()


# The module's emulator while it runs (this process's; each xdist worker has its own).
_EMULATORS: list[Emulator] = []


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One local BigQuery emulator per test module; each user takes its own dataset prefix.

    Not one per session: the emulator's catalogue grows with every write and each of its
    calls slows with it (after the other BigQuery modules, a module's runs took 6 to 8 times
    as long as on a fresh emulator)."""
    started = start_emulator(tmp_path_factory.mktemp("emulator"))
    _EMULATORS.append(started)
    stacks = len(_STACKS)
    yield started
    _stop_stacks_started_after(stacks)  # while they can still reach it
    _EMULATORS.remove(started)
    started.stop()


@pytest.fixture(autouse=True)
def _drop_the_tests_datasets() -> Iterator[None]:
    """After each test, drops the datasets it made on the module's emulator (those its
    module's fixtures made before it stay): each of the emulator's calls slows with the
    tables it holds, so without this a module's later tests ran on a catalogue grown by
    every test before them."""
    running = list(_EMULATORS)
    kept = [emulator.datasets() for emulator in running]
    yield
    for emulator, datasets in zip(running, kept, strict=True):
        emulator.drop_datasets_except(datasets)


def new_prefix() -> str:
    """A dataset prefix no other test uses, for a BigQuery store on the shared emulator."""
    return f"p{uuid.uuid4().hex[:8]}_"


@pytest.fixture(scope="session")
def stack(_session_stacks: StackFactory) -> Stack:
    """The shared stack most tests use; tests keep to their own tenants."""
    return _session_stacks()


@pytest.fixture(scope="session")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.http_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.grpc_target) as ch:
        yield ch


def new_tenant_id() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


def onboard(
    http: httpx.Client, tenant_id: str | None = None, plan: str = "PROFESSIONAL"
) -> tuple[str, str]:
    """Onboards a fresh tenant through REST; returns (tenant_id, api_key)."""
    tenant_id = tenant_id or new_tenant_id()
    payload = {"tenant_id": tenant_id, **GUIDE_TENANT, "subscription_plan": plan}
    response = http.post("/api/v1/tenants/onboard", json=payload)
    assert response.status_code == 200, response.text
    return tenant_id, response.json()["api_key"]


def raw_http(port: int, request: bytes) -> bytes:
    """The whole answer to `request`, sent as it is (no client normalizes it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def raw_get(port: int, target: bytes) -> httpx.Response:
    """GET `target` sent byte for byte (httpx would percent-encode quotes)."""
    answer = raw_http(
        port, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


def database_path(stack: Stack) -> Path:
    return stack.run_dir.parent / "convergence.duckdb"


def dump_store(stack: Stack) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, by `schema.table`. The stack must be stopped first."""
    with duckdb.connect(str(database_path(stack)), read_only=True) as db:
        tables = db.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' ORDER BY 1, 2"
        ).fetchall()
        return {
            f"{s}.{t}": sorted(db.execute(f'SELECT * FROM "{s}"."{t}"').fetchall(), key=repr)
            for s, t in tables
        }


def schemas(stack: Stack) -> set[str]:
    with duckdb.connect(str(database_path(stack)), read_only=True) as db:
        return {
            row[0]
            for row in db.execute(
                "SELECT schema_name FROM information_schema.schemata "
                "WHERE catalog_name = current_database()"
            ).fetchall()
        }


@pytest.fixture(scope="session")
def stack_grpc_via_envoy(stack: Stack) -> Iterator[grpc.Channel]:
    """Native gRPC through Envoy's listener (the transcoder passes it through)."""
    with grpc.insecure_channel(stack.envoy_grpc_target) as ch:
        yield ch


# A plan whose limits never bind, for tests about pipelines rather than quotas.
UNMETERED = "UNMETERED"


@pytest.fixture(scope="session")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped configs plus the test templates (test/runs/*) and the UNMETERED plan."""
    target = tmp_path_factory.mktemp("configs") / "configs"
    shutil.copytree(REPO_ROOT / "configs", target)
    with (target / "plans.yml").open("a") as plans:
        plans.write(
            f"  {UNMETERED}:\n    daily_pipeline_runs: 1000000\n"
            "    concurrent_pipeline_runs: 100000\n    team_size: 1000\n"
            "    requests_per_minute: 10000000\n    open_streams: 1000\n"
            "    requests_in_flight: 1000\n    max_schedules: 1000\n"
        )
    (target / "test" / "runs").mkdir(parents=True)
    for template in (FIXTURES / "templates").glob("*.yml"):
        shutil.copy(template, target / "test" / "runs" / template.name)
    return target


@pytest.fixture(scope="session")
def sources_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the test stacks accept as a pipeline source (for corrupted files)."""
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="session")
def pipeline_env(config_dir: Path, sources_dir: Path) -> dict[str, str]:
    return {
        "CONVERGENCE_CONFIG_DIR": str(config_dir),
        "CONVERGENCE_SOURCE_ROOTS": str(sources_dir),
        # The copy's samples: a test may add one.
        "CONVERGENCE_SAMPLE_DATA_DIR": str(config_dir / "sample_data"),
    }


@pytest.fixture(scope="session")
def pipelines(_session_stacks: StackFactory, pipeline_env: dict[str, str]) -> Stack:
    """A stack that runs pipelines (the shipped templates and the test ones)."""
    return _session_stacks(**pipeline_env)


@pytest.fixture(scope="session")
def api(pipelines: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pipelines.http_url, timeout=30) as client:
        yield client


def trigger(
    http: httpx.Client, key: str, tenant_id: str, template: str, **body: object
) -> dict[str, object]:
    """Triggers `provider/domain/template` over REST; returns the response body."""
    response = http.post(
        f"/api/v1/pipelines/run/{tenant_id}/{template}", headers={"X-API-Key": key}, json=body
    )
    assert response.status_code == 200, response.text
    body_out: dict[str, object] = response.json()
    return body_out


def eventually(
    condition: Callable[[], T],
    what: str = "the condition",
    timeout: float = 120,
    interval: float = 0.1,
) -> T:
    """Polls `condition()` until it returns something true, and returns that; fails the
    test after `timeout` seconds (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not hold within {timeout:.0f} s")
        time.sleep(interval)
    return value


def wait_for_run(
    http: httpx.Client,
    key: str,
    run_id: object,
    statuses: tuple[str, ...] = TERMINAL,
    timeout: float = 120,
) -> dict[str, object]:
    """Polls GET /runs/{id} until the run's status is one of `statuses` (bounded wait).

    The polls slow down from 20 a second to one (a STARTER key has 60 requests a minute,
    which the test still needs); a poll refused by the rate (429) waits as it is told.
    """
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        response = http.get(f"/api/v1/pipelines/runs/{run_id}", headers={"X-API-Key": key})
        run: dict[str, object] = response.json()
        if run.get("status") in statuses or time.monotonic() > deadline:
            return run
        wait = float(str(run.get("retry_after", pause))) if response.status_code == 429 else pause
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        pause = min(1.0, pause * 1.5)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (root only), unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Writes a file until the file system is full; returns it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
    with filler.open("ab", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 512)
    return filler
