"""Payloads built by the database: SQL that turns each model row into the bytes to send.

Built beside the Python path (:mod:`cio_retl.normalize`, :mod:`cio_retl.limits`,
:func:`cio_retl.operations.encode`); a run's plan (:mod:`cio_retl.plan`) uses it for the new
rows of person and object models. For a person or object identify of a *new* row (the whole
row is sent) :func:`payloads` gives a relation that checks each row once, adding to its
columns the key's text, the attributes' JSON text (keys sorted, as the snapshot keeps them),
the first rejection's :class:`cio_retl.records.RejectionCode` value (NULL for a valid row)
and a flag for rows left to Python (below); and the expressions that build from those the
item's JSON text (``{"type":..,"action":"identify","identifiers":{..},"attributes":{..}}``),
the identifiers as the snapshot keeps them, and a rejected row's reason and field, worded as
the Python path words them. :func:`payload_select` composes them into one result row per source row.

Given each row's previous snapshot attributes (``payloads(previous=...)``), a row that has one
is an *update*, built as :func:`cio_retl.diff.upsert_change` builds it: only the attributes
whose normalized value changed, ``""`` (the Track API's removal form) for those the snapshot
holds and the row no longer does, every attribute under ``--full-resync``; the limits of the
whole record, the item's size of what it sends; and a flag for an update with nothing to
send. A column's new JSON fragment is compared with the snapshot's member as the same JSON
value, both printed again by the database's own JSON writer: exact for the canonical forms a
snapshot holds (written by ``canonical_json``, or byte for byte the same by this SQL).

Normalization is the contract's: timestamps and dates become Unix seconds (floored), decimals
JSON numbers (integral ones integers), booleans stay booleans, JSON columns stay nested, NaN
becomes NULL (and a NULL attribute is left out), infinities and bytes reject the row,
integers beyond 2^53 travel as their decimal text, identifier values are JSON strings
(Customer.io Track API OpenAPI 1.0.0: ``identifiers`` members are ``type: string``). The
per-row limits are those of :mod:`cio_retl.limits`, checked in the same order.

The SQL assembles JSON as text from per-column fragments: a fragment is NULL for a NULL
value, so absent attributes cost nothing, and the key order is fixed when the statement is
built (sorted, as ``canonical_json`` sorts). Each column's kind (:class:`ColumnKind`) is
given by the caller. Where the SQL's text is the same JSON value in other bytes, the row is
marked ``python_only`` (tests/test_payload_sql.py pins that every other row's bytes agree):

- a nested (JSON) value is passed through as the database prints it: Python rewrites
  ``1.0`` inside it to ``1`` and sorts its keys;
- a double in the exponent forms the database and orjson write differently (DuckDB
  ``5e-08``, orjson ``5e-8``; PostgreSQL also ``1.5e+15`` from 1e11 up);
- DuckDB's escapes of a few control characters in text (``\\u000B``, orjson ``\\u000b``);
- a decimal of 1e37 or more (no DECIMAL(38, 0) holds it);
- on Snowflake, whose documentation does not give the text of a FLOAT nor TO_JSON's
  escapes: every double but an integral one within 2^53, and a text with control
  characters;
- an update whose snapshot holds the identifier in another form (an integer ``id`` written
  before identifiers were text), or the name of a dropped column that JSON must escape.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from cio_retl.limits import (
    MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES,
    MAX_IDENTIFIER_BYTES,
    MAX_ITEM_BYTES,
)
from cio_retl.models import Kind, Model, RemovedColumns
from cio_retl.records import RejectionCode

_EXACT = 2**53  # integers beyond +-2^53 travel as text (normalize._EXACT_FLOAT_INT)
_WIDE_DECIMAL = "1e37"  # decimals this wide are left to Python: no DECIMAL(38, 0) holds them

# Python's str.isspace() characters (what str.strip() and str.split() treat as space), as
# regular-expression escapes: an identifier of only these is empty.
_SPACES = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)


class ColumnKind(enum.Enum):
    """How a column's values are normalized (the type family, whatever the dialect's name)."""

    TEXT = "text"
    BOOLEAN = "boolean"
    INTEGER = "integer"
    DOUBLE = "double"
    DECIMAL = "decimal"
    TIMESTAMP = "timestamp"  # with or without time zone: Unix seconds either way
    DATE = "date"
    JSON = "json"
    BINARY = "binary"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: ColumnKind


class _Sql:
    """The few expressions that differ by dialect; DuckDB here, PostgreSQL below."""

    first_control = 0  # the first control character a text value can hold
    # Appended to a subquery whose computed columns the outer query reads more than once, so
    # each is computed once per row (PostgreSQL pulls a simple subquery up into its parent).
    fence = ""

    def quote(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def text(self, x: str) -> str:
        return f"CAST({x} AS VARCHAR)"

    def json_string(self, x: str) -> str:
        return f"CAST(to_json({x}) AS VARCHAR)"

    def json_text(self, x: str) -> str:
        return f"CAST(json({x}) AS VARCHAR)"  # minified, as the database prints it

    def byte_length(self, x: str) -> str:
        return f"strlen({x})"

    def matches(self, x: str, pattern: str) -> str:
        return f"regexp_matches({x}, '{pattern}')"

    def char_class(self, chars: str) -> str:
        return "".join(f"\\x{{{ord(c):x}}}" for c in chars)

    def is_nan(self, x: str) -> str:
        return f"isnan({x})"

    def is_inf(self, x: str) -> str:
        return f"isinf({x})"

    def number(self, x: str) -> str:
        return f"CAST({x} AS VARCHAR)"

    def bigint(self, x: str) -> str:
        return f"CAST({x} AS BIGINT)"

    def seconds(self, x: str) -> str:
        us = f"epoch_us({x})"
        return f"CAST(({us} - (({us} % 1000000 + 1000000) % 1000000)) // 1000000 AS VARCHAR)"

    def date_seconds(self, x: str) -> str:
        return f"CAST(({x} - DATE '1970-01-01') * 86400 AS VARCHAR)"

    def decimal_infinite(self, x: str) -> str:
        return "FALSE"  # DuckDB's DECIMAL has no infinity

    def decimal_nan(self, x: str) -> str:
        return "FALSE"

    def inexact_double(self, x: str) -> str:
        """True where the database's text of a double is not orjson's: DuckDB writes
        ``5e-08`` where orjson writes ``5e-8`` (magnitudes 1e-9 to 1e-5)."""
        return f"({x} <> 0 AND abs({x}) < 1e-4)"

    def inexact_text(self, x: str) -> str | None:
        """True where the JSON string of a text is not orjson's; None where the texts are
        checked once per row instead, on the attributes' JSON (:meth:`inexact_json`)."""
        return None

    def inexact_json(self, attributes: str) -> str | None:
        """True where a row's attributes JSON (``attributes``) is not orjson's text: DuckDB
        escapes a few control characters in capitals (``\\u000B``), orjson in small
        letters. One substring search of the built text finds the rows with any ``\\u00``
        escape at all (few have one), and only those meet the regular expression; one per
        text column took about a third of the checks' time (bench/README.md, "Texts checked
        once per row"). A text that holds a backslash and ``u00`` itself also matches and
        is left to Python, whose bytes are right for every row. None where
        :meth:`inexact_text` checks each text."""
        escaped = self.matches(attributes, "\\\\u00[01][A-F]")
        return f"(contains({attributes}, '\\u00') AND {escaped})"

    # -- the previous snapshot (updates) ---------------------------------------------------

    def parse_previous(self, text: str, names: Sequence[str]) -> str:
        """The previous snapshot's attributes text parsed once per row, in the form
        :meth:`member` reads. DuckDB: the members ``names`` as a list of JSON values, all
        extracted by one parse (JSON Pointer paths, RFC 6901: ``~`` and ``/`` escaped)."""
        paths = ", ".join(sql_literal("/" + n.replace("~", "~0").replace("/", "~1")) for n in names)
        return f"json_extract({text}, [{paths}])"

    def member(self, parsed: str, names: Sequence[str], name: str) -> str:
        """The previous snapshot's member ``name`` (one of ``names``), NULL where absent."""
        return f"{parsed}[{list(names).index(name) + 1}]"

    def same_json(self, member: str, fragment: str) -> str:
        """True where a member of the snapshot and a value's JSON text are the same JSON
        value. Both are printed again by the database's JSON writer (DuckDB: text equality
        of two yyjson prints), which keeps ``1`` and ``1.0`` apart as Python's types do."""
        return f"({member} = json({fragment}))"

    def other_keys(self, text: str, known: Sequence[str]) -> str:
        """The keys of the snapshot's attributes ``text`` not among ``known``, as an array
        :meth:`joined` reads. DuckDB: a JSON merge patch of nulls removes the known ones
        (RFC 7396), without a lambda (whose syntax changed in DuckDB 1.3)."""
        # A space after each colon: ":null" would read as a bind parameter in sa.text.
        patch = "{" + ", ".join(f"{orjson_key(n)}: null" for n in known) + "}"
        return f"json_keys(json_merge_patch({text}, {sql_literal(patch)}))"

    def joined(self, keys: str, separator: str) -> str:
        """The array ``keys`` as one text, ``separator`` between them; '' for none."""
        return f"COALESCE(array_to_string({keys}, {sql_literal(separator)}), '')"


