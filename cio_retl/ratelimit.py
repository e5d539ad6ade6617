"""The workspace rate limit: 1000 Track API requests per second, all senders together.

Customer.io's current Track API reference states 1000 requests per second for a workspace,
v1 and v2 together; older pages (and RudderStack) say 3000 per 3 seconds, which lets 3000
through inside one second. [open] The "Track API limits" section of the Track API OpenAPI
1.0.0 document speaks of a fair-use 100 requests per second and "no strictly enforced rate
limit"; the default follows the current reference page, and ``CIO_RETL_RATE_LIMIT=100/1``
sets the stricter reading. The limit counts requests as they arrive at the API, so every
budget here aims a little under it (HEADROOM) for the jitter between a grant and an arrival.

Two budgets keep a run under it. :class:`RateLimiter` is exact for the threads of one
process. :class:`SharedRateBudget` is for several processes or machines sending to one
workspace (bucketed runs on Dagster's executors): a row in the state store's PostgreSQL
database that every sender updates before each request, so no worker keeps its own count and
no new component is needed. :func:`budget_for` picks one from the settings.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from cio_retl.config import RATE_BUDGETS, RATE_SPEC
from cio_retl.errors import ConfigError
from cio_retl.state import StateStore, rate_budget

RATE_LIMIT_REQUESTS = 1000  # per RATE_LIMIT_WINDOW seconds, for the whole workspace
RATE_LIMIT_WINDOW = 1.0
SHARED_SHARE = 0.9  # of the limit a shared budget sustains; the rest is its burst
HEADROOM = 0.02  # of the limit kept free for jitter between a grant and the arrival
# A process's own limiter also spaces the grants a window apart plus this much: a request
# granted at the end of one window and delayed (threads, network) still arrives outside it.
ARRIVAL_MARGIN = 0.05


@dataclass(frozen=True, slots=True)
class RateSpec:
    """At most ``requests`` requests in any ``window`` seconds."""

    requests: int = RATE_LIMIT_REQUESTS
    window: float = RATE_LIMIT_WINDOW

    def __post_init__(self) -> None:
        if self.requests < 1 or self.window <= 0:
            raise ValueError(f"a rate limit needs requests >= 1 and window > 0, got {self}")

    @classmethod
    def parse(cls, text: str) -> RateSpec:
        """``"1000/1"``: 1000 requests per second."""
        match = RATE_SPEC.match(text)  # the form Settings.from_env checks
        if not match:
            raise ValueError(f"a rate limit is REQUESTS/SECONDS, e.g. 1000/1; got {text!r}")
        return cls(int(match.group(1)), float(match.group(2)))

    @property
    def label(self) -> str:
        return f"{self.requests}/{self.window:g}s"


class RateBudget(Protocol):
    """Blocks until one more request may go without exceeding the workspace's limit."""

    def acquire(self) -> None: ...


class RateLimiter:
    """At most ``requests`` per ``window`` seconds, over *every* window.

    A sliding log of the last ``requests`` send times: a request may go once the oldest of
    them is a full window old. A token bucket would allow its burst plus its refill inside
    one window (burst + rate x window), over the workspace limit. Shared by all threads of one
    process; memory is one float per allowed request.
    """

    def __init__(
        self,
        requests: int = RATE_LIMIT_REQUESTS,
        window: float = RATE_LIMIT_WINDOW,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        margin: float = 0.0,
    ) -> None:
        self.requests = requests
        self.window = window + margin
        self._sent: deque[float] = deque(maxlen=requests)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                if len(self._sent) < self.requests or now - self._sent[0] >= self.window:
                    self._sent.append(now)
                    return
                wait = self._sent[0] + self.window - now
            self._sleep(wait)


_LIMITERS: dict[tuple[str, str, RateSpec], RateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def workspace_limiter(base_url: str, site_id: str, spec: RateSpec | None = None) -> RateLimiter:
    """The one limiter of a workspace in this process: every client and thread shares it.

    The limit counts requests as they arrive, so it grants with a margin: HEADROOM fewer
    requests (980 of 1000; at least one) in every window ARRIVAL_MARGIN longer than the
    limit's (1.05 s), about 933 requests/s at the default. A request granted just before a
    window ends and delayed by up to that margin on its way still arrives in a window that
    holds fewer than the limit.
    """
    spec = spec or RateSpec()
    requests = max(1, int(spec.requests * (1 - HEADROOM) + 1e-9))
    with _LIMITERS_LOCK:
        return _LIMITERS.setdefault(
            (base_url, site_id, spec),
            RateLimiter(requests, spec.window, margin=ARRIVAL_MARGIN),
        )


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
        cls, spec: RateSpec, share: float = SHARED_SHARE, headroom: float = HEADROOM
    ) -> Gcra:
        """Fewer than ``(1 - headroom) x spec.requests`` grants in any window (so at most
        its floor, and never fewer than one), ``share`` of them as the sustained pace and the
        rest as a burst.

        In a span ``d < window`` the rule grants ``n`` with ``(n - 1) x interval <= d +
        tolerance``, so ``n < 1 + (window + tolerance) / interval = burst + rate x window``;
        which is the target as long as the burst is at least the one request every grant is.
        A limit too small to split (a target of one request or less) becomes one request per
        window."""
        if not (0 < share < 1 and 0 <= headroom < 1):
            raise ValueError(f"share and headroom must be fractions, got {share}, {headroom}")
        target = spec.requests * (1 - headroom)
        burst = max(target * (1 - share), 1.0)
        if target - burst <= 0:
            return cls(spec.window, 0.0)
        interval = spec.window / (target - burst)
        return cls(interval, (burst - 1) * interval)

    def grant(self, tat: float, now: float) -> float | None:
        """The new ``tat`` if a request may go at ``now``, else None."""
        if tat > now + self.tolerance:
            return None
        return max(tat, now) + self.interval


