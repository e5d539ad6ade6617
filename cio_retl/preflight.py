"""Checks before a run sends anything: the rate limit, the models' columns, the workspace's
region, and a likely twin of the workspace."""

from __future__ import annotations

from collections.abc import Sequence

from cio_retl.client import AccountRegion
from cio_retl.config import Settings
from cio_retl.errors import ConfigError, ModelError
from cio_retl.limits import column_name_problem
from cio_retl.models import Model
from cio_retl.ratelimit import RateSpec
from cio_retl.state import LEGACY_WORKSPACE, StateStore, Workspace
from cio_retl.warehouse import Warehouse


def rate_spec(settings: Settings) -> RateSpec:
    try:
        return RateSpec.parse(settings.rate_limit)
    except ValueError as exc:
        raise ConfigError(f"CIO_RETL_RATE_LIMIT: {exc}") from None


def check_columns(warehouse: Warehouse, models: Sequence[Model]) -> None:
    """Every model error surfaces before anything is sent."""
    for model in dict.fromkeys(models):
        problem = column_name_problem(warehouse.columns(model))
        if problem:
            raise ModelError(str(model.path), problem, model.sql_line)


def check_region(settings: Settings, account: AccountRegion) -> None:
    """Stop before sending when the workspace lives in another region than CIO_REGION.

    Holds with CIO_TRACK_API_URL set too: the URL changes the host, not the region. An
    answer without a region (the schema marks it optional) is not checked.
    """
    if account.region is not None and account.region != settings.region:
        raise ConfigError(
            f"the workspace of CIO_SITE_ID {settings.site_id} is in region {account.region!r}, "
            f"but CIO_REGION is {settings.region!r}: set CIO_REGION={account.region} "
            "(CIO_TRACK_API_URL, when set, changes the host, not the region); nothing was sent"
        )


def same_environment_notice(state: StateStore, workspace: Workspace) -> list[str]:
    """A first sync to a Site ID whose reported environment_id another Site ID reported
    before: likely the same workspace under other credentials. State is kept per Site ID,
    so this sync starts from an empty snapshot and sends everything; say so."""
    if workspace.environment_id is None:
        return []
    known = state.known_workspaces()
    if workspace.site_id in known:
        return []
    twins = [
        site
        for site, row in known.items()
        if site != LEGACY_WORKSPACE and row.environment_id == workspace.environment_id
    ]
    if not twins:
        return []
    return [
        f"Site ID {workspace.site_id} reports environment_id {workspace.environment_id}, as "
        f"{', '.join(twins)} did: state is kept per Site ID, so this first sync to "
        f"{workspace.site_id} starts from an empty snapshot and sends every row"
    ]
