"""Runs one pipeline: its steps in order, then publishes what they wrote, or nothing.

Write-audit-publish: every step writes to a staging table of the run (`_stage_...`), data
quality checks read the staged data, and only when every step has passed are the staged
tables moved into their destinations, in one transaction. A failed or cancelled run thus
leaves the tenant's tables exactly as they were; its step logs and DQ results remain. (A
`reuse: true` load keeps a loaded file version in a `_src_` table whatever the outcome:
that table is a cache of the file, not output.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import sqlglot
from sqlglot import exp

from convergence_server import faults
from convergence_server.engine.templates import (
    ALLOW_SHRINK,
    HIDDEN_ISSUE,
    PLACEHOLDER,
    Catalog,
    DqCheck,
    Step,
    Template,
    has_hidden_characters,
)
from convergence_server.errors import echo
from convergence_server.storage.locks import KeyedTurns
from convergence_server.storage.sql import quote
from convergence_server.storage.warehouse import (
    STAGE_PREFIX,
    Interrupted,
    OutOfMemory,
    Publication,
    PublishRefused,
    TransientError,
    Warehouse,
    WarehouseError,
)

MAX_BACKOFF = 60.0
# A load or check step that runs out of the warehouse's memory (which runs share) is tried
# this many times at least, whatever its retry policy: the other runs may free it.
OUT_OF_MEMORY_ATTEMPTS = 3
# A failed check keeps up to this many of its rows, each value cut to SAMPLE_VALUE characters.
SAMPLE_ROWS = 3
SAMPLE_VALUE = 200
SAMPLE_BYTES = 4096  # about: a sample keeps its first columns up to this size
# Tables holding a version of a source file that `reuse: true` load steps read.
SOURCE_PREFIX = "_src_"
# One load of a source file at a time in this process: runs wanting the same version wait.
_LOADING = KeyedTurns()
# Results of check steps over a whole loaded file version, by (dataset, table, checks):
# runs reading the same version reuse them. The oldest go beyond MAX_CHECKED.
_CHECKED: dict[tuple[str, str, tuple[DqCheck, ...]], list[DqResult]] = {}
MAX_CHECKED = 1000
log = logging.getLogger(__name__)
OUTSIDE_ISSUE = "is outside the allowed source folders"
WILDCARDS = re.compile(r"[*?\[]")
WILDCARD_ISSUE = "must name one file: a local path holds no wildcard (*, ? or [)"
SWAPPED_ISSUE = "changed while the run opened it: a folder or the file became a link"


class StepFailed(Exception):
    """A step failed; the message is what the run's `error_message` says."""


class RunCancelled(Exception):
    """The run was cancelled; it stopped at a step boundary."""


class SourceRefused(ValueError):
    """A load step's source is not one the run may read: `source` as filled in, `issue`
    why not (a phrase that follows the source's name)."""

    def __init__(self, source: str, issue: str) -> None:
        super().__init__(f"source {echo(source)!r} {issue}")
        self.source = source
        self.issue = issue


@dataclass(frozen=True)
class SourceFolders:
    """Where one tenant's load steps may read."""

    sample_data: Path
    # Local folders: the shared sample data and the tenant's own folder of each root.
    local_roots: tuple[Path, ...]
    # gs:// prefixes, each ending with the tenant's own folder.
    remote_roots: tuple[str, ...] = ()
    # Whether the warehouse loads gs:// objects itself (BigQuery's load jobs do).
    reads_remote: bool = True


@dataclass(frozen=True)
class SourcePolicy:
    """The configured source folders, for every tenant (`for_tenant` gives one's own)."""

    sample_data: Path
    source_roots: tuple[Path, ...] = ()
    gcs_source_roots: tuple[str, ...] = ()
    reads_gcs: bool = False

    def for_tenant(self, tenant_id: str) -> SourceFolders:
        return SourceFolders(
            sample_data=self.sample_data,
            local_roots=(self.sample_data, *(root / tenant_id for root in self.source_roots)),
            remote_roots=tuple(f"{root}/{tenant_id}/" for root in self.gcs_source_roots),
            reads_remote=self.reads_gcs,
        )


