"""Shared fixtures: a real emulator on loopback and a real DuckDB demo warehouse per test."""

from __future__ import annotations

import atexit
import gc
import os
import typing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.client import RetryPolicy
from cio_retl.config import Secret, Settings
from cio_retl.demo import create_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.sync import RunReport, SyncOptions, run_sync
from cio_retl.warehouse import create_engine

REPO = Path(__file__).resolve().parent.parent
SITE_ID = "test-site"
API_KEY = "test-key-5f0c2b7e"  # distinctive, so tests can assert it never leaks

# Tests never wait on real backoff: tiny delays, few attempts.
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01)


def _unlink_overload_dummy() -> None:
    """Let interpreter exit free DuckDB's objects (else nanobind prints "leaked 27 instances").

    Nothing grows while tests run; what outlives the interpreter is reached from one immortal
    root through three libraries. pyarrow keeps its pandas shim (``pyarrow.lib.pandas_api``, a
    Cython C global never released) once fakesnow's ``to_pylist`` has converted a timestamp,
    and with it all of pandas. pandas reaches ``typing._overload_dummy``, the one function
    every ``@overload`` stub in the process shares, on which SQLAlchemy's ORM left a
    ``__dataclass_transform__`` dict (``registry.mapped_as_dataclass`` is an overload decorated
    with ``dataclass_transform(field_specifiers=(MappedColumn, ...))``). From the ORM the path
    runs through SQLAlchemy's compiler registry (duckdb_engine's ``@compiles`` for ``TryCast``)
    into duckdb_engine's and duckdb's module globals. CPython's shutdown clears the globals of
    modules still alive, not of those already freed whose globals something else holds, so
    duckdb's 27 ``DuckDBPyType`` constants stay. The dict is type-checker metadata that no one
    reads at exit; dropping it cuts the chain between pandas and SQLAlchemy.
    """
    vars(typing._overload_dummy).pop("__dataclass_transform__", None)  # type: ignore[attr-defined]


atexit.register(_unlink_overload_dummy)


def _drop_hypothesis_gc_callbacks() -> None:
    """The same leak by a second root: hypothesis appends a timing callback to
    ``gc.callbacks`` (``junkdrawer.gc_cumulative_time``) and never removes it. Its module
    globals reach pytest's assertion-rewriting hook, the config and its fixtures, this
    conftest, SQLAlchemy's Engine event listeners (snowflake-sqlalchemy's) and from there
    duckdb_engine's and duckdb's globals. Only a run with a hypothesis test, a fakesnow test
    and the Dagster test modules shows it. No property test runs after atexit."""
    gc.callbacks[:] = [
        c for c in gc.callbacks if not getattr(c, "__module__", "").startswith("hypothesis")
    ]


