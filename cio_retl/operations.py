"""Row changes as ``/api/v2/batch`` items, one item per row so every answer maps to one row.

Shapes follow ../shared/spec/customerio-track-api.md. The order of a run's changeset is
fixed here too (:data:`PHASES`): what a relationship names must exist before it, and
deletes come last.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple

import orjson

from cio_retl.diff import Change, RowChange
from cio_retl.errors import Rejection
from cio_retl.limits import check_attributes, check_item_size
from cio_retl.models import Kind, Model
from cio_retl.normalize import canonical_json


class Phase(IntEnum):
    """The order of one run: object identifies, person identifies, relationship adds,
    relationship deletes, then deletes of people and objects (mirror mode)."""

    OBJECT_IDENTIFY = 1
    PERSON_IDENTIFY = 2
    RELATIONSHIP_ADD = 3
    RELATIONSHIP_DELETE = 4
    DELETE = 5


def phases_of(model: Model) -> tuple[Phase, Phase]:
    """The (upsert, removal) phases a model takes part in."""
    if model.kind is Kind.OBJECT:
        return Phase.OBJECT_IDENTIFY, Phase.DELETE
    if model.kind is Kind.PERSON:
        return Phase.PERSON_IDENTIFY, Phase.DELETE
    return Phase.RELATIONSHIP_ADD, Phase.RELATIONSHIP_DELETE


class Operation(NamedTuple):
    """An encoded item and the row change it carries; acknowledged or rejected as one.

    ``attributes`` is the canonical JSON of the record's attributes (None for deletes): the
    item embeds the same bytes when it sends the whole record, and the snapshot stores them
    once acknowledged, so a row is serialized once however many places need it.

    A NamedTuple, not a frozen dataclass: one is built per changed row, and a frozen
    dataclass's __init__ (one object.__setattr__ per field) was the largest single item of
    a 100k-row sync's profile (py-spy --gil: 0.9 s of ~5.8 s, with the other per-row
    records); a NamedTuple is as immutable and builds in C.
    """

    change: RowChange
    item: bytes
    attributes: bytes | None = None

    @property
    def key(self) -> str:
        assert self.change.key is not None
        return self.change.key


def build_item(model: Model, change: RowChange) -> dict[str, Any]:
    """The batch item for one row change (never for REFRESH, FORGET or REJECT)."""
    if change.change is Change.DELETE:
        identifiers = change.identifiers
        assert identifiers is not None
        if model.kind is Kind.RELATIONSHIP:
            return {
                "type": "person",
                "action": "delete_relationships",
                "identifiers": identifiers["person"],
                "cio_relationships": [{"identifiers": identifiers["object"]}],
            }
        return {"type": model.kind.value, "action": "delete", "identifiers": identifiers}

    record = change.record
    assert record is not None and change.send is not None
    if model.kind is Kind.RELATIONSHIP:
        relationship: dict[str, Any] = {"identifiers": record.identifiers["object"]}
        if change.send:
            relationship["relationship_attributes"] = change.send
        return {
            "type": "person",
            "action": "add_relationships",
            "identifiers": record.identifiers["person"],
            "cio_relationships": [relationship],
        }
    # The record's attributes hold the identifier too (RudderStack's mappedToDestination), so
    # a created row, or a full resync, sends it in the attributes; an update sends only what
    # changed (DESIGN.md), and the identifier attribute, unchanged since Customer.io
    # acknowledged it, travels in ``identifiers`` alone.
    return {
        "type": model.kind.value,
        "action": "identify",
        "identifiers": record.identifiers,
        "attributes": change.send,
    }


_IDENTIFY_HEAD = {
    kind: b'{"type":"' + kind.value.encode() + b'","action":"identify","identifiers":'
    for kind in (Kind.PERSON, Kind.OBJECT)
}


def encode(model: Model, change: RowChange) -> Operation | Rejection:
    """Build, check against every API limit, and serialize; a row over a limit is rejected.

    Person and object identifies (nearly every item of a sync) are assembled from their
    serialized parts, the same JSON :func:`build_item` describes: a created row's item
    embeds the canonical attributes the snapshot will store, so they are encoded once.
    """
    record = change.record
    if record is None:  # deletes
        item = orjson.dumps(build_item(model, change))
        return check_item_size(item) or Operation(change, item)
    attributes = canonical_json(record.attributes)
    rejection = check_attributes(
        record.attributes, is_person=model.kind is Kind.PERSON, serialized_size=len(attributes)
    )
    if rejection:
        return rejection
    head = _IDENTIFY_HEAD.get(model.kind)
    if head is None:  # relationships
        item = orjson.dumps(build_item(model, change))
    else:
        send = change.send
        assert send is not None
        item = b"".join(
            (
                head,
                orjson.dumps(record.identifiers),
                b',"attributes":',
                attributes if send is record.attributes else orjson.dumps(send),
                b"}",
            )
        )
    return check_item_size(item) or Operation(change, item, attributes)


def redact(item: bytes) -> str:
    """The item with every attribute value replaced by its type: safe to keep in a table."""
    data = orjson.loads(item)

    def shape(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value]
        return f"<{type(value).__name__}>"

    for section in ("attributes",):
        if section in data:
            data[section] = shape(data[section])
    for relationship in data.get("cio_relationships", []):
        if "relationship_attributes" in relationship:
            relationship["relationship_attributes"] = shape(relationship["relationship_attributes"])
    return orjson.dumps(data).decode()
