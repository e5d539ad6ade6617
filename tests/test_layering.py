"""Lower layers load nothing above them: checked in a fresh interpreter, where ``sys.modules``
shows every module an import pulled in (this process has them all loaded already). And what
differs between databases stays in cio_retl.dialects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

import cio_retl
from cio_retl.dialects import (
    Dialect,
    DuckDBDialect,
    PostgresDialect,
    SnowflakeDialect,
    dialect_for,
)


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


_BACKENDS = frozenset({"duckdb", "postgresql", "snowflake"})


def _names_a_backend(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in _BACKENDS
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_backend(e) for e in node.elts)
    return False


def test_only_the_dialects_ask_which_database_it_is() -> None:
    """What differs between databases is a method of cio_retl.dialects; no other module
    compares a backend's name (``dialect.name == "duckdb"``, ``backend in (...)``)."""
    package = Path(cio_retl.__file__).parent
    asking = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "dialects.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Compare)
        and any(_names_a_backend(e) for e in (node.left, *node.comparators))
    ]
    assert asking == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("duckdb:///:memory:", DuckDBDialect),
        ("postgresql+psycopg://", PostgresDialect),
        ("snowflake://account/database", SnowflakeDialect),
    ],
)
def test_each_database_speaks_its_own_dialect(url: str, expected: type[Dialect]) -> None:
    sa_dialect = sa.engine.make_url(url).get_dialect()()
    assert type(dialect_for(sa_dialect)) is expected
    # The base holds only what the three share: it is no database's dialect by itself.
    with pytest.raises(TypeError, match="abstract"):
        Dialect(sa_dialect)  # type: ignore[abstract]
