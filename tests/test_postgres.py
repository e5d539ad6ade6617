"""End to end on a real PostgreSQL: warehouse and state in fresh schemas of the test server.

The expected workspace is computed by PostgreSQL itself (extract(epoch ...), casts),
independently of the engine's Python normalization, so the two have to agree.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.config import Secret, Settings
from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.state import StateStore, Workspace
from cio_retl.sync import Outcome
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, SITE_ID, PgSchemas, demo_models, sync
from tests.test_sync_duckdb import actual_workspace, batch_items
from tests.test_sync_duckdb import expected_workspace as expected_from_sql

pytestmark = pytest.mark.postgres


def expected_workspace(engine: Engine, schema: str) -> dict[str, Any]:
    """The demo's expected workspace, from Postgres' own epoch/casts."""
    people_sql = f"""
        SELECT email, first_name, last_name, plan,
               CAST(lifetime_value AS DOUBLE PRECISION) AS lifetime_value, is_admin,
               CAST(extract(epoch FROM created_at) AS BIGINT) AS created_at, preferences
        FROM {schema}.users WHERE deleted_at IS NULL
    """
    objects_sql = f"""
        SELECT company_id, name, plan, seats,
               CAST(extract(epoch FROM CAST(founded_on AS TIMESTAMP)) AS BIGINT) AS founded_on
        FROM {schema}.companies
    """
    relationships_sql = f"""
        SELECT u.email, m.company_id, m.role FROM {schema}.memberships m
        JOIN {schema}.users u USING (user_id) WHERE u.deleted_at IS NULL
    """
    return expected_from_sql(engine, people_sql, objects_sql, relationships_sql)


def demo_on_postgres(pg_schemas: PgSchemas, folder: Path) -> tuple[Path, dict[str, Any]]:
    """The demo warehouse in the test's Postgres schema: its models' folder (written into
    ``folder``) and the workspace a sync of them should leave."""
    engine = create_engine(pg_schemas.url)
    try:
        create_demo_warehouse(engine, schema=pg_schemas.warehouse)
        expected = expected_workspace(engine, pg_schemas.warehouse)
    finally:
        engine.dispose()
    return demo_models(folder, pg_schemas.warehouse), expected


@pytest.fixture
def pg_engine(pg_schemas: PgSchemas) -> Any:
    engine = create_engine(pg_schemas.url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_settings(
    pg_schemas: PgSchemas, pg_engine: Engine, emulator: Emulator, tmp_path: Path
) -> Settings:
    create_demo_warehouse(pg_engine, schema=pg_schemas.warehouse)
    return Settings(
        warehouse_url=pg_schemas.url,
        state_url=pg_schemas.url,
        models_dir=demo_models(tmp_path / "models", pg_schemas.warehouse),
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
        state_schema=pg_schemas.state,
    )


def test_demo_syncs_then_sends_only_the_edits(
    pg_settings: Settings, pg_schemas: PgSchemas, pg_engine: Engine, emulator: Emulator
) -> None:
    first = sync(pg_settings)
    assert first.outcome is Outcome.SYNCED, first
    expected = expected_workspace(pg_engine, pg_schemas.warehouse)
    assert actual_workspace(emulator) == expected
    assert len(expected["people"]) == 490 and emulator.invalid_items == []
    assert {m.model: m.created for m in first.models}["users"] == 490
    # The state went to the configured schema, not to the default one.
    state = StateStore(pg_engine, pg_schemas.state)
    assert len(state.snapshot("users")) == 490

    edits = edit_demo_warehouse(pg_engine, schema=pg_schemas.warehouse)
    before = len(emulator.requests)
    second = sync(pg_settings)
    assert second.outcome is Outcome.SYNCED
    items = batch_items(emulator, before)
    assert len(items) == edits.entities == 8  # 6 changed rows, a new order, an updated device
    assert sorted(i["action"] for i in items if i["action"] in ("event", "add_device")) == [
        "add_device",
        "event",
    ]
    people = [i for i in items if i["type"] == "person" and i["action"] == "identify"]
    assert sorted(i["identifiers"]["email"] for i in people) == sorted(edits.users_changed)
    for item in people:
        assert set(item["attributes"]) in ({"plan", "lifetime_value"}, {"first_name"})
    cleared = next(i for i in people if "first_name" in i["attributes"])
    assert cleared["attributes"]["first_name"] == ""  # NULL removes the attribute
    assert (
        "first_name" not in emulator.workspace.people_by("email")[cleared["identifiers"]["email"]]
    )
    assert actual_workspace(emulator) == expected_workspace(pg_engine, pg_schemas.warehouse)

    before = len(emulator.requests)
    third = sync(pg_settings)
    assert third.outcome is Outcome.SYNCED and sum(m.items_sent for m in third.models) == 0
    assert [r for r in emulator.requests[before:] if r.path == "/api/v2/batch"] == []


PEOPLE = [
    ("u1", "a@x.io", "pro", None),
    ("u2", "b@x.io", "free", None),
    ("u3", "c@x.io", "pro", None),
    ("dup", "d1@x.io", "pro", None),
    ("dup", "d2@x.io", "pro", None),
    (None, "nokey@x.io", "pro", None),
    ("bin", "bin@x.io", "pro", b"\xaa"),
    ("long", "x" * 1001, "pro", None),
]


def test_mirror_deletes_and_rejections(
    pg_settings: Settings, pg_schemas: PgSchemas, pg_engine: Engine, emulator: Emulator
) -> None:
    schema = pg_schemas.warehouse
    with pg_engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.people (user_id TEXT, email TEXT, plan TEXT, payload BYTEA)"
            )
        )
        conn.execute(
            sa.text(f"INSERT INTO {schema}.people VALUES (:u, :e, :p, :b)"),
            [{"u": u, "e": e, "p": p, "b": b} for u, e, p, b in PEOPLE],
        )
    models = pg_settings.models_dir
    for model in models.glob("*.sql"):
        model.unlink()
    (models / "people.sql").write_text(
        "-- kind: person\n-- identifier: id\n-- key: user_id\n-- mode: mirror\n"
        f"select user_id, email, plan, payload from {schema}.people\n"
    )
    first = sync(pg_settings)
    people = first.models[0]
    assert first.outcome is Outcome.REJECTED
    assert people.created == 3 and people.rejected == 5
    reasons = dict(people.rejections)
    assert "2 rows share this key" in reasons["dup"]
    assert "is NULL" in reasons[None]
    assert "binary" in reasons["bin"]
    assert "over the 1000-byte limit" in reasons["long"]
    state = StateStore(pg_engine, pg_schemas.state)
    assert {r["key"] for r in state.rejections("people")} == {"dup", "bin", "long"}
    assert set(emulator.workspace.people_by("id")) == {"u1", "u2", "u3"}

    with pg_engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {schema}.people WHERE user_id = 'u2'"))
        conn.execute(sa.text(f"UPDATE {schema}.people SET plan = NULL WHERE user_id = 'u3'"))
    second = sync(pg_settings, force=True)  # 1 of 3 deleted is over the default guardrail
    assert second.models[0].deleted == 1 and second.models[0].updated == 1
    assert emulator.workspace.person(id="u2") is None
    assert "plan" not in emulator.workspace.people_by("id")["u3"]
    assert set(state.snapshot("people")) == {"u1", "u3"}


def test_postgres_warehouse_with_duckdb_state_matches_push_down(
    pg_settings: Settings, pg_schemas: PgSchemas, pg_engine: Engine, tmp_path: Path
) -> None:
    """The cross-database diff (state in DuckDB) sends exactly what the push-down one does."""
    pushed = pg_settings
    crossed = replace(pg_settings, state_url=f"duckdb:///{tmp_path / 'state.duckdb'}")
    with (
        Emulator(site_id=SITE_ID, api_key=API_KEY) as emu_pushed,
        Emulator(site_id=SITE_ID, api_key=API_KEY) as emu_crossed,
    ):
        pushed = replace(pushed, track_api_url=emu_pushed.url)
        crossed = replace(crossed, track_api_url=emu_crossed.url)

        def both() -> None:
            marks = len(emu_pushed.requests), len(emu_crossed.requests)
            a, b = sync(pushed, force=True), sync(crossed, force=True)
            assert [m.counts() for m in a.models] == [m.counts() for m in b.models]
            assert sorted_items(emu_pushed, marks[0]) == sorted_items(emu_crossed, marks[1])

        both()
        edit_demo_warehouse(pg_engine, schema=pg_schemas.warehouse)
        both()
        with pg_engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {pg_schemas.warehouse}.memberships"))
        both()
        both()
        assert actual_workspace(emu_pushed) == actual_workspace(emu_crossed)
        assert actual_workspace(emu_crossed) == expected_workspace(pg_engine, pg_schemas.warehouse)


def sorted_items(emulator: Emulator, since: int) -> list[str]:
    import orjson

    return sorted(
        orjson.dumps(i, option=orjson.OPT_SORT_KEYS).decode() for i in batch_items(emulator, since)
    )


@pytest.mark.postgres
def test_diff_planner_settings_hold_for_the_diff_only(postgres_url: str) -> None:
    """PostgreSQL plans a server-side cursor for its first 10% of rows and guesses a bucket
    filter at 0.5% of them, both of which chose quadratic nested loops (100k rows: 634 s of
    removals, 145 s for one bucket's). A diff's transaction reads its whole result and joins
    buckets by hash; the settings end with it, so no other statement on a pooled connection
    is planned that way."""
    from cio_retl.buckets import Bucket
    from cio_retl.diff import diff_connection
    from cio_retl.warehouse import Warehouse

    engine = create_engine(postgres_url)
    warehouse = Warehouse(engine)

    def show(conn: sa.Connection) -> tuple[str, str]:
        return (
            conn.execute(sa.text("SHOW cursor_tuple_fraction")).scalar_one(),
            conn.execute(sa.text("SHOW enable_nestloop")).scalar_one(),
        )

    try:
        with diff_connection(warehouse, None) as conn:
            assert show(conn) == ("1", "on")
        with diff_connection(warehouse, Bucket(1, 4)) as conn:
            assert show(conn) == ("1", "off")
        with engine.connect() as conn:  # the pool's next checkout: PostgreSQL's defaults
            assert show(conn) == ("0.1", "on")
    finally:
        engine.dispose()


LOST_PEOPLE = 6_000


@pytest.mark.parametrize(
    "lost",
    [
        # Only the connection reading the plan's built items (PlanTable.chunks, the driver's
        # own cursor): its error is the driver's, mapped as SQLAlchemy maps it.
        "query LIKE 'SELECT p.__cio_seq%'",
        # Every connection of the run: the state writer's, the locks', the reads'.
        "true",
    ],
    ids=["plan-reads", "every-connection"],
)
def test_a_database_lost_mid_run_is_transient_and_the_next_run_resends_the_rest(
    pg_schemas: PgSchemas,
    pg_engine: Engine,
    emulator: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lost: str,
) -> None:
    """The server terminates the run's connections while it sends: the run stops as a
    transient failure (exit 4) naming the database, never as a rejection (exit 1) or a
    traceback; what was acknowledged is kept and the next run sends exactly the rest."""
    import threading
    import time
    import uuid

    from cio_retl.cli import EXIT_TRANSIENT, exit_status
    from cio_retl.emulator.rules import FaultPlan
    from cio_retl.errors import TransientError
    from cio_retl.plan import PlanTable
    from cio_retl.sync import SyncOptions, run_sync
    from tests.conftest import duplicate_snapshot_keys

    schema = pg_schemas.warehouse
    with pg_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.many AS SELECT 'u' || i || '@x.io' AS email,"
                f" i AS n FROM generate_series(1, {LOST_PEOPLE}) AS i"
            )
        )
    models = tmp_path / "models"
    models.mkdir()
    (models / "many.sql").write_text(
        f"-- kind: person\n-- identifier: email\n-- key: email\nselect * from {schema}.many\n"
    )
    tag = f"cio-lost-{uuid.uuid4().hex[:8]}"  # the run's connections, and only them
    settings = Settings(
        warehouse_url=f"{pg_schemas.url}?application_name={tag}",
        state_url=f"{pg_schemas.url}?application_name={tag}",
        models_dir=models,
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
        state_schema=pg_schemas.state,
    )
    monkeypatch.setattr(PlanTable, "MAX_READ_ROWS", 100)  # a read between batches
    emulator.faults = FaultPlan(delay_seconds=0.02)
    terminated: list[int] = []

    def terminate() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not terminated:
            if len(emulator.requests) >= 10:
                with pg_engine.begin() as conn:
                    ended = conn.execute(
                        sa.text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                            f" WHERE application_name = :tag AND {lost}"
                        ),
                        {"tag": tag},
                    ).scalar_one()
                if ended:
                    terminated.append(ended)
            time.sleep(0.005)

    killer = threading.Thread(target=terminate)
    killer.start()
    try:
        with pytest.raises(TransientError) as raised:
            run_sync(settings, options=SyncOptions(batch_items=100))
    finally:
        killer.join()
    assert terminated, "no connection of the run was terminated"
    error = raised.value
    assert exit_status(error) == EXIT_TRANSIENT
    assert "the postgresql database at 127.0.0.1:5432 failed during the run" in str(error)
    # The server's words (AdminShutdown, or libpq's for the socket it closed when the
    # termination raced the read), not those of closing the dead connection after ("the
    # connection is lost"), except where the server already closed an idle one.
    whys = [
        "terminating connection due to administrator command",
        "server closed the connection unexpectedly",
    ]
    if lost == "true":
        whys.append("the connection is lost")
    assert any(why in str(error) for why in whys), error
    assert error.report is not None and error.report.error == str(error)
    state = StateStore(pg_engine, pg_schemas.state).bound(Workspace(SITE_ID))
    kept = len(state.snapshot("many"))
    sent = len(emulator.workspace.people)
    assert 0 < sent < LOST_PEOPLE and kept <= sent  # cut short; nothing kept unacknowledged

    emulator.faults = FaultPlan()
    again = run_sync(settings)
    assert again.outcome is Outcome.SYNCED, again
    (many,) = again.models
    assert many.created == LOST_PEOPLE - kept  # exactly what was not acknowledged
    assert len(emulator.workspace.people) == LOST_PEOPLE
    assert len(state.snapshot("many")) == LOST_PEOPLE
    assert duplicate_snapshot_keys(pg_engine, pg_schemas.state) == []
