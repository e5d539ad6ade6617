"""Dagster with ``CIO_RETL_BUCKETS``: partitioned assets, one bucket per run, relationships
after every bucket of people and objects, by backfill order and by automation."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest

from cio_retl.errors import ConfigError
from cio_retl.warehouse import create_engine
from dagster_cio_retl.assets import OP_NAME, RELATIONSHIPS_OP_NAME, SyncConfig, build_model_assets
from dagster_cio_retl.definitions import STAGE_JOBS, build_definitions
from tests.test_dagster import COMPANIES, MEMBERSHIPS, NO_DELAY, SQL_DIR, USERS, Env, metadata
from tests.test_dagster import env as env  # the fixture
from tests.test_sync_duckdb import actual_workspace, expected_workspace

pytestmark = pytest.mark.dagster


def test_buckets_partition_two_stages(tmp_path: Path) -> None:
    defs = build_definitions({"CIO_RETL_BUCKETS": "16"})
    graph = defs.resolve_asset_graph()
    for key in (USERS, COMPANIES, MEMBERSHIPS):
        partitions = graph.get(key).partitions_def
        assert partitions is not None
        assert partitions.get_partition_keys() == [f"{i:02d}" for i in range(16)]
    entities = defs.resolve_assets_def(USERS)
    relationships = defs.resolve_assets_def(MEMBERSHIPS)
    assert entities.op.name == OP_NAME and set(entities.keys) == {USERS, COMPANIES}
    assert relationships.op.name == RELATIONSHIPS_OP_NAME
    # devices and events name people too: the second stage, after every bucket of people
    assert relationships.keys == {
        MEMBERSHIPS,
        dg.AssetKey(["customerio", "devices"]),
        dg.AssetKey(["customerio", "orders"]),
    }
    # every bucket of the relationships waits for every bucket of people and objects
    for upstream in (USERS, COMPANIES):
        mapping = relationships.get_partition_mapping_for_dep(upstream)
        assert isinstance(mapping, dg.AllPartitionMapping)
    assert relationships.backfill_policy == dg.BackfillPolicy.multi_run(1)
    assert {job.name for job in defs.jobs or []} == set(STAGE_JOBS.values())
    assert not list(defs.schedules or [])  # the group cron is each asset's on_cron now
    # without buckets nothing changes: one unpartitioned multi-asset
    (single,) = build_model_assets(SQL_DIR, buckets=1)
    assert single.partitions_def is None and len(single.keys) == 5
    for bad in ("0", "x", "5000"):
        with pytest.raises(ConfigError, match="CIO_RETL_BUCKETS"):
            build_definitions({"CIO_RETL_BUCKETS": bad})


def test_materializing_every_bucket_equals_one_sync(env: Env) -> None:
    assets = build_model_assets(SQL_DIR, retry_policy=NO_DELAY, buckets=4)
    created: dict[dg.AssetKey, int] = {}
    for keys, op in (([USERS, COMPANIES], OP_NAME), ([MEMBERSHIPS], RELATIONSHIPS_OP_NAME)):
        for bucket in ("0", "1", "2", "3"):
            result = dg.materialize(
                assets,
                resources=env.resources(),
                run_config=dg.RunConfig(ops={op: SyncConfig()}),
                selection=keys,
                partition_key=bucket,
                raise_on_error=False,
            )
            assert result.success, bucket
            for key in keys:
                meta = metadata(result, key)
                assert meta["cio_retl_run_id"].endswith(f"-b{bucket}of4")
                created[key] = created.get(key, 0) + meta["created"]
    engine = create_engine(env.url)
    try:
        expected = expected_workspace(engine)
    finally:
        engine.dispose()
    assert actual_workspace(env.emulator) == expected
    assert created == {
        USERS: len(expected["people"]),
        COMPANIES: len(expected["objects"]),
        MEMBERSHIPS: len(expected["relationships"]),
    }


def test_automation_sends_relationships_after_every_bucket_of_people(tmp_path: Path) -> None:
    """On the group's cron tick every bucket of people and objects is requested; the
    relationships' buckets only once all of those were materialized after the tick."""
    defs = build_definitions({"CIO_RETL_BUCKETS": "4"})
    before_tick = dt.datetime(2026, 11, 23, 5, 59, tzinfo=dt.UTC)  # default cron: 06:00 UTC
    with dg.DagsterInstance.ephemeral() as instance:
        first = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, evaluation_time=before_tick
        )
        assert first.total_requested == 0
        tick = dg.evaluate_automation_conditions(
            defs=defs,
            instance=instance,
            cursor=first.cursor,
            evaluation_time=before_tick + dt.timedelta(minutes=2),
        )
        assert tick.get_num_requested(USERS) == tick.get_num_requested(COMPANIES) == 4
        assert tick.get_num_requested(MEMBERSHIPS) == 0  # people and objects not synced yet
        for bucket in ("0", "1", "2"):  # three of four buckets done: still waiting
            for key in (USERS, COMPANIES):
                instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=bucket))
        waiting = dg.evaluate_automation_conditions(
            defs=defs,
            instance=instance,
            cursor=tick.cursor,
            evaluation_time=before_tick + dt.timedelta(minutes=3),
        )
        assert waiting.get_num_requested(MEMBERSHIPS) == 0
        for key in (USERS, COMPANIES):
            instance.report_runless_asset_event(dg.AssetMaterialization(key, partition="3"))
        ready = dg.evaluate_automation_conditions(
            defs=defs,
            instance=instance,
            cursor=waiting.cursor,
            evaluation_time=before_tick + dt.timedelta(minutes=4),
        )
        assert ready.get_num_requested(MEMBERSHIPS) == 4
        assert ready.get_num_requested(USERS) == 0  # once per tick
