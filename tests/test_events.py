"""Events, devices and suppressions end to end: DuckDB, PostgreSQL and fakesnow -> engine ->
emulator, with the emulator's own record of events, devices and suppressed identifiers as
the truth to compare the warehouse tables with."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.config import Secret, Settings
from cio_retl.emulator import Emulator
from cio_retl.errors import GuardrailError
from cio_retl.state import StateStore
from cio_retl.sync import Outcome
from cio_retl.ulid import event_ulid
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, SITE_ID, PgSchemas, sync
from tests.test_sync_duckdb import batch_items

NOW = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
DAY = dt.timedelta(days=1)

MODELS = {
    "users.sql": "-- kind: person\n-- identifier: id\n-- key: user_id\n"
    "select user_id, plan from {s}.users",
    "orders.sql": "-- kind: event\n-- identifier: id\n-- key: user_id\n-- event_key: order_id\n"
    "-- name: order_completed\n-- timestamp: completed_at\n-- lookback_days: 30\n"
    "select order_id, user_id, completed_at, total from {s}.orders",
    "devices.sql": "-- kind: device\n-- identifier: id\n-- key: user_id\n"
    "-- token: device_token\n-- platform: platform\n"
    "select user_id, device_token, platform, last_used, app_version from {s}.devices",
    "erasures.sql": "-- kind: suppression\n-- identifier: id\n-- key: user_id\n"
    "select user_id from {s}.erasures",
}


@dataclass(frozen=True)
class Backend:
    """One warehouse (that also holds the state) with the test's tables in ``schema``."""

    name: str
    url: str
    schema: str
    engine: Engine
    state_schema: str = "cio_retl"

    def run(self, sql: str, params: dict[str, Any] | list[dict[str, Any]] | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql.format(s=self.schema)), params or {})


def _tables(schema: str) -> list[sa.Table]:
    meta = sa.MetaData(schema=schema)
    return [
        sa.Table("users", meta, sa.Column("user_id", sa.String), sa.Column("plan", sa.String)),
        sa.Table(
            "orders",
            meta,
            sa.Column("order_id", sa.String),
            sa.Column("user_id", sa.String),
            sa.Column("completed_at", sa.DateTime),
            sa.Column("total", sa.Float),
        ),
        sa.Table(
            "devices",
            meta,
            sa.Column("user_id", sa.String),
            sa.Column("device_token", sa.String),
            sa.Column("platform", sa.String),
            sa.Column("last_used", sa.DateTime),
            sa.Column("app_version", sa.String),
        ),
        sa.Table("erasures", meta, sa.Column("user_id", sa.String)),
    ]


