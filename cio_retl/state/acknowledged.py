"""Snapshots of what Customer.io acknowledged, the events it acknowledged, and the keys a
cross-database diff stages.

A snapshot row changes only after Customer.io acknowledged the item built from it, so a run
that dies anywhere loses nothing: the next diff sees the row as still different and resends
it. Writes are set-based (a batch becomes one relation, see :mod:`cio_retl.dialects`), never
row by row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cio_retl.dialects import ROWS
from cio_retl.state.schema import (
    SNAPSHOT_COLUMNS,
    StoreBase,
    sent_events,
    session_staged_keys,
    snapshots,
    utcnow,
)

# Staged keys older than this belong to runs that died before cleaning up.
STALE_STAGING_AFTER = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    """The acknowledged state of one row, written after Customer.io accepted it."""

    key: str
    fingerprint: str
    identifiers: str
    attributes: str
    # The run's diff found no snapshot of this key (a create): the write may skip looking
    # for an existing row. False is always safe. Keyword-only: a positional value would
    # land here when the text fields before it change.
    new: bool = field(default=False, kw_only=True)


class Snapshots(StoreBase):
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
            " u.key, u.fingerprint, u.identifiers, u.attributes,"
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
                ("key", "fingerprint", "identifiers", "attributes"),
                [(r.key, r.fingerprint, r.identifiers, r.attributes) for r in group],
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
