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
    body = batch_body_size(0, 0)  # bytes of the batch body so far: envelope, items, commas
    for tag, item in items:
        if batch_body_size(len(item), 1) > max_bytes:
            raise ValueError(f"an item of {len(item)} bytes cannot fit any batch of {max_bytes}")
        grown = body + len(item) + (1 if batch else 0)
        if batch and (len(batch) >= max_items or grown > max_bytes):
            yield batch
            batch, grown = [], batch_body_size(len(item), 1)
        batch.append((tag, item))
        body = grown
    if batch:
        yield batch
