"""Bytes on the wire when 1 of 20 attributes changes, against resending full rows.

    uv run python bench/wire_bytes.py [--rows 20000]

Three syncs of a 20-attribute person model against one emulator process: the initial sync,
then `UPDATE ... SET a2 = ...` on every row followed by a normal sync (only the changed
attribute travels), then the same change followed by `--full-resync` (what a tool that
resends whole rows sends). Bytes are counted by the emulator (request bodies as received).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    emulator_process,
    emulator_stats,
    machine,
    people_table,
    person_model,
    sync_env,
    timed_command,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cio-retl-wire-"))
    url = f"duckdb:///{workdir / 'bench.duckdb'}"
    engine = sa.create_engine(url)
    people_table(engine, args.rows, attributes=20)
    engine.dispose()
    models = person_model(workdir / "sql")
    sync = [sys.executable, "-m", "cio_retl", "sync"]

    def change(value: str) -> None:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE main.bench_people SET a2 = '{value}'"))
        engine.dispose()

    with emulator_process() as base:
        env = sync_env(url, models, base)
        timed_command(sync, env)
        _, initial = emulator_stats(base)
        change("changed-once")
        timed_command(sync, env)
        _, after_diff = emulator_stats(base)
        change("changed-twice")
        timed_command([*sync, "--full-resync"], env)
        _, after_full = emulator_stats(base)
    diff_bytes = after_diff - initial
    full_bytes = after_full - after_diff
    print(f"machine: {machine()}")
    print("| sync after 1 of 20 attributes changed on every row | bytes sent | per row |")
    print("|---|---|---|")
    print(
        f"| cio-retl (the changed attribute; identifier in `identifiers`) | {diff_bytes:,} | {diff_bytes / args.rows:.0f} |"
    )
    print(f"| full rows (`--full-resync`) | {full_bytes:,} | {full_bytes / args.rows:.0f} |")
    print(f"\nratio: {diff_bytes / full_bytes:.1%} of the full-row bytes")


if __name__ == "__main__":
    main()
