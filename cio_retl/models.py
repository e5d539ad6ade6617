"""SQL model files: a header of ``-- key: value`` lines, then one SELECT.

Parsing is strict because a typo in a header (``-- indentifier: email``) would otherwise sync
people under the wrong identifier. Every error names the file and line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cio_retl.errors import ModelError


class Kind(StrEnum):
    PERSON = "person"
    OBJECT = "object"
    RELATIONSHIP = "relationship"
    EVENT = "event"  # append-only: each row one event, sent once
    SUPPRESSION = "suppression"  # people who must not be messaged; mirrored
    DEVICE = "device"  # a person's push devices; mirrored


# RudderStack's ``mappedToDestination`` external id types; a table, as records ask per row.
EXTERNAL_ID_TYPES = {kind: f"CUSTOMERIO-{kind.value}" for kind in Kind}


class Mode(StrEnum):
    UPSERT = "upsert"
    MIRROR = "mirror"
    APPEND = "append"  # events: what was sent once is never sent again, nor deleted


# The kinds whose mode is fixed: a ``-- mode:`` header naming another one is an error.
FIXED_MODES = {Kind.EVENT: Mode.APPEND, Kind.SUPPRESSION: Mode.MIRROR, Kind.DEVICE: Mode.MIRROR}
# The kinds a ``-- mode:`` header may choose for, and what they may choose.
CHOSEN_MODES = (Mode.UPSERT, Mode.MIRROR)


class RemovedColumns(StrEnum):
    """What a column that left the model does to the attribute it used to fill."""

    REMOVE = "remove"  # removed in Customer.io too (the default: Customer.io equals the model)
    KEEP = "keep"  # left alone in Customer.io; only NULL values remove an attribute


PERSON_IDENTIFIERS = ("id", "email", "cio_id")

_COMMON_KEYS = {
    "kind",
    "mode",
    "description",
    "deps",
    "max_delete_pct",
    "max_change_pct",
    "removed_columns",
}

# Guardrails: share of the acknowledged rows (the snapshot) one run may delete or change.
DEFAULT_MAX_DELETE_PCT = 10.0
DEFAULT_MAX_CHANGE_PCT = 50.0
_KEYS_BY_KIND: dict[Kind, tuple[set[str], set[str]]] = {
    # kind: (required, optional) beyond the common ones
    Kind.PERSON: ({"identifier", "key"}, set()),
    Kind.OBJECT: ({"key", "object_type_id"}, set()),
    Kind.RELATIONSHIP: ({"person_identifier", "person_key", "object_type_id", "object_key"}, set()),
    # `name` or `name_column`: exactly one, checked below.
    Kind.EVENT: (
        {"identifier", "key", "event_key", "timestamp"},
        {"name", "name_column", "lookback_days"},
    ),
    Kind.SUPPRESSION: ({"identifier", "key"}, set()),
    Kind.DEVICE: ({"identifier", "key", "token", "platform"}, set()),
}
# Common keys that mean nothing for a kind: an event is never changed or deleted, and the
# mirrored kinds send every field of a row (a device replaces the device).
_NOT_FOR_KIND: dict[Kind, set[str]] = {
    Kind.EVENT: {"max_delete_pct", "max_change_pct", "removed_columns"},
    Kind.SUPPRESSION: {"removed_columns"},
    Kind.DEVICE: {"removed_columns"},
}
ALL_HEADER_KEYS = _COMMON_KEYS.union(*(req | opt for req, opt in _KEYS_BY_KIND.values()))

# Customer.io Track API: an event name is at most 100 bytes (its limits table, "Event Name").
MAX_EVENT_NAME_BYTES = 100

_HEADER_LINE = re.compile(r"^--\s*([a-z_]+)\s*:\s*(.*?)\s*$")
# "Object type IDs are string-formatted integers that begin at 1" (Track API OpenAPI 1.0.0).
_OBJECT_TYPE_ID = re.compile(r"^[1-9][0-9]*$")


@dataclass(frozen=True, slots=True)
class Model:
    """One parsed model file. ``key_columns`` are the columns that identify a row."""

    name: str
    path: Path
    kind: Kind
    sql: str
    sql_line: int
    mode: Mode = Mode.UPSERT
    identifier: str | None = None  # person: id | email | cio_id
    key: str | None = None  # person/object: key column
    object_type_id: str | None = None
    person_identifier: str | None = None
    person_key: str | None = None
    object_key: str | None = None
    event_key: str | None = None  # event: the column naming the event uniquely and stably
    event_name: str | None = None  # event: the fixed name (`-- name:`) ...
    name_column: str | None = None  # ... or the column holding a name per row
    timestamp: str | None = None  # event: the column with the event's time
    lookback_days: int | None = None  # event: older events are never read nor sent
    token: str | None = None  # device: the column with the device token
    platform: str | None = None  # device: the column with `ios` or `android`
    description: str = ""
    deps: tuple[str, ...] = ()  # upstream asset keys, e.g. ("analytics/users",), for lineage
    max_delete_pct: float = DEFAULT_MAX_DELETE_PCT
    max_change_pct: float = DEFAULT_MAX_CHANGE_PCT
    removed_columns: RemovedColumns = RemovedColumns.REMOVE
    # (header key, value, line) of every `-- key: value` line, so an error found later (a
    # key column missing from the result) points at the line that named it.
    header: tuple[tuple[str, str, int], ...] = ()

    def line_naming(self, column: str) -> int:
        """The header line that names ``column`` (e.g. ``-- key: email``); else the SQL's."""
        for name, value, line in self.header:
            if value == column and name not in ("kind", "description", "deps"):
                return line
        return self.sql_line

    @property
    def deletes_removed(self) -> bool:
        """Whether a row that leaves the model is deleted in Customer.io (mirror mode, and a
        relationship's removal), not only forgotten by the snapshot."""
        return self.mode is Mode.MIRROR or self.kind is Kind.RELATIONSHIP

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The columns whose values, as text, are the row's key in the state store."""
        if self.kind is Kind.RELATIONSHIP:
            assert self.person_key and self.object_key
            return (self.person_key, self.object_key)
        if self.kind is Kind.EVENT:
            assert self.event_key
            return (self.event_key,)
        if self.kind is Kind.DEVICE:
            assert self.key and self.token
            return (self.key, self.token)
        assert self.key
        return (self.key,)

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Every column the header names: the result must have them all."""
        named = (
            self.key,
            self.person_key,
            self.object_key,
            self.event_key,
            self.timestamp,
            self.name_column,
            self.token,
            self.platform,
        )
        return tuple(dict.fromkeys(c for c in named if c))

    @property
    def person_identifier_type(self) -> str | None:
        """The person identifier type the model's rows carry (None for objects)."""
        if self.kind is Kind.OBJECT:
            return None
        if self.kind is Kind.RELATIONSHIP:
            return self.person_identifier
        return self.identifier

    @property
    def external_id_type(self) -> str:
        """RudderStack's ``mappedToDestination`` external id type, e.g. ``CUSTOMERIO-person``."""
        return EXTERNAL_ID_TYPES[self.kind]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'identifier'?)`` for the closest of ``choices``, or nothing: a typo
    in a header costs one look at the message, not a search through the documentation."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_model(path: Path, text: str | None = None) -> Model:
    """Parse one model file; raise :class:`ModelError` naming the file and line."""
    text = path.read_text(encoding="utf-8") if text is None else text
    lines = text.splitlines()
    header: dict[str, tuple[str, int]] = {}
    description: list[str] = []
    sql_start = len(lines)
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("--"):
            sql_start = number - 1
            break
        match = _HEADER_LINE.match(line)
        if match is None:
            description.append(line[2:].strip())
            continue
        name, value = match.groups()
        if name not in ALL_HEADER_KEYS:
            raise ModelError(
                str(path),
                f"unknown header key {name!r}{did_you_mean(name, ALL_HEADER_KEYS)}"
                f" (known: {sorted(ALL_HEADER_KEYS)})",
                number,
            )
        if name in header:
            raise ModelError(str(path), f"header key {name!r} given twice", number)
        if not value:
            raise ModelError(str(path), f"header key {name!r} has no value", number)
        header[name] = (value, number)

    sql = "\n".join(lines[sql_start:]).strip()
    sql_line = sql_start + 1
    if not sql:
        raise ModelError(str(path), "no SELECT statement after the header", sql_line)
    sql = sql.rstrip().rstrip(";").rstrip()
    first_word = re.split(r"\s", _strip_leading_comments(sql), maxsplit=1)[0].lower()
    if first_word not in ("select", "with", "from", "values", "("):
        raise ModelError(str(path), f"the model must be one SELECT, found {first_word!r}", sql_line)

    if "kind" not in header:
        raise ModelError(str(path), "missing required header key 'kind'", 1)
    kind_text, kind_line = header["kind"]
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise ModelError(
            str(path),
            f"kind must be one of {[k.value for k in Kind]}, not {kind_text!r}"
            + did_you_mean(kind_text, [k.value for k in Kind]),
            kind_line,
        ) from None
    required, optional = _KEYS_BY_KIND[kind]
    for name in sorted(required - header.keys()):
        raise ModelError(str(path), f"missing required header key {name!r} for kind {kind}", 1)
    for name in sorted(header.keys() - required - optional - _COMMON_KEYS):
        allowed = required | optional | _COMMON_KEYS
        raise ModelError(
            str(path),
            f"header key {name!r} does not apply to kind {kind}{did_you_mean(name, allowed)}",
            header[name][1],
        )

    def get(name: str) -> str | None:
        return header[name][0] if name in header else None

    for name in sorted(header.keys() & _NOT_FOR_KIND.get(kind, set())):
        raise ModelError(
            str(path), f"header key {name!r} does not apply to kind {kind}", header[name][1]
        )
    mode = _mode(path, kind, header.get("mode"))
    for name in ("identifier", "person_identifier"):
        if name in header and header[name][0] not in PERSON_IDENTIFIERS:
            raise ModelError(
                str(path),
                f"{name} must be one of {list(PERSON_IDENTIFIERS)}, not {header[name][0]!r}"
                + did_you_mean(header[name][0], PERSON_IDENTIFIERS),
                header[name][1],
            )
    if "object_type_id" in header and not _OBJECT_TYPE_ID.match(header["object_type_id"][0]):
        raise ModelError(
            str(path),
            f"object_type_id must be the object type's number (e.g. 1), "
            f"not {header['object_type_id'][0]!r}",
            header["object_type_id"][1],
        )
    percents: dict[str, float] = {}
    for name in ("max_delete_pct", "max_change_pct"):
        if name in header:
            text, at = header[name]
            try:
                percents[name] = float(text.rstrip("%"))
            except ValueError:
                percents[name] = -1.0
            if not 0 <= percents[name] <= 100:
                raise ModelError(
                    str(path), f"{name} must be a percentage from 0 to 100, not {text!r}", at
                )
    removed_text, removed_line = header.get("removed_columns", ("remove", 1))
    try:
        removed_columns = RemovedColumns(removed_text)
    except ValueError:
        raise ModelError(
            str(path),
            f"removed_columns must be one of {[r.value for r in RemovedColumns]}, "
            f"not {removed_text!r}" + did_you_mean(removed_text, [r.value for r in RemovedColumns]),
            removed_line,
        ) from None
    deps = tuple(d.strip() for d in (get("deps") or "").split(",") if d.strip())
    if kind is Kind.RELATIONSHIP and get("person_key") == get("object_key"):
        raise ModelError(
            str(path),
            "person_key and object_key must be different columns",
            header["object_key"][1],
        )
    lookback_days = None
    if kind is Kind.EVENT:
        lookback_days = _check_event_header(path, header)
    if kind is Kind.DEVICE:
        _distinct_columns(path, header, ("key", "token", "platform"))

    return Model(
        name=path.stem,
        path=path,
        kind=kind,
        sql=sql,
        sql_line=sql_line,
        mode=mode,
        identifier=get("identifier"),
        key=get("key"),
        object_type_id=get("object_type_id"),
        person_identifier=get("person_identifier"),
        person_key=get("person_key"),
        object_key=get("object_key"),
        event_key=get("event_key"),
        event_name=get("name"),
        name_column=get("name_column"),
        timestamp=get("timestamp"),
        lookback_days=lookback_days,
        token=get("token"),
        platform=get("platform"),
        description=get("description") or " ".join(description).strip(),
        deps=deps,
        max_delete_pct=percents.get("max_delete_pct", DEFAULT_MAX_DELETE_PCT),
        max_change_pct=percents.get("max_change_pct", DEFAULT_MAX_CHANGE_PCT),
        removed_columns=removed_columns,
        header=tuple((name, value, line) for name, (value, line) in header.items()),
    )


