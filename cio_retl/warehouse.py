"""Warehouse access through SQLAlchemy: model checks and streaming reads.

The diff never pulls a whole model into Python: it asks the database for a per-row
fingerprint and compares it with the snapshot, reading results in fixed-size chunks. What
differs between DuckDB, PostgreSQL and Snowflake lives in :mod:`cio_retl.dialects`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cio_retl.dialects import KEY_SEPARATOR as KEY_SEPARATOR  # re-exported
from cio_retl.dialects import Dialect as Dialect  # re-exported
from cio_retl.dialects import dialect_for, dialect_named
from cio_retl.errors import (
    CioRetlError,
    ConfigError,
    ModelError,
    TransientError,
    UnreachableError,
)
from cio_retl.models import Kind, Model, did_you_mean

# Columns the diff adds to a model's rows; a model may not use these names.
KEY_COLUMN = "__cio_key"
FINGERPRINT_COLUMN = "__cio_fp"
# The number inside a fingerprint (Dialect.fingerprint_numbers), where a join compares those.
FINGERPRINT_NUMBER_COLUMN = "__cio_fpn"
DUPLICATES_COLUMN = "__cio_n"
PREVIOUS_COLUMN = "__cio_prev"
# And those a run's plan (cio_retl.plan) adds to them.
SEQ_COLUMN = "__cio_seq"
SNAPSHOT_KEY_COLUMN = "__cio_snap"
SNAPSHOT_FINGERPRINT_COLUMN = "__cio_sfp"
IDENTIFIERS_COLUMN = "__cio_ids"
HELD_COLUMN = "__cio_held"
BUCKET_COLUMN = "__cio_bucket"  # a row's bucket, in a plan the bucket runs share
# What the database built for a row: the snapshot's attributes (NULL unless the row is sent
# from the plan), an update's item attributes (the changed ones; NULL for a new row, whose
# item carries the snapshot's), or the rejection (code, reason, field).
BUILT_SNAPSHOT_COLUMN = "__cio_snapshot"
BUILT_SEND_COLUMN = "__cio_send"
REJECT_CODE_COLUMN = "__cio_rcode"
REJECT_REASON_COLUMN = "__cio_rreason"
REJECT_FIELD_COLUMN = "__cio_rfield"
BUILT_COLUMNS = (
    BUILT_SNAPSHOT_COLUMN,
    BUILT_SEND_COLUMN,
    REJECT_CODE_COLUMN,
    REJECT_REASON_COLUMN,
    REJECT_FIELD_COLUMN,
)
# Of a row with a snapshot that the database diffed: 1 an update (sent or rejected), 0
# nothing to send (only its fingerprint is stored); NULL for every other row.
CHANGED_COLUMN = "__cio_changed"
# Every column the engine adds to a model's rows starts with this (those above, and the
# payload SQL's): a model's own may not.
RESERVED_PREFIX = "__cio_"
INTERNAL_COLUMNS = frozenset(
    {
        *BUILT_COLUMNS,
        CHANGED_COLUMN,
        KEY_COLUMN,
        FINGERPRINT_COLUMN,
        FINGERPRINT_NUMBER_COLUMN,
        DUPLICATES_COLUMN,
        PREVIOUS_COLUMN,
        SEQ_COLUMN,
        BUCKET_COLUMN,
        SNAPSHOT_KEY_COLUMN,
        SNAPSHOT_FINGERPRINT_COLUMN,
        IDENTIFIERS_COLUMN,
        HELD_COLUMN,
    }
)

FETCH_ROWS = 5_000


class Chunk(NamedTuple):
    """Rows of one fetch, and which of their positions hold JSON text to decode."""

    rows: Sequence[sa.Row[Any]]
    json_columns: frozenset[int]


URL_SETTINGS = "CIO_RETL_WAREHOUSE_URL / CIO_RETL_STATE_URL"


def create_engine(url: str, setting: str = URL_SETTINGS) -> Engine:
    """An engine for ``url``, with the settings its dialect gives every connection (DuckDB:
    its memory limit, see DuckDBDialect.prepare_engine); errors name the variable, never the
    URL (it may hold a password)."""
    try:
        engine = sa.create_engine(url)  # imports the URL's driver (its DBAPI module) now
    except (sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ConfigError(_driver_problem(url, setting, exc)) from None
    except sa.exc.ArgumentError as exc:
        raise ConfigError(
            f"{setting}: cannot use the database URL ({_redact(str(exc), url)})"
        ) from None
    dialect = dialect_named(engine.dialect.name)
    if dialect is not None:  # one cio-retl does not speak fails where it is used
        dialect.prepare_engine(engine)
    return engine


def duckdb_file(url: str) -> Path | None:
    """The database file a URL names, for a database that is a local file (DuckDB); None
    for other databases, ``:memory:`` and MotherDuck (``md:``), which have no local file."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return None  # create_engine reports it, naming the variable
    dialect = dialect_named(parsed.get_backend_name())
    return None if dialect is None else dialect.local_file(parsed)


