"""The BigQuery store's own tables and views in the central dataset (a part of BigQueryStore).

The port's run, step, usage and schedule tables are views here, over append-only tables
(`EVENT_BACKED`); each tenant has a one-row counters table that its transactions update
first. `migrate` brings the central dataset to the newest `schema.MIGRATIONS` and
replaces the views.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from convergence_server.storage import schema
from convergence_server.storage.bigquery_central import Central
from convergence_server.storage.bigquery_client import STARTUP_RETRY
from convergence_server.storage.bigquery_warehouse import create_table_sql
from convergence_server.storage.identifiers import quote_identifier

# Each run's state changes, and each step's; the central tables of those names are views.
EVENT_COLUMNS = (
    schema.Column("event_seq", "INT64", required=True),
    schema.Column("event", "STRING", required=True),
    schema.Column("event_time", "TIMESTAMP", required=True),
    # On `created` and `finished` events, what the usage view derives the tenant's daily
    # row from: the day it counts on, the tenant's PENDING or RUNNING runs after the
    # change, and (on `created`, when admitted against them) the limits.
    schema.Column("usage_day", "DATE"),
    schema.Column("active_after", "INT64"),
    schema.Column("daily_limit", "INT64"),
    schema.Column("concurrent_limit", "INT64"),
)
USAGE_COLUMNS = {c.name: c.type for c in EVENT_COLUMNS[3:]}
RUN_EVENTS = schema.Table(
    "tenant_run_events",
    (*schema.TENANT_PIPELINE_RUNS.columns, *EVENT_COLUMNS),
    partition_by="created_at",
    cluster_by=("tenant_id", "pipeline_logging_id"),
)
STEP_EVENTS = schema.Table(
    "tenant_step_events",
    (*schema.TENANT_STEP_LOGS.columns, schema.Column("recorded_at", "TIMESTAMP", required=True)),
    partition_by="step_start_time",
    cluster_by=("tenant_id", "pipeline_logging_id"),
)
HEARTBEATS = schema.Table(
    "tenant_run_heartbeats",
    (
        schema.Column("pipeline_logging_id", "STRING", required=True),
        schema.Column("worker_id", "STRING", required=True),
        schema.Column("beat_at", "TIMESTAMP", required=True),
    ),
    partition_by="beat_at",
    cluster_by=("pipeline_logging_id",),
    # Only the newest beats matter (a lease is seconds): a week of them is plenty.
    partition_expiration_days=7,
)
# Each schedule's versions, a row per change; the central table of that name is a view of
# each schedule's newest.
SCHEDULE_EVENTS = schema.Table(
    "tenant_schedule_events",
    (*schema.TENANT_SCHEDULES.columns, schema.Column("recorded_at", "TIMESTAMP", required=True)),
    cluster_by=("tenant_id", "schedule_id"),
)
# One per tenant (`tenant_run_counters_{tenant_id}`, one row): BigQuery detects transaction
# conflicts per table, so only one tenant's changes ever take turns.
COUNTERS = schema.Table(
    "tenant_run_counters",
    (
        schema.Column("tenant_id", "STRING", required=True),
        schema.Column("seq", "INT64", required=True),
        schema.Column("active_runs", "INT64", required=True),
        schema.Column("runs_day", "DATE"),
        schema.Column("runs_today", "INT64", required=True),
        schema.Column("updated_at", "TIMESTAMP", required=True),
        # What `usage` answers the newest usage day from without reading the events:
        # that day (of the newest admission or end), the tenant's highest concurrency after
        # a change of that day, and the last admission's limits (NULL: none yet).
        schema.Column("usage_day", "DATE"),
        schema.Column("usage_peak", "INT64"),
        schema.Column("daily_limit", "INT64"),
        schema.Column("concurrent_limit", "INT64"),
    ),
)
# The counters' columns each migration adds to the tables of the tenants that exist, and
# how many tenants' tables a migration changes at once (each is a script of two
# statements: a store with 1,000 tenants takes about three minutes on BigQuery, estimated).
COUNTERS_ADDS = {10: ("usage_day", "usage_peak", "daily_limit", "concurrent_limit")}
MIGRATION_THREADS = 16
# Tables that the embedded store keeps as tables and this one derives, as views, from
# append-only tables (created in their place).
EVENT_BACKED = {
    schema.TENANT_PIPELINE_RUNS.name: (RUN_EVENTS, HEARTBEATS),
    schema.TENANT_STEP_LOGS.name: (STEP_EVENTS,),
    schema.TENANT_USAGE_QUOTAS.name: (),
    schema.TENANT_SCHEDULES.name: (SCHEDULE_EVENTS,),
}
MIGRATIONS_TABLE = schema.Table(
    "schema_migrations",
    (
        schema.Column("version", "INT64", required=True),
        schema.Column("description", "STRING", required=True),
        schema.Column("applied_at", "TIMESTAMP", required=True),
    ),
)


def counters_table(db: Central, tenant_id: str) -> str:
    """The tenant's own counters table (one row)."""
    quote_identifier(tenant_id)
    return db.table(f"{COUNTERS.name}_{tenant_id}")


