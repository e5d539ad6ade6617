"""The asset factory: one Dagster asset per SQL model file, all computed by one engine call.

Assets are built from the files, not written by hand, so adding ``sql/accounts.sql`` adds
``customerio/accounts`` with no Python change. All sync logic stays in ``cio_retl.sync``.

Why one subsettable ``@multi_asset`` rather than one ``@asset`` per model: the engine plans
one ordered changeset for the models of a run (objects, people, relationship adds and
deletes, then deletes) and its guardrails stop the whole run, exactly as ``cio-retl sync``
does. Selecting assets in the UI or a job selects the models of that one engine run, and the
launchpad shows one config block (``ops: {cio_retl_sync: {config: ...}}``) instead of one
per model.

With ``CIO_RETL_BUCKETS=N`` (N > 1) every model asset is partitioned into N hash buckets
(static partitions ``00``..``N-1``; see :mod:`cio_retl.buckets`), and a run syncs one bucket.
People and objects are then one multi-asset and relationships another, each relationship
depending on *all* buckets of the people and objects it references
(``AllPartitionMapping``): a relationship may name a person of any bucket. Dagster's asset
backfills and the ``on_cron`` automation conditions wait for those upstream buckets, so
relationships are sent after every person and object, as in one unpartitioned run. Each
bucket is a separate run (``BackfillPolicy.multi_run(1)``), so the run launcher (local
processes, K8sRunLauncher) spreads buckets over workers; the pool ``cio_retl`` bounds how
many run at once, and one rate budget in the state store paces them all together.

The op makes one engine run per materialization. The engine plans it, then asks the op's
blocking pre-send checks (``SyncOptions.approve``) before its first batch; only when they
pass does it send. Dagster fails the step after the op returns if a blocking check failed,
so a failing check means nothing was sent.

No ``from __future__ import annotations`` here: Dagster reads the op function's parameter
annotations (config and resource classes) as real types when the asset is defined.
"""

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import dagster as dg
from pydantic import Field

from cio_retl.buckets import Bucket
from cio_retl.config import Settings
from cio_retl.errors import (
    CioRetlError,
    LockedError,
    ModelError,
    TransientError,
)
from cio_retl.models import Kind, Model, load_models, ordered_for_sync
from cio_retl.progress import ProgressLog
from cio_retl.state import StateStore, Workspace
from cio_retl.sync import ModelReport, RunReport, SyncOptions, run_sync
from cio_retl.warehouse import create_engine
from dagster_cio_retl.project_config import DEFAULT_GROUP, ProjectConfig, load_project_config
from dagster_cio_retl.resources import (
    PROJECT_ROOT,
    CustomerIOResource,
    WarehouseResource,
    engine_settings,
)
from dagster_cio_retl.translator import CustomerIOTranslator

OP_NAME = "cio_retl_sync"
RELATIONSHIPS_OP_NAME = f"{OP_NAME}_relationships"  # partitioned mode's second multi-asset
POOL = "cio_retl"
"""Concurrency pool of the sync op. Set its limit to 1 (``dagster instance concurrency set
cio_retl 1``, or ``concurrency: pools: default_limit: 1`` in dagster.yaml) so that runs
launched by different schedules, sensors or people queue instead of syncing at once: one
model then never syncs twice at a time, the workspace rate limit is not split between
runs, and an embedded DuckDB file is opened by one process at a time. The engine's per-model
lock still refuses a second run if the pool is left unlimited (that failure is retried)."""

DEFAULT_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
"""Retries of transient failures only: retries that ran out inside the engine (429/5xx/
timeouts) or another run holding a model's lock. Configuration, model, credential and
guardrail failures are raised with ``allow_retries=False``: retrying cannot fix them."""

# Check names, shown on each asset's Checks tab.
MODEL_VALID = "model_valid"
GUARDRAILS = "guardrails"
UNIQUE_KEYS = "unique_keys"
NO_STUCK_ROWS = "no_stuck_rows"
EVENTS_IN_LOOKBACK = "events_sent_within_lookback"  # event models with lookback_days
PRE_SEND_CHECKS = (MODEL_VALID, GUARDRAILS, UNIQUE_KEYS)
STUCK_SAMPLE = 10


