"""Row changes as ``/api/v2/batch`` items, one item per row so every answer maps to one row.

Shapes follow ../shared/spec/customerio-track-api.md. The order of a run's changeset is
fixed here too (:data:`PHASES`): what a relationship names must exist before it, and
deletes come last.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

from cio_retl.diff import Change, RowChange
from cio_retl.errors import Rejection
from cio_retl.limits import check_attributes, check_item_size
from cio_retl.models import Kind, Model


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


@dataclass(frozen=True, slots=True)
class Operation:
    """An encoded item and the row change it carries; acknowledged or rejected as one."""

    change: RowChange
    item: bytes

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
    # Identifiers always travel in the attributes too (RudderStack's mappedToDestination).
    attributes = {**change.send, **{record.external_id["identifierType"]: record.external_id["id"]}}
    return {
        "type": model.kind.value,
        "action": "identify",
        "identifiers": record.identifiers,
        "attributes": attributes,
    }


def encode(model: Model, change: RowChange) -> Operation | Rejection:
    """Build, check against every API limit, and serialize; a row over a limit is rejected."""
    if change.record is not None:
        rejection = check_attributes(change.record.attributes, is_person=model.kind is Kind.PERSON)
        if rejection:
            return rejection
    item = orjson.dumps(build_item(model, change))
    return check_item_size(item) or Operation(change, item)


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