class _PostgresSql(_Sql):
    first_control = 1  # PostgreSQL text holds no NUL
    # src/backend/optimizer/prep/prepjointree.c, is_simple_subquery: OFFSET keeps it apart.
    fence = " OFFSET 0"

    def text(self, x: str) -> str:
        return f"CAST({x} AS TEXT)"

    def json_string(self, x: str) -> str:
        return f"CAST(to_json(CAST({x} AS TEXT)) AS TEXT)"

    def json_text(self, x: str) -> str:
        return f"CAST({x} AS TEXT)"

    def byte_length(self, x: str) -> str:
        return f"octet_length({x})"

    def matches(self, x: str, pattern: str) -> str:
        return f"({x} ~ '{pattern}')"

    def char_class(self, chars: str) -> str:
        return "".join(f"\\u{ord(c):04x}" for c in chars)

    def is_nan(self, x: str) -> str:
        return f"({x} = 'NaN'::float8)"

    def is_inf(self, x: str) -> str:
        return f"({x} IN ('Infinity'::float8, '-Infinity'::float8))"

    def number(self, x: str) -> str:
        return f"CAST({x} AS TEXT)"

    def seconds(self, x: str) -> str:
        return f"CAST(CAST(floor(extract(epoch FROM {x})) AS BIGINT) AS TEXT)"

    def date_seconds(self, x: str) -> str:
        return f"CAST(CAST({x} - DATE '1970-01-01' AS BIGINT) * 86400 AS TEXT)"

    def decimal_infinite(self, x: str) -> str:
        return f"({x} IN ('Infinity'::numeric, '-Infinity'::numeric))"

    def decimal_nan(self, x: str) -> str:
        return f"({x} = 'NaN'::numeric)"

    def inexact_double(self, x: str) -> str:
        # PostgreSQL also writes 1e+15-like forms from 1e11 up (NaN is above every number).
        return f"(({x} <> 0 AND abs({x}) < 1e-4) OR abs({x}) >= 1e11)"

    def inexact_json(self, attributes: str) -> str | None:
        return None  # PostgreSQL's texts are orjson's (inexact_text: nothing to check)

    def parse_previous(self, text: str, names: Sequence[str]) -> str:
        return f"CAST({text} AS jsonb)"

    def member(self, parsed: str, names: Sequence[str], name: str) -> str:
        return f"({parsed} -> {sql_literal(name)})"

    def same_json(self, member: str, fragment: str) -> str:
        # jsonb's text, not jsonb's = (which holds 1 and 1.0 equal): a numeric keeps the
        # scale it was written with, so the text tells 1 from 1.0 as Python's types do.
        return f"(CAST({member} AS TEXT) = CAST(CAST({fragment} AS jsonb) AS TEXT))"

    def other_keys(self, text: str, known: Sequence[str]) -> str:
        listed = ", ".join(sql_literal(n) for n in known)
        return (
            f"ARRAY(SELECT jsonb_object_keys(CAST({text} AS jsonb)"
            f" - CAST(ARRAY[{listed}] AS TEXT[])))"
        )