class SyncConfig(dg.Config):
    """Run config of a sync, set in the launchpad; which models sync is the asset selection."""

    dry_run: bool = Field(
        default=False,
        description="Plan only: count and sample what would be sent, as metadata; send nothing.",
    )
    full_resync: bool = Field(
        default=False, description="Send every row in full, not only what changed."
    )
    force: bool = Field(
        default=False,
        description="Send even if the guardrails or the key checks fail (they are then reported "
        "as warnings); duplicate and NULL keys are still rejected row by row.",
    )
    sample_size: int = Field(
        default=3, ge=0, le=50, description="Sample payloads per model shown for a dry run."
    )
    max_stuck_pct: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="no_stuck_rows fails (as a warning) when more than this share of a model's "
        "rows is rejected or still unacknowledged after the sync.",
    )


def asset_key(model: Model) -> dg.AssetKey:
    """``customerio/<file stem>``: each model file's key under the default translation."""
    return CustomerIOTranslator().get_asset_key(model)


def bucket_partitions(buckets: int) -> dg.StaticPartitionsDefinition:
    """``00``..``15`` for 16 buckets: zero-padded, so the UI lists them in order."""
    width = len(str(buckets - 1))
    return dg.StaticPartitionsDefinition([f"{i:0{width}d}" for i in range(buckets)])


# Seconds between the progress lines a sync writes to the run's log (the CLI's plain lines).
PROGRESS_EVERY = 10.0

# What a sync yields: a materialization per model synced, the plan of a dry run as an
# observation, and the checks.
SyncEvent = dg.MaterializeResult[None] | dg.AssetObservation | dg.AssetCheckResult


class ExecuteFn(Protocol):
    """What the sync op calls once its resources are read: plan, check, send, report.

    :func:`sync_models` by default; ``CustomerIOComponent.execute`` in a component, so a
    subclass can wrap or replace it.
    """

    def __call__(
        self,
        context: dg.AssetExecutionContext,
        settings: Settings,
        models: Sequence[Model],
        config: SyncConfig,
        bucket: Bucket | None,
        keys: Mapping[str, dg.AssetKey],
    ) -> Iterator[SyncEvent]: ...


def build_model_assets(
    models_dir: Path,
    project: ProjectConfig | None = None,
    *,
    retry_policy: dg.RetryPolicy | None = DEFAULT_RETRY_POLICY,
    buckets: int = 1,
    translator: CustomerIOTranslator | None = None,
    execute: ExecuteFn | None = None,
    root: Path = PROJECT_ROOT,
) -> list[dg.AssetsDefinition]:
    """The sync multi-asset(s) for the models in ``models_dir`` (a list, for ``Definitions``).

    One multi-asset without buckets; with ``buckets > 1``, one for people, objects and
    suppressions and one for relationships, devices and events, both partitioned by bucket. Raises the engine's ModelError for a
    bad model file, so the code location fails loading with the file and line. ``root`` is
    what the ``model_path`` metadata is shown relative to.
    """
    models = load_models(models_dir)
    project = project or load_project_config(models_dir)
    translator = translator or CustomerIOTranslator()
    partitions = bucket_partitions(buckets) if buckets > 1 else None
    specs = _specs(models, project, translator, root, partitioned=partitions is not None)
    run = execute or sync_models
    if partitions is None:
        return [_sync_asset(OP_NAME, models, specs, retry_policy, None, run)]
    # The second stage holds what names a person or an object that every bucket of the
    # first must have created: relationships, and a person's devices and events (their
    # keys hash to other buckets than their person's). Suppressions share their people's
    # keys, hence buckets, and stay in the first stage: an unsuppression goes before the
    # identifies of its bucket's run.
    second = (Kind.RELATIONSHIP, Kind.DEVICE, Kind.EVENT)
    entities = [m for m in models if m.kind not in second]
    relationships = [m for m in models if m.kind in second]
    return [
        _sync_asset(name, selected, specs, retry_policy, partitions, run)
        for name, selected in ((OP_NAME, entities), (RELATIONSHIPS_OP_NAME, relationships))
        if selected
    ]


