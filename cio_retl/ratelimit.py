"""The workspace rate limit: 1000 Track API requests per second, all senders together.

Customer.io's current Track API reference states 1000 requests per second for a workspace,
v1 and v2 together; older pages (and RudderStack) say 3000 per 3 seconds, which lets 3000
through inside one second. [open] The "Track API limits" section of the Track API OpenAPI
1.0.0 document speaks of a fair-use 100 requests per second and "no strictly enforced rate
limit"; the default follows the current reference page, and ``CIO_RETL_RATE_LIMIT=100/1``
sets the stricter reading. The limit counts requests as they arrive at the API, so every
budget here aims a little under it (HEADROOM) for the jitter between a grant and an arrival.

Two budgets keep a run under it. :class:`RateLimiter` is exact for the threads of one
process. For several processes or machines sending to one workspace (bucketed runs on
Dagster's executors) the state store keeps a shared budget (:mod:`cio_retl.state.budget`);
both satisfy :class:`RateBudget`, which is all the HTTP client knows, so this module and the
client load no database code.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cio_retl.config import RATE_SPEC

RATE_LIMIT_REQUESTS = 1000  # per RATE_LIMIT_WINDOW seconds, for the whole workspace
RATE_LIMIT_WINDOW = 1.0
HEADROOM = 0.02  # of the limit kept free for jitter between a grant and the arrival
# Every budget also spaces its grants so that a window plus this much holds no more than the
# limit: a request granted at the end of one window and delayed (threads, network) by up to
# this much still arrives in a window that holds fewer than the limit.
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
