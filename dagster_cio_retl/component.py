"""``CustomerIOComponent``: a folder of cio-retl models in any Dagster project's ``defs``.

Built like dagster-sling's ``SlingReplicationCollectionComponent``: a Resolvable dataclass
whose attributes ``dg check yaml`` validates against their JSON schema, a scaffolder for
``dg scaffold defs``, and an :meth:`CustomerIOComponent.execute` a subclass may override.
Underneath it calls :func:`dagster_cio_retl.definitions.build_customerio_defs`.

No ``from __future__ import annotations``: Dagster derives the YAML schema from the
attributes' annotations at class creation.
"""

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import dagster as dg
from dagster.components.utils.translation import TranslationFn, TranslationFnResolver

from cio_retl.buckets import MAX_BUCKETS, Bucket
from cio_retl.config import RATE_BUDGETS, Settings
from cio_retl.errors import ConfigError
from cio_retl.models import Model
from dagster_cio_retl.assets import SyncConfig, SyncEvent, sync_models
from dagster_cio_retl.definitions import build_customerio_defs
from dagster_cio_retl.project_config import DEFAULT_CRON, DEFAULT_TIMEZONE, Schedule
from dagster_cio_retl.scaffold import CustomerIOScaffolder
from dagster_cio_retl.translator import KEY_PREFIX, CustomerIOTranslator

# `{{ env.VAR }}` or `{{ env('VAR') }}`, nothing else: the variable's name is kept and bound
# as dg.EnvVar, so its value is read when a run starts and never stored or shown.
_ENV_TEMPLATE = re.compile(
    r"^\{\{\s*env(?:\.(?P<dot>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\(\s*(?P<q>['\"])(?P<call>[A-Za-z_][A-Za-z0-9_]*)(?P=q)\s*\))\s*\}\}$"
)
# The same, for dg check yaml's JSON-schema validation (no named groups there).
ENV_TEMPLATE_PATTERN = (
    r"^\{\{\s*env(\.[A-Za-z_][A-Za-z0-9_]*|\(\s*['\"][A-Za-z_][A-Za-z0-9_]*['\"]\s*\))\s*\}\}$"
)
_TEMPLATE_PATTERN = r"^\{\{.*\}\}$"  # any template: its value is checked once resolved


def _env_var(context: dg.ResolutionContext, value: str | None) -> dg.EnvVar | None:
    if value is None:
        return None
    match = _ENV_TEMPLATE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        name = context.path[-1] if context.path else "this attribute"
        raise ConfigError(
            f"{name} must be an environment variable template such as "
            "'{{ env.CIO_API_KEY }}', not a value: a value would be stored in the code "
            "location and shown in the Dagster UI"
        )
    return dg.EnvVar(match.group("dot") or match.group("call"))


def _env_ref(description: str, example: str) -> dg.Resolver:
    return dg.Resolver(
        _env_var,
        model_field_type=str | None,  # type: ignore[arg-type]
        inject_before_resolve=False,  # the template itself, not the secret it renders to
        description=description + " Only as '{{ env.VAR }}'; unset = left unbound.",
        examples=[f"{{{{ env.{example} }}}}"],
        json_schema_extra={"pattern": ENV_TEMPLATE_PATTERN},
    )


def _one_of(values: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(v) for v in values) + r")$|" + _TEMPLATE_PATTERN


def _upstream_key(
    context: dg.ResolutionContext, template: str | None
) -> Callable[[str], dg.AssetKey] | None:
    """``upstream_key``: a template rendered once per ``-- deps:`` entry, with ``{{ dep }}``."""
    if template is None:
        return None

    def key(dep: str) -> dg.AssetKey:
        value = context.with_scope(dep=dep).resolve_value(template)
        return value if isinstance(value, dg.AssetKey) else dg.AssetKey.from_user_string(str(value))

    return key


def _translation_resolver() -> dg.Resolver:
    resolver = TranslationFnResolver[Model](lambda model: {"model": model})
    resolver.description = (
        "Asset attributes per model, as dagster-dbt's `translation`: templated with "
        "{{ model }} (the model file: name, kind, deps, ...) and {{ spec }} (its default "
        'spec), e.g. `group_name: marketing` or `key: "crm/{{ model.name }}"`.'
    )
    return resolver


class GroupSchedule(dg.Model):
    """When a group's job runs (its schedule; with buckets, its ``on_cron`` condition)."""

    cron: str = DEFAULT_CRON
    timezone: str = DEFAULT_TIMEZONE