def _sync_asset(
    name: str,
    own: Sequence[Model],
    specs: Mapping[str, dg.AssetSpec],
    retry_policy: dg.RetryPolicy | None,
    partitions: dg.StaticPartitionsDefinition | None,
    execute: ExecuteFn,
) -> dg.AssetsDefinition:
    keys = {model.name: specs[model.name].key for model in own}
    by_key = {keys[model.name]: model for model in own}
    buckets = len(partitions.get_partition_keys()) if partitions else 1

    @dg.multi_asset(
        name=name,
        specs=[specs[model.name] for model in own],
        check_specs=[spec for model in own for spec in _check_specs(model, keys[model.name])],
        can_subset=True,
        pool=POOL,
        retry_policy=retry_policy,
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.multi_run(1) if partitions else None,
        description="Sync the selected models to Customer.io in one ordered changeset"
        + (", one hash bucket per run." if partitions else "."),
    )
    def _sync(
        context: dg.AssetExecutionContext,
        config: SyncConfig,
        customerio: CustomerIOResource,
        warehouse: WarehouseResource,
    ) -> Iterator[SyncEvent]:
        # Engine order (objects, people, relationships) is also the topological order in
        # which Dagster wants a multi-asset's results.
        selected = ordered_for_sync(
            m for key, m in by_key.items() if key in context.selected_asset_keys
        )
        try:
            settings = engine_settings(customerio, warehouse)
        except CioRetlError as exc:
            raise _failure(exc) from None
        bucket = Bucket(int(context.partition_key), buckets) if partitions else None
        yield from execute(context, settings, selected, config, bucket, keys)

    return _sync


def _specs(
    models: Sequence[Model],
    project: ProjectConfig,
    translator: CustomerIOTranslator,
    root: Path,
    *,
    partitioned: bool,
) -> dict[str, dg.AssetSpec]:
    """Every model's spec, by model name: the translator's, then what the sync needs."""
    translated = {
        model.name: translator.get_asset_spec(model, _base_spec(model, project, translator, root))
        for model in models
    }
    keys = {name: spec.key for name, spec in translated.items()}
    return {
        model.name: _with_sync_needs(
            model, translated[model.name], models, keys, project, partitioned=partitioned
        )
        for model in models
    }


