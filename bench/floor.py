"""The machine's floor beside cio-retl's initial sync, and engine passes per Dagster run.

    uv run python bench/floor.py --rows 1000000 [--repeats 2] [--check-every 50]

1. **Floor**: DuckDB builds the JSON item of every person of ``bench_people`` (user_id plus
   8 attributes) with ``json_object(...)``, in the shape cio-retl sends (type, action,
   identifiers, attributes with the identifier copied in; timestamps as Unix seconds,
   decimals as numbers), and Python joins them into 1000-item ``{"batch": [...]}`` bodies.
   No HTTP, no state, no diff: what the machine needs to produce the bytes at all.
   Beside it the **store floor**: DuckDB writes the same rows' snapshots (the state a sync
   must keep of what Customer.io acknowledged) into a table once and checkpoints it.
2. **SQL payload path**: the same rows through ``cio_retl.payload_sql`` (items, snapshot text
   and rejections built by DuckDB), joined into bodies: what an initial sync's plan builds
   for Python to join (the sync adds the plan's join with the snapshot, the plan table, the
   HTTP requests and the snapshot writes).
3. **cio-retl**: ``python -m cio_retl sync`` of the same table, initial (empty state),
   against the emulator's fast path (``check_every``: only every Nth body validated and
   applied), so the emulator is not what is measured; its capacity, measured in the same
   run right after the sync, is printed beside the figure.
4. **Engine passes per Dagster materialization**: one ``materialize()`` of the model's asset
   (``build_customerio_defs``), counting the engine's counting passes (one per plan of a
   model) and upsert scans (each one reads, normalizes and encodes the changed rows) by
   a SQLAlchemy ``before_cursor_execute`` listener; beside it the same counts for one
   ``cio-retl sync``. Target: 1 plan per materialization.

Each measured command is its own process, timed by ``wait4`` (wall, CPU, peak RSS), floor
and sync alike, so both include interpreter start-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cio_retl.dialects import DUCKDB_MEMORY_LIMIT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    emulator_capacity,
    emulator_cpu,
    emulator_process,
    emulator_stats,
    load_average,
    machine,
    people_database,
    people_table,
    person_model,
    sync_env,
    timed_run,
)

BATCH_ITEMS = 1000


def item_sql(conn: Any, table: str) -> str:
    """One row's item as JSON text, built by DuckDB, normalized as cio-retl normalizes."""
    columns = conn.execute(f"DESCRIBE {table}").fetchall()
    attributes = []
    for name, type_name, *_ in columns:
        if name == "user_id":
            continue
        if type_name.startswith("TIMESTAMP"):
            value = f"(epoch_us({name}) - ((epoch_us({name}) % 1000000 + 1000000) % 1000000)) // 1000000"
        elif type_name.startswith("DECIMAL"):
            value = f"CAST({name} AS DOUBLE)"
        else:
            value = name
        attributes.append(f"'{name}', {value}")
    attributes.append("'id', user_id")
    return (
        "SELECT CAST(json_object('type', 'person', 'action', 'identify',"
        " 'identifiers', json_object('id', user_id),"
        f" 'attributes', json_object({', '.join(attributes)})) AS VARCHAR) FROM {table}"
    )


def join_bodies(cursor: Any, started: float) -> str:
    """Join the first column of ``cursor``'s rows into 1000-item batch bodies, as the sync
    does; "items bodies bytes seconds" for :func:`main` to read."""
    bodies = n_bytes = items = 0
    for n, body in batch_bodies(cursor):
        bodies += 1
        items += n
        n_bytes += len(body)
    return f"{items} {bodies} {n_bytes} {time.perf_counter() - started:.3f}"


def batch_bodies(cursor: Any) -> Iterator[tuple[int, bytes]]:
    """(items, body) of each 1000-item ``{"batch": [...]}`` body joined from the first
    column of ``cursor``'s rows."""
    while rows := cursor.fetchmany(BATCH_ITEMS):
        yield len(rows), ('{"batch":[' + ",".join(row[0] for row in rows) + "]}").encode()


# The store floors' snapshot table: its JSON texts compressed by zstd, as cio-retl's own
# snapshot table declares them (the cheapest way measured, bench/README.md, "zstd").
SNAPSHOT_COLUMNS = (
    "key VARCHAR, fingerprint VARCHAR, identifiers VARCHAR USING COMPRESSION zstd,"
    " attributes VARCHAR USING COMPRESSION zstd"
)


def snapshot_texts(items: str) -> str:
    """A SELECT of every item's snapshot (key, fingerprint, identifiers and attributes text)
    from the query ``items`` of item JSON."""
    return (
        "SELECT i->>'$.identifiers.id' AS key, CAST(hash(i) AS VARCHAR) AS fingerprint,"
        " CAST(i->'$.identifiers' AS VARCHAR) AS identifiers,"
        f" CAST(i->'$.attributes' AS VARCHAR) AS attributes FROM ({items}) AS q(i)"
    )