def _mode(path: Path, kind: Kind, given: tuple[str, int] | None) -> Mode:
    """The model's mode: chosen by the header for people and objects, fixed for the others."""
    fixed = FIXED_MODES.get(kind)
    if given is None:
        return fixed or Mode.UPSERT
    text, line = given
    if fixed is not None:
        if text == fixed.value:
            return fixed
        raise ModelError(
            str(path),
            f"{'an' if kind is Kind.EVENT else 'a'} {kind} model is always {fixed.value};"
            f" mode {text!r} does not apply",
            line,
        )
    if text not in {m.value for m in CHOSEN_MODES}:
        raise ModelError(
            str(path),
            f"mode must be one of {[m.value for m in CHOSEN_MODES]}, not {text!r}"
            + did_you_mean(text, [m.value for m in CHOSEN_MODES]),
            line,
        )
    return Mode(text)


def _check_event_header(path: Path, header: dict[str, tuple[str, int]]) -> int | None:
    """An event's name (fixed or per row), its distinct columns and its lookback."""
    if ("name" in header) == ("name_column" in header):
        line = header["name_column"][1] if "name_column" in header else 1
        raise ModelError(
            str(path), "an event model needs exactly one of 'name' and 'name_column'", line
        )
    if "name" in header:
        name, line = header["name"]
        size = len(name.encode())
        if size > MAX_EVENT_NAME_BYTES:
            raise ModelError(
                str(path),
                f"event name is {size} bytes, over the {MAX_EVENT_NAME_BYTES}-byte limit",
                line,
            )
    _distinct_columns(path, header, ("event_key", "timestamp", "name_column"))
    _distinct_columns(path, header, ("key", "timestamp", "name_column"))
    if "lookback_days" not in header:
        return None
    text, line = header["lookback_days"]
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ModelError(
            str(path),
            f"lookback_days must be a whole number of days, 1 or more, not {text!r}",
            line,
        )
    return int(text)


