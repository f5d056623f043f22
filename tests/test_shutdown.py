"""Stopping leaves nothing behind: a server whose BigQuery hangs still stops on SIGTERM
within its bound, a launcher killed at any moment takes its children with it, and starting
a child never forks a launcher that uses gRPC.

No test here asserts how long something took: each waits for a condition, with a deadline
generous enough for a loaded machine, and fails only when the condition never comes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convergence_server.stack import spawn, start_stack, tied_to_this_process
from tests.bigquery_emulator import Emulator, start_emulator
from tests.conftest import eventually, new_prefix, onboard, stack_env
from tests.test_crash_safety import wait_for_exit

SHUTDOWN_SECONDS = 8  # the default bound
# Beyond the bound, what a loaded machine may add before the process is gone.
EXIT_ALLOWANCE = 20


@contextlib.contextmanager
def frozen_with_a_request_waiting(emulator: Emulator) -> Iterator[None]:
    """Stops the emulator (SIGSTOP) so that its connections hang instead of failing, as a
    BigQuery that stopped answering does, at a moment when a request then arrives and waits
    (a look for runs to recover: there is one a second). It runs again (SIGCONT) however
    the block ends."""
    deadline = time.monotonic() + 120
    try:
        while True:
            emulator.process.send_signal(signal.SIGSTOP)
            # A request it had already read when it stopped is stuck as well, but cannot be
            # seen from outside: try again until one is seen waiting.
            attempt = time.monotonic() + 3
            while time.monotonic() < attempt and not requests_waiting_at(emulator.port):
                time.sleep(0.05)
            if requests_waiting_at(emulator.port):
                break
            emulator.process.send_signal(signal.SIGCONT)
            if time.monotonic() > deadline:
                pytest.fail("no request reached the stopped emulator")
        yield
    finally:
        emulator.process.send_signal(signal.SIGCONT)


def requests_waiting_at(port: int) -> int:
    """Connections to 127.0.0.1:`port` that hold bytes nobody has read: requests sent to a
    frozen server, waiting for it (from /proc/net/tcp; Linux)."""
    waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        unread = int(fields[4].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and unread > 0:  # 01: ESTABLISHED
            waiting += 1
    return waiting


@pytest.fixture
def own_emulator(tmp_path: Path) -> Iterator[Emulator]:
    """An emulator for one test, which may freeze it without disturbing the others."""
    (tmp_path / "emulator").mkdir()
    emulator = start_emulator(tmp_path / "emulator")
    yield emulator
    emulator.process.send_signal(signal.SIGCONT)
    emulator.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/net/tcp")
@pytest.mark.timeout(600)  # its own emulator to start, on a machine that may be loaded
def test_sigterm_stops_a_server_whose_bigquery_hangs(
    own_emulator: Emulator, tmp_path: Path
) -> None:
    """Its workers' claim polls and heartbeats hang in BigQuery calls that never answer;
    the stop abandons them (their runs are recovered by the lease) instead of waiting."""
    env = stack_env(
        tmp_path / "data",
        **own_emulator.env(new_prefix()),
        CONVERGENCE_WORKERS="2",
        CONVERGENCE_RUN_HEARTBEAT_SECONDS="1",
        CONVERGENCE_RUN_LEASE_SECONDS="2",  # a look for runs to recover every half lease
        CONVERGENCE_SHUTDOWN_SECONDS=str(SHUTDOWN_SECONDS),
    )
    stack = start_stack(env, log_dir=tmp_path / "logs")
    try:
        with frozen_with_a_request_waiting(own_emulator):
            stack.server.send_signal(signal.SIGTERM)
            exit_code = wait_for_exit(stack.server, SHUTDOWN_SECONDS + EXIT_ALLOWANCE)
    finally:
        stack.stop()
    log = [
        json.loads(line)
        for line in (tmp_path / "logs" / "server.log").read_text().splitlines()
        if line.startswith("{")
    ]
    messages = [entry["message"] for entry in log]
    assert "stopping" in messages and "stopped" in messages, messages[-10:]
    assert exit_code == 0


def _children(pid: int) -> set[int]:
    """The processes `pid` started that are still its children (Linux)."""
    found: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            found |= {int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead and not yet reaped, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _command(pid: int) -> str:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return ""


# Starts a program with SIGTERM blocked, as a parent that blocks it in the thread that
# starts children does (the mask is inherited through fork and exec, and so is SIG_IGN).
SIGTERM_BLOCKED = (
    "import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Launcher:
    """`python -m convergence_server stack`, as `make run` starts it; with `sigterm_blocked`,
    as a parent that blocked SIGTERM starts it."""

    def __init__(
        self, data_dir: Path, log: Path, sigterm_blocked: bool = False, **extra: str
    ) -> None:
        self.log = log
        env = {**os.environ, **stack_env(data_dir, **extra)}
        command = [sys.executable, "-m", "convergence_server", "stack"]
        if sigterm_blocked:
            command = [sys.executable, "-c", SIGTERM_BLOCKED, *command]
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> set[int]:
        return _children(self.process.pid)

    def wait_until_up(self) -> None:
        eventually(lambda: "Press Ctrl-C to stop." in self.output(), timeout=240)

    def grpc_target(self) -> str:
        return self._printed(r"gRPC:\s+(127\.0\.0\.1:\d+)")

    def http_url(self) -> str:
        return self._printed(r"REST via Envoy:\s+(http://127\.0\.0\.1:\d+)")

    def _printed(self, pattern: str) -> str:
        """The part of the launcher's banner that `pattern`'s group matches."""
        found = re.search(pattern, self.output())
        assert found, self.output()
        return found[1]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            wait_for_exit(self.process, SHUTDOWN_SECONDS + EXIT_ALLOWANCE)


def processes_of(data_dir: Path) -> set[int]:
    """Every live process started for the stack on `data_dir` (its environment names it),
    whoever its parent is now: the launcher's children, and any it started unseen."""
    marker = f"CONVERGENCE_DATA_DIR={data_dir}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.add(int(entry))
    return {pid for pid in found if _alive(pid)}


