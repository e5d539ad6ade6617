"""The Dagster adapter end to end: definitions, lineage, checks, automation, and
materializations against the emulator and a real DuckDB warehouse. Resources get explicit
values, never the developer's env.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.errors import ModelError
from cio_retl.passes import counted_passes
from cio_retl.warehouse import create_engine
from dagster_cio_retl import assets as assets_module
from dagster_cio_retl.assets import (
    GUARDRAILS,
    MODEL_VALID,
    NO_STUCK_ROWS,
    OP_NAME,
    POOL,
    UNIQUE_KEYS,
    SyncConfig,
    build_model_assets,
)
from dagster_cio_retl.definitions import (
    AUTOMATION_SENSOR_NAME,
    JOB_NAME,
    build_definitions,
    group_job_name,
    group_schedule_name,
)
from dagster_cio_retl.resources import PROJECT_ROOT, CustomerIOResource, WarehouseResource
from tests.conftest import sql_rows, sql_run

pytestmark = pytest.mark.dagster

SQL_DIR = PROJECT_ROOT / "sql"
SITE_ID = "dagster-site"
API_KEY = "dagster-secret-key-0123456789"
USERS = dg.AssetKey(["customerio", "users"])
COMPANIES = dg.AssetKey(["customerio", "companies"])
MEMBERSHIPS = dg.AssetKey(["customerio", "memberships"])
NO_DELAY = dg.RetryPolicy(max_retries=1, delay=0)


@dataclass
class Env:
    emulator: Emulator
    url: str

    def resources(
        self, *, site_id: str | None = SITE_ID, api_key: str | None = API_KEY
    ) -> dict[str, Any]:
        return {
            "customerio": CustomerIOResource(
                site_id=site_id, api_key=api_key, track_api_url=self.emulator.url
            ),
            "warehouse": WarehouseResource(warehouse_url=self.url, models_dir=str(SQL_DIR)),
        }

    def query(self, sql: str) -> list[sa.Row[Any]]:
        return sql_rows(self.url, sql)

    def execute(self, sql: str) -> None:
        sql_run(self.url, sql)

    def batch_items(self, since: int = 0) -> list[dict[str, Any]]:
        return [
            item
            for request in self.emulator.requests[since:]
            if request.path == "/api/v2/batch"
            for item in (request.body or {}).get("batch", [])
        ]


@pytest.fixture(scope="module")
def assets() -> list[dg.AssetsDefinition]:
    return build_model_assets(SQL_DIR, retry_policy=NO_DELAY)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    engine = create_engine(url)
    create_demo_warehouse(engine)
    engine.dispose()
    with Emulator(site_id=SITE_ID, api_key=API_KEY) as emulator:
        yield Env(emulator, url)


def materialize(
    assets: Sequence[dg.AssetsDefinition],
    resources: Mapping[str, Any],
    config: SyncConfig | None = None,
    *,
    selection: Sequence[dg.AssetKey] | None = None,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        resources=resources,
        run_config=dg.RunConfig(ops={OP_NAME: config or SyncConfig()}),
        selection=selection,
        raise_on_error=False,
    )


def materialize_logged(
    assets: Sequence[dg.AssetsDefinition], resources: Mapping[str, Any]
) -> tuple[dg.ExecuteInProcessResult, list[Any]]:
    """A materialization of ``assets`` (default config) on an instance of its own, and the
    run's log entries."""
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        assets,
        resources=resources,
        run_config=dg.RunConfig(ops={OP_NAME: SyncConfig()}),
        instance=instance,
    )
    return result, list(instance.all_logs(result.run_id))


def metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict[str, Any]:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == key]
    return {name: value.value for name, value in event.materialization.metadata.items()}


