"""Events, devices and suppressions end to end: DuckDB, PostgreSQL and fakesnow -> engine ->
emulator, with the emulator's own record of events, devices and suppressed identifiers as
the truth to compare the warehouse tables with."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.config import Secret, Settings
from cio_retl.emulator import Emulator, FaultPlan
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
    """One warehouse with the test's tables in ``schema``, and the state store: the same
    database, or (``duckdb-cross``) another one, where the cross-database diff runs."""

    name: str
    url: str
    schema: str
    engine: Engine
    state_schema: str = "cio_retl"
    state_url: str | None = None  # None: the warehouse

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


@pytest.fixture(params=["duckdb", "duckdb-cross", "postgres", "fakesnow"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    state_url = None
    if request.param.startswith("duckdb"):
        url, schema = f"duckdb:///{tmp_path / 'warehouse.duckdb'}", "app"
        state_schema = "cio_retl"
        if request.param == "duckdb-cross":
            state_url = f"duckdb:///{tmp_path / 'state.duckdb'}"
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
    yield Backend(request.param, url, schema, engine, state_schema, state_url)
    engine.dispose()


@pytest.fixture
def life_settings(backend: Backend, emulator: Emulator, tmp_path: Path) -> Settings:
    folder = tmp_path / "models"
    folder.mkdir()
    for name, text in MODELS.items():
        (folder / name).write_text(text.format(s=backend.schema))
    return Settings(
        warehouse_url=backend.url,
        state_url=backend.state_url or backend.url,
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
    state_engine = create_engine(backend.state_url) if backend.state_url else backend.engine
    state = StateStore(state_engine, backend.state_schema)
    assert set(state.sent_events_of("orders")) == {"o1", "o2", "o5"}
    # The suppressed person's users snapshot was dropped: withdrawn, u1 is unsuppressed and
    # identified again in full, as a new person, in the same run.
    assert "u1" not in state.snapshot("users") and "u4" in state.snapshot("users")
    if backend.state_url:
        state_engine.dispose()
    backend.run("DELETE FROM {s}.erasures")
    before = len(emulator.requests)
    sync(life_settings, force=True)
    sent = batch_items(emulator, before)
    assert actions(sent) == ["person:unsuppress", "person:identify"]
    assert [i["attributes"] for i in sent if i["action"] == "identify"] == [
        {"id": "u1", "plan": "gone"}
    ]
    assert emulator.workspace.people_by("id")["u1"]["plan"] == "gone"


# -- kill -9 during a send, then a rerun ------------------------------------------------------

EVENTS_ONLY = (
    "-- kind: event\n-- identifier: id\n-- key: user_id\n-- event_key: order_id\n"
    "-- name: order_completed\n-- timestamp: completed_at\n"
    "select order_id, user_id, completed_at, total from {s}.orders"
)


@pytest.mark.parametrize(("warehouse", "seed"), [("duckdb", 1), ("duckdb", 2), ("postgres", 3)])
def test_kill_during_a_2000_event_send_then_rerun_sends_each_event_once(
    request: pytest.FixtureRequest, tmp_path: Path, emulator: Emulator, warehouse: str, seed: int
) -> None:
    if warehouse == "duckdb":
        url, schema, state_schema = f"duckdb:///{tmp_path / 'warehouse.duckdb'}", "app", "cio_retl"
        rows = "range(2000) AS t(i)"
    else:
        pg: PgSchemas = request.getfixturevalue("pg_schemas")
        url, schema, state_schema = pg.url, pg.warehouse, pg.state
        rows = "generate_series(0, 1999) AS t(i)"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.orders AS SELECT 'o-' || i AS order_id, 'u-' || (i % 97)"
                " AS user_id, TIMESTAMP '2026-01-01' + i * INTERVAL '1 minute' AS completed_at,"
                f" i * 1.5 AS total FROM {rows}"
            )
        )
    engine.dispose()
    models = tmp_path / "models"
    models.mkdir()
    (models / "orders.sql").write_text(EVENTS_ONLY.format(s=schema))
    emulator.faults = FaultPlan(delay_seconds=0.02)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cio_retl", "sync", "--batch-size", "25"],
        env={
            **os.environ,
            "CIO_RETL_WAREHOUSE_URL": url,
            "CIO_RETL_STATE_SCHEMA": state_schema,
            "CIO_RETL_MODELS_DIR": str(models),
            "CIO_TRACK_API_URL": emulator.url,
            "CIO_SITE_ID": SITE_ID,
            "CIO_API_KEY": API_KEY,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    batches = random.Random(seed).randint(5, 60)  # of 80
    deadline = time.monotonic() + 60
    while len(batch_items(emulator)) < batches * 25 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    emulator.faults = FaultPlan()
    assert 0 < len(batch_items(emulator)) < 2000  # killed mid-send

    settings = Settings(
        warehouse_url=url,
        state_url=url,
        models_dir=models,
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
        state_schema=state_schema,
    )
    report = sync(settings)
    assert report.outcome is Outcome.SYNCED, report
    events = [e for person in emulator.workspace.events("id").values() for e in person]
    start = dt.datetime(2026, 1, 1)
    expected = {ulid("orders", f"o-{i}", start + i * dt.timedelta(minutes=1)) for i in range(2000)}
    assert len(events) == 2000 and {e["id"] for e in events} == expected  # each exactly once
    # What the killed run had sent but not recorded was sent again, and deduplicated by id.
    assert emulator.workspace.duplicate_events == len(batch_items(emulator)) - 2000
    assert report.models[0].created < 2000  # what the killed run had recorded was not resent
    assert sync(settings).models[0].created == 0  # nothing left to send
    engine = create_engine(url)
    with engine.connect() as conn:
        duplicates = conn.execute(
            sa.text(f"SELECT key FROM {state_schema}.sent_events GROUP BY key HAVING COUNT(*) > 1")
        ).all()
    engine.dispose()
    assert duplicates == []


# -- a property: random changes under random faults converge ----------------------------------


@pytest.mark.parametrize("warehouse", ["duckdb", "postgres", "fakesnow"])
def test_random_changes_under_faults_converge(
    tmp_path: Path, emulator: Emulator, warehouse: str, request: pytest.FixtureRequest
) -> None:
    """Appends, edits and removals of events, devices and suppressions, each round synced
    under random 5xx, 429 and dropped connections (runs may stop half way), then one clean
    run: every event ever in the table is in Customer.io once, and its devices and
    suppressions equal the tables. On PostgreSQL and fakesnow every example gets schemas of
    its own."""
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as st

    from cio_retl.client import RetryPolicy
    from cio_retl.sync import SyncOptions, run_sync

    users = [f"u{i}" for i in range(6)]
    step = st.one_of(
        st.tuples(st.just("event"), st.integers(0, 5)),
        st.tuples(st.just("edit_event"), st.integers(0, 30)),
        st.tuples(st.just("drop_event"), st.integers(0, 30)),
        st.tuples(
            st.just("device"),
            st.sampled_from(users),
            st.sampled_from(["a", "b"]),
            st.sampled_from(["ios", "android"]),
        ),
        st.tuples(st.just("drop_device"), st.sampled_from(users)),
        st.tuples(st.just("suppress"), st.sampled_from(users)),
        st.tuples(st.just("unsuppress"), st.sampled_from(users)),
    )
    faults = st.builds(
        FaultPlan,
        error_rate=st.sampled_from([0.0, 0.2, 0.4]),
        throttle_rate=st.sampled_from([0.0, 0.2]),
        drop_rate=st.sampled_from([0.0, 0.1]),
        retry_after=st.just(0.001),
        seed=st.integers(0, 1000),
    )
    retry = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.002)
    example = iter(range(1000))
    pg: PgSchemas | None = (
        request.getfixturevalue("pg_schemas") if warehouse == "postgres" else None
    )
    snow_url: str = request.getfixturevalue("fakesnow_url") if warehouse == "fakesnow" else ""
    pg_dropped: list[str] = []

    @hsettings(
        max_examples=10,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is seconds
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(rounds=st.lists(st.tuples(st.lists(step, max_size=8), faults), min_size=1, max_size=3))
    def check(rounds: list[tuple[list[tuple[Any, ...]], FaultPlan]]) -> None:
        n = next(example)
        folder = tmp_path / f"example{n}"
        (folder / "models").mkdir(parents=True)
        schema, state_schema = "app", "cio_retl"
        if warehouse == "duckdb":
            url = f"duckdb:///{folder / 'warehouse.duckdb'}"
        elif pg is not None:
            url = pg.url
            schema, state_schema = f"{pg.warehouse}_{n}", f"{pg.state}_{n}"
            pg_dropped.extend((schema, state_schema))
        else:
            url, schema, state_schema = snow_url, f"app_{n}", f"cio_retl_{n}"
        for name in ("orders.sql", "devices.sql", "erasures.sql"):
            (folder / "models" / name).write_text(
                MODELS[name].format(s=schema).replace("-- lookback_days: 30\n", "")
            )
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        for table in _tables(schema):
            if table.name == "users":
                continue
            table.create(engine)
        emulator.reset()
        settings = Settings(
            warehouse_url=url,
            state_url=url,
            models_dir=folder / "models",
            track_api_url=emulator.url,
            site_id=SITE_ID,
            api_key=Secret(API_KEY),
            state_schema=state_schema,
        )
        ever: dict[str, tuple[str, dt.datetime]] = {}  # every event key that was in the table
        serial = 0
        for steps, plan in rounds:
            with engine.begin() as conn:
                for op in steps:
                    if op[0] == "event":
                        serial += 1
                        key, at = f"e{len(ever)}-{serial}", NOW - dt.timedelta(minutes=serial)
                        ever[key] = (users[op[1]], at)
                        conn.execute(
                            sa.text(f"INSERT INTO {schema}.orders VALUES (:k, :u, :t, 1)"),
                            {"k": key, "u": users[op[1]], "t": at},
                        )
                    elif op[0] in ("edit_event", "drop_event") and ever:
                        key = sorted(ever)[op[1] % len(ever)]
                        sql = (
                            f"UPDATE {schema}.orders SET total = total + 1 WHERE order_id = :k"
                            if op[0] == "edit_event"
                            else f"DELETE FROM {schema}.orders WHERE order_id = :k"
                        )
                        conn.execute(sa.text(sql), {"k": key})
                    elif op[0] == "device":
                        conn.execute(
                            sa.text(
                                f"DELETE FROM {schema}.devices WHERE user_id = :u AND device_token = :t"
                            ),
                            {"u": op[1], "t": op[2]},
                        )
                        conn.execute(
                            sa.text(f"INSERT INTO {schema}.devices VALUES (:u, :t, :p, NULL, :v)"),
                            {"u": op[1], "t": op[2], "p": op[3], "v": str(serial)},
                        )
                    elif op[0] == "drop_device":
                        conn.execute(
                            sa.text(f"DELETE FROM {schema}.devices WHERE user_id = :u"),
                            {"u": op[1]},
                        )
                    elif op[0] == "suppress":
                        conn.execute(
                            sa.text(f"DELETE FROM {schema}.erasures WHERE user_id = :u"),
                            {"u": op[1]},
                        )
                        conn.execute(
                            sa.text(f"INSERT INTO {schema}.erasures VALUES (:u)"), {"u": op[1]}
                        )
                    elif op[0] == "unsuppress":
                        conn.execute(
                            sa.text(f"DELETE FROM {schema}.erasures WHERE user_id = :u"),
                            {"u": op[1]},
                        )
            emulator.faults = plan
            run_sync(settings, None, SyncOptions(retry=retry, force=True, batch_items=3))
        emulator.faults = FaultPlan()
        final = run_sync(settings, None, SyncOptions(retry=retry, force=True))
        assert final.outcome is Outcome.SYNCED, final
        with engine.connect() as conn:
            devices = {
                (u, t): {"token": t, "platform": p, "attributes": {"app_version": v}}
                for u, t, p, v in conn.execute(
                    sa.text(
                        f"SELECT user_id, device_token, platform, app_version FROM {schema}.devices"
                    )
                )
            }
            erased = {u for (u,) in conn.execute(sa.text(f"SELECT user_id FROM {schema}.erasures"))}
            present = {k for (k,) in conn.execute(sa.text(f"SELECT order_id FROM {schema}.orders"))}
        recorded = set(StateStore(engine, state_schema).sent_events_of("orders"))
        engine.dispose()
        events = emulator.workspace.events("id")
        got = [(e["id"], str(person)) for person, es in events.items() for e in es]
        ids = {ulid("orders", key, at): (key, user) for key, (user, at) in ever.items()}
        assert len(got) == len(set(got))  # every event once, whatever was edited later
        assert all(ids[event_id][1] == user for event_id, user in got)  # to its person
        sent = {ids[event_id][0] for event_id, _ in got}
        # Every event still in the table went, and what left it before a run acknowledged
        # it may be missing; the state records exactly what Customer.io holds.
        assert present <= sent == recorded
        assert emulator_devices(emulator) == devices
        assert {v for kind, v in emulator.workspace.suppressed if kind == "id"} == erased
        assert emulator.invalid_items == []

    try:
        check()
    finally:
        if pg is not None:
            engine = create_engine(pg.url)
            with engine.begin() as conn:
                for name in pg_dropped:
                    conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            engine.dispose()


# -- the command line ----------------------------------------------------------------------


def test_plan_sync_and_status_cover_the_new_kinds(
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cio_retl.cli import main

    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA app"))
    for table in _tables("app"):
        table.create(engine)
    at = NOW - DAY
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO app.users VALUES ('u1', 'pro'), ('u2', 'free')"))
        conn.execute(sa.text("INSERT INTO app.orders VALUES ('o1', 'u1', :t, 3)"), {"t": at})
        conn.execute(sa.text("INSERT INTO app.devices VALUES ('u1', 't1', 'ios', NULL, '1')"))
        conn.execute(sa.text("INSERT INTO app.erasures VALUES ('u2')"))
    engine.dispose()
    folder = tmp_path / "models"
    folder.mkdir()
    for name, text in MODELS.items():
        (folder / name).write_text(text.format(s="app"))
    for name, value in {
        "CIO_RETL_WAREHOUSE_URL": url,
        "CIO_RETL_MODELS_DIR": str(folder),
        "CIO_TRACK_API_URL": emulator.url,
        "CIO_SITE_ID": SITE_ID,
        "CIO_API_KEY": API_KEY,
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("CIO_RETL_STATE_URL", "CIO_REGION", "CIO_RETL_STATE_SCHEMA"):
        monkeypatch.delenv(name, raising=False)

    assert main(["plan", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped users: 1 suppressed people are not identified" in out
    assert '"action": "event"' in out and '"action": "add_device"' in out
    assert '"action": "suppress"' in out
    assert batch_items(emulator) == []
    assert main(["sync"]) == 0
    out = capsys.readouterr().out
    assert f"events orders: 1 sent, the newest from {at:%Y-%m-%d %H:%M:%S} UTC" in out
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"events sent by orders: 1, the newest from {at:%Y-%m-%d %H:%M:%S} UTC" in out
    assert API_KEY not in out
