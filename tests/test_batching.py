"""Batching invariants (hypothesis) and the client's retry, rate-limit and error mapping.

Retries run against the real emulator with an injected sleep, so no test waits on backoff.
"""

from __future__ import annotations

import itertools
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cio_retl.batching import batch_body, pack, pack_chunks
from cio_retl.client import RetryPolicy, TrackClient
from cio_retl.emulator import Emulator, FaultPlan
from cio_retl.errors import FatalSendError, RetriableError
from cio_retl.limits import MAX_BATCH_BYTES, MAX_BATCH_ITEMS, batch_body_size
from cio_retl.ratelimit import RateLimiter
from tests.conftest import API_KEY, SITE_ID


def item(i: int, size: int) -> bytes:
    return orjson.dumps(
        {
            "type": "person",
            "action": "identify",
            "identifiers": {"id": str(i)},
            "attributes": {"p": "x" * size},
        }
    )


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), max_size=300),
    max_items=st.integers(1, 50),
    max_bytes=st.integers(3100, 20_000),
)
def test_pack_keeps_order_and_limits(sizes: list[int], max_items: int, max_bytes: int) -> None:
    items = [(i, item(i, s)) for i, s in enumerate(sizes)]
    batches = list(pack(items, max_items=max_items, max_bytes=max_bytes))
    assert [tag for b in batches for tag, _ in b] == list(range(len(sizes)))  # all, in order
    for batch in batches:
        assert 1 <= len(batch) <= max_items
        body = batch_body([data for _, data in batch])
        assert len(body) == batch_body_size(sum(len(d) for _, d in batch), len(batch)) <= max_bytes
        orjson.loads(body)
    for current, following in itertools.pairwise(batches):
        # Greedy: a batch is closed only because the next item would break a limit.
        nxt = len(following[0][1])
        assert (
            len(current) == max_items
            or batch_body_size(sum(len(d) for _, d in current) + nxt, len(current) + 1) > max_bytes
        )


def one_at_a_time(sizes: list[int], max_items: int, max_bytes: int) -> list[list[int]]:
    """The greedy batching an item at a time, as indexes: the oracle of pack_chunks."""
    batches: list[list[int]] = []
    batch: list[int] = []
    body = 0
    for i, size in enumerate(sizes):
        if batch and (len(batch) >= max_items or body + size + 1 > max_bytes):
            batches.append(batch)
            batch = []
        body = batch_body_size(size, 1) if not batch else body + size + 1
        batch.append(i)
    return [*batches, batch] if batch else batches


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=12),
    max_items=st.integers(1, 50),
    max_bytes=st.integers(3100, 20_000),
)
def test_chunks_pack_as_one_item_at_a_time(
    sizes: list[int], cuts: list[int], max_items: int, max_bytes: int
) -> None:
    """However the items are cut into chunks (empty ones too), the batches are the ones an
    item at a time gives: a batch spans chunks."""
    items = [b"x" * s for s in sizes]
    bounds = [0, *sorted(min(c, len(items)) for c in cuts), len(items)]
    chunks = [(list(range(a, b)), items[a:b]) for a, b in itertools.pairwise(bounds)]
    batches = list(pack_chunks(chunks, max_items=max_items, max_bytes=max_bytes))
    assert [tags for tags, _ in batches] == one_at_a_time(sizes, max_items, max_bytes)
    assert all(batch == [items[t] for t in tags] for tags, batch in batches)


def test_an_item_no_batch_can_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="an item of 489 bytes cannot fit any batch of 500"):
        list(pack_chunks([([1, 2], [b"x", b"y" * 489])], max_bytes=500))
    assert list(pack_chunks([([1], [b"y" * 488])], max_bytes=500)) == [([1], [b"y" * 488])]
    with pytest.raises(ValueError, match="at least one item, not 0"):
        list(pack_chunks([([1], [b"x"])], max_items=0))