class _SnowflakeSql(_Sql):
    """Snowflake's documented functions (TO_JSON, OCTET_LENGTH, REGEXP_LIKE, DATE_PART);
    tested through fakesnow, which translates them to DuckDB."""

    def quote(self, name: str) -> str:
        # ``name`` is the column as the rows name it: snowflake-sqlalchemy lowercases an
        # all-uppercase identifier. "Unquoted identifiers are stored and resolved in
        # uppercase ... an unquoted identifier is equivalent to a capitalized double-quoted
        # identifier", and a double-quoted one is case-sensitive (Snowflake docs, "Identifier
        # requirements"): "user_id" would name no column, "USER_ID" names user_id. fakesnow's
        # DuckDB ignores the case of quoted identifiers and accepts either.
        if getattr(name, "quote", None) is not True and _PLAIN_LOWER.fullmatch(name):
            name = name.upper()
        return super().quote(name)

    def json_string(self, x: str) -> str:
        return f"TO_JSON(TO_VARIANT(CAST({x} AS VARCHAR)))"

    def json_text(self, x: str) -> str:
        return f"TO_JSON({x})"

    def byte_length(self, x: str) -> str:
        # OCTET_LENGTH of the UTF-8 bytes: fakesnow's DuckDB knows octet_length for BLOB only.
        return f"OCTET_LENGTH(TO_BINARY({x}, 'UTF-8'))"

    def char_class(self, chars: str) -> str:
        # The characters themselves: a backslash in a Snowflake literal is an escape.
        return chars

    def matches(self, x: str, pattern: str) -> str:
        # REGEXP_LIKE matches the whole text (implicitly anchored): a search needs .* around it.
        if not pattern.startswith("^"):
            pattern = f".*{pattern}.*"
        return f"REGEXP_LIKE({x}, '{pattern}', 's')"

    def is_nan(self, x: str) -> str:
        return f"({x} = 'NaN'::FLOAT)"

    def inexact_text(self, x: str) -> str:
        """True for a text holding a character JSON writers escape differently: a control
        character (``\\n`` or ``\\u000a``, capitals or not), DEL, U+2028/U+2029. TO_JSON's
        documentation does not say how it escapes (Snowflake docs, TO_JSON), so those rows
        are left to Python; fakesnow's DuckDB escapes some controls in capitals."""
        controls = "".join(map(chr, [*range(0x20), 0x7F, 0x2028, 0x2029]))
        return self.matches(x, f"[{self.char_class(controls)}]")

    def inexact_json(self, attributes: str) -> str | None:
        return None

    def inexact_double(self, x: str) -> str:
        """True but for an integral double within 2^53, which the SQL writes as an integer
        (exact). Snowflake does not document the text of a FLOAT cast to VARCHAR (shortest
        round-trip or not; the numeric data types page gives a DOUBLE "approximately 15
        digits" of precision), so any other double is left to Python, which writes the
        shortest round-trip form."""
        return f"NOT ({x} = trunc({x}) AND abs({x}) < {_EXACT})"

    def is_inf(self, x: str) -> str:
        return f"({x} IN ('inf'::FLOAT, '-inf'::FLOAT))"

    def seconds(self, x: str) -> str:
        micros = f"DATE_PART(epoch_microsecond, {x})"
        return f"CAST(CAST(FLOOR({micros} / 1000000) AS NUMBER(38, 0)) AS VARCHAR)"

    def date_seconds(self, x: str) -> str:
        return f"CAST(DATEDIFF(day, DATE '1970-01-01', {x}) * 86400 AS VARCHAR)"

    def parse_previous(self, text: str, names: Sequence[str]) -> str:
        return f"PARSE_JSON({text})"

    def member(self, parsed: str, names: Sequence[str], name: str) -> str:
        # Bracket notation takes the field name as it is (GET_PATH's dots would be a path).
        return f"{parsed}[{sql_literal(name)}]"

    def same_json(self, member: str, fragment: str) -> str:
        # [open] Not measured on Snowflake (fakesnow runs it on DuckDB): TO_JSON of both
        # VARIANTs, so a string never equals a number as a VARIANT comparison might.
        return f"(TO_JSON({member}) = TO_JSON(PARSE_JSON({fragment})))"

    def other_keys(self, text: str, known: Sequence[str]) -> str:
        listed = ", ".join(sql_literal(n) for n in known)
        return f"ARRAY_EXCEPT(OBJECT_KEYS(PARSE_JSON({text})), ARRAY_CONSTRUCT({listed}))"


_DIALECTS: dict[str, _Sql] = {
    "duckdb": _Sql(),
    "postgresql": _PostgresSql(),
    "snowflake": _SnowflakeSql(),
}


