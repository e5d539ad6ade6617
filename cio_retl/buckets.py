"""Hash buckets: a static partition of a model's keys, so several workers share one sync.

A row's bucket is a stable function of its key text alone: the first four hex digits of the
key's MD5, as an integer 0..65535, modulo the number of buckets. MD5 is used because DuckDB,
PostgreSQL and Snowflake all compute it in SQL and all render it as 32 lowercase hex digits,
so the warehouse (which filters the model's rows) and the state store (which filters the
snapshot) put every key in the same bucket as :func:`bucket_of` does in Python; the tests
check the three dialects against it. It is a partition function, not a security measure.

A key always lands in the same bucket, so duplicate keys meet in one bucket (and are
rejected there as in a whole run), and a row that changes never moves between buckets. Rows
with a NULL key, which are rejected and only reported, all go to bucket 0.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

HASH_SPACE = 16**4  # the four hex digits the bucket is taken from
MAX_BUCKETS = 4096  # 16 keys per bucket slot at least: the modulo's skew stays under 0.1%
HEX_DIGITS = "0123456789abcdef"

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class Bucket:
    """Bucket ``index`` of ``count`` (0-based): the keys this run plans and sends."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_BUCKETS:
            raise ValueError(f"bucket count must be within 1..{MAX_BUCKETS}, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"bucket index must be within 0..{self.count - 1}, got {self.index}")

    @classmethod
    def parse(cls, text: str) -> Bucket:
        """``"3/16"``: bucket 3 of 16 (0-based, as in ``--bucket 0/16`` .. ``15/16``)."""
        match = _SPEC.match(text)
        if not match:
            raise ValueError(f"a bucket is INDEX/COUNT, e.g. 3/16 (0-based); got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def label(self) -> str:
        """``3/16``: how runs, locks and the CLI name the bucket."""
        return f"{self.index}/{self.count}"

    def holds(self, key: str | None) -> bool:
        return bucket_of(key, self.count) == self.index


def bucket_of(key: str | None, count: int) -> int:
    """The reference bucket function; the SQL of :func:`bucket_sql` computes the same."""
    if key is None:
        return 0
    return int(hashlib.md5(key.encode()).hexdigest()[:4], 16) % count


def bucket_sql(key: str, count: int) -> str:
    """Portable SQL for ``bucket_of(key, count)``: MD5, then four hex digits read with
    POSITION (DuckDB, PostgreSQL and Snowflake all have it; none shares a hex-to-int cast)."""
    digits = [f"(POSITION(SUBSTR(MD5({key}), {i}, 1) IN '{HEX_DIGITS}') - 1)" for i in (1, 2, 3, 4)]
    value = f"({digits[0]} * 4096 + {digits[1]} * 256 + {digits[2]} * 16 + {digits[3]})"
    return f"COALESCE(MOD({value}, {int(count)}), 0)"
