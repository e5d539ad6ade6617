"""Dagster-only settings of the models: groups, owners and each group's schedule.

They live in an optional ``dagster.toml`` beside the ``.sql`` files rather than in the model
headers, because the engine and the command line have no use for them and reject unknown
header keys. Without the file every model is in the group ``customerio``, owned by nobody,
synced daily at 06:00 UTC. A model in a subfolder (``sql/marketing/leads.sql``) is in the
group named after the folder.

```toml
[defaults]                # every key optional
cron = "0 6 * * *"        # schedule of each group that sets none
timezone = "UTC"
owners = ["team:data"]    # Dagster owners: emails or "team:<name>"

[groups.marketing]
cron = "*/30 * * * *"
owners = ["growth@example.com"]

[models.users]
group = "marketing"
owners = ["alice@example.com"]
```
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cio_retl.errors import ModelError
from cio_retl.models import Model

CONFIG_FILE = "dagster.toml"
DEFAULT_GROUP = "customerio"
DEFAULT_CRON = "0 6 * * *"
DEFAULT_TIMEZONE = "UTC"

_SECTION_KEYS = {
    "defaults": {"cron", "timezone", "owners", "group"},
    "groups": {"cron", "timezone", "owners"},
    "models": {"group", "owners"},
}


@dataclass(frozen=True, slots=True)
class Schedule:
    cron: str
    timezone: str


@dataclass(frozen=True, slots=True)
class ProjectConfig:
    """What ``dagster.toml`` says, with the defaults filled in."""

    models_dir: Path
    defaults: Mapping[str, Any] = field(default_factory=dict)
    groups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def group_of(self, model: Model) -> str:
        """The model's own setting, else its subfolder, else the default group."""
        own = self.models.get(model.name, {}).get("group")
        if own:
            return str(own)
        try:
            parts = model.path.resolve().relative_to(self.models_dir.resolve()).parts
        except ValueError:
            parts = ()
        if len(parts) > 1:
            return parts[0]
        return str(self.defaults.get("group", DEFAULT_GROUP))

    def owners_of(self, model: Model) -> list[str]:
        """The model's owners, else its group's, else the default owners."""
        for section in (self.models.get(model.name, {}), self.groups.get(self.group_of(model), {})):
            if "owners" in section:
                return list(section["owners"])
        return list(self.defaults.get("owners", []))

    def schedule_of(self, group: str) -> Schedule:
        section = self.groups.get(group, {})
        return Schedule(
            cron=str(section.get("cron", self.defaults.get("cron", DEFAULT_CRON))),
            timezone=str(section.get("timezone", self.defaults.get("timezone", DEFAULT_TIMEZONE))),
        )


def load_project_config(models_dir: Path) -> ProjectConfig:
    """Read ``<models_dir>/dagster.toml`` if present; a malformed file names itself."""
    path = models_dir / CONFIG_FILE
    if not path.is_file():
        return ProjectConfig(models_dir)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(str(path), f"not valid TOML: {exc}") from None
    unknown = set(data) - set(_SECTION_KEYS)
    if unknown:
        raise ModelError(
            str(path), f"unknown sections {sorted(unknown)} (known: {sorted(_SECTION_KEYS)})"
        )
    defaults = _table(path, "defaults", data.get("defaults", {}))
    groups = {
        name: _table(path, "groups", value, name)
        for name, value in _table(path, "groups", data.get("groups", {}), check=False).items()
    }
    models = {
        name: _table(path, "models", value, name)
        for name, value in _table(path, "models", data.get("models", {}), check=False).items()
    }
    return ProjectConfig(models_dir, defaults, groups, models)


def _table(
    path: Path, section: str, value: Any, name: str | None = None, *, check: bool = True
) -> dict[str, Any]:
    where = f"[{section}.{name}]" if name else f"[{section}]"
    if not isinstance(value, dict):
        raise ModelError(str(path), f"{where} must be a table")
    if check:
        unknown = set(value) - _SECTION_KEYS[section]
        if unknown:
            raise ModelError(
                str(path),
                f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_SECTION_KEYS[section])})",
            )
        owners = value.get("owners", [])
        if not isinstance(owners, list) or not all(isinstance(o, str) for o in owners):
            raise ModelError(str(path), f"{where}: owners must be a list of strings")
        for key in ("cron", "timezone", "group"):
            if key in value and not isinstance(value[key], str):
                raise ModelError(str(path), f"{where}: {key} must be a string")
    return value
