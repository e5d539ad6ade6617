"""How a run is asked to behave: the options and the progress callback adapters pass in."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cio_retl.buckets import Bucket
from cio_retl.client import RetryPolicy
from cio_retl.limits import MAX_BATCH_ITEMS

if TYPE_CHECKING:
    from cio_retl.report import RunReport

# (model name, items handled since the last call, the model's items this run at most: its
# new, changed and removed rows as the database counted them before sending)
Progress = Callable[[str, int, int], None]


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
    # Asked once the run is planned, before anything is sent; returns what blocks the send
    # (nothing: send). Its report holds each model's plan (ModelReport.plan), guardrail
    # verdicts included even when forced. An adapter's own pre-send checks decide here from
    # this run's plan, so no dry run has to plan the same changes first.
    approve: Callable[[RunReport], Sequence[str]] | None = None
