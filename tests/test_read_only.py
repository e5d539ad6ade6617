"""`plan`, `status` and dry runs read and never write: no DuckDB file, schema, table or run
row appears in any database; a DuckDB path that does not exist is exit 2 naming it. And
`status` as scripts and pipes read it: 100 columns, full run ids, `--json`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.engine import Engine

from cio_retl.cli import STATUS_WIDTH, main
from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.warehouse import create_engine
from tests.conftest import PgSchemas, cli_env, demo_models, sql_rows, sql_run


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, emulator: Emulator, warehouse_url: str) -> dict[str, str]:
    for name in ("CIO_RETL_STATE_URL", "CIO_REGION", "CIO_RETL_STATE_SCHEMA"):
        monkeypatch.delenv(name, raising=False)
    values = cli_env(warehouse_url, emulator.url)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def _schemas(url: str) -> list[str]:
    return sorted(
        r[0] for r in sql_rows(url, "SELECT schema_name FROM information_schema.schemata")
    )


def _tables(url: str) -> list[str]:
    return sorted(
        f"{r[0]}.{r[1]}"
        for r in sql_rows(url, "SELECT table_schema, table_name FROM information_schema.tables")
    )


def test_plan_status_and_dry_run_create_nothing_on_duckdb(
    env: dict[str, str],
    demo_engine: Engine,
    emulator: Emulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo_engine.dispose()
    url = env["CIO_RETL_WAREHOUSE_URL"]
    before = (_schemas(url), _tables(url))
    assert "cio_retl" not in before[0]
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing sent" in out and "490" in out  # planned against an empty state
    assert main(["sync", "--dry-run"]) == 0
    assert main(["status"]) == 0
    assert "no runs yet" in capsys.readouterr().out
    assert (_schemas(url), _tables(url)) == before
    assert emulator.requests == []

    assert main(["sync"]) == 0  # the first real send creates the state
    runs = sql_rows(url, "SELECT count(*) FROM cio_retl.runs")[0][0]
    tables = _tables(url)
    assert main(["plan"]) == 0
    assert main(["sync", "--dry-run"]) == 0
    assert main(["status"]) == 0
    assert sql_rows(url, "SELECT count(*) FROM cio_retl.runs")[0][0] == runs  # no run rows
    assert _tables(url) == tables


def test_a_state_file_of_its_own_is_not_created_by_reading(
    env: dict[str, str],
    demo_engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo_engine.dispose()
    state = tmp_path / "state.duckdb"
    monkeypatch.setenv("CIO_RETL_STATE_URL", f"duckdb:///{state}")
    assert main(["plan"]) == 0
    assert main(["status"]) == 0
    assert "no runs yet" in capsys.readouterr().out
    assert not state.exists()
    assert main(["sync"]) == 0  # a real sync creates it, as before
    assert state.exists()


def test_a_missing_duckdb_warehouse_is_exit_2_naming_it(
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    typo = tmp_path / "warehuose.duckdb"
    monkeypatch.setenv("CIO_RETL_WAREHOUSE_URL", f"duckdb:///{typo}")
    for command in (["plan"], ["sync"], ["sync", "--dry-run"], ["status"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert (
            "CIO_RETL_WAREHOUSE_URL" in err
            and "warehuose.duckdb" in err
            and "does not exist" in err
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.postgres
def test_plan_creates_no_state_schema_on_postgres(
    pg_schemas: PgSchemas,
    emulator: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = create_engine(pg_schemas.url)
    try:
        create_demo_warehouse(engine, schema=pg_schemas.warehouse)
    finally:
        engine.dispose()
    env = cli_env(pg_schemas.url, emulator.url)
    env["CIO_RETL_MODELS_DIR"] = str(demo_models(tmp_path / "sql", pg_schemas.warehouse))
    env["CIO_RETL_STATE_SCHEMA"] = pg_schemas.state
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CIO_RETL_STATE_URL", raising=False)
    assert main(["plan"]) == 0
    assert main(["sync", "--dry-run"]) == 0
    assert main(["status"]) == 0
    assert pg_schemas.state not in _schemas(pg_schemas.url)
    assert main(["sync"]) == 0
    assert pg_schemas.state in _schemas(pg_schemas.url)


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _schema_contents(url: str, schema: str) -> dict[str, list[str]]:
    """Every table of ``schema`` with all its rows (as text, sorted)."""
    tables = [
        r[0]
        for r in sql_rows(
            url,
            "SELECT table_name FROM information_schema.tables"
            f" WHERE table_schema = '{schema}' ORDER BY table_name",
        )
    ]
    return {t: sorted(map(repr, sql_rows(url, f"SELECT * FROM {schema}.{t}"))) for t in tables}


def _deleted(out: str, model: str) -> int:
    """The "deleted" cell of ``model``'s row in the last run table the command line printed."""
    header = [line for line in out.splitlines() if "┃ model" in line][-1]
    row = [line for line in out.splitlines() if line.startswith(f"│ {model} ")][-1]
    column = [c.strip() for c in header.split("┃")].index("deleted")
    return int(row.split("│")[column])