def resolve_source(template: str, parameters: Mapping[str, Any], folders: SourceFolders) -> str:
    """A load step's source with parameters, then `{sample_data}`, filled in: a file path
    (resolved) or a gs:// URI the tenant may read. Raises `SourceRefused` otherwise.

    The trigger checks a run's sources with this before the run is created, and the run
    checks them again when its load step starts.
    """
    filled = _filled(template, parameters)
    if not filled.strip():
        raise SourceRefused(filled, "is empty")
    if has_hidden_characters(filled):
        raise SourceRefused(filled, HIDDEN_ISSUE)
    if ".." in filled.split("/"):
        raise SourceRefused(filled, "must not climb out of its folder with '..'")
    # Messages show the source as the caller wrote it: never the server's own folders.
    uri = filled.replace("{sample_data}", str(folders.sample_data))
    if "://" in uri:
        return _remote_source(uri, filled, folders)
    try:
        path = Path(uri).resolve()
    except (OSError, RuntimeError, ValueError):  # e.g. a symlink loop
        raise SourceRefused(filled, "cannot be resolved to a file") from None
    if not any(path.is_relative_to(root.resolve()) for root in folders.local_roots):
        raise SourceRefused(filled, OUTSIDE_ISSUE)
    # DuckDB's readers expand these in a path (with no escape) and follow the symlinks
    # they meet: a pattern would read files this check never saw.
    if WILDCARDS.search(uri) or WILDCARDS.search(str(path)):
        raise SourceRefused(filled, WILDCARD_ISSUE)
    try:
        exists = path.is_file()
    except OSError:  # e.g. a name too long for the file system
        exists = False
    if not exists:
        raise SourceRefused(filled, "names a file that does not exist")
    return str(path)


def _filled(template: str, parameters: Mapping[str, Any]) -> str:
    """A source with parameters filled in (`{sample_data}` left as it is)."""
    return PLACEHOLDER.sub(lambda m: str(parameters.get(m.group(1), m.group(0))), template)


def open_source(path: str, folders: SourceFolders, shown: str) -> int:
    """A descriptor of `path`, a local source as `resolve_source` returned it (links
    resolved), opened from its folder down without following a link: a folder or the file
    swapped for a link since the check is refused, so the file read is the file checked.
    Readers read it as `/dev/fd/<descriptor>`; the caller closes it. Raises
    `SourceRefused`."""
    target = Path(path)
    roots = (r.resolve() for r in folders.local_roots)
    root = next((r for r in roots if target.is_relative_to(r)), None)
    if root is None:
        raise SourceRefused(shown, OUTSIDE_ISSUE)
    parts = target.relative_to(root).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for depth, part in enumerate(parts, 1):
            # Non-blocking: a file swapped for a FIFO would block the open.
            last = os.O_NONBLOCK if depth == len(parts) else os.O_DIRECTORY
            inner = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | last, dir_fd=fd)
            os.close(fd)
            fd = inner
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceRefused(shown, "names a file that does not exist")
    except OSError:
        os.close(fd)
        raise SourceRefused(shown, SWAPPED_ISSUE) from None
    except SourceRefused:
        os.close(fd)
        raise
    return fd


