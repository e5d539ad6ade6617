"""The Track API emulator, exercised over real HTTP (httpx and the official SDK), no mocks."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from cio_retl.emulator import (
    MAX_ATTRIBUTE_NAME_BYTES,
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_ITEMS,
    MAX_IDENTIFIER_BYTES,
    MAX_ITEM_BYTES,
    Emulator,
    FaultPlan,
    Rules,
)

AUTH = ("site-id", "api-key")
JSON = {"Content-Type": "application/json"}


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Emulator]:
    with Emulator() as emu:
        yield emu


@pytest.fixture
def emu(server: Emulator) -> Emulator:
    server.reset()
    return server


@pytest.fixture(scope="module")
def module_client(server: Emulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, auth=AUTH, timeout=10) as client:
        yield client


@pytest.fixture
def client(emu: Emulator, module_client: httpx.Client) -> httpx.Client:
    return module_client


def person(
    ident: dict[str, Any],
    attrs: dict[str, Any] | None = None,
    action: str = "identify",
    rels: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "person", "action": action, "identifiers": ident}
    if attrs is not None:
        item["attributes"] = attrs
    if rels is not None:
        item["cio_relationships"] = rels
    return item


def obj(
    object_id: str,
    attrs: dict[str, Any] | None = None,
    action: str = "identify",
    rels: list[dict[str, Any]] | None = None,
    type_id: str = "1",
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "type": "object",
        "action": action,
        "identifiers": {"object_type_id": type_id, "object_id": object_id},
    }
    if attrs is not None:
        item["attributes"] = attrs
    if rels is not None:
        item["cio_relationships"] = rels
    return item


def to_object(object_id: str, **rel_attrs: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"identifiers": {"object_type_id": "1", "object_id": object_id}}
    if rel_attrs:
        entry["relationship_attributes"] = rel_attrs
    return entry


def to_person(ident: dict[str, Any], **rel_attrs: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"identifiers": ident}
    if rel_attrs:
        entry["relationship_attributes"] = rel_attrs
    return entry


def batch(client: httpx.Client, *items: Any) -> httpx.Response:
    return client.post("/api/v2/batch", json={"batch": list(items)})


def raw_batch(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("/api/v2/batch", content=body, headers=JSON)


def errors(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 207, response.text
    result: list[dict[str, Any]] = response.json()["errors"]
    return result


def item_of_size(size: int) -> dict[str, Any]:
    """A valid person identify whose compact JSON is exactly `size` bytes."""
    item = person({"id": "big"}, {})
    attrs = item["attributes"]
    i = 0
    while len(orjson.dumps(item)) + 1100 < size:
        attrs[f"a{i:02d}"] = "x" * MAX_ATTRIBUTE_VALUE_BYTES
        i += 1
    attrs["pad"] = ""
    attrs["pad"] = "x" * (size - len(orjson.dumps(item)))
    assert len(orjson.dumps(item)) == size
    return item


def rels_of(emu: Emulator) -> dict[tuple[Any, str], dict[str, Any]]:
    """{(person id or email, object_id): relationship_attributes}."""
    return {
        (r["person"]["id"] or r["person"]["email"], r["object_id"]): r["relationship_attributes"]
        for r in emu.snapshot()["relationships"]
    }


# -- auth, region, routing ---------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, ("site-id", "wrong"), ("other", "api-key")])
def test_bad_credentials_are_401_and_apply_nothing(
    emu: Emulator, auth: tuple[str, str] | None
) -> None:
    with httpx.Client(base_url=emu.url, auth=auth) as anonymous:
        response = batch(anonymous, person({"id": "u1"}, {"plan": "pro"}))
        region = anonymous.get("/api/v1/accounts/region")
    assert response.status_code == 401
    assert response.json() == {"meta": {"error": "Unauthorized request"}}
    assert region.status_code == 401
    assert emu.workspace.people == {}


def test_region_answers_for_valid_credentials(client: httpx.Client, emu: Emulator) -> None:
    response = client.get("/api/v1/accounts/region")
    assert response.status_code == 200
    # Customer.io Track API OpenAPI 1.0.0, operation getRegion: url, region, environment_id.
    assert response.json() == {"url": emu.url, "region": "us", "environment_id": 1}


def test_region_answer_names_the_configured_workspace() -> None:
    with (
        Emulator(region="eu", environment_id=77) as eu,
        httpx.Client(base_url=eu.url, auth=("site-id", "api-key")) as client,
    ):
        answer = client.get("/api/v1/accounts/region").json()
        assert answer == {"url": eu.url, "region": "eu", "environment_id": 77}


def test_inspection_needs_no_auth_and_unknown_paths_404_wrong_methods_405(emu: Emulator) -> None:
    with httpx.Client(base_url=emu.url) as anonymous:
        assert anonymous.get("/_emulator/workspace").status_code == 200
        assert anonymous.get("/api/v2/nope").status_code == 404
        assert anonymous.get("/_emulator/nope").status_code == 404
        wrong = anonymous.get("/api/v2/batch")
        assert wrong.status_code == 405
        assert wrong.headers["Allow"] == "POST"
        assert anonymous.post("/api/v1/accounts/region").status_code == 405
        assert anonymous.get("/api/v1/customers/u1").status_code == 405
        assert anonymous.get("/_emulator/reset").status_code == 405


# -- applying ----------------------------------------------------------------------------


def test_batch_of_valid_items_is_200_and_applied(client: httpx.Client, emu: Emulator) -> None:
    response = batch(
        client,
        person({"id": "u1"}, {"plan": "pro", "created_at": 1700000000}),
        person({"email": "ada@example.com"}, {"name": "Ada"}),
        person({"id": "42"}, {"tags": ["a", "b"], "address": {"city": "Paris"}}),
        obj("acme", {"name": "Acme"}),
    )
    assert response.status_code == 200
    assert response.json() == {}
    assert emu.workspace.people_by("id") == {
        "u1": {"plan": "pro", "created_at": 1700000000},
        "42": {"tags": ["a", "b"], "address": {"city": "Paris"}},
    }
    assert emu.workspace.people_by("email") == {
        "ada@example.com": {"email": "ada@example.com", "name": "Ada"}
    }
    assert emu.workspace.objects == {("1", "acme"): {"name": "Acme"}}
    assert emu.invalid_items == []


def test_identify_merges_and_finds_people_by_each_identifier(
    client: httpx.Client, emu: Emulator
) -> None:
    batch(client, person({"id": "u1"}, {"a": 1, "b": 2}), person({"email": "e@x.io"}, {"a": 1}))
    found = emu.workspace.person(id="u1")
    assert found is not None
    batch(
        client,
        person({"id": "u1"}, {"b": 3, "c": 4}),
        person({"cio_id": found.cio_id}, {"d": 5}),
        person({"email": "e@x.io"}, {"email": "changed@x.io", "z": 0}),
    )
    assert emu.workspace.person(cio_id=found.cio_id) is found
    assert found.attributes == {"a": 1, "b": 3, "c": 4, "d": 5}
    by_email = emu.workspace.person(email="e@x.io")
    assert by_email is not None and by_email.id is None
    # The email a person is identified by stays its email attribute.
    assert by_email.attributes == {"email": "e@x.io", "a": 1, "z": 0}
    assert len(emu.workspace.people) == 2


def test_numbers_where_the_schema_says_string_are_refused(
    client: httpx.Client, emu: Emulator
) -> None:
    """Track API OpenAPI 1.0.0: person `id`, `email`, `cio_id`, `object_type_id` and
    `object_id` are `type: string`, in `identifiers` and in `cio_relationships` alike; a
    number is an item error (207 naming its index), and the string form of it is fine."""
    response = batch(
        client,
        person({"id": 7}, {"a": 1}),
        person({"id": "7"}, {"b": 2}),
        person({"id": "8"}, rels=[{"identifiers": {"object_type_id": "1", "object_id": 5}}]),
        obj("o", rels=[to_person({"id": 9})]),
        {**obj("o"), "identifiers": {"object_type_id": 1, "object_id": "o"}},
        person({"cio_id": 3}),
    )
    assert [(e["batch_index"], e["field"]) for e in errors(response)] == [
        (0, "identifiers.id"),
        (2, "cio_relationships[0].identifiers.object_id"),
        (3, "cio_relationships[0].identifiers.id"),
        (4, "identifiers.object_type_id"),
        (5, "identifiers.cio_id"),
    ]
    assert errors(response)[0]["message"] == "must be a string (the schema's type), not a number"
    assert emu.workspace.people_by("id") == {"7": {"b": 2}}
    assert emu.workspace.objects == {}


def test_subscription_preferences_follow_the_schema(client: httpx.Client, emu: Emulator) -> None:
    """Track API OpenAPI 1.0.0, Person > identify: `cio_subscription_preferences.topics` maps
    `topic_<id>` to a boolean, nested or in dot notation; an empty value reverts a topic."""
    response = batch(
        client,
        person({"id": "a"}, {"cio_subscription_preferences": {"topics": {"topic_1": True}}}),
        person({"id": "b"}, {"cio_subscription_preferences.topics.topic_2": False}),
        person({"id": "c"}, {"cio_subscription_preferences": {"topics": {"topic_3": ""}}}),
        # The form of the document's own request examples: topics directly in it.
        person({"id": "d"}, {"cio_subscription_preferences": {"topic_1": True, "topic_2": False}}),
    )
    assert response.status_code == 200, response.text
    assert emu.invalid_items == []


def test_the_entity_endpoint_refuses_a_number_with_400(client: httpx.Client, emu: Emulator) -> None:
    response = client.post("/api/v2/entity", json=person({"id": 42}, {"a": 1}))
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "identifiers.id"
    assert emu.workspace.people == {}
    assert client.post("/api/v2/entity", json=person({"id": "42"}, {"a": 1})).status_code == 200
    assert emu.workspace.people_by("id") == {"42": {"a": 1}}


def test_items_in_a_batch_apply_in_order(client: httpx.Client, emu: Emulator) -> None:
    response = batch(
        client,
        person({"id": "u1"}, {"v": 1, "gone": True}),
        person({"id": "u1"}, {"v": 2}),
        person({"id": "u1"}, action="delete"),
        person({"id": "u1"}, {"v": 3}),
    )
    assert response.status_code == 200
    assert emu.workspace.people_by("id") == {"u1": {"v": 3}}


def test_207_names_the_bad_items_and_applies_the_rest(client: httpx.Client, emu: Emulator) -> None:
    bad_ident = person({"id": ""}, {"x": 1})
    bad_type = {"type": "event", "action": "identify", "identifiers": {"id": "u9"}}
    response = batch(
        client,
        person({"id": "u1"}, {"n": 1}),
        bad_ident,
        person({"id": "u2"}, {"n": 2}),
        bad_type,
        person({"id": "u1"}, {"n": 3}),
    )
    assert errors(response) == [
        {
            "batch_index": 1,
            "reason": "invalid",
            "field": "identifiers.id",
            "message": "must not be empty",
        },
        {
            "batch_index": 3,
            "reason": "invalid",
            "field": "type",
            "message": "unsupported type 'event': use person or object",
        },
    ]
    assert emu.workspace.people_by("id") == {"u1": {"n": 3}, "u2": {"n": 2}}
    assert [(v.batch_index, v.field, v.item) for v in emu.invalid_items] == [
        (1, "identifiers.id", bad_ident),
        (3, "type", bad_type),
    ]


INVALID_ITEMS: list[tuple[str, Any, str]] = [
    ("not an object", ["x"], "item"),
    ("missing type", {"action": "identify", "identifiers": {"id": "u"}}, "type"),
    ("missing action", {"type": "person", "identifiers": {"id": "u"}}, "action"),
    ("out of scope action", person({"id": "u"}, action="page"), "action"),
    ("merge out of scope", person({"id": "u"}, action="merge"), "action"),
    ("unknown action", person({"id": "u"}, action="upsert"), "action"),
    ("action not a string", person({"id": "u"}, action=["identify"]), "action"),  # type: ignore[arg-type]
    ("type not a string", {**person({"id": "u"}), "type": {"person": 1}}, "type"),
    ("unknown top-level key", {**person({"id": "u"}), "timestamp": 1}, "timestamp"),
    ("attributes on delete", person({"id": "u"}, {"a": 1}, action="delete"), "attributes"),
    (
        "attributes on add_relationships",
        person({"id": "u"}, {"a": 1}, action="add_relationships", rels=[to_object("o")]),
        "attributes",
    ),
    ("missing identifiers", {"type": "person", "action": "identify"}, "identifiers"),
    ("two identifiers", person({"id": "u", "email": "e@x"}), "identifiers"),
    ("no identifier", person({}), "identifiers"),
    ("unknown identifier", person({"user_id": "u"}), "identifiers"),
    ("identifiers not a dict", person(["u"]), "identifiers"),  # type: ignore[arg-type]
    ("integer id", person({"id": 42}), "identifiers.id"),
    (
        "subscription preferences not an object",
        person({"id": "u"}, {"cio_subscription_preferences": "all"}),
        "attributes.cio_subscription_preferences",
    ),
    (
        "subscription preferences with another key",
        person({"id": "u"}, {"cio_subscription_preferences": {"email": True}}),
        "attributes.cio_subscription_preferences.email",
    ),
    (
        "subscription topic not a boolean",
        person({"id": "u"}, {"cio_subscription_preferences": {"topics": {"topic_1": "yes"}}}),
        "attributes.cio_subscription_preferences.topics.topic_1",
    ),
    (
        "subscription topic misnamed (dot notation)",
        person({"id": "u"}, {"cio_subscription_preferences.topics.news": True}),
        "attributes.cio_subscription_preferences.topics.news",
    ),
    ("float id", person({"id": 1.5}), "identifiers.id"),
    ("bool id", person({"id": True}), "identifiers.id"),
    ("integer email", person({"email": 5}), "identifiers.email"),
    ("empty email", person({"email": ""}), "identifiers.email"),
    ("unknown cio_id", person({"cio_id": "cio_999"}, {"a": 1}), "identifiers.cio_id"),
    (
        "integer object_type_id",
        {**obj("o"), "identifiers": {"object_type_id": 1, "object_id": "o"}},
        "identifiers.object_type_id",
    ),
    ("non-digit object_type_id", obj("o", type_id="companies"), "identifiers.object_type_id"),
    ("object_type_id 0", obj("o", type_id="0"), "identifiers.object_type_id"),
    ("delivery out of scope", {**person({"id": "u"}), "type": "delivery"}, "type"),
    ("identify_anonymous out of scope", obj("o", action="identify_anonymous"), "action"),
    (
        "integer id in an object's relationship",
        obj("o", rels=[to_person({"id": 1})]),
        "cio_relationships[0].identifiers.id",
    ),
    (
        "integer object_id",
        {**obj("o"), "identifiers": {"object_type_id": "1", "object_id": 5}},
        "identifiers.object_id",
    ),
    ("empty object_id", obj(""), "identifiers.object_id"),
    (
        "extra object identifier",
        {**obj("o"), "identifiers": {"object_type_id": "1", "object_id": "o", "id": "x"}},
        "identifiers",
    ),
    ("attributes not an object", person({"id": "u"}, ["a"]), "attributes"),  # type: ignore[arg-type]
    ("empty attribute name", person({"id": "u"}, {"": 1}), "attributes"),
    ("relationships not a list", person({"id": "u"}, rels={"a": 1}), "cio_relationships"),  # type: ignore[arg-type]
    (
        "add without relationships",
        person({"id": "u"}, action="add_relationships"),
        "cio_relationships",
    ),
    (
        "add with empty relationships",
        person({"id": "u"}, action="add_relationships", rels=[]),
        "cio_relationships",
    ),
    (
        "delete_relationships without relationships",
        obj("o", action="delete_relationships"),
        "cio_relationships",
    ),
    (
        "person names a person",
        person({"id": "u"}, rels=[to_person({"id": "v"})]),
        "cio_relationships[0].identifiers",
    ),
    ("object names an object", obj("o", rels=[to_object("p")]), "cio_relationships[0].identifiers"),
    (
        "relationship entry key",
        person({"id": "u"}, rels=[{**to_object("o"), "x": 1}]),
        "cio_relationships[0].x",
    ),
    (
        "relationship without identifiers",
        person({"id": "u"}, rels=[{}]),
        "cio_relationships[0].identifiers",
    ),
    (
        "relationship attributes not an object",
        person({"id": "u"}, rels=[{**to_object("o"), "relationship_attributes": 3}]),
        "cio_relationships[0].relationship_attributes",
    ),
    (
        "object relationship to unknown cio_id",
        obj("o", rels=[to_person({"cio_id": "cio_9"})]),
        "cio_relationships[0].identifiers.cio_id",
    ),
]


@pytest.mark.parametrize(
    ("item", "field"), [(i, f) for _, i, f in INVALID_ITEMS], ids=[n for n, _, _ in INVALID_ITEMS]
)
def test_invalid_items_are_refused_with_their_field(
    client: httpx.Client, emu: Emulator, item: Any, field: str
) -> None:
    response = batch(client, person({"id": "ok"}), item)
    (error,) = errors(response)
    assert error["batch_index"] == 1
    assert error["reason"] == "invalid"
    assert error["field"] == field
    assert error["message"]
    assert emu.workspace.people_by("id") == {"ok": {}}
    assert emu.workspace.objects == {}
    assert emu.invalid_items[0].item == item


def test_the_207_reading_without_batch_index() -> None:
    """[open] Rules(errors_name_batch_index=False): the 207 body as the OpenAPI document
    lists it, `reason`, `field` and `message` only."""
    with (
        Emulator(rules=Rules(errors_name_batch_index=False)) as emu,
        httpx.Client(base_url=emu.url, auth=AUTH) as client,
    ):
        response = batch(client, person({"id": "ok"}), person({"id": 5}))
        assert response.status_code == 207
        assert response.json() == {
            "errors": [
                {
                    "reason": "invalid",
                    "field": "identifiers.id",
                    "message": "must be a string (the schema's type), not a number",
                }
            ]
        }
        assert emu.workspace.people_by("id") == {"ok": {}}


def test_out_of_scope_actions_say_so(client: httpx.Client, emu: Emulator) -> None:
    (error,) = errors(batch(client, person({"id": "u"}, action="screen")))
    assert error["message"] == "action 'screen' is not emulated (out of scope)"


# -- malformed requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"batch": []}', {"Content-Type": "text/plain"}),
        (b'{"batch": []}', {}),
        (b"{not json", JSON),
        (b"", JSON),
        (b'[{"type": "person"}]', JSON),
        (b'{"batch": {"type": "person"}}', JSON),
        (b'{"batch": []}', JSON),
        (b'{"batch": [{"type": "person"}], "extra": 1}', JSON),
        (b'{"items": []}', JSON),
        ('{"batch": ["\udc80"]}'.encode("utf-8", "surrogatepass"), JSON),
    ],
    ids=[
        "text/plain",
        "no content type",
        "not json",
        "empty",
        "list body",
        "batch not list",
        "empty batch",
        "extra key",
        "wrong key",
        "bad utf-8",
    ],
)
def test_malformed_batch_is_400(
    client: httpx.Client, emu: Emulator, body: bytes, headers: dict[str, str]
) -> None:
    response = client.post("/api/v2/batch", content=body, headers=headers)
    assert response.status_code == 400
    answer = response.json()
    assert answer["meta"]["error"]
    # Track API OpenAPI 1.0.0, Trackv2SendMultipleRequests400Response: errors of
    # {reason, field, message}.
    (error,) = answer["errors"]
    assert set(error) == {"reason", "field", "message"} and error["message"]
    assert emu.workspace.people == {}


def test_content_type_with_charset_is_accepted(client: httpx.Client, emu: Emulator) -> None:
    body = orjson.dumps({"batch": [person({"id": "u"})]})
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert client.post("/api/v2/batch", content=body, headers=headers).status_code == 200


# -- limits, each at the limit and one byte over ------------------------------------------


def pad_body(payload: Any, size: int) -> bytes:
    """`payload` as JSON padded with trailing whitespace to exactly `size` bytes."""
    raw = orjson.dumps(payload)
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def test_batch_body_limit(client: httpx.Client, emu: Emulator) -> None:
    payload = {"batch": [person({"id": f"u{i}"}, {"v": i}) for i in range(MAX_BATCH_ITEMS)]}
    assert raw_batch(client, pad_body(payload, MAX_BATCH_BODY_BYTES)).status_code == 200
    emu.reset()
    over = raw_batch(client, pad_body(payload, MAX_BATCH_BODY_BYTES + 1))
    assert over.status_code == 413
    assert emu.workspace.people == {}


def test_batch_item_count_limit(client: httpx.Client, emu: Emulator) -> None:
    items = [person({"id": f"u{i}"}) for i in range(MAX_BATCH_ITEMS + 1)]
    over = batch(client, *items)
    assert over.status_code == 400
    assert "1001 items" in over.json()["meta"]["error"]
    assert emu.workspace.people == {}
    assert batch(client, *items[:MAX_BATCH_ITEMS]).status_code == 200
    assert len(emu.workspace.people) == MAX_BATCH_ITEMS


def test_item_size_limit(client: httpx.Client, emu: Emulator) -> None:
    at_limit = item_of_size(MAX_ITEM_BYTES)
    assert batch(client, at_limit).status_code == 200
    over = item_of_size(MAX_ITEM_BYTES + 1)
    over["identifiers"] = {"id": "big"}
    (error,) = errors(batch(client, over))
    assert error["field"] == "item"
    assert emu.workspace.people_by("id")["big"] == at_limit["attributes"]


def test_entity_endpoint_applies_and_limits_its_body(client: httpx.Client, emu: Emulator) -> None:
    item = person({"id": "u1"}, {"a": 1})
    response = client.post("/api/v2/entity", content=pad_body(item, MAX_ITEM_BYTES), headers=JSON)
    assert response.status_code == 200
    assert response.json() == {}
    over = client.post("/api/v2/entity", content=pad_body(item, MAX_ITEM_BYTES + 1), headers=JSON)
    assert over.status_code == 413
    invalid = client.post("/api/v2/entity", json=person({"id": ""}))
    assert invalid.status_code == 400
    assert invalid.json()["errors"][0]["field"] == "identifiers.id"
    assert client.post("/api/v2/entity", json=[item]).status_code == 400
    assert emu.workspace.people_by("id") == {"u1": {"a": 1}}
    assert len(emu.invalid_items) == 1


AT_LIMIT_ID = "é" * (MAX_IDENTIFIER_BYTES // 2)  # 2 bytes a character in UTF-8
OVER_ID = AT_LIMIT_ID + "x"


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda v: person({"id": v}), "identifiers.id"),
        (lambda v: person({"email": v}), "identifiers.email"),
        (lambda v: obj(v), "identifiers.object_id"),
        (
            lambda v: person({"id": "u"}, rels=[to_object(v)]),
            "cio_relationships[0].identifiers.object_id",
        ),
        (
            lambda v: obj("o", rels=[to_person({"email": v})]),
            "cio_relationships[0].identifiers.email",
        ),
    ],
    ids=["id", "email", "object_id", "relationship object_id", "relationship email"],
)
def test_identifier_limit(client: httpx.Client, emu: Emulator, make: Any, field: str) -> None:
    assert len(AT_LIMIT_ID.encode()) == MAX_IDENTIFIER_BYTES
    assert batch(client, make(AT_LIMIT_ID)).status_code == 200
    (error,) = errors(batch(client, make(OVER_ID)))
    assert error["field"] == field
    assert "151 bytes" in error["message"]


def test_long_numeric_id_text_is_accepted(client: httpx.Client, emu: Emulator) -> None:
    assert batch(client, person({"id": str(10**17)})).status_code == 200


def test_attribute_name_limit(client: httpx.Client, emu: Emulator) -> None:
    name = "ñ" * (MAX_ATTRIBUTE_NAME_BYTES // 2)
    assert batch(client, person({"id": "u"}, {name: 1})).status_code == 200
    (error,) = errors(batch(client, person({"id": "u"}, {name + "x": 1})))
    assert error["field"] == f"attributes.{name}x"
    rel = {**to_object("o"), "relationship_attributes": {name + "x": 1}}
    (error,) = errors(batch(client, person({"id": "u"}, rels=[rel])))
    assert error["field"].startswith("cio_relationships[0].relationship_attributes.")


@pytest.mark.parametrize(
    ("at_limit", "over"),
    [
        ("v" * 1000, "v" * 1001),
        ("€" * 333 + "a", "€" * 334),  # 1000 vs 1002 bytes
        (["x" * 996], ["x" * 997]),  # JSON text '["..."]' is 1000 vs 1001 bytes
        ({"k": "x" * 992}, {"k": "x" * 993}),  # '{"k":"..."}' is 1000 vs 1001 bytes
    ],
    ids=["ascii", "multibyte", "list", "object"],
)
def test_attribute_value_limit(
    client: httpx.Client, emu: Emulator, at_limit: Any, over: Any
) -> None:
    assert batch(client, person({"id": "u"}, {"v": at_limit})).status_code == 200
    (error,) = errors(batch(client, person({"id": "u"}, {"v": over})))
    assert error["field"] == "attributes.v"
    assert emu.workspace.people_by("id") == {"u": {"v": at_limit}}


def test_person_attribute_count_limit(client: httpx.Client, emu: Emulator) -> None:
    attrs = {f"a{i}": i for i in range(MAX_ATTRIBUTES)}
    assert batch(client, person({"id": "u"}, attrs)).status_code == 200
    (error,) = errors(batch(client, person({"id": "u"}, {"one_more": 1})))
    assert error["field"] == "attributes"
    assert "301 attributes" in error["message"]
    # Replacing and removing keep the count; nothing of the refused item was applied.
    assert batch(client, person({"id": "u"}, {"a0": "x", "a1": "", "new": 1})).status_code == 200
    stored = emu.workspace.people_by("id")["u"]
    assert len(stored) == MAX_ATTRIBUTES
    assert "one_more" not in stored
    # The email attribute of an email-identified person counts too.
    email_attrs = {f"a{i}": i for i in range(MAX_ATTRIBUTES - 1)}
    assert batch(client, person({"email": "e@x"}, email_attrs)).status_code == 200
    (error,) = errors(batch(client, person({"email": "f@x"}, attrs)))
    assert emu.workspace.person(email="f@x") is None


def test_object_and_relationship_attribute_limits(client: httpx.Client, emu: Emulator) -> None:
    """Track API OpenAPI 1.0.0, "Track API limits": 300 unique attributes and 100 KB in all
    per object or relationship, as for a person; counted after the item is merged."""
    at_limit = {f"a{i}": i for i in range(MAX_ATTRIBUTES)}
    assert batch(client, obj("o", at_limit)).status_code == 200
    (error,) = errors(batch(client, obj("o", {"one_more": 1})))
    assert error["field"] == "attributes"
    assert len(emu.workspace.objects[("1", "o")]) == MAX_ATTRIBUTES

    (error,) = errors(batch(client, person({"id": "u"}, rels=[to_object("p", **at_limit, x=1)])))
    assert error["field"] == "cio_relationships[0].relationship_attributes"
    assert emu.workspace.relationships == {} and emu.workspace.person(id="u") is None

    # 101 values of 990 bytes: each under the value limit, together over 100 KB.
    big = {f"v{i}": "x" * 990 for i in range(101)}
    first, rest = dict(list(big.items())[:30]), dict(list(big.items())[30:])
    assert batch(client, obj("big", first)).status_code == 200
    for part in (dict(list(rest.items())[:30]), dict(list(rest.items())[30:60])):
        assert batch(client, obj("big", part)).status_code == 200
    (error,) = errors(batch(client, obj("big", dict(list(rest.items())[60:]))))
    assert error["field"] == "attributes"
    assert "limit 100000" in error["message"]
    assert len(emu.workspace.objects[("1", "big")]) == 90


def test_nested_values_per_leaf_reading() -> None:
    with (
        Emulator(rules=Rules(nested_value_size="per_leaf")) as emu,
        httpx.Client(base_url=emu.url, auth=AUTH) as client,
    ):
        fits = {"list": ["x" * 1000, "y" * 1000], "deep": {"k": ["z" * 1000]}}
        assert batch(client, person({"id": "u"}, fits)).status_code == 200
        (error,) = errors(batch(client, person({"id": "u"}, {"deep": {"k": ["z" * 1001]}})))
        assert error["field"] == "attributes.deep"


def test_oversize_body_status_reading() -> None:
    with (
        Emulator(rules=Rules(oversize_body_status=400)) as emu,
        httpx.Client(base_url=emu.url, auth=AUTH) as client,
    ):
        body = pad_body({"batch": [person({"id": "u"})]}, MAX_BATCH_BODY_BYTES + 1)
        assert raw_batch(client, body).status_code == 400


# -- attribute removal -------------------------------------------------------------------


def test_empty_string_and_null_remove_attributes(client: httpx.Client, emu: Emulator) -> None:
    batch(client, person({"id": "u"}, {"a": 1, "b": 2, "c": 3}), obj("o", {"a": 1, "b": 2}))
    batch(
        client,
        person({"id": "u"}, {"a": "", "b": None, "missing": ""}),
        obj("o", {"a": "", "b": None}),
    )
    assert emu.workspace.people_by("id") == {"u": {"c": 3}}
    assert emu.workspace.objects == {("1", "o"): {}}


def test_null_kept_under_the_other_reading() -> None:
    with (
        Emulator(rules=Rules(null_removes_attribute=False)) as emu,
        httpx.Client(base_url=emu.url, auth=AUTH) as client,
    ):
        batch(client, person({"id": "u"}, {"a": 1, "b": 2}))
        batch(client, person({"id": "u"}, {"a": None, "b": ""}))
        assert emu.workspace.people_by("id") == {"u": {"a": None}}


# -- relationships -----------------------------------------------------------------------


def test_relationships_from_the_person_side(client: httpx.Client, emu: Emulator) -> None:
    response = batch(
        client,
        person({"id": "u1"}, {"n": 1}, rels=[to_object("acme", role="admin")]),
        person(
            {"id": "u1"},
            action="add_relationships",
            rels=[to_object("acme", role="owner", since=2020), to_object("globex")],
        ),
    )
    assert response.status_code == 200
    assert rels_of(emu) == {("u1", "acme"): {"role": "owner", "since": 2020}, ("u1", "globex"): {}}
    # The objects were created as empty records.
    assert emu.workspace.objects == {("1", "acme"): {}, ("1", "globex"): {}}
    batch(
        client, person({"id": "u1"}, action="add_relationships", rels=[to_object("acme", since="")])
    )
    assert rels_of(emu)[("u1", "acme")] == {"role": "owner"}
    batch(client, person({"id": "u1"}, action="delete_relationships", rels=[to_object("acme")]))
    assert rels_of(emu) == {("u1", "globex"): {}}
    assert ("1", "acme") in emu.workspace.objects


def test_add_relationships_creates_a_missing_person(client: httpx.Client, emu: Emulator) -> None:
    batch(client, person({"email": "e@x"}, action="add_relationships", rels=[to_object("o")]))
    assert emu.workspace.people_by("email") == {"e@x": {"email": "e@x"}}
    assert rels_of(emu) == {("e@x", "o"): {}}


def test_relationships_from_the_object_side(client: httpx.Client, emu: Emulator) -> None:
    batch(client, person({"id": "u1"}, {"n": 1}))
    u1 = emu.workspace.person(id="u1")
    assert u1 is not None
    response = batch(
        client,
        obj(
            "acme",
            {"name": "Acme"},
            rels=[to_person({"id": "u1"}, role="admin"), to_person({"email": "new@x"})],
        ),
        obj(
            "acme",
            action="add_relationships",
            rels=[to_person({"cio_id": u1.cio_id}, role="owner")],
        ),
    )
    assert response.status_code == 200
    assert rels_of(emu) == {("u1", "acme"): {"role": "owner"}, ("new@x", "acme"): {}}
    assert emu.workspace.people_by("email") == {"new@x": {"email": "new@x"}}
    assert emu.workspace.objects == {("1", "acme"): {"name": "Acme"}}
    batch(client, obj("acme", action="delete_relationships", rels=[to_person({"id": "u1"})]))
    assert rels_of(emu) == {("new@x", "acme"): {}}
    assert emu.workspace.person(id="u1") is not None


def test_relationship_snapshot_names_the_person(client: httpx.Client, emu: Emulator) -> None:
    batch(client, person({"id": "u1"}, rels=[to_object("acme", role="admin")]))
    (rel,) = emu.snapshot()["relationships"]
    assert rel == {
        "person": {"cio_id": "cio_1", "id": "u1", "email": None},
        "object_type_id": "1",
        "object_id": "acme",
        "relationship_attributes": {"role": "admin"},
    }
    assert ("cio_1", ("1", "acme")) in emu.workspace.relationships


def test_delete_person_and_object_remove_their_relationships(
    client: httpx.Client, emu: Emulator
) -> None:
    batch(
        client,
        person({"id": "u1"}, rels=[to_object("a"), to_object("b")]),
        person({"id": "u2"}, rels=[to_object("a"), to_object("b")]),
    )
    assert len(emu.workspace.relationships) == 4
    assert batch(client, person({"id": "u1"}, action="delete")).status_code == 200
    assert set(rels_of(emu)) == {("u2", "a"), ("u2", "b")}
    assert emu.workspace.person(id="u1") is None
    assert batch(client, obj("a", action="delete")).status_code == 200
    assert set(rels_of(emu)) == {("u2", "b")}
    assert set(emu.workspace.objects) == {("1", "b")}
    # Deleting what is absent is fine, and so is unrelating what is not related.
    assert (
        batch(
            client,
            person({"id": "u1"}, action="delete"),
            person({"cio_id": "cio_404"}, action="delete"),
            obj("a", action="delete"),
            person({"id": "nobody"}, action="delete_relationships", rels=[to_object("b")]),
            obj("b", action="delete_relationships", rels=[to_person({"id": "nobody"})]),
        ).status_code
        == 200
    )
    assert set(rels_of(emu)) == {("u2", "b")}
    # A deleted id can be identified again as a new person.
    batch(client, person({"id": "u1"}, {"back": True}))
    assert emu.workspace.people_by("id")["u1"] == {"back": True}


# -- faults ------------------------------------------------------------------------------


def test_error_rate_one_answers_5xx_and_applies_nothing(
    client: httpx.Client, emu: Emulator
) -> None:
    emu.faults = FaultPlan(error_rate=1.0)
    statuses = {batch(client, person({"id": f"u{i}"})).status_code for i in range(12)}
    assert statuses <= {500, 502, 503} and len(statuses) > 1
    assert client.put("/api/v1/customers/u1", json={"a": 1}).status_code >= 500
    assert client.get("/api/v1/accounts/region").status_code == 200
    assert emu.workspace.people == {}


def test_seeded_rates_repeat(client: httpx.Client, emu: Emulator) -> None:
    plan = FaultPlan(error_rate=0.3, throttle_rate=0.3, seed=7)
    runs = []
    for _ in range(2):
        emu.faults = plan
        runs.append([batch(client, person({"id": "u"})).status_code for _ in range(30)])
    assert runs[0] == runs[1]
    assert {200, 429} <= set(runs[0]) and set(runs[0]) & {500, 502, 503}


@pytest.mark.parametrize(("retry_after", "header"), [(1.0, "1"), (0.25, "0.25"), (None, None)])
def test_throttle(
    client: httpx.Client, emu: Emulator, retry_after: float | None, header: str | None
) -> None:
    emu.faults = FaultPlan(throttle_rate=1.0, retry_after=retry_after)
    response = batch(client, person({"id": "u"}))
    assert response.status_code == 429
    assert response.headers.get("Retry-After") == header
    assert emu.workspace.people == {}


def test_drop_closes_the_connection_without_a_response(client: httpx.Client, emu: Emulator) -> None:
    emu.faults = FaultPlan(drop_rate=1.0)
    with pytest.raises(httpx.TransportError):
        batch(client, person({"id": "u"}))
    assert emu.workspace.people == {}
    assert emu.requests[-1].status == 0
    assert emu.requests[-1].n_items == 1
    emu.faults = FaultPlan()
    assert batch(client, person({"id": "u"})).status_code == 200


def test_fail_first(client: httpx.Client, emu: Emulator) -> None:
    emu.faults = FaultPlan(fail_first=2)
    assert client.get("/api/v1/accounts/region").status_code == 200  # not a write
    statuses = [batch(client, person({"id": "u"}, {"n": n})).status_code for n in range(3)]
    assert statuses == [503, 503, 200]
    assert emu.workspace.people_by("id") == {"u": {"n": 2}}


def test_status_override(client: httpx.Client, emu: Emulator) -> None:
    emu.faults = FaultPlan(status_override=401)
    assert batch(client, person({"id": "u"})).status_code == 401
    assert client.get("/api/v1/accounts/region").status_code == 401
    emu.faults = FaultPlan(status_override=200)
    assert batch(client, person({"id": "u"})).status_code == 200
    assert emu.workspace.people == {}


def test_delay(client: httpx.Client, emu: Emulator) -> None:
    emu.faults = FaultPlan(delay_seconds=0.2)
    started = time.perf_counter()
    assert batch(client, person({"id": "u"})).status_code == 200
    assert time.perf_counter() - started >= 0.2
    emu.faults = FaultPlan(delay_seconds=30)  # writes only: the region check is not held
    assert client.get("/api/v1/accounts/region").status_code == 200


def test_in_flight_counts_held_requests_and_stop_abandons_them() -> None:
    emu = Emulator().start()
    emu.faults = FaultPlan(delay_seconds=30)
    outcome: list[BaseException | int] = []

    def send() -> None:
        with httpx.Client(base_url=emu.url, auth=AUTH, timeout=10) as client:
            try:
                outcome.append(batch(client, person({"id": "u"})).status_code)
            except httpx.TransportError as exc:
                outcome.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 5
    while emu.in_flight == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.perf_counter()
    emu.stop()
    sender.join()
    assert time.perf_counter() - started < 5
    assert isinstance(outcome[0], httpx.TransportError)
    assert emu.in_flight == 0
    assert emu.workspace.people == {}


def test_reject_identifiers(client: httpx.Client, emu: Emulator) -> None:
    emu.faults = FaultPlan(reject_identifiers=frozenset({"u2", "42", "acme"}))
    response = batch(
        client, person({"id": "u1"}), person({"id": "u2"}), person({"id": "42"}), obj("acme")
    )
    assert errors(response) == [
        {
            "batch_index": i,
            "reason": "invalid",
            "field": "identifiers",
            "message": "rejected by fault plan",
        }
        for i in (1, 2, 3)
    ]
    assert emu.workspace.people_by("id") == {"u1": {}}
    assert [v.batch_index for v in emu.invalid_items] == [1, 2, 3]


def test_fault_plan_checks_its_values() -> None:
    with pytest.raises(ValueError):
        FaultPlan(error_rate=1.5)
    with pytest.raises(ValueError):
        FaultPlan.from_json({"error_rate": 0.1, "nope": 1})
    assert FaultPlan(reject_identifiers=frozenset({1})).reject_identifiers == {"1"}  # type: ignore[arg-type]


# -- inspection and recording ------------------------------------------------------------


def test_emulator_endpoints(emu: Emulator) -> None:
    with (
        httpx.Client(base_url=emu.url) as anonymous,
        httpx.Client(base_url=emu.url, auth=AUTH) as client,
    ):
        batch(client, person({"id": "u1"}, {"a": 1}, rels=[to_object("o")]), person({"id": ""}))
        assert anonymous.get("/_emulator/workspace").json() == emu.snapshot()
        assert emu.snapshot()["people"] == [
            {"cio_id": "cio_1", "id": "u1", "email": None, "attributes": {"a": 1}}
        ]
        assert emu.snapshot()["objects"] == [
            {"object_type_id": "1", "object_id": "o", "attributes": {}}
        ]
        (summary,) = anonymous.get("/_emulator/requests").json()
        assert {k: summary[k] for k in ("method", "path", "status", "n_items")} == {
            "method": "POST",
            "path": "/api/v2/batch",
            "status": 207,
            "n_items": 2,
        }
        assert summary["n_bytes"] == emu.requests[0].n_bytes > 0
        (invalid,) = anonymous.get("/_emulator/invalid_items").json()
        assert invalid["batch_index"] == 1 and invalid["field"] == "identifiers.id"

        plan = {"error_rate": 1.0, "reject_identifiers": ["a", "b"], "retry_after": None}
        assert anonymous.post("/_emulator/faults", json=plan).status_code == 200
        assert emu.faults == FaultPlan(
            error_rate=1.0, reject_identifiers=frozenset({"a", "b"}), retry_after=None
        )
        assert anonymous.get("/_emulator/faults").json()["reject_identifiers"] == ["a", "b"]
        bad = anonymous.post("/_emulator/faults", json={"error_rate": "high"})
        assert bad.status_code == 400

        assert anonymous.post("/_emulator/reset").status_code == 200
        assert emu.faults == FaultPlan()
        assert emu.snapshot() == {
            "people": [],
            "objects": [],
            "relationships": [],
            "events": [],
            "devices": [],
            "suppressed": [],
            "duplicate_events": 0,
        }
        assert emu.requests == [] and emu.invalid_items == []
        assert anonymous.get("/_emulator/requests").json() == []


def test_requests_are_recorded_without_authorization(client: httpx.Client, emu: Emulator) -> None:
    item = person({"id": "u"}, {"a": 1})
    batch(client, item)
    client.get("/api/v1/accounts/region")
    first, second = emu.requests
    assert first.method == "POST" and first.path == "/api/v2/batch" and first.status == 200
    assert first.body == {"batch": [item]}
    assert first.n_items == 1
    assert first.n_bytes == len(orjson.dumps({"batch": [item]}))
    assert first.timestamp <= second.timestamp
    assert all(k.lower() != "authorization" for r in emu.requests for k in r.headers)
    assert first.headers["Content-Type"] == "application/json"
    assert second.path == "/api/v1/accounts/region" and second.body is None


def test_record_bodies_can_be_turned_off() -> None:
    with Emulator(record_bodies=False) as emu, httpx.Client(base_url=emu.url, auth=AUTH) as c:
        batch(c, person({"id": "u"}))
        assert emu.requests[0].body is None and emu.requests[0].n_items == 1


def test_url_only_while_running() -> None:
    emu = Emulator()
    with pytest.raises(RuntimeError):
        _ = emu.url
    with emu:
        assert emu.url.startswith("http://127.0.0.1:")
    with pytest.raises(RuntimeError):
        _ = emu.url


# -- transport details -------------------------------------------------------------------


def test_keep_alive_survives_refused_requests_and_chunked_bodies(emu: Emulator) -> None:
    host, port = emu.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    auth = httpx.BasicAuth(*AUTH)._auth_header
    headers = {"Authorization": auth, **JSON}
    try:
        conn.request(
            "POST", "/api/v2/batch", body=b" " * (MAX_BATCH_BODY_BYTES + 1), headers=headers
        )
        first = conn.getresponse()
        assert first.status == 413
        first.read()
        chunks = iter([b'{"batch": [', orjson.dumps(person({"id": "u"})), b"]}"])
        conn.request("POST", "/api/v2/batch", body=chunks, headers=headers, encode_chunked=True)
        second = conn.getresponse()
        assert second.status == 200 and second.read() == b"{}"
        assert second.getheader("Content-Length") == "2"
    finally:
        conn.close()
    assert emu.workspace.people_by("id") == {"u": {}}


def test_concurrent_clients(emu: Emulator) -> None:
    def send(worker: int) -> None:
        with httpx.Client(base_url=emu.url, auth=AUTH) as client:
            for b in range(4):
                items = [person({"id": f"w{worker}-{b}-{i}"}, {"w": worker}) for i in range(100)]
                assert batch(client, *items).status_code == 200

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(emu.workspace.people) == 8 * 4 * 100
    assert len(emu.requests) == 8 * 4


# -- v1 and the official SDK -------------------------------------------------------------


def test_v1_customers_endpoints(client: httpx.Client, emu: Emulator) -> None:
    path = "/api/v1/customers/a%2Fb%40c"
    assert client.put(path, json={"plan": "pro", "n": 1}).status_code == 200
    assert client.put(path, json={"n": 2, "plan": ""}).status_code == 200
    assert emu.workspace.people_by("id") == {"a/b@c": {"n": 2}}
    bad = client.put(path, json={"x" * 151: 1})
    assert bad.status_code == 400 and bad.json()["meta"]["error"].startswith("attributes.")
    assert client.put(path, json=[1]).status_code == 400
    assert (
        client.put(path, content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 400
    )
    assert client.delete(path).status_code == 200
    assert emu.workspace.people == {}
    assert client.put("/api/v1/customers/u1/events", json={}).status_code == 404


def test_official_sdk_identifies_and_deletes(emu: Emulator) -> None:
    from customerio import CustomerIO, CustomerIOException

    cio = CustomerIO(site_id="site-id", api_key="api-key", retries=0, timeout=5)
    cio.base_url = f"{emu.url}/api/v1"
    signed_up = datetime(2024, 1, 2, tzinfo=UTC)
    cio.identify("user/1@x", email="ada@example.com", plan="pro", created_at=signed_up)
    cio.identify("user/1@x", plan="")
    assert emu.workspace.people_by("id") == {
        "user/1@x": {"email": "ada@example.com", "created_at": int(signed_up.timestamp())}
    }
    put = emu.requests[0]
    assert (put.method, put.path) == ("PUT", "/api/v1/customers/user%2F1%40x")
    assert put.headers["User-Agent"].startswith("Customer.io Python Client")
    cio.delete("user/1@x")
    assert emu.workspace.people == {}
    assert emu.requests[-1].method == "DELETE" and emu.requests[-1].status == 200
    cio.close()

    wrong = CustomerIO(site_id="site-id", api_key="nope", retries=0, timeout=5)
    wrong.base_url = f"{emu.url}/api/v1"
    with pytest.raises(CustomerIOException, match="401"):
        wrong.identify("u2", plan="pro")
    wrong.close()


# -- the CLI entry point -----------------------------------------------------------------


def test_serve_prints_its_url_and_stops_on_ctrl_c() -> None:
    env = {**os.environ, "CIO_SITE_ID": "env-site", "CIO_API_KEY": "env-secret-key"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cio_retl.emulator import serve; serve(port=0)"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        url = first.split(" on ")[1].strip()
        banner = first + proc.stdout.readline()
        assert "env-site" in banner and "env-secret-key" not in banner
        with httpx.Client(base_url=url, auth=("env-site", "env-secret-key")) as client:
            assert client.get("/api/v1/accounts/region").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- events, devices and suppressions -----------------------------------------------------

ULID_A = "01JDQ7Z8X9ABCDEFGHJKMNPQRS"
ULID_B = "01JDQ7Z8X9ABCDEFGHJKMNPQRT"


def event(ident: dict[str, Any], name: str = "order_completed", **fields: Any) -> dict[str, Any]:
    return {"type": "person", "action": "event", "identifiers": ident, "name": name, **fields}


def device(ident: dict[str, Any], action: str = "add_device", **fields: Any) -> dict[str, Any]:
    return {"type": "person", "action": action, "identifiers": ident, "device": fields}


def test_events_are_kept_per_person_and_deduplicated_by_id(
    client: httpx.Client, emu: Emulator
) -> None:
    first = event({"id": "u1"}, id=ULID_A, timestamp=1_700_000_000, attributes={"total": 9.5})
    response = batch(
        client,
        first,
        first,  # the same id twice in one batch: one event
        event({"id": "u1"}, id=ULID_A.lower()),  # ULIDs decode either case alike
        event({"id": "u1"}, "trial_ended", id=ULID_B),
        event({"email": "a@x.io"}, "no_id"),
        event({"email": "a@x.io"}, "no_id"),  # without an id, two events
    )
    assert response.status_code == 200, response.text
    events = emu.workspace.events("id")
    assert events == {
        "u1": [
            {
                "id": ULID_A,
                "name": "order_completed",
                "timestamp": 1_700_000_000,
                "attributes": {"total": 9.5},
            },
            {"id": ULID_B, "name": "trial_ended", "timestamp": None, "attributes": {}},
        ]
    }
    assert [e["name"] for e in emu.workspace.events("email")["a@x.io"]] == ["no_id", "no_id"]
    assert emu.workspace.duplicate_events == 2
    assert emu.snapshot()["duplicate_events"] == 2
    # A resend in a later request is dropped too; deleting the person keeps the ids seen.
    assert batch(client, first).status_code == 200
    assert emu.workspace.duplicate_events == 3
    assert batch(client, person({"id": "u1"}, action="delete"), first).status_code == 200
    assert emu.workspace.events("id") == {} and emu.workspace.duplicate_events == 4


def test_devices_are_added_replaced_and_deleted(client: httpx.Client, emu: Emulator) -> None:
    ident = {"id": "u1"}
    response = batch(
        client,
        device(ident, token="t1", platform="ios", last_used=1_700_000_000),
        device(ident, token="t2", platform="android", attributes={"push_enabled": "true"}),
    )
    assert response.status_code == 200, response.text
    assert emu.workspace.devices("id") == {
        "u1": {
            "t1": {"token": "t1", "platform": "ios", "last_used": 1_700_000_000},
            "t2": {"token": "t2", "platform": "android", "attributes": {"push_enabled": "true"}},
        }
    }
    # add_device replaces the device: fields it no longer carries are gone.
    assert batch(client, device(ident, token="t1", platform="android")).status_code == 200
    assert emu.workspace.devices("id")["u1"]["t1"] == {"token": "t1", "platform": "android"}
    assert batch(client, device(ident, "delete_device", token="t2")).status_code == 200
    assert batch(client, device(ident, "delete_device", token="never-added")).status_code == 200
    assert set(emu.workspace.devices("id")["u1"]) == {"t1"}
    assert emu.snapshot()["devices"] == [
        {
            "person": {"cio_id": "cio_1", "id": "u1", "email": None},
            "token": "t1",
            "platform": "android",
        }
    ]


def test_a_suppressed_person_cannot_be_identified_again(
    client: httpx.Client, emu: Emulator
) -> None:
    assert batch(client, person({"id": "u1"}, {"email": "a@x.io"})).status_code == 200
    assert batch(client, person({"id": "u1"}, action="suppress")).status_code == 200
    assert emu.workspace.is_suppressed("id", "u1")
    (error,) = errors(batch(client, person({"id": "ok"}), person({"id": "u1"}, {"plan": "pro"})))
    assert error["batch_index"] == 1 and error["field"] == "identifiers"
    assert "suppressed" in error["message"]
    assert emu.workspace.people_by("id") == {"u1": {"email": "a@x.io"}, "ok": {}}
    # Suppressing before the person exists holds too; unsuppress lets them back in.
    assert batch(client, person({"email": "b@x.io"}, action="suppress")).status_code == 200
    assert len(errors(batch(client, person({"email": "b@x.io"})))) == 1
    assert emu.snapshot()["suppressed"] == [
        {"identifier": "cio_id", "value": "cio_1"},
        {"identifier": "email", "value": "b@x.io"},
        {"identifier": "id", "value": "u1"},
    ]
    response = batch(
        client,
        person({"id": "u1"}, action="unsuppress"),
        person({"id": "u1"}, {"plan": "pro"}),
    )
    assert response.status_code == 200, response.text
    assert emu.workspace.people_by("id")["u1"] == {"email": "a@x.io", "plan": "pro"}
    assert not emu.workspace.is_suppressed("id", "u1")
    assert emu.workspace.is_suppressed("email", "b@x.io")


LIFE_ITEM_ERRORS: list[tuple[str, Any, str, str]] = [
    ("event without a name", event({"id": "u"}, name=None), "name", "must be a non-empty"),
    (
        "event name over 100 bytes",
        event({"id": "u"}, "x" * 101),
        "name",
        "is 101 bytes, limit 100",
    ),
    ("event id not a ULID", event({"id": "u"}, id="order-1"), "id", "valid ULID"),
    ("event id with a U", event({"id": "u"}, id="01JDQ7Z8X9ABCDEFGHJKMNPQRU"), "id", "ULID"),
    ("event id over 128 bits", event({"id": "u"}, id="8" + ULID_A[1:]), "id", "ULID"),
    ("event timestamp as text", event({"id": "u"}, timestamp="2024-01-01"), "timestamp", "integer"),
    ("event timestamp a float", event({"id": "u"}, timestamp=1.5), "timestamp", "integer"),
    ("event timestamp a bool", event({"id": "u"}, timestamp=True), "timestamp", "integer"),
    ("event data a list", event({"id": "u"}, attributes=[1]), "attributes", "must be an object"),
    ("event unknown field", event({"id": "u"}, device={}), "device", "not allowed"),
    (
        "add_device without device",
        {"type": "person", "action": "add_device", "identifiers": {"id": "u"}},
        "device",
        "is required",
    ),
    ("device without token", device({"id": "u"}, platform="ios"), "device.token", "required"),
    ("device empty token", device({"id": "u"}, token="", platform="ios"), "device.token", ""),
    ("device no platform", device({"id": "u"}, token="t"), "device.platform", "ios, android"),
    (
        "device platform web",
        device({"id": "u"}, token="t", platform="web"),
        "device.platform",
        "ios, android",
    ),
    (
        "device last_used text",
        device({"id": "u"}, token="t", platform="ios", last_used="today"),
        "device.last_used",
        "integer",
    ),
    (
        "device attribute not a string",
        device({"id": "u"}, token="t", platform="ios", attributes={"push_enabled": True}),
        "device.attributes.push_enabled",
        "must be a string",
    ),
    (
        "device unknown field",
        device({"id": "u"}, token="t", platform="ios", model="x"),
        "device.model",
        "not allowed",
    ),
    (
        "delete_device with a platform",
        device({"id": "u"}, "delete_device", token="t", platform="ios"),
        "device.platform",
        "not allowed",
    ),
    (
        "suppress with attributes",
        person({"id": "u"}, {"a": 1}, action="suppress"),
        "attributes",
        "not allowed",
    ),
    (
        "event on an object",
        {**obj("o"), "action": "event", "name": "x"},
        "action",
        "is a person action",
    ),
    (
        "suppress two identifiers",
        person({"id": "u", "email": "a@x.io"}, action="suppress"),
        "identifiers",
        "",
    ),
    (
        "event for an unknown cio_id",
        event({"cio_id": "cio_404"}),
        "identifiers.cio_id",
        "not found",
    ),
]


@pytest.mark.parametrize(
    ("item", "field", "message"),
    [case[1:] for case in LIFE_ITEM_ERRORS],
    ids=[case[0] for case in LIFE_ITEM_ERRORS],
)
def test_life_actions_are_validated_to_the_schema(
    client: httpx.Client, emu: Emulator, item: Any, field: str, message: str
) -> None:
    (error,) = errors(batch(client, person({"id": "ok"}), item))
    assert (error["batch_index"], error["field"]) == (1, field)
    assert message in error["message"]
    snapshot = emu.snapshot()
    assert snapshot["events"] == [] and snapshot["devices"] == [] and snapshot["suppressed"] == []
    assert emu.workspace.people_by("id") == {"ok": {}}


# -- the benchmarks' fast path (check_every) -------------------------------------------------


def _people_batch(batch: int, bad_item: bool = False) -> bytes:
    items: list[dict[str, Any]] = [
        {
            "type": "person",
            "action": "identify",
            "identifiers": {"id": f"b{batch}-{i}"},
            "attributes": {"n": i},
        }
        for i in range(10)
    ]
    if bad_item:
        items[4]["identifiers"] = {"id": "x" * (MAX_IDENTIFIER_BYTES + 1)}
    return orjson.dumps({"batch": items})


def test_check_every_validates_and_applies_every_nth_batch_and_counts_the_rest() -> None:
    with (
        Emulator(check_every=3) as emu,
        httpx.Client(base_url=emu.url, auth=AUTH, timeout=10) as client,
    ):
        statuses = []
        for n in range(7):
            # Batches 1 and 3 hold an item over the identifier limit: 3 is a sampled body
            # (0, 3, 6 are), so it is refused item by item; 1 is only counted.
            body = _people_batch(n, bad_item=n in (1, 3))
            statuses.append(client.post("/api/v2/batch", content=body, headers=JSON).status_code)
        # The envelope is checked on every body, sampled or not, and a refused body is no sample.
        empty = client.post("/api/v2/batch", content=b'{"batch": []}', headers=JSON)
        not_json = client.post("/api/v2/batch", content=b"{", headers=JSON)
        stats = httpx.get(f"{emu.url}/_emulator/stats", timeout=10).json()

    assert statuses == [200, 200, 200, 207, 200, 200, 200]
    assert (empty.status_code, not_json.status_code) == (400, 400)
    applied = set(emu.workspace.people_by("id"))
    assert applied == {f"b{n}-{i}" for n in (0, 3, 6) for i in range(10)} - {"b3-4"}
    assert [(v.batch_index, v.field) for v in emu.invalid_items] == [(4, "identifiers.id")]
    assert emu.unchecked_items == 40  # batches 1, 2, 4, 5
    assert stats == {"unchecked_items": 40, "check_every": 3}
    assert [r.n_items for r in emu.requests] == [10] * 7 + [0, 0]
    emu.reset()
    assert emu.unchecked_items == 0


def test_check_every_is_a_positive_integer_or_none() -> None:
    with pytest.raises(ValueError, match="check_every"):
        Emulator(check_every=0)
    with Emulator(check_every=1) as emu, httpx.Client(base_url=emu.url, auth=AUTH) as client:
        response = client.post("/api/v2/batch", content=_people_batch(0, True), headers=JSON)
    assert response.status_code == 207  # 1: every body is a sample, as without the option
    assert emu.unchecked_items == 0
