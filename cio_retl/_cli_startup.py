"""Start-up trims of the ``cio-retl`` command, imported by :mod:`cio_retl.cli` before the rest.

httpx's package imports its own command line (click, rich.syntax and pygments: about 0.1 s
of every start, measured with ``python -X importtime``) whenever click is installed, as it
is beside Dagster. This program never runs httpx's command line, and httpx falls back to a
stub when that module cannot be imported. Only the command does this, never the library:
a process that imports the engine (Dagster) keeps httpx as it is.
"""

import sys

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
