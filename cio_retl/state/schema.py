"""The state tables, and how a store creates them and upgrades those of older versions.

Every table lives in one schema (``cio_retl`` unless configured). State rows belong to a
destination workspace (:class:`Workspace`); the tables that grow with a model have no key
index where the dialect keeps none (DuckDB). :class:`StoreBase` is what every part of the
store shares: the engine, the dialect, the bound workspace and table names.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cio_retl.config import STATE_SCHEMA
from cio_retl.dialects import JSON_TEXT, ROWS, dialect_for

metadata = sa.MetaData(schema=STATE_SCHEMA)

# Rows from before state was kept per workspace carry this workspace until the first sync with
# credentials takes them over (StateStore.enter_workspace). No Site ID is empty.
LEGACY_WORKSPACE = ""

# Snapshots and rejections are keyed by workspace (the Site ID), then model and key: the diff
# reads one workspace's rows of one model and joins them on key, so on PostgreSQL the primary
# key's B-tree serves that join with equality on its leading columns.
snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("workspace", sa.String, primary_key=True),
    sa.Column("model", sa.String, primary_key=True),
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("fingerprint", sa.String, nullable=False),
    # JSON of the item's identifiers, and of the acknowledged attributes
    sa.Column("identifiers", sa.String, nullable=False, info={JSON_TEXT: True}),
    sa.Column("attributes", sa.String, nullable=False, info={JSON_TEXT: True}),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
)

rejections = sa.Table(
    "rejections",
    metadata,
    sa.Column("workspace", sa.String, primary_key=True),
    sa.Column("model", sa.String, primary_key=True),
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("field", sa.String),
    sa.Column("status", sa.Integer),
    sa.Column("payload", sa.String),  # the item with values redacted: names and types only
    sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
    # A cio_retl.records.RejectionCode value; NULL for rows recorded before codes existed
    # (added to older tables by ensure_schema).
    sa.Column("code", sa.String),
)

# The events Customer.io acknowledged, one row per (model, event key): an event model is
# append-only, so this is all its state (no attributes: an event is never changed or
# deleted, and once here it is never sent again). ``event_id`` is the ULID it was sent with
# and ``event_time`` its timestamp in Unix seconds (the newest sent, for reports).
sent_events = sa.Table(
    "sent_events",
    metadata,
    sa.Column("workspace", sa.String, primary_key=True),  # events sent to one workspace
    sa.Column("model", sa.String, primary_key=True),
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("event_id", sa.String, nullable=False),
    sa.Column("event_time", sa.BigInteger, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("model", sa.String, primary_key=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.String, nullable=False),  # running | succeeded | rejected | failed
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("full_resync", sa.Boolean, nullable=False),
    sa.Column("planned", sa.Integer, nullable=False, default=0),
    sa.Column("created", sa.Integer, nullable=False, default=0),
    sa.Column("updated", sa.Integer, nullable=False, default=0),
    sa.Column("deleted", sa.Integer, nullable=False, default=0),
    sa.Column("rejected", sa.Integer, nullable=False, default=0),
    sa.Column("requests", sa.Integer, nullable=False, default=0),
    sa.Column("bytes_sent", sa.BigInteger, nullable=False, default=0),
    sa.Column("error", sa.String),
    # The Site ID whose state the run read and wrote (LEGACY_WORKSPACE: a plan over rows from
    # before workspaces; NULL: a plan with no workspace to name), and what
    # GET /api/v1/accounts/region reported for it (for a dry run: at its last sync).
    sa.Column("workspace", sa.String),
    sa.Column("environment_id", sa.BigInteger),
    sa.Column("region", sa.String),
)

# Every rejection of a run counted by code, one row per (run, model, code): the rejections
# table keeps only each key's latest, and a run's report lists only its first few.
run_rejections = sa.Table(
    "run_rejections",
    metadata,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("model", sa.String, primary_key=True),
    sa.Column("code", sa.String, primary_key=True),
    sa.Column("row_count", sa.BigInteger, nullable=False),
)

# Every workspace this state store has synced to, one row each: what a plan without
# credentials chooses from, and where the takeover of rows from before workspaces is
# recorded (once: the adopted_* columns of the workspace that took them).
workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("site_id", sa.String, primary_key=True),
    sa.Column("environment_id", sa.BigInteger),
    sa.Column("region", sa.String),
    sa.Column("first_synced_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("adopted_run_id", sa.String),
    sa.Column("adopted_at", sa.DateTime(timezone=True)),
    sa.Column("adopted_snapshots", sa.BigInteger),
    sa.Column("adopted_rejections", sa.BigInteger),
    sa.Column("adopted_events", sa.BigInteger),
)

# Locks are per model, not per workspace: the rule is one run per model at a time, and it
# also covers what two workspaces share, the warehouse side of a run (a DuckDB file admits one
# writing process anyway) and the takeover of rows from before workspaces, which two runs to
# different workspaces must not race for. A sync to staging and one to production of the same
# model therefore run one after the other.
locks = sa.Table(
    "locks",
    metadata,
    sa.Column("model", sa.String, primary_key=True),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("owner", sa.String, nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
)

# The workspace rate budget shared by the processes sending to one workspace (see
# cio_retl.state.budget.SharedRateBudget); keyed by a digest, never by the site id.
rate_budget = sa.Table(
    "rate_budget",
    metadata,
    sa.Column("workspace", sa.String, primary_key=True),
    sa.Column("tat", sa.DateTime(timezone=True), nullable=False),
)


# Built rows Customer.io acknowledged whose snapshot rows are not written yet: ranges of
# sequence numbers of a run's plan table (``plan``, its unquoted name), each range's built
# rows all acknowledged. Where the dialect writes snapshots in whole row groups
# (Dialect.snapshot_merge_rows), an acknowledgment is recorded here within a second and the
# snapshot rows follow once a row group's worth is due, or when the phase ends; a run killed
# in between leaves both this and its plan, and the next run of the model writes them before
# it plans (cio_retl.snapshot_merge). ``identifiers_head`` and ``identifiers_tail`` are the
# identifiers' JSON text around the key's JSON string, as the plan's model had them. No key:
# a few rows a plan, rewritten as a whole when a merge takes some of them.
acknowledged_ranges = sa.Table(
    "acknowledged_ranges",
    metadata,
    sa.Column("plan", sa.String, nullable=False),
    sa.Column("workspace", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("first_seq", sa.BigInteger, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("identifiers_head", sa.String, nullable=False),
    sa.Column("identifiers_tail", sa.String, nullable=False),
    sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=False),
)


# The keys and fingerprints a run read from a warehouse that is not the state database: the
# cross-database diff counts and finds removed keys here, in SQL, instead of in memory.
staged_keys = sa.Table(
    "staged_keys",
    metadata,
    sa.Column("token", sa.String, nullable=False),  # one diff of one run
    sa.Column("model", sa.String, nullable=False),
    sa.Column("key", sa.String),  # NULL keys are staged too: they count as rows
    sa.Column("fingerprint", sa.String, nullable=False),
    sa.Column("staged_at", sa.DateTime(timezone=True), nullable=False),
)


# A dry run's cross-database diff stages into this instead: a temporary table of the diff's
# own state connection, so reading writes no table of the state database.
session_staged_keys = sa.Table(
    "cio_retl_staged_keys",
    sa.MetaData(),
    *(sa.Column(c.name, c.type, nullable=c.nullable) for c in staged_keys.columns),
    prefixes=["TEMPORARY"],
)


def _without_primary_key(table: sa.Table, name: str, json_text: bool) -> sa.Table:
    """``table``'s columns (NOT NULL kept) as a table ``name`` of its own, with no key; its
    JSON text columns marked as such (JSON_TEXT) only with ``json_text``."""
    return sa.Table(
        name,
        sa.MetaData(schema=table.schema),
        *(
            sa.Column(c.name, c.type, nullable=c.nullable, info=c.info if json_text else {})
            for c in table.columns
        ),
    )


# The tables that grow with a model, and so have no key index where the dialect keeps none
# (DuckDB, see Dialect.state_primary_keys): each as created then, and the name an older,
# keyed one is copied through; by whether the dialect compresses JSON text there
# (Dialect.compresses_json_text).
_UNKEYED = {
    json_text: {
        table: (
            _without_primary_key(table, table.name, json_text),
            _without_primary_key(table, f"{table.name}_unkeyed", json_text),
        )
        for table in (snapshots, rejections, sent_events)
    }
    for json_text in (False, True)
}

# Columns older versions kept that nothing reads any more, dropped by the upgrade.
# ``snapshots.attrs_hash``: a digest of the attributes text, compared with nothing; computing
# and storing 32 hex characters per row was a measured part of every snapshot write.
RETIRED_COLUMNS: dict[sa.Table, tuple[str, ...]] = {snapshots: ("attrs_hash",)}

SNAPSHOT_COLUMNS = (
    "workspace",
    "model",
    "key",
    "fingerprint",
    "identifiers",
    "attributes",
    "run_id",
    "synced_at",
)


# Runs of one process create the schema one at a time (threads, Dagster's in-process steps).
_SCHEMA_LOCK = threading.Lock()


def empty_relation(table: sa.Table, engine: Engine) -> str:
    """``(SELECT CAST(NULL AS type) AS column, ... WHERE false)``: no rows, ``table``'s columns."""
    empty = sa.select(*(sa.cast(sa.null(), c.type).label(c.name) for c in table.columns)).where(
        sa.false()
    )
    return f"({empty.compile(dialect=engine.dialect, compile_kwargs={'literal_binds': True})})"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Workspace:
    """The destination of a run: whose state rows it reads and writes, and what it records.

    ``site_id`` is the Site ID (not a secret; the API key is never stored). ``reads`` is the
    workspace value of the rows a plan diffs against when they are not yet ``site_id``'s
    own: LEGACY_WORKSPACE before rows from before workspaces were taken over.
    """

    site_id: str | None  # None: a plan with no workspace to name (an empty state store)
    environment_id: int | None = None
    region: str | None = None
    reads: str | None = None

    @property
    def key(self) -> str:
        """The ``workspace`` value of the state rows this run reads and writes."""
        if self.reads is not None:
            return self.reads
        return LEGACY_WORKSPACE if self.site_id is None else self.site_id


