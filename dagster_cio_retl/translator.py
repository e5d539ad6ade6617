"""How a model file becomes an asset: its key, group and upstream keys.

Modelled on dagster-dbt's ``DagsterDbtTranslator``: subclass :class:`CustomerIOTranslator`
and override a method to change one attribute for every model, e.g. to point ``-- deps:``
entries at the keys your dbt project gives its models.

```python
class MyTranslator(CustomerIOTranslator):
    def get_upstream_key(self, dep: str) -> dg.AssetKey:
        return dg.AssetKey(["dbt", *dep.split("/")])
```
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from cio_retl.models import Model
from dagster_cio_retl.project_config import ProjectConfig

KEY_PREFIX = "customerio"


def upstream_key(dep: str) -> dg.AssetKey:
    """A ``-- deps:`` entry as an asset key: ``analytics/users`` -> ``["analytics", "users"]``,
    the key dagster-dbt gives the dbt model ``users`` in schema-less default naming."""
    return dg.AssetKey([part.strip() for part in dep.split("/") if part.strip()])


class CustomerIOTranslator:
    """The default translation: ``<key_prefix>/<file stem>``, the group from ``dagster.toml``
    or the model's subfolder, and each ``-- deps:`` entry split on ``/``."""

    def __init__(self, key_prefix: Sequence[str] = (KEY_PREFIX,)) -> None:
        self.key_prefix = tuple(key_prefix)

    def get_asset_key(self, model: Model) -> dg.AssetKey:
        return dg.AssetKey([*self.key_prefix, model.name])

    def get_group_name(self, model: Model, project: ProjectConfig) -> str:
        return project.group_of(model)

    def get_upstream_key(self, dep: str) -> dg.AssetKey:
        """The asset a ``-- deps:`` entry names, typically a dbt model's key."""
        return upstream_key(dep)

    def get_asset_spec(self, model: Model, spec: dg.AssetSpec) -> dg.AssetSpec:
        """The last word on a model's spec, built from the methods above; returns it as is.

        What the sync itself needs is added after this: a relationship's dependency on the
        people and objects it links (by their translated keys), the automation condition
        (on the upstream keys left here), and ``skippable``.
        """
        return spec
