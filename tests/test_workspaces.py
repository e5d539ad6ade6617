"""State belongs to a workspace: snapshots, rejections and runs are kept per Site ID.

Two emulators stand for two workspaces (staging and production). What each test pins:
another workspace starts from an empty snapshot and coming back resumes; a plan without
credentials picks its workspace (named, the only one, none) or stops listing them; a
workspace in another region than CIO_REGION stops the run before anything is sent; state
written before workspaces existed is taken over, once, by the next sync with credentials.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.cli import main
from cio_retl.config import Secret, Settings
from cio_retl.demo import edit_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.errors import ConfigError
from cio_retl.state import LEGACY_WORKSPACE, StateStore
from cio_retl.sync import Outcome, RunReport
from tests.conftest import API_KEY, SITE_ID, PgSchemas, cli_env, sync
from tests.test_sync_duckdb import actual_workspace, batch_items, expected_workspace

OTHER_SITE = "production-site"


@pytest.fixture
def other() -> Iterator[Emulator]:
    """A second workspace: its own Site ID, environment and (same) region."""
    with Emulator(site_id=OTHER_SITE, api_key=API_KEY, environment_id=2) as emu:
        yield emu


def to(settings: Settings, emulator: Emulator) -> Settings:
    return replace(settings, site_id=emulator.site_id, track_api_url=emulator.url)


def sent(report: RunReport) -> int:
    return sum(m.items_sent for m in report.models)


def planned(report: RunReport) -> int:
    return sum(m.planned for m in report.models)


def workspace_rows(engine: Engine, schema: str = "cio_retl") -> dict[str, int]:
    """Snapshot rows per workspace, read from the table itself."""
    with engine.connect() as conn:
        return {
            w: int(n)
            for w, n in conn.execute(
                sa.text(f"SELECT workspace, COUNT(*) FROM {schema}.snapshots GROUP BY workspace")
            )
        }


def round_trip(
    settings: Settings, edit: Callable[[], object], emulator: Emulator, other: Emulator
) -> None:
    """Sync to one workspace, then another (everything again), then back (only the edits)."""
    first = sync(settings)
    assert first.outcome is Outcome.SYNCED and first.workspace == SITE_ID
    total = sent(first)
    assert total > 500

    second = sync(to(settings, other))
    assert second.outcome is Outcome.SYNCED, second
    assert second.workspace == OTHER_SITE and second.environment_id == 2
    assert sent(second) == total  # an empty snapshot: its first sync sends everything
    assert actual_workspace(other) == actual_workspace(emulator)

    edit()
    before = len(emulator.requests)
    third = sync(settings)
    assert third.outcome is Outcome.SYNCED
    edits = len(batch_items(emulator, before))
    assert 0 < edits < 20 and sent(third) == edits  # resumed where that workspace left off

    before_other = len(other.requests)
    fourth = sync(to(settings, other))
    assert len(batch_items(other, before_other)) == edits  # the other one resumes too
    assert sent(fourth) == edits
    assert actual_workspace(other) == actual_workspace(emulator)
    assert sent(sync(settings)) == sent(sync(to(settings, other))) == 0


def test_each_workspace_has_its_own_snapshot(
    settings: Settings, demo_engine: Engine, emulator: Emulator, other: Emulator
) -> None:
    round_trip(settings, lambda: edit_demo_warehouse(demo_engine), emulator, other)
    counts = workspace_rows(demo_engine)
    assert set(counts) == {SITE_ID, OTHER_SITE} and counts[SITE_ID] == counts[OTHER_SITE]
    assert actual_workspace(emulator) == expected_workspace(demo_engine)
    with demo_engine.connect() as conn:
        recorded = {
            (w, e, r)
            for w, e, r in conn.execute(
                sa.text("SELECT DISTINCT workspace, environment_id, region FROM cio_retl.runs")
            )
        }
    assert recorded == {(SITE_ID, 1, "us"), (OTHER_SITE, 2, "us")}


def test_rejections_belong_to_their_workspace(
    settings: Settings, demo_engine: Engine, emulator: Emulator, other: Emulator
) -> None:
    bad = "grace.dijkstra.11@example.com"
    from cio_retl.emulator import FaultPlan

    emulator.faults = FaultPlan(reject_identifiers=frozenset({bad}))
    assert sync(settings).outcome is Outcome.REJECTED
    assert sync(to(settings, other)).outcome is Outcome.SYNCED  # nothing rejected there
    state = StateStore(demo_engine)
    rejected = state.rejections()
    assert {r["workspace"] for r in rejected} == {SITE_ID} and bad in {r["key"] for r in rejected}
    emulator.faults = FaultPlan()
    before = len(emulator.requests)
    assert (
        sync(settings).outcome is Outcome.SYNCED
    )  # the rejected rows are retried in their workspace
    assert len(batch_items(emulator, before)) == len(rejected)
    assert state.rejections() == []


# -- a plan without credentials ------------------------------------------------------------


def plan(settings: Settings, site_id: str | None) -> RunReport:
    """A dry run as `cio-retl plan` runs one: no API key, CIO_SITE_ID as given."""
    return sync(replace(settings, site_id=site_id, api_key=None), dry_run=True)


def test_plan_of_an_empty_state_store_plans_everything(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    report = plan(settings, None)
    assert report.outcome is Outcome.SYNCED and report.workspace is None
    assert planned(report) == sum(m.rows for m in report.models) > 500
    assert emulator.requests == []  # a plan never calls the API


def test_plan_reads_the_only_workspace_or_the_named_one(
    settings: Settings, demo_engine: Engine, emulator: Emulator, other: Emulator
) -> None:
    assert sync(settings).outcome is Outcome.SYNCED
    only = plan(settings, None)
    assert only.workspace == SITE_ID and only.environment_id == 1 and planned(only) == 0
    assert sync(to(settings, other)).outcome is Outcome.SYNCED
    edit_demo_warehouse(demo_engine)
    assert sync(settings).outcome is Outcome.SYNCED  # SITE_ID has the edits, OTHER_SITE not yet

    requests = len(emulator.requests), len(other.requests)
    named = plan(settings, SITE_ID)
    assert named.workspace == SITE_ID and planned(named) == 0
    named_other = plan(settings, OTHER_SITE)
    assert named_other.workspace == OTHER_SITE and named_other.environment_id == 2
    assert 0 < planned(named_other) < 20
    unknown = plan(settings, "never-synced")
    assert unknown.workspace == "never-synced"
    assert planned(unknown) == sum(m.rows for m in unknown.models)  # an empty snapshot
    assert (len(emulator.requests), len(other.requests)) == requests


def test_plan_with_several_workspaces_and_none_named_stops(
    settings: Settings,
    demo_engine: Engine,
    emulator: Emulator,
    other: Emulator,
    warehouse_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert sync(settings).outcome is Outcome.SYNCED
    assert sync(to(settings, other)).outcome is Outcome.SYNCED
    with pytest.raises(ConfigError) as caught:
        plan(settings, None)
    assert SITE_ID in str(caught.value) and OTHER_SITE in str(caught.value)
    assert "CIO_SITE_ID" in str(caught.value)

    env = cli_env(warehouse_url, emulator.url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CIO_SITE_ID")
    monkeypatch.delenv("CIO_API_KEY")
    capsys.readouterr()
    assert main(["plan"]) == 2
    err = capsys.readouterr().err
    assert SITE_ID in err and OTHER_SITE in err
    assert main(["sync", "--dry-run"]) == 2

    capsys.readouterr()
    assert main(["status"]) == 0
    shown = capsys.readouterr().out
    assert "workspace" in "".join(shown.splitlines()[:4])  # a column of the runs table
    assert f"workspace {SITE_ID}: region us, environment 1" in shown
    assert f"workspace {OTHER_SITE}: region us, environment 2" in shown
    assert API_KEY not in shown


# -- the region check ----------------------------------------------------------------------


def test_a_workspace_in_another_region_stops_the_run(
    settings: Settings,
    demo_engine: Engine,
    warehouse_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Emulator(site_id=SITE_ID, api_key=API_KEY, region="eu") as eu:
        # CIO_TRACK_API_URL is set (the emulator's URL) and CIO_REGION is us: the URL
        # changes the host, not the region.
        with pytest.raises(ConfigError) as caught:
            sync(to(replace(settings, region="us"), eu))
        message = str(caught.value)
        assert "'eu'" in message and "'us'" in message and "CIO_REGION" in message
        assert API_KEY not in message
        assert [r.path for r in eu.requests] == ["/api/v1/accounts/region"]

        for name, value in cli_env(warehouse_url, eu.url).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("CIO_REGION", "us")
        capsys.readouterr()
        assert main(["sync"]) == 2
        err = capsys.readouterr().err
        assert "eu" in err and "us" in err
        assert [r.path for r in eu.requests if r.path != "/api/v1/accounts/region"] == []

        monkeypatch.setenv("CIO_REGION", "eu")  # the right region: the run goes ahead
        assert main(["sync"]) == 0
        assert batch_items(eu) != []


# -- state from before workspaces ----------------------------------------------------------

# The state tables as cio-retl wrote them before state was kept per workspace (the DDL of
# that version, written out here so the test does not depend on the current tables).
OLD_DDL = {
    "snapshots": """CREATE TABLE {s}.snapshots (
        model VARCHAR NOT NULL, key VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL,
        attrs_hash VARCHAR NOT NULL, identifiers VARCHAR NOT NULL, attributes VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL, synced_at TIMESTAMP WITH TIME ZONE NOT NULL{pk})""",
    "rejections": """CREATE TABLE {s}.rejections (
        model VARCHAR NOT NULL, key VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
        reason VARCHAR NOT NULL, field VARCHAR, status INTEGER, payload VARCHAR,
        rejected_at TIMESTAMP WITH TIME ZONE NOT NULL{pk})""",
    "runs": """CREATE TABLE {s}.runs (
        run_id VARCHAR NOT NULL, model VARCHAR NOT NULL,
        started_at TIMESTAMP WITH TIME ZONE NOT NULL, finished_at TIMESTAMP WITH TIME ZONE,
        status VARCHAR NOT NULL, dry_run BOOLEAN NOT NULL, full_resync BOOLEAN NOT NULL,
        planned INTEGER NOT NULL, created INTEGER NOT NULL, updated INTEGER NOT NULL,
        deleted INTEGER NOT NULL, rejected INTEGER NOT NULL, requests INTEGER NOT NULL,
        bytes_sent BIGINT NOT NULL, error VARCHAR, PRIMARY KEY (run_id, model))""",
}
OLD_COLUMNS = {
    "snapshots": "model, key, fingerprint, attrs_hash, identifiers, attributes, run_id, synced_at",
    "rejections": "model, key, run_id, reason, field, status, payload, rejected_at",
    "runs": "run_id, model, started_at, finished_at, status, dry_run, full_resync, planned,"
    " created, updated, deleted, rejected, requests, bytes_sent, error",
}


def rewrite_as_old_state(engine: Engine, schema: str, *, keyed: bool) -> dict[str, int]:
    """Turn the state a sync just wrote into what the old version would have left: the old
    tables with the same rows, no workspace column anywhere, no workspaces table."""
    counts = {}
    with engine.begin() as conn:
        for table, ddl in OLD_DDL.items():
            pk = ", PRIMARY KEY (model, key)" if keyed and table != "runs" else ""
            conn.execute(sa.text(f"ALTER TABLE {schema}.{table} RENAME TO {table}_new"))
            conn.execute(sa.text(ddl.format(s=schema, pk=pk)))
            columns = OLD_COLUMNS[table]
            # The old version's attrs_hash (a digest of the attributes, retired since).
            values = columns.replace("attrs_hash", "md5(attributes)")
            conn.execute(
                sa.text(
                    f"INSERT INTO {schema}.{table} ({columns})"
                    f" SELECT {values} FROM {schema}.{table}_new"
                )
            )
            conn.execute(sa.text(f"DROP TABLE {schema}.{table}_new"))
            counts[table] = conn.execute(
                sa.text(f"SELECT COUNT(*) FROM {schema}.{table}")
            ).scalar_one()
        conn.execute(sa.text(f"DROP TABLE {schema}.workspaces"))
    return counts


def upgrade_round(settings: Settings, engine: Engine, schema: str, emulator: Emulator) -> None:
    """Old state over unchanged data: a plan without credentials and then a sync send
    nothing; the sync takes the rows over, once, for its workspace.

    Only the kinds that existed before workspaces (people, objects, relationships): the
    demo's event and device models came with them, so no old state holds theirs."""
    with tempfile.TemporaryDirectory(prefix="cio-old-models-") as folder:
        for name in ("companies.sql", "users.sql", "memberships.sql"):
            (Path(folder) / name).write_text((settings.models_dir / name).read_text())
        _upgrade_round(replace(settings, models_dir=Path(folder)), engine, schema, emulator)


