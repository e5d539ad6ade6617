"""Acknowledged built rows waiting for a row group's worth (cio_retl.snapshot_merge), pure:
what is written is exactly what was acknowledged, once, in multiples of the unit."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cio_retl.snapshot_merge import Pending, Range, acknowledged_runs


def covered(ranges: list[Range], built: set[int]) -> list[int]:
    """The built rows the ranges select, as the snapshot write's BETWEEN does."""
    return sorted(s for a, b in ranges for s in built if a <= s <= b)


@st.composite
def sends(draw: st.DrawFn) -> tuple[list[list[int]], list[list[int]], set[int]]:
    """Batches of a plan's built rows in sequence order (the numbers have gaps: rows the
    plan holds that are not built), each with the indexes Customer.io acknowledged."""
    count = draw(st.integers(1, 300))
    gaps = draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
    seqs, at = [], 0
    for gap in gaps:
        at += gap
        seqs.append(at)
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=40))
    batches, start = [], 0
    for size in sizes:
        if start >= len(seqs):
            break
        batches.append(seqs[start : start + size])
        start += size
    if start < len(seqs):
        batches.append(seqs[start:])
    acked = [
        sorted(draw(st.sets(st.integers(0, len(b) - 1))) if draw(st.booleans()) else range(len(b)))
        for b in batches
    ]
    return batches, acked, set(seqs)


@given(sends(), st.integers(1, 50), st.randoms(use_true_random=False))
def test_every_acknowledged_row_is_written_once_in_multiples_of_the_unit(
    send: tuple[list[list[int]], list[list[int]], set[int]], unit: int, order: object
) -> None:
    batches, acked, built = send
    answered = list(zip(batches, acked, strict=True))
    order.shuffle(answered)  # type: ignore[attr-defined]  # answers come in any order
    pending, written = Pending(), []
    expected = sorted(b[i] for b, a in answered for i in a)
    for n, (batch, indexes) in enumerate(answered, 1):
        runs = acknowledged_runs(batch, indexes)
        # Within each run's first and last number lie exactly its rows: no refused one.
        for run in runs:
            assert covered([(run[0], run[-1])], built) == list(run)
        pending.add(runs, updates=False)
        taken = pending.take(unit, final=False)
        rows = covered(taken, built)
        assert len(rows) % unit == 0
        written += rows
        # What stays pending is recorded in place of what was: it and the written add up.
        assert sorted(written + covered(pending.ranges(), built)) == sorted(
            b[i] for b, a in answered[:n] for i in a
        )
        assert pending.rows == len(covered(pending.ranges(), built))
    written += covered(pending.take(unit, final=True), built)
    assert sorted(written) == expected and len(set(written)) == len(written)
    assert pending.rows == 0 and pending.ranges() == [] and not pending.updates


def test_a_run_cut_in_two_leaves_its_rest_pending() -> None:
    pending = Pending()
    pending.add(acknowledged_runs([10, 11, 12, 14, 15], [0, 1, 2, 3, 4]), updates=True)
    pending.add(acknowledged_runs([1, 2, 3], [0, 2]), updates=False)  # 2 was refused
    assert pending.take(4, final=False) == [(1, 1), (3, 3), (10, 11)]
    assert pending.ranges() == [(12, 15)] and pending.rows == 3 and pending.updates
    assert pending.take(4, final=False) == []
    assert pending.take(4, final=True) == [(12, 15)]
    assert not pending.updates


def test_a_batch_with_nothing_acknowledged_has_no_run() -> None:
    assert acknowledged_runs([5, 6, 7], []) == []
    assert [list(r) for r in acknowledged_runs([5, 6, 7, 9], [3, 0, 1])] == [[5, 6], [9]]


def test_consecutive_batches_are_recorded_as_one_range() -> None:
    pending = Pending()
    runs = [*acknowledged_runs([1, 2, 3], [0, 1, 2]), *acknowledged_runs([4, 5], [0, 1])]
    assert pending.add(runs, updates=False) == [(1, 5)]
    assert pending.add(acknowledged_runs([6, 8], [0, 1]), updates=False) == [(6, 8)]
    assert pending.ranges() == [(1, 8)] and pending.rows == 7
    assert pending.add(acknowledged_runs([10, 11], [1]), updates=False) == [(11, 11)]
    assert pending.ranges() == [(1, 8), (11, 11)]
