"""One plan per model per run (cio_retl.plan): the model is read once, the send reads the
plan, and no plan outlives its run, a killed one included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.config import Settings
from cio_retl.demo import edit_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.models import load_models
from cio_retl.plan import PLAN_PREFIX, plan_prefix
from cio_retl.sync import Outcome, SyncOptions, run_sync
from tests.conftest import FAST_RETRY, PgSchemas, sync
from tests.test_postgres import expected_workspace as expected_on_postgres
from tests.test_postgres import pg_engine, pg_settings  # noqa: F401  (fixtures)
from tests.test_sync_duckdb import actual_workspace, expected_workspace


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine of this process runs while the test does."""
    seen: list[str] = []

    def listen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", listen)
    yield seen
    sa.event.remove(sa.engine.Engine, "before_cursor_execute", listen)


def model_reads(statements: list[str], settings: Settings, name: str) -> int:
    """Statements that read the model's rows (its column check, ``LIMIT 0``, reads none)."""
    (model,) = load_models(settings.models_dir, [name])
    return sum(1 for s in statements if model.sql in s and "LIMIT 0" not in s)


def plan_tables(engine: Engine, schema: str = "cio_retl") -> list[str]:
    with engine.connect() as conn:
        names = sa.inspect(conn).get_table_names(schema=schema)
    return sorted(n for n in names if n.startswith(PLAN_PREFIX))


def test_each_model_is_read_once_per_run(
    settings: Settings, demo_engine: Engine, emulator: Emulator, statements: list[str]
) -> None:
    """Counting, guardrails, upserts and removals all read one plan (old main: a counting
    pass, then the upserts' scan, then the removals' anti-join)."""
    assert sync(settings).outcome is Outcome.SYNCED
    assert model_reads(statements, settings, "users") == 1
    assert model_reads(statements, settings, "memberships") == 1

    edit_demo_warehouse(demo_engine)  # users change; a membership leaves (a removal)
    statements.clear()
    second = sync(settings)

    assert second.outcome is Outcome.SYNCED
    reports = {m.model: m for m in second.models}
    assert reports["users"].updated == 4 and reports["memberships"].deleted == 1
    assert model_reads(statements, settings, "users") == 1
    assert model_reads(statements, settings, "memberships") == 1
    assert actual_workspace(emulator) == expected_workspace(demo_engine)


def test_the_send_reads_a_plan_that_is_gone_when_the_run_ends(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    during: list[list[str]] = []

    def progress(model: str, _done: int, _total: int) -> None:
        if model == "users" and not during:
            during.append(plan_tables(demo_engine))

    options = SyncOptions(retry=FAST_RETRY)
    report = run_sync(settings, None, options, progress=progress)

    assert report.outcome is Outcome.SYNCED
    (users_plans,) = during
    assert any(name.startswith(plan_prefix("users", None)) for name in users_plans)
    assert plan_tables(demo_engine) == []
    assert actual_workspace(emulator) == expected_workspace(demo_engine)


def test_a_dry_run_builds_no_plan(settings: Settings, demo_engine: Engine) -> None:
    assert sync(settings).outcome is Outcome.SYNCED
    edit_demo_warehouse(demo_engine)
    tables_before = _all_tables(demo_engine)

    dry = sync(settings, dry_run=True)

    assert {m.model: m.updated for m in dry.models}["users"] == 4
    assert _all_tables(demo_engine) == tables_before


def test_a_plan_a_killed_run_left_behind_is_dropped_by_the_next_run(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    assert sync(settings).outcome is Outcome.SYNCED
    edit_demo_warehouse(demo_engine)
    # What a run killed after planning leaves: a plan of its own name, half-written or not.
    leftover = f"{plan_prefix('users', None)}deadbeef0000"
    with demo_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE cio_retl.{leftover} AS SELECT 1 AS __cio_seq"))

    second = sync(settings)

    assert second.outcome is Outcome.SYNCED
    assert {m.model: m.updated for m in second.models}["users"] == 4
    assert plan_tables(demo_engine) == []
    assert actual_workspace(emulator) == expected_workspace(demo_engine)


def _all_tables(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT table_schema, table_name FROM information_schema.tables")
        )
        return sorted((r[0], r[1]) for r in rows)


@pytest.mark.postgres
def test_postgres_reads_each_model_once_and_keeps_no_plan(
    pg_settings: Settings,  # noqa: F811
    pg_schemas: PgSchemas,
    pg_engine: Engine,  # noqa: F811
    emulator: Emulator,
    statements: list[str],
) -> None:
    assert sync(pg_settings).outcome is Outcome.SYNCED
    edit_demo_warehouse(pg_engine, schema=pg_schemas.warehouse)
    statements.clear()

    second = sync(pg_settings)

    assert second.outcome is Outcome.SYNCED
    assert {m.model: m.deleted for m in second.models}["memberships"] == 1
    assert model_reads(statements, pg_settings, "users") == 1
    assert model_reads(statements, pg_settings, "memberships") == 1
    assert plan_tables(pg_engine, pg_schemas.state) == []
    assert actual_workspace(emulator) == expected_on_postgres(pg_engine, pg_schemas.warehouse)