class OpenedSource:
    """A local source opened by `open_source`, read by its readers as `path`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.path = f"/dev/fd/{fd}"
        self._reading: asyncio.Future[int] | None = None

    def version(self) -> tuple[int, int]:
        """(modification time in ns, size) of the file."""
        status = os.fstat(self.fd)
        return status.st_mtime_ns, status.st_size

    async def read(self, reader: Callable[[str], Awaitable[int]]) -> int:
        """`reader(path)`, which reads the file on a thread of its own."""
        self._reading = asyncio.ensure_future(reader(self.path))
        # Shielded: a cancelled step leaves the read to end (or be interrupted) first.
        return await asyncio.shield(self._reading)

    def close(self) -> None:
        """Closes the file, or, while a read of a cancelled step goes on, once it ends: a
        number closed under a reader could be given to another file before the reader
        opens it."""
        reading = self._reading
        if reading is None or reading.done():
            os.close(self.fd)
            return

        def closed(done: asyncio.Future[int]) -> None:
            os.close(self.fd)
            if not done.cancelled():
                done.exception()  # retrieved: the step that wanted it was cancelled

        reading.add_done_callback(closed)


def _remote_source(uri: str, shown: str, folders: SourceFolders) -> str:
    if not uri.startswith("gs://"):
        raise SourceRefused(shown, "must be a local path or a gs:// URI")
    if any(part in (".", "..") for part in uri[5:].split("/")) or not any(
        uri.startswith(root) for root in folders.remote_roots
    ):
        raise SourceRefused(shown, OUTSIDE_ISSUE)
    if not folders.reads_remote:
        raise SourceRefused(shown, "needs the BigQuery store (only its load jobs read gs://)")
    return uri


@dataclass(frozen=True)
class DqResult:
    check: DqCheck
    passed: bool
    observed: str
    expected: str
    message: str
    # The rows at fault (None when the check counts no rows) and up to SAMPLE_ROWS of them,
    # each a JSON object whose values are strings or null.
    failed_rows: int | None = None
    samples: tuple[str, ...] = ()
    # False when the check's query failed (the result says why).
    ran: bool = True


@dataclass(frozen=True)
class StepOutcome:
    rows: int
    attempts: int
    error: str = ""


class RunObserver(Protocol):
    """Where the engine reports progress; the domain persists it."""

    async def cancel_requested(self) -> bool: ...

    def stopping(self) -> bool:
        """True once the server is stopping: the run stops at its next step boundary."""

    async def step_started(self, index: int, step: Step, at: datetime) -> None: ...

    async def step_finished(
        self,
        index: int,
        step: Step,
        started: datetime,
        outcome: StepOutcome,
        following: tuple[Step, datetime] | None = None,
    ) -> None:
        """Step `index` ended; with `following`, step `index + 1` starts at that time (one
        write for both, at the boundary)."""

    async def dq_checked(self, step: Step, results: list[DqResult]) -> None: ...


@dataclass
class PipelineRun:
    """One execution of a template for a tenant, against its warehouse."""

    template: Template
    catalog: Catalog
    parameters: Mapping[str, Any]
    warehouse: Warehouse
    observer: RunObserver
    run_id: str
    attempt: int
    sample_data: Path
    source_roots: tuple[Path, ...]
    # Applies the staged writes once every step has passed; the domain makes it exactly
    # once (see `Warehouse.publish`).
    publish: Callable[[Sequence[Publication]], Awaitable[None]]
    # gs:// prefixes the run may read (each ends with the tenant's own folder).
    remote_roots: tuple[str, ...] = ()
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # What time it is (the server's clock: steps and runs are timed alike).
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    staged: dict[str, str] = field(default_factory=dict)
    # The loaded file versions this run reads (`reuse: true` load steps).
    reused: set[str] = field(default_factory=set)
    publications: list[Publication] = field(default_factory=list)
    # The sources this run opened, by the name its readers read them by (`/dev/fd/N`).
    opened: dict[str, str] = field(default_factory=dict)

    async def execute(self) -> None:
        """Runs every step, then publishes; raises StepFailed, RunCancelled or Interrupted
        (the server is stopping: nothing was published)."""
        try:
            if self.template.steps:
                await self._steps(self.template.steps)
            await self._between_steps()
            try:
                await self._retrying(lambda: self.publish(self.publications), 3)
            except PublishRefused as exc:
                raise StepFailed(str(exc)) from None
            except WarehouseError as exc:
                raise StepFailed(f"publishing failed: {exc}") from None
        finally:
            # Every stage this run may have created, including one whose step then failed.
            stages = {self._stage(s.destination) for s in self.template.steps if s.destination}
            try:
                await self.warehouse.drop(sorted(stages))
            except Exception:
                log.warning("run %s: cannot drop its staging tables", self.run_id, exc_info=True)

    async def _steps(self, steps: Sequence[Step]) -> None:
        """Runs the steps in order. A step's end and the next one's start (the same moment)
        are reported together once the checks between them passed, else its end alone: a
        crash during those checks leaves the step RUNNING, closed as interrupted when the
        run is recovered (on BigQuery the checks read memory; embedded, one cheap read)."""
        await self._between_steps()
        started = self.clock()
        await self.observer.step_started(0, steps[0], started)
        for index, step in enumerate(steps):
            outcome = await self._attempt(step)
            following = None
            if not outcome.error and index + 1 < len(steps):
                boundary = self.clock()
                try:
                    await self._between_steps()
                except Exception:  # a cancel or a stop: the step's end alone, then that
                    await self._report_end(index, step, started, outcome)
                    raise
                following = (steps[index + 1], boundary)
            await self.observer.step_finished(index, step, started, outcome, following)
            if outcome.error:
                raise StepFailed(f"step {step.name} failed: {outcome.error}")
            if following is not None:
                started = following[1]

    async def _report_end(
        self, index: int, step: Step, started: datetime, outcome: StepOutcome
    ) -> None:
        """Reports a step's end while another exception is raised: a failure to write it
        is logged, so that exception is what the run ends with."""
        try:
            await self.observer.step_finished(index, step, started, outcome)
        except Exception:
            log.warning(
                "run %s: cannot record the end of step %s", self.run_id, step.name, exc_info=True
            )

    async def _between_steps(self) -> None:
        if self.observer.stopping():
            raise Interrupted("the server is stopping")
        if await self.observer.cancel_requested():
            raise RunCancelled

    async def _attempt(self, step: Step) -> StepOutcome:
        attempts, allowed = 0, step.retry.attempts
        while True:
            attempts += 1
            try:
                rows = await self._run_step(step)
                return StepOutcome(rows=rows, attempts=attempts)
            except TransientError as exc:
                # Loads replace their table and checks only read: trying again is safe.
                if isinstance(exc, OutOfMemory) and step.kind in ("load", "dq"):
                    allowed = max(allowed, OUT_OF_MEMORY_ATTEMPTS)
                if attempts >= allowed:
                    return StepOutcome(
                        0, attempts, self._shown(f"{exc} (after {attempts} attempts)")
                    )
                await self.sleep(min(MAX_BACKOFF, step.retry.backoff_seconds * 2 ** (attempts - 1)))
                await self._between_steps()
            except (StepFailed, WarehouseError) as exc:
                return StepOutcome(0, attempts, self._shown(str(exc)))

    def _shown(self, error: str) -> str:
        """A step's error as its tenant sees it: an opened source by its path, not its
        descriptor, and the samples' folder (the server's own, which a reader's message may
        name) as sources name it, `{sample_data}`."""
        for read_as in sorted(self.opened, key=len, reverse=True):  # /dev/fd/17 before /dev/fd/1
            error = error.replace(read_as, self.opened[read_as])
        folders = {str(self.sample_data.resolve())}
        if self.sample_data.is_absolute():
            folders.add(str(self.sample_data))
        for folder in sorted(folders, key=len, reverse=True):  # a longer one may hold another
            error = error.replace(folder, "{sample_data}")
        return error

    async def _retrying(self, action: Callable[[], Awaitable[None]], attempts: int) -> None:
        for attempt in range(1, attempts + 1):
            try:
                await action()
                return
            except TransientError:
                if attempt == attempts:
                    raise
                await self.sleep(0.1 * 2**attempt)

    async def _run_step(self, step: Step) -> int:
        if step.kind == "load":
            return await self._load(step)
        if step.kind == "query":
            return await self._query(step)
        return await self._check(step)

    # -- steps ------------------------------------------------------------------------------

    def _stage(self, table: str) -> str:
        """This execution's staging table for `table` (an execution is a run's attempt)."""
        return f"{STAGE_PREFIX}{self.run_id.replace('-', '')[:16]}_{self.attempt}_{table}"

    async def _load(self, step: Step) -> int:
        uri = self._source(step.source)
        if "://" in uri:
            return await self._load_stage(step, uri)
        with self._opened(step.source, uri) as source:
            await faults.held(faults.BEFORE_SOURCE_READ)
            if step.reuse:
                return await self._load_once(step, uri, source)
            return await self._load_stage(step, source)

    async def _load_stage(self, step: Step, source: str | OpenedSource) -> int:
        stage = self._stage(step.destination)
        if isinstance(source, OpenedSource):
            rows = await source.read(lambda path: self.warehouse.load(stage, path, step.format))
        else:
            rows = await self.warehouse.load(stage, source, step.format)
        await self.warehouse.add_columns(stage, step.optional_columns)
        self.staged[step.destination] = stage
        self.publications.append(Publication(stage, step.destination, step.write_mode))
        return rows

    @contextlib.contextmanager
    def _opened(self, template: str, path: str) -> Iterator[OpenedSource]:
        """The checked local source `path` opened (`open_source`) while the step reads it."""
        try:
            fd = open_source(path, self._folders(), _filled(template, self.parameters))
        except SourceRefused as exc:
            raise StepFailed(str(exc)) from None
        source = OpenedSource(fd)
        self.opened[source.path] = path
        try:
            yield source
        finally:
            source.close()

    async def _load_once(self, step: Step, path: str, source: OpenedSource) -> int:
        """Loads this version of the file (its modification time and size) unless a table
        of the dataset already holds it, and reads that table. The table is named by the
        file and its version and never changes: a new version is a new table. Loading one
        drops the file's older tables but the newest of them, which runs may still read.
        The step's destination becomes a view of the table when the run publishes."""
        dataset = self.warehouse.dataset
        prefix = f"{SOURCE_PREFIX}{step.destination}_"
        prefix += _digest(f"{step.destination}\0{step.format}\0{path}") + "_"
        async with _LOADING.get(f"{dataset}.{prefix}"):
            version = source.version()
            table = f"{prefix}{version[0]:020d}_{_digest(str(version[1]))}"
            if not await self.warehouse.columns(table):
                _forget(dataset, table)
                await source.read(lambda path: self.warehouse.load(table, path, step.format))
                if source.version() != version:
                    await self.warehouse.drop([table])
                    raise TransientError(f"{path} changed while it was loaded")
                older = sorted(t for t in await self.warehouse.tables(prefix) if t != table)
                await self.warehouse.drop(older[:-1])
                for dropped in older[:-1]:
                    _forget(dataset, dropped)
            # Also when reusing: a load whose server stopped before this is completed now.
            await self.warehouse.add_columns(table, step.optional_columns)
        self.staged[step.destination] = table
        self.reused.add(table)
        self.publications.append(Publication(table, step.destination, "view"))
        return await self.warehouse.count(
            f"SELECT COUNT(*) FROM {quote(dataset)}.{quote(table)}", {}
        )

    async def _query(self, step: Step) -> int:
        if step.destination in self.staged:
            # A later step adding to a table this run already writes (always `append`).
            stage = self.staged[step.destination]
            return await self.warehouse.insert_into(stage, self._sql(step.sql), self.parameters)
        stage = self._stage(step.destination)
        shared = self.catalog.schemas.get(step.schema) if step.schema else None
        schema = shared.columns if shared else ()
        union_view, views = None, tuple[tuple[str, str], ...]()
        if shared:
            union_view = (shared.union_view, self.catalog.tables_with_schema(shared.name))
            # The views read the published tables, never this run's stages.
            views = tuple(
                (name, _render_sql(sql, self.warehouse.dataset, ())) for name, sql in shared.views
            )
        publication = Publication(
            stage,
            step.destination,
            step.write_mode,
            partition_column=step.partition_column,
            partition_value=self.parameters.get("date"),
            schema=schema,
            union_view=union_view,
            views=views,
            max_shrink=step.max_shrink,
            total_column=step.total_column,
            allow_shrink=bool(self.parameters.get(ALLOW_SHRINK, False)),
        )
        # When the later steps only check the stage, the warehouse may write it into place.
        later = self.template.steps[self.template.steps.index(step) + 1 :]
        into = publication if all(s.kind == "dq" for s in later) else None
        rows = await self.warehouse.create_as(stage, self._sql(step.sql), self.parameters, into)
        if schema:
            got, want = await self.warehouse.columns(stage), [c.name for c in schema]
            if got != want:
                missing = [c for c in want if c not in got]
                extra = [c for c in got if c not in want]
                raise StepFailed(
                    f"the query's columns must be exactly those of schema {step.schema}, "
                    f"in order (missing: {missing or 'none'}; unexpected: {extra or 'none'})"
                )
        self.staged[step.destination] = stage
        self.publications.append(publication)
        return rows

    async def _check(self, step: Step) -> int:
        table = self.staged.get(step.table, step.table)
        source = f"{quote(self.warehouse.dataset)}.{quote(table)}"
        scope = f"({step.where})" if step.where else "TRUE"
        rows = await self.warehouse.count(
            f"SELECT COUNT(*) FROM {source} WHERE {scope}", self.parameters
        )
        present = await self.warehouse.columns(table)
        # Checks of a loaded file version as a whole give the same results every time.
        known = (self.warehouse.dataset, table, step.checks)
        constant = table in self.reused and not step.where and not _uses_parameters(step)
        results = _CHECKED.get(known) if constant else None
        if results is None:
            results = await self._evaluate_all(step.checks, source, scope, rows, present)
        if constant and all(r.ran for r in results):  # an error may not recur
            _CHECKED[known] = results
            while len(_CHECKED) > MAX_CHECKED:
                _CHECKED.pop(next(iter(_CHECKED)))
        await self.observer.dq_checked(step, results)
        failed = [r for r in results if not r.passed and r.check.severity == "error"]
        if failed:
            raise StepFailed(
                "data quality check(s) failed: "
                + "; ".join(f"{r.check.name} ({r.message})" for r in failed)
            )
        return rows

    async def _evaluate_all(
        self, checks: Sequence[DqCheck], source: str, scope: str, rows: int, present: list[str]
    ) -> list[DqResult]:
        """The checks' results, in order. The row checks (not_null, accepted_values,
        expression) are counted together in one scan of the table; when that query cannot
        run, each is counted alone, so that the result names the check at fault."""
        known = [_evaluated_without_query(c, rows, present) for c in checks]
        by_row = {
            i: c
            for i, (c, r) in enumerate(zip(checks, known, strict=True))
            if r is None and c.type in _ROW_CHECKS
        }
        counts = await self._count_together(by_row, source, scope) if len(by_row) > 1 else {}
        return [
            r if r is not None else await self._evaluate(c, source, scope, present, counts.get(i))
            for i, (c, r) in enumerate(zip(checks, known, strict=True))
        ]

    async def _count_together(
        self, checks: Mapping[int, DqCheck], source: str, scope: str
    ) -> dict[int, int]:
        """The failing rows of each row check, by position, from one query; none when the
        query cannot run."""
        params, counted = dict(self.parameters), []
        for position, check in checks.items():
            condition, _what, added = _row_condition(check, position)
            params.update(added)
            counted.append(f"COUNTIF({condition})")
        try:
            found = await self.warehouse.rows(
                f"SELECT {', '.join(counted)} FROM {source} WHERE {scope}", params
            )
        except WarehouseError:
            return {}
        values = found[0] if found else [0] * len(checks)
        return {position: int(n or 0) for position, n in zip(checks, values, strict=True)}

    async def _evaluate(
        self,
        check: DqCheck,
        source: str,
        scope: str,
        present: list[str],
        failures: int | None = None,
    ) -> DqResult:
        """A check that needs a query; a row check's `failures` when already counted."""
        try:
            if check.type in _ROW_CHECKS:
                return await self._row_check(check, source, scope, failures)
            return await self._grouped(check, source, scope, present)
        except WarehouseError as exc:  # e.g. an expression naming a column the file lacks
            return DqResult(check, False, "error", "", f"the check cannot run: {exc}", ran=False)

    async def _row_check(
        self, check: DqCheck, source: str, scope: str, failures: int | None
    ) -> DqResult:
        condition, what, added = _row_condition(check)
        params = {**self.parameters, **added}
        where = f"WHERE {scope} AND {condition}"
        if failures is None:
            failures = await self.warehouse.count(f"SELECT COUNT(*) FROM {source} {where}", params)
        samples: tuple[str, ...] = ()
        if failures:
            found = await self.warehouse.rows(
                f"SELECT TO_JSON_STRING(_row) FROM {source} AS _row {where} LIMIT {SAMPLE_ROWS}",
                params,
            )
            samples = tuple(_sample(row[0]) for row in found)
        return DqResult(
            check, failures == 0, str(failures), "0", f"{failures} {what}", failures, samples
        )

    async def _grouped(
        self, check: DqCheck, source: str, scope: str, present: list[str]
    ) -> DqResult:
        """unique, unique_rows and one_value_per: groups of rows that break the rule."""
        if check.type == "one_value_per":
            group = ", ".join(quote(c) for c in check.per)
            having = f"COUNT(DISTINCT {quote(check.column)}) > 1"
            values = f"STRING_AGG(DISTINCT CAST({quote(check.column)} AS STRING), ', ')"
            shown = f"TO_JSON_STRING(STRUCT({group}, {values} AS {quote(check.column)}))"
            count = "row_count"
            what = f"group(s) of ({', '.join(check.per)}) with more than one {check.column}"
        else:
            columns = check.columns or tuple(c for c in present if c not in check.ignore_columns)
            listed = ", ".join(quote(c) for c in columns)
            # A row as text compares every type, nested records and arrays included.
            shown = f"TO_JSON_STRING(STRUCT({listed}))"
            group = listed if check.type == "unique" else shown
            having = "COUNT(*) > 1"
            if check.type == "unique_rows":
                # Only rows whose cheap key repeats are compared as text.
                key = self.warehouse.row_key(columns)
                scope = (
                    f"{scope} AND {key} IN (SELECT {key} FROM {source} WHERE {scope} "
                    f"GROUP BY 1 HAVING COUNT(*) > 1)"
                )
            count = "copies"
            what = (
                f"duplicated value(s) of ({listed.replace('`', '')})"
                if check.type == "unique"
                else "row(s) with identical copies"
                + (f" ignoring {', '.join(check.ignore_columns)}" if check.ignore_columns else "")
            )
        groups = f"FROM {source} WHERE {scope} GROUP BY {group} HAVING {having}"
        found = await self.warehouse.rows(
            f"SELECT COUNT(*), SUM(n) FROM (SELECT COUNT(*) AS n {groups})", self.parameters
        )
        failures, failed_rows = (int(found[0][0] or 0), int(found[0][1] or 0)) if found else (0, 0)
        samples: tuple[str, ...] = ()
        if failures:
            sampled = await self.warehouse.rows(
                f"SELECT {shown}, COUNT(*) {groups} LIMIT {SAMPLE_ROWS}", self.parameters
            )
            samples = tuple(_sample(text, {count: n}) for text, n in sampled)
        return DqResult(
            check,
            failures == 0,
            str(failures),
            "0",
            f"{failures} {what} ({failed_rows} rows)",
            failed_rows,
            samples,
        )

    # -- rendering --------------------------------------------------------------------------

    def _folders(self) -> SourceFolders:
        return SourceFolders(self.sample_data, self.source_roots, self.remote_roots)

    def _source(self, template: str) -> str:
        """The step's source with parameters, then `{sample_data}`, filled in and checked."""
        try:
            return resolve_source(template, self.parameters, self._folders())
        except SourceRefused as exc:
            raise StepFailed(str(exc)) from None

    def _sql(self, text: str) -> str:
        """The step's SQL with `{dataset}` filled in and this run's staged tables read."""
        try:
            return _render_sql(text, self.warehouse.dataset, tuple(sorted(self.staged.items())))
        except sqlglot.errors.ParseError as exc:
            raise StepFailed(f"cannot parse the step's SQL: {exc}") from None


