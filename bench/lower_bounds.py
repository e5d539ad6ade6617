"""The least this machine spends on the work a target times, beside the run it times.

    uv run python bench/lower_bounds.py --rows 1000000                     # 1M initial <= 3x floor
    uv run python bench/lower_bounds.py --rows 100000 --sdk-people 3000    # >= 100x the SDK
    uv run python bench/lower_bounds.py --rows 2000000 --reruns            # reruns <= 5% / 2%
    uv run python bench/lower_bounds.py --rows 10000000                    # 10M <= 60 s

Issue #18 asks each target be met or "shown to be bounded by something outside cio-retl
with the measurement that proves it". This script measures, on the same rows and in one
run, each part of the work an initial sync cannot skip, done the cheapest way we know with
the outside components alone (no cio-retl code), each in its own process:

- **imports**: ``python -c "import duckdb, duckdb_engine, sqlalchemy, httpx, orjson"``, the
  libraries every sync loads (timed by wait4);
- **payloads** (``floor.py``'s floor): DuckDB builds every item with ``json_object`` and
  Python joins them into 1000-item ``{"batch": [...]}`` bodies;
- **store**: DuckDB writes every row's snapshot (key, fingerprint, identifiers and attributes
  text, the JSON texts compressed by zstd), already built in an untimed setup, into a table
  in one statement and checkpoints it, at cio-retl's memory limit (one statement: cheaper than the 1-second transactions the
  contract asks for, so a lower figure than any sync can reach);
- **HTTP**: the same bodies, built in an untimed setup, posted by ``max_in_flight`` httpx
  clients to the emulator's fast path; the poster's CPU and the emulator's.

Each part's work is timed inside its process (wall, and CPU of all its threads), without the
interpreter's start-up and imports, which the **imports** part counts once. The parts are
CPU work on the same cores, so no sync can take less than

    bound = imports (wall) + max(sum of the parts' CPU / cores, the longest part's wall)

and a target figure below that bound cannot be met on this machine by any implementation
that uses these components. The sync itself (``python -m cio_retl sync``, initial) runs in
the same invocation, for the ratio of what is left to cio-retl.

``--sdk-people N`` also times the official SDK on N people (``vs_sdk.py``'s way) against
the same emulator: the target asks cio-retl's time for ``--rows`` people to be at most
1/100 of the SDK's. ``--reruns`` also times a no-change and a 1,000-change rerun, and the
no-change rerun's own floor: imports plus DuckDB's bare comparison of every model row's
hash with a snapshot of (key, 64-bit hash) in a FULL JOIN, that snapshot written in an
untimed setup (a cheaper snapshot than cio-retl's, whose fingerprint is text).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    API_KEY,
    CHECK_EVERY,
    REPO,
    SITE_ID,
    emulator_cpu,
    emulator_process,
    load_average,
    machine,
    people_database,
    sync_env,
    timed_run,
)
from floor import SNAPSHOT_COLUMNS, batch_bodies, item_sql, snapshot_texts
from vs_sdk import sdk_rate, sdk_sample

from cio_retl.dialects import DUCKDB_MEMORY_LIMIT
from cio_retl.options import SyncOptions

IMPORTS = "import duckdb, duckdb_engine, sqlalchemy, httpx, orjson"
SYNC = [sys.executable, "-m", "cio_retl", "sync"]
CHANGES = 1_000


class Part(NamedTuple):
    """One part's work, timed inside its process."""

    name: str
    wall: float
    cpu: float
    emulator_cpu: float = 0.0
    process_wall: float = 0.0  # the whole child process: start-up and imports too

    def __str__(self) -> str:
        emulator = f" + the emulator's {self.emulator_cpu:.2f} s" if self.emulator_cpu else ""
        return f"{self.name}: {self.wall:.2f} s wall, {self.cpu:.2f} s CPU{emulator}"


def _work(started_wall: float, started_cpu: float, *detail: object) -> None:
    """What a child prints last: its work's wall and CPU seconds (all threads)."""
    print(
        "WORK",
        f"{time.perf_counter() - started_wall:.4f}",
        f"{time.process_time() - started_cpu:.4f}",
        *detail,
    )


