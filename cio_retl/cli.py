"""``cio-retl``: sync, plan, status, emulator, demo.

Exit status, mapped here and nowhere else from the engine's outcome or exception: 0 all
operations acknowledged; 1 some rows rejected (recorded, the rest synced); 2 configuration
or model error (nothing sent); 3 stopped by a guardrail or another run's lock (nothing
sent); 4 a host could not be reached or kept failing after the retries (transient: what
was acknowledged is kept, the rest goes on the next run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cio_retl import _cli_startup  # noqa: F401  (first: before anything imports httpx)
from cio_retl.buckets import Bucket
from cio_retl.config import Settings
from cio_retl.errors import CioRetlError, GuardrailError, TransientError
from cio_retl.limits import MAX_BATCH_ITEMS
from cio_retl.progress import ProgressLog
from cio_retl.state import LEGACY_WORKSPACE, StateStore, Workspace, sent_events, workspaces
from cio_retl.sync import Outcome, RunReport, SyncOptions, run_sync
from cio_retl.warehouse import (
    check_reachable,
    create_engine,
    duckdb_file_exists,
    require_duckdb_file,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

# Piped output keeps full-width tables instead of rich's 80-column fallback.
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True)  # errors stay one line each: grep-able in logs


EXIT_SYNCED, EXIT_REJECTED, EXIT_CONFIG, EXIT_STOPPED, EXIT_TRANSIENT = 0, 1, 2, 3, 4
EXIT_STATUS = {
    Outcome.SYNCED: EXIT_SYNCED,
    Outcome.REJECTED: EXIT_REJECTED,
    Outcome.STOPPED: EXIT_STOPPED,
    Outcome.INTERRUPTED: EXIT_TRANSIENT,
}


def exit_status(error: CioRetlError) -> int:
    """3 for guardrails and locks, 4 for transient failures, 2 for everything else (a
    configuration, model or credential problem: retrying cannot fix it)."""
    if isinstance(error, GuardrailError):
        return EXIT_STOPPED
    if isinstance(error, TransientError):
        return EXIT_TRANSIENT
    return EXIT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except CioRetlError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        if isinstance(exc.report, RunReport):
            # A run that stopped under way: what else is worth a look (an unreleased lock).
            print_notices(err, exc.report)
        return exit_status(exc)
    except KeyboardInterrupt:
        err.print("interrupted: unacknowledged rows are resent by the next run")
        return 130
    return code


_MODEL_HELP = "a model: its .sql file's name without .sql (default: every model)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cio-retl", description="Keep Customer.io equal to your warehouse."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sync = commands.add_parser("sync", help="send what changed (all models by default)")
    sync.add_argument("models", nargs="*", metavar="MODEL", help=_MODEL_HELP)
    sync.add_argument(
        "--dry-run", action="store_true", help="plan only; send nothing, write nothing"
    )
    sync.add_argument("--full-resync", action="store_true", help="send every row in full")
    sync.add_argument(
        "--force", action="store_true", help="let this run exceed the delete/change guardrails"
    )
    sync.add_argument(
        "--batch-size",
        type=_batch_size,
        default=MAX_BATCH_ITEMS,
        metavar="N",
        help=f"items per request, 1 to {MAX_BATCH_ITEMS} (default {MAX_BATCH_ITEMS})",
    )
    sync.add_argument("--bucket", **_BUCKET_ARGUMENT)
    sync.set_defaults(handler=_sync)

    plan = commands.add_parser("plan", help="what a sync would send: counts + samples")
    plan.add_argument("models", nargs="*", metavar="MODEL", help=_MODEL_HELP)
    plan.add_argument(
        "--samples",
        type=_whole_number(0),
        default=3,
        metavar="N",
        help="sample payloads printed per model (default 3)",
    )
    plan.add_argument("--bucket", **_BUCKET_ARGUMENT)
    plan.set_defaults(handler=_plan)

    status = commands.add_parser("status", help="last runs, pending and rejected rows")
    status.add_argument(
        "--limit", type=_whole_number(1), default=20, metavar="N", help="runs to show (default 20)"
    )
    status.add_argument(
        "--json", action="store_true", help="print the same data as JSON, for scripts"
    )
    status.set_defaults(handler=_status)

    emulator = commands.add_parser(
        "emulator",
        help="serve the local Track API emulator",
        description="Serve the local Track API emulator until Ctrl-C. It accepts the "
        "credentials in CIO_SITE_ID / CIO_API_KEY (else site id 'site-id', API key 'api-key'); "
        "GET /_emulator/workspace shows what it holds.",
    )
    emulator.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    emulator.add_argument(
        "--port",
        type=_whole_number(0, 65535),
        default=8765,
        metavar="N",
        help="port to listen on (default 8765; 0: any free port)",
    )
    emulator.set_defaults(handler=_emulator)

    demo = commands.add_parser(
        "demo",
        help="embedded warehouse + emulator + three syncs (everything new, nine edits, "
        "nothing changed)",
    )
    demo.add_argument(
        "--dir",
        metavar="DIR",
        help="keep the demo warehouse in DIR (default: a temporary directory, removed at the end)",
    )
    demo.set_defaults(handler=_demo)
    return parser


def _bucket(text: str) -> Bucket:
    try:
        return Bucket.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{exc}; allowed: INDEX/COUNT, 0 <= INDEX < COUNT"
        ) from None


_BUCKET_ARGUMENT: dict[str, Any] = {
    "type": _bucket,
    "default": None,
    "metavar": "I/N",
    "help": "only the keys of hash bucket I of N (0-based, e.g. 3/16): run one process per "
    "bucket to spread a sync over workers; relationships after all buckets of people/objects",
}


def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number within [low, high], or an error saying what is
    allowed (a plain ``int`` prints only "invalid int value")."""
    allowed = f"a whole number from {low} to {high}" if high else f"a whole number, {low} or more"

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number; allowed: {allowed}"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: {allowed}")
        return value

    return parse


