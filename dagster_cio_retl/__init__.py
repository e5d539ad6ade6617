"""cio-retl's Dagster integration (the ``dagster`` extra): model files as assets, their
checks, schedules, the automation sensor and the resources.

- :class:`CustomerIOComponent`: a ``defs.yaml`` component
  (``dg scaffold defs dagster_cio_retl.CustomerIOComponent customerio``);
- :func:`build_customerio_defs`: the same definitions from Python;
- :class:`CustomerIOTranslator`: how a model file becomes an asset key, group and deps.

The engine (``cio_retl``) never imports Dagster; everything Dagster-specific lives here.
"""

from dagster_cio_retl.assets import SyncConfig, SyncEvent, sync_models
from dagster_cio_retl.component import CustomerIOComponent, GroupSchedule
from dagster_cio_retl.definitions import build_customerio_defs
from dagster_cio_retl.project_config import Schedule
from dagster_cio_retl.resources import CustomerIOResource, WarehouseResource
from dagster_cio_retl.translator import CustomerIOTranslator

__all__ = [
    "CustomerIOComponent",
    "CustomerIOResource",
    "CustomerIOTranslator",
    "GroupSchedule",
    "Schedule",
    "SyncConfig",
    "SyncEvent",
    "WarehouseResource",
    "build_customerio_defs",
    "sync_models",
]