def sql_literal(text: str) -> str:
    """``text`` as a SQL string literal (quotes doubled), where a statement takes no bind
    parameters (PostgreSQL's CREATE TABLE AS) or builds its text once.

    A backslash is written as ``CHR(92)`` between literals: Snowflake reads backslash escape
    sequences inside single-quoted string constants (Snowflake docs, "Escape sequences in
    single-quoted string constants", data-types-text), where DuckDB and PostgreSQL (with
    standard_conforming_strings) take the backslash as it is; CHR(92) is a backslash in all
    three, so one text serves every dialect (an attribute named ``a\b``, the JSON escape
    of a quote in one named ``a"b``)."""
    if "\\" not in text:
        return "'" + text.replace("'", "''") + "'"
    parts = ("'" + part.replace("'", "''") + "'" for part in text.split("\\"))
    return "(" + " || CHR(92) || ".join(parts) + ")"


def _integer_json(d: _Sql, x: str) -> str:
    return (
        f"CASE WHEN {x} > -{_EXACT} AND {x} < {_EXACT} THEN {d.number(x)}"
        f" ELSE '\"' || {d.number(x)} || '\"' END"
    )


def _value_json(d: _Sql, x: str, kind: ColumnKind) -> str:
    """The JSON text of a non-NULL value, NULL where the value normalizes to NULL (NaN)."""
    if kind is ColumnKind.TEXT:
        return d.json_string(x)
    if kind is ColumnKind.BOOLEAN:
        return f"CASE WHEN {x} THEN 'true' WHEN NOT {x} THEN 'false' END"
    if kind is ColumnKind.INTEGER:
        return _integer_json(d, x)
    if kind is ColumnKind.DOUBLE:
        # Integral doubles within 2^53 are integers, as 1.0 (DOUBLE) and 1 (NUMBER) must hash
        # alike; the rest keep the database's shortest round-trip form.
        return (
            f"CASE WHEN {d.is_nan(x)} OR {d.is_inf(x)} THEN NULL"
            f" WHEN {x} = trunc({x}) AND abs({x}) < {_EXACT} THEN {d.number(d.bigint(x))}"
            f" ELSE {d.number(x)} END"
        )
    if kind is ColumnKind.DECIMAL:
        # A fractional decimal becomes its double, and that double follows the DOUBLE rule
        # (one of more than ~15 digits can round to an integral double).
        as_double = _value_json(d, f"CAST({x} AS DOUBLE PRECISION)", ColumnKind.DOUBLE)
        return (
            f"CASE WHEN {d.decimal_nan(x)} OR {d.decimal_infinite(x)} THEN NULL"
            f" WHEN abs({x}) >= {_WIDE_DECIMAL} THEN NULL"  # python_only: beyond DECIMAL(38)
            f" WHEN {x} = trunc({x}) THEN {_integer_json(d, f'CAST({x} AS DECIMAL(38, 0))')}"
            f" ELSE {as_double} END"
        )
    if kind is ColumnKind.TIMESTAMP:
        return d.seconds(x)
    if kind is ColumnKind.DATE:
        return d.date_seconds(x)
    if kind is ColumnKind.JSON:
        # A JSON null is a NULL to the Python path (the driver decodes both to None): left out.
        return f"NULLIF({d.json_text(x)}, 'null')"
    return "NULL"  # BINARY: the row is rejected


def _bad_value(d: _Sql, x: str, kind: ColumnKind) -> tuple[str, str] | None:
    """(condition, reason) of a value that rejects its row, worded as normalize words it."""
    if kind is ColumnKind.BINARY:
        return f"{x} IS NOT NULL", "binary values cannot be sent to Customer.io"
    if kind is ColumnKind.DOUBLE:
        return d.is_inf(x), "infinite number has no JSON form"
    if kind is ColumnKind.DECIMAL:
        return d.decimal_infinite(x), "infinite decimal has no JSON form"
    return None


def _python_only(d: _Sql, x: str, kind: ColumnKind) -> str | None:
    """SQL true where this value's bytes would not be the Python path's (the same JSON value,
    other text), so the row is left to Python: a nested value (Python sorts its keys and
    writes ``1.0`` as ``1``), a double the database prints in another exponent form, a text
    it escapes otherwise, a decimal too wide for the SQL conversion."""
    if kind is ColumnKind.JSON:
        return f"{x} IS NOT NULL"
    if kind is ColumnKind.TEXT:
        return d.inexact_text(x)
    if kind is ColumnKind.DOUBLE:
        return d.inexact_double(x)
    if kind is ColumnKind.DECIMAL:
        double = f"CAST({x} AS DOUBLE PRECISION)"
        return (
            f"(abs({x}) >= {_WIDE_DECIMAL} OR ({x} <> trunc({x}) AND {d.inexact_double(double)}))"
        )
    return None


# The driver's type of a column (DuckDB: its SQL name; PostgreSQL: its type OID) -> kind.
# Types not named here (FLOAT/REAL, lists, structs, UUID, TIME, CHAR(n)...) leave the
# model to the Python path.
_DUCKDB_KINDS = {
    "VARCHAR": ColumnKind.TEXT,
    "BOOLEAN": ColumnKind.BOOLEAN,
    **dict.fromkeys(
        (
            "TINYINT",
            "SMALLINT",
            "INTEGER",
            "BIGINT",
            "HUGEINT",
            "UTINYINT",
            "USMALLINT",
            "UINTEGER",
            "UBIGINT",
        ),
        ColumnKind.INTEGER,
    ),
    "DOUBLE": ColumnKind.DOUBLE,
    "TIMESTAMP": ColumnKind.TIMESTAMP,
    "TIMESTAMP WITH TIME ZONE": ColumnKind.TIMESTAMP,
    "DATE": ColumnKind.DATE,
    "JSON": ColumnKind.JSON,
    "BLOB": ColumnKind.BINARY,
}
_POSTGRES_KINDS = {
    "25": ColumnKind.TEXT,
    "1043": ColumnKind.TEXT,
    "16": ColumnKind.BOOLEAN,
    "20": ColumnKind.INTEGER,
    "21": ColumnKind.INTEGER,
    "23": ColumnKind.INTEGER,
    "701": ColumnKind.DOUBLE,
    "1700": ColumnKind.DECIMAL,
    "1114": ColumnKind.TIMESTAMP,
    "1184": ColumnKind.TIMESTAMP,
    "1082": ColumnKind.DATE,
    "114": ColumnKind.JSON,
    "3802": ColumnKind.JSON,
    "17": ColumnKind.BINARY,
}