def payloads_child(path: str) -> None:
    import duckdb

    conn = duckdb.connect(path, read_only=True)
    wall, cpu = time.perf_counter(), time.process_time()
    cursor = conn.execute(item_sql(conn, "bench_people"))
    _work(wall, cpu, sum(n for n, _ in batch_bodies(cursor)))


def store_child(path: str) -> None:
    import duckdb

    conn = duckdb.connect(path)
    conn.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
    items = item_sql(conn, "bench_people")
    conn.execute(f"CREATE TABLE built AS {snapshot_texts(items)}")  # untimed: the texts
    conn.execute("CHECKPOINT")
    wall, cpu = time.perf_counter(), time.process_time()
    conn.execute(f"CREATE TABLE snapshots ({SNAPSHOT_COLUMNS})")
    conn.execute("INSERT INTO snapshots SELECT * FROM built")
    conn.execute("CHECKPOINT")
    _work(wall, cpu)


def http_child(path: str, base: str) -> None:
    import duckdb
    import httpx

    conn = duckdb.connect(path, read_only=True)
    cursor = conn.execute(item_sql(conn, "bench_people"))
    bodies = [body for _, body in batch_bodies(cursor)]  # the untimed setup: every body
    conn.close()
    senders = SyncOptions().max_in_flight
    clients = [
        httpx.Client(base_url=base, auth=(SITE_ID, API_KEY), timeout=60) for _ in range(senders)
    ]
    headers = {"Content-Type": "application/json"}

    def post(n: int) -> int:
        return (
            clients[n % senders]
            .post("/api/v2/batch", content=bodies[n], headers=headers)
            .status_code
        )

    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(senders) as pool:
        statuses = set(pool.map(post, range(len(bodies))))
    _work(wall, cpu, len(bodies))
    assert statuses == {200}, statuses


def join_child(path: str) -> None:
    """A no-change rerun's comparison, bare: every model row's hash against a snapshot of
    (key, 64-bit hash), in a FULL JOIN (a key on either side alone, or a hash unlike)."""
    import duckdb

    conn = duckdb.connect(path)
    conn.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
    conn.execute(
        "CREATE TABLE bare_snapshot AS SELECT user_id AS key, hash(m) AS fp FROM bench_people AS m"
    )
    conn.execute("CHECKPOINT")
    wall, cpu = time.perf_counter(), time.process_time()
    (moved,) = conn.execute(
        "SELECT count(*) FROM (SELECT user_id, hash(m) AS fp FROM bench_people AS m) AS f"
        " FULL JOIN bare_snapshot AS s ON s.key = f.user_id"
        " WHERE f.user_id IS NULL OR s.key IS NULL OR f.fp <> s.fp"
    ).fetchone()
    _work(wall, cpu, moved)
    assert moved == 0, moved


CHILDREN = {
    "payloads": payloads_child,
    "store": store_child,
    "http": http_child,
    "join": join_child,
}


def run_child(name: str, *args: str, base: str | None = None) -> Part:
    before = emulator_cpu(base) if base else 0.0
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", name, *args],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    process = time.perf_counter() - started
    wall, cpu = (float(v) for v in done.stdout.rpartition("WORK ")[2].split()[:2])
    return Part(name, wall, cpu, emulator_cpu(base) - before if base else 0.0, process)


def imports_part() -> Part:
    run = timed_run([sys.executable, "-c", IMPORTS], os.environ)
    return Part("imports", run.seconds, run.cpu_seconds)


def bound(imports: Part, parts: list[Part], cores: int) -> tuple[float, float]:
    """(the bound, the parts' CPU summed)."""
    cpu = sum(p.cpu + p.emulator_cpu for p in parts)
    return imports.wall + max(cpu / cores, max(p.wall for p in parts)), cpu


def sdk_seconds_per_person(base: str, path: Path, people: int) -> float:
    """The official SDK's seconds per ``identify`` (vs_sdk.py's way) on ``people`` rows."""
    return 1 / sdk_rate(base, sdk_sample(f"duckdb:///{path}", people))