atexit.register(_drop_hypothesis_gc_callbacks)


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine of this process runs while the test does."""
    seen: list[str] = []

    def listen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", listen)
    yield seen
    sa.event.remove(sa.engine.Engine, "before_cursor_execute", listen)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(site_id=SITE_ID, api_key=API_KEY) as emu:
        yield emu


@pytest.fixture
def warehouse_url(tmp_path: Path) -> str:
    return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"


@pytest.fixture
def demo_engine(warehouse_url: str) -> Iterator[Engine]:
    engine = create_engine(warehouse_url)
    create_demo_warehouse(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def settings(emulator: Emulator, warehouse_url: str) -> Settings:
    return Settings(
        warehouse_url=warehouse_url,
        state_url=warehouse_url,
        models_dir=REPO / "sql",
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
    )


@pytest.fixture
def models_dir(tmp_path: Path, settings: Settings) -> Path:
    """An empty models folder for tests that write their own models."""
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


def sync(settings: Settings, *models: str, **options: object) -> RunReport:
    return run_sync(settings, list(models) or None, SyncOptions(retry=FAST_RETRY, **options))  # type: ignore[arg-type]


def with_models(settings: Settings, models_dir: Path) -> Settings:
    return replace(settings, models_dir=models_dir)


# -- real PostgreSQL and fakesnow (the warehouses issue) ------------------------------------

POSTGRES_URL = os.environ.get(
    "CIO_RETL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test server's URL; fails when CI requires it (CIO_RETL_REQUIRE_POSTGRES=1) and it
    is unreachable, skips with the reason otherwise."""
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        reason = f"PostgreSQL not reachable at 127.0.0.1:5432/test: {type(exc).__name__}: {exc}"
        if os.environ.get("CIO_RETL_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason + " (CIO_RETL_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(reason)
    finally:
        engine.dispose()
    return POSTGRES_URL


@dataclass(frozen=True, slots=True)
class PgSchemas:
    """A fresh warehouse schema and state schema of one test, dropped after it."""

    url: str
    warehouse: str
    state: str


@pytest.fixture
def pg_schemas(postgres_url: str) -> Iterator[PgSchemas]:
    tag = f"t{os.getpid()}_{uuid.uuid4().hex[:10]}"
    schemas = PgSchemas(postgres_url, f"{tag}_wh", f"{tag}_state")
    yield schemas
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            for schema in (schemas.warehouse, schemas.state):
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    finally:
        engine.dispose()


def demo_models(folder: Path, schema: str) -> Path:
    """The repository's models reading ``schema`` instead of ``demo`` (a per-test schema)."""
    folder.mkdir(parents=True, exist_ok=True)
    for model in (REPO / "sql").glob("*.sql"):
        (folder / model.name).write_text(model.read_text().replace("demo.", f"{schema}."))
    return folder


@pytest.fixture
def fakesnow_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Snowflake URL served in-process by fakesnow (Snowflake SQL run on DuckDB)."""
    pytest.importorskip("snowflake.sqlalchemy", reason="needs the snowflake extra")
    fakesnow = pytest.importorskip("fakesnow")
    from fakesnow.cursor import FakeSnowflakeCursor

    monkeypatch.setattr(
        FakeSnowflakeCursor,
        "_rewrite_with_params",
        _interpolating_empty_params(FakeSnowflakeCursor._rewrite_with_params),
    )
    with fakesnow.patch():
        yield "snowflake://fake:snow@fakesnow/CIO_TEST/PUBLIC?warehouse=test_wh"


def _interpolating_empty_params(rewrite: Any) -> Any:
    """fakesnow's client-side binding as the Snowflake connector's: SQLAlchemy doubles every
    ``%`` of a pyformat statement, and snowflake-sqlalchemy sets the connection's
    ``_interpolate_empty_sequences`` for such a statement, so the connector runs
    ``command % {}`` even without parameters (SnowflakeCursor._preprocess_pyformat_query)
    and ``'100%%'`` reaches Snowflake as ``'100%'``. fakesnow interpolates only when there
    are parameters: a statement without any (a plan's CREATE TABLE AS of a model with a
    ``%`` literal) kept ``%%``."""

    def rewrite_with_params(self: Any, command: str, params: Any = None) -> Any:
        if (
            params is not None
            and len(params) == 0
            and getattr(self._conn, "_interpolate_empty_sequences", False)
            and self._conn._paramstyle in ("pyformat", "format")
        ):
            return command % params, None
        return rewrite(self, command, params)

    return rewrite_with_params


def cli_env(warehouse_url: str, emulator_url: str) -> dict[str, str]:
    """What a `cio-retl` process needs to sync the demo models to the emulator."""
    return {
        "CIO_RETL_WAREHOUSE_URL": warehouse_url,
        "CIO_RETL_MODELS_DIR": str(REPO / "sql"),
        "CIO_TRACK_API_URL": emulator_url,
        "CIO_SITE_ID": SITE_ID,
        "CIO_API_KEY": API_KEY,
    }


def sql_rows(url: str, sql: str) -> list[sa.Row[Any]]:
    """Rows of one query on a database the test does not keep open (DuckDB admits one
    writing process per file: a Dagster run process may need it next)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql)))
    finally:
        engine.dispose()


def sql_run(url: str, sql: str) -> None:
    """One statement in its own transaction, the engine closed again (see :func:`sql_rows`)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
    finally:
        engine.dispose()


def duplicate_snapshot_keys(engine: Engine, schema: str = "cio_retl") -> list[sa.Row[Any]]:
    """(model, key, rows) of every key the snapshot holds more than once: always none.

    On DuckDB no index enforces it (the snapshot table has no primary key there), so the
    tests check the table itself rather than ``StateStore.snapshot``, a dict by key.
    """
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    f"SELECT model, key, COUNT(*) FROM {schema}.snapshots"
                    " GROUP BY model, key HAVING COUNT(*) > 1"
                )
            )
        )
