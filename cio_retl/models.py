"""SQL model files: a header of ``-- key: value`` lines, then one SELECT.

Parsing is strict because a typo in a header (``-- indentifier: email``) would otherwise sync
people under the wrong identifier. Every error names the file and line.
"""

from __future__ import annotations

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


# RudderStack's ``mappedToDestination`` external id types; a table, as records ask per row.
EXTERNAL_ID_TYPES = {kind: f"CUSTOMERIO-{kind.value}" for kind in Kind}


class Mode(StrEnum):
    UPSERT = "upsert"
    MIRROR = "mirror"


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
}
ALL_HEADER_KEYS = _COMMON_KEYS.union(*(req | opt for req, opt in _KEYS_BY_KIND.values()))

_HEADER_LINE = re.compile(r"^--\s*([a-z_]+)\s*:\s*(.*?)\s*$")
_OBJECT_TYPE_ID = re.compile(r"^[0-9]+$")


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
    description: str = ""
    deps: tuple[str, ...] = ()  # upstream asset keys, e.g. ("analytics/users",), for lineage
    max_delete_pct: float = DEFAULT_MAX_DELETE_PCT
    max_change_pct: float = DEFAULT_MAX_CHANGE_PCT
    removed_columns: RemovedColumns = RemovedColumns.REMOVE

    @property
    def key_columns(self) -> tuple[str, ...]:
        if self.kind is Kind.RELATIONSHIP:
            assert self.person_key and self.object_key
            return (self.person_key, self.object_key)
        assert self.key
        return (self.key,)

    @property
    def external_id_type(self) -> str:
        """RudderStack's ``mappedToDestination`` external id type, e.g. ``CUSTOMERIO-person``."""
        return EXTERNAL_ID_TYPES[self.kind]


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
                str(path), f"unknown header key {name!r} (known: {sorted(ALL_HEADER_KEYS)})", number
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
            f"kind must be one of {[k.value for k in Kind]}, not {kind_text!r}",
            kind_line,
        ) from None
    required, optional = _KEYS_BY_KIND[kind]
    for name in sorted(required - header.keys()):
        raise ModelError(str(path), f"missing required header key {name!r} for kind {kind}", 1)
    for name in sorted(header.keys() - required - optional - _COMMON_KEYS):
        raise ModelError(
            str(path), f"header key {name!r} does not apply to kind {kind}", header[name][1]
        )

    def get(name: str) -> str | None:
        return header[name][0] if name in header else None

    mode_text, mode_line = header.get("mode", ("upsert", 1))
    try:
        mode = Mode(mode_text)
    except ValueError:
        raise ModelError(
            str(path),
            f"mode must be one of {[m.value for m in Mode]}, not {mode_text!r}",
            mode_line,
        ) from None
    for name in ("identifier", "person_identifier"):
        if name in header and header[name][0] not in PERSON_IDENTIFIERS:
            raise ModelError(
                str(path),
                f"{name} must be one of {list(PERSON_IDENTIFIERS)}, not {header[name][0]!r}",
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
            f"not {removed_text!r}",
            removed_line,
        ) from None
    deps = tuple(d.strip() for d in (get("deps") or "").split(",") if d.strip())
    if kind is Kind.RELATIONSHIP and get("person_key") == get("object_key"):
        raise ModelError(str(path), "person_key and object_key must be different columns", 1)

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
        description=get("description") or " ".join(description).strip(),
        deps=deps,
        max_delete_pct=percents.get("max_delete_pct", DEFAULT_MAX_DELETE_PCT),
        max_change_pct=percents.get("max_change_pct", DEFAULT_MAX_CHANGE_PCT),
        removed_columns=removed_columns,
    )


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
    """Objects, then people, then relationships: what a relationship names must exist first."""
    rank = {Kind.OBJECT: 0, Kind.PERSON: 1, Kind.RELATIONSHIP: 2}
    return sorted(models, key=lambda m: (rank[m.kind], m.name))
