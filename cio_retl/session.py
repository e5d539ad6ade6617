"""Opening a run: the engines, the state store, the Track API client and the diff it uses.

Everything a run checks before it reads a changed row happens here, in this order: the
DuckDB file exists, the databases answer, every model's columns are valid, the credentials
and the region are Customer.io's, and the state schema is current. A check that fails stops
the run before anything is sent. What is opened is closed when the run ends, whatever
happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from cio_retl.client import AccountRegion, TrackClient
from cio_retl.config import Settings
from cio_retl.diff import Differ, differ_for
from cio_retl.models import Model
from cio_retl.options import SyncOptions
from cio_retl.plan import PlanDiff, plans_supported
from cio_retl.preflight import check_columns, check_region, rate_spec, same_environment_notice
from cio_retl.report import new_run_id
from cio_retl.state import Adoption, StateStore, Workspace, snapshots
from cio_retl.state.budget import budget_for
from cio_retl.warehouse import (
    Warehouse,
    check_reachable,
    create_engine,
    database_lost,
    duckdb_file_exists,
    require_duckdb_file,
)


@dataclass(frozen=True, slots=True)
class Session:
    """What one run works with, opened and checked."""

    warehouse: Warehouse
    state: StateStore  # bound to the run's workspace
    client: TrackClient | None  # None for a dry run
    differ: Differ
    run_id: str
    adoption: Adoption | None  # rows from before workspaces this run took over
    notices: Sequence[str]


@contextlib.contextmanager
def open_session(
    settings: Settings,
    models: Sequence[Model],
    suppressions: Sequence[Model],
    options: SyncOptions,
) -> Iterator[Session]:
    """Open and check what a run of ``models`` needs; close it all when the block ends."""
    rate = rate_spec(settings)
    # A dry run reads and writes nothing but the warehouse: no DuckDB file, schema, table,
    # run row or migration is created (the first real send creates the state).
    read_only = options.dry_run
    require_duckdb_file(settings.warehouse_url, "CIO_RETL_WAREHOUSE_URL")
    state_missing = read_only and not duckdb_file_exists(settings.state_url)
    engine = create_engine(settings.warehouse_url, "CIO_RETL_WAREHOUSE_URL")
    # The same database: the diff runs there as SQL. Another one: the cross-database diff.
    state_engine = (
        engine
        if settings.state_is_warehouse
        else create_engine(settings.state_url, "CIO_RETL_STATE_URL")
    )
    same_database = settings.state_is_warehouse
    differ: Differ | None = None
    client: TrackClient | None = None
    try:
        warehouse = Warehouse(engine)
        state = StateStore(state_engine, settings.state_schema)
        for db in {engine} if state_missing else {engine, state_engine}:
            check_reachable(db)
        if read_only and (state_missing or not state.exists((snapshots,))):
            # Nothing synced yet: diff against an empty snapshot, in the warehouse.
            state, same_database = StateStore.absent(engine, settings.state_schema), True
        elif read_only:
            state = StateStore.for_reading(state_engine, settings.state_schema)
        check_columns(warehouse, [*models, *suppressions])
        site_id: str | None = None
        if not options.dry_run:
            site_id, api_key = settings.require_credentials()
            client = TrackClient(settings.track_api_url, site_id, api_key, retry=options.retry)
        run_id = new_run_id(options.bucket)
        account: AccountRegion | None = None
        if client is not None:
            account = AccountRegion.read(client.check_credentials())
            check_region(settings, account)
        if not read_only:
            state.ensure_schema()
        adoption: Adoption | None = None
        notices: list[str] = []
        if client is not None and account is not None and site_id is not None:
            client.limiter = budget_for(
                settings.rate_budget, rate, settings.track_api_url, site_id, state
            )
            workspace = Workspace(site_id, account.environment_id, account.region)
            notices = same_environment_notice(state, workspace)
            adoption = state.enter_workspace(workspace, run_id)
        else:
            workspace = state.plan_workspace(settings.site_id)
        state = state.bound(workspace)
        if same_database and not read_only and plans_supported(warehouse):
            differ = PlanDiff(
                warehouse,
                state,
                options.bucket,
                suppressions,
                full_resync=options.full_resync,
                run_id=run_id,
            )
        else:
            differ = differ_for(
                warehouse,
                state,
                same_database=same_database,
                bucket=options.bucket,
                suppressions=suppressions,
                read_only=read_only,
            )
        yield Session(warehouse, state, client, differ, run_id, adoption, notices)
    except sa.exc.DBAPIError as exc:  # a database that failed after it answered the first time
        lost = database_lost(exc, (engine, state_engine))
        if lost is None:
            raise
        raise lost from exc
    finally:
        if client is not None:
            client.close()
        if differ is not None:
            with contextlib.suppress(Exception):  # never hide the run's own error
                differ.close()
        engine.dispose()
        state_engine.dispose()