_batch_size = _whole_number(1, MAX_BATCH_ITEMS)


PLAIN_PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


@contextmanager
def _progress() -> Iterator[Progress]:
    # Imported here: only a sync on a terminal draws progress (rich.progress: ~30 ms).
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        # rich's own speed estimate (items over its sliding window); blank until it has one
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    with progress:
        yield progress


def _run(settings: Settings, models: Sequence[str], options: SyncOptions) -> RunReport:
    """A sync with progress on stderr: a bar with items/s and ETA on a terminal, else a
    plain line per model every PLAIN_PROGRESS_EVERY seconds (logs, CI)."""
    if not err.is_terminal:
        plain = ProgressLog(
            lambda line: err.print(line, highlight=False, markup=False), PLAIN_PROGRESS_EVERY
        )
        return run_sync(settings, models or None, options, progress=plain)
    with _progress() as progress:
        tasks: dict[str, TaskID] = {}

        def advance(model: str, n: int, total: int) -> None:
            if model not in tasks:
                tasks[model] = progress.add_task(model, total=total, rate="")
            task = tasks[model]
            progress.advance(task, n)
            (state,) = (t for t in progress.tasks if t.id == task)
            speed = state.speed
            progress.update(
                task,
                total=max(total, state.completed),
                rate=f"{speed:,.0f} items/s" if speed else "",
            )

        return run_sync(settings, models or None, options, progress=advance)


def _sync(args: argparse.Namespace) -> int:
    options = SyncOptions(
        dry_run=args.dry_run,
        full_resync=args.full_resync,
        force=args.force,
        batch_items=args.batch_size,
        bucket=args.bucket,
    )
    report = _run(Settings.from_env(), args.models, options)
    print_report(report)
    return EXIT_STATUS[report.outcome]


def _plan(args: argparse.Namespace) -> int:
    report = _run(
        Settings.from_env(),
        args.models,
        SyncOptions(dry_run=True, sample_size=args.samples, bucket=args.bucket),
    )
    print_report(report)
    for model in report.models:
        for sample in model.samples:
            out.print(f"[dim]{model.model}:[/]", highlight=False)
            out.print_json(orjson.dumps(sample).decode())
    return EXIT_STATUS[report.outcome]


def print_notices(console: Console, report: RunReport) -> None:
    """The run's notices, a line each (their text is the engine's, not markup)."""
    for notice in report.notices:
        console.print(f"[yellow]note:[/] {escape(notice)}", highlight=False)


