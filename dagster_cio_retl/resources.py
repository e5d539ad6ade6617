"""Dagster resources that turn environment variables into the engine's :class:`Settings`.

The resources only carry configuration; every decision about defaults, region hosts and
credential checks stays in :meth:`cio_retl.config.Settings.from_env`, so Dagster and the
command line cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
from pydantic import Field

from cio_retl.buckets import MAX_BUCKETS
from cio_retl.config import DEFAULT_WAREHOUSE_FILE, Settings
from cio_retl.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: relative model folders and the default DuckDB file live here, so
``dagster dev`` behaves the same whatever directory it is started from."""

DEFAULT_MODELS_DIR = "sql"
DEFAULT_WAREHOUSE_URL = f"duckdb:///{PROJECT_ROOT / DEFAULT_WAREHOUSE_FILE}"


class CustomerIOResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Track API credentials and host; bind the credentials with ``dg.EnvVar`` so the UI
    shows the variable's name, never its value.

    Credentials are optional so that definitions load and dry runs work without them; the
    engine refuses to send without them, with a message naming the variables.
    """

    site_id: str | None = Field(default=None, description="Track API site ID (CIO_SITE_ID).")
    api_key: str | None = Field(
        default=None, repr=False, description="Track API key (CIO_API_KEY); never logged."
    )
    region: str = Field(default="us", description="`us` or `eu`: picks the Track API host.")
    track_api_url: str | None = Field(
        default=None,
        description="Base URL override, e.g. the local emulator (CIO_TRACK_API_URL).",
    )
    rate_limit: str | None = Field(
        default=None,
        description="The workspace's request limit, REQUESTS/SECONDS (CIO_RETL_RATE_LIMIT); "
        "unset = 1000/1.",
    )
    rate_budget: str | None = Field(
        default=None,
        description="`local`, `shared` (one budget in the PostgreSQL state store for every "
        "worker) or `auto` (CIO_RETL_RATE_BUDGET); unset = auto.",
    )


class WarehouseResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Where the models are read and where the state (snapshots, locks, runs) is kept."""

    warehouse_url: str = Field(
        default=DEFAULT_WAREHOUSE_URL,
        description="SQLAlchemy URL of the warehouse (CIO_RETL_WAREHOUSE_URL).",
    )
    state_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the state store (CIO_RETL_STATE_URL); unset = the warehouse.",
    )
    models_dir: str = Field(
        default=str(PROJECT_ROOT / DEFAULT_MODELS_DIR),
        description="Folder of .sql models (CIO_RETL_MODELS_DIR); relative = to the repo root.",
    )
    state_schema: str | None = Field(
        default=None,
        description="Schema of the state tables (CIO_RETL_STATE_SCHEMA); unset = `cio_retl`.",
    )


def engine_settings(customerio: CustomerIOResource, warehouse: WarehouseResource) -> Settings:
    """Build the engine's settings through ``Settings.from_env`` so its defaults and checks apply.

    Raises :class:`cio_retl.errors.ConfigError` for a bad region, like the command line.
    """
    values = {
        "CIO_RETL_WAREHOUSE_URL": warehouse.warehouse_url,
        "CIO_RETL_STATE_URL": warehouse.state_url,
        "CIO_RETL_STATE_SCHEMA": warehouse.state_schema,
        "CIO_RETL_MODELS_DIR": str(resolve_models_dir(warehouse.models_dir)),
        "CIO_REGION": customerio.region,
        "CIO_TRACK_API_URL": customerio.track_api_url,
        "CIO_SITE_ID": customerio.site_id,
        "CIO_API_KEY": customerio.api_key,  # wrapped in Secret by from_env
        "CIO_RETL_RATE_LIMIT": customerio.rate_limit,
        "CIO_RETL_RATE_BUDGET": customerio.rate_budget,
    }
    return Settings.from_env({k: v for k, v in values.items() if v})


def resolve_models_dir(value: str | None) -> Path:
    """The models folder, a relative one taken from the repo root rather than the cwd."""
    path = Path(value or DEFAULT_MODELS_DIR).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def models_dir_from_env(environ: Mapping[str, str] | None = None) -> Path:
    """``CIO_RETL_MODELS_DIR`` resolved against the repo root; ``sql/`` when unset."""
    environ = os.environ if environ is None else environ
    return resolve_models_dir(environ.get("CIO_RETL_MODELS_DIR"))


def buckets_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``CIO_RETL_BUCKETS``: how many hash buckets partition each model's assets (1 = none).

    Read at load time, like the models folder: it decides the shape of the asset graph.
    """
    environ = os.environ if environ is None else environ
    text = (environ.get("CIO_RETL_BUCKETS") or "1").strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_BUCKETS:
        raise ConfigError(
            f"CIO_RETL_BUCKETS={text!r} is not a bucket count; "
            f"allowed: a whole number 1 to {MAX_BUCKETS}"
        )
    return int(text)


def resources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """The ``customerio`` and ``warehouse`` resources, each field bound to its variable.

    A variable is bound with ``dg.EnvVar`` only when it is set: Dagster fails a run whose
    ``EnvVar`` is unset before any code runs, which would block dry runs without
    credentials. Unset variables fall back to the engine's defaults instead.
    """
    environ = os.environ if environ is None else environ

    def env(name: str) -> dg.EnvVar | None:
        return dg.EnvVar(name) if environ.get(name) else None

    customerio = CustomerIOResource(
        site_id=env("CIO_SITE_ID"),
        api_key=env("CIO_API_KEY"),
        region=env("CIO_REGION") or "us",
        track_api_url=env("CIO_TRACK_API_URL"),
        rate_limit=env("CIO_RETL_RATE_LIMIT"),
        rate_budget=env("CIO_RETL_RATE_BUDGET"),
    )
    warehouse = WarehouseResource(
        warehouse_url=env("CIO_RETL_WAREHOUSE_URL") or DEFAULT_WAREHOUSE_URL,
        state_url=env("CIO_RETL_STATE_URL"),
        state_schema=env("CIO_RETL_STATE_SCHEMA"),
        # Read now, not bound: the same folder decides which assets exist at load time.
        models_dir=str(models_dir_from_env(environ)),
    )
    return {"customerio": customerio, "warehouse": warehouse}
