"""One plan for every bucket run of a model: built once, each bucket run reads its slice.

A bucket run used to plan its bucket alone, and that plan still scanned the whole model and
hashed every key of model and snapshot to find its own rows: N bucket runs cost about N
whole-model plans. Instead the first bucket run of a round builds the plan of the whole
model with each row's bucket beside it (a *shared plan*), and every bucket run of the same
count reads its bucket's rows of it: its *slice*.

A slice is its bucket's changeset as of the moment the plan was built. It stays right as long
as nothing else wrote that bucket's snapshots since, which these rules keep:

- A slice is claimed once, by the run that then sends it; claiming bucket i's slice of one
  plan retires bucket i's slice of every other shared plan of the model and count.
- Claims and builds take turns under one lock per model and count (``people#plan/16``,
  :meth:`cio_retl.state.locking.Locks.planning`), so runs that start together build one
  plan. A plan's slice j is retired from the start if another run may have written bucket j
  while the plan was built (it claimed, sent or ended a slice j then, or has not ended);
  every other bucket's unclaimed slice of an older plan is retired then (the new plan is
  fresher). That holds even if the lock was taken over as stale.
- A run of the whole model, or of another bucket count, overlaps every bucket (the locks keep
  it from running beside them) and drops every shared plan of the model before it plans.
- A suppression run, which forgets the snapshots of the people it suppresses in the person
  models of its identifier, retires every unclaimed slice of those models' shared plans in
  the same transaction (:func:`retire_unclaimed`): they were planned without that erasure.
- Times are the state database's clock (hosts' clocks may disagree). The holder of the
  planning lock refreshes it, and its run's other locks, while it builds (one statement
  that takes minutes); a slice's claim checks it took the row it meant to.
- A slice can be claimed for REUSE_SECONDS after its plan was built; a bucket run after that
  plans anew, so a later round sends what the warehouse holds then.
- A plan is dropped once none of its slices can be claimed or is being read: each is done,
  retired, claimed by a run that holds no lock any more, or unclaimed past REUSE_SECONDS.

Each shared plan has a small table beside it, ``<plan>_s``: a row per bucket with its
counts when the plan was built (its snapshot rows and the plan's counts of its slice, what a
run reads first: no bucket run scans the snapshot or the plan to count), who claimed it and
whether its run is done. Its name carries the model (hashed), the count and a digest of the
plan's SQL, so a plan of another definition of the model is never claimed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson
import sqlalchemy as sa

from cio_retl.errors import LockedError
from cio_retl.state import StateStore
from cio_retl.warehouse import BUCKET_COLUMN

REUSE_SECONDS = 600
RETIRED = "-retired-"  # claimed_by of a slice no run may claim (run ids never look like it)
SLICES_SUFFIX = "_s"


def shared_prefix(model_prefix: str, count: int) -> str:
    """The name prefix of the shared plans of one model (its plan prefix) and count."""
    return f"{shared_root(model_prefix)}{int(count)}_"


def plan_digest(sql: str) -> str:
    """What a shared plan's name says of the SQL that built it."""
    return hashlib.blake2b(sql.encode(), digest_size=4).hexdigest()


@dataclass(frozen=True, slots=True)
class Slice:
    """One bucket's rows of a shared plan, claimed by this run, and its counts."""

    table: str  # the shared plan, quoted and schema-qualified
    slices: str  # its table of slices, the same
    bucket: int
    acknowledged: int  # the bucket's snapshot rows when the plan was built
    planned: tuple[int, ...]  # the plan's counts of the slice (PlanDiff's counts query)

    @property
    def relation(self) -> str:
        """The slice as a relation the plan's readers select from (``FROM <it> AS p``)."""
        return f"(SELECT * FROM {self.table} AS g WHERE g.{BUCKET_COLUMN} = {int(self.bucket)})"


@dataclass(frozen=True, slots=True)
class _Row:
    bucket: int
    acknowledged: int
    planned: str  # JSON list of the slice's counts
    built_at: int  # microseconds since the epoch, as the times below
    claimed_by: str | None
    claimed_at: int | None
    done_at: int | None  # when its run ended