def _distinct_columns(path: Path, header: dict[str, tuple[str, int]], names: Sequence[str]) -> None:
    """The header keys ``names`` (those given) must name different columns."""
    seen: dict[str, str] = {}
    for name in names:
        if name not in header:
            continue
        column, line = header[name]
        if column in seen:
            raise ModelError(
                str(path),
                f"{seen[column]} and {name} must be different columns (both are {column!r})",
                line,
            )
        seen[column] = name


def _strip_leading_comments(sql: str) -> str:
    while True:
        sql = sql.lstrip()
        if sql.startswith("--"):
            sql = sql.split("\n", 1)[1] if "\n" in sql else ""
        elif sql.startswith("/*") and "*/" in sql:
            sql = sql.split("*/", 1)[1]
        else:
            return sql


def load_models(models_dir: Path, names: Sequence[str] | None = None) -> list[Model]:
    """Parse every ``.sql`` file under ``models_dir`` (or only ``names``), sorted by name."""
    if not models_dir.is_dir():
        raise ModelError(str(models_dir), "models folder not found (set CIO_RETL_MODELS_DIR)")
    models: dict[str, Model] = {}
    for path in sorted(models_dir.rglob("*.sql")):
        model = parse_model(path)
        if model.name in models:
            raise ModelError(
                str(path), f"two models are named {model.name!r}: {models[model.name].path} too"
            )
        models[model.name] = model
    if names:
        unknown = [n for n in names if n not in models]
        if unknown:
            raise ModelError(
                str(models_dir), f"no model named {unknown} (models: {sorted(models)})"
            )
        return [models[n] for n in dict.fromkeys(names)]
    if not models:
        raise ModelError(str(models_dir), "no .sql models found")
    return list(models.values())


def ordered_for_sync(models: Iterable[Model]) -> list[Model]:
    """Objects, people, devices, relationships, events, suppressions: what an item names
    exists before it (a run's phases, :class:`cio_retl.operations.Phase`, decide the order
    of sending; this is the order of models within a phase and in reports)."""
    rank = {
        Kind.OBJECT: 0,
        Kind.PERSON: 1,
        Kind.DEVICE: 2,
        Kind.RELATIONSHIP: 3,
        Kind.EVENT: 4,
        Kind.SUPPRESSION: 5,
    }
    return sorted(models, key=lambda m: (rank[m.kind], m.name))
