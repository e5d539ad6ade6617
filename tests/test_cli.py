"""The command line as users run it: exit codes, plan, status and the README's demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.cli import main
from cio_retl.emulator import Emulator, FaultPlan
from tests.conftest import API_KEY, REPO, cli_env


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, emulator: Emulator, warehouse_url: str) -> dict[str, str]:
    values = cli_env(warehouse_url, emulator.url)
    for name in ("CIO_RETL_STATE_URL", "CIO_REGION", "CIO_RETL_STATE_SCHEMA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_sync_exit_0_then_plan_shows_nothing_to_do(
    env: dict[str, str], demo_engine: Engine, emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    demo_engine.dispose()
    assert main(["plan", "users", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing sent" in out and '"action": "identify"' in out
    assert [r for r in emulator.requests if r.path == "/api/v2/batch"] == []
    assert main(["sync"]) == 0
    assert main(["plan"]) == 0
    assert len(emulator.workspace.people) == 490


def test_exit_1_when_rows_are_rejected_and_status_lists_them(
    env: dict[str, str], demo_engine: Engine, emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    demo_engine.dispose()
    emulator.faults = FaultPlan(reject_identifiers=frozenset({"grace.dijkstra.11@example.com"}))
    assert main(["sync", "users"]) == 1
    out = capsys.readouterr().out
    assert "rejected users key='grace.dijkstra.11@example.com'" in out
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "rejected rows waiting for a fix: 1 (users: 1)" in out
    assert "grace.dijkstra.11@example.com" in out and "rejected by fault plan" in out
    assert API_KEY not in out


def test_exit_2_for_model_errors_and_missing_credentials(
    env: dict[str, str],
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    demo_engine: Engine,
) -> None:
    demo_engine.dispose()
    models = tmp_path / "broken"
    models.mkdir()
    (models / "users.sql").write_text("-- kind: person\n-- identifier: email\nselect 1 as email\n")
    monkeypatch.setenv("CIO_RETL_MODELS_DIR", str(models))
    assert main(["sync"]) == 2
    assert "missing required header key 'key'" in capsys.readouterr().err
    monkeypatch.setenv("CIO_RETL_MODELS_DIR", str(REPO / "sql"))
    monkeypatch.delenv("CIO_API_KEY")
    assert main(["sync"]) == 2
    assert "CIO_SITE_ID and CIO_API_KEY must be set" in capsys.readouterr().err
    assert main(["sync", "--dry-run"]) == 0  # a dry run needs no credentials
    monkeypatch.setenv("CIO_REGION", "mars")
    assert main(["sync", "--dry-run"]) == 2
    assert emulator.requests == []


def test_exit_3_for_guardrails_and_force(
    env: dict[str, str], demo_engine: Engine, emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sync"]) == 0
    with demo_engine.begin() as conn:  # a bad transformation: every membership vanishes
        conn.execute(sa.text("DELETE FROM demo.memberships"))
    demo_engine.dispose()
    before = len(emulator.requests)
    assert main(["sync"]) == 3
    err = capsys.readouterr().err
    assert "memberships:" in err and "would be deleted, over max_delete_pct 10" in err
    assert [r.path for r in emulator.requests[before:]] == ["/api/v1/accounts/region"]
    assert main(["sync", "--force"]) == 0
    assert emulator.workspace.relationships == {}


def test_demo_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    for name in list(os.environ):
        if name.startswith("CIO_"):
            monkeypatch.delenv(name)
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "second sync sent 8 items" in out and "demo ok" in out
