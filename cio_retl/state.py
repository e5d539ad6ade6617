"""The state store: snapshots of what Customer.io acknowledged, runs, rejections and locks.

A snapshot row changes only after Customer.io acknowledged the item built from it, so a run
that dies anywhere loses nothing: the next diff sees the row as still different and resends
it. Writes are set-based (arrays unnested into one statement), never row by row.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cio_retl.config import STATE_SCHEMA
from cio_retl.errors import ConfigError, LockedError

STALE_LOCK_AFTER = dt.timedelta(minutes=30)

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


@dataclass(frozen=True, slots=True)
class RejectionRow:
    key: str
    reason: str
    field: str | None
    status: int | None
    payload: str | None


def _table(table: sa.Table, dialect: sa.Dialect) -> str:
    preparer = dialect.identifier_preparer
    return f"{preparer.quote_schema(STATE_SCHEMA)}.{preparer.quote(table.name)}"


class StateStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        if engine.dialect.name not in ("duckdb", "postgresql"):
            # Snowflake state needs MERGE instead of ON CONFLICT; see the warehouses issue.
            raise ConfigError(
                f"state store on {engine.dialect.name!r} is not supported yet; "
                "use DuckDB or PostgreSQL for CIO_RETL_STATE_URL"
            )
        self.snapshots = _table(snapshots, engine.dialect)

    def ensure_schema(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA}"))
            metadata.create_all(conn)

    # -- snapshots -------------------------------------------------------------------------
    def save_snapshots(
        self, conn: Connection, model: str, run_id: str, rows: Sequence[SnapshotRow]
    ) -> None:
        if not rows:
            return
        table = _table(snapshots, conn.dialect)
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (model, key, fingerprint, attrs_hash, identifiers, attributes,"
                " run_id, synced_at)"
                " SELECT :model, unnest(CAST(:keys AS VARCHAR[])), unnest(CAST(:fps AS VARCHAR[])),"
                " unnest(CAST(:hashes AS VARCHAR[])), unnest(CAST(:idents AS VARCHAR[])),"
                " unnest(CAST(:attrs AS VARCHAR[])), :run_id, :now"
                " ON CONFLICT (model, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
                " attrs_hash = excluded.attrs_hash, identifiers = excluded.identifiers,"
                " attributes = excluded.attributes, run_id = excluded.run_id,"
                " synced_at = excluded.synced_at"
            ),
            {
                "model": model,
                "keys": [r.key for r in rows],
                "fps": [r.fingerprint for r in rows],
                "hashes": [r.attrs_hash for r in rows],
                "idents": [r.identifiers for r in rows],
                "attrs": [r.attributes for r in rows],
                "run_id": run_id,
                "now": utcnow(),
            },
        )

    def update_fingerprints(
        self, conn: Connection, model: str, pairs: Sequence[tuple[str, str]]
    ) -> None:
        """Rows whose SQL changed but whose normalized values did not: nothing to send."""
        if not pairs:
            return
        table = _table(snapshots, conn.dialect)
        conn.execute(
            sa.text(
                f"UPDATE {table} SET fingerprint = u.fp FROM"
                " (SELECT unnest(CAST(:keys AS VARCHAR[])) AS key,"
                " unnest(CAST(:fps AS VARCHAR[])) AS fp) AS u"
                f" WHERE {table}.model = :model AND {table}.key = u.key"
            ),
            {"model": model, "keys": [k for k, _ in pairs], "fps": [f for _, f in pairs]},
        )

    def delete_snapshots(self, conn: Connection, model: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        table = _table(snapshots, conn.dialect)
        conn.execute(
            sa.text(
                f"DELETE FROM {table} WHERE model = :model"
                " AND key IN (SELECT unnest(CAST(:keys AS VARCHAR[])))"
            ),
            {"model": model, "keys": list(keys)},
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
        if not keys:
            return
        table = _table(rejections, conn.dialect)
        conn.execute(
            sa.text(
                f"DELETE FROM {table} WHERE model = :model"
                " AND key IN (SELECT unnest(CAST(:keys AS VARCHAR[])))"
            ),
            {"model": model, "keys": list(keys)},
        )

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
    def acquire_lock(self, model: str, run_id: str) -> None:
        """One run per model: a row in ``locks``.

        A lock is taken over when its run is provably gone: its process no longer exists on
        this host, or it has not refreshed its heartbeat for STALE_LOCK_AFTER (another host).
        """
        now = utcnow()
        with self.engine.begin() as conn:
            held = conn.execute(sa.select(locks).where(locks.c.model == model)).first()
            if held is not None and (
                _owner_is_dead(held.owner) or _aware(held.heartbeat_at) < now - STALE_LOCK_AFTER
            ):
                conn.execute(
                    sa.delete(locks).where(locks.c.model == model, locks.c.run_id == held.run_id)
                )
                held = None
            if held is None:
                try:
                    conn.execute(
                        sa.insert(locks).values(
                            model=model,
                            run_id=run_id,
                            owner=_lock_owner(),
                            acquired_at=now,
                            heartbeat_at=now,
                        )
                    )
                    return
                except sa.exc.IntegrityError:
                    held = conn.execute(sa.select(locks).where(locks.c.model == model)).first()
        since = f" since {held.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if held else ""
        owner = f" (run {held.run_id} on {held.owner}{since})" if held else ""
        minutes = int(STALE_LOCK_AFTER.total_seconds() // 60)
        raise LockedError(
            f"model {model!r} is being synced by another run{owner}; try again when it ends. "
            f"A lock whose process is gone, or silent for {minutes} min, is taken over."
        )

    def heartbeat(self, models: Sequence[str], run_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(locks)
                .where(locks.c.model.in_(list(models)), locks.c.run_id == run_id)
                .values(heartbeat_at=utcnow())
            )

    def release_lock(self, model: str, run_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(locks).where(locks.c.model == model, locks.c.run_id == run_id))


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


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _last_per_key(rows: Iterable[RejectionRow]) -> list[RejectionRow]:
    return list({r.key: r for r in rows}.values())
