"""The state store: snapshots of what Customer.io acknowledged, runs, rejections and locks.

A snapshot row changes only after Customer.io acknowledged the item built from it, so a run
that dies anywhere loses nothing: the next diff sees the row as still different and resends
it. Writes are set-based (a batch becomes one relation, see :mod:`cio_retl.dialects`), never
row by row. The tables live in one schema (``cio_retl`` unless configured), so deployments
or parallel test runs can share a database without sharing state.

State belongs to a destination workspace, keyed by its Site ID: snapshots, rejections and
sent events carry it, runs record it, and a store bound to one workspace (StateStore.bound)
reads and writes only its rows. Another workspace starts from an empty snapshot.

Each concern is a module here: :mod:`~cio_retl.state.schema` (the tables, their creation and
upgrades), :mod:`~cio_retl.state.acknowledged` (snapshots, sent events, staged keys),
:mod:`~cio_retl.state.history` (runs and rejections), :mod:`~cio_retl.state.destinations`
(workspaces), :mod:`~cio_retl.state.locking` and :mod:`~cio_retl.state.budget` (the shared
rate budget); none is named after a table, which this package exports under its own name.
:class:`StateStore` composes the first five; callers import what they need from here.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cio_retl.config import STATE_SCHEMA
from cio_retl.state.acknowledged import SnapshotRow, Snapshots
from cio_retl.state.destinations import Adoption, Workspaces
from cio_retl.state.history import RejectionRow, Runs
from cio_retl.state.locking import Locks
from cio_retl.state.schema import (
    LEGACY_WORKSPACE,
    Schema,
    Workspace,
    acknowledged_ranges,
    empty_relation,
    locks,
    metadata,
    rate_budget,
    rejections,
    run_rejections,
    runs,
    sent_events,
    snapshots,
    staged_keys,
    workspaces,
)

__all__ = [
    "LEGACY_WORKSPACE",
    "Adoption",
    "RejectionRow",
    "SnapshotRow",
    "StateStore",
    "Workspace",
    "acknowledged_ranges",
    "locks",
    "metadata",
    "rate_budget",
    "rejections",
    "run_rejections",
    "runs",
    "sent_events",
    "snapshots",
    "staged_keys",
    "workspaces",
]


class StateStore(Schema, Snapshots, Runs, Workspaces, Locks):
    """The state tables in ``schema`` of the database behind ``engine``.

    Snapshots and rejections belong to a workspace: a store bound to one (:meth:`bound`)
    reads and writes only that workspace's rows. An unbound store serves what spans them
    (``status``, the choice of workspace for a plan, tests' inspections).
    """

    def bound(self, workspace: Workspace) -> StateStore:
        """This store, reading and writing only ``workspace``'s rows."""
        store = StateStore(self._engine, self.schema, workspace)
        store.is_absent, store.upgrade_pending = self.is_absent, self.upgrade_pending
        store.snapshots, store.sent_events = self.snapshots, self.sent_events
        return store

    @classmethod
    def absent(cls, engine: Engine, schema: str = STATE_SCHEMA) -> StateStore:
        """Stands in for state tables that do not exist yet, so a dry run or ``plan`` before
        the first sync creates nothing: the tables the diff reads (snapshots, sent events)
        are empty relations rendered in ``engine``'s SQL (the warehouse's, as the diff joins
        them there), every column typed."""
        store = cls(engine, schema)
        store.is_absent = True
        store.snapshots = empty_relation(snapshots, engine)
        store.sent_events = empty_relation(sent_events, engine)
        return store

    @classmethod
    def for_reading(cls, engine: Engine, schema: str = STATE_SCHEMA) -> StateStore:
        """The state as a dry run or ``plan`` reads it, creating and upgrading nothing.

        A table the diff reads that is not there reads as empty; one an older cio-retl wrote
        reads as the upgrade would leave it (each missing column NULL, ``workspace`` the
        LEGACY_WORKSPACE of rows from before workspaces), and the plan diffs against those
        rows, as :meth:`plan_workspace` does after an upgrade. The next real sync upgrades
        the tables themselves (:meth:`ensure_schema`).
        """
        store = cls(engine, schema)
        with store.engine.connect() as conn:
            inspector = sa.inspect(conn)
            store.upgrade_pending = not inspector.has_table(workspaces.name, schema=schema)
            for table in (snapshots, sent_events):
                if not inspector.has_table(table.name, schema=schema):
                    relation = empty_relation(table, engine)
                else:
                    present = store._columns(conn, table)
                    if all(c.name in present for c in table.columns):
                        continue
                    relation = store._upgraded_relation(table, present)
                setattr(store, "snapshots" if table is snapshots else "sent_events", relation)
        return store
