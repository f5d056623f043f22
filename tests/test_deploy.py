"""The deployment: the container's entrypoint run here as the image runs it, and the
Dockerfile, `.dockerignore` and Cloud Run service (deploy/) checked as files.

No Docker engine runs where the tests run, so the image itself is not built here: the
entrypoint runs from the checkout, with Cloud Run's `PORT`, and the Dockerfile is parsed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convergence_server.config import REPO_ROOT
from convergence_server.stack import START_TIMEOUT
from tests.conftest import stack_env
from tests.ports import free_loopback_port

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
ENTRYPOINT = REPO_ROOT / "deploy" / "entrypoint.sh"
SERVICE_YAML = REPO_ROOT / "deploy" / "service.yaml"
DEPLOY_SCRIPT = REPO_ROOT / "deploy" / "deploy.sh"
README = REPO_ROOT / "README.md"
# Cloud Run kills an instance this long after its SIGTERM.
CLOUD_RUN_GRACE_SECONDS = 10.0
# The server's own hard stop: CONVERGENCE_SHUTDOWN_SECONDS plus this (README, Configuration).
SERVER_EXIT_MARGIN_SECONDS = 2.0
PROJECT_ID = "demo-project"

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


# ---- The entrypoint, as Cloud Run starts and stops it ---------------------------------------


def entrypoint_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The tests' stack settings, nothing inherited from CONVERGENCE_* or PORT, and this
    virtualenv's `python` first on PATH (the image's is /opt/venv/bin)."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CONVERGENCE_") and name != "PORT"
    }
    path = os.pathsep.join([str(Path(sys.executable).parent), inherited.get("PATH", "")])
    return {**inherited, **stack_env(data_dir), "PATH": path, **extra}


def start_time(pid: int) -> str | None:
    """The process's start time (/proc/PID/stat), which tells it from a later one that
    reuses its PID; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def children_of(parent: int) -> dict[int, str]:
    """PID -> start time of every process whose parent is `parent`."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == parent:
                found[int(entry.name)] = fields[19]
    return found


def kind_of(pid: int) -> str:
    """`server`, `envoy`, or the command line of anything else."""
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/exe").resolve().name == "envoy":
            return "envoy"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"convergence_server" in argv and b"serve" in argv:
        return "server"
    return b" ".join(argv).decode(errors="replace")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until_healthy(launcher: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            pytest.fail(f"the entrypoint exited ({launcher.returncode}):\n{tail(log)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"GET /health never answered 200 through Envoy on PORT:\n{tail(log)}")


@linux_only
@pytest.mark.timeout(START_TIMEOUT + 120)
def test_entrypoint_serves_on_port_and_stops_both_on_sigterm(tmp_path: Path) -> None:
    port = free_loopback_port()
    token = secrets.token_hex(32)
    # CONVERGENCE_HTTP_PORT stays 0 (stack_env): Cloud Run's PORT must win. The listener
    # binds loopback here; in the image it binds 0.0.0.0.
    env = entrypoint_env(
        tmp_path / "data",
        PORT=str(port),
        CONVERGENCE_HTTP_HOST="127.0.0.1",
        CONVERGENCE_SCHEDULER_TOKEN=token,
    )
    log = tmp_path / "entrypoint.log"
    url = f"http://127.0.0.1:{port}"
    children: dict[int, str] = {}
    with log.open("wb") as output:
        launcher = subprocess.Popen(
            ["sh", str(ENTRYPOINT)],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    try:
        wait_until_healthy(launcher, url, log)
        # `exec`: the launcher is the process started (PID 1 in the container), and the
        # server and Envoy are its children.
        children = children_of(launcher.pid)
        assert sorted(kind_of(pid) for pid in children) == ["envoy", "server"], tail(log)

        # HTTP/2 cleartext on the same port, as Cloud Run's `h2c` port sends it: native gRPC.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # REST over h2c too (the check Cloud Run's documentation gives), where curl exists.
        if curl := shutil.which("curl"):
            h2c = [curl, "--http2-prior-knowledge", "-s", "-o", os.devnull]
            seen = subprocess.run(
                [*h2c, "-w", "%{http_version} %{http_code}", f"{url}/health"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert seen.stdout == "2 200"

        # The Cloud Scheduler job's request (deploy/deploy.sh scheduler).
        job = httpx.post(
            f"{url}/api/v1/scheduler/trigger",
            headers={"X-Scheduler-Token": token, "Content-Type": "application/json"},
            content=b"{}",
            timeout=60,
        )
        assert job.status_code == 200, job.text
        assert job.json()["message"] == "No schedule had a due slot"

        launcher.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        status = launcher.wait(timeout=60)
        took = time.monotonic() - sent
        assert status == 0, tail(log)
        assert took <= CLOUD_RUN_GRACE_SECONDS, f"stopped in {took:.1f} s\n{tail(log)}"
        left = [pid for pid, started in children.items() if start_time(pid) == started]
        assert not left, f"still running after the entrypoint exited: {left}"
        assert "Convergence stopped." in log.read_text()
    finally:
        # Only what this test started: the launcher and the two children it spawned.
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for pid, started in children.items():
            if start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)


def test_entrypoint_runs_other_commands(tmp_path: Path) -> None:
    """Arguments are a convergence-server command (`docker run IMAGE validate`)."""
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), "validate"],
        env=entrypoint_env(tmp_path / "data"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"\d+ templates and \d+ plans are valid", done.stdout), done.stdout


# ---- The Dockerfile and .dockerignore -------------------------------------------------------

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(KEYWORD, arguments) of each instruction: continuations joined, comments dropped."""
    parsed: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        parsed.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return parsed


