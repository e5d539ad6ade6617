"""Where an initial sync's database time goes: every SQL statement timed, by kind.

    uv run python bench/statement_times.py --rows 1000000 [--warehouse postgres] [--ack-rows 5000]
        [--rerun]

Builds ``bench_people`` in a DuckDB file (or a fresh schema of the PostgreSQL of
``sync_scale.py``), runs one initial sync *in this process* (so a
SQLAlchemy listener sees every statement; the run's wall time has no interpreter start-up)
against the emulator's fast path in its own process, and prints the statements' execution
time summed by their first 60 characters (numbers folded), most expensive first. A
statement's time is its ``execute``: rows it streams afterwards are fetched outside it.
The send's reads of the plan go through the driver's own cursor (``PlanTable.chunks``), so
the listener does not see them: they are the rest of the run's time with the HTTP requests.
``--rerun`` times a no-change rerun instead: every row's snapshot is written in SQL first
with its real fingerprint (``sync_scale.seed_snapshot``; identifiers and attributes ``{}``,
so the snapshot table is smaller than a real one), so the run plans and sends nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emulator_process, load_average, machine, sync_env
from sync_scale import MODEL, POSTGRES_URL, create_table, seed_snapshot


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--warehouse", choices=("duckdb", "postgres"), default="duckdb")
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--ack-rows", type=int, help="Sender.ACK_ROWS for this run")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--rerun", action="store_true", help="a no-change rerun, not the initial")
    args = parser.parse_args()

    from cio_retl.config import Settings
    from cio_retl.send import Sender
    from cio_retl.sync import run_sync

    if args.ack_rows:
        Sender.ACK_ROWS = args.ack_rows
    spent: defaultdict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    started = threading.local()

    def before(*_: Any) -> None:
        started.at = time.perf_counter()

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        kind = re.sub(r"\d+", "N", " ".join(statement.split())[:60])
        entry = spent[kind]
        entry[0] += 1
        entry[1] += time.perf_counter() - started.at

    print(f"machine: {machine()}; load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="cio-statements-") as tmp:
        if args.warehouse == "duckdb":
            url, schema, state_schema = (
                f"duckdb:///{Path(tmp) / 'warehouse.duckdb'}",
                "main",
                "cio_retl",
            )
        else:
            url = POSTGRES_URL
            schema, state_schema = f"bench_{os.getpid()}", f"bench_{os.getpid()}_state"
        engine = sa.create_engine(url)
        create_table(engine, schema, args.rows)
        models = Path(tmp) / "models"
        models.mkdir()
        (models / "bench_people.sql").write_text(MODEL.format(schema=schema))
        try:
            if args.rerun:
                seed_snapshot(url, models, state_schema)
            with emulator_process(check_every=args.check_every) as base:
                env = {**sync_env(url, models, base), "CIO_RETL_STATE_SCHEMA": state_schema}
                settings = Settings.from_env(env)
                sa.event.listen(sa.Engine, "before_cursor_execute", before)
                sa.event.listen(sa.Engine, "after_cursor_execute", after)
                began = time.perf_counter()
                report = run_sync(settings)
                wall = time.perf_counter() - began
                sa.event.remove(sa.Engine, "before_cursor_execute", before)
                sa.event.remove(sa.Engine, "after_cursor_execute", after)
        finally:
            if args.warehouse == "postgres":
                with engine.begin() as conn:
                    for dropped in (schema, state_schema):
                        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {dropped} CASCADE"))
            engine.dispose()
    (model,) = report.models
    run = "no-change rerun" if args.rerun else "initial sync"
    print(
        f"{args.warehouse} {run} of {args.rows:,} rows: {wall:.2f} s in process,"
        f" {model.created:,} created, {model.items_sent:,} items sent, {model.requests:,}"
        f" requests; load average {load_average()}"
    )
    for kind, (count, seconds) in sorted(spent.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"  {seconds:7.2f} s  {int(count):5d}x  {kind}")


if __name__ == "__main__":
    main()
