"""The Dagster adapter end to end: definitions, dependencies, and materializations against the
emulator and a real DuckDB warehouse. Resources get explicit values, never the developer's env.
"""

from __future__ import annotations

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
from cio_retl.warehouse import create_engine
from dagster_project.assets import SyncConfig, build_model_assets
from dagster_project.definitions import JOB_NAME, SCHEDULE_NAME, build_definitions
from dagster_project.resources import PROJECT_ROOT, CustomerIOResource, WarehouseResource

pytestmark = pytest.mark.dagster

SQL_DIR = PROJECT_ROOT / "sql"
SITE_ID = "dagster-site"
API_KEY = "dagster-secret-key-0123456789"
USERS = dg.AssetKey(["customerio", "users"])
COMPANIES = dg.AssetKey(["customerio", "companies"])
MEMBERSHIPS = dg.AssetKey(["customerio", "memberships"])


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
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text(sql)))
        finally:
            engine.dispose()

    def batch_items(self, since: int = 0) -> list[dict[str, Any]]:
        return [
            item
            for request in self.emulator.requests[since:]
            if request.path == "/api/v2/batch"
            for item in (request.body or {}).get("batch", [])
        ]


@pytest.fixture(scope="module")
def assets() -> list[dg.AssetsDefinition]:
    return build_model_assets(SQL_DIR)


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
    *,
    dry_run: bool = False,
    selection: Sequence[dg.AssetKey] | None = None,
) -> dg.ExecuteInProcessResult:
    run_config = dg.RunConfig(
        ops={op_name(a.key): SyncConfig(dry_run=dry_run) for a in assets} if dry_run else {}
    )
    return dg.materialize(
        assets,
        resources=resources,
        run_config=run_config,
        selection=selection,
        raise_on_error=False,
    )


def op_name(key: dg.AssetKey) -> str:
    return "__".join(key.path)


def metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict[str, Any]:
    (event,) = result.asset_materializations_for_node(op_name(key))
    return {name: value.value for name, value in event.metadata.items()}


def failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    return [
        event.step_failure_data.error.message
        for event in result.get_step_failure_events()
        if event.step_failure_data.error is not None
    ]


# -- definitions ---------------------------------------------------------------------------


def test_definitions_load_without_any_environment() -> None:
    defs = build_definitions({})
    keys = {spec.key for spec in defs.resolve_all_asset_specs()}
    assert keys == {dg.AssetKey(["customerio", p.stem]) for p in SQL_DIR.glob("*.sql")}
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    assert {spec.group_name for spec in specs.values()} == {"customerio"}
    assert specs[USERS].description == "Active users as Customer.io people, identified by email."
    assert specs[USERS].tags["cio_retl/kind"] == "person"
    assert specs[COMPANIES].tags["cio_retl/object_type_id"] == "1"
    assert "customerio" in specs[MEMBERSHIPS].kinds
    # DuckDB takes one writing process: the job and ad-hoc asset runs both stay in-process.
    assert defs.resolve_job_def(JOB_NAME).executor_def is dg.in_process_executor
    assert defs.resolve_implicit_global_asset_job_def().executor_def is dg.in_process_executor
    assert defs.resolve_schedule_def(SCHEDULE_NAME).cron_schedule == "0 6 * * *"
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
    for path in SQL_DIR.glob("*.sql"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "projects.sql").write_text(
        "-- kind: object\n-- key: project_id\n-- object_type_id: 2\nselect 'p' as project_id\n"
    )
    graph = build_definitions({"CIO_RETL_MODELS_DIR": str(tmp_path)}).resolve_asset_graph()
    assert graph.get(MEMBERSHIPS).parent_keys == {USERS, COMPANIES}
    assert graph.get(USERS).parent_keys == set()
    assert graph.get(COMPANIES).parent_keys == set()


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
        assert meta["updated"] == meta["deleted"] == meta["rejected"] == meta["unchanged"] == 0
        assert meta["requests"] >= 1 and meta["bytes_sent"] > 0 and meta["dry_run"] is False
        assert "sample_payloads" not in meta and "rejections" not in meta


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


def test_dry_run_sends_nothing_and_needs_no_credentials(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    result = materialize(assets, env.resources(site_id=None, api_key=None), dry_run=True)
    assert result.success
    assert [r.path for r in env.emulator.requests] == []
    users = metadata(result, USERS)
    (count,) = env.query("select count(*) as n from demo.users where deleted_at is null")
    assert users["dry_run"] is True
    assert users["created"] == users["planned"] == users["rows"] == count.n
    assert users["requests"] == users["bytes_sent"] == users["items_sent"] == 0
    samples = users["sample_payloads"]
    assert len(samples) == 3
    assert {(s["type"], s["action"]) for s in samples} == {("person", "identify")}
    assert metadata(result, MEMBERSHIPS)["created"] > 0
    assert env.emulator.snapshot()["people"] == []


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
    assert result.asset_materializations_for_node(op_name(MEMBERSHIPS)) == []  # upstream failed
    assert env.batch_items() == []


def test_missing_credentials_fail_a_real_run_clearly(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    result = materialize(assets, env.resources(site_id=None, api_key=None), selection=[COMPANIES])
    assert not result.success
    assert any("CIO_SITE_ID and CIO_API_KEY must be set" in m for m in failure_messages(result))
    assert env.emulator.requests == []


def test_rejected_rows_keep_the_materialization_successful(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    (user,) = env.query("select email from demo.users where user_id = 20")
    env.emulator.faults = FaultPlan(reject_identifiers=frozenset({user.email}))
    result = materialize(assets, env.resources(), selection=[USERS])
    assert result.success
    meta = metadata(result, USERS)
    assert meta["rejected"] == 1 and meta["created"] == meta["rows"] - 1
    assert user.email in meta["rejections"] and "rejected by fault plan" in meta["rejections"]


def test_retries_running_out_fail_with_what_was_acknowledged(
    env: Env, assets: list[dg.AssetsDefinition]
) -> None:
    env.emulator.faults = FaultPlan(throttle_rate=1.0, retry_after=0.0)
    result = materialize(assets, env.resources(), selection=[COMPANIES])
    assert not result.success
    (failure,) = result.get_step_failure_events()
    data = failure.step_failure_data
    assert data.error is not None and "did not accept /api/v2/batch" in data.error.message
    assert data.user_failure_data is not None
    failed_meta = {k: v.value for k, v in data.user_failure_data.metadata.items()}
    assert failed_meta["rows"] == 40 and failed_meta["created"] == 0
    assert env.emulator.snapshot()["objects"] == []
