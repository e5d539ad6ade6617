"""Shared pieces of the benchmarks: an emulator in its own process, a people table, timing.

The emulator runs as a separate process with request bodies not recorded, so it neither
shares the GIL with what is measured nor grows in memory.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
import orjson
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
SITE_ID, API_KEY = "bench-site", "bench-key"

_EMULATOR = """
import sys, threading
from cio_retl.emulator import Emulator
from cio_retl.emulator.server import tune_gc_for_serving
limit = None
if sys.argv[4]:
    from cio_retl.ratelimit import RateSpec
    spec = RateSpec.parse(sys.argv[4])
    limit = (spec.requests, spec.window)
check_every = int(sys.argv[5]) if sys.argv[5] else None
emu = Emulator(site_id=sys.argv[1], api_key=sys.argv[2], port=int(sys.argv[3]), record_bodies=False,
               rate_limit=limit, check_every=check_every)
tune_gc_for_serving()
emu.start()
threading.Event().wait()
"""


EMULATOR_PIDS: dict[str, int] = {}  # base URL -> pid of the emulator process serving it
EMULATOR_CHECK_EVERY: dict[str, int | None] = {}  # base URL -> its fast path (None: off)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    return stat_cpu_seconds(f"/proc/{pid}/stat")


def stat_cpu_seconds(stat_path: str) -> float:
    """User + system CPU seconds in a /proc ``stat`` file: a process's, or one thread's
    (``/proc/self/task/TID/stat``)."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emulator_cpu(base: str) -> float:
    """CPU seconds used so far by the emulator process serving ``base``."""
    return cpu_seconds(EMULATOR_PIDS[base])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def emulator_process(
    rate_limit: str | None = None, check_every: int | None = None
) -> Iterator[str]:
    """The emulator in a child process; yields its base URL. ``rate_limit`` ("300/3") makes
    it refuse (429) what goes over that many requests per window; ``check_every`` is the
    emulator's fast path (only every Nth batch body validated and applied, see
    ``Emulator``), so that a figure measures the client, not the emulator."""
    port = free_port()
    args = [SITE_ID, API_KEY, str(port), rate_limit or "", str(check_every or "")]
    proc = subprocess.Popen([sys.executable, "-c", _EMULATOR, *args])
    base = f"http://127.0.0.1:{port}"
    EMULATOR_PIDS[base] = proc.pid
    EMULATOR_CHECK_EVERY[base] = check_every
    try:
        for _ in range(200):
            try:
                httpx.get(f"{base}/_emulator/requests", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield base
    finally:
        EMULATOR_PIDS.pop(base, None)
        EMULATOR_CHECK_EVERY.pop(base, None)
        proc.terminate()
        proc.wait()


def emulator_stats(base: str) -> tuple[int, int]:
    """(requests, bytes) the emulator received so far."""
    requests = httpx.get(f"{base}/_emulator/requests", timeout=30).json()
    return len(requests), sum(r["n_bytes"] for r in requests)


def capacity_batch(offset: int, prefix: str = "cap") -> bytes:
    """A 1000-item ``/api/v2/batch`` body of 8-attribute person identifies (ids
    ``<prefix><n>``, apart from the benchmarks' ``u<n>`` people)."""
    items = [
        {
            "type": "person",
            "action": "identify",
            "identifiers": {"id": f"{prefix}{offset + i}"},
            "attributes": {
                "email": f"user{offset + i}@example.com",
                "first_name": "Name",
                "plan": "plan1",
                "score": i % 100,
                "lifetime_value": 12.5,
                "is_active": True,
                "created_at": 1704067200 + i,
                "city": "City7",
                "id": f"{prefix}{offset + i}",
            },
        }
        for i in range(1000)
    ]
    return orjson.dumps({"batch": items})


CHECK_EVERY = 50  # the emulator's fast path in every benchmark: 1 body in 50 checked


class Capacity(NamedTuple):
    """What the emulator absorbed: the wall rate is also bound by the senders (they share
    the machine), the CPU per item is the emulator's own ceiling."""

    items_per_second: float  # wall
    cpu_us_per_item: float  # the emulator process's CPU
    check_every: int | None = None  # the emulator's fast path, None: every body checked

    def __str__(self) -> str:
        fast = (
            "every body checked" if self.check_every is None else f"check_every={self.check_every}"
        )
        return (
            f"{self.items_per_second:,.0f} items/s, {self.cpu_us_per_item:.1f} us of emulator"
            f" CPU per item = {1e6 / self.cpu_us_per_item:,.0f} items per emulator CPU-second"
            f" ({fast})"
        )


def _post_all(
    base: str, requests: list[tuple[str, str, bytes]], items: int, senders: int
) -> Capacity:
    """Post pre-encoded ``(method, path, body)`` requests from ``senders`` threads: the
    ``items`` they carry per second, and the emulator's CPU per item."""
    clients = [
        httpx.Client(base_url=base, auth=(SITE_ID, API_KEY), timeout=60) for _ in range(senders)
    ]

    def post(n: int) -> int:
        method, path, body = requests[n]
        response = clients[n % senders].request(
            method, path, content=body, headers={"Content-Type": "application/json"}
        )
        return response.status_code

    try:
        cpu_before = emulator_cpu(base)
        started = time.perf_counter()
        with ThreadPoolExecutor(senders) as pool:
            statuses = set(pool.map(post, range(len(requests))))
        seconds = time.perf_counter() - started
        cpu = emulator_cpu(base) - cpu_before
    finally:
        for client in clients:
            client.close()
    if statuses != {200}:
        raise SystemExit(f"the emulator answered {sorted(statuses)} to the capacity requests")
    return Capacity(items / seconds, cpu / items * 1e6, EMULATOR_CHECK_EVERY[base])


def emulator_capacity(base: str, batches: int = 40, senders: int = 2) -> Capacity:
    """Items/s the emulator at ``base`` accepts right now: pre-encoded 1000-item
    ``/api/v2/batch`` bodies posted by ``senders`` threads. Printed beside a figure, it shows
    whether the emulator could have been what the figure measured."""
    bodies = [("POST", "/api/v2/batch", capacity_batch(n * 1000)) for n in range(batches)]
    return _post_all(base, bodies, batches * 1000, senders)


def emulator_v1_capacity(base: str, people: int = 2000, senders: int = 2) -> Capacity:
    """Like :func:`emulator_capacity` for the SDK's requests: one ``PUT
    /api/v1/customers/{id}`` of 8 attributes per person. The fast path does not cover them
    (the emulator checks and applies every v1 request), so this is its capacity for them."""
    batch = orjson.loads(capacity_batch(0, prefix="v1cap"))["batch"]
    requests = []
    for n in range(people):
        item = batch[n % len(batch)]
        attributes = {k: v for k, v in item["attributes"].items() if k != "id"}
        requests.append(("PUT", f"/api/v1/customers/v1cap{n}", orjson.dumps(attributes)))
    return _post_all(base, requests, people, senders)


def emulator_peak_rss_mib(base: str) -> float:
    """Peak resident set of the emulator process serving ``base`` (Linux VmHWM)."""
    with open(f"/proc/{EMULATOR_PIDS[base]}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, as ``uptime`` shows them."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def people_table(engine: sa.Engine, rows: int, attributes: int = 8, schema: str = "main") -> None:
    """``bench_people``: ``user_id`` plus ``attributes`` columns of the usual types."""
    kinds = [
        "'user' || i || '@example.com'",
        "'Name' || (i % 1000)",
        "'plan' || (i % 4)",
        "i % 100",
        "CAST(i * 1.25 AS DECIMAL(14, 2))",
        "i % 2 = 0",
        "TIMESTAMP '2024-01-01 00:00:00' + i * INTERVAL '1 second'",
        "'City' || (i % 500)",
    ]
    columns = ", ".join(f"{kinds[n % len(kinds)]} AS a{n}" for n in range(attributes))
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {schema}.bench_people"))
        conn.execute(
            sa.text(
                f"CREATE TABLE {schema}.bench_people AS SELECT 'u' || i AS user_id, {columns}"
                f" FROM range({rows}) AS r(i)"
            )
        )


def people_database(folder: Path, rows: int) -> tuple[Path, Path]:
    """A DuckDB file ``pristine.duckdb`` of ``bench_people`` (``rows`` rows) in ``folder``,
    and the folder of its person model beside it."""
    pristine = folder / "pristine.duckdb"
    engine = sa.create_engine(f"duckdb:///{pristine}")
    people_table(engine, rows)
    engine.dispose()
    return pristine, person_model(folder / "models")


def person_model(folder: Path, schema: str = "main") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_people.sql").write_text(
        "-- kind: person\n-- identifier: id\n-- key: user_id\n"
        "-- max_change_pct: 100\n"
        f"select * from {schema}.bench_people\n"
    )
    return folder


def sync_env(url: str, models: Path, base: str) -> dict[str, str]:
    return {
        **os.environ,
        "CIO_RETL_WAREHOUSE_URL": url,
        "CIO_RETL_MODELS_DIR": str(models),
        "CIO_TRACK_API_URL": base,
        "CIO_SITE_ID": SITE_ID,
        "CIO_API_KEY": API_KEY,
    }


class Timed(NamedTuple):
    seconds: float  # wall
    rss_mib: float  # peak resident set (wait4)
    cpu_seconds: float  # user + system CPU of the command: far less sensitive to machine load
    output: str = ""  # what the command printed (stdout and stderr)


def timed_command(args: list[str], env: Mapping[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, from wait4) of one command; raises if it fails."""
    timed = timed_run(args, env)
    return timed.seconds, timed.rss_mib


def timed_run(args: list[str], env: Mapping[str, str]) -> Timed:
    """Wall seconds, peak RSS and CPU seconds of one command (wait4); raises if it fails.

    On a machine shared with other work the wall time can double between repeats; the CPU
    seconds vary far less, so the benchmarks print both.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    output = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{output}")
    return Timed(elapsed, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, output)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