def duckdb_file_exists(url: str) -> bool:
    """False only for a DuckDB URL whose file is not there: connecting would create it."""
    path = duckdb_file(url)
    return path is None or path.exists()


def require_duckdb_file(url: str, variable: str) -> None:
    """A DuckDB file that is not there is a typo, not an empty warehouse: stop (exit 2)
    naming it, before connecting creates an empty database in its place."""
    path = duckdb_file(url)
    if path is not None and not path.exists():
        raise ConfigError(
            f"{variable}: the DuckDB database {str(path)!r} does not exist "
            f"(resolved: {path.resolve()}); check the path"
        )


def _driver_problem(url: str, setting: str, exc: Exception) -> str:
    """Which URL form and extra to use when the URL's driver is not installed."""
    parsed = sa.engine.make_url(url)  # it parsed once already: create_engine got this far
    # Read from the URL's text: asking SQLAlchemy for the driver would load it again.
    missing = _redact(str(exc), url)
    dialect = dialect_named(parsed.drivername.partition("+")[0])
    if dialect is None:
        return f"{setting}: {parsed.drivername}:// cannot be loaded ({missing})"
    return dialect.missing_driver(setting, parsed.drivername, missing)


def database_error(engine: Engine, exc: sa.exc.DBAPIError) -> CioRetlError:
    """The engine's error for a database that refused or failed a connection.

    A server that cannot be reached (refused, timed out, name not resolved, shutting down,
    too many connections) is transient; wrong credentials or a database that does not
    exist are configuration errors, told apart by the SQLSTATE class the server reports
    (PostgreSQL docs, Appendix A "Error Codes": 28 invalid authorization, 3D invalid
    catalog name). Snowflake's connector raises OperationalError for network failures and
    ProgrammingError for a refused login. A database that is a local file (DuckDB) has
    nothing to reach: its dialect says what failed (Dialect.local_error). Messages name the
    host, never the password.
    """
    url = engine.url
    message = driver_message(exc, (engine,))
    name = engine.dialect.name
    dialect = dialect_named(name)
    local = None if dialect is None else dialect.local_error(url, message)
    if local is not None:
        return local
    where = _host(url)
    if isinstance(exc, _OPERATIONAL) and not _refused(exc, message):
        return UnreachableError(
            f"cannot reach the {name} database at {where}: {message} "
            "(nothing was sent; try again when it is back)"
        )
    return ConfigError(f"cannot connect to the {name} database at {where}: {message}")


# PEP 249's operational and interface errors: the database's operation, not the statement
# (see database_lost).
_OPERATIONAL = (sa.exc.OperationalError, sa.exc.InterfaceError)


def database_lost(exc: sa.exc.DBAPIError, engines: Sequence[Engine]) -> TransientError | None:
    """The engine's error for a database that failed while a run was under way (its
    connection terminated, the server shut down or restarted, a local file's I/O failed):
    transient, since what was acknowledged is kept and the next run resends the rest.

    Only the driver's operational and interface errors are (PEP 249: "errors that are
    related to the database's operation and not necessarily under the control of the
    programmer, e.g. an unexpected disconnect"), and those a dialect names as a server that
    did not answer (``Dialect.unanswered_errors``); others, a statement the database refused
    among them, are not a database failing, and stay as they are (None). Names the
    databases of ``engines`` whose driver raised it, by host or file, never a password.
    """
    unique = list(dict.fromkeys(engines))
    failed = [
        engine
        for engine in unique
        if exc.orig is None or isinstance(exc.orig, engine.dialect.loaded_dbapi.Error)
    ] or unique
    dialects = [d for d in (dialect_named(e.dialect.name) for e in failed) if d is not None]
    raised = {cls.__name__ for cls in type(exc.orig).__mro__} if exc.orig is not None else set()
    operational = isinstance(exc, _OPERATIONAL)
    if not operational and not any(raised & d.unanswered_errors for d in dialects):
        return None
    where = " or ".join(dict.fromkeys(_where(engine.url) for engine in failed))
    message = driver_message(exc, failed)
    hint = "".join(dict.fromkeys(d.failure_hint(message) for d in dialects))
    return UnreachableError(
        f"the {where} failed during the run: {message}{hint} (what Customer.io"
        " acknowledged is kept; the rest goes on the next run)"
    )