def print_report(report: RunReport, console: Console = out) -> None:
    title = f"run {report.run_id}" + (f", bucket {report.bucket}" if report.bucket else "")
    title += f", workspace {workspace_label(report.workspace)}"
    title += f" ({report.region})" if report.region else ""
    title += " (dry run: nothing sent)" if report.dry_run else ""
    table = Table(title=title, title_justify="left")
    # People that suppression models hold are never identified: a column only when some are.
    skipping = any(m.skipped for m in report.models)
    columns = ["model", "kind", "rows", "created", "updated", "deleted", "unchanged"]
    columns += ["skipped"] * skipping + ["rejected", "requests", "status"]
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("model", "kind", "status") else "right"
        )
    for m in report.models:
        cells = [m.model, m.kind, f"{m.rows:,}", f"{m.created:,}", f"{m.updated:,}"]
        cells += [f"{m.deleted:,}", f"{m.unchanged:,}"] + [f"{m.skipped:,}"] * skipping
        table.add_row(*cells, f"{m.rejected:,}", f"{m.requests:,}", m.status)
    console.print(table)
    if report.adoption is not None:
        console.print(f"[bold]upgraded:[/] {report.adoption}", highlight=False)
    print_notices(console, report)
    for m in report.models:
        if m.skipped:
            console.print(
                f"[dim]skipped[/] {m.model}: {m.skipped:,} suppressed people are not identified",
                highlight=False,
            )
        if m.newest_event is not None:
            newest = dt.datetime.fromtimestamp(m.newest_event, dt.UTC)
            console.print(
                f"[dim]events[/] {m.model}: {m.created:,} sent, the newest from"
                f" {newest:%Y-%m-%d %H:%M:%S} UTC",
                highlight=False,
            )
    for m in report.models:
        if m.guardrail:
            console.print(
                f"[bold yellow]guardrail[/] {m.model}: {escape(m.guardrail)}", highlight=False
            )
        for key, reason in m.rejections:
            console.print(
                f"[yellow]rejected[/] {m.model} key={escape(repr(key))}: {escape(reason)}",
                highlight=False,
            )
        if m.rejected > len(m.rejections):
            console.print(f"[yellow]... and {m.rejected - len(m.rejections)} more in {m.model}[/]")
        if m.rejected_by_code:
            console.print(
                f"[yellow]rejected[/] {m.model} by code: {_by_code({c.value: n for c, n in m.rejected_by_code.items()})}"
            )
    if report.error:
        err.print(f"[bold red]run stopped:[/] {escape(report.error)}", highlight=False)


def _by_code(counts: Mapping[str, int]) -> str:
    """``duplicate_key 50, null_key 1``: the most frequent first, then by name."""
    return ", ".join(
        f"{code} {n:,}" for code, n in sorted(counts.items(), key=lambda c: (-c[1], c[0]))
    )


def _status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if settings.state_is_warehouse:
        require_duckdb_file(settings.state_url, "CIO_RETL_WAREHOUSE_URL")
    if duckdb_file_exists(settings.state_url):
        engine = create_engine(settings.state_url, "CIO_RETL_STATE_URL")
        try:
            check_reachable(engine)
            data = status_data(StateStore(engine, settings.state_schema), args.limit)
        finally:
            engine.dispose()
    else:  # a state store of its own that no sync has created yet: opening it would
        data = NO_STATE
    if args.json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_status(data)
    return 0


NO_STATE: dict[str, Any] = {
    "state": None,
    "workspaces": [],
    "runs": [],
    "events": [],
    "rejected": {"total": 0, "by_model": {}, "rows": []},
}


