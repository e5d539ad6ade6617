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

from cio_retl.plan import NARROW_JOIN
from cio_retl.warehouse import HELD_COLUMN, KEY_COLUMN

# Fragments of the diff's SQL, each pass in both of its forms. The plan: the streaming
# diff's counting pass joins the model's keys with the snapshot in full, as does the
# statement that writes a plan table (cio_retl.plan), or a rerun's moved keys before it
# (the narrow join). The upsert scan: the streaming diff
# joins the model's rows with the snapshot from the left; a planned run reads the plan's
# rows to send, in order.
PLAN = (
    "FULL OUTER JOIN snap ON snap.key = src.k",
    f"FULL OUTER JOIN snap ON snap.key = src.{KEY_COLUMN}",
    NARROW_JOIN,
)
UPSERT_SCAN = (f"LEFT JOIN snap ON snap.key = src.{KEY_COLUMN}", f"p.{HELD_COLUMN} = 0 ORDER BY")
PASSES: Mapping[str, tuple[str, ...]] = {"plans": PLAN, "upsert scans": UPSERT_SCAN}


def describes(statement: str) -> bool:
    """Whether ``statement`` only describes a query (DuckDB's DESCRIBE of a plan's query,
    for its columns' types): the query is bound, no row is read."""
    return statement.lstrip().startswith("DESCRIBE")


@contextmanager
def counted_passes(
    fragments: Mapping[str, tuple[str, ...]] = PASSES,
) -> Iterator[dict[str, int]]:
    """Counts, by name, of the statements containing one of each name's fragments that any
    engine of the process executes inside the block; the listener is removed at its end."""
    counts = dict.fromkeys(fragments, 0)

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if describes(statement):
            return
        for name, forms in fragments.items():
            if any(form in statement for form in forms):
                counts[name] += 1

    sa.event.listen(sa.Engine, "before_cursor_execute", seen)
    try:
        yield counts
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", seen)