# SnowflakeDialect.result_type's names. TIMESTAMP_TZ and _LTZ stay with Python: their Unix
# seconds in SQL (DATE_PART's epoch parts) are not tested against the connector's values.
_SNOWFLAKE_KINDS = {
    "TEXT": ColumnKind.TEXT,
    "BOOLEAN": ColumnKind.BOOLEAN,
    "REAL": ColumnKind.DOUBLE,
    "TIMESTAMP_NTZ": ColumnKind.TIMESTAMP,
    "DATE": ColumnKind.DATE,
    "VARIANT": ColumnKind.JSON,
    "OBJECT": ColumnKind.JSON,
    "ARRAY": ColumnKind.JSON,
    "BINARY": ColumnKind.BINARY,
}
_SNOWFLAKE_NUMBER = re.compile(r"NUMBER\((\d+),(\d+)\)")
# An identifier Snowflake stores in capitals when it is written unquoted, as its rows name
# it (lowercased by snowflake-sqlalchemy).
_PLAIN_LOWER = re.compile(r"[a-z_][a-z0-9_$]*")


def _snowflake_kind(type_name: str) -> ColumnKind | None:
    number = _SNOWFLAKE_NUMBER.fullmatch(type_name)
    if number:
        return ColumnKind.INTEGER if number[2] == "0" else ColumnKind.DECIMAL
    return _SNOWFLAKE_KINDS.get(type_name)


def _duckdb_kind(type_name: str) -> ColumnKind | None:
    if type_name.startswith("DECIMAL("):
        return ColumnKind.DECIMAL
    return _DUCKDB_KINDS.get(type_name)


_KINDS: dict[str, Callable[[str], ColumnKind | None]] = {
    "duckdb": _duckdb_kind,
    "postgresql": _POSTGRES_KINDS.get,
    "snowflake": _snowflake_kind,
}


def column_kind(dialect: str, type_name: str) -> ColumnKind | None:
    """The kind of a result column from its driver type, or None where SQL builds no
    payload for it (and on databases where no sync builds payloads)."""
    kind_of = _KINDS.get(dialect)
    return None if kind_of is None else kind_of(type_name)


def identifiers_text(dialect: str, head: str, tail: str, key: str) -> str:
    """SQL of the identifiers' JSON text: ``head``, the JSON string of the text ``key``,
    ``tail`` (:attr:`Payloads.identifier_parts`), in ``dialect`` (SQLAlchemy's name)."""
    return _text(sql_literal(head), _DIALECTS[dialect].json_string(key), sql_literal(tail))


def _text(*parts: str) -> str:
    return " || ".join(parts)


# The columns a payload relation adds to its source's (names no model column takes: a model's
# columns never start with the engine's ``__cio_`` prefix).
KEY = "__cio_pay_key"  # the key as text
ATTRIBUTES = "__cio_pay_attrs"  # the attributes' JSON text, keys sorted (the snapshot's)
CODE = "__cio_pay_code"  # the first rejection's code, NULL for a valid row
PYTHON_ONLY = "__cio_pay_python"  # 1 where the row is left to Python, else 0
# And those of a relation given the previous snapshots (``payloads(previous=...)``):
SEND = "__cio_pay_send"  # an update's item attributes; NULL for a row without a snapshot
# 1: an update with something to send (the Python path's UPDATE, sent or rejected by a
# limit), 0: nothing changed (its REFRESH: only the fingerprint is stored), NULL: a row
# without a snapshot, or one the record rejects (its REJECT).
CHANGED = "__cio_pay_changed"
_PREVIOUS = "__cio_pay_prev"  # the previous attributes, parsed (parse_previous)
_OTHERS = "__cio_pay_others"  # the previous attributes' names that are no model column's

REMOVED = '""'  # the Track API's removal form of an attribute, as JSON (diff.REMOVED)


@dataclass(frozen=True, slots=True)
class Payloads:
    """One model's payloads in SQL: a relation with every column of its source plus
    :data:`KEY`, :data:`ATTRIBUTES`, :data:`CODE` and :data:`PYTHON_ONLY` (and, given the
    previous snapshots, :data:`SEND` and :data:`CHANGED`), and the expressions that build
    the rest from those columns.

    The relation checks every row once (the code); the item text, the stored identifiers
    and a rejection's reason and field are built only where they are read, so a plan
    stores none of them: the item is the snapshot's attributes (an update's: the changed
    ones) with the identifiers around them, and a reason is needed for rejected rows only.
    """

    relation: str
    _model: Model
    _columns: tuple[Column, ...]
    _dialect: str
    _updates: bool = False

    def item(self, key: str, attributes: str) -> str:
        """The item's JSON text from the key text and the item's attributes' JSON text
        (:data:`ATTRIBUTES` of a new row, :data:`SEND` of an update)."""
        before, between, after = _item_parts(self._model)
        return _text(
            sql_literal(before),
            _DIALECTS[self._dialect].json_string(key),
            sql_literal(between),
            attributes,
            sql_literal(after),
        )

    def identifiers(self, key: str) -> str:
        """The identifiers' JSON text as the snapshot keeps them (keys sorted)."""
        return identifiers_text(self._dialect, *self.identifier_parts, key)

    @property
    def identifier_parts(self) -> tuple[str, str]:
        """The snapshot's identifiers text before and after the key's JSON string."""
        model = self._model
        if model.kind is Kind.PERSON:
            return _identifier_parts(model)  # one member: sorted already
        return '{"object_id":', ',"object_type_id":' + orjson_key(str(model.object_type_id)) + "}"

    def reason(self, alias: str) -> str:
        """A rejected row's reason, over ``alias`` (the relation); NULL for a valid row."""
        checks = self._checks(alias)
        return "CASE " + " ".join(f"WHEN {c.condition} THEN {c.reason}" for c in checks) + " END"

    def field(self, alias: str) -> str:
        """A rejected row's field, as the Python path names it; NULL for a valid row."""
        checks = self._checks(alias)
        return (
            "CASE "
            + " ".join(f"WHEN {c.condition} THEN {sql_literal(c.field)}" for c in checks)
            + " END"
        )

    def _checks(self, alias: str) -> list[_Check]:
        return _checks(self._dialect, self._model, self._columns, alias, updates=self._updates)


