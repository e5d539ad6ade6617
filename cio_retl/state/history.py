"""Runs, and the rows they rejected: what ``status`` reports and a fix clears.

The rejections table keeps each key's latest rejection until the row is fixed and sent; a
run's counts by code go to run_rejections, as its report lists only the first few.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cio_retl.state.schema import StoreBase, rejections, run_rejections, runs, utcnow


@dataclass(frozen=True, slots=True)
class RejectionRow:
    key: str
    code: str  # a cio_retl.records.RejectionCode value
    reason: str
    field: str | None
    status: int | None
    payload: str | None


class Runs(StoreBase):
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


def _last_per_key(rows: Iterable[RejectionRow]) -> list[RejectionRow]:
    return list({r.key: r for r in rows}.values())