def status_data(state: StateStore, limit: int) -> dict[str, Any]:
    """The last ``limit`` runs (one entry per run, its models inside) and the rejected rows
    waiting for a fix: what ``status`` prints, and ``status --json`` as it is."""
    if not state.exists():
        return NO_STATE
    if not state.exists((workspaces,)):  # tables of an older cio-retl: never upgraded here
        return {**NO_STATE, "state": state.schema, "upgrade_pending": True}
    runs: dict[str, dict[str, Any]] = {}
    for row in state.last_runs(limit):
        acked = row["created"] + row["updated"] + row["deleted"]
        pending = 0 if row["dry_run"] else max(row["planned"] - acked - row["rejected"], 0)
        run = runs.setdefault(
            row["run_id"],
            {
                "run_id": row["run_id"],
                "workspace": row.get("workspace"),
                "started_at": row["started_at"],
                "finished_at": row["finished_at"],
                "dry_run": row["dry_run"],
                "models": [],
            },
        )
        run["started_at"] = min(run["started_at"], row["started_at"])
        if row["finished_at"] is None or run["finished_at"] is None:
            run["finished_at"] = None
        else:
            run["finished_at"] = max(run["finished_at"], row["finished_at"])
        run["models"].append(
            {
                "model": row["model"],
                "status": row["status"],
                "planned": row["planned"],
                "created": row["created"],
                "updated": row["updated"],
                "deleted": row["deleted"],
                "rejected": row["rejected"],
                "pending": pending,
                "requests": row["requests"],
                "bytes_sent": row["bytes_sent"],
                "error": row["error"],
            }
        )
    by_code = state.run_rejection_counts(runs)
    for run in runs.values():
        models = run["models"]
        for model in models:  # every rejection of the run, by code
            model["rejected_by_code"] = by_code.get((run["run_id"], model["model"]), {})
        run["status"] = _run_status([m["status"] for m in models])
        for count in ("planned", "created", "updated", "deleted", "rejected", "pending"):
            run[count] = sum(m[count] for m in models)
        run["seconds"] = (
            round((run["finished_at"] - run["started_at"]).total_seconds(), 1)
            if run["finished_at"]
            else None
        )
    counts = state.rejection_counts()
    rows = [
        {
            k: row[k]
            for k in ("workspace", "model", "key", "code", "reason", "field", "status", "run_id")
        }
        for row in state.rejections(limit=limit)
    ]
    # Rows recorded before codes existed have none (None): they get one when next rejected.
    by_code_waiting = {
        code or "(no code)": n for code, n in state.rejection_counts_by_code().items()
    }
    known = state.known_workspaces()
    events = []
    for site in list[str | None](known) or [None]:
        scoped = state if site is None else state.bound(Workspace(site))
        summaries = scoped.event_summaries() if state.exists((sent_events,)) else {}
        events += [
            {
                "workspace": site,
                "model": model,
                "sent": count,
                "newest": None if newest is None else dt.datetime.fromtimestamp(newest, dt.UTC),
            }
            for model, (count, newest) in sorted(summaries.items())
        ]
    return {
        "state": state.schema,
        "workspaces": [
            {
                column: getattr(row, column)
                for column in (
                    "site_id",
                    "region",
                    "environment_id",
                    "last_synced_at",
                    "adopted_run_id",
                    "adopted_snapshots",
                )
            }
            for row in known.values()
        ],
        "runs": list(runs.values()),
        "events": events,
        "rejected": {
            "total": sum(counts.values()),
            "by_model": counts,
            "by_code": by_code_waiting,
            "rows": rows,
        },
    }


def _run_status(statuses: Sequence[str]) -> str:
    """A run's status: its worst model's (failed, then running, then rejected)."""
    for status in ("failed", "running", "rejected"):
        if status in statuses:
            return status
    return statuses[0] if statuses else "succeeded"


STATUS_WIDTH = 100  # piped `status` output fits a 100-column terminal, log view or e-mail


