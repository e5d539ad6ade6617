"""A naive reverse-ETL pipeline against cio-retl: a 1%-change rerun of a 1M-row model.

    uv run python bench/naive_pandas.py [--rows 1000000] [--change-pct 1]

Naive, as often hand-written: read the whole model and the whole last-sent snapshot into
pandas, merge on the key, keep rows where any column differs, send those rows in full
(1000-item batches, one httpx client), then replace the snapshot table with the model.
cio-retl: the same change after an initial sync, as `cio-retl sync` (its own process).
Both are timed as separate processes with their peak RSS from wait4, against the same
emulator process, after the same UPDATE.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import httpx
import orjson
import pandas as pd
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    API_KEY,
    SITE_ID,
    emulator_process,
    emulator_stats,
    machine,
    people_table,
    person_model,
    sync_env,
    timed_command,
)


def naive_rerun(url: str, base: str) -> None:
    """The naive pipeline; runs in a child process (see main) so its RSS is its own."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        model = pd.read_sql("SELECT * FROM main.bench_people", conn)
        snapshot = pd.read_sql("SELECT * FROM main.naive_snapshot", conn)
    merged = model.merge(snapshot, on="user_id", how="left", suffixes=("", "_prev"), indicator=True)
    columns = [c for c in model.columns if c != "user_id"]
    changed = merged["_merge"] == "left_only"
    for column in columns:
        changed |= merged[column].astype(str) != merged[f"{column}_prev"].astype(str)
    rows = model[changed.to_numpy()]
    with httpx.Client(base_url=base, auth=(SITE_ID, API_KEY), timeout=60) as client:
        records = rows.to_dict("records")
        for start in range(0, len(records), 1000):
            items = [
                {
                    "type": "person",
                    "action": "identify",
                    "identifiers": {"id": r["user_id"]},
                    "attributes": {k: _json(v) for k, v in r.items()},
                }
                for r in records[start : start + 1000]
            ]
            client.post(
                "/api/v2/batch",
                content=orjson.dumps({"batch": items}),
                headers={"Content-Type": "application/json"},
            ).raise_for_status()
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE main.naive_snapshot"))
        conn.execute(sa.text("CREATE TABLE main.naive_snapshot AS SELECT * FROM main.bench_people"))
    engine.dispose()
    print(
        f"naive sent {len(rows):,} rows; maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}"
    )


def _json(value: object) -> object:
    if isinstance(value, pd.Timestamp):
        return int(value.timestamp())
    return value.item() if hasattr(value, "item") else value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--change-pct", type=float, default=1.0)
    parser.add_argument("--naive-child", nargs=2, metavar=("URL", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_child:
        naive_rerun(*args.naive_child)
        return

    workdir = Path(tempfile.mkdtemp(prefix="cio-retl-naive-"))
    url = f"duckdb:///{workdir / 'bench.duckdb'}"
    engine = sa.create_engine(url)
    people_table(engine, args.rows)
    engine.dispose()
    models = person_model(workdir / "sql")
    results = []
    with emulator_process() as base:
        env = sync_env(url, models, base)
        initial, _ = timed_command([sys.executable, "-m", "cio_retl", "sync"], env)
        print(f"initial cio-retl sync of {args.rows:,} rows: {initial:.1f} s")
        engine = sa.create_engine(url)
        modulo = round(100 / args.change_pct)
        with engine.begin() as conn:
            # The naive pipeline's own "last sent" state: the model as the initial sync sent it.
            conn.execute(
                sa.text("CREATE TABLE main.naive_snapshot AS SELECT * FROM main.bench_people")
            )
            conn.execute(
                sa.text(f"UPDATE main.bench_people SET a2 = 'changed' WHERE a3 % {modulo} = 0")
            )
        engine.dispose()
        before = emulator_stats(base)[1]
        results.append(
            ("cio-retl sync", *timed_command([sys.executable, "-m", "cio_retl", "sync"], env))
        )
        ours = emulator_stats(base)[1] - before
        results.append(
            (
                "naive pandas pipeline",
                *timed_command([sys.executable, __file__, "--naive-child", url, base], env),
            )
        )
        naive = emulator_stats(base)[1] - before - ours
    print(f"machine: {machine()}")
    print(f"| {args.change_pct:g}%-change rerun of {args.rows:,} rows | seconds | peak RSS MiB |")
    print("|---|---|---|")
    for label, seconds, rss in results:
        print(f"| {label} | {seconds:.2f} | {rss:.0f} |")
    print(f"\nbytes sent: cio-retl {ours:,}, naive {naive:,}")


if __name__ == "__main__":
    main()
