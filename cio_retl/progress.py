"""Progress of a long sync as plain lines: for a command whose output is piped (a log file,
CI, cron mail) and for Dagster's run log, where a redrawn bar cannot show.

:class:`ProgressLog` takes the engine's progress callback (``sync.Progress``) and emits one
line per model at most every ``every`` seconds: items handled of the model's total, the rate
and the time left at that rate. The terminal's bar (``cio-retl sync`` on a tty) is drawn by
rich from the same callback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Model:
    started: float
    done: int = 0
    total: int = 0
    reported: float = 0.0


class ProgressLog:
    """The engine's progress callback, as a line every ``every`` seconds per model."""

    def __init__(
        self,
        emit: Callable[[str], None],
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.every = every
        self.clock = clock
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()  # batches of a model settle on one thread; be safe

    def __call__(self, model: str, items: int, total: int) -> None:
        now = self.clock()
        with self._lock:
            state = self._models.get(model)
            if state is None:
                state = self._models[model] = _Model(started=now, reported=now)
            state.done += items
            state.total = max(total, state.done)
            if now - state.reported < self.every:
                return
            state.reported = now
            line = progress_line(model, state.done, state.total, now - state.started)
        self.emit(line)


def progress_line(model: str, done: int, total: int, elapsed: float) -> str:
    """``users: 12,000 of 100,000 items (12%), 3,456 items/s, about 25 s left``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"{model}: {done:,} of {total:,} items ({100 * done / total if total else 100:.0f}%)"
    if rate > 0:
        line += f", {rate:,.0f} items/s, about {_duration((total - done) / rate)} left"
    return line


def _duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
