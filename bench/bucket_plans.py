"""The database time of N bucket plans together against one whole-model plan.

    uv run python bench/bucket_plans.py --rows 1000000 [--buckets 16] [--change-pct 5]
        [--warehouse duckdb|postgres] [--repeats 2]

A model of ``--rows`` people whose snapshot holds every row as acknowledged, then
``--change-pct`` of the rows changed since. Each plan is the engine's own: a
``cio_retl.plan.PlanDiff`` (for one bucket, or for the whole model) builds its plan table and
reads the run's counts from it (``count()``, what a run does first), so the SQL timed is the
SQL a run executes, not a copy. A SQLAlchemy listener times every statement on the engine
(``before/after_cursor_execute``): the plan table's ``CREATE TABLE ... AS``, the counts'
``SELECT``s, and the rest (planner settings, the leftover-plan lookup). Dropping the plan
table at the end of a run is not counted. The changesets of the buckets together must equal
the whole model's (checked), and the order alternates between repeats (whole model first,
then buckets first) so that neither side always meets a warm cache.

Issue #18's target: N = 16 bucket plans together <= 1.5x the database time of one
whole-model plan. Postgres runs use their own schemas (bench_<pid>, and a state schema
beside it), dropped after.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SITE_ID, load_average, machine
from sync_scale import MODEL, change_rows, seed_snapshot, warehouse_for

from cio_retl.buckets import Bucket
from cio_retl.diff import ChangeCounts
from cio_retl.models import Model, load_models
from cio_retl.plan import PlanDiff
from cio_retl.state import StateStore, Workspace
from cio_retl.warehouse import Warehouse, create_engine


class StatementTimer:
    """Seconds spent executing statements on an engine, by kind of statement."""

    def __init__(self, engine: sa.Engine) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)

    @staticmethod
    def kind(statement: str) -> str:
        """A plan's build: its CREATE TABLE (AS), the INSERT of a table DuckDB declared
        first, and a rerun's moved keys (the narrow join's temporary table)."""
        head = statement.lstrip().upper()
        if head.startswith(("CREATE TABLE", "CREATE OR REPLACE TEMPORARY TABLE")) or (
            head.startswith("INSERT INTO") and ".CIO_PLAN_" in head.split(None, 3)[2]
        ):
            return "build"
        if head.startswith("SELECT") and "COUNT(" in head:
            return "counts"
        return "other"

    def _before(self, conn: sa.Connection, *_: Any) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def _after(self, conn: sa.Connection, cursor: Any, statement: str, *_: Any) -> None:
        started = conn.info["bench_started"].pop()
        self.seconds[self.kind(statement)] += time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class Planned:
    """One plan's database time by kind, its wall and CPU (this process), and its counts."""

    seconds: dict[str, float]
    wall: float
    cpu: float
    counts: ChangeCounts

    @property
    def database(self) -> float:
        return sum(self.seconds.values())


def plan_once(
    warehouse: Warehouse,
    state: StateStore,
    model: Model,
    timer: StatementTimer,
    bucket: Bucket | None,
) -> Planned:
    """Plan ``model`` (one bucket, or all of it) as a run does, and drop the plan after."""
    differ = PlanDiff(warehouse, state, bucket)
    timer.seconds.clear()
    started, cpu = time.perf_counter(), time.process_time()
    try:
        counts = differ.count(model)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        seconds = dict(timer.seconds)
    finally:
        differ.close()
    return Planned(seconds, wall, cpu, counts)


def changeset(counts: ChangeCounts) -> tuple[int, ...]:
    return (counts.rows, counts.snapshot_rows, counts.new, counts.changed, counts.removed)


def summed(plans: list[Planned]) -> tuple[int, ...]:
    return tuple(sum(column) for column in zip(*(changeset(p.counts) for p in plans), strict=True))


