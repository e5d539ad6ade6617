"""Scale-out: one model planned and sent in hash buckets by several workers, on PostgreSQL.

What issue #9 asks to see, on a scaled-down model whose figures extrapolate to 10^8 rows:

1. **Time and memory per bucket.** A whole-model ``cio-retl plan`` and one ``plan --bucket
   i/N`` per bucket, each a process timed by wait4 (wall, CPU, peak RSS), on a model whose
   snapshot holds every row (acknowledged earlier) and ``--change-pct`` of whose rows changed.
2. **The send, paced at the workspace limit.** ``--workers`` lanes run ``cio-retl sync
   --bucket i/N`` one bucket after another (as Dagster runs bucket runs under
   max_concurrent_runs), all drawing from one shared rate budget in the state store. The
   emulator, in its own process, enforces ``--rate-limit`` (a scaled-down 3000/3 s, so a
   short run meets it) and logs each request's arrival; we report the busiest window, the
   pace over the send and any 429. Afterwards a whole-model plan must find nothing to send.
3. **The budget's capacity.** Greedy processes x threads on one budget with a limit far above
   what they can take: grants per second, the most the shared budget can pace.

    uv run python bench/scale_out.py --rows 1000000 --buckets 16 --workers 4

Needs PostgreSQL at 127.0.0.1:5432 (database ``test``); schemas ``scale_<pid>`` are dropped
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Timed, emulator_process, machine, sync_env, timed_run
from sync_scale import MODEL, create_table, seed_snapshot

from cio_retl.emulator import most_in_window
from cio_retl.ratelimit import RateSpec

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

_GREEDY = """
import sys, threading, time
from cio_retl.ratelimit import RateSpec
from cio_retl.state.budget import SharedRateBudget
from cio_retl.state import StateStore
from cio_retl.warehouse import create_engine
url, schema, threads, start, seconds = sys.argv[1:6]
state = StateStore(create_engine(url), schema)
budget = SharedRateBudget(state, "capacity", RateSpec(10_000_000, 1))
counts = []
def greedy():
    n = 0
    while time.time() < float(start):
        time.sleep(0.001)
    while time.time() < float(start) + float(seconds):
        budget.acquire()
        n += 1
    counts.append(n)