def next_seq_sql(db: Central, tenant_id: str) -> str:
    """The statements that take the tenant's next sequence number into `next_seq`; the
    UPDATE is what makes two transactions of one tenant conflict (and only those: the
    table is the tenant's own)."""
    counters = counters_table(db, tenant_id)
    return f"""
            UPDATE {counters} SET seq = seq + 1, updated_at = CURRENT_TIMESTAMP() WHERE TRUE;
            SET next_seq = (SELECT seq FROM {counters});
        """


def migrate(db: Central) -> None:
    client = db.runner.client
    client.create_dataset(db.name, exists_ok=True, retry=STARTUP_RETRY)
    db.query(create_table_sql(db.name, MIGRATIONS_TABLE))
    rows = db.query(f"SELECT MAX(version) AS v FROM {db.table('schema_migrations')}")
    applied = (rows[0][0] if rows else None) or 0
    created: set[str] = set()  # at their newest shape: later columns are there already
    for migration in schema.MIGRATIONS:
        if migration.version <= applied:
            continue
        for table in migration.creates:
            created.add(table.name)
            for physical in EVENT_BACKED.get(table.name, (table,)):
                db.query(create_table_sql(db.name, physical))
        for table, names in migration.adds:
            if table.name in created:
                continue
            physical = EVENT_BACKED.get(table.name, (table,))[0]
            types = {c.name: c.type for c in table.columns}
            for name in names:
                db.query(
                    f"ALTER TABLE {db.table(physical.name)} "
                    f"ADD COLUMN IF NOT EXISTS {name} {types[name]}"
                )
        for table in migration.clusters:
            if table.name not in created:
                found = client.get_table(f"{db.name}.{table.name}", retry=STARTUP_RETRY)
                found.clustering_fields = list(table.cluster_by)
                client.update_table(found, ["clustering_fields"], retry=STARTUP_RETRY)
        for fill in migration.fills:
            if fill.table.name in created:
                continue
            for physical in EVENT_BACKED.get(fill.table.name, (fill.table,)):
                if fill.column in physical.column_names:
                    db.query(
                        f"UPDATE {db.table(physical.name)} SET {fill.column} = @v "
                        f"WHERE {fill.column} IS NULL",
                        v=fill.value,
                    )
        if migration.version in COUNTERS_ADDS:
            _add_counters_columns(db, COUNTERS_ADDS[migration.version])
        db.query(
            f"INSERT INTO {db.table('schema_migrations')} (version, description, applied_at) "
            "SELECT @v, @d, CURRENT_TIMESTAMP() FROM UNNEST([1]) "
            f"WHERE NOT EXISTS (SELECT 1 FROM {db.table('schema_migrations')} "
            "WHERE version = @v)",
            v=migration.version,
            d=migration.description,
        )
    db.query(runs_view_sql(db))
    db.query(steps_view_sql(db))
    db.query(usage_view_sql(db))
    db.query(schedules_view_sql(db))


