"""The workspaces a state store has synced to, and the takeover of rows from before state
was kept per workspace."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cio_retl.errors import ConfigError
from cio_retl.state.schema import (
    LEGACY_WORKSPACE,
    StoreBase,
    Workspace,
    rejections,
    runs,
    sent_events,
    snapshots,
    utcnow,
    workspaces,
)


@dataclass(frozen=True, slots=True)
class Adoption:
    """Rows from before workspaces that a workspace took over, at its first sync after the
    upgrade."""

    site_id: str
    run_id: str
    snapshots: int
    rejections: int
    events: int = 0

    def __str__(self) -> str:
        return (
            f"state from before workspaces ({self.snapshots:,} snapshot rows, "
            f"{self.rejections:,} rejections, {self.events:,} sent events) now belongs to "
            f"workspace {self.site_id}"
        )


class Workspaces(StoreBase):
    # -- workspaces ------------------------------------------------------------------------
    def known_workspaces(self) -> dict[str, sa.Row[Any]]:
        """Every workspace synced to from this store, by Site ID (LEGACY_WORKSPACE included
        while rows from before workspaces wait to be taken over)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(workspaces).order_by(workspaces.c.site_id))
            return {row.site_id: row for row in rows}

    def plan_workspace(self, named: str | None) -> Workspace:
        """The workspace a plan without credentials diffs against: the one ``named`` (the
        CIO_SITE_ID), else the only one there is; an empty store gives an empty snapshot.

        Rows from before workspaces, while no sync with credentials has taken them over, are
        the snapshot of whichever workspace the plan is for: the next such sync takes them
        over, so the plan shows what it would send.
        """
        if self.is_absent:
            return Workspace(named)  # nothing synced yet: an empty snapshot
        if self.upgrade_pending:  # every row is from before workspaces (for_reading)
            return Workspace(LEGACY_WORKSPACE if named is None else named, reads=LEGACY_WORKSPACE)
        known = self.known_workspaces()
        if LEGACY_WORKSPACE in known:
            return Workspace(LEGACY_WORKSPACE if named is None else named, reads=LEGACY_WORKSPACE)
        if named is None:
            if not known:
                return Workspace(None)
            if len(known) > 1:
                raise ConfigError(
                    f"the state store holds {len(known)} workspaces ({', '.join(known)}): set "
                    "CIO_SITE_ID to the Site ID to plan against"
                )
            (named,) = known
        row = known.get(named)
        return Workspace(
            named,
            None if row is None else row.environment_id,
            None if row is None else row.region,
        )

    def enter_workspace(self, workspace: Workspace, run_id: str) -> Adoption | None:
        """Record a sync with credentials to ``workspace`` (what the region check reported)
        and, the first time after an upgrade, hand it every row from before workspaces.

        The takeover is one transaction, recorded once in the workspace's row (adopted_*),
        and returned so the run can say so. It rewrites the ``workspace`` of every such row
        once (on 2M snapshot rows, an UPDATE of one column). Runs starting at once (buckets,
        Dagster steps) may collide on the workspace's row: Postgres reports a duplicate
        insert, DuckDB a write-write conflict; the transaction then runs again, and finds
        the row (and any takeover) there.
        """
        for attempt in range(8):
            try:
                return self._enter_workspace(workspace, run_id)
            except (sa.exc.OperationalError, sa.exc.IntegrityError):
                if attempt == 7:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def _enter_workspace(self, workspace: Workspace, run_id: str) -> Adoption | None:
        site = workspace.site_id
        if not site:
            raise ValueError("a sync with credentials names its Site ID")
        now = utcnow()
        values = {
            "site": site,
            "environment_id": workspace.environment_id,
            "region": workspace.region,
            "now": now,
        }
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(workspaces)
                .where(workspaces.c.site_id == site)
                .values(
                    environment_id=workspace.environment_id,
                    region=workspace.region,
                    last_synced_at=now,
                )
            )
            conn.execute(
                sa.text(
                    self.dialect.insert_absent(
                        self.table(workspaces),
                        ("site_id",),
                        (
                            "site_id",
                            "environment_id",
                            "region",
                            "first_synced_at",
                            "last_synced_at",
                        ),
                        "SELECT CAST(:site AS VARCHAR) AS site_id,"
                        " CAST(:environment_id AS BIGINT) AS environment_id,"
                        " CAST(:region AS VARCHAR) AS region, :now AS first_synced_at,"
                        " :now AS last_synced_at",
                    )
                ),
                values,
            )
            # Deleting the marker first: of two runs starting at once, one takes the rows.
            taken = conn.execute(
                sa.delete(workspaces).where(workspaces.c.site_id == LEGACY_WORKSPACE)
            ).rowcount
            if not taken:
                return None
            moved = {}
            for table in (snapshots, rejections, sent_events, runs):
                extra = (
                    {"environment_id": workspace.environment_id, "region": workspace.region}
                    if table is runs
                    else {}
                )
                moved[table.name] = conn.execute(
                    sa.update(table)
                    .where(table.c.workspace == LEGACY_WORKSPACE)
                    .values(workspace=site, **extra)
                ).rowcount
            adoption = Adoption(
                site, run_id, moved["snapshots"], moved["rejections"], moved["sent_events"]
            )
            conn.execute(
                sa.update(workspaces)
                .where(workspaces.c.site_id == site)
                .values(
                    adopted_run_id=run_id,
                    adopted_at=now,
                    adopted_snapshots=adoption.snapshots,
                    adopted_rejections=adoption.rejections,
                    adopted_events=adoption.events,
                )
            )
        return adoption
