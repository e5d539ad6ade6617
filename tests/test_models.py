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
    assert set(models) == {"users", "companies", "memberships"}
    assert models["users"].kind is Kind.PERSON and models["users"].identifier == "email"
    assert models["companies"].object_type_id == "1" and models["companies"].key_columns == (
        "company_id",
    )
    assert models["memberships"].key_columns == ("email", "company_id")
    assert models["users"].description.startswith("Active users")
    assert [m.name for m in ordered_for_sync(models.values())] == [
        "companies",
        "users",
        "memberships",
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
            1,
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
