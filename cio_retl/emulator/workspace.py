"""The emulated workspace: people, objects and relationships, kept in memory.

Customer.io behaviour modelled here: identify merges attributes (creating the record), `""`
removes an attribute, deleting removes the record and its relationships, adding a relationship
creates a missing person or object as an empty record. A person is found by `id`, by `email`
(the email it was identified by) or by the emulator's own `cio_id`.

`apply` checks everything that depends on state before changing anything, so an invalid item
leaves no trace. Callers hold `lock` around `apply` and around reads that must be consistent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from cio_retl.emulator.rules import MAX_PERSON_ATTRIBUTES, Rules
from cio_retl.emulator.validation import ItemError, Op, Ref

ObjectKey = tuple[str, str]
RelationshipKey = tuple[str, ObjectKey]


@dataclass(slots=True)
class Person:
    """One person. `id`/`email` are the identifiers it was identified by, if any."""

    cio_id: str
    id: str | int | None
    email: str | None
    attributes: dict[str, Any]


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

    # -- reading -------------------------------------------------------------------------

    def person(
        self, *, id: str | int | None = None, email: str | None = None, cio_id: str | None = None
    ) -> Person | None:
        """The person with this identifier (give exactly one), or None."""
        given = [
            (k, v) for k, v in (("id", id), ("email", email), ("cio_id", cio_id)) if v is not None
        ]
        if len(given) != 1:
            raise TypeError("person() takes exactly one of id=, email=, cio_id=")
        with self.lock:
            return self._find(given[0])

    def people_by(self, identifier: str) -> dict[str | int, dict[str, Any]]:
        """{identifier value: attributes} for every person having that identifier."""
        if identifier not in ("id", "email", "cio_id"):
            raise ValueError("identifier must be id, email or cio_id")
        with self.lock:
            out: dict[str | int, dict[str, Any]] = {}
            for p in self.people.values():
                key = getattr(p, identifier)
                if key is not None:
                    out[key] = dict(p.attributes)
            return out

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy of the workspace (what `GET /_emulator/workspace` answers)."""
        with self.lock:
            return {
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
        email = person.email if person is not None else None
        if person is None and op.ref[0] == "email":
            email = str(op.ref[1])
        current = person.attributes if person is not None else {}
        merged = _merged(current, op.attributes or {}, rules)
        if email is not None:
            # The email a person is identified by stays its `email` attribute.
            merged["email"] = email
        if len(merged) > MAX_PERSON_ATTRIBUTES:
            raise ItemError(
                "attributes",
                f"person would have {len(merged)} attributes, limit {MAX_PERSON_ATTRIBUTES}",
            )
        if person is None:
            person = self._create(op.ref)
        elif op.ref[0] == "id":
            person.id = op.ref[1]
        person.attributes = merged
        for rel in op.relationships:
            self._relate(person.cio_id, _object_key(rel.ref), rel.attributes, rules)

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
        if rules.objects_share_attribute_limit and len(merged) > MAX_PERSON_ATTRIBUTES:
            raise ItemError(
                "attributes",
                f"object would have {len(merged)} attributes, limit {MAX_PERSON_ATTRIBUTES}",
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


def _object_key(ref: Ref) -> ObjectKey:
    return (ref[0], str(ref[1]))