def stages(parsed: list[Instruction]) -> dict[str, list[Instruction]]:
    """Each stage's instructions by its name, from its FROM on, in order."""
    named: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for keyword, arguments in parsed:
        if keyword == "FROM":
            words = arguments.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: {arguments}"
            current = named.setdefault(words[2], [])
        if current is not None:
            current.append((keyword, arguments))
    return named


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[Instruction]]:
    return stages(instructions(DOCKERFILE.read_text()))


def base_image(arguments: str) -> str:
    """The image a FROM names, its `${ARG}` resolved from the ARGs before the first FROM."""
    image = arguments.split()[0]
    for keyword, declared in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            break
        name, _, default = declared.partition("=")
        image = image.replace(f"${{{name}}}", default)
    return image


def test_image_is_multi_stage_on_slim_python_311(dockerfile: dict[str, list[Instruction]]) -> None:
    assert len(dockerfile) >= 2
    first, *_, runtime = dockerfile.values()
    assert base_image(first[0][1]).startswith("python:3.11-slim")
    assert base_image(runtime[0][1]).startswith("python:3.11-slim")


def test_image_runs_as_a_user_that_is_not_root(dockerfile: dict[str, list[Instruction]]) -> None:
    runtime = list(dockerfile.values())[-1]
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_image_has_no_test_dependencies(dockerfile: dict[str, list[Instruction]]) -> None:
    """No stage installs the dev extra; the generators are installed only in the stage
    that generates, and the image takes its virtualenv from a stage without them."""
    for name, stage in dockerfile.items():
        for keyword, arguments in stage:
            assert "[dev]" not in arguments, f"{name}: {keyword} {arguments}"
            assert not re.search(r"\b(pytest|schemathesis|mypy==|ruff)\b", arguments), arguments
    installs = {
        name: " ".join(a for k, a in stage if k == "RUN" and "pip install" in a)
        for name, stage in dockerfile.items()
    }
    with_generators = {name for name, text in installs.items() if "grpcio-tools" in text}
    assert with_generators == {"generate"}
    runtime = list(dockerfile.values())[-1]
    venv_sources = [a for k, a in runtime if k == "COPY" and a.endswith("/opt/venv /opt/venv")]
    assert venv_sources == ["--from=venv /opt/venv /opt/venv"]
    assert not any(k == "FROM" and "generate" in a.split()[0] for k, a in runtime)


