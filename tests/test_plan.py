"""One plan per model per run (cio_retl.plan): the model is read once, the send reads the
plan, and no plan outlives its run, a killed one included."""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl import plan as plan_module
from cio_retl import snapshot_merge
from cio_retl.ack import Acknowledger
from cio_retl.buckets import Bucket
from cio_retl.config import Settings
from cio_retl.demo import edit_demo_warehouse
from cio_retl.dialects import DuckDBDialect
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.errors import GuardrailError
from cio_retl.limits import MAX_BATCH_BYTES
from cio_retl.models import load_models
from cio_retl.normalize import canonical_json
from cio_retl.passes import describes
from cio_retl.plan import MOVED_TABLE, PLAN_PREFIX, PlanDiff, PlanTable, plan_prefix
from cio_retl.send import Sender
from cio_retl.state import StateStore
from cio_retl.sync import ModelReport, Outcome, SyncOptions, run_sync
from cio_retl.warehouse import (
    BUILT_SNAPSHOT_COLUMN,
    KEY_COLUMN,
    SEQ_COLUMN,
    create_engine,
)
from tests.conftest import API_KEY, FAST_RETRY, SITE_ID, PgSchemas, duplicate_snapshot_keys, sync
from tests.test_postgres import expected_workspace as expected_on_postgres
from tests.test_postgres import pg_engine, pg_settings, sorted_items  # noqa: F401  (fixtures)
from tests.test_sync_duckdb import actual_workspace, batch_items, expected_workspace


def model_reads(statements: list[str], settings: Settings, name: str) -> int:
    """Statements that read the model's rows (its column check, ``LIMIT 0``, reads none, nor
    does DuckDB's DESCRIBE of the plan's query). A rerun's moved keys, written just before
    its plan in the plan's transaction (the narrow join), are part of that one read: the
    plan's statements follow (after the temporary table's ANALYZE on PostgreSQL)."""
    (model,) = load_models(settings.models_dir, [name])
    statements = [s for s in statements if not describes(s)]
    reads = [i for i, s in enumerate(statements) if model.sql in s and "LIMIT 0" not in s]
    staged = [
        i
        for i in reads
        if f"TEMPORARY TABLE {MOVED_TABLE}" in statements[i].split(" AS ")[0]
        or f"TEMPORARY TABLE temp.main.{MOVED_TABLE}" in statements[i].split(" AS ")[0]
    ]
    for i in staged:
        following = [s for s in statements[i + 1 : i + 3] if not s.startswith("ANALYZE")]
        assert following[0].startswith(("CREATE TABLE ", "INSERT INTO "))
        assert PLAN_PREFIX in following[0]
    return len(reads) - len(staged)


def writes_plan(statement: str) -> bool:
    """Whether ``statement`` writes a plan's rows: DuckDB declares the table (its texts
    compressed by zstd) and INSERTs them; the others CREATE it AS the query."""
    return statement.startswith(f"INSERT INTO cio_retl.{PLAN_PREFIX}") or (
        f"CREATE TABLE cio_retl.{PLAN_PREFIX}" in statement and " AS " in statement
    )


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

    resync_edits_reading_each_model_once(settings, demo_engine, statements)
    assert actual_workspace(emulator) == expected_workspace(demo_engine)


def resync_edits_reading_each_model_once(
    settings: Settings, engine: Engine, statements: list[str]
) -> None:
    """Edit the demo warehouse (users change; a membership leaves, a removal) and sync: the
    changes are sent, and each model is read once."""
    edit_demo_warehouse(engine)
    statements.clear()
    second = sync(settings)

    assert second.outcome is Outcome.SYNCED
    reports = {m.model: m for m in second.models}
    assert reports["users"].updated == 4 and reports["memberships"].deleted == 1
    assert model_reads(statements, settings, "users") == 1
    assert model_reads(statements, settings, "memberships") == 1


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


def test_duckdb_builds_a_plan_without_insertion_order_and_restores_it(
    settings: Settings, demo_engine: Engine, emulator: Emulator, statements: list[str]
) -> None:
    """The plan's CREATE TABLE runs with DuckDB's preserve_insertion_order off (kept on, a
    2M-row initial plan ran out of memory under the 128MB default limit), and the same
    connection resets it before it goes back to the pool."""
    assert sync(settings).outcome is Outcome.SYNCED
    builds = [i for i, s in enumerate(statements) if writes_plan(s)]
    assert builds
    for i in builds:
        before = statements[:i]
        off = max(j for j, s in enumerate(before) if "preserve_insertion_order" in s)
        assert before[off].strip() == "SET preserve_insertion_order = false"
        after = statements[i + 1 :]
        assert next(s for s in after if "preserve_insertion_order" in s).startswith("RESET")


def test_duckdb_numbers_a_plan_by_its_row_ids_dense_from_zero(
    settings: Settings,
    demo_engine: Engine,
    emulator: Emulator,
    statements: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The statement that builds a DuckDB plan has no ``ROW_NUMBER() OVER ()`` (it would
    make that statement single-threaded and hold every payload in its window), and no
    statement numbers the rows after: the send reads the row ids as the sequence numbers,
    0..n-1, unique, as the stored column would have held them."""
    seen: list[tuple[int, int, int, int, int]] = []
    read: list[int] = []
    chunks = PlanTable.chunks

    def watched(plan: PlanTable) -> Iterator[Any]:
        for rows, items in chunks(plan):
            read.extend(seq for seq, _, _ in rows)
            yield rows, items

    monkeypatch.setattr(PlanTable, "chunks", watched)

    def progress(model: str, _done: int, _total: int) -> None:
        if model == "users" and not seen:
            (name,) = [
                n for n in plan_tables(demo_engine) if n.startswith(plan_prefix("users", None))
            ]
            with demo_engine.connect() as conn:
                seen.append(
                    tuple(
                        conn.execute(
                            sa.text(
                                "SELECT COUNT(*), COUNT(DISTINCT rowid), MIN(rowid),"
                                f" MAX(rowid), COUNT(__cio_seq) FROM cio_retl.{name}"
                            )
                        ).one()
                    )
                )

    report = run_sync(settings, None, SyncOptions(retry=FAST_RETRY), progress=progress)

    assert report.outcome is Outcome.SYNCED
    ((rows, distinct, first, last, stored_numbers),) = seen
    assert rows > 1 and distinct == rows and (first, last) == (0, rows - 1)
    assert stored_numbers == 0  # the column is there, unwritten
    assert read and len(set(read)) == len(read) and min(read) >= 0 and max(read) < rows
    builds = [s for s in statements if writes_plan(s)]
    assert builds and not any("OVER ()" in s for s in builds)
    assert not [s for s in statements if s.startswith(f"UPDATE cio_retl.{PLAN_PREFIX}")]
    assert actual_workspace(emulator) == expected_workspace(demo_engine)


def test_a_model_column_named_rowid_keeps_duckdb_plans_numbered(
    settings: Settings, tmp_path: Path, emulator: Emulator, statements: list[str]
) -> None:
    """A column named ``rowid`` (in any case) hides DuckDB's row ids, which the numbering
    after the write reads: such a plan is numbered as it is written, and every row goes."""
    url = f"duckdb:///{tmp_path / 'rowid.duckdb'}"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(20))
    run = people_settings(settings, tmp_path, url)
    (run.models_dir / "people.sql").write_text(
        PEOPLE_MODEL.replace("select *", "select email, name, visits AS RowId")
    )

    report = sync(run)

    assert report.outcome is Outcome.REJECTED  # the bad email and the value over the limit
    (people,) = report.models
    assert people.created == 18 and people.rejected == 2
    assert len(stored(engine)) == 18
    builds = [s for s in statements if writes_plan(s)]
    assert builds and all("ROW_NUMBER() OVER ()" in s for s in builds)
    assert not [s for s in statements if s.startswith(f"UPDATE cio_retl.{PLAN_PREFIX}")]
    engine.dispose()


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


# -- payloads built by the database -----------------------------------------------------------

PEOPLE_MODEL = """-- kind: person
-- identifier: email
-- key: email
select * from app.people
"""


def people_rows(n: int, text_size: int = 8) -> list[dict[str, Any]]:
    """Rows of every kind the SQL builds, edge values among them: values the SQL leaves to
    Python (tiny doubles, capital escapes), rows Python rejects (a bad email, a too-long
    text), pre-1970 times, integers beyond 2^53, NULLs."""
    rows = []
    for i in range(n):
        rows.append(
            {
                "email": f"person{i}@example.com",
                "name": ("é" if i % 3 else "x\x0b") + "n" * text_size + str(i),
                "vip": None if i % 5 == 0 else i % 2 == 0,
                "visits": [i, 2**53 + i, -(2**60)][i % 3],
                "score": [0.1 * i, 5e-8, 1e20, float(i), None][i % 5],
                "balance": Decimal(i) / 8,
                "seen_at": dt.datetime(1969, 12, 31, 23, 59, 59, 500000) + dt.timedelta(days=i),
                "born_on": None if i % 4 == 0 else dt.date(1980, 1, 1) + dt.timedelta(days=i),
            }
        )
    rows[1]["email"] = "not an email"
    rows[2]["name"] = "y" * 1001  # over the 1000-byte value limit
    return rows


PEOPLE_DDL = {
    "duckdb": (
        "CREATE TABLE app.people (email VARCHAR, name VARCHAR, vip BOOLEAN, visits BIGINT,"
        " score DOUBLE, balance DECIMAL(18, 3), seen_at TIMESTAMP, born_on DATE)"
    ),
    "postgresql": (
        "CREATE TABLE app.people (email TEXT, name TEXT, vip BOOLEAN, visits BIGINT,"
        " score DOUBLE PRECISION, balance NUMERIC(18, 3), seen_at TIMESTAMP, born_on DATE)"
    ),
    "snowflake": (
        "CREATE TABLE app.people (email VARCHAR, name VARCHAR, vip BOOLEAN, visits NUMBER(38, 0),"
        " score FLOAT, balance NUMBER(18, 3), seen_at TIMESTAMP_NTZ, born_on DATE)"
    ),
}


def people_warehouse(engine: Engine, rows: list[dict[str, Any]], schema: str = "app") -> None:
    ddl = PEOPLE_DDL[engine.dialect.name].replace("app.", f"{schema}.")
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        conn.execute(sa.text(ddl))
        conn.execute(
            sa.text(
                f"INSERT INTO {schema}.people VALUES (:email, :name, :vip, :visits, :score,"
                " :balance, :seen_at, :born_on)"
            ),
            rows,
        )


def people_settings(settings: Settings, tmp_path: Path, url: str, schema: str = "app") -> Settings:
    folder = tmp_path / f"models_{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "people.sql").write_text(PEOPLE_MODEL.replace("app.", f"{schema}."))
    return replace(settings, warehouse_url=url, state_url=url, models_dir=folder)


def stored(
    engine: Engine, schema: str = "cio_retl", model: str = "people"
) -> dict[str, tuple[str, ...]]:
    """The model's snapshot rows: key -> (fingerprint, identifiers, attributes, run_id)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT key, fingerprint, identifiers, attributes, run_id"
                f" FROM {schema}.snapshots WHERE model = :model"
            ),
            {"model": model},
        )
        return {r[0]: tuple(r[1:]) for r in rows}


