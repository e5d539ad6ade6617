"""cio-retl against the official `customerio` SDK on the same loopback emulator.

    uv run python bench/vs_sdk.py [--rows 100000] [--sdk-people 3000] [--check-every 50]

The SDK does what its documentation shows: one `identify` per person (a v1 PUT each). It is
timed on a sample of people (its rate does not depend on how many: one request each) and
reported as operations per second; cio-retl does an initial sync of the whole model. Both
send the same 8 attributes per person to one emulator process, on its fast path
(``Emulator(check_every=N)``: only every Nth ``/api/v2/batch`` body validated and applied).
The fast path covers batch bodies only: the emulator checks and applies every one of the
SDK's v1 requests. So each side's figure is printed beside the emulator's capacity for that
side's own requests, measured in the same run right after it: pre-encoded v1 PUTs for the
SDK, pre-encoded 1000-item batch bodies for cio-retl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from customerio import CustomerIO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    API_KEY,
    CHECK_EVERY,
    SITE_ID,
    emulator_capacity,
    emulator_cpu,
    emulator_process,
    emulator_v1_capacity,
    load_average,
    machine,
    people_table,
    person_model,
    sync_env,
    timed_run,
)


def sdk_sample(url: str, people: int) -> list[dict[str, object]]:
    """The first ``people`` rows of ``bench_people`` at ``url``, as the SDK is given them."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        sample = [
            {k: (float(v) if isinstance(v, Decimal) else v) for k, v in row._mapping.items()}
            for row in conn.execute(sa.text(f"SELECT * FROM main.bench_people LIMIT {people}"))
        ]
    engine.dispose()
    for person in sample:  # the SDK JSON-encodes datetimes itself? send Unix seconds as we do
        person["a6"] = int(person["a6"].timestamp())  # type: ignore[attr-defined]
    return sample


def sdk_rate(base: str, people: list[dict[str, object]]) -> float:
    cio = CustomerIO(site_id=SITE_ID, api_key=API_KEY)
    cio.base_url = f"{base}/api/v1"  # the SDK builds https URLs; point it at the emulator
    started = time.perf_counter()
    for person in people:
        attributes = dict(person)
        cio.identify(id=attributes.pop("user_id"), **attributes)
    return len(people) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sdk-people", type=int, default=3_000)
    parser.add_argument(
        "--check-every", type=int, default=CHECK_EVERY, help="the emulator's fast path"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cio-retl-vs-sdk-"))
    url = f"duckdb:///{workdir / 'bench.duckdb'}"
    engine = sa.create_engine(url)
    people_table(engine, args.rows)
    engine.dispose()
    sample = sdk_sample(url, args.sdk_people)
    models = person_model(workdir / "sql")

    with emulator_process(check_every=args.check_every) as base:
        before, cpu_before = emulator_cpu(base), time.process_time()
        sdk = sdk_rate(base, sample)
        sdk_cpu, sdk_emulator = time.process_time() - cpu_before, emulator_cpu(base) - before
        sdk_capacity = emulator_v1_capacity(base)
        before = emulator_cpu(base)
        run = timed_run([sys.executable, "-m", "cio_retl", "sync"], sync_env(url, models, base))
        emulator = emulator_cpu(base) - before
        capacity = emulator_capacity(base)
    seconds, rss = run.seconds, run.rss_mib
    ours = args.rows / seconds

    print(f"machine: {machine()}; load average {load_average()}")
    print(
        f"emulator: one process for both clients, check_every={args.check_every} (the SDK's v1"
        " requests are all checked and applied: the fast path covers /api/v2/batch bodies)"
    )
    print(
        "| client | people | seconds | people/s | peak RSS MiB | client CPU us/person"
        " | emulator CPU us/person | emulator capacity for these requests, same run |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    n = len(sample)
    print(
        f"| official SDK (`identify`, one request each) | {n:,} | {n / sdk:.2f} | {sdk:,.0f} | - "
        f"| {sdk_cpu / n * 1e6:.0f} | {sdk_emulator / n * 1e6:.0f} | {sdk_capacity} |"
    )
    print(
        f"| cio-retl initial sync (whole process) | {args.rows:,} | {seconds:.2f} | {ours:,.0f} "
        f"| {rss:.0f} | {run.cpu_seconds / args.rows * 1e6:.0f} | {emulator / args.rows * 1e6:.0f}"
        f" | {capacity} |"
    )
    print(f"\nratio: {ours / sdk:,.0f}x the SDK's people/s (target >= 100x)")
    # A client waits for each answer, so the emulator's CPU per person bounds how much of the
    # client's time per person it can have been: what a free emulator would save at most.
    for name, rate, emulator_us in (
        ("the SDK", sdk, sdk_emulator / n * 1e6),
        ("cio-retl", ours, emulator / args.rows * 1e6),
    ):
        share = emulator_us * rate / 1e6
        print(
            f"emulator share of {name}'s time per person: {emulator_us:.0f} of"
            f" {1e6 / rate:.0f} us ({share:.1%}): an emulator that cost nothing would make it at"
            f" most {1 / (1 - share):.2f}x faster"
        )
    cpu_ratio = (sdk_cpu + sdk_emulator) / n / ((run.cpu_seconds + emulator) / args.rows)
    print(f"CPU per person, client and emulator together: the SDK's is {cpu_ratio:,.0f}x ours")


if __name__ == "__main__":
    main()
