"""Events at scale: the first sync of N events, then a rerun after M new events are appended
to a history of H, with wall time, CPU and peak RSS of each sync process.

    uv run python bench/events_scale.py --events 1000000            # first sync of 1M
    uv run python bench/events_scale.py --history 10000000 --new 10000   # rerun: 10k of 10M

The rerun case writes the history's acknowledgments straight into ``cio_retl.sent_events``
(as if an earlier sync had sent them), appends the new rows, and times one
``python -m cio_retl sync``: the anti-join in the database must hand Python only the new
events, so the rerun's RSS stays near the first sync's of M events, not of H. Each sync runs
as its own process against the emulator in another process (bodies not recorded).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SITE_ID, emulator_process, machine, sync_env, timed_run

SYNC = [sys.executable, "-m", "cio_retl", "sync"]
MODEL = """-- Benchmark events: a fixed name, four data columns.
-- kind: event
-- identifier: id
-- key: user_id
-- event_key: order_id
-- name: order_completed
-- timestamp: completed_at
select order_id, user_id, completed_at, total, currency, items
from main.bench_orders
"""


def orders(conn: sa.Connection, start: int, count: int) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO main.bench_orders SELECT 'o' || i, 'u' || (i % 100000),"
            " TIMESTAMP '2025-01-01' + i * INTERVAL '1 second' + (i % 1000) * INTERVAL '1 millisecond',"
            " CAST(i % 10000 AS DECIMAL(10, 2)) / 100, CASE WHEN i % 2 = 0 THEN 'EUR' ELSE 'USD' END,"
            f" i % 7 FROM range({start}, {start + count}) AS r(i)"
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, help="first sync of this many events")
    parser.add_argument("--history", type=int, help="events already sent before the rerun")
    parser.add_argument("--new", type=int, default=10_000, help="events appended for the rerun")
    args = parser.parse_args(argv)
    if (args.events is None) == (args.history is None):
        parser.error("give --events N (first sync) or --history N [--new M] (rerun)")
    print(machine())
    from cio_retl.state import StateStore
    from cio_retl.warehouse import create_engine

    with tempfile.TemporaryDirectory(prefix="cio-bench-events-") as tmp:
        url = f"duckdb:///{Path(tmp) / 'warehouse.duckdb'}"
        models = Path(tmp) / "models"
        models.mkdir()
        (models / "bench_orders.sql").write_text(MODEL)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE main.bench_orders (order_id VARCHAR, user_id VARCHAR,"
                    " completed_at TIMESTAMP, total DECIMAL(10, 2), currency VARCHAR,"
                    " items INTEGER)"
                )
            )
            orders(conn, 0, args.events or args.history)
        if args.history is not None:
            state = StateStore(engine)
            state.ensure_schema()
            with engine.begin() as conn:  # as if a sync to SITE_ID had sent the history
                conn.execute(
                    sa.text(
                        f"INSERT INTO {state.sent_events} (workspace, model, key, event_id,"
                        " event_time, run_id, sent_at) SELECT :site, 'bench_orders', 'o' || i,"
                        f" 'x', i, 'bench', now() FROM range({args.history}) AS r(i)"
                    ),
                    {"site": SITE_ID},
                )
            with engine.begin() as conn:
                orders(conn, args.history, args.new)
        engine.dispose()
        with emulator_process() as base:
            timed = timed_run(SYNC, sync_env(url, models, base))
        sent = args.events or args.new
        engine = create_engine(url)
        with engine.connect() as conn:  # every event recorded once: the run sent them all
            recorded = conn.execute(sa.text("SELECT count(*) FROM cio_retl.sent_events")).scalar()
        engine.dispose()
        assert recorded == (args.events or args.history + args.new), recorded
        label = (
            f"first sync of {args.events:,} events"
            if args.events
            else (f"rerun: {args.new:,} new of {args.history + args.new:,}")
        )
        print(
            f"{label}: {timed.seconds:.1f} s wall, {timed.cpu_seconds:.1f} s CPU,"
            f" {timed.rss_mib:.0f} MiB peak RSS ({sent / timed.seconds:,.0f} events/s)"
        )


if __name__ == "__main__":
    main()
