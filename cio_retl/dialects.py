"""Every piece of SQL that differs between DuckDB, PostgreSQL and Snowflake, in one place.

The engine writes dialect-neutral SQL and asks this module for the few parts that are not:
the text form of a key, the per-row fingerprint, how a Python-side batch of rows becomes a
relation the database can join (state-store writes and lookups), the upsert statement, a
run's plan table (cio_retl.plan: its kind, its sequence numbers, what follows its writing),
the shared rate budget's statements, and what a new engine, a URL's file or a failed
connection means for the database. :class:`Dialect` holds what they share; :class:`DuckDBDialect`,
:class:`PostgresDialect` and :class:`SnowflakeDialect` what differs. Nothing outside this
module asks which database it is talking to.

DuckDB and PostgreSQL share the array form (``unnest`` of one array per column, bound as
parameters). PostgreSQL upserts with ``INSERT ... ON CONFLICT`` on the snapshot's primary
key; DuckDB's snapshot table has no key index (:attr:`DuckDBDialect.state_primary_keys`), so it
deletes the keys being rewritten and inserts them. Snowflake has neither ``unnest`` nor
``ON CONFLICT``: a batch travels as one JSON array expanded by ``FLATTEN`` and the upsert is
an UPDATE plus an INSERT of the absent keys. Its connector interpolates parameters into the
statement text client-side, and Snowflake recommends statements under 1 MB, so Snowflake
batches are split by size.

Where fakesnow (the test double, which translates Snowflake SQL to DuckDB through sqlglot)
behaves differently from real Snowflake, a comment says so at the spot.
"""

from __future__ import annotations

import abc
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateColumn

from cio_retl.buckets import bucket_sql
from cio_retl.errors import CioRetlError, ConfigError, LockedError
from cio_retl.models import Model

# Between the two key parts of a relationship row; identifiers with control characters are
# rejected before sending, so the composite key text is unambiguous.
KEY_SEPARATOR = "\x1f"

# The placeholder a statement template uses for the relation built from a Python batch.
ROWS = "{rows}"

# ``sa.Column(info=...)`` key of a state column holding JSON text of one shape per model (a
# snapshot's attributes and identifiers): DuckDB declares it USING COMPRESSION zstd
# (see _duckdb_column).
JSON_TEXT = "cio_retl_json_text"

# Unix seconds of datetime.max (9999-12-31 23:59:59.999999, floored), datetime.min and
# date.min (0001-01-01), and date.max (9999-12-31): what DuckDB's infinities become in Python.
_MAX_DATETIME_SECONDS = 253402300799
_MIN_DATETIME_SECONDS = -62135596800
_MAX_DATE_SECONDS = 253402214400
_DECIMAL_TYPE = re.compile(r"DECIMAL\((\d+),(\d+)\)")


