"""Events, devices and suppressions as items: deterministic ULIDs, per-row checks, the
shapes of the official schema, and the phase order of a run."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from cio_retl.emulator.rules import Rules
from cio_retl.emulator.validation import validate_item
from cio_retl.models import parse_model
from cio_retl.normalize import to_event, to_record
from cio_retl.operations import Operation, Phase, build_item, encode, phases_of
from cio_retl.records import Change, Event, Record, Rejection, RowChange
from cio_retl.ulid import CROCKFORD_BASE32, MAX_ULID_MILLISECONDS, event_ulid, ulid_milliseconds

ORDERS = parse_model(
    Path("orders.sql"),
    "-- kind: event\n-- identifier: id\n-- key: user_id\n-- event_key: order_id\n"
    "-- name: order_completed\n-- timestamp: at\nselect 1",
)
PER_ROW = parse_model(
    Path("activity.sql"),
    "-- kind: event\n-- identifier: email\n-- key: email\n-- event_key: id\n"
    "-- name_column: what\n-- timestamp: at\nselect 1",
)
DEVICES = parse_model(
    Path("devices.sql"),
    "-- kind: device\n-- identifier: id\n-- key: user_id\n-- token: tok\n-- platform: os\nselect 1",
)
ERASURES = parse_model(
    Path("erasures.sql"), "-- kind: suppression\n-- identifier: email\n-- key: email\nselect 1"
)
# The ULID spec's form, written independently of cio_retl.ulid: 26 characters of
# Crockford's base32 (no I, L, O, U), the first at most 7 (128 bits).
ULID_FORM = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


def decode(ulid: str) -> int:
    return int("".join(f"{CROCKFORD_BASE32.index(c):05b}" for c in ulid), 2)


# -- ULIDs ----------------------------------------------------------------------------------


def test_event_ulid_is_deterministic_and_valid() -> None:
    ms = 1_700_000_000_123
    first = event_ulid(ms, "orders", "o-1")
    assert first == event_ulid(ms, "orders", "o-1")  # a resend carries the same id
    assert ULID_FORM.match(first) and len(first) == 26
    assert decode(first) >> 80 == ms == ulid_milliseconds(first)  # 48-bit time, then hash
    others = {
        event_ulid(ms, "orders", "o-2"),
        event_ulid(ms, "refunds", "o-1"),
        event_ulid(ms + 1, "orders", "o-1"),
        event_ulid(ms, "orders\x1fo", "-1"),
    }
    assert first not in others and len(others) == 4
    # The random part is the same hash at any time: only the time part moves.
    assert event_ulid(ms + 1, "orders", "o-1")[10:] == first[10:]
    # ULIDs of later events sort later (lexicographic order is time order).
    assert event_ulid(ms, "orders", "zzz") < event_ulid(ms + 1, "orders", "aaa")
    # The emulator's schema check accepts them.
    item = {"type": "person", "action": "event", "identifiers": {"id": "u"}, "name": "x"}
    assert validate_item({**item, "id": first}, Rules()).event is not None


@pytest.mark.parametrize("ms", [0, 1, MAX_ULID_MILLISECONDS])
def test_event_ulid_bounds(ms: int) -> None:
    ulid = event_ulid(ms, "m", "k")
    assert ULID_FORM.match(ulid) and ulid_milliseconds(ulid) == ms


@pytest.mark.parametrize("ms", [-1, MAX_ULID_MILLISECONDS + 1])
def test_event_ulid_refuses_times_it_cannot_hold(ms: int) -> None:
    with pytest.raises(ValueError, match="1970"):
        event_ulid(ms, "m", "k")


# -- event rows -----------------------------------------------------------------------------


def row(**values: Any) -> dict[str, Any]:
    return {
        "order_id": "o-1",
        "user_id": "u-1",
        "at": dt.datetime(2024, 5, 1, 12, 0, 0, 999_000),
        **values,
    }


@pytest.mark.parametrize(
    ("at", "ms"),
    [
        (dt.datetime(2024, 5, 1, 12, 0, 0, 999_000), 1_714_564_800_999),
        (dt.datetime(2024, 5, 1, 12, 0, 0, 999_999), 1_714_564_800_999),  # floored
        (
            dt.datetime(2024, 5, 1, 14, 0, 0, 999_000, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            1_714_564_800_999,
        ),
        (dt.date(2024, 5, 1), 1_714_521_600_000),
        (1_714_564_800, 1_714_564_800_000),  # Unix seconds
        (1_714_564_800.5, 1_714_564_800_500),
        (Decimal("1714564800.25"), 1_714_564_800_250),
    ],
)
def test_event_time_and_id(at: Any, ms: int) -> None:
    event = to_event(ORDERS, "o-1", row(at=at))
    assert isinstance(event, Event)
    assert event.timestamp == ms // 1000  # Unix seconds, floored like every timestamp
    assert event.id == event_ulid(ms, "orders", "o-1")
    assert event.name == "order_completed" and event.identifiers == {"id": "u-1"}


def test_event_data_is_every_other_column() -> None:
    event = to_event(
        PER_ROW,
        "e-1",
        {"id": "e-1", "email": "a@x.io", "what": "trial_ended", "at": 0, "plan": "pro", "n": None},
    )
    assert isinstance(event, Event)
    assert (event.name, event.data, event.identifiers) == (
        "trial_ended",
        {"plan": "pro"},  # NULL columns are left out of the data
        {"email": "a@x.io"},
    )
    item = build_item(PER_ROW, RowChange(Change.CREATE, "e-1", event=event))
    assert item == {
        "type": "person",
        "action": "event",
        "identifiers": {"email": "a@x.io"},
        "id": event.id,
        "name": "trial_ended",
        "timestamp": 0,
        "attributes": {"plan": "pro"},
    }
    assert validate_item(item, Rules()).event is not None


@pytest.mark.parametrize(
    ("model", "values", "reason"),
    [
        (ORDERS, {"at": None}, "timestamp (at) is NULL"),
        (
            ORDERS,
            {"at": "2024-05-01"},
            "timestamp (at) must be a timestamp, a date or Unix seconds",
        ),
        (ORDERS, {"at": True}, "must be a timestamp"),
        (ORDERS, {"at": dt.datetime(1969, 12, 31)}, "a ULID holds times from 1970"),
        (ORDERS, {"user_id": None}, "identifier id is NULL"),
        (ORDERS, {"total": b"\x00"}, "binary values cannot be sent"),
        (PER_ROW, {"what": "x" * 101}, "event name is 101 bytes, over the 100-byte limit"),
        (PER_ROW, {"what": "é" * 51}, "event name is 102 bytes"),
        (PER_ROW, {"what": None}, "event name (what) must be a non-empty string"),
        (PER_ROW, {"what": "  "}, "must be a non-empty string"),
    ],
)
def test_bad_event_rows_are_rejected(model: Any, values: dict[str, Any], reason: str) -> None:
    base = {"id": "e-1", "email": "a@x.io", "what": "signed_up"} if model is PER_ROW else {}
    rejection = to_event(model, "o-1", {**row(), **base, **values})
    assert isinstance(rejection, Rejection) and reason in rejection.reason


def test_an_event_over_32_kb_is_rejected_alone() -> None:
    event = to_event(ORDERS, "o-1", row(note="x" * 999, **{f"c{i}": "y" * 990 for i in range(33)}))
    assert isinstance(event, Event)
    rejection = encode(ORDERS, RowChange(Change.CREATE, "o-1", event=event))
    assert isinstance(rejection, Rejection)
    assert "over the 32768-byte limit per item" in rejection.reason
    small = to_event(ORDERS, "o-2", row(note="x"))
    assert isinstance(small, Event)
    operation = encode(ORDERS, RowChange(Change.CREATE, "o-2", event=small))
    assert isinstance(operation, Operation)
    assert orjson.loads(operation.item)["attributes"] == {"note": "x"}


# -- devices and suppressions ---------------------------------------------------------------


def test_device_items_follow_the_schema() -> None:
    record = to_record(
        DEVICES,
        "u-1\x1ft-1",
        {
            "user_id": "u-1",
            "tok": "t-1",
            "os": "iOS",
            "last_used": dt.datetime(2024, 5, 1),
            "push_enabled": True,
            "build": 42,
            "app_version": "2.1",
            "gone": None,
        },
    )
    assert isinstance(record, Record)
    assert record.attributes == {
        "token": "t-1",
        "platform": "ios",
        "last_used": 1_714_521_600,
        "attributes": {"push_enabled": "true", "build": "42", "app_version": "2.1"},
    }
    change = RowChange(Change.UPDATE, record.key, "fp", record, send={"platform": "ios"})
    add = build_item(DEVICES, change)
    assert add == {  # a changed device is added again whole, not only what changed
        "type": "person",
        "action": "add_device",
        "identifiers": {"id": "u-1"},
        "device": record.attributes,
    }
    delete = build_item(
        DEVICES,
        RowChange(Change.DELETE, record.key, identifiers={"person": {"id": "u-1"}, "token": "t-1"}),
    )
    assert delete == {
        "type": "person",
        "action": "delete_device",
        "identifiers": {"id": "u-1"},
        "device": {"token": "t-1"},
    }
    for item in (add, delete):
        assert validate_item(item, Rules()).device is not None


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"os": "web"}, "device platform (os) must be ios or android, not 'web'"),
        ({"os": None}, "must be ios or android, not None"),
        ({"tok": None}, "device token (tok) must be a non-empty string"),
        ({"tok": ""}, "must be a non-empty string"),
        ({"last_used": "yesterday"}, "device last_used must be a timestamp"),
        ({"user_id": None}, "identifier id is NULL"),
    ],
)
def test_bad_device_rows_are_rejected(values: dict[str, Any], reason: str) -> None:
    rejection = to_record(DEVICES, "k", {"user_id": "u-1", "tok": "t", "os": "android", **values})
    assert isinstance(rejection, Rejection) and reason in rejection.reason


def test_suppression_items() -> None:
    record = to_record(ERASURES, "a@x.io", {"email": "a@x.io", "requested_at": 5})
    assert isinstance(record, Record) and record.attributes == {}  # identifiers only
    suppress = build_item(ERASURES, RowChange(Change.CREATE, "a@x.io", "fp", record, send={}))
    unsuppress = build_item(
        ERASURES, RowChange(Change.DELETE, "a@x.io", identifiers={"email": "a@x.io"})
    )
    assert suppress == {"type": "person", "action": "suppress", "identifiers": {"email": "a@x.io"}}
    assert unsuppress == {**suppress, "action": "unsuppress"}
    for item in (suppress, unsuppress):
        assert validate_item(item, Rules()).action == item["action"]
    bad = to_record(ERASURES, "x", {"email": "not-an-email"})
    assert isinstance(bad, Rejection)


def test_phase_order_across_kinds() -> None:
    assert [p.name for p in Phase] == [
        "UNSUPPRESS",
        "OBJECT_IDENTIFY",
        "PERSON_IDENTIFY",
        "DEVICE_ADD",
        "RELATIONSHIP_ADD",
        "RELATIONSHIP_DELETE",
        "EVENT",
        "SUPPRESS",
        "DELETE",
    ]
    assert phases_of(ORDERS) == (Phase.EVENT, None)
    assert phases_of(DEVICES) == (Phase.DEVICE_ADD, Phase.DELETE)
    assert phases_of(ERASURES) == (Phase.SUPPRESS, Phase.UNSUPPRESS)
