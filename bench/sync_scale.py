"""Initial sync, no-change rerun and 1%-change rerun of one person model, with peak RSS.

    uv run python bench/sync_scale.py --rows 100000 [--warehouse duckdb|postgres]

Each sync runs as its own `python -m cio_retl sync` process, so its wall time and peak RSS
(from wait4) are the product's, not this script's. The emulator runs in another process with
request bodies not recorded, so it neither shares the GIL with the sync nor grows in memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
SITE_ID, API_KEY = "bench-site", "bench-key"

EMULATOR = """
import sys, threading
from cio_retl.emulator import Emulator
emu = Emulator(site_id=sys.argv[1], api_key=sys.argv[2], port=int(sys.argv[3]), record_bodies=False)
emu.start()
threading.Event().wait()
"""

MODEL = """-- Benchmark people: 8 attributes of the usual types.
-- kind: person
-- identifier: id
-- key: user_id
select user_id, email, first_name, plan, score, lifetime_value, is_active, created_at, city
from {schema}.bench_people
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def timed_sync(env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MiB) of one `cio-retl sync` process."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cio_retl", "sync"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    output = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sync failed:\n{output}")
    return elapsed, usage.ru_maxrss / 1024, output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--warehouse", choices=("duckdb", "postgres"), default="duckdb")
    parser.add_argument("--change-pct", type=float, default=1.0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cio-retl-bench-"))
    if args.warehouse == "duckdb":
        url, schema = f"duckdb:///{workdir / 'bench.duckdb'}", "main"
    else:
        url, schema = "postgresql+psycopg://postgres@127.0.0.1:5432/test", "bench"
    (workdir / "sql").mkdir()
    (workdir / "sql" / "bench_people.sql").write_text(MODEL.format(schema=schema))

    engine = sa.create_engine(url)
    if args.warehouse == "postgres":
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA IF EXISTS cio_retl CASCADE"))
    t = time.perf_counter()
    create_table(engine, schema, args.rows)
    engine.dispose()
    print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f}s ({args.warehouse})")

    port = free_port()
    emulator = subprocess.Popen([sys.executable, "-c", EMULATOR, SITE_ID, API_KEY, str(port)])
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(f"{base}/_emulator/requests", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        env = {
            **os.environ,
            "CIO_RETL_WAREHOUSE_URL": url,
            "CIO_RETL_MODELS_DIR": str(workdir / "sql"),
            "CIO_TRACK_API_URL": base,
            "CIO_SITE_ID": SITE_ID,
            "CIO_API_KEY": API_KEY,
        }
        results = []
        initial, rss, _ = timed_sync(env)
        results.append(("initial sync", initial, rss))
        results.append(("no-change rerun", *timed_sync(env)[:2]))
        engine = sa.create_engine(url)
        modulo = round(100 / args.change_pct)
        with engine.begin() as conn:
            changed = conn.execute(
                sa.text(
                    f"UPDATE {schema}.bench_people SET plan = 'changed' WHERE score % {modulo} = 0"
                )
            ).rowcount
        engine.dispose()
        results.append(
            (f"{args.change_pct:g}%-change rerun ({changed:,} rows)", *timed_sync(env)[:2])
        )
    finally:
        emulator.terminate()
        emulator.wait()

    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print("| run | seconds | rows/s | vs initial | peak RSS MiB |\n|---|---|---|---|---|")
    for label, seconds, peak in results:
        print(
            f"| {label} | {seconds:.2f} | {args.rows / seconds:,.0f} | "
            f"{seconds / initial:.1%} | {peak:.0f} |"
        )


if __name__ == "__main__":
    main()
