"""Lower layers load nothing above them: checked in a fresh interpreter, where ``sys.modules``
shows every module an import pulled in (this process has them all loaded already)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded_by(module: str) -> set[str]:
    """The top-level packages and cio_retl modules that importing ``module`` loads."""
    code = f"import sys\nimport {module}\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return {
        name if name.startswith("cio_retl.") else name.partition(".")[0] for name in out.split()
    }


def test_shared_types_import_no_engine() -> None:
    loaded = _loaded_by("cio_retl.records")
    assert "sqlalchemy" not in loaded
    assert {m for m in loaded if m.startswith("cio_retl.")} == {"cio_retl.records"}


@pytest.mark.parametrize("module", ["cio_retl.client", "cio_retl.ratelimit"])
def test_http_client_loads_no_database_code(module: str) -> None:
    loaded = _loaded_by(module)
    assert not loaded & {"sqlalchemy", "duckdb", "psycopg", "snowflake"}
    assert not any(m.startswith(("cio_retl.state", "cio_retl.dialects")) for m in loaded)
