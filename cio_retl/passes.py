"""How many times a run reads its models: the engine's passes, counted by their statements.

The expensive work of a run is reading a model: the counting pass that plans it, and the
upsert scan that streams its changed rows to be normalized and encoded. Each is one SQL
statement the diff runs, recognised here by a fragment of its text, so a benchmark or a test
can count passes through SQLAlchemy's ``before_cursor_execute`` event without touching the
engine. The engine itself never imports this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

# Fragments of cio_retl.diff's SQL: the counting pass joins the model's keys with the
# snapshot in full; the upsert scan joins the model's rows with it from the left.
PLAN = "FULL OUTER JOIN snap ON snap.key = src.k"
UPSERT_SCAN = "LEFT JOIN snap ON snap.key = src.__cio_key"
PASSES: Mapping[str, str] = {"plans": PLAN, "upsert scans": UPSERT_SCAN}


@contextmanager
def counted_passes(fragments: Mapping[str, str] = PASSES) -> Iterator[dict[str, int]]:
    """Counts, by name, of the statements containing each fragment that any engine of the
    process executes inside the block; the listener is removed when the block ends."""
    counts = dict.fromkeys(fragments, 0)

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        for name, fragment in fragments.items():
            if fragment in statement:
                counts[name] += 1

    sa.event.listen(sa.Engine, "before_cursor_execute", seen)
    try:
        yield counts
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", seen)
