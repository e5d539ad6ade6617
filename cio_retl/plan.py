"""One plan per model per run: the changeset computed once, in the database holding both the
model and the state.

The push-down diff used to read the model twice (a counting pass, then the upserts' scan,
and the removals' anti-join a third time). Here one statement joins the model with its
snapshot and keeps what the run acts on: new rows, rows whose fingerprint moved, rows sharing
a key, and snapshot rows whose key left the model. It lands in a table of its own in the
state schema; counts, guardrail verdicts, sample payloads and the send all read that table.

A bucket run (``--bucket I/N``) reads its bucket's slice of one plan that every bucket run
of N shares, built by the first of a round (:mod:`cio_retl.plan_slices`), instead of a plan
of its own: a plan of one bucket still scans the whole model and snapshot to find its keys.

Why a table, not a TEMP table: the state writer reads the plan from another connection, and
a temporary table is visible to its own connection only. A dry run builds no plan (it
creates nothing persistent anywhere) and keeps the streaming diff. The table is dropped when
the run ends; one a killed run left behind has the model's (and bucket's) name prefix and is
dropped by the next run holding that lock, before it builds its own.

For the new and changed rows of person and object models the same pass builds the payloads
(:func:`cio_retl.payload_sql.payloads`, given the previous snapshot's attributes): each row
is checked once, and the plan keeps the snapshot's attributes of a valid row (an update's
also the changed attributes its item sends; a full resync's, all of them) or a rejected
row's code, reason and field, instead of its model columns; an update with nothing to send
is marked, and only its fingerprint is stored. The item text is built while the send reads
the plan, not stored: each payload is written into the plan once. Python only joins those
items into batch bodies, and on acknowledgment the snapshot rows are written from the plan
by sequence number, set-based. Every other row (rows sharing a key, rows the SQL leaves to
Python, models with columns of other types) keeps its model columns and goes through the
Python path, read from the same plan.

Events (an anti-join with the sent events) and the cross-database diff keep the streaming
diff of :mod:`cio_retl.diff`; so do removals' payloads, relationships, devices and
suppressions. The few statements that differ by database (the table's kind, how rows are
numbered, what is built after) are the dialect's (:mod:`cio_retl.dialects`).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter

import sqlalchemy as sa

from cio_retl.buckets import Bucket
from cio_retl.diff import (
    ChangeCounts,
    PushDownDiff,
    diff_connection,
    duplicate_keys_sql,
    in_bucket,
    removal_changes,
    source_columns_sql,
    source_rows_sql,
    suppressed_sql,
    suppressions_for,
    upsert_change,
)
from cio_retl.models import Kind, Model
from cio_retl.payload_sql import ATTRIBUTES as PAY_ATTRIBUTES
from cio_retl.payload_sql import CHANGED as PAY_CHANGED
from cio_retl.payload_sql import CODE as PAY_CODE
from cio_retl.payload_sql import PYTHON_ONLY as PAY_PYTHON_ONLY
from cio_retl.payload_sql import SEND as PAY_SEND
from cio_retl.payload_sql import Column, ColumnKind, Payloads, column_kind, payloads, sql_literal
from cio_retl.plan_slices import SharedPlans, Slice, plan_digest, retire_unclaimed, shared_root
from cio_retl.records import RowChange
from cio_retl.snapshot_merge import RangeLog, settle_leftover, unsettled, write_snapshots
from cio_retl.state import StateStore, rejections
from cio_retl.state.schema import utcnow
from cio_retl.warehouse import (
    BUCKET_COLUMN,
    BUILT_COLUMNS,
    BUILT_SEND_COLUMN,
    BUILT_SNAPSHOT_COLUMN,
    CHANGED_COLUMN,
    DUPLICATES_COLUMN,
    FINGERPRINT_COLUMN,
    FINGERPRINT_NUMBER_COLUMN,
    HELD_COLUMN,
    IDENTIFIERS_COLUMN,
    KEY_COLUMN,
    PREVIOUS_COLUMN,
    REJECT_CODE_COLUMN,
    REJECT_FIELD_COLUMN,
    REJECT_REASON_COLUMN,
    SEQ_COLUMN,
    SNAPSHOT_FINGERPRINT_COLUMN,
    SNAPSHOT_KEY_COLUMN,
    RowReader,
    Warehouse,
    model_sql,
)

_log = logging.getLogger(__name__)

PLAN_PREFIX = "cio_plan_"
# What orders the plan's sequence numbers where the dialect needs an order (Snowflake).
_PLAN_ORDER = (KEY_COLUMN, SNAPSHOT_KEY_COLUMN, FINGERPRINT_COLUMN)
# The sequence number of a plan written unnumbered (Dialect.numbers_plan_after).
_UNNUMBERED = "CAST(NULL AS BIGINT)"
# The full join of a rerun's narrow plan: the model's keys and fingerprint numbers with the
# snapshot's (cio_retl.passes counts the plans by it).
NARROW_JOIN = f"FULL OUTER JOIN snapn AS sn ON sn.key = f.{KEY_COLUMN}"
# A rerun's moved keys, written before its plan (the narrow join): a temporary table of the
# connection that builds the plan.
MOVED_TABLE = "__cio_moved"
# The attributes text a built item carries: an update's changed ones, else the snapshot's.
ITEM_ATTRIBUTES = f"COALESCE(p.{BUILT_SEND_COLUMN}, p.{BUILT_SNAPSHOT_COLUMN})"
# A plan row the upserts read and reject for its key: a model row, not held by a suppression.
_REJECTED_FOR_KEY = f"p.{FINGERPRINT_COLUMN} IS NOT NULL AND p.{HELD_COLUMN} = 0"


def previous(row: str, snapshot: str) -> str:
    """A planned row's previous attributes and identifiers, from its snapshot row (a removed
    row needs only the identifiers)."""
    return (
        f"CASE WHEN {row}.{FINGERPRINT_COLUMN} IS NOT NULL THEN {snapshot}.attributes END"
        f" AS {PREVIOUS_COLUMN}, {snapshot}.identifiers AS {IDENTIFIERS_COLUMN}"
    )


def _plan_counts(relation: str, by: str | None = None) -> str:
    """The counts a run reads of its plan (of each ``by`` value, when given): planned model
    rows, snapshot keys, new, changed and removed rows, rows of a NULL key, rows sharing a
    key."""
    group = (f"p.{by}, ", f" GROUP BY p.{by}") if by else ("", "")
    return f"""
        SELECT {group[0]}
            SUM(CASE WHEN p.{FINGERPRINT_COLUMN} IS NOT NULL THEN 1 ELSE 0 END),
            COUNT(DISTINCT p.{SNAPSHOT_KEY_COLUMN}),
            SUM(CASE WHEN p.{FINGERPRINT_COLUMN} IS NOT NULL
                      AND p.{SNAPSHOT_KEY_COLUMN} IS NULL THEN 1 ELSE 0 END),
            SUM(CASE WHEN p.{FINGERPRINT_COLUMN} IS NOT NULL
                      AND p.{SNAPSHOT_FINGERPRINT_COLUMN} <> p.{FINGERPRINT_COLUMN}
                     THEN 1 ELSE 0 END),
            SUM(CASE WHEN p.{FINGERPRINT_COLUMN} IS NULL THEN 1 ELSE 0 END),
            SUM(CASE WHEN {_REJECTED_FOR_KEY} AND p.{KEY_COLUMN} IS NULL THEN 1 ELSE 0 END),
            SUM(CASE WHEN {_REJECTED_FOR_KEY} AND p.{DUPLICATES_COLUMN} > 1 THEN 1 ELSE 0 END)
        FROM {relation} AS p{group[1]}
    """


_PLAN_COUNTS = 7  # the columns of _plan_counts


def plans_supported(warehouse: Warehouse) -> bool:
    return warehouse.dialect.builds_plans


def plan_prefix(model: str, bucket: Bucket | None) -> str:
    """The name prefix of every plan table of one model (and bucket): one run at a time holds
    its lock, so a table with this prefix that is not the run's own is a dead run's."""
    slot = model if bucket is None else f"{model}\x00{bucket.label}"
    return f"{PLAN_PREFIX}{hashlib.blake2b(slot.encode(), digest_size=5).hexdigest()}_"


def retire_shared_plans(conn: sa.Connection, state: StateStore, model: str) -> None:
    """No bucket run may send a slice of ``model`` planned before now (``conn``'s
    transaction, which writes its snapshots from another model's run)."""
    retire_unclaimed(conn, state, plan_prefix(model, None))


@dataclass(frozen=True, slots=True)
class Rejected:
    """One row the database rejected, as a report lists it."""

    key: str
    code: str
    reason: str
    field: str | None


@dataclass(frozen=True, slots=True)
class PlanTable:
    """One model's plan as the send and the acknowledgment read it."""

    name: str  # the relation it is read from: the quoted table, or a query over it
    model: str
    state: StateStore
    item: str  # the item's text over the plan's row ``p``
    identifiers: str  # the snapshot's identifiers over ``p``
    # Where acknowledged rows wait for a row group's worth (Dialect.snapshot_merge_rows,
    # a run's own plan): their ranges' record; None: each acknowledgment written at once.
    ranges: RangeLog | None = None

    # Bytes of snapshot text per read of :meth:`chunks` (a range of sequence numbers sized
    # from the plan's average): one read holds (and sorts) about this much, whatever the
    # width of the model's rows.
    READ_BYTES = 8 * 2**20
    MAX_READ_ROWS = 50_000

    def chunks(self) -> Iterator[tuple[Sequence[tuple[int, str | bytes, int]], list[bytes]]]:
        """The rows whose item the database built, in sequence order, a read at a time: the
        rows as (sequence number, item text or, where the dialect reads them so, its bytes,
        1 for an update or 0), and their items' bytes.
        The item text is built here, from the key and the attributes text (an update's
        changed ones, else the snapshot's), so the plan holds each payload once.

        Read a range of sequence numbers at a time (unique, and dense but where a bucket's
        slice skips the others' rows), not as one sorted result: a sort of the whole plan
        holds memory for as long as the send reads it, beside the acknowledgments' inserts
        (a 10M-row initial sync ran out of DuckDB's 128MB that way); a range is found by the
        column's min/max statistics (DuckDB's zone maps, PostgreSQL's index on it), and
        holds about READ_BYTES. Each read goes through the driver's own cursor: its rows
        stay the driver's tuples, with no SQLAlchemy row object made per item.
        """
        built = f"p.{BUILT_SNAPSHOT_COLUMN} IS NOT NULL"
        sorted_by_database = self.state.dialect.sorts_plan_reads
        order = f" ORDER BY p.{SEQ_COLUMN}" if sorted_by_database else ""
        as_bytes = self.state.dialect.utf8_bytes(self.item)
        update = f"CASE WHEN p.{SNAPSHOT_KEY_COLUMN} IS NULL THEN 0 ELSE 1 END"
        with self.state.engine.connect() as conn:
            first, last, rows, size = conn.execute(
                sa.text(
                    f"SELECT MIN(p.{SEQ_COLUMN}), MAX(p.{SEQ_COLUMN}), COUNT(*),"
                    f" AVG(LENGTH({ITEM_ATTRIBUTES})) FROM {self.name} AS p WHERE {built}"
                )
            ).one()
            if first is None:
                return
            per_read = max(1, min(self.MAX_READ_ROWS, int(self.READ_BYTES / (float(size) + 100))))
            # The range's width in sequence numbers, for about ``per_read`` of these rows:
            # wider where they are sparse (one bucket's slice of a shared plan).
            step = max(1, int(per_read * (int(last) - int(first) + 1) / int(rows)))
            cursor = conn.connection.cursor()
            try:
                for low in range(int(first), int(last) + 1, step):
                    statement = (
                        f"SELECT p.{SEQ_COLUMN}, {as_bytes or self.item}, {update}"
                        f" FROM {self.name} AS p"
                        f" WHERE {built} AND p.{SEQ_COLUMN} BETWEEN {low} AND {low + step - 1}"
                        f"{order}"
                    )
                    try:
                        cursor.execute(statement)
                        read = cursor.fetchall()
                        if not sorted_by_database:  # one pass where they came sorted
                            read = sorted(read, key=itemgetter(0))
                    except conn.dialect.loaded_dbapi.Error as exc:
                        # The driver's own error, as SQLAlchemy would have raised it (a lost
                        # connection an OperationalError), so the run tells it apart. A lost
                        # connection is invalidated first: closing it must not roll back
                        # over it, which would raise "the connection is lost" in its place.
                        lost = conn.dialect.is_disconnect(exc, conn.connection, cursor)
                        if lost:
                            conn.invalidate(exc)
                        raise sa.exc.DBAPIError.instance(
                            statement,
                            None,
                            exc,
                            conn.dialect.loaded_dbapi.Error,
                            connection_invalidated=lost,
                            dialect=conn.dialect,
                        ) from exc
                    yield (
                        read,
                        (
                            [item for _, item, _ in read]
                            if as_bytes
                            else [text.encode() for _, text, _ in read]
                        ),
                    )
            finally:
                cursor.close()

    def rejections(self, conn: sa.Connection, first: int) -> tuple[dict[str, int], list[Rejected]]:
        """The rows the database rejected before sending: their count per code, and the
        first ``first`` of each code in sequence order (what a report lists)."""
        counts = {
            code: int(n)
            for code, n in conn.execute(
                sa.text(
                    f"SELECT p.{REJECT_CODE_COLUMN}, COUNT(*) FROM {self.name} AS p"
                    f" WHERE p.{REJECT_CODE_COLUMN} IS NOT NULL GROUP BY p.{REJECT_CODE_COLUMN}"
                )
            )
        }
        if not counts:
            return counts, []
        firsts = conn.execute(
            sa.text(
                f"SELECT r.key, r.code, r.reason, r.field FROM ("
                f" SELECT p.{KEY_COLUMN} AS key, p.{REJECT_CODE_COLUMN} AS code,"
                f" p.{REJECT_REASON_COLUMN} AS reason, p.{REJECT_FIELD_COLUMN} AS field,"
                f" p.{SEQ_COLUMN} AS seq, ROW_NUMBER() OVER"
                f" (PARTITION BY p.{REJECT_CODE_COLUMN} ORDER BY p.{SEQ_COLUMN}) AS n"
                f" FROM {self.name} AS p WHERE p.{REJECT_CODE_COLUMN} IS NOT NULL"
                f") AS r WHERE r.n <= {int(first)} ORDER BY r.seq"
            )
        )
        return counts, [Rejected(*row) for row in firsts]

    def record_rejections(self, conn: sa.Connection, run_id: str) -> None:
        """Record every row the database rejected, set-based: the rejection replaces what
        its key had."""
        rejected = f"FROM {self.name} AS p WHERE p.{REJECT_CODE_COLUMN} IS NOT NULL"
        table, scope = self.state.table(rejections), self.state.scope(self.model)
        conn.execute(
            sa.text(
                f"DELETE FROM {table} WHERE workspace = :workspace AND model = :model"
                f" AND key IN (SELECT p.{KEY_COLUMN} {rejected})"
            ),
            scope,
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (workspace, model, key, run_id, reason, field, status,"
                " payload, rejected_at, code)"
                " SELECT CAST(:workspace AS VARCHAR), CAST(:model AS VARCHAR),"
                f" p.{KEY_COLUMN}, CAST(:run_id AS VARCHAR), p.{REJECT_REASON_COLUMN},"
                f" p.{REJECT_FIELD_COLUMN}, CAST(NULL AS INTEGER), CAST(NULL AS VARCHAR),"
                f" :now, p.{REJECT_CODE_COLUMN} {rejected}"
            ),
            {**scope, "run_id": run_id, "now": utcnow()},
        )

    def refresh_fingerprints(self, conn: sa.Connection) -> None:
        """Store the new fingerprint of every row whose normalized attributes did not change
        (diff.upsert_change's REFRESH: nothing is sent), set-based."""
        refreshed = f"FROM {self.name} AS p WHERE p.{CHANGED_COLUMN} = 0"
        if not conn.execute(sa.text(f"SELECT COUNT(*) {refreshed}")).scalar_one():
            return
        table = self.state.snapshots
        conn.execute(
            sa.text(
                f"UPDATE {table} SET fingerprint = p.{FINGERPRINT_COLUMN} {refreshed}"
                f" AND {table}.workspace = :workspace AND {table}.model = :model"
                f" AND {table}.key = p.{KEY_COLUMN}"
            ),
            self.state.scope(self.model),
        )

    def keys(self, conn: sa.Connection, seqs: Sequence[int]) -> dict[int, str]:
        if not seqs:
            return {}
        listed = ", ".join(str(int(s)) for s in seqs)
        sql = (
            f"SELECT p.{SEQ_COLUMN}, p.{KEY_COLUMN} FROM {self.name} AS p"
            f" WHERE p.{SEQ_COLUMN} IN ({listed})"
        )
        return {int(seq): key for seq, key in conn.execute(sa.text(sql))}

    def save_acknowledged(
        self,
        conn: sa.Connection,
        run_id: str,
        ranges: Sequence[tuple[int, int]],
        unacknowledged: Sequence[int] = (),
        *,
        clear_rejections: bool,
        updates: bool,
    ) -> None:
        """Write the snapshots of the built rows in ``ranges`` (first and last sequence
        number of acknowledged items) but ``unacknowledged``, straight from the plan
        (:func:`cio_retl.snapshot_merge.write_snapshots`)."""
        write_snapshots(
            conn,
            self.state,
            self.name,
            self.identifiers,
            self.state.scope(self.model),
            run_id,
            ranges,
            unacknowledged,
            clear_rejections=clear_rejections,
            updates=updates,
        )


class PlanDiff(PushDownDiff):
    """The push-down diff of a run that sends: each model's changeset planned once."""

    def __init__(
        self,
        warehouse: Warehouse,
        state: StateStore,
        bucket: Bucket | None = None,
        suppressions: Sequence[Model] = (),
        *,
        full_resync: bool = False,
        run_id: str | None = None,
    ) -> None:
        super().__init__(warehouse, state, bucket, suppressions)
        self.full_resync = full_resync
        self.token = uuid.uuid4().hex[:12]
        self.run_id = run_id or f"plan-{self.token}"  # who claims a shared plan's slice
        # model -> the relation its plan is read from: the run's own plan table, or its
        # bucket's slice of a plan the bucket runs share (cio_retl.plan_slices).
        self.plans: dict[str, str] = {}
        self.owned: dict[str, str] = {}  # model -> the (unquoted) plan table this run drops
        self.slices: dict[str, tuple[SharedPlans, Slice]] = {}  # model -> its claimed slice
        self.payloads: dict[str, Payloads] = {}  # model -> its new rows' payload SQL
        # Models whose plan did not fit the database's memory limit: diffed as a stream.
        self.streamed: set[str] = set()

    def plan_name(self, model: Model) -> str:
        """The (unquoted) name of this run's own plan table of ``model``."""
        return f"{plan_prefix(model.name, self.bucket)}{self.token}"

    def _table(self, model: Model) -> str | None:
        """The model's plan table, built on first use; None where the model is diffed as a
        stream (events, or a plan over the database's memory limit)."""
        if model.kind is Kind.EVENT or model.name in self.streamed:
            return None
        return self.plans.get(model.name) or self._build(model)

    def count(self, model: Model, *, keys: bool = False) -> ChangeCounts:
        table = self._table(model)
        if table is None:
            return super().count(model, keys=keys)
        claimed = self.slices.get(model.name)
        if claimed is not None:
            # Counted when the slice's plan was built (no run wrote its bucket since).
            acknowledged, planned = claimed[1].acknowledged, claimed[1].planned
        else:
            snapshot_rows = f"""
                SELECT COUNT(*) FROM {self.state.snapshots} AS s
                WHERE s.workspace = :workspace AND s.model = :model{
                in_bucket(self.state.dialect, "s.key", self.bucket)
            }
            """
            with self.state.engine.connect() as conn:
                acknowledged = int(
                    conn.execute(sa.text(snapshot_rows), self.state.scope(model.name)).scalar_one()
                    or 0
                )
                planned = tuple(
                    int(v or 0) for v in conn.execute(sa.text(_plan_counts(table))).one()
                )
        planned_rows, planned_snapshots, new, changed, removed, *bad_keys = planned
        # Snapshot rows the plan left out are the unchanged ones: one model row each.
        rows = planned_rows + acknowledged - planned_snapshots
        # The plan holds every row of a bad key anyway: counting them costs nothing here.
        return ChangeCounts(rows, acknowledged, new, changed, removed, *bad_keys)

    def key_rejections(self, model: Model, limit: int) -> list[RowChange]:
        table = self._table(model)
        if table is None:
            return super().key_rejections(model, limit)
        sql = (
            f"SELECT * FROM {table} AS p WHERE {_REJECTED_FOR_KEY}"
            f" AND (p.{KEY_COLUMN} IS NULL OR p.{DUPLICATES_COLUMN} > 1)"
            f" ORDER BY p.{SEQ_COLUMN} LIMIT {int(limit)}"
        )
        found: list[RowChange] = []
        with diff_connection(self.state, None) as conn:
            for chunk in self.warehouse.stream(conn, sql):
                if chunk.rows:
                    columns = RowReader(chunk.rows[0]._fields, chunk.json_columns)
                    found += [
                        upsert_change(model, columns, r, None, full_resync=False)
                        for r in chunk.rows
                    ]
        return found

    def upserts(self, model: Model, *, full_resync: bool = False) -> Generator[RowChange]:
        table = self._table(model)
        if table is None:
            yield from super().upserts(model, full_resync=full_resync)
            return
        assert full_resync == self.full_resync or not full_resync, "planned without it"
        sql = (
            f"SELECT * FROM {table} AS p WHERE p.{FINGERPRINT_COLUMN} IS NOT NULL"
            f" AND p.{BUILT_SNAPSHOT_COLUMN} IS NULL AND p.{REJECT_CODE_COLUMN} IS NULL"
            f" AND p.{CHANGED_COLUMN} IS NULL"
            f" AND p.{HELD_COLUMN} = 0 ORDER BY p.{SEQ_COLUMN}"  # cio_retl.passes knows this
        )
        with diff_connection(self.state, None) as conn:
            for chunk in self.warehouse.stream(conn, sql):
                if not chunk.rows:
                    continue
                columns = RowReader(chunk.rows[0]._fields, chunk.json_columns)
                previous = columns.index[PREVIOUS_COLUMN]
                for row in chunk.rows:
                    yield upsert_change(
                        model, columns, row, row[previous], full_resync=self.full_resync
                    )

    def real_updates(self, model: Model) -> int:
        table = self._table(model)
        if table is None:
            return super().real_updates(model)
        sql = f"SELECT COUNT(*) FROM {table} AS p WHERE p.{CHANGED_COLUMN} = 1"
        with self.state.engine.connect() as conn:
            diffed = int(conn.execute(sa.text(sql)).scalar_one() or 0)
        return diffed + super().real_updates(model)  # and the rows left to Python

    def planned(self, model: Model) -> PlanTable | None:
        """The plan whose built items the send reads first, or None (no plan)."""
        table = self.plans.get(model.name)
        built = self.payloads.get(model.name)
        if table is None or built is None:
            return None
        key = f"p.{KEY_COLUMN}"
        own = self.owned.get(model.name)
        unit = self.state.dialect.snapshot_merge_rows
        ranges = (
            RangeLog(self.state, own, model.name, built.identifier_parts)
            if own is not None and unit and self._builds_at_least(table, unit)
            else None
        )
        return PlanTable(
            table,
            model.name,
            self.state,
            built.item(key, ITEM_ATTRIBUTES),
            built.identifiers(key),
            ranges,
        )

    def _builds_at_least(self, table: str, rows: int) -> bool:
        """Whether the plan ``table`` builds the items of ``rows`` rows or more (it stops
        counting there).

        Acknowledged rows wait to be written in whole row groups (Dialect.
        snapshot_merge_rows) because the database writes those straight to its file. A
        plan of fewer built rows fills none: its rows reach the file through the WAL
        however they are written, so each acknowledgment writes its own at once, as where
        the dialect has no unit, overlapping the send instead of following it (a 100k-row
        initial sync ends 0.1-0.3 s sooner; bench/README.md, "Small plans written as
        acknowledged")."""
        sql = (
            f"SELECT COUNT(*) FROM (SELECT 1 FROM {table} AS p"
            f" WHERE p.{BUILT_SNAPSHOT_COLUMN} IS NOT NULL LIMIT {int(rows)}) AS b"
        )
        with self.state.engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar_one() or 0) >= rows

    def removals(self, model: Model, *, delete: bool) -> Generator[RowChange]:
        table = self._table(model)
        if table is None:
            yield from super().removals(model, delete=delete)
            return
        sql = (
            f"SELECT p.{SNAPSHOT_KEY_COLUMN}, p.{IDENTIFIERS_COLUMN} FROM {table} AS p"
            f" WHERE p.{FINGERPRINT_COLUMN} IS NULL ORDER BY p.{SEQ_COLUMN}"
        )
        with diff_connection(self.state, None) as conn:
            for chunk in self.warehouse.stream(conn, sql):
                yield from removal_changes(chunk.rows, delete=delete)

    def close(self) -> None:
        owned, self.owned, self.plans = self.owned, {}, {}
        slices, self.slices = self.slices, {}
        try:
            # A plan whose acknowledged rows a failed send could not write stays for the
            # model's next run, which writes them holding the model's lock (the run's own is
            # given back by now: writing them here could race that next run).
            kept = set(unsettled(self.state, list(owned.values())))
            self.state.drop_tables(n for n in owned.values() if n not in kept)
        finally:
            for shared, claimed in slices.values():
                shared.release(claimed)

    def _build(self, model: Model) -> str | None:
        """Plan ``model``; the relation the plan is read from, or None when the plan does
        not fit the database's memory limit.

        A run of the whole model builds its own plan table. A bucket run reads its slice of
        the plan the runs of its bucket count share, building that (for every bucket) when
        there is none it may claim."""
        self._drop_leftovers(model)
        columns = self._payloads(model)
        after = self.warehouse.dialect.numbers_plan_after(self.warehouse.column_names(model))
        if self.bucket is None:
            name = self.plan_name(model)
            sql, staged = self._plan_sql(model, columns, None, numbered_after=after)
            fallback = self._as_written(model, columns, None) if after else None
            relation = self._create(model, name, sql, (), staged, fallback)
            if relation is None:
                return None
            self.owned[model.name] = name
            self.plans[model.name] = relation
            return relation
        count = self.bucket.count
        # A shared plan is named by its full join's query, whichever join builds it: both
        # give the same changeset, and the bucket runs of a round, some of which find a
        # snapshot (the narrow join) where the first found none, share one plan.
        full, _ = self._plan_sql(model, columns, count, numbered_after=after, narrow=False)
        sql, staged = self._plan_sql(model, columns, count, numbered_after=after)
        shared = SharedPlans(
            self.state, model.name, plan_prefix(model.name, None), count, self.run_id
        )
        digest = plan_digest(full)
        with self.state.planning(model.name, count, self.run_id):
            shared.survey()
            claimed = shared.claim(self.bucket.index, digest)
            if claimed is None:
                shared.begin_build()
                name = shared.name(digest, self.token)
                fallback = self._as_written(model, columns, count) if after else None
                if self._create(model, name, sql, (BUCKET_COLUMN,), staged, fallback) is None:
                    return None
                table = self.state.qualified(name)
                with self.state.engine.connect() as conn:
                    rows = conn.execute(sa.text(_plan_counts(table, BUCKET_COLUMN))).all()
                planned = {int(r[0]): tuple(r[1:]) for r in rows}
                claimed = shared.register(
                    name, self.bucket.index, self._acknowledged(model), planned, _PLAN_COUNTS
                )
        self.slices[model.name] = (shared, claimed)
        self.plans[model.name] = claimed.relation
        return claimed.relation

    def _has_snapshot(self, model: Model) -> bool:
        """Whether the model has acknowledged rows here (a rerun, not an initial sync)."""
        sql = (
            f"SELECT 1 FROM {self.state.snapshots} AS s"
            " WHERE s.workspace = :workspace AND s.model = :model LIMIT 1"
        )
        with self.state.engine.connect() as conn:
            return conn.execute(sa.text(sql), self.state.scope(model.name)).first() is not None

    def _acknowledged(self, model: Model) -> dict[int, int]:
        """The model's snapshot rows per bucket (of the run's count)."""
        assert self.bucket is not None
        bucket = self.state.dialect.bucket("s.key", self.bucket.count)
        sql = (
            f"SELECT {bucket} AS b, COUNT(*) FROM {self.state.snapshots} AS s"
            " WHERE s.workspace = :workspace AND s.model = :model GROUP BY 1"
        )
        with self.state.engine.connect() as conn:
            rows = conn.execute(sa.text(sql), self.state.scope(model.name)).all()
        return {int(b): int(n) for b, n in rows}

    def _as_written(
        self, model: Model, columns: list[Column] | None, shared: int | None
    ) -> Callable[[], str]:
        """What builds the plan's query again with its rows numbered as written: the
        fallback of a plan written unnumbered that did not fit the memory limit."""
        return lambda: self._plan_sql(model, columns, shared, numbered_after=False)[0]

    def _plan_sql(
        self,
        model: Model,
        columns: list[Column] | None,
        shared: int | None,
        *,
        numbered_after: bool,
        narrow: bool = True,
    ) -> tuple[str, str | None]:
        """The query a plan table is created as: of the run's bucket, or (``shared``, a
        bucket count) of every key with each row's bucket in BUCKET_COLUMN, its sequence
        numbers NULL when ``numbered_after``; and the query of a rerun's moved keys it
        reads as MOVED_TABLE, written first (or None: always, without ``narrow``)."""
        w, d = self.warehouse, self.warehouse.dialect
        bucket = None if shared is not None else self.bucket
        scope = self.state.scope(model.name)
        # Literals, not bind parameters: PostgreSQL takes none in CREATE TABLE AS.
        where = f"s.workspace = {sql_literal(scope['workspace'])} AND s.model = {sql_literal(scope['model'])}"
        acted_on = (
            ""
            if self.full_resync
            else (
                f"WHERE src.{FINGERPRINT_COLUMN} IS NULL OR snap.key IS NULL"
                f" OR snap.fingerprint <> src.{FINGERPRINT_COLUMN} OR dup.n > 1"
            )
        )
        held_by = suppressions_for(model, self.suppressions)
        held = (
            f"CASE WHEN {suppressed_sql(w, f'src.{KEY_COLUMN}', held_by)} THEN 1 ELSE 0 END"
            if held_by
            else "0"
        )
        # A row's bucket is its key's; a NULL key's is 0, as in a run of one bucket.
        bucket_of = (
            f", {d.bucket(f'COALESCE(src.{KEY_COLUMN}, snap.key)', shared)} AS {BUCKET_COLUMN}"
            if shared is not None
            else ""
        )
        head = f"""
            WITH src AS {d.not_materialized}({source_rows_sql(w, model, bucket)}),
            dup AS ({duplicate_keys_sql()}),
            snap AS (
                SELECT s.key, s.fingerprint FROM {self.state.snapshots} AS s
                WHERE {where}{in_bucket(self.state.dialect, "s.key", bucket)}
            ),
        """
        staged = None
        narrow = narrow and bool(acted_on) and d.narrow_diff_join
        if narrow and self._has_snapshot(model):
            # A rerun: the full join with the snapshot carries only keys and fingerprints
            # (on DuckDB the numbers inside them), and the model rows it keeps (few, as a
            # rule) are joined back by key, their fingerprints and normalized columns
            # computed after that join: the join no longer moves every unchanged row's
            # columns, and the join back computes only the key of every model row
            # (measured in bench/README.md, "Shared bucket plans" and "Plans numbered
            # after they are written"). Every row of a key that ``moved`` keeps is kept (a
            # shared key's rows all are), so DISTINCT makes one ``moved`` row per key and
            # the join back takes each model row once.
            #
            # The moved keys are written first, as a temporary table: of a CTE, DuckDB's
            # optimizer cannot know they are few, and built the next joins' hash tables
            # of the model's 2M snapshots (their attributes too) instead of the moved
            # rows (measured: 1.9-2.2 s against 0.57 + 0.05 s).
            row_number, snapshot_number = w.fingerprint_numbers(model, "m", "s.fingerprint")
            fpn, moved = FINGERPRINT_NUMBER_COLUMN, d.temporary(MOVED_TABLE)
            # The snapshot's row of a moved key, where the dialect finds rows by their id
            # (Dialect.row_id): the plan fetches its texts by it.
            row_id = self.state.dialect.row_id
            snap_row, moved_row = (
                (f", s.{row_id} AS __cio_srow", ", sn.__cio_srow AS __cio_sr")
                if row_id
                else ("", "")
            )
            staged = f"""{head}
            fps AS ({source_rows_sql(w, model, bucket, row_number)}),
            snapn AS (
                SELECT s.key, {snapshot_number} AS {fpn}{snap_row}
                FROM {self.state.snapshots} AS s
                WHERE {where}{in_bucket(self.state.dialect, "s.key", bucket)}
            )
            SELECT DISTINCT f.{KEY_COLUMN} AS __cio_mk, f.{fpn} IS NOT NULL AS __cio_mr,
                   COALESCE(dup.n, 1) AS __cio_mn, sn.key AS __cio_sk{moved_row}
            FROM fps AS f
            {NARROW_JOIN}
            LEFT JOIN dup ON dup.{KEY_COLUMN} = f.{KEY_COLUMN}
            WHERE f.{fpn} IS NULL OR sn.key IS NULL OR sn.{fpn} IS DISTINCT FROM f.{fpn}
               OR dup.n > 1
            """
            key_of = d.key_expression(model, "m")
            # A shared plan's row bucket, of its key or (a removed row) its snapshot's.
            narrow_bucket_of = (
                f", {d.bucket(f'COALESCE(src.{KEY_COLUMN}, src.__cio_sk)', shared)}"
                f" AS {BUCKET_COLUMN}"
                if shared is not None
                else ""
            )
            carried = ", ".join(f"src.{d.quote(c)}" for c in w.column_names(model))
            # The moved keys' snapshot rows, once: by row id, else by key.
            snapshot_row = (
                f"s.{row_id} = src.__cio_sr" if row_id else f"{where} AND s.key = src.__cio_sk"
            )
            # Back to the model: a moved key's rows by key (a hash join, ``=``); the rows of
            # a NULL key, all of them new, apart; a removed key (no model row) joins none,
            # and its fingerprint stays NULL (DuckDB hashes a NULL row to a number).
            joined = f"""{head}
            kept AS (
                SELECT {source_columns_sql(w, model, "m", present="moved.__cio_mr")},
                       moved.__cio_mn, moved.__cio_sk{", moved.__cio_sr" if row_id else ""}
                FROM {moved} AS moved
                LEFT JOIN ({model_sql(model)}) AS m
                  ON moved.__cio_mr AND {key_of} = moved.__cio_mk
                WHERE moved.__cio_mk IS NOT NULL OR NOT moved.__cio_mr
                UNION ALL
                SELECT {source_columns_sql(w, model, "m")}, 1, NULL{", NULL" if row_id else ""}
                FROM ({model_sql(model)}) AS m WHERE {key_of} IS NULL
            ),
            j AS (
                SELECT src.{KEY_COLUMN}, src.{FINGERPRINT_COLUMN}, {carried},
                       src.__cio_mn AS {DUPLICATES_COLUMN},
                       src.__cio_sk AS {SNAPSHOT_KEY_COLUMN},
                       s.fingerprint AS {SNAPSHOT_FINGERPRINT_COLUMN},
                       {held} AS {HELD_COLUMN},
                       {previous("src", "s")}{narrow_bucket_of}
                FROM kept AS src LEFT JOIN {self.state.snapshots} AS s ON {snapshot_row}
            )
            """
            snapshot_of = ""
        else:
            joined = f"""{head}
            j AS (
                SELECT src.*, COALESCE(dup.n, 1) AS {DUPLICATES_COLUMN},
                       snap.key AS {SNAPSHOT_KEY_COLUMN},
                       snap.fingerprint AS {SNAPSHOT_FINGERPRINT_COLUMN},
                       {held} AS {HELD_COLUMN}{bucket_of}
                FROM src
                FULL OUTER JOIN snap ON snap.key = src.{KEY_COLUMN}
                LEFT JOIN dup ON dup.{KEY_COLUMN} = src.{KEY_COLUMN}
                {acted_on}
            )
            """
            snapshot_of = (
                f"LEFT JOIN {self.state.snapshots} AS s"
                f" ON {where} AND s.key = p.{SNAPSHOT_KEY_COLUMN}"
            )
        # The snapshot's texts: ``j`` holds them where it joined the snapshot rows already.
        previous_of = f", {previous('p', 's')}" if snapshot_of else ""
        seq = _UNNUMBERED if numbered_after else d.plan_sequence([f"p.{c}" for c in _PLAN_ORDER])
        if columns is None:
            nulls = ", ".join(f"CAST(NULL AS VARCHAR) AS {c}" for c in BUILT_COLUMNS)
            return (
                f"{joined} SELECT {seq} AS {SEQ_COLUMN}, p.*{previous_of}, {nulls},"
                f" CAST(NULL AS INTEGER) AS {CHANGED_COLUMN} FROM j AS p {snapshot_of}"
            ), staged
        built = payloads(
            d.name,
            model,
            columns,
            f"SELECT p.*{previous_of} FROM j AS p {snapshot_of}",
            key=f"m.{KEY_COLUMN}",
            previous=PREVIOUS_COLUMN,
            full_resync=self.full_resync,
        )
        self.payloads[model.name] = built
        # A new or changed row, valid or not, is the database's to send, reject or refresh,
        # unless the SQL leaves it to Python; every other row keeps its model columns (and
        # previous attributes) for Python.
        decided = (
            f"p.{FINGERPRINT_COLUMN} IS NOT NULL AND p.{DUPLICATES_COLUMN} = 1"
            f" AND p.{KEY_COLUMN} IS NOT NULL AND p.{HELD_COLUMN} = 0"
            f" AND p.{PAY_PYTHON_ONLY} = 0"
        )
        sent, rejected = (
            f"{decided} AND p.{PAY_CODE} IS NULL AND COALESCE(p.{PAY_CHANGED}, 1) = 1",
            f"{decided} AND p.{PAY_CODE} IS NOT NULL",
        )
        engine_columns = (
            KEY_COLUMN,
            FINGERPRINT_COLUMN,
            DUPLICATES_COLUMN,
            SNAPSHOT_KEY_COLUMN,
            SNAPSHOT_FINGERPRINT_COLUMN,
            HELD_COLUMN,
            *((BUCKET_COLUMN,) if shared is not None else ()),
        )
        kept = [f"p.{c}" for c in engine_columns]
        model_columns = [
            f"CASE WHEN NOT ({decided}) THEN p.{d.quote(c.name)} END AS {d.quote(c.name)}"
            for c in columns
        ]
        # An update's item attributes, unless they are the snapshot's text (a full resync's
        # without removals): the plan holds each payload once.
        update = f"p.{SNAPSHOT_KEY_COLUMN} IS NOT NULL"
        sql = f"""{joined}
            SELECT {seq} AS {SEQ_COLUMN}, {", ".join(kept + model_columns)},
                   CASE WHEN NOT ({decided}) THEN p.{PREVIOUS_COLUMN} END AS {PREVIOUS_COLUMN},
                   p.{IDENTIFIERS_COLUMN},
                   CASE WHEN {sent} THEN p.{PAY_ATTRIBUTES} END AS {BUILT_SNAPSHOT_COLUMN},
                   CASE WHEN {sent} AND {update}
                        THEN NULLIF(p.{PAY_SEND}, p.{PAY_ATTRIBUTES}) END AS {BUILT_SEND_COLUMN},
                   CASE WHEN {decided} THEN p.{PAY_CHANGED} END AS {CHANGED_COLUMN},
                   CASE WHEN {rejected} THEN p.{PAY_CODE} END AS {REJECT_CODE_COLUMN},
                   CASE WHEN {rejected} THEN {built.reason("p")} END AS {REJECT_REASON_COLUMN},
                   CASE WHEN {rejected} THEN {built.field("p")} END AS {REJECT_FIELD_COLUMN}
            FROM ({built.relation}{d.subquery_fence}) AS p
        """
        return sql, staged

    def _create(
        self,
        model: Model,
        name: str,
        sql: str,
        by: Sequence[str],
        staged: str | None = None,
        as_written: Callable[[], str] | None = None,
    ) -> str | None:
        """Write the plan table ``name`` from ``sql`` (Dialect.create_plan: CREATE TABLE AS,
        or DuckDB's declared table and INSERT); the relation to read it from, or None (and no
        table) when that does not fit the database's memory limit. ``by``: the columns its
        reads filter by before the sequence number (a shared plan's: its rows are numbered
        in the table, which the runs of every bucket read). ``staged``: the query written
        first as the temporary MOVED_TABLE, which ``sql`` reads (dropped after).
        ``as_written``: given where ``sql`` writes the rows unnumbered (the dialect numbers
        them after, or reads their numbers from where they lie: Dialect.plan_rows), what
        builds the same plan numbered as written, tried when ``sql`` does not fit."""
        d, table, order = self.warehouse.dialect, self.state.qualified(name), (*by, SEQ_COLUMN)
        query, numbered_after = sql, as_written is not None
        relation = table
        built = False
        with diff_connection(self.warehouse, self.bucket) as conn:
            for setting in d.plan_session:
                conn.execute(sa.text(setting))
            try:
                while not built:
                    try:
                        if staged is not None:
                            for statement in d.temporary_table(MOVED_TABLE, staged):
                                conn.execute(sa.text(statement))
                        columns = d.plan_columns(conn, query)
                        for statement in d.create_plan(table, query, order, columns):
                            conn.execute(sa.text(statement))
                        # This attempt's: a retry written numbered as written stores them.
                        relation = table
                        rows = d.plan_rows(table, SEQ_COLUMN) if numbered_after and not by else None
                        if rows is not None:
                            relation = rows
                        elif numbered_after:
                            conn.execute(sa.text(d.plan_numbering(table, SEQ_COLUMN)))
                        for statement in d.plan_built(table, by, SEQ_COLUMN):
                            conn.execute(sa.text(statement))
                        conn.commit()
                        built = True
                    except sa.exc.DBAPIError as exc:
                        if not d.out_of_memory(exc):
                            raise
                        conn.rollback()  # takes back the failed write's table
                        if not numbered_after or as_written is None:
                            break
                        # The threads that write a plan at once hold more of it than the
                        # window's single pipeline, which spills.
                        _log.warning(
                            "%s: its plan did not fit the memory limit as built; building it"
                            " again, its rows numbered as written (slower)",
                            model.name,
                        )
                        query, numbered_after = as_written(), False
                if not built:
                    # A plan holds every changed row's payload at once; past the memory
                    # limit the streaming diff, which holds a chunk at a time, still serves.
                    self.streamed.add(model.name)
                    _log.warning(
                        "%s: its plan does not fit the database's memory limit; diffing it as"
                        " a stream (slower; a higher memory_limit in the warehouse URL avoids it)",
                        model.name,
                    )
            finally:
                if d.plan_session_reset or staged is not None:
                    conn.rollback()  # nothing after the commit; a failed build's transaction
                    for setting in d.plan_session_reset:
                        conn.execute(sa.text(setting))
                    if staged is not None:  # the pooled connection keeps its temporary tables
                        conn.execute(sa.text(d.drop_temporary(MOVED_TABLE)))
                    conn.commit()
        if not built:
            self.state.drop_tables([name])  # rolled back already: none is left, as a rule
            return None
        return relation

    def _payloads(self, model: Model) -> list[Column] | None:
        """The model's columns with their kinds where SQL builds its new rows' payloads: a
        person or object model of one key column, text or integers, whose every other
        column is of a kind :mod:`cio_retl.payload_sql` normalizes as Python does; else
        None."""
        if model.kind not in (Kind.PERSON, Kind.OBJECT) or model.key is None:
            return None
        sql = (
            f"SELECT {self.warehouse.select_list(model, 'm')}"
            f" FROM ({model_sql(model)}) AS m LIMIT 0"
        )
        with self.warehouse.engine.connect() as conn:
            result = conn.execute(sa.text(sql))
            # The names as the rows carry them (Snowflake's unquoted USER_ID is user_id, as
            # the Python path names its attribute), the types as the driver describes them.
            described = list(zip(result.keys(), result.cursor.description or (), strict=True))
        d = self.warehouse.dialect
        columns = []
        for name, column in described:
            kind = column_kind(d.name, d.result_type(column))
            if name == model.key and kind not in (ColumnKind.TEXT, ColumnKind.INTEGER):
                # The SQL writes the key as the database prints it; the Python path
                # normalizes other kinds (a timestamp becomes Unix seconds) or rejects them.
                return None
            if kind is None:
                return None
            columns.append(Column(name, kind))
        return columns

    def _drop_leftovers(self, model: Model) -> None:
        """Drop the plans of this model (and bucket) that killed runs left behind, once what
        they recorded as acknowledged is in the snapshot."""
        prefix = plan_prefix(model.name, self.bucket)
        leftover = self.state.tables_starting(prefix)
        # A killed whole-model run's acknowledged rows go into the snapshot before any run
        # of the model plans, a bucket run's too (its leftovers have another prefix): the
        # model's locks exclude each other, and planning without them would send the rows
        # again and let the killed run's older rows be written over newer ones later.
        if self.state.dialect.snapshot_merge_rows:
            whole = plan_prefix(model.name, None)
            if self.bucket is None:
                settle_leftover(self.state, leftover, whole)
            else:
                # The bucket runs of one count run at once, and two settling the same plan
                # would write the same rows in two transactions: DuckDB fails one of them
                # with a write-write conflict. Under the count's planning lock one settles
                # and drops, and the next finds nothing left.
                with self.state.planning(model.name, self.bucket.count, self.run_id):
                    plans = self.state.tables_starting(whole)
                    settle_leftover(self.state, plans, whole)
                    # and drops them (no bucket run reads a whole-model plan)
                    self.state.drop_tables(p for p in plans if not p.startswith(shared_root(whole)))
        self.state.drop_tables(leftover)
