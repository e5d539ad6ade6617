"""Size-bounded batches: at most 1000 items and 500,000 bytes of body per request.

Items arrive already serialized and already checked against the 32 KB item limit, so a batch
is only a matter of counting. Order is kept: a later state of a row never overtakes an
earlier one.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, islice
from typing import TypeVar

from cio_retl.limits import MAX_BATCH_BYTES, MAX_BATCH_ITEMS, batch_body_size

T = TypeVar("T")


def batch_body(items: Sequence[bytes]) -> bytes:
    return b'{"batch":[' + b",".join(items) + b"]}"


def pack(
    items: Iterable[tuple[T, bytes]],
    *,
    max_items: int = MAX_BATCH_ITEMS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[list[tuple[T, bytes]]]:
    """Group ``(tag, item bytes)`` pairs into batches whose body stays within the limits
    (:func:`pack_chunks`, read ``STREAM_CHUNK`` pairs at a time: a batch is yielded once
    the pairs after it are read, and an item too large for any batch is refused before
    the batches of its chunk that precede it)."""
    chunks = _chunked(items, STREAM_CHUNK)
    for tags, batch in pack_chunks(chunks, max_items=max_items, max_bytes=max_bytes):
        yield list(zip(tags, batch, strict=True))


# Pairs :func:`pack` reads ahead of the batches it yields: about one batch of items.
STREAM_CHUNK = 1024


def _chunked(items: Iterable[tuple[T, bytes]], size: int) -> Iterator[tuple[list[T], list[bytes]]]:
    pairs = iter(items)
    while chunk := list(islice(pairs, size)):
        yield [tag for tag, _ in chunk], [item for _, item in chunk]


def pack_chunks(
    chunks: Iterable[tuple[Sequence[T], Sequence[bytes]]],
    *,
    max_items: int = MAX_BATCH_ITEMS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[tuple[list[T], list[bytes]]]:
    """Group chunks of (tags, item bytes) into batches of (tags, items) whose body stays
    within the limits: greedy and in order, each batch exactly what one item at a time
    would give (a batch may take items from two chunks).

    A chunk is cut where a running sum of the item sizes crosses the body's limit, found by
    bisection: no Python code runs per item but a ``len``, so a database's read of tens of
    thousands of built items is batched in a few C calls.
    """
    if max_items < 1:
        raise ValueError(f"a batch holds at least one item, not {max_items}")
    empty = batch_body_size(0, 0)  # the envelope alone
    largest = max_bytes - empty  # the largest item a batch can hold by itself
    room = largest + 1  # the most a batch's sizes plus one each may sum to (n items, n-1 commas)
    tags: list[T] = []
    items: list[bytes] = []
    for chunk_tags, chunk_items in chunks:
        tags += chunk_tags  # after what the last chunk's final batch held
        items += chunk_items
        sizes = list(map(len, items))
        if sizes and max(sizes) > largest:
            size = max(sizes)
            raise ValueError(f"an item of {size} bytes cannot fit any batch of {max_bytes}")
        # ends[i]: the bytes of items[:i], one comma each: a batch items[a:b] fits when
        # ends[b] - ends[a] <= room.
        ends = list(accumulate(map((1).__add__, sizes), initial=0))
        start, count = 0, len(items)
        while True:
            stop = (
                bisect_right(ends, ends[start] + room, start + 1, min(count, start + max_items) + 1)
                - 1
            )
            if stop == count:  # the last batch: the next chunk may add to it
                break
            yield tags[start:stop], items[start:stop]
            start = stop
        tags, items = tags[start:], items[start:]
    if items:
        yield tags, items
