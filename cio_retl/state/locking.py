"""One run per model (or per bucket of a model) at a time: a row in the locks table.

Locks are per model, not per workspace (see the locks table). A lock whose run is provably
gone (its process no longer exists on this host, or silent for STALE_LOCK_AFTER) is taken
over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import sqlalchemy as sa

from cio_retl.buckets import Bucket
from cio_retl.errors import LockedError
from cio_retl.state.schema import StoreBase, locks, utcnow

STALE_LOCK_AFTER = dt.timedelta(minutes=30)
# How long a bucket run waits for another's claim or build of a shared plan, whose holder
# keeps its lock fresh meanwhile (a large model's plan takes minutes): past it the run
# stops as locked. A holder that died is taken over sooner (see _is_abandoned).
PLANNING_WAIT = dt.timedelta(hours=1)
# How often a holder of the planning lock refreshes it, and every other lock of its run
# (one statement building a plan holds the run's thread for minutes).
PLANNING_HEARTBEAT = dt.timedelta(seconds=30)


class Locks(StoreBase):
    # -- locks -----------------------------------------------------------------------------
    def acquire_lock(self, model: str, run_id: str, bucket: Bucket | None = None) -> None:
        """One run per model, or per bucket of a model: a row in ``locks``.

        A run of a whole model and runs of its buckets exclude each other, as do runs with
        another bucket count (their buckets overlap); runs of different buckets of one count
        run side by side. After taking its own row a run looks for such a conflicting row
        and, if one is there, gives its own back: two runs that start at once may both give
        up, but never both send.

        A lock is taken over when its run is provably gone: its process no longer exists on
        this host, or it has not refreshed its heartbeat for STALE_LOCK_AFTER (another host).
        """
        name = lock_name(model, bucket)
        self._take_lock(name, run_id)
        conflict = next(
            (held for held in self._live_locks(model) if _conflicts(held.model, name, model)),
            None,
        )
        if conflict is not None:
            self.release_lock(model, run_id, bucket)
            self._refuse(name, conflict)

    def _take_lock(self, name: str, run_id: str) -> None:
        now = utcnow()
        with self.engine.begin() as conn:
            held = conn.execute(sa.select(locks).where(locks.c.model == name)).first()
            if held is not None and _is_abandoned(held, now):
                conn.execute(
                    sa.delete(locks).where(locks.c.model == name, locks.c.run_id == held.run_id)
                )
                held = None
        if held is None:
            # Insert only if absent, then read back who holds it: a concurrent run may win.
            # (Snowflake does not enforce primary keys; its form is a MERGE, which locks.)
            insert = self.dialect.insert_absent(
                self.table(locks),
                ("model",),
                ("model", "run_id", "owner", "acquired_at", "heartbeat_at"),
                "SELECT CAST(:model AS VARCHAR) AS model, CAST(:run_id AS VARCHAR) AS run_id,"
                " CAST(:owner AS VARCHAR) AS owner, :now AS acquired_at, :now AS heartbeat_at",
            )
            params = {"model": name, "run_id": run_id, "owner": _lock_owner(), "now": now}
            # DuckDB reports a concurrent insert of the same key as a write-write conflict
            # (OperationalError), Postgres as a unique violation: either way, read back.
            with (
                contextlib.suppress(sa.exc.IntegrityError, sa.exc.OperationalError),
                self.engine.begin() as conn,
            ):
                conn.execute(sa.text(insert), params)
            with self.engine.connect() as conn:
                held = conn.execute(sa.select(locks).where(locks.c.model == name)).first()
            if held is not None and held.run_id == run_id:
                return
        self._refuse(name, held)

    def _live_locks(self, model: str) -> list[sa.Row[Any]]:
        """The lock rows of ``model`` and of its buckets, abandoned ones cleared away."""
        now = utcnow()
        query = sa.select(locks).where(
            sa.or_(
                locks.c.model == model,
                locks.c.model.startswith(model + BUCKET_SEPARATOR, autoescape=True),
            )
        )
        live = []
        with self.engine.begin() as conn:
            for held in conn.execute(query).all():
                if _is_abandoned(held, now):
                    conn.execute(
                        sa.delete(locks).where(
                            locks.c.model == held.model, locks.c.run_id == held.run_id
                        )
                    )
                else:
                    live.append(held)
        return live

    def _refuse(self, name: str, held: sa.Row[Any] | None) -> NoReturn:
        since = f" since {held.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if held else ""
        owner = f" (run {held.run_id} on {held.owner}{since})" if held else ""
        what = f"model {name!r}"
        if held is not None and held.model != name:
            what += f" overlaps {held.model!r}, which"
        minutes = int(STALE_LOCK_AFTER.total_seconds() // 60)
        raise LockedError(
            f"{what} is being synced by another run{owner}; try again when it ends. "
            f"A lock whose process is gone, or silent for {minutes} min, is taken over."
        )

    @contextlib.contextmanager
    def planning(
        self, model: str, count: int, run_id: str, *, wait: dt.timedelta = PLANNING_WAIT
    ) -> Iterator[None]:
        """Hold the lock under which the bucket runs of one count claim slices of a shared
        plan of ``model`` and build one (:mod:`cio_retl.plan_slices`), waiting while another
        run holds it: one claims or builds at a time, so no slice is claimed from a plan
        being built, and a run that waited finds the plan the other one built.

        Its name (``people#plan/16``) has the count of the buckets it serves, so it
        overlaps what they overlap: the whole model and other counts.
        """
        name = f"{model}{BUCKET_SEPARATOR}plan/{int(count)}"
        deadline = time.monotonic() + wait.total_seconds()
        while True:
            try:
                self._take_lock(name, run_id)
                break
            except LockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        stop = threading.Event()
        beats = threading.Thread(
            target=self._beat, args=(run_id, stop), name="cio-planning", daemon=True
        )
        beats.start()
        try:
            yield
        finally:
            stop.set()
            beats.join()
            with self.engine.begin() as conn:
                conn.execute(
                    sa.delete(locks).where(locks.c.model == name, locks.c.run_id == run_id)
                )

    def _beat(self, run_id: str, stop: threading.Event) -> None:
        """Refresh every lock of ``run_id`` until ``stop``: the build of a plan is one long
        statement, and a lock silent for STALE_LOCK_AFTER is taken over."""
        while not stop.wait(PLANNING_HEARTBEAT.total_seconds()):
            with contextlib.suppress(sa.exc.SQLAlchemyError), self.engine.begin() as conn:
                conn.execute(
                    sa.update(locks).where(locks.c.run_id == run_id).values(heartbeat_at=utcnow())
                )

    def live_runs(self, model: str) -> set[str]:
        """The runs holding a lock of ``model`` or of one of its buckets now."""
        return {held.run_id for held in self._live_locks(model)}

    def heartbeat(self, models: Sequence[str], run_id: str, bucket: Bucket | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(locks)
                .where(
                    locks.c.model.in_([lock_name(m, bucket) for m in models]),
                    locks.c.run_id == run_id,
                )
                .values(heartbeat_at=utcnow())
            )

    def release_lock(self, model: str, run_id: str, bucket: Bucket | None = None) -> None:
        name = lock_name(model, bucket)
        with self.engine.begin() as conn:
            conn.execute(sa.delete(locks).where(locks.c.model == name, locks.c.run_id == run_id))


BUCKET_SEPARATOR = "#"


def lock_name(model: str, bucket: Bucket | None) -> str:
    """``people`` for a run of the whole model, ``people#3/16`` for one of its buckets."""
    return model if bucket is None else f"{model}{BUCKET_SEPARATOR}{bucket.label}"


def _conflicts(held: str, mine: str, model: str) -> bool:
    """Whether a run holding ``held`` and one holding ``mine`` may both send ``model``."""
    if held == mine:
        return False  # our own row (another run's row of this name cannot coexist with it)
    if held == model or mine == model:
        return True  # the whole model overlaps every bucket of it
    held_count = held.rpartition("/")[2]
    mine_count = mine.rpartition("/")[2]
    return held_count != mine_count  # different bucket counts: their buckets overlap


def _is_abandoned(held: sa.Row[Any], now: dt.datetime) -> bool:
    return _owner_is_dead(held.owner) or _aware(held.heartbeat_at) < now - STALE_LOCK_AFTER


def _lock_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"  # read per call: forks change the pid


def _owner_is_dead(owner: str) -> bool:
    """True only when the owner ran on this host and its process is gone."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # this process: another run of ours, alive by definition
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