def same_items(a: ModelReport, b: ModelReport) -> bool:
    """The same rows created and rejected, the same item bytes: the built items travel in
    batches of their own, so the requests (and their envelopes: 11 bytes each) can differ."""

    def items(report: ModelReport) -> dict[str, int]:
        counts = report.counts()
        counts["bytes_sent"] -= 11 * counts.pop("requests")
        return counts

    return items(a) == items(b)


def rejected(engine: Engine, schema: str = "cio_retl") -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT key, code, reason, field, status, payload"
                f" FROM {schema}.rejections WHERE model = 'people' ORDER BY key"
            )
        )
        return [tuple(r) for r in rows]


def _python_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cio_retl.session.plans_supported", lambda _warehouse: False)


def watch_built(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """The keys of the items the database built, by model, as the send reads them from the
    plan (``PlanTable.chunks``, watched and called through): the rows the SQL did not leave
    to Python. An item's key is its object id, else its one identifier's value."""
    built: dict[str, set[str]] = defaultdict(set)
    chunks = PlanTable.chunks

    def watched(plan: PlanTable) -> Iterator[Any]:
        for rows, items in chunks(plan):
            for item in items:
                ids = orjson.loads(item)["identifiers"]
                built[plan.model].add(ids.get("object_id") or next(iter(ids.values())))
            yield rows, items

    monkeypatch.setattr(PlanTable, "chunks", watched)
    return built


def test_snapshots_from_the_plan_are_the_python_paths_bytes(
    settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    statements: list[str],
) -> None:
    rows = people_rows(60)
    urls = [f"duckdb:///{tmp_path / name}.duckdb" for name in ("plan", "python")]
    for url in urls:
        engine = create_engine(url)
        people_warehouse(engine, rows)
        engine.dispose()
    built = watch_built(monkeypatch)
    planned = sync(people_settings(settings, tmp_path, urls[0]))
    # The row the database rejected was recorded from the plan, in one statement.
    assert any(
        s.lstrip().startswith("INSERT INTO")
        and "rejections" in s
        and "FROM " in s
        and "cio_plan_" in s
        for s in statements
    )
    with Emulator(site_id=SITE_ID, api_key=API_KEY) as other:
        _python_path_only(monkeypatch)
        python = sync(
            replace(people_settings(settings, tmp_path, urls[1]), track_api_url=other.url)
        )
        python_people = other.workspace.people_by("email")

    assert planned.outcome is python.outcome is Outcome.REJECTED
    assert same_items(planned.models[0], python.models[0])
    # The same rejections; those the database found are listed before the Python path's.
    assert sorted(planned.models[0].rejections) == sorted(python.models[0].rejections)
    assert planned.models[0].examples_by_code == python.models[0].examples_by_code
    assert planned.models[0].rejected_by_code == python.models[0].rejected_by_code
    assert emulator.workspace.people_by("email") == python_people
    engines = [create_engine(url) for url in urls]
    try:
        from_plan, from_python = (stored(engine) for engine in engines)
        rejected_by_plan, rejected_by_python = (rejected(engine) for engine in engines)
    finally:
        for engine in engines:
            engine.dispose()
    assert len(from_plan) == 58
    # The rejected rows: one the database rejected (a text over the value limit), one it
    # left to Python (an invalid email); the same records either way.
    assert rejected_by_plan == rejected_by_python
    assert {r[1] for r in rejected_by_plan} == {"too_long", "invalid_identifier"}
    # Byte for byte: fingerprint, identifiers and attributes text, whoever wrote the row.
    assert {k: v[:3] for k, v in from_plan.items()} == {k: v[:3] for k, v in from_python.items()}
    assert len(built["people"]) >= 30  # the rows the SQL did not leave to Python
    assert built["people"] <= set(from_plan)


def test_a_built_item_customerio_refuses_is_rejected_alone(
    settings: Settings, tmp_path: Path, emulator: Emulator
) -> None:
    url = f"duckdb:///{tmp_path / 'people'}.duckdb"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(40))
    engine.dispose()
    bad = "person3@example.com"  # a row whose item the database built
    emulator.faults = FaultPlan(reject_identifiers=frozenset({bad}))
    people = people_settings(settings, tmp_path, url)

    report = sync(people)

    (model,) = report.models
    assert model.created == 37 and model.rejected == 3
    assert (bad, "invalid: rejected by fault plan [identifiers] (HTTP 207)") in model.rejections
    engine = create_engine(url)
    try:
        snapshots = stored(engine)
        assert bad not in snapshots and len(snapshots) == 37
        state = StateStore(engine)
        [row] = [r for r in state.rejections("people") if r["key"] == bad]
        assert row["status"] == 207 and "<str>" in (row["payload"] or "")
        assert "person3" not in (row["payload"] or "").replace(bad, "")  # values redacted
    finally:
        engine.dispose()

    emulator.faults = FaultPlan()
    before = len(emulator.requests)
    retry = sync(people)
    assert [i["identifiers"]["email"] for i in batch_items(emulator, before)] == [bad]
    assert retry.models[0].created == 1
    engine = create_engine(url)
    try:
        assert bad in stored(engine)
        assert bad not in {r["key"] for r in StateStore(engine).rejections("people")}
    finally:
        engine.dispose()


