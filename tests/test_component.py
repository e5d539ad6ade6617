"""``CustomerIOComponent`` and ``build_customerio_defs``: scaffolding, the attribute schema
``dg check yaml`` validates, literal secrets refused, translation, ``execute`` overrides,
and a sync of the scaffolded models through Dagster's own component sandbox.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster.components.testing import DefsFolderSandbox, create_defs_folder_sandbox
from jsonschema import Draft202012Validator

from cio_retl.buckets import Bucket
from cio_retl.config import Settings
from cio_retl.demo import create_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.errors import ConfigError
from cio_retl.models import Kind, Model, load_models
from cio_retl.warehouse import create_engine
from dagster_cio_retl import (
    CustomerIOComponent,
    CustomerIOTranslator,
    SyncConfig,
    SyncEvent,
    build_customerio_defs,
)
from dagster_cio_retl.definitions import build_definitions
from dagster_cio_retl.scaffold import ENV_VARS, EXAMPLE_MODELS
from tests.conftest import API_KEY, REPO, SITE_ID, sql_rows
from tests.test_sync_duckdb import actual_workspace, expected_workspace

pytestmark = pytest.mark.dagster

# The scaffolded examples' columns, as the emulator stores them (timestamps as epoch seconds).
SCAFFOLD_PEOPLE = """
    SELECT email, first_name, last_name, plan, CAST(epoch(created_at) AS BIGINT) AS created_at
    FROM demo.users WHERE deleted_at IS NULL
