"""A models folder's definitions: model assets and their checks, a job and a schedule per
model group, the automation sensor, and the resources.

Three front ends share :func:`_definitions`: :func:`build_customerio_defs` (a Python
project), ``CustomerIOComponent`` (a ``defs.yaml``, which calls it) and
:func:`build_definitions` (the command line's variables). A broken model file fails loading
with the engine's ModelError (file:line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import dagster as dg

from cio_retl.buckets import MAX_BUCKETS
from cio_retl.config import DEFAULT_WAREHOUSE_FILE, Settings
from cio_retl.errors import ConfigError
from dagster_cio_retl.assets import (
    DEFAULT_RETRY_POLICY,
    OP_NAME,
    RELATIONSHIPS_OP_NAME,
    ExecuteFn,
    build_model_assets,
)
from dagster_cio_retl.project_config import ProjectConfig, Schedule, load_project_config
from dagster_cio_retl.resources import (
    DEFAULT_MODELS_DIR,
    PROJECT_ROOT,
    CustomerIOResource,
    WarehouseResource,
    buckets_from_env,
    models_dir_from_env,
    resources_from_env,
)
from dagster_cio_retl.translator import CustomerIOTranslator

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


def build_customerio_defs(
    models_dir: str | Path = DEFAULT_MODELS_DIR,
    *,
    warehouse_url: dg.EnvVar | None = None,
    state_url: dg.EnvVar | None = None,
    site_id: dg.EnvVar | None = None,
    api_key: dg.EnvVar | None = None,
    region: str = "us",
    track_api_url: str | None = None,
    rate_limit: str | None = None,
    rate_budget: str | None = None,
    state_schema: str | None = None,
    buckets: int = 1,
    schedules: Mapping[str, Schedule] | None = None,
    translator: CustomerIOTranslator | None = None,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
    execute: ExecuteFn | None = None,
    root: str | Path | None = None,
) -> dg.Definitions:
    """Everything for the models in ``models_dir``, for a project that does not use
    Components (``CustomerIOComponent`` builds its definitions with this function).

    URLs and credentials are ``dg.EnvVar``s, never values: a value would be stored in the
    code location and shown in the UI. A variable that is unset when the definitions load
    is left unbound, so that definitions load and dry runs work without credentials; the
    engine refuses to send without them. ``root`` (default: the working directory) is what
    a relative ``models_dir`` and the default DuckDB file ``cio_retl.duckdb`` are taken
    from. ``schedules`` sets a group's cron over the models folder's ``dagster.toml``.
    Raises ConfigError for a bad setting and ModelError for a bad model file, before
    anything is sent.
    """
    base = Path(root).expanduser().resolve() if root is not None else Path.cwd()
    folder = Path(models_dir).expanduser()
    folder = folder if folder.is_absolute() else base / folder
    for name, value in (
        ("warehouse_url", warehouse_url),
        ("state_url", state_url),
        ("site_id", site_id),
        ("api_key", api_key),
    ):
        if value is not None and not isinstance(value, dg.EnvVar):
            raise ConfigError(
                f"{name} must name an environment variable (dg.EnvVar('VAR'), or "
                "'{{ env.VAR }}' in defs.yaml), not a value: a value would be stored in the "
                "code location and shown in the Dagster UI"
            )
    _check_settings(
        {
            "region": region,
            "track_api_url": track_api_url,
            "rate_limit": rate_limit,
            "rate_budget": rate_budget,
            "state_schema": state_schema,
        },
        buckets,
    )
    project = _with_schedules(load_project_config(folder), schedules or {})
    customerio = CustomerIOResource(
        site_id=_bound(site_id),
        api_key=_bound(api_key),
        region=region,
        track_api_url=track_api_url or None,
        rate_limit=rate_limit or None,
        rate_budget=rate_budget or None,
    )
    warehouse = WarehouseResource(
        warehouse_url=_bound(warehouse_url) or f"duckdb:///{base / DEFAULT_WAREHOUSE_FILE}",
        state_url=_bound(state_url),
        state_schema=state_schema or None,
        models_dir=str(folder),
    )
    return _definitions(
        folder,
        project,
        {"customerio": customerio, "warehouse": warehouse},
        buckets=buckets,
        translator=translator,
        retry_policy=retry_policy,
        execute=execute,
        root=base,
    )


def build_definitions(
    environ: Mapping[str, str] | None = None,
    *,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
) -> dg.Definitions:
    """The definitions the command line's variables describe (``CIO_RETL_MODELS_DIR``,
    ``CIO_RETL_BUCKETS``, ``CIO_*``), relative paths taken from this checkout's root;
    ``environ`` is for tests."""
    environ = os.environ if environ is None else environ
    models_dir = models_dir_from_env(environ)
    return _definitions(
        models_dir,
        load_project_config(models_dir),
        resources_from_env(environ),
        buckets=buckets_from_env(environ),
        retry_policy=retry_policy,
    )


def _definitions(
    models_dir: Path,
    project: ProjectConfig,
    resources: Mapping[str, object],
    *,
    buckets: int,
    translator: CustomerIOTranslator | None = None,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
    execute: ExecuteFn | None = None,
    root: Path = PROJECT_ROOT,
) -> dg.Definitions:
    assets = build_model_assets(
        models_dir,
        project,
        retry_policy=retry_policy,
        buckets=buckets,
        translator=translator,
        execute=execute,
        root=root,
    )
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
        resources=resources,
        executor=EXECUTOR,  # also for runs launched from the asset graph, not only the jobs
    )


def _bound(var: dg.EnvVar | None) -> dg.EnvVar | None:
    """The variable if it is set now, else None: Dagster fails a run whose ``EnvVar`` is
    unset before any code runs, which would block dry runs without credentials."""
    return var if var is not None and os.environ.get(var.env_var_name) else None


# The engine's variable behind each plain setting: Settings.from_env checks them.
_SETTING_VARS = {
    "region": "CIO_REGION",
    "track_api_url": "CIO_TRACK_API_URL",
    "rate_limit": "CIO_RETL_RATE_LIMIT",
    "rate_budget": "CIO_RETL_RATE_BUDGET",
    "state_schema": "CIO_RETL_STATE_SCHEMA",
}


def _check_settings(values: Mapping[str, str | None], buckets: int) -> None:
    """The engine's own checks (``Settings.from_env``), at load time, so that a bad setting
    stops before anything runs; the message names the attribute, not the variable."""
    try:
        Settings.from_env({_SETTING_VARS[name]: v for name, v in values.items() if v})
    except ConfigError as exc:
        message = str(exc)
        for name, var in _SETTING_VARS.items():
            message = message.replace(var, name)
        raise ConfigError(message) from None
    if isinstance(buckets, bool) or not 1 <= buckets <= MAX_BUCKETS:
        raise ConfigError(f"buckets must be a whole number 1..{MAX_BUCKETS}, not {buckets!r}")


def _with_schedules(project: ProjectConfig, schedules: Mapping[str, Schedule]) -> ProjectConfig:
    """``dagster.toml`` with each named group's cron and timezone replaced."""
    groups = {name: dict(section) for name, section in project.groups.items()}
    for group, schedule in schedules.items():
        groups.setdefault(group, {}).update(cron=schedule.cron, timezone=schedule.timezone)
    return replace(project, groups=groups)


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
