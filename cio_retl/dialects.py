"""Every piece of SQL that differs between DuckDB, PostgreSQL and Snowflake, in one place.

The engine writes dialect-neutral SQL and asks this module for the few parts that are not:
the text form of a key, the per-row fingerprint, how a Python-side batch of rows becomes a
relation the database can join (state-store writes and lookups), and the upsert statement.

DuckDB and PostgreSQL share the array form (``unnest`` of one array per column, bound as
parameters). PostgreSQL upserts with ``INSERT ... ON CONFLICT`` on the snapshot's primary
key; DuckDB's snapshot table has no key index (:attr:`Dialect.state_primary_keys`), so it
deletes the keys being rewritten and inserts them. Snowflake has neither ``unnest`` nor
``ON CONFLICT``: a batch travels as one JSON array expanded by ``FLATTEN`` and the upsert is
an UPDATE plus an INSERT of the absent keys. Its connector interpolates parameters into the
statement text client-side, and Snowflake recommends statements under 1 MB, so Snowflake
batches are split by size.

Where fakesnow (the test double, which translates Snowflake SQL to DuckDB through sqlglot)
behaves differently from real Snowflake, a comment says so at the spot.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cio_retl.buckets import bucket_sql
from cio_retl.errors import ConfigError
from cio_retl.models import Model

# Between the two key parts of a relationship row; identifiers with control characters are
# rejected before sending, so the composite key text is unambiguous.
KEY_SEPARATOR = "\x1f"

# The placeholder a statement template uses for the relation built from a Python batch.
ROWS = "{rows}"

# Unix seconds of datetime.max (9999-12-31 23:59:59.999999, floored), datetime.min and
# date.min (0001-01-01), and date.max (9999-12-31): what DuckDB's infinities become in Python.
_MAX_DATETIME_SECONDS = 253402300799
_MIN_DATETIME_SECONDS = -62135596800
_MAX_DATE_SECONDS = 253402214400
_DECIMAL_TYPE = re.compile(r"DECIMAL\((\d+),(\d+)\)")


class Dialect:
    """DuckDB: the reference dialect; the others override what differs."""

    name = "duckdb"

    # Whether the state tables that grow with a model (snapshots, rejections) carry their
    # (model, key) primary key. Not on DuckDB: its ART index lives in memory and cannot
    # spill to disk, so under a memory_limit inserts fail once the index outgrows it
    # (measured: "Out of Memory" near 8.8M keys at 512MB), and without a limit it is part of
    # our RSS. Without the index, uniqueness rests on the writes (delete the keys, then
    # insert: :meth:`upsert`, StateStore.record_rejections) and on one writer per model (the
    # lock; a DuckDB file also admits one process).
    state_primary_keys = False

    def __init__(self, sa_dialect: sa.Dialect) -> None:
        self._preparer = sa_dialect.identifier_preparer

    # -- names ----------------------------------------------------------------------------
    def quote(self, identifier: str) -> str:
        return str(self._preparer.quote(identifier))

    def quote_schema(self, schema: str) -> str:
        return str(self._preparer.quote_schema(schema))

    # How a CTE that a statement reads twice is kept from being materialized. DuckDB
    # materializes such a CTE whole (every column of every model row) before the rest of
    # the query runs; inlined, the model is scanned twice and nothing is held. Measured on
    # the 2M-row upsert diff: 838 -> 438 MiB peak RSS, 3.6 -> 1.9 s. PostgreSQL spills a
    # materialized CTE on its own server, and Snowflake has no such syntax: both keep theirs.
    not_materialized = "NOT MATERIALIZED "

    # Statements run at the start of each diff query's transaction, and more for a bucket's.
    # See PostgresDialect for why they exist; DuckDB's planner needs neither.
    diff_session: tuple[str, ...] = ()
    bucket_session: tuple[str, ...] = ()

    def bucket(self, key: str, count: int) -> str:
        """SQL of the key's hash bucket, equal to :func:`cio_retl.buckets.bucket_of`."""
        return bucket_sql(key, count)

    # -- model SQL --------------------------------------------------------------------------
    def as_text(self, expression: str) -> str:
        return f"CAST({expression} AS VARCHAR)"

    def key_expression(self, model: Model, alias: str) -> str:
        """The snapshot key of a model row: its key column(s) as text."""
        parts = [self.as_text(f"{alias}.{self.quote(c)}") for c in model.key_columns]
        if len(parts) == 1:
            return parts[0]
        return f" || chr({ord(KEY_SEPARATOR)}) || ".join(parts)

    def row_fingerprint(self, alias: str, signature: str) -> str:
        """A digest of every column of a model row, stable between runs of one database.

        Only ever compared with fingerprints from the same database, so each dialect may
        use its own form; what must agree across dialects is the attributes hash, computed
        in Python after normalization. ``signature`` digests the result's column names and
        types, for forms that do not see them.

        DuckDB: the 64-bit ``hash`` of the whole row, prefixed with the signature (a STRUCT's
        hash covers its values, not its field names). ``md5(to_json(row))`` was measured 5x
        slower (22 s against 4 s for 10M rows on 2 cores), which alone would miss the 10M-row
        diff target. A change goes unseen only if the new row's hash equals the old one's for
        the same key (p = 2**-64 per changed row). DuckDB does not promise ``hash`` is stable
        across its versions: an upgrade that changes it makes every row look changed once
        (attributes are then compared in Python, nothing is sent, but the change guardrail
        sees every row; rerun with --force).
        """
        return f"('{signature}' || CAST(hash({alias}) AS VARCHAR))"

    def json_columns(self, description: Sequence[Sequence[Any]]) -> frozenset[int]:
        """Positions of result columns that arrive as JSON text and must be decoded.

        DuckDB's and psycopg's drivers already return JSON, STRUCT, MAP and LIST values as
        Python objects, so nothing needs decoding there.
        """
        return frozenset()

    def normalized_column(self, expression: str, type_name: str) -> str | None:
        """SQL giving the column's values already in their normalized JSON form, or None to
        leave them to :func:`cio_retl.normalize.normalize_value`.

        Only a speed-up: Python still normalizes what arrives, and for these types
        normalizing the SQL's value gives exactly what normalizing the raw value gives
        (``tests/test_hash_stability.py`` compares both on edge values), so the attributes
        hash does not move. It saves building a ``datetime`` or ``Decimal`` per cell and
        converting it back: 0.6 s of CPU on a 100k-row sync with one of each per row.
        ``type_name`` is the driver's type of the result column (DuckDB: its SQL name).

        DuckDB: timestamps and dates become Unix seconds, floored (``//`` truncates toward
        zero, hence the floor-mod); its ``±infinity`` values convert to Python as
        ``datetime.max``/``min`` and ``date.max``/``min``, so they map to those seconds.
        A DECIMAL of at most 15 digits is exact as a DOUBLE (its unscaled integer and the
        power of ten both are, and one division rounds correctly, as ``float(Decimal)``
        does); a wider one stays a ``Decimal`` for Python to convert.
        """
        x = expression
        if type_name in ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE"):
            us = f"epoch_us({x})"
            return (
                f"CASE WHEN isfinite({x}) THEN ({us} - (({us} % 1000000 + 1000000) % 1000000))"
                f" // 1000000 WHEN {x} > '1970-01-01' THEN {_MAX_DATETIME_SECONDS}"
                f" WHEN {x} < '1970-01-01' THEN {_MIN_DATETIME_SECONDS} END"
            )
        if type_name == "DATE":
            return (
                f"CASE WHEN isfinite({x}) THEN ({x} - DATE '1970-01-01') * 86400"
                f" WHEN {x} > DATE '1970-01-01' THEN {_MAX_DATE_SECONDS}"
                f" WHEN {x} < DATE '1970-01-01' THEN {_MIN_DATETIME_SECONDS} END"
            )
        decimal = _DECIMAL_TYPE.fullmatch(type_name)
        if decimal and int(decimal[1]) <= 15:
            return f"CAST({x} AS {'BIGINT' if decimal[2] == '0' else 'DOUBLE'})"
        return None

    # -- batches of Python rows as a relation -------------------------------------------------
    def batches(
        self, columns: Sequence[str], rows: Sequence[Sequence[str | None]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(relation SQL, parameters) covering ``rows``, in as few statements as allowed.

        Every column is text. DuckDB and PostgreSQL take one array parameter per column and
        unnest them side by side: one statement, whatever the batch size.
        """
        if not rows:
            return
        selects = ", ".join(
            f"unnest(CAST(:_c{i} AS VARCHAR[])) AS {self.quote(c)}" for i, c in enumerate(columns)
        )
        params = {f"_c{i}": [row[i] for row in rows] for i in range(len(columns))}
        yield f"(SELECT {selects})", params

    def execute_rows(
        self,
        conn: Connection,
        templates: str | Sequence[str],
        columns: Sequence[str],
        rows: Sequence[Sequence[str | None]],
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Run the statement(s) with their ``{rows}`` placeholder standing for ``rows``."""
        if isinstance(templates, str):
            templates = [templates]
        for relation, batch_params in self.batches(columns, rows):
            for template in templates:
                conn.execute(
                    sa.text(template.replace(ROWS, relation)), {**(params or {}), **batch_params}
                )

    def upsert(
        self,
        table: str,
        conflict: Sequence[str],
        columns: Sequence[str],
        source: str,
        *,
        absent: bool = False,
    ) -> list[str]:
        """Statements inserting ``source``'s rows (a SELECT naming ``columns``, one row per
        ``conflict`` key), replacing the rows with the same key; run in one transaction.

        DuckDB, without a key index: DELETE the keys, then INSERT. (Measured on 2M snapshot
        rows, 1000 random existing keys: DELETE + INSERT 81 ms; ``MERGE INTO`` 290 ms and
        ``UPDATE ... FROM`` 307 ms, as updating eight text columns in place is slow; with
        the primary key, ``ON CONFLICT`` 114 ms.) ``absent`` means the caller knows none of
        the keys has a row (the diff found none, and the model's lock keeps other writers
        out): the DELETE is skipped, as without an index it scans the model's snapshot,
        which made 1000-row inserts into 2M rows 3.5x slower (14 ms against 4 ms).
        """
        names = ", ".join(columns)
        insert = f"INSERT INTO {table} ({names}) {source}"
        if absent:
            return [insert]
        match = " AND ".join(f"t.{c} = s.{c}" for c in conflict)
        return [
            f"DELETE FROM {table} AS t WHERE EXISTS (SELECT 1 FROM ({source}) AS s WHERE {match})",
            insert,
        ]

    def add_workspace_column(
        self, table: str, name: str, type_sql: str, fill: str, key: Sequence[str] | None
    ) -> list[str]:
        """Statements giving an older state ``table`` (unqualified ``name``) its ``workspace``
        column, every existing row holding ``fill``; with ``key``, the column is NOT NULL and
        leads the primary key ``key`` where the dialect keeps one.

        DuckDB: the tables that would carry the key have none (see state_primary_keys), so
        NOT NULL is all there is to add.
        """
        column = self.quote("workspace")
        statements = [
            f"ALTER TABLE {table} ADD COLUMN {column} {type_sql} DEFAULT '{fill}'",
            f"ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT",
        ]
        if key:
            statements.append(f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL")
        return statements

    def insert_absent(
        self, table: str, conflict: Sequence[str], columns: Sequence[str], source: str
    ) -> str:
        """Insert ``source``'s one row unless a row with the same ``conflict`` key exists."""
        match = " AND ".join(f"t.{c} = s.{c}" for c in conflict)
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT s.* FROM ({source}) AS s"
            f" WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {match})"
        )


class PostgresDialect(Dialect):
    name = "postgresql"
    not_materialized = ""

    # A B-tree on disk: no memory cost, and it makes the upsert one statement.
    state_primary_keys = True

    # A diff reads every row it plans through a server-side cursor, which PostgreSQL plans
    # for the first 10% of the rows (cursor_tuple_fraction): a nested loop that starts at
    # once and is quadratic in all. Measured on the cross-database removals of a 20k-row
    # model: 9.1 s; 100k rows: 634 s. We read the whole result, so say so.
    diff_session = ("SET LOCAL cursor_tuple_fraction = 1.0",)
    # A bucket's filter (an MD5 of the key) is an expression the planner cannot estimate; it
    # guesses 0.5% of the rows and joins them in a nested loop, again quadratic in the real
    # quarter or sixteenth (100k rows, one bucket of 4: upserts 22-26 s, removals 145-158 s).
    # Hash and merge joins are right at every bucket size.
    bucket_session = ("SET LOCAL enable_nestloop = off",)

    def bucket(self, key: str, count: int) -> str:
        # The portable form computes the MD5 once per hex digit (PostgreSQL does not share
        # the four calls); read as a bit string, once: 1M keys 2.08 -> 0.52 s.
        return f"COALESCE(CAST(CAST('x' || SUBSTR(MD5({key}), 1, 4) AS BIT(16)) AS INTEGER) % {int(count)}, 0)"

    def normalized_column(self, expression: str, type_name: str) -> str | None:
        return None  # not measured there yet: psycopg's values are normalized in Python

    def upsert(
        self,
        table: str,
        conflict: Sequence[str],
        columns: Sequence[str],
        source: str,
        *,
        absent: bool = False,
    ) -> list[str]:
        # With the key enforced, ON CONFLICT is right whether or not the keys exist.
        names = ", ".join(columns)
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in conflict)
        return [
            f"INSERT INTO {table} ({names}) {source}"
            f" ON CONFLICT ({', '.join(conflict)}) DO UPDATE SET {updates}"
        ]

    def add_workspace_column(
        self, table: str, name: str, type_sql: str, fill: str, key: Sequence[str] | None
    ) -> list[str]:
        # ADD COLUMN with a constant DEFAULT rewrites no rows (PostgreSQL 11+); the primary key
        # is rebuilt with the column leading, as the diff's join reads it. The old key is
        # found by what it is, not by name (SQLAlchemy left it unnamed: usually
        # <table>_pkey, but a name already taken makes PostgreSQL pick another).
        statements = super().add_workspace_column(table, name, type_sql, fill, key)
        if key:
            literal = table.replace("'", "''")
            statements += [
                "DO $$ DECLARE old_key text; BEGIN"
                " SELECT conname INTO old_key FROM pg_constraint"
                f" WHERE conrelid = CAST('{literal}' AS regclass) AND contype = 'p';"
                " IF old_key IS NOT NULL THEN"
                f" EXECUTE format('ALTER TABLE {literal} DROP CONSTRAINT %I', old_key);"
                " END IF; END $$",
                f"ALTER TABLE {table} ADD PRIMARY KEY ({', '.join(key)})",
            ]
        return statements

    def row_fingerprint(self, alias: str, signature: str) -> str:
        # row_to_json names every column and renders every type deterministically.
        return f"md5(CAST(row_to_json({alias}) AS TEXT))"


class SnowflakeDialect(Dialect):
    """Snowflake through snowflake-connector-python and snowflake-sqlalchemy."""

    name = "snowflake"
    not_materialized = ""

    # Declared (documentation and tools read it) though Snowflake does not enforce it.
    state_primary_keys = True

    def normalized_column(self, expression: str, type_name: str) -> str | None:
        return None  # the connector's values are normalized in Python

    # Snowflake recommends statements under 1 MB, parameters included (the connector binds
    # client-side, into the text); keep each batch's JSON well below that.
    MAX_BATCH_BYTES = 512 * 1024

    # ResultMetadata.type_code values (snowflake.connector.constants.FIELD_TYPES) of
    # VARIANT, OBJECT and ARRAY: the connector returns their values as JSON text.
    # fakesnow reports all three as VARIANT (5); real Snowflake says OBJECT (9) and ARRAY (10).
    _JSON_TYPE_CODES = frozenset({5, 9, 10})

    def row_fingerprint(self, alias: str, signature: str) -> str:
        # OBJECT_CONSTRUCT_KEEP_NULL(m.*) keeps NULL columns, so NULL -> value changes the
        # digest. fakesnow renders this through DuckDB's to_json (keys in column order, NaN
        # as NaN); real Snowflake's TO_JSON orders an OBJECT's keys itself. Either way the
        # form is stable between runs of one database, which is all a fingerprint needs.
        return f"md5(to_json(object_construct_keep_null({alias}.*)))"

    def json_columns(self, description: Sequence[Sequence[Any]]) -> frozenset[int]:
        return frozenset(
            i for i, column in enumerate(description) if column[1] in self._JSON_TYPE_CODES
        )

    def batches(
        self, columns: Sequence[str], rows: Sequence[Sequence[str | None]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """One JSON array of arrays per statement, expanded with FLATTEN (no ``unnest``)."""
        selects = ", ".join(
            f"CAST(f.value[{i}] AS VARCHAR) AS {self.quote(c)}" for i, c in enumerate(columns)
        )
        relation = f"(SELECT {selects} FROM TABLE(FLATTEN(INPUT => PARSE_JSON(:_rows))) AS f)"
        batch: list[bytes] = []
        size = 0
        for row in rows:
            encoded = orjson.dumps(list(row))
            if batch and size + len(encoded) > self.MAX_BATCH_BYTES:
                yield relation, {"_rows": _json_array(batch)}
                batch, size = [], 0
            batch.append(encoded)
            size += len(encoded) + 1
        if batch:
            yield relation, {"_rows": _json_array(batch)}

    def upsert(
        self,
        table: str,
        conflict: Sequence[str],
        columns: Sequence[str],
        source: str,
        *,
        absent: bool = False,
    ) -> list[str]:
        # Snowflake has no INSERT ... ON CONFLICT (its primary keys are not enforced). The
        # natural form is one MERGE ... USING (<FLATTEN source>), which real Snowflake runs,
        # but fakesnow renders a FLATTEN inside a MERGE source to DuckDB SQL it cannot parse
        # ("syntax error at or near TABLE"). So: UPDATE the existing keys, then INSERT the
        # absent ones; both DML in the caller's transaction (DDL such as a temp table would
        # commit it), under the model's lock, so no other writer interleaves. With
        # ``absent`` the UPDATE would match nothing: it is left out (one statement less per
        # batch); the INSERT keeps its NOT EXISTS guard, as nothing enforces the key here.
        on = " AND ".join(f"t.{c} = s.{c}" for c in conflict)
        updates = ", ".join(f"{c} = s.{c}" for c in columns if c not in conflict)
        names = ", ".join(columns)
        insert = (
            f"INSERT INTO {table} ({names}) SELECT {', '.join(f's.{c}' for c in columns)}"
            f" FROM ({source}) AS s WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {on})"
        )
        if absent:
            return [insert]
        return [f"UPDATE {table} AS t SET {updates} FROM ({source}) AS s WHERE {on}", insert]

    def add_workspace_column(
        self, table: str, name: str, type_sql: str, fill: str, key: Sequence[str] | None
    ) -> list[str]:
        # The column as on DuckDB. The declared primary key stays (model, key): Snowflake
        # does not enforce it, and re-declaring it (ALTER TABLE ... DROP PRIMARY KEY) is
        # syntax fakesnow cannot parse, so no test could hold it. Tables created by this
        # version declare (workspace, model, key).
        return super().add_workspace_column(table, name, type_sql, fill, key)

    def insert_absent(
        self, table: str, conflict: Sequence[str], columns: Sequence[str], source: str
    ) -> str:
        # INSERT ... WHERE NOT EXISTS could let two concurrent runs both insert (primary keys
        # are not enforced); MERGE takes a table lock, so one of them sees the other's row.
        # fakesnow runs statements one at a time on DuckDB and cannot show the difference.
        on = " AND ".join(f"t.{c} = s.{c}" for c in conflict)
        values = ", ".join(f"s.{c}" for c in columns)
        return (
            f"MERGE INTO {table} AS t USING ({source}) AS s ON {on}"
            f" WHEN NOT MATCHED THEN INSERT ({', '.join(columns)}) VALUES ({values})"
        )


def _json_array(items: Sequence[bytes]) -> str:
    return (b"[" + b",".join(items) + b"]").decode()


_DIALECTS: dict[str, type[Dialect]] = {
    "duckdb": Dialect,
    "postgresql": PostgresDialect,
    "snowflake": SnowflakeDialect,
}


def dialect_for(sa_dialect: sa.Dialect) -> Dialect:
    """The SQL of the engine's database; a clear error for one cio-retl does not speak."""
    try:
        cls = _DIALECTS[sa_dialect.name]
    except KeyError:
        raise ConfigError(
            f"unsupported database dialect {sa_dialect.name!r} (duckdb, postgresql, snowflake)"
        ) from None
    return cls(sa_dialect)
