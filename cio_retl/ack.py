"""Acknowledgment: what Customer.io accepted becomes the snapshot; what it refused, rejections.

A snapshot row (or a sent event) is written only after its item was acknowledged, in one
transaction with the rejections of the same batches, so a run killed at any moment leaves a
state that resends at most what was in flight. Rejections a failed transaction took go back
to the buffer, for a later write or the phase's last attempt (Sender) to record.
"""

from __future__ import annotations

import contextlib
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from cio_retl.client import SendResult
from cio_retl.models import Kind, Model
from cio_retl.normalize import canonical_json
from cio_retl.operations import Operation, redact
from cio_retl.plan import PlanTable, retire_shared_plans
from cio_retl.records import Change, Rejection, RejectionCode
from cio_retl.report import EXAMPLES_PER_CODE, MAX_REPORTED_REJECTIONS, ModelReport
from cio_retl.snapshot_merge import Pending, acknowledged_runs
from cio_retl.state import RejectionRow, SnapshotRow, StateStore


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """A batch of items the database built: their plan and sequence numbers, no per-row
    objects but the item bytes (kept for a 207's redacted record of a refused one) and
    which of them are updates (1) rather than new rows (0), as the report counts them."""

    plan: PlanTable
    seqs: array[int]
    items: list[bytes]
    updates: array[int]

    def __len__(self) -> int:
        return len(self.seqs)


Batch = list[Operation] | PlannedBatch


class AckContext(Protocol):
    """What acknowledgment needs of the run it belongs to."""

    state: StateStore
    run_id: str

    def people_models(self, identifier: str | None) -> list[Model]: ...

    def heartbeat(self) -> None: ...


