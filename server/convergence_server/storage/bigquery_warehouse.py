"""A tenant's BigQuery dataset, as the pipeline engine uses it.

Steps run natively: files arrive by load jobs (local files are uploaded, `gs://` URIs read
by BigQuery itself), query steps are query jobs with named parameters writing a destination
table, data-quality checks are queries. Publication moves every staged table into its
destination in one multi-statement transaction with the run's publication record (DML
only: BigQuery runs no DDL inside a transaction); what must be DDL and is idempotent comes
before it: destinations are created, a shared schema's union view refreshed, and a landing
table replaced whole (`truncate`, no shared schema) is copied over by a copy job.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from convergence_server import faults
from convergence_server.storage import schema
from convergence_server.storage.bigquery_client import (
    RETRY,
    Runner,
    is_transient,
    job_config,
    message,
)
from convergence_server.storage.records import RunRecord
from convergence_server.storage.warehouse import (
    STAGE_PREFIX,
    Interrupted,
    Publication,
    PublishRefused,
    SchemaColumn,
    TransientError,
    WarehouseError,
    csv_header,
)

_FORMATS = {
    "csv": bigquery.SourceFormat.CSV,
    "ndjson": bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
    "parquet": bigquery.SourceFormat.PARQUET,
}
STAGE_LIFETIME = timedelta(days=1)
# Why a publishing transaction failed when the day it replaces changed after the comparison.
DAY_CHANGED = "the published day changed while the run was publishing it"
_PARAMETER = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*)")


def create_table_sql(dataset: str, table: schema.Table) -> str:
    """`CREATE TABLE IF NOT EXISTS` with the table's partitioning (by day) and clustering."""
    columns = ", ".join(
        f"{c.name} {c.type}{' NOT NULL' if c.required else ''}" for c in table.columns
    )
    sql = f"CREATE TABLE IF NOT EXISTS `{dataset}.{table.name}` ({columns})"
    if table.partition_by:
        column = table.partition_by
        kind = {c.name: c.type for c in table.columns}[column]
        sql += f" PARTITION BY {column if kind == 'DATE' else f'DATE({column})'}"
    if table.cluster_by:
        sql += f" CLUSTER BY {', '.join(table.cluster_by)}"
    if table.partition_expiration_days:
        sql += f" OPTIONS (partition_expiration_days = {int(table.partition_expiration_days)})"
    return sql


