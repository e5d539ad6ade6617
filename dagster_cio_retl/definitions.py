"""A whole code location's definitions: model assets and their checks, a job and a schedule
per model group, the automation sensor, and the resources.

``dagster_project.definitions`` (loaded by ``dagster dev`` / ``dg dev``) calls
:func:`build_definitions`. A broken model file fails loading with the engine's ModelError
(file:line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from dagster_cio_retl.assets import (
    DEFAULT_RETRY_POLICY,
    OP_NAME,
    RELATIONSHIPS_OP_NAME,
    build_model_assets,
)
from dagster_cio_retl.project_config import ProjectConfig, load_project_config
from dagster_cio_retl.resources import buckets_from_env, models_dir_from_env, resources_from_env

JOB_NAME = "sync_all_models"
# With buckets: the two stages, each partitioned; relationships after every bucket of the first.
STAGE_JOBS = {OP_NAME: "sync_people_and_objects", RELATIONSHIPS_OP_NAME: "sync_relationships"}
AUTOMATION_SENSOR_NAME = "customerio_on_upstream_update"

# One process for every step. DuckDB lets one process write a database file at a time, and
# warehouse and state share that file by default. The sync is one op anyway (see assets.py);
# across runs, the op's concurrency pool ``cio_retl`` queues overlapping syncs.
EXECUTOR = dg.in_process_executor


def group_job_name(group: str) -> str:
    return f"sync_{group}"


def group_schedule_name(group: str) -> str:
    return f"sync_{group}_schedule"


def build_definitions(
    environ: Mapping[str, str] | None = None,
    *,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
) -> dg.Definitions:
    """Definitions for the models in ``CIO_RETL_MODELS_DIR``; ``environ`` is for tests."""
    environ = os.environ if environ is None else environ
    models_dir = models_dir_from_env(environ)
    project = load_project_config(models_dir)
    buckets = buckets_from_env(environ)
    assets = build_model_assets(models_dir, project, retry_policy=retry_policy, buckets=buckets)
    everything = dg.AssetSelection.assets(*assets)
    schedules: list[dg.ScheduleDefinition] = []
    if buckets > 1:
        jobs = _stage_jobs(assets)
    else:
        jobs, schedules = _group_jobs(assets, project)
    # Declarative automation (AutomationCondition on each asset with `-- deps:`, and with
    # buckets each asset's cron), evaluated by this sensor rather than the implicit default
    # one so that it has a clear name and covers exactly these assets. Off until switched
    # on in the UI, like the schedules.
    automation = dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR_NAME,
        target=everything,
        description="Syncs a model when a warehouse table named in its `-- deps:` header "
        "(e.g. a dbt model) is materialized"
        + ("; with buckets, also on each group's cron." if buckets > 1 else "."),
    )
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        schedules=schedules,
        sensors=[automation],
        resources=resources_from_env(environ),
        executor=EXECUTOR,  # also for runs launched from the asset graph, not only the jobs
    )


def _stage_jobs(assets: list[dg.AssetsDefinition]) -> list[dg.UnresolvedAssetJobDefinition]:
    """With buckets, one partitioned job per stage. A run of a job is one bucket; to sync
    everything, backfill all buckets of the first stage, then of the second (or let the
    automation sensor's ``on_cron`` conditions do it, in that order)."""
    return [
        dg.define_asset_job(
            STAGE_JOBS[asset.op.name],
            selection=dg.AssetSelection.assets(asset),
            description=f"Sync one hash bucket of {', '.join(k.path[-1] for k in asset.keys)}.",
            executor_def=EXECUTOR,
        )
        for asset in assets
    ]


def _group_jobs(
    assets: list[dg.AssetsDefinition], project: ProjectConfig
) -> tuple[list[dg.UnresolvedAssetJobDefinition], list[dg.ScheduleDefinition]]:
    specs = [spec for asset in assets for spec in asset.specs]
    groups = sorted({spec.group_name or "default" for spec in specs})
    everything = dg.AssetSelection.assets(*assets)
    jobs = [
        dg.define_asset_job(
            JOB_NAME,
            selection=everything,
            description="Sync every model to Customer.io: objects and people, then relationships.",
            executor_def=EXECUTOR,
        )
    ]
    schedules = []
    for group in groups:
        job = dg.define_asset_job(
            group_job_name(group),
            selection=dg.AssetSelection.groups(group),
            description=f"Sync the models of the group {group!r} to Customer.io.",
            executor_def=EXECUTOR,
        )
        schedule = project.schedule_of(group)
        jobs.append(job)
        schedules.append(
            dg.ScheduleDefinition(
                name=group_schedule_name(group),
                job=job,
                cron_schedule=schedule.cron,
                execution_timezone=schedule.timezone,
                description=f"Sync {group!r} on `{schedule.cron}` ({schedule.timezone}); "
                "set in the models folder's dagster.toml.",
            )
        )
    return jobs, schedules
