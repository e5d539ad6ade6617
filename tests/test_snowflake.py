"""End to end on Snowflake SQL, through snowflake-sqlalchemy and fakesnow.

fakesnow runs the Snowflake connector's statements on an in-process DuckDB (translated by
sqlglot), so these tests check our Snowflake SQL and type handling, not Snowflake's engine;
where fakesnow is known to differ, ``cio_retl/dialects.py`` says so. The expected workspace
comes from the DuckDB demo warehouse with the same seed: the same rows must reach
Customer.io whichever database holds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.config import Secret, Settings
from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.dialects import SnowflakeDialect
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.models import parse_model
from cio_retl.payload_sql import Column, ColumnKind, payloads
from cio_retl.plan import PLAN_PREFIX, plan_prefix
from cio_retl.state import SnapshotRow, StateStore, Workspace
from cio_retl.sync import Outcome, SyncOptions, run_sync
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, FAST_RETRY, REPO, SITE_ID, sync
from tests.test_plan import (
    _python_path_only,
    people_rows,
    people_settings,
    people_warehouse,
    plan_tables,
    rejected,
    resync_edits_reading_each_model_once,
    same_items,
    stored,
    watch_built,
)
from tests.test_plan_slices import round_of
from tests.test_postgres import sorted_items
from tests.test_sync_duckdb import actual_workspace, batch_items, expected_workspace


@pytest.fixture
def sf_engine(fakesnow_url: str) -> Iterator[Engine]:
    engine = create_engine(fakesnow_url)
    create_demo_warehouse(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sf_settings(fakesnow_url: str, sf_engine: Engine, emulator: Emulator) -> Settings:
    return Settings(
        warehouse_url=fakesnow_url,
        state_url=fakesnow_url,
        models_dir=REPO / "sql",
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
    )


def duckdb_expected(tmp_path: Path, edited: bool = False) -> dict[str, object]:
    """The workspace the demo rows should produce, computed by DuckDB from the same seed."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"duckdb:///{tmp_path / 'reference.duckdb'}")
    try:
        create_demo_warehouse(engine)
        if edited:
            edit_demo_warehouse(engine)
        return expected_workspace(engine)
    finally:
        engine.dispose()


def test_demo_syncs_then_sends_only_the_edits(
    sf_settings: Settings, sf_engine: Engine, emulator: Emulator, tmp_path: Path
) -> None:
    first = sync(sf_settings)
    assert first.outcome is Outcome.SYNCED, first
    assert {m.model: m.created for m in first.models}["users"] == 490
    assert actual_workspace(emulator) == duckdb_expected(tmp_path)
    assert emulator.invalid_items == []

    edits = edit_demo_warehouse(sf_engine)
    before = len(emulator.requests)
    second = sync(sf_settings)
    assert second.outcome is Outcome.SYNCED
    items = batch_items(emulator, before)
    assert len(items) == edits.entities == 8  # 6 changed rows, a new order, an updated device
    cleared = next(i for i in items if "first_name" in i.get("attributes", {}))
    assert cleared["attributes"] == {"first_name": ""}
    assert actual_workspace(emulator) == duckdb_expected(tmp_path / "edited", edited=True)

    before = len(emulator.requests)
    assert sum(m.items_sent for m in sync(sf_settings).models) == 0
    assert [r for r in emulator.requests[before:] if r.path == "/api/v2/batch"] == []


