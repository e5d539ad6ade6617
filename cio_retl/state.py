"""The state store: snapshots of what Customer.io acknowledged, runs, rejections and locks.

A snapshot row changes only after Customer.io acknowledged the item built from it, so a run
that dies anywhere loses nothing: the next diff sees the row as still different and resends
it. Writes are set-based (a batch becomes one relation, see :mod:`cio_retl.dialects`), never
row by row. The tables live in one schema (``cio_retl`` unless configured), so deployments
or parallel test runs can share a database without sharing state.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cio_retl.buckets import Bucket
from cio_retl.config import STATE_SCHEMA
from cio_retl.dialects import ROWS, dialect_for
from cio_retl.errors import LockedError

STALE_LOCK_AFTER = dt.timedelta(minutes=30)
# Staged keys older than this belong to runs that died before cleaning up.
STALE_STAGING_AFTER = dt.timedelta(days=1)

metadata = sa.MetaData(schema=STATE_SCHEMA)

snapshots = sa.Table(
    "snapshots",
    metadata,
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
    sa.Column("model", sa.String, primary_key=True),
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("field", sa.String),
    sa.Column("status", sa.Integer),
    sa.Column("payload", sa.String),  # the item with values redacted: names and types only
    sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
)

# The events Customer.io acknowledged, one row per (model, event key): an event model is
# append-only, so this is all its state (no attributes: an event is never changed or
# deleted, and once here it is never sent again). ``event_id`` is the ULID it was sent with
# and ``event_time`` its timestamp in Unix seconds (the newest sent, for reports).
sent_events = sa.Table(
    "sent_events",
    metadata,
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
)

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
# cio_retl.ratelimit.SharedRateBudget); keyed by a digest, never by the site id.
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
class RejectionRow:
    key: str
    reason: str
    field: str | None
    status: int | None
    payload: str | None


class StateStore:
    """The state tables in ``schema`` of the database behind ``engine``."""

    def __init__(self, engine: Engine, schema: str = STATE_SCHEMA) -> None:
        self.schema = schema
        self.dialect = dialect_for(engine.dialect)
        # The Table objects name STATE_SCHEMA; this engine renders them in ``schema``.
        self.engine = (
            engine
            if schema == STATE_SCHEMA
            else engine.execution_options(schema_translate_map={STATE_SCHEMA: schema})
        )
        self.snapshots = self.table(snapshots)
        self.staged_keys = self.table(staged_keys)
        self.sent_events = self.table(sent_events)

    def table(self, table: sa.Table) -> str:
        """The quoted, schema-qualified name of a state table, for text SQL."""
        return f"{self.dialect.quote_schema(self.schema)}.{self.dialect.quote(table.name)}"

    def ensure_schema(self) -> None:
        for attempt in range(5):
            try:
                with _SCHEMA_LOCK, self._ddl_transaction() as conn:
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
                            self._drop_primary_key(conn, table, migrating)
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

    def _drop_primary_key(self, conn: Connection, table: sa.Table, interim: sa.Table) -> None:
        """Rebuild ``table`` when an older cio-retl created it with its primary key (before
        the key index was dropped on DuckDB) without it, rows unchanged, in the caller's
        transaction. DuckDB cannot drop a primary key in place; this runs once per database
        and table, and costs a copy of the table (seconds for millions of rows)."""
        keyed = conn.execute(
            sa.text(
                "SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database()"
                " AND schema_name = :schema"
                " AND table_name = :table AND constraint_type = 'PRIMARY KEY'"
            ),
            {"schema": self.schema, "table": table.name},
        ).scalar_one()
        if not keyed:
            return
        columns = ", ".join(self.dialect.quote(c.name) for c in table.columns)
        interim.drop(conn, checkfirst=True)  # a copy an interrupted run left
        interim.create(conn)
        conn.execute(
            sa.text(
                f"INSERT INTO {self.table(interim)} ({columns})"
                f" SELECT {columns} FROM {self.table(table)}"
            )
        )
        conn.execute(sa.text(f"DROP TABLE {self.table(table)}"))
        conn.execute(
            sa.text(f"ALTER TABLE {self.table(interim)} RENAME TO {self.dialect.quote(table.name)}")
        )

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
            "SELECT CAST(:model AS VARCHAR) AS model, u.key, u.fingerprint, u.attrs_hash,"
            " u.identifiers, u.attributes, CAST(:run_id AS VARCHAR) AS run_id,"
            f" :now AS synced_at FROM {ROWS} AS u"
        )
        params = {"model": model, "run_id": run_id, "now": utcnow()}
        for new in (True, False):
            group = [r for r in unique.values() if r.new is new]
            if not group:
                continue
            self.dialect.execute_rows(
                conn,
                self.dialect.upsert(
                    self.snapshots, ("model", "key"), SNAPSHOT_COLUMNS, source, absent=new
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
            f" WHERE {table}.model = :model AND {table}.key = u.key",
            ("key", "fp"),
            pairs,
            {"model": model},
        )

    def delete_snapshots(self, conn: Connection, model: str, keys: Sequence[str]) -> None:
        self._delete_keys(conn, self.snapshots, model, keys)

    def _delete_keys(self, conn: Connection, table: str, model: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        self.dialect.execute_rows(
            conn,
            f"DELETE FROM {table} WHERE model = :model AND key IN (SELECT u.key FROM {ROWS} AS u)",
            ("key",),
            [(k,) for k in keys],
            {"model": model},
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
            f" JOIN {ROWS} AS u ON s.key = u.key WHERE s.model = :model"
        )
        with self.engine.connect() as conn:
            for relation, params in self.dialect.batches(("key", "fp"), pairs):
                result = conn.execute(
                    sa.text(template.replace(ROWS, relation)), {"model": model, **params}
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
            "SELECT CAST(:model AS VARCHAR) AS model, u.key, u.event_id,"
            " CAST(u.event_time AS BIGINT) AS event_time, CAST(:run_id AS VARCHAR) AS run_id,"
            f" :now AS sent_at FROM {ROWS} AS u"
        )
        insert = self.dialect.upsert(
            self.sent_events,
            ("model", "key"),
            ("model", "key", "event_id", "event_time", "run_id", "sent_at"),
            source,
            absent=True,
        )
        self.dialect.execute_rows(
            conn,
            insert,
            ("key", "event_id", "event_time"),
            list(unique.values()),
            {"model": model, "run_id": run_id, "now": utcnow()},
        )

    def sent_event_keys(self, model: str, keys: Sequence[str]) -> set[str]:
        """Which of these event keys were acknowledged (the cross-database diff's lookup)."""
        found: set[str] = set()
        if not keys:
            return found
        template = (
            f"SELECT e.key FROM {self.sent_events} AS e JOIN {ROWS} AS u ON e.key = u.key"
            " WHERE e.model = :model"
        )
        with self.engine.connect() as conn:
            for relation, params in self.dialect.batches(("key",), [(k,) for k in keys]):
                result = conn.execute(
                    sa.text(template.replace(ROWS, relation)), {"model": model, **params}
                )
                found.update(key for (key,) in result)
        return found

    def event_summary(self, model: str) -> tuple[int, int | None]:
        """(events acknowledged, the newest one's Unix seconds) of an event model."""
        query = sa.select(sa.func.count(), sa.func.max(sent_events.c.event_time)).where(
            sent_events.c.model == model
        )
        with self.engine.connect() as conn:
            count, newest = conn.execute(query).one()
        return int(count or 0), None if newest is None else int(newest)

    def event_summaries(self) -> dict[str, tuple[int, int | None]]:
        """{event model: (events acknowledged, the newest one's Unix seconds)}, for status."""
        query = sa.select(
            sent_events.c.model, sa.func.count(), sa.func.max(sent_events.c.event_time)
        ).group_by(sent_events.c.model)
        with self.engine.connect() as conn:
            return {
                model: (int(n), None if newest is None else int(newest))
                for model, n, newest in conn.execute(query)
            }

    def sent_events_of(self, model: str) -> dict[str, dict[str, Any]]:
        """Every acknowledged event of one model; for tests and small inspections only."""
        with self.engine.connect() as conn:
            result = conn.execute(sa.select(sent_events).where(sent_events.c.model == model))
            return {row.key: dict(row._mapping) for row in result}

    # -- staged keys (the cross-database diff) --------------------------------------------
    def stage_keys(
        self, conn: Connection, token: str, model: str, rows: Sequence[tuple[str | None, str]]
    ) -> None:
        """Add (key, fingerprint) pairs read from the warehouse to the diff ``token``."""
        self.dialect.execute_rows(
            conn,
            f"INSERT INTO {self.staged_keys} (token, model, key, fingerprint, staged_at)"
            f" SELECT :token, :model, u.key, u.fingerprint, :now FROM {ROWS} AS u",
            ("key", "fingerprint"),
            rows,
            {"token": token, "model": model, "now": utcnow()},
        )

    def unstage_keys(self, token: str, model: str | None = None) -> None:
        """Drop the diff's staged keys, and any a dead run left behind long ago."""
        where = "token = :token" + (" AND model = :model" if model else "")
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(f"DELETE FROM {self.staged_keys} WHERE {where} OR staged_at < :stale"),
                {"token": token, "model": model, "stale": utcnow() - STALE_STAGING_AFTER},
            )

    def snapshot(self, model: str) -> dict[str, dict[str, Any]]:
        """The whole snapshot of one model; for tests and small inspections only."""
        with self.engine.connect() as conn:
            result = conn.execute(sa.select(snapshots).where(snapshots.c.model == model))
            return {row.key: dict(row._mapping) for row in result}

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
                    "model": model,
                    "key": r.key,
                    "run_id": run_id,
                    "reason": r.reason,
                    "field": r.field,
                    "status": r.status,
                    "payload": r.payload,
                    "rejected_at": utcnow(),
                }
                for r in _last_per_key(rows)
            ],
        )

    def clear_rejections(self, conn: Connection, model: str, keys: Sequence[str]) -> None:
        self._delete_keys(conn, self.table(rejections), model, keys)

    def has_rejections(self, model: str) -> bool:
        query = sa.select(rejections.c.key).where(rejections.c.model == model).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def rejections(self, model: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        query = sa.select(rejections).order_by(rejections.c.model, rejections.c.key).limit(limit)
        if model:
            query = query.where(rejections.c.model == model)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def rejection_counts(self) -> dict[str, int]:
        query = sa.select(rejections.c.model, sa.func.count()).group_by(rejections.c.model)
        with self.engine.connect() as conn:
            return {m: int(n) for m, n in conn.execute(query)}

    # -- runs ------------------------------------------------------------------------------
    def start_run(self, run_id: str, model: str, *, dry_run: bool, full_resync: bool) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(runs).values(
                    run_id=run_id,
                    model=model,
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
        self, run_id: str, model: str, status: str, counts: dict[str, int], error: str | None = None
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(runs)
                .where(runs.c.run_id == run_id, runs.c.model == model)
                .values(finished_at=utcnow(), status=status, error=error, **counts)
            )

    def last_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        query = sa.select(runs).order_by(runs.c.started_at.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

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
