"""Progress of a long sync: a rich bar with items/s and ETA on a terminal, a plain line every
few seconds when stderr is piped (the same lines Dagster writes to a run's log)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from sqlalchemy.engine import Engine

from cio_retl import cli
from cio_retl.emulator import Emulator
from cio_retl.progress import ProgressLog, progress_line
from tests.conftest import cli_env


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_few_seconds_with_rate_and_time_left() -> None:
    clock, lines = Clock(), []
    log = ProgressLog(lines.append, every=5.0, clock=clock)
    log("users", 1000, 10_000)  # starts the clock
    clock.now += 2
    log("users", 1000, 10_000)
    assert lines == []  # not yet 5 s
    clock.now += 3
    log("users", 2000, 10_000)
    assert lines == ["users: 4,000 of 10,000 items (40%), 800 items/s, about 8 s left"]
    clock.now += 1
    log("users", 1000, 10_000)
    assert len(lines) == 1  # the next one 5 s after the last
    log("companies", 40, 40)  # each model its own line and clock
    assert len(lines) == 1


def test_progress_line_forms() -> None:
    assert progress_line("m", 0, 0, 0.0) == "m: 0 of 0 items (100%)"
    assert progress_line("m", 600, 360_600, 60.0).endswith("10 items/s, about 10 h 00 min left")
    assert progress_line("m", 10, 1210, 1.0).endswith("about 2 min 00 s left")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, emulator: Emulator, warehouse_url: str) -> None:
    for name in ("CIO_RETL_STATE_URL", "CIO_REGION", "CIO_RETL_STATE_SCHEMA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in cli_env(warehouse_url, emulator.url).items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("env")
def test_piped_sync_writes_plain_progress_lines(
    demo_engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    demo_engine.dispose()
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_EVERY", 0.0)  # every batch, for the test
    assert cli.main(["sync", "users", "--batch-size", "100"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("users:")]
    assert lines[0] == "users: 0 of 490 items (0%)"  # when the model's send starts
    assert lines[1].startswith("users: 100 of 490 items (20%), ")
    assert lines[-1].startswith("users: 490 of 490 items (100%)")
    assert "\x1b[" not in "".join(lines)  # plain text: no escape codes in a log


@pytest.mark.usefixtures("env")
def test_terminal_sync_draws_a_bar_with_rate_and_eta(
    demo_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo_engine.dispose()
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=screen, force_terminal=True, width=120))
    assert cli.main(["sync", "users", "--batch-size", "50"]) == 0
    drawn = screen.getvalue()
    assert "490/490" in drawn and "items/s" in drawn and "ETA" in drawn and "━" in drawn
