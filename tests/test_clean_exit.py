"""A pytest run that reads a TIMESTAMP_TZ through fakesnow ends without nanobind leak reports.

The repro is the smallest known to make DuckDB's objects outlive the interpreter (see
``_unlink_overload_dummy`` in conftest.py for the chain): fakesnow + snowflake-sqlalchemy, one
TIMESTAMP_TZ fetched (pyarrow converts it and keeps pandas), duckdb_engine imported. It runs
as its own pytest process with this project's conftest as a plugin, so what is checked is
what a developer sees after the green summary.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

REPRO = """
import sqlalchemy as sa


def test_timestamp_tz_through_fakesnow(fakesnow_url):
    engine = sa.create_engine(fakesnow_url)
    with engine.connect() as conn:
        value = conn.execute(sa.text("SELECT CURRENT_TIMESTAMP()::TIMESTAMP_TZ")).scalar_one()
    engine.dispose()
    import duckdb_engine  # noqa: F401  (the DuckDB dialect, loaded in every real test run)

    assert value.tzinfo is not None
"""


def test_fakesnow_timestamp_tz_run_ends_without_leak_reports(tmp_path: Path) -> None:
    pytest.importorskip("snowflake.sqlalchemy", reason="needs the snowflake extra")
    pytest.importorskip("fakesnow")
    repro = tmp_path / "test_repro.py"
    repro.write_text(REPRO)
    plugins = ["-p", "no:cacheprovider", "-p", "tests.conftest"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *plugins, "--rootdir", str(tmp_path), str(repro)],
        cwd=REPO,  # where ``-m`` finds the ``tests`` package
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "leaked" not in result.stderr, result.stderr


def test_the_exit_hook_drops_hypothesis_gc_callbacks_only() -> None:
    """The second known chain starts at hypothesis's never-removed ``gc.callbacks`` entry
    (see ``_drop_hypothesis_gc_callbacks``); reproducing it takes the property, fakesnow and
    Dagster test modules in one process (3.5 min), so CI checks the whole run's end for leak
    reports instead, and this checks what the hook removes."""
    import gc

    from tests.conftest import _drop_hypothesis_gc_callbacks

    def ours(phase: str, info: dict[str, int]) -> None: ...

    def theirs(phase: str, info: dict[str, int]) -> None: ...

    theirs.__module__ = "hypothesis.internal.conjecture.junkdrawer"
    before = list(gc.callbacks)  # hypothesis's own callback, if registered, comes back
    gc.callbacks.extend([ours, theirs])
    try:
        _drop_hypothesis_gc_callbacks()
        assert ours in gc.callbacks and theirs not in gc.callbacks
    finally:
        gc.callbacks[:] = before