def _edit_demo(warehouse_url: str) -> None:
    """The demo's edits: updates and a removal for the next diff to find."""
    engine = create_engine(warehouse_url)
    try:
        edit_demo_warehouse(engine)
    finally:
        engine.dispose()


def test_a_cross_database_dry_run_leaves_both_duckdb_files_byte_identical(
    env: dict[str, str],
    demo_engine: Engine,
    emulator: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo_engine.dispose()
    monkeypatch.setenv("CIO_RETL_STATE_URL", f"duckdb:///{tmp_path / 'state.duckdb'}")
    assert main(["sync"]) == 0
    _edit_demo(env["CIO_RETL_WAREHOUSE_URL"])
    sent, before = len(emulator.requests), _file_digests(tmp_path)
    capsys.readouterr()
    assert main(["plan"]) == 0
    assert main(["sync", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing sent" in out and _deleted(out, "memberships") == 1  # staged, diffed
    assert _file_digests(tmp_path) == before  # no byte of either file, and no new file
    assert len(emulator.requests) == sent


@pytest.mark.postgres
def test_a_cross_database_dry_run_writes_no_state_table_on_postgres(
    env: dict[str, str],
    demo_engine: Engine,
    pg_schemas: PgSchemas,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo_engine.dispose()
    monkeypatch.setenv("CIO_RETL_STATE_URL", pg_schemas.url)
    monkeypatch.setenv("CIO_RETL_STATE_SCHEMA", pg_schemas.state)
    assert main(["sync"]) == 0
    # A killed run's staged keys: a real run's diff clears them, reading must not.
    sql_run(
        pg_schemas.url,
        f"INSERT INTO {pg_schemas.state}.staged_keys VALUES"
        " ('dead-run', 'users', 'k', 'f', now() - interval '30 days')",
    )
    _edit_demo(env["CIO_RETL_WAREHOUSE_URL"])
    before = (_schema_contents(pg_schemas.url, pg_schemas.state), _file_digests(tmp_path))
    capsys.readouterr()
    assert main(["plan"]) == 0
    assert main(["sync", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing sent" in out and _deleted(out, "memberships") == 1
    after = (_schema_contents(pg_schemas.url, pg_schemas.state), _file_digests(tmp_path))
    assert after == before


def _status_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["status", "--json"]) == 0
    data: dict[str, Any] = orjson.loads(capsys.readouterr().out)
    return data


def test_status_fits_100_columns_with_full_run_ids_and_has_json(
    env: dict[str, str],
    demo_engine: Engine,
    emulator: Emulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo_engine.dispose()
    emulator.faults = FaultPlan(reject_identifiers=frozenset({"grace.dijkstra.11@example.com"}))
    assert main(["sync"]) == 1
    assert main(["sync", "users"]) == 1
    capsys.readouterr()
    data = _status_json(capsys)
    assert [len(r["models"]) for r in data["runs"]] == [1, 5]  # newest first, one entry a run
    newest, first = data["runs"]
    assert [m["model"] for m in first["models"]] and first["created"] == sum(
        m["created"] for m in first["models"]
    )
    assert {m["model"]: m["created"] for m in first["models"]}["users"] == 489
    assert newest["status"] == first["status"] == "rejected"
    # the person, and then the membership and the two orders (events) that name them
    assert data["rejected"]["by_model"] == {"memberships": 1, "orders": 2, "users": 1}
    assert "grace.dijkstra.11@example.com" in {r["key"] for r in data["rejected"]["rows"]}

    assert main(["status"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= STATUS_WIDTH, text
    for run in data["runs"]:  # one line per run, its id in full
        [line] = [line for line in lines if run["run_id"] in line]
        assert line.split()[0] == run["run_id"]
    assert "rejected rows waiting for a fix: 4 (memberships: 1, orders: 2, users: 1)" in text
