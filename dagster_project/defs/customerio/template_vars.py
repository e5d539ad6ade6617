"""Template variables of ``defs.yaml`` that need more than ``{{ env.VAR }}``."""

import os

import dagster as dg


@dg.template_var
def models_dir(context: dg.ComponentLoadContext) -> str:
    """``CIO_RETL_MODELS_DIR`` (default ``sql``), a relative folder taken from the project
    root as on the command line, not from this folder."""
    path = context.project_root / os.path.expanduser(os.environ.get("CIO_RETL_MODELS_DIR") or "sql")
    return str(path)