def _base_spec(
    model: Model, project: ProjectConfig, translator: CustomerIOTranslator, root: Path
) -> dg.AssetSpec:
    tags = {"cio_retl/kind": model.kind.value, "cio_retl/mode": model.mode.value}
    if model.object_type_id:
        tags["cio_retl/object_type_id"] = model.object_type_id
    text = model.path.read_text(encoding="utf-8")
    return dg.AssetSpec(
        key=translator.get_asset_key(model),
        group_name=translator.get_group_name(model, project),
        description=model.description or f"Customer.io {model.kind.value}s from {model.path.name}.",
        deps=[translator.get_upstream_key(dep) for dep in model.deps],
        kinds={"customerio", "sql"},
        tags=tags,
        owners=project.owners_of(model),
        metadata=_definition_metadata(model, root),
        code_version=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def _with_sync_needs(
    model: Model,
    spec: dg.AssetSpec,
    models: Sequence[Model],
    keys: Mapping[str, dg.AssetKey],
    project: ProjectConfig,
    *,
    partitioned: bool,
) -> dg.AssetSpec:
    upstream = [dep.asset_key for dep in spec.deps]
    first: list[dg.AssetKey | dg.AssetDep] = list(_synced_first(model, models, keys))
    if partitioned:  # a relationship of any bucket may name a person of any bucket
        first = [
            dg.AssetDep(key, partition_mapping=dg.AllPartitionMapping())
            for key in _synced_first(model, models, keys)
        ]
    return spec.replace_attributes(
        deps=[*spec.deps, *first],
        skippable=True,  # nothing is materialized when a blocking check stops the send
        automation_condition=(
            _on_cron_after_upstream(project, spec.group_name, upstream)
            if partitioned
            else _on_upstream_update(upstream)
        ),
    )


def _synced_first(
    model: Model, models: Sequence[Model], keys: Mapping[str, dg.AssetKey]
) -> list[dg.AssetKey]:
    """What must be synced first: a relationship needs its people and objects to exist, an
    event or a device its person.

    For a relationship that is every person model (any identifier may name the same people)
    and the object models of its object type; for events and devices the person models of
    their identifier type. People, objects and suppressions need nothing before them.
    """
    if model.kind in (Kind.EVENT, Kind.DEVICE):  # a person's events and devices: after them
        return [
            keys[other.name]
            for other in models
            if other.kind is Kind.PERSON and other.identifier == model.identifier
        ]
    if model.kind is not Kind.RELATIONSHIP:
        return []
    return [
        keys[other.name]
        for other in models
        if other.kind is Kind.PERSON
        or (other.kind is Kind.OBJECT and other.object_type_id == model.object_type_id)
    ]


def _on_upstream_update(
    upstream: Sequence[dg.AssetKey],
) -> dg.AutomationCondition[dg.AssetKey] | None:
    """Declarative automation: sync when a warehouse table named in ``-- deps:`` updates.

    ``eager()`` limited (``allow``) to those tables, so a dry run or a sync of a sibling
    model (a relationship's people) never triggers a send by itself. It is evaluated by the
    code location's automation sensor (see definitions.py); with no deps, no automation.
    """
    if not upstream:
        return None
    return (
        dg.AutomationCondition.eager()
        .allow(dg.AssetSelection.assets(*upstream))
        .with_label("eager on warehouse deps")
    )


def _on_cron_after_upstream(
    project: ProjectConfig, group: str | None, upstream: Sequence[dg.AssetKey]
) -> dg.AutomationCondition[Any]:
    """Partitioned mode's schedule: every bucket on the group's cron, once everything it
    depends on (for a relationship: every bucket of its people and objects) was updated
    since the tick; and, as without buckets, eagerly when a ``-- deps:`` table updates."""
    schedule = project.schedule_of(group or DEFAULT_GROUP)
    tick: dg.AutomationCondition[Any] = dg.AutomationCondition.cron_tick_passed(
        schedule.cron, schedule.timezone
    )
    # ``on_cron`` is this with ``all_deps_match``, which holds for a dep as soon as ANY of its
    # partitions updated; a relationship bucket must wait for EVERY upstream bucket: no
    # upstream partition may be left that neither updated since the tick nor is requested.
    stale = ~(
        dg.AutomationCondition.newly_updated().since(tick)
        | dg.AutomationCondition.will_be_requested()
    )
    condition = (
        tick.since_last_handled() & ~dg.AutomationCondition.any_deps_match(stale)
    ).with_label(f"on cron {schedule.cron} after every upstream bucket")
    eager = _on_upstream_update(upstream)
    return condition | eager if eager is not None else condition


def _check_specs(model: Model, key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    events = (
        [
            dg.AssetCheckSpec(
                EVENTS_IN_LOOKBACK,
                asset=key,
                description=f"Every event older than lookback_days ({model.lookback_days}) was "
                "sent before it left the window: no run sends those any more.",
            )
        ]
        if model.kind is Kind.EVENT and model.lookback_days is not None
        else []
    )
    return [
        *events,
        dg.AssetCheckSpec(
            MODEL_VALID,
            asset=key,
            blocking=True,
            description="The model's SQL runs and returns its key columns (checked before sending).",
        ),
        dg.AssetCheckSpec(
            GUARDRAILS,
            asset=key,
            blocking=True,
            description=f"The run changes at most {model.max_change_pct:g}% and deletes at most "
            f"{model.max_delete_pct:g}% of the synced rows (checked before sending; "
            "`force: true` lets one run through).",
        ),
        dg.AssetCheckSpec(
            UNIQUE_KEYS,
            asset=key,
            blocking=True,
            description="No two rows share a key and no key is NULL (checked before sending).",
        ),
        dg.AssetCheckSpec(
            NO_STUCK_ROWS,
            asset=key,
            description="After the sync, at most `max_stuck_pct`% of the rows are rejected or "
            "still unacknowledged.",
        ),
    ]


def _definition_metadata(model: Model, root: Path) -> dict[str, dg.MetadataValue]:
    """Static facts shown on the asset page: where the model lives and what it selects."""
    try:
        shown = model.path.resolve().relative_to(root.resolve())
    except ValueError:
        shown = model.path
    metadata: dict[str, dg.MetadataValue] = {
        "model_path": dg.MetadataValue.path(str(shown)),
        "kind": dg.MetadataValue.text(model.kind.value),
        "mode": dg.MetadataValue.text(model.mode.value),
        "key_columns": dg.MetadataValue.text(", ".join(model.key_columns)),
        "max_change_pct": dg.MetadataValue.float(model.max_change_pct),
        "max_delete_pct": dg.MetadataValue.float(model.max_delete_pct),
        "sql": dg.MetadataValue.md(f"```sql\n{model.sql}\n```"),
    }
    for name in (
        "identifier",
        "object_type_id",
        "person_identifier",
        "event_key",
        "event_name",
        "name_column",
        "timestamp",
        "token",
        "platform",
    ):
        value = getattr(model, name)
        if value:
            metadata[name] = dg.MetadataValue.text(value)
    if model.lookback_days is not None:
        metadata["lookback_days"] = dg.MetadataValue.int(model.lookback_days)
    return metadata


# -- the run --------------------------------------------------------------------------------


def sync_models(
    context: dg.AssetExecutionContext,
    settings: Settings,
    models: Sequence[Model],
    config: SyncConfig,
    bucket: Bucket | None = None,
    keys: Mapping[str, dg.AssetKey] | None = None,
) -> Iterator[SyncEvent]:
    """Plan, check, and (unless a dry run or a blocking check failed) send; report it all.

    One engine run: the blocking checks are evaluated from its plan, between planning and
    the first batch, so the changed rows are read once and what is sent is what was checked.
    ``keys``: each model's asset key by model name (default ``customerio/<name>``).
    """
    keys = keys or {m.name: asset_key(m) for m in models}
    checked: list[dg.AssetCheckResult] = []

    def approve(plan: RunReport) -> list[str]:
        blocked = []
        for model in models:
            for result in _pre_send_checks(
                model, keys[model.name], _only(plan, model.name), config.force
            ):
                if not result.passed and result.severity is dg.AssetCheckSeverity.ERROR:
                    blocked.append(f"{model.name}: {result.check_name}")
                checked.append(result)
        return blocked

    options = SyncOptions(
        dry_run=config.dry_run,
        full_resync=config.full_resync,
        force=config.force,
        sample_size=config.sample_size if config.dry_run else 0,
        bucket=bucket,
        approve=approve,
    )
    progress = None if config.dry_run else ProgressLog(context.log.info, PROGRESS_EVERY)
    try:
        report = run_sync(settings, [m.name for m in models], options, progress=progress)
    except ModelError as exc:
        yield from _invalid_model(models, exc, keys)
        return  # Dagster fails the step on the failed blocking check; nothing was sent
    except CioRetlError as exc:
        yield from checked  # what was checked before the failure
        raise _failure(exc) from None
    yield from checked
    for notice in report.notices:  # worth a look, not an error (in each model's metadata too)
        context.log.warning(notice)

    if config.dry_run:
        # Nothing was sent, so nothing is materialized: the plan is an observation of the
        # asset (counts, sample payloads), and its materialization history shows real sends
        # only. Dagster's definition: an observation records metadata about an asset
        # without materializing it (AssetObservation); the specs are skippable for this.
        for model in models:
            planned = _only(report, model.name)
            yield dg.AssetObservation(
                asset_key=keys[model.name],
                partition=context.partition_key if bucket is not None else None,
                metadata=report_metadata(report, planned),
            )
            context.log.info(_summary(report, planned))
        return
    if report.blocked:
        context.log.error(
            "nothing was sent: blocking checks failed (" + "; ".join(report.blocked) + "). "
            "Fix the data, or rerun with `force: true` if the change is intended."
        )
        return

    stuck = _stuck_rows(settings, report.workspace)
    for model in models:
        model_report = _only(report, model.name)
        if not report.error:
            yield dg.MaterializeResult(
                asset_key=keys[model.name], metadata=report_metadata(report, model_report)
            )
            context.log.info(_summary(report, model_report))
        yield _stuck_check(model, keys[model.name], model_report, stuck, config.max_stuck_pct)
        if model.kind is Kind.EVENT and model.lookback_days is not None:
            yield _lookback_check(model, keys[model.name], model_report)
    if report.error:  # retries ran out: what was acknowledged is kept; the rest goes next run
        raise dg.Failure(description=report.error, metadata=_failure_metadata(report))


def _pre_send_checks(
    model: Model, key: dg.AssetKey, planned: ModelReport, force: bool
) -> Iterator[dg.AssetCheckResult]:
    """The blocking checks of one model, from the run's plan (before anything is sent)."""
    plan = planned.plan
    if plan is None:
        raise dg.Failure(description=f"the engine planned no checks for model {model.name!r}")
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=MODEL_VALID,
        passed=True,
        metadata={"rows": dg.MetadataValue.int(planned.rows)},
    )
    # When forced, a failing check is still reported, as a warning that does not block.
    severity = dg.AssetCheckSeverity.WARN if force else dg.AssetCheckSeverity.ERROR
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=GUARDRAILS,
        passed=planned.guardrail is None,
        severity=severity,
        description=planned.guardrail or "within the model's guardrails",
        metadata={
            "would_create": dg.MetadataValue.int(plan.creates),
            "would_update": dg.MetadataValue.int(plan.updates),
            "would_delete": dg.MetadataValue.int(plan.deletes),
            "max_change_pct": dg.MetadataValue.float(model.max_change_pct),
            "max_delete_pct": dg.MetadataValue.float(model.max_delete_pct),
            "forced": dg.MetadataValue.bool(force),
        },
    )
    # Every row of a bad key is counted by the plan (the examples are only the first few).
    duplicates, nulls = plan.duplicate_keys, plan.null_keys
    metadata: dict[str, dg.MetadataValue] = {
        "bad_key_rows": dg.MetadataValue.int(duplicates + nulls),
        "duplicate_key_rows": dg.MetadataValue.int(duplicates),
        "null_key_rows": dg.MetadataValue.int(nulls),
        "forced": dg.MetadataValue.bool(force),
    }
    if plan.key_examples:
        metadata["examples"] = dg.MetadataValue.md(
            _rejections_markdown(plan.key_examples, total=duplicates + nulls)
        )
    yield dg.AssetCheckResult(
        asset_key=key,
        check_name=UNIQUE_KEYS,
        passed=duplicates + nulls == 0,
        severity=severity,
        description=(
            f"{duplicates + nulls} rows with a NULL or duplicate key ({duplicates} duplicate, "
            f"{nulls} NULL); they would be rejected"
            if duplicates + nulls
            else "every key is present and unique"
        ),
        metadata=metadata,
    )