def _add_counters_columns(db: Central, names: tuple[str, ...]) -> None:
    """Adds `names` to every tenant's counters table and fills the usage columns from the
    usage view (once: a table whose `usage_day` is set is left alone), one script per
    tenant, `MIGRATION_THREADS` at a time. Replicas of an older version that change runs
    meanwhile do not keep the new columns: a rolling upgrade's day may show a lower
    `max_concurrent_reached` until the next day."""
    types = {c.name: c.type for c in COUNTERS.columns}
    adds = ", ".join(f"ADD COLUMN IF NOT EXISTS {name} {types[name]}" for name in names)
    prefix = f"{COUNTERS.name}_"
    found = db.runner.client.list_tables(db.name, retry=STARTUP_RETRY)
    tables = [t.table_id for t in found if t.table_id.startswith(prefix)]

    def migrate_one(table_id: str) -> None:
        counters = db.table(table_id)
        db.query(
            f"""
            ALTER TABLE {counters} {adds};
            UPDATE {counters} AS c SET usage_day = u.usage_date,
              usage_peak = u.max_concurrent_reached, daily_limit = u.daily_limit,
              concurrent_limit = u.concurrent_limit
            FROM (SELECT * FROM {db.table(schema.TENANT_USAGE_QUOTAS.name)}
                  WHERE tenant_id = @t ORDER BY usage_date DESC LIMIT 1) AS u
            WHERE c.usage_day IS NULL;
            """,
            t=table_id.removeprefix(prefix),
        )

    with ThreadPoolExecutor(MIGRATION_THREADS) as pool:
        list(pool.map(migrate_one, tables))


def usage_touch_sql(after: str) -> str:
    """The SET clauses that count a change of the tenant's active runs to `after` on the
    usage day `@day` in its counters row: a newer day starts over, an older one (a clock
    behind) is left to the usage view. They come first in the UPDATE's SET list, before
    the change of `active_runs`, so that `after` reads the row as it was whether the
    clauses see the row before the UPDATE (standard SQL) or each one the last's result."""
    return f"""
              usage_peak = CASE WHEN usage_day = @day THEN GREATEST(usage_peak, {after})
                                WHEN usage_day > @day THEN usage_peak ELSE {after} END,
              usage_day = IF(usage_day > @day, usage_day, @day)"""


def runs_view_sql(db: Central) -> str:
    return f"CREATE OR REPLACE VIEW {db.table(schema.TENANT_PIPELINE_RUNS.name)} AS {runs_sql(db)}"


def runs_sql(db: Central, where: str = "TRUE", beats: str = "TRUE") -> str:
    """Each run's newest state among the run events passing `where`, its heartbeat the
    newest of its current worker's among the beats passing `beats`: the view
    `tenant_pipeline_runs`, with both conditions applied to the tables themselves, where
    BigQuery can prune partitions by them (a filter on the view is not pushed below its
    window). `where` must keep or drop a run's events together: every event of a run holds
    its `tenant_id` and `created_at`. The store's reads that need no heartbeat read
    `latest_events_sql` alone."""
    columns = [
        "IF(b.beat_at > e.heartbeat_at OR e.heartbeat_at IS NULL, b.beat_at, e.heartbeat_at)"
        " AS heartbeat_at"
        if c.name == "heartbeat_at"
        else f"e.{c.name}"
        for c in schema.TENANT_PIPELINE_RUNS.columns
    ]
    return (
        f"SELECT {', '.join(columns)} FROM ({latest_events_sql(db, where)}) AS e "
        "LEFT JOIN (SELECT pipeline_logging_id, worker_id, MAX(beat_at) AS beat_at "
        f"FROM {db.table(HEARTBEATS.name)} WHERE {beats} "
        "GROUP BY pipeline_logging_id, worker_id) AS b "
        "ON b.pipeline_logging_id = e.pipeline_logging_id AND b.worker_id = e.worker_id"
    )


def latest_events_sql(db: Central, where: str = "TRUE") -> str:
    return (
        f"SELECT * FROM {db.table(RUN_EVENTS.name)} WHERE {where} QUALIFY ROW_NUMBER() "
        # tenant_id leads the window, so that a filter on it reaches the clustered table.
        "OVER (PARTITION BY tenant_id, pipeline_logging_id ORDER BY event_seq DESC) = 1"
    )


