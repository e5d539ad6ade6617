"""This repository's code location, an example Dagster project on top of
``dagster_cio_retl.CustomerIOComponent``: its one component is ``defs/customerio/defs.yaml``,
which reads the command line's variables, so ``dg dev`` from the repo root syncs what
``cio-retl sync`` syncs.

Loaded by ``dg dev`` / ``dagster dev`` through ``[tool.dg.project]`` / ``[tool.dagster]`` in
pyproject.toml.
"""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
