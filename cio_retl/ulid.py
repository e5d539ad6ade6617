"""Deterministic ULIDs for events: the same event always carries the same ``id``.

A ULID (https://github.com/ulid/spec) is 128 bits: 48 bits of Unix time in milliseconds,
then 80 bits that the spec fills at random. Here they are a hash of the model and the event
key instead, so a resend after a crash carries the id of the first attempt and Customer.io
deduplicates it (Track API OpenAPI 1.0.0, PersonEvent ``id``: "a valid ULID used to
deduplicate events"). Encoded as the spec says: 26 characters of Crockford's base32, most
significant first, upper case.
"""

from __future__ import annotations

import hashlib

CROCKFORD_BASE32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAX_ULID_MILLISECONDS = 2**48 - 1  # 10889-08-02: the latest time a ULID can hold
_RANDOM_BYTES = 10  # 80 bits


def event_ulid(milliseconds: int, model: str, event_key: str) -> str:
    """The ULID of the event ``event_key`` of ``model`` at ``milliseconds`` since 1970.

    Raises ValueError for a time a ULID cannot hold (before 1970 or after year 10889).
    """
    if not 0 <= milliseconds <= MAX_ULID_MILLISECONDS:
        raise ValueError("a ULID holds times from 1970 to the year 10889 only")
    # The unit separator cannot occur in a model name (a file stem) nor be confused with one.
    seed = f"{model}\x1f{event_key}".encode()
    tail = int.from_bytes(hashlib.blake2b(seed, digest_size=_RANDOM_BYTES).digest(), "big")
    value = (milliseconds << 80) | tail
    return "".join(CROCKFORD_BASE32[(value >> shift) & 31] for shift in range(125, -1, -5))


def ulid_milliseconds(ulid: str) -> int:
    """The time part of a ULID (either case), for checks and tests."""
    value = 0
    for char in ulid.upper():
        value = value * 32 + CROCKFORD_BASE32.index(char)
    return value >> 80
