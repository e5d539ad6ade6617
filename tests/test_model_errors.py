"""Model errors a newcomer makes: each suggests the near valid word and points at the line
that holds the mistake (the `-- key:` line for a key column the SELECT does not return)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from cio_retl.errors import ModelError
from cio_retl.models import ALL_HEADER_KEYS, parse_model
from cio_retl.warehouse import Warehouse, create_engine


def _error(text: str, name: str = "users.sql") -> ModelError:
    with pytest.raises(ModelError) as caught:
        parse_model(Path(name), text)
    return caught.value


@pytest.mark.parametrize(
    ("header", "line", "suggestion"),
    [
        ("-- kind: person\n-- indentifier: email\n-- key: email\n", 2, "'identifier'"),
        ("-- kind: person\n-- identifier: email\n-- kye: email\n", 3, "'key'"),
        ("-- kind: object\n-- object_typeid: 1\n-- key: id\n", 2, "'object_type_id'"),
        ("-- kind: person\n-- identifier: email\n-- key: email\n-- max_delete: 5\n", 4, None),
        ("-- kind: peson\n-- identifier: email\n-- key: email\n", 1, "'person'"),
        ("-- kind: person\n-- identifier: emial\n-- key: email\n", 2, "'email'"),
        ("-- kind: person\n-- identifier: email\n-- key: email\n-- mode: miror\n", 4, "'mirror'"),
        (
            "-- kind: person\n-- identifier: email\n-- key: email\n-- removed_columns: kep\n",
            4,
            "'keep'",
        ),
    ],
)
def test_header_errors_suggest_the_closest_word_at_its_line(
    header: str, line: int, suggestion: str | None
) -> None:
    error = _error(header + "select email from users\n")
    assert error.line == line
    assert str(error).startswith(f"users.sql:{line}: ")
    if suggestion is None:  # max_delete: two keys are as near; the list of known keys helps
        assert "max_delete_pct" in str(error)
    else:
        assert f"(did you mean {suggestion}?)" in str(error)


def test_a_far_unknown_key_suggests_nothing_but_lists_the_known_ones() -> None:
    error = _error("-- kind: person\n-- colour: blue\nselect 1\n")
    assert "did you mean" not in str(error)
    assert all(key in str(error) for key in ALL_HEADER_KEYS)


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine("duckdb:///:memory:")
    yield engine
    engine.dispose()


def test_a_missing_key_column_is_reported_at_the_key_line(engine: Engine) -> None:
    model = parse_model(
        Path("users.sql"),
        "-- People.\n-- kind: person\n-- identifier: email\n-- key: emial\n\n"
        "select 'a@example.com' as email, 'Ada' as first_name\n",
    )
    with pytest.raises(ModelError) as caught:
        Warehouse(engine).columns(model)
    assert caught.value.line == 4  # `-- key: emial`, not the SELECT on line 6
    assert "key column(s) ['emial'] not in the result columns" in str(caught.value)
    assert "(did you mean 'email'?)" in str(caught.value)


def test_a_missing_relationship_key_points_at_its_own_header_line(engine: Engine) -> None:
    model = parse_model(
        Path("memberships.sql"),
        "-- kind: relationship\n-- person_identifier: id\n-- person_key: user_id\n"
        "-- object_type_id: 1\n-- object_key: company\n"
        "select 1 as user_id, 'co-1' as company_id\n",
    )
    with pytest.raises(ModelError) as caught:
        Warehouse(engine).columns(model)
    assert caught.value.line == 5
    assert "(did you mean 'company_id'?)" in str(caught.value)


def test_person_key_equal_to_object_key_points_at_object_key() -> None:
    error = _error(
        "-- kind: relationship\n-- person_identifier: id\n-- person_key: id\n"
        "-- object_type_id: 1\n-- object_key: id\nselect 1 as id\n",
        "memberships.sql",
    )
    assert error.line == 5
