"""The README's quick start, as a newcomer runs it: `make run`'s command, then its curls."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convergence_server.config import REPO_ROOT
from tests.conftest import stack_env

README = REPO_ROOT / "README.md"


def readme_curl_commands(start: str, count: int) -> list[str]:
    """The curl commands of the README's bash block that starts at `start`, in order."""
    text = README.read_text()
    block = text[text.index(start) :]
    block = block[: block.index("```")]
    # Commands are separated by comment lines and blank lines.
    chunks = re.split(r"\n(?:\s*\n|#[^\n]*\n)+", "\n" + block)
    commands = [chunk.strip() for chunk in chunks if chunk.strip().startswith("curl ")]
    assert len(commands) == count, commands
    return commands


def run_curl(command: str, port: int, env: dict[str, str]) -> dict[str, object]:
    command = command.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    result = subprocess.run(
        ["bash", "-c", command + " --silent --show-error"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    body: dict[str, object] = json.loads(result.stdout)
    return body


def banner_port(pattern: str, banner: str) -> int:
    found = re.search(pattern, banner)
    assert found, banner
    return int(found[1])


def port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="the quick start uses curl")
def test_quick_start_commands_work_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    env = {**os.environ, **stack_env(tmp_path)}
    stack = subprocess.Popen(
        [sys.executable, "-m", "convergence_server", "stack"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert stack.stdout is not None
        banner = "".join(stack.stdout.readline() for _ in range(4))
        http_port = banner_port(r"REST via Envoy: http://127\.0\.0\.1:(\d+)", banner)
        grpc_port = banner_port(r"gRPC:\s+127\.0\.0\.1:(\d+)", banner)

        dry_run, onboard, verify = readme_curl_commands("# 1. Dry-run", 3)
        assert run_curl(dry_run, http_port, env)["status"] == "SUCCESS"
        key = run_curl(onboard, http_port, env)["api_key"]
        assert isinstance(key, str) and key.startswith("acme_corp_api_")
        health = run_curl(verify, http_port, {**env, "CONVERGENCE_API_KEY": key})
        assert health["authenticated"] is True and health["tenant_id"] == "acme_corp"

        keyed = {**env, "CONVERGENCE_API_KEY": key}
        run_pipeline, list_complete = readme_curl_commands(
            "curl -X POST http://127.0.0.1:8080/api/v1/pipelines/run", 2
        )
        assert run_curl(run_pipeline, http_port, keyed)["status"] == "PENDING"
        deadline = time.monotonic() + 180
        while not run_curl(list_complete, http_port, keyed)["runs"]:
            assert time.monotonic() < deadline, "the README's pipeline run did not complete"
            time.sleep(0.2)

        stack.send_signal(signal.SIGINT)
        out, _ = stack.communicate(timeout=30)
        assert stack.returncode == 0
        assert "Convergence stopped." in out
        assert port_is_closed(http_port) and port_is_closed(grpc_port)
    finally:
        if stack.poll() is None:  # the launcher stops both children on SIGTERM
            stack.terminate()
            stack.wait(30)
