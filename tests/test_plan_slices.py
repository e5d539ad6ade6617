"""One plan shared by the bucket runs of a model (cio_retl.plan_slices): a round of N bucket
runs plans the model once, each run sends its bucket's slice, and no slice is sent after
something else wrote its bucket."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl import plan_slices
from cio_retl.buckets import Bucket
from cio_retl.config import Settings
from cio_retl.demo import edit_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.models import load_models
from cio_retl.passes import PLAN
from cio_retl.plan import NARROW_JOIN, PlanDiff, plan_prefix
from cio_retl.plan_slices import RETIRED, SLICES_SUFFIX, SharedPlans
from cio_retl.state import StateStore, Workspace, locking
from cio_retl.sync import Outcome
from cio_retl.warehouse import Warehouse, create_engine
from tests.conftest import SITE_ID, PgSchemas, sync
from tests.test_events import Backend, backend, life_settings  # noqa: F401  (fixtures)
from tests.test_plan import plan_tables
from tests.test_postgres import expected_workspace as expected_on_postgres
from tests.test_postgres import pg_engine, pg_settings  # noqa: F401  (fixtures)
from tests.test_sync_duckdb import actual_workspace, batch_items, expected_workspace


def builds(seen: list[str]) -> int:
    """Plan tables built: statements that write a table's rows as the model joined with its
    snapshot (a CREATE TABLE AS; DuckDB's INSERT into the table it declared; a rerun's
    moved keys, the narrow join's temporary table, which its plan then reads)."""
    writes = ("CREATE TABLE", "TEMPORARY TABLE")
    return sum(
        1
        for s in seen
        if (any(w in s for w in writes) or s.startswith("INSERT INTO"))
        and any(f in s for f in PLAN)
    )


def round_of(settings: Settings, count: int, *models: str, **options: object) -> dict[str, int]:
    """Every bucket of ``count`` synced in turn; the items each sent."""
    sent = {}
    for index in range(count):
        report = sync(settings, *models, bucket=Bucket(index, count), **options)
        assert report.outcome is Outcome.SYNCED, report
        sent[report.bucket or ""] = sum(m.items_sent for m in report.models)
    return sent


def test_a_round_of_bucket_runs_plans_the_model_once(
    settings: Settings, demo_engine: Engine, emulator: Emulator, statements: list[str]
) -> None:
    sent = round_of(settings, 4, "users")

    assert builds(statements) == 1
    assert sum(sent.values()) == 490 and min(sent.values()) > 0
    assert actual_workspace(emulator)["people"] == expected_workspace(demo_engine)["people"]
    assert emulator.invalid_items == []
    assert plan_tables(demo_engine) == []  # the last slice's run dropped the shared plan

    # A round after edits: planned once again, and it sends exactly the edited rows.
    edits = edit_demo_warehouse(demo_engine)
    statements.clear()
    before = len(emulator.requests)
    round_of(settings, 4, "users")
    assert builds(statements) == 1
    assert any(NARROW_JOIN in s for s in statements)  # a rerun's shared plan: the narrow join
    people = [i for i in batch_items(emulator, before) if i["type"] == "person"]
    assert sorted(i["identifiers"]["email"] for i in people) == sorted(edits.users_changed)
    assert actual_workspace(emulator)["people"] == expected_workspace(demo_engine)["people"]
    assert plan_tables(demo_engine) == []


def test_a_bucket_synced_again_plans_anew(
    settings: Settings, demo_engine: Engine, emulator: Emulator, statements: list[str]
) -> None:
    """A slice is claimed once: the bucket's next run plans again, and sees what changed."""
    assert sync(settings, "users", bucket=Bucket(0, 2)).outcome is Outcome.SYNCED
    edits = edit_demo_warehouse(demo_engine)
    statements.clear()
    before = len(emulator.requests)

    again = sync(settings, "users", bucket=Bucket(0, 2))

    assert again.outcome is Outcome.SYNCED
    assert builds(statements) == 1
    mine = sorted(e for e in edits.users_changed if Bucket(0, 2).holds(e))
    people = [i for i in batch_items(emulator, before) if i["type"] == "person"]
    assert sorted(i["identifiers"]["email"] for i in people) == mine
    # Bucket 1 reads the newest plan, built after the edits: it sends its edited rows too.
    statements.clear()
    assert sync(settings, "users", bucket=Bucket(1, 2)).outcome is Outcome.SYNCED
    assert builds(statements) == 0
    assert actual_workspace(emulator)["people"] == expected_workspace(demo_engine)["people"]
    assert plan_tables(demo_engine) == []


def test_a_whole_model_run_drops_the_shared_plans(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    """Bucket 1's slice was planned before the whole model was synced: sent after it, it
    would resend its people (and insert snapshots that exist)."""
    assert sync(settings, "users", bucket=Bucket(0, 2)).outcome is Outcome.SYNCED
    assert plan_tables(demo_engine) != []  # bucket 1's slice is waiting for its run

    assert sync(settings, "users").outcome is Outcome.SYNCED
    assert plan_tables(demo_engine) == []
    before = len(emulator.requests)
    late = sync(settings, "users", bucket=Bucket(1, 2))

    assert late.outcome is Outcome.SYNCED
    assert batch_items(emulator, before) == []
    assert actual_workspace(emulator)["people"] == expected_workspace(demo_engine)["people"]


def test_a_run_of_another_count_drops_the_shared_plans(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    assert sync(settings, "users", bucket=Bucket(0, 2)).outcome is Outcome.SYNCED
    round_of(settings, 3, "users")

    assert plan_tables(demo_engine) == []
    before = len(emulator.requests)
    assert sync(settings, "users", bucket=Bucket(1, 2)).outcome is Outcome.SYNCED
    assert batch_items(emulator, before) == []
    assert actual_workspace(emulator)["people"] == expected_workspace(demo_engine)["people"]


def test_a_slice_is_claimed_only_while_its_plan_is_young(
    settings: Settings,
    demo_engine: Engine,
    emulator: Emulator,
    statements: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(plan_slices, "REUSE_SECONDS", 0)

    round_of(settings, 3, "users")

    assert builds(statements) == 3  # every run planned anew, and sent what it planned
    assert actual_workspace(emulator)["people"] == expected_workspace(demo_engine)["people"]
    assert plan_tables(demo_engine) == []


@pytest.fixture
def store(settings: Settings, demo_engine: Engine) -> Iterator[tuple[Warehouse, StateStore]]:
    assert sync(settings, "users").outcome is Outcome.SYNCED  # the state schema, snapshots
    edit_demo_warehouse(demo_engine)
    engine = create_engine(settings.warehouse_url)
    yield Warehouse(engine), StateStore(engine).bound(Workspace(SITE_ID))
    engine.dispose()


def slices_of(engine: Engine) -> dict[str, dict[int, str | None]]:
    """Each shared plan's slices: who claimed each bucket's."""
    found = {}
    with engine.connect() as conn:
        for name in plan_tables(engine):
            if name.endswith(SLICES_SUFFIX):
                rows = conn.execute(sa.text(f"SELECT bucket, claimed_by FROM cio_retl.{name}"))
                found[name] = dict(rows.all())
    return found


def test_a_plan_built_while_a_slice_is_sent_retires_that_bucket(
    settings: Settings, store: tuple[Warehouse, StateStore], demo_engine: Engine
) -> None:
    """Run a sends bucket 0's slice of the first plan; a rerun of bucket 1 builds a second
    plan meanwhile. Bucket 0's slice of the second plan was planned while run a was
    writing bucket 0: nobody may claim it."""
    warehouse, state = store
    (users,) = load_models(settings.models_dir, ["users"])

    def planned(run: str, index: int) -> PlanDiff:
        state.acquire_lock("users", run, Bucket(index, 4))
        differ = PlanDiff(warehouse, state, Bucket(index, 4), run_id=run)
        differ.count(users)
        return differ

    def done(run: str, differ: PlanDiff) -> None:
        assert differ.bucket is not None
        state.release_lock("users", run, differ.bucket)
        differ.close()

    a = planned("run-a", 0)
    b = planned("run-b", 1)
    ((first, slices),) = slices_of(demo_engine).items()
    assert slices == {0: "run-a", 1: "run-b", 2: None, 3: None}
    done("run-b", b)
    b2 = planned("run-b2", 1)  # bucket 1's slice is taken: a plan of its own, shared
    ((second, slices),) = [p for p in slices_of(demo_engine).items() if p[0] != first]
    assert slices == {0: RETIRED, 1: "run-b2", 2: None, 3: None}
    # The older plan's unclaimed slices are retired: the new plan is fresher.
    assert slices_of(demo_engine)[first] == {0: "run-a", 1: "run-b", 2: RETIRED, 3: RETIRED}
    c = planned("run-c", 2)
    assert slices_of(demo_engine)[second][2] == "run-c"
    for run, differ in (("run-a", a), ("run-b2", b2), ("run-c", c)):
        done(run, differ)
    d = planned("run-d", 3)
    done("run-d", d)
    assert plan_tables(demo_engine) == []  # every slice sent or retired: both plans dropped


def test_a_slice_sent_while_a_plan_was_built_is_left_out_of_it(
    store: tuple[Warehouse, StateStore], demo_engine: Engine
) -> None:
    """Run x ends its slice of bucket 0 while run y builds a plan: y's plan may hold bucket
    0 as it was before x wrote it, so its slice 0 is retired. A plan built after x ended
    keeps it."""
    _, state = store

    def plans(run: str) -> SharedPlans:
        shared = SharedPlans(state, "users", plan_prefix("users", None), 4, run)
        shared.survey()
        shared.begin_build()
        return shared

    x = plans("run-x")
    sent = x.register(x.name("00000000", "x" * 12), 0, {}, {}, 7)
    y = plans("run-y")  # y starts its build ...
    x.release(sent)  # ... x ends its slice meanwhile ...
    y.register(y.name("00000000", "y" * 12), 1, {}, {}, 7)  # ... y's build ends
    z = plans("run-z")  # z builds after x ended
    z.register(z.name("00000000", "z" * 12), 2, {}, {}, 7)

    claims = {name[-14:-2]: slices for name, slices in slices_of(demo_engine).items()}
    assert claims["y" * 12][0] == RETIRED
    assert claims["z" * 12] == {0: None, 1: RETIRED, 2: "run-z", 3: None}  # 1: y's, unended


def test_a_claim_the_lock_did_not_guard_is_not_taken(
    store: tuple[Warehouse, StateStore], demo_engine: Engine
) -> None:
    """y surveyed while plan P's slice 1 was free; x (whose lock was taken over as stale,
    say) registered plan Q meanwhile, which retired it. y's claim finds it taken and y
    plans anew, rather than sending P's slice 1 while Q's stays claimable."""
    _, state = store

    def shared(run: str) -> SharedPlans:
        return SharedPlans(state, "users", plan_prefix("users", None), 4, run)

    w = shared("run-w")
    w.survey()
    w.begin_build()
    w.register(w.name("00000000", "p" * 12), 0, {}, {}, 7)
    y = shared("run-y")
    y.survey()
    x = shared("run-x")
    x.survey()
    x.begin_build()
    x.register(x.name("00000000", "q" * 12), 2, {}, {}, 7)

    assert y.claim(1, "00000000") is None
    claims = {name[-14:-2]: slices for name, slices in slices_of(demo_engine).items()}
    assert claims["p" * 12][1] == RETIRED


@pytest.mark.parametrize(
    "backend", ["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_slice_planned_before_a_suppression_run_is_not_sent(
    backend: Backend,  # noqa: F811
    life_settings: Settings,  # noqa: F811
    emulator: Emulator,
) -> None:
    """An erasure synced between the plan's build and bucket 1's claim forgets the person's
    snapshot from another model's run: bucket 1 plans anew, and the person the erasure
    holds is not identified again."""
    users = [f"u{i}" for i in range(40)]
    backend.run("INSERT INTO {s}.users VALUES (:u, 'free')", [{"u": u} for u in users])
    assert sync(life_settings, "users").outcome is Outcome.SYNCED
    target = next(u for u in users if Bucket(1, 2).holds(u))
    backend.run("UPDATE {s}.users SET plan = 'pro' WHERE user_id = :u", {"u": target})
    assert sync(life_settings, "users", bucket=Bucket(0, 2)).outcome is Outcome.SYNCED
    backend.run("INSERT INTO {s}.erasures VALUES (:u)", {"u": target})
    assert sync(life_settings, "erasures").outcome is Outcome.SYNCED
    assert emulator.workspace.is_suppressed("id", target)
    before = len(emulator.requests)

    late = sync(life_settings, "users", bucket=Bucket(1, 2))

    assert late.outcome is Outcome.SYNCED
    people = [i for i in batch_items(emulator, before) if i["type"] == "person"]
    assert [i for i in people if i["identifiers"]["id"] == target] == []
    assert emulator.invalid_items == []


def test_counts_of_a_slice_equal_a_plan_of_the_bucket_alone(
    settings: Settings, store: tuple[Warehouse, StateStore]
) -> None:
    warehouse, state = store
    (users,) = load_models(settings.models_dir, ["users"])
    whole = PlanDiff(warehouse, state)
    total = whole.count(users)
    whole.close()
    parts = []
    for index in range(4):
        differ = PlanDiff(warehouse, state, Bucket(index, 4))
        parts.append(differ.count(users))
        differ.close()
    assert total.changed > 0
    for field in ("rows", "snapshot_rows", "new", "changed", "removed"):
        assert sum(getattr(p, field) for p in parts) == getattr(total, field), field


@pytest.mark.postgres
def test_postgres_round_plans_the_model_once(
    pg_settings: Settings,  # noqa: F811
    pg_schemas: PgSchemas,
    pg_engine: Engine,  # noqa: F811
    emulator: Emulator,
    statements: list[str],
) -> None:
    round_of(pg_settings, 4, "users", "companies")

    assert builds(statements) == 2  # one per model
    expected = expected_on_postgres(pg_engine, pg_schemas.warehouse)
    actual = actual_workspace(emulator)
    assert actual["people"] == expected["people"]
    assert actual["objects"] == expected["objects"]
    assert plan_tables(pg_engine, pg_schemas.state) == []


@pytest.mark.parametrize(
    "url_fixture",
    ["warehouse_url", pytest.param("postgres_url", marks=pytest.mark.postgres), "fakesnow_url"],
)
def test_the_database_clock_is_microseconds_since_the_epoch(
    url_fixture: str, request: pytest.FixtureRequest
) -> None:
    """Claims compare times of runs on different hosts by the state database's clock: the
    dialect's expression must be microseconds (REUSE_SECONDS is counted in them)."""
    engine = create_engine(request.getfixturevalue(url_fixture))
    try:
        state = StateStore(engine)
        with engine.connect() as conn:
            now = int(conn.execute(sa.text(f"SELECT {state.dialect.now_micros}")).scalar_one())
    finally:
        engine.dispose()
    assert abs(now / 1_000_000 - time.time()) < 60


def test_the_planning_lock_keeps_its_runs_locks_fresh(
    store: tuple[Warehouse, StateStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan's build is one long statement: while it runs, the planning lock and the
    run's bucket lock are refreshed, so neither looks abandoned to another run."""
    _, state = store
    monkeypatch.setattr(locking, "PLANNING_HEARTBEAT", dt.timedelta(milliseconds=50))
    state.acquire_lock("users", "run-a", Bucket(0, 4))

    def beats() -> dict[str, dt.datetime]:
        with state.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT model, heartbeat_at FROM cio_retl.locks"))
            return dict(rows.all())

    with state.planning("users", 4, "run-a"):
        first = beats()
        time.sleep(0.5)
        later = beats()
    assert set(first) == {"users#0/4", "users#plan/4"}
    assert all(later[name] > first[name] for name in first)
    assert set(beats()) == {"users#0/4"}  # the planning lock is given back
    state.release_lock("users", "run-a", Bucket(0, 4))