def test_mirror_deletes_rejections_and_a_state_schema(
    sf_settings: Settings, sf_engine: Engine, emulator: Emulator, tmp_path: Path
) -> None:
    with sf_engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE demo.people (user_id VARCHAR, email VARCHAR, plan VARCHAR,"
                " payload BINARY)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO demo.people SELECT column1, column2, column3, TO_BINARY(column4, 'HEX')"
                " FROM VALUES ('u1', 'a@x.io', 'pro', NULL), ('u2', 'b@x.io', 'free', NULL),"
                " ('u3', 'c@x.io', 'pro', NULL), ('dup', 'd1@x.io', 'pro', NULL),"
                " ('dup', 'd2@x.io', 'pro', NULL), (NULL, 'n@x.io', 'pro', NULL),"
                " ('bin', 'bin@x.io', 'pro', 'AA')"
            )
        )
    models = tmp_path / "models"
    models.mkdir()
    (models / "people.sql").write_text(
        "-- kind: person\n-- identifier: id\n-- key: user_id\n-- mode: mirror\n"
        "select user_id, email, plan, payload from demo.people\n"
    )
    settings = replace(sf_settings, models_dir=models, state_schema="other_state")
    first = sync(settings)
    people = first.models[0]
    assert people.created == 3 and people.rejected == 4, people.rejections
    reasons = dict(people.rejections)
    assert "2 rows share this key" in reasons["dup"] and "is NULL" in reasons[None]
    assert "binary" in reasons["bin"]
    state = StateStore(sf_engine, "other_state")
    assert {r["key"] for r in state.rejections("people")} == {"dup", "bin"}
    assert set(state.snapshot("people")) == {"u1", "u2", "u3"}

    with sf_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM demo.people WHERE user_id = 'u2'"))
        conn.execute(sa.text("UPDATE demo.people SET plan = NULL WHERE user_id = 'u3'"))
    second = sync(settings, force=True)
    assert second.models[0].deleted == 1 and second.models[0].updated == 1
    assert emulator.workspace.person(id="u2") is None
    assert "plan" not in emulator.workspace.people_by("id")["u3"]
    assert set(state.snapshot("people")) == {"u1", "u3"}


def test_snowflake_warehouse_with_duckdb_state_matches_push_down(
    sf_settings: Settings, sf_engine: Engine, tmp_path: Path
) -> None:
    crossed = replace(sf_settings, state_url=f"duckdb:///{tmp_path / 'state.duckdb'}")
    with (
        Emulator(site_id=SITE_ID, api_key=API_KEY) as emu_pushed,
        Emulator(site_id=SITE_ID, api_key=API_KEY) as emu_crossed,
    ):
        pushed = replace(sf_settings, track_api_url=emu_pushed.url)
        crossed = replace(crossed, track_api_url=emu_crossed.url)
        for step in range(3):
            if step == 1:
                edit_demo_warehouse(sf_engine)
            if step == 2:
                with sf_engine.begin() as conn:
                    conn.execute(sa.text("DELETE FROM demo.memberships WHERE user_id < 100"))
            marks = len(emu_pushed.requests), len(emu_crossed.requests)
            a, b = sync(pushed, force=True), sync(crossed, force=True)
            assert [m.counts() for m in a.models] == [m.counts() for m in b.models]
            assert sorted_items(emu_pushed, marks[0]) == sorted_items(emu_crossed, marks[1])
        assert actual_workspace(emu_pushed) == actual_workspace(emu_crossed)