class StoreBase:
    """What the parts of the state store share (see StateStore, which composes them)."""

    def __init__(
        self, engine: Engine, schema: str = STATE_SCHEMA, workspace: Workspace | None = None
    ) -> None:
        self.schema = schema
        self.dialect = dialect_for(engine.dialect)
        self._engine = engine
        # The Table objects name STATE_SCHEMA; this engine renders them in ``schema``.
        self.engine = (
            engine
            if schema == STATE_SCHEMA
            else engine.execution_options(schema_translate_map={STATE_SCHEMA: schema})
        )
        self.workspace = workspace
        self.is_absent = False  # see absent()
        self.upgrade_pending = False  # tables of an older cio-retl, read as is (for_reading)
        self.snapshots = self.table(snapshots)
        self.staged_keys = self.table(staged_keys)
        self.sent_events = self.table(sent_events)

    @property
    def workspace_key(self) -> str:
        """The ``workspace`` value of the rows this store reads and writes."""
        if self.workspace is None:
            raise RuntimeError("the state store is not bound to a workspace")  # a bug, not input
        return self.workspace.key

    def scope(self, model: str) -> dict[str, str]:
        """Bind parameters ``:workspace`` and ``:model`` of the SQL reading one model's rows."""
        return {"workspace": self.workspace_key, "model": model}

    def table(self, table: sa.Table) -> str:
        """The quoted, schema-qualified name of a state table, for text SQL."""
        return self.qualified(table.name)

    def qualified(self, name: str) -> str:
        """The quoted, schema-qualified name of any table of the state schema (a run's
        plans among them), for text SQL."""
        return f"{self.dialect.quote_schema(self.schema)}.{self.dialect.quote(name)}"

    def tables_starting(self, prefix: str, bind: Engine | Connection | None = None) -> list[str]:
        """The names of the state schema's tables that start with ``prefix`` (a run's plans
        are found by theirs), as ``bind`` (by default a connection of its own) sees them."""
        names = sa.inspect(self.engine if bind is None else bind).get_table_names(
            schema=self.schema
        )
        return [n for n in names if n.startswith(prefix)]

    def drop_tables(self, names: Iterable[str]) -> None:
        """Drop the state schema's tables of these (unquoted) names, if they exist, in one
        transaction."""
        names = list(names)
        if not names:
            return
        with self.engine.begin() as conn:
            for name in names:
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {self.qualified(name)}"))

    def _columns(self, conn: Connection, table: sa.Table) -> set[str]:
        """The column names ``table`` has in the database (lower case: Snowflake says upper)."""
        names = conn.execute(sa.text(f"SELECT * FROM {self.table(table)} WHERE 1 = 0")).keys()
        return {str(name).lower() for name in list(names)}

    def _delete_keys(self, conn: Connection, table: str, model: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        self.dialect.execute_rows(
            conn,
            f"DELETE FROM {table} WHERE workspace = :workspace AND model = :model"
            f" AND key IN (SELECT u.key FROM {ROWS} AS u)",
            ("key",),
            [(k,) for k in keys],
            self.scope(model),
        )

    def exists(self, tables: Iterable[sa.Table] = ()) -> bool:
        """Whether the state tables (or these of them) are there; reads the catalog only
        (no schema, no table, no migration), so read-only commands can tell "nothing synced
        yet"."""
        with self.engine.connect() as conn:
            inspector = sa.inspect(conn)
            return all(
                inspector.has_table(t.name, schema=self.schema) for t in tables or (snapshots, runs)
            )


class Schema(StoreBase):
    """Creating the state tables, upgrading an older cio-retl's, and reading them as the
    upgrade would leave them."""

    def ensure_schema(self) -> None:
        for attempt in range(5):
            try:
                with _SCHEMA_LOCK, self._ddl_transaction() as conn:
                    upgraded: set[sa.Table] = set()  # tables given LEGACY_WORKSPACE rows
                    conn.execute(
                        sa.text(
                            f"CREATE SCHEMA IF NOT EXISTS {self.dialect.quote_schema(self.schema)}"
                        )
                    )
                    if self.dialect.state_primary_keys:
                        metadata.create_all(conn)
                    else:
                        grown = _UNKEYED[self.dialect.compresses_json_text(conn)]
                        keyed = [t for t in metadata.sorted_tables if t not in grown]
                        metadata.create_all(conn, tables=keyed)
                        for table, (unkeyed, migrating) in grown.items():
                            unkeyed.create(conn, checkfirst=True)
                            if self._drop_primary_key(conn, table, migrating):
                                upgraded.add(table)
                    self._add_workspace_columns(conn, upgraded)
                    self._drop_retired_columns(conn)
                return
            except (sa.exc.OperationalError, sa.exc.IntegrityError, sa.exc.ProgrammingError):
                # Two processes creating the schema at once: DuckDB's optimistic concurrency
                # makes one fail with a write-write conflict, Postgres with a duplicate; the
                # other wins, and the next attempt finds everything there.
                if attempt == 4:
                    raise
                time.sleep(0.05 * 2**attempt)

    @contextlib.contextmanager
    def _ddl_transaction(self) -> Iterator[Connection]:
        """A transaction for DDL whose connection goes back to the pool only with the session
        it came with.

        Snowflake's CREATE SCHEMA also makes the new schema the session's current schema
        (Snowflake SQL reference, CREATE SCHEMA, usage notes; fakesnow does the same). When
        the state lives in the warehouse, that pooled connection would then resolve a
        model's unqualified names (``select ... from companies``) in the state schema. So
        the current schema is read before and after, and a connection whose schema moved
        (or that could not be read) is invalidated: closed, never reused. Postgres's and
        DuckDB's CREATE SCHEMA change neither ``search_path`` nor the current schema, so
        their connection is kept. Restoring the schema instead is not possible in general:
        a Snowflake session may have had none.
        """
        with self.engine.connect() as conn:
            before = _session_schema(conn)
            try:
                with conn.begin():
                    yield conn
            finally:
                if before is _UNKNOWN or _session_schema(conn) != before:
                    conn.invalidate()

    def _add_workspace_columns(self, conn: Connection, upgraded: set[sa.Table]) -> None:
        """Upgrade tables an older cio-retl wrote, before state was kept per workspace.

        Their snapshot and rejection rows get LEGACY_WORKSPACE, and, if there are any, the
        workspaces table a row for it: the first sync with credentials takes them over
        (:meth:`enter_workspace`). Past runs get it too, and go with them. One statement set
        per table, once per database; the caller's transaction holds it (not on Snowflake,
        where DDL commits: a second attempt finds what the first added).
        """
        for table in (snapshots, rejections, sent_events, runs):
            present = self._columns(conn, table)
            name = self.table(table)
            for column in table.columns:
                if column.name in present:
                    continue
                type_sql = column.type.compile(dialect=conn.dialect)
                if column.name == "workspace":
                    key = [c.name for c in table.primary_key.columns]
                    statements = self.dialect.add_workspace_column(
                        name,
                        table.name,
                        type_sql,
                        LEGACY_WORKSPACE,
                        key if "workspace" in key else None,
                    )
                else:
                    statements = [
                        f"ALTER TABLE {name} ADD COLUMN {self.dialect.quote(column.name)} {type_sql}"
                    ]
                for statement in statements:
                    conn.execute(sa.text(statement))
                if column.name == "workspace":
                    upgraded.add(table)
        legacy_rows = any(
            conn.execute(
                sa.text(f"SELECT 1 FROM {self.table(t)} WHERE workspace = :legacy LIMIT 1"),
                {"legacy": LEGACY_WORKSPACE},
            ).first()
            is not None
            for t in upgraded
            if t is not runs
        )
        if legacy_rows:
            now = utcnow()
            conn.execute(
                sa.text(
                    self.dialect.insert_absent(
                        self.table(workspaces),
                        ("site_id",),
                        ("site_id", "first_synced_at", "last_synced_at"),
                        "SELECT CAST(:site AS VARCHAR) AS site_id, :now AS first_synced_at,"
                        " :now AS last_synced_at",
                    )
                ),
                {"site": LEGACY_WORKSPACE, "now": now},
            )

    def _drop_retired_columns(self, conn: Connection) -> None:
        """Drop the columns an older cio-retl kept and this one neither reads nor writes
        (:data:`RETIRED_COLUMNS`), so that its inserts, which leave them out, do not break
        on their NOT NULL. Once per database and column, in the caller's transaction."""
        for table, names in RETIRED_COLUMNS.items():
            present = self._columns(conn, table)
            for name in names:
                if name in present:
                    conn.execute(
                        sa.text(
                            f"ALTER TABLE {self.table(table)} DROP COLUMN {self.dialect.quote(name)}"
                        )
                    )

    def _drop_primary_key(self, conn: Connection, table: sa.Table, interim: sa.Table) -> bool:
        """Rebuild ``table`` when an older cio-retl created it with its primary key (before
        the key index was dropped on DuckDB) without it, rows unchanged, in the caller's
        transaction. DuckDB cannot drop a primary key in place; this runs once per database
        and table, and costs a copy of the table (seconds for millions of rows)."""
        if not self.dialect.stale_primary_key(conn, self.schema, table.name):
            return False
        present = self._columns(conn, table)
        columns = ", ".join(self.dialect.quote(c.name) for c in table.columns)
        # A table that old also predates workspaces: its rows get LEGACY_WORKSPACE here, and
        # _add_workspace_columns records them.
        values = ", ".join(
            self.dialect.quote(c.name)
            if c.name in present
            else (f"'{LEGACY_WORKSPACE}'" if c.name == "workspace" else "NULL")
            for c in table.columns
        )
        interim.drop(conn, checkfirst=True)  # a copy an interrupted run left
        interim.create(conn)
        conn.execute(
            sa.text(
                f"INSERT INTO {self.table(interim)} ({columns})"
                f" SELECT {values} FROM {self.table(table)}"
            )
        )
        conn.execute(sa.text(f"DROP TABLE {self.table(table)}"))
        conn.execute(
            sa.text(f"ALTER TABLE {self.table(interim)} RENAME TO {self.dialect.quote(table.name)}")
        )
        return "workspace" not in present

    def _upgraded_relation(self, table: sa.Table, present: set[str]) -> str:
        columns = []
        for column in table.columns:
            if column.name in present:
                columns.append(f"t.{self.dialect.quote(column.name)}")
                continue
            value = sa.literal(LEGACY_WORKSPACE) if column.name == "workspace" else sa.null()
            cast = sa.cast(value, column.type).compile(
                dialect=self._engine.dialect, compile_kwargs={"literal_binds": True}
            )
            columns.append(f"{cast} AS {self.dialect.quote(column.name)}")
        return f"(SELECT {', '.join(columns)} FROM {self.table(table)} AS t)"


_UNKNOWN = object()


def _session_schema(conn: Connection) -> object:
    """The connection's current schema (``_UNKNOWN`` if it cannot be read), outside any
    transaction."""
    try:
        value: object = conn.execute(sa.text("SELECT CURRENT_SCHEMA()")).scalar()
    except sa.exc.DBAPIError:
        value = _UNKNOWN
    with contextlib.suppress(sa.exc.DBAPIError):
        conn.rollback()
    return value
