"""Hash buckets: one model synced as N runs, one per bucket, equals one run of the model.

Units for the bucket function, the same buckets from the SQL of each dialect, bucket runs
end to end on DuckDB (including deletes and edits), the locks between bucket runs, and four
processes on PostgreSQL sending at once under one shared rate budget.
"""

from __future__ import annotations

import os
import random
import string
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from cio_retl.buckets import MAX_BUCKETS, Bucket, bucket_of, bucket_sql
from cio_retl.config import Settings
from cio_retl.demo import edit_demo_warehouse
from cio_retl.dialects import dialect_for
from cio_retl.emulator import Emulator, most_in_window
from cio_retl.errors import ConfigError, LockedError
from cio_retl.ratelimit import ARRIVAL_MARGIN, RateSpec
from cio_retl.state import StateStore
from cio_retl.state.budget import Gcra, SharedRateBudget, budget_for
from cio_retl.sync import Outcome
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, REPO, SITE_ID, PgSchemas, sync
from tests.test_postgres import demo_on_postgres
from tests.test_sync_duckdb import actual_workspace, batch_items, expected_workspace

ENTITIES = ("users", "companies")
RELATIONSHIPS = ("memberships", "devices", "orders")  # what names people: after them


# -- the bucket function --------------------------------------------------------------------


def test_bucket_parse_and_bounds() -> None:
    assert Bucket.parse("3/16") == Bucket(3, 16)
    assert Bucket.parse(" 0 / 1 ").label == "0/1"
    for bad in ("16/16", "-1/4", "3", "a/b", "1/0", f"0/{MAX_BUCKETS + 1}"):
        with pytest.raises(ValueError):
            Bucket.parse(bad)


def test_every_key_is_in_exactly_one_bucket_and_buckets_are_even() -> None:
    rng = random.Random(7)
    keys = [
        f"{i}-" + "".join(rng.choices(string.printable, k=rng.randint(0, 40)))
        for i in range(16_000)
    ]
    counts = [0] * 16
    for key in keys:
        holders = [b for b in range(16) if Bucket(b, 16).holds(key)]
        assert len(holders) == 1
        counts[holders[0]] += 1
    # 1,000 expected per bucket; a binomial's 5-sigma is about 150.
    assert all(850 <= n <= 1150 for n in counts), counts
    assert bucket_of(None, 16) == 0  # NULL keys (rejected, reported) all go to bucket 0


def test_bucket_of_is_pinned() -> None:
    """Changing the bucket function would move keys between the buckets of a running
    deployment; these values were computed once from MD5 and must never change."""
    assert [bucket_of(k, 16) for k in ("u-42", "a@example.com", "co-0001", "")] == [8, 8, 4, 13]
    assert bucket_of("co-0001", 7) == 4


KEYS = [
    "",
    "a",
    "u-42",
    "é✓ 日本",
    "x" * 150,
    "with 'quote'",
    "tab\tnewline\n",
    *map(str, range(200)),
]


def _sql_buckets(conn: sa.Connection, keys: list[str | None], count: int) -> list[int]:
    """The bucket of each key by the portable SQL and by the dialect's own (which the diff
    uses); they must agree with each other, as the test then checks them against Python."""
    portable, own = bucket_sql("k", count), dialect_for(conn.engine.dialect).bucket("k", count)
    got = []
    for k in keys:
        row = conn.execute(
            sa.text(
                f"SELECT {portable} AS p, {own} AS o FROM (SELECT CAST(:k AS VARCHAR) AS k) AS t"
            ),
            {"k": k},
        ).one()
        assert row[0] == row[1], (k, count, tuple(row))
        got.append(row[0])
    return got


@pytest.mark.parametrize("count", [1, 16, 13])
def test_sql_buckets_equal_python_on_duckdb(count: int) -> None:
    engine = create_engine("duckdb:///:memory:")
    with engine.connect() as conn:
        got = _sql_buckets(conn, [*KEYS, None], count)
    assert got == [bucket_of(k, count) for k in [*KEYS, None]]