@dataclass(frozen=True, slots=True)
class _Check:
    condition: str
    code: RejectionCode
    reason: str  # SQL text
    field: str
    # A check of the record (normalize.to_record), met before the diff; the others are the
    # item's limits (operations.encode), met only by a row with something to send.
    record: bool = False
    email: bool = False  # the email identifier's form, whose reason Python words with repr()


def _id_type(model: Model) -> str:
    if model.kind not in (Kind.PERSON, Kind.OBJECT) or model.key is None:
        raise ValueError("payloads in SQL are built for person and object models only")
    id_type = model.identifier if model.kind is Kind.PERSON else "object_id"
    assert id_type
    return id_type


def _item_parts(model: Model) -> tuple[str, str, str]:
    """The item's text around the identifier's JSON string and the attributes' text: what
    :meth:`Payloads.item` writes and the item-size check counts."""
    head, tail = _identifier_parts(model)
    before = f'{{"type":"{model.kind.value}","action":"identify","identifiers":{head}'
    return before, tail + ',"attributes":', "}"


def _identifier_parts(model: Model) -> tuple[str, str]:
    """The item's identifiers as the text before and after the identifier's JSON string."""
    if model.kind is Kind.PERSON:
        return "{" + orjson_key(_id_type(model)) + ":", "}"
    type_id = orjson_key(str(model.object_type_id))
    return '{"object_type_id":' + type_id + ',"object_id":', "}"


def _order(model: Model, others: Sequence[Column]) -> list[str]:
    """Python's attribute order (column order, the identifier last, or in place when a
    column has its name): it decides which failure is reported first; the text is sorted."""
    order = [c.name for c in others]
    if _id_type(model) not in order:
        order.append(_id_type(model))
    return order


def _values(
    d: _Sql, model: Model, others: Sequence[Column], alias: str, key: str
) -> dict[str, str]:
    out = {c.name: _value_json(d, f"{alias}.{d.quote(c.name)}", c.kind) for c in others}
    out[_id_type(model)] = d.json_string(key)
    return out


def _checks(
    dialect: str,
    model: Model,
    columns: Sequence[Column],
    alias: str,
    *,
    updates: bool = False,
) -> list[_Check]:
    """The rejections in the order the Python path meets them; the first failure wins.
    With ``updates`` the item's size is that of the attributes it sends (:data:`SEND`, an
    update's changed ones) where the row has a snapshot."""
    d = _DIALECTS[dialect]
    name = _id_type(model)
    assert model.key is not None
    others = [c for c in columns if c.name != model.key]
    key = f"{alias}.{KEY}"
    spaces = d.char_class(_SPACES)
    control = d.char_class("".join(map(chr, [*range(d.first_control, 0x20), 0x7F])))
    checks = [
        _Check(
            f"{key} IS NULL",
            RejectionCode.NULL_KEY,
            sql_literal(f"key is NULL ({model.key})"),
            model.key,
            record=True,
        ),
        _Check(
            d.matches(key, f"^[{spaces}]*$"),
            RejectionCode.INVALID_IDENTIFIER,
            sql_literal(f"identifier {name} is empty"),
            name,
            record=True,
        ),
        _Check(
            f"{d.byte_length(key)} > {MAX_IDENTIFIER_BYTES}",
            RejectionCode.TOO_LONG,
            _text(
                sql_literal(f"identifier {name} is "),
                d.text(d.byte_length(key)),
                sql_literal(f" bytes, over the {MAX_IDENTIFIER_BYTES}-byte limit"),
            ),
            name,
            record=True,
        ),
        _Check(
            d.matches(key, f"[{control}]"),
            RejectionCode.INVALID_IDENTIFIER,
            sql_literal(f"identifier {name} contains control characters"),
            name,
            record=True,
        ),
    ]
    if name == "email":
        checks.append(
            _Check(
                f"NOT {d.matches(key, f'^[^{spaces}]+@[^@{spaces}]+$')}",
                RejectionCode.INVALID_IDENTIFIER,
                _text(  # repr() of a text without quotes, backslashes or unprintables
                    sql_literal("identifier email '"),
                    key,
                    sql_literal("' is not an email address"),
                ),
                name,
                record=True,
                email=True,
            )
        )
    for c in others:
        bad = _bad_value(d, f"{alias}.{d.quote(c.name)}", c.kind)
        if bad is not None:
            checks.append(
                _Check(
                    bad[0],
                    RejectionCode.INVALID_VALUE,
                    sql_literal(f"column {c.name!r}: {bad[1]}"),
                    "attributes",
                    record=True,
                )
            )
    # The item's limits: operations.encode checks the record's attributes, all of them
    # (an update's too: limits.check_attributes of record.attributes), then the item.
    attributes = _order(model, others)
    if len(attributes) > MAX_ATTRIBUTES:  # fewer columns can never break the limit
        values = _values(d, model, others, alias, key)
        count = " + ".join(f"CASE WHEN {values[n]} IS NULL THEN 0 ELSE 1 END" for n in attributes)
        checks.append(
            _Check(
                f"({count}) > {MAX_ATTRIBUTES}",
                RejectionCode.TOO_MANY_ATTRIBUTES,
                _text(
                    d.text(f"({count})"),
                    sql_literal(
                        f" attributes, over the {MAX_ATTRIBUTES}-attribute limit"
                        " per person, object or relationship"
                    ),
                ),
                "attributes",
            )
        )
    for c in others:
        if c.kind not in (ColumnKind.TEXT, ColumnKind.JSON):
            continue  # numbers and booleans are far below any limit
        x = f"{alias}.{d.quote(c.name)}"
        size = d.byte_length(x if c.kind is ColumnKind.TEXT else d.json_text(x))
        checks.append(
            _Check(
                f"{size} > {MAX_ATTRIBUTE_VALUE_BYTES}",
                RejectionCode.TOO_LONG,
                _text(
                    sql_literal(f"attribute {c.name!r} value is "),
                    d.text(size),
                    sql_literal(f" bytes, over the {MAX_ATTRIBUTE_VALUE_BYTES}-byte limit"),
                ),
                c.name,
            )
        )
    # The item's size without building its text: the fixed parts plus the identifier's
    # JSON string and the text of the attributes it sends (limits.check_item_size of the
    # item encode built: an update's holds only what changed, so a row whose whole item
    # would be over 32 KB can still be updated).
    sent = f"{alias}.{ATTRIBUTES}"
    if updates:
        sent = f"COALESCE({alias}.{SEND}, {sent})"
    fixed = len("".join(_item_parts(model)).encode())
    item_size = f"({fixed} + {d.byte_length(d.json_string(key))} + {d.byte_length(sent)})"
    checks.append(
        _Check(
            f"{item_size} > {MAX_ITEM_BYTES}",
            RejectionCode.ITEM_TOO_LARGE,
            _text(
                sql_literal("item is "),
                d.text(item_size),
                sql_literal(f" bytes, over the {MAX_ITEM_BYTES}-byte limit per item"),
            ),
            "item",
        )
    )
    return checks