class SharedPlans:
    """The shared plans of one model and bucket count in the state schema, for one run.

    :meth:`survey`, :meth:`claim` and :meth:`register` expect the caller to hold
    :meth:`~cio_retl.state.locking.Locks.planning` for the model and count, and to survey
    first: they act on what it found.
    """

    def __init__(
        self, state: StateStore, model: str, model_prefix: str, count: int, run_id: str
    ) -> None:
        self.state = state
        self.model = model
        self.model_prefix = model_prefix
        self.prefix = shared_prefix(model_prefix, count)
        self.count = count
        self.run_id = run_id
        self._plans: dict[str, dict[int, _Row]] = {}  # what the survey left: name -> slices
        self._live: set[str] = set()  # the other runs holding a lock of the model
        self._started = 0  # when this run began building a plan

    def name(self, digest: str, token: str) -> str:
        """The unquoted name of a new shared plan."""
        return f"{self.prefix}{digest}_{token}"

    def survey(self, *, other_counts: bool = True) -> None:
        """Read the model's shared plans and who is live, and drop a plan whose build died
        before its slices were recorded, every plan of this count that nothing can claim or
        is reading, and (``other_counts``, while this run holds its bucket's lock: no run of
        another count can be live beside it) the plans of other counts."""
        names = self._names()
        self._live = self.state.live_runs(self.model) - {self.run_id}
        self._plans = self._read(n for n in names if n.startswith(self.prefix))
        now = self._now()
        dead = [n for n in names if other_counts and not n.startswith(self.prefix)]
        dead += [
            n
            for n in names
            if n.startswith(self.prefix) and not n.endswith(SLICES_SUFFIX) and n not in self._plans
        ]
        for name, rows in list(self._plans.items()):
            if all(
                row.done_at is not None
                or row.claimed_by == RETIRED
                or (row.claimed_by is not None and row.claimed_by not in self._live)
                or (row.claimed_by is None and now - row.built_at >= _reuse_micros())
                for row in rows.values()
            ):
                dead += [name, name + SLICES_SUFFIX]
                del self._plans[name]
        self.state.drop_tables(dead)

    def claim(self, bucket: int, digest: str) -> Slice | None:
        """Claim ``bucket``'s slice of the newest plan of ``digest`` where it is unclaimed
        and young, and retire the bucket's slice of every other plan; None when no plan has
        one (the bucket's slices are retired all the same: the run plans anew), or when the
        slice was taken meanwhile (by a run that took the planning lock over as stale)."""
        now = self._now()
        found: tuple[str, _Row] | None = None
        for name, rows in sorted(self._plans.items(), key=lambda p: -_built_at(p[1])):
            row = rows.get(bucket)
            if (
                found is None
                and name.startswith(f"{self.prefix}{digest}_")
                and row is not None
                and row.claimed_by is None
                and now - row.built_at < _reuse_micros()
            ):
                found = (name, row)
        claimed = 0
        with self.state.engine.begin() as conn:
            for name in self._plans:
                mine = found is not None and name == found[0]
                result = conn.execute(
                    sa.text(
                        f"UPDATE {self._quoted(name + SLICES_SUFFIX)} SET claimed_by = :by,"
                        " claimed_at = :now WHERE bucket = :bucket AND claimed_by IS NULL"
                    ),
                    {"by": self.run_id if mine else RETIRED, "now": now, "bucket": bucket},
                )
                claimed += result.rowcount if mine else 0
        if found is None or claimed != 1:
            return None
        name, row = found
        return self._slice(name, bucket, row.acknowledged, tuple(orjson.loads(row.planned)))

    def begin_build(self) -> None:
        """Note when this run starts building a plan: a slice of another plan claimed or
        sent since then may have written its bucket while the plan read it."""
        self._started = self._now()

    def register(
        self,
        name: str,
        bucket: int,
        acknowledged: Mapping[int, int],
        planned: Mapping[int, Sequence[int]],
        width: int,
    ) -> Slice:
        """Record the plan ``name`` just built, with each bucket's snapshot rows and plan
        counts (``width`` of them; a bucket without plan rows has zeros), its slice of
        ``bucket`` claimed by this run.

        A bucket's slice is retired from the start when another run may have written the
        bucket while the plan was built: its slice of another plan was claimed then, or its
        run ended then, or it has not ended (a live run sending it, or a dead one). This
        holds whatever the planning lock did (a lock taken over as stale included). The
        older plans' unclaimed slices are retired: this plan holds the fresher changeset of
        their buckets."""
        others = self._read(self._names())
        started = self._started
        busy = {
            row.bucket
            for rows in others.values()
            for row in rows.values()
            if row.claimed_by not in (None, RETIRED, self.run_id)
            and (
                row.done_at is None
                or row.done_at >= started
                or (row.claimed_at is not None and row.claimed_at >= started)
            )
        }
        now = self._now()
        counts = {b: tuple(int(v or 0) for v in values) for b, values in planned.items()}
        zeros = (0,) * width
        slices = self._quoted(name + SLICES_SUFFIX)
        rows = [
            {
                "bucket": b,
                "acknowledged": int(acknowledged.get(b, 0)),
                "planned": orjson.dumps(counts.get(b, zeros)).decode(),
                "built_at": now,
                "claimed_by": self.run_id if b == bucket else RETIRED if b in busy else None,
                "claimed_at": now if b == bucket or b in busy else None,
            }
            for b in range(self.count)
        ]
        with self.state.engine.begin() as conn:
            for other in others:
                _retire(conn, self.state, other + SLICES_SUFFIX)
            conn.execute(
                sa.text(
                    f"CREATE TABLE {slices} (bucket INTEGER NOT NULL, acknowledged BIGINT NOT"
                    " NULL, planned VARCHAR(400) NOT NULL, built_at BIGINT NOT NULL,"
                    " claimed_by VARCHAR(64), claimed_at BIGINT, done_at BIGINT)"
                )
            )
            conn.execute(
                sa.text(
                    f"INSERT INTO {slices} (bucket, acknowledged, planned, built_at, claimed_by,"
                    " claimed_at) VALUES (:bucket, :acknowledged, :planned, :built_at,"
                    " :claimed_by, :claimed_at)"
                ),
                rows,
            )
        return self._slice(
            name, bucket, int(acknowledged.get(bucket, 0)), counts.get(bucket, zeros)
        )

    def release(self, claimed: Slice) -> None:
        """Mark this run's slice done; when it was the plan's last one to be sent, drop the
        plans of this count nothing needs any more, unless another run is claiming or
        building (the next one to do so drops them).

        Counted after the commit: of two runs ending at once, the later sees both done. The
        bucket's lock is given back by now, so a run of another count may be live: its
        plans are not this run's to drop."""
        now = self._now()
        with self.state.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"UPDATE {claimed.slices} SET done_at = :now"
                    " WHERE bucket = :b AND claimed_by = :by"
                ),
                {"now": now, "b": claimed.bucket, "by": self.run_id},
            )
        with self.state.engine.connect() as conn:
            # Slices still to be claimed (while young) or sent.
            pending = conn.execute(
                sa.text(
                    f"SELECT COUNT(*) FROM {claimed.slices} WHERE done_at IS NULL AND"
                    " ((claimed_by IS NULL AND built_at > :young) OR claimed_by <> :retired)"
                ),
                {"young": now - _reuse_micros(), "retired": RETIRED},
            ).scalar_one()
        if pending:
            return
        with (
            contextlib.suppress(LockedError),
            self.state.planning(self.model, self.count, self.run_id, wait=dt.timedelta(0)),
        ):
            self.survey(other_counts=False)

    # -- internals -----------------------------------------------------------------------
    def _names(self) -> list[str]:
        """The tables of the model's shared plans (of every count)."""
        return self.state.tables_starting(shared_root(self.model_prefix))

    def _read(self, names: Iterable[str]) -> dict[str, dict[int, _Row]]:
        """Each shared plan with its slices' rows, by the plan's name."""
        plans: dict[str, dict[int, _Row]] = {}
        with self.state.engine.connect() as conn:
            for name in names:
                if not name.endswith(SLICES_SUFFIX):
                    continue
                rows = conn.execute(
                    sa.text(
                        "SELECT bucket, acknowledged, planned, built_at, claimed_by, claimed_at,"
                        " done_at"
                        f" FROM {self._quoted(name)}"
                    )
                ).all()
                plans[name[: -len(SLICES_SUFFIX)]] = {r[0]: _Row(*r) for r in rows}
        return plans

    def _now(self) -> int:
        """Microseconds since the epoch on the state database's clock: every run compares
        its times with other runs' (hosts' clocks may disagree)."""
        with self.state.engine.connect() as conn:
            now = conn.execute(sa.text(f"SELECT {self.state.dialect.now_micros}")).scalar_one()
        return int(now)

    def _slice(self, name: str, bucket: int, acknowledged: int, planned: tuple[int, ...]) -> Slice:
        return Slice(
            self._quoted(name), self._quoted(name + SLICES_SUFFIX), bucket, acknowledged, planned
        )

    def _quoted(self, name: str) -> str:
        return self.state.qualified(name)


