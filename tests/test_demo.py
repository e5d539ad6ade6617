"""`cio-retl demo` as a newcomer runs it: from any directory, from an installed wheel, leaving
nothing behind, and ending with next commands that work as printed."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cio_retl.demo_run import demo_models_dir
from tests.conftest import REPO, sql_rows

BIN = Path(sys.executable).parent


def _clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no CIO_* variables, temp files under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIO_")}
    env.update(TMPDIR=str(tmp), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


def test_demo_runs_from_any_directory_and_removes_its_temp_dir(tmp_path: Path) -> None:
    elsewhere, temp = tmp_path / "elsewhere", tmp_path / "tmp"
    elsewhere.mkdir()
    temp.mkdir()
    out = _run([sys.executable, "-m", "cio_retl", "demo"], elsewhere, _clean_env(temp))
    assert "second sync sent 8 items" in out and "demo ok" in out
    assert list(temp.iterdir()) == []  # the warehouse's temp dir is gone
    assert list(elsewhere.iterdir()) == []  # and nothing was created where it ran


def test_models_are_package_data_in_the_wheel(tmp_path: Path) -> None:
    """Build the wheel, install it in a fresh venv with the locked runtime dependencies only,
    and run its demo from a directory that is not the checkout."""
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path.home() / ".local" / "bin"))
    if uv is None:
        pytest.skip("needs uv (CI installs it)")
    env = _clean_env(tmp_path, UV_NO_PROGRESS="1")
    env.pop("VIRTUAL_ENV", None)
    _run([uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist")], REPO, env, timeout=300)
    [wheel] = (tmp_path / "dist").glob("cio_retl-*.whl")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        _run(
            [uv, "export", "--locked", "--no-dev", "--no-hashes", "--no-emit-project", "-q"],
            REPO,
            env,
        )
    )
    venv = tmp_path / "venv"
    _run([uv, "venv", "-q", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run(
        [uv, "pip", "install", "-q", "--python", str(python), "-r", str(requirements), str(wheel)],
        tmp_path,
        env,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run([str(venv / "bin" / "cio-retl"), "demo"], elsewhere, env)
    assert "demo ok" in out
    models = _run(
        [
            str(python),
            "-c",
            "from cio_retl.demo_run import demo_models_dir; print(demo_models_dir())",
        ],
        elsewhere,
        env,
    ).strip()
    assert Path(models).is_relative_to(venv)  # the installed package's models, not the checkout's
    assert sorted(p.name for p in Path(models).glob("*.sql")) == sorted(
        p.name for p in (REPO / "sql").glob("*.sql")
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_next_steps_work_as_printed(tmp_path: Path) -> None:
    """Run the lines the demo prints, in order. One substitution: the emulator's port 8765
    becomes a free port, so parallel test runs never meet on it."""
    kept, cwd = tmp_path / "kept", tmp_path / "cwd"
    cwd.mkdir()
    env = _clean_env(tmp_path)
    out = _run([sys.executable, "-m", "cio_retl", "demo", "--dir", str(kept)], cwd, env)
    steps = out[out.index("next:") :].splitlines()[1:]
    commands = [shlex.split(line, comments=True) for line in steps if line.startswith("  ")]
    assert [c[:3] if c[1] == "emulator" else c[:2] for c in commands] == [
        ["export", f"CIO_RETL_WAREHOUSE_URL=duckdb:///{kept / 'warehouse.duckdb'}"],
        ["cio-retl", "emulator", "&"],
        ["cio-retl", "plan"],
        ["cio-retl", "sync"],
        ["cio-retl", "status"],
        ["dg", "dev"],
    ]
    port = _free_port()
    exports = dict(arg.split("=", 1) for arg in commands[0][1:])
    assert exports["CIO_RETL_MODELS_DIR"] == str(demo_models_dir())
    exports["CIO_TRACK_API_URL"] = exports["CIO_TRACK_API_URL"].replace("8765", str(port))
    env.update(exports)
    emulator = subprocess.Popen(
        [*commands[1][:-1], "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert emulator.stdout is not None
        assert "listening on" in emulator.stdout.readline()
        plan = _run(commands[2], cwd, env)
        assert "dry run: nothing sent" in plan and "490" in plan
        state = "SELECT schema_name FROM information_schema.schemata WHERE schema_name = 'cio_retl'"
        assert sql_rows(exports["CIO_RETL_WAREHOUSE_URL"], state) == []  # the plan wrote nothing
        sync = _run(commands[3], cwd, env)
        workspace = httpx.get(f"http://127.0.0.1:{port}/_emulator/workspace").json()
        assert (len(workspace["people"]), len(workspace["objects"])) == (490, 40)
        run_id = sync.split("run ", 1)[1].split()[0].rstrip(",")
        status = _run(commands[4], cwd, env)
        assert run_id in status
    finally:
        emulator.terminate()
        emulator.wait(10)
    assert list(cwd.iterdir()) == []