def observed(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict[str, Any]:
    """The metadata of the run's one observation of ``key`` (a dry run's plan)."""
    (event,) = [
        e.asset_observation_data.asset_observation
        for e in result.all_events
        if e.is_asset_observation and e.asset_key == key
    ]
    return {name: value.value for name, value in event.metadata.items()}


def checks(result: dg.ExecuteInProcessResult) -> dict[tuple[dg.AssetKey, str], Any]:
    """Every check evaluation of the run by (asset key, check name)."""
    return {(e.asset_key, e.check_name): e for e in result.get_asset_check_evaluations()}


def failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    return [
        event.step_failure_data.error.message
        for event in result.get_step_failure_events()
        if event.step_failure_data.error is not None
    ]


def attempts(result: dg.ExecuteInProcessResult) -> int:
    return 1 + sum(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


def copy_models(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in SQL_DIR.glob("*.sql"):
        (folder / path.name).write_text(path.read_text())
    return folder


# -- definitions ---------------------------------------------------------------------------


def test_definitions_load_without_any_environment() -> None:
    defs = build_definitions({})
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    assert set(specs) == {dg.AssetKey(["customerio", p.stem]) for p in SQL_DIR.glob("*.sql")}
    assert {spec.group_name for spec in specs.values()} == {"customerio"}
    assert specs[USERS].description == "Active users as Customer.io people, identified by email."
    assert specs[USERS].tags["cio_retl/kind"] == "person"
    assert specs[USERS].tags["cio_retl/mode"] == "upsert"
    assert specs[COMPANIES].tags["cio_retl/object_type_id"] == "1"
    assert {"customerio", "sql"} <= set(specs[MEMBERSHIPS].kinds)
    graph = defs.resolve_asset_graph()
    node = graph.get(USERS)
    assert node.pools == {POOL}
    assert node.to_asset_spec().skippable  # no materialization when a check stops the send
    assert {key.name for key in node.check_keys} == {
        MODEL_VALID,
        GUARDRAILS,
        UNIQUE_KEYS,
        NO_STUCK_ROWS,
    }
    assert {key.name for key in graph.asset_check_keys if graph.get_check_spec(key).blocking} == {
        MODEL_VALID,
        GUARDRAILS,
        UNIQUE_KEYS,
    }
    (assets_def,) = {graph.get(key).assets_def for key in specs}
    op_def = assets_def.op
    assert op_def.name == OP_NAME and op_def.retry_policy is not None
    assert op_def.retry_policy.max_retries == 3  # the shipped policy, not the tests' NO_DELAY
    # DuckDB takes one writing process: the jobs and ad-hoc asset runs stay in-process.
    assert defs.resolve_job_def(JOB_NAME).executor_def is dg.in_process_executor
    assert defs.resolve_implicit_global_asset_job_def().executor_def is dg.in_process_executor
    schedule = defs.resolve_schedule_def(group_schedule_name("customerio"))
    assert schedule.cron_schedule == "0 6 * * *" and schedule.execution_timezone == "UTC"
    assert schedule.job_name == group_job_name("customerio")
    assert defs.resolve_sensor_def(AUTOMATION_SENSOR_NAME) is not None
    customerio = (defs.resources or {})["customerio"]
    assert isinstance(customerio, CustomerIOResource)
    assert customerio.site_id is None and customerio.api_key is None


def test_credentials_are_bound_by_name_not_value() -> None:
    defs = build_definitions({"CIO_SITE_ID": "site", "CIO_API_KEY": "do-not-read-me"})
    customerio = (defs.resources or {})["customerio"]
    assert isinstance(customerio, CustomerIOResource)
    assert isinstance(customerio.api_key, dg.EnvVar) and customerio.api_key == "CIO_API_KEY"
    assert "do-not-read-me" not in repr(customerio)


def test_relationship_assets_depend_on_people_and_their_object_type(tmp_path: Path) -> None:
    copy_models(tmp_path)
    (tmp_path / "projects.sql").write_text(
        "-- kind: object\n-- key: project_id\n-- object_type_id: 2\nselect 'p' as project_id\n"
    )
    graph = build_definitions({"CIO_RETL_MODELS_DIR": str(tmp_path)}).resolve_asset_graph()
    assert graph.get(MEMBERSHIPS).parent_keys == {USERS, COMPANIES}
    assert graph.get(USERS).parent_keys == set()
    assert graph.get(COMPANIES).parent_keys == set()


def test_deps_header_links_upstream_warehouse_assets(tmp_path: Path) -> None:
    """``-- deps:`` entries become the asset keys dagster-dbt would give those models."""
    copy_models(tmp_path)
    users_sql = (SQL_DIR / "users.sql").read_text()
    (tmp_path / "users.sql").write_text("-- deps: analytics/users, analytics/orgs\n" + users_sql)
    defs = build_definitions({"CIO_RETL_MODELS_DIR": str(tmp_path)})
    graph = defs.resolve_asset_graph()
    upstream = {dg.AssetKey(["analytics", "users"]), dg.AssetKey(["analytics", "orgs"])}
    assert graph.get(USERS).parent_keys == upstream
    assert graph.get(MEMBERSHIPS).parent_keys == {USERS, COMPANIES}
    # Lineage works beside assets defined elsewhere (e.g. dbt): they show as external assets.
    assert all(graph.get(key).is_external for key in upstream)
    assert graph.get(USERS).automation_condition is not None
    assert graph.get(COMPANIES).automation_condition is None  # no deps: schedules only


@pytest.mark.filterwarnings("ignore:Parameter `include_sources`")  # inside Dagster's tester
def test_upstream_materialization_triggers_a_sync(tmp_path: Path) -> None:
    copy_models(tmp_path)
    users_sql = (SQL_DIR / "users.sql").read_text()
    (tmp_path / "users.sql").write_text("-- deps: analytics/users\n" + users_sql)
    defs = build_definitions({"CIO_RETL_MODELS_DIR": str(tmp_path)})
    with dg.DagsterInstance.ephemeral() as instance:
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # nothing upstream happened yet
        instance.report_runless_asset_event(dg.AssetMaterialization(["analytics", "users"]))
        second = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=first.cursor
        )
        assert second.get_num_requested(USERS) == 1
        assert second.get_num_requested(MEMBERSHIPS) == 0  # only warehouse deps trigger
        assert second.total_requested == 1
        third = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=second.cursor
        )
        assert third.total_requested == 0  # one update, one request


def test_dagster_toml_sets_groups_owners_and_a_schedule_per_group(tmp_path: Path) -> None:
    models = copy_models(tmp_path / "models")
    (models / "marketing").mkdir()
    (models / "companies.sql").rename(models / "marketing" / "companies.sql")
    (models / "dagster.toml").write_text(
        '[defaults]\nowners = ["team:data"]\n\n'
        '[groups.marketing]\ncron = "*/30 * * * *"\ntimezone = "Europe/Paris"\n'
        'owners = ["growth@example.com"]\n\n'
        '[models.memberships]\ngroup = "marketing"\nowners = ["alice@example.com"]\n'
    )
    defs = build_definitions({"CIO_RETL_MODELS_DIR": str(models)})
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    assert specs[COMPANIES].group_name == "marketing"  # from its folder
    assert specs[MEMBERSHIPS].group_name == "marketing"  # from dagster.toml
    assert specs[USERS].group_name == "customerio"
    assert specs[USERS].owners == ["team:data"]
    assert specs[COMPANIES].owners == ["growth@example.com"]
    assert specs[MEMBERSHIPS].owners == ["alice@example.com"]

    marketing = defs.resolve_schedule_def(group_schedule_name("marketing"))
    assert marketing.cron_schedule == "*/30 * * * *"
    assert marketing.execution_timezone == "Europe/Paris"
    assert defs.resolve_schedule_def(group_schedule_name("customerio")).cron_schedule == "0 6 * * *"
    job = defs.resolve_job_def(group_job_name("marketing"))
    assert job.asset_layer.selected_asset_keys == {COMPANIES, MEMBERSHIPS}

    tick = dt.datetime(2026, 1, 5, 9, 30, tzinfo=dt.UTC)
    with dg.build_schedule_context(scheduled_execution_time=tick) as context:
        result = marketing.evaluate_tick(context)
    assert result.run_requests is not None and len(result.run_requests) == 1
    assert marketing.job_name == group_job_name("marketing")


def test_bad_dagster_toml_fails_loading_naming_the_file(tmp_path: Path) -> None:
    copy_models(tmp_path)
    (tmp_path / "dagster.toml").write_text('[models.users]\nowner = "me"\n')
    with pytest.raises(ModelError, match=r"dagster\.toml: \[models\.users\]: unknown keys"):
        build_definitions({"CIO_RETL_MODELS_DIR": str(tmp_path)})


def test_broken_model_fails_loading_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "people.sql").write_text(
        "-- kind: person\n-- indentifier: email\n-- key: email\nselect 'a@b.c' as email\n"
    )
    with pytest.raises(ModelError, match=r"people\.sql:2: unknown header key 'indentifier'"):
        build_definitions({"CIO_RETL_MODELS_DIR": str(tmp_path)})


