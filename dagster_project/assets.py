"""The asset factory: one Dagster asset per SQL model file, each a call to the engine.

Assets are built from the files, not written by hand, so adding ``sql/accounts.sql`` adds
``customerio/accounts`` with no Python change. All sync logic stays in ``cio_retl.sync``.

No ``from __future__ import annotations`` here: Dagster reads the asset function's parameter
annotations (config and resource classes) as real types when the asset is defined.
"""

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import dagster as dg
from pydantic import Field

from cio_retl.errors import CioRetlError, ConfigError, FatalSendError
from cio_retl.models import Kind, Model, load_models
from cio_retl.sync import ModelReport, RunReport, SyncOptions, run_sync
from dagster_project.resources import (
    PROJECT_ROOT,
    CustomerIOResource,
    WarehouseResource,
    engine_settings,
)

KEY_PREFIX = "customerio"
GROUP_NAME = "customerio"
POOL = "cio_retl_warehouse"
"""Concurrency pool of every model asset. Unlimited unless the instance sets a limit; set it
to 1 (``dagster instance concurrency set cio_retl_warehouse 1``) to keep overlapping runs
from opening an embedded DuckDB file twice."""

SAMPLE_SIZE = 3


class SyncConfig(dg.Config):
    """Run config of every model asset (the ``--dry-run`` / ``--full-resync`` flags)."""

    dry_run: bool = Field(
        default=False, description="Plan only: count and sample what would be sent; send nothing."
    )
    full_resync: bool = Field(
        default=False, description="Send every row in full, not only what changed."
    )


def asset_key(model: Model) -> dg.AssetKey:
    """``customerio/<file stem>``: the key DESIGN.md promises for each model file."""
    return dg.AssetKey([KEY_PREFIX, model.name])


def build_model_assets(models_dir: Path) -> list[dg.AssetsDefinition]:
    """One asset per model in ``models_dir``; raises the engine's ModelError for a bad file."""
    models = load_models(models_dir)
    return [_model_asset(model, _upstream(model, models)) for model in models]


def _upstream(model: Model, models: Sequence[Model]) -> list[dg.AssetKey]:
    """What must be synced first: a relationship needs its people and objects to exist.

    That is every person model (any identifier may name the same people) and the object
    models of the relationship's object type; people and objects need nothing before them.
    """
    if model.kind is not Kind.RELATIONSHIP:
        return []
    return [
        asset_key(other)
        for other in models
        if other.kind is Kind.PERSON
        or (other.kind is Kind.OBJECT and other.object_type_id == model.object_type_id)
    ]


def _model_asset(model: Model, deps: Iterable[dg.AssetKey]) -> dg.AssetsDefinition:
    tags = {"cio_retl/kind": model.kind.value, "cio_retl/mode": model.mode.value}
    if model.object_type_id:
        tags["cio_retl/object_type_id"] = model.object_type_id
    text = model.path.read_text(encoding="utf-8")

    @dg.asset(
        key=asset_key(model),
        group_name=GROUP_NAME,
        description=model.description or f"Customer.io {model.kind.value}s from {model.path.name}.",
        deps=list(deps),
        kinds={"customerio", "sql"},
        tags=tags,
        metadata=_definition_metadata(model),
        code_version=hashlib.sha256(text.encode()).hexdigest()[:16],
        pool=POOL,
    )
    def _sync(
        context: dg.AssetExecutionContext,
        config: SyncConfig,
        customerio: CustomerIOResource,
        warehouse: WarehouseResource,
    ) -> dg.MaterializeResult[None]:
        return sync_model(context, model.name, config, customerio, warehouse)

    return _sync


