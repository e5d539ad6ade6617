"""The state store: snapshots of what Customer.io acknowledged, runs, rejections and locks.

A snapshot row changes only after Customer.io acknowledged the item built from it, so a run
that dies anywhere loses nothing: the next diff sees the row as still different and resends
it. Writes are set-based (a batch becomes one relation, see :mod:`cio_retl.dialects`), never
row by row. The tables live in one schema (``cio_retl`` unless configured), so deployments
or parallel test runs can share a database without sharing state.

State belongs to a destination workspace, keyed by its Site ID: snapshots, rejections and
sent events carry it, runs record it, and a store bound to one workspace (StateStore.bound)
reads and writes only its rows. Another workspace starts from an empty snapshot.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cio_retl.buckets import Bucket
from cio_retl.config import STATE_SCHEMA
from cio_retl.dialects import ROWS, dialect_for
from cio_retl.errors import ConfigError, LockedError

STALE_LOCK_AFTER = dt.timedelta(minutes=30)
# Staged keys older than this belong to runs that died before cleaning up.
STALE_STAGING_AFTER = dt.timedelta(days=1)

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
    sa.Column("attrs_hash", sa.String, nullable=False),
    sa.Column("identifiers", sa.String, nullable=False),  # JSON of the item's identifiers
    sa.Column("attributes", sa.String, nullable=False),  # JSON of acknowledged attributes
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

# Locks are per model, not per workspace: DESIGN's rule is one run per model at a time, and it
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


def _without_primary_key(table: sa.Table, name: str) -> sa.Table:
    """``table``'s columns (NOT NULL kept) as a table ``name`` of its own, with no key."""
    return sa.Table(
        name,
        sa.MetaData(schema=table.schema),
        *(sa.Column(c.name, c.type, nullable=c.nullable) for c in table.columns),
    )


# The tables that grow with a model, and so have no key index where the dialect keeps none
# (DuckDB, see Dialect.state_primary_keys): each as created then, and the name an older,
# keyed one is copied through.
_UNKEYED = {
    table: (
        _without_primary_key(table, table.name),
        _without_primary_key(table, f"{table.name}_unkeyed"),
    )
    for table in (snapshots, rejections, sent_events)
}

SNAPSHOT_COLUMNS = (
    "workspace",
    "model",
    "key",
    "fingerprint",
    "attrs_hash",
    "identifiers",
    "attributes",
    "run_id",
    "synced_at",
)


# Runs of one process create the schema one at a time (threads, Dagster's in-process steps).
_SCHEMA_LOCK = threading.Lock()


def _empty_relation(table: sa.Table, engine: Engine) -> str:
    """``(SELECT CAST(NULL AS type) AS column, ... WHERE false)``: no rows, ``table``'s columns."""
    empty = sa.select(*(sa.cast(sa.null(), c.type).label(c.name) for c in table.columns)).where(
        sa.false()
    )
    return f"({empty.compile(dialect=engine.dialect, compile_kwargs={'literal_binds': True})})"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    """The acknowledged state of one row, written after Customer.io accepted it."""

    key: str
    fingerprint: str
    attrs_hash: str
    identifiers: str
    attributes: str
    # The run's diff found no snapshot of this key (a create): the write may skip looking
    # for an existing row. False is always safe.
    new: bool = False


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


@dataclass(frozen=True, slots=True)
class Adoption:
    """Rows from before workspaces that a workspace took over, at its first sync after the
    upgrade."""

    site_id: str
    run_id: str
    snapshots: int
    rejections: int
    events: int = 0

    def __str__(self) -> str:
        return (
            f"state from before workspaces ({self.snapshots:,} snapshot rows, "
            f"{self.rejections:,} rejections, {self.events:,} sent events) now belongs to "
            f"workspace {self.site_id}"
        )


@dataclass(frozen=True, slots=True)
class RejectionRow:
    key: str
    code: str  # a cio_retl.records.RejectionCode value
    reason: str
    field: str | None
    status: int | None
    payload: str | None