def latest_steps_sql(db: Central, where: str = "TRUE") -> str:
    """Each step's newest row; an ended step outranks a RUNNING row written after it."""
    return (
        f"SELECT * FROM {db.table(STEP_EVENTS.name)} WHERE {where} QUALIFY ROW_NUMBER() "
        "OVER (PARTITION BY tenant_id, pipeline_logging_id, step_logging_id "
        "ORDER BY IF(status = 'RUNNING', 0, 1) DESC, "
        "recorded_at DESC) = 1"
    )


def steps_view_sql(db: Central) -> str:
    columns = ", ".join(c.name for c in schema.TENANT_STEP_LOGS.columns)
    return (
        f"CREATE OR REPLACE VIEW {db.table(schema.TENANT_STEP_LOGS.name)} AS "
        f"SELECT {columns} FROM ({latest_steps_sql(db)})"
    )


def latest_schedules_sql(db: Central, where: str = "TRUE") -> str:
    """Each schedule's newest version among the rows passing `where` (which must keep or
    drop a schedule's rows together: filter on its tenant or id here, on the rest after)."""
    return (
        f"SELECT * FROM {db.table(SCHEDULE_EVENTS.name)} WHERE {where} QUALIFY ROW_NUMBER() "
        # tenant_id leads the window, so that a filter on it reaches the clustered table.
        "OVER (PARTITION BY tenant_id, schedule_id ORDER BY version DESC) = 1"
    )


def schedules_view_sql(db: Central) -> str:
    columns = ", ".join(c.name for c in schema.TENANT_SCHEDULES.columns)
    return (
        f"CREATE OR REPLACE VIEW {db.table(schema.TENANT_SCHEDULES.name)} AS "
        f"SELECT {columns} FROM ({latest_schedules_sql(db)})"
    )


def usage_view_sql(db: Central) -> str:
    """`tenant_usage_quotas` from the `created` and `finished` events, row for row what
    the embedded store keeps in a table: a day's row counts the runs created that day
    and how those ended; its concurrency is the tenant's after the day's last change,
    its peak the highest after any; its limits those of the last admission so far."""
    events = db.table(RUN_EVENTS.name)
    return f"""
            CREATE OR REPLACE VIEW {db.table(schema.TENANT_USAGE_QUOTAS.name)} AS
            WITH touches AS (
              SELECT tenant_id, usage_day, event, event_seq, event_time, active_after,
                LAST_VALUE(daily_limit IGNORE NULLS) OVER so_far AS daily_limit,
                LAST_VALUE(concurrent_limit IGNORE NULLS) OVER so_far AS concurrent_limit
              FROM {events}
              WHERE event IN ('created', 'finished')
              WINDOW so_far AS (PARTITION BY tenant_id ORDER BY event_seq
                                ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
            ),
            last_touch AS (
              SELECT * FROM touches WHERE TRUE
              QUALIFY ROW_NUMBER() OVER (
                PARTITION BY tenant_id, usage_day ORDER BY event_seq DESC) = 1
            ),
            days AS (
              SELECT tenant_id, usage_day, COUNTIF(event = 'created') AS runs,
                     MAX(active_after) AS peak, MAX(event_time) AS updated_at
              FROM touches GROUP BY tenant_id, usage_day
            ),
            ends AS (
              SELECT tenant_id, DATE(created_at) AS created_day,
                     COUNTIF(status = 'COMPLETE') AS ok, COUNTIF(status != 'COMPLETE') AS bad
              FROM {events} WHERE event = 'finished'
              GROUP BY tenant_id, created_day
            )
            SELECT d.tenant_id, d.usage_day AS usage_date,
                   d.runs AS pipelines_run_today,
                   IFNULL(e.ok, 0) AS pipelines_succeeded_today,
                   IFNULL(e.bad, 0) AS pipelines_failed_today,
                   l.active_after AS concurrent_pipelines_running,
                   d.peak AS max_concurrent_reached,
                   IFNULL(l.daily_limit, 0) AS daily_limit,
                   IFNULL(l.concurrent_limit, 0) AS concurrent_limit,
                   d.updated_at
            FROM days AS d
            JOIN last_touch AS l ON l.tenant_id = d.tenant_id AND l.usage_day = d.usage_day
            LEFT JOIN ends AS e ON e.tenant_id = d.tenant_id AND e.created_day = d.usage_day
        """