def _upgrade_round(settings: Settings, engine: Engine, schema: str, emulator: Emulator) -> None:
    from cio_retl.emulator import FaultPlan

    bad = "grace.dijkstra.11@example.com"
    emulator.faults = FaultPlan(reject_identifiers=frozenset({bad}))
    assert sync(settings).outcome is Outcome.REJECTED  # one rejection to carry over as well
    emulator.faults = FaultPlan()
    old = rewrite_as_old_state(engine, schema, keyed=engine.dialect.name != "duckdb")
    assert old["snapshots"] > 500 and old["rejections"] >= 1
    rejected = old["rejections"]  # the person and their relationships

    before = len(emulator.requests)
    preview = plan(settings, None)  # before the takeover: the old rows are the snapshot
    assert preview.workspace == LEGACY_WORKSPACE and planned(preview) == rejected
    named = plan(settings, SITE_ID)
    assert named.workspace == SITE_ID and planned(named) == rejected
    assert len(emulator.requests) == before

    report = sync(settings)
    assert report.outcome is Outcome.SYNCED
    assert len(batch_items(emulator, before)) == rejected  # only what was rejected before
    assert report.adoption is not None
    assert (report.adoption.site_id, report.adoption.run_id) == (SITE_ID, report.run_id)
    assert (report.adoption.snapshots, report.adoption.rejections) == (old["snapshots"], rejected)
    assert workspace_rows(engine, schema) == {SITE_ID: old["snapshots"] + rejected}
    with engine.connect() as conn:  # the column the old version kept and nothing reads
        columns = set(conn.execute(sa.text(f"SELECT * FROM {schema}.snapshots WHERE 1 = 0")).keys())
    assert "attrs_hash" not in columns and {"fingerprint", "attributes"} <= columns

    again = sync(settings)
    assert sent(again) == 0 and again.adoption is None
    state = StateStore(engine, schema)
    (row,) = state.known_workspaces().values()  # recorded once, in the workspace's row
    assert (row.site_id, row.adopted_run_id) == (SITE_ID, report.run_id)
    assert (row.adopted_snapshots, row.adopted_rejections) == (old["snapshots"], rejected)
    with engine.connect() as conn:
        workspaces_of_runs = {
            w for (w,) in conn.execute(sa.text(f"SELECT DISTINCT workspace FROM {schema}.runs"))
        }
    # The old runs went to the same workspace; the plans before the takeover were recorded
    # as what they read (the old rows) and went with them.
    assert workspaces_of_runs == {SITE_ID}