def print_status(data: dict[str, Any]) -> None:
    console = out if out.is_terminal else Console(width=STATUS_WIDTH)
    if data["state"] is None:
        console.print("no runs yet: the state tables do not exist (the first sync creates them)")
        return
    if data.get("upgrade_pending"):
        console.print(
            f"the state tables in schema {data['state']!r} are from an older cio-retl: the next "
            "sync upgrades them (status only reads)",
            highlight=False,
        )
        return
    rows = [
        [
            run["run_id"],
            workspace_label(run["workspace"]),
            run["status"] + (" (dry)" if run["dry_run"] else ""),
            f"{run['planned']:,}",
            f"{run['created'] + run['updated'] + run['deleted']:,}",
            f"{run['rejected']:,}",
            f"{run['pending']:,}",
            "-" if run["seconds"] is None else f"{run['seconds']:.1f}",
            ", ".join(m["model"] for m in run["models"]),
        ]
        for run in data["runs"]
    ]
    headers = ("run", "workspace", "status", "planned", "sent", "rejected", "pending", "s")
    # Every column but the last as wide as its widest cell (full run ids: runs started in
    # the same second differ only after the dash); the models column gives way first.
    runs = Table(
        title="last runs", title_justify="left", box=None, pad_edge=False, padding=(0, 1, 0, 0)
    )
    for i, header in enumerate(headers):
        runs.add_column(
            header,
            justify="left" if i < 3 else "right",
            no_wrap=True,
            min_width=max([len(header), *(len(row[i]) for row in rows)]),
        )
    runs.add_column("models", no_wrap=True)
    room = console.width - sum(c.min_width or 0 for c in runs.columns) - len(headers)
    for row in rows:
        if len(row[-1]) > room:  # cut the list of models, visibly, to keep one line a run
            row[-1] = row[-1][: max(room - 1, 0)].rstrip(", ") + "…"
        runs.add_row(*row)
    console.print(runs)
    newest: dict[str, dict[str, int]] = {}  # runs come newest first; --json has every run's
    for run in data["runs"]:
        for model in run["models"]:
            if model["rejected_by_code"]:
                newest.setdefault(model["model"], model["rejected_by_code"])
    for model_name, codes in sorted(newest.items()):
        console.print(
            f"rejected by {model_name}'s last run, by code: {_by_code(codes)}",
            highlight=False,
            markup=False,
        )
    for destination in data["workspaces"]:
        console.print(workspace_line(destination), highlight=False, markup=False)
    several = len(data["workspaces"]) > 1
    for event in data["events"]:
        to = f" to {workspace_label(event['workspace'])}" if several else ""
        console.print(
            f"events sent by {event['model']}{to}: {event['sent']:,}"
            + (
                f", the newest from {event['newest']:%Y-%m-%d %H:%M:%S} UTC"
                if event["newest"]
                else ""
            ),
            highlight=False,
            markup=False,
        )
    rejected = data["rejected"]
    by_model = rejected["by_model"]
    console.print(
        f"rejected rows waiting for a fix: {rejected['total']:,}"
        + (
            f" ({', '.join(f'{m}: {n:,}' for m, n in sorted(by_model.items()))})"
            if by_model
            else ""
        ),
        highlight=False,
    )
    if rejected["by_code"]:
        console.print(f"  by code: {_by_code(rejected['by_code'])}", highlight=False)
    for row in rejected["rows"]:
        console.print(
            f"  {row['model']}"
            + (f" ({workspace_label(row['workspace'])})" if several else "")
            + f" key={row['key']!r} {row['code'] or '-'}: {row['reason']}"
            + (f" [{row['field']}]" if row["field"] else ""),
            highlight=False,
            markup=False,
        )


def workspace_label(site_id: str | None) -> str:
    """A run's workspace as ``status`` shows it: its Site ID (not a secret)."""
    if site_id is None:
        return "-"  # a plan of an empty state store, with no CIO_SITE_ID
    return site_id or "(before workspaces)"


def workspace_line(row: Mapping[str, Any]) -> str:
    """One workspace the state store has synced to, and what its region check reported."""
    if row["site_id"] == LEGACY_WORKSPACE:
        return (
            "workspace (before workspaces): state written before it was kept per workspace; "
            "the next sync with credentials takes it over"
        )
    region = f"region {row['region']}" if row["region"] else "region not reported"
    environment = (
        f", environment {row['environment_id']}" if row["environment_id"] is not None else ""
    )
    line = f"workspace {row['site_id']}: {region}{environment}"
    if row["last_synced_at"] is not None:
        line += f", last sync {row['last_synced_at']:%Y-%m-%d %H:%M:%S} UTC"
    if row["adopted_run_id"]:
        line += (
            f"; took over the state from before workspaces in run {row['adopted_run_id']}"
            f" ({row['adopted_snapshots']:,} snapshot rows)"
        )
    return line


def _emulator(args: argparse.Namespace) -> int:
    from cio_retl.emulator import serve

    serve(args.host, args.port)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cio_retl.demo_run import run_demo

    return run_demo(args.dir, out)


if __name__ == "__main__":
    sys.exit(main())
