"""The same typed row on DuckDB, PostgreSQL and Snowflake (fakesnow) normalizes and hashes alike.

The row fingerprint is per database by design (only compared within one database); the
attributes and their hash are what Customer.io sees and must not depend on the warehouse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from cio_retl.models import parse_model
from cio_retl.normalize import canonical_json, normalize_value, to_record
from cio_retl.records import Record
from cio_retl.warehouse import KEY_COLUMN, RowReader, Warehouse, create_engine

JSON_TEXT = '{"b": [1, "two", null], "a": {"nested": true, "n": 1.5}, "z": null}'

# One CREATE TABLE AS per database, the same values in each one's own types.
TYPED_ROW = {
    "duckdb": """
        SELECT 'k1' AS id,
               TIMESTAMP '2024-03-01 12:34:56' AS ts_ntz,
               TIMESTAMPTZ '2024-03-01 12:34:56+02:00' AS ts_tz,
               DATE '2024-03-01' AS day,
               CAST(12.50 AS DECIMAL(12, 2)) AS dec_frac,
               CAST(3 AS DECIMAL(12, 2)) AS dec_int,
               CAST(0.1 AS DOUBLE) AS ratio,
               CAST(2.0 AS DOUBLE) AS whole_float,
               CAST('NaN' AS DOUBLE) AS not_a_number,
               TRUE AS flag,
               CAST(:json AS JSON) AS doc,
               [1, 2, 3] AS numbers,
               ['x', 'ÿ'] AS words,
               'Zoë 🚀 日本語' AS unicode_text,
               CAST(1099511627776 AS BIGINT) AS big,
               CAST(NULL AS VARCHAR) AS nothing
    """,
    "postgresql": """
        SELECT 'k1' AS id,
               TIMESTAMP '2024-03-01 12:34:56' AS ts_ntz,
               TIMESTAMPTZ '2024-03-01 12:34:56+02:00' AS ts_tz,
               DATE '2024-03-01' AS day,
               CAST(12.50 AS NUMERIC(12, 2)) AS dec_frac,
               CAST(3 AS NUMERIC(12, 2)) AS dec_int,
               CAST(0.1 AS DOUBLE PRECISION) AS ratio,
               CAST(2.0 AS DOUBLE PRECISION) AS whole_float,
               CAST('NaN' AS DOUBLE PRECISION) AS not_a_number,
               TRUE AS flag,
               CAST(:json AS JSONB) AS doc,
               ARRAY[1, 2, 3] AS numbers,
               ARRAY['x', 'ÿ'] AS words,
               'Zoë 🚀 日本語' AS unicode_text,
               CAST(1099511627776 AS BIGINT) AS big,
               CAST(NULL AS VARCHAR) AS nothing
    """,
    # fakesnow: a bare ARRAY_CONSTRUCT in CREATE TABLE AS makes a DuckDB INTEGER[] column whose
    # result fakesnow cannot describe (NotImplementedError); real Snowflake makes an ARRAY
    # either way. The explicit CAST(... AS ARRAY) is valid Snowflake and works on both.
    "snowflake": """
        SELECT 'k1' AS id,
               CAST('2024-03-01 12:34:56' AS TIMESTAMP_NTZ) AS ts_ntz,
               CAST('2024-03-01 12:34:56 +02:00' AS TIMESTAMP_TZ) AS ts_tz,
               CAST('2024-03-01' AS DATE) AS day,
               CAST(12.50 AS NUMBER(12, 2)) AS dec_frac,
               CAST(3 AS NUMBER(12, 2)) AS dec_int,
               CAST(0.1 AS FLOAT) AS ratio,
               CAST(2.0 AS FLOAT) AS whole_float,
               CAST('NaN' AS FLOAT) AS not_a_number,
               TRUE AS flag,
               PARSE_JSON(:json) AS doc,
               CAST(ARRAY_CONSTRUCT(1, 2, 3) AS ARRAY) AS numbers,
               CAST(ARRAY_CONSTRUCT('x', 'ÿ') AS ARRAY) AS words,
               'Zoë 🚀 日本語' AS unicode_text,
               CAST(1099511627776 AS BIGINT) AS big,
               CAST(NULL AS VARCHAR) AS nothing
    """,
}

EXPECTED = {
    "id": "k1",
    "ts_ntz": 1709296496,  # naive timestamps are UTC
    "ts_tz": 1709289296,  # 12:34:56+02:00 is 10:34:56 UTC
    "day": 1709251200,
    "dec_frac": 12.5,
    "dec_int": 3,
    "ratio": 0.1,
    "whole_float": 2,
    # not_a_number: NaN becomes NULL, and NULL attributes are absent
    "flag": True,
    "doc": {"a": {"n": 1.5, "nested": True}, "b": [1, "two", None], "z": None},
    "numbers": [1, 2, 3],
    "words": ["x", "ÿ"],
    "unicode_text": "Zoë 🚀 日本語",
    "big": 1099511627776,
}

MODEL = "-- kind: person\n-- identifier: id\n-- key: id\nselect * from typed_values\n"


@pytest.fixture(
    params=["duckdb", pytest.param("postgresql", marks=pytest.mark.postgres), "snowflake"]
)
def typed_record(request: pytest.FixtureRequest, tmp_path: Path) -> Record:
    if request.param == "duckdb":
        url, schema = f"duckdb:///{tmp_path / 'typed.duckdb'}", "main"
    elif request.param == "postgresql":
        pg = request.getfixturevalue("pg_schemas")
        url, schema = pg.url, pg.warehouse
    else:
        url, schema = request.getfixturevalue("fakesnow_url"), "public"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
            conn.execute(
                sa.text(f"CREATE TABLE {schema}.typed_values AS {TYPED_ROW[request.param]}"),
                {"json": JSON_TEXT},
            )
        model = parse_model(
            tmp_path / "typed.sql", MODEL.replace("typed_values", f"{schema}.typed_values")
        )
        warehouse = Warehouse(engine)
        # The columns as the diff reads them: on DuckDB, timestamps, dates and decimals
        # arrive already normalized by SQL (Warehouse.select_list).
        columns = warehouse.select_list(model, "m")
        key = warehouse.dialect.key_expression(model, "m")
        sql = f"SELECT {key} AS {KEY_COLUMN}, {columns} FROM ({model.sql}) AS m"
        with engine.connect() as conn:
            [chunk] = list(warehouse.stream(conn, sql))
        [row] = chunk.rows
        reader = RowReader(row._fields, chunk.json_columns)
        values = reader.values(row)
        key = row[reader.index[KEY_COLUMN]]
        record = to_record(model, key, values)
        assert isinstance(record, Record), record
        return record
    finally:
        engine.dispose()


def test_same_attributes_and_bytes_on_every_warehouse(typed_record: Record) -> None:
    assert typed_record.key == "k1"
    assert typed_record.attributes == EXPECTED
    # The same canonical bytes (what the snapshot keeps) as the expected values, written
    # without any database involved.
    assert canonical_json(typed_record.attributes) == canonical_json(EXPECTED)


# Edge values of every type DuckDB normalizes in SQL: infinities, before 1970 with a
# fraction of a second, the extremes of the calendar, -0, and the widest exact DECIMALs.
DUCKDB_EDGES = """
    SELECT * FROM (VALUES
        (TIMESTAMP '2024-03-01 12:34:56.999999', TIMESTAMPTZ '2024-03-01 12:34:56.5+02:00',
         DATE '2024-03-01', CAST(12.50 AS DECIMAL(12, 2)), CAST(-0.00 AS DECIMAL(15, 2)),
         CAST(999999999999999 AS DECIMAL(15, 0)), CAST(0.12345678901234 AS DECIMAL(15, 14)),
         CAST(123456789012345678 AS DECIMAL(18, 0))),
        (TIMESTAMP '1969-12-31 23:59:59.5', TIMESTAMPTZ '1969-12-31 23:59:59.000001+00',
         DATE '1969-12-31', CAST(-12.5 AS DECIMAL(12, 2)), CAST(-0.01 AS DECIMAL(15, 2)),
         CAST(-999999999999999 AS DECIMAL(15, 0)), CAST(-9.99999999999999 AS DECIMAL(15, 14)),
         CAST(-1.5 AS DECIMAL(18, 1))),
        (TIMESTAMP 'infinity', TIMESTAMPTZ 'infinity', DATE 'infinity', NULL, NULL, NULL, NULL, NULL),
        (TIMESTAMP '-infinity', TIMESTAMPTZ '-infinity', DATE '-infinity', NULL, NULL, NULL, NULL, NULL),
        (TIMESTAMP '0001-01-01 00:00:00', TIMESTAMPTZ '9999-12-31 23:59:59.999999+00',
         DATE '0001-01-01', CAST(0 AS DECIMAL(4, 0)), CAST(1 AS DECIMAL(15, 2)),
         CAST(0 AS DECIMAL(15, 0)), NULL, CAST(4503599627370497 AS DECIMAL(18, 0))),
        (NULL, NULL, DATE '9999-12-31', NULL, NULL, NULL, NULL, NULL)
    ) AS t(ts, tstz, day, d12_2, d15_2, d15_0, d15_14, d18)
