"""One run: models -> diff -> operations -> batches -> Track API -> acknowledged snapshot.

This module only sequences the steps that live in their own modules. It guarantees the
run-level promises: model errors stop the run before anything is sent; the
changeset goes in phase order (:class:`~cio_retl.operations.Phase`: unsuppressions, objects,
people, devices, relationship adds and deletes, events, suppressions, deletes); a snapshot row
(or a sent event) is written only after its item was acknowledged; one run per model.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from cio_retl.batching import pack
from cio_retl.buckets import Bucket
from cio_retl.client import AccountRegion, RetryPolicy, SendResult, TrackClient
from cio_retl.config import Settings
from cio_retl.diff import ChangeCounts, Differ, differ_for
from cio_retl.errors import (
    CioRetlError,
    ConfigError,
    GuardrailError,
    ModelError,
    RetriableError,
)
from cio_retl.limits import MAX_BATCH_ITEMS, column_name_problem
from cio_retl.models import Kind, Mode, Model, load_models, ordered_for_sync
from cio_retl.normalize import canonical_json, digest
from cio_retl.operations import Operation, Phase, encode, phases_of, redact
from cio_retl.ratelimit import RateSpec
from cio_retl.records import Change, Rejection, RejectionCode, RowChange
from cio_retl.state import (
    LEGACY_WORKSPACE,
    Adoption,
    RejectionRow,
    SnapshotRow,
    StateStore,
    Workspace,
    snapshots,
)
from cio_retl.state.budget import budget_for
from cio_retl.warehouse import (
    Warehouse,
    check_reachable,
    create_engine,
    duckdb_file_exists,
    require_duckdb_file,
)

# (model name, items handled since the last call, the model's items this run at most: its
# new, changed and removed rows as the database counted them before sending)
Progress = Callable[[str, int, int], None]

MAX_REPORTED_REJECTIONS = 20
EXAMPLES_PER_CODE = 5
HEARTBEAT_EVERY = 30.0  # seconds; far below state.STALE_LOCK_AFTER


@dataclass(frozen=True, slots=True)
class SyncOptions:
    dry_run: bool = False
    full_resync: bool = False
    force: bool = False  # let this run exceed the models' guardrails
    sample_size: int = 3
    max_in_flight: int = 4  # batches travelling at once; the rate limit still caps requests
    batch_items: int = MAX_BATCH_ITEMS  # fewer items per request bound what a 400 bisects
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Plan and send only the keys of this hash bucket (cio_retl.buckets): several runs, one
    # per bucket, then share a model, each under its own lock, all under one rate budget.
    bucket: Bucket | None = None


@dataclass(slots=True)
class ModelReport:
    """What one model's run did (or, in a dry run, would do)."""

    model: str
    kind: str
    mode: str
    rows: int = 0
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    rejected: int = 0
    requests: int = 0
    bytes_sent: int = 0
    items_sent: int = 0
    duration_s: float = 0.0
    status: str = "running"
    error: str | None = None
    guardrail: str | None = None  # why a guardrail stops (or, in a dry run, would stop) it
    planned: int = 0  # rows with something to send (or reject): the run's changeset
    skipped: int = 0  # people a suppression model holds: never identified
    newest_event: int | None = None  # events: Unix seconds of the newest event sent
    # Events older than the model's lookback_days never acknowledged: no run sends them now.
    unsent_before_lookback: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[tuple[str | None, str]] = field(default_factory=list)  # the first few
    # Every rejection of the run, counted by code: checks and the runs table read these, never
    # the reasons' text nor the first few listed above.
    rejected_by_code: dict[RejectionCode, int] = field(default_factory=dict)
    # The first few (key, reason) of each code, so what one code reports shows its own rows.
    examples_by_code: dict[RejectionCode, list[tuple[str | None, str]]] = field(
        default_factory=dict
    )

    def rejected_with(self, *codes: RejectionCode) -> int:
        return sum(self.rejected_by_code.get(code, 0) for code in codes)

    @property
    def changes(self) -> int:
        return self.created + self.updated + self.deleted

    def counts(self) -> dict[str, int]:
        return {
            "planned": self.planned,
            "created": self.created,
            "updated": self.updated,
            "deleted": self.deleted,
            "rejected": self.rejected,
            "requests": self.requests,
            "bytes_sent": self.bytes_sent,
        }