def driver_message(exc: sa.exc.DBAPIError, engines: Sequence[Engine] = ()) -> str:
    """The driver's own message, first line only (no SQL echo, no parameters), with the
    password of any of ``engines`` masked."""
    message = _db_message(exc)
    for engine in engines:
        if engine.url.password:
            message = message.replace(str(engine.url.password), "***")
    return message


def _where(url: sa.URL) -> str:
    """A database as an error names it: ``postgresql database at host:port``, or a file."""
    name = url.get_backend_name()
    if not url.host and url.database:  # a local file (DuckDB), or a server's local socket
        return f"{name} database {url.database}"
    return f"{name} database at {_host(url)}"


def _host(url: sa.URL) -> str:
    """A server as errors name it: ``host:port``, or the host alone."""
    host = url.host or "localhost"
    return f"{host}:{url.port}" if url.port else host


# Server answers that mean "try again later" (PostgreSQL docs, Appendix A: 57P03
# cannot_connect_now, 53300 too_many_connections), as libpq words them.
_BUSY_SERVER = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "too many connections",
    "remaining connection slots are reserved",
)


def _refused(exc: sa.exc.DBAPIError, message: str) -> bool:
    """The server answered and refused: bad credentials, no such database or role.

    A driver that reports the SQLSTATE gives class 28 (invalid authorization) or 3D
    (invalid catalog name); libpq does not at connect time (psycopg's ``sqlstate`` is None
    there), but prefixes what the server said with its severity, ``FATAL:``, which a
    refused TCP connection or a timeout never has.
    """
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
    if sqlstate:
        return sqlstate.startswith(("28", "3D"))
    return "FATAL:" in message and not any(busy in message for busy in _BUSY_SERVER)


def check_reachable(engine: Engine) -> None:
    """Connect once, so "database busy or down" is not mistaken for a model's SQL error."""
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        raise database_error(engine, exc) from None


def _redact(message: str, url: str) -> str:
    try:
        password = sa.engine.make_url(url).password
    except sa.exc.ArgumentError:
        return message
    return message.replace(password, "***") if password else message