@pytest.mark.postgres
@pytest.mark.parametrize("count", [1, 16, 13, MAX_BUCKETS])
def test_sql_buckets_equal_python_on_postgres(postgres_url: str, count: int) -> None:
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            got = _sql_buckets(conn, [*KEYS, None], count)
    finally:
        engine.dispose()
    assert got == [bucket_of(k, count) for k in [*KEYS, None]]


def test_sql_buckets_equal_python_on_fakesnow(fakesnow_url: str) -> None:
    engine = create_engine(fakesnow_url)
    try:
        with engine.connect() as conn:
            got = _sql_buckets(conn, [*KEYS[:40], None], 16)
    finally:
        engine.dispose()
    assert got == [bucket_of(k, 16) for k in [*KEYS[:40], None]]


# -- bucket runs end to end (DuckDB) ---------------------------------------------------------


def sync_buckets(settings: Settings, count: int, **options: Any) -> dict[str, dict[str, int]]:
    """People and objects of every bucket, then relationships of every bucket: the order a
    partitioned deployment runs them in. Returns the items created/updated/deleted per
    model per bucket."""
    sent: dict[str, dict[str, int]] = {}
    for names in (ENTITIES, RELATIONSHIPS):
        for index in range(count):
            report = sync(settings, *names, bucket=Bucket(index, count), **options)
            assert report.outcome is Outcome.SYNCED, report
            assert report.bucket == f"{index}/{count}"
            for m in report.models:
                sent.setdefault(m.model, {})[report.bucket] = m.changes
    return sent


