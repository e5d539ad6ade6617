"""Stateless validation of Track API items, turning each valid item into an `Op`.

Everything that does not depend on the workspace is checked here, outside the workspace lock,
so concurrent requests only serialize on the (cheap) apply step. Errors carry a dotted `field`
path (e.g. `cio_relationships[0].identifiers.object_id`) so a rejected row says exactly what
broke.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from cio_retl.emulator.rules import (
    MAX_ATTRIBUTE_NAME_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_IDENTIFIER_BYTES,
    MAX_ITEM_BYTES,
    Rules,
)

Ref = tuple[str, str | int]
"""A person: (identifier type, value); an object: (object_type_id, object_id)."""

PERSON_IDENTIFIERS = ("id", "email", "cio_id")
# The person actions beyond people, objects and relationships, each as the official OpenAPI
# document of the Track API (1.0.0) declares it for `/api/v2/batch` items of type person:
# `event` (PersonEvent), `add_device` (PersonAddDevice), `delete_device` (PersonDeleteDevice),
# `suppress` (PersonSuppress) and `unsuppress` (PersonUnsuppress).
PERSON_ONLY_ACTIONS = frozenset({"event", "add_device", "delete_device", "suppress", "unsuppress"})
ACTIONS = (
    frozenset({"identify", "delete", "add_relationships", "delete_relationships"})
    | PERSON_ONLY_ACTIONS
)
OUT_OF_SCOPE_ACTIONS = frozenset({"page", "screen", "merge"})
_BASE_KEYS = frozenset({"type", "action", "identifiers"})
ITEM_KEYS: dict[str, frozenset[str]] = {
    "identify": _BASE_KEYS | {"attributes", "cio_relationships"},
    "delete": _BASE_KEYS,
    "add_relationships": _BASE_KEYS | {"cio_relationships"},
    "delete_relationships": _BASE_KEYS | {"cio_relationships"},
    "event": _BASE_KEYS | {"id", "name", "timestamp", "attributes"},
    "add_device": _BASE_KEYS | {"device"},
    "delete_device": _BASE_KEYS | {"device"},
    "suppress": _BASE_KEYS,
    "unsuppress": _BASE_KEYS,
}
# PersonAddDevice's `device`: token and platform required; PersonDeleteDevice's: token only.
ADD_DEVICE_KEYS = frozenset({"token", "platform", "last_used", "attributes"})
DEVICE_PLATFORMS = ("ios", "android")
MAX_EVENT_NAME_BYTES = 100
"""An event name [doc: the Track API limits table, "Event Name"]."""
# The reference also bounds an event's data at 100,000 bytes ("Event Data"); a v2 item is
# at most MAX_ITEM_BYTES (32 KB) whole, so that bound is never the one an item meets.
# PersonEvent `id`: "a valid ULID used to deduplicate events" (format ULID): 26 characters of
# Crockford's base32, the first at most 7 (128 bits); the ULID spec decodes either case.
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", re.IGNORECASE)
RELATIONSHIP_KEYS = frozenset({"identifiers", "relationship_attributes"})


class ItemError(Exception):
    """One item is invalid: reported as `{"reason": "invalid", "field", "message"}`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class InvalidItem:
    """An item the emulator refused, kept so tests can assert none were sent."""

    batch_index: int
    reason: str
    field: str
    message: str
    item: Any


class Relationship(NamedTuple):
    """One `cio_relationships` entry: the other side and the relationship's attributes."""

    ref: Ref
    attributes: dict[str, Any] | None


class Event(NamedTuple):
    """A validated `event` item's own fields (its data is the Op's attributes)."""

    name: str
    id: str | None
    timestamp: int | None


class Device(NamedTuple):
    """A validated `device`: `add_device` carries every field, `delete_device` the token."""

    token: str
    platform: str | None = None
    last_used: int | None = None
    attributes: dict[str, str] | None = None


class Op(NamedTuple):
    """A validated item, ready to apply."""

    kind: str
    action: str
    ref: Ref
    attributes: dict[str, Any] | None
    relationships: tuple[Relationship, ...]
    event: Event | None = None
    device: Device | None = None

    @property
    def identifier_value(self) -> str:
        """The main identifier value as a string (what `reject_identifiers` compares)."""
        return str(self.ref[1])


