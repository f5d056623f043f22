"""The google-cloud-bigquery client as both BigQuery adapters use it.

Blocking client calls run on a thread pool. Query parameters are typed from their Python
values; errors become the store's (`Unavailable`) or the warehouse's (`TransientError`)
kinds in one place each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar

import google.auth
import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY

T = TypeVar("T")

# A transaction aborted because another one changed the same table first (BigQuery says
# "concurrent update"; the emulator's DuckLake catalog "Failed to commit").
_CONFLICT = re.compile(
    r"concurrent update|could not serialize|failed to commit|aborted due to concurrent", re.I
)
# API calls are retried (BigQuery's transient errors) for this long, then the store reports
# itself unavailable instead of holding a request for the client's default ten minutes.
RETRY = bigquery.DEFAULT_RETRY.with_deadline(30)
# At start-up, an unreachable BigQuery stops the server soon, with the reason.
STARTUP_RETRY = bigquery.DEFAULT_RETRY.with_deadline(5)
# Failures worth trying again later: BigQuery or the network is down or busy.
UNAVAILABLE = (
    api_exceptions.ServerError,
    api_exceptions.TooManyRequests,
    api_exceptions.RetryError,
    requests.exceptions.RequestException,
    ConnectionError,
    TimeoutError,
    concurrent.futures.TimeoutError,
)
# How long the store waits for one of its own jobs (a read or a transaction script).
STORE_JOB_TIMEOUT = 120.0
# How long a run's publishing transaction may take (it copies every staged row).
PUBLISH_TIMEOUT = 1800.0


def make_client(project: str, location: str, endpoint: str) -> bigquery.Client:
    """A client for `project`; with `endpoint` (an emulator), anonymous credentials."""
    if endpoint:
        return bigquery.Client(
            project=project,
            location=location,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=endpoint),
        )
    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/bigquery"])
    return bigquery.Client(project=project, location=location, credentials=credentials)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, api_exceptions.GoogleAPICallError) and bool(_CONFLICT.search(str(exc)))


def is_transient(exc: BaseException) -> bool:
    """Down, busy or rate-limited (403 rateLimitExceeded: too many DML statements queued),
    or a transaction that lost a conflict: worth another try."""
    if isinstance(exc, UNAVAILABLE) or is_conflict(exc):
        return True
    return isinstance(exc, api_exceptions.Forbidden) and any(
        error.get("reason") == "rateLimitExceeded" for error in exc.errors or []
    )


def message(exc: BaseException) -> str:
    """BigQuery's own words for a failed call, without the client's job-id trailer."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        text = exc.message or str(exc)
    else:
        text = str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@dataclass(frozen=True)
class Null:
    """A NULL query parameter of a BigQuery type (a bare None is a NULL STRING)."""

    kind: str


def parameter(
    name: str, value: Any
) -> bigquery.ScalarQueryParameter | bigquery.ArrayQueryParameter:
    """A named query parameter typed by its value (a list is an ARRAY<STRING>)."""
    if isinstance(value, list):
        return bigquery.ArrayQueryParameter(name, "STRING", value)
    if isinstance(value, Null):
        return bigquery.ScalarQueryParameter(name, value.kind, None)
    if isinstance(value, bool):
        kind = "BOOL"
    elif isinstance(value, int):
        kind = "INT64"
    elif isinstance(value, float):
        kind = "FLOAT64"
    elif isinstance(value, Decimal):
        kind = "NUMERIC"
    elif isinstance(value, datetime):
        kind = "TIMESTAMP"
    elif isinstance(value, date):
        kind = "DATE"
    elif isinstance(value, bytes):
        kind = "BYTES"
    else:
        kind = "STRING"
    return bigquery.ScalarQueryParameter(name, kind, value)


def job_config(params: Mapping[str, Any], **options: Any) -> bigquery.QueryJobConfig:
    return bigquery.QueryJobConfig(
        query_parameters=[parameter(k, v) for k, v in params.items()], **options
    )


class Runner:
    """Runs blocking client calls off the event loop."""

    def __init__(self, client: bigquery.Client, threads: int, name: str = "bigquery") -> None:
        self.client = client
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def job(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = STORE_JOB_TIMEOUT,
        rerun: bool = True,
        **options: Any,
    ) -> bigquery.QueryJob:
        """Runs a query or script to its end (blocking). `rerun=False` never re-submits a
        failed job (a transaction script could have committed before it failed)."""
        job = self.client.query(
            sql,
            job_config=job_config(params or {}, **options),
            retry=RETRY,
            job_retry=DEFAULT_JOB_RETRY if rerun else None,
        )
        job.result(retry=RETRY, timeout=timeout)
        return job

    def query(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        *,
        rerun: bool = True,
        timeout: float = STORE_JOB_TIMEOUT,
    ) -> list[tuple[Any, ...]]:
        """Runs a query or script; returns the rows of its last statement (blocking)."""
        job = self.job(sql, params, rerun=rerun, timeout=timeout)
        return [tuple(row.values()) for row in job.result(retry=RETRY)]

    def close(self) -> None:
        """Stops the threads (the client is closed by its owner)."""
        self._executor.shutdown(wait=True)
