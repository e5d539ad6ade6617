"""The code location of this repository, loaded by ``dagster dev`` / ``dg dev`` through
``[tool.dagster]`` / ``[tool.dg.project]`` in pyproject.toml; the integration itself is the
``dagster_cio_retl`` package."""

from dagster_cio_retl.definitions import build_definitions

defs = build_definitions()