def _definition_metadata(model: Model) -> dict[str, dg.MetadataValue]:
    """Static facts shown on the asset page: where the model lives and what it selects."""
    try:
        shown = model.path.resolve().relative_to(PROJECT_ROOT)
    except ValueError:
        shown = model.path
    metadata: dict[str, dg.MetadataValue] = {
        "model_path": dg.MetadataValue.path(str(shown)),
        "kind": dg.MetadataValue.text(model.kind.value),
        "mode": dg.MetadataValue.text(model.mode.value),
        "key_columns": dg.MetadataValue.text(", ".join(model.key_columns)),
        "sql": dg.MetadataValue.md(f"```sql\n{model.sql}\n```"),
    }
    for name in ("identifier", "object_type_id", "person_identifier"):
        value = getattr(model, name)
        if value:
            metadata[name] = dg.MetadataValue.text(value)
    return metadata


def sync_model(
    context: dg.AssetExecutionContext,
    name: str,
    config: SyncConfig,
    customerio: CustomerIOResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult[None]:
    """Run the engine for one model and report what it did (or would do) as metadata.

    Errors that stop a run become ``dg.Failure`` with the engine's message, which names the
    problem and never a secret; configuration errors are not retried since retrying cannot
    fix them.
    """
    options = SyncOptions(
        dry_run=config.dry_run, full_resync=config.full_resync, sample_size=SAMPLE_SIZE
    )
    try:
        report = run_sync(engine_settings(customerio, warehouse), [name], options)
    except CioRetlError as exc:
        raise dg.Failure(
            description=str(exc),
            metadata={"error_type": type(exc).__name__, "exit_code": exc.exit_code},
            allow_retries=not isinstance(exc, ConfigError | FatalSendError),
        ) from None
    model_report = _only(report, name)
    metadata = report_metadata(report, model_report)
    if report.error:  # retries ran out: what was acknowledged is kept; the rest goes next run
        raise dg.Failure(description=report.error, metadata=metadata)
    context.log.info(_summary(report, model_report))
    return dg.MaterializeResult(metadata=metadata)


def _only(report: RunReport, name: str) -> ModelReport:
    for model_report in report.models:
        if model_report.model == name:
            return model_report
    raise dg.Failure(description=f"the engine reported no result for model {name!r}")


def report_metadata(report: RunReport, model: ModelReport) -> dict[str, dg.MetadataValue]:
    """Counts as numbers (plotted by Dagster across runs), plus samples and rejections."""
    metadata: dict[str, dg.MetadataValue] = {
        "dry_run": dg.MetadataValue.bool(report.dry_run),
        "cio_retl_run_id": dg.MetadataValue.text(report.run_id),
        "status": dg.MetadataValue.text(model.status),
        "rows": dg.MetadataValue.int(model.rows),
        "planned": dg.MetadataValue.int(model.planned),
        "created": dg.MetadataValue.int(model.created),
        "updated": dg.MetadataValue.int(model.updated),
        "deleted": dg.MetadataValue.int(model.deleted),
        "unchanged": dg.MetadataValue.int(model.unchanged),
        "rejected": dg.MetadataValue.int(model.rejected),
        "requests": dg.MetadataValue.int(model.requests),
        "bytes_sent": dg.MetadataValue.int(model.bytes_sent),
        "items_sent": dg.MetadataValue.int(model.items_sent),
        "duration_s": dg.MetadataValue.float(round(model.duration_s, 3)),
    }
    if report.dry_run:
        # In a dry run created/updated/deleted count what WOULD be sent; these are the items.
        metadata["sample_payloads"] = dg.MetadataValue.json(list(model.samples))
    if model.rejections:
        metadata["rejections"] = dg.MetadataValue.md(_rejections_markdown(model))
    return metadata


def _rejections_markdown(model: ModelReport) -> str:
    lines = ["| key | reason |", "|---|---|"]
    for key, reason in model.rejections:
        lines.append(f"| {_cell(key if key is not None else '(null key)')} | {_cell(reason)} |")
    if model.rejected > len(model.rejections):
        lines.append(f"\n{model.rejected - len(model.rejections)} more; see `cio-retl status`.")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _summary(report: RunReport, model: ModelReport) -> str:
    verb = "would send" if report.dry_run else "sent"
    return (
        f"{model.model}: {model.rows} rows; {verb} {model.created} created, {model.updated} "
        f"updated, {model.deleted} deleted; {model.unchanged} unchanged, {model.rejected} rejected"
    )