class Outcome(enum.Enum):
    """How a run that returned a report ended; the command line maps each to an exit status."""

    SYNCED = "synced"  # every operation acknowledged (or, in a dry run, nothing in the way)
    REJECTED = "rejected"  # some rows rejected and recorded, the rest synced
    STOPPED = "stopped"  # a guardrail stopped (or, in a dry run, would stop) the run
    INTERRUPTED = "interrupted"  # a transient failure: the rest goes on the next run


@dataclass(slots=True)
class RunReport:
    run_id: str
    dry_run: bool
    models: list[ModelReport]
    error: str | None = None  # the transient failure that ended the run early
    bucket: str | None = None  # "3/16" when the run covered one hash bucket
    # The Site ID whose state the run diffed against (LEGACY_WORKSPACE: a plan over rows from
    # before workspaces; None: a plan of an empty state store) and what the region check
    # reported for it. The Site ID is not a secret; the API key never appears here.
    workspace: str | None = None
    environment_id: int | None = None
    region: str | None = None
    adoption: Adoption | None = None  # rows from before workspaces this run took over
    notices: list[str] = field(default_factory=list)  # worth a look, not an error

    @property
    def outcome(self) -> Outcome:
        """A guardrail first (nothing was sent), then a transient failure (the run must be
        retried even if it also rejected rows), then rejections."""
        if any(m.guardrail for m in self.models):
            return Outcome.STOPPED
        if self.error or any(m.error for m in self.models):
            return Outcome.INTERRUPTED
        if any(m.rejected for m in self.models):
            return Outcome.REJECTED
        return Outcome.SYNCED


def run_sync(
    settings: Settings,
    names: Sequence[str] | None = None,
    options: SyncOptions | None = None,
    *,
    progress: Progress | None = None,
) -> RunReport:
    """Plan and (unless a dry run) send one ordered changeset for the selected models.

    Raises :class:`~cio_retl.errors.CioRetlError` subclasses for what stops a run before or
    while sending (model errors, bad credentials, a held lock); rejected rows and retries that
    ran out are reported in the returned :class:`RunReport` instead.
    """
    options = options or SyncOptions()
    every_model = load_models(settings.models_dir)
    models = ordered_for_sync(load_models(settings.models_dir, names) if names else every_model)
    # Every suppression model keeps its people from being identified, selected or not, so
    # `cio-retl sync users` never undoes an erasure request either.
    suppressions = [m for m in every_model if m.kind is Kind.SUPPRESSION]
    try:
        rate = RateSpec.parse(settings.rate_limit)
    except ValueError as exc:
        raise ConfigError(f"CIO_RETL_RATE_LIMIT: {exc}") from None
    # A dry run reads and writes nothing but the warehouse: no DuckDB file, schema, table,
    # run row or migration is created (the first real send creates the state).
    read_only = options.dry_run
    require_duckdb_file(settings.warehouse_url, "CIO_RETL_WAREHOUSE_URL")
    state_missing = read_only and not duckdb_file_exists(settings.state_url)
    engine = create_engine(settings.warehouse_url, "CIO_RETL_WAREHOUSE_URL")
    # The same database: the diff runs there as SQL. Another one: the cross-database diff.
    state_engine = (
        engine
        if settings.state_is_warehouse
        else create_engine(settings.state_url, "CIO_RETL_STATE_URL")
    )
    same_database = settings.state_is_warehouse
    differ: Differ | None = None
    try:
        warehouse = Warehouse(engine)
        state = StateStore(state_engine, settings.state_schema)
        for db in {engine} if state_missing else {engine, state_engine}:
            check_reachable(db)
        if read_only and (state_missing or not state.exists((snapshots,))):
            # Nothing synced yet: diff against an empty snapshot, in the warehouse.
            state, same_database = StateStore.absent(engine, settings.state_schema), True
        elif read_only:
            state = StateStore.for_reading(state_engine, settings.state_schema)
        for model in dict.fromkeys([*models, *suppressions]):  # every model error surfaces
            problem = column_name_problem(warehouse.columns(model))  # before anything is sent
            if problem:
                raise ModelError(str(model.path), problem, model.sql_line)
        client: TrackClient | None = None
        site_id: str | None = None
        if not options.dry_run:
            site_id, api_key = settings.require_credentials()
            client = TrackClient(settings.track_api_url, site_id, api_key, retry=options.retry)
        try:
            run_id = new_run_id(options.bucket)
            account: AccountRegion | None = None
            if client is not None:
                account = AccountRegion.read(client.check_credentials())
                check_region(settings, account)
            if not read_only:
                state.ensure_schema()
            adoption: Adoption | None = None
            notices: list[str] = []
            if client is not None and account is not None and site_id is not None:
                client.limiter = budget_for(
                    settings.rate_budget,
                    rate,
                    settings.track_api_url,
                    site_id,
                    state,
                )
                workspace = Workspace(site_id, account.environment_id, account.region)
                notices = same_environment_notice(state, workspace)
                adoption = state.enter_workspace(workspace, run_id)
            else:
                workspace = state.plan_workspace(settings.site_id)
            state = state.bound(workspace)
            differ = differ_for(
                warehouse,
                state,
                same_database=same_database,
                bucket=options.bucket,
                suppressions=suppressions,
            )
            run = _Run(
                differ,
                warehouse,
                state,
                client,
                models,
                options,
                progress,
                every_model,
                run_id=run_id,
            )
            run.adoption = adoption
            run.notices = notices
            with fewer_collections():
                return run.execute()
        finally:
            if client is not None:
                client.close()
    finally:
        if differ is not None:
            with contextlib.suppress(Exception):  # never hide the run's own error
                differ.close()
        engine.dispose()
        state_engine.dispose()


