"""A user's own Dagster project adopts cio-retl: install, scaffold, check, launch.

The project's files are written here (what ``create-dagster project`` writes, which needs
the network): a ``[tool.dg]`` pyproject, a package with ``definitions.py`` calling
``load_from_defs_folder``, and an empty ``defs/``. This checkout is installed into the
project's own venv from uv's cache, at the versions of this repo's ``uv.lock``, and every
step runs the project's ``dg``: ``list components``, ``scaffold defs``, ``check yaml``,
``check defs``, then ``launch --assets`` against a DuckDB demo warehouse and the emulator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cio_retl.demo import create_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.warehouse import create_engine
from tests.conftest import API_KEY, REPO, SITE_ID
from tests.test_component import SCAFFOLD_OBJECTS, SCAFFOLD_PEOPLE, assert_scaffold_extras
from tests.test_sync_duckdb import actual_workspace, expected_workspace

pytestmark = [pytest.mark.dagster, pytest.mark.timeout(240)]

COMPONENT = "dagster_cio_retl.CustomerIOComponent"

PYPROJECT = """\
[project]
name = "acme"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["cio-retl[dagster]"]

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[tool.hatch.build.targets.wheel]
packages = ["src/acme"]

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "acme"
"""

DEFINITIONS = """\
from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
"""


def locked_requirements(*roots: str, extras: tuple[str, ...] = ("dagster",)) -> list[str]:
    """``name==version`` of everything ``roots`` and this project's ``extras`` need, as
    uv.lock pins them, so the install resolves nothing and needs no index."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    project = packages["cio-retl"]
    todo = [d["name"] for d in project["dependencies"]]
    todo += [d["name"] for extra in extras for d in project["optional-dependencies"][extra]]
    todo += list(roots)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in packages[name].get("dependencies", []):
            if "sys_platform == 'win32'" not in dep.get("marker", ""):
                todo.append(dep["name"])
    return sorted(f"{name}=={packages[name]['version']}" for name in seen)


@pytest.fixture
def project() -> Iterator[Path]:
    """The fresh project with its venv (~300 MB: removed at the end, not kept by pytest)."""
    uv = shutil.which("uv")
    assert uv, "uv must be on PATH (it installs this checkout into the fresh project)"
    with tempfile.TemporaryDirectory(prefix="cio-retl-fresh-") as tmp:
        root = Path(tmp)
        (root / "src/acme/defs").mkdir(parents=True)
        (root / "pyproject.toml").write_text(PYPROJECT)
        (root / "src/acme/__init__.py").write_text("")
        (root / "src/acme/defs/__init__.py").write_text("")
        (root / "src/acme/definitions.py").write_text(DEFINITIONS)
        run([uv, "venv", "--quiet", "--python", sys.executable, str(root / ".venv")], root)
        requirements = root / "requirements.txt"
        requirements.write_text("\n".join(locked_requirements("dagster-dg-cli")) + "\n")
        # Exact pins, no resolution, but not --offline: uv's cache holds the wheels `uv sync`
        # fetched, not the index pages a pinned `uv pip install` reads, so on a fresh machine
        # an offline install finds nothing ("alembic was not found in the cache").
        pip = [uv, "pip", "install", "--quiet", "--no-deps"]
        run([*pip, "-r", str(requirements)], root)
        run([*pip, "-e", str(REPO), "-e", str(root)], root)
        yield root


def project_env(root: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CIO_", "DAGSTER_")) and k != "PYTHONDONTWRITEBYTECODE"
    }
    # The project's venv; bytecode is written, so each dg call after the first starts fast.
    env.update(VIRTUAL_ENV=str(root / ".venv"), PATH=f"{root / '.venv/bin'}:{env['PATH']}")
    return {**env, **extra}


def run(
    cmd: list[str], root: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd,
        cwd=root,
        env=env or project_env(root),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def test_fresh_project_scaffolds_checks_and_launches_a_sync(project: Path) -> None:
    dg = str(project / ".venv/bin/dg")
    listed = json.loads(run([dg, "list", "components", "--json"], project).stdout)
    assert COMPONENT in {entry["key"] for entry in listed["items"]}

    run([dg, "scaffold", "defs", COMPONENT, "customerio"], project)
    component = project / "src/acme/defs/customerio"
    assert yaml.safe_load((component / "defs.yaml").read_text())["type"] == COMPONENT
    assert sorted(p.name for p in (component / "sql").glob("*.sql"))

    url = f"duckdb:///{project / 'warehouse.duckdb'}"
    engine = create_engine(url)
    create_demo_warehouse(engine)
    engine.dispose()
    (project / "dagster_home").mkdir()
    with Emulator(site_id=SITE_ID, api_key=API_KEY) as emulator:
        env = project_env(
            project,
            CIO_RETL_WAREHOUSE_URL=url,
            CIO_SITE_ID=SITE_ID,
            CIO_API_KEY=API_KEY,
            CIO_TRACK_API_URL=emulator.url,
            DAGSTER_HOME=str(project / "dagster_home"),
        )
        run([dg, "check", "yaml", "--validate-requirements"], project, env)
        checked = run([dg, "check", "defs"], project, env)
        assert "All definitions loaded successfully" in checked.stdout + checked.stderr
        launched = run([dg, "launch", "--assets", "key:customerio/*"], project, env)
        assert "RUN_SUCCESS" in launched.stdout + launched.stderr
        assert API_KEY not in launched.stdout + launched.stderr

        engine = create_engine(url)
        expected = expected_workspace(engine, SCAFFOLD_PEOPLE, SCAFFOLD_OBJECTS)
        engine.dispose()
        assert actual_workspace(emulator) == expected
        assert len(expected["people"]) > 100 and expected["relationships"]
        assert_scaffold_extras(emulator, url)
