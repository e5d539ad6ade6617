"""What a run did, per model and as a whole: the reports adapters (CLI, Dagster) show."""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cio_retl.buckets import Bucket
from cio_retl.records import RejectionCode
from cio_retl.state import Adoption

MAX_REPORTED_REJECTIONS = 20
EXAMPLES_PER_CODE = 5


@dataclass(frozen=True, slots=True)
class PlannedChanges:
    """One model's plan as the database counted it before anything was sent: what the
    guardrails judge, and the rows whose key the upserts would reject."""

    creates: int  # rows new to the snapshot (rows of bad keys included)
    updates: int  # rows whose fingerprint moved; the really changed ones if a guardrail tripped
    deletes: int  # acknowledged rows that left a model that deletes them
    null_keys: int
    duplicate_keys: int  # rows that share their key with another row
    # The first few of those rows as (key, reason), shared keys first.
    key_examples: tuple[tuple[str | None, str], ...] = ()


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
    plan: PlannedChanges | None = None  # set before sending when SyncOptions.approve asks
    rejections: list[tuple[str | None, str]] = field(default_factory=list)  # the first few
    # Every rejection of the run, counted by code: checks and the runs table read these, never
    # the reasons' text nor the first few listed above.
    rejected_by_code: dict[RejectionCode, int] = field(default_factory=dict)
    # The first few (key, reason) of each code, so what one code reports shows its own rows.
    examples_by_code: dict[RejectionCode, list[tuple[str | None, str]]] = field(
        default_factory=dict
    )

    def conclude(self, elapsed: float, error: str | None) -> None:
        """The status of a model whose run ended, ``error`` the run's transient failure."""
        self.duration_s = elapsed
        if error and self.status == "running":
            self.status, self.error = "failed", error
        elif self.status == "running":
            self.status = "rejected" if self.rejected else "succeeded"

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


def new_run_id(bucket: Bucket | None) -> str:
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    if bucket is not None:  # runs of one bucket are told apart in `cio-retl status`
        run_id += f"-b{bucket.index}of{bucket.count}"
    return run_id


class Outcome(enum.Enum):
    """How a run that returned a report ended; the command line maps each to an exit status."""

    SYNCED = "synced"  # every operation acknowledged (or, in a dry run, nothing in the way)
    REJECTED = "rejected"  # some rows rejected and recorded, the rest synced
    STOPPED = "stopped"  # a guardrail or the approval stopped (or, in a dry run, would stop) it
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
    blocked: list[str] = field(default_factory=list)  # why SyncOptions.approve stopped the run

    @property
    def outcome(self) -> Outcome:
        """A guardrail or a refused approval first (nothing was sent), then a transient
        failure (the run must be retried even if it also rejected rows), then rejections."""
        if self.blocked or any(m.guardrail for m in self.models):
            return Outcome.STOPPED
        if self.error or any(m.error for m in self.models):
            return Outcome.INTERRUPTED
        if any(m.rejected for m in self.models):
            return Outcome.REJECTED
        return Outcome.SYNCED
