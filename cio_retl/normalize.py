"""Values as Customer.io should see them, and a hash that is the same on every run.

Normalization happens before hashing *and* before sending, so what we compare is exactly
what we send. Rules: timestamps and dates become Unix seconds, decimals become
JSON numbers, booleans stay booleans, nested values stay nested, NaN becomes NULL, bytes are
rejected. NULL attributes are dropped from the normalized row: an attribute that is absent
now but was present in the snapshot is the API's "remove" case.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Container, Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson

from cio_retl.limits import check_identifier
from cio_retl.models import MAX_EVENT_NAME_BYTES, Kind, Model
from cio_retl.records import Attributes, Event, Record, Rejection, RejectionCode
from cio_retl.ulid import event_ulid

# JSON numbers beyond this lose precision in JavaScript consumers; integral floats below it
# become ints so that 1.0 (DuckDB DOUBLE) and 1 (Snowflake NUMBER) hash alike.
_EXACT_FLOAT_INT = 2**53


class UnsupportedValue(ValueError):
    """A value that has no faithful JSON form (bytes, infinity); rejects its row."""


def normalize_value(value: Any) -> Any:
    """Map a database value to its JSON form, or raise :class:`UnsupportedValue`."""
    # Exact types through one dict lookup (this runs for every changed cell); subclasses and
    # the rarer types fall through to the isinstance chain below.
    convert = _BY_TYPE.get(type(value))
    if convert is not None:
        return convert(value)
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return _normalize_int(value)
    if isinstance(value, float):
        return _normalize_float(value)
    if isinstance(value, Decimal):
        return _normalize_decimal(value)
    if isinstance(value, dt.datetime):
        return _normalize_datetime(value)
    if isinstance(value, dt.date):
        return _normalize_date(value)
    if isinstance(value, dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _normalize_float(value.total_seconds())
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        _refuse_binary(value)
    if isinstance(value, Mapping):
        return _normalize_mapping(value)
    if isinstance(value, Sequence):
        return _normalize_sequence(value)
    if isinstance(value, set | frozenset):
        return sorted((normalize_value(v) for v in value), key=orjson.dumps)
    item = getattr(value, "item", None)  # numpy scalars from some drivers
    if callable(item):
        return normalize_value(item())
    raise UnsupportedValue(f"unsupported value type {type(value).__name__}")


def _normalize_int(value: int) -> int | str:
    # Beyond 2^53 a JSON number is rounded by JavaScript consumers (segments, Liquid): such
    # integers (HUGEINT, NUMBER(38) ids) travel as exact decimal strings.
    return value if -_EXACT_FLOAT_INT < value < _EXACT_FLOAT_INT else str(value)


def _normalize_decimal(value: Decimal) -> int | float | str | None:
    if value.is_nan():
        return None
    if value.is_infinite():
        raise UnsupportedValue("infinite decimal has no JSON form")
    if value == value.to_integral_value():
        return _normalize_int(int(value))
    # A decimal of more than ~15 digits can round to an integral double (24999999999999.999
    # -> 25000000000000.0): that double follows the float rule, as a DOUBLE column's does,
    # so a value hashes alike whichever numeric type carries it.
    return _normalize_float(float(value))


_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DATE = dt.date(1970, 1, 1)
_SECOND = dt.timedelta(seconds=1)


def _normalize_datetime(value: dt.datetime) -> int:
    """Unix seconds, floored (exact timedelta arithmetic, no float rounding); naive
    timestamps are taken as UTC, as warehouses store them."""
    if value.tzinfo is None:
        return (value - _EPOCH) // _SECOND
    return (value - _EPOCH_UTC) // _SECOND


def _normalize_date(value: dt.date) -> int:
    return (value - _EPOCH_DATE).days * 86_400


def _refuse_binary(value: object) -> None:
    raise UnsupportedValue("binary values cannot be sent to Customer.io")


def _normalize_mapping(value: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(k): normalize_value(v) for k, v in value.items()}


def _normalize_sequence(value: Sequence[Any]) -> list[Any]:
    return [normalize_value(v) for v in value]


def _same(value: Any) -> Any:
    return value


def _normalize_float(value: float) -> float | int | None:
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise UnsupportedValue("infinite number has no JSON form")
    if value.is_integer() and abs(value) < _EXACT_FLOAT_INT:
        return int(value)
    return value


_BY_TYPE: dict[type, Any] = {
    str: _same,
    bool: _same,
    type(None): _same,
    int: _normalize_int,
    float: _normalize_float,
    Decimal: _normalize_decimal,
    dt.datetime: _normalize_datetime,
    dt.date: _normalize_date,
    dt.time: dt.time.isoformat,
    dt.timedelta: lambda v: _normalize_float(v.total_seconds()),
    uuid.UUID: str,
    bytes: _refuse_binary,
    bytearray: _refuse_binary,
    memoryview: _refuse_binary,
    dict: _normalize_mapping,
    list: _normalize_sequence,
    tuple: _normalize_sequence,
}


def normalize_attributes(row: Mapping[str, Any], skip: Container[str] = ()) -> Attributes:
    """Normalize every column of a row, dropping NULLs; raises on the first bad value.

    The common cell types (text, booleans, small integers) are kept inline here, without a
    call: this loop runs for every cell of every changed row.
    """
    attributes: Attributes = {}
    for name, raw in row.items():
        if name in skip:  # key columns: they travel as identifiers
            continue
        kind = type(raw)
        if kind is str or kind is bool:
            attributes[name] = raw
            continue
        if raw is None:
            continue
        if kind is int and -_EXACT_FLOAT_INT < raw < _EXACT_FLOAT_INT:
            attributes[name] = raw
            continue
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


# -- rows to records ----------------------------------------------------------------------


def to_record(model: Model, key: str, row: Mapping[str, Any]) -> Record | Rejection:
    """Build the record of one row, or say why the row cannot be sent."""
    try:
        if model.kind is Kind.SUPPRESSION:
            return _suppression_record(model, key, row)
        if model.kind is Kind.DEVICE:
            return _device_record(model, key, row)
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
            attributes = normalize_attributes(row, (model.person_key, model.object_key))
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
        attributes = normalize_attributes(row, (model.key,))
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
        return Rejection(RejectionCode.INVALID_VALUE, str(exc), "attributes")


def _identifier_value(id_type: str, raw: Any) -> Any:
    """Every identifier as text: a warehouse integer 42 becomes ``"42"``.

    Customer.io Track API OpenAPI 1.0.0 (``Trackv2SendMultipleRequestsRequest`` and
    ``Trackv2CreateEntityRequest``): the person identifiers ``id``, ``email`` and ``cio_id``
    and the object identifiers ``object_type_id`` and ``object_id`` are all ``type: string``,
    in ``identifiers`` and in ``cio_relationships`` alike. (RudderStack passes numeric person
    ids through as numbers; that does not match the schema.)
    """
    if type(raw) is str:  # nearly every key: nothing to normalize
        return raw
    try:
        value = normalize_value(raw)
    except UnsupportedValue as exc:
        raise UnsupportedValue(f"identifier {id_type}: {exc}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value  # str, or anything else for check_identifier to reject with its type


def _person_identifiers(model: Model, row: Mapping[str, Any]) -> dict[str, Any] | Rejection:
    """``{<identifier type>: value}`` of the row's person, or why it cannot be sent."""
    assert model.identifier and model.key
    value = _identifier_value(model.identifier, row[model.key])
    return check_identifier(model.identifier, value) or {model.identifier: value}


