"""Failures a user can act on: every setting checked when read (exit 2 naming the variable
and what is allowed), transient failures (exit 4 naming the host, never a secret), and
driver problems naming the URL form and the extra to install."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.cli import EXIT_STATUS, exit_status, main, print_report
from cio_retl.config import Settings
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.errors import ConfigError, TransientError
from cio_retl.records import RejectionCode
from cio_retl.state import StateStore
from cio_retl.sync import Outcome, SyncOptions, run_sync
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, FAST_RETRY, REPO, SITE_ID, cli_env, sync

PASSWORD = "pw-7c1d9e"  # distinctive, so tests can assert it never leaks


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, emulator: Emulator, warehouse_url: str) -> dict[str, str]:
    values = cli_env(warehouse_url, emulator.url)
    for name in os.environ:
        if name.startswith(("CIO_", "CIO_RETL_")):
            monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


BAD_SETTINGS = [
    ("CIO_REGION", "mars", "us, eu"),
    ("CIO_RETL_RATE_LIMIT", "fast", "REQUESTS/SECONDS"),
    ("CIO_RETL_RATE_LIMIT", "0/1", "REQUESTS/SECONDS"),
    ("CIO_RETL_RATE_BUDGET", "bogus", "auto, local, shared"),
    ("CIO_TRACK_API_URL", "track.customer.io", "https://HOST"),
    ("CIO_TRACK_API_URL", "ftp://track.customer.io", "https://HOST"),
    ("CIO_TRACK_API_URL", "https://track.customer.io:99999", "https://HOST"),
    ("CIO_TRACK_API_URL", f"https://me:{PASSWORD}@proxy.example", "https://HOST"),
    ("CIO_TRACK_API_URL", "https://track.customer.io/?x=1", "https://HOST"),
    ("CIO_RETL_WAREHOUSE_URL", "not a url", "postgresql+psycopg://"),
    ("CIO_RETL_WAREHOUSE_URL", f"mysql://me:{PASSWORD}@db/x", "postgresql+psycopg://"),
    ("CIO_RETL_STATE_URL", f"postgres://me:{PASSWORD}@db/x", "postgresql+psycopg://"),
    ("CIO_RETL_STATE_SCHEMA", "cio-retl", "letters, digits and underscores"),
    ("CIO_SITE_ID", "site id", "exactly as Customer.io shows it"),
    ("CIO_API_KEY", f"{API_KEY}\n", "exactly as Customer.io shows it"),
]


@pytest.mark.parametrize("command", [["plan"], ["sync", "--dry-run"], ["sync"]])
@pytest.mark.parametrize(("variable", "value", "allowed"), BAD_SETTINGS)
def test_a_bad_setting_is_exit_2_naming_it_before_anything_runs(
    env: dict[str, str],
    demo_engine: Engine,
    emulator: Emulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    variable: str,
    value: str,
    allowed: str,
) -> None:
    demo_engine.dispose()
    monkeypatch.setenv(variable, value)
    assert main(command) == 2
    captured = capsys.readouterr()
    error = captured.err
    assert variable in error and "allowed: " in error and allowed in error, error
    assert PASSWORD not in error + captured.out and API_KEY not in error + captured.out
    assert emulator.requests == []  # not even the credential check


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (["sync", "--batch-size", "abc"], "a whole number from 1 to 1000"),
        (["sync", "--batch-size", "0"], "a whole number from 1 to 1000"),
        (["sync", "--batch-size", "1001"], "a whole number from 1 to 1000"),
        (["sync", "--bucket", "three"], "INDEX/COUNT"),
        (["plan", "--bucket", "3/2"], "INDEX/COUNT"),
        (["plan", "--bucket", "0/0"], "INDEX/COUNT"),
        (["plan", "--samples", "-1"], "a whole number, 0 or more"),
        (["status", "--limit", "x"], "a whole number, 1 or more"),
        (["emulator", "--port", "70000"], "a whole number from 0 to 65535"),
    ],
)
def test_a_bad_flag_is_exit_2_saying_what_is_allowed(
    capsys: pytest.CaptureFixture[str], argv: list[str], allowed: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    flag = next(a for a in argv if a.startswith("--"))
    assert f"argument {flag}:" in error and f"allowed: {allowed}" in error, error
    assert "invalid" not in error  # argparse's "invalid _batch_size value"


@pytest.mark.parametrize("value", ["0", "abc", "-2", "4097", "2.5"])
def test_cio_retl_buckets_is_checked_when_read(value: str) -> None:
    resources = pytest.importorskip("dagster_cio_retl.resources")
    with pytest.raises(ConfigError, match=r"CIO_RETL_BUCKETS.*allowed: a whole number 1 to 4096"):
        resources.buckets_from_env({"CIO_RETL_BUCKETS": value})
    assert resources.buckets_from_env({"CIO_RETL_BUCKETS": " 16 "}) == 16


@pytest.mark.parametrize(
    ("url", "absent", "expected"),
    [
        (
            f"postgresql://me:{PASSWORD}@127.0.0.1/test",
            "psycopg2",
            ["needs the psycopg2 driver", "use postgresql+psycopg://", "cio-retl[postgres]"],
        ),
        (
            f"postgresql+psycopg://me:{PASSWORD}@127.0.0.1/test",
            "psycopg",
            ["needs psycopg", "`postgres` extra", "cio-retl[postgres]"],
        ),
        (
            f"snowflake://me:{PASSWORD}@account/db/public?warehouse=wh",
            "snowflake",
            ["needs snowflake-sqlalchemy", "`snowflake` extra", "cio-retl[snowflake]"],
        ),
    ],
)
def test_a_missing_driver_names_the_url_form_and_the_extra(
    env: dict[str, str], url: str, absent: str, expected: list[str]
) -> None:
    """A process in which the driver's package cannot be imported, as without the extra."""
    code = (
        f"import sys; sys.modules[{absent!r}] = None\n"
        "from cio_retl.cli import main\n"
        "sys.exit(main(['plan']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env, "CIO_RETL_WAREHOUSE_URL": url},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "CIO_RETL_WAREHOUSE_URL" in done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr
    assert PASSWORD not in done.stderr + done.stdout


def test_an_unreachable_track_api_is_transient_and_names_the_host(
    settings: Settings, demo_engine: Engine
) -> None:
    port = closed_port()
    dead = replace(settings, track_api_url=f"http://127.0.0.1:{port}")
    with pytest.raises(TransientError) as caught:
        run_sync(dead, None, SyncOptions(retry=FAST_RETRY))
    message = str(caught.value)
    assert f"the Track API at http://127.0.0.1:{port} could not be reached" in message
    assert "ConnectError" in message and "Connection refused" in message
    assert exit_status(caught.value) == 4
    assert API_KEY not in message and SITE_ID not in message


def test_a_track_api_that_keeps_failing_is_exit_4(
    env: dict[str, str],
    demo_engine: Engine,
    emulator: Emulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Throttled on every attempt (Retry-After: 0, so the test does not wait): before any
    batch (the credential check), then on the batches; exit 4 both times, host named."""
    demo_engine.dispose()
    emulator.faults = FaultPlan(status_override=429, retry_after=0)
    assert main(["sync"]) == 4
    error = capsys.readouterr().err
    assert f"the Track API at {emulator.url} kept failing (last: HTTP 429)" in error, error
    assert "GET /api/v1/accounts/region" in error and API_KEY not in error

    emulator.faults = FaultPlan(throttle_rate=1.0, retry_after=0)
    assert main(["sync"]) == 4
    captured = capsys.readouterr()
    assert "POST /api/v2/batch" in captured.err and "resent on the next run" in captured.err
    assert API_KEY not in captured.err + captured.out


def test_rows_acknowledged_before_a_transient_failure_are_kept(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    """The run report of a run cut short: outcome INTERRUPTED (exit 4), the first model's
    rows acknowledged and kept, the rest sent by the next run."""
    emulator.faults = FaultPlan(fail_first=0, throttle_rate=0.0)
    first = sync(settings, "companies")
    assert first.outcome is Outcome.SYNCED
    emulator.faults = FaultPlan(throttle_rate=1.0, retry_after=0)
    cut = sync(settings)
    assert cut.outcome is Outcome.INTERRUPTED and EXIT_STATUS[cut.outcome] == 4
    assert cut.error and emulator.url in cut.error
    emulator.faults = FaultPlan()
    assert sync(settings).outcome is Outcome.SYNCED
    assert len(emulator.workspace.people) == 490


@pytest.mark.parametrize("command", [["plan"], ["sync"], ["status"]])
def test_an_unreachable_database_is_exit_4_naming_the_host(
    env: dict[str, str],
    emulator: Emulator,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    pytest.importorskip("psycopg")
    port = closed_port()
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{port}/test?connect_timeout=5"
    monkeypatch.setenv("CIO_RETL_WAREHOUSE_URL", url)
    assert main(command) == 4
    error = capsys.readouterr().err
    assert f"cannot reach the postgresql database at 127.0.0.1:{port}" in error, error
    assert PASSWORD not in error and API_KEY not in error
    assert emulator.requests == []


def test_a_database_that_does_not_exist_is_a_configuration_error(
    env: dict[str, str],
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server answers: SQLSTATE 3D000 (invalid catalog name) is not worth retrying."""
    monkeypatch.setenv("CIO_RETL_WAREHOUSE_URL", postgres_url.rsplit("/", 1)[0] + "/no_such_db")
    assert main(["plan"]) == 2
    error = capsys.readouterr().err
    assert "cannot connect to the postgresql database at 127.0.0.1" in error
    assert "no_such_db" in error


def test_every_rejection_is_counted_by_its_code(
    settings: Settings,
    emulator: Emulator,
    models_dir: Path,
    warehouse_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One model whose rows break one rule each, far more than the 20 a report lists: the
    run counts every rejection by code, whoever rejected it (the diff, the limits, the
    encoder, Customer.io's 207)."""
    engine = create_engine(warehouse_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "create table people as"
                " select 'ok' || i || '@example.com' as email, null::varchar as big,"
                " null::blob as raw from range(40) t(i)"
                " union all select 'not-an-email-' || i, null, null from range(30) t(i)"
                " union all select 'twin' || (i % 25) || '@example.com', null, null"
                "   from range(50) t(i)"
                " union all select null, null, null"
                " union all select 'long' || i || '@example.com', repeat('x', 1001), null"
                "   from range(2) t(i)"
                " union all select 'raw@example.com', null, '\\xAA'::blob"
            )
        )
    engine.dispose()
    (models_dir / "people.sql").write_text(
        "-- kind: person\n-- identifier: email\n-- key: email\nselect * from people\n"
    )
    emulator.faults = FaultPlan(
        reject_identifiers=frozenset({"ok1@example.com", "ok2@example.com"})
    )
    report = sync(replace(settings, models_dir=models_dir))
    (people,) = report.models
    assert people.rejected_by_code == {
        RejectionCode.INVALID_IDENTIFIER: 30,
        RejectionCode.DUPLICATE_KEY: 50,
        RejectionCode.NULL_KEY: 1,
        RejectionCode.TOO_LONG: 2,
        RejectionCode.INVALID_VALUE: 1,
        RejectionCode.API_REJECTED: 2,
    }
    assert people.rejected == 86 == sum(people.rejected_by_code.values())
    assert len(people.rejections) == 20 and people.created == 38
    assert report.outcome is Outcome.REJECTED
    print_report(report)
    out = capsys.readouterr().out
    assert (
        "by code: duplicate_key 50, invalid_identifier 30, api_rejected 2, too_long 2,"
        " invalid_value 1, null_key 1"
    ) in out


def test_codes_are_stored_per_run_and_per_row_and_status_shows_them(
    settings: Settings,
    emulator: Emulator,
    models_dir: Path,
    warehouse_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = create_engine(warehouse_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "create table people as select 'twin' || (i % 25) || '@example.com' as email,"
                " i as n from range(50) t(i)"
                " union all select 'bad-' || i, i from range(3) t(i)"
                " union all select 'ok@example.com', 1"
            )
        )
    (models_dir / "people.sql").write_text(
        "-- kind: person\n-- identifier: email\n-- key: email\nselect * from people\n"
    )
    report = sync(replace(settings, models_dir=models_dir))
    state = StateStore(engine)
    assert state.run_rejection_counts([report.run_id]) == {
        (report.run_id, "people"): {"duplicate_key": 50, "invalid_identifier": 3}
    }
    # The rejections table keeps each key once: 25 duplicated keys, 3 bad emails.
    assert state.rejection_counts_by_code() == {"duplicate_key": 25, "invalid_identifier": 3}
    engine.dispose()
    for name, value in cli_env(warehouse_url, emulator.url).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CIO_RETL_MODELS_DIR", str(models_dir))
    assert main(["status", "--json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    (run,) = data["runs"]
    assert run["models"][0]["rejected_by_code"] == {"duplicate_key": 50, "invalid_identifier": 3}
    assert data["rejected"]["by_code"] == {"duplicate_key": 25, "invalid_identifier": 3}
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "rejected by people's last run, by code: duplicate_key 50, invalid_identifier 3" in out
    assert "by code: duplicate_key 25, invalid_identifier 3" in out
    assert "key='bad-0' invalid_identifier: identifier email 'bad-0' is not an email" in out


@pytest.mark.parametrize("database", ["duckdb", "postgres"])
def test_a_rejections_table_from_before_codes_gets_the_column(
    request: pytest.FixtureRequest,
    settings: Settings,
    emulator: Emulator,
    models_dir: Path,
    warehouse_url: str,
    database: str,
) -> None:
    """ensure_schema adds the code column to an older table; its rows keep no code, and
    the next rejection of the key records one."""
    if database == "postgres":
        schemas = request.getfixturevalue("pg_schemas")
        url, schema = schemas.url, schemas.state
    else:
        url, schema = warehouse_url, "cio_retl"
    state_engine = create_engine(url)
    state = StateStore(state_engine, schema)
    state.ensure_schema()
    with state_engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {schema}.rejections DROP COLUMN code"))
        conn.execute(
            sa.text(
                f"INSERT INTO {schema}.rejections (workspace, model, key, run_id, reason,"
                " rejected_at) VALUES (:w, 'people', 'bad-0', 'old-run', 'old reason', now())"
            ),
            {"w": SITE_ID},
        )
    # Read-only commands (status) read such a table as it is ...
    assert state.rejection_counts_by_code() == {None: 1}
    assert [(r["key"], r["code"]) for r in state.rejections()] == [("bad-0", None)]
    state.ensure_schema()  # ... and the next sync adds the column
    assert state.rejection_counts_by_code() == {None: 1}
    engine = create_engine(warehouse_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("create table people as select 'bad-' || i as email from range(2) t(i)")
        )
    engine.dispose()
    (models_dir / "people.sql").write_text(
        "-- kind: person\n-- identifier: email\n-- key: email\nselect * from people\n"
    )
    sync(replace(settings, models_dir=models_dir, state_url=url, state_schema=schema))
    assert state.rejection_counts_by_code() == {"invalid_identifier": 2}
    state_engine.dispose()


# -- a database failing once the run is under way --------------------------------------------


def _wrapped(engine: Engine, orig: Exception) -> sa.exc.DBAPIError:
    """``orig`` (a driver's exception) as SQLAlchemy raises it for ``engine``'s driver."""
    return sa.exc.DBAPIError.instance("SELECT 1", None, orig, engine.dialect.loaded_dbapi.Error)


def test_a_failing_database_is_transient_only_when_it_did_not_answer(
    tmp_path: Path, postgres_url: str
) -> None:
    """PEP 249's OperationalError and InterfaceError, and the Snowflake connector's HTTP
    failures (not OperationalErrors: its own Error's subclasses), are a database that failed
    under the run; a statement it refused is not. Each names the database, never a
    password, DuckDB's memory limit says how to raise it, and DuckDB's write-write conflict
    says what it is."""
    import duckdb
    import psycopg
    from snowflake.connector import errors as snowflake_errors

    from cio_retl.warehouse import database_lost

    local = create_engine(f"duckdb:///{tmp_path / 'w.duckdb'}")
    server = sa.create_engine(postgres_url.replace("postgres@", f"postgres:{PASSWORD}@"))
    snowflake = sa.create_engine(f"snowflake://me:{PASSWORD}@acme-xy12345/db")
    try:
        gone = database_lost(
            _wrapped(server, psycopg.OperationalError(f"server closed ({PASSWORD})")),
            [local, server],
        )
        assert isinstance(gone, TransientError) and exit_status(gone) == 4
        assert str(gone).startswith("the postgresql database at 127.0.0.1:5432 failed")
        assert PASSWORD not in str(gone) and "server closed (***)" in str(gone)

        oom = database_lost(
            _wrapped(local, duckdb.OutOfMemoryException("Out of Memory Error: failed")),
            [local, server],
        )
        assert oom is not None and f"duckdb database {tmp_path / 'w.duckdb'} failed" in str(oom)
        assert "memory_limit is 128MB unless the URL sets one" in str(oom)

        # DuckDB's own error for two transactions that edit one row at once, taken from it.
        shared = duckdb.connect()
        shared.execute("CREATE TABLE t (a INTEGER); INSERT INTO t VALUES (1)")
        first, second = shared.cursor(), shared.cursor()
        first.execute("BEGIN; DELETE FROM t")
        second.execute("BEGIN")
        with pytest.raises(duckdb.TransactionException) as raised:
            second.execute("DELETE FROM t")
        shared.close()
        conflict = database_lost(_wrapped(local, raised.value), [local, server])
        assert isinstance(conflict, TransientError) and exit_status(conflict) == 4
        assert "Conflict on tuple deletion" in str(conflict)
        assert "another transaction of this process (a run beside this one)" in str(conflict)
        assert "memory_limit" not in str(conflict)

        unanswered = database_lost(
            _wrapped(snowflake, snowflake_errors.ServiceUnavailableError(msg="503")),
            [snowflake],
        )
        assert unanswered is not None and "snowflake database at acme-xy12345" in str(unanswered)
        assert PASSWORD not in str(unanswered)

        refused = _wrapped(local, duckdb.CatalogException("Table with name nope does not exist"))
        assert isinstance(refused, sa.exc.ProgrammingError)
        assert database_lost(refused, [local]) is None
        denied = _wrapped(snowflake, snowflake_errors.ProgrammingError(msg="denied"))
        assert database_lost(denied, [snowflake]) is None
    finally:
        for engine in (local, server, snowflake):
            engine.dispose()


def fail_lock_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lock release of the state store fails as a DuckDB file's I/O would."""
    import duckdb

    def release_fails(*_args: object, **_kwargs: object) -> None:
        raise sa.exc.OperationalError(
            "DELETE FROM cio_retl.locks", None, duckdb.IOException("IO Error: disk detached")
        )

    monkeypatch.setattr(StateStore, "release_lock", release_fails)


def test_a_lock_the_state_store_fails_to_release_is_a_notice_not_a_failure(
    settings: Settings, demo_engine: Engine, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything was sent and acknowledged when the state store failed to release the
    lock: the run is still a success, and its report says what happens to the lock."""
    fail_lock_releases(monkeypatch)
    report = sync(settings)
    assert report.outcome is Outcome.SYNCED and report.error is None
    assert len(emulator.workspace.people) == 490
    notices = [n for n in report.notices if "was not released" in n]
    assert len(notices) == len(report.models)
    assert "(IO Error: disk detached): the next run takes it over" in notices[0]
    assert "the rest goes on the next run" not in notices[0]  # nothing was left to send


def test_a_run_stopped_under_way_prints_its_notices_after_the_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report an engine error carries (set when the run had started) brings its notices
    to the command line too, after the error: a lock left unreleased is worth knowing when
    the next run waits for it."""
    from cio_retl.errors import UnreachableError
    from cio_retl.sync import RunReport

    error = UnreachableError("the duckdb database w.duckdb failed during the run: IO Error")
    error.report = RunReport(
        "run-1", False, [], notices=["the lock of model users was not released (IO Error)"]
    )

    def stopped(*_args: object, **_kwargs: object) -> None:
        raise error

    monkeypatch.setattr("cio_retl.cli.run_sync", stopped)
    assert main(["sync"]) == 4
    printed = " ".join(capsys.readouterr().err.split())
    assert "error: the duckdb database w.duckdb failed during the run: IO Error" in printed
    assert printed.index("error:") < printed.index(
        "note: the lock of model users was not released (IO Error)"
    )
