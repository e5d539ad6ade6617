"""How many items per second the emulator itself absorbs: the ceiling of every other figure.

    uv run python bench/emulator_capacity.py [--batches 60] [--senders 4] [--check-every 50]
        [--v1-people 2000]

Pre-encoded 1000-item batches of 8-attribute person identifies are posted by `--senders`
threads (one httpx client each) to an emulator in its own process. If a benchmark's
items/s is well below this, the emulator was not its bottleneck. ``--v1-people`` also posts
the SDK's kind of request (one v1 PUT per person), which the fast path does not cover. The
wall rate is bound by the senders too (they share the machine); the emulator's CPU per item
is its own ceiling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emulator_capacity, emulator_process, emulator_v1_capacity, machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument(
        "--check-every", type=int, help="the emulator's fast path: validate every Nth body"
    )
    parser.add_argument(
        "--v1-people", type=int, default=0, help="also time this many v1 PUTs (the SDK's)"
    )
    args = parser.parse_args()
    with emulator_process(check_every=args.check_every) as base:
        batches = emulator_capacity(base, args.batches, args.senders)
        v1 = emulator_v1_capacity(base, args.v1_people, args.senders) if args.v1_people else None
    print(f"machine: {machine()}")
    print(f"/api/v2/batch, {args.batches} bodies of 1000 items, {args.senders} senders: {batches}")
    if v1 is not None:
        print(f"PUT /api/v1/customers/{{id}}, {args.v1_people:,} requests: {v1}")


if __name__ == "__main__":
    main()