def verdict(name: str, target: float, floor: float, measured: float) -> str:
    state = (
        "bounded: the target is below this machine's floor for the work"
        if floor > target
        else "not bounded: the floor is below the target"
    )
    return (
        f"| {name} | {target:.2f} s | {floor:.2f} s | {measured:.2f} s"
        f" ({measured / floor:.1f}x the floor) | {state} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sdk-people", type=int, default=0, help="also time the SDK on N people")
    parser.add_argument("--reruns", action="store_true", help="also time reruns and their floor")
    parser.add_argument("--check-every", type=int, default=CHECK_EVERY)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = args.child
        CHILDREN[name](*rest)  # type: ignore[operator]
        return
    cores = os.cpu_count() or 1
    print(f"machine: {machine()}; load average {load_average()}; {args.rows:,} rows")
    with tempfile.TemporaryDirectory(prefix="cio-bounds-") as tmp:
        folder = Path(tmp)
        pristine, models = people_database(folder, args.rows)
        with emulator_process(check_every=args.check_every) as base:
            imports = imports_part()
            parts = [run_child("payloads", str(pristine))]
            copy = folder / "store.duckdb"
            shutil.copy(pristine, copy)
            parts.append(run_child("store", str(copy)))
            copy.unlink()
            parts.append(run_child("http", str(pristine), base, base=base))
            floor, cpu = bound(imports, parts, cores)
            warehouse = folder / "sync.duckdb"
            shutil.copy(pristine, warehouse)
            env = sync_env(f"duckdb:///{warehouse}", models, base)
            before = emulator_cpu(base)
            sync = timed_run(SYNC, env)
            sync_emulator = emulator_cpu(base) - before
            sdk = (
                sdk_seconds_per_person(base, pristine, args.sdk_people) if args.sdk_people else None
            )
            reruns = []
            if args.reruns:
                reruns.append(("no-change rerun", timed_run(SYNC, env).seconds))
                changer = sa.create_engine(f"duckdb:///{warehouse}")
                with changer.begin() as conn:
                    conn.execute(
                        sa.text(
                            f"UPDATE main.bench_people SET a2 = 'changed' WHERE rowid < {CHANGES}"
                        )
                    )
                changer.dispose()
                reruns.append((f"{CHANGES:,}-change rerun", timed_run(SYNC, env).seconds))
                copy = folder / "join.duckdb"
                shutil.copy(pristine, copy)
                join = run_child("join", str(copy))
                copy.unlink()
        for part in (imports, *parts):
            print(f"  {part}")
        print(
            f"  the parts' CPU together: {cpu:.2f} s on {cores} cores; the bound: imports"
            f" {imports.wall:.2f} s + max({cpu:.2f} / {cores}, longest part"
            f" {max(p.wall for p in parts):.2f} s) = {floor:.2f} s"
        )
        print(
            f"  cio-retl initial sync: {sync.seconds:.2f} s wall, {sync.cpu_seconds:.2f} s CPU"
            f" + the emulator's {sync_emulator:.2f} s; {sync.seconds / floor:.1f}x the bound"
        )
        print("\n| target | its figure | this machine's floor | cio-retl | verdict |")
        print("|---|---|---|---|---|")
        payload = parts[0]
        print(
            verdict(
                f"initial sync of {args.rows:,} <= 3x the payload floor (its whole process,"
                f" as floor.py times it: {payload.process_wall:.2f} s)",
                3 * payload.process_wall,
                floor,
                sync.seconds,
            )
        )
        if args.rows >= 10_000_000:
            print(verdict(f"initial sync of {args.rows:,} <= 60 s", 60.0, floor, sync.seconds))
        if sdk is not None:
            print(
                verdict(
                    f">= 100x the SDK ({sdk * 1e6:.0f} us a person, {args.sdk_people:,} timed):"
                    f" {args.rows:,} people",
                    args.rows * sdk / 100,
                    floor,
                    sync.seconds,
                )
            )
        if reruns:
            print(f"  no-change rerun's floor: imports {imports.wall:.2f} s + {join}")
            rerun_floor = imports.wall + join.wall
            for (label, seconds), share in zip(reruns, (0.02, 0.05), strict=True):
                print(
                    verdict(
                        f"{label} <= {share:.0%} of the initial sync ({sync.seconds:.2f} s)",
                        share * sync.seconds,
                        rerun_floor,
                        seconds,
                    )
                )


if __name__ == "__main__":
    main()
