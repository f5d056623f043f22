"""A local BigQuery emulator (local-bigquery, installed by `make install`) on loopback.

The tests drive the real google-cloud-bigquery client against it. It runs from its own
virtualenv, with HOME pointed at the folder where `make install` put DuckDB's extensions,
so it never reaches the network.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from google.cloud import bigquery

from convergence_server.config import REPO_ROOT
from convergence_server.stack import terminate, tied_to_this_process
from convergence_server.storage.bigquery_client import make_client
from tests.ports import free_loopback_port

EMULATOR_DIR = REPO_ROOT / "build" / "bigquery-emulator"
EMULATOR_PYTHON = EMULATOR_DIR / "venv" / "bin" / "python"
# Starts `local-bigquery`, made cheaper for the tests (see the file).
LAUNCHER = REPO_ROOT / "tests" / "fixtures" / "bigquery_emulator_main.py"
PROJECT = "test-project"
# Its start on a loaded machine can take many times the usual few seconds.
START_TIMEOUT = 180.0


@dataclass
class Emulator:
    port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    # The key pepper every server on this emulator shares (made up per emulator).
    pepper: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, prefix: str) -> dict[str, str]:
        """The server settings for a BigQuery store on this emulator, its datasets named
        with `prefix` (so that tests sharing the emulator never share datasets)."""
        return {
            "CONVERGENCE_STORE": "bigquery",
            "CONVERGENCE_PROJECT": PROJECT,
            "CONVERGENCE_BIGQUERY_ENDPOINT": self.endpoint,
            "CONVERGENCE_BIGQUERY_DATASET_PREFIX": prefix,
            "CONVERGENCE_KEY_PEPPER": self.pepper,
            # One emulator serves every test: replicas look for revoked keys less often
            # than the default 5 s (the test of that bound sets it back).
            "CONVERGENCE_KEY_SYNC_SECONDS": "30",
            # Workers look for runs when woken (a run this server admits or puts back)
            # and at start; an idle server's claim poll once a second cost the emulator
            # about 26 s of CPU a minute (7 s with this).
            "CONVERGENCE_CLAIM_POLL_SECONDS": "3600",
        }

    def client(self) -> bigquery.Client:
        """A client on this emulator, as an operator outside the server would use."""
        return make_client(PROJECT, "US", self.endpoint)

    def query(self, sql: str) -> list[dict[str, Any]]:
        """Runs BigQuery SQL on the emulator; rows as dicts."""
        client = self.client()
        try:
            return [dict(row.items()) for row in client.query(sql).result()]
        finally:
            client.close()  # type: ignore[no-untyped-call]

    def datasets(self) -> set[str]:
        """The ids of the datasets the emulator holds."""
        client = self.client()
        try:
            return {d.dataset_id for d in client.list_datasets()}
        finally:
            client.close()  # type: ignore[no-untyped-call]

    def drop_datasets_except(self, kept: set[str]) -> None:
        """Drops every dataset but `kept`, with its tables: each of the emulator's calls
        slows with the number of tables it holds (it lists them all; 3-7 ms a table here)."""
        client = self.client()
        try:
            for dataset in client.list_datasets():
                if dataset.dataset_id not in kept:
                    client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)
        finally:
            client.close()  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        terminate(self.process, 10)
        self.log.close()


def start_emulator(data_dir: Path) -> Emulator:
    if not (EMULATOR_DIR / "venv" / "bin" / "local-bigquery").exists():
        raise RuntimeError(
            f"the BigQuery emulator is missing from {EMULATOR_DIR}: run `make install`"
        )
    port = free_loopback_port()
    log = (data_dir / "emulator.log").open("wb")
    process = subprocess.Popen(
        tied_to_this_process(
            [
                str(EMULATOR_PYTHON),
                str(LAUNCHER),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--grpc-port",
                str(free_loopback_port()),
                "--project",
                PROJECT,
                "--data-dir",
                str(data_dir / "bigquery"),
            ]
        ),
        env={**os.environ, "HOME": str(EMULATOR_DIR / "home")},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    emulator = Emulator(port, process, log)
    # Ready when a real API call answers (it listens before its catalogue is usable).
    url = f"{emulator.endpoint}/bigquery/v2/projects/{PROJECT}/datasets"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                if response.status == 200:
                    return emulator
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    emulator.stop()
    tail = (data_dir / "emulator.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the BigQuery emulator did not start:\n{tail}")
