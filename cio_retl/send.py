"""Sending one model's phase: encode the diff's rows, send batches, hand acknowledgments on."""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Protocol

import orjson
import sqlalchemy as sa

from cio_retl.ack import AckContext, Acknowledger, Batch, PlannedBatch
from cio_retl.batching import pack, pack_chunks
from cio_retl.client import SendResult, TrackClient
from cio_retl.errors import CioRetlError, RetriableError
from cio_retl.models import Model
from cio_retl.operations import Operation, encode
from cio_retl.options import Progress, SyncOptions
from cio_retl.plan import PlanTable
from cio_retl.records import Change, Rejection, RowChange
from cio_retl.report import ModelReport
from cio_retl.warehouse import driver_message

_log = logging.getLogger(__name__)


class SendContext(AckContext, Protocol):
    """What sending needs of the run it belongs to."""

    options: SyncOptions
    client: TrackClient | None
    progress: Progress | None

    def expected_items(self, model: Model) -> int: ...


class Sender:
    """Streams one model's changes of one phase to Customer.io and acknowledges them.

    Three kinds of threads, so the two cores are both busy: this one reads the diff and
    encodes items; up to ``max_in_flight`` workers send batches; ONE state writer applies
    every state write (acknowledgments, fingerprint refreshes, rejections) in order. The
    database releases the GIL while it writes, so snapshot upserts overlap the next batch's
    encoding, and a single writer means state writes never race each other.
    """

    FLUSH_EVERY = 1000
    # Back-pressure: state writes waiting for the writer (each up to ACK_ROWS rows held).
    MAX_PENDING_WRITES = 2
    # Acknowledged rows go to the snapshot several batches per statement and transaction (a
    # snapshot upsert has a fixed cost per statement), but never later than ACK_SECONDS
    # after the oldest of them was acknowledged, and at once whenever the sender would wait
    # for a batch in flight while the writer is idle: a run killed at any moment resends
    # only what was in flight or acknowledged in its last second. (25,000 rows rather than
    # 5,000: a fifth of the commits, measured in bench/README.md, "One-pass plan".)
    ACK_ROWS = 25_000
    ACK_SECONDS = 1.0
    # Built items whose plan writes their snapshots later, in whole row groups
    # (PlanTable.ranges): their acknowledgment only records sequence ranges, a few rows
    # whatever the batches hold, so it waits for ACK_SECONDS or this many rows rather than
    # going whenever the writer is idle: each commit has a fixed cost, and writing sooner
    # saves no later work.
    RECORDED_ACK_ROWS = 100_000
    # Rows read from the diff between two checks of the ACK_SECONDS deadline: a slow diff
    # (a warehouse streaming its result) must not hold acknowledgments back.
    TICK_ROWS = 256

    def __init__(self, run: SendContext, model: Model, report: ModelReport) -> None:
        self.run = run
        self.model = model
        self.report = report
        self.dry_run = run.options.dry_run
        self.ack = Acknowledger(run, model, report, self.dry_run)
        self._refresh: list[tuple[str, str]] = []
        self._forget: list[str] = []
        self._writer: ThreadPoolExecutor | None = None
        self._writes: deque[Future[None]] = deque()
        self._acked: list[tuple[Batch, SendResult]] = []  # not yet handed to the writer
        self._acked_rows = 0
        self._acked_since = 0.0  # time.monotonic() of the oldest batch in ``_acked``
        self._acked_recorded = True  # every batch in ``_acked`` is one RECORDED_ACK_ROWS serves
        self._in_flight: deque[tuple[Batch, Future[SendResult]]] = deque()

    def send(self, changes: Iterator[RowChange], planned: PlanTable | None = None) -> None:
        """Up to ``max_in_flight`` batches travel at once; their acknowledgments are written
        in batch order by the state writer.

        One phase holds each key at most once, so batches of a phase may overlap in flight
        without an older state of a row overtaking a newer one; phases never overlap. The
        items the database built (``planned``) go first, then the Python path's.
        """
        if self.dry_run:
            for batch in pack(self._operations(changes), max_items=self.run.options.batch_items):
                self.ack.count_acked([op for op, _ in batch])
                self._after_batch(len(batch))
            self._flush()
            return
        client = self.run.client
        assert client is not None
        if planned is not None:
            self.report.planned += self.ack.record_planned(planned)
        in_flight = self._in_flight
        failure: CioRetlError | None = None
        self._writer = ThreadPoolExecutor(1, "cio-state")
        try:
            with ThreadPoolExecutor(self.run.options.max_in_flight, "cio-send") as pool:
                try:
                    for sent, items in self._batches(changes, planned):
                        self._settle_done()
                        if len(in_flight) >= self.run.options.max_in_flight:
                            self._settle(*in_flight.popleft())
                        in_flight.append((sent, pool.submit(client.send_batch, items)))
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
                self._write(self.ack.settle_planned)
            finally:
                try:
                    self._drain()
                finally:
                    self._writer.shutdown()
                    self._writer = None
                    self._record_rejections_left()
        if failure is not None:
            raise failure

    def _record_rejections_left(self) -> None:
        """The rejections no state write recorded (its transaction failed, or the phase
        stopped before the last flush), recorded once more, if the state store takes them:
        the run's own error is what it reports, never this one's."""
        left = self.ack.pending_rejections
        if not left:
            return
        try:
            with self.ack.recording() as record_rejections, self.run.state.engine.begin() as conn:
                record_rejections(conn)
        except Exception as exc:
            cause = (
                driver_message(exc, (self.run.state.engine,))
                if isinstance(exc, sa.exc.DBAPIError)
                else type(exc).__name__
            )
            _log.warning(
                "%s: %d rejection(s) of this run could not be recorded (%s); the next run"
                " rejects those rows again",
                self.model.name,
                left,
                cause,
            )

    def _batches(
        self, changes: Iterator[RowChange], planned: PlanTable | None
    ) -> Iterator[tuple[Batch, list[bytes]]]:
        """Batches within every limit (items per batch, bytes per body): the built items
        first, as (sequence numbers, items), then the Python path's operations."""
        max_items = self.run.options.batch_items
        if planned is not None:
            for rows, items in pack_chunks(self._built(planned), max_items=max_items):
                self.report.planned += len(items)
                seqs = array("q", [seq for seq, _, _ in rows])
                updates = array("b", [update for _, _, update in rows])
                yield PlannedBatch(planned, seqs, items, updates), items
        for batch in pack(self._operations(changes), max_items=max_items):
            yield [op for op, _ in batch], [item for _, item in batch]

    def _built(
        self, planned: PlanTable
    ) -> Iterator[tuple[Sequence[tuple[int, str | bytes, int]], list[bytes]]]:
        """The plan's built items, a read at a time (:meth:`PlanTable.chunks`); samples
        taken, acknowledgments kept due meanwhile."""
        samples, sample_size = self.report.samples, self.run.options.sample_size
        for rows, items in planned.chunks():
            self._settle_done()
            if len(samples) < sample_size:
                samples.extend(orjson.loads(item) for item in items[: sample_size - len(samples)])
            yield rows, items

    def _write(self, task: Callable[[], None]) -> None:
        """Queue a state write; surface the writer's errors and keep its queue short."""
        assert self._writer is not None
        self._writes.append(self._writer.submit(task))
        while self._writes and (
            self._writes[0].done() or len(self._writes) > self.MAX_PENDING_WRITES
        ):
            self._writes.popleft().result()

    def _writer_busy(self) -> bool:
        return any(not write.done() for write in self._writes)

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

    def _settle(self, operations: Batch, future: Future[SendResult]) -> None:
        if not future.done() and self._acked:
            # The sender waits anyway: save what is acknowledged first, if the state writer
            # is idle. A busy writer would only queue one more small transaction behind its
            # own (a commit has a fixed cost): the rows wait for the next one, but not past
            # ACK_SECONDS, however long this batch takes (its retries' backoff included).
            if not self._writer_busy() and not self._acked_recorded:
                self._write_acknowledged()
            else:
                due = self._acked_since + self.ACK_SECONDS - time.monotonic()
                wait([future], timeout=max(due, 0.0))
                if not future.done():
                    self._write_acknowledged()
        try:
            result = future.result()
        except RetriableError as exc:
            with self.ack.lock:
                self.report.requests += exc.attempts
                self.report.bytes_sent += exc.bytes_sent
            raise
        if isinstance(operations, PlannedBatch) and not result.rejected:
            # Only a refused item's bytes are read again: held batches keep none.
            operations = replace(operations, items=[])
        if not self._acked:
            self._acked_since = time.monotonic()
        self._acked.append((operations, result))
        self._acked_rows += len(operations)
        self._acked_recorded = self._acked_recorded and _recorded(operations)
        if (
            self._acked_rows >= (self.RECORDED_ACK_ROWS if self._acked_recorded else self.ACK_ROWS)
            or time.monotonic() - self._acked_since >= self.ACK_SECONDS
        ):
            self._write_acknowledged()
        self._after_batch(len(operations))

    def _write_acknowledged(self) -> None:
        """Hand the settled batches to the state writer, as one snapshot write."""
        batches, self._acked, self._acked_rows = self._acked, [], 0
        self._acked_recorded = True
        if batches:
            self._write(lambda: self.ack.acknowledge(batches))

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
                self.ack.reject(change.key, change.rejection, None)
                self._flush_if_full()
                continue
            encoded = encode(model, change)
            if isinstance(encoded, Rejection):
                self.ack.reject(change.key, encoded, None)
                self._flush_if_full()
                continue
            if len(samples) < sample_size:
                samples.append(orjson.loads(encoded.item))
            yield encoded, encoded.item

    def _flush_if_full(self) -> None:
        if (
            max(len(self._refresh), len(self._forget), self.ack.pending_rejections)
            >= self.FLUSH_EVERY
        ):
            self._flush()

    def _flush(self) -> None:
        """Hand the buffered fingerprint refreshes, forgets and rejections to the writer."""
        refresh, forget, self._refresh, self._forget = self._refresh, self._forget, [], []
        if self.dry_run:
            self.ack.take_rejections()
            return
        if not (refresh or forget or self.ack.pending_rejections):
            return
        state, name = self.run.state, self.model.name

        def write() -> None:
            with self.ack.recording() as record_rejections, state.engine.begin() as conn:
                state.update_fingerprints(conn, name, refresh)
                state.delete_snapshots(conn, name, forget)
                record_rejections(conn)

        if self._writer is None:  # after the send: write here
            write()
        else:
            self._write(write)


def _recorded(batch: Batch) -> bool:
    """Whether acknowledging ``batch`` only records its ranges (Sender.RECORDED_ACK_ROWS)."""
    return isinstance(batch, PlannedBatch) and batch.plan.ranges is not None
