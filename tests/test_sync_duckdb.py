"""End to end on the embedded warehouse: DuckDB demo models -> engine -> emulator.

The expected workspace is computed by DuckDB itself (epoch(), casts), independently of the
engine's Python normalization, so the two have to agree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.cli import exit_status
from cio_retl.config import Settings
from cio_retl.demo import edit_demo_warehouse
from cio_retl.dialects import DUCKDB_MEMORY_LIMIT
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.errors import FatalSendError, GuardrailError, LockedError, ModelError
from cio_retl.records import RejectionCode
from cio_retl.report import PlannedChanges
from cio_retl.state import (
    RejectionRow,
    SnapshotRow,
    StateStore,
    Workspace,
    rejections,
    snapshots,
)
from cio_retl.sync import Outcome, RunReport
from cio_retl.warehouse import create_engine
from tests.conftest import (
    API_KEY,
    REPO,
    SITE_ID,
    cli_env,
    duplicate_snapshot_keys,
    sync,
    with_models,
)

EXPECTED_PEOPLE = """
    SELECT email, first_name, last_name, plan, CAST(lifetime_value AS DOUBLE) AS lifetime_value,
           is_admin, CAST(epoch(created_at) AS BIGINT) AS created_at, preferences
    FROM demo.users WHERE deleted_at IS NULL
"""
EXPECTED_OBJECTS = """
    SELECT company_id, name, plan, seats, CAST(epoch(CAST(founded_on AS TIMESTAMP)) AS BIGINT) AS founded_on
    FROM demo.companies
"""
EXPECTED_RELATIONSHIPS = """
    SELECT u.email, m.company_id, m.role FROM demo.memberships m
    JOIN demo.users u USING (user_id) WHERE u.deleted_at IS NULL