def _used(sql: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a statement names (BigQuery itself reports an undefined one)."""
    return {name: params[name] for name in set(_PARAMETER.findall(sql)) if name in params}


class BigQueryWarehouse:
    def __init__(
        self,
        runner: Runner,
        dataset: str,
        publish_lock: threading.Lock,
        transaction: Callable[[RunRecord, list[str], Mapping[str, Any]], bool],
        begin: Callable[[RunRecord], bool],
    ) -> None:
        self.dataset = dataset
        self._bq = runner
        # Publications into one dataset from this process go one at a time; between
        # processes, BigQuery's transaction conflicts (retried by the store) order them.
        self._publish_lock = publish_lock
        # The store's publishing transaction: the row writes given, with the run's
        # publication record, if the run is still this execution's.
        self._transaction = transaction
        # The store's mark that the run's publication begins, if it still may publish.
        self._begin = begin
        self._interrupted = threading.Event()

    def _ref(self, table: str) -> str:
        return f"{self._bq.client.project}.{self.dataset}.{table}"

    def _q(self, table: str) -> str:
        return f"`{self.dataset}.{table}`"

    async def _call(self, fn: Any) -> Any:
        def run() -> Any:
            if self._interrupted.is_set():
                raise Interrupted("the server is stopping")
            try:
                return fn()
            except WarehouseError:
                raise
            except Exception as exc:
                if is_transient(exc):
                    raise TransientError(message(exc)) from exc
                if isinstance(exc, api_exceptions.GoogleAPICallError):
                    raise WarehouseError(message(exc)) from exc
                if not isinstance(exc, (OSError, ValueError)):
                    raise
                raise WarehouseError(str(exc)) from exc

        return await self._bq.call(run)

    async def load(self, table: str, uri: str, fmt: str) -> int:
        config = bigquery.LoadJobConfig(
            source_format=_FORMATS[fmt],
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
        )

        def load() -> int:
            remote = uri.startswith("gs://")
            if fmt == "csv":
                # Every column a STRING, named by the header as sanitized names.
                config.skip_leading_rows = 1
                if remote:
                    config.autodetect = True
                else:
                    config.schema = [
                        bigquery.SchemaField(name, "STRING") for name in csv_header(uri)
                    ]
            elif fmt == "ndjson":
                config.autodetect = True
            if remote:
                # Names BigQuery takes from the file: other characters become `_`, as
                # `sanitize` does for the local files read here.
                config.column_name_character_map = "V1"
                job = self._bq.client.load_table_from_uri(
                    uri, self._ref(table), job_config=config, retry=RETRY
                )
            else:
                with open(uri, "rb") as source:
                    job = self._bq.client.load_table_from_file(
                        source, self._ref(table), job_config=config
                    )
            job.result(retry=RETRY)
            if remote and fmt == "csv":
                self._all_strings(table)
            return self._rows(table)

        return int(await self._call(load))

    def _all_strings(self, table: str) -> None:
        columns = [f.name for f in self._bq.client.get_table(self._ref(table)).schema]
        casts = ", ".join(f"CAST(`{c}` AS STRING) AS `{c}`" for c in columns)
        self._bq.execute(
            f"CREATE OR REPLACE TABLE {self._q(table)} AS SELECT {casts} FROM {self._q(table)}",
            timeout=None,
        )

    def _rows(self, table: str) -> int:
        """The table's row count. A staging table is also given a day to live, so that one
        left by a run that died with its server is dropped by BigQuery itself."""
        written = self._bq.client.get_table(self._ref(table))
        if table.startswith(STAGE_PREFIX):
            written.expires = datetime.now(UTC) + STAGE_LIFETIME
            written = self._bq.client.update_table(written, ["expires"])
        return int(written.num_rows or 0)

    def _select(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Runs a pipeline query to its end, however long it takes; returns its rows."""
        return self._bq.query(sql, _used(sql, params), timeout=None)

    async def create_as(
        self, table: str, sql: str, params: Mapping[str, Any], into: Publication | None = None
    ) -> int:
        def create() -> int:
            self._bq.job(
                sql,
                _used(sql, params),
                timeout=None,
                destination=self._ref(table),
                write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            )
            return self._rows(table)

        return int(await self._call(create))

    async def insert_into(self, table: str, sql: str, params: Mapping[str, Any]) -> int:
        def insert() -> int:
            # The query's column names (a dry run), so that rows go in by name.
            dry = self._bq.client.query(
                sql, job_config=job_config(_used(sql, params), dry_run=True), retry=RETRY
            )
            names = ", ".join(f"`{f.name}`" for f in dry.schema or [])
            insert = f"INSERT INTO {self._q(table)} ({names}) SELECT {names} FROM ({sql})"
            return self._bq.execute(insert, _used(sql, params), timeout=None)

        return int(await self._call(insert))

    async def count(self, sql: str, params: Mapping[str, Any]) -> int:
        def count() -> int:
            rows = self._select(sql, params)
            return int(rows[0][0]) if rows else 0

        return int(await self._call(count))

    async def rows(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        def rows() -> list[tuple[Any, ...]]:
            return self._select(sql, params)

        return list(await self._call(rows))

    def row_key(self, columns: Sequence[str]) -> str:
        return f"FARM_FINGERPRINT(TO_JSON_STRING(STRUCT({', '.join(f'`{c}`' for c in columns)})))"

    async def add_columns(self, table: str, columns: Sequence[str]) -> None:
        def add() -> None:
            self._add_columns(table, [SchemaColumn(c, "STRING") for c in columns])

        await self._call(add)

    def _add_columns(self, table: str, columns: Sequence[SchemaColumn]) -> None:
        """Appends the columns the table lacks to its schema (NULL in existing rows)."""
        current = self._bq.client.get_table(self._ref(table), retry=RETRY)
        present = {f.name for f in current.schema}
        added = [
            bigquery.SchemaField(c.name, c.type.upper()) for c in columns if c.name not in present
        ]
        if added:
            current.schema = [*current.schema, *added]
            self._bq.client.update_table(current, ["schema"], retry=RETRY)

    async def tables(self, prefix: str) -> list[str]:
        def tables() -> list[str]:
            found = self._bq.client.list_tables(self.dataset, retry=RETRY)
            return sorted(t.table_id for t in found if t.table_id.startswith(prefix))

        return list(await self._call(tables))

    async def columns(self, table: str) -> list[str]:
        def columns() -> list[str]:
            try:
                return [f.name for f in self._bq.client.get_table(self._ref(table)).schema]
            except api_exceptions.NotFound:
                return []

        return list(await self._call(columns))

    async def publish(self, writes: Sequence[Publication], run: RunRecord) -> bool:
        """DDL cannot run inside a BigQuery transaction, so what is idempotent goes first:
        destinations are created, union views refreshed and truncated tables replaced by
        copy jobs (a run that is then run again replaces them again with the same data).
        The row writes and the publication record are one DML transaction."""

        def publish() -> bool:
            with self._publish_lock:
                if not self._begin(run):  # cancelled, or no longer this execution's
                    return False
                statements: list[str] = []
                params: dict[str, Any] = {}
                for write in writes:
                    if write.write_mode == "view" or (
                        write.write_mode == "truncate" and not write.schema
                    ):
                        continue
                    self._ensure_destination(write)
                    destination, stage = self._q(write.destination), self._q(write.stage)
                    if write.write_mode == "truncate":
                        statements.append(f"DELETE FROM {destination} WHERE TRUE;")
                    elif write.write_mode == "replace_partition":
                        assertion, compared = self._check_shrink(write, len(params))
                        statements.append(assertion)
                        params.update(compared)
                        statements.append(
                            f"DELETE FROM {destination} "
                            f"WHERE CAST(`{write.partition_column}` AS DATE) = @partition_day;"
                        )
                    names = ", ".join(f"`{c}`" for c in self._names(write.stage))
                    statements.append(
                        f"INSERT INTO {destination} ({names}) SELECT {names} FROM {stage};"
                    )
                for write in writes:
                    if write.union_view is not None:
                        self._refresh_union_view(*write.union_view, write.schema)
                    for view, sql in write.views:
                        self._bq.execute(f"CREATE OR REPLACE VIEW {self._q(view)} AS {sql}")
                for write in writes:
                    if write.write_mode == "truncate" and not write.schema:
                        self._replace_with(write.stage, write.destination)
                    elif write.write_mode == "view":
                        self._view_of(write.stage, write.destination)
                day = next((w.partition_value for w in writes if w.partition_value), None)
                if day:
                    params["partition_day"] = day
                faults.held_here(faults.BEFORE_PUBLISH_TRANSACTION)
                try:
                    return self._transaction(run, statements, params)
                except api_exceptions.GoogleAPICallError as exc:
                    if DAY_CHANGED in message(exc):
                        raise TransientError(DAY_CHANGED) from exc
                    raise

        return bool(await self._call(publish))

    def _check_shrink(self, write: Publication, index: int) -> tuple[str, dict[str, Any]]:
        """Raises PublishRefused when the stage would shrink the published partition too
        much; else an ASSERT for the publishing transaction, with its parameters, that the
        published partition is still what was compared (another replica may publish it
        in between: the transaction then fails and the publication compares again)."""
        total = f"`{write.total_column}`" if write.total_column else "0"
        day = f"CAST(`{write.partition_column}` AS DATE) = @partition_day"
        published = f"FROM {self._q(write.destination)} WHERE {day}"
        (found,) = self._bq.query(
            f"SELECT (SELECT COUNT(*) {published}), (SELECT SUM({total}) {published}), "
            f"(SELECT COUNT(*) FROM {self._q(write.stage)}), "
            f"(SELECT SUM({total}) FROM {self._q(write.stage)})",
            {"partition_day": write.partition_value},
        )
        refusal = write.shrink_refusal((found[0], found[1]), (found[2], found[3]))
        if refusal:
            raise PublishRefused(refusal)
        rows, sum_ = f"compared_rows_{index}", f"compared_total_{index}"
        assertion = (
            f"ASSERT (SELECT COUNT(*) {published}) = @{rows} "
            f"AND (SELECT COALESCE(SUM({total}), 0) {published}) = @{sum_} "
            f"AS '{DAY_CHANGED}';"
        )
        return assertion, {rows: int(found[0]), sum_: found[1] or 0}

    def _view_of(self, table: str, destination: str) -> None:
        """Makes `destination` a view of `table` (a landing table becomes a view)."""
        try:
            existing = self._bq.client.get_table(self._ref(destination), retry=RETRY)
        except api_exceptions.NotFound:
            existing = None
        if existing is not None and existing.table_type != "VIEW":
            self._bq.client.delete_table(self._ref(destination), not_found_ok=True, retry=RETRY)
        self._bq.execute(
            f"CREATE OR REPLACE VIEW {self._q(destination)} AS SELECT * FROM {self._q(table)}"
        )

    def _replace_with(self, stage: str, destination: str) -> None:
        """Replaces `destination` with a copy of `stage` (a copy job: atomic, no bytes
        scanned), without the stage's expiry."""
        self._bq.client.copy_table(
            self._ref(stage),
            self._ref(destination),
            job_config=bigquery.CopyJobConfig(
                write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE
            ),
            retry=RETRY,
        ).result(retry=RETRY)
        copied = self._bq.client.get_table(self._ref(destination), retry=RETRY)
        if copied.expires is not None:
            copied.expires = None
            self._bq.client.update_table(copied, ["expires"], retry=RETRY)

    def _names(self, table: str) -> list[str]:
        return [f.name for f in self._bq.client.get_table(self._ref(table)).schema]

    def _ensure_destination(self, write: Publication) -> None:
        """Creates the destination (partitioned by the day of its partition column) if new."""
        destination = self._q(write.destination)
        if write.schema:
            body = f"({_columns_sql(write.schema)})"
            kinds = {c.name: c.type.upper() for c in write.schema}
        else:
            stage = self._bq.client.get_table(self._ref(write.stage))
            body = f"AS SELECT * FROM {self._q(write.stage)} LIMIT 0"
            kinds = {f.name: f.field_type for f in stage.schema}
        partition = ""
        if write.partition_column:
            kind = kinds.get(write.partition_column, "")
            column = f"`{write.partition_column}`"
            if kind == "DATE":
                partition = f" PARTITION BY {column}"
            elif kind in ("TIMESTAMP", "DATETIME"):
                partition = f" PARTITION BY DATE({column})"
        if write.schema:
            self._bq.execute(f"CREATE TABLE IF NOT EXISTS {destination} {body}{partition}")
            self._add_columns(write.destination, write.schema)
        else:
            self._bq.execute(f"CREATE TABLE IF NOT EXISTS {destination}{partition} {body}")

    def _refresh_union_view(
        self, view: str, tables: Sequence[str], columns: Sequence[SchemaColumn]
    ) -> None:
        existing = {t.table_id for t in self._bq.client.list_tables(self.dataset)}
        for table in tables:
            if table in existing:  # written before the schema gained a column
                self._add_columns(table, columns)
        names = ", ".join(f"`{c.name}`" for c in columns)
        selects = [f"SELECT {names} FROM {self._q(t)}" for t in tables if t in existing]
        self._bq.execute(f"CREATE OR REPLACE VIEW {self._q(view)} AS {' UNION ALL '.join(selects)}")

    async def drop(self, tables: Sequence[str]) -> None:
        def drop() -> None:
            for table in tables:
                self._bq.client.delete_table(self._ref(table), not_found_ok=True)

        await self._call(drop)

    def interrupt(self) -> None:
        """Stops the run at its next BigQuery call (a job already submitted finishes: the
        run's writes stay in its stage tables, which the next start drops)."""
        self._interrupted.set()

    async def close(self) -> None:
        """Nothing to release: the store's client serves every run."""


def _columns_sql(columns: Sequence[SchemaColumn]) -> str:
    return ", ".join(f"`{c.name}` {c.type.upper()}" for c in columns)
