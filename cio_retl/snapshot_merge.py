"""Snapshot rows written from a plan: by ranges of its sequence numbers, set-based, and where
the dialect writes them in whole row groups, a row group's worth at a time.

A built row's snapshot row is its plan row (key, fingerprint, attributes text) plus the
identifiers made from the key, so acknowledging a batch of built items needs only the
batch's first and last sequence number. On DuckDB the rows then wait until a multiple of
its row group is due (``Dialect.snapshot_merge_rows``): an append of whole row groups is
written to the database file once, where each smaller one goes through the WAL and is
written again by a checkpoint. Meanwhile their ranges are recorded in
``acknowledged_ranges`` in the acknowledgment's own transaction, within a second of it, so
the snapshot as a run reads it is the snapshot table plus those ranges of their plans: a
run killed in between leaves both, and the next run of the model writes them before it
plans (:func:`settle_leftover`), so it resends only what a killed run had in flight or
acknowledged in its last second, as before. Every run of the model settles them first, a
bucket run's included: the model's locks exclude each other.

What reads the snapshot table alone sees it without the recorded rows until then: a dry
run or ``plan`` after a killed run counts them as still to send (at most a row group's
worth a model), and a suppression model's run, which forgets the people it suppresses, can
see a person's snapshot row written back by a people run's later merge (that window was
the second between an acknowledgment and its write before).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from cio_retl.payload_sql import identifiers_text
from cio_retl.state import StateStore, acknowledged_ranges, rejections
from cio_retl.state.schema import SNAPSHOT_COLUMNS, utcnow
from cio_retl.warehouse import (
    BUILT_SNAPSHOT_COLUMN,
    FINGERPRINT_COLUMN,
    KEY_COLUMN,
    SEQ_COLUMN,
    SNAPSHOT_KEY_COLUMN,
)

Range = tuple[int, int]  # first and last sequence number, both included


def write_snapshots(
    conn: sa.Connection,
    state: StateStore,
    plan: str,
    identifiers: str,
    scope: Mapping[str, str],
    run_id: str,
    ranges: Sequence[Range],
    unacknowledged: Sequence[int] = (),
    *,
    clear_rejections: bool,
    updates: bool,
) -> None:
    """Write the snapshots of the built rows of ``plan`` (quoted) in ``ranges`` but
    ``unacknowledged``, straight from the plan: new rows inserted, and (with ``updates``)
    updated rows' replaced; ``identifiers`` is their SQL over the plan's row ``p``.

    The attributes are the plan's text (an update's too: the snapshot keeps the whole
    record, not what its item sent) and the identifiers are built from the key, byte for
    byte what the Python path stores.
    """
    if not ranges:
        return
    chosen = " OR ".join(f"p.{SEQ_COLUMN} BETWEEN {int(a)} AND {int(b)}" for a, b in ranges)
    rows = f"p.{BUILT_SNAPSHOT_COLUMN} IS NOT NULL AND ({chosen})"
    if unacknowledged:
        rows += f" AND p.{SEQ_COLUMN} NOT IN ({', '.join(str(int(s)) for s in unacknowledged)})"
    source = (
        "SELECT CAST(:workspace AS VARCHAR) AS workspace, CAST(:model AS VARCHAR) AS model,"
        f" p.{KEY_COLUMN} AS key, p.{FINGERPRINT_COLUMN} AS fingerprint,"
        f" {identifiers} AS identifiers, p.{BUILT_SNAPSHOT_COLUMN} AS attributes,"
        f" CAST(:run_id AS VARCHAR) AS run_id, :now AS synced_at"
        f" FROM {plan} AS p WHERE {rows}"
    )
    params = {**scope, "run_id": run_id, "now": utcnow()}
    if clear_rejections:
        conn.execute(
            sa.text(
                f"DELETE FROM {state.table(rejections)} WHERE workspace = :workspace"
                f" AND model = :model AND key IN"
                f" (SELECT p.{KEY_COLUMN} FROM {plan} AS p WHERE {rows})"
            ),
            scope,
        )
    # absent: the plan found no snapshot for the new rows' keys and the model's lock keeps
    # other writers out. Updated rows replace theirs (without ``updates`` that statement is
    # not run: on DuckDB its DELETE scans the model's snapshot).
    for had_snapshot in (False, True) if updates else (False,):
        which = "NOT NULL" if had_snapshot else "NULL"
        for statement in state.dialect.upsert(
            state.snapshots,
            ("workspace", "model", "key"),
            SNAPSHOT_COLUMNS,
            f"{source} AND p.{SNAPSHOT_KEY_COLUMN} IS {which}",
            absent=not had_snapshot,
        ):
            conn.execute(sa.text(statement), params)


def acknowledged_runs(seqs: Sequence[int], acked: Iterable[int]) -> list[array[int]]:
    """The sequence numbers of one batch's acknowledged items (their indexes ``acked``), as
    runs of consecutive items: a refused item splits its batch's range, so that every built
    row within each run's first and last sequence number was acknowledged."""
    indexes = sorted(set(acked))
    if len(indexes) == len(seqs):
        return [array("q", seqs)] if seqs else []
    runs: list[array[int]] = []
    start = previous = -2
    for i in indexes:
        if i != previous + 1:
            if start >= 0:
                runs.append(array("q", seqs[start : previous + 1]))
            start = i
        previous = i
    if start >= 0:
        runs.append(array("q", seqs[start : previous + 1]))
    return runs


