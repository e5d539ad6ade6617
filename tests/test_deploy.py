"""``deploy/dagster.yaml``, the production Dagster instance: loaded as it ships into a real
DagsterInstance on a fresh PostgreSQL database, it runs one hash bucket of the partitioned
assets (warehouse, state and shared rate budget on PostgreSQL too, Customer.io the
emulator) and keeps the run in PostgreSQL."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from cio_retl.buckets import bucket_of
from cio_retl.emulator import Emulator
from dagster_cio_retl.assets import OP_NAME, SyncConfig, build_model_assets
from dagster_cio_retl.resources import CustomerIOResource, WarehouseResource
from tests.conftest import API_KEY, REPO, SITE_ID, PgSchemas, sql_rows
from tests.test_dagster import COMPANIES, NO_DELAY, USERS, metadata
from tests.test_postgres import demo_on_postgres
from tests.test_sync_duckdb import actual_workspace

DEPLOY_YAML = REPO / "deploy" / "dagster.yaml"
BUCKETS = 16
BUCKET = 5  # partition "05"


@pytest.fixture
def dagster_db(postgres_url: str) -> Iterator[sa.URL]:
    """A database of its own on the test server for the Dagster instance, dropped after."""
    name = f"cio_retl_dagster_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.make_url(postgres_url).set(database=name)
        with admin.connect() as conn:  # FORCE: a pooled connection the instance left open
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.dagster
def test_deploy_instance_keeps_a_bucket_run_in_postgres(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dagster_db: sa.URL,
    pg_schemas: PgSchemas,
    emulator: Emulator,
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_PG_USERNAME", dagster_db.username or "postgres")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", dagster_db.password or "")
    monkeypatch.setenv("DAGSTER_PG_HOST", dagster_db.host or "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_DB", dagster_db.database or "")
    monkeypatch.setenv("DAGSTER_PG_PORT", str(dagster_db.port or 5432))

    # Warehouse and state on PostgreSQL, as deployed: the rate budget is the shared one.
    models, expected = demo_on_postgres(pg_schemas, tmp_path / "models")
    assets = build_model_assets(models, retry_policy=NO_DELAY, buckets=BUCKETS)
    resources = {
        "customerio": CustomerIOResource(
            site_id=SITE_ID, api_key=API_KEY, track_api_url=emulator.url, rate_budget="shared"
        ),
        "warehouse": WarehouseResource(
            warehouse_url=pg_schemas.url, state_schema=pg_schemas.state, models_dir=str(models)
        ),
    }

    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert isinstance(instance.run_launcher, DefaultRunLauncher)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None and queue.max_concurrent_runs == 8
        result = dg.materialize(
            assets,
            instance=instance,
            resources=resources,
            run_config=dg.RunConfig(ops={OP_NAME: SyncConfig()}),
            selection=[USERS, COMPANIES],
            partition_key=f"{BUCKET:02d}",
            raise_on_error=False,
        )
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == "05"  # the tag the per-bucket run limit keys on
        stored = instance.get_latest_materialization_event(USERS)
        assert stored is not None and stored.run_id == result.run_id
        assert stored.dagster_event is not None and stored.dagster_event.partition == "05"

    # The run and its events are rows of the instance's own PostgreSQL database.
    url = dagster_db.render_as_string(hide_password=False)
    assert [tuple(r) for r in sql_rows(url, "SELECT run_id, status FROM runs")] == [
        (result.run_id, "SUCCESS")
    ]
    (events,) = sql_rows(url, f"SELECT COUNT(*) FROM event_logs WHERE run_id = '{result.run_id}'")
    assert events[0] > 0

    # Exactly this bucket's people and companies were sent, under the shared budget.
    people = {k: v for k, v in expected["people"].items() if bucket_of(k, BUCKETS) == BUCKET}
    objects = {k: v for k, v in expected["objects"].items() if bucket_of(k[1], BUCKETS) == BUCKET}
    assert people and objects
    workspace = actual_workspace(emulator)
    assert (workspace["people"], workspace["objects"]) == (people, objects)
    assert metadata(result, USERS)["created"] == len(people)
    assert metadata(result, USERS)["cio_retl_run_id"].endswith(f"-b{BUCKET}of{BUCKETS}")
    (budgets,) = sql_rows(pg_schemas.url, f"SELECT COUNT(*) FROM {pg_schemas.state}.rate_budget")
    assert budgets[0] == 1


def test_the_commented_k8s_run_launcher_is_valid_instance_config(tmp_path: Path) -> None:
    """Uncommented in place of the DefaultRunLauncher, the K8sRunLauncher block still makes a
    valid instance config. (Its own keys were checked against dagster-k8s 0.29.27, which the
    project does not install.)"""
    text = DEPLOY_YAML.read_text()
    block = text[text.index("# run_launcher:\n") :]
    uncommented = yaml.safe_load(
        "\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines())
    )
    launcher = uncommented["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert {"env_secrets", "env_vars", "postgres_password_secret"} <= set(launcher["config"])
    config = yaml.safe_load(text)
    config["run_launcher"] = launcher
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    validated, _ = dagster_instance_config(str(tmp_path))
    assert validated["run_launcher"]["class"] == "K8sRunLauncher"
