"""Row changes as ``/api/v2/batch`` items, one item per row so every answer maps to one row.

Shapes follow the Track API's item schemas (Customer.io Track API OpenAPI 1.0.0,
``Trackv2SendMultipleRequestsRequest``); every identifier value is a JSON string. The order
of a run's changeset is fixed here too (:class:`Phase`): what a relationship names must
exist before it, and deletes come last.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple

import orjson

from cio_retl.limits import check_attributes, check_item_size
from cio_retl.models import Kind, Model
from cio_retl.normalize import canonical_json, text_identifiers
from cio_retl.records import Change, Event, Rejection, RowChange


class Phase(IntEnum):
    """The order of one run's changeset, across every kind of model.

    Unsuppressions first, so a person who was unsuppressed can be identified again in the
    same run; what a relationship or an event names exists before it; suppressions after
    everything that may still be sent to the person; deletes last.
    """

    UNSUPPRESS = 1
    OBJECT_IDENTIFY = 2
    PERSON_IDENTIFY = 3
    DEVICE_ADD = 4
    RELATIONSHIP_ADD = 5
    RELATIONSHIP_DELETE = 6
    EVENT = 7
    SUPPRESS = 8
    DELETE = 9  # people and objects (mirror mode) and devices


_PHASES: dict[Kind, tuple[Phase, Phase | None]] = {
    Kind.OBJECT: (Phase.OBJECT_IDENTIFY, Phase.DELETE),
    Kind.PERSON: (Phase.PERSON_IDENTIFY, Phase.DELETE),
    Kind.RELATIONSHIP: (Phase.RELATIONSHIP_ADD, Phase.RELATIONSHIP_DELETE),
    Kind.DEVICE: (Phase.DEVICE_ADD, Phase.DELETE),
    Kind.EVENT: (Phase.EVENT, None),  # append-only: nothing is ever removed
    Kind.SUPPRESSION: (Phase.SUPPRESS, Phase.UNSUPPRESS),
}


def phases_of(model: Model) -> tuple[Phase, Phase | None]:
    """The (upsert, removal) phases a model takes part in; None: it removes nothing."""
    return _PHASES[model.kind]


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
    if change.event is not None:
        return event_item(change.event)
    if change.change is Change.DELETE:
        assert change.identifiers is not None
        # From the snapshot, which a version that sent integer ids as numbers may have written.
        identifiers = text_identifiers(change.identifiers)
        if model.kind is Kind.SUPPRESSION:
            return {"type": "person", "action": "unsuppress", "identifiers": identifiers}
        if model.kind is Kind.DEVICE:
            return {
                "type": "person",
                "action": "delete_device",
                "identifiers": identifiers["person"],
                "device": {"token": identifiers["token"]},
            }
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
    if model.kind is Kind.SUPPRESSION:
        return {"type": "person", "action": "suppress", "identifiers": record.identifiers}
    if model.kind is Kind.DEVICE:
        # add_device replaces the device: a changed row sends every field, not the changed.
        return {
            "type": "person",
            "action": "add_device",
            "identifiers": record.identifiers["person"],
            "device": record.attributes,
        }
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
    # changed, and the identifier attribute, unchanged since Customer.io
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


def event_item(event: Event) -> dict[str, Any]:
    """Track API OpenAPI 1.0.0, PersonEvent: name, the deterministic ULID id, the
    timestamp as Unix seconds, the event's data as its attributes."""
    item: dict[str, Any] = {
        "type": "person",
        "action": "event",
        "identifiers": event.identifiers,
        "id": event.id,
        "name": event.name,
        "timestamp": event.timestamp,
    }
    if event.data:
        item["attributes"] = event.data
    return item


def encode(model: Model, change: RowChange) -> Operation | Rejection:
    """Build, check against every API limit, and serialize; a row over a limit is rejected.

    Person and object identifies (nearly every item of a sync) are assembled from their
    serialized parts, the same JSON :func:`build_item` describes: a created row's item
    embeds the canonical attributes the snapshot will store, so they are encoded once.
    """
    record = change.record
    if record is None:  # deletes and events
        item = orjson.dumps(build_item(model, change))
        return check_item_size(item) or Operation(change, item)
    attributes = canonical_json(record.attributes)
    checked = (
        record.attributes.get("attributes", {}) if model.kind is Kind.DEVICE else record.attributes
    )
    rejection = check_attributes(checked, serialized_size=len(attributes))
    if rejection:
        return rejection
    head = _IDENTIFY_HEAD.get(model.kind)
    if head is None:  # relationships, suppressions, devices
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

    for section in ("attributes", "device"):  # a device's token is a secret of the person
        if section in data:
            data[section] = shape(data[section])
    for relationship in data.get("cio_relationships", []):
        if "relationship_attributes" in relationship:
            relationship["relationship_attributes"] = shape(relationship["relationship_attributes"])
    return orjson.dumps(data).decode()