def latest_run_id(engine: Engine, schema: str = "cio_retl") -> str:
    """The run id of the latest run the state schema ``schema`` holds."""
    with engine.connect() as conn:
        return str(
            conn.execute(
                sa.text(f"SELECT run_id FROM {schema}.runs ORDER BY started_at DESC LIMIT 1")
            ).scalar_one()
        )


@pytest.mark.parametrize("path", ["planned", "python"])
def test_rejections_a_failed_state_write_took_are_recorded_before_the_run_stops(
    settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """The state transaction that records rejections fails (the database takes its writes
    back): the rejections it took go back to the buffer, and a later write of the phase, or
    its last attempt, records them before the run's error stops it.

    planned: an item Customer.io refused (a 207) and a row Python rejects, recorded with
    their batches' acknowledgments. python: the rows Python rejects in a rerun with nothing
    else to send, recorded by the phase's last flush of its buffers, then its last attempt."""
    url = f"duckdb:///{tmp_path / 'people'}.duckdb"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(40))
    people = people_settings(settings, tmp_path, url)
    refused = "person3@example.com"  # a row whose item the database builds
    if path == "planned":
        emulator.faults = FaultPlan(reject_identifiers=frozenset({refused}))
        expected = {refused, "not an email"}  # and the row the SQL leaves to Python
    else:
        _python_path_only(monkeypatch)
        assert sync(people).models[0].created == 38
        expected = {"not an email", "person2@example.com"}
    record, failed = StateStore.record_rejections, list[list[str]]()

    def fails_once(state: StateStore, conn: sa.Connection, *args: Any) -> None:
        record(state, conn, *args)
        if not failed and args[-1]:
            failed.append([r.key for r in args[-1]])
            raise sa.exc.OperationalError("INSERT INTO rejections", {}, Exception("injected"))

    monkeypatch.setattr(StateStore, "record_rejections", fails_once)
    try:
        with pytest.raises(Exception, match="injected"):
            sync(people)
        assert failed and set(failed[0]) <= expected  # the write that failed held some
        run_id = latest_run_id(engine)
        rows = {r["key"]: r for r in StateStore(engine).rejections("people")}
        assert expected <= set(rows)
        assert {rows[key]["run_id"] for key in expected} == {run_id}  # the failed run's
        if path == "planned":
            assert rows[refused]["status"] == 207
            assert refused not in stored(engine)  # never acknowledged into the snapshot
    finally:
        engine.dispose()


def test_rejections_no_write_can_record_leave_the_run_its_own_error(
    settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every write of rejections fails, the phase's last attempt too: the run stops with a
    write's error, never the last attempt's, and a warning says how many were not recorded
    (the driver's message, never the statement or its rows)."""
    url = f"duckdb:///{tmp_path / 'people'}.duckdb"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(40))
    people = people_settings(settings, tmp_path, url)
    calls = list[int]()

    def always_fails(state: StateStore, conn: sa.Connection, model: str, *args: Any) -> None:
        if args[-1]:
            calls.append(len(args[-1]))
            raise sa.exc.OperationalError(
                "INSERT INTO rejections", {"key": "person1"}, Exception(f"injected{len(calls)}")
            )

    monkeypatch.setattr(StateStore, "record_rejections", always_fails)
    try:
        with caplog.at_level("WARNING", logger="cio_retl.send"), pytest.raises(Exception) as error:
            sync(people)
        assert len(calls) >= 2, calls  # the failed write(s), then the last attempt
        assert f"injected{len(calls)}" not in str(error.value), (calls, error.value)
        assert (
            f"{calls[-1]} rejection(s) of this run could not be recorded (injected" in caplog.text
        )
        assert "INSERT INTO" not in caplog.text and "person1" not in caplog.text
    finally:
        engine.dispose()


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_a_plan_written_out_of_order_is_read_in_sequence_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    """DuckDB reads a plan's ranges without ORDER BY (DuckDBDialect.sorts_plan_reads) and
    the rows come as they lie in the table; a plan whose rows lie out of sequence order (as
    one numbered as written by parallel threads may) still reads in order, every built row
    once, its item beside its own sequence number."""
    engine = create_engine(f"duckdb:///{tmp_path / 'plan'}.duckdb")
    assert not DuckDBDialect.sorts_plan_reads
    seqs = list(range(200))
    random.Random(18).shuffle(seqs)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA cio_retl"))
        conn.execute(
            sa.text(
                "CREATE TABLE cio_retl.plan (__cio_seq BIGINT, __cio_key VARCHAR,"
                " __cio_snapshot VARCHAR, __cio_send VARCHAR, __cio_snap VARCHAR)"
            )
        )
        for seq in seqs:  # one row per statement: the table holds them in this order
            conn.execute(
                sa.text("INSERT INTO cio_retl.plan VALUES (:seq, :key, :snapshot, NULL, NULL)"),
                {"seq": seq, "key": f"k{seq}", "snapshot": None if seq % 10 == 3 else "{}"},
            )
    monkeypatch.setattr(PlanTable, "MAX_READ_ROWS", step)
    plan = PlanTable(
        "cio_retl.plan",
        "people",
        StateStore(engine),
        "'{\"id\":' || to_json(p.__cio_key) || '}'",
        "NULL",
    )
    try:
        read = [
            (row[0], item)
            for rows, items in plan.chunks()
            for row, item in zip(rows, items, strict=True)
        ]
    finally:
        engine.dispose()
    built = [seq for seq in range(200) if seq % 10 != 3]
    assert [seq for seq, _ in read] == built
    assert all(item == b'{"id":"k%d"}' % seq for seq, item in read)


def test_built_items_respect_the_batch_limits(
    settings: Settings, tmp_path: Path, emulator: Emulator
) -> None:
    url = f"duckdb:///{tmp_path / 'people'}.duckdb"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(1500, text_size=900))  # ~1 KB items
    engine.dispose()

    report = sync(people_settings(settings, tmp_path, url))

    assert report.models[0].created == 1498
    batches = [r for r in emulator.requests if r.path == "/api/v2/batch" and r.status == 200]
    assert all(r.n_bytes <= MAX_BATCH_BYTES for r in batches)
    assert max(r.n_bytes for r in batches) > MAX_BATCH_BYTES * 0.9  # bodies filled by bytes
    assert sum(len(r.body["batch"]) for r in batches) == 1498

    small = f"duckdb:///{tmp_path / 'small'}.duckdb"
    engine = create_engine(small)
    people_warehouse(engine, people_rows(50))
    engine.dispose()
    before = len(emulator.requests)
    few = sync(people_settings(settings, tmp_path, small), batch_items=7)
    assert few.models[0].created == 48
    sized = [r for r in emulator.requests[before:] if r.path == "/api/v2/batch"]
    assert max(len(r.body["batch"]) for r in sized) == 7


