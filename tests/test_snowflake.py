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
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.config import Secret, Settings
from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.dialects import SnowflakeDialect
from cio_retl.emulator import Emulator
from cio_retl.state import SnapshotRow, StateStore, Workspace
from cio_retl.sync import Outcome
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, REPO, SITE_ID, sync
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
    rows = [
        SnapshotRow(f"k{i}", f"fp{i}", "h", "{}", '{"a":"' + "x" * 50 + '"}') for i in range(300)
    ]
    as_tuples = [(r.key, r.fingerprint, r.attrs_hash, r.identifiers, r.attributes) for r in rows]
    assert len(list(state.dialect.batches(("a", "b", "c", "d", "e"), as_tuples))) > 10
    with state.engine.begin() as conn:
        state.save_snapshots(conn, "m", "run", rows)
        state.save_snapshots(conn, "m", "run2", rows[:10])  # existing keys are replaced
        state.update_fingerprints(conn, "m", [("k1", "new")])
        state.delete_snapshots(conn, "m", [f"k{i}" for i in range(200, 300)])
    snapshot = state.snapshot("m")
    assert len(snapshot) == 200
    assert snapshot["k1"]["fingerprint"] == "new" and snapshot["k1"]["run_id"] == "run2"
    assert snapshot["k150"]["run_id"] == "run"
