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