@pytest.mark.postgres
def test_postgres_snapshots_from_the_plan_are_the_python_paths_bytes(
    settings: Settings,
    pg_schemas: PgSchemas,
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = people_rows(60)
    engine = create_engine(pg_schemas.url)
    try:
        people_warehouse(engine, rows, pg_schemas.warehouse)
        base = people_settings(settings, tmp_path, pg_schemas.url, pg_schemas.warehouse)
        built = watch_built(monkeypatch)
        planned = sync(replace(base, state_schema=pg_schemas.state))
        with Emulator(site_id=SITE_ID, api_key=API_KEY) as other:
            _python_path_only(monkeypatch)
            python_schema = f"{pg_schemas.state}_py"
            try:
                python = sync(replace(base, state_schema=python_schema, track_api_url=other.url))
                python_people = other.workspace.people_by("email")
                from_python = stored(engine, python_schema)
            finally:
                with engine.begin() as conn:
                    conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {python_schema} CASCADE"))
        from_plan = stored(engine, pg_schemas.state)
    finally:
        engine.dispose()
    assert same_items(planned.models[0], python.models[0])
    assert emulator.workspace.people_by("email") == python_people
    assert len(from_plan) == 58
    assert {k: v[:3] for k, v in from_plan.items()} == {k: v[:3] for k, v in from_python.items()}
    assert len(built["people"]) >= 20  # the rows the SQL did not leave to Python
    assert built["people"] <= set(from_plan)


def test_a_plan_over_the_memory_limit_falls_back_to_the_streaming_diff(
    tmp_path: Path,
    settings: Settings,
    emulator: Emulator,
    statements: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under a tight DuckDB memory_limit the plan's write (every new row's payload
    at once) runs out of memory; the model is then diffed as a stream, as before plans, and
    every row still arrives once. Without the fallback the run stops with that error."""
    rows = 40_000
    path = tmp_path / "tight.duckdb"
    generated_table(
        f"duckdb:///{path}",
        "wide.people",
        "i AS user_id, repeat(md5(CAST(i AS VARCHAR)), 12) AS a,"
        " repeat(md5(CAST(i + 1 AS VARCHAR)), 12) AS b",
        rows,
    )
    models = tmp_path / "sql"
    models.mkdir()
    (models / "people.sql").write_text(
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect * from wide.people\n"
    )
    url = f"duckdb:///{path}?memory_limit=16MB"
    settings = replace(settings, warehouse_url=url, state_url=url, models_dir=models)
    with caplog.at_level("WARNING", logger="cio_retl.plan"):
        report = sync(settings)

    assert report.outcome is Outcome.SYNCED, report.error
    assert report.models[0].created == rows
    assert len(emulator.workspace.people_by("id")) == rows
    assert any(writes_plan(s) for s in statements)  # tried
    assert "people: its plan does not fit" in caplog.text
    check = create_engine(url)
    try:
        assert plan_tables(check) == []
    finally:
        check.dispose()
    again = sync(settings)  # the snapshot was written: nothing is sent twice
    assert again.outcome is Outcome.SYNCED and again.models[0].created == 0


def test_a_plan_numbered_after_its_write_is_built_again_numbered_as_written(
    settings: Settings,
    demo_engine: Engine,
    emulator: Emulator,
    statements: list[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A DuckDB plan whose parallel write runs out of memory is built again with its rows
    numbered as written (the single pipeline of the window, which spills), not diffed as a
    stream. The first write is made to fail as the memory limit fails it."""
    from cio_retl.dialects import DuckDBDialect

    create_plan = DuckDBDialect.create_plan

    def failing(self: DuckDBDialect, table: str, query: str, order: Any, columns: Any) -> list[str]:
        if "CAST(NULL AS BIGINT)" in query:
            return [f"CREATE TABLE {table} AS SELECT * FROM no_memory_left"]
        return create_plan(self, table, query, order, columns)

    monkeypatch.setattr(DuckDBDialect, "create_plan", failing)
    monkeypatch.setattr(
        DuckDBDialect, "out_of_memory", lambda _self, error: "no_memory_left" in str(error)
    )
    with caplog.at_level("WARNING", logger="cio_retl.plan"):
        report = sync(settings)

    assert report.outcome is Outcome.SYNCED, report.error
    assert "did not fit the memory limit as built" in caplog.text
    assert "does not fit" not in caplog.text  # not streamed
    builds = [s for s in statements if writes_plan(s)]
    assert any("no_memory_left" in s for s in builds)
    assert any("ROW_NUMBER() OVER ()" in s for s in builds)
    assert actual_workspace(emulator) == expected_workspace(demo_engine)
    assert plan_tables(demo_engine) == []


THINGS_MODELS = {
    "companies": "-- kind: object\n-- object_type_id: 1\n-- key: id\n"
    "select id, name, n from app.things\n",
    "members": "-- kind: person\n-- identifier: id\n-- key: id\nselect id, name, wide from app.things\n",
    # A timestamp key: the Python path sends its Unix seconds, so the SQL builds nothing.
    "stamped": "-- kind: person\n-- identifier: id\n-- key: ts\nselect ts, name from app.things\n",
}


def generated_table(url: str, table: str, columns: str, rows: int) -> None:
    """``table`` (schema-qualified, the schema created) of ``rows`` rows of ``columns``, SQL
    over ``i`` from 0, generated by DuckDB."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {table.split('.')[0]}"))
        conn.execute(
            sa.text(f"CREATE TABLE {table} AS SELECT {columns} FROM range({int(rows)}) AS t(i)")
        )
    engine.dispose()


def things_warehouse(url: str, rows: int) -> None:
    generated_table(
        url,
        "app.things",
        "CAST(i AS INTEGER) AS id, TIMESTAMP '2020-01-01' + i * INTERVAL '1 day' AS ts,"
        " 'Thing ' || i AS name, repeat('w', 900) || i AS wide, i * 3 AS n",
        rows,
    )


def test_objects_and_id_keyed_people_from_the_plan_equal_the_python_path(
    settings: Settings, tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object model (its item's identifiers in another order than its snapshot's), a
    person model keyed by an integer id, and one keyed by a timestamp (left to Python): the
    same items, workspace and snapshots either way. The send reads the plan in ranges of a
    few rows here (wide rows, a small READ_BYTES), so the ranges' seams are crossed often."""
    monkeypatch.setattr("cio_retl.plan.PlanTable.READ_BYTES", 8 * 1024)
    folder = tmp_path / "things_models"
    folder.mkdir()
    for name, sql in THINGS_MODELS.items():
        (folder / f"{name}.sql").write_text(sql)
    urls = [f"duckdb:///{tmp_path / name}.duckdb" for name in ("plan", "python")]
    for url in urls:
        things_warehouse(url, 50)
    runs = [replace(settings, warehouse_url=u, state_url=u, models_dir=folder) for u in urls]

    built = watch_built(monkeypatch)
    planned = sync(runs[0])
    with Emulator(site_id=SITE_ID, api_key=API_KEY) as other:
        _python_path_only(monkeypatch)
        python = sync(replace(runs[1], track_api_url=other.url))
        python_objects, python_people = (
            dict(other.workspace.objects),
            other.workspace.people_by("id"),
        )

    assert planned.outcome is python.outcome is Outcome.SYNCED
    for a, b in zip(planned.models, python.models, strict=True):
        assert a.model == b.model and a.created == b.created == 50
        assert same_items(a, b), (a.model, a.counts(), b.counts())
    assert dict(emulator.workspace.objects) == python_objects
    people = emulator.workspace.people_by("id")
    assert people == python_people
    assert people["1577923200"]["name"] == "Thing 1"  # the timestamp key's Unix seconds
    engines = [create_engine(url) for url in urls]
    try:
        from_plan, from_python = (
            {(m, k): v for m in THINGS_MODELS for k, v in stored(engine, model=m).items()}
            for engine in engines
        )
    finally:
        for engine in engines:
            engine.dispose()
    assert {k: v[:3] for k, v in from_plan.items()} == {k: v[:3] for k, v in from_python.items()}
    # The database built the object and id-keyed items; Python the timestamp-keyed.
    assert {model: len(keys) for model, keys in built.items()} == {"companies": 50, "members": 50}
    assert {(m, k) for m, keys in built.items() for k in keys} <= set(from_plan)
    assert from_plan[("companies", "7")][1] == '{"object_id":"7","object_type_id":"1"}'


# -- updates built by the database ------------------------------------------------------------


def edit_people(engine: Engine, schema: str = "app") -> None:
    """Every kind of change to ``people_rows``: a changed value (person3), a value gone NULL
    (person4's vip, person5's born_on: removals), a rejected row made valid (person2: a
    create), and every row's time moved within its second (equal once normalized: the rows
    with nothing else changed are only refreshed). person6 (a tiny double) is left to Python."""
    with engine.begin() as conn:
        for sql in (
            f"UPDATE {schema}.people SET seen_at = seen_at + INTERVAL '300 milliseconds'",
            f"UPDATE {schema}.people SET name = 'renamed' WHERE email = 'person3@example.com'",
            f"UPDATE {schema}.people SET vip = NULL WHERE email = 'person4@example.com'",
            f"UPDATE {schema}.people SET born_on = NULL WHERE email = 'person5@example.com'",
            f"UPDATE {schema}.people SET name = 'fixed' WHERE email = 'person2@example.com'",
            f"UPDATE {schema}.people SET vip = NOT vip WHERE email = 'person6@example.com'",
        ):
            conn.execute(sa.text(sql))


@dataclass
class Twins:
    """One warehouse's changes synced twice: from the plan, and by the Python path alone
    (its own state and emulator), so every run of both can be compared."""

    plan: Settings
    python: Settings
    emulator: Emulator
    other: Emulator
    monkeypatch: pytest.MonkeyPatch
    # The keys of the items the database built in the latest run from the plan.
    built: set[str] = field(default_factory=set)

    def sync(self, **options: Any) -> tuple[ModelReport, ModelReport, list[Any], list[Any]]:
        """Both runs' reports and the items each emulator received (canonical JSON, sorted)."""
        seen = len(self.emulator.requests), len(self.other.requests)
        with self.monkeypatch.context() as patch:
            built = watch_built(patch)
            planned = sync(self.plan, **options)
        self.built = built["people"]
        with self.monkeypatch.context() as patch:
            _python_path_only(patch)
            python = sync(replace(self.python, track_api_url=self.other.url), **options)
        items = (
            sorted(canonical_json(i) for i in batch_items(emulator, since))
            for emulator, since in zip((self.emulator, self.other), seen, strict=True)
        )
        return planned.models[0], python.models[0], *items


def planned_run_id(twins: Twins) -> str:
    """The run id of the latest run from the plan."""
    engine = create_engine(twins.plan.state_url)
    try:
        return latest_run_id(engine, twins.plan.state_schema)
    finally:
        engine.dispose()


def by_email(items: list[bytes]) -> dict[str, Any]:
    return {
        i["identifiers"]["email"]: i["attributes"] for i in (orjson.loads(item) for item in items)
    }


def check_updates(twins: Twins, stored_of: Any, execute: Any, *, full_resync: bool = False) -> None:
    """The update run of ``edit_people``'s changes, and one after a dropped column, against
    the Python path: the same items, report and snapshots."""
    # Every fingerprint moved (the times): a full resync is over the guardrail, forced.
    planned, python, sent, expected = twins.sync(full_resync=full_resync, force=full_resync)
    assert sent == expected
    assert same_items(planned, python), (planned.counts(), python.counts())
    attributes = by_email(sent)
    if full_resync:
        assert planned.updated == 58 and planned.created == 1
        assert attributes["person4@example.com"]["vip"] == ""  # and every other attribute
        assert attributes["person3@example.com"]["email"] == "person3@example.com"
    else:
        assert planned.updated == 4 and planned.created == 1 and planned.planned == 6
        assert attributes["person3@example.com"] == {"name": "renamed"}  # only what changed
        assert attributes["person4@example.com"] == {"vip": ""}  # "", the removal form
        assert attributes["person5@example.com"] == {"born_on": ""}
        assert set(attributes) == {f"person{i}@example.com" for i in (2, 3, 4, 5, 6)}
    from_plan, from_python = stored_of()
    assert {k: v[:3] for k, v in from_plan.items()} == {k: v[:3] for k, v in from_python.items()}
    assert {"person3@example.com", "person4@example.com"} <= twins.built
    assert "person6@example.com" not in twins.built  # left to Python

    again, _, resent, _ = twins.sync()
    assert resent == [] and again.planned == 1  # the row rejected every run
    if full_resync:
        return
    # A dropped column: the rows that held it remove it, the others are only refreshed. Over
    # the guardrail, both count the same real updates (the plan's and Python's together).
    execute("ALTER TABLE {schema}.people DROP COLUMN born_on")
    stops = []
    for run in (twins.plan, replace(twins.python, track_api_url=twins.other.url)):
        with twins.monkeypatch.context() as patch, pytest.raises(GuardrailError) as stop:
            if run is not twins.plan:
                _python_path_only(patch)
            sync(run)
        stops.append(str(stop.value))
    assert stops[0] == stops[1] and "43 of 59 synced rows" in stops[0]
    planned, python, sent, expected = twins.sync(force=True)
    assert sent == expected and same_items(planned, python)
    assert planned.updated == 43
    assert set(map(str, by_email(sent).values())) == {"{'born_on': ''}"}
    from_plan, from_python = stored_of()
    assert {k: v[:3] for k, v in from_plan.items()} == {k: v[:3] for k, v in from_python.items()}
    written = {k for k, v in from_plan.items() if v[3] == planned_run_id(twins)}
    assert len(written) == 43
    assert len(twins.built) >= 20  # the rows the SQL did not leave to Python
    assert twins.built <= written


def merge_in_groups_of(monkeypatch: pytest.MonkeyPatch, unit: int | None) -> None:
    """DuckDB writes a plan's acknowledged rows ``unit`` at a time (None: its row group, so
    that a plan of these sizes writes them as they are acknowledged): the split of batches,
    the ranges left pending and the writes of a multiple of the unit all happen in a small
    run."""
    if unit is not None:
        monkeypatch.setattr(DuckDBDialect, "snapshot_merge_rows", unit)


def plans_of_a_row_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DuckDB plan taken for one of a row group or more: its acknowledged rows are
    recorded and wait for a row group's worth (or the phase's end) to be written."""
    monkeypatch.setattr(PlanDiff, "_builds_at_least", lambda _self, _table, _rows: True)


def test_a_plan_smaller_than_a_row_group_writes_its_rows_as_acknowledged(
    settings: Settings, tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB keeps a plan's acknowledged rows for whole row groups only where the plan can
    fill one: a plan of 58 built rows writes each acknowledgment's snapshots at once and
    records no ranges, so a run whose phase-end write never happens (as when it is killed)
    has them all in the snapshot; a plan taken for a row group's has none there."""
    monkeypatch.setattr(Acknowledger, "settle_planned", lambda self: None)
    for whole_groups in (False, True):
        url = f"duckdb:///{tmp_path / f'people_{whole_groups}'}.duckdb"
        engine = create_engine(url)
        try:
            people_warehouse(engine, people_rows(60))
            with monkeypatch.context() as patch:
                if whole_groups:
                    plans_of_a_row_group(patch)
                report = sync(people_settings(settings, tmp_path, url), batch_items=10)
            assert report.models[0].created == 58
            with engine.connect() as conn:
                recorded = conn.execute(
                    sa.text(
                        "SELECT COALESCE(SUM(last_seq - first_seq + 1), 0)"
                        " FROM cio_retl.acknowledged_ranges"
                    )
                ).scalar_one()
            # The rows Python built are written as acknowledged on either path.
            if whole_groups:
                assert recorded > 0 and len(stored(engine)) < 58
            else:
                assert recorded == 0 and len(stored(engine)) == 58
        finally:
            engine.dispose()