def _suppression_record(model: Model, key: str, row: Mapping[str, Any]) -> Record | Rejection:
    """A person to suppress: identifiers only (``suppress`` carries nothing else), so a
    change in the row's other columns sends nothing."""
    identifiers = _person_identifiers(model, row)
    if isinstance(identifiers, Rejection):
        return identifiers
    ((id_type, value),) = identifiers.items()
    return Record(
        key=key,
        external_id={"type": model.external_id_type, "identifierType": id_type, "id": value},
        identifiers=identifiers,
        attributes={},
    )


DEVICE_PLATFORMS = ("ios", "android")  # Track API OpenAPI 1.0.0, PersonAddDevice `platform`


def _device_record(model: Model, key: str, row: Mapping[str, Any]) -> Record | Rejection:
    """A device as ``add_device`` sends it whole: its attributes ARE the item's ``device``.

    Track API OpenAPI 1.0.0, PersonAddDevice ``device``: ``token`` and ``platform`` ("ios" |
    "android") required, ``last_used`` an integer Unix timestamp, ``attributes`` a map of
    strings. So a platform is sent in lower case, and every other column becomes a string
    attribute: booleans as ``"true"``/``"false"`` (the schema's ``push_enabled`` form),
    numbers and nested values as their JSON text.
    """
    assert model.token and model.platform and model.key
    person = _person_identifiers(model, row)
    if isinstance(person, Rejection):
        return person
    token = row[model.token]
    if not isinstance(token, str) or not token.strip():
        return Rejection(
            RejectionCode.INVALID_VALUE,
            f"device token ({model.token}) must be a non-empty string",
            model.token,
        )
    platform = row[model.platform]
    if not isinstance(platform, str) or platform.lower() not in DEVICE_PLATFORMS:
        shown = platform if isinstance(platform, str | None) else type(platform).__name__
        return Rejection(
            RejectionCode.INVALID_VALUE,
            f"device platform ({model.platform}) must be ios or android, not {shown!r}",
            model.platform,
        )
    device: Attributes = {"token": token, "platform": platform.lower()}
    extra = normalize_attributes(row, (model.key, model.token, model.platform))
    last_used = extra.pop("last_used", None)
    if last_used is not None:
        if not isinstance(last_used, int) or isinstance(last_used, bool):
            return Rejection(
                RejectionCode.INVALID_VALUE,
                "device last_used must be a timestamp or Unix seconds (an integer)",
                "last_used",
            )
        device["last_used"] = last_used
    if extra:
        device["attributes"] = {name: _as_text(value) for name, value in extra.items()}
    ((id_type, value),) = person.items()
    return Record(
        key=key,
        external_id={"type": model.external_id_type, "identifierType": id_type, "id": value},
        identifiers={"person": person, "token": token},
        attributes=device,
    )


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return orjson.dumps(value).decode()


