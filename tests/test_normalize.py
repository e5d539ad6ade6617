"""Normalization and hashing: what is compared is exactly what is sent, the same every run."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cio_retl.diff import REMOVED, changed_attributes, same_value
from cio_retl.models import parse_model
from cio_retl.normalize import (
    UnsupportedValue,
    canonical_json,
    normalize_attributes,
    normalize_value,
    text_identifiers,
    to_record,
    upgrade_previous,
)
from cio_retl.records import Record, Rejection

UTC = dt.UTC


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ('héllo 🎉 "quoted"', 'héllo 🎉 "quoted"'),
        (True, True),
        (False, False),
        (42, 42),
        (2**53 - 1, 2**53 - 1),
        (2**70, "1180591620717411303424"),  # exact: JSON readers would round it
        (-(2**63), "-9223372036854775808"),
        (1.5, 1.5),
        (3.0, 3),
        (float("nan"), None),
        (Decimal("12.50"), 12.5),
        (Decimal("100.00"), 100),
        (Decimal("NaN"), None),
        (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), 1704164645),
        (dt.datetime(2024, 1, 2, 3, 4, 5), 1704164645),  # naive = UTC
        (dt.datetime(2024, 1, 2, 4, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1))), 1704164645),
        (dt.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), -1),
        (dt.date(2024, 1, 2), 1704153600),
        (dt.time(13, 45, 0), "13:45:00"),
        (dt.timedelta(minutes=90), 5400),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        ({"a": Decimal("1.0"), "b": [dt.date(1970, 1, 2), None]}, {"a": 1, "b": [86400, None]}),
        ((1, 2), [1, 2]),
    ],
)
def test_normalize_value(value: Any, expected: Any) -> None:
    result = normalize_value(value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    "value", [b"\x00", bytearray(b"x"), memoryview(b"x"), math.inf, Decimal("-Infinity"), object()]
)
def test_unsendable_values_are_refused(value: Any) -> None:
    with pytest.raises(UnsupportedValue):
        normalize_value(value)


def test_nulls_are_dropped_and_named_on_error() -> None:
    assert normalize_attributes({"a": None, "b": float("nan"), "c": 1}) == {"c": 1}
    with pytest.raises(UnsupportedValue, match="column 'blob'"):
        normalize_attributes({"blob": b"x"})


def test_canonical_json_is_stable_and_order_free() -> None:
    a = canonical_json({"x": 1, "y": {"b": 2, "a": [1, "é"]}})
    b = canonical_json({"y": {"a": [1, "é"], "b": 2}, "x": 1})
    # Pinned: the snapshot keeps these bytes, and the database's payload SQL writes the same
    # (tests/test_payload_sql.py), keys sorted at every depth, UTF-8 unescaped.
    assert a == b == '{"x":1,"y":{"a":[1,"é"],"b":2}}'.encode()
    assert canonical_json({}) == b"{}"
    assert len({canonical_json({"n": value}) for value in (1, True, "1")}) == 3


PERSON = parse_model(
    Path("users.sql"), "-- kind: person\n-- identifier: id\n-- key: user_id\nselect 1"
)
OBJECT = parse_model(Path("co.sql"), "-- kind: object\n-- object_type_id: 2\n-- key: cid\nselect 1")
REL_BY_ID = parse_model(
    Path("r.sql"),
    "-- kind: relationship\n-- person_identifier: id\n-- person_key: uid\n"
    "-- object_type_id: 2\n-- object_key: cid\nselect 1",
)
REL = parse_model(
    Path("m.sql"),
    "-- kind: relationship\n-- person_identifier: email\n-- person_key: email\n"
    "-- object_type_id: 2\n-- object_key: cid\nselect 1",
)


def test_person_record_follows_mapped_to_destination() -> None:
    """An integer id travels as its text everywhere (Track API OpenAPI 1.0.0: person `id` is
    `type: string`): in identifiers, in the external id and in the attribute copy."""
    record = to_record(PERSON, "42", {"user_id": 42, "plan": "pro", "gone": None})
    assert isinstance(record, Record)
    assert record.external_id == {"type": "CUSTOMERIO-person", "identifierType": "id", "id": "42"}
    assert record.identifiers == {"id": "42"}
    assert record.attributes == {"plan": "pro", "id": "42"}


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (42, "42"),
        (-7, "-7"),
        (2**60, str(2**60)),
        (Decimal("1205"), "1205"),
        (Decimal("12345678901234567890123"), "12345678901234567890123"),
        (3.0, "3"),
        (uuid.UUID(int=5), str(uuid.UUID(int=5))),
        ("u-1", "u-1"),
    ],
)
def test_every_identifier_is_text(raw: Any, text: str) -> None:
    person = to_record(PERSON, text, {"user_id": raw})
    obj = to_record(OBJECT, text, {"cid": raw})
    rel = to_record(REL_BY_ID, text, {"uid": raw, "cid": raw})
    assert isinstance(person, Record) and isinstance(obj, Record) and isinstance(rel, Record)
    assert person.identifiers == {"id": text} and person.external_id["id"] == text
    assert obj.identifiers == {"object_type_id": "2", "object_id": text}
    assert rel.identifiers == {
        "person": {"id": text},
        "object": {"object_type_id": "2", "object_id": text},
    }
    assert rel.external_id["id"] == text


def test_identifiers_kept_in_an_old_snapshot_become_text() -> None:
    assert text_identifiers({"id": 42}) == {"id": "42"}
    assert text_identifiers(
        {"person": {"id": 7}, "object": {"object_type_id": "1", "object_id": "a"}}
    ) == {"person": {"id": "7"}, "object": {"object_type_id": "1", "object_id": "a"}}
    assert text_identifiers({"email": "a@x.io"}) == {"email": "a@x.io"}
    assert upgrade_previous(PERSON, {"id": 42, "n": 1}) == {"id": "42", "n": 1}
    assert upgrade_previous(PERSON, {"id": "42", "n": 1}) == {"id": "42", "n": 1}


def test_object_and_relationship_records_use_strings() -> None:
    record = to_record(OBJECT, "7", {"cid": 7, "name": "Acme"})
    assert isinstance(record, Record)
    assert record.identifiers == {"object_type_id": "2", "object_id": "7"}
    assert record.attributes == {"name": "Acme", "object_id": "7"}
    rel = to_record(REL, "a@x.io\x1f7", {"email": "a@x.io", "cid": 7, "role": "admin"})
    assert isinstance(rel, Record)
    assert rel.identifiers == {
        "person": {"email": "a@x.io"},
        "object": {"object_type_id": "2", "object_id": "7"},
    }
    assert rel.attributes == {"role": "admin"}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"user_id": None}, "is NULL"),
        ({"user_id": ""}, "is empty"),
        ({"user_id": "x" * 151}, "151 bytes, over the 150-byte limit"),
        ({"user_id": "a\nb"}, "control characters"),
        ({"user_id": True}, "must be text or an integer, got bool"),
        ({"user_id": 1.5}, "must be text or an integer, got float"),
        ({"user_id": 1, "photo": b"\x89PNG"}, "binary"),
    ],
)
def test_rows_that_cannot_be_records(row: dict[str, Any], reason: str) -> None:
    rejection = to_record(PERSON, "k", row)
    assert isinstance(rejection, Rejection) and reason in rejection.reason


def test_identifier_at_the_limit_is_fine() -> None:
    assert isinstance(to_record(PERSON, "k", {"user_id": "é" * 75}), Record)  # 150 bytes


def test_email_identifier_must_look_like_an_email() -> None:
    model = parse_model(
        Path("u.sql"), "-- kind: person\n-- identifier: email\n-- key: email\nselect 1"
    )
    assert isinstance(to_record(model, "k", {"email": "a@b.io"}), Record)
    for bad in ("not-an-email", "a b@c.io", "@c.io", "a@"):
        assert isinstance(to_record(model, "k", {"email": bad}), Rejection)


def test_changed_attributes() -> None:
    previous = {"plan": "free", "n": 1, "flag": True, "tags": ["a"], "old": "x"}
    current = {"plan": "pro", "n": 1, "flag": 1, "tags": ["a"], "new": {"k": 1}}
    assert changed_attributes(previous, current) == {
        "plan": "pro",
        "flag": 1,
        "new": {"k": 1},
        "old": REMOVED,
    }
    assert changed_attributes(current, current) == {}


def test_same_value_is_type_strict() -> None:
    assert same_value(1, 1) and not same_value(True, 1) and not same_value(1, 1.5)
    assert same_value({"a": [1]}, {"a": [1]}) and not same_value({"a": 1}, {"a": True})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
attribute_maps = st.dictionaries(st.text(min_size=1, max_size=6), json_values, max_size=6)


@given(attribute_maps, attribute_maps)
def test_applying_the_change_reaches_the_current_state(
    previous: dict[str, Any], current: dict[str, Any]
) -> None:
    """Customer.io merges attributes and "" removes one: previous + send == current."""
    previous = normalize_attributes(previous)
    current = normalize_attributes(current)
    send = changed_attributes(previous, current)
    merged = dict(previous)
    for name, value in send.items():
        if value == REMOVED and name not in current:
            merged.pop(name, None)
        else:
            merged[name] = value
    assert canonical_json(merged) == canonical_json(current)
    assert all(same_value(previous[k], v) for k, v in current.items() if k not in send)
