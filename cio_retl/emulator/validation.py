"""Stateless validation of Track API items, turning each valid item into an `Op`.

Everything that does not depend on the workspace is checked here, outside the workspace lock,
so concurrent requests only serialize on the (cheap) apply step. Errors carry a dotted `field`
path (e.g. `cio_relationships[0].identifiers.object_id`) so a rejected row says exactly what
broke.

The rules follow the Customer.io Track API OpenAPI 1.0.0 document's item schemas (the
`Person` and `Object` branches of `Trackv2SendMultipleRequestsRequest.batch` and of
`Trackv2CreateEntityRequest`): required fields, `type: string` identifiers, the
`identifiers` `oneOf`, relationship shapes. Each accepted `(type, action)` is one entry of
:data:`ACTION_RULES`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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

Ref = tuple[str, str]
"""A person: (identifier type, value); an object: (object_type_id, object_id)."""

PERSON_IDENTIFIERS = ("id", "email", "cio_id")
TYPES = ("person", "object")
# Actions of the schema's Person and Object items (and its Delivery type) that the emulator
# does not model: refused with a message that says so, never silently accepted.
OUT_OF_SCOPE_TYPES = frozenset({"delivery"})
OUT_OF_SCOPE_ACTIONS = frozenset({"page", "screen", "merge", "identify_anonymous"})
# The person actions beyond people, objects and relationships, each as the official OpenAPI
# document of the Track API (1.0.0) declares it for `/api/v2/batch` items of type person:
# `event` (PersonEvent), `add_device` (PersonAddDevice), `delete_device` (PersonDeleteDevice),
# `suppress` (PersonSuppress) and `unsuppress` (PersonUnsuppress).
PERSON_ONLY_ACTIONS = frozenset({"event", "add_device", "delete_device", "suppress", "unsuppress"})
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
    """Person identifiers: exactly one of ``id``, ``email``, ``cio_id``, a non-empty string.

    Customer.io Track API OpenAPI 1.0.0, the person items' ``identifiers``: a ``oneOf`` of
    ``{id}``, ``{email}`` and ``{cio_id}`` ("You cannot pass multiple identifiers"), each
    ``type: string`` (the example id is ``'42'``). A number is refused, as the schema says.
    In an object's ``cio_relationships`` the schema's options lack ``required``; the emulator
    holds them to the same rule (an entry naming nobody cannot be applied).
    """
    if not isinstance(value, dict):
        raise ItemError(field, "must be an object holding exactly one of id, email, cio_id")
    if len(value) != 1:
        raise ItemError(field, "must hold exactly one of id, email, cio_id")
    ((key, ident),) = value.items()
    if key not in PERSON_IDENTIFIERS:
        raise ItemError(field, f"unknown person identifier {key!r}: use id, email or cio_id")
    sub = f"{field}.{key}"
    if not isinstance(ident, str):
        raise ItemError(sub, f"must be a string (the schema's type), not {_json_type(ident)}")
    _identifier_text(ident, sub)
    return (key, ident)


def object_ref(value: Any, field: str) -> Ref:
    """Object identifiers: exactly ``{object_type_id: "<digits>", object_id: "<text>"}``.

    Customer.io Track API OpenAPI 1.0.0, the object items' ``identifiers``: both required,
    ``type: string``, ``nullable: false``; object type ids are "string-formatted integers
    that begin at 1".
    """
    if not isinstance(value, dict) or set(value) != {"object_type_id", "object_id"}:
        raise ItemError(field, "must be exactly {object_type_id, object_id}")
    type_id = value["object_type_id"]
    if not isinstance(type_id, str) or not (type_id.isascii() and type_id.isdigit()):
        raise ItemError(f"{field}.object_type_id", 'must be a string of digits, e.g. "1"')
    if type_id.startswith("0"):
        raise ItemError(f"{field}.object_type_id", 'object type ids begin at "1"')
    object_id = value["object_id"]
    if not isinstance(object_id, str):
        raise ItemError(
            f"{field}.object_id",
            f"must be a string (the schema's type), not {_json_type(object_id)}",
        )
    _identifier_text(object_id, f"{field}.object_id")
    return (type_id, object_id)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


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
    # A person's entries name objects; an object's entries name people.
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


# -- one rule per (type, action) ---------------------------------------------------------


def _ref(kind: str, item: dict[str, Any]) -> Ref:
    return (person_ref if kind == "person" else object_ref)(item["identifiers"], "identifiers")


SUBSCRIPTION_PREFERENCES = "cio_subscription_preferences"
_TOPIC_PATH = f"{SUBSCRIPTION_PREFERENCES}.topics."


def _subscription_preferences(attrs: dict[str, Any]) -> None:
    """The reserved person attribute's shape (Track API OpenAPI 1.0.0, Person > identify >
    ``attributes.cio_subscription_preferences``): the schema nests the topics under
    ``topics`` (``topic_<id>``: boolean), while the same document's request examples put
    ``topic_<id>`` keys directly in it; both forms are accepted, and the dot-notation form
    ``"cio_subscription_preferences.topics.topic_<id>": <boolean>`` too. An empty value
    reverts a topic to its default, so ``""`` and ``null`` are accepted where a boolean is.
    """
    field = f"attributes.{SUBSCRIPTION_PREFERENCES}"
    if SUBSCRIPTION_PREFERENCES in attrs:
        value = attrs[SUBSCRIPTION_PREFERENCES]
        if value in ("", None):
            return
        if not isinstance(value, dict):
            raise ItemError(field, "must be an object of topics")
        for name, flag in value.items():
            if name == "topics":
                if not isinstance(flag, dict):
                    raise ItemError(f"{field}.topics", "must be an object of topic_<id>: boolean")
                for topic, topic_flag in flag.items():
                    _topic(f"{field}.topics.{topic}", topic, topic_flag)
            else:
                _topic(f"{field}.{name}", name, flag)
    for name, flag in attrs.items():
        if name.startswith(_TOPIC_PATH):
            _topic(f"attributes.{name}", name[len(_TOPIC_PATH) :], flag)


def _topic(field: str, name: str, flag: Any) -> None:
    if not (name.startswith("topic_") and name[6:].isascii() and name[6:].isdigit()):
        raise ItemError(field, "topics are named topic_<id>")
    if not isinstance(flag, bool) and flag not in ("", None):
        raise ItemError(field, "must be a boolean")


def _read_identify(kind: str, action: str, item: dict[str, Any], rules: Rules) -> Op:
    ref = _ref(kind, item)
    attrs = attributes(item["attributes"], "attributes", rules) if "attributes" in item else None
    if attrs and kind == "person":
        _subscription_preferences(attrs)
    rels: tuple[Relationship, ...] = ()
    if "cio_relationships" in item:
        rels = _relationships(item["cio_relationships"], kind, False, rules)
    return Op(kind, action, ref, attrs, rels)


def _read_identifiers(kind: str, action: str, item: dict[str, Any], rules: Rules) -> Op:
    """Items that carry identifiers only: delete, suppress, unsuppress."""
    return Op(kind, action, _ref(kind, item), None, ())


def _read_relationships(kind: str, action: str, item: dict[str, Any], rules: Rules) -> Op:
    ref = _ref(kind, item)
    return Op(kind, action, ref, None, _relationships(item["cio_relationships"], kind, True, rules))


def _read_event(kind: str, action: str, item: dict[str, Any], rules: Rules) -> Op:
    return Op(kind, action, _ref(kind, item), _event_data(item), (), event=_event(item))


def _read_device(kind: str, action: str, item: dict[str, Any], rules: Rules) -> Op:
    device = _device(item["device"], action)
    return Op(kind, action, _ref(kind, item), None, (), device=device)


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


Reader = Callable[[str, str, dict[str, Any], Rules], Op]


@dataclass(frozen=True, slots=True)
class ActionRule:
    """What one ``(type, action)`` item must and may hold, and how its fields are read.

    ``schema`` names the element of the Customer.io Track API OpenAPI 1.0.0 document the rule
    follows (under ``Trackv2SendMultipleRequestsRequest`` / ``Trackv2CreateEntityRequest``).
    ``required`` is checked in order, so the first missing field is the one reported.
    """

    schema: str
    required: tuple[str, ...]
    optional: frozenset[str]
    read: Reader

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(self.required) | self.optional


_BASE = ("type", "action", "identifiers")

ACTION_RULES: dict[tuple[str, str], ActionRule] = {
    ("person", "identify"): ActionRule(
        "Person > identify", _BASE, frozenset({"attributes", "cio_relationships"}), _read_identify
    ),
    ("person", "delete"): ActionRule("Person > delete", _BASE, frozenset(), _read_identifiers),
    ("person", "add_relationships"): ActionRule(
        "Person > add_relationships",
        (*_BASE, "cio_relationships"),
        frozenset(),
        _read_relationships,
    ),
    ("person", "delete_relationships"): ActionRule(
        "Person > delete_relationships",
        (*_BASE, "cio_relationships"),
        frozenset(),
        _read_relationships,
    ),
    ("person", "event"): ActionRule(
        "PersonEvent", _BASE, frozenset({"id", "name", "timestamp", "attributes"}), _read_event
    ),
    ("person", "add_device"): ActionRule(
        "PersonAddDevice", (*_BASE, "device"), frozenset(), _read_device
    ),
    ("person", "delete_device"): ActionRule(
        "PersonDeleteDevice", (*_BASE, "device"), frozenset(), _read_device
    ),
    ("person", "suppress"): ActionRule("PersonSuppress", _BASE, frozenset(), _read_identifiers),
    ("person", "unsuppress"): ActionRule("PersonUnsuppress", _BASE, frozenset(), _read_identifiers),
    ("object", "identify"): ActionRule(
        "Object > identify", _BASE, frozenset({"attributes", "cio_relationships"}), _read_identify
    ),
    ("object", "delete"): ActionRule("Object > delete", _BASE, frozenset(), _read_identifiers),
    ("object", "add_relationships"): ActionRule(
        "Object > add_relationships",
        (*_BASE, "cio_relationships"),
        frozenset(),
        _read_relationships,
    ),
    ("object", "delete_relationships"): ActionRule(
        "Object > delete_relationships",
        (*_BASE, "cio_relationships"),
        frozenset(),
        _read_relationships,
    ),
}
"""Every item the emulator accepts; a new action is one more entry (and its reader)."""

ACTIONS = frozenset(action for _, action in ACTION_RULES)


def validate_item(item: Any, rules: Rules) -> Op:
    """Check one item against its schema; raise ItemError naming the first problem."""
    if not isinstance(item, dict):
        raise ItemError("item", "each item must be a JSON object")
    size = len(orjson.dumps(item))
    if size > MAX_ITEM_BYTES:
        raise ItemError("item", f"item is {size} bytes as compact JSON, limit {MAX_ITEM_BYTES}")
    kind = item.get("type")
    if kind is None:
        raise ItemError("type", "is required")
    if kind not in TYPES:
        if isinstance(kind, str) and kind in OUT_OF_SCOPE_TYPES:
            raise ItemError("type", f"type {kind!r} is not emulated (out of scope)")
        raise ItemError("type", f"unsupported type {kind!r}: use person or object")
    action = item.get("action")
    if action is None:
        raise ItemError("action", "is required")
    rule = ACTION_RULES.get((kind, action)) if isinstance(action, str) else None
    if rule is None:
        if isinstance(action, str) and action in OUT_OF_SCOPE_ACTIONS:
            raise ItemError("action", f"action {action!r} is not emulated (out of scope)")
        if kind != "person" and action in PERSON_ONLY_ACTIONS:
            raise ItemError("action", f"{action!r} is a person action, not an {kind} one")
        raise ItemError("action", f"unknown action {action!r} for a {kind}")
    allowed = rule.allowed
    if not allowed.issuperset(item):
        key = next(k for k in item if k not in allowed)
        raise ItemError(key, f"field not allowed for a {kind} {action} item")
    for name in rule.required:
        if name not in item:
            raise ItemError(name, f"is required for {action}")
    return rule.read(kind, action, item, rules)