"""
SCAFFOLD_OBJECTS = "SELECT company_id, name, plan, seats FROM demo.companies"

EXECUTED: list[tuple[str, ...]] = []


class RecordingComponent(CustomerIOComponent):
    """``execute`` overridden as a user would: wrap the default, here to record the models."""

    def execute(
        self,
        context: dg.AssetExecutionContext,
        settings: Settings,
        models: Sequence[Model],
        config: SyncConfig,
        bucket: Bucket | None,
        keys: Mapping[str, dg.AssetKey],
    ) -> Iterator[SyncEvent]:
        EXECUTED.append(tuple(m.name for m in models))
        yield from super().execute(context, settings, models, config, bucket, keys)


def schema_errors(attributes: dict[str, Any]) -> dict[str, str]:
    """What ``dg check yaml`` reports: the attributes against the component's JSON schema
    (dagster_dg_core.check validates with Draft202012Validator the same way)."""
    validator = Draft202012Validator(CustomerIOComponent.model().model_json_schema())
    return {
        ".".join(str(p) for p in error.absolute_path) or "(root)": error.message
        for error in validator.iter_errors(attributes)
    }


def scaffold(
    sandbox: DefsFolderSandbox, cls: type[CustomerIOComponent] = CustomerIOComponent
) -> Path:
    return sandbox.scaffold_component(component_cls=cls, defs_path="customerio")


def set_type(defs_path: Path, cls: type[CustomerIOComponent], **attributes: Any) -> None:
    doc = yaml.safe_load((defs_path / "defs.yaml").read_text())
    doc["type"] = f"{cls.__module__}.{cls.__qualname__}"
    doc["attributes"].update(attributes)
    (defs_path / "defs.yaml").write_text(yaml.safe_dump(doc))


def test_scaffold_writes_defs_yaml_and_one_model_of_each_kind() -> None:
    with create_defs_folder_sandbox() as sandbox:
        path = scaffold(sandbox)
        doc = yaml.safe_load((path / "defs.yaml").read_text())
        assert doc["type"].endswith("CustomerIOComponent")
        for attribute, var in ENV_VARS.items():
            assert doc["attributes"][attribute] == f"{{{{ env.{var} }}}}"
        assert sorted(doc["requirements"]["env"]) == sorted(ENV_VARS.values())
        assert schema_errors(doc["attributes"]) == {}
        models = load_models(path / doc["attributes"]["models_dir"])
        assert sorted(m.kind for m in models) == sorted(EXAMPLE_MODELS) == sorted(Kind)


@pytest.mark.parametrize(
    ("attributes", "field"),
    [
        ({"api_key": "sk-live-123"}, "api_key"),
        ({"site_id": "abc123"}, "site_id"),
        ({"warehouse_url": "postgresql://u:pw@db/x"}, "warehouse_url"),
        ({"state_url": "{{ env.A }} and more"}, "state_url"),
        ({"region": "mars"}, "region"),
        ({"buckets": 0}, "buckets"),
        ({"buckets": 5000}, "buckets"),
        ({"rate_limit": "fast"}, "rate_limit"),
        ({"rate_budget": "global"}, "rate_budget"),
        ({"model_dir": "sql"}, "(root)"),  # a typo: unknown attributes are refused
    ],
)
def test_dg_check_yaml_schema_refuses_bad_attributes(
    attributes: dict[str, Any], field: str
) -> None:
    assert field in schema_errors(attributes)


def test_dg_check_yaml_schema_accepts_templates() -> None:
    assert (
        schema_errors(
            {
                "api_key": "{{ env.CIO_API_KEY }}",
                "site_id": "{{ env('CIO_SITE_ID') }}",
                "region": "{{ env('CIO_REGION', 'us') }}",
                "buckets": "{{ env('CIO_RETL_BUCKETS', '1') }}",
                "rate_limit": "100/10",
                "rate_budget": "shared",
                "schedules": {"marketing": {"cron": "*/30 * * * *"}},
                "key_prefix": ["crm", "customerio"],
                "translation": {"group_name": "crm"},
            }
        )
        == {}
    )


def test_literal_secret_fails_loading_without_showing_it() -> None:
    with pytest.raises(Exception, match="api_key must be an environment variable") as info:
        CustomerIOComponent.resolve_from_yaml("api_key: sk-live-0123456789\n")
    assert "sk-live-0123456789" not in str(info.value)
    with pytest.raises(ConfigError, match="api_key must name an environment variable"):
        build_customerio_defs(REPO / "sql", api_key="sk-live-0123456789")  # type: ignore[arg-type]


def test_credentials_bind_as_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_CIO_KEY", API_KEY)
    monkeypatch.delenv("MY_CIO_SITE", raising=False)
    component = CustomerIOComponent.resolve_from_yaml(
        'api_key: "{{ env.MY_CIO_KEY }}"\nsite_id: "{{ env(\'MY_CIO_SITE\') }}"\n'
    )
    assert component.api_key == dg.EnvVar("MY_CIO_KEY")
    defs = build_customerio_defs(REPO / "sql", api_key=component.api_key, site_id=component.site_id)
    customerio = defs.resources["customerio"]
    assert customerio.api_key == dg.EnvVar("MY_CIO_KEY")  # bound by name, read at run time
    assert customerio.site_id is None  # unset when loading: unbound, so dry runs still work
    assert API_KEY not in repr(defs.resources)


def test_bad_settings_fail_loading() -> None:
    with pytest.raises(ConfigError, match=r"^region='mars' is not a known value"):
        build_customerio_defs(REPO / "sql", region="mars")
    with pytest.raises(ConfigError, match=r"^rate_limit="):
        build_customerio_defs(REPO / "sql", rate_limit="fast")
    with pytest.raises(ConfigError, match=r"^state_schema="):
        build_customerio_defs(REPO / "sql", state_schema="drop table;")
    with pytest.raises(ConfigError, match="buckets"):
        CustomerIOComponent.resolve_from_yaml("buckets: many\n")


class DbtTranslator(CustomerIOTranslator):
    """``-- deps: analytics/users`` read as the dbt model ``users`` under the key prefix dbt."""

    def get_upstream_key(self, dep: str) -> dg.AssetKey:
        return dg.AssetKey(["dbt", dep.split("/")[-1]])


def deps_of(defs: dg.Definitions, key: dg.AssetKey) -> set[dg.AssetKey]:
    return set(defs.resolve_asset_graph().get(key).parent_keys)


def models_with_deps(folder: Path) -> Path:
    folder.mkdir()
    for path in (REPO / "sql").glob("*.sql"):
        text = path.read_text()
        if path.stem == "users":
            text = "-- deps: analytics/users\n" + text
        (folder / path.name).write_text(text)
    return folder


def test_python_translator_points_deps_at_dbt_keys(tmp_path: Path) -> None:
    models = models_with_deps(tmp_path / "sql")
    defs = build_customerio_defs(
        models, translator=DbtTranslator(key_prefix=["crm"]), schedules=None
    )
    users, companies = dg.AssetKey(["crm", "users"]), dg.AssetKey(["crm", "companies"])
    assert deps_of(defs, users) == {dg.AssetKey(["dbt", "users"])}
    # the relationship follows the translated keys of the people and objects it links
    assert deps_of(defs, dg.AssetKey(["crm", "memberships"])) == {users, companies}
    condition = defs.resolve_asset_graph().get(users).automation_condition
    assert condition is not None and "eager" in (condition.get_label() or "")


def test_yaml_translation_sets_groups_and_schedules(tmp_path: Path) -> None:
    models = models_with_deps(tmp_path / "sql")
    component = CustomerIOComponent.resolve_from_yaml(
        f"""
