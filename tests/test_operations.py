"""The encoder's assembled items are the items `build_item` describes, byte-checked by limits.

`encode` builds person and object identifies from serialized parts (so the canonical
attributes the snapshot stores are encoded once); these tests pin that the result parses to
exactly the item `build_item` gives, for creates, updates and full resyncs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cio_retl.limits import MAX_ITEM_BYTES, check_attributes
from cio_retl.models import Model, parse_model
from cio_retl.normalize import canonical_json, to_record
from cio_retl.operations import Operation, build_item, encode
from cio_retl.records import Change, Record, Rejection, RowChange

PERSON = parse_model(
    Path("people.sql"), "-- kind: person\n-- identifier: email\n-- key: email\nselect 1\n"
)
OBJECT = parse_model(
    Path("companies.sql"),
    "-- kind: object\n-- object_type_id: 1\n-- key: company_id\nselect 1\n",
)

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=6,
)
rows = st.dictionaries(names.filter(lambda n: n not in ("email", "company_id")), values)


def record_of(model: Model, row: dict[str, Any]) -> Record:
    key = model.key_columns[0]
    record = to_record(model, "k-1@example.com", {**row, key: "k-1@example.com"})
    assert isinstance(record, Record)
    return record


def encoded(model: Model, change: RowChange) -> Operation:
    op = encode(model, change)
    assert isinstance(op, Operation), op
    return op


@settings(max_examples=200, deadline=None)
@given(row=rows, previous=rows, person=st.booleans())
def test_assembled_items_are_the_described_items(
    row: dict[str, Any], previous: dict[str, Any], person: bool
) -> None:
    model = PERSON if person else OBJECT
    record = record_of(model, row)
    canonical = canonical_json(record.attributes)
    changed = {k: v for k, v in previous.items() if v is not None} or {"x": ""}
    for change in (
        RowChange(Change.CREATE, "k", "fp", record, send=record.attributes),
        RowChange(Change.UPDATE, "k", "fp", record, send=changed),
        RowChange(Change.UPDATE, "k", "fp", record, send={**record.attributes, **changed}),
    ):
        op = encoded(model, change)
        assert orjson.loads(op.item) == build_item(model, change)
        assert op.attributes == canonical  # what the snapshot stores once acknowledged


def test_a_create_carries_the_identifier_in_its_attributes_and_an_update_does_not() -> None:
    record = record_of(PERSON, {"plan": "pro"})
    create = encoded(PERSON, RowChange(Change.CREATE, "k", "fp", record, send=record.attributes))
    update = encoded(PERSON, RowChange(Change.UPDATE, "k", "fp", record, send={"plan": "max"}))
    assert orjson.loads(create.item) == {
        "type": "person",
        "action": "identify",
        "identifiers": {"email": "k-1@example.com"},
        "attributes": {"plan": "pro", "email": "k-1@example.com"},
    }
    assert orjson.loads(update.item)["attributes"] == {"plan": "max"}


def test_an_item_over_32_kb_is_rejected_by_the_assembled_path_too() -> None:
    # 40 values of 900 bytes: each under the value limit, together over the item limit.
    record = record_of(PERSON, {f"a{i}": "x" * 900 for i in range(40)})
    rejection = encode(PERSON, RowChange(Change.CREATE, "k", "fp", record, send=record.attributes))
    assert isinstance(rejection, Rejection) and rejection.field == "item"
    assert str(MAX_ITEM_BYTES) in rejection.reason


big_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)  # normalized: larger ones travel as text
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=400)
    | st.text(st.sampled_from('a"\\\n\u00e9\u20ac\U0001f600'), min_size=150, max_size=1100),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(attributes=st.dictionaries(names, big_values, max_size=6))
def test_the_serialized_size_shortcut_never_changes_a_verdict(attributes: dict[str, Any]) -> None:
    size = len(canonical_json(attributes))
    assert check_attributes(attributes, serialized_size=size) == check_attributes(attributes)


def test_objects_and_relationships_are_held_to_300_attributes_too() -> None:
    """Track API OpenAPI 1.0.0, "Track API limits": 300 unique attributes "per object or
    relationship", as per person."""
    record = record_of(OBJECT, {f"a{i}": i for i in range(300)})  # + object_id: 301
    rejection = encode(OBJECT, RowChange(Change.CREATE, "k", "fp", record, send=record.attributes))
    assert isinstance(rejection, Rejection) and "300-attribute limit" in rejection.reason
    fits = record_of(OBJECT, {f"a{i}": i for i in range(299)})
    assert isinstance(
        encode(OBJECT, RowChange(Change.CREATE, "k", "fp", fits, send=fits.attributes)), Operation
    )


def test_a_delete_from_an_old_snapshot_sends_text_identifiers() -> None:
    """Snapshots written when integer person ids went out as numbers keep `{"id": 42}`; the
    delete built from one follows the schema (`id` is `type: string`)."""
    people = parse_model(
        Path("u.sql"), "-- kind: person\n-- identifier: id\n-- key: uid\nselect 1\n"
    )
    rel = parse_model(
        Path("m.sql"),
        "-- kind: relationship\n-- person_identifier: id\n-- person_key: uid\n"
        "-- object_type_id: 1\n-- object_key: cid\nselect 1\n",
    )
    delete = RowChange(Change.DELETE, "42", identifiers={"id": 42})
    assert build_item(people, delete)["identifiers"] == {"id": "42"}
    old_rel = {"person": {"id": 42}, "object": {"object_type_id": "1", "object_id": "7"}}
    item = build_item(rel, RowChange(Change.DELETE, "42\x1f7", identifiers=old_rel))
    assert item["identifiers"] == {"id": "42"}
    assert item["cio_relationships"] == [{"identifiers": {"object_type_id": "1", "object_id": "7"}}]