class StateStore:
    """The state tables in ``schema`` of the database behind ``engine``.

    Snapshots and rejections belong to a workspace: a store bound to one (:meth:`bound`)
    reads and writes only that workspace's rows. An unbound store serves what spans them
    (``status``, the choice of workspace for a plan, tests' inspections).
    """

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

    def bound(self, workspace: Workspace) -> StateStore:
        """This store, reading and writing only ``workspace``'s rows."""
        store = StateStore(self._engine, self.schema, workspace)
        store.is_absent, store.upgrade_pending = self.is_absent, self.upgrade_pending
        store.snapshots, store.sent_events = self.snapshots, self.sent_events
        return store

    @property
    def workspace_key(self) -> str:
        """The ``workspace`` value of the rows this store reads and writes."""
        if self.workspace is None:
            raise RuntimeError("the state store is not bound to a workspace")  # a bug, not input
        return self.workspace.key

    def scope(self, model: str) -> dict[str, str]:
        """Bind parameters ``:workspace`` and ``:model`` of the SQL reading one model's rows."""
        return {"workspace": self.workspace_key, "model": model}

    @classmethod
    def absent(cls, engine: Engine, schema: str = STATE_SCHEMA) -> StateStore:
        """Stands in for state tables that do not exist yet, so a dry run or ``plan`` before
        the first sync creates nothing: the tables the diff reads (snapshots, sent events)
        are empty relations rendered in ``engine``'s SQL (the warehouse's, as the diff joins
        them there), every column typed."""
        store = cls(engine, schema)
        store.is_absent = True
        store.snapshots = _empty_relation(snapshots, engine)
        store.sent_events = _empty_relation(sent_events, engine)
        return store

    @classmethod
    def for_reading(cls, engine: Engine, schema: str = STATE_SCHEMA) -> StateStore:
        """The state as a dry run or ``plan`` reads it, creating and upgrading nothing.

        A table the diff reads that is not there reads as empty; one an older cio-retl wrote
        reads as the upgrade would leave it (each missing column NULL, ``workspace`` the
        LEGACY_WORKSPACE of rows from before workspaces), and the plan diffs against those
        rows, as :meth:`plan_workspace` does after an upgrade. The next real sync upgrades
        the tables themselves (:meth:`ensure_schema`).
        """
        store = cls(engine, schema)
        with store.engine.connect() as conn:
            inspector = sa.inspect(conn)
            store.upgrade_pending = not inspector.has_table(workspaces.name, schema=schema)
            for table in (snapshots, sent_events):
                if not inspector.has_table(table.name, schema=schema):
                    relation = _empty_relation(table, engine)
                else:
                    present = store._columns(conn, table)
                    if all(c.name in present for c in table.columns):
                        continue
                    relation = store._upgraded_relation(table, present)
                setattr(store, "snapshots" if table is snapshots else "sent_events", relation)
        return store

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

    def exists(self, tables: Iterable[sa.Table] = ()) -> bool:
        """Whether the state tables (or these of them) are there; reads the catalog only
        (no schema, no table, no migration), so read-only commands can tell "nothing synced
        yet"."""
        with self.engine.connect() as conn:
            inspector = sa.inspect(conn)
            return all(
                inspector.has_table(t.name, schema=self.schema) for t in tables or (snapshots, runs)
            )

    def table(self, table: sa.Table) -> str:
        """The quoted, schema-qualified name of a state table, for text SQL."""
        return f"{self.dialect.quote_schema(self.schema)}.{self.dialect.quote(table.name)}"

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
                        keyed = [t for t in metadata.sorted_tables if t not in _UNKEYED]
                        metadata.create_all(conn, tables=keyed)
                        for table, (unkeyed, migrating) in _UNKEYED.items():
                            unkeyed.create(conn, checkfirst=True)
                            if self._drop_primary_key(conn, table, migrating):
                                upgraded.add(table)
                    self._add_workspace_columns(conn, upgraded)
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

    def _columns(self, conn: Connection, table: sa.Table) -> set[str]:
        """The column names ``table`` has in the database (lower case: Snowflake says upper)."""
        names = conn.execute(sa.text(f"SELECT * FROM {self.table(table)} WHERE 1 = 0")).keys()
        return {str(name).lower() for name in list(names)}

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

    # -- snapshots -------------------------------------------------------------------------
    def save_snapshots(
        self, conn: Connection, model: str, run_id: str, rows: Sequence[SnapshotRow]
    ) -> None:
        """Write the acknowledged rows' snapshots, replacing what their keys had.

        One row per key is kept (the last): the statements assume distinct keys, and on
        DuckDB nothing else would stop a repeated key from being inserted twice.
        """
        if not rows:
            return
        unique = {r.key: r for r in rows}
        if len(unique) < len(rows):  # never expected; written as existing keys, to be safe
            unique = {k: replace(r, new=False) for k, r in unique.items()}
        source = (
            "SELECT CAST(:workspace AS VARCHAR) AS workspace, CAST(:model AS VARCHAR) AS model,"
            " u.key, u.fingerprint, u.attrs_hash, u.identifiers, u.attributes,"
            f" CAST(:run_id AS VARCHAR) AS run_id, :now AS synced_at FROM {ROWS} AS u"
        )
        params = {**self.scope(model), "run_id": run_id, "now": utcnow()}
        for new in (True, False):
            group = [r for r in unique.values() if r.new is new]
            if not group:
                continue
            self.dialect.execute_rows(
                conn,
                self.dialect.upsert(
                    self.snapshots,
                    ("workspace", "model", "key"),
                    SNAPSHOT_COLUMNS,
                    source,
                    absent=new,
                ),
                ("key", "fingerprint", "attrs_hash", "identifiers", "attributes"),
                [(r.key, r.fingerprint, r.attrs_hash, r.identifiers, r.attributes) for r in group],
                params,
            )

    def update_fingerprints(
        self, conn: Connection, model: str, pairs: Sequence[tuple[str, str]]
    ) -> None:
        """Rows whose SQL changed but whose normalized values did not: nothing to send."""
        if not pairs:
            return
        table = self.snapshots
        self.dialect.execute_rows(
            conn,
            f"UPDATE {table} SET fingerprint = u.fp FROM {ROWS} AS u"
            f" WHERE {table}.workspace = :workspace AND {table}.model = :model"
            f" AND {table}.key = u.key",
            ("key", "fp"),
            pairs,
            self.scope(model),
        )

    def delete_snapshots(self, conn: Connection, model: str, keys: Sequence[str]) -> None:
        self._delete_keys(conn, self.snapshots, model, keys)

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

    def lookup_snapshots(
        self, model: str, pairs: Sequence[tuple[str, str]], *, everything: bool = False
    ) -> dict[str, tuple[str, str | None]]:
        """Acknowledged (fingerprint, attributes) of these (key, fingerprint) pairs.

        Attributes come back only where the fingerprint moved (or with ``everything``): an
        unchanged row needs no more than its fingerprint.
        """
        found: dict[str, tuple[str, str | None]] = {}
        if not pairs:
            return found
        attributes = (
            "s.attributes"
            if everything
            else "CASE WHEN s.fingerprint <> u.fp THEN s.attributes END"
        )
        template = (
            f"SELECT s.key, s.fingerprint, {attributes} FROM {self.snapshots} AS s"
            f" JOIN {ROWS} AS u ON s.key = u.key"
            " WHERE s.workspace = :workspace AND s.model = :model"
        )
        with self.engine.connect() as conn:
            for relation, params in self.dialect.batches(("key", "fp"), pairs):
                result = conn.execute(
                    sa.text(template.replace(ROWS, relation)), {**self.scope(model), **params}
                )
                for key, fingerprint, attrs in result:
                    found[key] = (fingerprint, attrs)
        return found

    # -- sent events -----------------------------------------------------------------------
    def save_events(
        self, conn: Connection, model: str, run_id: str, rows: Sequence[tuple[str, str, int]]
    ) -> None:
        """Record acknowledged events, as (event key, ULID, Unix seconds).

        The keys are absent (the diff plans only events not recorded here, one run per
        model holds the lock, and a run plans each key once), so this is an insert:
        the dialect's upsert of absent keys."""
        unique = {key: (key, event_id, str(at)) for key, event_id, at in rows}
        if not unique:
            return
        source = (
            "SELECT CAST(:workspace AS VARCHAR) AS workspace, CAST(:model AS VARCHAR) AS model,"
            " u.key, u.event_id, CAST(u.event_time AS BIGINT) AS event_time,"
            f" CAST(:run_id AS VARCHAR) AS run_id, :now AS sent_at FROM {ROWS} AS u"
        )
        insert = self.dialect.upsert(
            self.sent_events,
            ("workspace", "model", "key"),
            ("workspace", "model", "key", "event_id", "event_time", "run_id", "sent_at"),
            source,
            absent=True,
        )
        self.dialect.execute_rows(
            conn,
            insert,
            ("key", "event_id", "event_time"),
            list(unique.values()),
            {**self.scope(model), "run_id": run_id, "now": utcnow()},
        )

    def sent_event_keys(self, model: str, keys: Sequence[str]) -> set[str]:
        """Which of these event keys were acknowledged (the cross-database diff's lookup)."""
        found: set[str] = set()
        if not keys:
            return found
        template = (
            f"SELECT e.key FROM {self.sent_events} AS e JOIN {ROWS} AS u ON e.key = u.key"
            " WHERE e.workspace = :workspace AND e.model = :model"
        )
        with self.engine.connect() as conn:
            for relation, params in self.dialect.batches(("key",), [(k,) for k in keys]):
                result = conn.execute(
                    sa.text(template.replace(ROWS, relation)), {**self.scope(model), **params}
                )
                found.update(key for (key,) in result)
        return found

    def event_summary(self, model: str) -> tuple[int, int | None]:
        """(events acknowledged, the newest one's Unix seconds) of an event model."""
        query = sa.select(sa.func.count(), sa.func.max(sent_events.c.event_time)).where(
            sent_events.c.workspace == self.workspace_key, sent_events.c.model == model
        )
        with self.engine.connect() as conn:
            count, newest = conn.execute(query).one()
        return int(count or 0), None if newest is None else int(newest)

    def event_summaries(self) -> dict[str, tuple[int, int | None]]:
        """{event model: (events acknowledged, the newest one's Unix seconds)}, for status:
        of the bound workspace, or of all of them."""
        query = sa.select(
            sent_events.c.model, sa.func.count(), sa.func.max(sent_events.c.event_time)
        ).group_by(sent_events.c.model)
        if self.workspace is not None:
            query = query.where(sent_events.c.workspace == self.workspace_key)
        with self.engine.connect() as conn:
            return {
                model: (int(n), None if newest is None else int(newest))
                for model, n, newest in conn.execute(query)
            }

    def sent_events_of(self, model: str) -> dict[str, dict[str, Any]]:
        """Every acknowledged event of one model (of every workspace, unless the store is
        bound); for tests and small inspections only."""
        query = sa.select(sent_events).where(sent_events.c.model == model)
        if self.workspace is not None:
            query = query.where(sent_events.c.workspace == self.workspace_key)
        with self.engine.connect() as conn:
            return {row.key: dict(row._mapping) for row in conn.execute(query)}

    # -- staged keys (the cross-database diff) --------------------------------------------
    def stage_keys(
        self,
        conn: Connection,
        token: str,
        model: str,
        rows: Sequence[tuple[str | None, str]],
        into: str | None = None,
    ) -> None:
        """Add (key, fingerprint) pairs read from the warehouse to the diff ``token``, in
        ``staged_keys`` or ``into`` (a session's table, :meth:`create_session_staging`)."""
        self.dialect.execute_rows(
            conn,
            f"INSERT INTO {into or self.staged_keys} (token, model, key, fingerprint, staged_at)"
            f" SELECT :token, :model, u.key, u.fingerprint, :now FROM {ROWS} AS u",
            ("key", "fingerprint"),
            rows,
            {"token": token, "model": model, "now": utcnow()},
        )

    def create_session_staging(self, conn: Connection) -> str:
        """Create ``conn``'s temporary staging table (gone with the session, in no schema
        of the database) and return its name for text SQL."""
        session_staged_keys.create(conn, checkfirst=False)
        return self.dialect.quote(session_staged_keys.name)

    def drop_session_staging(self, conn: Connection) -> None:
        session_staged_keys.drop(conn, checkfirst=False)
        conn.commit()

    def unstage_keys(self, token: str, model: str | None = None) -> None:
        """Drop the diff's staged keys, and any a dead run left behind long ago."""
        where = "token = :token" + (" AND model = :model" if model else "")
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(f"DELETE FROM {self.staged_keys} WHERE {where} OR staged_at < :stale"),
                {"token": token, "model": model, "stale": utcnow() - STALE_STAGING_AFTER},
            )

    def snapshot(self, model: str) -> dict[str, dict[str, Any]]:
        """The whole snapshot of one model (of every workspace, unless the store is bound);
        for tests and small inspections only."""
        query = sa.select(snapshots).where(snapshots.c.model == model)
        if self.workspace is not None:
            query = query.where(snapshots.c.workspace == self.workspace_key)
        with self.engine.connect() as conn:
            return {row.key: dict(row._mapping) for row in conn.execute(query)}

    # -- rejections ------------------------------------------------------------------------
    def record_rejections(
        self, conn: Connection, model: str, run_id: str, rows: Sequence[RejectionRow]
    ) -> None:
        if not rows:
            return
        self.clear_rejections(conn, model, [r.key for r in rows])
        conn.execute(
            sa.insert(rejections),
            [
                {
                    "workspace": self.workspace_key,
                    "model": model,
                    "key": r.key,
                    "run_id": run_id,
                    "reason": r.reason,
                    "field": r.field,
                    "status": r.status,
                    "payload": r.payload,
                    "rejected_at": utcnow(),
                    "code": str(r.code),  # a plain str: drivers bind no enums
                }
                for r in _last_per_key(rows)
            ],
        )

    def clear_rejections(self, conn: Connection, model: str, keys: Sequence[str]) -> None:
        self._delete_keys(conn, self.table(rejections), model, keys)

    def has_rejections(self, model: str) -> bool:
        query = (
            sa.select(rejections.c.key)
            .where(rejections.c.workspace == self.workspace_key, rejections.c.model == model)
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def _rejections_of(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """``query`` kept to the bound workspace's rejections, or all of them if unbound."""
        if self.workspace is None:
            return query
        return query.where(rejections.c.workspace == self.workspace_key)

    def _has_codes(self, conn: Connection) -> bool:
        """Whether the rejections table has its code column: tables of an older cio-retl get
        it from the next sync's ensure_schema; read-only commands read them as they are."""
        return "code" in self._columns(conn, rejections)

    def rejections(self, model: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Rejected rows waiting for a fix (``code`` None where the row has none)."""
        with self.engine.connect() as conn:
            columns = [c for c in rejections.c if c.name != "code" or self._has_codes(conn)]
        query = sa.select(*columns).order_by(
            rejections.c.workspace, rejections.c.model, rejections.c.key
        )
        if model:
            query = query.where(rejections.c.model == model)
        with self.engine.connect() as conn:
            rows = conn.execute(self._rejections_of(query).limit(limit))
            return [{"code": None, **r._mapping} for r in rows]

    def rejection_counts(self) -> dict[str, int]:
        query = sa.select(rejections.c.model, sa.func.count()).group_by(rejections.c.model)
        with self.engine.connect() as conn:
            return {m: int(n) for m, n in conn.execute(self._rejections_of(query))}

    # -- runs ------------------------------------------------------------------------------
    def start_run(self, run_id: str, model: str, *, dry_run: bool, full_resync: bool) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(runs).values(
                    run_id=run_id,
                    model=model,
                    workspace=None if self.workspace is None else self.workspace.site_id,
                    environment_id=None
                    if self.workspace is None
                    else self.workspace.environment_id,
                    region=None if self.workspace is None else self.workspace.region,
                    started_at=utcnow(),
                    status="running",
                    dry_run=dry_run,
                    full_resync=full_resync,
                    planned=0,
                    created=0,
                    updated=0,
                    deleted=0,
                    rejected=0,
                    requests=0,
                    bytes_sent=0,
                )
            )

    def finish_run(
        self,
        run_id: str,
        model: str,
        status: str,
        counts: dict[str, int],
        error: str | None = None,
        rejected_by_code: Mapping[str, int] | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(runs)
                .where(runs.c.run_id == run_id, runs.c.model == model)
                .values(finished_at=utcnow(), status=status, error=error, **counts)
            )
            if rejected_by_code:
                conn.execute(
                    sa.insert(run_rejections),
                    [
                        {"run_id": run_id, "model": model, "code": str(code), "row_count": n}
                        for code, n in sorted(rejected_by_code.items())
                    ],
                )

    def run_rejection_counts(self, run_ids: Iterable[str]) -> dict[tuple[str, str], dict[str, int]]:
        """Every rejection of these runs by code, per (run, model)."""
        ids = sorted(set(run_ids))
        if not ids or not self.exists((run_rejections,)):  # an older cio-retl's tables
            return {}
        query = sa.select(run_rejections).where(run_rejections.c.run_id.in_(ids))
        counts: dict[tuple[str, str], dict[str, int]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                counts.setdefault((row.run_id, row.model), {})[row.code] = int(row.row_count)
        return counts

    def rejection_counts_by_code(self) -> dict[str | None, int]:
        """Rejected rows waiting for a fix, by code (None: recorded before codes existed)."""
        with self.engine.connect() as conn:
            if not self._has_codes(conn):
                total = conn.execute(self._rejections_of(sa.select(sa.func.count()))).scalar_one()
                return {None: int(total)} if total else {}
            query = sa.select(rejections.c.code, sa.func.count()).group_by(rejections.c.code)
            return {c: int(n) for c, n in conn.execute(self._rejections_of(query))}

    def last_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        query = sa.select(runs).order_by(runs.c.started_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    # -- workspaces ------------------------------------------------------------------------
    def known_workspaces(self) -> dict[str, sa.Row[Any]]:
        """Every workspace synced to from this store, by Site ID (LEGACY_WORKSPACE included
        while rows from before workspaces wait to be taken over)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(workspaces).order_by(workspaces.c.site_id))
            return {row.site_id: row for row in rows}

    def plan_workspace(self, named: str | None) -> Workspace:
        """The workspace a plan without credentials diffs against: the one ``named`` (the
        CIO_SITE_ID), else the only one there is; an empty store gives an empty snapshot.

        Rows from before workspaces, while no sync with credentials has taken them over, are
        the snapshot of whichever workspace the plan is for: the next such sync takes them
        over, so the plan shows what it would send.
        """
        if self.is_absent:
            return Workspace(named)  # nothing synced yet: an empty snapshot
        if self.upgrade_pending:  # every row is from before workspaces (for_reading)
            return Workspace(LEGACY_WORKSPACE if named is None else named, reads=LEGACY_WORKSPACE)
        known = self.known_workspaces()
        if LEGACY_WORKSPACE in known:
            return Workspace(LEGACY_WORKSPACE if named is None else named, reads=LEGACY_WORKSPACE)
        if named is None:
            if not known:
                return Workspace(None)
            if len(known) > 1:
                raise ConfigError(
                    f"the state store holds {len(known)} workspaces ({', '.join(known)}): set "
                    "CIO_SITE_ID to the Site ID to plan against"
                )
            (named,) = known
        row = known.get(named)
        return Workspace(
            named,
            None if row is None else row.environment_id,
            None if row is None else row.region,
        )

    def enter_workspace(self, workspace: Workspace, run_id: str) -> Adoption | None:
        """Record a sync with credentials to ``workspace`` (what the region check reported)
        and, the first time after an upgrade, hand it every row from before workspaces.

        The takeover is one transaction, recorded once in the workspace's row (adopted_*),
        and returned so the run can say so. It rewrites the ``workspace`` of every such row
        once (on 2M snapshot rows, an UPDATE of one column). Runs starting at once (buckets,
        Dagster steps) may collide on the workspace's row: Postgres reports a duplicate
        insert, DuckDB a write-write conflict; the transaction then runs again, and finds
        the row (and any takeover) there.
        """
        for attempt in range(8):
            try:
                return self._enter_workspace(workspace, run_id)
            except (sa.exc.OperationalError, sa.exc.IntegrityError):
                if attempt == 7:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def _enter_workspace(self, workspace: Workspace, run_id: str) -> Adoption | None:
        site = workspace.site_id
        if not site:
            raise ValueError("a sync with credentials names its Site ID")
        now = utcnow()
        values = {
            "site": site,
            "environment_id": workspace.environment_id,
            "region": workspace.region,
            "now": now,
        }
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(workspaces)
                .where(workspaces.c.site_id == site)
                .values(
                    environment_id=workspace.environment_id,
                    region=workspace.region,
                    last_synced_at=now,
                )
            )
            conn.execute(
                sa.text(
                    self.dialect.insert_absent(
                        self.table(workspaces),
                        ("site_id",),
                        (
                            "site_id",
                            "environment_id",
                            "region",
                            "first_synced_at",
                            "last_synced_at",
                        ),
                        "SELECT CAST(:site AS VARCHAR) AS site_id,"
                        " CAST(:environment_id AS BIGINT) AS environment_id,"
                        " CAST(:region AS VARCHAR) AS region, :now AS first_synced_at,"
                        " :now AS last_synced_at",
                    )
                ),
                values,
            )
            # Deleting the marker first: of two runs starting at once, one takes the rows.
            taken = conn.execute(
                sa.delete(workspaces).where(workspaces.c.site_id == LEGACY_WORKSPACE)
            ).rowcount
            if not taken:
                return None
            moved = {}
            for table in (snapshots, rejections, sent_events, runs):
                extra = (
                    {"environment_id": workspace.environment_id, "region": workspace.region}
                    if table is runs
                    else {}
                )
                moved[table.name] = conn.execute(
                    sa.update(table)
                    .where(table.c.workspace == LEGACY_WORKSPACE)
                    .values(workspace=site, **extra)
                ).rowcount
            adoption = Adoption(
                site, run_id, moved["snapshots"], moved["rejections"], moved["sent_events"]
            )
            conn.execute(
                sa.update(workspaces)
                .where(workspaces.c.site_id == site)
                .values(
                    adopted_run_id=run_id,
                    adopted_at=now,
                    adopted_snapshots=adoption.snapshots,
                    adopted_rejections=adoption.rejections,
                    adopted_events=adoption.events,
                )
            )
        return adoption

    # -- locks -----------------------------------------------------------------------------
    def acquire_lock(self, model: str, run_id: str, bucket: Bucket | None = None) -> None:
        """One run per model, or per bucket of a model: a row in ``locks``.

        A run of a whole model and runs of its buckets exclude each other, as do runs with
        another bucket count (their buckets overlap); runs of different buckets of one count
        run side by side. After taking its own row a run looks for such a conflicting row
        and, if one is there, gives its own back: two runs that start at once may both give
        up, but never both send.

        A lock is taken over when its run is provably gone: its process no longer exists on
        this host, or it has not refreshed its heartbeat for STALE_LOCK_AFTER (another host).
        """
        name = lock_name(model, bucket)
        self._take_lock(name, run_id)
        conflict = next(
            (held for held in self._live_locks(model) if _conflicts(held.model, name, model)),
            None,
        )
        if conflict is not None:
            self.release_lock(model, run_id, bucket)
            self._refuse(name, conflict)

    def _take_lock(self, name: str, run_id: str) -> None:
        now = utcnow()
        with self.engine.begin() as conn:
            held = conn.execute(sa.select(locks).where(locks.c.model == name)).first()
            if held is not None and _is_abandoned(held, now):
                conn.execute(
                    sa.delete(locks).where(locks.c.model == name, locks.c.run_id == held.run_id)
                )
                held = None
        if held is None:
            # Insert only if absent, then read back who holds it: a concurrent run may win.
            # (Snowflake does not enforce primary keys; its form is a MERGE, which locks.)
            insert = self.dialect.insert_absent(
                self.table(locks),
                ("model",),
                ("model", "run_id", "owner", "acquired_at", "heartbeat_at"),
                "SELECT CAST(:model AS VARCHAR) AS model, CAST(:run_id AS VARCHAR) AS run_id,"
                " CAST(:owner AS VARCHAR) AS owner, :now AS acquired_at, :now AS heartbeat_at",
            )
            params = {"model": name, "run_id": run_id, "owner": _lock_owner(), "now": now}
            # DuckDB reports a concurrent insert of the same key as a write-write conflict
            # (OperationalError), Postgres as a unique violation: either way, read back.
            with (
                contextlib.suppress(sa.exc.IntegrityError, sa.exc.OperationalError),
                self.engine.begin() as conn,
            ):
                conn.execute(sa.text(insert), params)
            with self.engine.connect() as conn:
                held = conn.execute(sa.select(locks).where(locks.c.model == name)).first()
            if held is not None and held.run_id == run_id:
                return
        self._refuse(name, held)

    def _live_locks(self, model: str) -> list[sa.Row[Any]]:
        """The lock rows of ``model`` and of its buckets, abandoned ones cleared away."""
        now = utcnow()
        query = sa.select(locks).where(
            sa.or_(
                locks.c.model == model,
                locks.c.model.startswith(model + BUCKET_SEPARATOR, autoescape=True),
            )
        )
        live = []
        with self.engine.begin() as conn:
            for held in conn.execute(query).all():
                if _is_abandoned(held, now):
                    conn.execute(
                        sa.delete(locks).where(
                            locks.c.model == held.model, locks.c.run_id == held.run_id
                        )
                    )
                else:
                    live.append(held)
        return live

    def _refuse(self, name: str, held: sa.Row[Any] | None) -> NoReturn:
        since = f" since {held.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if held else ""
        owner = f" (run {held.run_id} on {held.owner}{since})" if held else ""
        what = f"model {name!r}"
        if held is not None and held.model != name:
            what += f" overlaps {held.model!r}, which"
        minutes = int(STALE_LOCK_AFTER.total_seconds() // 60)
        raise LockedError(
            f"{what} is being synced by another run{owner}; try again when it ends. "
            f"A lock whose process is gone, or silent for {minutes} min, is taken over."
        )

    def heartbeat(self, models: Sequence[str], run_id: str, bucket: Bucket | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(locks)
                .where(
                    locks.c.model.in_([lock_name(m, bucket) for m in models]),
                    locks.c.run_id == run_id,
                )
                .values(heartbeat_at=utcnow())
            )

    def release_lock(self, model: str, run_id: str, bucket: Bucket | None = None) -> None:
        name = lock_name(model, bucket)
        with self.engine.begin() as conn:
            conn.execute(sa.delete(locks).where(locks.c.model == name, locks.c.run_id == run_id))


BUCKET_SEPARATOR = "#"


def lock_name(model: str, bucket: Bucket | None) -> str:
    """``people`` for a run of the whole model, ``people#3/16`` for one of its buckets."""
    return model if bucket is None else f"{model}{BUCKET_SEPARATOR}{bucket.label}"


def _conflicts(held: str, mine: str, model: str) -> bool:
    """Whether a run holding ``held`` and one holding ``mine`` may both send ``model``."""
    if held == mine:
        return False  # our own row (another run's row of this name cannot coexist with it)
    if held == model or mine == model:
        return True  # the whole model overlaps every bucket of it
    held_count = held.rpartition("/")[2]
    mine_count = mine.rpartition("/")[2]
    return held_count != mine_count  # different bucket counts: their buckets overlap


def _is_abandoned(held: sa.Row[Any], now: dt.datetime) -> bool:
    return _owner_is_dead(held.owner) or _aware(held.heartbeat_at) < now - STALE_LOCK_AFTER


def _lock_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"  # read per call: forks change the pid


def _owner_is_dead(owner: str) -> bool:
    """True only when the owner ran on this host and its process is gone."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # this process: another run of ours, alive by definition
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _last_per_key(rows: Iterable[RejectionRow]) -> list[RejectionRow]:
    return list({r.key: r for r in rows}.values())