class Dialect(abc.ABC):
    """What the three databases share; each subclass says what differs (:func:`dialect_for`)."""

    name: ClassVar[str]  # SQLAlchemy's name of the backend

    # Whether the state tables that grow with a model (snapshots, rejections) carry their
    # (model, key) primary key (see DuckDBDialect for the one that does not).
    state_primary_keys = True

    # Acknowledged rows of a run's own plan go into the snapshot this many at a time (a
    # multiple of it per transaction; the last of a phase whatever is left), their ranges
    # recorded within a second meanwhile (state.acknowledged_ranges). 0: each
    # acknowledgment's rows at once, in its own transaction (see DuckDBDialect for why one
    # waits).
    snapshot_merge_rows = 0

    # How a CTE that a statement reads twice is kept from being materialized, where the
    # database would otherwise hold it whole (see DuckDBDialect). PostgreSQL spills a
    # materialized CTE on its own server, and Snowflake has no such syntax: both keep theirs.
    not_materialized = ""

    # Statements run at the start of each diff query's transaction, and more for a bucket's.
    # See PostgresDialect for why they exist; DuckDB's and Snowflake's planners need neither.
    diff_session: tuple[str, ...] = ()
    bucket_session: tuple[str, ...] = ()

    # Whether a run keeps its changeset as a plan table here (cio_retl.plan) when the state
    # lives in this database too; where not, the streaming diff serves. All three do.
    builds_plans = True
    # Session settings around the statement that builds a plan table, and what undoes them
    # before the pooled connection serves anything else (see DuckDBDialect).
    plan_session: tuple[str, ...] = ()
    plan_session_reset: tuple[str, ...] = ()
    # Appended to a subquery whose computed columns the outer query reads more than once,
    # so that each is computed once per row (see PostgresDialect).
    subquery_fence = ""

    # Whether a rerun's plan joins model and snapshot by key and fingerprint alone (their
    # numbers, where fingerprint_numbers has them), writes the keys that moved first as a
    # temporary table, and joins them back to the model's rows by key (cio_retl.plan).
    # Measured on DuckDB and PostgreSQL; Snowflake keeps the one full join.
    narrow_diff_join = False
    # The pseudo-column naming a state table's row, stable within a transaction, where the
    # database finds rows by it: a narrow join's moved keys then carry their snapshot row's,
    # and the plan fetches those rows' texts by it instead of by key (None: by key).
    row_id: str | None = None
    # Whether a read of a range of a plan's rows asks the database to sort them by sequence
    # number (ORDER BY); where not, PlanTable.chunks sorts what arrives.
    sorts_plan_reads = True
    # Microseconds since the epoch on the database's clock, as an integer (a shared plan's
    # claims compare times taken by runs on different hosts).
    now_micros = "epoch_us(now())"

    def create_plan(
        self, table: str, query: str, order: Sequence[str], columns: Sequence[tuple[str, str]]
    ) -> list[str]:
        """The statements writing a plan ``table`` from ``query``; ``order``: the columns its
        reads filter by (as plan_built's); ``columns``: the query's (name, type), read by
        :meth:`plan_columns` where the dialect declares them (else empty). A plain table: the state
        writer reads it from another connection, so not a temporary one."""
        return [f"CREATE TABLE {table} AS {query}"]

    def plan_columns(self, conn: Connection, query: str) -> list[tuple[str, str]]:
        """``query``'s result columns as (name, type), read without running it, where
        create_plan declares them (else none)."""
        return []

    def compresses_json_text(self, conn: Connection) -> bool:
        """Whether the state tables of ``conn``'s database declare their JSON text columns
        compressed (JSON_TEXT); not by default."""
        return False

    def utf8_bytes(self, text: str) -> str | None:
        """SQL of ``text``'s UTF-8 bytes, where the driver returns them as Python ``bytes``
        (else None: the caller encodes the ``str`` it reads)."""
        return None

    def plan_sequence(self, order: Sequence[str]) -> str:
        """The sequence number of a plan row as the plan is written: dense from 1, unique.
        Where the dialect needs one, ``order`` (expressions over the planned row) orders
        it; here no order is asked for, the rows are numbered as they are written."""
        return "ROW_NUMBER() OVER ()"

    def numbers_plan_after(self, columns: Sequence[str]) -> bool:
        """Whether the plan of a model of these columns is written with no sequence number
        and numbered after by :meth:`plan_numbering`, in the same transaction; here not:
        :meth:`plan_sequence` numbers it as it is written."""
        return False

    def plan_numbering(self, table: str, seq: str) -> str:
        """The statement giving the rows of a plan ``table`` written unnumbered their
        sequence number ``seq``, dense from 1, unique (see :meth:`numbers_plan_after`)."""
        raise NotImplementedError(f"{self.name} numbers a plan as it writes it")

    def plan_rows(self, table: str, seq: str) -> str | None:
        """A relation reading a plan ``table`` written unnumbered (a run's own, see
        :meth:`numbers_plan_after`) with its sequence number ``seq`` taken from where its rows
        lie, so no statement numbers them after; None: :meth:`plan_numbering` numbers them."""
        return None

    def plan_built(self, table: str, by: Sequence[str], seq: str) -> list[str]:
        """Statements run once a plan ``table`` is written and numbered, in its
        transaction, before anything reads it by ranges of its sequence number ``seq``
        (each acknowledgment reads one), after the columns ``by`` (a shared plan's
        bucket)."""
        return []

    def result_type(self, column: Sequence[Any]) -> str:
        """The type of a result column (a DB-API ``cursor.description`` entry) as
        :func:`cio_retl.payload_sql.column_kind` reads it: the driver's type code."""
        return str(column[1])

    def out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` is the database refusing a statement for its memory limit (a
        plan too big for it: the run then diffs that model as a stream instead)."""
        return False

    # (URL form, driver package, cio-retl extra) to name when the URL's driver is missing;
    # None where the driver comes with cio-retl itself.
    driver_extra: ClassVar[tuple[str, str, str] | None] = None

    def __init__(self, sa_dialect: sa.Dialect) -> None:
        self._preparer = sa_dialect.identifier_preparer

    # -- names ----------------------------------------------------------------------------
    def quote(self, identifier: str) -> str:
        return str(self._preparer.quote(identifier))

    def quote_schema(self, schema: str) -> str:
        return str(self._preparer.quote_schema(schema))

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

    @abc.abstractmethod
    def row_fingerprint(self, alias: str, signature: str) -> str:
        """A digest of every column of a model row, stable between runs of one database.

        Only ever compared with fingerprints from the same database, so each dialect may
        use its own form; what must agree across dialects is the normalized attributes
        (the snapshot's canonical JSON). ``signature`` digests the result's column names and
        types, for forms that do not see them.
        """

    def fingerprint_numbers(self, alias: str, fingerprint: str, signature: str) -> tuple[str, str]:
        """(the number inside the fingerprint of a model row ``alias``, the number inside
        a fingerprint text ``fingerprint``), for a join that compares fingerprints without
        carrying their texts: two fingerprints of ``signature`` are the same text exactly
        when their numbers are equal and not NULL. Here, where a fingerprint is no number
        behind a prefix, the texts themselves."""
        return self.row_fingerprint(alias, signature), fingerprint

    def temporary(self, name: str) -> str:
        """How a statement names the temporary table ``name`` (of the connection's session)."""
        return name

    def temporary_table(self, name: str, query: str) -> list[str]:
        """The statements writing the temporary table ``name`` as ``query``, replacing one
        a failed earlier build of the same pooled connection left."""
        return [self.drop_temporary(name), f"CREATE TEMPORARY TABLE {name} AS {query}"]

    def drop_temporary(self, name: str) -> str:
        return f"DROP TABLE IF EXISTS {self.temporary(name)}"

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
        None by default: measured on DuckDB only, so psycopg's and the Snowflake connector's
        values are normalized in Python.
        """
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

    @abc.abstractmethod
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
        ``absent`` means the caller knows none of the keys has a row (the diff found none,
        and the model's lock keeps other writers out)."""

    def add_workspace_column(
        self, table: str, name: str, type_sql: str, fill: str, key: Sequence[str] | None
    ) -> list[str]:
        """Statements giving an older state ``table`` (unqualified ``name``) its ``workspace``
        column, every existing row holding ``fill``; with ``key``, the column is NOT NULL and
        leads the primary key ``key`` where the dialect keeps one.

        Here the column only; a dialect that keeps the key rebuilds it (PostgresDialect).
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

    # -- state store ------------------------------------------------------------------------
    def stale_primary_key(self, conn: Connection, schema: str, table: str) -> bool:
        """Whether ``table`` still has a primary key an older cio-retl created, where this
        dialect's state tables no longer carry one (state_primary_keys); the state store
        then rebuilds it without. Where the key is kept, none is stale."""
        return False

    def rate_budget_sql(self, table: str) -> tuple[str, str] | None:
        """(grant, create) statements of a rate budget shared by every process that sends to
        one workspace, kept as a row of ``table`` (cio_retl.state.budget); None where the
        database is not a server other workers can reach cheaply once per request."""
        return None

    # -- engines and URLs -------------------------------------------------------------------
    @classmethod
    def prepare_engine(cls, engine: Engine) -> None:
        """Settings every connection of a new engine gets; none by default."""
        return None

    @classmethod
    def local_file(cls, url: sa.URL) -> Path | None:
        """The file a URL's database lives in, for databases that are a local file."""
        return None

    # The driver's exceptions, by class name, that mean the server did not answer in time,
    # beside PEP 249's OperationalError and InterfaceError (cio_retl.warehouse.database_lost).
    unanswered_errors: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def failure_hint(cls, message: str) -> str:
        """What to do about a database failure a run met, from the driver's ``message``; ""
        where the message says it all."""
        return ""

    @classmethod
    def local_error(cls, url: sa.URL, message: str) -> CioRetlError | None:
        """The error for a database that failed to open where there is no server to reach
        (a local file); None for server databases, whose failures are told apart by how the
        server answered (cio_retl.warehouse.database_error)."""
        return None

    @classmethod
    def missing_driver(cls, setting: str, drivername: str, missing: str) -> str:
        """Which URL form and extra to use when the URL's driver is not installed."""
        if cls.driver_extra is None:
            return f"{setting}: {drivername}:// cannot be loaded ({missing})"
        form, package, extra = cls.driver_extra
        return (
            f"{setting}: {form} needs {package}, which is not installed ({missing}); "
            f"install the `{extra}` extra: {_install(extra)}"
        )


def _install(extra: str) -> str:
    return f"pip install 'cio-retl[{extra}]' (or: uv sync --extra {extra})"


# Engine -> whether its DuckDB declares JSON text USING COMPRESSION zstd (compresses_json_text).
_ZSTD_TEXT: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def _zstd_available(conn: Connection) -> bool:
    version, storage = conn.execute(
        sa.text(
            "SELECT version(), tags['storage_version'] FROM duckdb_databases()"
            " WHERE database_name = current_database()"
        )
    ).one()
    return all(_major(v) >= 2 for v in (version, storage))


def _major(version: object) -> int:
    """The major number of a DuckDB version ('v2.0.0', a storage version 'v2.0.0+'); 0 if
    there is none."""
    found = re.search(r"(\d+)\.", str(version))
    return int(found.group(1)) if found else 0


@compiles(CreateColumn, "duckdb")
def _duckdb_column(element: CreateColumn, compiler: Any, **kw: Any) -> str:
    """A state column of JSON text, declared USING COMPRESSION zstd (the reasons and
    figures at DuckDBDialect.create_plan: DuckDB leaves such text to DICT_FSST), where
    DuckDBDialect.compresses_json_text says the file takes it (the state store marks the
    columns only then). Its rows go to the table's WAL as they are acknowledged and are
    compressed at the checkpoint: measured on 1M snapshot rows (bench/README.md, "zstd for
    JSON texts"), that checkpoint took 0.74-0.80 s against 1.12-1.13 s, the file 110 MB
    against 137 MB. Tables created before keep the compression they were created with
    (DuckDB has no ALTER for it)."""
    text = str(compiler.visit_create_column(element, **kw))
    if element.element.info.get(JSON_TEXT):
        text += " USING COMPRESSION zstd"
    return text


class DuckDBDialect(Dialect):
    """DuckDB: an in-process database in a local file (or in memory)."""

    name = "duckdb"
    narrow_diff_join = True
    # A join on ``rowid`` fetches the build side's rows from the scan by row id (DuckDB's
    # plan shows a TABLE_SCAN emitting only them): a 1,000-change rerun of a 2M-row model
    # then reads 1,000 snapshot attributes, not 2M (bench/README.md, "zstd for JSON texts,
    # BLOB reads, reruns by rowid").
    # Row ids change only when a checkpoint rewrites a table, never while a transaction
    # that reads it is open; the moved keys and the plan share one.
    row_id = "rowid"
    # DuckDB's sort of a read's rows (35,000 of them with their built items) cost more than
    # the rest of the read: 1M rows read in 1.04 s with ORDER BY, 0.64 s without
    # (bench/README.md, "Plan reads sorted in Python"). A scan of one table keeps the rows'
    # insertion order (DuckDB docs, "preserve_insertion_order", which the send's connections
    # keep on), so Python's sort finds a numbered-after plan's rows sorted and makes one pass.
    sorts_plan_reads = False

    # Not on DuckDB: its ART index lives in memory and cannot spill to disk, so under a
    # memory_limit inserts fail once the index outgrows it (measured: "Out of Memory" near
    # 8.8M keys at 512MB), and without a limit it is part of our RSS. Without the index,
    # uniqueness rests on the writes (delete the keys, then insert: :meth:`upsert`,
    # StateStore.record_rejections) and on one writer per model (the lock; a DuckDB file
    # also admits one process).
    state_primary_keys = False

    # DuckDB's row group (122,880 rows, its default ``ROW_GROUP_SIZE``). A transaction's
    # appended rows that fill whole row groups are written straight to the database file at
    # commit; what is left of a row group goes through the WAL, and a later checkpoint
    # writes it again (duckdb's ``OptimisticDataWriter``: "Write all row groups except the
    # last to disk"). Appends that leave a partial row group each time also leave the table
    # fragmented, which the checkpoint then rewrites: whole row groups take about half the
    # time (bench/README.md, "Snapshots in whole row groups").
    snapshot_merge_rows = 122_880

    # DuckDB materializes a CTE read twice whole (every column of every model row) before
    # the rest of the query runs; inlined, the model is scanned twice and nothing is held.
    # Measured on the 2M-row upsert diff: 838 -> 438 MiB peak RSS, 3.6 -> 1.9 s.
    not_materialized = "NOT MATERIALIZED "

    # A plan's rows need no order (they are numbered as they lie, once written):
    # "preserve_insertion_order ... Disabling it can reduce memory usage" (DuckDB docs,
    # Configuration / How to tune workloads). Measured (bench/README.md): a 2M-row initial
    # plan that joined its payloads ran out of memory under the 128MB limit with it on; the
    # one-pass plan builds 1M rows in 2.5 s with it off, 3.8 s with it on.
    plan_session = ("SET preserve_insertion_order = false",)
    plan_session_reset = ("RESET preserve_insertion_order",)

    def plan_columns(self, conn: Connection, query: str) -> list[tuple[str, str]]:
        if not self.compresses_json_text(conn):
            return []
        return [(str(r[0]), str(r[1])) for r in conn.execute(sa.text(f"DESCRIBE {query}"))]

    def compresses_json_text(self, conn: Connection) -> bool:
        """Where DuckDB is 2.0 or later and so is the storage version of the database file
        (``duckdb_databases()``'s tag): DuckDB 1.1 refuses the clause, 1.2-1.4 accept it
        and store such a column uncompressed (3-4x its size under their own choice), and a
        file of an older storage version refuses it ("Can't compress using user-provided
        compression type 'ZSTD', that type is not available yet"). Read once per engine,
        on the caller's connection."""
        engine = conn.engine
        known = _ZSTD_TEXT.get(engine)
        if known is None:
            known = _ZSTD_TEXT[engine] = _zstd_available(conn)
        return known

    def utf8_bytes(self, text: str) -> str | None:
        """``encode``: "Converts the string to BLOB. Converts UTF-8 characters into literal
        encoding" (DuckDB docs, Blob Functions), and the Python client returns a BLOB as
        ``bytes``: no ``str`` made of each item only to be encoded again (1M items read:
        0.65 s against 0.79-1.00 s)."""
        return f"encode({text})"

    def create_plan(
        self, table: str, query: str, order: Sequence[str], columns: Sequence[tuple[str, str]]
    ) -> list[str]:
        """Where :meth:`plan_columns` gave the columns (compresses_json_text), the table
        declared with its text columns compressed by zstd, then written by one INSERT in the
        same transaction (as CREATE TABLE AS, it writes the new table's row
        groups as they fill, on every thread). A plan's texts are JSON of one shape per
        model; DuckDB's own choice for them is DICT_FSST, as its zstd estimate assumes 2:1
        and asks zstd to beat the others by 1.3x (``StringFinalAnalyze``, duckdb's
        src/storage/compression/zstd.cpp), while zstd packs these 6:1. Measured on a 1M-row
        initial plan (bench/README.md, "zstd for JSON texts"): written in 1.72-1.78 s against
        2.29-2.31 s, its texts 32 MB against 73 MB, read back as fast. zstd compresses each
        vector of 2048 values apart, so a row fetched by row id decompresses its vector only.
        Its keys and fingerprints too: uncompressed they are written about 0.06-0.1 s per 1M
        rows sooner but hold a quarter more of the file (bench/README.md, "Plan keys stored
        plain"), and a file does not shrink when the plan is dropped."""
        if not columns:
            return super().create_plan(table, query, order, columns)
        declared = ", ".join(
            f"{self.quote(name)} {type_}"
            + (" USING COMPRESSION zstd" if type_ == "VARCHAR" else "")
            for name, type_ in columns
        )
        return [f"CREATE TABLE {table} ({declared})", f"INSERT INTO {table} {query}"]

    def numbers_plan_after(self, columns: Sequence[str]) -> bool:
        """Yes. ``ROW_NUMBER() OVER ()`` in the statement that builds the payloads "limits
        the pipeline it is in to be single-threaded" (duckdb/duckdb#21971, whose push-down
        into table scans needs a scan without filters or joins), and its window holds
        every planned row, payloads and all, before one is written: measured
        (bench/README.md, "Plans numbered after they are written"), a 1M-row initial plan
        4.1 s with it, 2.0 s plus 0.02 s numbering without. But not for a model with a
        column named ``rowid``: it hides the row ids that :meth:`plan_numbering` reads."""
        return not _hides_rowid(columns)

    def plan_numbering(self, table: str, seq: str) -> str:
        """Number the plan's rows from 1 by their row ids: unique, as row ids are, and
        dense, as the row ids a transaction gives the rows it appends are (measured on
        parallel writes of 1M, 2M and 10M rows). Relative to the smallest: within the
        transaction that creates a table its row ids are the transaction's own (they start
        near 2^55). Arithmetic, not a window over the row ids joined back: that UPDATE
        held the 10M rows' ids, sorted and hashed, and ran out of the 128MB limit (0.89
        s for 2M rows against 0.04 s)."""
        return f"UPDATE {table} SET {seq} = rowid - (SELECT MIN(rowid) FROM {table}) + 1"

    def plan_rows(self, table: str, seq: str) -> str | None:
        """The row ids as the sequence number, dense from 0: a table written by one
        transaction's INSERT has row ids 0..n-1 once committed (measured on parallel writes
        of 6.7M rows), and they change only where a checkpoint compacts row groups that lost
        rows ("When a checkpoint vacuums (compacts) row groups, the row IDs of the moved rows
        change", DuckDB docs, VACUUM), which a plan, never updated or deleted from, has none
        of. A filter on ``seq`` becomes a range of row ids the scan skips to (DuckDB's plan
        shows ``rowid >= a AND rowid <= b`` among the scan's filters), as zone maps served the
        stored column. What it saves is the numbering UPDATE: its commit logs every row's new
        number to the WAL, and a checkpoint writes the column again, a cost that grows faster
        than the rows (bench/README.md, "Plans numbered by their row ids"). Not ``rowid + 1``:
        through the subquery DuckDB keeps that as an expression, and every read scans it all."""
        return f"(SELECT * REPLACE (g.rowid AS {seq}) FROM {table} AS g)"

    def temporary(self, name: str) -> str:
        # Qualified: unqualified, ``main.name`` and ``name`` find the temporary table
        # first but a user's own table of that name once it is gone (measured).
        return f"temp.main.{name}"

    def temporary_table(self, name: str, query: str) -> list[str]:
        return [f"CREATE OR REPLACE TEMPORARY TABLE {self.temporary(name)} AS {query}"]

    def out_of_memory(self, error: BaseException) -> bool:
        return type(getattr(error, "orig", error)).__name__ == "OutOfMemoryException"

    def bucket(self, key: str, count: int) -> str:
        # One MD5 per key, its first four hex digits cast as a number: "strings ... in
        # hexadecimal notation with 0x ... prefixes ... can be cast to integer types, e.g.,
        # '0xFF'::INT = 255" (DuckDB docs, Literal Types). The portable form's four POSITION
        # calls each compute the MD5 again: 1M keys 0.29 -> 0.08 s, the same buckets.
        return f"COALESCE(CAST('0x' || SUBSTR(MD5({key}), 1, 4) AS INTEGER) % {int(count)}, 0)"

    def row_fingerprint(self, alias: str, signature: str) -> str:
        """The 64-bit ``hash`` of the whole row, prefixed with the signature (a STRUCT's
        hash covers its values, not its field names). ``md5(to_json(row))`` was measured 5x
        slower (22 s against 4 s for 10M rows on 2 cores), which alone would miss the 10M-row
        diff target. A change goes unseen only if the new row's hash equals the old one's for
        the same key (p = 2**-64 per changed row). DuckDB does not promise ``hash`` is stable
        across its versions: an upgrade that changes it makes every row look changed once
        (attributes are then compared in Python, nothing is sent, but the change guardrail
        sees every row; rerun with --force).
        """
        return f"('{signature}' || CAST(hash({alias}) AS VARCHAR))"

    def fingerprint_numbers(self, alias: str, fingerprint: str, signature: str) -> tuple[str, str]:
        """The row's 64-bit ``hash`` itself, and the one a fingerprint text holds after the
        signature (NULL behind another signature). The texts are only ever written by
        :meth:`row_fingerprint`, so the number's text is canonical and equal numbers are
        equal texts. A UBIGINT in place of a ~30-byte text per row: a 2M-row rerun's join
        with the snapshot holds half the memory (it spilled under the 128MB limit). The
        number's text is cut off by ``substr``, not the slice ``[start:]``: the same
        characters (both count from 1, DuckDB docs "Text Functions"), read faster (the 2M
        join, bench/README.md "Plan keys stored plain")."""
        start = len(signature) + 1
        return (
            f"hash({alias})",
            f"CASE WHEN starts_with({fingerprint}, '{signature}')"
            f" THEN TRY_CAST(substr({fingerprint}, {start}) AS UBIGINT) END",
        )

    def normalized_column(self, expression: str, type_name: str) -> str | None:
        """Timestamps and dates become Unix seconds, floored (``//`` truncates toward
        zero, hence the floor-mod); DuckDB's ``±infinity`` values convert to Python as
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

    def upsert(
        self,
        table: str,
        conflict: Sequence[str],
        columns: Sequence[str],
        source: str,
        *,
        absent: bool = False,
    ) -> list[str]:
        """Without a key index: DELETE the keys, then INSERT. (Measured on 2M snapshot
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

    def stale_primary_key(self, conn: Connection, schema: str, table: str) -> bool:
        # DuckDB cannot drop a primary key in place; its catalog says whether there is one.
        keyed = conn.execute(
            sa.text(
                "SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database()"
                " AND schema_name = :schema"
                " AND table_name = :table AND constraint_type = 'PRIMARY KEY'"
            ),
            {"schema": schema, "table": table},
        ).scalar_one()
        return bool(keyed)

    @classmethod
    def prepare_engine(cls, engine: Engine) -> None:
        """DuckDB runs inside our process, so its operator memory is our RSS: unless the URL
        sets ``memory_limit``, each connection sets :data:`DUCKDB_MEMORY_LIMIT`, and the
        diff's joins and aggregates spill to DuckDB's temporary directory (beside the
        database file) beyond it. This needs the snapshot and rejection tables to have no key
        index (an index cannot spill: with one, inserts failed near 8.8M keys at 512MB; see
        ``state_primary_keys``). It is a ``SET`` on connect, not a connect-time config:
        DuckDB refuses a second connection to a file that this process already holds open
        with another configuration, e.g. through a plain SQLAlchemy engine of the user's."""
        given = {k.lower() for k in engine.url.query}
        if not _DUCKDB_MEMORY_SETTINGS & given:
            sa.event.listen(engine, "connect", _limit_duckdb_memory)
        if not {"checkpoint_threshold", "wal_autocheckpoint"} & given:  # DuckDB's two names
            sa.event.listen(engine, "connect", _space_duckdb_checkpoints)

    @classmethod
    def failure_hint(cls, message: str) -> str:
        # DuckDB's "Out of Memory Error: ... (used X, limit Y)": the limit is ours by default.
        if "Out of Memory" in message:
            return (
                f"; DuckDB's memory_limit is {DUCKDB_MEMORY_LIMIT} unless the URL sets one,"
                " e.g. ?memory_limit=1GB"
            )
        # "TransactionContext Error: Conflict on tuple deletion!" (or "on update"): DuckDB's
        # optimistic concurrency control fails the second of two transactions that edit the
        # same row at once (DuckDB docs, "Concurrency"). Not the file failing; and only one
        # process writes a DuckDB file, so the other transaction is this process's.
        if "Conflict on" in message or "write-write conflict" in message:
            return (
                "; another transaction of this process (a run beside this one) edited the"
                " same state rows at the same time, and DuckDB fails the second of two such"
                " edits"
            )
        return ""

    @classmethod
    def local_file(cls, url: sa.URL) -> Path | None:
        """None for ``:memory:`` and MotherDuck (``md:``), which have no local file."""
        database = url.database
        if not database or database == ":memory:" or database.startswith(("md:", "motherduck:")):
            return None
        return Path(database)

    @classmethod
    def local_error(cls, url: sa.URL, message: str) -> CioRetlError:
        """Nothing to reach, except that one process at a time may write the file."""
        if "Could not set lock on file" in message:
            return LockedError(
                f"the DuckDB database is in use by another process "
                f"({message.split(': ', 1)[-1]}); one run at a time: try again when it ends"
            )
        return ConfigError(f"cannot open the DuckDB database {url.database}: {message}")


def _hides_rowid(columns: Sequence[str]) -> bool:
    """Whether a table of these columns hides DuckDB's ``rowid`` pseudo-column: a column
    of that name, in any case, is what ``rowid`` then names (measured: a plan numbered
    over it numbered nothing, and sent nothing)."""
    return any(c.lower() == "rowid" for c in columns)


# DuckDB's memory_limit when the URL sets none (DuckDB's own default is 80% of RAM). The
# limit bounds DuckDB's buffer manager, not Python: RSS sits about 100-470 MiB above it.
# Measured (bench/README.md): at 128MB the no-change diff peaks at 227 MiB RSS
# for 1M rows and 243-249 MiB for 10M (memory flat in the model size), 4.1-4.8 s for the
# 10M count pass; the 2M-row initial sync at 602 MiB. At 512MB: 270 -> 670 MiB from 1M to
# 10M rows, the 2M initial sync at 912 MiB and 8% faster, a 2M 1,000-change rerun 1.9 s
# instead of 3.5 s. Memory that stays flat is worth those seconds by default; a roomy
# machine can say memory_limit=1GB in the URL.
DUCKDB_MEMORY_LIMIT = "128MB"
# Either name sets the limit in DuckDB; a URL giving one is the user's choice.
_DUCKDB_MEMORY_SETTINGS = frozenset({"memory_limit", "max_memory"})


def _limit_duckdb_memory(dbapi_connection: Any, _record: Any) -> None:
    # A global setting: it bounds the database instance every connection of ours shares.
    dbapi_connection.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")


# DuckDB's checkpoint_threshold when the URL sets none (DuckDB's own default is 16MB). A sync
# commits its acknowledged snapshot rows every few thousand rows (so a killed run resends
# little); past the threshold a commit also checkpoints, recompressing the snapshot table's
# last row group each time. At 16MB that is a checkpoint every ~60k snapshot rows, and the
# commits cost more than the inserts (bench/README.md, "One-pass plan"). The WAL
# holds what is not yet checkpointed: a killed run's next open replays it, nothing is lost.
DUCKDB_CHECKPOINT_THRESHOLD = "256MB"


def _space_duckdb_checkpoints(dbapi_connection: Any, _record: Any) -> None:
    # A global setting too: the database instance checkpoints for every connection.
    dbapi_connection.execute(f"SET checkpoint_threshold = '{DUCKDB_CHECKPOINT_THRESHOLD}'")


class PostgresDialect(Dialect):
    name = "postgresql"
    driver = "psycopg"  # the one driver cio-retl supports (its `postgres` extra)
    driver_extra = ("postgresql+psycopg://", "psycopg", "postgres")
    now_micros = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)"

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
    # PostgreSQL pulls a simple subquery up into its parent, putting the subquery's
    # expressions wherever the parent names their columns: the plan's row checks (a CASE of
    # regular expressions) were computed once per column reading their verdict. It keeps a
    # subquery with OFFSET as it is (src/backend/optimizer/prep/prepjointree.c,
    # is_simple_subquery). Measured on a 1M-row initial plan: 29.9 -> 12.7 s.
    subquery_fence = " OFFSET 0"
    narrow_diff_join = True
    # A rerun's plan is two statements (the moved keys, then the plan that joins them back
    # to the model). Under READ COMMITTED "two successive SELECT commands can see different
    # data, even though they are within a single transaction"; REPEATABLE READ "only sees
    # data committed before the transaction began" (PostgreSQL docs, Transaction Isolation),
    # so both read the model as of one moment. SET TRANSACTION must come before the
    # transaction's first query; the diff's SET LOCALs are not queries. It ends with the
    # transaction: nothing to reset.
    plan_session = ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",)

    def temporary(self, name: str) -> str:
        # "pg_temp ... an alias for the current session's temporary-table schema" (PostgreSQL
        # docs, Schemas, The Schema Search Path): never a permanent table of the same name.
        return f"pg_temp.{name}"

    def temporary_table(self, name: str, query: str) -> list[str]:
        """As the base's, then ANALYZE: autovacuum never analyzes a temporary table ("temporary
        tables cannot be accessed by autovacuum", PostgreSQL docs, CREATE TABLE), and the
        joins that read the moved keys are planned from their statistics."""
        return [*super().temporary_table(name, query), f"ANALYZE {self.temporary(name)}"]

    def plan_built(self, table: str, by: Sequence[str], seq: str) -> list[str]:
        """A B-tree on the sequence number (after the bucket, in a shared plan), and the
        table's statistics. Without the index each
        acknowledgment (a range of sequence numbers) scans the whole plan: measured, a 2M-row
        initial sync took 333 s, the server busy with ~400 such scans. A table just written
        by CREATE TABLE AS has no statistics until autovacuum's ANALYZE comes by, and the
        planner estimates blind until then ("it is a good idea to run ANALYZE after making
        major changes in the contents of a table", PostgreSQL docs, ANALYZE)."""
        return [f"CREATE INDEX ON {table} ({', '.join((*by, seq))})", f"ANALYZE {table}"]

    def bucket(self, key: str, count: int) -> str:
        # The portable form computes the MD5 once per hex digit (PostgreSQL does not share
        # the four calls); read as a bit string, once: 1M keys 2.08 -> 0.52 s.
        return f"COALESCE(CAST(CAST('x' || SUBSTR(MD5({key}), 1, 4) AS BIT(16)) AS INTEGER) % {int(count)}, 0)"

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

    def rate_budget_sql(self, table: str) -> tuple[str, str]:
        # The grant: one statement, one round trip, in autocommit. The UPDATE grants or not
        # (the generic cell rate algorithm on the database's clock, atomic under the row
        # lock), and the SELECT (which sees the row as it was before the UPDATE) says how
        # long until the next grant.
        #
        # It commits without waiting for the WAL flush: a synchronous commit per request cost
        # 1,000 grants 5.3 s of a 1M-row sync's sender threads. "It is ... possible, and
        # useful, to have some transactions commit synchronously and others asynchronously";
        # the setting in effect when a transaction commits decides (PostgreSQL docs,
        # synchronous_commit), and set_config(..., true) sets it for this one. A server crash
        # can lose the last grants' pacing, never state: the row only spaces requests out.
        grant = f"""
            WITH granted AS (
                UPDATE {table}
                SET tat = GREATEST(tat, clock_timestamp()) + make_interval(secs => :interval)
                WHERE workspace = :workspace
                  AND tat <= clock_timestamp() + make_interval(secs => :tolerance)
                RETURNING 1
            )
            SELECT EXISTS (SELECT 1 FROM granted),
                   EXTRACT(EPOCH FROM (tat - clock_timestamp())) - :tolerance
            FROM {table}
            WHERE workspace = :workspace
              AND set_config('synchronous_commit', 'off', true) IS NOT NULL
        """
        create = f"""
            INSERT INTO {table} (workspace, tat) VALUES (:workspace, clock_timestamp())
            ON CONFLICT (workspace) DO NOTHING
        """
        return grant, create

    @classmethod
    def missing_driver(cls, setting: str, drivername: str, missing: str) -> str:
        # SQLAlchemy's default PostgreSQL driver (a bare postgresql://) is psycopg2.
        driver = drivername.partition("+")[2] or "psycopg2"
        if driver == cls.driver:
            return super().missing_driver(setting, drivername, missing)
        form, _, extra = cls.driver_extra
        return (
            f"{setting}: {drivername}:// needs the {driver} driver, which is not "
            f"installed ({missing}); use {form}... with the `{extra}` extra: {_install(extra)}"
        )


class SnowflakeDialect(Dialect):
    """Snowflake through snowflake-connector-python and snowflake-sqlalchemy."""

    name = "snowflake"
    # "EPOCH_MICROSECOND" is a date part of DATE_PART (Snowflake docs, "Supported date and
    # time parts").
    now_micros = "DATE_PART(EPOCH_MICROSECOND, CURRENT_TIMESTAMP())"
    driver_extra = ("snowflake://", "snowflake-sqlalchemy", "snowflake")

    # Declared (documentation and tools read it) though Snowflake does not enforce it.
    state_primary_keys = True

    # The connector's HTTP failures once its own retries ran out: they derive from its Error,
    # not OperationalError, so SQLAlchemy wraps them as a plain DBAPIError
    # (snowflake.connector.errors: HttpError, InternalServerError, ServiceUnavailableError,
    # GatewayTimeoutError, BadGatewayError, RequestTimeoutError, TooManyRequests,
    # OtherHTTPRetryableError, RequestExceedMaxRetryError).
    unanswered_errors = frozenset(
        {
            "HttpError",
            "InternalServerError",
            "ServiceUnavailableError",
            "GatewayTimeoutError",
            "BadGatewayError",
            "RequestTimeoutError",
            "TooManyRequests",
            "OtherHTTPRetryableError",
            "RequestExceedMaxRetryError",
        }
    )

    # Snowflake recommends statements under 1 MB, parameters included (the connector binds
    # client-side, into the text); keep each batch's JSON well below that.
    MAX_BATCH_BYTES = 512 * 1024

    # ResultMetadata.type_code values (snowflake.connector.constants.FIELD_TYPES) of
    # VARIANT, OBJECT and ARRAY: the connector returns their values as JSON text.
    # fakesnow reports all three as VARIANT (5); real Snowflake says OBJECT (9) and ARRAY (10).
    _JSON_TYPE_CODES = frozenset({5, 9, 10})

    # The names of ResultMetadata.type_code values, by code (the connector's
    # snowflake.connector.constants.FIELD_TYPES order), as far as cio-retl reads them.
    _TYPE_NAMES = (
        "FIXED",
        "REAL",
        "TEXT",
        "DATE",
        "TIMESTAMP",
        "VARIANT",
        "TIMESTAMP_LTZ",
        "TIMESTAMP_TZ",
        "TIMESTAMP_NTZ",
        "OBJECT",
        "ARRAY",
        "BINARY",
        "TIME",
        "BOOLEAN",
    )

    def create_plan(
        self, table: str, query: str, order: Sequence[str], columns: Sequence[tuple[str, str]]
    ) -> list[str]:
        """A TRANSIENT table: it is visible to every session (the state writer reads it from
        another connection; a temporary table "only exist[s] within the session in which
        [it was] created") and, unlike a permanent one, has no Fail-safe period, so a plan
        costs no Fail-safe storage after it is dropped (Snowflake docs, "Working with
        Temporary and Transient Tables"). Its Time Travel stays the transient default (up to
        1 day after the drop): DATA_RETENTION_TIME_IN_DAYS = 0 is left to the schema, as the
        CTAS syntax does not list the parameter and fakesnow cannot parse ALTER TABLE ... SET.
        fakesnow ignores TRANSIENT (sqlglot logs "Unsupported property transientproperty")
        and makes a plain table.

        Written in the order its reads filter by (a shared plan's bucket, then the sequence
        number): Snowflake keeps each micro-partition's range of values per column and
        prunes on it, and a table is clustered as its rows were inserted (Snowflake docs,
        "Micro-partitions & Data Clustering"), so each read of a range of sequence numbers
        (the send, every acknowledgment) scans a few micro-partitions, not the plan
        (Snowflake has no indexes to build instead). The ``AS (SELECT * FROM (...) ORDER BY
        ...)`` form is the one dbt-snowflake writes for a sorted CTAS."""
        by = ", ".join(f"q.{c}" for c in order)
        return [f"CREATE TRANSIENT TABLE {table} AS (SELECT * FROM ({query}) AS q ORDER BY {by})"]

    def plan_sequence(self, order: Sequence[str]) -> str:
        """ROW_NUMBER ordered by ``order``. Snowflake's syntax of a ranking function's
        window has ORDER BY as required (Snowflake docs, ROW_NUMBER and "Window function
        syntax and usage"), and Snowflake refuses ``OVER ()`` ("Window function type
        [ROW_NUMBER] requires ORDER BY in window specification", as reported against
        Snowflake in tidyverse/dbplyr#1332); fakesnow, running DuckDB, accepts it. A
        sequence object needs no order, but "Snowflake does not guarantee generating
        sequence numbers without gaps" (Snowflake docs, "Using Sequences"), and the send
        sizes its reads as ranges of dense numbers. The order (key, snapshot key,
        fingerprint) is deterministic but among rows equal in all three, which are the
        same row; it costs one sort of the planned rows."""
        return f"ROW_NUMBER() OVER (ORDER BY {', '.join(order)})"

    def result_type(self, column: Sequence[Any]) -> str:
        """The type's name, a number with its precision and scale (``NUMBER(38,0)``): the
        scale tells an integer from a decimal, which the type code alone does not."""
        code, precision, scale = column[1], column[4], column[5]
        if code == 0:
            return f"NUMBER({precision},{scale})"
        if isinstance(code, int) and 0 <= code < len(self._TYPE_NAMES):
            return self._TYPE_NAMES[code]
        return str(code)

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
    cls.name: cls for cls in (DuckDBDialect, PostgresDialect, SnowflakeDialect)
}


def dialect_named(name: str) -> type[Dialect] | None:
    """The dialect of SQLAlchemy's backend ``name``; None for one cio-retl does not speak."""
    return _DIALECTS.get(name)


def dialect_for(sa_dialect: sa.Dialect) -> Dialect:
    """The SQL of the engine's database; a clear error for one cio-retl does not speak."""
    cls = dialect_named(sa_dialect.name)
    if cls is None:
        raise ConfigError(
            f"unsupported database dialect {sa_dialect.name!r} ({', '.join(_DIALECTS)})"
        )
    return cls(sa_dialect)
