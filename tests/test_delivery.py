"""Delivery that loses nothing: faults, partial failures, kills and overlapping runs.

Everything runs against the emulator (real HTTP on loopback) and real DuckDB files; retries
use tiny backoffs, never fixed sleeps.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from cio_retl.cli import exit_status
from cio_retl.client import RetryPolicy
from cio_retl.config import Secret, Settings
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.errors import LockedError
from cio_retl.state import StateStore
from cio_retl.sync import Outcome, SyncOptions, run_sync
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, REPO, SITE_ID, cli_env, duplicate_snapshot_keys
from tests.test_sync_duckdb import actual_workspace, batch_items, expected_workspace

PATIENT = RetryPolicy(max_attempts=15, base_delay=0.001, max_delay=0.01)


def patient_sync(settings: Settings, **options: object) -> object:
    return run_sync(settings, None, SyncOptions(retry=PATIENT, **options))  # type: ignore[arg-type]


def test_fault_storm_then_clean_run_converges(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    """10% 5xx, 429s with Retry-After, 2% dropped connections and 7 rejected keys."""
    with demo_engine.connect() as conn:
        emails = [
            r[0]
            for r in conn.execute(
                sa.text(
                    "SELECT email FROM demo.users WHERE deleted_at IS NULL ORDER BY user_id LIMIT 7"
                )
            )
        ]
    emulator.faults = FaultPlan(
        error_rate=0.10,
        throttle_rate=0.10,
        retry_after=0.01,
        drop_rate=0.02,
        reject_identifiers=frozenset(emails),
        seed=11,
    )
    # Small batches: many requests, so the fault rates really bite.
    report = run_sync(settings, None, SyncOptions(retry=PATIENT, max_in_flight=3, batch_items=10))
    statuses = {r.status for r in emulator.requests}
    assert {0, 429, 207} <= statuses and statuses & {500, 502, 503}
    assert report.outcome is Outcome.REJECTED and report.error is None
    users = next(m for m in report.models if m.model == "users")
    assert users.rejected == 7 and users.created == 490 - 7
    state = StateStore(demo_engine)
    assert sorted(r["key"] for r in state.rejections("users")) == sorted(emails)
    expected = expected_workspace(demo_engine)
    actual = actual_workspace(emulator)
    # Relationships of rejected people still went (Customer.io creates an empty person for
    # them), so compare the people who were not rejected.
    assert {e: a for e, a in actual["people"].items() if e not in emails} == {
        e: a for e, a in expected["people"].items() if e not in emails
    }
    assert actual["objects"] == expected["objects"]

    emulator.faults = FaultPlan()
    before = len(emulator.requests)
    again = patient_sync(settings)
    assert again.outcome is Outcome.SYNCED  # type: ignore[attr-defined]
    resent = {
        i["identifiers"].get("email")
        for i in batch_items(emulator, before)
        if i["type"] == "person" and i["action"] == "identify"
    }
    assert resent == set(emails)  # only what was not acknowledged
    assert actual_workspace(emulator) == expected
    assert state.rejections("users") == []


@pytest.mark.parametrize(("seed", "hold"), [(1, False), (2, True), (3, False), (4, True)])
def test_sigkill_at_random_points_then_rerun_is_exact(
    settings: Settings,
    demo_engine: Engine,
    emulator: Emulator,
    warehouse_url: str,
    seed: int,
    hold: bool,
) -> None:
    """Kill -9 anywhere in a run (slow emulator, small batches), rerun, compare everything.

    With ``hold`` the emulator stops answering at the kill point and the kill comes 1.5 s
    later: every acknowledgment is then over a second old, so the snapshot holds all of them
    but at most one batch."""
    demo_engine.dispose()
    batches = random.Random(seed).randint(1, 40)
    killed_after = kill_after_batches(warehouse_url, emulator, batches, hold=1.5 if hold else 0)

    engine = create_engine(warehouse_url)
    state = StateStore(engine)
    state.ensure_schema()
    acknowledged = sum(
        len(state.snapshot(m)) for m in ("companies", "users", "memberships", "devices")
    ) + len(state.sent_events_of("orders"))
    assert duplicate_snapshot_keys(engine) == []
    total = 40 + 490 + 506 + 128 + 635  # ... devices, orders (events)
    before = len(emulator.requests)
    assert patient_sync(settings).outcome is Outcome.SYNCED  # type: ignore[attr-defined]
    resent = len(batch_items(emulator, before))
    assert resent == total - acknowledged  # at most (here: exactly) the unacknowledged rows
    if hold:  # ... and the snapshot lags what Customer.io acknowledged by one batch at most
        assert total - killed_after <= resent <= total - killed_after + 25
    assert actual_workspace(emulator) == expected_workspace(engine)
    assert duplicate_snapshot_keys(engine) == []
    engine.dispose()


def kill_after_batches(
    warehouse_url: str, emulator: Emulator, batches: int, *options: str, hold: float = 0
) -> int:
    """Start ``cio-retl sync --batch-size 25 [options]`` against a slow emulator and kill -9
    it once ``batches`` requests reached the emulator (or it ended first); returns how many
    items the emulator had acknowledged by then. With ``hold``, the emulator answers nothing
    more from that point and the kill comes ``hold`` seconds later."""
    emulator.faults = FaultPlan(delay_seconds=0.02)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cio_retl", "sync", "--batch-size", "25", *options],
        env={**os.environ, **cli_env(warehouse_url, emulator.url)},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    start = len(emulator.requests)
    deadline = time.monotonic() + 60
    while len(emulator.requests) - start + emulator.in_flight < batches and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    if hold:
        emulator.faults = FaultPlan(delay_seconds=600)
        time.sleep(hold)
    acknowledged = acknowledged_items(emulator, start)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    emulator.faults = FaultPlan()
    return acknowledged


def acknowledged_items(emulator: Emulator, since: int = 0) -> int:
    """Items of the batches the emulator answered 200 to: what the client saw acknowledged."""
    return sum(
        r.n_items
        for r in emulator.requests[since:]
        if r.path == "/api/v2/batch" and r.status == 200
    )


def test_kill_after_a_second_of_waiting_resends_only_the_unacknowledged(
    emulator: Emulator, tmp_path: Path
) -> None:
    """130,000 people in batches of 500: once about 3,000 are acknowledged the emulator holds
    every further request, and the run is killed -9 a second and a half later, waiting for
    its batches in flight. Every acknowledgment is older than a second by then, so the rerun
    sends at most the rows never acknowledged (plus one batch); the sender that held
    acknowledgments until 5,000 rows piled up resent them all. (More rows than DuckDB's row
    group: a plan of fewer writes its snapshots as they are acknowledged, and records no
    ranges.)"""
    total, batch = 130_000, 500
    models = tmp_path / "models"
    models.mkdir()
    (models / "people.sql").write_text(
        "-- kind: person\n-- identifier: email\n-- key: email\n"
        f"select 'p' || i || '@example.com' as email, i % 7 as tier from range({total}) t(i)\n"
    )
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    duckdb.connect(
        str(tmp_path / "w.duckdb")
    ).close()  # the warehouse must exist: a sync never creates one
    env = {**os.environ, **cli_env(url, emulator.url), "CIO_RETL_MODELS_DIR": str(models)}
    emulator.faults = FaultPlan(delay_seconds=0.05)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cio_retl", "sync", "--batch-size", str(batch)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while acknowledged_items(emulator) < 2_500:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        emulator.faults = FaultPlan(delay_seconds=600)  # from now on nothing is answered
        time.sleep(1.5)
        assert proc.poll() is None and emulator.in_flight_on("/api/v2/batch") > 0
        acknowledged = acknowledged_items(emulator)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Under 5,000 (the old buffer), and at least one batch beyond the trigger was in flight.
    assert 2_500 <= acknowledged < 5_000
    # DuckDB writes the plan's rows into the snapshot a row group (122,880) at a time: what
    # the killed run had acknowledged is in its plan's recorded ranges, not yet a snapshot.
    state_engine = create_engine(url)
    with state_engine.connect() as conn:
        snapshot_rows = conn.execute(sa.text("SELECT COUNT(*) FROM cio_retl.snapshots")).scalar()
        recorded = conn.execute(
            sa.text("SELECT SUM(last_seq - first_seq + 1) FROM cio_retl.acknowledged_ranges")
        ).scalar()
        (plan,) = conn.execute(
            sa.text("SELECT DISTINCT plan FROM cio_retl.acknowledged_ranges")
        ).scalars()
    assert snapshot_rows == 0 and acknowledged - batch <= recorded <= acknowledged
    assert plan in sa.inspect(state_engine).get_table_names(schema="cio_retl")
    state_engine.dispose()
    emulator.faults = FaultPlan()
    before = len(emulator.requests)
    settings = Settings(
        warehouse_url=url,
        state_url=url,
        models_dir=models,
        track_api_url=emulator.url,
        site_id=SITE_ID,
        api_key=Secret(API_KEY),
    )
    assert patient_sync(settings).outcome is Outcome.SYNCED  # type: ignore[attr-defined]
    resent = len(batch_items(emulator, before))
    assert total - acknowledged <= resent <= total - acknowledged + batch
    assert resent == total - recorded  # the rerun wrote the recorded rows, sent the rest
    assert len(emulator.workspace.people) == total
    state_engine = create_engine(url)
    with state_engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT COUNT(*) FROM cio_retl.acknowledged_ranges")).scalar() == 0
        )
        assert (
            conn.execute(sa.text("SELECT COUNT(DISTINCT key) FROM cio_retl.snapshots")).scalar()
            == total
        )
    assert not [
        t
        for t in sa.inspect(state_engine).get_table_names(schema="cio_retl")
        if t.startswith("cio_plan_")
    ]
    assert duplicate_snapshot_keys(state_engine) == []
    state_engine.dispose()


@pytest.mark.parametrize("seed", [1, 2])
def test_kills_while_rewriting_snapshots_leave_each_key_once(
    settings: Settings, demo_engine: Engine, emulator: Emulator, warehouse_url: str, seed: int
) -> None:
    """Runs killed while they replace existing snapshot rows (updates, then a full resync)
    and a run bringing back users who left: each (model, key) stays one row on DuckDB,
    whose snapshot table has no primary key, and the rerun is exact."""
    assert patient_sync(settings).outcome is Outcome.SYNCED  # type: ignore[attr-defined]
    with demo_engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE demo.users SET plan = :p WHERE user_id % 2 = 0"), {"p": f"kill{seed}"}
        )
        conn.execute(sa.text("UPDATE demo.users SET deleted_at = now() WHERE user_id % 7 = 0"))
    demo_engine.dispose()
    rng = random.Random(seed)
    kill_after_batches(warehouse_url, emulator, rng.randint(2, 8))
    engine = create_engine(warehouse_url)
    assert duplicate_snapshot_keys(engine) == []
    with engine.begin() as conn:  # the users who left come back: created again
        conn.execute(sa.text("UPDATE demo.users SET deleted_at = NULL WHERE user_id % 7 = 0"))
    engine.dispose()
    kill_after_batches(warehouse_url, emulator, rng.randint(2, 30), "--full-resync")
    engine = create_engine(warehouse_url)
    assert duplicate_snapshot_keys(engine) == []
    assert patient_sync(settings).outcome is Outcome.SYNCED  # type: ignore[attr-defined]
    assert duplicate_snapshot_keys(engine) == []
    expected = expected_workspace(engine)
    assert actual_workspace(emulator) == expected
    state = StateStore(engine)
    assert len(state.snapshot("users")) == len(expected["people"])
    assert len(state.snapshot("companies")) == len(expected["objects"])
    engine.dispose()


def test_two_runs_at_once_in_one_process(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    """The lock row arbitrates: one run syncs, the other stops with a clear message."""
    # Each batch is held 0.5 s: the second run reaches the lock while the first holds it,
    # however slowly threads are scheduled on a loaded machine.
    emulator.faults = FaultPlan(delay_seconds=0.5)
    outcomes: list[object] = []

    def run() -> None:
        try:
            outcomes.append(patient_sync(settings))
        except LockedError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    locked = [o for o in outcomes if isinstance(o, LockedError)]
    assert len(locked) == 1 and "being synced by another run" in str(locked[0])
    assert exit_status(locked[0]) == 3
    emulator.faults = FaultPlan()
    assert patient_sync(settings).outcome is Outcome.SYNCED  # type: ignore[attr-defined]
    assert actual_workspace(emulator) == expected_workspace(demo_engine)


def test_two_processes_on_one_duckdb_file(
    settings: Settings, demo_engine: Engine, emulator: Emulator, warehouse_url: str
) -> None:
    """DuckDB admits one writing process: the second says so and exits 3, nothing sent."""
    demo_engine.dispose()
    # Each batch is held 5 s (three batches): the first run is still sending while the
    # second process starts up, even on a loaded machine.
    emulator.faults = FaultPlan(delay_seconds=5.0)
    env = {**os.environ, **cli_env(warehouse_url, emulator.url)}
    first = subprocess.Popen(
        [sys.executable, "-m", "cio_retl", "sync"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while emulator.in_flight_on("/api/v2/batch") == 0:
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    second = subprocess.run(
        [sys.executable, "-m", "cio_retl", "sync"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 3, second.stderr
    assert "in use by another process" in second.stderr
    assert API_KEY not in second.stderr + second.stdout
    assert first.poll() is None  # the refusal came while the first run was really running
    emulator.faults = FaultPlan()
    assert first.wait(timeout=120) == 0
    engine = create_engine(warehouse_url)
    assert actual_workspace(emulator) == expected_workspace(engine)
    engine.dispose()


mutation = st.one_of(
    st.tuples(st.just("plan"), st.integers(1, 60), st.sampled_from(["free", "pro", None])),
    st.tuples(st.just("delete_user"), st.integers(1, 60), st.none()),
    st.tuples(st.just("add_user"), st.integers(61, 80), st.sampled_from(["free", "pro"])),
    st.tuples(st.just("drop_membership"), st.integers(1, 60), st.none()),
    # A user who left comes back: a key forgotten or deleted is created again.
    st.tuples(st.just("restore_user"), st.integers(1, 60), st.none()),
)
faults = st.builds(
    FaultPlan,
    error_rate=st.sampled_from([0.0, 0.2]),
    throttle_rate=st.sampled_from([0.0, 0.2]),
    retry_after=st.just(0.001),
    drop_rate=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 1000),
)


@hsettings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.lists(mutation, max_size=5), faults, st.booleans()), min_size=1, max_size=4
    )
)
def test_random_mutations_under_random_faults_converge(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[list[tuple[str, int, object]], FaultPlan, bool]],
) -> None:
    """Changes, removals, returns and full resyncs under faults: the workspace converges,
    and after every run the snapshot holds each key once (no index enforces it on DuckDB)."""
    folder = tmp_path_factory.mktemp("prop")
    url = f"duckdb:///{folder / 'w.duckdb'}"
    engine = create_engine(url)
    from cio_retl.demo import DemoSize, create_demo_warehouse

    create_demo_warehouse(engine, DemoSize(users=60, companies=6, deleted_users=0))
    # Mirror mode, so users who leave the model leave Customer.io too and the two can be equal.
    models = folder / "models"
    models.mkdir()
    for path in (REPO / "sql").glob("*.sql"):
        text = path.read_text()
        if path.stem in ("users", "companies"):
            text = text.replace("-- kind:", "-- mode: mirror\n-- kind:", 1)
        (models / path.name).write_text(text)
    with Emulator(site_id=SITE_ID, api_key=API_KEY) as emu:
        settings = Settings(
            warehouse_url=url,
            state_url=url,
            models_dir=models,
            track_api_url=emu.url,
            site_id=SITE_ID,
            api_key=Secret(API_KEY),
        )
        flaky = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.002)
        for mutations, plan, full_resync in steps:
            with engine.begin() as conn:
                for action, user_id, value in mutations:
                    apply_mutation(conn, action, user_id, value)
            emu.faults = plan
            # A run under faults may give up (exit 1): the next run must pick up the rest.
            options = SyncOptions(retry=flaky, force=True, full_resync=full_resync)
            run_sync(settings, None, options)
            assert duplicate_snapshot_keys(engine) == []
        emu.faults = FaultPlan()
        final = run_sync(settings, None, SyncOptions(retry=PATIENT, force=True))
        assert final.outcome is Outcome.SYNCED, final
        assert actual_workspace(emu) == expected_workspace(engine)
        assert duplicate_snapshot_keys(engine) == []
    engine.dispose()


def apply_mutation(conn: sa.Connection, action: str, user_id: int, value: object) -> None:
    if action == "plan":
        conn.execute(
            sa.text("UPDATE demo.users SET plan = :v WHERE user_id = :u"),
            {"v": value, "u": user_id},
        )
    elif action == "delete_user":
        conn.execute(
            sa.text("UPDATE demo.users SET deleted_at = now() WHERE user_id = :u"), {"u": user_id}
        )
    elif action == "add_user":
        conn.execute(
            sa.text(
                "INSERT INTO demo.users (user_id, email, plan) SELECT :u, 'new' || :u || '@x.io', :v"
                " WHERE NOT EXISTS (SELECT 1 FROM demo.users WHERE user_id = :u)"
            ),
            {"u": user_id, "v": value},
        )
    elif action == "restore_user":
        conn.execute(
            sa.text("UPDATE demo.users SET deleted_at = NULL WHERE user_id = :u"), {"u": user_id}
        )
    else:
        conn.execute(sa.text("DELETE FROM demo.memberships WHERE user_id = :u"), {"u": user_id})