"""


def expected_workspace(
    engine: Engine,
    people_sql: str = EXPECTED_PEOPLE,
    objects_sql: str = EXPECTED_OBJECTS,
    relationships_sql: str = EXPECTED_RELATIONSHIPS,
) -> dict[str, Any]:
    """The workspace the demo models should produce, computed by the database's own SQL
    (each warehouse's tests pass their dialect's queries)."""
    with engine.connect() as conn:
        people = {
            r["email"]: {k: v for k, v in r.items() if v is not None}
            for r in (row._asdict() for row in conn.execute(sa.text(people_sql)))
        }
        objects = {
            ("1", r["company_id"]): {
                **{k: v for k, v in r.items() if v is not None and k != "company_id"},
                "object_id": r["company_id"],
            }
            for r in (row._asdict() for row in conn.execute(sa.text(objects_sql)))
        }
        relationships = {
            (email, ("1", company)): {"role": role}
            for email, company, role in conn.execute(sa.text(relationships_sql))
        }
    return {"people": people, "objects": objects, "relationships": relationships}


def actual_workspace(emulator: Emulator) -> dict[str, Any]:
    ws = emulator.workspace
    people = ws.people_by("email")
    email_of = {cio_id: person.email for cio_id, person in ws.people.items()}
    relationships = {
        (email_of[cio_id], obj): attrs for (cio_id, obj), attrs in ws.relationships.items()
    }
    return {"people": people, "objects": dict(ws.objects), "relationships": relationships}


def batch_items(emulator: Emulator, since: int = 0) -> list[dict[str, Any]]:
    return [
        item
        for r in emulator.requests[since:]
        if r.path == "/api/v2/batch" and r.status in (200, 207)
        for item in (r.body or {}).get("batch", [])
    ]


def test_first_sync_equals_warehouse(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    report = sync(settings)
    assert report.outcome is Outcome.SYNCED, report
    expected = expected_workspace(demo_engine)
    actual = actual_workspace(emulator)
    assert actual["objects"] == expected["objects"]
    assert actual["people"] == expected["people"]
    assert actual["relationships"] == expected["relationships"]
    assert len(expected["people"]) == 490 and len(expected["relationships"]) > 400
    by_model = {m.model: m for m in report.models}
    assert by_model["users"].created == 490
    assert by_model["companies"].created == 40
    assert by_model["memberships"].created == len(expected["relationships"])
    assert emulator.invalid_items == []
    # One ordered changeset: all objects, then all people, then relationships.
    # One ordered changeset: objects, people, devices, relationships, then events.
    kinds = [(i["type"], i["action"]) for i in batch_items(emulator)]
    assert [k for n, k in enumerate(kinds) if n == 0 or kinds[n - 1] != k] == [
        ("object", "identify"),
        ("person", "identify"),
        ("person", "add_device"),
        ("person", "add_relationships"),
        ("person", "event"),
    ]
    # Every order of an active user is one event, its time as DuckDB floors it to seconds.
    with demo_engine.connect() as conn:
        orders = {
            (email, order_id): (seconds, float(total))
            for email, order_id, seconds, total in conn.execute(
                sa.text(
                    "SELECT u.email, o.order_id, CAST(floor(epoch_ms(o.completed_at) / 1000)"
                    " AS BIGINT), o.total FROM demo.orders o JOIN demo.users u USING (user_id)"
                    " WHERE u.deleted_at IS NULL"
                )
            )
        }
        devices = {
            (email, token): platform
            for email, token, platform in conn.execute(
                sa.text(
                    "SELECT u.email, d.device_token, d.platform FROM demo.devices d"
                    " JOIN demo.users u USING (user_id) WHERE u.deleted_at IS NULL"
                )
            )
        }
    events = emulator.workspace.events("email")
    assert sum(len(e) for e in events.values()) == len(orders) == by_model["orders"].created
    assert sorted(
        (email, e["timestamp"], e["attributes"]["total"])
        for email, es in events.items()
        for e in es
    ) == sorted((email, at, total) for (email, _), (at, total) in orders.items())
    assert {
        (email, token): d["platform"]
        for email, ds in emulator.workspace.devices("email").items()
        for token, d in ds.items()
    } == devices


def test_second_sync_sends_only_the_edits_and_third_sends_nothing(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    assert sync(settings).outcome is Outcome.SYNCED
    edits = edit_demo_warehouse(demo_engine)
    before = len(emulator.requests)

    second = sync(settings)

    assert second.outcome is Outcome.SYNCED
    items = batch_items(emulator, before)
    assert len(items) == edits.entities == 8
    (event,) = [i for i in items if i["action"] == "event"]  # the new order; not the edited one
    assert event["name"] == "order_completed" and event["attributes"]["total"] == 129.99
    (device,) = [i for i in items if i["action"] == "add_device"]
    assert device["device"]["token"] == edits.devices_changed[0]
    assert device["device"]["attributes"] == {"app_version": "4.0.0"}
    people = [i for i in items if i["type"] == "person" and i["action"] == "identify"]
    assert sorted(i["identifiers"]["email"] for i in people) == sorted(edits.users_changed)
    for item in people:
        # Only what changed: the identifier travels in `identifiers`; its attribute copy
        # (RudderStack's mappedToDestination) went with the create and has not changed.
        assert set(item["attributes"]) in ({"plan", "lifetime_value"}, {"first_name"})
    cleared = next(i for i in people if "first_name" in i["attributes"])
    assert cleared["attributes"]["first_name"] == ""  # the API's removal form
    company = next(i for i in items if i["type"] == "object")
    assert set(company["attributes"]) == {"name"}
    removed = next(i for i in items if i["action"] == "delete_relationships")
    assert removed["identifiers"] == {"email": edits.memberships_removed[0][0]}
    assert actual_workspace(emulator) == expected_workspace(demo_engine)
    # NULL removed the attribute; the membership left the workspace.
    assert (
        "first_name" not in emulator.workspace.people_by("email")[cleared["identifiers"]["email"]]
    )
    email, company_id = edits.memberships_removed[0]
    assert (email, ("1", company_id)) not in actual_workspace(emulator)["relationships"]

    before = len(emulator.requests)
    third = sync(settings)
    assert third.outcome is Outcome.SYNCED
    assert emulator.requests[before:] == [] or all(
        r.path != "/api/v2/batch" for r in emulator.requests[before:]
    )
    assert sum(m.items_sent for m in third.models) == 0
    assert {m.model: m.unchanged for m in third.models} == {m.model: m.rows for m in third.models}


def test_unacknowledged_rows_stay_out_of_the_snapshot(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    emulator.faults = FaultPlan(error_rate=1.0)
    report = sync(settings)
    assert report.outcome is Outcome.INTERRUPTED
    assert report.error and "resent on the next run" in report.error
    assert emulator.workspace.people == {}
    state = StateStore(demo_engine)
    assert state.snapshot("companies") == {}
    assert state.snapshot("users") == {}

    emulator.faults = FaultPlan()
    assert sync(settings).outcome is Outcome.SYNCED
    assert actual_workspace(emulator) == expected_workspace(demo_engine)


def test_item_rejected_by_customerio_is_recorded_and_retried(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    bad = "grace.dijkstra.11@example.com"
    emulator.faults = FaultPlan(reject_identifiers=frozenset({bad}))
    report = sync(settings, "users")
    users = report.models[0]
    assert report.outcome is Outcome.REJECTED and report.error is None
    assert users.rejected == 1 and users.created == 489
    assert users.rejections == [(bad, "invalid: rejected by fault plan [identifiers] (HTTP 207)")]
    state = StateStore(demo_engine)
    assert bad not in state.snapshot("users")
    [row] = state.rejections("users")
    assert row["key"] == bad and row["status"] == 207 and row["field"] == "identifiers"
    assert "pro" not in (row["payload"] or "") and "<str>" in (row["payload"] or "")  # redacted

    emulator.faults = FaultPlan()
    before = len(emulator.requests)
    retry = sync(settings, "users")
    assert retry.outcome is Outcome.SYNCED
    assert [i["identifiers"]["email"] for i in batch_items(emulator, before)] == [bad]
    assert state.rejections("users") == []
    assert bad in state.snapshot("users")


def test_dry_run_and_plan_send_nothing(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    report = sync(settings, dry_run=True)
    assert [r for r in emulator.requests if r.path == "/api/v2/batch"] == []
    by_model = {m.model: m for m in report.models}
    assert {m.model: m.created for m in report.models} == {
        "companies": 40,
        "users": 490,
        "devices": by_model["devices"].rows,
        "memberships": by_model["memberships"].rows,
        "orders": by_model["orders"].rows,
    }
    assert by_model["users"].samples[0]["action"] == "identify"
    assert by_model["orders"].samples[0]["action"] == "event"
    assert not StateStore(demo_engine).exists()  # nothing written: not even the state schema
    # A dry run needs no credentials at all.
    from dataclasses import replace

    anonymous = replace(settings, site_id=None, api_key=None)
    assert sync(anonymous, "users", dry_run=True).models[0].created == 490


def test_full_resync_sends_every_row_in_full(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    sync(settings, "users")
    before = len(emulator.requests)
    report = sync(settings, "users", full_resync=True)
    items = batch_items(emulator, before)
    assert len(items) == 490 and report.models[0].updated == 490
    assert all({"plan", "created_at", "email"} <= set(i["attributes"]) for i in items)


def test_bad_credentials_stop_the_run_without_leaking_the_key(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    from dataclasses import replace

    from cio_retl.config import Secret

    wrong = replace(settings, api_key=Secret("wrong-key-123"))
    with pytest.raises(FatalSendError) as caught:
        sync(wrong)
    assert "credentials" in str(caught.value)
    assert "wrong-key-123" not in str(caught.value) and API_KEY not in str(caught.value)
    assert [r for r in emulator.requests if r.path == "/api/v2/batch"] == []
    assert "wrong-key-123" not in repr(wrong)


def test_secrets_never_reach_state_tables(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    emulator.faults = FaultPlan(reject_identifiers=frozenset({"grace.dijkstra.11@example.com"}))
    sync(settings)
    # The Site ID is not a secret: it names the workspace a row belongs to, and only there.
    named_by = {"workspace", "site_id"}
    with demo_engine.connect() as conn:
        for table in ("snapshots", "runs", "rejections", "locks", "workspaces"):
            rows = conn.execute(sa.text(f"SELECT * FROM cio_retl.{table}")).mappings().all()
            assert rows or table == "locks"
            for row in rows:
                assert API_KEY not in str(tuple(row.values()))
                assert {c for c, v in row.items() if SITE_ID in str(v)} <= named_by


def write_model(folder: Path, name: str, text: str) -> None:
    (folder / f"{name}.sql").write_text(text)


PEOPLE_TABLE = """
    CREATE OR REPLACE TABLE main.people AS
    SELECT * FROM (VALUES ('u1', 'a@x.io', 'pro'), ('u2', 'b@x.io', 'free'), ('u3', 'c@x.io', 'pro'))
    AS t(user_id, email, plan)
