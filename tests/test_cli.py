"""The command line as users run it: exit codes, plan, status and the README's demo."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.cli import _parser, main
from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.warehouse import create_engine
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


def _commands() -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """Each command's parser and its one-line help (argparse keeps them on the subparsers
    action; there is no public accessor)."""
    [action] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help or "" for a in action._choices_actions}
    return {name: (parser, helps[name]) for name, parser in action.choices.items()}


def _readme_command_line() -> dict[str, str]:
    """The README's "Command line" block: each command's lines, whitespace folded."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    sections = re.split(r"\n(?=cio-retl )", block.strip())
    return {
        section.split()[1]: " ".join(section.split()) for section in sections if section.strip()
    }


def test_readme_command_line_lists_every_command_option_and_help() -> None:
    readme = _readme_command_line()
    commands = _commands()
    assert sorted(readme) == sorted(commands)
    for name, (parser, help_text) in commands.items():
        expected = [help_text]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.option_strings:
                expected.append(f"[{action.metavar} ...]")
                continue
            option = max(action.option_strings, key=len)
            takes_value = action.nargs != 0
            expected.append(
                f"[{option} {action.metavar or action.dest.upper()}]"
                if takes_value
                else f"[{option}]"
            )
        missing = [e for e in expected if e not in readme[name]]
        assert not missing, f"README's {name} line lacks {missing}: {readme[name]}"


def test_the_demo_help_counts_the_edits_the_demo_makes(tmp_path: Path) -> None:
    engine = create_engine(f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    try:
        create_demo_warehouse(engine)
        edits = edit_demo_warehouse(engine)
    finally:
        engine.dispose()
    words = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
    ]
    assert f"{words[edits.rows]} edits" in _commands()["demo"][1]
    assert f"{words[edits.rows]} edits" in _readme_command_line()["demo"]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"after {words[edits.rows]} edits in the warehouse" in readme
    assert f"sends exactly {words[edits.entities]} items" in readme