def watch_snapshot_writes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The rows of each write of snapshots from a plan, by plan (in order): counted by a
    query of the test's own over the ranges each write is given, in its transaction."""
    writes: dict[str, list[int]] = defaultdict(list)
    save = PlanTable.save_acknowledged

    def counted(
        plan: PlanTable, conn: sa.Connection, run_id: str, ranges: Any, *a: Any, **k: Any
    ) -> None:
        seq = f"p.{SEQ_COLUMN}"
        between = " OR ".join(f"{seq} BETWEEN {x} AND {y}" for x, y in ranges)
        skipped = f" AND {seq} NOT IN ({', '.join(map(str, a[0]))})" if a and a[0] else ""
        n = conn.execute(
            sa.text(
                f"SELECT COUNT(*) FROM {plan.name} AS p WHERE p.{BUILT_SNAPSHOT_COLUMN}"
                f" IS NOT NULL AND ({between}){skipped}"
            )
        ).scalar_one()
        writes[plan.name].append(int(n))
        save(plan, conn, run_id, ranges, *a, **k)

    monkeypatch.setattr(PlanTable, "save_acknowledged", counted)
    return writes


def pending_ranges(engine: Engine, schema: str = "cio_retl") -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {schema}.acknowledged_ranges"))
        ]


@pytest.mark.parametrize("unit", [None, 4], ids=["row-group", "groups-of-4"])
@pytest.mark.parametrize("full_resync", [False, True], ids=["update", "full-resync"])
def test_updates_from_the_plan_send_what_the_python_path_sends(
    settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    full_resync: bool,
    unit: int | None,
) -> None:
    merge_in_groups_of(monkeypatch, unit)
    writes = watch_snapshot_writes(monkeypatch)
    urls = [f"duckdb:///{tmp_path / name}.duckdb" for name in ("plan", "python")]
    for url in urls:
        engine = create_engine(url)
        people_warehouse(engine, people_rows(60))
        engine.dispose()
    with Emulator(site_id=SITE_ID, api_key=API_KEY) as other:
        twins = Twins(
            *(people_settings(settings, tmp_path, u) for u in urls), emulator, other, monkeypatch
        )
        first, first_python, *_ = twins.sync()
        assert first.created == first_python.created == 58
        for url in urls:
            engine = create_engine(url)
            edit_people(engine)
            engine.dispose()

        def stored_of() -> tuple[dict[str, Any], ...]:
            engines = [create_engine(url) for url in urls]
            try:
                return tuple(stored(engine) for engine in engines)
            finally:
                for engine in engines:
                    engine.dispose()

        def execute(sql: str) -> None:
            for url in urls:
                engine = create_engine(url)
                with engine.begin() as conn:
                    conn.execute(sa.text(sql.format(schema="app")))
                engine.dispose()

        check_updates(twins, stored_of, execute, full_resync=full_resync)
        assert emulator.workspace.people_by("email") == other.workspace.people_by("email")
        assert "vip" not in emulator.workspace.people_by("email")["person4@example.com"]
        engine = create_engine(urls[0])
        try:
            assert pending_ranges(engine) == [] and plan_tables(engine) == []
            if unit is not None:  # each phase's writes but its last held a multiple of 4
                assert all(n % 4 == 0 for ns in writes.values() for n in ns[:-1]), writes
                assert any(len(ns) > 1 for ns in writes.values())
        finally:
            engine.dispose()