@pytest.fixture(params=["duckdb", "postgres", "fakesnow"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "duckdb":
        url, schema = f"duckdb:///{tmp_path / 'warehouse.duckdb'}", "app"
        state_schema = "cio_retl"
    elif request.param == "postgres":
        pg: PgSchemas = request.getfixturevalue("pg_schemas")
        url, schema, state_schema = pg.url, pg.warehouse, pg.state
    else:
        url, schema = request.getfixturevalue("fakesnow_url"), "app"
        state_schema = "cio_retl"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
    for table in _tables(schema):
        table.create(engine)
    yield Backend(request.param, url, schema, engine, state_schema)
    engine.dispose()


@pytest.fixture
def life_settings(backend: Backend, emulator: Emulator, tmp_path: Path) -> Settings:
    folder = tmp_path / "models"
    folder.mkdir()
    for name, text in MODELS.items():
        (folder / name).write_text(text.format(s=backend.schema))
    return Settings(
        warehouse_url=backend.url,
        state_url=backend.url,
        models_dir=folder,
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
        state_schema=backend.state_schema,
    )


def seconds(moment: dt.datetime) -> int:
    return int(moment.replace(tzinfo=dt.UTC).timestamp())


def ulid(model: str, key: str, moment: dt.datetime) -> str:
    return event_ulid(int(moment.replace(tzinfo=dt.UTC).timestamp() * 1000), model, key)


def emulator_events(emulator: Emulator) -> dict[str, list[tuple[str, str, int, dict[str, Any]]]]:
    return {
        str(person): [(e["id"], e["name"], e["timestamp"], e["attributes"]) for e in events]
        for person, events in emulator.workspace.events("id").items()
    }


def emulator_devices(emulator: Emulator) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (str(person), token): device
        for person, devices in emulator.workspace.devices("id").items()
        for token, device in devices.items()
    }


def actions(items: list[dict[str, Any]]) -> list[str]:
    """The actions of the items in the order sent, consecutive repeats collapsed."""
    out: list[str] = []
    for item in items:
        action = f"{item['type']}:{item['action']}"
        if not out or out[-1] != action:
            out.append(action)
    return out


def test_sending_each_kind_then_changing_it(
    backend: Backend, life_settings: Settings, emulator: Emulator
) -> None:
    o1, o2 = NOW - 1 * DAY, NOW - 2 * DAY
    backend.run(
        "INSERT INTO {s}.users VALUES ('u1', 'free'), ('u2', 'pro'), ('u3', 'free'), ('u4', 'pro')"
    )
    backend.run(
        "INSERT INTO {s}.orders VALUES (:k, :u, :t, :total)",
        [
            {"k": "o1", "u": "u1", "t": o1, "total": 10.5},
            {"k": "o2", "u": "u2", "t": o2, "total": 20},
            {"k": "o3", "u": "u1", "t": NOW - 40 * DAY, "total": 1},  # outside the lookback
            {"k": "o4", "u": "u3", "t": None, "total": 1},  # no timestamp: rejected
        ],
    )
    backend.run(
        "INSERT INTO {s}.devices VALUES (:u, :t, :p, :used, :v)",
        [
            {"u": "u1", "t": "tok-1", "p": "iOS", "used": o1, "v": "1.0"},
            {"u": "u2", "t": "tok-2", "p": "android", "used": None, "v": None},
        ],
    )
    backend.run("INSERT INTO {s}.erasures VALUES ('u4')")

    report = sync(life_settings)
    by_model = {m.model: m for m in report.models}
    assert report.outcome is Outcome.REJECTED, report  # o4 rejected; the rest acknowledged
    assert (by_model["orders"].created, by_model["orders"].rejected) == (2, 1)
    assert by_model["orders"].rows == 3  # o3 is outside the lookback: never read
    assert by_model["orders"].newest_event == seconds(o1)
    assert by_model["orders"].rejections == [
        ("o4", "timestamp (completed_at) is NULL [completed_at]")
    ]
    assert (by_model["users"].created, by_model["users"].skipped) == (3, 1)
    assert emulator.invalid_items == []
    assert emulator_events(emulator) == {
        "u1": [(ulid("orders", "o1", o1), "order_completed", seconds(o1), {"total": 10.5})],
        "u2": [(ulid("orders", "o2", o2), "order_completed", seconds(o2), {"total": 20})],
    }
    assert emulator_devices(emulator) == {
        ("u1", "tok-1"): {
            "token": "tok-1",
            "platform": "ios",
            "last_used": seconds(o1),
            "attributes": {"app_version": "1.0"},
        },
        ("u2", "tok-2"): {"token": "tok-2", "platform": "android"},
    }
    assert emulator.workspace.is_suppressed("id", "u4")
    assert emulator.workspace.person(id="u4") is None  # suppressed: never identified
    # One ordered changeset: identifies, device adds, events, then suppressions.
    assert actions(batch_items(emulator)) == [
        "person:identify",
        "person:add_device",
        "person:event",
        "person:suppress",
    ]

    # Change everything: an event row that was sent changes (immutable: never resent), a
    # new event, a device changes and another leaves, u4's erasure is withdrawn (u4 is
    # identified in the same run, after the unsuppress) and u1 is erased (no identify).
    o5 = NOW - 3 * DAY
    backend.run(
        "UPDATE {s}.orders SET total = 99, completed_at = :t WHERE order_id = 'o1'", {"t": o5}
    )
    backend.run("INSERT INTO {s}.orders VALUES ('o5', 'u3', :t, 5)", {"t": o5})
    backend.run(
        "UPDATE {s}.devices SET platform = 'android', app_version = NULL WHERE user_id = 'u1'"
    )
    backend.run("DELETE FROM {s}.devices WHERE user_id = 'u2'")
    backend.run("DELETE FROM {s}.erasures")
    backend.run("INSERT INTO {s}.erasures VALUES ('u1')")
    backend.run("UPDATE {s}.users SET plan = 'gone' WHERE user_id = 'u1'")
    before = len(emulator.requests)

    # Removals of mirrored kinds count against max_delete_pct: 1 of 2 devices, 1 of 1
    # suppression would go, over the default 10%, so nothing is sent without --force.
    with pytest.raises(GuardrailError) as stopped:
        sync(life_settings)
    assert "devices: 1 of 2 synced rows (50.0%) would be deleted" in str(stopped.value)
    assert "erasures: 1 of 1 synced rows (100.0%) would be deleted" in str(stopped.value)
    assert batch_items(emulator, before) == []  # the region check only
    report = sync(life_settings, force=True)
    by_model = {m.model: m for m in report.models}
    assert by_model["orders"].created == 1 and by_model["orders"].rejected == 1  # o5; o4 again
    sent = batch_items(emulator, before)
    assert actions(sent) == [
        "person:unsuppress",
        "person:identify",
        "person:add_device",
        "person:event",
        "person:suppress",
        "person:delete_device",
    ]
    assert [i["identifiers"] for i in sent if i["action"] == "identify"] == [{"id": "u4"}]
    assert [i["device"] for i in sent if i["action"] == "add_device"] == [
        {"token": "tok-1", "platform": "android", "last_used": seconds(o1)}  # every field
    ]
    events = emulator_events(emulator)
    assert events["u1"] == [
        (ulid("orders", "o1", o1), "order_completed", seconds(o1), {"total": 10.5})
    ]
    assert events["u3"] == [
        (ulid("orders", "o5", o5), "order_completed", seconds(o5), {"total": 5})
    ]
    assert set(emulator_devices(emulator)) == {("u1", "tok-1")}
    assert emulator.workspace.is_suppressed("id", "u1")
    assert not emulator.workspace.is_suppressed("id", "u4")
    assert emulator.workspace.people_by("id")["u4"] == {"id": "u4", "plan": "pro"}
    assert emulator.workspace.people_by("id")["u1"]["plan"] == "free"  # erased: not updated
    assert emulator.workspace.duplicate_events == 0

    # --full-resync resends people, devices and suppressions, never an event.
    before = len(emulator.requests)
    report = sync(life_settings, full_resync=True)
    sent = batch_items(emulator, before)
    assert [i for i in sent if i["action"] == "event"] == []
    assert {i["action"] for i in sent} == {"identify", "add_device", "suppress"}
    assert emulator.workspace.duplicate_events == 0
    state = StateStore(backend.engine, backend.state_schema)
    assert set(state.sent_events_of("orders")) == {"o1", "o2", "o5"}
