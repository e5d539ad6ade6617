"""Size-bounded batches: at most 1000 items and 500,000 bytes of body per request.

Items arrive already serialized and already checked against the 32 KB item limit, so a batch
is only a matter of counting. Order is kept: a later state of a row never overtakes an
earlier one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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
    """Group ``(tag, item bytes)`` pairs into batches whose body stays within the limits."""
    batch: list[tuple[T, bytes]] = []
    empty = batch_body_size(0, 0)  # the envelope alone
    largest = max_bytes - empty  # the largest item a batch can hold by itself
    body = empty  # bytes of the batch body so far: envelope, items, commas
    for tag, item in items:  # once per item: plain arithmetic, no calls
        size = len(item)
        if size > largest:
            raise ValueError(f"an item of {size} bytes cannot fit any batch of {max_bytes}")
        if not batch:
            body = empty + size
        elif len(batch) >= max_items or body + size + 1 > max_bytes:
            yield batch
            batch, body = [], empty + size
        else:
            body += size + 1
        batch.append((tag, item))
    if batch:
        yield batch