def _object(members: Sequence[str]) -> str:
    """A JSON object's text from member texts that each start with a comma ('' for none)."""
    return f"'{{' || substr({' || '.join(members)}, 2) || '}}'"


def _member(name: str, value: str) -> str:
    return _text(sql_literal("," + orjson_key(name) + ":"), value)


def _update_attributes(
    d: _Sql, model: Model, others: Sequence[Column], alias: str, *, full_resync: bool
) -> str:
    """An update's item attributes over ``alias`` (a row with :data:`_PREVIOUS`), as
    diff.upsert_change builds them from the previous snapshot (diff.changed_attributes):
    the attributes whose normalized value is new or differs from the snapshot's, and
    ``""`` (the Track API's removal form, README "Semantics worth knowing") for those the
    snapshot holds and the row does not: a NULL now, the key column's name, and names no
    model column has (a dropped column; left alone under ``removed_columns: keep``).

    The identifier never changes for a key (the plan joins on it), so an update leaves it
    to ``identifiers``; a row whose snapshot holds another value for it is left to Python
    (:func:`_update_python_only`). A full resync sends every attribute, and the removals.

    Members are in sorted name order, the removals of dropped columns last: the Python
    path's order differs (record order), the JSON value and its size do not.
    """
    id_type = _id_type(model)
    assert model.key is not None
    values = _values(d, model, others, alias, f"{alias}.{KEY}")
    read = _previous_names(model, others)
    parsed = f"{alias}.{_PREVIOUS}"
    members = []
    for name in sorted({*values, model.key}):
        if name == id_type:
            if full_resync:
                members.append(_member(name, values[name]))
            continue
        previous = d.member(parsed, read, name)
        removal = f"WHEN {previous} IS NOT NULL THEN {sql_literal(',' + orjson_key(name) + ':' + REMOVED)}"
        if name not in values:  # the key column: never an attribute (it is the identifier)
            members.append(f"CASE {removal} ELSE '' END")
            continue
        value = values[name]
        if full_resync:
            sent = _member(name, value)
        else:
            unchanged = f"{previous} IS NOT NULL AND {d.same_json(previous, value)}"
            sent = f"CASE WHEN {unchanged} THEN '' ELSE {_member(name, value)} END"
        members.append(f"CASE WHEN {value} IS NOT NULL THEN {sent} {removal} ELSE '' END")
    if model.removed_columns is RemovedColumns.REMOVE:
        # Every name a snapshot holds is a column name (never empty: models.py refuses
        # one) or the identifier; those left are plain text (else left to Python), so
        # joined with '":"","' they are the removals' text.
        dropped = d.joined(f"{alias}.{_OTHERS}", '":"","')
        removals = _text(sql_literal(',"'), dropped, sql_literal('":' + REMOVED))
        members.append(f"CASE WHEN {dropped} = '' THEN '' ELSE {removals} END")
    return _object(members)


def _previous_names(model: Model, others: Sequence[Column]) -> list[str]:
    """The snapshot members an update reads: every attribute's and the key column's."""
    assert model.key is not None
    return sorted({*_order(model, others), model.key})


def _update_python_only(
    d: _Sql, model: Model, others: Sequence[Column], alias: str, *, full_resync: bool
) -> list[str]:
    """SQL true where an update's SQL would not be exact, so the row is left to Python: a
    snapshot whose identifier attribute is not the key's text (an integer ``id`` written
    before identifiers became text, which normalize.upgrade_previous reads as its text),
    and names of dropped columns that JSON must escape."""
    parsed = f"{alias}.{_PREVIOUS}"
    conditions = []
    if not full_resync:  # a full resync sends the identifier whatever the snapshot holds
        previous = d.member(parsed, _previous_names(model, others), _id_type(model))
        key = d.json_string(f"{alias}.{KEY}")
        conditions.append(f"({previous} IS NULL OR NOT {d.same_json(previous, key)})")
    if model.removed_columns is RemovedColumns.REMOVE:
        names = d.joined(f"{alias}.{_OTHERS}", "")  # plain iff every name is
        quote = sql_literal('"')
        conditions.append(f"{d.json_string(names)} <> {_text(quote, names, quote)}")
    return [f"({parsed} IS NOT NULL AND ({' OR '.join(conditions)}))"] if conditions else []


