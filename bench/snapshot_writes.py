"""What the state writer's snapshot inserts cost by what a snapshot row holds, alone.

    uv run python bench/snapshot_writes.py --rows 1000000 [--repeats 3]
        [--transaction-rows 25000 122880 130000]

A DuckDB file holds ``bench_people`` and a plan-like table of its rows (key, fingerprint,
the attributes text, as an initial sync's plan holds them); each variant copies the file,
inserts every row's snapshot in transactions of ``Sender.ACK_ROWS`` rows (the state writer's
unit, each an OR of 1000-row sequence ranges like its acknowledged batches), then
checkpoints, under cio-retl's DuckDB settings (memory limit and checkpoint threshold). It
prints the inserts', the commits' and the final checkpoint's time, and the file's size.

- ``current``: the columns a snapshot row has (workspace, model, key, fingerprint,
  identifiers, attributes, run id, time);
- ``attrs_hash``: plus the md5 of the attributes, as snapshot rows had before it was retired;
- ``no_identifiers``: without the identifiers (not done: removals read them).

``--transaction-rows`` runs ``current`` alone in transactions of each size given instead:
what DuckDB's row groups (122,880 rows) make of the state writer's unit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine, people_table
from floor import item_sql

from cio_retl.dialects import DUCKDB_CHECKPOINT_THRESHOLD, DUCKDB_MEMORY_LIMIT
from cio_retl.send import Sender

BATCH = 1000  # items per acknowledged batch: one sequence range each
VARIANTS = {
    "current": "'{\"id\":\"' || p.key || '\"}' AS identifiers,",
    "attrs_hash": "md5(p.snap) AS attrs_hash, '{\"id\":\"' || p.key || '\"}' AS identifiers,",
    "no_identifiers": "",
}


def build(path: Path, rows: int) -> None:
    engine = sa.create_engine(f"duckdb:///{path}")
    people_table(engine, rows)
    engine.dispose()
    import duckdb

    conn = duckdb.connect(str(path))
    items = item_sql(conn, "bench_people")
    conn.execute(
        "CREATE TABLE plan AS SELECT row_number() OVER () AS seq, i->>'$.identifiers.id' AS key,"
        " CAST(hash(i) AS VARCHAR) AS fp, CAST(i->'$.attributes' AS VARCHAR) AS snap"
        f" FROM ({items}) AS q(i)"
    )
    conn.close()


def write(path: Path, rows: int, variant: str, step: int = Sender.ACK_ROWS) -> str:
    import duckdb

    conn = duckdb.connect(str(path))
    conn.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
    conn.execute(f"SET checkpoint_threshold = '{DUCKDB_CHECKPOINT_THRESHOLD}'")
    conn.execute(
        f"CREATE TABLE snapshots AS SELECT 'ws' AS workspace, 'people' AS model, p.key,"
        f" p.fp AS fingerprint, {VARIANTS[variant]} p.snap AS attributes,"
        " 'run-00000000' AS run_id, now() AS synced_at FROM plan AS p WHERE false"
    )
    inserts = commits = 0.0
    for first in range(1, rows + 1, step):
        last = min(first + step - 1, rows)
        ranges = " OR ".join(
            f"p.seq BETWEEN {a} AND {min(a + BATCH - 1, last)}"
            for a in range(first, last + 1, BATCH)
        )
        conn.execute("BEGIN")
        began = time.perf_counter()
        conn.execute(
            f"INSERT INTO snapshots SELECT 'ws', 'people', p.key, p.fp, {VARIANTS[variant]}"
            f" p.snap, 'run-00000000', now() FROM plan AS p WHERE {ranges}"
        )
        inserted = time.perf_counter()
        conn.execute("COMMIT")
        inserts += inserted - began
        commits += time.perf_counter() - inserted
    began = time.perf_counter()
    conn.execute("CHECKPOINT")
    checkpoint = time.perf_counter() - began
    conn.close()
    total = inserts + commits + checkpoint
    return (
        f"{variant:15s} {step:>9,}-row transactions: inserts {inserts:5.2f} s, commits {commits:5.2f} s, final checkpoint"
        f" {checkpoint:5.2f} s: {total:5.2f} s; file {os.path.getsize(path) / 1e6:,.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--transaction-rows",
        type=int,
        nargs="+",
        metavar="N",
        help="the current columns only, in transactions of each N rows instead (DuckDB's row"
        " group is 122,880: a multiple of it is written to the file once, see"
        " Dialect.snapshot_merge_rows)",
    )
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    print(
        f"{args.rows:,} snapshot rows; DuckDB memory_limit"
        f" {DUCKDB_MEMORY_LIMIT}, checkpoint_threshold {DUCKDB_CHECKPOINT_THRESHOLD}"
    )
    with tempfile.TemporaryDirectory(prefix="cio-snapshot-writes-") as tmp:
        pristine = Path(tmp) / "pristine.duckdb"
        build(pristine, args.rows)
        runs = (
            [("current", n) for n in args.transaction_rows]
            if args.transaction_rows
            else [(variant, Sender.ACK_ROWS) for variant in VARIANTS]
        )
        for repeat in range(args.repeats):
            for variant, step in runs:
                copy = Path(tmp) / f"{variant}.duckdb"
                shutil.copy(pristine, copy)
                print(f"[{repeat + 1}] {write(copy, args.rows, variant, step)}", flush=True)
                copy.unlink()


if __name__ == "__main__":
    main()