def test_snowflake_writes_split_by_statement_size(
    sf_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snowflake binds client-side into the statement text: big batches go as several."""
    monkeypatch.setattr(SnowflakeDialect, "MAX_BATCH_BYTES", 2_000)
    state = StateStore(sf_engine).bound(Workspace(SITE_ID))
    state.ensure_schema()
    rows = [SnapshotRow(f"k{i}", f"fp{i}", "{}", '{"a":"' + "x" * 50 + '"}') for i in range(300)]
    as_tuples = [(r.key, r.fingerprint, r.identifiers, r.attributes) for r in rows]
    assert len(list(state.dialect.batches(("a", "b", "c", "d"), as_tuples))) > 10
    with state.engine.begin() as conn:
        state.save_snapshots(conn, "m", "run", rows)
        state.save_snapshots(conn, "m", "run2", rows[:10])  # existing keys are replaced
        state.update_fingerprints(conn, "m", [("k1", "new")])
        state.delete_snapshots(conn, "m", [f"k{i}" for i in range(200, 300)])
    snapshot = state.snapshot("m")
    assert len(snapshot) == 200
    assert snapshot["k1"]["fingerprint"] == "new" and snapshot["k1"]["run_id"] == "run2"
    assert snapshot["k150"]["run_id"] == "run"


# -- the run's plan on Snowflake ---------------------------------------------------------------


def test_snowflake_sync_plans_each_model_once_and_drops_the_plans(
    sf_settings: Settings,
    sf_engine: Engine,
    emulator: Emulator,
    statements: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The send reads a TRANSIENT plan table, numbered in a window with an ORDER BY (real
    Snowflake refuses ROW_NUMBER() OVER ()), gone when the run ends; the rows the
    database built (every company) are acknowledged from the plan; a plan a killed run
    left behind is dropped by the next run; each model is read once per run."""
    during: list[list[str]] = []

    def progress(model: str, _done: int, _total: int) -> None:
        if model == "users" and not during:
            during.append(plan_tables(sf_engine))

    built = watch_built(monkeypatch)
    first = run_sync(sf_settings, None, SyncOptions(retry=FAST_RETRY), progress=progress)

    assert first.outcome is Outcome.SYNCED, first.error
    (users_plans,) = during
    assert any(name.startswith(plan_prefix("users", None)) for name in users_plans)
    assert plan_tables(sf_engine) == []
    builds = [s for s in statements if f"TABLE cio_retl.{PLAN_PREFIX}" in s and "CREATE" in s]
    assert len(builds) == 4  # users, companies, memberships, devices: one plan each
    assert all(s.lstrip().startswith("CREATE TRANSIENT TABLE") for s in builds)
    assert all("ROW_NUMBER() OVER (ORDER BY" in s and "OVER ()" not in s for s in builds)
    companies = stored(sf_engine, model="companies")
    assert companies and built["companies"] == set(companies)
    assert actual_workspace(emulator) == duckdb_expected(tmp_path)

    leftover = f"{plan_prefix('users', None)}deadbeef0000"
    with sf_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE cio_retl.{leftover} AS SELECT 1 AS __cio_seq"))
    resync_edits_reading_each_model_once(sf_settings, sf_engine, statements)
    assert plan_tables(sf_engine) == []
    assert actual_workspace(emulator) == duckdb_expected(tmp_path / "edited", edited=True)


def test_snowflake_snapshots_from_the_plan_equal_the_streaming_paths(
    fakesnow_url: str,
    sf_settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same rows synced through the plan and through the streaming diff (in other
    schemas of the same database): the same items, workspace, rejections and state rows
    (fingerprint, identifiers, attributes text). The database wrote the snapshots of the
    rows it built; the rest (doubles with fractions, texts with control characters, the
    rows Python rejects) went through the Python path, read from the same plan."""
    rows = people_rows(60)
    engine = create_engine(fakesnow_url)
    try:
        people_warehouse(engine, rows, "app")
        people_warehouse(engine, rows, "app2")
        watched = watch_built(monkeypatch)
        planned = sync(people_settings(sf_settings, tmp_path, fakesnow_url, "app"))
        with Emulator(site_id=SITE_ID, api_key=API_KEY) as other:
            _python_path_only(monkeypatch)
            streamed_settings = people_settings(sf_settings, tmp_path, fakesnow_url, "app2")
            streamed = sync(
                replace(streamed_settings, state_schema="py_state", track_api_url=other.url)
            )
            streamed_people = other.workspace.people_by("email")
        from_plan, from_stream = stored(engine), stored(engine, "py_state")
        rejected_by_plan, rejected_by_stream = rejected(engine), rejected(engine, "py_state")
    finally:
        engine.dispose()

    assert planned.outcome is streamed.outcome is Outcome.REJECTED
    assert same_items(planned.models[0], streamed.models[0])
    assert sorted(planned.models[0].rejections) == sorted(streamed.models[0].rejections)
    assert planned.models[0].rejected_by_code == streamed.models[0].rejected_by_code
    assert emulator.workspace.people_by("email") == streamed_people
    assert rejected_by_plan == rejected_by_stream
    assert {r[1] for r in rejected_by_plan} == {"too_long", "invalid_identifier"}
    assert len(from_plan) == 58
    assert {k: v[:3] for k, v in from_plan.items()} == {k: v[:3] for k, v in from_stream.items()}
    # On Snowflake the database builds the rows whose doubles (within 2^53) and decimals are
    # integral and whose texts hold no control character (cio_retl.payload_sql, _SnowflakeSql).
    built = {
        r["email"]
        for r in rows[3:]
        if (r["score"] is None or (r["score"] == int(r["score"]) and abs(r["score"]) < 2**53))
        and r["balance"] == int(r["balance"])
        and "\x0b" not in r["name"]
    }
    assert len(built) == 2 and dict(watched) == {"people": built}  # none by the streaming run


def test_snowflake_a_failed_send_leaves_the_unacknowledged_rows_to_the_next_run(
    fakesnow_url: str,
    sf_settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Customer.io stops accepting batches partway through a plan's built items: the run is
    interrupted, its plan is dropped, the snapshot holds only rows Customer.io accepted,
    and the next run sends exactly the rows the snapshot lacks."""
    # Rows the database builds (integral numbers, no control characters), but two rejected.
    rows = [
        {**r, "name": f"n{i}", "score": float(i), "balance": Decimal(i)}
        for i, r in enumerate(people_rows(300))
    ]
    rows[2]["name"] = "y" * 1001
    engine = create_engine(fakesnow_url)
    try:
        people_warehouse(engine, rows, "app")
        settings = people_settings(sf_settings, tmp_path, fakesnow_url, "app")

        def progress(_model: str, done: int, _total: int) -> None:
            if done:  # after the first acknowledged batch: every further one is refused
                emulator.faults = FaultPlan(throttle_rate=1.0, retry_after=0)

        options = SyncOptions(retry=FAST_RETRY, batch_items=20)
        built = watch_built(monkeypatch)
        cut = run_sync(settings, None, options, progress=progress)

        assert cut.outcome is Outcome.INTERRUPTED, cut.error
        assert plan_tables(engine) == []
        accepted = {i["identifiers"]["email"] for i in batch_items(emulator)}
        kept = stored(engine)
        assert kept and set(kept) <= accepted and len(kept) < 200
        assert set(kept) <= built["people"]  # the database's items, acknowledged from the plan
        built.clear()

        emulator.faults = FaultPlan()
        before = len(emulator.requests)
        rerun = sync(settings, batch_items=20)
        resent = [i["identifiers"]["email"] for i in batch_items(emulator, before)]
        snapshots = stored(engine)
    finally:
        engine.dispose()
    assert rerun.outcome is Outcome.REJECTED  # the two rows rejected before sending
    assert len(resent) == len(set(resent)) == 298 - len(kept)
    assert set(resent) == set(snapshots) - set(kept)
    assert len(snapshots) == 298 and {k: v for k, v in snapshots.items() if k in kept} == kept
    assert built["people"] == set(resent)  # every row sent again built by the database


def test_snowflake_payload_sql_names_columns_as_snowflake_stores_them() -> None:
    """The rows name an unquoted column in small letters (snowflake-sqlalchemy lowercases
    Snowflake's USER_ID), and the attribute keeps that name; a quoted identifier is
    case-sensitive on Snowflake, so the SQL must say "USER_ID". fakesnow's DuckDB ignores
    the case of quoted identifiers and cannot tell: the SQL text is checked here."""
    model = parse_model(
        Path("people.sql"),
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect * from t\n",
    )
    columns = [Column("user_id", ColumnKind.TEXT), Column("firstName", ColumnKind.TEXT)]
    relation = payloads("snowflake", model, columns, "SELECT * FROM t").relation
    assert 'm."USER_ID"' in relation and 'm."firstName"' in relation
    assert '"user_id"' not in relation and '"FIRSTNAME"' not in relation
    assert '"firstName":' in relation  # the attribute's name as the rows give it


def test_snowflake_a_round_of_bucket_runs_shares_one_plan(
    sf_settings: Settings,
    sf_engine: Engine,
    emulator: Emulator,
    statements: list[str],
    tmp_path: Path,
) -> None:
    """Bucket runs on Snowflake share one plan per model (cio_retl.plan_slices), written in
    (bucket, sequence number) order, as on DuckDB and PostgreSQL; the round sends what one
    run would and leaves no plan behind."""
    sent = round_of(sf_settings, 2, "users", "companies")

    builds = [s for s in statements if f"CREATE TRANSIENT TABLE cio_retl.{PLAN_PREFIX}" in s]
    assert len(builds) == 2  # one per model
    assert all(s.rstrip().endswith("ORDER BY q.__cio_bucket, q.__cio_seq)") for s in builds)
    assert min(sent.values()) > 0
    expected = duckdb_expected(tmp_path)
    actual = actual_workspace(emulator)
    assert actual["people"] == expected["people"] and actual["objects"] == expected["objects"]
    assert plan_tables(sf_engine) == []
