"""Which rows changed since Customer.io last acknowledged them, and which attributes.

Each model row gets a fingerprint (a digest of all its columns, computed by the warehouse).
When the warehouse also holds the state (the default), the comparison runs there as SQL: a
left join with the snapshot keeps only rows that are new, whose fingerprint moved, or whose
key is duplicated, and only those travel to Python (:class:`PushDownDiff`). When the state
lives elsewhere, :class:`CrossDatabaseDiff` gives the same results in fixed-size chunks.
Either way the rows that changed are normalized and compared attribute by attribute with
the acknowledged attributes, so a changed row sends only what changed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cio_retl.buckets import Bucket
from cio_retl.dialects import Dialect
from cio_retl.models import Kind, Model, RemovedColumns
from cio_retl.normalize import canonical_json, to_event, to_record, upgrade_previous
from cio_retl.records import Attributes, Change, Rejection, RejectionCode, RowChange
from cio_retl.state import StateStore
from cio_retl.warehouse import (
    DUPLICATES_COLUMN,
    FETCH_ROWS,
    FINGERPRINT_COLUMN,
    FINGERPRINT_NUMBER_COLUMN,
    KEY_COLUMN,
    PREVIOUS_COLUMN,
    Chunk,
    RowReader,
    Warehouse,
    model_sql,
)

REMOVED = ""  # the API's form for "remove this attribute" (spec: send an empty string)


def diff_upserts(
    conn: Connection,
    warehouse: Warehouse,
    state: StateStore,
    model: Model,
    *,
    full_resync: bool = False,
    bucket: Bucket | None = None,
    suppressions: Sequence[Model] = (),
) -> Iterator[RowChange]:
    """Rows to create or update (and rows to reject), streamed in chunks.

    Push-down form: warehouse and state share ``conn``'s database, so the join with the
    snapshot runs there and only new, changed and duplicated rows reach Python. People that
    ``suppressions`` hold are left out: they are never identified.
    """
    # Memory: the join that decides what changed carries only (key, fingerprint) of the
    # snapshot, and duplicates come from a GROUP BY of keys; the acknowledged attributes are
    # joined afterwards to the changed rows only. (A window COUNT over all columns plus a
    # join carrying every snapshot's attributes made a 2M-row rerun peak at 1 GiB RSS.)
    changed = (
        ""
        if full_resync
        else f"WHERE snap.key IS NULL OR snap.fingerprint <> src.{FINGERPRINT_COLUMN} OR dup.n > 1"
    )
    sql = f"""
        WITH src AS {warehouse.dialect.not_materialized}({
        _without_suppressed(warehouse, source_rows_sql(warehouse, model, bucket), suppressions)
    }),
        dup AS ({duplicate_keys_sql()}),
        snap AS (
            SELECT s.key, s.fingerprint FROM {state.snapshots} AS s
            WHERE s.workspace = :workspace AND s.model = :model{
        in_bucket(state.dialect, "s.key", bucket)
    }
        ),
        c AS (
            SELECT src.*, COALESCE(dup.n, 1) AS {DUPLICATES_COLUMN}
            FROM src
            LEFT JOIN snap ON snap.key = src.{KEY_COLUMN}
            LEFT JOIN dup ON dup.{KEY_COLUMN} = src.{KEY_COLUMN}
            {changed}
        )
        SELECT c.*, s.attributes AS {PREVIOUS_COLUMN}
        FROM c LEFT JOIN {state.snapshots} AS s
          ON s.workspace = :workspace AND s.model = :model AND s.key = c.{KEY_COLUMN}
    """
    for chunk in warehouse.stream(conn, sql, state.scope(model.name)):
        if not chunk.rows:
            continue
        columns = RowReader(chunk.rows[0]._fields, chunk.json_columns)
        previous = columns.index[PREVIOUS_COLUMN]
        for row in chunk.rows:
            yield upsert_change(model, columns, row, row[previous], full_resync=full_resync)


def source_rows_sql(
    warehouse: Warehouse, model: Model, bucket: Bucket | None, number: str | None = None
) -> str:
    """The model's rows (of one bucket) with their key text and fingerprint; or, given
    ``number`` (over the row ``m``), their key text and that number alone."""
    d = warehouse.dialect
    columns = (
        f"{d.key_expression(model, 'm')} AS {KEY_COLUMN}, {number} AS {FINGERPRINT_NUMBER_COLUMN}"
        if number is not None
        else source_columns_sql(warehouse, model, "m")
    )
    rows = f"SELECT {columns} FROM ({model_sql(model)}) AS m"
    if bucket is None:
        return rows
    return f"SELECT * FROM ({rows}) AS b WHERE TRUE{in_bucket(d, f'b.{KEY_COLUMN}', bucket)}"


def source_columns_sql(
    warehouse: Warehouse, model: Model, alias: str, *, present: str | None = None
) -> str:
    """The select list of a model row ``alias`` as the diff reads it: its key text, its
    fingerprint and its columns; the fingerprint NULL unless ``present`` holds (an outer
    join's missing row, whose columns are all NULL)."""
    fingerprint = warehouse.fingerprint(model, alias)
    if present is not None:
        fingerprint = f"CASE WHEN {present} THEN {fingerprint} END"
    return (
        f"{warehouse.dialect.key_expression(model, alias)} AS {KEY_COLUMN},"
        f" {fingerprint} AS {FINGERPRINT_COLUMN}, {warehouse.select_list(model, alias)}"
    )


def in_bucket(dialect: Dialect, key: str, bucket: Bucket | None) -> str:
    """``AND <key's bucket> = <index>``, or nothing when the run covers every key."""
    if bucket is None:
        return ""
    return f" AND {dialect.bucket(key, bucket.count)} = {bucket.index}"


def duplicate_keys_sql() -> str:
    """Keys that more than one row of ``src`` shares (an aggregate of keys, not a window)."""
    return (
        f"SELECT {KEY_COLUMN}, COUNT(*) AS n FROM src WHERE {KEY_COLUMN} IS NOT NULL"
        f" GROUP BY {KEY_COLUMN} HAVING COUNT(*) > 1"
    )


def _model_rows(
    warehouse: Warehouse,
    model: Model,
    bucket: Bucket | None,
    suppressions: Sequence[Model] = (),
) -> str:
    """The model's rows with their key text, fingerprint and how many rows share the key
    (but the people ``suppressions`` hold)."""
    rows = _without_suppressed(warehouse, source_rows_sql(warehouse, model, bucket), suppressions)
    return f"""
        WITH src AS {warehouse.dialect.not_materialized}({rows}),
        dup AS ({duplicate_keys_sql()})
        SELECT src.*, COALESCE(dup.n, 1) AS {DUPLICATES_COLUMN}
        FROM src LEFT JOIN dup ON dup.{KEY_COLUMN} = src.{KEY_COLUMN}
    """


def upsert_change(
    model: Model,
    columns: RowReader,
    row: Sequence[Any],
    previous_json: str | None,
    *,
    full_resync: bool,
) -> RowChange:
    key = row[columns.index[KEY_COLUMN]]
    fingerprint = row[columns.index[FINGERPRINT_COLUMN]]
    values = columns.values(row)
    if key is None:
        nulls = [c for c in model.key_columns if values.get(c) is None] or list(model.key_columns)
        return RowChange(
            Change.REJECT,
            None,
            rejection=Rejection(
                RejectionCode.NULL_KEY, f"key is NULL ({', '.join(nulls)})", nulls[0]
            ),
        )
    duplicates = row[columns.index[DUPLICATES_COLUMN]]
    if duplicates > 1:
        return _duplicate_key(model, key, duplicates)
    record = to_record(model, key, values)
    if isinstance(record, Rejection):
        return RowChange(Change.REJECT, key, rejection=record)
    if previous_json is None:
        # send IS the record's attributes: the encoder then reuses their canonical JSON.
        return RowChange(Change.CREATE, key, fingerprint, record, send=record.attributes)
    previous: Attributes = upgrade_previous(model, orjson.loads(previous_json))
    send = changed_attributes(previous, record.attributes)
    if model.removed_columns is RemovedColumns.KEEP:
        # A column that left the model leaves its attribute alone; a NULL still removes.
        send = {k: v for k, v in send.items() if not (v == REMOVED and k not in values)}
    if full_resync:
        return RowChange(
            Change.UPDATE, key, fingerprint, record, send={**record.attributes, **send}
        )
    if not send:
        return RowChange(Change.REFRESH, key, fingerprint, record)
    return RowChange(Change.UPDATE, key, fingerprint, record, send=send)


def changed_attributes(previous: Attributes, current: Attributes) -> Attributes:
    """What to send so Customer.io goes from ``previous`` to ``current``: new or different
    values, and ``""`` for attributes that are gone (NULL now, or a dropped column)."""
    send = {k: v for k, v in current.items() if k not in previous or not same_value(previous[k], v)}
    send.update({k: REMOVED for k in previous if k not in current})
    return send


def same_value(a: Any, b: Any) -> bool:
    """Equality that does not confuse ``True`` with ``1`` or ``1`` with ``1.5``-like floats."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict | list):
        return canonical_json(a) == canonical_json(b)
    return bool(a == b)


def diff_removals(
    conn: Connection,
    warehouse: Warehouse,
    state: StateStore,
    model: Model,
    *,
    delete: bool,
    bucket: Bucket | None = None,
) -> Iterator[RowChange]:
    """Snapshot rows whose key left the model: to delete, or only to forget."""
    d = warehouse.dialect
    sql = f"""
        SELECT s.key, s.identifiers FROM {state.snapshots} AS s
        WHERE s.workspace = :workspace AND s.model = :model{in_bucket(state.dialect, "s.key", bucket)} AND NOT EXISTS (
            SELECT 1 FROM ({model_sql(model)}) AS m WHERE {d.key_expression(model, "m")} = s.key
        )
    """
    for chunk in warehouse.stream(conn, sql, state.scope(model.name)):
        yield from removal_changes(chunk.rows, delete=delete)


def removal_changes(rows: Iterable[sa.Row[Any]], *, delete: bool) -> Iterator[RowChange]:
    for key, identifiers in rows:
        yield RowChange(
            Change.DELETE if delete else Change.FORGET,
            key,
            identifiers=orjson.loads(identifiers),
        )


@dataclass(frozen=True, slots=True)
class ChangeCounts:
    """How big the changeset is, counted in the database before anything is sent."""

    rows: int  # rows of the model
    snapshot_rows: int  # rows acknowledged so far
    new: int  # model rows without a snapshot (NULL or duplicate keys included)
    changed: int  # model rows whose fingerprint moved (an upper bound of updates)
    removed: int  # snapshot rows whose key left the model
    # Rows the upserts will reject for their key, counted only when asked (``keys=True``):
    # a NULL key, or a key other rows share. Events count unsent rows only.
    null_keys: int = 0
    duplicate_keys: int = 0

    @property
    def has_upserts(self) -> bool:
        return self.new + self.changed > 0


# One counting pass over model rows (src: k, f) fully joined with the snapshot (snap);
# portable SQL (no FILTER clause), shared by both diff forms.
_COUNTED = (
    "COUNT(src.f)",
    "COUNT(snap.key)",
    "SUM(CASE WHEN src.f IS NOT NULL AND snap.key IS NULL THEN 1 ELSE 0 END)",
    "SUM(CASE WHEN src.f IS NOT NULL AND snap.fingerprint <> src.f THEN 1 ELSE 0 END)",
    "SUM(CASE WHEN src.f IS NULL THEN 1 ELSE 0 END)",
)
_JOINED = "FROM src FULL OUTER JOIN snap ON snap.key = src.k"


def _counts(*, keys: bool) -> str:
    """The counting pass's SELECT; with ``keys``, the same join grouped by key, so that it
    also counts the rows of NULL keys (the NULL group: the snapshot's removed rows there
    have no model row) and of shared keys. The grouping is paid only when asked for."""
    if not keys:
        return f"SELECT {', '.join(_COUNTED)} {_JOINED}"
    per_key = ", ".join(f"{count} AS c{i}" for i, count in enumerate(_COUNTED))
    return f"""
        SELECT {", ".join(f"SUM(g.c{i})" for i in range(len(_COUNTED)))},
            SUM(CASE WHEN g.k IS NULL THEN g.c0 ELSE 0 END),
            SUM(CASE WHEN g.k IS NOT NULL AND g.c0 > 1 THEN g.c0 ELSE 0 END)
        FROM (SELECT src.k AS k, {per_key} {_JOINED} GROUP BY src.k) AS g
    """


def count_changes(
    conn: Connection,
    warehouse: Warehouse,
    state: StateStore,
    model: Model,
    bucket: Bucket | None = None,
    *,
    keys: bool = False,
) -> ChangeCounts:
    """One pass over the model joined with its snapshot, in the database holding both."""
    sql = f"""
        WITH src AS ({_keys_and_fingerprints(warehouse, model, bucket)}), snap AS (
            SELECT s.key, s.fingerprint FROM {state.snapshots} AS s
            WHERE s.workspace = :workspace AND s.model = :model{in_bucket(state.dialect, "s.key", bucket)}
        )
        {_counts(keys=keys)}
    """
    row = conn.execute(sa.text(sql), state.scope(model.name)).one()
    return ChangeCounts(*(int(v or 0) for v in row))


def _keys_and_fingerprints(warehouse: Warehouse, model: Model, bucket: Bucket | None) -> str:
    """(k, f) of every model row of the bucket: all the counting pass reads of the model."""
    d = warehouse.dialect
    rows = (
        f"SELECT {d.key_expression(model, 'm')} AS k, {warehouse.fingerprint(model, 'm')} AS f"
        f" FROM ({model_sql(model)}) AS m"
    )
    if bucket is None:
        return rows
    return f"SELECT * FROM ({rows}) AS b WHERE TRUE{in_bucket(d, 'b.k', bucket)}"


# -- events: append-only -------------------------------------------------------------------


def lookback_cutoff(model: Model, now: dt.datetime | None = None) -> dt.datetime | None:
    """The oldest event time a run reads (naive UTC, as warehouses store timestamps), or None.

    Compared in SQL with the timestamp column, which must then be a timestamp or a date
    (an integer of Unix seconds can be converted in the model's SELECT).
    """
    if model.lookback_days is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    return now.replace(tzinfo=None) - dt.timedelta(days=model.lookback_days)


def _in_lookback(warehouse: Warehouse, model: Model, alias: str) -> str:
    """``AND`` the row's time within the lookback. A NULL time passes, to be rejected."""
    if model.lookback_days is None:
        return ""
    assert model.timestamp
    column = f"{alias}.{warehouse.dialect.quote(model.timestamp)}"
    return f" AND ({column} IS NULL OR {column} >= :cutoff)"


def _event_rows(warehouse: Warehouse, model: Model, bucket: Bucket | None) -> str:
    """The event rows within the lookback (of one bucket), with their key text and how many
    rows share the key."""
    d = warehouse.dialect
    rows = f"""
        SELECT {d.key_expression(model, "m")} AS {KEY_COLUMN}, {warehouse.select_list(model, "m")}
        FROM ({model_sql(model)}) AS m WHERE TRUE{_in_lookback(warehouse, model, "m")}
    """
    if bucket is not None:
        rows = f"SELECT * FROM ({rows}) AS b WHERE TRUE{in_bucket(d, f'b.{KEY_COLUMN}', bucket)}"
    return f"""
        WITH src AS {d.not_materialized}({rows}), dup AS ({duplicate_keys_sql()})
        SELECT src.*, COALESCE(dup.n, 1) AS {DUPLICATES_COLUMN}
        FROM src LEFT JOIN dup ON dup.{KEY_COLUMN} = src.{KEY_COLUMN}
    """


def _event_params(state: StateStore, model: Model) -> dict[str, Any]:
    return {**state.scope(model.name), "cutoff": lookback_cutoff(model)}


def _event_change(model: Model, columns: RowReader, row: Sequence[Any]) -> RowChange:
    """One unsent event row: the event to send, or why it cannot be."""
    key = row[columns.index[KEY_COLUMN]]
    if key is None:
        assert model.event_key
        return RowChange(
            Change.REJECT,
            None,
            rejection=Rejection(
                RejectionCode.NULL_KEY, f"key is NULL ({model.event_key})", model.event_key
            ),
        )
    duplicates = row[columns.index[DUPLICATES_COLUMN]]
    if duplicates > 1:
        return _duplicate_key(model, key, duplicates)
    event = to_event(model, key, columns.values(row))
    if isinstance(event, Rejection):
        return RowChange(Change.REJECT, key, rejection=event)
    return RowChange(Change.CREATE, key, event=event)


def diff_events(
    conn: Connection,
    warehouse: Warehouse,
    state: StateStore,
    model: Model,
    bucket: Bucket | None = None,
) -> Iterator[RowChange]:
    """Events not acknowledged yet, within the lookback: an anti-join in SQL with the sent
    events, so only new events travel to Python, however long the history. Whatever else
    changed in a row, a sent event is never planned again (nor by ``--full-resync``)."""
    sql = f"""
        SELECT r.* FROM ({_event_rows(warehouse, model, bucket)}) AS r
        WHERE r.{KEY_COLUMN} IS NULL OR NOT EXISTS (
            SELECT 1 FROM {state.sent_events} AS e
            WHERE e.workspace = :workspace AND e.model = :model AND e.key = r.{KEY_COLUMN}
        )
    """
    for chunk in warehouse.stream(conn, sql, _event_params(state, model)):
        if not chunk.rows:
            continue
        columns = RowReader(chunk.rows[0]._fields, chunk.json_columns)
        for row in chunk.rows:
            yield _event_change(model, columns, row)


def count_events(
    conn: Connection,
    warehouse: Warehouse,
    state: StateStore,
    model: Model,
    bucket: Bucket | None = None,
    *,
    keys: bool = False,
) -> ChangeCounts:
    """Rows within the lookback, events acknowledged so far, and rows not yet sent (with
    ``keys``, also the unsent rows of NULL and of shared keys)."""
    d = warehouse.dialect
    src = (
        f"SELECT {d.key_expression(model, 'm')} AS k FROM ({model_sql(model)}) AS m"
        f" WHERE TRUE{_in_lookback(warehouse, model, 'm')}"
    )
    unsent = "SUM(CASE WHEN sent.key IS NULL THEN 1 ELSE 0 END)"
    joined = (
        f"FROM src LEFT JOIN sent ON sent.key = src.k WHERE TRUE{in_bucket(d, 'src.k', bucket)}"
    )
    select = f"SELECT COUNT(*), {unsent} {joined}"
    if keys:
        select = f"""
            SELECT SUM(g.n), SUM(g.unsent),
                SUM(CASE WHEN g.k IS NULL THEN g.n ELSE 0 END),
                SUM(CASE WHEN g.k IS NOT NULL AND g.n > 1 THEN g.unsent ELSE 0 END)
            FROM (SELECT src.k AS k, COUNT(*) AS n, {unsent} AS unsent {joined} GROUP BY src.k) AS g
        """
    sql = f"""
        WITH src AS ({src}), sent AS (
            SELECT e.key FROM {state.sent_events} AS e WHERE e.workspace = :workspace AND e.model = :model
        )
        {select}
    """
    rows, new, *bad_keys = (
        int(v or 0) for v in conn.execute(sa.text(sql), _event_params(state, model)).one()
    )
    acknowledged = conn.execute(
        sa.text(
            f"SELECT COUNT(*) FROM {state.sent_events} AS e"
            f" WHERE e.workspace = :workspace AND e.model = :model{in_bucket(state.dialect, 'e.key', bucket)}"
        ),
        state.scope(model.name),
    ).scalar_one()
    return ChangeCounts(rows, int(acknowledged or 0), new, 0, 0, *bad_keys)


def _before_lookback(warehouse: Warehouse, model: Model) -> str:
    """Event keys older than the lookback: rows no run reads any more."""
    assert model.timestamp
    d = warehouse.dialect
    column = f"m.{d.quote(model.timestamp)}"
    return (
        f"SELECT {d.key_expression(model, 'm')} AS k FROM ({model_sql(model)}) AS m"
        f" WHERE {column} < :cutoff"
    )


# -- people a suppression model holds --------------------------------------------------------


def suppressed_sql(warehouse: Warehouse, key: str, suppressions: Sequence[Model]) -> str:
    """SQL true when the person key text ``key`` is a row of one of ``suppressions``."""
    d = warehouse.dialect
    return " OR ".join(
        f"EXISTS (SELECT 1 FROM ({model_sql(s)}) AS sup WHERE {d.key_expression(s, 'sup')} = {key})"
        for s in suppressions
    )


def _without_suppressed(warehouse: Warehouse, rows: str, suppressions: Sequence[Model]) -> str:
    """``rows`` (with KEY_COLUMN) but the people a suppression model holds."""
    if not suppressions:
        return rows
    held = suppressed_sql(warehouse, f"r.{KEY_COLUMN}", suppressions)
    return f"SELECT * FROM ({rows}) AS r WHERE NOT ({held})"


def count_suppressed(
    conn: Connection,
    warehouse: Warehouse,
    model: Model,
    suppressions: Sequence[Model],
    bucket: Bucket | None = None,
) -> int:
    """Rows of a person model that no run identifies: suppression models hold them."""
    if not suppressions:
        return 0
    d = warehouse.dialect
    key = d.key_expression(model, "m")
    sql = (
        f"SELECT COUNT(*) FROM ({model_sql(model)}) AS m"
        f" WHERE ({suppressed_sql(warehouse, key, suppressions)}){in_bucket(d, key, bucket)}"
    )
    return int(conn.execute(sa.text(sql)).scalar_one() or 0)


def suppressions_for(model: Model, suppressions: Sequence[Model]) -> list[Model]:
    """The suppression models that keep ``model``'s people from being identified: a person
    model's, of the same identifier type."""
    if model.kind is not Kind.PERSON:
        return []
    return [
        s for s in suppressions if s.kind is Kind.SUPPRESSION and s.identifier == model.identifier
    ]


# -- the two diff forms -------------------------------------------------------------------


class Differ(Protocol):
    """What a run asks of the diff, whichever database does the comparing."""

    def count(self, model: Model, *, keys: bool = False) -> ChangeCounts: ...

    def key_rejections(self, model: Model, limit: int) -> list[RowChange]:
        """The first ``limit`` rows the upserts would reject for a NULL or shared key."""
        ...

    def upserts(self, model: Model, *, full_resync: bool = False) -> Generator[RowChange]: ...

    def real_updates(self, model: Model) -> int:
        """Rows whose normalized attributes changed (an upper bound's true count: a moved
        fingerprint may change nothing); read only when a guardrail trips."""
        ...

    def removals(self, model: Model, *, delete: bool) -> Generator[RowChange]: ...

    def skipped(self, model: Model) -> int:
        """Rows of a person model that suppression models hold (never identified)."""
        ...

    def unsent_before_lookback(self, model: Model) -> int:
        """Rows of an event model older than its lookback that were never sent."""
        ...

    def close(self) -> None: ...


def differ_for(
    warehouse: Warehouse,
    state: StateStore,
    *,
    same_database: bool,
    bucket: Bucket | None = None,
    suppressions: Sequence[Model] = (),
    read_only: bool = False,
) -> Differ:
    """Push the diff down when one database holds both; otherwise stage keys in the state.

    With a ``bucket``, every query of the diff (model rows and snapshot rows alike) keeps
    only the keys of that bucket, so a run plans and sends one bucket of each model.
    ``suppressions`` are every suppression model (selected for the run or not): the people
    they hold are left out of person models' upserts. A ``read_only`` diff (a dry run)
    writes to no table of either database.
    """
    if same_database:
        return PushDownDiff(warehouse, state, bucket, suppressions)
    return CrossDatabaseDiff(warehouse, state, bucket, suppressions, read_only=read_only)


def _begin_diff(conn: Connection, dialect: Dialect, bucket: Bucket | None) -> None:
    """Give ``conn``'s transaction its dialect's planner settings for a diff."""
    for statement in dialect.diff_session + (dialect.bucket_session if bucket else ()):
        conn.execute(sa.text(statement))


@contextmanager
def diff_connection(db: Warehouse | StateStore, bucket: Bucket | None) -> Iterator[Connection]:
    """A connection to ``db`` whose transaction carries its dialect's planner settings for a
    diff."""
    with db.engine.connect() as conn:
        _begin_diff(conn, db.dialect, bucket)
        yield conn


class _Differ:
    """What both diff forms share: the suppression models, and counts in the warehouse."""

    def __init__(
        self,
        warehouse: Warehouse,
        state: StateStore,
        bucket: Bucket | None = None,
        suppressions: Sequence[Model] = (),
    ) -> None:
        self.warehouse = warehouse
        self.state = state
        self.bucket = bucket
        self.suppressions = tuple(suppressions)

    def upserts(self, model: Model, *, full_resync: bool = False) -> Generator[RowChange]:
        raise NotImplementedError

    def real_updates(self, model: Model) -> int:
        changes = self.upserts(model)
        with closing(changes):
            return sum(1 for change in changes if change.change is Change.UPDATE)

    def skipped(self, model: Model) -> int:
        held = suppressions_for(model, self.suppressions)
        if not held:
            return 0
        with diff_connection(self.warehouse, self.bucket) as conn:
            return count_suppressed(conn, self.warehouse, model, held, self.bucket)

    def key_rejections(self, model: Model, limit: int) -> list[RowChange]:
        """Examples for a plan whose counts found bad keys, read without the changeset: the
        rows the upserts would reject first for a NULL or shared key, with their reasons
        (events: only rows not sent yet). Only the warehouse is queried, both diff forms."""
        bad = f"r.{KEY_COLUMN} IS NULL OR r.{DUPLICATES_COLUMN} > 1"
        if model.kind is Kind.EVENT:
            rows = _event_rows(self.warehouse, model, self.bucket)
            params: dict[str, Any] = {"cutoff": lookback_cutoff(model)}
        else:
            held = suppressions_for(model, self.suppressions)
            rows, params = _model_rows(self.warehouse, model, self.bucket, held), {}
        found: list[RowChange] = []
        with diff_connection(self.warehouse, self.bucket) as conn:
            for chunk in self.warehouse.stream(
                conn, f"SELECT * FROM ({rows}) AS r WHERE {bad}", params
            ):
                if not chunk.rows:
                    continue
                columns = RowReader(chunk.rows[0]._fields, chunk.json_columns)
                if model.kind is Kind.EVENT:
                    keys = [row[columns.index[KEY_COLUMN]] for row in chunk.rows]
                    sent = self.state.sent_event_keys(
                        model.name, [k for k in keys if k is not None]
                    )
                    changes = [_event_change(model, columns, row) for row in chunk.rows]
                    found += [c for c in changes if c.key not in sent]
                else:
                    found += [
                        upsert_change(model, columns, row, None, full_resync=False)
                        for row in chunk.rows
                    ]
                if len(found) >= limit:
                    break
        return found[:limit]


class PushDownDiff(_Differ):
    """Warehouse and state in one database: every comparison is one SQL statement there."""

    def count(self, model: Model, *, keys: bool = False) -> ChangeCounts:
        with diff_connection(self.warehouse, self.bucket) as conn:
            if model.kind is Kind.EVENT:
                return count_events(conn, self.warehouse, self.state, model, self.bucket, keys=keys)
            return count_changes(conn, self.warehouse, self.state, model, self.bucket, keys=keys)

    def upserts(self, model: Model, *, full_resync: bool = False) -> Generator[RowChange]:
        with diff_connection(self.warehouse, self.bucket) as conn:
            if model.kind is Kind.EVENT:  # --full-resync never resends an event
                yield from diff_events(conn, self.warehouse, self.state, model, self.bucket)
                return
            yield from diff_upserts(
                conn,
                self.warehouse,
                self.state,
                model,
                full_resync=full_resync,
                bucket=self.bucket,
                suppressions=suppressions_for(model, self.suppressions),
            )

    def unsent_before_lookback(self, model: Model) -> int:
        if model.lookback_days is None:
            return 0
        sql = f"""
            SELECT COUNT(*) FROM ({_before_lookback(self.warehouse, model)}) AS old
            WHERE NOT EXISTS (
                SELECT 1 FROM {self.state.sent_events} AS e
                WHERE e.workspace = :workspace AND e.model = :model AND e.key = old.k
            ){in_bucket(self.warehouse.dialect, "old.k", self.bucket)}
        """
        with diff_connection(self.warehouse, self.bucket) as conn:
            return int(
                conn.execute(sa.text(sql), _event_params(self.state, model)).scalar_one() or 0
            )

    def removals(self, model: Model, *, delete: bool) -> Generator[RowChange]:
        with diff_connection(self.warehouse, self.bucket) as conn:
            yield from diff_removals(
                conn, self.warehouse, self.state, model, delete=delete, bucket=self.bucket
            )

    def close(self) -> None:
        pass


class CrossDatabaseDiff(_Differ):
    """Warehouse and state in different databases, with memory flat in the model size.

    Counting streams each model row's (key, fingerprint) from the warehouse into the state
    store's ``staged_keys`` in chunks, then counts there with the same SQL as the push-down
    form; removed keys are an anti-join there too. Upserts stream the warehouse rows and
    look up each chunk's snapshot rows by key. Python never holds more than one chunk.

    A ``read_only`` diff (a dry run) stages into a temporary table of a state connection
    of its own instead, and runs its state queries there: it writes no table of the state
    database, and the table ends with the connection.
    """

    STAGE_ROWS = 20_000

    def __init__(
        self,
        warehouse: Warehouse,
        state: StateStore,
        bucket: Bucket | None = None,
        suppressions: Sequence[Model] = (),
        *,
        read_only: bool = False,
    ) -> None:
        super().__init__(warehouse, state, bucket, suppressions)
        self.token = uuid.uuid4().hex
        self.read_only = read_only
        self._staged: set[str] = set()
        self._session: Connection | None = None  # a read-only diff's own state connection
        self._staging = state.staged_keys  # where the keys are staged (a name for text SQL)

    def _own_session(self) -> Connection:
        if self._session is None:
            self._session = self.state.engine.connect()
            self._staging = self.state.create_session_staging(self._session)
            self._session.commit()
        return self._session

    @contextmanager
    def _on_state(self) -> Iterator[Connection]:
        """A state connection for the diff's queries (planner settings applied): a pooled
        one, or a read-only diff's own, which holds its staging table."""
        if not self.read_only:
            with diff_connection(self.state, self.bucket) as conn:
                yield conn
            return
        conn = self._own_session()
        try:
            _begin_diff(conn, self.state.dialect, self.bucket)
            yield conn
        finally:
            conn.rollback()  # a read: nothing to keep (the staged rows are committed)

    @contextmanager
    def _staging_transaction(self) -> Iterator[Connection]:
        if not self.read_only:
            with self.state.engine.begin() as conn:
                yield conn
            return
        conn = self._own_session()
        yield conn
        conn.commit()

    def _unsent_keys(self, model: Model, sql: str) -> Iterator[tuple[Chunk, set[str]]]:
        """Chunks of an event query's rows and which of their keys were sent (looked up in
        the state store, one chunk at a time)."""
        with diff_connection(self.warehouse, self.bucket) as conn:
            for chunk in self.warehouse.stream(conn, sql, _event_params(self.state, model)):
                keys = [row._mapping[KEY_COLUMN] for row in chunk.rows]
                sent = self.state.sent_event_keys(model.name, [k for k in keys if k is not None])
                yield chunk, sent

    def _events_sql(self, model: Model, *, old: bool = False) -> str:
        if old:
            sql = f"SELECT k AS {KEY_COLUMN} FROM ({_before_lookback(self.warehouse, model)}) AS o"
            if self.bucket is None:
                return sql
            return f"{sql} WHERE TRUE{in_bucket(self.warehouse.dialect, 'o.k', self.bucket)}"
        return _event_rows(self.warehouse, model, self.bucket)

    def _count_events(self, model: Model) -> ChangeCounts:
        rows = new = null_keys = duplicate_keys = 0
        for chunk, sent in self._unsent_keys(model, self._events_sql(model)):
            rows += len(chunk.rows)
            for row in chunk.rows:
                key = row._mapping[KEY_COLUMN]
                if key not in sent:
                    new += 1
                    null_keys += key is None
                    duplicate_keys += key is not None and row._mapping[DUPLICATES_COLUMN] > 1
        acknowledged = (
            self.state.event_summary(model.name)[0] if self.bucket is None else rows - new
        )
        return ChangeCounts(rows, acknowledged, new, 0, 0, null_keys, duplicate_keys)

    def unsent_before_lookback(self, model: Model) -> int:
        if model.lookback_days is None:
            return 0
        return sum(
            sum(1 for row in chunk.rows if row._mapping[KEY_COLUMN] not in sent)
            for chunk, sent in self._unsent_keys(model, self._events_sql(model, old=True))
        )

    def _stage(self, model: Model) -> None:
        if model.name in self._staged:
            return
        if not self.read_only:
            self.state.unstage_keys(self.token, model.name)
        sql = _keys_and_fingerprints(self.warehouse, model, self.bucket)
        with diff_connection(self.warehouse, self.bucket) as conn:
            for chunk in self.warehouse.stream(conn, sql, rows=self.STAGE_ROWS):
                with self._staging_transaction() as state_conn:
                    self.state.stage_keys(
                        state_conn,
                        self.token,
                        model.name,
                        [(k, f) for k, f in chunk.rows],
                        into=self._staging,
                    )
        self._staged.add(model.name)

    def count(self, model: Model, *, keys: bool = False) -> ChangeCounts:
        if model.kind is Kind.EVENT:  # streamed here anyway: the key counts cost nothing
            return self._count_events(model)
        self._stage(model)
        sql = f"""
            WITH src AS (
                SELECT x.key AS k, x.fingerprint AS f FROM {self._staging} AS x
                WHERE x.token = :token AND x.model = :model
            ), snap AS (
                SELECT s.key, s.fingerprint FROM {self.state.snapshots} AS s
                WHERE s.workspace = :workspace AND s.model = :model{in_bucket(self.state.dialect, "s.key", self.bucket)}
            )
            {_counts(keys=keys)}
        """
        with self._on_state() as conn:
            params = {"token": self.token, **self.state.scope(model.name)}
            row = conn.execute(sa.text(sql), params).one()
        return ChangeCounts(*(int(v or 0) for v in row))

    def upserts(self, model: Model, *, full_resync: bool = False) -> Generator[RowChange]:
        if model.kind is Kind.EVENT:  # --full-resync never resends an event
            for chunk, sent in self._unsent_keys(model, self._events_sql(model)):
                if not chunk.rows:
                    continue
                reader = RowReader(chunk.rows[0]._fields, chunk.json_columns)
                for row in chunk.rows:
                    if row._mapping[KEY_COLUMN] not in sent:
                        yield _event_change(model, reader, row)
            return
        with diff_connection(self.warehouse, self.bucket) as conn:
            rows = _model_rows(
                self.warehouse, model, self.bucket, suppressions_for(model, self.suppressions)
            )
            for chunk in self.warehouse.stream(conn, rows):
                pairs = [
                    (row._mapping[KEY_COLUMN], row._mapping[FINGERPRINT_COLUMN])
                    for row in chunk.rows
                ]
                previous = self.state.lookup_snapshots(
                    model.name, [(k, f) for k, f in pairs if k is not None], everything=full_resync
                )
                columns = (
                    RowReader(chunk.rows[0]._fields, chunk.json_columns) if chunk.rows else None
                )
                for row, (key, fingerprint) in zip(chunk.rows, pairs, strict=True):
                    if key in previous and not full_resync:
                        acked_fingerprint, _ = previous[key]
                        if (
                            acked_fingerprint == fingerprint
                            and row._mapping[DUPLICATES_COLUMN] == 1
                        ):
                            continue  # unchanged since Customer.io acknowledged it
                    assert columns is not None
                    yield upsert_change(
                        model,
                        columns,
                        row,
                        previous[key][1] if key in previous else None,
                        full_resync=full_resync,
                    )

    def removals(self, model: Model, *, delete: bool) -> Generator[RowChange]:
        self._stage(model)
        sql = f"""
            SELECT s.key, s.identifiers FROM {self.state.snapshots} AS s
            WHERE s.workspace = :workspace AND s.model = :model{in_bucket(self.state.dialect, "s.key", self.bucket)} AND NOT EXISTS (
                SELECT 1 FROM {self._staging} AS x
                WHERE x.token = :token AND x.model = :model AND x.key = s.key
            )
        """
        params = {"token": self.token, **self.state.scope(model.name)}
        with self._on_state() as conn:
            result = conn.execution_options(stream_results=True).execute(sa.text(sql), params)
            while rows := result.fetchmany(FETCH_ROWS):
                yield from removal_changes(rows, delete=delete)

    def close(self) -> None:
        if self._session is not None:  # a pooled connection would keep the temporary table
            try:
                self.state.drop_session_staging(self._session)
            finally:
                self._session.close()
        elif self._staged:
            self.state.unstage_keys(self.token)


def _duplicate_key(model: Model, key: str, duplicates: int) -> RowChange:
    """Rows sharing a key are all held back: sending any one would be a guess."""
    return RowChange(
        Change.REJECT,
        key,
        rejection=Rejection(
            RejectionCode.DUPLICATE_KEY,
            f"{duplicates} rows share this key; none of them is sent",
            ",".join(model.key_columns),
        ),
    )
