"""The warehouse port: what the pipeline engine needs from a tenant's dataset.

SQL given to a warehouse is BigQuery SQL with named parameters; each adapter runs it in its
own way (DuckDB transpiles it; BigQuery runs it as is). Table names are plain names in the
tenant's dataset, already checked against the template name pattern.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any, Protocol

from convergence_server.storage.identifiers import sanitize
from convergence_server.storage.records import RunRecord

# Every staging table of a run starts with this; tables left by interrupted runs are
# found by it and dropped at start-up.
STAGE_PREFIX = "_stage_"


@dataclass(frozen=True)
class SchemaColumn:
    """A column of a shared output schema (configs/schemas/*.yml); `type` is BigQuery's."""

    name: str
    type: str
    description: str = ""


class TransientError(Exception):
    """A failure worth retrying (a write conflict, a backend hiccup)."""


class OutOfMemory(TransientError):
    """The warehouse's memory ran out: other work may free it (runs sharing the limit)."""


class WarehouseError(Exception):
    """A failure that retrying cannot fix (bad SQL, a missing file, wrong types)."""


# BigQuery's longest column name; a file's header beyond it is no header of a known format.
MAX_COLUMN_NAME = 300
# A header row is read up to this far (a file with no line break is not read whole).
MAX_HEADER_BYTES = 1 << 20


def csv_header(path: str) -> list[str]:
    """A local CSV file's column names as a load names them (`column_names`), from its first
    record (which may hold quoted line breaks); a file that does not begin with a header
    row, or is not UTF-8, fails the load saying so."""
    with open(path, "rb") as source:
        head = source.read(MAX_HEADER_BYTES + 1)
    try:  # not final: a character cut at the end of `head` is left out
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head)
    except UnicodeDecodeError as exc:
        line = head[: exc.start].count(b"\n") + 1
        raise WarehouseError(f"the file is not UTF-8 text (line {line})") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows, [])
        cut = len(head) > MAX_HEADER_BYTES and next(rows, None) is None
    except csv.Error as exc:
        raise WarehouseError(f"the file's header row is not valid CSV: {exc}") from None
    if cut:
        raise WarehouseError(f"the header row is longer than {MAX_HEADER_BYTES >> 20} MiB")
    if not header:
        raise WarehouseError(
            "the file is empty or begins with an empty row: CSV begins with its header row"
        )
    return column_names(header)


def column_names(header: Sequence[str]) -> list[str]:
    """A local file's column names as a load names them (`sanitize`d): two that become one,
    or one longer than BigQuery takes, fail the load with a message that says so."""
    names = [sanitize(name) for name in header]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise WarehouseError(f"two columns have the same name once sanitized: {twice[:40]!r}")
    for name in names:
        if len(name) > MAX_COLUMN_NAME:
            raise WarehouseError(
                f"a column name is {len(name)} characters long (at most {MAX_COLUMN_NAME}): "
                f"'{name[:40]}...'; is the file in the format the template reads?"
            )
    return names


class PublishRefused(Exception):
    """Publishing would shrink a published partition beyond its step's `max_shrink`; the
    message names the table, the day, the row counts and totals before and after."""


class Interrupted(Exception):
    """The statement was stopped by `Warehouse.interrupt` (the server is stopping)."""


class Warehouse(Protocol):
    dataset: str

    async def load(self, table: str, uri: str, fmt: str) -> int:
        """Replaces `table` with the file's rows (CSV: all STRING); returns the row count."""

    async def create_as(
        self, table: str, sql: str, params: Mapping[str, Any], into: Publication | None = None
    ) -> int:
        """Replaces `table` with the query's result; returns its row count. `into` is the
        publication that will move `table` into place, when every later step of the run only
        checks `table`: a warehouse may then write the rows into place at once, in a
        transaction that `publish` commits and `drop` (of `table`) or `close` rolls back,
        `table` reading them there meanwhile."""

    async def insert_into(self, table: str, sql: str, params: Mapping[str, Any]) -> int:
        """Appends the query's result to `table` (by column name); returns the rows added."""

    async def count(self, sql: str, params: Mapping[str, Any]) -> int:
        """The single integer a `SELECT COUNT(*) ...` query returns."""

    async def rows(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Every row a (small) query returns."""

    def row_key(self, columns: Sequence[str]) -> str:
        """A cheap SQL expression over the columns, equal for equal rows (it may also be
        equal for a few different ones: rows sharing it are then compared exactly)."""

    async def add_columns(self, table: str, columns: Sequence[str]) -> None:
        """Adds each column the table lacks, as a NULL STRING column."""

    async def tables(self, prefix: str) -> list[str]:
        """The names of the dataset's tables that start with `prefix`."""

    async def columns(self, table: str) -> list[str]:
        """The column names of `table`, in order; empty when it does not exist."""

    async def publish(self, writes: Sequence[Publication], run: RunRecord) -> bool:
        """Applies every staged write to its destination and records that this execution
        of `run` (its worker and attempt) published them, in one transaction.

        Only while the run is RUNNING for that worker and attempt and nothing was published
        for it yet; otherwise applies nothing and returns False. Returns True without
        applying anything again when this execution's publication is already recorded (a
        retry after an ambiguous failure), so a run's writes land exactly once.
        """

    async def drop(self, tables: Sequence[str]) -> None:
        """Drops the tables if they exist."""

    def interrupt(self) -> None:
        """Stops the statement running now, if any: it raises `Interrupted` (thread-safe;
        a call between statements has no effect)."""

    async def close(self) -> None:
        """Releases the connection the run used (after its last statement returned)."""


@dataclass(frozen=True)
class Publication:
    """A staged table to move into its destination when the whole run has succeeded."""

    stage: str
    destination: str
    # truncate | append | replace_partition, or view: `destination` becomes a view of
    # `stage` (a loaded file version that runs share, see `reuse` load steps)
    write_mode: str
    partition_column: str = ""
    partition_value: date | None = None
    schema: tuple[SchemaColumn, ...] = ()
    # (view name, every table sharing the schema): the view to refresh after publishing.
    union_view: tuple[str, tuple[str, ...]] | None = None
    # (name, BigQuery SQL) of views over the union view, refreshed with it.
    views: tuple[tuple[str, str], ...] = ()
    # replace_partition: refuse (PublishRefused) to take away more than this share of the
    # published partition's rows, or of its `total_column` sum, unless `allow_shrink`.
    max_shrink: float = 1.0
    total_column: str = ""
    allow_shrink: bool = False

    def shrink_refusal(
        self, old: tuple[int, Decimal | float | None], new: tuple[int, Decimal | float | None]
    ) -> str | None:
        """Why publishing `new` (rows, total) over the published `old` is refused, if it is."""
        if self.write_mode != "replace_partition" or self.allow_shrink or not old[0]:
            return None
        keep = Decimal(1) - Decimal(str(self.max_shrink))
        (old_rows, old_total), (new_rows, new_total) = (
            (rows, None if total is None else Decimal(str(total))) for rows, total in (old, new)
        )
        fewer_rows = new_rows == 0 or new_rows < old_rows * keep
        smaller_total = (
            self.total_column != ""
            and old_total is not None
            and old_total > 0
            and (new_total or Decimal(0)) < old_total * keep
        )
        if not fewer_rows and not smaller_total:
            return None

        def described(rows: int, total: Decimal | float | None) -> str:
            if not self.total_column:
                return f"{rows} rows"
            return f"{rows} rows ({self.total_column} total {total or 0})"

        return (
            f"publishing would shrink {self.destination} for {self.partition_value} from "
            f"{described(*old)} to {described(*new)}, more than the {self.max_shrink:.0%} "
            "the step allows: the export may be partial or its dates wrong. Nothing was "
            "published; trigger the run with allow_shrink=true to publish it anyway"
        )