class Warehouse:
    """Runs model SQL; one per run, shared by the diff and the model checks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = dialect_for(engine.dialect)
        self._signatures: dict[str, str] = {}
        self._types: dict[str, list[tuple[str, str]]] = {}  # model -> (column, driver type)

    def _described(self, model: Model) -> list[tuple[str, str]]:
        """The model's (column, driver type), read once (:meth:`columns`, which also
        records its signature)."""
        if model.name not in self._types:
            self.columns(model)
        return self._types[model.name]

    def fingerprint(self, model: Model, alias: str) -> str:
        """The SQL of a row's fingerprint; covers the model's column names and types too."""
        self._described(model)
        return self.dialect.row_fingerprint(alias, self._signatures[model.name])

    def fingerprint_numbers(self, model: Model, alias: str, fingerprint: str) -> tuple[str, str]:
        """The dialect's :meth:`~cio_retl.dialects.Dialect.fingerprint_numbers` of the
        model's rows ``alias`` and the fingerprint texts ``fingerprint``."""
        self._described(model)
        return self.dialect.fingerprint_numbers(alias, fingerprint, self._signatures[model.name])

    def column_names(self, model: Model) -> list[str]:
        """The names of the model's result columns."""
        return [name for name, _ in self._described(model)]

    def select_list(self, model: Model, alias: str) -> str:
        """The model's columns of ``alias``, under their own names, those the dialect can
        normalize in SQL already normalized (the columns the header names stay as they are:
        an event's timestamp keeps its milliseconds for the event's id)."""
        parts, converted = [], False
        for name, type_name in self._described(model):
            column = f"{alias}.{self.dialect.quote(name)}"
            sql = (
                None
                if name in model.required_columns
                else self.dialect.normalized_column(column, type_name)
            )
            converted = converted or sql is not None
            parts.append(f"{sql or column} AS {self.dialect.quote(name)}")
        return ", ".join(parts) if converted else f"{alias}.*"

    def columns(self, model: Model) -> list[str]:
        """The model's result columns, checked against its header; raises :class:`ModelError`."""
        try:
            with self.engine.connect() as conn:
                result = conn.execute(sa.text(f"SELECT * FROM ({model_sql(model)}) AS m LIMIT 0"))
                columns = list(result.keys())
                described = [(c[0], str(c[1])) for c in result.cursor.description or ()]
        except sa.exc.DBAPIError as exc:
            raise ModelError(
                str(model.path), f"SQL failed: {_db_message(exc)}", model.sql_line
            ) from None
        missing = [c for c in model.required_columns if c not in columns]
        if missing:
            what = "key column(s)" if set(missing) <= set(model.key_columns) else "column(s)"
            near = did_you_mean(missing[0], columns) if len(missing) == 1 else ""
            raise ModelError(
                str(model.path),
                f"{what} {missing} not in the result columns {columns}{near}",
                model.line_naming(missing[0]),  # the header line naming it, not the SQL
            )
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise ModelError(
                str(model.path), f"duplicate result columns {duplicated}", model.sql_line
            )
        self._types[model.name] = described
        self._signatures[model.name] = hashlib.blake2b(
            orjson.dumps(described), digest_size=6
        ).hexdigest()
        reserved = sorted(c for c in columns if c.lower().startswith(RESERVED_PREFIX))
        if reserved:
            raise ModelError(
                str(model.path),
                f"reserved column names {reserved} (cio-retl names its own columns"
                f" {RESERVED_PREFIX}...); rename them",
                model.sql_line,
            )
        if model.kind in (Kind.PERSON, Kind.OBJECT):
            clash = model.identifier if model.kind is Kind.PERSON else "object_id"
            if clash in columns and clash != model.key:
                raise ModelError(
                    str(model.path),
                    f"column {clash!r} would overwrite the identifier attribute; rename it",
                    model.sql_line,
                )
        return columns

    def stream(
        self,
        conn: Connection,
        sql: str,
        params: Mapping[str, Any] | None = None,
        rows: int = FETCH_ROWS,
    ) -> Iterator[Chunk]:
        """Yield the result in chunks so memory stays flat whatever the model size.

        ``stream_results`` makes PostgreSQL use a server-side (named) cursor; DuckDB's
        ``fetchmany`` streams by itself; Snowflake's connector downloads result batches
        as they are consumed.
        """
        result = conn.execution_options(stream_results=True, max_row_buffer=rows).execute(
            sa.text(sql), dict(params or {})
        )
        json_columns = self.dialect.json_columns(result.cursor.description or ())
        while chunk := result.fetchmany(rows):
            yield Chunk(chunk, json_columns)


def model_sql(model: Model) -> str:
    """The model's SELECT, safe to embed in ``sa.text``: its colons are literal text.

    Without this a literal such as ``'10:00'`` or DuckDB's ``{'a': 1}`` would be read as a
    bind parameter.
    """
    return model.sql.replace(":", "\\:")


class RowReader:
    """Where a streamed row keeps its key, fingerprint, duplicate count and model columns,
    worked out once per chunk: each row then becomes one dict, built from its tuple."""

    def __init__(self, names: Sequence[str], json_columns: frozenset[int]) -> None:
        self.index = {name: i for i, name in enumerate(names)}
        self.data = [(i, name) for i, name in enumerate(names) if name not in INTERNAL_COLUMNS]
        self.json = [(i, name) for i, name in self.data if i in json_columns]

    def values(self, row: Sequence[Any]) -> dict[str, Any]:
        """The model's columns of ``row``, JSON text (Snowflake VARIANT...) decoded."""
        values = {name: row[i] for i, name in self.data}
        for i, name in self.json:
            if isinstance(row[i], str):
                values[name] = orjson.loads(row[i])
        return values


def _db_message(exc: sa.exc.DBAPIError) -> str:
    """The driver's own message, first line only (no SQL echo, no parameters)."""
    return str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
