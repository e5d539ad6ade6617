"""Values as Customer.io should see them, and a hash that is the same on every run.

Normalization happens before hashing *and* before sending, so what we compare is exactly
what we send. Rules (DESIGN.md): timestamps and dates become Unix seconds, decimals become
JSON numbers, booleans stay booleans, nested values stay nested, NaN becomes NULL, bytes are
rejected. NULL attributes are dropped from the normalized row: an attribute that is absent
now but was present in the snapshot is the API's "remove" case.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeAlias

import orjson

from cio_retl.errors import Rejection
from cio_retl.limits import check_identifier
from cio_retl.models import Kind, Model

Attributes: TypeAlias = dict[str, Any]

# JSON numbers beyond this lose precision in JavaScript consumers; integral floats below it
# become ints so that 1.0 (DuckDB DOUBLE) and 1 (Snowflake NUMBER) hash alike.
_EXACT_FLOAT_INT = 2**53


class UnsupportedValue(ValueError):
    """A value that has no faithful JSON form (bytes, infinity); rejects its row."""


def normalize_value(value: Any) -> Any:
    """Map a database value to its JSON form, or raise :class:`UnsupportedValue`."""
    # The common types first: this runs once per changed cell.
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        # Beyond 2^53 a JSON number is rounded by JavaScript consumers (segments, Liquid):
        # such integers (HUGEINT, NUMBER(38) ids) travel as exact decimal strings.
        return value if -_EXACT_FLOAT_INT < value < _EXACT_FLOAT_INT else str(value)
    if isinstance(value, float):
        return _normalize_float(value)
    if isinstance(value, Decimal):
        if value.is_nan():
            return None
        if value.is_infinite():
            raise UnsupportedValue("infinite decimal has no JSON form")
        if value == value.to_integral_value():
            return int(value)
        return float(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # naive timestamps are taken as UTC, as warehouses store them
            return calendar.timegm(value.timetuple())
        return calendar.timegm(value.utctimetuple())
    if isinstance(value, dt.date):
        return calendar.timegm(value.timetuple())
    if isinstance(value, dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _normalize_float(value.total_seconds())
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raise UnsupportedValue("binary values cannot be sent to Customer.io")
    if isinstance(value, Mapping):
        return {str(k): normalize_value(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [normalize_value(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((normalize_value(v) for v in value), key=orjson.dumps)
    item = getattr(value, "item", None)  # numpy scalars from some drivers
    if callable(item):
        return normalize_value(item())
    raise UnsupportedValue(f"unsupported value type {type(value).__name__}")


def _normalize_float(value: float) -> float | int | None:
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise UnsupportedValue("infinite number has no JSON form")
    if value.is_integer() and abs(value) < _EXACT_FLOAT_INT:
        return int(value)
    return value


def normalize_attributes(row: Mapping[str, Any]) -> Attributes:
    """Normalize every column of a row, dropping NULLs; raises on the first bad value."""
    attributes: Attributes = {}
    for name, raw in row.items():
        try:
            value = normalize_value(raw)
        except UnsupportedValue as exc:
            raise UnsupportedValue(f"column {name!r}: {exc}") from None
        if value is not None:
            attributes[name] = value
    return attributes


def canonical_json(value: Any) -> bytes:
    """Compact JSON with sorted keys: the form that is hashed and stored."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def attributes_hash(attributes: Attributes) -> str:
    """A 128-bit digest of the canonical JSON; stable across runs, platforms and versions."""
    return hashlib.blake2b(canonical_json(attributes), digest_size=16).hexdigest()


# -- rows to records ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One model row as Customer.io will see it, keyed as the snapshot keys it.

    ``external_id`` follows RudderStack's ``mappedToDestination`` convention
    (``{"type": "CUSTOMERIO-person", "identifierType": "email", "id": ...}``); the identifier
    goes into ``identifiers`` and into ``attributes`` alike. For a relationship
    ``identifiers`` holds both sides: ``{"person": {...}, "object": {...}}``.
    """

    key: str
    external_id: dict[str, Any]
    identifiers: dict[str, Any]
    attributes: Attributes

    @property
    def attrs_hash(self) -> str:
        return attributes_hash(self.attributes)


def to_record(model: Model, key: str, row: Mapping[str, Any]) -> Record | Rejection:
    """Build the record of one row, or say why the row cannot be sent."""
    try:
        if model.kind is Kind.RELATIONSHIP:
            assert model.person_identifier and model.person_key and model.object_key
            person_id = _identifier_value(model.person_identifier, row[model.person_key])
            object_id = _identifier_value("object_id", row[model.object_key])
            rejection = check_identifier(model.person_identifier, person_id) or check_identifier(
                "object_id", object_id
            )
            if rejection:
                return rejection
            object_ident = {"object_type_id": model.object_type_id, "object_id": object_id}
            attributes = normalize_attributes(
                {c: v for c, v in row.items() if c not in (model.person_key, model.object_key)}
            )
            return Record(
                key=key,
                external_id={
                    "type": model.external_id_type,
                    "identifierType": model.person_identifier,
                    "id": person_id,
                },
                identifiers={
                    "person": {model.person_identifier: person_id},
                    "object": object_ident,
                },
                attributes=attributes,
            )
        assert model.key
        id_type = model.identifier if model.kind is Kind.PERSON else "object_id"
        assert id_type
        value = _identifier_value(id_type, row[model.key])
        rejection = check_identifier(id_type, value)
        if rejection:
            return rejection
        attributes = normalize_attributes({c: v for c, v in row.items() if c != model.key})
        attributes[id_type] = value
        identifiers: dict[str, Any] = (
            {id_type: value}
            if model.kind is Kind.PERSON
            else {"object_type_id": model.object_type_id, "object_id": value}
        )
        return Record(
            key=key,
            external_id={"type": model.external_id_type, "identifierType": id_type, "id": value},
            identifiers=identifiers,
            attributes=attributes,
        )
    except UnsupportedValue as exc:
        return Rejection(str(exc), "attributes")


def _identifier_value(id_type: str, raw: Any) -> Any:
    """Person ``id`` keeps its JSON type (as RudderStack does); every other identifier is text."""
    try:
        value = normalize_value(raw)
    except UnsupportedValue as exc:
        raise UnsupportedValue(f"identifier {id_type}: {exc}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return value if id_type == "id" else str(value)
    return value  # str, or anything else for check_identifier to reject with its type
