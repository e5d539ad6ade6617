"""How many items per second the emulator itself absorbs: the ceiling of every other figure.

    uv run python bench/emulator_capacity.py [--batches 60] [--senders 4]

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
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import API_KEY, SITE_ID, emulator_cpu, emulator_process, machine


def batch(offset: int) -> bytes:
    items = [
        {
            "type": "person",
            "action": "identify",
            "identifiers": {"id": f"u{offset + i}"},
            "attributes": {
                "email": f"user{offset + i}@example.com",
                "first_name": "Name",
                "plan": "plan1",
                "score": i % 100,
                "lifetime_value": 12.5,
                "is_active": True,
                "created_at": 1704067200 + i,
                "city": "City7",
                "id": f"u{offset + i}",
            },
        }
        for i in range(1000)
    ]
    return orjson.dumps({"batch": items})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--senders", type=int, default=4)
    args = parser.parse_args()
    bodies = [batch(n * 1000) for n in range(args.batches)]
    with emulator_process() as base:
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
        f"({args.senders} senders, 1000-item batches)"
    )
    print(
        f"emulator CPU: {cpu:.2f} s, {cpu / items * 1e6:.1f} us per item: "
        f"{items / cpu:,.0f} items per CPU-second of the emulator"
    )


if __name__ == "__main__":
    main()
