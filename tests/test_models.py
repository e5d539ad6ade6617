"""Model files: the header format, and errors that name the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cio_retl.errors import ModelError
from cio_retl.models import Kind, Mode, load_models, ordered_for_sync, parse_model

REPO = Path(__file__).resolve().parent.parent


def parse(text: str) -> object:
    return parse_model(Path("m.sql"), text)


def test_demo_models_parse() -> None:
    models = {m.name: m for m in load_models(REPO / "sql")}
    assert set(models) == {"users", "companies", "memberships", "orders", "devices"}
    assert models["orders"].kind is Kind.EVENT and models["orders"].event_name == "order_completed"
    assert models["devices"].key_columns == ("email", "device_token")
    assert models["users"].kind is Kind.PERSON and models["users"].identifier == "email"
    assert models["companies"].object_type_id == "1" and models["companies"].key_columns == (
        "company_id",
    )
    assert models["memberships"].key_columns == ("email", "company_id")
    assert models["users"].description.startswith("Active users")
    assert [m.name for m in ordered_for_sync(models.values())] == [
        "companies",
        "users",
        "devices",
        "memberships",
        "orders",
    ]


def test_full_header() -> None:
    model = parse_model(
        Path("people.sql"),
        "-- kind: person\n-- identifier: id\n-- key: user_id\n-- mode: mirror\n\nselect 1 as user_id;\n",
    )
    assert model.mode is Mode.MIRROR and model.sql == "select 1 as user_id" and model.sql_line == 6
    assert model.external_id_type == "CUSTOMERIO-person"


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        (
            "-- kind: person\n-- identifer: id\n-- key: k\nselect 1",
            "unknown header key 'identifer'",
            2,
        ),
        ("-- identifier: id\n-- key: k\nselect 1", "missing required header key 'kind'", 1),
        ("-- kind: people\nselect 1", "kind must be one of", 1),
        ("-- kind: person\n-- key: k\nselect 1", "missing required header key 'identifier'", 1),
        (
            "-- kind: person\n-- identifier: phone\n-- key: k\nselect 1",
            "identifier must be one of",
            2,
        ),
        (
            "-- kind: object\n-- key: k\n-- object_type_id: companies\nselect 1",
            "object_type_id must be",
            3,
        ),
        (
            "-- kind: object\n-- key: k\n-- object_type_id: 1\n-- identifier: id\nselect 1",
            "does not apply to kind object",
            4,
        ),
        (
            "-- kind: person\n-- identifier: id\n-- key: k\n-- mode: sync\nselect 1",
            "mode must be one of",
            4,
        ),
        ("-- kind: person\n-- identifier: id\n-- key: k\n-- key: j\nselect 1", "given twice", 4),
        ("-- kind: person\n-- identifier: id\n-- key:\nselect 1", "has no value", 3),
        ("-- kind: person\n-- identifier: id\n-- key: k\n", "no SELECT statement", 4),
        (
            "-- kind: person\n-- identifier: id\n-- key: k\ndelete from users",
            "must be one SELECT",
            4,
        ),
        (
            "-- kind: relationship\n-- person_identifier: id\n-- person_key: a\n-- object_type_id: 1\n"
            "-- object_key: a\nselect 1",
            "must be different columns",
            5,  # the object_key line, which repeats person_key
        ),
    ],
)
def test_header_errors_name_file_and_line(text: str, message: str, line: int) -> None:
    with pytest.raises(ModelError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"m.sql:{line}: ")


def test_two_models_with_one_name(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for folder in (tmp_path, tmp_path / "a"):
        (folder / "users.sql").write_text(
            "-- kind: person\n-- identifier: id\n-- key: k\nselect 1 as k"
        )
    with pytest.raises(ModelError, match="two models are named 'users'"):
        load_models(tmp_path)


def test_unknown_model_name_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no \.sql models found"):
        load_models(tmp_path)
    with pytest.raises(ModelError, match="no model named"):
        load_models(REPO / "sql", ["nope"])
    with pytest.raises(ModelError, match="models folder not found"):
        load_models(tmp_path / "missing")


# -- event, suppression and device models ---------------------------------------------------

EVENT = (
    "-- kind: event\n-- identifier: id\n-- key: user_id\n-- event_key: order_id\n"
    "-- name: order_completed\n-- timestamp: completed_at\n"
)
DEVICE = "-- kind: device\n-- identifier: id\n-- key: user_id\n-- token: t\n-- platform: p\n"


def test_event_suppression_and_device_headers() -> None:
    event = parse_model(Path("orders.sql"), EVENT + "-- lookback_days: 30\nselect 1")
    assert event.kind is Kind.EVENT and event.mode is Mode.APPEND
    assert (event.event_key, event.event_name, event.timestamp) == (
        "order_id",
        "order_completed",
        "completed_at",
    )
    assert event.lookback_days == 30 and event.key_columns == ("order_id",)
    assert event.required_columns == ("user_id", "order_id", "completed_at")
    assert event.external_id_type == "CUSTOMERIO-event"
    per_row = parse_model(
        Path("e.sql"),
        EVENT.replace("-- name: order_completed", "-- name_column: kind") + "select 1",
    )
    assert per_row.event_name is None and per_row.name_column == "kind"
    assert per_row.lookback_days is None and "kind" in per_row.required_columns

    suppression = parse("-- kind: suppression\n-- identifier: email\n-- key: email\nselect 1")
    assert isinstance(suppression, type(event))
    assert suppression.kind is Kind.SUPPRESSION and suppression.mode is Mode.MIRROR
    assert suppression.key_columns == ("email",)

    device = parse_model(Path("devices.sql"), DEVICE + "-- mode: mirror\nselect 1")
    assert device.mode is Mode.MIRROR and device.key_columns == ("user_id", "t")
    assert device.required_columns == ("user_id", "t", "p")

    orders = parse_model(Path("orders.sql"), EVENT + "select 1")
    others = [
        parse_model(Path(f"{name}.sql"), text)
        for name, text in (
            ("users", "-- kind: person\n-- identifier: id\n-- key: k\nselect 1"),
            ("gdpr", "-- kind: suppression\n-- identifier: id\n-- key: k\nselect 1"),
            ("devices", DEVICE + "select 1"),
            ("companies", "-- kind: object\n-- key: k\n-- object_type_id: 1\nselect 1"),
        )
    ]
    assert [m.name for m in ordered_for_sync([orders, *others])] == [
        "companies",
        "users",
        "devices",
        "orders",
        "gdpr",
    ]


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        # event: every required key, one missing at a time
        (EVENT.replace("-- event_key: order_id\n", "") + "select 1", "'event_key'", 1),
        (EVENT.replace("-- timestamp: completed_at\n", "") + "select 1", "'timestamp'", 1),
        (EVENT.replace("-- identifier: id\n", "") + "select 1", "'identifier'", 1),
        (EVENT.replace("-- key: user_id\n", "") + "select 1", "'key'", 1),
        # name: exactly one of name / name_column, at most 100 bytes
        (
            EVENT.replace("-- name: order_completed\n", "") + "select 1",
            "exactly one of 'name' and 'name_column'",
            1,
        ),
        (EVENT + "-- name_column: n\nselect 1", "exactly one of 'name' and 'name_column'", 7),
        (
            EVENT.replace("order_completed", "x" * 101) + "select 1",
            "event name is 101 bytes, over the 100-byte limit",
            5,
        ),
        (
            EVENT.replace("order_completed", "é" * 51) + "select 1",
            "event name is 102 bytes",
            5,
        ),
        # lookback_days: a whole number of days, at least 1
        (EVENT + "-- lookback_days: 0\nselect 1", "lookback_days must be a whole number", 7),
        (EVENT + "-- lookback_days: 7d\nselect 1", "lookback_days must be a whole number", 7),
        (EVENT + "-- lookback_days: -3\nselect 1", "lookback_days must be a whole number", 7),
        # the event's columns must be distinct
        (
            EVENT.replace("-- timestamp: completed_at", "-- timestamp: order_id") + "select 1",
            "event_key and timestamp must be different columns",
            6,
        ),
        (
            EVENT.replace("-- name: order_completed", "-- name_column: user_id") + "select 1",
            "key and name_column must be different columns",
            5,
        ),
        # an event is append-only: no other mode, no deletes, no changes
        (EVENT + "-- mode: mirror\nselect 1", "an event model is always append", 7),
        (EVENT + "-- mode: upsert\nselect 1", "mode 'upsert' does not apply", 7),
        (EVENT + "-- max_delete_pct: 5\nselect 1", "'max_delete_pct' does not apply", 7),
        (EVENT + "-- max_change_pct: 5\nselect 1", "'max_change_pct' does not apply", 7),
        (EVENT + "-- removed_columns: keep\nselect 1", "'removed_columns' does not apply", 7),
        (EVENT + "-- token: t\nselect 1", "'token' does not apply to kind event", 7),
        (EVENT + "-- object_type_id: 1\nselect 1", "'object_type_id' does not apply", 7),
        (
            EVENT.replace("identifier: id", "identifier: phone") + "select 1",
            "identifier must be one of",
            2,
        ),
        # suppression
        ("-- kind: suppression\n-- identifier: id\nselect 1", "'key' for kind suppression", 1),
        ("-- kind: suppression\n-- key: k\nselect 1", "'identifier' for kind suppression", 1),
        (
            "-- kind: suppression\n-- identifier: id\n-- key: k\n-- mode: upsert\nselect 1",
            "a suppression model is always mirror",
            4,
        ),
        (
            "-- kind: suppression\n-- identifier: id\n-- key: k\n-- name: x\nselect 1",
            "'name' does not apply to kind suppression",
            4,
        ),
        (
            "-- kind: suppression\n-- identifier: id\n-- key: k\n-- removed_columns: keep\nselect 1",
            "'removed_columns' does not apply",
            4,
        ),
        # device
        (DEVICE.replace("-- token: t\n", "") + "select 1", "'token' for kind device", 1),
        (DEVICE.replace("-- platform: p\n", "") + "select 1", "'platform' for kind device", 1),
        (DEVICE.replace("-- key: user_id\n", "") + "select 1", "'key' for kind device", 1),
        (DEVICE.replace("-- identifier: id\n", "") + "select 1", "'identifier'", 1),
        (DEVICE + "-- mode: upsert\nselect 1", "a device model is always mirror", 6),
        (DEVICE + "-- timestamp: t\nselect 1", "'timestamp' does not apply to kind device", 6),
        (
            DEVICE.replace("-- platform: p", "-- platform: t") + "select 1",
            "token and platform must be different columns",
            5,
        ),
        (
            DEVICE.replace("-- token: t", "-- token: user_id") + "select 1",
            "key and token must be different columns",
            4,
        ),
        # people and objects cannot choose the events' mode
        (
            "-- kind: person\n-- identifier: id\n-- key: k\n-- mode: append\nselect 1",
            "mode must be one of ['upsert', 'mirror']",
            4,
        ),
    ],
)
def test_event_suppression_device_header_errors(text: str, message: str, line: int) -> None:
    with pytest.raises(ModelError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"m.sql:{line}: ")