@functools.lru_cache(maxsize=256)
def _render_sql(text: str, dataset: str, staged: tuple[tuple[str, str], ...]) -> str:
    """`PipelineRun._sql`, kept for the runs that render the same step again (the daily runs
    of a template over one loaded file): sqlglot parses a large step as slowly as it
    transpiles it (`storage.sql.to_duckdb`)."""
    tables = dict(staged)
    statements = sqlglot.parse(text.replace("{dataset}", quote(dataset)), read="bigquery")

    def read_staged(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Table) and node.db == dataset and node.name in tables:
            node.set("this", exp.to_identifier(tables[node.name]))
        return node

    return ";\n".join(
        s.transform(read_staged).sql(dialect="bigquery") for s in statements if s is not None
    )


# Checks of single rows: counted together in one query (`PipelineRun._evaluate_all`).
_ROW_CHECKS = ("not_null", "accepted_values", "expression")


def _evaluated_without_query(check: DqCheck, rows: int, present: list[str]) -> DqResult | None:
    """The result of a check that needs no query (or whose columns are missing), else None."""
    if check.type == "columns_present":
        missing = [c for c in check.columns if c not in present]
        return DqResult(
            check,
            not missing,
            f"missing: {', '.join(missing)}" if missing else "all present",
            ", ".join(check.columns),
            f"{len(missing)} required column(s) missing: {', '.join(missing)}"
            if missing
            else "every required column is present",
        )
    if check.type == "row_count":
        low, high = check.minimum, check.maximum
        ok = (low is None or rows >= low) and (high is None or rows <= high)
        expected = f"{'' if low is None else low}..{'' if high is None else high}"
        return DqResult(check, ok, str(rows), expected, f"{rows} rows (expected {expected})")
    named = (check.column, *check.columns, *check.per, *check.ignore_columns)
    missing = [c for c in named if c and c not in present]
    if missing:
        return DqResult(
            check, False, "column missing", "", f"column(s) {', '.join(missing)} missing"
        )
    return None


