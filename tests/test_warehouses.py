"""The same demo rows in DuckDB, PostgreSQL and Snowflake (fakesnow) reach the same end state.

Also: both diff forms (push-down, cross-database) emit the same changes over the same data,
and model SQL with literal colons and percent signs runs unchanged on every database.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.config import Secret, Settings
from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.records import RejectionCode
from cio_retl.report import PlannedChanges
from cio_retl.sync import Outcome, RunReport
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, SITE_ID, demo_models, sync
from tests.test_postgres import sorted_items
from tests.test_sync_duckdb import actual_workspace, batch_items

KEY_CODES = (RejectionCode.DUPLICATE_KEY, RejectionCode.NULL_KEY)


@dataclass(frozen=True, slots=True)
class Warehouse:
    url: str
    engine: Engine
    schema: str  # where the demo tables are
    state_schema: str
    models_dir: Path


@pytest.fixture(
    params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres), "snowflake"]
)
def warehouse(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Warehouse]:
    if request.param == "duckdb":
        url, schema, state_schema = f"duckdb:///{tmp_path / 'wh.duckdb'}", "demo", "cio_retl"
    elif request.param == "postgres":
        pg = request.getfixturevalue("pg_schemas")
        url, schema, state_schema = pg.url, pg.warehouse, pg.state
    else:
        url, schema, state_schema = request.getfixturevalue("fakesnow_url"), "demo", "cio_retl"
    engine = create_engine(url)
    create_demo_warehouse(engine, schema=schema)
    yield Warehouse(url, engine, schema, state_schema, demo_models(tmp_path / "sql", schema))
    engine.dispose()


def settings_for(warehouse: Warehouse, emulator: Emulator) -> Settings:
    return Settings(
        warehouse_url=warehouse.url,
        state_url=warehouse.url,
        models_dir=warehouse.models_dir,
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
        state_schema=warehouse.state_schema,
    )


# The end state every warehouse must produce, computed once with DuckDB from the same seed.
_REFERENCE: dict[str, Any] = {}


def reference_workspace(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not _REFERENCE:
        folder = tmp_path_factory.mktemp("reference")
        engine = create_engine(f"duckdb:///{folder / 'wh.duckdb'}")
        create_demo_warehouse(engine)
        with Emulator(site_id=SITE_ID, api_key=API_KEY) as emulator:
            settings = settings_for(
                Warehouse("", engine, "demo", "cio_retl", demo_models(folder / "sql", "demo")),
                emulator,
            )
            settings = replace(settings, warehouse_url=str(engine.url), state_url=str(engine.url))
            engine.dispose()
            first = sync(settings)
            _REFERENCE["first"] = actual_workspace(emulator)
            engine = create_engine(str(settings.warehouse_url))
            edit_demo_warehouse(engine)
            engine.dispose()
            before = len(emulator.requests)
            sync(settings)
            _REFERENCE["edits"] = sorted_items(emulator, before)
            _REFERENCE["second"] = actual_workspace(emulator)
            _REFERENCE["created"] = [m.created for m in first.models]
    return _REFERENCE


def test_same_end_state_whichever_warehouse(
    warehouse: Warehouse, emulator: Emulator, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = reference_workspace(tmp_path_factory)
    settings = settings_for(warehouse, emulator)
    first = sync(settings)
    assert first.outcome is Outcome.SYNCED
    assert [m.created for m in first.models] == reference["created"]
    assert actual_workspace(emulator) == reference["first"]
    edit_demo_warehouse(warehouse.engine, schema=warehouse.schema)
    before = len(emulator.requests)
    assert sync(settings).outcome is Outcome.SYNCED
    assert sorted_items(emulator, before) == reference["edits"]  # byte for byte the same items
    assert actual_workspace(emulator) == reference["second"]
    assert emulator.invalid_items == []


def test_both_diff_forms_emit_the_same_changes(tmp_path: Path) -> None:
    """DuckDB warehouse with the state inside it (push-down) or in another file (cross)."""
    url = f"duckdb:///{tmp_path / 'wh.duckdb'}"
    engine = create_engine(url)
    create_demo_warehouse(engine)
    engine.dispose()
    with (
        Emulator(site_id=SITE_ID, api_key=API_KEY) as emu_pushed,
        Emulator(site_id=SITE_ID, api_key=API_KEY) as emu_crossed,
    ):
        base = Settings(
            warehouse_url=url,
            state_url=url,
            models_dir=demo_models(tmp_path / "sql", "demo"),
            track_api_url=emu_pushed.url,
            site_id=SITE_ID,
            api_key=Secret(API_KEY),
        )
        pushed = base
        crossed = replace(
            base, state_url=f"duckdb:///{tmp_path / 'state.duckdb'}", track_api_url=emu_crossed.url
        )
        (base.models_dir / "people.sql").write_text(
            "-- kind: person\n-- identifier: id\n-- key: user_id\n-- mode: mirror\n"
            "select * from demo.people\n"
        )
        edits = [
            "CREATE TABLE demo.people AS SELECT * FROM (VALUES ('u1', 'a', 1.5),"
            " ('u2', 'b', NULL), ('dup', 'x', 1), ('dup', 'y', 2), (NULL, 'z', 3))"
            " AS t(user_id, name, score)",
            "UPDATE demo.people SET score = 2.5 WHERE user_id = 'u1';"
            " UPDATE demo.users SET plan = 'gold' WHERE user_id < 30",
            "DELETE FROM demo.people WHERE user_id = 'u2';"
            " DELETE FROM demo.memberships WHERE user_id % 7 = 0",
            "UPDATE demo.users SET first_name = first_name",  # SQL touched, values not
        ]
        for edit in edits:
            engine = create_engine(url)
            with engine.begin() as conn:
                for statement in edit.split(";"):
                    conn.execute(sa.text(statement))
            engine.dispose()
            marks = len(emu_pushed.requests), len(emu_crossed.requests)
            a = sync(pushed, force=True)
            b = sync(crossed, force=True)
            assert [m.counts() for m in a.models] == [m.counts() for m in b.models]
            assert [sorted(m.rejections, key=str) for m in a.models] == [
                sorted(m.rejections, key=str) for m in b.models
            ]
            assert sorted_items(emu_pushed, marks[0]) == sorted_items(emu_crossed, marks[1])
        assert actual_workspace(emu_pushed) == actual_workspace(emu_crossed)
        # Full resync: the same full items on both paths too.
        marks = len(emu_pushed.requests), len(emu_crossed.requests)
        sync(pushed, "users", full_resync=True)
        sync(crossed, "users", full_resync=True)
        assert sorted_items(emu_pushed, marks[0]) == sorted_items(emu_crossed, marks[1])
        assert len(batch_items(emu_crossed, marks[1])) == 490


def test_model_sql_with_colons_and_percent_signs(warehouse: Warehouse, emulator: Emulator) -> None:
    """Literal ':' and '%' in a model are text, not bind parameters, on every database."""
    for model in warehouse.models_dir.glob("*.sql"):
        model.unlink()
    (warehouse.models_dir / "admins.sql").write_text(
        "-- kind: person\n-- identifier: email\n-- key: email\n"
        "select email, '10:00' as slot, 'a:b' as tag, '100%' as pct\n"
        f"from {warehouse.schema}.users\n"
        "where email like 'grace.%' and created_at > CAST('2024-01-01 00:00:00' AS TIMESTAMP)\n"
    )
    report = sync(settings_for(warehouse, emulator))
    assert report.outcome is Outcome.SYNCED and report.models[0].created > 0
    person = next(iter(emulator.workspace.people_by("email").values()))
    assert person["slot"] == "10:00" and person["tag"] == "a:b" and person["pct"] == "100%"


@pytest.mark.parametrize("state", ["warehouse", "elsewhere"])
def test_the_plan_counts_the_rows_the_send_rejects_for_their_key(
    warehouse: Warehouse, emulator: Emulator, state: str, tmp_path: Path
) -> None:
    """What a pre-send approval reads of bad keys (ModelReport.plan) is what the send then
    rejects for them, on every database and in both diff forms: NULL keys, keys several
    rows share (of acknowledged rows too), and for events only the rows not sent yet."""
    settings = settings_for(warehouse, emulator)
    if state == "elsewhere":
        settings = replace(settings, state_url=f"duckdb:///{tmp_path / 'state.duckdb'}")
    for model in warehouse.models_dir.glob("*.sql"):
        model.unlink()
    s = warehouse.schema
    (warehouse.models_dir / "people.sql").write_text(
        f"-- kind: person\n-- identifier: id\n-- key: user_id\nselect * from {s}.people\n"
    )
    (warehouse.models_dir / "buys.sql").write_text(
        "-- kind: event\n-- identifier: id\n-- key: user_id\n-- event_key: buy_id\n"
        f"-- name: bought\n-- timestamp: bought_at\nselect * from {s}.buys\n"
    )
    at = "CAST('2026-11-30 10:00:00' AS TIMESTAMP)"
    with warehouse.engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {s}.people (user_id VARCHAR, name VARCHAR)"))
        conn.execute(
            sa.text(
                f"INSERT INTO {s}.people VALUES ('u1', 'a'), ('u2', 'b'), ('dup', 'x'),"
                " ('dup', 'y'), (NULL, 'z')"
            )
        )
        conn.execute(
            sa.text(
                f"CREATE TABLE {s}.buys (buy_id VARCHAR, user_id VARCHAR, bought_at TIMESTAMP, n INTEGER)"
            )
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {s}.buys VALUES ('b1', 'u1', {at}, 1), ('b2', 'u1', {at}, 2),"
                f" ('bd', 'u2', {at}, 3), ('bd', 'u2', {at}, 4), (NULL, 'u2', {at}, 5)"
            )
        )

    def planned() -> dict[str, tuple[int, int]]:
        """(NULL, shared) key rows each model's plan counted; the send rejected as many."""
        plans: dict[str, PlannedChanges] = {}

        def approve(report: RunReport) -> list[str]:
            plans.update({m.model: m.plan for m in report.models if m.plan is not None})
            return []

        report = sync(settings, approve=approve)
        assert report.outcome is Outcome.REJECTED
        counts = {}
        for m in report.models:
            plan = plans[m.model]
            counts[m.model] = (plan.null_keys, plan.duplicate_keys)
            sent = (
                m.rejected_with(RejectionCode.NULL_KEY),
                m.rejected_with(RejectionCode.DUPLICATE_KEY),
            )
            assert sent == counts[m.model], m.model
            examples = [e for c in KEY_CODES for e in m.examples_by_code.get(c, [])]
            assert sorted(plan.key_examples, key=str) == sorted(examples, key=str), m.model
        return counts

    assert planned() == {"people": (1, 2), "buys": (1, 2)}
    with warehouse.engine.begin() as conn:  # u1 acknowledged, then shared; b1 sent, then twice
        conn.execute(sa.text(f"INSERT INTO {s}.people VALUES ('u1', 'again')"))
        conn.execute(sa.text(f"INSERT INTO {s}.buys VALUES ('b1', 'u1', {at}, 9)"))
    assert planned() == {"people": (1, 4), "buys": (1, 2)}