# When the launcher is killed (SIGKILL, as after a stop that took too long): while it was
# still starting its children; right after its SIGTERM, before it could act on it; and in
# the middle of its stop, while the server's stop waits for a call in progress (a stream,
# which holds it for the calls' grace period).
WHEN_KILLED = ["while_starting", "right_after_sigterm", "while_stopping"]
# What the launcher inherited: the usual signal state, or a blocked SIGTERM (which its
# children inherited in turn, and the kernel's SIGTERM at its death stayed pending for ever).
INHERITED = ["usual_signals", "sigterm_blocked"]


@contextlib.contextmanager
def health_stream(target: str) -> Iterator[None]:
    """A `grpc.health.v1.Health/Watch` call, open (its first answer read) until the end."""
    with grpc.insecure_channel(target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        try:
            next(call)
            yield
        finally:
            call.cancel()


@pytest.mark.skipif(sys.platform != "linux", reason="the children die with their launcher")
@pytest.mark.parametrize("inherited", INHERITED)
@pytest.mark.parametrize("moment", WHEN_KILLED)
def test_a_killed_launcher_leaves_no_process_behind(
    tmp_path: Path, moment: str, inherited: str
) -> None:
    data_dir = tmp_path / "data"
    launcher = Launcher(data_dir, tmp_path / "launcher.log", inherited == "sigterm_blocked")
    seen: set[int] = set()

    def server_started() -> bool:
        seen.update(launcher.children())
        return any("convergence_server serve" in _command(pid) for pid in seen)

    try:
        with contextlib.ExitStack() as calls:
            if moment == "while_starting":
                eventually(server_started, timeout=240)
            else:
                launcher.wait_until_up()
                seen.update(launcher.children())
                assert len(seen) == 2, [_command(pid) for pid in seen]  # server and Envoy
                calls.enter_context(health_stream(launcher.grpc_target()))
            launcher.process.send_signal(signal.SIGTERM)
            if moment == "while_stopping":
                eventually(lambda: '"message": "stopping"' in launcher.output())
            launcher.process.kill()
            launcher.process.wait()

        def everything_gone() -> bool:
            return not processes_of(data_dir)

        eventually(everything_gone, timeout=SHUTDOWN_SECONDS + EXIT_ALLOWANCE)
    finally:
        for pid in processes_of(data_dir):  # only if it failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)

    # The store's lock went with the server: a new launcher on the same data starts.
    again = Launcher(data_dir, tmp_path / "again.log")
    try:
        again.wait_until_up()
    finally:
        again.stop()
    assert "Convergence stopped." in again.output()


@pytest.mark.skipif(sys.platform != "linux", reason="the children die with their launcher")
def test_a_stopping_stack_still_answers_the_rest_call_in_progress(tmp_path: Path) -> None:
    """Ctrl-C while a REST call is in progress (held inside the server): the server lets it
    end and Envoy, stopped after the server, carries its answer to the client."""
    data_dir = tmp_path / "data"
    hold = data_dir / "hold" / "hold_calls"
    # Calls in progress get 40% of the bound: 24 s, for a test on a loaded machine.
    launcher = Launcher(
        data_dir,
        tmp_path / "launcher.log",
        CONVERGENCE_FAULT_POINTS="hold_calls",
        CONVERGENCE_SHUTDOWN_SECONDS="60",
        CONVERGENCE_METRICS_PORT="0",
    )
    try:
        launcher.wait_until_up()
        # The port the OS picked for the metrics is in the banner.
        metrics = httpx.get(launcher._printed(r"Metrics:\s+(http://127\.0\.0\.1:\d+/metrics)"))
        assert metrics.status_code == 200 and "convergence_" in metrics.text
        with httpx.Client(base_url=launcher.http_url(), timeout=120) as http:
            _, key = onboard(http)
            hold.parent.mkdir(exist_ok=True)
            hold.touch()
            with ThreadPoolExecutor(1) as pool:
                call = pool.submit(http.get, "/api/v1/pipelines", headers={"X-API-Key": key})
                eventually(lambda: "fault point hold_calls: holding" in launcher.output())
                launcher.process.send_signal(signal.SIGINT)
                # The server stops first: once it says so, Envoy would be gone already
                # if it were stopped first.
                eventually(lambda: '"message": "stopping"' in launcher.output(), timeout=60)
                hold.unlink()
                answered = call.result(timeout=120)
        assert answered.status_code == 200, answered.text
        assert wait_for_exit(launcher.process, 60 + EXIT_ALLOWANCE) == 0
    finally:
        hold.unlink(missing_ok=True)
        launcher.stop()


def test_a_child_whose_launcher_is_gone_does_not_start(tmp_path: Path) -> None:
    """A launcher killed after starting a child and before the child tied itself to it
    cannot signal it: the child sees its parent is not its launcher, and does not run."""
    marker = tmp_path / "ran"
    command = tied_to_this_process(["touch", str(marker)])
    # Started by another parent (the shell), as if its launcher had died and the child had
    # been adopted.
    result = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *command], check=False)
    assert result.returncode != 0 and not marker.exists()
    # Started by its launcher, it runs.
    subprocess.run(command, check=True)
    assert marker.exists()


def test_children_start_without_forking_a_launcher_that_uses_grpc(
    channel: grpc.Channel,
) -> None:
    """A fork of a process that uses gRPC restarts gRPC's threads in the child, and they
    abort it ("epoll_wait error: Bad file descriptor", SIGABRT) when it closes its
    descriptors before exec and the machine is loaded: the stack's children are started
    without a fork of the launcher (grpc/grpc#43055), here while gRPC calls are under way."""
    forks: list[int] = []
    os.register_at_fork(after_in_parent=lambda: forks.append(os.getpid()))
    stub = health_pb2_grpc.HealthStub(channel)
    calling = threading.Event()
    calling.set()

    def call_continuously() -> None:
        while calling.is_set():
            stub.Check(health_pb2.HealthCheckRequest(), timeout=30)

    caller = threading.Thread(target=call_continuously, daemon=True)
    caller.start()
    try:
        children = [
            spawn([sys.executable, "-c", "pass"], stderr=subprocess.PIPE) for _ in range(20)
        ]
        outcomes = [(child.wait(60), child.communicate()[1]) for child in children]
    finally:
        calling.clear()
        caller.join(60)
    assert outcomes == [(0, b"")] * len(children)
    assert forks == []
