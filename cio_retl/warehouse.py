"""Warehouse access through SQLAlchemy, and the few SQL expressions that differ by dialect.

The diff never pulls a whole model into Python: it asks the database for a per-row
fingerprint and compares it with the snapshot where both live. What differs between
DuckDB, PostgreSQL and Snowflake (casting a key to text, fingerprinting a whole row) is kept
here, so the rest of the engine writes dialect-neutral SQL.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cio_retl.errors import ConfigError, ModelError
from cio_retl.models import Kind, Model

# Columns the diff adds to a model's rows; a model may not use these names.
KEY_COLUMN = "__cio_key"
FINGERPRINT_COLUMN = "__cio_fp"
DUPLICATES_COLUMN = "__cio_n"
PREVIOUS_COLUMN = "__cio_prev"
INTERNAL_COLUMNS = frozenset({KEY_COLUMN, FINGERPRINT_COLUMN, DUPLICATES_COLUMN, PREVIOUS_COLUMN})

# Between the two key parts of a relationship row; identifiers with control characters are
# rejected before sending, so the composite key text is unambiguous.
KEY_SEPARATOR = "\x1f"

FETCH_ROWS = 5_000


def create_engine(url: str) -> Engine:
    """An engine for ``url``; errors name the variable, never the URL (it may hold a password)."""
    try:
        return sa.create_engine(url)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"cannot use the database URL ({type(exc).__name__}: {_redact(str(exc), url)}); "
            "check CIO_RETL_WAREHOUSE_URL / CIO_RETL_STATE_URL and the installed extras"
        ) from None


def _redact(message: str, url: str) -> str:
    try:
        password = sa.engine.make_url(url).password
    except sa.exc.ArgumentError:
        return message
    return message.replace(password, "***") if password else message


class Dialect:
    """SQL snippets for one database; built from the engine, never from guesses."""

    def __init__(self, engine: Engine) -> None:
        self.name = engine.dialect.name
        self._preparer = engine.dialect.identifier_preparer

    def quote(self, identifier: str) -> str:
        return str(self._preparer.quote(identifier))

    def as_text(self, expression: str) -> str:
        return f"CAST({expression} AS VARCHAR)"

    def row_fingerprint(self, alias: str) -> str:
        """A digest of every column of a row, stable between runs of one database."""
        if self.name == "duckdb":
            return f"md5(CAST(to_json({alias}) AS VARCHAR))"
        if self.name == "postgresql":
            return f"md5(CAST(row_to_json({alias}) AS TEXT))"
        if self.name == "snowflake":
            return f"md5(to_json(object_construct_keep_null({alias}.*)))"
        raise ConfigError(
            f"unsupported database dialect {self.name!r} (duckdb, postgresql, snowflake)"
        )

    def key_expression(self, model: Model, alias: str) -> str:
        parts = [self.as_text(f"{alias}.{self.quote(c)}") for c in model.key_columns]
        if len(parts) == 1:
            return parts[0]
        return f" || chr({ord(KEY_SEPARATOR)}) || ".join(parts)


class Warehouse:
    """Runs model SQL; one per run, shared by the diff and the model checks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = Dialect(engine)

    def columns(self, model: Model) -> list[str]:
        """The model's result columns, checked against its header; raises :class:`ModelError`."""
        try:
            with self.engine.connect() as conn:
                result = conn.execute(sa.text(f"SELECT * FROM ({model.sql}) AS m LIMIT 0"))
                columns = list(result.keys())
        except sa.exc.DBAPIError as exc:
            raise ModelError(
                str(model.path), f"SQL failed: {_db_message(exc)}", model.sql_line
            ) from None
        missing = [c for c in model.key_columns if c not in columns]
        if missing:
            raise ModelError(
                str(model.path),
                f"key column(s) {missing} not in the result columns {columns}",
                model.sql_line,
            )
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise ModelError(
                str(model.path), f"duplicate result columns {duplicated}", model.sql_line
            )
        reserved = sorted(INTERNAL_COLUMNS.intersection(columns))
        if reserved:
            raise ModelError(str(model.path), f"reserved column names {reserved}", model.sql_line)
        if model.kind is not Kind.RELATIONSHIP:
            clash = model.identifier if model.kind is Kind.PERSON else "object_id"
            if clash in columns and clash != model.key:
                raise ModelError(
                    str(model.path),
                    f"column {clash!r} would overwrite the identifier attribute; rename it",
                    model.sql_line,
                )
        return columns

    def stream(
        self, conn: Connection, sql: str, params: Mapping[str, Any] | None = None
    ) -> Iterator[Sequence[sa.Row[Any]]]:
        """Yield the result in chunks so memory stays flat whatever the model size."""
        result = conn.execution_options(stream_results=True).execute(
            sa.text(sql), dict(params or {})
        )
        while chunk := result.fetchmany(FETCH_ROWS):
            yield chunk


def _db_message(exc: sa.exc.DBAPIError) -> str:
    """The driver's own message, first line only (no SQL echo, no parameters)."""
    return str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
