"""What one model row becomes on its way to Customer.io: the types every layer shares.

The warehouse diff produces them, the send path consumes them, the state store keeps their
rejections. They live here, apart from all of those, so that each layer can name them
without importing another layer's engine: this module imports only the standard library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

Attributes: TypeAlias = dict[str, Any]


class RejectionCode(enum.StrEnum):
    """Why a row was rejected, as a stable value: what checks, counts and tables key on
    (the reason text is for people and may change)."""

    NULL_KEY = "null_key"  # the model's key (or a person identifier of the row) is NULL
    DUPLICATE_KEY = "duplicate_key"  # several rows share the key: none of them is sent
    INVALID_IDENTIFIER = "invalid_identifier"  # empty, not text, control characters, not an email
    MISSING_VALUE = "missing_value"  # a required column (an event's timestamp) is NULL
    INVALID_VALUE = "invalid_value"  # a value the API cannot carry (bytes, a bad platform...)
    TOO_LONG = "too_long"  # an identifier, attribute value or event name over its byte limit
    TOO_MANY_ATTRIBUTES = "too_many_attributes"  # over the attribute count of a person
    ITEM_TOO_LARGE = "item_too_large"  # the item's JSON over the per-item byte limit
    API_REJECTED = "api_rejected"  # Customer.io refused the item (a 4xx, or a 207 naming it)
    # A 207 whose errors name no usable item: nothing in the batch is known to be accepted.
    API_UNATTRIBUTED = "api_unattributed"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one row was not sent or not accepted. Never holds attribute values."""

    code: RejectionCode
    reason: str
    field: str | None = None
    status: int | None = None

    def __str__(self) -> str:
        where = f" [{self.field}]" if self.field else ""
        code = f" (HTTP {self.status})" if self.status else ""
        return f"{self.reason}{where}{code}"


class Record(NamedTuple):
    """One model row as Customer.io will see it, keyed as the snapshot keys it.

    ``external_id`` follows RudderStack's ``mappedToDestination`` convention
    (``{"type": "CUSTOMERIO-person", "identifierType": "email", "id": ...}``); the identifier
    goes into ``identifiers`` and into ``attributes`` alike, as the same text everywhere: the
    attribute copy is the person's (or object's) own identifier attribute in Customer.io,
    which the schema types as a string, so a number there would be a second, different
    value of it. For a relationship ``identifiers`` holds both sides:
    ``{"person": {...}, "object": {...}}``.

    A NamedTuple, not a frozen dataclass: one is built per changed row, and a frozen
    dataclass's __init__ (one object.__setattr__ per field) was the largest single item of
    a 100k-row sync's profile (py-spy --gil: 0.9 s of ~5.8 s, with the other per-row
    records); a NamedTuple is as immutable and builds in C.
    """

    key: str
    external_id: dict[str, Any]
    identifiers: dict[str, Any]
    attributes: Attributes


class Event(NamedTuple):
    """One event row as the ``event`` item carries it (see :mod:`cio_retl.ulid` for ``id``)."""

    key: str  # the event key, as text: what the state of sent events records
    identifiers: dict[str, Any]
    name: str
    timestamp: int  # Unix seconds (PersonEvent `timestamp` is an integer)
    id: str
    data: Attributes


class Change(enum.StrEnum):
    CREATE = "create"  # not in the snapshot: send every attribute
    UPDATE = "update"  # in the snapshot with other values: send the changed ones
    REFRESH = "refresh"  # SQL row changed, normalized values did not: update the fingerprint
    DELETE = "delete"  # left the model: delete (mirror) or delete the relationship
    FORGET = "forget"  # left an upsert model: drop it from the snapshot, send nothing
    REJECT = "reject"  # cannot be sent; recorded with the reason


class RowChange(NamedTuple):
    """One row's change and what to send for it.

    A NamedTuple for the reason :class:`Record` is one: one is built per changed row.
    """

    change: Change
    key: str | None
    fingerprint: str | None = None
    record: Record | None = None
    send: Attributes | None = None  # the attributes to send (changed ones, "" to remove)
    identifiers: dict[str, Any] | None = None  # for deletes: from the snapshot
    rejection: Rejection | None = None
    event: Event | None = None  # an event to send (a CREATE without a record)