# -- materializations ----------------------------------------------------------------------


def test_materialize_all_matches_the_warehouse(env: Env, assets: list[dg.AssetsDefinition]) -> None:
    result = materialize(assets, env.resources())
    assert result.success

    users = env.query(
        "select email, first_name, plan, is_admin, epoch(created_at)::bigint as created_at,"
        " lifetime_value, last_name, struct_extract(preferences, 'newsletter') as newsletter"
        " from demo.users where deleted_at is null order by user_id"
    )
    companies = env.query("select company_id, name, seats from demo.companies")
    members = env.query(
        "select u.email, m.company_id, m.role from demo.memberships m"
        " join demo.users u using (user_id) where u.deleted_at is null"
    )
    people = env.emulator.workspace.people_by("email")
    assert set(people) == {u.email for u in users}
    person, first = people[users[0].email], users[0]
    assert person["email"] == first.email
    assert person["first_name"] == first.first_name and person["plan"] == first.plan
    assert person["is_admin"] is first.is_admin
    assert person["created_at"] == first.created_at  # timestamps become Unix seconds
    assert person["lifetime_value"] == float(first.lifetime_value)  # decimals: JSON numbers
    assert person["preferences"] == {"newsletter": first.newsletter, "locale": "en"}  # nested
    nameless = next(u for u in users if u.last_name is None)
    assert "last_name" not in people[nameless.email]

    workspace = env.emulator.snapshot()
    objects = {o["object_id"]: o for o in workspace["objects"]}
    assert set(objects) == {c.company_id for c in companies}
    assert {o["object_type_id"] for o in objects.values()} == {"1"}
    company = companies[0]
    assert objects[company.company_id]["attributes"]["name"] == company.name
    assert objects[company.company_id]["attributes"]["seats"] == company.seats
    relationships = {
        (r["person"]["email"], r["object_id"], r["relationship_attributes"].get("role"))
        for r in workspace["relationships"]
    }
    assert relationships == {(m.email, m.company_id, m.role) for m in members}
    assert env.emulator.invalid_items == []

    for key, rows in ((USERS, users), (COMPANIES, companies), (MEMBERSHIPS, members)):
        meta = metadata(result, key)
        assert meta["rows"] == meta["created"] == meta["items_sent"] == len(rows)
        assert meta["dagster/row_count"] == len(rows)
        assert meta["updated"] == meta["deleted"] == meta["rejected"] == meta["unchanged"] == 0
        assert meta["requests"] >= 1 and meta["bytes_sent"] > 0 and meta["dry_run"] is False
        assert meta["duration_s"] > 0
        assert meta["rows_per_s"] == pytest.approx(len(rows) / meta["duration_s"], rel=0.01)
        assert "sample_payloads" not in meta and "rejections" not in meta
        for name in (MODEL_VALID, GUARDRAILS, UNIQUE_KEYS, NO_STUCK_ROWS):
            assert checks(result)[key, name].passed, (key, name)
    assert sum(metadata(result, k)["requests"] for k in (USERS, COMPANIES, MEMBERSHIPS)) >= 3
    assert API_KEY not in repr(result.all_events)