@pytest.mark.parametrize("unit", [None, 2], ids=["row-group", "groups-of-2"])
def test_a_refused_update_keeps_its_old_snapshot(
    settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    statements: list[str],
    monkeypatch: pytest.MonkeyPatch,
    unit: int | None,
) -> None:
    """A 207 for a built update: the row is rejected alone and keeps the snapshot of what
    Customer.io last accepted, so the next run sends the same change again; the other
    updates' snapshots are replaced from the plan, set-based (with ``unit``, the refused
    row splits its batch's range, and the rows on either side wait in pairs)."""
    merge_in_groups_of(monkeypatch, unit)
    url = f"duckdb:///{tmp_path / 'people'}.duckdb"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(40))
    people = people_settings(settings, tmp_path, url)
    try:
        assert sync(people).models[0].created == 38
        before = stored(engine)
        edit_people(engine)
        bad = "person3@example.com"  # its update is built by the database
        emulator.faults = FaultPlan(reject_identifiers=frozenset({bad}))
        statements.clear()
        built = watch_built(monkeypatch)

        (model,) = sync(people).models

        assert model.updated == 3 and model.rejected == 2  # the refusal and person1's email
        assert (bad, "invalid: rejected by fault plan [identifiers] (HTTP 207)") in model.rejections
        after = stored(engine)
        assert after[bad] == before[bad]  # fingerprint and attributes as acknowledged
        assert after["person4@example.com"][2] != before["person4@example.com"][2]
        assert "person4@example.com" in built["people"]  # replaced from the plan
        [row] = [r for r in StateStore(engine).rejections("people") if r["key"] == bad]
        assert row["status"] == 207 and "<str>" in (row["payload"] or "")
        replaced = [
            s for s in statements if s.lstrip().startswith("DELETE FROM cio_retl.snapshots")
        ]
        assert any(PLAN_PREFIX in s for s in replaced)  # (person6's: the Python path's)

        emulator.faults = FaultPlan()
        seen = len(emulator.requests)
        retry = sync(people).models[0]
        assert [
            (i["identifiers"]["email"], i["attributes"]) for i in batch_items(emulator, seen)
        ] == [(bad, {"name": "renamed"})]
        assert retry.updated == 1
        assert stored(engine)[bad][2] != before[bad][2]
        assert bad not in {r["key"] for r in StateStore(engine).rejections("people")}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_updates_from_the_plan_send_what_the_python_path_sends(
    settings: Settings,
    pg_schemas: PgSchemas,
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = create_engine(pg_schemas.url)
    python_schema = f"{pg_schemas.state}_py"
    try:
        people_warehouse(engine, people_rows(60), pg_schemas.warehouse)
        base = people_settings(settings, tmp_path, pg_schemas.url, pg_schemas.warehouse)
        with Emulator(site_id=SITE_ID, api_key=API_KEY) as other:
            twins = Twins(
                replace(base, state_schema=pg_schemas.state),
                replace(base, state_schema=python_schema),
                emulator,
                other,
                monkeypatch,
            )
            first, first_python, *_ = twins.sync()
            assert first.created == first_python.created == 58
            edit_people(engine, pg_schemas.warehouse)

            def stored_of() -> tuple[dict[str, Any], ...]:
                return stored(engine, pg_schemas.state), stored(engine, python_schema)

            def execute(sql: str) -> None:
                with engine.begin() as conn:
                    conn.execute(sa.text(sql.format(schema=pg_schemas.warehouse)))

            check_updates(twins, stored_of, execute)
            assert emulator.workspace.people_by("email") == other.workspace.people_by("email")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {python_schema} CASCADE"))
        engine.dispose()


@dataclass(frozen=True)
class Side:
    """One run's databases: its engine, settings (models and state) and warehouse schema."""

    engine: Engine
    settings: Settings
    warehouse: str = "app"
    state: str = "cio_retl"


def reorder_snapshots(side: Side) -> None:
    """Write the snapshot table again in reverse key order, after another model's rows, and
    checkpoint: a snapshot row's position (DuckDB's ``rowid``, by which its plans fetch the
    texts) then follows neither the first sync's order nor the keys', so a plan that fetched
    texts by the wrong row sends what the Python path does not. (PostgreSQL joins by key:
    there it only reorders.)"""
    table = f"{side.state}.snapshots"
    with side.engine.begin() as conn:
        rows = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY key DESC")).mappings().all()
        assert rows
        conn.execute(sa.text(f"DELETE FROM {table}"))
        columns = list(rows[0].keys())
        names = ", ".join(columns)
        insert = sa.text(
            f"INSERT INTO {table} ({names}) VALUES ({', '.join(':' + n for n in columns)})"
        )
        conn.execute(insert, [{**row, "model": "other_model"} for row in rows])
        conn.execute(insert, [dict(row) for row in rows])
    with side.engine.begin() as conn:
        conn.execute(
            sa.text(f"DELETE FROM {table} WHERE model = 'other_model' AND key > 'person2'")
        )
    if side.engine.dialect.name == "duckdb":
        with side.engine.connect() as conn:
            conn.execute(sa.text("CHECKPOINT"))


def rerun_every_kind_of_row(
    sides: tuple[Side, Side], emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sync the plan side and the Python path's side, edit both warehouses alike (rows
    unchanged, changed, new, removed in mirror mode, two alike of one key, two unlike of
    one key, two alike without a key) and sync again: reports, items, snapshots and
    rejections agree."""
    results = []
    for side, path in zip(sides, ("plan", "python"), strict=True):
        run, schema = side.settings, side.warehouse
        text = (run.models_dir / "people.sql").read_text()
        (run.models_dir / "people.sql").write_text(
            text.replace("-- key:", "-- mode: mirror\n-- key:")
        )
        row_id = "ctid" if side.engine.dialect.name == "postgresql" else "rowid"
        with monkeypatch.context() as patch:
            if path == "python":
                _python_path_only(patch)
            first = sync(run)
            assert first.outcome in (Outcome.SYNCED, Outcome.REJECTED), first
            reorder_snapshots(side)
            with side.engine.begin() as conn:
                for edit in (
                    "UPDATE {s}.people SET vip = NOT COALESCE(vip, FALSE) WHERE email IN ('person10@example.com', 'person11@example.com')",
                    "DELETE FROM {s}.people WHERE email = 'person3@example.com'",
                    "INSERT INTO {s}.people SELECT * FROM {s}.people WHERE email IN ('person4@example.com', 'person6@example.com')",
                    "UPDATE {s}.people SET name = 'other' WHERE email = 'person6@example.com' AND {r} = (SELECT max({r}) FROM {s}.people WHERE email = 'person6@example.com')",
                    "INSERT INTO {s}.people SELECT NULL, name, vip, visits, score, balance, seen_at, born_on FROM {s}.people WHERE email = 'person7@example.com'",
                    "INSERT INTO {s}.people SELECT NULL, name, vip, visits, score, balance, seen_at, born_on FROM {s}.people WHERE email = 'person7@example.com'",
                    "INSERT INTO {s}.people SELECT 'new' || email, name, vip, visits, score, balance, seen_at, born_on FROM {s}.people WHERE email = 'person8@example.com'",
                ):
                    conn.execute(sa.text(edit.format(s=schema, r=row_id)))
            before = len(emulator.requests)
            second = sync(run, force=True)
        results.append(
            (
                second.outcome,
                second.models[0].counts(),
                sorted_items(emulator, before),
                {k: v[:3] for k, v in stored(side.engine, side.state).items()},
                [r[:4] for r in rejected(side.engine, side.state)],
            )
        )
    plan, python = results
    assert plan[0] == python[0] == Outcome.REJECTED  # the shared keys and the missing one
    assert plan[1]["deleted"] == 1 and plan[1]["updated"] >= 2
    assert plan[2:] == python[2:]
    assert {k: v for k, v in plan[1].items() if k not in ("requests", "bytes_sent")} == {
        k: v for k, v in python[1].items() if k not in ("requests", "bytes_sent")
    }


@pytest.mark.parametrize("narrow", [True, False])
def test_a_rerun_joins_keys_then_rows_as_the_full_join_does(
    settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    narrow: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A DuckDB rerun's plan joins keys and fingerprint numbers with the snapshot, then the
    keys it keeps back to the model's rows: against the Python path, over a rerun with
    every kind of row (and the one full join, for comparison)."""
    monkeypatch.setattr("cio_retl.dialects.DuckDBDialect.narrow_diff_join", narrow)
    sides = []
    for path in ("plan", "python"):
        url = f"duckdb:///{tmp_path / f'{path}.duckdb'}"
        engine = create_engine(url)
        people_warehouse(engine, people_rows(30))
        sides.append(Side(engine, people_settings(settings, tmp_path, url)))
    try:
        rerun_every_kind_of_row((sides[0], sides[1]), emulator, monkeypatch)
    finally:
        for side in sides:
            side.engine.dispose()


@pytest.mark.parametrize("narrow", [True, False])
def test_a_postgres_rerun_joins_keys_then_rows_as_the_full_join_does(
    settings: Settings,
    pg_schemas: PgSchemas,
    tmp_path: Path,
    emulator: Emulator,
    narrow: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same on PostgreSQL: fingerprints compared as texts, the moved keys a
    temporary table of the session, joined back by ``=`` with the NULL keys' rows apart."""
    monkeypatch.setattr("cio_retl.dialects.PostgresDialect.narrow_diff_join", narrow)
    engine = create_engine(pg_schemas.url)
    python = (f"{pg_schemas.warehouse}_py", f"{pg_schemas.state}_py")
    try:
        sides = []
        for warehouse, state in ((pg_schemas.warehouse, pg_schemas.state), python):
            people_warehouse(engine, people_rows(30), warehouse)
            run = people_settings(settings, tmp_path, pg_schemas.url, warehouse)
            sides.append(Side(engine, replace(run, state_schema=state), warehouse, state))
        rerun_every_kind_of_row((sides[0], sides[1]), emulator, monkeypatch)
    finally:
        with engine.begin() as conn:
            for schema in python:
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()


@pytest.mark.postgres
def test_a_postgres_plan_reads_the_model_as_of_one_moment(
    settings: Settings, pg_schemas: PgSchemas, tmp_path: Path, emulator: Emulator
) -> None:
    """The moved keys and the plan are two statements of one REPEATABLE READ transaction
    on PostgreSQL, so they read the model as of one moment: a changed row another session
    deletes between them is still sent as changed (READ COMMITTED planned the delete from
    the second statement's view), and the next run deletes it."""
    schema = pg_schemas.warehouse
    engine = create_engine(pg_schemas.url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
            conn.execute(
                sa.text(
                    f"CREATE TABLE {schema}.moment AS SELECT 'm' || i || '@x.io' AS email,"
                    " i AS n FROM generate_series(1, 50) AS i"
                )
            )
        folder = tmp_path / "moment_models"
        folder.mkdir()
        (folder / "moment.sql").write_text(
            "-- kind: person\n-- identifier: email\n-- key: email\n-- mode: mirror\n"
            f"select * from {schema}.moment\n"
        )
        run = replace(
            settings,
            warehouse_url=pg_schemas.url,
            state_url=pg_schemas.url,
            state_schema=pg_schemas.state,
            models_dir=folder,
        )
        assert sync(run).models[0].created == 50
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {schema}.moment SET n = -n WHERE n = 7"))
        deleted: list[int] = []

        def between(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.lstrip().startswith(f"CREATE TEMPORARY TABLE {MOVED_TABLE}"):
                with engine.begin() as other:
                    gone = other.execute(sa.text(f"DELETE FROM {schema}.moment WHERE n = -7"))
                    deleted.append(gone.rowcount)

        sa.event.listen(sa.Engine, "after_cursor_execute", between)
        try:
            (changed,) = sync(run).models
        finally:
            sa.event.remove(sa.Engine, "after_cursor_execute", between)
        assert deleted == [1]  # gone before the plan statement ran
        assert (changed.updated, changed.deleted) == (1, 0)
        assert emulator.workspace.people_by("email")["m7@x.io"]["n"] == -7
        (removed,) = sync(run).models
        assert (removed.updated, removed.deleted) == (0, 1)
        assert "m7@x.io" not in emulator.workspace.people_by("email")
    finally:
        engine.dispose()


@pytest.mark.parametrize("storage", [None, "v1.0.0"], ids=["current", "older-file"])
def test_duckdb_compresses_json_text_by_zstd_where_the_file_has_it(
    settings: Settings,
    tmp_path: Path,
    emulator: Emulator,
    statements: list[str],
    storage: str | None,
) -> None:
    """A plan's and a snapshot's JSON texts are declared USING COMPRESSION zstd where the
    file's storage has zstd; a file an older DuckDB wrote refuses the clause ("that type is
    not available yet"), so there they keep DuckDB's own choice and the runs go as ever."""
    import duckdb

    path = tmp_path / "warehouse.duckdb"
    if storage:
        with duckdb.connect() as conn:  # the file as DuckDB 1.0 would have written it
            conn.execute(f"ATTACH '{path}' AS w (STORAGE_VERSION '{storage}')")
    url = f"duckdb:///{path}"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(30))
    run = people_settings(settings, tmp_path, url)
    try:
        first = sync(run)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE app.people SET visits = visits + 1 WHERE visits < 10"))
        second = sync(run)
        for report in (first, second):
            assert report.outcome is Outcome.REJECTED, report.error  # two rows Python refuses
        assert first.models[0].created == 28 and second.models[0].updated > 0
        with engine.connect() as conn:
            conn.execute(sa.text("CHECKPOINT"))  # the rows out of the WAL, into segments
            kinds = {
                str(row[0])
                for row in conn.execute(
                    sa.text(
                        "SELECT compression FROM pragma_storage_info('cio_retl.snapshots')"
                        " WHERE column_name = 'attributes' AND segment_type = 'VARCHAR'"
                    )
                )
            }
        declared = [s for s in statements if "USING COMPRESSION zstd" in s]
        if storage:
            assert not declared and "ZSTD" not in kinds, kinds
        else:
            assert any(writes_plan(s) for s in statements)
            assert any(s.startswith("CREATE TABLE cio_retl.cio_plan") for s in declared)
            assert kinds == {"ZSTD"}, kinds
        assert len(stored(engine)) == 28
    finally:
        engine.dispose()


def held_keys(conn: sa.Connection) -> set[str]:
    """The people keys the state holds as acknowledged: snapshot rows, and the keys of the
    plan rows in recorded ranges (read from their plan, which a run keeps while any are)."""
    held = {
        key
        for (key,) in conn.execute(
            sa.text("SELECT key FROM cio_retl.snapshots WHERE model = 'people'")
        )
    }
    recorded = conn.execute(
        sa.text("SELECT plan, first_seq, last_seq FROM cio_retl.acknowledged_ranges")
    ).all()
    for plan, first, last in recorded:
        rows = f"(SELECT * REPLACE (g.rowid AS {SEQ_COLUMN}) FROM cio_retl.{plan} AS g)"
        held |= {
            key
            for (key,) in conn.execute(
                sa.text(
                    f"SELECT p.{KEY_COLUMN} FROM {rows} AS p WHERE p.{BUILT_SNAPSHOT_COLUMN}"
                    f" IS NOT NULL AND p.{SEQ_COLUMN} BETWEEN {first} AND {last}"
                )
            )
        }
    return held


def test_recorded_acknowledgments_wait_for_their_row_threshold(
    settings: Settings, tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acknowledging built items of a plan that writes snapshots in whole row groups only
    records sequence ranges, so the sender does not hand each batch to an idle writer (a
    commit per batch): it holds them until RECORDED_ACK_ROWS rows (or ACK_SECONDS, set out
    of reach here), and the run still ends with every row written once."""
    plans_of_a_row_group(monkeypatch)
    monkeypatch.setattr(Sender, "RECORDED_ACK_ROWS", 50)
    monkeypatch.setattr(Sender, "ACK_SECONDS", 3600.0)
    acknowledge, calls = Acknowledger.acknowledge, []

    def counted(ack: Acknowledger, batches: Any) -> None:
        calls.append(sum(len(operations) for operations, _ in batches))
        acknowledge(ack, batches)

    monkeypatch.setattr(Acknowledger, "acknowledge", counted)
    url = f"duckdb:///{tmp_path / 'people'}.duckdb"
    engine = create_engine(url)
    try:
        rows = people_rows(203)[3:]  # no row Python rejects
        for i, row in enumerate(rows):  # and none whose values the SQL leaves to Python
            row.update(name=f"é{i}", score=float(i))
        people_warehouse(engine, rows)
        report = sync(people_settings(settings, tmp_path, url), batch_items=10)
        assert report.outcome is Outcome.SYNCED
        # 200 built items in batches of 10, handed on whenever 50 are held, the last at the
        # end (a batch of the Python path's would make its call wait for ACK_ROWS).
        assert calls == [50, 50, 50, 50], calls
        assert len(stored(engine)) == 200 and pending_ranges(engine) == []
        assert duplicate_snapshot_keys(engine) == []
    finally:
        engine.dispose()


def test_a_failed_merge_keeps_what_earlier_acknowledgments_recorded(
    settings: Settings, tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state transaction that writes a row group's worth fails (the database taken
    back its writes): the rows earlier transactions recorded as acknowledged stay recorded
    (the writer's pending rows go back to what they were), the rest of the run's rows are
    still recorded or written, and the next run sends only what neither holds."""
    merge_in_groups_of(monkeypatch, 50)
    # Recorded acknowledgments wait for Sender.RECORDED_ACK_ROWS: here each batch of 10 is
    # its own transaction, so some are recorded before the failing one and some after.
    monkeypatch.setattr(Sender, "RECORDED_ACK_ROWS", 10)
    url = f"duckdb:///{tmp_path / 'people'}.duckdb"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(200))
    people = people_settings(settings, tmp_path, url)
    save, failed = PlanTable.save_acknowledged, []

    def fails_once(plan: PlanTable, conn: sa.Connection, *args: Any, **kwargs: Any) -> None:
        # A merge while earlier transactions hold rows (as this one sees them) fails.
        if not failed and (held := held_keys(conn)):
            failed.append(held)
            raise sa.exc.OperationalError("INSERT INTO snapshots", {}, Exception("injected"))
        save(plan, conn, *args, **kwargs)

    monkeypatch.setattr(PlanTable, "save_acknowledged", fails_once)
    try:
        with contextlib.suppress(Exception):
            report = sync(people, batch_items=10)
            assert report.outcome is not Outcome.SYNCED
        assert failed
        with engine.connect() as conn:
            held = held_keys(conn)
        assert failed[0] <= held  # nothing an earlier transaction recorded was forgotten
        assert len(held) > len(failed[0])  # and the later acknowledgments were recorded
        monkeypatch.setattr(PlanTable, "save_acknowledged", save)
        seen = len(emulator.requests)
        again = sync(people)
        assert again.outcome is Outcome.REJECTED  # the two rows rejected every run
        assert len(batch_items(emulator, seen)) == 198 - len(held)
        assert len(stored(engine)) == 198 and pending_ranges(engine) == []
        assert duplicate_snapshot_keys(engine) == []
    finally:
        engine.dispose()


def left_recorded(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Engine, Settings]:
    """A whole-model run of 60 people (58 valid) that ends with its acknowledged rows only
    recorded: its final write skipped, as when it is killed (its plan taken for one of a
    row group or more, whose rows wait to be written)."""
    url = f"duckdb:///{tmp_path / 'people'}.duckdb"
    engine = create_engine(url)
    people_warehouse(engine, people_rows(60))
    people = people_settings(settings, tmp_path, url)
    try:
        with monkeypatch.context() as patch:
            plans_of_a_row_group(patch)
            patch.setattr(Acknowledger, "settle_planned", lambda self: None)
            assert sync(people).models[0].created == 58
    except BaseException:
        engine.dispose()
        raise
    return engine, people


def test_bucket_runs_write_what_a_whole_model_run_left_recorded(
    settings: Settings, tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-model run ends with its acknowledged rows only recorded (its final write
    skipped, as when it is killed): it keeps its plan, and the bucket runs that come next
    write those rows before they plan, so they send none of them again; the snapshot ends
    with each key once."""
    engine, people = left_recorded(settings, tmp_path, monkeypatch)
    try:
        assert len(stored(engine)) < 58  # the built rows are recorded only
        with engine.connect() as conn:
            # every row but the two rejected ones (person1's email is "not an email")
            assert held_keys(conn) == {f"person{i}@example.com" for i in range(60) if i > 2} | {
                "person0@example.com"
            }
        (kept,) = plan_tables(engine)
        assert pending_ranges(engine)
        seen = len(emulator.requests)
        for index in range(2):
            assert sync(people, bucket=Bucket(index, 2)).outcome is Outcome.REJECTED
        assert batch_items(emulator, seen) == []
        assert kept not in plan_tables(engine)  # settled, then dropped by a bucket run
        assert len(stored(engine)) == 58 and pending_ranges(engine) == []
        assert sync(people).outcome is Outcome.REJECTED
        assert batch_items(emulator, seen) == [] and plan_tables(engine) == []
        assert duplicate_snapshot_keys(engine) == []
    finally:
        engine.dispose()


def test_bucket_runs_at_once_settle_a_whole_model_leftover_once(
    settings: Settings, tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both bucket runs of a count start together after a whole-model run left its
    acknowledged rows recorded only. Settling them twice at once would make DuckDB fail one
    run (a write-write conflict on the same rows); one settles under the count's planning
    lock, the other finds nothing left, and both runs end well with nothing resent."""
    engine, people = left_recorded(settings, tmp_path, monkeypatch)
    try:
        (kept,) = plan_tables(engine)
        assert pending_ranges(engine)
        settle, write = plan_module.settle_leftover, snapshot_merge.write_snapshots
        settling: list[list[str]] = []

        def listed_settle(state: StateStore, plans: Any, prefix: str | None = None) -> None:
            settling.append(list(plans))
            settle(state, plans, prefix)

        def slow_write(*args: Any, **kwargs: Any) -> None:
            time.sleep(0.5)  # inside the settle's transaction: the other run's overlaps it
            write(*args, **kwargs)

        monkeypatch.setattr(plan_module, "settle_leftover", listed_settle)
        monkeypatch.setattr(snapshot_merge, "write_snapshots", slow_write)
        seen = len(emulator.requests)
        start = threading.Barrier(2)
        outcomes: dict[int, object] = {}

        def bucket_run(index: int) -> None:
            start.wait()
            try:
                outcomes[index] = sync(people, bucket=Bucket(index, 2)).outcome
            except Exception as exc:  # the failure is the finding
                outcomes[index] = exc

        threads = [threading.Thread(target=bucket_run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert outcomes == {0: Outcome.REJECTED, 1: Outcome.REJECTED}
        # One run found the plan; the other, waiting for the lock, found none left.
        # One run settled the kept plan; the other, waiting for the lock, no longer saw it
        # (only the shared plan the first one built).
        assert sorted(kept in plans for plans in settling) == [False, True]
        assert batch_items(emulator, seen) == []
        assert len(stored(engine)) == 58 and pending_ranges(engine) == []
        assert kept not in plan_tables(engine)
        assert duplicate_snapshot_keys(engine) == []
    finally:
        engine.dispose()