_GC_LOCK = threading.Lock()
_GC_USERS = 0
_GC_SAVED: tuple[int, int, int] = (0, 0, 0)
RUN_GC_THRESHOLD = 50_000  # allocations between young-generation collections during a run


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Run with far fewer garbage collections; restores the settings when the last run ends.

    A run allocates a few short-lived containers per row (values, records, items); with the
    default threshold (700) CPython collects every few rows and, each time enough survive,
    walks every object the process holds, the imported libraries included. Measured on a
    100k-row initial sync: about a quarter of the engine's CPU. Freezing what exists at the
    start takes the libraries out of those walks; the higher threshold makes collections
    rare. Nothing here disables collection, so reference cycles are still reclaimed. Runs of
    one process (Dagster's threads) share the setting: the first saves it, the last restores.
    """
    global _GC_USERS, _GC_SAVED
    with _GC_LOCK:
        if _GC_USERS == 0:
            _GC_SAVED = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(_GC_SAVED[0], RUN_GC_THRESHOLD), _GC_SAVED[1], _GC_SAVED[2])
        _GC_USERS += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_USERS -= 1
            if _GC_USERS == 0:
                gc.set_threshold(*_GC_SAVED)
                gc.unfreeze()


def check_region(settings: Settings, account: AccountRegion) -> None:
    """Stop before sending when the workspace lives in another region than CIO_REGION.

    Holds with CIO_TRACK_API_URL set too: the URL changes the host, not the region. An
    answer without a region (the schema marks it optional) is not checked.
    """
    if account.region is not None and account.region != settings.region:
        raise ConfigError(
            f"the workspace of CIO_SITE_ID {settings.site_id} is in region {account.region!r}, "
            f"but CIO_REGION is {settings.region!r}: set CIO_REGION={account.region} "
            "(CIO_TRACK_API_URL, when set, changes the host, not the region); nothing was sent"
        )


def same_environment_notice(state: StateStore, workspace: Workspace) -> list[str]:
    """A first sync to a Site ID whose reported environment_id another Site ID reported
    before: likely the same workspace under other credentials. State is kept per Site ID,
    so this sync starts from an empty snapshot and sends everything; say so."""
    if workspace.environment_id is None:
        return []
    known = state.known_workspaces()
    if workspace.site_id in known:
        return []
    twins = [
        site
        for site, row in known.items()
        if site != LEGACY_WORKSPACE and row.environment_id == workspace.environment_id
    ]
    if not twins:
        return []
    return [
        f"Site ID {workspace.site_id} reports environment_id {workspace.environment_id}, as "
        f"{', '.join(twins)} did: state is kept per Site ID, so this first sync to "
        f"{workspace.site_id} starts from an empty snapshot and sends every row"
    ]


def new_run_id(bucket: Bucket | None) -> str:
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    if bucket is not None:  # runs of one bucket are told apart in `cio-retl status`
        run_id += f"-b{bucket.index}of{bucket.count}"
    return run_id


class _Run:
    def __init__(
        self,
        differ: Differ,
        warehouse: Warehouse,
        state: StateStore,
        client: TrackClient | None,
        models: list[Model],
        options: SyncOptions,
        progress: Progress | None,
        every_model: Sequence[Model] = (),
        *,
        run_id: str | None = None,
    ) -> None:
        self.differ = differ
        self.warehouse = warehouse
        self.state = state
        self.client = client
        self.models = models
        self.options = options
        self.progress = progress
        self.bucket = options.bucket
        self.run_id = run_id or new_run_id(self.bucket)
        self.adoption: Adoption | None = None  # rows from before workspaces this run took over
        self.notices: list[str] = []
        self.reports = {m.name: ModelReport(m.name, m.kind.value, m.mode.value) for m in models}
        self.every_model = every_model or models  # the run's and the unselected ones
        self._last_heartbeat = time.monotonic()

    def heartbeat(self) -> None:
        """Tell other runs this one is alive, at most every HEARTBEAT_EVERY seconds."""
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_EVERY:
            self.state.heartbeat([m.name for m in self.models], self.run_id, self.bucket)
            self._last_heartbeat = now

    def execute(self) -> RunReport:
        locked: list[Model] = []
        started = time.perf_counter()
        workspace = self.state.workspace
        report = RunReport(
            self.run_id,
            self.options.dry_run,
            list(self.reports.values()),
            bucket=self.bucket.label if self.bucket else None,
            workspace=None if workspace is None else workspace.site_id,
            environment_id=None if workspace is None else workspace.environment_id,
            region=None if workspace is None else workspace.region,
            adoption=self.adoption,
            notices=self.notices,
        )
        try:
            if not self.options.dry_run:
                for model in self.models:
                    self.state.acquire_lock(model.name, self.run_id, self.bucket)
                    locked.append(model)
                for model in self.models:  # a dry run records nothing
                    self.state.start_run(
                        self.run_id,
                        model.name,
                        dry_run=False,
                        full_resync=self.options.full_resync,
                    )
            self.counts = self._count_changes()
            self._check_guardrails()
            for phase in Phase:
                for model in self.models:
                    upsert_phase, removal_phase = phases_of(model)
                    if phase is upsert_phase:
                        self._sync_phase(model, removal=False)
                    elif phase is removal_phase:
                        self._sync_phase(model, removal=True)
        except RetriableError as exc:
            report.error = str(exc)
        except CioRetlError as exc:
            report.error = str(exc)
            exc.report = report
            raise
        finally:
            elapsed = time.perf_counter() - started
            for model in self.models:
                model_report = self.reports[model.name]
                model_report.duration_s = elapsed
                if report.error and model_report.status == "running":
                    model_report.status, model_report.error = "failed", report.error
                elif model_report.status == "running":
                    model_report.status = "rejected" if model_report.rejected else "succeeded"
                self._finish(model, model_report)
            for model in locked:
                self.state.release_lock(model.name, self.run_id, self.bucket)
        return report

    def expected_items(self, model: Model) -> int:
        """At most how many items ``model`` sends this run: what the counts found to create,
        change and remove (every row with --full-resync); a progress bar's total."""
        counts = self.counts[model.name]
        upserts = counts.rows if self.options.full_resync else counts.new + counts.changed
        return upserts + counts.removed

    def _count_changes(self) -> dict[str, ChangeCounts]:
        counts = {}
        for model in self.models:
            counts[model.name] = self.differ.count(model)
            self.reports[model.name].rows = counts[model.name].rows
            self.reports[model.name].skipped = self.differ.skipped(model)
            if model.kind is Kind.EVENT and model.lookback_days is not None:
                self.reports[
                    model.name
                ].unsent_before_lookback = self.differ.unsent_before_lookback(model)
        return counts

    def people_models(self, identifier: str | None) -> list[Model]:
        """The person models identifying people by ``identifier`` (selected or not)."""
        return [m for m in self.every_model if m.kind is Kind.PERSON and m.identifier == identifier]

    def _check_guardrails(self) -> None:
        """Stop before sending anything if a model would delete or change too much of what
        Customer.io holds; a dry run only reports it. ``--force`` lets one run through."""
        problems = []
        for model in self.models:
            counts = self.counts[model.name]
            reason = guardrail_problem(model, counts)
            if reason and counts.changed and not self.options.full_resync:
                # A fingerprint also moves when only the SQL's shape does (a column
                # reordered, a DuckDB upgrade): before stopping a run, count the rows whose
                # normalized attributes really changed. Only paid when a guardrail trips.
                reason = guardrail_problem(
                    model, replace(counts, changed=self._count_real_updates(model))
                )
            if reason:
                self.reports[model.name].guardrail = reason
                problems.append(f"{model.name}: {reason}")
        if problems and not self.options.force and not self.options.dry_run:
            raise GuardrailError(
                "guardrail stopped the run before anything was sent:\n  "
                + "\n  ".join(problems)
                + "\nIf this is intended, rerun with --force, or raise the model's "
                "-- max_delete_pct / -- max_change_pct header."
            )
        if self.options.force:
            for model in self.models:
                self.reports[model.name].guardrail = None

    def _count_real_updates(self, model: Model) -> int:
        changes = self.differ.upserts(model)
        with contextlib.closing(changes):
            return sum(1 for change in changes if change.change is Change.UPDATE)

    def _finish(self, model: Model, report: ModelReport) -> None:
        if self.options.dry_run:
            return  # nothing was recorded
        # Never hide the run's own error behind a bookkeeping one.
        with contextlib.suppress(Exception):
            self.state.finish_run(
                self.run_id,
                model.name,
                report.status,
                report.counts(),
                report.error,
                {code.value: n for code, n in report.rejected_by_code.items()},
            )

    def _sync_phase(self, model: Model, *, removal: bool) -> None:
        report = self.reports[model.name]
        counts = self.counts[model.name]
        if removal and counts.removed == 0:
            return  # the counts already proved there is nothing to do: skip the scan
        if not removal and not counts.has_upserts and not self.options.full_resync:
            report.unchanged = max(counts.rows - report.skipped, 0)
            return
        if removal:
            delete = model.kind is Kind.RELATIONSHIP or model.mode is Mode.MIRROR
            changes = self.differ.removals(model, delete=delete)
        else:
            changes = self.differ.upserts(model, full_resync=self.options.full_resync)
        if self.progress:  # the model's clock starts now, before its first batch
            self.progress(model.name, 0, self.expected_items(model))
        with contextlib.closing(changes):  # releases the diff's connection even on errors
            _Sender(self, model, report).send(changes)
        if not removal:
            report.unchanged = max(report.rows - report.planned - report.skipped, 0)


def guardrail_problem(model: Model, counts: ChangeCounts) -> str | None:
    """Why this changeset is too big for the model's guardrails, or None.

    Shares are of the acknowledged rows (the snapshot), so a first sync is never stopped;
    deletes count only where they are sent (mirror mode, relationships).
    """
    if counts.snapshot_rows == 0:
        return None
    deletes = counts.removed if model.mode is Mode.MIRROR or model.kind is Kind.RELATIONSHIP else 0
    delete_pct = 100 * deletes / counts.snapshot_rows
    if delete_pct > model.max_delete_pct:
        return (
            f"{deletes:,} of {counts.snapshot_rows:,} synced rows ({delete_pct:.1f}%) would be "
            f"deleted, over max_delete_pct {model.max_delete_pct:g}"
        )
    change_pct = 100 * (counts.changed + deletes) / counts.snapshot_rows
    if change_pct > model.max_change_pct:
        return (
            f"{counts.changed + deletes:,} of {counts.snapshot_rows:,} synced rows "
            f"({change_pct:.1f}%) would change, over max_change_pct {model.max_change_pct:g}"
        )
    return None


class _Sender:
    """Streams one model's changes of one phase to Customer.io and acknowledges them.

    Three kinds of threads, so the two cores are both busy: this one reads the diff and
    encodes items; up to ``max_in_flight`` workers send batches; ONE state writer applies
    every state write (acknowledgments, fingerprint refreshes, rejections) in order. The
    database releases the GIL while it writes, so snapshot upserts overlap the next batch's
    encoding, and a single writer means state writes never race each other.
    """

    FLUSH_EVERY = 1000
    MAX_PENDING_WRITES = 8  # back-pressure: acknowledgments waiting for the state writer
    # Acknowledged rows go to the snapshot several batches per statement and transaction (a
    # snapshot upsert has a fixed cost per statement), but never later than ACK_SECONDS
    # after the oldest of them was acknowledged, and at once whenever the sender would wait
    # for a batch in flight anyway: a run killed at any moment resends only what was in
    # flight or acknowledged in its last second.
    ACK_ROWS = 5000
    ACK_SECONDS = 1.0
    # Rows read from the diff between two checks of the ACK_SECONDS deadline: a slow diff
    # (a warehouse streaming its result) must not hold acknowledgments back.
    TICK_ROWS = 256

    def __init__(self, run: _Run, model: Model, report: ModelReport) -> None:
        self.run = run
        self.model = model
        self.report = report
        self.dry_run = run.options.dry_run
        # Clearing acknowledged keys from the rejections table is only needed if it has any.
        self._had_rejections = not self.dry_run and run.state.has_rejections(model.name)
        self._refresh: list[tuple[str, str]] = []
        self._forget: list[str] = []
        self._rejections: list[RejectionRow] = []
        self._lock = threading.Lock()  # report counters and buffers shared with the writer
        self._writer: ThreadPoolExecutor | None = None
        self._writes: deque[Future[None]] = deque()
        self._acked: list[tuple[list[Operation], SendResult]] = []  # not yet handed to the writer
        self._acked_rows = 0
        self._acked_since = 0.0  # time.monotonic() of the oldest batch in ``_acked``
        self._in_flight: deque[tuple[list[Operation], Future[SendResult]]] = deque()

    def send(self, changes: Iterator[RowChange]) -> None:
        """Up to ``max_in_flight`` batches travel at once; their acknowledgments are written
        in batch order by the state writer.

        One phase holds each key at most once, so batches of a phase may overlap in flight
        without an older state of a row overtaking a newer one; phases never overlap.
        """
        if self.dry_run:
            for batch in pack(self._operations(changes), max_items=self.run.options.batch_items):
                self._count_acked([op for op, _ in batch])
                self._after_batch(len(batch))
            self._flush()
            return
        client = self.run.client
        assert client is not None
        in_flight = self._in_flight
        failure: CioRetlError | None = None
        self._writer = ThreadPoolExecutor(1, "cio-state")
        try:
            with ThreadPoolExecutor(self.run.options.max_in_flight, "cio-send") as pool:
                try:
                    for batch in pack(
                        self._operations(changes), max_items=self.run.options.batch_items
                    ):
                        self._settle_done()
                        if len(in_flight) >= self.run.options.max_in_flight:
                            self._settle(*in_flight.popleft())
                        items = [item for _, item in batch]
                        in_flight.append(
                            ([op for op, _ in batch], pool.submit(client.send_batch, items))
                        )
                except CioRetlError as exc:
                    failure = exc
                finally:
                    # Whatever happened, acknowledge every batch that was accepted meanwhile.
                    while in_flight:
                        try:
                            self._settle(*in_flight.popleft())
                        except CioRetlError as exc:
                            failure = failure or exc
            self._write_acknowledged()
            self._flush()
        finally:
            try:
                self._write_acknowledged()  # what Customer.io accepted is saved, whatever happened
            finally:
                self._drain()
                self._writer.shutdown()
                self._writer = None
        if failure is not None:
            raise failure

    def _write(self, task: Callable[[], None]) -> None:
        """Queue a state write; surface the writer's errors and keep its queue short."""
        assert self._writer is not None
        self._writes.append(self._writer.submit(task))
        while self._writes and (
            self._writes[0].done() or len(self._writes) > self.MAX_PENDING_WRITES
        ):
            self._writes.popleft().result()

    def _drain(self) -> None:
        while self._writes:
            self._writes.popleft().result()

    def _settle_done(self) -> None:
        """Settle the batches at the head of the queue that are already answered (in batch
        order, without waiting), and write the acknowledgments that are due."""
        while self._in_flight and self._in_flight[0][1].done():
            self._settle(*self._in_flight.popleft())
        if self._acked and time.monotonic() - self._acked_since >= self.ACK_SECONDS:
            self._write_acknowledged()

    def _settle(self, operations: list[Operation], future: Future[SendResult]) -> None:
        if not future.done():  # the sender waits anyway: save what is acknowledged first
            self._write_acknowledged()
        try:
            result = future.result()
        except RetriableError as exc:
            with self._lock:
                self.report.requests += exc.attempts
                self.report.bytes_sent += exc.bytes_sent
            raise
        if not self._acked:
            self._acked_since = time.monotonic()
        self._acked.append((operations, result))
        self._acked_rows += len(operations)
        if (
            self._acked_rows >= self.ACK_ROWS
            or time.monotonic() - self._acked_since >= self.ACK_SECONDS
        ):
            self._write_acknowledged()
        self._after_batch(len(operations))

    def _write_acknowledged(self) -> None:
        """Hand the settled batches to the state writer, as one snapshot write."""
        batches, self._acked, self._acked_rows = self._acked, [], 0
        if batches:
            self._write(lambda: self._acknowledge(batches))

    def _after_batch(self, n_items: int) -> None:
        if self.run.progress:
            self.run.progress(self.model.name, n_items, self.run.expected_items(self.model))
        self._flush_if_full()

    def _operations(self, changes: Iterable[RowChange]) -> Iterator[tuple[Operation, bytes]]:
        # Runs once per changed row: attributes looked up once, and the buffers checked for
        # a flush only when this loop adds to them (batches check them too, _after_batch).
        model, report, samples = self.model, self.report, self.report.samples
        sample_size = self.run.options.sample_size
        tick = 0 if self.dry_run else self.TICK_ROWS
        for change in changes:
            if tick:
                tick -= 1
                if not tick:
                    tick = self.TICK_ROWS
                    self._settle_done()
            kind = change.change
            if kind is Change.REFRESH:
                assert change.key is not None and change.fingerprint is not None
                self._refresh.append((change.key, change.fingerprint))
                self._flush_if_full()
                continue
            if kind is Change.FORGET:
                assert change.key is not None
                self._forget.append(change.key)
                self._flush_if_full()
                continue
            report.planned += 1
            if kind is Change.REJECT:
                assert change.rejection is not None
                self._reject(change.key, change.rejection, None)
                self._flush_if_full()
                continue
            encoded = encode(model, change)
            if isinstance(encoded, Rejection):
                self._reject(change.key, encoded, None)
                self._flush_if_full()
                continue
            if len(samples) < sample_size:
                samples.append(orjson.loads(encoded.item))
            yield encoded, encoded.item

    def _reject(self, key: str | None, rejection: Rejection, item: bytes | None) -> None:
        report, code = self.report, rejection.code
        with self._lock:
            report.rejected += 1
            report.rejected_by_code[code] = report.rejected_by_code.get(code, 0) + 1
            if len(report.rejections) < MAX_REPORTED_REJECTIONS:
                report.rejections.append((key, str(rejection)))
            examples = report.examples_by_code.setdefault(code, [])
            if len(examples) < EXAMPLES_PER_CODE:
                examples.append((key, str(rejection)))
            if key is not None:  # a NULL key cannot be stored; it is reported only
                self._rejections.append(
                    RejectionRow(
                        key,
                        code.value,
                        rejection.reason,
                        rejection.field,
                        rejection.status,
                        redact(item) if item else None,
                    )
                )

    def _count_acked(self, operations: Sequence[Operation]) -> None:
        created = updated = deleted = 0
        for op in operations:
            change = op.change.change
            if change is Change.CREATE:
                created += 1
            elif change is Change.UPDATE:
                updated += 1
            elif change is Change.DELETE:
                deleted += 1
        with self._lock:
            self.report.created += created
            self.report.updated += updated
            self.report.deleted += deleted

    def _acknowledge(self, batches: Sequence[tuple[list[Operation], SendResult]]) -> None:
        """On the state writer: the snapshot of acknowledged rows and the rejected ones, in
        one transaction."""
        acked: list[Operation] = []
        for operations, result in batches:
            acked.extend(operations[i] for i in result.acked)
            for index, rejection in result.rejected.items():
                op = operations[index]
                self._reject(op.key, rejection, op.item)
        upserted = [snapshot_row(op) for op in acked if op.change.record is not None]
        deleted = [op.key for op in acked if op.change.change is Change.DELETE]
        events = [
            (op.key, op.change.event.id, op.change.event.timestamp)
            for op in acked
            if op.change.event is not None
        ]
        state = self.run.state
        with state.engine.begin() as conn:
            state.save_snapshots(conn, self.model.name, self.run.run_id, upserted)
            state.delete_snapshots(conn, self.model.name, deleted)
            state.save_events(conn, self.model.name, self.run.run_id, events)
            if self.model.kind is Kind.SUPPRESSION and upserted:
                # A suppressed person is no longer what the person models' snapshots say
                # [open: whether Customer.io deletes the profile on suppress; its v1
                # reference speaks of deleting it]: forget them there, so that once
                # unsuppressed they are identified again in full, as new people.
                for people in self.run.people_models(self.model.identifier):
                    state.delete_snapshots(conn, people.name, [row.key for row in upserted])
            if self._had_rejections:
                state.clear_rejections(conn, self.model.name, [op.key for op in acked])
            state.record_rejections(conn, self.model.name, self.run.run_id, self._take_rejections())
        with self._lock:
            for operations, result in batches:
                self.report.requests += result.requests
                self.report.bytes_sent += result.bytes_sent
                self.report.items_sent += len(operations)
            if events:
                newest = max(at for _, _, at in events)
                self.report.newest_event = max(newest, self.report.newest_event or newest)
        self._count_acked(acked)
        self.run.heartbeat()

    def _take_rejections(self) -> list[RejectionRow]:
        with self._lock:
            taken, self._rejections = self._rejections, []
        return taken

    def _flush_if_full(self) -> None:
        if max(len(self._refresh), len(self._forget), len(self._rejections)) >= self.FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Hand the buffered fingerprint refreshes, forgets and rejections to the writer."""
        refresh, forget, self._refresh, self._forget = self._refresh, self._forget, [], []
        if self.dry_run:
            self._take_rejections()
            return
        if not (refresh or forget or self._rejections):
            return
        state, name, run_id = self.run.state, self.model.name, self.run.run_id

        def write() -> None:
            with state.engine.begin() as conn:
                state.update_fingerprints(conn, name, refresh)
                state.delete_snapshots(conn, name, forget)
                state.record_rejections(conn, name, run_id, self._take_rejections())

        if self._writer is None:  # after the send: write here
            write()
        else:
            self._write(write)


def snapshot_row(op: Operation) -> SnapshotRow:
    """What the snapshot keeps of an acknowledged row; the attributes are serialized once
    and the hash is taken of exactly those bytes."""
    record = op.change.record
    assert record is not None
    attributes = op.attributes or canonical_json(record.attributes)
    return SnapshotRow(
        key=op.key,
        fingerprint=op.change.fingerprint or "",
        attrs_hash=digest(attributes),
        identifiers=canonical_json(record.identifiers).decode(),
        attributes=attributes.decode(),
        new=op.change.change is Change.CREATE,
    )
