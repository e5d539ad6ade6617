"""The rate budget shared by every process that sends to one workspace, kept in the state store.

Bucketed runs on Dagster's executors send from several processes or machines to one
workspace; a row in the state store's PostgreSQL database that every sender updates before
each request keeps them under the workspace's limit together, so no worker keeps its own count
and no new component is needed. It lives with the state store, not with the HTTP client, so
the client loads no database code: it only knows :class:`cio_retl.ratelimit.RateBudget`.
:func:`budget_for` picks this budget or the process's own limiter from the settings.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from cio_retl.config import RATE_BUDGETS
from cio_retl.errors import ConfigError
from cio_retl.ratelimit import ARRIVAL_MARGIN, HEADROOM, RateBudget, RateSpec, workspace_limiter
from cio_retl.state import StateStore
from cio_retl.state.schema import rate_budget

SHARED_SHARE = 0.9  # of the limit a shared budget sustains; the rest is its burst


def workspace_key(base_url: str, site_id: str) -> str:
    """Names a workspace in the state store without storing its site id (half a credential)."""
    return hashlib.sha256(f"{base_url}\n{site_id}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Gcra:
    """The generic cell rate algorithm's two numbers, and its rule (which the SQL of
    :class:`SharedRateBudget` applies in the database): a request may go when the
    theoretical arrival time ``tat`` is at most ``now + tolerance``; it moves ``tat`` on by
    ``interval``. That grants ``1 + tolerance / interval`` requests at once, then one per
    ``interval``."""

    interval: float
    tolerance: float

    @classmethod
    def for_limit(
        cls,
        spec: RateSpec,
        share: float = SHARED_SHARE,
        headroom: float = HEADROOM,
        margin: float = ARRIVAL_MARGIN,
    ) -> Gcra:
        """Fewer than ``(1 - headroom) x spec.requests`` grants in any span of ``window +
        margin`` seconds (so at most its floor, and never fewer than one), ``share`` of them
        as the sustained pace and the rest as a burst.

        The limit counts arrivals, not grants: with each request arriving up to ``margin``
        after its grant (or as much earlier than another's), the arrivals within one window
        come from grants within ``window + margin``, so that longer span is what must stay
        under the limit. A burst counted over the window alone would not: greedy senders take
        ``burst + rate x window`` grants in one window and ``rate x margin`` more in the
        margin after it, e.g. 980 + 44 = 1024 arrivals at 1000/1 with 50 ms of jitter.

        In a span ``d < window + margin`` the rule grants ``n`` with ``(n - 1) x interval <=
        d + tolerance``, so ``n < 1 + (window + margin + tolerance) / interval = burst + rate
        x (window + margin)``; which is the target as long as the burst is at least the one
        request every grant is. A limit too small to split (a target of one request or less)
        becomes one request per ``window + margin``."""
        if not (0 < share < 1 and 0 <= headroom < 1 and margin >= 0):
            raise ValueError(
                f"share and headroom must be fractions and margin >= 0, got {share}, {headroom},"
                f" {margin}"
            )
        span = spec.window + margin
        target = spec.requests * (1 - headroom)
        burst = max(target * (1 - share), 1.0)
        if target - burst <= 0:
            return cls(span, 0.0)
        interval = span / (target - burst)
        return cls(interval, (burst - 1) * interval)

    def grant(self, tat: float, now: float) -> float | None:
        """The new ``tat`` if a request may go at ``now``, else None."""
        if tat > now + self.tolerance:
            return None
        return max(tat, now) + self.interval


class SharedRateBudget:
    """One workspace budget in PostgreSQL (its statements: Dialect.rate_budget_sql), shared by
    every process that sends to it.

    The generic cell rate algorithm (a token bucket kept as one timestamp): the row holds the
    "theoretical arrival time" ``tat``; a request may go when ``tat <= now + tolerance`` and
    then moves ``tat`` on by one interval. Each grant is one UPDATE of one row, atomic under
    the row lock, on the database's clock, so workers on machines with skewed clocks agree.

    In any ``window + ARRIVAL_MARGIN`` fewer than ``burst + rate x (window + margin)``
    requests are granted (see :meth:`Gcra.for_limit`), like the process's own limiter: 98% of
    the limit (980) in any 1.05 s at the default, the rest headroom, so a request granted at
    the end of one window and delayed by up to 50 ms (network and thread jitter) still arrives
    in a window under the limit. Of those 980, 90% is the sustained pace (840 requests/s)
    and 10% the burst that may go at once after a pause. The price is one round trip to the
    database per request (each request carries up to 1000 items).
    """

    def __init__(
        self,
        state: StateStore,
        workspace: str,
        spec: RateSpec | None = None,
        *,
        share: float = SHARED_SHARE,
        headroom: float = HEADROOM,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        statements = state.dialect.rate_budget_sql(state.table(rate_budget))
        if statements is None:
            raise ConfigError(
                "a shared rate budget needs a PostgreSQL state store (CIO_RETL_STATE_URL); "
                f"this one is {state.dialect.name}"
            )
        grant, create = statements
        self.spec = spec or RateSpec()
        self.gcra = Gcra.for_limit(self.spec, share, headroom)
        self.workspace = workspace
        self._engine = state.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._sleep = sleep
        self._grant = sa.text(grant)
        self._params = {
            "workspace": workspace,
            "interval": self.gcra.interval,
            "tolerance": self.gcra.tolerance,
        }
        with state.engine.begin() as conn:
            conn.execute(sa.text(create), {"workspace": workspace})

    def acquire(self) -> None:
        while True:
            with self._engine.connect() as conn:
                granted, wait = conn.execute(self._grant, self._params).one()
            if granted:
                return
            # Sleep until the next grant is due; another worker may take it first, then the
            # next UPDATE fails and this one waits again.
            self._sleep(min(max(float(wait), 0.0005), self.spec.window))


def budget_for(
    kind: str, spec: RateSpec, base_url: str, site_id: str, state: StateStore
) -> RateBudget:
    """``local``: this process's exact limiter. ``shared``: the state store's row, for runs
    in several processes. ``auto``: shared when the state store is PostgreSQL (a server other
    workers can reach), local otherwise (DuckDB is one process's file; a Snowflake round
    trip per request would cost more than the request)."""
    if kind not in RATE_BUDGETS:
        raise ConfigError(
            f"CIO_RETL_RATE_BUDGET must be one of {', '.join(RATE_BUDGETS)}, not {kind!r}"
        )
    shared = kind == "shared" or (
        kind == "auto" and state.dialect.rate_budget_sql(state.table(rate_budget)) is not None
    )
    if shared:
        return SharedRateBudget(state, workspace_key(base_url, site_id), spec)
    return workspace_limiter(base_url, site_id, spec)