class Acknowledger:
    """One model's phase bookkeeping: the report's counters, the rejections waiting to be
    recorded, and the state writes of acknowledged batches.

    The sender's thread and the state writer both call it; ``lock`` guards the report and
    the rejection buffer.
    """

    def __init__(self, run: AckContext, model: Model, report: ModelReport, dry_run: bool) -> None:
        self.run = run
        self.model = model
        self.report = report
        self.lock = threading.Lock()
        self._rejections: list[RejectionRow] = []
        # Acknowledged built rows waiting for a row group's worth (PlanTable.ranges).
        self._pending = Pending()
        self._planned: PlanTable | None = None
        # Clearing acknowledged keys from the rejections table is only needed if it has any.
        self._had_rejections = not dry_run and run.state.has_rejections(model.name)

    @property
    def pending_rejections(self) -> int:
        return len(self._rejections)

    def _count(self, code: RejectionCode, n: int) -> None:
        """Under ``lock``: ``n`` more rejections of ``code`` in the report."""
        self.report.rejected += n
        self.report.rejected_by_code[code] = self.report.rejected_by_code.get(code, 0) + n

    def _list(self, key: str | None, rejection: Rejection) -> None:
        """Under ``lock``: one rejection among the report's first ones, and its code's."""
        report = self.report
        if len(report.rejections) < MAX_REPORTED_REJECTIONS:
            report.rejections.append((key, str(rejection)))
        examples = report.examples_by_code.setdefault(rejection.code, [])
        if len(examples) < EXAMPLES_PER_CODE:
            examples.append((key, str(rejection)))

    def reject(self, key: str | None, rejection: Rejection, item: bytes | None) -> None:
        code = rejection.code
        with self.lock:
            self._count(code, 1)
            self._list(key, rejection)
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

    def record_planned(self, plan: PlanTable) -> int:
        """What the database decided while planning, but the items to send: the rows it
        rejected, recorded set-based, counted and listed in the report as the Python path's
        rejections are (returns how many), and the new fingerprints of the rows with
        nothing to send."""
        with self.run.state.engine.begin() as conn:
            counts, firsts = plan.rejections(conn, MAX_REPORTED_REJECTIONS)
            if counts:
                plan.record_rejections(conn, self.run.run_id)
            plan.refresh_fingerprints(conn)
        with self.lock:
            for code, n in counts.items():
                self._count(RejectionCode(code), n)
            for row in firsts:
                self._list(row.key, Rejection(RejectionCode(row.code), row.reason, row.field))
        return sum(counts.values())

    def count_acked(self, operations: Sequence[Operation]) -> None:
        created = updated = deleted = 0
        for op in operations:
            change = op.change.change
            if change is Change.CREATE:
                created += 1
            elif change is Change.UPDATE:
                updated += 1
            elif change is Change.DELETE:
                deleted += 1
        with self.lock:
            self.report.created += created
            self.report.updated += updated
            self.report.deleted += deleted

    def acknowledge(self, batches: Sequence[tuple[Batch, SendResult]]) -> None:
        """On the state writer: the snapshot of acknowledged rows and the rejected ones, in
        one transaction."""
        acked: list[Operation] = []
        planned: list[tuple[PlannedBatch, SendResult]] = []
        for operations, result in batches:
            if isinstance(operations, PlannedBatch):
                planned.append((operations, result))
                continue
            acked.extend(operations[i] for i in result.acked)
            for index, rejection in result.rejected.items():
                op = operations[index]
                self.reject(op.key, rejection, op.item)
        upserted = [snapshot_row(op) for op in acked if op.change.record is not None]
        deleted = [op.key for op in acked if op.change.change is Change.DELETE]
        events = [
            (op.key, op.change.event.id, op.change.event.timestamp)
            for op in acked
            if op.change.event is not None
        ]
        state = self.run.state
        with (
            self._pending_kept(),
            self.recording() as record_rejections,
            state.engine.begin() as conn,
        ):
            created, updated = self._acknowledge_planned(conn, planned)
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
                    # A shared plan of their buckets, planned before, may not send them.
                    retire_shared_plans(conn, state, people.name)
            if self._had_rejections:
                state.clear_rejections(conn, self.model.name, [op.key for op in acked])
            record_rejections(conn)
        with self.lock:
            for operations, result in batches:
                self.report.requests += result.requests
                self.report.bytes_sent += result.bytes_sent
                self.report.items_sent += len(operations)
            if events:
                newest = max(at for _, _, at in events)
                self.report.newest_event = max(newest, self.report.newest_event or newest)
        self.count_acked(acked)
        with self.lock:
            self.report.created += created
            self.report.updated += updated
        self.run.heartbeat()

    def _acknowledge_planned(
        self, conn: sa.Connection, batches: Sequence[tuple[PlannedBatch, SendResult]]
    ) -> tuple[int, int]:
        """The snapshots of acknowledged built items, written from the plan by sequence
        ranges; the items Customer.io refused are recorded as rejections one by one (an
        update's keeps its old snapshot). Returns how many were created and updated."""
        if not batches:
            return 0, 0
        ranges: list[tuple[int, int]] = []
        unacknowledged: list[int] = []
        refused: list[tuple[int, Rejection, bytes]] = []
        created = updated = 0
        for batch, result in batches:
            ranges.append((batch.seqs[0], batch.seqs[-1]))
            acked_updates = sum(batch.updates[i] for i in result.acked)
            updated += acked_updates
            created += len(result.acked) - acked_updates
            if len(result.acked) < len(batch):
                acked = set(result.acked)
                unacknowledged.extend(s for i, s in enumerate(batch.seqs) if i not in acked)
            refused.extend(
                (batch.seqs[i], rejection, batch.items[i])
                for i, rejection in result.rejected.items()
            )
        plan = batches[0][0].plan
        keys = plan.keys(conn, [seq for seq, _, _ in refused])
        for seq, rejection, item in refused:
            self.reject(keys.get(seq), rejection, item)
        if plan.ranges is None:
            plan.save_acknowledged(
                conn,
                self.run.run_id,
                ranges,
                unacknowledged,
                clear_rejections=self._had_rejections,
                updates=updated > 0,
            )
            return created, updated
        self._planned = plan
        added = self._pending.add(
            (run for b, r in batches for run in acknowledged_runs(b.seqs, r.acked)), updated > 0
        )
        if not self._merge_pending(conn, plan, final=False):
            plan.ranges.record(conn, self.run.run_id, added)
        return created, updated

    def _merge_pending(self, conn: sa.Connection, plan: PlanTable, *, final: bool) -> bool:
        """Write the pending rows whose turn it is into the snapshot (a multiple of the
        dialect's unit, or with ``final`` all), and record what stays pending in their
        place; False when none was due."""
        assert plan.ranges is not None
        updates = self._pending.updates
        taken = self._pending.take(self.run.state.dialect.snapshot_merge_rows, final=final)
        if not taken:
            return False
        plan.save_acknowledged(
            conn, self.run.run_id, taken, clear_rejections=self._had_rejections, updates=updates
        )
        plan.ranges.replace(conn, self.run.run_id, self._pending.ranges())
        return True

    def settle_planned(self) -> None:
        """On the state writer, when the phase's sending is over: every acknowledged built
        row still pending goes into the snapshot."""
        plan = self._planned
        if plan is None or not self._pending.rows:
            return
        with self._pending_kept(), self.run.state.engine.begin() as conn:
            self._merge_pending(conn, plan, final=True)

    @contextlib.contextmanager
    def _pending_kept(self) -> Iterator[None]:
        """The pending rows as they were before a state transaction that fails: the
        database took its writes back, so the recorded ranges still say what they said,
        and what the writer holds must too (else a later merge forgets their ranges)."""
        kept = self._pending.copy()
        try:
            yield
        except BaseException:
            self._pending = kept
            raise

    def take_rejections(self) -> list[RejectionRow]:
        with self.lock:
            taken, self._rejections = self._rejections, []
        return taken

    @contextlib.contextmanager
    def recording(self) -> Iterator[Callable[[sa.Connection], None]]:
        """What records the buffered rejections in a state transaction, given back to the
        buffer when that transaction fails (its commit included): a later write, or the
        phase's last attempt (Sender), still records them. Enter it before the transaction,
        so that it sees the commit's failure too."""
        taken: list[RejectionRow] = []

        def record(conn: sa.Connection) -> None:
            taken.extend(self.take_rejections())
            self.run.state.record_rejections(conn, self.model.name, self.run.run_id, taken)

        try:
            yield record
        except BaseException:
            if taken:
                with self.lock:
                    self._rejections[:0] = taken
            raise


def snapshot_row(op: Operation) -> SnapshotRow:
    """What the snapshot keeps of an acknowledged row: the attributes as they were encoded
    for the item (serialized once)."""
    record = op.change.record
    assert record is not None
    attributes = op.attributes or canonical_json(record.attributes)
    return SnapshotRow(
        key=op.key,
        fingerprint=op.change.fingerprint or "",
        identifiers=canonical_json(record.identifiers).decode(),
        attributes=attributes.decode(),
        new=op.change.change is Change.CREATE,
    )