def test_bucket_runs_equal_one_run(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    sent = sync_buckets(settings, 4)

    expected = expected_workspace(demo_engine)
    assert actual_workspace(emulator) == expected
    assert emulator.invalid_items == []
    # Every row went exactly once, in exactly one bucket's run, and every bucket had some.
    items = batch_items(emulator)
    people = [
        i["identifiers"]["email"]
        for i in items
        if i["action"] == "identify" and i["type"] == "person"
    ]
    assert len(people) == len(set(people)) == 490
    assert sent["users"] == {
        f"{b}/4": sum(Bucket(b, 4).holds(email) for email in expected["people"]) for b in range(4)
    }
    assert min(sent["users"].values()) > 0
    assert sum(sent["memberships"].values()) == len(expected["relationships"])

    # Edits: each bucket run sends only its edited rows; together, exactly the edits.
    edits = edit_demo_warehouse(demo_engine)
    before = len(emulator.requests)
    sent = sync_buckets(settings, 4)
    assert len(batch_items(emulator, before)) == edits.entities == 8
    for email in edits.users_changed:
        (owner,) = [b for b in range(4) if Bucket(b, 4).holds(email)]
        assert sent["users"][f"{owner}/4"] >= 1
    assert actual_workspace(emulator) == expected_workspace(demo_engine)

    # Nothing left: every bucket run sends nothing.
    before = len(emulator.requests)
    assert (
        sum(n for by_bucket in sync_buckets(settings, 4).values() for n in by_bucket.values()) == 0
    )
    assert batch_items(emulator, before) == []


def test_a_bucket_deletes_only_its_own_keys(
    settings: Settings, demo_engine: Engine, emulator: Emulator, tmp_path: Path
) -> None:
    folder = tmp_path / "mirror"
    folder.mkdir()
    for model in (REPO / "sql").glob("*.sql"):
        text = model.read_text()
        if model.name == "users.sql":
            text = text.replace("-- key: email\n", "-- key: email\n-- mode: mirror\n")
        (folder / model.name).write_text(text)
    settings = replace(settings, models_dir=folder)
    assert sync(settings).outcome is Outcome.SYNCED
    with demo_engine.begin() as conn:
        gone = [
            r[0]
            for r in conn.execute(
                sa.text(
                    "SELECT email FROM demo.users WHERE deleted_at IS NULL ORDER BY user_id LIMIT 12"
                )
            )
        ]
        conn.execute(
            sa.text(
                "DELETE FROM demo.memberships WHERE user_id IN (SELECT user_id FROM demo.users"
                " WHERE email IN :emails)"
            ).bindparams(sa.bindparam("emails", expanding=True)),
            {"emails": gone},
        )
        conn.execute(
            sa.text("DELETE FROM demo.users WHERE email IN :emails").bindparams(
                sa.bindparam("emails", expanding=True)
            ),
            {"emails": gone},
        )
    in_bucket_0 = sorted(e for e in gone if Bucket(0, 3).holds(e))
    assert 0 < len(in_bucket_0) < len(gone)  # the 12 keys spread over the 3 buckets

    before = len(emulator.requests)
    report = sync(settings, "users", bucket=Bucket(0, 3), force=True)
    assert report.outcome is Outcome.SYNCED, report
    deletes = [i for i in batch_items(emulator, before) if i["action"] == "delete"]
    assert sorted(i["identifiers"]["email"] for i in deletes) == in_bucket_0

    sync_buckets(settings, 3, force=True)
    assert actual_workspace(emulator) == expected_workspace(demo_engine)


# -- locks between bucket runs ---------------------------------------------------------------


def test_bucket_locks(warehouse_url: str) -> None:
    engine = create_engine(warehouse_url)
    state = StateStore(engine)
    state.ensure_schema()
    try:
        state.acquire_lock("users", "run-a", Bucket(0, 4))
        state.acquire_lock("users", "run-b", Bucket(1, 4))  # another bucket: side by side
        state.acquire_lock("companies", "run-c")  # another model: unaffected
        with pytest.raises(LockedError, match="another run"):
            state.acquire_lock("users", "run-d", Bucket(0, 4))  # the same bucket
        with pytest.raises(LockedError, match="overlaps 'users#"):
            state.acquire_lock("users", "run-e")  # the whole model overlaps every bucket
        with pytest.raises(LockedError, match="overlaps 'users#"):
            state.acquire_lock("users", "run-f", Bucket(5, 8))  # another count overlaps
        # A refused run gave back what it took: the owners are unchanged.
        with engine.connect() as conn:
            held = dict(conn.execute(sa.text("SELECT model, run_id FROM cio_retl.locks")).all())
        assert held == {"users#0/4": "run-a", "users#1/4": "run-b", "companies": "run-c"}
        state.release_lock("users", "run-a", Bucket(0, 4))
        state.release_lock("users", "run-b", Bucket(1, 4))
        state.acquire_lock("users", "run-e")  # now the whole model may go
        with pytest.raises(LockedError, match="overlaps 'users'"):
            state.acquire_lock("users", "run-g", Bucket(2, 4))
    finally:
        engine.dispose()


# -- the shared rate budget ------------------------------------------------------------------


@given(
    requests=st.integers(1, 5000),
    window=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    clients=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
@example(requests=2, window=0.5, clients=1, seed=0)  # a burst under one request (found)
@example(requests=1, window=1.0, clients=4, seed=0)  # too small to split
@example(requests=3000, window=3.0, clients=16, seed=0)  # the real limit
@hypothesis_settings(max_examples=60, deadline=None)
def test_gcra_never_grants_more_than_the_limit_in_any_window(
    requests: int, window: float, clients: int, seed: int
) -> None:
    """The budget's rule, run on a fake clock with greedy clients that retry as soon as they
    are told to wait: no window ARRIVAL_MARGIN longer than the limit's ever holds more than
    98% of the limit (rounded down, at least one request), and the pace is at least 95% of
    the sustained share (90% of the 98%, per window plus margin)."""
    gcra = Gcra.for_limit(RateSpec(requests, window))
    rng = random.Random(seed)
    tat, now, grants = 0.0, 0.0, []
    horizon = 4 * window
    while now < horizon:
        for _ in range(clients):
            new = gcra.grant(tat, now)
            if new is not None:
                tat = new
                grants.append(now)
        now += rng.uniform(0, gcra.interval)  # requests arrive at random moments
    busiest = most_in_window(grants, window + ARRIVAL_MARGIN)
    assert busiest <= max(1, int(requests * 0.98 + 1e-9)) <= requests
    if requests >= 50:
        assert len(grants) >= 0.95 * 0.9 * 0.98 * requests * horizon / (window + ARRIVAL_MARGIN)


def _greedy_grants(gcra: Gcra, seconds: float) -> list[float]:
    """Every grant a sender that asks at the earliest moment the rule allows gets in
    ``seconds`` from an idle budget (its whole burst at 0, then the sustained pace)."""
    tat, now, grants = 0.0, 0.0, []
    while now < seconds:
        new = gcra.grant(tat, now)
        if new is None:  # asked a rounding error too early
            now += 1e-9
            continue
        grants.append(now)
        tat = new
        now = max(now, tat - gcra.tolerance)
    return grants


@pytest.mark.parametrize(("requests", "window"), [(1000, 1.0), (3000, 3.0), (40, 1.0), (38, 1.0)])
def test_gcra_arrivals_stay_under_the_limit_when_requests_lag_their_grants(
    requests: int, window: float
) -> None:
    """The worst case of arrival jitter on a fake clock: a greedy sender drains the burst at
    0 and goes on at the pace, and every request granted in the first ARRIVAL_MARGIN arrives
    ARRIVAL_MARGIN late, at the same moment as the ones granted on time just after it (each
    at most that late). The window of arrivals that starts there still holds no more than
    the 98% the budget aims at. Spaced over the window alone (no margin), the burst plus the
    margin's grants made 1024 arrivals in one second at 1000/1."""
    spec = RateSpec(requests, window)
    grants = _greedy_grants(Gcra.for_limit(spec), 3 * window)
    arrivals = [max(grant, ARRIVAL_MARGIN) for grant in grants]
    aimed_at = int(requests * 0.98 + 1e-9)
    assert most_in_window(arrivals, window) <= aimed_at < requests
    # Each grant's request went at most ARRIVAL_MARGIN late, and nothing was held back.
    assert all(0 <= a - g <= ARRIVAL_MARGIN for a, g in zip(arrivals, grants, strict=True))
    assert most_in_window(grants, window) >= 0.9 * aimed_at


def test_rate_spec_parse() -> None:
    assert RateSpec.parse("3000/3") == RateSpec(3000, 3.0)
    assert RateSpec.parse("40/1.5s") == RateSpec(40, 1.5)
    for bad in ("fast", "0/3", "10/0"):
        with pytest.raises(ValueError):
            RateSpec.parse(bad)


def test_shared_budget_needs_postgres(warehouse_url: str) -> None:
    engine = create_engine(warehouse_url)
    try:
        state = StateStore(engine)
        state.ensure_schema()
        with pytest.raises(ConfigError, match="PostgreSQL"):
            budget_for("shared", RateSpec(), "http://x", "site", state)
        with pytest.raises(ConfigError, match="CIO_RETL_RATE_BUDGET"):
            budget_for("everywhere", RateSpec(), "http://x", "site", state)
        assert not isinstance(
            budget_for("auto", RateSpec(), "http://x", "site", state), SharedRateBudget
        )
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_shared_budget_holds_across_threads_and_clients(pg_schemas: PgSchemas) -> None:
    """Twelve threads over three budget objects (three "processes") on one row of the state
    store, greedy for 3 s: the grants never exceed 200/1 s in any window, and the pace
    reaches the sustained 90% of the 98% aimed at (per 1.05 s, the window plus the arrival
    margin). On the database's clock no 1.05 s gets more than 195 (fewer than 196); timed
    here, as each acquire() returns, the threads' own jitter moves grants between windows,
    which the margin and the 2% headroom are for."""
    engine = create_engine(pg_schemas.url)
    try:
        state = StateStore(engine, schema=pg_schemas.state)
        state.ensure_schema()
        spec = RateSpec(200, 1.0)
        budgets = [SharedRateBudget(state, "ws", spec) for _ in range(3)]
        grants: list[float] = []
        lock = threading.Lock()
        start = time.monotonic()

        def greedy(budget: SharedRateBudget) -> None:
            while time.monotonic() - start < 3.0:
                budget.acquire()
                with lock:
                    grants.append(time.monotonic())

        threads = [threading.Thread(target=greedy, args=(b,)) for b in budgets * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.dispose()
    busiest = most_in_window(grants, spec.window)
    print(f"{len(grants)} grants in 3 s; busiest 1 s window: {busiest}")
    assert busiest <= spec.requests
    assert len(grants) >= 3 * 0.9 * 196 / 1.05 * 0.95  # the sustained pace, 5% for the last


LIMIT = (80, 2.0)  # 40 requests per second: small, so four processes hit it within seconds
# The processes are told 68/2 s: the shared budget grants at most 66 in any 2.05 s (its 2%
# headroom and its 50 ms arrival margin) at a sustained 29 a second, so 81 arrivals in one
# window need requests that reach the emulator half a second or more later than others
# granted around them. The skew is the scheduler's (four processes, the emulator and
# PostgreSQL on 2 cores), and it is time, not a share of the requests: at 40/1 s with a
# 34/1 budget (slack for a quarter of a second) a CI run whose tests took 2.6 times their
# usual time saw 41 arrivals in one second. Customer.io's limit, like the emulator's, counts
# arrivals, so the bound asserted stays the emulator's limit; a two-second window doubles
# the skew the same pace tolerates.
BUDGET = "68/2"


def _bucket_processes(
    env: dict[str, str], models: tuple[str, ...], count: int, batch: int
) -> list[subprocess.CompletedProcess[str]]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cio_retl",
                "sync",
                *models,
                "--bucket",
                f"{i}/{count}",
                "--batch-size",
                str(batch),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _pg_env(pg_schemas: PgSchemas, models: Path, emulator: Emulator, budget: str) -> dict[str, str]:
    return {
        **os.environ,
        "CIO_RETL_WAREHOUSE_URL": pg_schemas.url,
        "CIO_RETL_STATE_SCHEMA": pg_schemas.state,
        "CIO_RETL_MODELS_DIR": str(models),
        "CIO_TRACK_API_URL": emulator.url,
        "CIO_SITE_ID": SITE_ID,
        "CIO_API_KEY": API_KEY,
        "CIO_RETL_RATE_LIMIT": BUDGET,
        "CIO_RETL_RATE_BUDGET": budget,
    }


@pytest.mark.postgres
def test_four_processes_share_one_rate_budget_and_equal_one_run(
    pg_schemas: PgSchemas, tmp_path: Path
) -> None:
    """Four `cio-retl sync --bucket i/4` processes at once on PostgreSQL: the emulator, which
    enforces the limit and logs every request's arrival, never sees more than the limit in
    any window, and the workspace ends equal to the warehouse."""
    models, expected = demo_on_postgres(pg_schemas, tmp_path / "models")
    with Emulator(site_id=SITE_ID, api_key=API_KEY, rate_limit=LIMIT) as emulator:
        env = _pg_env(pg_schemas, models, emulator, "shared")
        for names in (ENTITIES, RELATIONSHIPS):  # relationships after every bucket of people
            for proc in _bucket_processes(env, names, 4, batch=5):
                assert proc.returncode == 0, proc.stderr
        assert actual_workspace(emulator) == expected
        requests = len(emulator.arrivals)
        assert requests > 3 * LIMIT[0]  # enough requests that the limit had to pace them
        busiest = emulator.max_requests_in(LIMIT[1])
        print(f"{requests} requests; busiest {LIMIT[1]:g} s window: {busiest}")
        assert busiest <= LIMIT[0]
        assert busiest >= 56  # and paced near the budget (66 per 2.05 s), not merely slow
        assert emulator.rate_limited == 0
        assert emulator.invalid_items == []


@pytest.mark.postgres
def test_without_the_shared_budget_four_processes_exceed_the_limit(
    pg_schemas: PgSchemas, tmp_path: Path
) -> None:
    """The control: each process keeping its own (exact) limit sends up to four times it."""
    models, _ = demo_on_postgres(pg_schemas, tmp_path / "models")
    with Emulator(site_id=SITE_ID, api_key=API_KEY) as emulator:  # logs, does not refuse
        env = _pg_env(pg_schemas, models, emulator, "local")
        for proc in _bucket_processes(env, ("users",), 4, batch=2):
            assert proc.returncode == 0, proc.stderr
        busiest = emulator.max_requests_in(LIMIT[1])
        print(f"{len(emulator.arrivals)} requests; busiest {LIMIT[1]:g} s window: {busiest}")
        assert busiest > LIMIT[0]