def floor_child(path: str) -> None:
    """The floor itself (run as its own process by :func:`main`)."""
    import duckdb

    started = time.perf_counter()
    conn = duckdb.connect(path, read_only=True)
    cursor = conn.execute(item_sql(conn, "bench_people"))
    print(join_bodies(cursor, started))


def store_child(path: str) -> None:
    """What keeping the state costs at the least: DuckDB, under cio-retl's default memory
    limit, writes every row's snapshot (key, fingerprint, identifiers and attributes text)
    into a table of a database file once, in one statement, and
    checkpoints it; cio-retl must do this much after Customer.io acknowledged the rows,
    and the floor above does none of it."""
    import duckdb

    started = time.perf_counter()
    conn = duckdb.connect(path)
    conn.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
    items = item_sql(conn, "bench_people")
    conn.execute(f"CREATE TABLE floor_snapshots ({SNAPSHOT_COLUMNS})")
    conn.execute(f"INSERT INTO floor_snapshots {snapshot_texts(items)}")
    conn.execute("CHECKPOINT")
    rows = conn.execute("SELECT count(*) FROM floor_snapshots").fetchone()
    conn.close()
    print(f"{rows[0] if rows else 0} {time.perf_counter() - started:.3f}")


def payload_child(path: str) -> None:
    """cio_retl.payload_sql's items and snapshots for every row, joined into bodies: what a
    switched initial sync would leave to Python (no diff, no HTTP, no state writes)."""
    import duckdb

    from cio_retl.models import parse_model
    from cio_retl.payload_sql import Column, column_kind, payload_select

    started = time.perf_counter()
    conn = duckdb.connect(path, read_only=True)
    columns = []
    for name, type_name, *_ in conn.execute("DESCRIBE bench_people").fetchall():
        kind = column_kind("duckdb", type_name)
        assert kind is not None, f"{name}: {type_name} has no SQL payload"
        columns.append(Column(name, kind))
    model = parse_model(
        Path("bench_people.sql"),
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect * from bench_people\n",
    )
    sql = payload_select("duckdb", model, columns, "SELECT * FROM bench_people")
    cursor = conn.execute(f"SELECT item, snapshot FROM ({sql}) AS p WHERE reject_code IS NULL")
    print(join_bodies(cursor, started))


