"""The google-cloud-bigquery client as both BigQuery adapters use it.

Blocking client calls run on a thread pool. Query parameters are typed from their Python
values; errors become the store's (`Unavailable`) or the warehouse's (`TransientError`)
kinds in one place each.

Every wait is bounded, so that a BigQuery that stops answering (a connection that hangs
rather than fails) holds no thread for ever: each HTTP request has a timeout (the client's
own default is none), retries of API calls and re-runs of failed jobs have deadlines (the
library's are 10 and 40 minutes), and a job's wait has its own timeout. A stopping server
does not wait for its threads either: they are daemons that nothing joins (`Runner.close`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar

import google.auth
import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY

T = TypeVar("T")

# A transaction aborted because another one changed the same table first (BigQuery says
# "concurrent update"; the emulator's DuckLake catalog "Failed to commit").
_CONFLICT = re.compile(
    r"concurrent update|could not serialize|failed to commit|aborted due to concurrent", re.I
)
# One HTTP request to BigQuery: to connect, and then between two reads of its answer. A
# request the caller gives no timeout gets this one (the client's default is to wait for
# ever on a connection that hangs). The long polls of a job's end last 10 s on the server.
REQUEST_TIMEOUT = 20.0
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
# A job that failed for a reason worth another try (rate limits, BigQuery's own errors, a
# network fault while waiting for it) is run again for this long; the library's default,
# forty minutes, once kept a server from stopping for as long.
JOB_RETRY = DEFAULT_JOB_RETRY.with_deadline(STORE_JOB_TIMEOUT)
# How long a run's publishing transaction may take (it copies every staged row).
PUBLISH_TIMEOUT = 1800.0


class _BoundedAdapter(requests.adapters.HTTPAdapter):
    """Sends the client's requests: one without a timeout gets `REQUEST_TIMEOUT`."""

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        bounded = REQUEST_TIMEOUT if timeout is None else timeout
        return super().send(request, stream, bounded, verify, cert, proxies)


def make_client(project: str, location: str, endpoint: str) -> bigquery.Client:
    """A client for `project`; with `endpoint` (an emulator), anonymous credentials."""
    credentials: Credentials
    if endpoint:
        credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
        options = ClientOptions(api_endpoint=endpoint)
    else:
        scopes = ["https://www.googleapis.com/auth/bigquery"]
        credentials, _ = google.auth.default(scopes=scopes)
        options = ClientOptions()
    session = AuthorizedSession(credentials, refresh_timeout=REQUEST_TIMEOUT)  # type: ignore[no-untyped-call]
    for scheme in ("https://", "http://"):
        session.mount(scheme, _BoundedAdapter())
    return bigquery.Client(
        project=project,
        location=location,
        credentials=credentials,
        client_options=options,
        _http=session,
    )


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


_Work = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class _DaemonPool(concurrent.futures.Executor):
    """A fixed pool of daemon threads. Unlike `ThreadPoolExecutor`'s, nothing joins them:
    neither `shutdown` nor the interpreter's exit (which joins every executor's threads,
    and every thread that is not a daemon) waits for a call stuck in the network."""

    def __init__(self, threads: int, name: str) -> None:
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads = threads
        self._closed = False
        self._lock = threading.Lock()
        for i in range(threads):
            threading.Thread(target=self._serve, name=f"{name}_{i}", daemon=True).start()

    def submit(  # type: ignore[override]
        self, fn: Callable[[], T], /
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the BigQuery client is closed")
            self._work.put((fn, future))
        return future

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            fn, future = work
            if not future.set_running_or_notify_cancel():
                continue  # its caller went away before it started
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Takes no more work and cancels what has not started. Never waits for a thread
        in a call, whatever `wait` says: it ends with its call's deadline, or the process."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    work = self._work.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[1].cancel()
            for _ in range(self._threads):
                self._work.put(None)


class Runner:
    """Runs blocking client calls off the event loop."""

    def __init__(self, client: bigquery.Client, threads: int, name: str = "bigquery") -> None:
        self.client = client
        self._executor = _DaemonPool(threads, name)

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
        """Runs a query or script to its end (blocking), as a job inserted and then
        waited for: for what `jobs.query` cannot run (a destination table). `rerun=False`
        never re-submits a failed job (a transaction script could have committed before it
        failed). `timeout=None` waits for a job however long it runs, while BigQuery
        answers."""
        job = self.client.query(
            sql,
            job_config=job_config(params or {}, **options),
            retry=RETRY,
            timeout=REQUEST_TIMEOUT,
            # Re-runs are left to `result` below, under a deadline: here they would be
            # retried for the library's ten minutes whenever BigQuery is unreachable.
            job_retry=None,
        )
        job.result(retry=RETRY, timeout=timeout, job_retry=JOB_RETRY if rerun else None)
        return job

    def start(self, sql: str, job_id: str) -> None:
        """Inserts the query job `job_id` and returns without waiting for it (blocking for
        the insert only): BigQuery runs it to its end whoever waits. A job of that id
        inserted before, here or by another replica, raises `Conflict`."""
        self.client.query(sql, job_id=job_id, retry=RETRY, timeout=REQUEST_TIMEOUT, job_retry=None)

    def query(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        *,
        rerun: bool = True,
        timeout: float | None = STORE_JOB_TIMEOUT,
    ) -> list[tuple[Any, ...]]:
        """Runs a query or script; returns the rows of its last statement (blocking).
        `timeout=None` waits however long it runs, while BigQuery answers."""
        rows = self._query_and_wait(sql, params, rerun, timeout)
        return [tuple(row.values()) for row in rows]

    def execute(
        self,
        sql: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = STORE_JOB_TIMEOUT,
    ) -> int:
        """Runs a DML or DDL statement, again if it failed for a transient reason (so it
        must be one that may run twice); returns how many rows it changed (blocking)."""
        return int(self._query_and_wait(sql, params, True, timeout).num_dml_affected_rows or 0)

    def _query_and_wait(
        self, sql: str, params: Mapping[str, Any] | None, rerun: bool, timeout: float | None
    ) -> bigquery.table.RowIterator:
        """One `jobs.query` request where `job` takes three (insert the job, wait for its
        end, read its rows): BigQuery answers with the rows once the job ends within the
        request's `timeoutMs` (else the client waits for the job as `job` does). A request
        sent again after a network fault carries the same `requestId`, so BigQuery runs the
        job once."""
        return self.client.query_and_wait(
            sql,
            job_config=job_config(params or {}),
            api_timeout=REQUEST_TIMEOUT,
            wait_timeout=timeout,
            retry=RETRY,
            # None: never again (documented; the library's annotation omits it).
            job_retry=JOB_RETRY if rerun else None,  # type: ignore[arg-type]
        )

    def close(self) -> None:
        """Stops the threads without waiting for one stuck in a call (the client is closed
        by its owner): a stop must not outlast its bound because BigQuery hangs."""
        self._executor.shutdown(wait=False, cancel_futures=True)