@dg.scaffold_with(CustomerIOScaffolder)
@dataclass
class CustomerIOComponent(dg.Component, dg.Resolvable):
    """Sync a folder of SQL models to Customer.io: one asset per model file
    (``customerio/<file stem>``), blocking pre-send checks, a job and schedule per group,
    an automation sensor for ``-- deps:`` tables, the pool ``cio_retl`` and a retry policy
    for transient failures.

    ``dg scaffold defs dagster_cio_retl.CustomerIOComponent customerio`` writes a
    ``defs.yaml`` and a ``sql/`` folder with one example model of each kind.
    """

    models_dir: Annotated[
        str,
        dg.Resolver.default(
            description="Folder of .sql model files (and an optional dagster.toml); "
            "relative to this defs.yaml's folder."
        ),
    ] = "sql"
    warehouse_url: Annotated[
        dg.EnvVar | None,
        _env_ref(
            "SQLAlchemy URL of the warehouse the models read; unset = a DuckDB file "
            "cio_retl.duckdb in the project root.",
            "CIO_RETL_WAREHOUSE_URL",
        ),
    ] = None
    state_url: Annotated[
        dg.EnvVar | None,
        _env_ref(
            "SQLAlchemy URL of the state store (snapshots, locks, runs); unset = the warehouse.",
            "CIO_RETL_STATE_URL",
        ),
    ] = None
    site_id: Annotated[dg.EnvVar | None, _env_ref("Track API site ID.", "CIO_SITE_ID")] = None
    api_key: Annotated[
        dg.EnvVar | None, _env_ref("Track API key; never logged.", "CIO_API_KEY")
    ] = None
    region: Annotated[
        str,
        dg.Resolver.default(
            description="Customer.io region, `us` or `eu`: picks the Track API host.",
            json_schema_extra={"pattern": _one_of(["us", "eu"])},
        ),
    ] = "us"
    track_api_url: Annotated[
        str | None,
        dg.Resolver.default(
            description="Track API base URL override (e.g. the local emulator); unset = the "
            "region's host."
        ),
    ] = None
    rate_limit: Annotated[
        str | None,
        dg.Resolver.default(
            description="The workspace's request limit, REQUESTS/SECONDS; unset = 1000/1.",
            json_schema_extra={"pattern": r"^\d+/\d+(\.\d+)?$|" + _TEMPLATE_PATTERN},
        ),
    ] = None
    rate_budget: Annotated[
        str | None,
        dg.Resolver.default(
            description="`auto`, `local` or `shared` (one budget in a PostgreSQL state store "
            "for every worker); unset = auto.",
            json_schema_extra={"pattern": _one_of(RATE_BUDGETS)},
        ),
    ] = None
    state_schema: Annotated[
        str | None,
        dg.Resolver.default(description="Schema of the state tables; unset = `cio_retl`."),
    ] = None
    buckets: Annotated[
        int,
        dg.Resolver.default(
            description="Hash buckets partitioning each model's assets, one run per bucket "
            f"(1..{MAX_BUCKETS}); 1 = unpartitioned.",
            json_schema_extra={"minimum": 1, "maximum": MAX_BUCKETS},
        ),
    ] = 1
    schedules: Annotated[
        Mapping[str, GroupSchedule],
        dg.Resolver.default(
            description="Cron and timezone per group, over the models folder's dagster.toml; "
            f"a group named in neither runs on `{DEFAULT_CRON}` ({DEFAULT_TIMEZONE})."
        ),
    ] = field(default_factory=dict)
    key_prefix: Annotated[
        Sequence[str],
        dg.Resolver.default(description="Asset key prefix: a model's key is <prefix>/<file stem>."),
    ] = (KEY_PREFIX,)
    upstream_key: Annotated[
        Callable[[str], dg.AssetKey] | None,
        dg.Resolver(
            _upstream_key,
            model_field_type=str | None,  # type: ignore[arg-type]
            inject_before_resolve=False,  # rendered per dep, not once
            description="The asset key a `-- deps:` entry names, templated with {{ dep }}: "
            "e.g. `\"dbt/{{ dep.split('/')[-1] }}\"` when your dbt assets are keyed dbt/<model>; "
            "unset = the entry split on `/`.",
            examples=["dbt/{{ dep.split('/')[-1] }}"],
        ),
    ] = None
    translation: Annotated[TranslationFn[Model] | None, _translation_resolver()] = None

    def __post_init__(self) -> None:
        # Templated values arrive rendered: numbers as int or str, an unset variable as None.
        if isinstance(self.buckets, str) and self.buckets.strip().isdigit():
            self.buckets = int(self.buckets)
        if isinstance(self.key_prefix, str):
            self.key_prefix = [part for part in self.key_prefix.split("/") if part]
        self.region = (self.region or "us").strip().lower()
        if not isinstance(self.buckets, int):
            raise ConfigError(
                f"buckets must be a whole number 1..{MAX_BUCKETS}, not {self.buckets!r}"
            )

    def get_translator(self) -> CustomerIOTranslator:
        """The translator of this component's models; override for keys, groups or deps."""
        return _ComponentTranslator(self.key_prefix, self.upstream_key, self.translation)

    def execute(
        self,
        context: dg.AssetExecutionContext,
        settings: Settings,
        models: Sequence[Model],
        config: SyncConfig,
        bucket: Bucket | None,
        keys: Mapping[str, dg.AssetKey],
    ) -> Iterator[SyncEvent]:
        """One run of the sync op: plan, check, send, report (override to wrap it)."""
        yield from sync_models(context, settings, models, config, bucket, keys)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_customerio_defs(
            context.path / self.models_dir,
            warehouse_url=self.warehouse_url,
            state_url=self.state_url,
            site_id=self.site_id,
            api_key=self.api_key,
            region=self.region,
            track_api_url=self.track_api_url,
            rate_limit=self.rate_limit,
            rate_budget=self.rate_budget,
            state_schema=self.state_schema,
            buckets=self.buckets,
            schedules={
                group: Schedule(cron=s.cron, timezone=s.timezone)
                for group, s in self.schedules.items()
            },
            translator=self.get_translator(),
            execute=self.execute,
            root=context.project_root,
        )


class _ComponentTranslator(CustomerIOTranslator):
    """The default translation with the component's prefix, then its ``translation``."""

    def __init__(
        self,
        key_prefix: Sequence[str],
        upstream_key: Callable[[str], dg.AssetKey] | None,
        translation: TranslationFn[Model] | None,
    ):
        super().__init__(key_prefix)
        self.upstream_key = upstream_key
        self.translation = translation

    def get_upstream_key(self, dep: str) -> dg.AssetKey:
        return self.upstream_key(dep) if self.upstream_key else super().get_upstream_key(dep)

    def get_asset_spec(self, model: Model, spec: dg.AssetSpec) -> dg.AssetSpec:
        return self.translation(spec, model) if self.translation else spec