def _row_condition(check: DqCheck, tag: int = 0) -> tuple[str, str, dict[str, Any]]:
    """A row check's condition for a failing row, what such rows are, and the parameters
    the condition adds (their names carry `tag`, so that several checks share a query)."""
    if check.type == "not_null":
        return f"{quote(check.column)} IS NULL", f"rows with NULL {check.column}", {}
    if check.type == "accepted_values":
        names = [f"dq_{tag}_value_{i}" for i in range(len(check.values))]
        listed = ", ".join(f"@{n}" for n in names)
        return (
            f"{quote(check.column)} IS NOT NULL "
            f"AND CAST({quote(check.column)} AS STRING) NOT IN ({listed})",
            f"rows with {check.column} outside {list(check.values)}",
            dict(zip(names, check.values, strict=True)),
        )
    return f"({check.sql}) IS NOT TRUE", f"rows where NOT ({check.sql})", {}


def _sample(text: object, extra: Mapping[str, object] | None = None) -> str:
    """A failed row as a JSON object of strings (numbers keep every digit) or nulls."""
    try:
        row = json.loads(str(text), parse_float=str, parse_int=str)
    except ValueError:
        row = str(text)
    if not isinstance(row, dict):
        row = {"row": row}
    row = {**{k: str(v) for k, v in (extra or {}).items()}, **row}
    sample: dict[str, str | None] = {}
    size = 0
    for key, value in row.items():
        shown = value if value is None or isinstance(value, str) else json.dumps(value)
        shown = shown if shown is None else shown[:SAMPLE_VALUE]
        size += len(str(key)) + len(shown or "") + 8
        if size > SAMPLE_BYTES:
            sample["..."] = f"{len(row) - len(sample)} more columns"
            break
        sample[str(key)] = shown
    return json.dumps(sample)


def _forget(dataset: str, table: str) -> None:
    """Drops the check results kept for a table about to be loaded or dropped."""
    for known in [k for k in _CHECKED if k[:2] == (dataset, table)]:
        _CHECKED.pop(known, None)


def _uses_parameters(step: Step) -> bool:
    """Whether a check step's SQL may name a parameter (an `@`, even in a literal)."""
    return any("@" in c.sql for c in step.checks)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