def _invalid_model(
    models: Sequence[Model], exc: ModelError, keys: Mapping[str, dg.AssetKey]
) -> Iterator[dg.AssetCheckResult]:
    """A failing ``model_valid`` check for the model the error names."""
    named = [m for m in models if str(m.path) == exc.path or str(m.path.resolve()) == exc.path]
    if not named:
        raise _failure(exc)
    for model in named:
        yield dg.AssetCheckResult(
            asset_key=keys[model.name], check_name=MODEL_VALID, passed=False, description=str(exc)
        )


def _stuck_rows(settings: Settings, workspace: str | None) -> dict[str, list[dict[str, Any]]]:
    """Rejections kept in the state store for the run's workspace, per model (what the
    next run to it retries)."""
    engine = create_engine(settings.state_url)
    try:
        state = StateStore(engine, settings.state_schema)
        if workspace is not None:
            state = state.bound(Workspace(workspace))
        rows = state.rejections(limit=100_000)
    finally:
        engine.dispose()
    stuck: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        stuck.setdefault(str(row["model"]), []).append(row)
    return stuck


def _stuck_check(
    model: Model,
    key: dg.AssetKey,
    report: ModelReport,
    stuck: Mapping[str, list[dict[str, Any]]],
    max_pct: float,
) -> dg.AssetCheckResult:
    rejected = stuck.get(model.name, [])
    # Planned rows neither acknowledged nor rejected: a run whose retries ran out.
    pending = max(report.planned - report.changes - report.rejected, 0)
    count = len(rejected) + pending
    pct = 100 * count / report.rows if report.rows else (100.0 if count else 0.0)
    metadata: dict[str, dg.MetadataValue] = {
        "stuck_rows": dg.MetadataValue.int(count),
        "rejected_rows": dg.MetadataValue.int(len(rejected)),
        "pending_rows": dg.MetadataValue.int(pending),
        "stuck_pct": dg.MetadataValue.float(round(pct, 3)),
        "max_stuck_pct": dg.MetadataValue.float(max_pct),
    }
    if rejected:
        sample = [(r["key"], str(r["reason"])) for r in rejected[:STUCK_SAMPLE]]
        metadata["rejected_sample"] = dg.MetadataValue.md(
            _rejections_markdown(sample, total=len(rejected))
        )
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=NO_STUCK_ROWS,
        passed=pct <= max_pct,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{count} rows rejected or unacknowledged ({pct:.2f}%, limit {max_pct:g}%)",
        metadata=metadata,
    )