def test_generators_are_pinned_as_in_the_dev_extra(
    dockerfile: dict[str, list[Instruction]],
) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    dev = {
        requirement.split("==")[0]: requirement
        for requirement in project["optional-dependencies"]["dev"]
    }
    installed = " ".join(a for k, a in dockerfile["generate"] if k == "RUN").split()
    for generator in ("grpcio-tools", "mypy-protobuf"):
        assert dev[generator] in installed, f"{generator}: the dev extra pins {dev[generator]}"


def test_image_generates_the_code_envoy_serves(dockerfile: dict[str, list[Instruction]]) -> None:
    generate = " ".join(a for k, a in dockerfile["generate"] if k == "RUN")
    assert "make proto" in generate
    runtime = list(dockerfile.values())[-1]
    from_generate = [a for k, a in runtime if k == "COPY" and a.startswith("--from=generate")]
    copied = " ".join(from_generate)
    for generated in ("build/convergence.pb", "convergence/openapi.json", "convergence/v1/"):
        assert generated in copied, f"the image lacks {generated}"


def test_image_starts_with_the_entrypoint_on_port_8080(
    dockerfile: dict[str, list[Instruction]],
) -> None:
    runtime = list(dockerfile.values())[-1]
    entrypoints = [json.loads(a) for k, a in runtime if k == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1][-1] == "/app/deploy/entrypoint.sh"
    assert ("COPY", "deploy/entrypoint.sh deploy/entrypoint.sh") in runtime
    assert ("EXPOSE", "8080") in runtime


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_build_context_leaves_out_local_state() -> None:
    patterns = dockerignore_patterns()
    for local in (".git", ".venv", "build", ".data", "**/__pycache__", ".pytest_cache"):
        assert local in patterns
    for cache in (".mypy_cache", ".ruff_cache", ".hypothesis"):
        assert cache in patterns
    assert "clients/python/convergence/openapi.json" in patterns


def test_what_the_image_copies_is_in_the_build_context(
    dockerfile: dict[str, list[Instruction]],
) -> None:
    patterns = dockerignore_patterns()
    for name, stage in dockerfile.items():
        for keyword, arguments in stage:
            if keyword != "COPY" or arguments.startswith("--from="):
                continue
            for source in arguments.split()[:-1]:
                path = source.rstrip("/")
                assert (REPO_ROOT / path).exists(), f"{name}: COPY {source}: no such file"
                ignored = [p for p in patterns if fnmatch.fnmatch(path, p)]
                assert not ignored, f"{name}: COPY {source} is left out by {ignored}"


