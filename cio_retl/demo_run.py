"""``cio-retl demo``: build the demo warehouse, start the emulator, sync three times (everything
new, nine edits, nothing changed), then print the commands that take a newcomer further.

The models come with the package (:func:`demo_models_dir`), so the demo runs from any
directory and from an installed wheel. Without ``--dir`` everything lives in a temporary
directory that is removed at the end.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console

from cio_retl.config import STATE_SCHEMA, Settings
from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.errors import ConfigError
from cio_retl.sync import Outcome, run_sync
from cio_retl.warehouse import create_engine

DEMO_SITE_ID = "demo-site"
DEMO_API_KEY = "demo-key"
EMULATOR_PORT = 8765  # `cio-retl emulator`'s default port
# Where the printed next steps keep the warehouse when the demo ran without --dir.
SUGGESTED_DIR = "cio-retl-demo"
# Not demo.duckdb: the database's catalog name would clash with its schema `demo`.
WAREHOUSE_FILE = "warehouse.duckdb"


def demo_models_dir() -> Path:
    """The demo's models: package data in a wheel (the repository's ``sql/``, shipped as
    ``cio_retl/demo_models``), the ``sql/`` folder itself in a checkout or editable install."""
    packaged = Path(__file__).with_name("demo_models")
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if checkout.is_dir():
        return checkout
    raise ConfigError(f"the demo models are missing from this installation ({packaged})")


def run_demo(directory: str | None, console: Console) -> int:
    if directory is not None:
        folder = Path(directory).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return _demo(folder, console, keep=True)
    with tempfile.TemporaryDirectory(prefix="cio-retl-demo-") as temporary:
        return _demo(Path(temporary), console, keep=False)


def _demo(folder: Path, console: Console, *, keep: bool) -> int:
    from cio_retl.cli import print_report

    database = folder / WAREHOUSE_FILE
    database.unlink(missing_ok=True)
    url = f"duckdb:///{database}"
    engine = create_engine(url)
    try:
        create_demo_warehouse(engine)
    finally:
        engine.dispose()
    console.print(f"[bold]1.[/] demo warehouse created: {database}", highlight=False)

    with Emulator(site_id=DEMO_SITE_ID, api_key=DEMO_API_KEY) as emulator:
        console.print(f"[bold]2.[/] Track API emulator listening on {emulator.url}")
        settings = Settings.from_env(
            {
                "CIO_RETL_WAREHOUSE_URL": url,
                "CIO_RETL_MODELS_DIR": str(demo_models_dir()),
                "CIO_TRACK_API_URL": emulator.url,
                "CIO_SITE_ID": DEMO_SITE_ID,
                "CIO_API_KEY": DEMO_API_KEY,
            }
        )
        console.print("[bold]3.[/] first sync: everything is new")
        first = run_sync(settings)
        print_report(first, console)
        workspace = emulator.snapshot()
        console.print(
            f"   the workspace now holds {len(workspace['people'])} people, "
            f"{len(workspace['objects'])} objects, {len(workspace['relationships'])} relationships, "
            f"{len(workspace['events'])} events, {len(workspace['devices'])} devices"
        )

        engine = create_engine(url)
        try:
            edits = edit_demo_warehouse(engine)
        finally:
            engine.dispose()
        console.print(
            f"[bold]4.[/] edited the warehouse: {len(edits.users_changed)} users, "
            f"{len(edits.companies_changed)} company, {len(edits.memberships_removed)} membership "
            f"removed, {len(edits.orders_added)} order added, {len(edits.devices_changed)} device "
            f"updated, {len(edits.orders_edited)} sent order edited (events are not resent)"
        )
        before = len(emulator.requests)
        second = run_sync(settings)
        print_report(second, console)
        sent = [r for r in emulator.requests[before:] if r.path == "/api/v2/batch"]
        items = [item for r in sent for item in (r.body or {}).get("batch", [])]
        console.print(f"   second sync sent {len(items)} items in {len(sent)} request(s):")
        for item in items:
            console.print(f"   {_describe(item)}", highlight=False)

        console.print("[bold]5.[/] third sync, nothing changed:")
        third = run_sync(settings)
        print_report(third, console)
        sent_third = sum(m.items_sent for m in third.models)
        console.print(f"   sent {sent_third} items")
    ok = (
        first.outcome is Outcome.SYNCED
        and second.outcome is Outcome.SYNCED
        and len(items) == edits.entities
        and sent_third == 0
    )
    console.print(
        "[bold green]demo ok[/]: the second run sent only the edits"
        if ok
        else "[bold red]demo failed[/]: see the counts above"
    )
    if keep:
        _forget_demo_state(url)
        console.print(
            f"   kept the warehouse in {folder}; its sync state is reset, because the emulator "
            "that held the demo's workspace is gone: your first sync sends everything",
            highlight=False,
        )
    for line in next_steps(folder if keep else None):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0 if ok else 1


def _forget_demo_state(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {STATE_SCHEMA} CASCADE"))
    finally:
        engine.dispose()


def demo_environment(folder: Path) -> dict[str, str]:
    """What every command after the demo needs: the kept warehouse, the packaged models and
    the emulator of ``cio-retl emulator`` with the demo's credentials."""
    return {
        "CIO_RETL_WAREHOUSE_URL": f"duckdb:///{folder / WAREHOUSE_FILE}",
        "CIO_RETL_MODELS_DIR": str(demo_models_dir()),
        "CIO_TRACK_API_URL": f"http://127.0.0.1:{EMULATOR_PORT}",
        "CIO_SITE_ID": DEMO_SITE_ID,
        "CIO_API_KEY": DEMO_API_KEY,
    }


def next_steps(kept: Path | None) -> list[str]:
    """Plain-text shell lines that take the demo further, in order; each works as printed
    (bash, from any directory: paths are absolute). ``kept`` is the folder ``--dir`` kept."""
    folder = kept or Path.cwd() / SUGGESTED_DIR
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in demo_environment(folder).items())
    lines = ["", "next: sync the demo warehouse yourself, then look at it in Dagster"]
    if kept is None:
        lines.append(f"  cio-retl demo --dir {shlex.quote(str(folder))}   # keep the warehouse")
    lines += [
        f"  export {exports}",
        "  cio-retl emulator &   # the Track API emulator on port 8765, with these credentials",
        "  cio-retl plan         # what a sync would send (nothing is written)",
        "  cio-retl sync         # send it to the emulator",
        "  cio-retl status       # the runs, and rows waiting for a fix",
        "  dg dev                # in a checkout with the dagster extra (uv run --all-extras dg dev):"
        " http://127.0.0.1:3000, Materialize all",
        "then your own warehouse: see the README, 'From the demo to your warehouse'",
    ]
    return lines


def _describe(item: dict[str, object]) -> str:
    identifiers = item.get("identifiers")
    detail = item.get("attributes") or item.get("cio_relationships") or item.get("device")
    name = f" {item['name']!r}" if "name" in item else ""  # an event's name
    return f"{item['type']} {item['action']}{name} {identifiers} -> {detail}"
