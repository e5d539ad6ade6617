"""One run: models -> diff -> operations -> batches -> Track API -> acknowledged snapshot.

This module only sequences the steps that live in their own modules. It guarantees the
run-level promises: model errors stop the run before anything is sent; the
changeset goes in phase order (:class:`~cio_retl.operations.Phase`: unsuppressions, objects,
people, devices, relationship adds and deletes, events, suppressions, deletes); a snapshot row
(or a sent event) is written only after its item was acknowledged; one run per model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import sqlalchemy as sa

from cio_retl.config import Settings
from cio_retl.diff import ChangeCounts
from cio_retl.errors import CioRetlError, RetriableError
from cio_retl.gc_policy import fewer_collections
from cio_retl.guardrails import enforce_guardrails, judge_guardrails, planned_changes
from cio_retl.models import Kind, Model, load_models, ordered_for_sync
from cio_retl.operations import Phase, phases_of
from cio_retl.options import Progress, SyncOptions
from cio_retl.plan import PlanDiff
from cio_retl.report import ModelReport, Outcome, RunReport
from cio_retl.send import Sender
from cio_retl.session import Session, open_session
from cio_retl.state.locking import STALE_LOCK_AFTER
from cio_retl.warehouse import database_lost, driver_message

# Callers import these from here: the run's entry point and what it takes and returns.
__all__ = ["ModelReport", "Outcome", "Progress", "RunReport", "SyncOptions", "run_sync"]

HEARTBEAT_EVERY = 30.0  # seconds; far below state.STALE_LOCK_AFTER
STALE_LOCK_MINUTES = int(STALE_LOCK_AFTER.total_seconds() // 60)


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
    with open_session(settings, models, suppressions, options) as session:
        run = _Run(session, models, options, progress, every_model)
        with fewer_collections():
            return run.execute()


class _Run:
    def __init__(
        self,
        session: Session,
        models: list[Model],
        options: SyncOptions,
        progress: Progress | None,
        every_model: Sequence[Model] = (),
    ) -> None:
        self.differ = session.differ
        self.warehouse = session.warehouse
        self.state = session.state
        self.client = session.client
        self.models = models
        self.options = options
        self.progress = progress
        self.bucket = options.bucket
        # Chosen before the run enters its workspace, which records it with the takeover.
        self.run_id = session.run_id
        self.adoption = session.adoption  # rows from before workspaces this run took over
        self.notices = list(session.notices)
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
            if not self._approved(report):
                return report  # nothing was sent: the runs are finished as stopped below
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
        except sa.exc.DBAPIError as exc:
            lost = database_lost(exc, (self.warehouse.engine, self.state.engine))
            if lost is None:  # a statement the database refused: a bug, not the database
                report.error = f"the run ended early: {type(exc).__name__}"
                raise
            report.error = str(lost)
            lost.report = report
            raise lost from exc
        except BaseException as exc:  # an interrupt, a bug, an approval's own error: not a success
            report.error = f"the run ended early: {type(exc).__name__}"
            raise
        finally:
            elapsed = time.perf_counter() - started
            for model in self.models:
                self.reports[model.name].conclude(elapsed, report.error)
                self._finish(model, self.reports[model.name])
            self._release(locked, report)
        return report

    def _release(self, locked: Sequence[Model], report: RunReport) -> None:
        """Release the run's locks. A database that fails to neither hides the run's own error
        nor turns what it sent into a failure: the lock of a process that is gone (on this
        host) or silent for STALE_LOCK_AFTER is taken over by the next run, as the report's
        notice says."""
        for model in locked:
            try:
                self.state.release_lock(model.name, self.run_id, self.bucket)
            except sa.exc.DBAPIError as exc:
                why = driver_message(exc, (self.state.engine,))
                notice = (
                    f"the lock of model {model.name} was not released ({why}): the next run"
                    " takes it over once this process has ended (on another host, after"
                    f" {STALE_LOCK_MINUTES} minutes without a heartbeat)"
                )
                report.notices.append(notice)  # printed and logged with the report

    def expected_items(self, model: Model) -> int:
        """At most how many items ``model`` sends this run: what the counts found to create,
        change and remove (every row with --full-resync); a progress bar's total."""
        counts = self.counts[model.name]
        upserts = counts.rows if self.options.full_resync else counts.new + counts.changed
        return upserts + counts.removed

    def _count_changes(self) -> dict[str, ChangeCounts]:
        counts = {}
        keys = self.options.approve is not None  # the bad keys are counted for it to judge
        for model in self.models:
            counts[model.name] = self.differ.count(model, keys=keys)
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

    def _approved(self, report: RunReport) -> bool:
        """Judge the guardrails, ask ``SyncOptions.approve`` with the plan, then let the
        guardrails stop the run; False when the approval refused a real run (its models
        are then stopped, with why)."""
        judged = judge_guardrails(
            self.models, self.counts, self.reports, self.options, self._count_real_updates
        )
        if self.options.approve is not None:
            for model in self.models:
                self.reports[model.name].plan = planned_changes(
                    model, judged[model.name], self.differ.key_rejections
                )
            report.blocked = list(self.options.approve(report))
        enforce_guardrails(self.models, self.reports, self.options, approved=not report.blocked)
        if not report.blocked or self.options.dry_run:
            return True
        for model_report in self.reports.values():
            model_report.status, model_report.error = "stopped", "; ".join(report.blocked)
        return False

    def _count_real_updates(self, model: Model) -> int:
        return self.differ.real_updates(model)

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
            changes = self.differ.removals(model, delete=model.deletes_removed)
        else:
            changes = self.differ.upserts(model, full_resync=self.options.full_resync)
        if self.progress:  # the model's clock starts now, before its first batch
            self.progress(model.name, 0, self.expected_items(model))
        planned = (
            self.differ.planned(model)
            if not removal and isinstance(self.differ, PlanDiff)
            else None
        )
        with contextlib.closing(changes):  # releases the diff's connection even on errors
            Sender(self, model, report).send(changes, planned)
        if not removal:
            report.unchanged = max(report.rows - report.planned - report.skipped, 0)