models_dir: {models}
key_prefix: [crm]
upstream_key: "dbt/{{{{ dep.split('/')[-1] }}}}"
translation:
  group_name: "{{{{ 'people' if model.kind == 'person' else 'accounts' }}}}"
  tags:
    team: "{{{{ model.name }}}}-owners"
schedules:
  people:
    cron: "*/30 * * * *"
    timezone: Europe/Berlin
"""
    )
    defs = dg.component_defs(component=component)
    graph = defs.resolve_asset_graph()
    users = graph.get(dg.AssetKey(["crm", "users"]))
    assert users.group_name == "people"
    assert users.tags["team"] == "users-owners"
    assert users.tags["cio_retl/kind"] == "person"  # translation tags merge, never replace
    assert graph.get(dg.AssetKey(["crm", "companies"])).group_name == "accounts"
    assert set(users.parent_keys) == {dg.AssetKey(["dbt", "users"])}
    assert set(graph.get(dg.AssetKey(["crm", "memberships"])).parent_keys) == {
        users.key,
        dg.AssetKey(["crm", "companies"]),
    }
    crons = {s.name: (s.cron_schedule, s.execution_timezone) for s in defs.schedules or []}
    assert crons == {
        "sync_people_schedule": ("*/30 * * * *", "Europe/Berlin"),
        "sync_accounts_schedule": ("0 6 * * *", "UTC"),
    }


def shape(defs: dg.Definitions) -> dict[str, Any]:
    """What two ways of building definitions must agree on."""
    graph = defs.resolve_asset_graph()
    return {
        "assets": {
            key: (
                node.group_name,
                sorted(node.parent_keys),
                node.partitions_def,
                node.automation_condition.get_label() if node.automation_condition else None,
                node.owners,
                node.tags,
                node.code_version,
            )
            for key, node in ((k, graph.get(k)) for k in graph.get_all_asset_keys())
        },
        "checks": sorted(graph.asset_check_keys),
        "jobs": sorted(job.name for job in defs.jobs or []),
        "schedules": sorted((s.name, s.cron_schedule) for s in defs.schedules or []),
        "sensors": sorted(s.name for s in defs.sensors or []),
    }


def test_component_builds_what_build_customerio_defs_builds() -> None:
    component = CustomerIOComponent.resolve_from_yaml(f"models_dir: {REPO / 'sql'}\nbuckets: 4\n")
    from_yaml = dg.component_defs(component=component)
    from_python = build_customerio_defs(REPO / "sql", buckets=4)
    assert shape(from_yaml) == shape(from_python)
    assert len(shape(from_python)["checks"]) == 20  # 5 demo models x 4 checks


@pytest.mark.parametrize("buckets", [None, "4"])
def test_repo_dagster_project_builds_what_the_variables_say(
    monkeypatch: pytest.MonkeyPatch, buckets: str | None
) -> None:
    """``dagster_project`` (one defs.yaml) equals ``build_definitions`` of the same variables."""
    for name in ("CIO_RETL_MODELS_DIR", "CIO_RETL_STATE_URL", "CIO_REGION", "CIO_RETL_BUCKETS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CIO_SITE_ID", SITE_ID)
    monkeypatch.setenv("CIO_API_KEY", API_KEY)
    monkeypatch.setenv("CIO_RETL_WAREHOUSE_URL", "duckdb:///elsewhere.duckdb")
    if buckets:
        monkeypatch.setenv("CIO_RETL_BUCKETS", buckets)
    project = dg.load_from_defs_folder(path_within_project=REPO / "dagster_project")
    variables = build_definitions(dict(os.environ))
    assert shape(project) == shape(variables)
    assert shape(project)["assets"]
    for name in ("customerio", "warehouse"):
        ours, theirs = project.resources[name], variables.resources[name]
        for field in ("site_id", "api_key", "warehouse_url", "state_url", "models_dir"):
            assert getattr(ours, field, None) == getattr(theirs, field, None), (name, field)
    assert project.resources["customerio"].api_key == dg.EnvVar("CIO_API_KEY")
    assert API_KEY not in repr(project.resources)


def test_scaffolded_component_syncs_through_an_overridden_execute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    engine = create_engine(url)
    create_demo_warehouse(engine)
    engine.dispose()  # the sync opens the file itself
    EXECUTED.clear()
    with (
        Emulator(site_id=SITE_ID, api_key=API_KEY) as emulator,
        create_defs_folder_sandbox() as sandbox,
    ):
        for name, value in {
            "CIO_RETL_WAREHOUSE_URL": url,
            "CIO_SITE_ID": SITE_ID,
            "CIO_API_KEY": API_KEY,
            "CIO_TRACK_API_URL": emulator.url,
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("CIO_RETL_STATE_URL", raising=False)
        path = scaffold(sandbox)
        set_type(path, RecordingComponent)
        with sandbox.load_component_and_build_defs(defs_path=path) as (component, defs):
            assert isinstance(component, RecordingComponent)
            job = defs.resolve_implicit_global_asset_job_def()
            with dg.DagsterInstance.ephemeral() as instance:
                result = job.execute_in_process(instance=instance, raise_on_error=False)
        assert result.success
        assert [sorted(names) for names in EXECUTED] == [
            sorted(name.removesuffix(".sql") for name, _ in EXAMPLE_MODELS.values())
        ]
        expected = expected_workspace(engine, SCAFFOLD_PEOPLE, SCAFFOLD_OBJECTS)
        engine.dispose()
        assert actual_workspace(emulator) == expected
        assert len(expected["people"]) > 100 and expected["relationships"]
        assert_scaffold_extras(emulator, url)


def assert_scaffold_extras(emulator: Emulator, url: str) -> None:
    """The event, device and suppression examples: one ``signed_up`` event and one device
    per active user, and every deleted user suppressed."""
    users = sql_rows(url, "SELECT email, user_id, deleted_at IS NULL FROM demo.users")
    active = {email: user_id for email, user_id, is_active in users if is_active}
    ws = emulator.workspace
    events = {email: [e["name"] for e in got] for email, got in ws.events("email").items()}
    assert events == {email: ["signed_up"] for email in active}
    devices = {
        person.email: {token: d["platform"] for token, d in person.devices.items()}
        for person in ws.people.values()
        if person.devices
    }
    assert devices == {
        email: {f"demo-token-{uid}": "ios" if uid % 2 == 0 else "android"}
        for email, uid in active.items()
    }
    deleted = {("email", email) for email, _, is_active in users if not is_active}
    assert deleted and ws.suppressed == deleted