# ---- The Cloud Run service ------------------------------------------------------------------


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    """deploy/service.yaml as deploy/deploy.sh renders it."""
    rendered = subprocess.run(
        ["bash", str(DEPLOY_SCRIPT), "render"],
        env={**os.environ, "PROJECT_ID": PROJECT_ID, "TAG": "test", "REGION": "europe-west1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "${" not in rendered
    loaded: dict[str, Any] = yaml.safe_load(rendered)
    return loaded


def container(service: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = service["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def environment(service: dict[str, Any]) -> dict[str, Any]:
    return {entry["name"]: entry for entry in container(service).get("env", [])}


def test_template_loads_as_yaml() -> None:
    assert yaml.safe_load(SERVICE_YAML.read_text())["kind"] == "Service"


def test_service_speaks_h2c_on_8080(service: dict[str, Any]) -> None:
    assert container(service)["ports"] == [{"name": "h2c", "containerPort": 8080}]


def test_service_keeps_workers_running(service: dict[str, Any]) -> None:
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    assert annotations["run.googleapis.com/cpu-throttling"] == "false"
    assert int(annotations["autoscaling.knative.dev/minScale"]) >= 1


def test_service_runs_as_its_own_account_in_the_region(service: dict[str, Any]) -> None:
    spec = service["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == f"convergence-api@{PROJECT_ID}.iam.gserviceaccount.com"
    assert service["metadata"]["labels"]["cloud.googleapis.com/location"] == "europe-west1"
    assert container(service)["image"] == (
        f"europe-west1-docker.pkg.dev/{PROJECT_ID}/convergence/convergence-api:test"
    )


def test_service_reads_its_secrets_from_secret_manager(service: dict[str, Any]) -> None:
    env = environment(service)
    script = DEPLOY_SCRIPT.read_text()
    for name, secret in (
        ("CONVERGENCE_KEY_PEPPER", "convergence-key-pepper"),
        ("CONVERGENCE_SCHEDULER_TOKEN", "convergence-scheduler-token"),
    ):
        reference = env[name]["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret
        assert isinstance(reference["key"], str) and reference["key"]
        assert f"={secret}\n" in script, f"deploy.sh does not create {secret}"
    assert "roles/secretmanager.secretAccessor" in script
    # The job sends the token of the version the service reads (TOKEN_VERSION, default 1).
    assert env["CONVERGENCE_SCHEDULER_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "1"
    assert 'versions access "$TOKEN_VERSION" --secret="$TOKEN_SECRET"' in script


def test_service_runs_on_bigquery(service: dict[str, Any]) -> None:
    env = environment(service)
    assert env["CONVERGENCE_STORE"]["value"] == "bigquery"
    assert env["CONVERGENCE_PROJECT"]["value"] == PROJECT_ID
    assert env["CONVERGENCE_XFF_TRUSTED_HOPS"]["value"] == "1"
    script = DEPLOY_SCRIPT.read_text()
    for role in ("roles/bigquery.dataEditor", "roles/bigquery.user", "roles/bigquery.jobUser"):
        assert role in script


def test_service_values_are_strings(service: dict[str, Any]) -> None:
    """Cloud Run refuses an environment value or annotation that YAML reads as a number."""
    for entry in environment(service).values():
        assert "valueFrom" in entry or isinstance(entry["value"], str), entry
    for notes in (
        service["metadata"]["annotations"],
        service["spec"]["template"]["metadata"]["annotations"],
    ):
        assert all(isinstance(value, str) for value in notes.values()), notes


def test_service_stops_within_cloud_runs_grace_and_outlasts_watches(
    service: dict[str, Any],
) -> None:
    env = environment(service)
    shutdown = float(env.get("CONVERGENCE_SHUTDOWN_SECONDS", {"value": "8"})["value"])
    assert shutdown + SERVER_EXIT_MARGIN_SECONDS <= CLOUD_RUN_GRACE_SECONDS
    stream_max = float(env.get("CONVERGENCE_STREAM_MAX_SECONDS", {"value": "3600"})["value"])
    assert service["spec"]["template"]["spec"]["timeoutSeconds"] > stream_max


def configuration_variables() -> set[str]:
    """The variables of README.md's Configuration table."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(CONVERGENCE_[A-Z0-9_]+)` \|", section, re.MULTILINE))


def test_every_variable_the_service_sets_is_documented(service: dict[str, Any]) -> None:
    documented = configuration_variables()
    assert "CONVERGENCE_STORE" in documented
    set_here = {name for name in environment(service) if name.startswith("CONVERGENCE_")}
    assert set_here - documented == set()


def test_scheduler_job_calls_the_trigger_with_the_operator_token() -> None:
    script = DEPLOY_SCRIPT.read_text()
    assert '--uri="$url/api/v1/scheduler/trigger" --http-method=POST' in script
    assert "X-Scheduler-Token=$token" in script
    assert '--schedule="* * * * *"' in script