@dataclass(slots=True)
class Pending:
    """Acknowledged built rows of one plan not yet in the snapshot, as runs of sequence
    numbers (:func:`acknowledged_runs`); the state writer's own, so unlocked."""

    runs: list[array[int]] = field(default_factory=list)
    rows: int = 0
    updates: bool = False  # whether any of them is an update (the upsert's DELETE is needed)

    def add(self, runs: Iterable[array[int]], updates: bool) -> list[Range]:
        """Add acknowledged runs; returns their ranges to record, a run that continues the
        one before it (its first number right after that one's last) joined to it, so the
        ranges of consecutive batches are one."""
        added: list[Range] = []
        for run in runs:
            if self.runs and self.runs[-1][-1] + 1 == run[0]:
                self.runs[-1].extend(run)
            else:
                self.runs.append(run)
            if added and added[-1][1] + 1 == run[0]:
                added[-1] = (added[-1][0], run[-1])
            else:
                added.append((run[0], run[-1]))
            self.rows += len(run)
        self.updates = self.updates or updates
        return added

    def take(self, unit: int, *, final: bool) -> list[Range]:
        """The ranges of the rows to write now, the lowest sequence numbers first: every
        row when ``final``, else the largest multiple of ``unit`` rows there is (none below
        one). A run cut in two leaves its rest pending."""
        wanted = self.rows if final else self.rows - self.rows % unit
        if not wanted:
            return []
        self.runs.sort(key=lambda run: run[0])
        taken: list[Range] = []
        left = wanted
        while left:
            run = self.runs[0]
            if len(run) <= left:
                taken.append((run[0], run[-1]))
                left -= len(run)
                self.runs.pop(0)
            else:
                taken.append((run[0], run[left - 1]))
                del run[:left]
                left = 0
        self.rows -= wanted
        if not self.rows:
            self.updates = False
        return taken

    def ranges(self) -> list[Range]:
        return [(run[0], run[-1]) for run in self.runs]

    def copy(self) -> Pending:
        """A copy whose runs are its own (:meth:`add` and :meth:`take` change them in
        place): what to go back to when the transaction that changed this one fails."""
        return Pending([array("q", run) for run in self.runs], self.rows, self.updates)