"""


def test_duckdb_sql_normalization_matches_python(tmp_path: Path) -> None:
    """What DuckDB normalizes in SQL equals what Python makes of the raw values, edge values
    included, under a session time zone other than UTC."""
    engine = create_engine(f"duckdb:///{tmp_path / 'edges.duckdb'}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE edges AS " + DUCKDB_EDGES))
        model = parse_model(
            tmp_path / "edges.sql",
            "-- kind: person\n-- identifier: id\n-- key: k\nselect 'k' AS k, * from edges\n",
        )
        warehouse = Warehouse(engine)
        converted = warehouse.select_list(model, "m")
        assert converted != "m.*"
        with engine.connect() as conn:
            conn.execute(sa.text("SET TimeZone = 'America/Sao_Paulo'"))
            raw = conn.execute(sa.text(f"SELECT m.* FROM ({model.sql}) AS m")).all()
            sql = conn.execute(sa.text(f"SELECT {converted} FROM ({model.sql}) AS m")).all()
    finally:
        engine.dispose()
    assert len(raw) == len(sql) == 6
    for raw_row, sql_row in zip(raw, sql, strict=True):
        for name, before, after in zip(raw_row._fields, raw_row, sql_row, strict=True):
            assert normalize_value(after) == normalize_value(before), (name, before, after)
            # The SQL already did the work: no datetime/Decimal left where it converts.
            if name in ("ts", "tstz", "day", "d12_2", "d15_2", "d15_0", "d15_14"):
                assert after is None or type(after) in (int, float), (name, after)


def test_duckdb_fingerprint_numbers_agree_with_the_fingerprint_texts(tmp_path: Path) -> None:
    """The numbers a rerun's join compares stand for the texts: a row's number is the one
    its own fingerprint text holds, and a text of another signature holds none."""
    engine = create_engine(f"duckdb:///{tmp_path / 'w.duckdb'}")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE t AS SELECT i AS id, CASE WHEN i % 3 = 0 THEN NULL ELSE 'v' || i END"
                " AS name, i * 1.5 AS score FROM range(-500, 500) r(i)"
            )
        )
    model = parse_model(
        Path("people.sql"), "-- kind: person\n-- identifier: id\n-- key: id\nselect * from t\n"
    )
    warehouse = Warehouse(engine)
    numbers = warehouse.fingerprint_numbers(model, "m", "f.fp")
    assert numbers is not None
    row_number, text_number = numbers
    fingerprint = warehouse.fingerprint(model, "m")
    other = fingerprint.replace(fingerprint[2:14], "0" * 12)  # the same hash, another signature
    assert other != fingerprint
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT r.n, {text_number.replace('f.fp', 'r.fp')},"
                f" {text_number.replace('f.fp', 'r.other')} FROM ("
                f"SELECT {row_number} AS n, {fingerprint} AS fp, {other} AS other"
                " FROM (SELECT * FROM t) AS m) AS r"
            )
        ).all()
    assert len(rows) == 1000 and len({n for n, _, _ in rows}) == 1000
    assert all(n == parsed and theirs is None for n, parsed, theirs in rows)
    engine.dispose()