def test_state_from_before_workspaces_is_taken_over_by_the_next_sync(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    upgrade_round(settings, demo_engine, "cio_retl", emulator)


# -- Postgres ---------------------------------------------------------------------------------


@pytest.fixture
def pg_settings(
    pg_schemas: PgSchemas, emulator: Emulator, tmp_path: Any
) -> Iterator[tuple[Settings, Engine]]:
    from cio_retl.demo import create_demo_warehouse
    from cio_retl.warehouse import create_engine
    from tests.conftest import demo_models

    engine = create_engine(pg_schemas.url)
    create_demo_warehouse(engine, schema=pg_schemas.warehouse)
    settings = Settings(
        warehouse_url=pg_schemas.url,
        state_url=pg_schemas.url,
        models_dir=demo_models(tmp_path / "models", pg_schemas.warehouse),
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
        state_schema=pg_schemas.state,
    )
    yield settings, engine
    engine.dispose()


def test_round_trip_with_the_state_in_another_database(
    settings: Settings, demo_engine: Engine, emulator: Emulator, other: Emulator, tmp_path: Any
) -> None:
    """The cross-database diff (staged keys, lookups by key) reads one workspace too."""
    from cio_retl.warehouse import create_engine

    state_url = f"duckdb:///{tmp_path / 'state.duckdb'}"
    apart = replace(settings, state_url=state_url)
    round_trip(apart, lambda: edit_demo_warehouse(demo_engine), emulator, other)
    engine = create_engine(state_url)
    try:
        counts = workspace_rows(engine)
    finally:
        engine.dispose()
    assert set(counts) == {SITE_ID, OTHER_SITE} and counts[SITE_ID] == counts[OTHER_SITE]


@pytest.mark.postgres
def test_round_trip_on_postgres(
    pg_settings: tuple[Settings, Engine], pg_schemas: PgSchemas, emulator: Emulator, other: Emulator
) -> None:
    settings, engine = pg_settings
    round_trip(
        settings,
        lambda: edit_demo_warehouse(engine, schema=pg_schemas.warehouse),
        emulator,
        other,
    )
    counts = workspace_rows(engine, pg_schemas.state)
    assert set(counts) == {SITE_ID, OTHER_SITE} and counts[SITE_ID] == counts[OTHER_SITE]
    with engine.connect() as conn:  # the diff's join reads the key's leading columns
        (key,) = conn.execute(
            sa.text(
                "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c"
                " JOIN pg_namespace n ON n.oid = c.connamespace"
                " WHERE n.nspname = :s AND c.conrelid = CAST(:t AS regclass) AND c.contype = 'p'"
            ),
            {"s": pg_schemas.state, "t": f"{pg_schemas.state}.snapshots"},
        ).one()
    assert key == "PRIMARY KEY (workspace, model, key)"


@pytest.mark.postgres
def test_state_from_before_workspaces_on_postgres(
    pg_settings: tuple[Settings, Engine], pg_schemas: PgSchemas, emulator: Emulator
) -> None:
    settings, engine = pg_settings
    upgrade_round(settings, engine, pg_schemas.state, emulator)
    with engine.connect() as conn:
        keys = {
            t: d
            for t, d in conn.execute(
                sa.text(
                    "SELECT c.conrelid::regclass::text, pg_get_constraintdef(c.oid)"
                    " FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
                    " WHERE n.nspname = :s AND c.contype = 'p'"
                ),
                {"s": pg_schemas.state},
            )
        }
    assert keys[f"{pg_schemas.state}.snapshots"] == "PRIMARY KEY (workspace, model, key)"
    assert keys[f"{pg_schemas.state}.rejections"] == "PRIMARY KEY (workspace, model, key)"


def test_events_are_sent_once_per_workspace(
    settings: Settings, demo_engine: Engine, emulator: Emulator, other: Emulator, models_dir: Any
) -> None:
    """An event acknowledged by one workspace was never sent to the other: it goes there
    too, once."""
    with demo_engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA ev"))
        conn.execute(
            sa.text("CREATE TABLE ev.orders (order_id VARCHAR, user_id VARCHAR, done_at TIMESTAMP)")
        )
        conn.execute(
            sa.text(
                "INSERT INTO ev.orders SELECT 'o' || i, 'u' || i, TIMESTAMP '2026-11-01' + i * INTERVAL 1 HOUR"
                " FROM range(5) AS t(i)"
            )
        )
    (models_dir / "orders.sql").write_text(
        "-- kind: event\n-- identifier: id\n-- key: user_id\n-- event_key: order_id\n"
        "-- name: order_completed\n-- timestamp: done_at\nselect order_id, user_id, done_at from ev.orders\n"
    )
    here, there = (
        replace(settings, models_dir=models_dir),
        to(replace(settings, models_dir=models_dir), other),
    )
    assert sent(sync(here)) == 5
    assert sent(sync(there)) == 5
    assert sent(sync(here)) == sent(sync(there)) == 0
    with demo_engine.connect() as conn:
        rows = dict(
            conn.execute(
                sa.text("SELECT workspace, COUNT(*) FROM cio_retl.sent_events GROUP BY workspace")
            ).all()
        )
    assert rows == {SITE_ID: 5, OTHER_SITE: 5}


# -- Snowflake (fakesnow) ---------------------------------------------------------------------


@pytest.fixture
def sf(fakesnow_url: str, emulator: Emulator) -> Iterator[tuple[Settings, Engine]]:
    from cio_retl.demo import create_demo_warehouse
    from cio_retl.warehouse import create_engine
    from tests.conftest import REPO

    engine = create_engine(fakesnow_url)
    create_demo_warehouse(engine)
    settings = Settings(
        warehouse_url=fakesnow_url,
        state_url=fakesnow_url,
        models_dir=REPO / "sql",
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
    )
    yield settings, engine
    engine.dispose()


def test_state_from_before_workspaces_on_snowflake(
    sf: tuple[Settings, Engine], emulator: Emulator
) -> None:
    settings, engine = sf
    upgrade_round(settings, engine, "cio_retl", emulator)


def test_round_trip_on_snowflake(
    sf: tuple[Settings, Engine], emulator: Emulator, other: Emulator
) -> None:
    settings, engine = sf
    round_trip(settings, lambda: edit_demo_warehouse(engine), emulator, other)


@pytest.mark.parametrize(
    "backend", ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_runs_entering_a_workspace_at_once_take_old_state_over_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """Bucket runs start together: each records the workspace, one takes the old rows."""
    from concurrent.futures import ThreadPoolExecutor

    from cio_retl.state import Workspace
    from cio_retl.warehouse import create_engine

    if backend == "postgres":
        schemas: PgSchemas = request.getfixturevalue("pg_schemas")
        url, schema = schemas.url, schemas.state
    else:
        url, schema = f"duckdb:///{tmp_path / 'state.duckdb'}", "cio_retl"
    engine = create_engine(url)
    try:
        state = StateStore(engine, schema)
        state.ensure_schema()
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {schema}.workspaces"))
            conn.execute(sa.text(f"ALTER TABLE {schema}.snapshots DROP COLUMN workspace"))
            conn.execute(
                sa.text(
                    f"INSERT INTO {schema}.snapshots SELECT 'm', 'k' || i, 'f', '{{}}', '{{}}',"
                    f" 'old', now() FROM generate_series(1, 50) AS t(i)"
                )
            )
        state.ensure_schema()  # the upgrade: 50 rows from before workspaces
        site = Workspace(SITE_ID, 1, "us")
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: state.enter_workspace(site, f"run-{i}"), range(6)))
        adopted = [r for r in results if r is not None]
        assert len(adopted) == 1 and adopted[0].snapshots == 50
        (row,) = state.known_workspaces().values()
        assert (row.site_id, row.adopted_run_id) == (SITE_ID, adopted[0].run_id)
        assert workspace_rows(engine, schema) == {SITE_ID: 50}
    finally:
        engine.dispose()


def test_new_site_id_of_a_known_environment_is_noted(
    settings: Settings,
    demo_engine: Engine,
    emulator: Emulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Other credentials of the same workspace (same environment_id): still a new Site ID,
    so everything is sent again, and the report says why."""
    first = sync(settings)
    assert first.notices == [] and first.environment_id == 1
    with Emulator(site_id="rotated-site", api_key=API_KEY, environment_id=1) as rotated:
        report = sync(to(settings, rotated))
        assert sent(report) == sent(first)
        (notice,) = report.notices
        assert "rotated-site" in notice and "environment_id 1" in notice and SITE_ID in notice
        assert sync(to(settings, rotated)).notices == []  # said once, at its first sync
    from cio_retl.cli import print_report

    print_report(report)
    assert "note:" in capsys.readouterr().out
