"""The central dataset as the BigQuery store's statements reach it (a part of BigQueryStore).

Statements run on the store's `Runner`, off the event loop; a BigQuery that is down or busy
becomes `Unavailable`, and a transaction aborted by a concurrent one of the same tenant
(BigQuery detects conflicts per table) runs again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from google.api_core import exceptions as api_exceptions

from convergence_server.errors import Unavailable
from convergence_server.storage import schema
from convergence_server.storage.bigquery_client import (
    STORE_JOB_TIMEOUT,
    Null,
    Runner,
    is_conflict,
    is_transient,
)

T = TypeVar("T")
# The adapter's records carry one logger name, the store's.
log = logging.getLogger("convergence_server.storage.bigquery_store")

CONFLICT_RETRIES = 40


@dataclass(frozen=True)
class Central:
    """The central dataset `name`, its statements run by `runner`."""

    runner: Runner
    name: str

    def table(self, table: str) -> str:
        return f"`{self.name}.{table}`"

    async def call(self, fn: Callable[[], T]) -> T:
        def run() -> T:
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.error("BigQuery unavailable or busy: %s", exc)
                raise Unavailable("BigQuery is unavailable or busy; try again") from exc

        return await self.runner.call(run)

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return self.runner.query(sql, params)

    def transaction(
        self,
        script: str,
        params: Mapping[str, Any],
        runner: Runner | None = None,
        timeout: float = STORE_JOB_TIMEOUT,
    ) -> list[tuple[Any, ...]]:
        """Runs a transaction script, again while it conflicts with a concurrent one."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                return (runner or self.runner).query(script, params, rerun=False, timeout=timeout)
            except api_exceptions.GoogleAPICallError as exc:
                if not is_conflict(exc) or attempt == CONFLICT_RETRIES - 1:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * min(2**attempt, 16))
        raise AssertionError("unreachable")  # pragma: no cover


def within(since: datetime | None, span: timedelta, now: datetime) -> bool:
    """Whether `now` is less than `span` after `since` (not before it: a clock set back)."""
    return since is not None and since <= now < since + span


def typed(table: schema.Table, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` as query parameters, a None being a NULL of its column's type (BigQuery
    does not put a NULL STRING into an INT64 or TIMESTAMP column)."""
    types = {c.name: c.type for c in table.columns}
    return {k: Null(types.get(k, "STRING")) if v is None else v for k, v in values.items()}
