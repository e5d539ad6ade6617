"""The emulated workspace: people (with their events and devices), objects, relationships
and suppressed identifiers, kept in memory.

Customer.io behaviour modelled here: identify merges attributes (creating the record), `""`
removes an attribute, deleting removes the record and its relationships, adding a relationship
creates a missing person or object as an empty record. A person is found by `id`, by `email`
(the email it was identified by) or by the emulator's own `cio_id`.

Events, devices and suppressions: an `event` is appended to its person's events, unless an
event with the same `id` arrived before (the schema's "a valid ULID used to deduplicate
events"): then it is dropped and counted in `duplicate_events`. `add_device` adds or
replaces the device with that token, `delete_device` removes it. An event or a device for
a person who does not exist creates the person, as adding a relationship does [open: the
reference does not say]. `suppress` marks the person's identifiers suppressed and
`unsuppress` clears them; the schema says a suppressed person cannot be "added back", which
we read as: an `identify` naming a suppressed identifier is an item error (reason
"invalid", field `identifiers`), and the person's data is kept [open: whether Customer.io
also deletes the profile on suppress].

`apply` checks everything that depends on state before changing anything, so an invalid item
leaves no trace. Callers hold `lock` around `apply` and around reads that must be consistent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import orjson

from cio_retl.emulator.rules import MAX_ATTRIBUTES, MAX_OBJECT_ATTRIBUTES_BYTES, Rules
from cio_retl.emulator.validation import ItemError, Op, Ref

ObjectKey = tuple[str, str]
RelationshipKey = tuple[str, ObjectKey]


@dataclass(slots=True)
class Person:
    """One person. `id`/`email` are the identifiers it was identified by, if any.

    `events` are the person's events in the order they arrived (each `{"id", "name",
    "timestamp", "attributes"}`); `devices` maps a token to its device.
    """

    cio_id: str
    id: str | None
    email: str | None
    attributes: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)


def _merged(current: dict[str, Any], updates: dict[str, Any], rules: Rules) -> dict[str, Any]:
    """`current` with `updates` merged, as a new dict, so a refused item leaves no trace.

    `""` removes an attribute; `null` does too under the NULL_REMOVES_ATTRIBUTE reading.
    """
    out = {**current, **updates}
    values = updates.values()
    # Most identifies remove nothing: two C-level scans instead of a Python loop per value.
    if "" in values or (None in values and rules.null_removes_attribute):
        null_removes = rules.null_removes_attribute
        for name, value in updates.items():
            if value == "" if value is not None else null_removes:
                out.pop(name, None)
    return out


@dataclass
class Workspace:
    """People, objects and relationships; every access from several threads goes under `lock`."""

    people: dict[str, Person] = field(default_factory=dict)
    objects: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    relationships: dict[RelationshipKey, dict[str, Any]] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    _by_id: dict[str, str] = field(default_factory=dict, repr=False)
    _by_email: dict[str, str] = field(default_factory=dict, repr=False)
    _rels_of_person: dict[str, set[ObjectKey]] = field(default_factory=dict, repr=False)
    _rels_of_object: dict[ObjectKey, set[str]] = field(default_factory=dict, repr=False)
    _next_cio_id: int = field(default=1, repr=False)
    # Suppressed identifiers as (identifier type, value as text).
    suppressed: set[tuple[str, str]] = field(default_factory=set)
    duplicate_events: int = 0  # events dropped because their `id` had been seen
    _event_ids: set[str] = field(default_factory=set, repr=False)

    # -- reading -------------------------------------------------------------------------

    def person(
        self, *, id: str | None = None, email: str | None = None, cio_id: str | None = None
    ) -> Person | None:
        """The person with this identifier (give exactly one), or None."""
        given = [
            (k, v) for k, v in (("id", id), ("email", email), ("cio_id", cio_id)) if v is not None
        ]
        if len(given) != 1:
            raise TypeError("person() takes exactly one of id=, email=, cio_id=")
        with self.lock:
            return self._find(given[0])

    def people_by(self, identifier: str) -> dict[str, dict[str, Any]]:
        """{identifier value: attributes} for every person having that identifier."""
        if identifier not in ("id", "email", "cio_id"):
            raise ValueError("identifier must be id, email or cio_id")
        with self.lock:
            out: dict[str, dict[str, Any]] = {}
            for p in self.people.values():
                key = getattr(p, identifier)
                if key is not None:
                    out[key] = dict(p.attributes)
            return out

    def events(self, identifier: str) -> dict[str | int, list[dict[str, Any]]]:
        """{identifier value: events in arrival order} of every person with events."""
        with self.lock:
            return {
                key: [dict(e) for e in p.events]
                for p in self.people.values()
                if p.events and (key := getattr(p, identifier)) is not None
            }

    def devices(self, identifier: str) -> dict[str | int, dict[str, dict[str, Any]]]:
        """{identifier value: {token: device}} of every person with devices."""
        with self.lock:
            return {
                key: {t: dict(d) for t, d in p.devices.items()}
                for p in self.people.values()
                if p.devices and (key := getattr(p, identifier)) is not None
            }

    def is_suppressed(self, identifier: str, value: str | int) -> bool:
        with self.lock:
            return (identifier, str(value)) in self.suppressed

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy of the workspace (what `GET /_emulator/workspace` answers)."""
        with self.lock:
            return {
                "events": [
                    {"person": self._person_summary(p.cio_id), **e}
                    for p in self.people.values()
                    for e in p.events
                ],
                "devices": [
                    {"person": self._person_summary(p.cio_id), **d}
                    for p in self.people.values()
                    for d in p.devices.values()
                ],
                "suppressed": [
                    {"identifier": kind, "value": value} for kind, value in sorted(self.suppressed)
                ],
                "duplicate_events": self.duplicate_events,
                "people": [
                    {
                        "cio_id": p.cio_id,
                        "id": p.id,
                        "email": p.email,
                        "attributes": dict(p.attributes),
                    }
                    for p in self.people.values()
                ],
                "objects": [
                    {"object_type_id": t, "object_id": o, "attributes": dict(a)}
                    for (t, o), a in self.objects.items()
                ],
                "relationships": [
                    {
                        "person": self._person_summary(cio_id),
                        "object_type_id": t,
                        "object_id": o,
                        "relationship_attributes": dict(a),
                    }
                    for (cio_id, (t, o)), a in self.relationships.items()
                ],
            }

    def _person_summary(self, cio_id: str) -> dict[str, Any]:
        p = self.people[cio_id]
        return {"cio_id": p.cio_id, "id": p.id, "email": p.email}

    def clear(self) -> None:
        """Forget everything (cio_ids restart at cio_1)."""
        with self.lock:
            self.people.clear()
            self.objects.clear()
            self.relationships.clear()
            self._by_id.clear()
            self._by_email.clear()
            self._rels_of_person.clear()
            self._rels_of_object.clear()
            self._next_cio_id = 1
            self.suppressed.clear()
            self._event_ids.clear()
            self.duplicate_events = 0

    # -- applying ------------------------------------------------------------------------

    def apply(self, op: Op, rules: Rules) -> None:
        """Apply one validated item, or raise ItemError having changed nothing."""
        with self.lock:
            if op.kind == "person":
                self._apply_person(op, rules)
            else:
                self._apply_object(op, rules)

    def _find(self, ref: Ref) -> Person | None:
        kind, value = ref
        if kind == "id":
            cio_id = self._by_id.get(str(value))
        elif kind == "email":
            cio_id = self._by_email.get(str(value))
        else:
            cio_id = str(value)
        return None if cio_id is None else self.people.get(cio_id)

    def _create(self, ref: Ref) -> Person:
        kind, value = ref
        cio_id = f"cio_{self._next_cio_id}"
        self._next_cio_id += 1
        if kind == "id":
            person = Person(cio_id, value, None, {})
            self._by_id[str(value)] = cio_id
        else:
            email = str(value)
            person = Person(cio_id, None, email, {"email": email})
            self._by_email[email] = cio_id
        self.people[cio_id] = person
        return person

    def _find_or_create(self, ref: Ref) -> Person:
        """The person for `ref`, created empty if absent (callers checked cio_id refs exist)."""
        person = self._find(ref)
        return self._create(ref) if person is None else person

    def _require(self, ref: Ref, field: str) -> None:
        """A cio_id must name an existing person: the emulator cannot create one from it."""
        if ref[0] == "cio_id" and ref[1] not in self.people:
            raise ItemError(field, "person not found")

    def _apply_person(self, op: Op, rules: Rules) -> None:
        person = self._find(op.ref)
        if op.action in _LIFE_ACTIONS:
            self._apply_life(op, person)
            return
        if op.action == "delete":
            if person is not None:
                self._delete_person(person)
            return
        if op.action == "delete_relationships":
            if person is not None:
                for rel in op.relationships:
                    self._unrelate(person.cio_id, _object_key(rel.ref))
            return
        if person is None and op.ref[0] == "cio_id":
            raise ItemError("identifiers.cio_id", "person not found")
        if op.action == "identify" and self._suppressed(op.ref, person):
            raise ItemError(
                "identifiers", "this person is suppressed: a suppressed person cannot be added back"
            )
        email = person.email if person is not None else None
        if person is None and op.ref[0] == "email":
            email = str(op.ref[1])
        current = person.attributes if person is not None else {}
        merged = _merged(current, op.attributes or {}, rules)
        if email is not None:
            # The email a person is identified by stays its `email` attribute.
            merged["email"] = email
        if len(merged) > MAX_ATTRIBUTES:
            raise ItemError(
                "attributes", f"person would have {len(merged)} attributes, limit {MAX_ATTRIBUTES}"
            )
        for i, rel in enumerate(op.relationships):
            if rel.attributes:
                current_rel = (
                    self.relationships.get((person.cio_id, _object_key(rel.ref)))
                    if person is not None
                    else None
                )
                _check_group_attributes(
                    _merged(current_rel or {}, rel.attributes, rules),
                    f"cio_relationships[{i}].relationship_attributes",
                    "relationship",
                )
        if person is None:
            person = self._create(op.ref)
        elif op.ref[0] == "id":
            person.id = op.ref[1]
        person.attributes = merged
        for rel in op.relationships:
            self._relate(person.cio_id, _object_key(rel.ref), rel.attributes, rules)

    def _identifiers_of(self, ref: Ref, person: Person | None) -> set[tuple[str, str]]:
        """Every identifier of the person `ref` names: the given one and, if the person
        exists, the id, email and cio_id it has."""
        out = {(ref[0], str(ref[1]))}
        if person is not None:
            out.add(("cio_id", person.cio_id))
            if person.id is not None:
                out.add(("id", str(person.id)))
            if person.email is not None:
                out.add(("email", person.email))
        return out

    def _suppressed(self, ref: Ref, person: Person | None) -> bool:
        return bool(self.suppressed) and not self.suppressed.isdisjoint(
            self._identifiers_of(ref, person)
        )

    def _apply_life(self, op: Op, person: Person | None) -> None:
        """`suppress`, `unsuppress`, `event`, `add_device`, `delete_device`."""
        if op.action == "suppress":
            self.suppressed |= self._identifiers_of(op.ref, person)
            return
        if op.action == "unsuppress":
            self.suppressed -= self._identifiers_of(op.ref, person)
            return
        if op.action == "delete_device":
            assert op.device is not None
            if person is not None:
                person.devices.pop(op.device.token, None)
            return
        if person is None:
            self._require(op.ref, "identifiers.cio_id")
            person = self._create(op.ref)
        if op.action == "add_device":
            device = op.device
            assert device is not None
            # PersonAddDevice replaces the device with this token: every field is sent.
            record: dict[str, Any] = {"token": device.token, "platform": device.platform}
            if device.last_used is not None:
                record["last_used"] = device.last_used
            if device.attributes is not None:
                record["attributes"] = dict(device.attributes)
            person.devices[device.token] = record
            return
        event = op.event
        assert event is not None and op.action == "event"
        if event.id is not None:
            canonical = event.id.upper()  # the ULID spec decodes either case alike
            if canonical in self._event_ids:
                self.duplicate_events += 1
                return
            self._event_ids.add(canonical)
        person.events.append(
            {
                "id": event.id,
                "name": event.name,
                "timestamp": event.timestamp,
                "attributes": dict(op.attributes or {}),
            }
        )

    def _apply_object(self, op: Op, rules: Rules) -> None:
        key = _object_key(op.ref)
        current = self.objects.get(key)
        if op.action == "delete":
            if current is not None:
                self._delete_object(key)
            return
        if op.action == "delete_relationships":
            if current is not None:
                for rel in op.relationships:
                    person = self._find(rel.ref)
                    if person is not None:
                        self._unrelate(person.cio_id, key)
            return
        for i, rel in enumerate(op.relationships):
            self._require(rel.ref, f"cio_relationships[{i}].identifiers.cio_id")
        merged = _merged(current or {}, op.attributes or {}, rules)
        _check_group_attributes(merged, "attributes", "object")
        for i, rel in enumerate(op.relationships):
            if rel.attributes:
                person = self._find(rel.ref)
                current_rel = (
                    self.relationships.get((person.cio_id, key)) if person is not None else None
                )
                _check_group_attributes(
                    _merged(current_rel or {}, rel.attributes, rules),
                    f"cio_relationships[{i}].relationship_attributes",
                    "relationship",
                )
        self.objects[key] = merged
        for rel in op.relationships:
            person = self._find_or_create(rel.ref)
            self._relate(person.cio_id, key, rel.attributes, rules)

    def _relate(
        self, cio_id: str, key: ObjectKey, attrs: dict[str, Any] | None, rules: Rules
    ) -> None:
        if key not in self.objects:
            self.objects[key] = {}
        rel = self.relationships.get((cio_id, key))
        if rel is None:
            rel = {}
            self._rels_of_person.setdefault(cio_id, set()).add(key)
            self._rels_of_object.setdefault(key, set()).add(cio_id)
        self.relationships[(cio_id, key)] = _merged(rel, attrs, rules) if attrs else rel

    def _unrelate(self, cio_id: str, key: ObjectKey) -> None:
        if self.relationships.pop((cio_id, key), None) is not None:
            self._rels_of_person[cio_id].discard(key)
            self._rels_of_object[key].discard(cio_id)

    def _delete_person(self, person: Person) -> None:
        for key in self._rels_of_person.pop(person.cio_id, set()):
            del self.relationships[(person.cio_id, key)]
            self._rels_of_object[key].discard(person.cio_id)
        del self.people[person.cio_id]
        if person.id is not None and self._by_id.get(str(person.id)) == person.cio_id:
            del self._by_id[str(person.id)]
        if person.email is not None and self._by_email.get(person.email) == person.cio_id:
            del self._by_email[person.email]

    def _delete_object(self, key: ObjectKey) -> None:
        for cio_id in self._rels_of_object.pop(key, set()):
            del self.relationships[(cio_id, key)]
            self._rels_of_person[cio_id].discard(key)
        del self.objects[key]


_LIFE_ACTIONS = frozenset({"suppress", "unsuppress", "event", "add_device", "delete_device"})


def _check_group_attributes(merged: dict[str, Any], field: str, what: str) -> None:
    """An object's or relationship's merged attributes against the count and total limits."""
    if len(merged) > MAX_ATTRIBUTES:
        raise ItemError(
            field, f"{what} would have {len(merged)} attributes, limit {MAX_ATTRIBUTES}"
        )
    size = len(orjson.dumps(merged))
    if size > MAX_OBJECT_ATTRIBUTES_BYTES:
        raise ItemError(
            field, f"{what}'s attributes would be {size} bytes, limit {MAX_OBJECT_ATTRIBUTES_BYTES}"
        )


def _object_key(ref: Ref) -> ObjectKey:
    return (ref[0], str(ref[1]))