workers = [threading.Thread(target=greedy) for _ in range(int(threads))]
for w in workers: w.start()
for w in workers: w.join()
print(sum(counts))
"""


def env_for(models: Path, schema: str, base: str, limit: str, budget: str) -> dict[str, str]:
    return {
        **sync_env(URL, models, base),
        "CIO_RETL_STATE_SCHEMA": f"{schema}_state",
        "CIO_RETL_RATE_LIMIT": limit,
        "CIO_RETL_RATE_BUDGET": budget,
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cio_retl", *args]


def plans(env: dict[str, str], buckets: int) -> tuple[Timed, list[Timed]]:
    whole = timed_run(cli("plan", "bench_people"), env)
    print(
        f"  whole model:  {whole.seconds:6.2f} s wall {whole.cpu_seconds:6.2f} s CPU"
        f" {whole.rss_mib:5.0f} MiB",
        flush=True,
    )
    per_bucket = []
    for i in range(buckets):
        timed = timed_run(cli("plan", "bench_people", "--bucket", f"{i}/{buckets}"), env)
        per_bucket.append(timed)
        print(
            f"  bucket {i:2}/{buckets}: {timed.seconds:6.2f} s wall {timed.cpu_seconds:6.2f}"
            f" s CPU {timed.rss_mib:5.0f} MiB",
            flush=True,
        )
    return whole, per_bucket


def paced_send(
    env: dict[str, str], buckets: int, workers: int, batch: int
) -> tuple[list[Timed], float]:
    """``workers`` lanes, each syncing its share of buckets one after another."""
    timings: list[Timed] = []
    lock = threading.Lock()

    def lane(w: int) -> None:
        for i in range(w, buckets, workers):
            args = cli(
                "sync", "bench_people", "--bucket", f"{i}/{buckets}", "--batch-size", str(batch)
            )
            timed = timed_run(args, env)
            with lock:
                timings.append(timed)

    started = time.perf_counter()
    lanes = [threading.Thread(target=lane, args=(w,)) for w in range(workers)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    return timings, time.perf_counter() - started


def capacity(schema: str, processes: int, threads: int, seconds: float = 3.0) -> float:
    start = time.time() + 2.0  # every process connected before the clock starts
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _GREEDY,
                URL,
                f"{schema}_state",
                str(threads),
                str(start),
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    total = sum(int(p.communicate()[0].strip()) for p in procs)
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--change-pct", type=float, default=1.0)
    parser.add_argument("--rate-limit", default="300/3", help="the emulator's (scaled down)")
    parser.add_argument("--batch-size", type=int, default=10, help="items per request")
    parser.add_argument("--plan-only", action="store_true", help="skip the send and capacity")
    args = parser.parse_args()
    limit = RateSpec.parse(args.rate_limit)

    schema = f"scale_{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="cio-retl-scale-"))
    models = workdir / "sql"
    models.mkdir()
    (models / "bench_people.sql").write_text(MODEL.format(schema=schema))
    engine = sa.create_engine(URL)
    print(
        f"# scale_out: {args.rows:,} rows, {args.buckets} buckets, {args.workers} workers,"
        f" {args.change_pct}% changed; {machine()}; load {os.getloadavg()[0]:.1f}"
    )
    results: dict[str, object] = {
        "rows": args.rows,
        "buckets": args.buckets,
        "workers": args.workers,
    }
    try:
        t = time.perf_counter()
        create_table(engine, schema, args.rows)
        seed_snapshot(URL, models, f"{schema}_state")
        every = max(1, round(100 / args.change_pct))
        with engine.begin() as conn:
            changed = conn.execute(
                sa.text(
                    f"UPDATE {schema}.bench_people SET score = score + 1"
                    f" WHERE CAST(substr(user_id, 2) AS INT) % {every} = 0"
                )
            ).rowcount
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f"VACUUM ANALYZE {schema}.bench_people"))
            conn.execute(sa.text(f"VACUUM ANALYZE {schema}_state.snapshots"))
        print(
            f"setup: {args.rows:,} rows + snapshot, {changed:,} changed,"
            f" {time.perf_counter() - t:.1f} s"
        )

        print("1. plan (dry run: diff in SQL + changed rows through Python):")
        with emulator_process(args.rate_limit) as base:
            env = env_for(models, schema, base, args.rate_limit, "shared")
            whole, per_bucket = plans(env, args.buckets)
            results.update(
                changed=changed,
                whole_plan={k: v for k, v in whole._asdict().items() if k != "output"},
                bucket_plan_median_s=statistics.median(p.seconds for p in per_bucket),
                bucket_plan_median_cpu_s=statistics.median(p.cpu_seconds for p in per_bucket),
                bucket_plan_max_rss_mib=max(p.rss_mib for p in per_bucket),
            )
            if args.plan_only:
                print(json.dumps(results))
                return

            print(
                f"2. send: {args.workers} workers, {args.buckets} bucket runs, shared budget,"
                f" emulator limit {args.rate_limit}:"
            )
            runs, wall = paced_send(env, args.buckets, args.workers, args.batch_size)
            log = httpx.get(f"{base}/_emulator/requests", timeout=60).json()
        writes = [r for r in log if r["method"] == "POST"]
        ok = [r for r in writes if r["status"] != 429]
        arrivals = [r["timestamp"] for r in ok]
        items = sum(r["n_items"] for r in ok)
        span = max(arrivals) - min(arrivals) if arrivals else 0.0
        most = most_in_window(arrivals, limit.window)
        print(
            f"  {len(ok)} requests, {items:,} items, {len(writes) - len(ok)} refused (429)"
            f" in {wall:.1f} s; send span {span:.1f} s = {len(ok) / span:.1f} req/s"
            f" (limit {limit.requests / limit.window:.1f}/s); busiest {limit.window:g} s"
            f" window {most} of {limit.requests:g}"
        )
        first = min(arrivals, default=0.0)
        windows = [0] * (int(span // limit.window) + 1)
        for moment in arrivals:
            windows[int((moment - first) // limit.window)] += 1
        print(f"  requests per {limit.window:g} s window, in order: {windows}")
        print(
            f"  per bucket run: median {statistics.median(r.seconds for r in runs):.2f} s wall,"
            f" max RSS {max(r.rss_mib for r in runs):.0f} MiB"
        )
        env = env_for(models, schema, "http://127.0.0.1:9", args.rate_limit, "local")
        after = subprocess.run(
            cli("plan", "bench_people"), env=env, capture_output=True, text=True, check=True
        ).stdout
        print("  whole-model plan afterwards:\n" + after)

        print("3. shared budget capacity (grants/s, greedy, no limit reached):")
        cap = {}
        for processes, threads in ((1, 1), (1, 4), (4, 4)):
            cap[f"{processes}x{threads}"] = rate = capacity(schema, processes, threads)
            print(
                f"  {processes} process(es) x {threads} thread(s): {rate:,.0f} grants/s", flush=True
            )

        results.update(
            send_requests=len(ok),
            send_items=items,
            send_refused=len(writes) - len(ok),
            send_span_s=span,
            send_wall_s=wall,
            busiest_window=most,
            windows=windows,
            limit=args.rate_limit,
            sync_max_rss_mib=max(r.rss_mib for r in runs),
            capacity=cap,
            load=os.getloadavg()[0],
        )
        print(json.dumps(results))
    finally:
        with engine.begin() as conn:
            for name in (schema, f"{schema}_state"):
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        engine.dispose()


if __name__ == "__main__":
    main()
