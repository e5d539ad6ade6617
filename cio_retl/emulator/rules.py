"""Limits, [open] readings of the spec, and the fault plan.

Every limit is a named constant so the emulator, the engine and the tests agree on one number.
Where the spec marks a rule [open], the emulator's default reading is a module constant and
`Rules` lets a test run an emulator under the other reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

MAX_BATCH_BODY_BYTES = 500_000
"""One `/api/v2/batch` request body (raw bytes as received)."""
MAX_ITEM_BYTES = 32_768
"""One item, measured as compact JSON (`orjson.dumps(item)`), and one `/api/v2/entity` body."""
MAX_BATCH_ITEMS = 1000
"""Items per batch [seen: RudderStack caps at 1000]."""
MAX_IDENTIFIER_BYTES = 150
"""An identifier value (`id`, `email`, `cio_id`, `object_id`), UTF-8."""
MAX_ATTRIBUTE_NAME_BYTES = 150
"""An attribute name, UTF-8."""
MAX_ATTRIBUTE_VALUE_BYTES = 1000
"""An attribute value: a string counts its UTF-8 bytes, a nested value per NESTED_VALUE_SIZE."""
MAX_ATTRIBUTES = 300
"""Unique attributes on one person, object or relationship, counted after the item is merged
("Track API limits" of the Track API OpenAPI 1.0.0 document: "per person or Identify call"
and "per object or relationship")."""
MAX_OBJECT_ATTRIBUTES_BYTES = 100_000
"""All attributes of one object or relationship together ("Total attribute size: 100
Kilobytes", same section), measured as their merged compact JSON [open: how it is measured]."""
MAX_READ_BYTES = 64 * 1024 * 1024
"""Bodies beyond this are not even read: 413 and the connection is closed."""

NULL_REMOVES_ATTRIBUTE = True
"""[open] Whether `null` removes an attribute like `""` does. The engine sends `""`."""
NESTED_VALUE_SIZE: Literal["json_text", "per_leaf"] = "json_text"
"""[open] How a nested (object/array) attribute value is sized against MAX_ATTRIBUTE_VALUE_BYTES:
"json_text" = its compact JSON text as a whole; "per_leaf" = each string leaf on its own."""
OVERSIZE_BODY_STATUS = 413
"""[open] Status for a body over the byte limit: 400 or 413."""
ERRORS_NAME_BATCH_INDEX = True
"""[open] Whether a 207's errors name the failed item's `batch_index`. RudderStack's handler
reads it from the live API [seen]; the Track API OpenAPI 1.0.0 document's 207 body
(`Trackv2SendMultipleRequestsResponse`) lists only `reason`, `field` and `message`."""


@dataclass(frozen=True, slots=True)
class Rules:
    """The emulator's reading of the [open] points; defaults are the module constants."""

    null_removes_attribute: bool = NULL_REMOVES_ATTRIBUTE
    nested_value_size: Literal["json_text", "per_leaf"] = NESTED_VALUE_SIZE
    oversize_body_status: int = OVERSIZE_BODY_STATUS
    errors_name_batch_index: bool = ERRORS_NAME_BATCH_INDEX


@dataclass(frozen=True)
class FaultPlan:
    """Faults the emulator injects, decided after auth and before anything is applied.

    Rates are fractions of *write* requests (v2 batch/entity, v1 customers); they are exclusive
    and drawn from one seeded random stream in the order drop, throttle, error. `fail_first`
    counts write requests since the plan was assigned. `delay_seconds` holds writes only (so a
    test can hold a batch in flight while the client's credential check passes);
    `status_override` applies to every Track request, the region check included.
    """

    error_rate: float = 0.0
    throttle_rate: float = 0.0
    retry_after: float | None = 1.0
    drop_rate: float = 0.0
    delay_seconds: float = 0.0
    reject_identifiers: frozenset[str] = field(default_factory=frozenset)
    status_override: int | None = None
    fail_first: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "throttle_rate", "drop_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate!r}")
        if self.delay_seconds < 0 or not math.isfinite(self.delay_seconds):
            raise ValueError("delay_seconds must be a finite number >= 0")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0 or None")
        if self.fail_first < 0:
            raise ValueError("fail_first must be >= 0")
        if self.status_override is not None and not 100 <= self.status_override <= 599:
            raise ValueError("status_override must be an HTTP status code")
        # Identifier values are compared as strings, so an id given as 42 matches "42".
        object.__setattr__(
            self, "reject_identifiers", frozenset(str(v) for v in self.reject_identifiers)
        )

    @classmethod
    def from_json(cls, data: Any) -> FaultPlan:
        """Build a plan from `POST /_emulator/faults`; raises ValueError on a bad field."""
        if not isinstance(data, dict):
            raise ValueError("the fault plan must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault plan fields: {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name == "reject_identifiers":
                if not isinstance(value, list) or not all(
                    isinstance(v, str | int) and not isinstance(v, bool) for v in value
                ):
                    raise ValueError("reject_identifiers must be a list of strings")
                kwargs[name] = frozenset(str(v) for v in value)
            elif name in ("status_override", "retry_after") and value is None:
                kwargs[name] = None
            elif name in ("status_override", "fail_first", "seed"):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{name} must be an integer")
                kwargs[name] = value
            else:
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ValueError(f"{name} must be a number")
                kwargs[name] = float(value)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - guarded by the field check above
            raise ValueError(str(exc)) from exc

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON (reject_identifiers as a sorted list)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["reject_identifiers"] = sorted(self.reject_identifiers)
        return out
