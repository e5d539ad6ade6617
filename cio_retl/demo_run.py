"""``cio-retl demo``: build the demo warehouse, start the emulator, sync, edit, sync again."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console

from cio_retl.config import Settings
from cio_retl.demo import create_demo_warehouse, edit_demo_warehouse
from cio_retl.emulator import Emulator
from cio_retl.sync import Outcome, run_sync
from cio_retl.warehouse import create_engine

DEMO_SITE_ID = "demo-site"
DEMO_API_KEY = "demo-key"


def run_demo(directory: str | None, console: Console) -> int:
    from cio_retl.cli import print_report

    folder = Path(directory or tempfile.mkdtemp(prefix="cio-retl-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    database = (
        folder / "warehouse.duckdb"
    )  # not demo.duckdb: the catalog would clash with schema demo
    database.unlink(missing_ok=True)
    url = f"duckdb:///{database}"
    engine = create_engine(url)
    create_demo_warehouse(engine)
    engine.dispose()
    console.print(f"[bold]1.[/] demo warehouse created: {database}")

    with Emulator(site_id=DEMO_SITE_ID, api_key=DEMO_API_KEY) as emulator:
        console.print(f"[bold]2.[/] Track API emulator listening on {emulator.url}")
        settings = Settings.from_env(
            {
                "CIO_RETL_WAREHOUSE_URL": url,
                "CIO_RETL_MODELS_DIR": str(Path("sql")),
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
            f"{len(workspace['objects'])} objects, {len(workspace['relationships'])} relationships"
        )

        engine = create_engine(url)
        edits = edit_demo_warehouse(engine)
        engine.dispose()
        console.print(
            f"[bold]4.[/] edited the warehouse: {len(edits.users_changed)} users, "
            f"{len(edits.companies_changed)} company, {len(edits.memberships_removed)} membership removed"
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
    return 0 if ok else 1


def _describe(item: dict[str, object]) -> str:
    identifiers = item.get("identifiers")
    detail = item.get("attributes") or item.get("cio_relationships")
    return f"{item['type']} {item['action']} {identifiers} -> {detail}"
