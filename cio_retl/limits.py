"""Every Track API limit, checked before anything is sent.

The numbers are Customer.io's published Track API limits (the "Track API limits" section of
the Customer.io Track API OpenAPI 1.0.0 document: 150-byte ids and attribute names, 1000-byte
attribute values, 300 unique attributes per person, object or relationship, 32 KB per
``/api/v2/entity`` item and 500 KB per ``/api/v2/batch`` request). A row that breaks one is
rejected alone, with a reason naming the limit; Customer.io never sees an invalid item.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from cio_retl.records import Rejection, RejectionCode

MAX_BATCH_ITEMS = 1000  # [seen] RudderStack caps at 1000; the reference states only bytes
MAX_BATCH_BYTES = 500_000  # "500 KB", taken as 500,000 bytes of the serialized body
MAX_ITEM_BYTES = 32_768  # "32 KB" per item
MAX_IDENTIFIER_BYTES = 150
MAX_ATTRIBUTE_NAME_BYTES = 150
MAX_ATTRIBUTE_VALUE_BYTES = 1000  # [open] a nested value is counted as its compact JSON text
# "Max number of attributes allowed per person or Identify call", and "per object or
# relationship" (OpenAPI 1.0.0, "Track API limits"): one number for all three.
MAX_ATTRIBUTES = 300

_BATCH_ENVELOPE = len(b'{"batch":[]}')
# Up to these many characters a string cannot break a byte limit (UTF-8: 4 bytes at most).
_SAFE_VALUE_CHARS = MAX_ATTRIBUTE_VALUE_BYTES // 4
_SAFE_IDENTIFIER_CHARS = MAX_IDENTIFIER_BYTES // 4
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def batch_body_size(item_sizes_total: int, n_items: int) -> int:
    """Bytes of ``{"batch":[...]}`` holding items of these total bytes (commas included)."""
    return _BATCH_ENVELOPE + item_sizes_total + max(n_items - 1, 0)


def check_identifier(name: str, value: Any) -> Rejection | None:
    """An identifier value as the wire carries it: text (an integer column arrives as its
    decimal text), within the byte limit, without control characters."""
    if value is None:
        return Rejection(RejectionCode.NULL_KEY, f"identifier {name} is NULL", name)
    if not isinstance(value, str):
        return Rejection(
            RejectionCode.INVALID_IDENTIFIER,
            f"identifier {name} must be text or an integer, got {type(value).__name__}",
            name,
        )
    text = value
    if not text.strip():
        return Rejection(RejectionCode.INVALID_IDENTIFIER, f"identifier {name} is empty", name)
    # Runs for every changed row: a text this short is within the limit in any encoding.
    size = len(text) if len(text) <= _SAFE_IDENTIFIER_CHARS else len(text.encode())
    if size > MAX_IDENTIFIER_BYTES:
        return Rejection(
            RejectionCode.TOO_LONG,
            f"identifier {name} is {size} bytes, over the {MAX_IDENTIFIER_BYTES}-byte limit",
            name,
        )
    if _CONTROL_CHARACTERS.search(text):
        return Rejection(
            RejectionCode.INVALID_IDENTIFIER, f"identifier {name} contains control characters", name
        )
    if name == "email" and not _looks_like_email(text):
        return Rejection(
            RejectionCode.INVALID_IDENTIFIER,
            f"identifier email {text!r} is not an email address",
            name,
        )
    return None


def _looks_like_email(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    # str.split() splits at exactly the characters str.isspace() names: one part, no space.
    return bool(at and local and domain) and text.split() == [text] and "@" not in domain


def column_name_problem(columns: list[str]) -> str | None:
    """A column name that can never be an attribute name: a model error, not a row's."""
    for name in columns:
        size = len(name.encode())
        if size > MAX_ATTRIBUTE_NAME_BYTES:
            return (
                f"column {name[:40]!r}... is {size} bytes, over the "
                f"{MAX_ATTRIBUTE_NAME_BYTES}-byte limit for attribute names"
            )
        if not name.strip():
            return "a column has an empty name"
    return None


def check_attributes(
    attributes: dict[str, Any], *, serialized_size: int | None = None
) -> Rejection | None:
    """Every attribute value against its byte limit, and the attribute count of the row
    (a person, an object or a relationship: the limit is the same).

    Attribute names are the model's column names (plus the identifier's), checked once per
    model by :func:`column_name_problem`, not per row. Runs once per changed row: strings
    short enough to be under the limit whatever their characters (4 bytes at most each, in
    UTF-8) are not encoded at all.

    ``serialized_size`` is the length of the attributes' orjson text, when the caller has
    it. At most the value limit means no value can be over it: a string's UTF-8 bytes and a
    nested value's JSON text are each part of that text (orjson writes UTF-8 as is and only
    escapes quotes, backslashes and control characters, which lengthens them).
    """
    if len(attributes) > MAX_ATTRIBUTES:
        return Rejection(
            RejectionCode.TOO_MANY_ATTRIBUTES,
            f"{len(attributes)} attributes, over the {MAX_ATTRIBUTES}-attribute limit"
            " per person, object or relationship",
            "attributes",
        )
    if serialized_size is not None and serialized_size <= MAX_ATTRIBUTE_VALUE_BYTES:
        return None
    for name, value in attributes.items():
        kind = type(value)
        if kind is str:
            if len(value) <= _SAFE_VALUE_CHARS:
                continue
            size = len(value.encode())
        elif kind is dict or kind is list:
            size = len(orjson.dumps(value))
        else:
            continue  # numbers and booleans are far below any limit
        if size > MAX_ATTRIBUTE_VALUE_BYTES:
            return Rejection(
                RejectionCode.TOO_LONG,
                f"attribute {name!r} value is {size} bytes, over the {MAX_ATTRIBUTE_VALUE_BYTES}-byte limit",
                name,
            )
    return None


def check_item_size(item: bytes) -> Rejection | None:
    if len(item) > MAX_ITEM_BYTES:
        return Rejection(
            RejectionCode.ITEM_TOO_LARGE,
            f"item is {len(item)} bytes, over the {MAX_ITEM_BYTES}-byte limit per item",
            "item",
        )
    return None
