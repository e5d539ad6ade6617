"""Which rows changed since Customer.io last acknowledged them, and which attributes.

The comparison runs as SQL inside the database that holds both the model and the snapshot:
each model row gets a fingerprint (a digest of all its columns) and a left join with the
snapshot keeps only rows that are new, whose fingerprint moved, or whose key is duplicated.
Only those rows travel to Python, where they are normalized and compared attribute by
attribute with the acknowledged attributes, so a changed row sends only what changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cio_retl.errors import Rejection
from cio_retl.models import Model
from cio_retl.normalize import Attributes, Record, canonical_json, to_record
from cio_retl.state import StateStore
from cio_retl.warehouse import (
    DUPLICATES_COLUMN,
    FINGERPRINT_COLUMN,
    INTERNAL_COLUMNS,
    KEY_COLUMN,
    PREVIOUS_COLUMN,
    Warehouse,
)

REMOVED = ""  # the API's form for "remove this attribute" (spec: send an empty string)


class Change(StrEnum):
    CREATE = "create"  # not in the snapshot: send every attribute
    UPDATE = "update"  # in the snapshot with other values: send the changed ones
    REFRESH = "refresh"  # SQL row changed, normalized values did not: update the fingerprint
    DELETE = "delete"  # left the model: delete (mirror) or delete the relationship
    FORGET = "forget"  # left an upsert model: drop it from the snapshot, send nothing
    REJECT = "reject"  # cannot be sent; recorded with the reason


@dataclass(frozen=True, slots=True)
class RowChange:
    change: Change
    key: str | None
    fingerprint: str | None = None
    record: Record | None = None
    send: Attributes | None = None  # the attributes to send (changed ones, "" to remove)
    identifiers: dict[str, Any] | None = None  # for deletes: from the snapshot
    rejection: Rejection | None = None


def diff_upserts(
    conn: Connection,
    warehouse: Warehouse,
    state: StateStore,
    model: Model,
    *,
    full_resync: bool = False,
) -> Iterator[RowChange]:
    """Rows to create or update (and rows to reject), streamed in chunks."""
    d = warehouse.dialect
    changed = (
        ""
        if full_resync
        else (
            f"WHERE s.key IS NULL OR s.fingerprint <> c.{FINGERPRINT_COLUMN} OR c.{DUPLICATES_COLUMN} > 1"
        )
    )
    sql = f"""
        WITH src AS (
            SELECT {d.key_expression(model, "m")} AS {KEY_COLUMN},
                   {d.row_fingerprint("m")} AS {FINGERPRINT_COLUMN}, m.*
            FROM ({model.sql}) AS m
        ), c AS (
            SELECT src.*, COUNT(*) OVER (PARTITION BY src.{KEY_COLUMN}) AS {DUPLICATES_COLUMN}
            FROM src
        )
        SELECT c.*, s.attributes AS {PREVIOUS_COLUMN}
        FROM c LEFT JOIN {state.snapshots} AS s
          ON s.model = :model AND s.key = c.{KEY_COLUMN}
        {changed}
    """
    for chunk in warehouse.stream(conn, sql, {"model": model.name}):
        for row in chunk:
            yield _upsert_change(model, row._mapping, full_resync=full_resync)


def _upsert_change(model: Model, row: Any, *, full_resync: bool) -> RowChange:
    key = row[KEY_COLUMN]
    fingerprint = row[FINGERPRINT_COLUMN]
    if key is None:
        return RowChange(
            Change.REJECT, None, rejection=Rejection("key is NULL", model.key_columns[0])
        )
    if row[DUPLICATES_COLUMN] > 1:
        return RowChange(
            Change.REJECT,
            key,
            rejection=Rejection(
                f"{row[DUPLICATES_COLUMN]} rows share this key; none of them is sent",
                ",".join(model.key_columns),
            ),
        )
    values = {k: v for k, v in row.items() if k not in INTERNAL_COLUMNS}
    record = to_record(model, key, values)
    if isinstance(record, Rejection):
        return RowChange(Change.REJECT, key, rejection=record)
    previous_json = row[PREVIOUS_COLUMN]
    if previous_json is None:
        return RowChange(Change.CREATE, key, fingerprint, record, send=dict(record.attributes))
    previous: Attributes = orjson.loads(previous_json)
    send = changed_attributes(previous, record.attributes)
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
    conn: Connection, warehouse: Warehouse, state: StateStore, model: Model, *, delete: bool
) -> Iterator[RowChange]:
    """Snapshot rows whose key left the model: to delete, or only to forget."""
    d = warehouse.dialect
    sql = f"""
        SELECT s.key, s.identifiers FROM {state.snapshots} AS s
        WHERE s.model = :model AND NOT EXISTS (
            SELECT 1 FROM ({model.sql}) AS m WHERE {d.key_expression(model, "m")} = s.key
        )
    """
    for chunk in warehouse.stream(conn, sql, {"model": model.name}):
        for key, identifiers in chunk:
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

    @property
    def has_upserts(self) -> bool:
        return self.new + self.changed > 0


def count_changes(
    conn: Connection, warehouse: Warehouse, state: StateStore, model: Model
) -> ChangeCounts:
    """One pass over the model joined with its snapshot; portable SQL (no FILTER clause)."""
    d = warehouse.dialect
    sql = f"""
        WITH src AS (
            SELECT {d.key_expression(model, "m")} AS k, {d.row_fingerprint("m")} AS f
            FROM ({model.sql}) AS m
        ), snap AS (
            SELECT s.key, s.fingerprint FROM {state.snapshots} AS s WHERE s.model = :model
        )
        SELECT
            COUNT(src.f),
            COUNT(snap.key),
            SUM(CASE WHEN src.f IS NOT NULL AND snap.key IS NULL THEN 1 ELSE 0 END),
            SUM(CASE WHEN src.f IS NOT NULL AND snap.fingerprint <> src.f THEN 1 ELSE 0 END),
            SUM(CASE WHEN src.f IS NULL THEN 1 ELSE 0 END)
        FROM src FULL OUTER JOIN snap ON snap.key = src.k
    """
    row = conn.execute(sa.text(sql), {"model": model.name}).one()
    return ChangeCounts(*(int(v or 0) for v in row))