def payloads(
    dialect: str,
    model: Model,
    columns: Sequence[Column],
    source: str,
    *,
    key: str | None = None,
    previous: str | None = None,
    full_resync: bool = False,
) -> Payloads:
    """The payloads of every row of ``source`` (a relation with the model's columns) of a
    person or object model; ``key`` is the key's text over alias ``m`` of ``source`` (by
    default the key column as text).

    ``previous`` names the column of ``source`` holding the row's previous snapshot
    attributes (NULL for a row without one): such a row's item is an update's
    (:func:`_update_attributes`), and :data:`CHANGED` says whether it has anything to send.
    """
    d = _DIALECTS[dialect]
    _id_type(model)
    assert model.key is not None
    others = [c for c in columns if c.name != model.key]
    key = key or d.text(f"m.{d.quote(model.key)}")
    inner = _values(d, model, others, "m", key)
    attributes = _object(
        [f"COALESCE({_member(n, inner[n])}, '')" for n in sorted(_order(model, others))]
    )
    checks = _checks(dialect, model, columns, "a", updates=previous is not None)
    python_only = [
        cond
        for c in others
        if (cond := _python_only(d, f"a.{d.quote(c.name)}", c.kind)) is not None
    ]
    escapes = d.inexact_json(f"a.{ATTRIBUTES}")
    if escapes is not None and any(c.kind is ColumnKind.TEXT for c in others):
        python_only.append(escapes)
    if _id_type(model) == "email":
        # Python's reason quotes the address with repr(), which SQL cannot write for every
        # text (quotes, backslashes, unprintables): such a row is left to Python.
        python_only += [c.condition for c in checks if c.email]
    rows = f"SELECT m.*, {key} AS {KEY}, {attributes} AS {ATTRIBUTES}"
    changed = ""
    if previous is None:
        code = " ".join(f"WHEN {c.condition} THEN '{c.code.value}'" for c in checks)
        rows = f"{rows} FROM ({source}) AS m"
    else:
        text = f"m.{d.quote(previous)}"
        parse = d.parse_previous(text, _previous_names(model, others))
        rows = f"{rows}, {parse} AS {_PREVIOUS}"
        if model.removed_columns is RemovedColumns.REMOVE:
            known = sorted({*_order(model, others), *(c.name for c in columns)})
            rows = f"{rows}, {d.other_keys(text, known)} AS {_OTHERS}"
        send = _update_attributes(d, model, others, "b", full_resync=full_resync)
        rows = f"""
            SELECT b.*, CASE WHEN b.{_PREVIOUS} IS NOT NULL THEN {send} END AS {SEND}
            FROM ({rows} FROM ({source}) AS m{d.fence}) AS b{d.fence}
        """
        python_only += _update_python_only(d, model, others, "a", full_resync=full_resync)
        # diff.upsert_change: a record it rejects is a REJECT; then an update with nothing
        # to send is a REFRESH (no limit is checked), and only then encode's limits apply.
        record = [c for c in checks if c.record]
        nothing = f"a.{SEND} = '{{}}'"
        code = " ".join(
            [f"WHEN {c.condition} THEN '{c.code.value}'" for c in record]
            + [f"WHEN {nothing} THEN NULL"]
            + [f"WHEN {c.condition} THEN '{c.code.value}'" for c in checks if not c.record]
        )
        rejected = " OR ".join(c.condition for c in record)
        changed = (
            f", CASE WHEN a.{SEND} IS NULL OR {rejected} THEN NULL"
            f" WHEN {nothing} THEN 0 ELSE 1 END AS {CHANGED}"
        )
    python = " OR ".join(python_only) or "FALSE"
    relation = f"""
        SELECT a.*, CASE {code} END AS {CODE},
               CASE WHEN {python} THEN 1 ELSE 0 END AS {PYTHON_ONLY}{changed}
        FROM ({rows}) AS a
    """
    return Payloads(relation, model, tuple(columns), dialect, previous is not None)


def payload_select(
    dialect: str,
    model: Model,
    columns: Sequence[Column],
    source: str,
    *,
    previous: str | None = None,
    full_resync: bool = False,
) -> str:
    """The SELECT of (key, item, snapshot, reject_code, reject_reason, reject_field,
    identifiers, python_only, changed) per row of ``source``, for a person or object
    model; ``previous`` as :func:`payloads` takes it (``changed`` is NULL without it)."""
    built = payloads(dialect, model, columns, source, previous=previous, full_resync=full_resync)
    valid = f"p.{CODE} IS NULL"
    sent = f"p.{ATTRIBUTES}" if previous is None else f"COALESCE(p.{SEND}, p.{ATTRIBUTES})"
    changed = "NULL" if previous is None else f"p.{CHANGED}"
    return f"""
        SELECT p.{KEY} AS key,
               CASE WHEN {valid} THEN {built.item(f"p.{KEY}", sent)} END AS item,
               CASE WHEN {valid} THEN p.{ATTRIBUTES} END AS snapshot,
               p.{CODE} AS reject_code,
               CASE WHEN NOT {valid} THEN {built.reason("p")} END AS reject_reason,
               CASE WHEN NOT {valid} THEN {built.field("p")} END AS reject_field,
               {built.identifiers(f"p.{KEY}")} AS identifiers, p.{PYTHON_ONLY} AS python_only,
               {changed} AS changed
        FROM ({built.relation}) AS p
    """


def orjson_key(name: str) -> str:
    """A JSON string as orjson writes it (the snapshot's canonical form)."""
    return orjson.dumps(name).decode()