def _lookback_check(model: Model, key: dg.AssetKey, report: ModelReport) -> dg.AssetCheckResult:
    """Warns when rows older than the lookback were never sent: the window is too short for
    how late they arrive in the warehouse, or the syncs stopped for longer than it."""
    missed = report.unsent_before_lookback
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=EVENTS_IN_LOOKBACK,
        passed=missed == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{missed:,} events older than {model.lookback_days} days were never sent"
            if missed
            else f"every event older than {model.lookback_days} days was sent"
        ),
        metadata={
            "events_never_sent": dg.MetadataValue.int(missed),
            "lookback_days": dg.MetadataValue.int(model.lookback_days or 0),
        },
    )


def _notices(report: RunReport) -> dg.MetadataValue:
    """The run's notices as a Markdown list."""
    return dg.MetadataValue.md("\n".join(f"- {n}" for n in report.notices))


def _failure(exc: CioRetlError) -> dg.Failure:
    """The engine's message (it names the problem, never a secret) as a step failure.

    Only transient errors are worth retrying (the Track API unreachable before the run
    started, a lock held by another run); configuration, model, credential and guardrail
    errors are not, since retrying cannot fix them.
    """
    transient = isinstance(exc, LockedError | TransientError)
    metadata: dict[str, dg.MetadataValue] = {
        "error_type": dg.MetadataValue.text(type(exc).__name__),
        "transient": dg.MetadataValue.bool(transient),
    }
    if isinstance(exc.report, RunReport) and exc.report.notices:
        # A run that stopped under way: what else is worth a look (an unreleased lock).
        metadata["notices"] = _notices(exc.report)
    return dg.Failure(description=str(exc), metadata=metadata, allow_retries=transient)