def test_pack_at_the_real_limits() -> None:
    thousand = [(i, item(i, 10)) for i in range(2500)]
    assert [len(b) for b in pack(thousand)] == [MAX_BATCH_ITEMS, MAX_BATCH_ITEMS, 500]
    big = [(i, item(i, 30_000)) for i in range(40)]
    batches = list(pack(big))
    assert all(len(batch_body([d for _, d in b])) <= MAX_BATCH_BYTES for b in batches)
    assert sum(len(b) for b in batches) == 40 and len(batches) == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_limiter_never_exceeds_the_workspace_limit() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)  # the default: 1000 per second
    stamps = []
    for _ in range(10_000):
        limiter.acquire()
        stamps.append(clock.now)
    # Over any 1-second window at most 1000 requests.
    j = 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - 1.0:
            j += 1
        assert i - j + 1 <= 1000
    assert stamps[999] == 0.0  # the first 1000 go at once
    assert stamps[1000] == 1.0 and stamps[-1] == 9.0  # then the next 1000 a second later


def test_retry_policy_honours_retry_after_and_caps_backoff() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=4.0)
    rng = random.Random(1)
    assert policy.delay(0, 7.0, rng) == 7.0
    assert policy.delay(0, 10_000.0, rng) == 120.0
    delays = [policy.delay(n, None, rng) for n in range(10) for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays)


def client(emu: Emulator, clock: FakeClock, attempts: int = 5) -> TrackClient:
    return TrackClient(
        emu.url,
        SITE_ID,
        API_KEY,
        retry=RetryPolicy(max_attempts=attempts, base_delay=0.5, max_delay=8),
        limiter=RateLimiter(clock=clock, sleep=clock.sleep),
        sleep=clock.sleep,
        seed=3,
    )


def test_429_waits_retry_after_then_succeeds(emulator: Emulator) -> None:
    clock = FakeClock()
    emulator.faults = FaultPlan(throttle_rate=1.0, retry_after=2.5)
    with client(emulator, clock, attempts=3) as c:
        with pytest.raises(RetriableError, match="after 3 attempts"):
            c.send_batch([item(1, 1)])
        assert clock.slept == [2.5, 2.5]
        emulator.faults = FaultPlan(fail_first=2)
        result = c.send_batch([item(1, 1), item(2, 1)])
    assert result.acked == [0, 1] and result.requests == 3
    assert emulator.workspace.person(id="1") is not None


def test_dropped_connections_are_retried(emulator: Emulator) -> None:
    clock = FakeClock()
    emulator.faults = FaultPlan(drop_rate=0.5, seed=4)
    with client(emulator, clock, attempts=30) as c:
        for i in range(20):
            assert c.send_batch([item(i, 1)]).acked == [0]
    assert len(emulator.workspace.people) == 20


def test_400_is_bisected_down_to_the_bad_items(emulator: Emulator) -> None:
    clock = FakeClock()
    emulator.faults = FaultPlan(status_override=400)
    with client(emulator, clock) as c:
        result = c.send_batch([item(i, 1) for i in range(4)])
    assert result.acked == [] and sorted(result.rejected) == [0, 1, 2, 3]
    assert result.requests == 7  # 4 items: 1 + 2 + 4 requests
    assert all(r.status == 400 for r in result.rejected.values())


def test_207_maps_errors_to_items(emulator: Emulator) -> None:
    clock = FakeClock()
    emulator.faults = FaultPlan(reject_identifiers=frozenset({"2"}))
    bad_name = orjson.dumps(
        {
            "type": "person",
            "action": "identify",
            "identifiers": {"id": "3"},
            "attributes": {"x" * 151: 1},
        }
    )
    with client(emulator, clock) as c:
        result = c.send_batch([item(1, 1), item(2, 1), bad_name, item(4, 1)])
    assert result.acked == [0, 3]
    assert set(result.rejected) == {1, 2} and result.rejected[2].status == 207
    assert set(emulator.workspace.people_by("id")) == {"1", "4"}


def test_bad_credentials_are_fatal(emulator: Emulator) -> None:
    clock = FakeClock()
    with TrackClient(emulator.url, SITE_ID, "nope", sleep=clock.sleep) as c:
        with pytest.raises(FatalSendError, match="refused the credentials"):
            c.check_credentials()
        with pytest.raises(FatalSendError):
            c.send_batch([item(1, 1)])
    with (
        TrackClient(emulator.url + "/wrong", SITE_ID, API_KEY, sleep=clock.sleep) as c,
        pytest.raises(FatalSendError, match="CIO_TRACK_API_URL"),
    ):
        c.send_batch([item(1, 1)])
