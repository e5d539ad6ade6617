"""Where an initial sync's send phase waits: each thread's CPU over time, the requests'
latency and how many travel at once, and the same HTTP alone, with and without a
CPU-bound Python thread beside it.

    uv run python bench/send_threads.py --rows 1000000 [--step 0.5] [--hog-requests 300]

Part 1 builds ``bench_people`` (``_common.people_table``) in a DuckDB file and runs one
initial sync *in this process* against the emulator's fast path in its own process. A
sampler reads every thread's CPU from ``/proc/self/task`` (and the emulator's from its
``/proc/PID/stat``) every 50 ms and prints the cores each group used per ``--step``
seconds: this thread, cio-retl's senders and state writer, DuckDB's own threads (no Python
name), the emulator. ``TrackClient._request`` is timed for each batch request.

Part 2 posts the sync's request shape (1000 items of 8 attributes a body) from 4 threads
through ``TrackClient.send_batch`` to the same emulator: alone, then with one thread
beside them that only runs Python code (``--hog-requests`` of them, each way). A sender
back from its socket waits for the GIL; the interpreter makes a running thread give it up
only every ``sys.getswitchinterval()`` (5 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    API_KEY,
    CHECK_EVERY,
    EMULATOR_PIDS,
    SITE_ID,
    capacity_batch,
    cpu_seconds,
    emulator_process,
    load_average,
    machine,
    people_table,
    person_model,
    stat_cpu_seconds,
    sync_env,
)


class ThreadSampler:
    """Every 50 ms, the CPU seconds used so far by each group of this process's threads
    (and by the emulator process): a thread of a Python name counts under that name
    without its number, one of none (DuckDB's) under "duckdb"."""

    def __init__(self, emulator_pid: int) -> None:
        self.emulator_pid = emulator_pid
        self.series: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._names: dict[int, str] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for t in threading.enumerate():
                if t.native_id is not None:
                    self._names[t.native_id] = t.name.rstrip("0123456789_")
            for tid in os.listdir("/proc/self/task"):
                try:
                    cpu = stat_cpu_seconds(f"/proc/self/task/{tid}/stat")
                except OSError:  # the thread ended meanwhile
                    continue
                self._last[int(tid)] = (self._names.get(int(tid), "duckdb"), cpu)
            groups: defaultdict[str, float] = defaultdict(float)
            for name, cpu in self._last.values():
                groups[name] += cpu
            groups["emulator"] = cpu_seconds(self.emulator_pid)
            self.series.append((time.perf_counter(), dict(groups)))
            self._stop.wait(0.05)

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def print_cores(self, started: float, step: float) -> None:
        names = sorted({n for _, g in self.series for n in g} - {"sampler"})
        print("| s | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        (before_at, before), due = self.series[0], started + step
        for at, groups in self.series:
            if at >= due:
                span = at - before_at
                cores = [(groups.get(n, 0.0) - before.get(n, 0.0)) / span for n in names]
                print(f"| {at - started:.1f} | " + " | ".join(f"{c:.2f}" for c in cores) + " |")
                (before_at, before), due = (at, groups), at + step
        first, last = self.series[0][1], self.series[-1][1]
        print(
            "CPU seconds: "
            + ", ".join(f"{n} {last.get(n, 0.0) - first.get(n, 0.0):.2f}" for n in names)
        )


def latency(times: list[tuple[float, float]]) -> str:
    if not times:
        return "no requests"
    spans = sorted(end - start for start, end in times)
    first, last = min(s for s, _ in times), max(e for _, e in times)
    return (
        f"{len(spans)} requests over {last - first:.2f} s: latency median"
        f" {statistics.median(spans) * 1e3:.1f} ms, p90 {spans[int(len(spans) * 0.9)] * 1e3:.1f}"
        f" ms; {sum(spans) / (last - first):.2f} in flight on average"
    )


def sync_part(rows: int, step: float, base: str, workdir: Path) -> None:
    from cio_retl.client import TrackClient
    from cio_retl.config import Settings
    from cio_retl.sync import run_sync

    url = f"duckdb:///{workdir / 'bench.duckdb'}"
    engine = sa.create_engine(url)
    people_table(engine, rows)
    engine.dispose()
    settings = Settings.from_env(sync_env(url, person_model(workdir / "sql"), base))
    timed: list[tuple[float, float]] = []
    request = TrackClient._request

    def timed_request(client: TrackClient, method: str, path: str, body: bytes | None) -> object:
        started = time.perf_counter()
        try:
            return request(client, method, path, body)
        finally:
            if path == "/api/v2/batch":
                timed.append((started, time.perf_counter()))

    TrackClient._request = timed_request  # type: ignore[assignment,method-assign]
    try:
        with ThreadSampler(EMULATOR_PIDS[base]) as sampler:
            started = time.perf_counter()
            report = run_sync(settings)
            seconds = time.perf_counter() - started
    finally:
        TrackClient._request = request  # type: ignore[method-assign]
    (model,) = report.models
    print(f"initial sync of {rows:,} rows in process: {seconds:.2f} s, {model.created:,} created")
    sampler.print_cores(started, step)
    print(f"batch requests: {latency(timed)}")


def http_part(base: str, requests: int) -> None:
    from cio_retl.client import TrackClient

    items = orjson.loads(capacity_batch(0, prefix="hog"))["batch"]
    body_items = [orjson.dumps(item) for item in items]
    client = TrackClient(base, SITE_ID, API_KEY)
    try:
        for hog in (False, True):
            times: list[tuple[float, float]] = []
            stop = threading.Event()

            def send(_: int, times: list[tuple[float, float]] = times) -> None:
                started = time.perf_counter()
                client.send_batch(body_items)
                times.append((started, time.perf_counter()))

            def burn(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    sum(i * i for i in range(1000))

            burner = threading.Thread(target=burn, name="hog")
            if hog:
                burner.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(send, range(requests)))
            seconds = time.perf_counter() - started
            stop.set()
            if hog:
                burner.join()
            what = "beside one CPU-bound Python thread" if hog else "alone"
            print(
                f"HTTP {what}: {requests} bodies of 1000 items from 4 threads in {seconds:.2f} s"
                f" ({requests * 1000 / seconds:,.0f} items/s); {latency(times)}"
            )
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--step", type=float, default=0.5, help="seconds per line of cores")
    parser.add_argument("--hog-requests", type=int, default=300)
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {load_average()}")
    with (
        tempfile.TemporaryDirectory(prefix="cio-send-threads-") as tmp,
        emulator_process(check_every=CHECK_EVERY) as base,
    ):
        sync_part(args.rows, args.step, base, Path(tmp))
        http_part(base, args.hog_requests)
    print(f"load average {load_average()}")


if __name__ == "__main__":
    main()