def line(name: str, plans: list[Planned]) -> str:
    total = {k: sum(p.seconds.get(k, 0.0) for p in plans) for k in ("build", "counts", "other")}
    return (
        f"{name}: database {sum(total.values()):.2f} s (plan table {total['build']:.2f} s,"
        f" counts {total['counts']:.2f} s, other {total['other']:.2f} s); wall"
        f" {sum(p.wall for p in plans):.2f} s, this process's CPU {sum(p.cpu for p in plans):.2f} s"
    )


@contextmanager
def prepared(args: argparse.Namespace) -> Iterator[tuple[str, Path, str, int]]:
    """(URL, models folder, state schema, rows changed) of a snapshotted, changed model."""
    with tempfile.TemporaryDirectory(prefix="cio-retl-buckets-") as tmp:
        workdir = Path(tmp)
        models = workdir / "sql"
        models.mkdir()
        with warehouse_for(args.warehouse, args, workdir) as (url, schema, state_schema):
            (models / "bench_people.sql").write_text(MODEL.format(schema=schema))
            seed_snapshot(url, models, state_schema)
            _, changed = change_rows(url, schema, None, args.change_pct)
            if args.warehouse == "postgres":  # fresh statistics, as autovacuum would leave
                engine = create_engine(url)
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text(f"VACUUM ANALYZE {schema}.bench_people"))
                    conn.execute(sa.text(f"VACUUM ANALYZE {state_schema}.snapshots"))
                engine.dispose()
            yield url, models, state_schema, changed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument("--change-pct", type=float, default=5.0)
    parser.add_argument("--warehouse", choices=("duckdb", "postgres"), default="duckdb")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--duckdb-settings",
        default="",
        help="URL query of DuckDB settings, e.g. memory_limit=2GB (default: cio-retl's own)",
    )
    args = parser.parse_args()

    print(f"machine: {machine()}; load average {load_average()}")
    with prepared(args) as (url, models, state_schema, changed):
        print(f"{args.rows:,} rows snapshotted, {changed:,} changed since ({args.warehouse})")
        engine = create_engine(url)
        timer = StatementTimer(engine)
        warehouse = Warehouse(engine)
        state = StateStore(engine, state_schema).bound(Workspace(SITE_ID))
        [model] = load_models(models)
        buckets = [Bucket(i, args.buckets) for i in range(args.buckets)]
        ratios = []
        try:
            for repeat in range(args.repeats):
                whole_first = repeat % 2 == 0
                if whole_first:
                    whole = plan_once(warehouse, state, model, timer, None)
                parts = [plan_once(warehouse, state, model, timer, b) for b in buckets]
                if not whole_first:
                    whole = plan_once(warehouse, state, model, timer, None)
                if summed(parts) != changeset(whole.counts):
                    raise SystemExit(
                        f"the buckets' changesets {summed(parts)} do not add up to the whole"
                        f" model's {changeset(whole.counts)} (rows, snapshot rows, new, changed,"
                        " removed)"
                    )
                ratio = sum(p.database for p in parts) / whole.database
                ratios.append(ratio)
                build = sum(p.seconds.get("build", 0.0) for p in parts) / whole.seconds["build"]
                each = [p.database for p in parts]
                print(
                    f"[{repeat + 1}] {'whole model first' if whole_first else 'buckets first'},"
                    f" load {load_average()}\n"
                    f"  {line('whole-model plan', [whole])}\n"
                    f"  {line(f'{args.buckets} bucket plans together', parts)}\n"
                    f"  one bucket's database time: median {statistics.median(each):.3f} s,"
                    f" max {max(each):.3f} s\n"
                    f"  changeset (rows, snapshot rows, new, changed, removed):"
                    f" {changeset(whole.counts)}, the buckets' sum equal\n"
                    f"  ratio {args.buckets} buckets / whole model: {ratio:.2f}x database time"
                    f" ({build:.2f}x for the plan tables alone; target <= 1.5x)"
                )
        finally:
            engine.dispose()
    if len(ratios) > 1:
        print(f"ratios: {', '.join(f'{r:.2f}x' for r in ratios)}")


if __name__ == "__main__":
    main()