def retire_unclaimed(conn: sa.Connection, state: StateStore, model_prefix: str) -> None:
    """Retire every unclaimed slice of the shared plans of a model (its plan prefix), in
    ``conn``'s transaction: another model's run has written its snapshots (a suppression
    run forgets the people it suppresses), so no slice planned before may be sent."""
    for name in state.tables_starting(shared_root(model_prefix), conn):
        if name.endswith(SLICES_SUFFIX):
            _retire(conn, state, name)


def _retire(conn: sa.Connection, state: StateStore, slices: str) -> None:
    """Retire the unclaimed slices of the table of slices ``slices`` (unquoted)."""
    conn.execute(
        sa.text(
            f"UPDATE {state.qualified(slices)} SET claimed_by = :by,"
            f" claimed_at = {state.dialect.now_micros} WHERE claimed_by IS NULL"
        ),
        {"by": RETIRED},
    )


def shared_root(model_prefix: str) -> str:
    """The name prefix of a model's shared plans of every count."""
    return f"{model_prefix}n"


def _reuse_micros() -> int:
    """REUSE_SECONDS in the microseconds the times are kept in (read when asked: tests set
    it)."""
    return REUSE_SECONDS * 1_000_000


def _built_at(rows: Mapping[int, _Row]) -> int:
    return max((r.built_at for r in rows.values()), default=0)
