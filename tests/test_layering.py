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


@pytest.mark.parametrize("module", ["cio_retl.records"])
def test_shared_types_import_no_engine(module: str) -> None:
    loaded = _loaded_by(module)
    assert "sqlalchemy" not in loaded
    assert {m for m in loaded if m.startswith("cio_retl.")} == {module}
