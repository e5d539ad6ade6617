"""How a run is asked to behave: the options and the progress callback adapters pass in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cio_retl.buckets import Bucket
from cio_retl.client import RetryPolicy
from cio_retl.limits import MAX_BATCH_ITEMS

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