def _failure_metadata(report: RunReport) -> dict[str, dg.MetadataValue]:
    if len(report.models) == 1:
        return report_metadata(report, report.models[0])
    return {
        "models": dg.MetadataValue.json(
            {m.model: {**m.counts(), "rows": m.rows, "status": m.status} for m in report.models}
        )
    }


def _only(report: RunReport, name: str) -> ModelReport:
    for model_report in report.models:
        if model_report.model == name:
            return model_report
    raise dg.Failure(description=f"the engine reported no result for model {name!r}")


# -- metadata -------------------------------------------------------------------------------


def report_metadata(report: RunReport, model: ModelReport) -> dict[str, dg.MetadataValue]:
    """Counts as numbers (plotted by Dagster across runs), plus the plan and rejections."""
    metadata: dict[str, dg.MetadataValue] = {
        "dry_run": dg.MetadataValue.bool(report.dry_run),
        "cio_retl_run_id": dg.MetadataValue.text(report.run_id),
        # The destination: its Site ID (not a secret) and what its region check reported.
        "workspace": dg.MetadataValue.text(
            "(none yet)" if report.workspace is None else report.workspace or "(before workspaces)"
        ),
        "status": dg.MetadataValue.text(model.status),
        "dagster/row_count": dg.MetadataValue.int(model.rows),
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
        "rows_per_s": dg.MetadataValue.float(
            round(model.rows / model.duration_s, 1) if model.duration_s > 0 else 0.0
        ),
    }
    if report.notices:
        metadata["notices"] = _notices(report)
    if model.skipped:  # people a suppression model holds: never identified
        metadata["skipped_suppressed"] = dg.MetadataValue.int(model.skipped)
    if model.kind == Kind.EVENT.value:
        metadata["events_sent"] = dg.MetadataValue.int(0 if report.dry_run else model.created)
        if model.newest_event is not None:
            metadata["newest_event_sent"] = dg.MetadataValue.timestamp(float(model.newest_event))
    if report.region is not None:
        metadata["workspace_region"] = dg.MetadataValue.text(report.region)
    if report.environment_id is not None:
        metadata["workspace_environment_id"] = dg.MetadataValue.int(report.environment_id)
    if report.dry_run:
        # In a dry run created/updated/deleted count what WOULD be sent; these are the items.
        metadata["plan"] = dg.MetadataValue.md(_plan_markdown(model))
        metadata["sample_payloads"] = dg.MetadataValue.json(list(model.samples))
    if model.rejected_by_code:  # every rejection, by code
        metadata["rejected_by_code"] = dg.MetadataValue.json(
            {code.value: n for code, n in sorted(model.rejected_by_code.items())}
        )
    if model.rejections:
        metadata["rejections"] = dg.MetadataValue.md(
            _rejections_markdown(model.rejections, total=model.rejected)
        )
    return metadata


def _plan_markdown(model: ModelReport) -> str:
    lines = [
        f"**{model.model}** would send {model.changes} items "
        f"({model.rows} rows, {model.unchanged} unchanged).",
        "",
        "| created | updated | deleted | rejected |",
        "|---:|---:|---:|---:|",
        f"| {model.created} | {model.updated} | {model.deleted} | {model.rejected} |",
    ]
    if model.guardrail:
        lines += ["", f"A guardrail would stop this run: {model.guardrail}."]
    return "\n".join(lines)


def _rejections_markdown(
    rejections: Sequence[tuple[str | None, str]], total: int | None = None
) -> str:
    lines = ["| key | reason |", "|---|---|"]
    for key, reason in rejections:
        lines.append(f"| {_cell(key if key is not None else '(null key)')} | {_cell(reason)} |")
    if total is not None and total > len(rejections):
        lines.append(f"\n{total - len(rejections)} more; see `cio-retl status`.")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _summary(report: RunReport, model: ModelReport) -> str:
    verb = "would send" if report.dry_run else "sent"
    return (
        f"{model.model}: {model.rows} rows; {verb} {model.created} created, {model.updated} "
        f"updated, {model.deleted} deleted; {model.unchanged} unchanged, {model.rejected} rejected"
    )