def test_second_materialize_sends_exactly_the_edits(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    assert materialize(assets, env.resources()).success
    engine = create_engine(env.url)
    edits = edit_demo_warehouse(engine)
    engine.dispose()
    before = len(env.emulator.requests)

    result = materialize(assets, env.resources())
    assert result.success

    sent = {
        (item["type"], item["action"], next(iter(item["identifiers"].values())))
        if item["type"] == "person"
        else (item["type"], item["action"], item["identifiers"]["object_id"])
        for item in env.batch_items(before)
    }
    assert len(env.batch_items(before)) == edits.entities
    # the new order's event and the updated device; the edited order is not resent
    life = sorted(action for _, action, _ in sent if action in ("event", "add_device"))
    assert life == ["add_device", "event"]
    assert metadata(result, dg.AssetKey(["customerio", "orders"]))["events_sent"] == 1
    sent = {s for s in sent if s[1] not in ("event", "add_device")}
    assert sent == (
        {("person", "identify", email) for email in edits.users_changed}
        | {("object", "identify", company) for company in edits.companies_changed}
        | {("person", "delete_relationships", email) for email, _ in edits.memberships_removed}
    )
    assert metadata(result, USERS)["updated"] == len(edits.users_changed)
    assert metadata(result, COMPANIES)["updated"] == len(edits.companies_changed)
    assert metadata(result, MEMBERSHIPS)["deleted"] == len(edits.memberships_removed)
    assert metadata(result, USERS)["unchanged"] == metadata(result, USERS)["rows"] - 4
    (cleared,) = env.query("select email from demo.users where user_id = 14")
    assert "first_name" not in env.emulator.workspace.people_by("email")[cleared.email]


def test_dry_run_shows_the_plan_sends_nothing_and_needs_no_credentials(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    result = materialize(
        assets, env.resources(site_id=None, api_key=None), SyncConfig(dry_run=True)
    )
    assert result.success
    assert env.emulator.requests == []
    # Nothing sent, nothing materialized: the plan is an observation of each asset.
    assert result.get_asset_materialization_events() == []
    users = observed(result, USERS)
    (count,) = env.query("select count(*) as n from demo.users where deleted_at is null")
    assert users["dry_run"] is True
    assert users["created"] == users["planned"] == users["rows"] == count.n
    assert users["requests"] == users["bytes_sent"] == users["items_sent"] == 0
    assert f"would send {count.n} items" in users["plan"]
    samples = users["sample_payloads"]
    assert len(samples) == 3
    assert {(s["type"], s["action"]) for s in samples} == {("person", "identify")}
    assert observed(result, MEMBERSHIPS)["created"] > 0
    assert (USERS, NO_STUCK_ROWS) not in checks(result)  # nothing was sent to check
    assert env.emulator.snapshot()["people"] == []


def test_a_sync_logs_its_progress(
    env: Env, assets: list[dg.AssetsDefinition], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's plain progress lines, in the run's log (every PROGRESS_EVERY seconds; 0
    here, so each acknowledged batch writes one)."""
    monkeypatch.setattr(assets_module, "PROGRESS_EVERY", 0.0)
    result, logs = materialize_logged(assets, env.resources())
    assert result.success
    messages = [entry.user_message for entry in logs]
    (count,) = env.query("select count(*) as n from demo.users where deleted_at is null")
    progress = [m for m in messages if m.startswith(f"users: {count.n:,} of {count.n:,} items")]
    assert progress and "items/s" in progress[-1]


def test_failing_guardrail_blocks_the_send_until_forced(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    assert materialize(assets, env.resources()).success
    env.execute("update demo.users set plan = plan || '-v2'")  # every synced person changes
    before = len(env.emulator.requests)

    blocked = materialize(assets, env.resources())
    assert not blocked.success
    # The credentials check (made before the run plans), and not one batch.
    assert [r.path for r in env.emulator.requests[before:]] == ["/api/v1/accounts/region"]
    guardrail = checks(blocked)[USERS, GUARDRAILS]
    assert not guardrail.passed and guardrail.severity is dg.AssetCheckSeverity.ERROR
    assert "over max_change_pct 50" in (guardrail.description or "")
    assert checks(blocked)[COMPANIES, GUARDRAILS].passed
    assert blocked.get_asset_materialization_events() == []
    assert any("blocking asset check" in m for m in failure_messages(blocked))
    assert attempts(blocked) == 1  # a blocking check is not retried

    dry = materialize(assets, env.resources(), SyncConfig(dry_run=True))
    assert not dry.success  # like `cio-retl sync --dry-run` exiting 3: it would be stopped
    assert "A guardrail would stop this run" in observed(dry, USERS)["plan"]
    assert len(env.emulator.requests) == before + 1  # a dry run sends no request at all

    forced = materialize(assets, env.resources(), SyncConfig(force=True))
    assert forced.success
    warning = checks(forced)[USERS, GUARDRAILS]
    assert not warning.passed and warning.severity is dg.AssetCheckSeverity.WARN
    (users,) = env.query("select count(*) as n from demo.users where deleted_at is null")
    assert metadata(forced, USERS)["updated"] == users.n
    assert all(
        p["plan"].endswith("-v2") for p in env.emulator.workspace.people_by("email").values()
    )


def test_a_materialization_plans_and_scans_each_model_once(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    """One engine run per materialization: its checks read the run's own plan, so the model
    is planned once and its changed rows are read, normalized and encoded once (a dry run
    first, then the real run, planned and scanned everything twice)."""
    with counted_passes() as first:
        result = materialize(assets, env.resources(), selection=[USERS])
    assert result.success and metadata(result, USERS)["created"] > 0
    assert first == {"plans": 1, "upsert scans": 1}

    env.execute(
        "update demo.users set plan = plan || '-v2' where user_id in"
        " (select user_id from demo.users where deleted_at is null order by user_id limit 3)"
    )
    with counted_passes() as dry:  # a dry run reads its changed rows once too, for samples
        result = materialize(assets, env.resources(), SyncConfig(dry_run=True), selection=[USERS])
    assert result.success and observed(result, USERS)["updated"] == 3
    assert dry == {"plans": 1, "upsert scans": 1}

    with counted_passes() as second:
        result = materialize(assets, env.resources(), selection=[USERS])
    assert result.success and metadata(result, USERS)["updated"] == 3
    assert second == {"plans": 1, "upsert scans": 1}


def test_a_blocking_check_stops_the_one_run_before_any_batch(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    """The checks are decided inside the sync's run, between its plan and its first batch:
    a failing one leaves the Track API's batch endpoint untouched, the workspace as it was,
    the snapshot unacknowledged, and the run recorded as stopped, not succeeded."""
    assert materialize(assets, env.resources()).success
    people = env.emulator.workspace.people_by("email")
    env.execute("update demo.users set plan = plan || '-v2'")  # every synced person changes
    before = len(env.emulator.requests)

    with counted_passes() as passes:
        blocked = materialize(assets, env.resources())
    assert not blocked.success
    assert [r.path for r in env.emulator.requests[before:] if r.path == "/api/v2/batch"] == []
    assert env.emulator.workspace.people_by("email") == people
    assert not checks(blocked)[USERS, GUARDRAILS].passed
    # One plan per model; the one scan is the guardrail's count of real updates, no send.
    assert passes == {"plans": 4, "upsert scans": 1}
    runs = env.query(
        "select model, status, error from cio_retl.runs where run_id ="
        " (select run_id from cio_retl.runs order by started_at desc limit 1)"
    )
    assert {r.model for r in runs} == {"users", "companies", "memberships", "orders", "devices"}
    assert all(r.status == "stopped" for r in runs)
    assert all("users: guardrails" in (r.error or "") for r in runs)
    assert env.query("select count(*) as n from cio_retl.locks")[0].n == 0


def test_duplicate_keys_block_the_send(env: Env, assets: list[dg.AssetsDefinition]) -> None:
    env.execute(
        "insert into demo.users (user_id, email, first_name)"
        " select 9999, email, 'Twin' from demo.users where user_id = 30"
    )
    (twin,) = env.query("select email from demo.users where user_id = 30")
    result = materialize(assets, env.resources())
    assert not result.success
    assert env.batch_items() == [] and env.emulator.snapshot()["people"] == []
    unique = checks(result)[USERS, UNIQUE_KEYS]
    assert not unique.passed and unique.metadata["bad_key_rows"].value == 2
    assert twin.email in unique.metadata["examples"].value
    assert "2 rows share this key" in unique.metadata["examples"].value
    assert checks(result)[COMPANIES, UNIQUE_KEYS].passed


def test_unique_keys_counts_every_duplicate_not_only_the_first_rejections(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    """100 rows with an invalid email come first, then 25 keys held by two rows each: the
    duplicates are past the 20 rejections a report lists, and the check still counts all
    50 rows (it reads the run's count of `duplicate_key` rejections, not reasons' text)."""
    env.execute(
        "insert into demo.users (user_id, email, first_name)"
        " select 20000 + i, 'not-an-email-' || i, 'Bad' from range(100) t(i)"
    )
    env.execute(
        "insert into demo.users (user_id, email, first_name)"
        " select 30000 + i, 'twin' || (i % 25) || '@example.com', 'Twin' from range(50) t(i)"
    )
    result = materialize(assets, env.resources(), selection=[USERS])
    assert not result.success and env.batch_items() == []
    unique = checks(result)[USERS, UNIQUE_KEYS]
    assert not unique.passed
    assert unique.metadata["duplicate_key_rows"].value == 50
    assert unique.metadata["bad_key_rows"].value == 50
    assert unique.metadata["null_key_rows"].value == 0
    assert "twin" in unique.metadata["examples"].value
    assert "not-an-email" not in unique.metadata["examples"].value


def test_invalid_model_blocks_the_send(env: Env, assets: list[dg.AssetsDefinition]) -> None:
    env.execute("alter table demo.companies drop column seats")
    result = materialize(assets, env.resources())
    assert not result.success
    assert env.emulator.requests == []
    valid = checks(result)[COMPANIES, MODEL_VALID]
    assert not valid.passed and "companies.sql" in (valid.description or "")
    assert result.get_asset_materialization_events() == []


def test_bad_credentials_fail_naming_them_without_the_key(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    wrong_key = "wrong-secret-key-9876543210"
    result = materialize(assets, env.resources(api_key=wrong_key))
    assert not result.success
    messages = failure_messages(result)
    assert messages and all("refused the credentials" in m for m in messages)
    assert all("CIO_API_KEY" in m for m in messages)
    assert wrong_key not in repr(result.all_events) + repr(result.dagster_run)
    assert result.get_asset_materialization_events() == []
    assert attempts(result) == 1  # retrying cannot fix credentials
    assert env.batch_items() == []


def test_missing_credentials_fail_a_real_run_clearly(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    result = materialize(assets, env.resources(site_id=None, api_key=None), selection=[COMPANIES])
    assert not result.success
    assert any("CIO_SITE_ID and CIO_API_KEY must be set" in m for m in failure_messages(result))
    assert attempts(result) == 1
    assert env.emulator.requests == []


def test_rejected_rows_keep_the_materialization_and_warn_when_stuck(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    (user,) = env.query("select email from demo.users where user_id = 20")
    env.emulator.faults = FaultPlan(reject_identifiers=frozenset({user.email}))
    result = materialize(assets, env.resources(), SyncConfig(max_stuck_pct=0), selection=[USERS])
    assert result.success
    meta = metadata(result, USERS)
    assert meta["rejected"] == 1 and meta["created"] == meta["rows"] - 1
    assert user.email in meta["rejections"] and "rejected by fault plan" in meta["rejections"]
    stuck = checks(result)[USERS, NO_STUCK_ROWS]
    assert not stuck.passed and stuck.severity is dg.AssetCheckSeverity.WARN
    assert stuck.metadata["rejected_rows"].value == 1
    assert stuck.metadata["pending_rows"].value == 0
    assert user.email in stuck.metadata["rejected_sample"].value

    within = materialize(assets, env.resources(), selection=[USERS])  # default: 1% allowed
    assert checks(within)[USERS, NO_STUCK_ROWS].passed


def test_transient_failures_are_retried_and_report_what_was_acknowledged(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    env.emulator.faults = FaultPlan(throttle_rate=1.0, retry_after=0.0)
    result = materialize(assets, env.resources(), selection=[COMPANIES])
    assert not result.success
    assert attempts(result) == 2  # the test policy: one Dagster retry after the engine's own
    failure = result.get_step_failure_events()[-1]
    data = failure.step_failure_data
    assert data.user_failure_data is not None and data.user_failure_data.description
    assert "kept failing (last: HTTP 429): POST /api/v2/batch" in data.user_failure_data.description
    failed_meta = {k: v.value for k, v in data.user_failure_data.metadata.items()}
    assert failed_meta["rows"] == 40 and failed_meta["created"] == 0
    stuck = [e for e in result.get_asset_check_evaluations() if e.check_name == NO_STUCK_ROWS]
    assert stuck and not stuck[-1].passed and stuck[-1].metadata["pending_rows"].value == 40
    assert env.emulator.snapshot()["objects"] == []


@pytest.mark.parametrize(
    ("warehouse_url", "retried", "message"),
    [
        # Nothing listens there: transient, so the run's retry policy retries it.
        (
            "postgresql+psycopg://postgres:pw-0d1c@127.0.0.1:{port}/test?connect_timeout=5",
            True,
            "cannot reach the postgresql database at 127.0.0.1:{port}",
        ),
        # A setting that can never work: failed once, not retried.
        ("mysql://me:pw-0d1c@db/x", False, "'mysql' databases are not supported"),
    ],
)
def test_only_transient_failures_are_retried(
    env: Env,
    assets: list[dg.AssetsDefinition],
    warehouse_url: str,
    retried: bool,
    message: str,
) -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    resources = env.resources()
    resources["warehouse"] = WarehouseResource(
        warehouse_url=warehouse_url.format(port=port), models_dir=str(SQL_DIR)
    )
    result = materialize(assets, resources, selection=[COMPANIES])
    assert not result.success
    assert attempts(result) == (2 if retried else 1)
    data = result.get_step_failure_events()[-1].step_failure_data
    assert data.user_failure_data is not None
    description = data.user_failure_data.description or ""
    assert message.format(port=port) in description and "pw-0d1c" not in description
    assert data.user_failure_data.metadata["transient"].value is retried
    assert env.emulator.requests == []


def test_metadata_names_the_workspace_and_each_workspace_keeps_its_own_state(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    first = materialize(assets, env.resources())
    assert first.success
    users = metadata(first, USERS)
    assert (users["workspace"], users["workspace_region"]) == (SITE_ID, "us")
    assert users["workspace_environment_id"] == 1
    assert API_KEY not in str(users)
    with Emulator(site_id="dagster-production", api_key=API_KEY, environment_id=9) as other:
        resources = env.resources()
        resources["customerio"] = CustomerIOResource(
            site_id="dagster-production", api_key=API_KEY, track_api_url=other.url
        )
        second = materialize(assets, resources)
        assert second.success
        there = metadata(second, USERS)
        assert there["workspace"] == "dagster-production"
        assert there["workspace_environment_id"] == 9
        assert there["created"] == users["created"] > 0  # its own, empty snapshot
    plan = materialize(  # two workspaces now: a plan names one (CIO_SITE_ID)
        assets, env.resources(site_id=SITE_ID, api_key=None), SyncConfig(dry_run=True)
    )
    assert plan.success
    planned = observed(plan, USERS)
    assert planned["workspace"] == SITE_ID and planned["planned"] == 0


def test_the_reports_notices_reach_the_log_and_the_metadata(
    env: Env, assets: list[dg.AssetsDefinition], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notice of the run (here: a lock the state store failed to release after the
    sync) is a warning in the run's log and an entry of every materialization's metadata;
    the materialization still succeeds."""
    from tests.test_failures import fail_lock_releases

    fail_lock_releases(monkeypatch)
    result, logs = materialize_logged(assets, env.resources())
    assert result.success
    warnings = [
        entry.user_message
        for entry in logs
        if entry.level == logging.WARNING and "was not released" in entry.user_message
    ]
    assert warnings and "disk detached" in warnings[0]
    notices = metadata(result, USERS)["notices"]
    assert "the lock of model users was not released" in notices


def test_a_run_stopped_under_way_fails_with_its_notices() -> None:
    """The step failure of a run that had started carries its report's notices (an
    unreleased lock), and a transient one stays retriable."""
    from cio_retl.errors import UnreachableError
    from cio_retl.sync import RunReport

    error = UnreachableError("the duckdb database w.duckdb failed during the run: IO Error")
    error.report = RunReport(
        "run-1", False, [], notices=["the lock of model users was not released"]
    )
    failure = assets_module._failure(error)
    assert failure.allow_retries
    assert failure.metadata["notices"].value == "- the lock of model users was not released"
    assert "notices" not in assets_module._failure(UnreachableError("before the run")).metadata
