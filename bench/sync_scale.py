"""Initial sync, no-change rerun and N-change rerun of one person model, with peak RSS.

    uv run python bench/sync_scale.py --rows 100000 [--warehouse duckdb|postgres]
        [--changes 1000 | --change-pct 1] [--diff-only] [--duckdb-settings memory_limit=2GB]

Each sync runs as its own `python -m cio_retl sync` process, so its wall time and peak RSS
(from wait4) are the product's, not this script's. The emulator runs in another process with
request bodies not recorded, so it neither shares the GIL with the sync nor grows in memory.

``--diff-only`` times the no-change diff alone (no HTTP): the snapshot of every row is
written in SQL as if a sync had acknowledged it, then a child process runs the run's counting
pass (what decides that nothing is to be sent) and the upsert diff, and reports its peak RSS.
Postgres runs use their own schemas (bench_<pid>, and a state schema beside it), dropped
after, so they never touch another developer's `cio_retl` schema.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emulator_cpu, emulator_process, machine, sync_env, timed_run

SYNC = [sys.executable, "-m", "cio_retl", "sync"]

MODEL = """-- Benchmark people: 8 attributes of the usual types.
-- kind: person
-- identifier: id
-- key: user_id
select user_id, email, first_name, plan, score, lifetime_value, is_active, created_at, city
from {schema}.bench_people
"""


def create_table(engine: sa.Engine, schema: str, rows: int) -> None:
    postgres = engine.dialect.name == "postgresql"
    series = f"generate_series(0, {rows - 1}) AS r(i)" if postgres else f"range({rows}) AS r(i)"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {schema}.bench_people"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.bench_people AS SELECT"
                " 'u' || i AS user_id, 'user' || i || '@example.com' AS email,"
                " 'Name' || (i % 1000) AS first_name, 'plan' || (i % 4) AS plan,"
                " i % 100 AS score, CAST(i * 1.25 AS DECIMAL(14, 2)) AS lifetime_value,"
                " i % 2 = 0 AS is_active,"
                " TIMESTAMP '2024-01-01 00:00:00' + i * INTERVAL '1 second' AS created_at,"
                " 'City' || (i % 500) AS city"
                f" FROM {series}"
            )
        )


DIFF_WORKER = """
import resource, sys, time
from pathlib import Path
from cio_retl.diff import PushDownDiff
from cio_retl.models import load_models
from cio_retl.state import StateStore
from cio_retl.warehouse import Warehouse, create_engine
url, models_dir, state_schema = sys.argv[1:4]
engine = create_engine(url)
warehouse, state = Warehouse(engine), StateStore(engine, state_schema)
[model] = load_models(Path(models_dir))
differ = PushDownDiff(warehouse, state)
started = time.perf_counter()
counts = differ.count(model)
counted = time.perf_counter() - started
upserts = sum(1 for _ in differ.upserts(model))
total = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT", counted, total, rss, counts.rows, counts.changed + counts.new, upserts)
"""


def seed_snapshot(url: str, models_dir: Path, state_schema: str) -> None:
    """Write every row's snapshot in SQL, as an acknowledged sync would have (values aside)."""
    from cio_retl.models import load_models
    from cio_retl.state import StateStore
    from cio_retl.warehouse import Warehouse, create_engine, model_sql

    engine = create_engine(url)
    warehouse, state = Warehouse(engine), StateStore(engine, state_schema)
    state.ensure_schema()
    [model] = load_models(models_dir)
    d = warehouse.dialect
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {state.snapshots} SELECT :model, {d.key_expression(model, 'm')},"
                f" {warehouse.fingerprint(model, 'm')}, 'h', '{{}}', '{{}}', 'seed', :now"
                f" FROM ({model_sql(model)}) AS m"
            ),
            {"model": model.name, "now": dt.datetime.now(dt.UTC)},
        )
    engine.dispose()


