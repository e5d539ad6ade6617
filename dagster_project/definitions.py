"""The code location: model assets, the sync job, its daily schedule and the resources.

Loaded by ``dagster dev`` / ``dg dev`` through ``[tool.dagster]`` / ``[tool.dg.project]`` in
pyproject.toml. A broken model file fails loading with the engine's ModelError (file:line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from dagster_project.assets import GROUP_NAME, build_model_assets
from dagster_project.resources import models_dir_from_env, resources_from_env

JOB_NAME = "customerio_sync"
SCHEDULE_NAME = "customerio_daily"

# One process for every step, in dependency order. DuckDB lets one process write a database
# file at a time, and warehouse and state share that file by default; the default
# multiprocess executor would run sibling models (users, companies) in parallel processes
# and the second would fail on the file lock. Runs are short (only changes travel) and the
# Track API rate limit is per workspace, so parallel steps would buy little anyway. Across
# runs, the assets share the pool ``cio_retl_warehouse`` (see assets.POOL) that an operator
# can limit to 1.
EXECUTOR = dg.in_process_executor


def build_definitions(environ: Mapping[str, str] | None = None) -> dg.Definitions:
    """Definitions for the models in ``CIO_RETL_MODELS_DIR``; ``environ`` is for tests."""
    environ = os.environ if environ is None else environ
    assets = build_model_assets(models_dir_from_env(environ))
    sync_job = dg.define_asset_job(
        JOB_NAME,
        selection=dg.AssetSelection.groups(GROUP_NAME),
        description="Sync every model to Customer.io: objects and people, then relationships.",
        executor_def=EXECUTOR,
    )
    daily = dg.ScheduleDefinition(
        name=SCHEDULE_NAME,
        job=sync_job,
        cron_schedule="0 6 * * *",
        execution_timezone="UTC",
        description="Daily sync at 06:00 UTC.",
    )
    return dg.Definitions(
        assets=assets,
        jobs=[sync_job],
        schedules=[daily],
        resources=resources_from_env(environ),
        executor=EXECUTOR,  # also for runs launched from the asset graph, not only the job
    )


defs = build_definitions()
