"""How many items per second the emulator itself absorbs: the ceiling of every other figure.

    uv run python bench/emulator_capacity.py [--batches 60] [--senders 4] [--check-every 50]

Pre-encoded 1000-item batches of 8-attribute person identifies are posted by `--senders`
threads (one httpx client each) to an emulator in its own process. If a benchmark's
items/s is well below this, the emulator was not its bottleneck.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import API_KEY, SITE_ID, capacity_batch, emulator_cpu, emulator_process, machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument(
        "--check-every", type=int, help="the emulator's fast path: validate every Nth body"
    )
    args = parser.parse_args()
    bodies = [capacity_batch(n * 1000) for n in range(args.batches)]
    with emulator_process(check_every=args.check_every) as base:
        clients = [
            httpx.Client(base_url=base, auth=(SITE_ID, API_KEY), timeout=60)
            for _ in range(args.senders)
        ]

        def post(n: int) -> int:
            response = clients[n % args.senders].post(
                "/api/v2/batch", content=bodies[n], headers={"Content-Type": "application/json"}
            )
            return response.status_code

        cpu_before = emulator_cpu(base)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.senders) as pool:
            statuses = list(pool.map(post, range(args.batches)))
        seconds = time.perf_counter() - started
        cpu = emulator_cpu(base) - cpu_before
    assert set(statuses) == {200}, statuses
    items = args.batches * 1000
    print(f"machine: {machine()}")
    print(
        f"emulator absorbed {items:,} items in {seconds:.2f} s: {items / seconds:,.0f} items/s "
        f"({args.senders} senders, 1000-item batches, check_every={args.check_every})"
    )
    print(
        f"emulator CPU: {cpu:.2f} s, {cpu / items * 1e6:.1f} us per item: "
        f"{items / cpu:,.0f} items per CPU-second of the emulator"
    )


if __name__ == "__main__":
    main()