# -- events ---------------------------------------------------------------------------------


def to_event(model: Model, key: str, row: Mapping[str, Any]) -> Event | Rejection:
    """Build the event of one row, or say why it cannot be sent (no timestamp, a name over
    MAX_EVENT_NAME_BYTES, a bad identifier or value)."""
    assert model.timestamp and model.key and model.event_key
    try:
        identifiers = _person_identifiers(model, row)
        if isinstance(identifiers, Rejection):
            return identifiers
        raw_time = row[model.timestamp]
        if raw_time is None:
            return Rejection(
                RejectionCode.MISSING_VALUE,
                f"timestamp ({model.timestamp}) is NULL",
                model.timestamp,
            )
        milliseconds = _milliseconds(raw_time)
        if milliseconds is None:
            return Rejection(
                RejectionCode.INVALID_VALUE,
                f"timestamp ({model.timestamp}) must be a timestamp, a date or Unix seconds,"
                f" not {type(raw_time).__name__}",
                model.timestamp,
            )
        name = model.event_name
        if model.name_column:
            name = row[model.name_column]
            if not isinstance(name, str) or not name.strip():
                return Rejection(
                    RejectionCode.INVALID_VALUE,
                    f"event name ({model.name_column}) must be a non-empty string",
                    model.name_column,
                )
        assert name is not None
        size = len(name.encode())
        if size > MAX_EVENT_NAME_BYTES:
            return Rejection(
                RejectionCode.TOO_LONG,
                f"event name is {size} bytes, over the {MAX_EVENT_NAME_BYTES}-byte limit",
                model.name_column or "name",
            )
        try:
            event_id = event_ulid(milliseconds, model.name, key)
        except ValueError as exc:
            return Rejection(
                RejectionCode.INVALID_VALUE,
                f"timestamp ({model.timestamp}): {exc}",
                model.timestamp,
            )
        skip = (model.key, model.event_key, model.timestamp, model.name_column)
        return Event(
            key=key,
            identifiers=identifiers,
            name=name,
            timestamp=milliseconds // 1000,  # floored, as every timestamp (normalize_value)
            id=event_id,
            data=normalize_attributes(row, {c for c in skip if c}),
        )
    except UnsupportedValue as exc:
        return Rejection(RejectionCode.INVALID_VALUE, str(exc), "attributes")


_MILLISECOND = dt.timedelta(milliseconds=1)


def _milliseconds(value: Any) -> int | None:
    """Milliseconds since 1970 of a timestamp, a date or a number of Unix seconds, floored
    like :func:`normalize_value` floors seconds; None for any other type."""
    if isinstance(value, dt.datetime):
        epoch = _EPOCH if value.tzinfo is None else _EPOCH_UTC
        return (value - epoch) // _MILLISECOND
    if isinstance(value, dt.date):
        return _normalize_date(value) * 1000
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | Decimal):
        number = Decimal(value) if isinstance(value, float) else value
        if isinstance(number, Decimal) and not number.is_finite():
            return None
        return math.floor(number * 1000)
    return None


def text_identifiers(identifiers: Mapping[str, Any]) -> dict[str, Any]:
    """Identifiers as the wire carries them: integer values (as snapshots written before
    identifiers were sent as text hold them) become their decimal text.

    Deletes are built from the identifiers kept in the snapshot, which may be that old form;
    nested maps (a relationship's ``person`` and ``object``) are converted too.
    """
    out: dict[str, Any] = {}
    for name, value in identifiers.items():
        if isinstance(value, Mapping):
            out[name] = text_identifiers(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[name] = str(value)
        else:
            out[name] = value
    return out


def upgrade_previous(model: Model, previous: Attributes) -> Attributes:
    """Acknowledged attributes in today's form, so an upgrade sends no spurious change.

    The identifier copied into a person's or object's attributes (see :class:`Record`) was
    kept as a JSON number for an integer person ``id`` before identifiers became text; read
    back, it equals the text the row now carries and must not count as a change.
    """
    if model.kind is not Kind.PERSON and model.kind is not Kind.OBJECT:
        return previous  # no identifier in the attributes (and no state from before)
    name = (model.identifier if model.kind is Kind.PERSON else "object_id") or ""
    value = previous.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        previous[name] = str(value)
    return previous