"""


@pytest.mark.parametrize("mode", ["upsert", "mirror"])
def test_rows_leaving_a_model(
    settings: Settings, models_dir: Path, demo_engine: Engine, emulator: Emulator, mode: str
) -> None:
    with demo_engine.begin() as conn:
        conn.execute(sa.text(PEOPLE_TABLE))
    write_model(
        models_dir,
        "people",
        f"-- kind: person\n-- identifier: id\n-- key: user_id\n-- mode: {mode}\n"
        "select user_id, email, plan from main.people\n",
    )
    s = with_models(settings, models_dir)
    assert sync(s).models[0].created == 3
    assert emulator.workspace.person(id="u2") is not None
    with demo_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM main.people WHERE user_id = 'u2'"))
    if mode == "mirror":
        # 1 of 3 is over the default max_delete_pct of 10: nothing is sent without --force.
        before = len(emulator.requests)
        with pytest.raises(GuardrailError) as caught:
            sync(s)
        assert exit_status(caught.value) == 3
        assert "1 of 3 synced rows (33.3%) would be deleted, over max_delete_pct 10" in str(
            caught.value
        )
        assert [r for r in emulator.requests[before:] if r.path == "/api/v2/batch"] == []
        assert sync(s, dry_run=True).outcome is Outcome.STOPPED  # a plan shows it too
        report = sync(s, force=True)
    else:
        report = sync(s)
    if mode == "mirror":
        assert report.models[0].deleted == 1
        assert emulator.workspace.person(id="u2") is None
    else:
        assert report.models[0].deleted == 0
        assert emulator.workspace.person(id="u2") is not None  # upsert never deletes
    assert "u2" not in StateStore(demo_engine).snapshot("people")
    # The row coming back is new again: sent in full.
    with demo_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO main.people VALUES ('u2', 'b@x.io', 'free')"))
    assert sync(s).models[0].created == 1


def test_bad_rows_are_rejected_alone(
    settings: Settings, models_dir: Path, demo_engine: Engine, emulator: Emulator
) -> None:
    with demo_engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE OR REPLACE TABLE main.people AS SELECT * FROM (VALUES"
                " ('ok1', 'fine', NULL), ('dup', 'one', NULL), ('dup', 'two', NULL),"
                " (NULL, 'no key', NULL), ('bin', 'x', '\\xAA'::BLOB),"
                " ('long', repeat('x', 1001), NULL), ('ok2', repeat('y', 1000), NULL))"
                " AS t(user_id, note, payload)"
            )
        )
    write_model(
        models_dir,
        "people",
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect * from main.people\n",
    )
    report = sync(with_models(settings, models_dir))
    people = report.models[0]
    assert report.outcome is Outcome.REJECTED
    assert people.created == 2
    assert people.rejected == 5
    reasons = dict(people.rejections)
    assert "2 rows share this key" in reasons["dup"]
    assert "is NULL" in reasons[None]
    assert "binary" in reasons["bin"]
    assert "1001 bytes, over the 1000-byte limit" in reasons["long"]
    assert set(emulator.workspace.people_by("id")) == {"ok1", "ok2"}
    assert emulator.invalid_items == []
    assert {r["key"] for r in StateStore(demo_engine).rejections("people")} == {
        "dup",
        "bin",
        "long",
    }


def test_model_error_stops_before_anything_is_sent(
    settings: Settings, models_dir: Path, demo_engine: Engine, emulator: Emulator
) -> None:
    write_model(
        models_dir,
        "good",
        "-- kind: person\n-- identifier: id\n-- key: user_id\nselect 1 as user_id\n",
    )
    write_model(
        models_dir,
        "broken",
        "-- kind: person\n-- identifier: id\n-- key: missing\nselect 1 as user_id\n",
    )
    with pytest.raises(ModelError) as caught:
        sync(with_models(settings, models_dir))
    # The header line that names the missing key (`-- key: missing`), not the SELECT.
    assert "broken.sql:3" in str(caught.value) and "missing" in str(caught.value)
    assert emulator.requests == []


def test_a_held_lock_stops_the_run(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    state = StateStore(demo_engine)
    state.ensure_schema()
    state.acquire_lock("users", "other-run")
    with pytest.raises(LockedError) as caught:
        sync(settings, "users")
    assert "being synced by another run" in str(caught.value) and exit_status(caught.value) == 3
    assert [r for r in emulator.requests if r.path == "/api/v2/batch"] == []
    state.release_lock("users", "other-run")
    assert sync(settings, "users").outcome is Outcome.SYNCED


def test_a_refused_approval_sends_nothing_and_records_the_run_as_stopped(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    """``SyncOptions.approve`` is asked once the run is planned and before its first batch,
    with every model's plan and guardrail verdict, even when forced. Refused: nothing is
    sent or acknowledged, the locks are released, the run is recorded as stopped with why,
    and the report's outcome is STOPPED (the command line's exit 3)."""
    assert sync(settings).outcome is Outcome.SYNCED
    edits = edit_demo_warehouse(demo_engine)
    with demo_engine.begin() as conn:
        conn.execute(sa.text("update demo.users set plan = plan || '-v2'"))  # over the guardrail
    snapshot = StateStore(demo_engine).bound(Workspace(SITE_ID)).snapshot("users")
    before = len(emulator.requests)
    seen: dict[str, tuple[PlannedChanges | None, str | None]] = {}

    def refuse(plan: RunReport) -> list[str]:
        assert not plan.dry_run and plan.workspace == SITE_ID
        seen.update({m.model: (m.plan, m.guardrail) for m in plan.models})
        return ["users: looks wrong"]

    report = sync(settings, force=True, approve=refuse)
    assert report.outcome is Outcome.STOPPED and report.blocked == ["users: looks wrong"]
    users, guardrail = seen["users"]
    rows = report.models[[m.model for m in report.models].index("users")].rows
    assert users is not None and (users.creates, users.updates) == (0, rows)  # all changed
    assert guardrail is not None and "max_change_pct" in guardrail  # forced: still judged
    memberships, _ = seen["memberships"]
    assert memberships is not None and memberships.deletes == len(edits.memberships_removed)
    assert [r for r in emulator.requests[before:] if r.path == "/api/v2/batch"] == []
    assert StateStore(demo_engine).bound(Workspace(SITE_ID)).snapshot("users") == snapshot
    run_id = report.run_id
    with demo_engine.connect() as conn:
        runs = conn.execute(
            sa.text("select status, error from cio_retl.runs where run_id = :r"), {"r": run_id}
        ).all()
        locks = conn.execute(sa.text("select count(*) from cio_retl.locks")).scalar_one()
    assert len(runs) == len(report.models) and locks == 0
    assert {(r.status, r.error) for r in runs} == {("stopped", "users: looks wrong")}

    # Approved, the same run goes on and sends what it planned; without force the engine's
    # guardrail still stops what an approval let through.
    with pytest.raises(GuardrailError):
        sync(settings, approve=lambda plan: [])
    assert sync(settings, force=True, approve=lambda plan: []).outcome is Outcome.SYNCED
    sent = rows + edits.entities - len(edits.users_changed)
    assert len(batch_items(emulator, before)) == sent


def test_an_approval_that_fails_records_the_run_as_failed(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    def broken(plan: RunReport) -> list[str]:
        raise RuntimeError("a bug in the caller's checks")

    with pytest.raises(RuntimeError):
        sync(settings, "users", approve=broken)
    with demo_engine.connect() as conn:
        (run,) = conn.execute(sa.text("select status, error from cio_retl.runs")).all()
        locks = conn.execute(sa.text("select count(*) from cio_retl.locks")).scalar_one()
    assert run.status == "failed" and "RuntimeError" in run.error and locks == 0
    assert [r for r in emulator.requests if r.path == "/api/v2/batch"] == []


def test_sigkill_mid_send_loses_nothing(
    settings: Settings, demo_engine: Engine, emulator: Emulator, warehouse_url: str
) -> None:
    """A real process killed while Customer.io holds its request: the rerun converges."""
    demo_engine.dispose()  # DuckDB: one writing process per file
    emulator.faults = FaultPlan(delay_seconds=30)
    env = {**os.environ, **cli_env(warehouse_url, emulator.url)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cio_retl", "sync"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while emulator.in_flight_on("/api/v2/batch") == 0:  # the first batch is held there
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sync never sent a batch"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    emulator.faults = FaultPlan()
    engine = demo_engine.engine
    state = StateStore(engine)
    assert state.snapshot("companies") == {}  # nothing was acknowledged
    assert sync(settings).outcome is Outcome.SYNCED
    assert actual_workspace(emulator) == expected_workspace(engine)


def _primary_keys(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM duckdb_constraints() WHERE schema_name = 'cio_retl'"
                    " AND table_name = :t AND constraint_type = 'PRIMARY KEY'"
                ),
                {"t": table},
            ).scalar_one()
        )


def test_snapshot_table_has_no_primary_key_on_duckdb(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    """Nor has the rejections table: an ART index cannot spill to disk (out of memory near
    8.8M keys at 512MB); the small state tables keep theirs."""
    assert sync(settings).outcome is Outcome.SYNCED
    assert _primary_keys(demo_engine, "snapshots") == 0
    assert _primary_keys(demo_engine, "rejections") == 0
    assert _primary_keys(demo_engine, "locks") == 1
    with demo_engine.connect() as conn:
        nullable = dict(
            conn.execute(
                sa.text(
                    "SELECT column_name, is_nullable FROM information_schema.columns"
                    " WHERE table_schema = 'cio_retl' AND table_name = 'snapshots'"
                )
            ).all()
        )
    assert nullable["model"] == nullable["key"] == "NO"


def test_snapshot_table_keyed_by_an_older_version_is_rebuilt_without_its_key(
    settings: Settings, demo_engine: Engine, emulator: Emulator
) -> None:
    """State written by a version whose DuckDB snapshots had PRIMARY KEY (model, key): the
    next run copies it into an unkeyed table, keeps every row, and sends only the edits."""
    assert sync(settings).outcome is Outcome.SYNCED
    state = StateStore(demo_engine).bound(Workspace(SITE_ID))
    with demo_engine.begin() as conn:  # a rejection to carry over
        state.record_rejections(
            conn,
            "users",
            "old-run",
            [
                RejectionRow(
                    "u-gone", RejectionCode.INVALID_IDENTIFIER, "a reason", "email", None, "{}"
                )
            ],
        )
    with demo_engine.begin() as conn:  # the tables as the older version created them
        for table in (snapshots, rejections):
            name = f"cio_retl.{table.name}"
            conn.execute(sa.text(f"ALTER TABLE {name} RENAME TO {table.name}_before"))
            table.create(conn)
            conn.execute(sa.text(f"INSERT INTO {name} SELECT * FROM {name}_before"))
            conn.execute(sa.text(f"DROP TABLE {name}_before"))
    assert _primary_keys(demo_engine, "snapshots") == 1
    assert _primary_keys(demo_engine, "rejections") == 1
    before_rows = {m: state.snapshot(m) for m in ("companies", "users", "memberships")}
    edits = edit_demo_warehouse(demo_engine)
    before = len(emulator.requests)

    assert sync(settings).outcome is Outcome.SYNCED

    assert _primary_keys(demo_engine, "snapshots") == 0
    assert _primary_keys(demo_engine, "rejections") == 0
    assert [(r["key"], r["reason"]) for r in state.rejections("users")] == [("u-gone", "a reason")]
    assert len(batch_items(emulator, before)) == edits.entities
    assert actual_workspace(emulator) == expected_workspace(demo_engine)
    after_rows = {m: state.snapshot(m) for m in before_rows}
    changed = set(edits.users_changed)
    assert {k: v for k, v in after_rows["users"].items() if k not in changed} == {
        k: v for k, v in before_rows["users"].items() if k not in changed
    }
    assert duplicate_snapshot_keys(demo_engine) == []
    before = len(emulator.requests)
    assert sync(settings).outcome is Outcome.SYNCED
    assert batch_items(emulator, before) == []


def test_saving_snapshots_keeps_one_row_per_key(demo_engine: Engine) -> None:
    """Creates (no lookup), rewrites (delete + insert) and a key repeated in one batch."""
    state = StateStore(demo_engine).bound(Workspace(SITE_ID))
    state.ensure_schema()

    def rows(keys: range, fp: str, *, new: bool) -> list[SnapshotRow]:
        return [SnapshotRow(f"k{i}", fp, "{}", "{}", new=new) for i in keys]

    with demo_engine.begin() as conn:
        state.save_snapshots(conn, "m", "r1", rows(range(100), "a", new=True))
    with demo_engine.begin() as conn:
        # k50-k149 rewritten; k140-k149 repeated in the batch (the last one wins, though it
        # claims to be new); k150-k159 created.
        batch = rows(range(50, 150), "b", new=False) + rows(range(140, 160), "c", new=True)
        state.save_snapshots(conn, "m", "r2", batch)
    snapshot = state.snapshot("m")
    assert duplicate_snapshot_keys(demo_engine) == []
    assert len(snapshot) == 160
    assert {k: v["fingerprint"] for k, v in snapshot.items()} == {
        **{f"k{i}": "a" for i in range(50)},
        **{f"k{i}": "b" for i in range(50, 140)},
        **{f"k{i}": "c" for i in range(140, 160)},
    }
    assert {v["run_id"] for v in snapshot.values() if v["fingerprint"] == "a"} == {"r1"}


def _memory_limit(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT current_setting('memory_limit')")).scalar_one())


def test_duckdb_gets_a_default_memory_limit_and_the_url_wins(tmp_path: Path) -> None:
    """DuckDB runs in our process: bounded by default so its joins spill instead of growing
    our RSS; a URL's own memory_limit (or its alias max_memory) is kept."""
    path = tmp_path / "w.duckdb"
    expected = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY_LIMIT})
    default = expected.execute("SELECT current_setting('memory_limit')").fetchone()
    expected.close()
    engine = create_engine(f"duckdb:///{path}")
    assert (_memory_limit(engine),) == default
    engine.dispose()
    for query in ("memory_limit=2GB", "max_memory=2GB"):
        engine = create_engine(f"duckdb:///{path}?{query}")
        assert _memory_limit(engine) == "1.8 GiB"
        engine.dispose()


def test_default_memory_limit_does_not_clash_with_another_open_engine(tmp_path: Path) -> None:
    """The limit is SET on connect, not given as a connect-time config: DuckDB refuses a
    second connection to a file this process holds open with another configuration, such
    as a plain SQLAlchemy engine of the user's own code."""
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    theirs = sa.create_engine(url)
    try:
        with theirs.connect() as held:
            held.execute(sa.text("CREATE TABLE t AS SELECT 1 AS x"))
            held.commit()
            engine = create_engine(url)
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT x FROM t")).scalar_one() == 1
            engine.dispose()
    finally:
        theirs.dispose()