class SharedRateBudget:
    """One workspace budget in PostgreSQL, shared by every process that sends to it.

    The generic cell rate algorithm (a token bucket kept as one timestamp): the row holds the
    "theoretical arrival time" ``tat``; a request may go when ``tat <= now + tolerance`` and
    then moves ``tat`` on by one interval. Each grant is one UPDATE of one row, atomic under
    the row lock, on the database's clock, so workers on machines with skewed clocks agree.

    In any ``window`` at most ``burst + rate x window`` requests are granted. The budget
    aims at 98% of the limit (980 per second) and the rest is headroom: a request granted at
    the end of one window may arrive in the next one (network and thread jitter). Of those
    980, 90% is the sustained pace (882 requests/s) and 10% the burst that may go at once
    after a pause. The price is one round trip to the database per request
    (each request carries up to 1000 items).
    """

    # One statement, one round trip, in autocommit: the UPDATE grants or not, and the SELECT
    # (which sees the row as it was before the UPDATE) says how long until the next grant.
    SQL_GRANT = """
        WITH granted AS (
            UPDATE {table}
            SET tat = GREATEST(tat, clock_timestamp()) + make_interval(secs => :interval)
            WHERE workspace = :workspace
              AND tat <= clock_timestamp() + make_interval(secs => :tolerance)
            RETURNING 1
        )
        SELECT EXISTS (SELECT 1 FROM granted),
               EXTRACT(EPOCH FROM (tat - clock_timestamp())) - :tolerance
        FROM {table} WHERE workspace = :workspace
    """
    SQL_CREATE = """
        INSERT INTO {table} (workspace, tat) VALUES (:workspace, clock_timestamp())
        ON CONFLICT (workspace) DO NOTHING
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
        if state.engine.dialect.name != "postgresql":
            raise ConfigError(
                "a shared rate budget needs a PostgreSQL state store (CIO_RETL_STATE_URL); "
                f"this one is {state.engine.dialect.name}"
            )
        self.spec = spec or RateSpec()
        self.gcra = Gcra.for_limit(self.spec, share, headroom)
        self.workspace = workspace
        self._engine = state.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._sleep = sleep
        table = state.table(rate_budget)
        self._grant = sa.text(self.SQL_GRANT.format(table=table))
        self._params = {
            "workspace": workspace,
            "interval": self.gcra.interval,
            "tolerance": self.gcra.tolerance,
        }
        with state.engine.begin() as conn:
            conn.execute(sa.text(self.SQL_CREATE.format(table=table)), {"workspace": workspace})

    def acquire(self) -> None:
        while True:
            with self._engine.connect() as conn:
                granted, wait = conn.execute(self._grant, self._params).one()
            if granted:
                return
            # Sleep until the next grant is due; another worker may take it first, then the
            # next UPDATE fails and this one waits again.
            self._sleep(min(max(float(wait), 0.0005), self.spec.window))


BUDGETS = RATE_BUDGETS


def budget_for(
    kind: str, spec: RateSpec, base_url: str, site_id: str, state: StateStore
) -> RateBudget:
    """``local``: this process's exact limiter. ``shared``: the state store's row, for runs
    in several processes. ``auto``: shared when the state store is PostgreSQL (a server other
    workers can reach), local otherwise (DuckDB is one process's file; a Snowflake round
    trip per request would cost more than the request)."""
    if kind not in BUDGETS:
        raise ConfigError(f"CIO_RETL_RATE_BUDGET must be one of {', '.join(BUDGETS)}, not {kind!r}")
    shared = kind == "shared" or (kind == "auto" and state.engine.dialect.name == "postgresql")
    if shared:
        return SharedRateBudget(state, workspace_key(base_url, site_id), spec)
    return workspace_limiter(base_url, site_id, spec)
