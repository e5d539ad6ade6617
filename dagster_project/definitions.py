"""The code location: model assets and their checks, a job and a schedule per model group,
the automation sensor, and the resources.

Loaded by ``dagster dev`` / ``dg dev`` through ``[tool.dagster]`` / ``[tool.dg.project]`` in
pyproject.toml. A broken model file fails loading with the engine's ModelError (file:line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from dagster_project.assets import DEFAULT_RETRY_POLICY, build_model_assets
from dagster_project.project_config import load_project_config
from dagster_project.resources import models_dir_from_env, resources_from_env

JOB_NAME = "sync_all_models"
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
    assets = build_model_assets(models_dir, project, retry_policy=retry_policy)
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
    # Declarative automation (AutomationCondition on each asset with `-- deps:`), evaluated
    # by this sensor rather than the implicit default one so that it has a clear name and
    # covers exactly these assets. Off until switched on in the UI, like the schedules.
    automation = dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR_NAME,
        target=everything,
        description="Syncs a model when a warehouse table named in its `-- deps:` header "
        "(e.g. a dbt model) is materialized.",
    )
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        schedules=schedules,
        sensors=[automation],
        resources=resources_from_env(environ),
        executor=EXECUTOR,  # also for runs launched from the asset graph, not only the jobs
    )


defs = build_definitions()