def dagster_passes(folder: Path, rows: int) -> None:
    """Plans and upsert scans in one sync run and in one Dagster materialization."""
    import dagster as dg

    from cio_retl.config import Settings
    from cio_retl.passes import counted_passes
    from cio_retl.sync import SyncOptions, run_sync
    from dagster_cio_retl import build_customerio_defs

    with counted_passes() as counts, emulator_process() as base:
        for name, label in (("cli.duckdb", "cio-retl sync (run_sync)"), ("dg.duckdb", "")):
            url = f"duckdb:///{folder / name}"
            engine = sa.create_engine(url)
            people_table(engine, rows)
            engine.dispose()
            models = person_model(folder / "models")
            os.environ.update(sync_env(url, models, base))
            before = dict(counts)
            if label:
                run_sync(Settings.from_env(), None, SyncOptions())
            else:
                label = "one Dagster materialize()"
                defs = build_customerio_defs(
                    models,
                    warehouse_url=dg.EnvVar("CIO_RETL_WAREHOUSE_URL"),
                    site_id=dg.EnvVar("CIO_SITE_ID"),
                    api_key=dg.EnvVar("CIO_API_KEY"),
                    track_api_url=base,
                    root=folder,
                )
                job = defs.resolve_implicit_global_asset_job_def()
                quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
                assert job.execute_in_process(run_config=quiet).success
            sent = emulator_stats(base)
            done = {k: counts[k] - before[k] for k in counts}
            print(
                f"{label}: {done['plans']} plan(s) of the model, {done['upsert scans']} upsert"
                f" scan(s) ({rows:,} rows, {sent[0]} requests so far)"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--dagster-rows", type=int, default=2_000, help="0: skip part 3")
    parser.add_argument("--floor-child", help=argparse.SUPPRESS)
    parser.add_argument("--store-child", help=argparse.SUPPRESS)
    parser.add_argument("--payload-child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the sync under py-spy (every thread, native frames off) into FILE as"
        " collapsed stacks; the sync's figures then include py-spy's sampling cost",
    )
    parser.add_argument(
        "--sync-url-query",
        default="",
        metavar="QUERY",
        help="appended to the sync's DuckDB URL, e.g. memory_limit=1GB (cio-retl's default is"
        " 128MB): what the plan table costs under DuckDB's memory limit",
    )
    args = parser.parse_args()
    if args.store_child:
        store_child(args.store_child)
        return
    if args.floor_child:
        floor_child(args.floor_child)
        return
    if args.payload_child:
        payload_child(args.payload_child)
        return

    print(f"machine: {machine()}; load average {load_average()}")
    with tempfile.TemporaryDirectory(prefix="cio-floor-") as tmp:
        folder = Path(tmp)
        pristine, models = people_database(folder, args.rows)
        for repeat in range(args.repeats):
            floor = timed_run(
                [sys.executable, str(Path(__file__)), "--floor-child", str(pristine)], os.environ
            )
            payload = timed_run(
                [sys.executable, str(Path(__file__)), "--payload-child", str(pristine)],
                os.environ,
            )
            payload_items, _, payload_bytes, payload_work = payload.output.split()[-4:]
            *_, floor_bytes, floor_work_text = floor.output.split()
            floor_work = float(floor_work_text)  # without interpreter start-up
            stored = folder / f"store{repeat}.duckdb"
            shutil.copy(pristine, stored)
            store = timed_run(
                [sys.executable, str(Path(__file__)), "--store-child", str(stored)], os.environ
            )
            stored.unlink()
            store_rows, store_work = store.output.split()[-2:]
            warehouse = folder / f"sync{repeat}.duckdb"
            shutil.copy(pristine, warehouse)  # an empty state each time: an initial sync
            with emulator_process(check_every=args.check_every) as base:
                cpu_before = emulator_cpu(base)
                command = [sys.executable, "-m", "cio_retl", "sync"]
                if args.profile:
                    spy = shutil.which("py-spy")
                    assert spy, "--profile needs py-spy (the dev group has it)"
                    out = f"{args.profile}.{repeat + 1}" if args.repeats > 1 else args.profile
                    command = [spy, "record", "-r", "200", "-f", "raw", "-o", out, "--", *command]
                sync = timed_run(
                    command,
                    sync_env(
                        f"duckdb:///{warehouse}"
                        + (f"?{args.sync_url_query}" if args.sync_url_query else ""),
                        models,
                        base,
                    ),
                )
                sync_emulator_cpu = emulator_cpu(base) - cpu_before
                requests, sent_bytes = emulator_stats(base)
                capacity = emulator_capacity(base)
            warehouse.unlink()
            print(
                f"[{repeat + 1}] load {load_average()}\n"
                f"  floor (DuckDB json_object + Python join, {args.rows:,} items): "
                f"{floor.seconds:.2f} s wall, {floor.cpu_seconds:.2f} s CPU, "
                f"{floor.rss_mib:.0f} MiB; {args.rows / floor.seconds:,.0f} items/s"
                f" ({floor_work:.2f} s of it the query and the join; {int(floor_bytes):,} bytes)\n"
                f"  SQL payload path (cio_retl.payload_sql + Python join, {int(payload_items):,}"
                f" items): {payload.seconds:.2f} s wall, {payload.cpu_seconds:.2f} s CPU,"
                f" {payload.rss_mib:.0f} MiB ({float(payload_work):.2f} s of it the query and"
                f" the join; {int(payload_bytes):,} bytes); {payload.seconds / floor.seconds:.1f}x"
                " the floor\n"
                f"  store floor (DuckDB writes {int(store_rows):,} snapshot rows once, one"
                f" statement, and checkpoints; {DUCKDB_MEMORY_LIMIT}): {store.seconds:.2f} s"
                f" wall, {store.cpu_seconds:.2f} s CPU ({float(store_work):.2f} s of it the"
                " statement and the checkpoint)\n"
                f"  cio-retl initial sync: {sync.seconds:.2f} s wall, {sync.cpu_seconds:.2f} s"
                f" CPU, {sync.rss_mib:.0f} MiB; {args.rows / sync.seconds:,.0f} items/s"
                f" ({requests} requests, {sent_bytes:,} bytes; emulator CPU"
                f" {sync_emulator_cpu:.2f} s)\n"
                f"  emulator capacity (check_every={args.check_every}, 2 senders, same run):"
                f" {capacity.items_per_second:,.0f} items/s,"
                f" {capacity.cpu_us_per_item:.1f} us CPU per item\n"
                f"  ratio sync / floor: {sync.seconds / floor.seconds:.1f}x wall,"
                f" {sync.cpu_seconds / floor.cpu_seconds:.1f}x CPU (target <= 3x)\n"
                "  ratio sync / (floor + store floor's statement and checkpoint, so one"
                f" interpreter start-up): {sync.seconds / (floor.seconds + float(store_work)):.1f}x"
                " wall"
            )
        if args.dagster_rows:
            dagster_passes(folder, args.dagster_rows)


if __name__ == "__main__":
    main()