def diff_only(url: str, models_dir: Path, state_schema: str) -> list[tuple[str, float, float]]:
    seed_snapshot(url, models_dir, state_schema)
    runs = []
    for attempt in (1, 2):
        out = (
            subprocess.run(
                [sys.executable, "-c", DIFF_WORKER, url, str(models_dir), state_schema],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.rpartition("RESULT")[2]
            .split()
        )
        counted, total, rss = (float(v) for v in out[:3])
        rows, to_send, upserts = (int(v) for v in out[3:])
        assert to_send == 0 and upserts == 0, out
        runs.append((f"no-change diff #{attempt}: count pass ({rows:,} rows)", counted, rss))
        runs.append((f"no-change diff #{attempt}: count + upsert diff", total, rss))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--warehouse", choices=("duckdb", "postgres"), default="duckdb")
    parser.add_argument("--change-pct", type=float, default=1.0)
    parser.add_argument("--changes", type=int, help="change exactly this many rows instead")
    parser.add_argument("--diff-only", action="store_true", help="time the no-change diff alone")
    parser.add_argument(
        "--duckdb-settings",
        default="",
        help="URL query of DuckDB settings, e.g. memory_limit=2GB (default: cio-retl's own)",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cio-retl-bench-"))
    state_schema = "cio_retl"
    if args.warehouse == "duckdb":
        url, schema = f"duckdb:///{workdir / 'bench.duckdb'}", "main"
        if args.duckdb_settings:
            url += f"?{args.duckdb_settings}"
    else:
        url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        schema, state_schema = f"bench_{os.getpid()}", f"bench_{os.getpid()}_state"
    (workdir / "sql").mkdir()
    (workdir / "sql" / "bench_people.sql").write_text(MODEL.format(schema=schema))

    engine = sa.create_engine(url)
    t = time.perf_counter()
    create_table(engine, schema, args.rows)
    engine.dispose()
    print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f}s ({args.warehouse})")
    try:
        if args.diff_only:
            results = diff_only(url, workdir / "sql", state_schema)
            initial = None
        else:
            results, initial = syncs(args, url, schema, state_schema, workdir)
    finally:
        if args.warehouse == "postgres":
            engine = sa.create_engine(url)
            with engine.begin() as conn:
                for name in (schema, state_schema):
                    conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            engine.dispose()
    report(args, results, initial)


def syncs(
    args: argparse.Namespace, url: str, schema: str, state_schema: str, workdir: Path
) -> tuple[list[tuple[str, float, float, float, float]], float]:

    with emulator_process() as base:
        env = {**sync_env(url, workdir / "sql", base), "CIO_RETL_STATE_SCHEMA": state_schema}
        results: list[tuple[str, float, float, float, float]] = []

        def timed(label: str) -> None:
            before = emulator_cpu(base)
            run = timed_run(SYNC, env)
            results.append(
                (label, run.seconds, run.rss_mib, run.cpu_seconds, emulator_cpu(base) - before)
            )

        timed("initial sync")
        initial = results[0][1]
        timed("no-change rerun")
        engine = sa.create_engine(url)
        if args.changes:
            # user_id is 'u' || i: change the rows i < N, spread nowhere special.
            where = f"CAST(substr(user_id, 2) AS BIGINT) < {args.changes}"
            label = f"{args.changes:,}-change rerun"
        else:
            where = f"score % {round(100 / args.change_pct)} = 0"
            label = f"{args.change_pct:g}%-change rerun"
        with engine.begin() as conn:
            changed = conn.execute(
                sa.text(f"UPDATE {schema}.bench_people SET plan = 'changed' WHERE {where}")
            ).rowcount
        engine.dispose()
        timed(f"{label} ({changed:,} rows)")
    return results, initial


def report(
    args: argparse.Namespace, results: Sequence[tuple[Any, ...]], initial: float | None
) -> None:
    print(f"\nmachine: {machine()}")
    if args.warehouse == "duckdb":
        print(f"DuckDB settings: {args.duckdb_settings or 'cio-retl defaults'}")
    print(
        "| run | seconds | rows/s | vs initial | peak RSS MiB | sync CPU s | emulator CPU s |"
        "\n|---|---|---|---|---|---|---|"
    )
    for label, seconds, peak, *cpu in results:
        share = f"{seconds / initial:.1%}" if initial else "-"
        cpus = " | ".join(f"{c:.2f}" for c in cpu) if cpu else "- | -"
        print(
            f"| {args.warehouse} {args.rows:,}: {label} | {seconds:.2f} | "
            f"{args.rows / seconds:,.0f} | {share} | {peak:.0f} | {cpus} |"
        )


if __name__ == "__main__":
    main()