@dataclass(frozen=True, slots=True)
class RangeLog:
    """One plan's rows in ``acknowledged_ranges``: what of it was acknowledged and is not in
    the snapshot yet, in words a later run can write without the run that recorded it."""

    state: StateStore
    plan: str  # the plan table's unquoted name
    model: str
    identifier_parts: tuple[str, str]

    def record(self, conn: sa.Connection, run_id: str, ranges: Sequence[Range]) -> None:
        if not ranges:
            return
        values = ", ".join(f"({int(a)}, {int(b)})" for a, b in ranges)
        head, tail = self.identifier_parts
        conn.execute(
            sa.text(
                f"INSERT INTO {self.state.table(acknowledged_ranges)} (plan, workspace, model,"
                " run_id, first_seq, last_seq, identifiers_head, identifiers_tail,"
                " acknowledged_at) SELECT CAST(:plan AS VARCHAR), CAST(:workspace AS VARCHAR),"
                " CAST(:model AS VARCHAR), CAST(:run_id AS VARCHAR), r.a, r.b,"
                " CAST(:head AS VARCHAR), CAST(:tail AS VARCHAR), :now"
                f" FROM (VALUES {values}) AS r(a, b)"
            ),
            {
                **self.state.scope(self.model),
                "plan": self.plan,
                "run_id": run_id,
                "head": head,
                "tail": tail,
                "now": utcnow(),
            },
        )

    def replace(self, conn: sa.Connection, run_id: str, ranges: Sequence[Range]) -> None:
        """The plan's recorded ranges become ``ranges`` (what a merge left pending)."""
        forget(conn, self.state, [self.plan])
        self.record(conn, run_id, ranges)


def forget(conn: sa.Connection, state: StateStore, plans: Sequence[str]) -> None:
    if plans:
        conn.execute(
            sa.delete(acknowledged_ranges).where(acknowledged_ranges.c.plan.in_(list(plans)))
        )


def settle_leftover(state: StateStore, plans: Sequence[str], prefix: str | None = None) -> None:
    """Write into the snapshot what the plans ``plans`` (unquoted names, of runs that ended
    without doing so) recorded as acknowledged, and forget those ranges; one transaction.
    With ``prefix``, the ranges of other plans of that name prefix are forgotten too: their
    tables are gone (dropped by hand), and with them what the ranges point at.

    Run by the model's next run, holding its lock, before it drops those plans and plans
    again. Each range carries its workspace, run and identifiers, so the rows are written as
    the run that sent them would have."""
    if not state.dialect.snapshot_merge_rows:
        return  # no range is ever recorded there
    table = acknowledged_ranges
    with state.engine.begin() as conn:
        if prefix is not None:
            orphans = [
                plan
                for (plan,) in conn.execute(sa.select(table.c.plan).distinct())
                if plan.startswith(prefix) and plan not in plans
            ]
            forget(conn, state, orphans)
        recorded = conn.execute(
            sa.select(
                table.c.plan,
                table.c.workspace,
                table.c.model,
                table.c.run_id,
                table.c.identifiers_head,
                table.c.identifiers_tail,
                table.c.first_seq,
                table.c.last_seq,
            ).where(table.c.plan.in_(list(plans)))
        ).all()
        grouped: dict[tuple[str, str, str, str, str, str], list[Range]] = {}
        for plan, workspace, model, run_id, head, tail, first, last in recorded:
            grouped.setdefault((plan, workspace, model, run_id, head, tail), []).append(
                (int(first), int(last))
            )
        for (plan, workspace, model, run_id, head, tail), ranges in grouped.items():
            write_snapshots(
                conn,
                state,
                _plan_relation(conn, state, plan),
                identifiers_text(state.dialect.name, head, tail, f"p.{KEY_COLUMN}"),
                {"workspace": workspace, "model": model},
                run_id,
                ranges,
                clear_rejections=True,
                updates=True,
            )
        forget(conn, state, plans)


def unsettled(state: StateStore, plans: Sequence[str]) -> list[str]:
    """Those of the plans ``plans`` (unquoted names) with acknowledged rows not yet written
    into the snapshot."""
    if not plans or not state.dialect.snapshot_merge_rows:
        return []
    table = acknowledged_ranges
    with state.engine.connect() as conn:
        query = sa.select(table.c.plan).distinct().where(table.c.plan.in_(list(plans)))
        return [plan for (plan,) in conn.execute(query)]


def _plan_relation(conn: sa.Connection, state: StateStore, plan: str) -> str:
    """The relation a plan (unquoted name) is read from: by its row ids where it was written
    unnumbered (its stored sequence numbers all NULL, Dialect.plan_rows), else the table."""
    table = state.qualified(plan)
    rows = state.dialect.plan_rows(table, SEQ_COLUMN)
    if rows is None:
        return table
    numbered = conn.execute(sa.text(f"SELECT COUNT({SEQ_COLUMN}) FROM {table}")).scalar_one()
    return table if numbered else rows