def utf8_len(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding when it is ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _identifier_text(value: str, field: str) -> None:
    if value == "":
        raise ItemError(field, "must not be empty")
    size = utf8_len(value)
    if size > MAX_IDENTIFIER_BYTES:
        raise ItemError(field, f"is {size} bytes, limit {MAX_IDENTIFIER_BYTES}")


def person_ref(value: Any, field: str) -> Ref:
    """Validate person identifiers: exactly one of id (string or integer), email, cio_id."""
    if not isinstance(value, dict):
        raise ItemError(field, "must be an object holding exactly one of id, email, cio_id")
    if len(value) != 1:
        raise ItemError(field, "must hold exactly one of id, email, cio_id")
    ((key, ident),) = value.items()
    if key not in PERSON_IDENTIFIERS:
        raise ItemError(field, f"unknown person identifier {key!r}: use id, email or cio_id")
    sub = f"{field}.{key}"
    if key == "id" and isinstance(ident, int) and not isinstance(ident, bool):
        _identifier_text(str(ident), sub)
        return (key, ident)
    if not isinstance(ident, str):
        kinds = "a string or an integer" if key == "id" else "a string"
        raise ItemError(sub, f"must be {kinds}")
    _identifier_text(ident, sub)
    return (key, ident)


def object_ref(value: Any, field: str) -> Ref:
    """Validate object identifiers: exactly {object_type_id: "<digits>", object_id: "<text>"}."""
    if not isinstance(value, dict) or set(value) != {"object_type_id", "object_id"}:
        raise ItemError(field, "must be exactly {object_type_id, object_id}")
    type_id = value["object_type_id"]
    if not isinstance(type_id, str) or not (type_id.isascii() and type_id.isdigit()):
        raise ItemError(f"{field}.object_type_id", 'must be a string of digits, e.g. "1"')
    object_id = value["object_id"]
    if not isinstance(object_id, str):
        raise ItemError(f"{field}.object_id", "must be a string")
    _identifier_text(object_id, f"{field}.object_id")
    return (type_id, object_id)


def _leaf_strings_fit(value: Any) -> bool:
    if isinstance(value, str):
        return utf8_len(value) <= MAX_ATTRIBUTE_VALUE_BYTES
    if isinstance(value, dict):
        return all(_leaf_strings_fit(v) for v in value.values())
    if isinstance(value, list):
        return all(_leaf_strings_fit(v) for v in value)
    return True


_SCALARS = (type(None), bool, int, float)
_NESTED = (dict, list)


def attributes(value: Any, field: str, rules: Rules) -> dict[str, Any]:
    """Validate an attributes map: names 1..150 bytes, values JSON of at most 1000 bytes."""
    if not isinstance(value, dict):
        raise ItemError(field, "must be an object")
    for name, val in value.items():
        # UTF-8 takes at most 4 bytes a character: short strings fit without being encoded.
        if len(name) * 4 > MAX_ATTRIBUTE_NAME_BYTES or not name:
            if not name:
                raise ItemError(field, "attribute names must not be empty")
            size = utf8_len(name)
            if size > MAX_ATTRIBUTE_NAME_BYTES:
                raise ItemError(
                    f"{field}.{name}",
                    f"attribute name is {size} bytes, limit {MAX_ATTRIBUTE_NAME_BYTES}",
                )
        kind = type(val)
        if kind is str:
            if len(val) * 4 <= MAX_ATTRIBUTE_VALUE_BYTES:
                continue
            size = utf8_len(val)
        elif kind in _SCALARS:
            continue
        elif kind in _NESTED:
            if rules.nested_value_size == "per_leaf":
                if _leaf_strings_fit(val):
                    continue
                raise ItemError(
                    f"{field}.{name}",
                    f"a string inside the value is over {MAX_ATTRIBUTE_VALUE_BYTES} bytes",
                )
            size = len(orjson.dumps(val))
        else:
            raise ItemError(f"{field}.{name}", f"unsupported value type {kind.__name__}")
        if size > MAX_ATTRIBUTE_VALUE_BYTES:
            raise ItemError(
                f"{field}.{name}", f"value is {size} bytes, limit {MAX_ATTRIBUTE_VALUE_BYTES}"
            )
    return value


def _relationships(value: Any, kind: str, required: bool, rules: Rules) -> tuple[Relationship, ...]:
    if not isinstance(value, list):
        raise ItemError("cio_relationships", "must be a list")
    if required and not value:
        raise ItemError("cio_relationships", "must name at least one relationship")
    other_ref = object_ref if kind == "person" else person_ref
    out: list[Relationship] = []
    for i, entry in enumerate(value):
        field = f"cio_relationships[{i}]"
        if not isinstance(entry, dict):
            raise ItemError(field, "must be an object with identifiers")
        unknown = set(entry) - RELATIONSHIP_KEYS
        if unknown:
            raise ItemError(f"{field}.{min(unknown)}", "unknown field in a relationship")
        if "identifiers" not in entry:
            raise ItemError(f"{field}.identifiers", "is required")
        ref = other_ref(entry["identifiers"], f"{field}.identifiers")
        rel_attrs = entry.get("relationship_attributes")
        if "relationship_attributes" in entry:
            rel_attrs = attributes(rel_attrs, f"{field}.relationship_attributes", rules)
        out.append(Relationship(ref, rel_attrs))
    return tuple(out)


def validate_item(item: Any, rules: Rules) -> Op:
    """Check one item against the spec; raise ItemError naming the first problem."""
    if not isinstance(item, dict):
        raise ItemError("item", "each item must be a JSON object")
    size = len(orjson.dumps(item))
    if size > MAX_ITEM_BYTES:
        raise ItemError("item", f"item is {size} bytes as compact JSON, limit {MAX_ITEM_BYTES}")
    kind = item.get("type")
    if kind is None:
        raise ItemError("type", "is required")
    if kind != "person" and kind != "object":
        raise ItemError("type", f"unsupported type {kind!r}: use person or object")
    action = item.get("action")
    if action is None:
        raise ItemError("action", "is required")
    if not isinstance(action, str) or action not in ACTIONS:
        if isinstance(action, str) and action in OUT_OF_SCOPE_ACTIONS:
            raise ItemError("action", f"action {action!r} is not emulated (out of scope)")
        raise ItemError("action", f"unknown action {action!r}")
    if kind != "person" and action in PERSON_ONLY_ACTIONS:
        raise ItemError("action", f"{action!r} is a person action, not an {kind} one")
    allowed = ITEM_KEYS[action]
    if not allowed.issuperset(item):
        key = next(k for k in item if k not in allowed)
        raise ItemError(key, f"field not allowed for a {kind} {action} item")
    if "identifiers" not in item:
        raise ItemError("identifiers", "is required")
    ref = (person_ref if kind == "person" else object_ref)(item["identifiers"], "identifiers")
    if action in PERSON_ONLY_ACTIONS:
        return _person_action(item, action, ref)
    attrs = None
    if "attributes" in item:
        attrs = attributes(item["attributes"], "attributes", rules)
    rels: tuple[Relationship, ...] = ()
    if "cio_relationships" in item:
        rels = _relationships(item["cio_relationships"], kind, action != "identify", rules)
    elif action != "identify" and action != "delete":
        raise ItemError("cio_relationships", f"is required for {action}")
    return Op(kind, action, ref, attrs, rels)


def _person_action(item: dict[str, Any], action: str, ref: Ref) -> Op:
    """`event`, `add_device`, `delete_device`, `suppress`, `unsuppress` (keys already checked)."""
    if action == "event":
        return Op("person", action, ref, _event_data(item), (), event=_event(item))
    if action in ("add_device", "delete_device"):
        if "device" not in item:
            raise ItemError("device", f"is required for {action}")
        return Op("person", action, ref, None, (), device=_device(item["device"], action))
    return Op("person", action, ref, None, ())


def _event(item: dict[str, Any]) -> Event:
    if "name" not in item:
        raise ItemError("name", "is required for an event")
    name = item["name"]
    if not isinstance(name, str) or not name:
        raise ItemError("name", "must be a non-empty string")
    size = utf8_len(name)
    if size > MAX_EVENT_NAME_BYTES:
        raise ItemError("name", f"is {size} bytes, limit {MAX_EVENT_NAME_BYTES}")
    event_id = item.get("id")
    if "id" in item and (not isinstance(event_id, str) or not _ULID.fullmatch(event_id)):
        raise ItemError("id", "must be a valid ULID (26 characters of Crockford base32)")
    timestamp = item.get("timestamp")
    if "timestamp" in item and (not isinstance(timestamp, int) or isinstance(timestamp, bool)):
        raise ItemError("timestamp", "must be an integer (Unix seconds)")
    return Event(name, event_id, timestamp)


def _event_data(item: dict[str, Any]) -> dict[str, Any] | None:
    if "attributes" not in item:
        return None
    data = item["attributes"]
    if not isinstance(data, dict):
        raise ItemError("attributes", "must be an object")
    return data


def _device(value: Any, action: str) -> Device:
    if not isinstance(value, dict):
        raise ItemError("device", "must be an object")
    allowed = ADD_DEVICE_KEYS if action == "add_device" else frozenset({"token"})
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ItemError(f"device.{unknown[0]}", f"field not allowed in the device of {action}")
    token = value.get("token")
    if not isinstance(token, str) or not token:
        raise ItemError("device.token", "is required: a non-empty string")
    if action == "delete_device":
        return Device(token)
    platform = value.get("platform")
    if platform not in DEVICE_PLATFORMS:
        raise ItemError("device.platform", f"is required: one of {', '.join(DEVICE_PLATFORMS)}")
    last_used = value.get("last_used")
    if "last_used" in value and (not isinstance(last_used, int) or isinstance(last_used, bool)):
        raise ItemError("device.last_used", "must be an integer (Unix seconds)")
    attrs = value.get("attributes")
    if "attributes" in value:
        # PersonAddDevice: `attributes` is a map of strings (push_enabled is "true"/"false").
        if not isinstance(attrs, dict):
            raise ItemError("device.attributes", "must be an object")
        for name, val in attrs.items():
            if not isinstance(val, str):
                raise ItemError(f"device.attributes.{name}", "must be a string")
    return Device(token, platform, last_used, attrs)
