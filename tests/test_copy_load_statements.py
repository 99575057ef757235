"""The load's multi-row INSERT statements against real PostgreSQL (psqlODBC) and SQLite ODBC:
batches that are no multiple of the rows a statement carries, statements at the parameter
bound, exact values of every kind, and a retry after a statement failing mid-batch."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyodbc")

from shir.adapters.copy import copy_query
from shir.adapters.copy_load import LoadError, is_loaded, load_file, rows_per_statement
from shir.adapters.copy_sinks import FolderSink
from shir.adapters.odbc import OdbcSource, sqlite_connection_string

pytestmark = pytest.mark.services

TYPES = ("id int PRIMARY KEY, s text, n numeric(18,4), ts timestamp, tz timestamptz, b bytea, "
         "d date, f double precision, ok boolean, big bigint, t time")
# Every row has a value hard to carry: quotes, separators and line breaks, empty text and
# bytes, a numeric at its precision, fractions of a second, an offset, NULL in every column.
BASE = """
(1, 'a,"b"' || chr(10) || 'c;|''?', 12345678901234.5678, '2024-01-02 03:04:05.123456',
 '2024-01-02 03:04:05.654321+02', '\\x00ff10', '2024-02-29', 1.5, true, 9007199254740993,
 '03:04:05.123456'),
(2, '', 0.0001, '1970-01-01 00:00:00', '1999-12-31 23:59:59.999999+00', '', '0001-01-01',
 -0.0, false, -1, '00:00:00'),
(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(4, 'é€ $1 ?', -99999999999999.9999, '2038-01-19 03:14:08', '2024-06-01 12:00:00.5-07',
 '\\x0a0d22', '9999-12-31', 1e300, true, 0, '23:59:59.999999')
"""
ROWS = 1_001  # 181 rows a statement for 11 columns (1,991 parameters)...
BATCH = 700  # ...so a batch of 700 is three full statements and one of 157; the last, 301 rows


def _differences(c: Any, a: str, b: str) -> int:
    return int(c.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) UNION ALL "
        f"(SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})) x").fetchone()[0])


@pytest.fixture
def pg(pg_odbc: str):
    import pyodbc

    c = pyodbc.connect(pg_odbc, autocommit=True)
    table = "stmt_" + uuid.uuid4().hex[:8]
    c.execute(f"CREATE TEMP TABLE base ({TYPES})")
    c.execute(f"INSERT INTO base VALUES {BASE}")
    c.execute(f"CREATE TABLE {table} ({TYPES})")
    c.execute(f"INSERT INTO {table} SELECT g * 4 + id, s, n, ts, tz, b, d, f, ok, big, t "
              f"FROM base, generate_series(0, {ROWS // 4}) g WHERE g * 4 + id <= {ROWS}")
    c.execute(f"CREATE TABLE {table}_back (LIKE {table})")
    yield c, table
    c.execute(f"DROP TABLE {table}")
    c.execute(f"DROP TABLE {table}_back")
    c.close()


def test_rows_a_statement_carries_stay_within_the_parameter_bound() -> None:
    assert rows_per_statement("psqlodbcw.so", 11) == 181  # 1,991 parameters
    assert rows_per_statement("psqlodbcw.so", 1_000) == 2
    assert rows_per_statement("psqlodbcw.so", 2_001) == 1
    assert rows_per_statement("sqlite3odbc.so", 3) == 333
    assert rows_per_statement("msodbcsql18", 3) == 1  # not verified here: single-row INSERTs


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_batches_no_multiple_of_the_statement_load_every_value_exactly(
    pg: tuple[Any, str], pg_odbc: str, tmp_path: Path, fmt: str
) -> None:
    c, table = pg
    out = tmp_path / f"rows.{fmt}"
    with OdbcSource(pg_odbc) as db:
        assert rows_per_statement(db.driver.driver_name, 11) == 181
        copy_query(db, f"SELECT * FROM {table} ORDER BY id", FolderSink(out), fmt, "out")
        with out.open("rb") as f:
            assert load_file(db, f"{table}_back", f, fmt, f"in-{table}", batch_rows=BATCH).rows \
                == ROWS
    assert _differences(c, table, f"{table}_back") == 0
    # the instants themselves, not their text in the session's zone
    assert c.execute(f"SELECT count(*) FROM {table} a JOIN {table}_back b USING (id) "
                     "WHERE a.tz IS DISTINCT FROM b.tz OR a.ts IS DISTINCT FROM b.ts"
                     ).fetchone()[0] == 0


def test_statements_at_the_parameter_bound(pg_odbc: str, tmp_path: Path) -> None:
    import pyodbc

    c = pyodbc.connect(pg_odbc, autocommit=True)
    table = "wide_" + uuid.uuid4().hex[:8]
    columns = 1_000  # two rows a statement: 2,000 parameters, the bound
    names = [f"c{i}" for i in range(columns)]
    c.execute(f"CREATE TABLE {table} ({', '.join(f'{n} text' for n in names)})")
    try:
        path = tmp_path / "wide.csv"
        lines = [",".join(names)] + [",".join(f"r{r}c{i}" if (r + i) % 5 else ""
                                              for i in range(columns)) for r in range(5)]
        path.write_text("\r\n".join(lines) + "\r\n")
        with OdbcSource(pg_odbc) as db, path.open("rb") as f:
            assert rows_per_statement(db.driver.driver_name, columns) == 2
            assert load_file(db, table, f, "csv", f"wide-{table}").rows == 5
        got = {tuple(r) for r in c.execute(f"SELECT * FROM {table}").fetchall()}
        assert got == {tuple(f"r{r}c{i}" if (r + i) % 5 else None for i in range(columns))
                       for r in range(5)}
    finally:
        c.execute(f"DROP TABLE {table}")
        c.close()


def test_a_statement_failing_mid_batch_commits_nothing_of_it_and_the_retry_resumes(
    pg: tuple[Any, str], pg_odbc: str, tmp_path: Path
) -> None:
    c, table = pg
    out = tmp_path / "rows.csv"
    # row 950 is in the second statement of the second transaction: its first statement
    # (rows 701-881) reached the table before, and must go with it
    c.execute(f"ALTER TABLE {table}_back ADD CONSTRAINT no950 CHECK (id <> 950)")
    with OdbcSource(pg_odbc) as db:
        copy_query(db, f"SELECT * FROM {table} ORDER BY id", FolderSink(out), "csv", "out")
        failed = r"(?s)\[23514\].*no950.*rolled back"
        with out.open("rb") as f, pytest.raises(LoadError, match=failed):
            load_file(db, f"{table}_back", f, "csv", f"mid-{table}", batch_rows=BATCH,
                      transaction_rows=BATCH)
        # the first transaction (700 rows) stays; nothing of the one that failed
        kept = tuple(c.execute(f"SELECT count(*), max(id) FROM {table}_back").fetchone())
        assert kept == (BATCH, BATCH)
        assert not is_loaded(db, f"mid-{table}")
        c.execute(f"ALTER TABLE {table}_back DROP CONSTRAINT no950")
        with out.open("rb") as f:
            done = load_file(db, f"{table}_back", f, "csv", f"mid-{table}", batch_rows=BATCH,
                             transaction_rows=BATCH)
        assert (done.resumed_from, done.rows) == (BATCH, ROWS - BATCH)
        assert is_loaded(db, f"mid-{table}")
    assert _differences(c, table, f"{table}_back") == 0


def test_sqlite_takes_multi_row_statements_past_its_bound(require_odbc_driver,
                                                           tmp_path: Path) -> None:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    path = tmp_path / "rows.csv"
    rows = [(i, f"'x\"{i}\n" if i % 3 else "", None if i % 7 == 0 else i / 4) for i in range(700)]
    path.write_text("id,s,f\r\n" + "".join(
        f'{i},"{s.replace(chr(34), chr(34) * 2)}",{"" if f is None else f}\r\n'
        for i, s, f in rows))
    with OdbcSource(sqlite_connection_string(tmp_path / "s.db")) as db:
        assert rows_per_statement(db.driver.driver_name, 3) == 333
        db.execute("CREATE TABLE u (id INTEGER, s TEXT, f REAL)")
        with path.open("rb") as f:
            assert load_file(db, "u", f, "csv", "j", batch_rows=500).rows == 700
        got = [tuple(r) for batch in db.read("SELECT id, s, f FROM u ORDER BY id") for r in batch]
    # an empty CSV field that is quoted is the empty text, not NULL
    assert got == rows


@pytest.mark.parametrize("columns", ["*", "id, s, n, ts, tz, d, f, ok, big, t"])
def test_the_single_row_path_of_other_drivers_loads_every_value_exactly(
    pg: tuple[Any, str], pg_odbc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    columns: str
) -> None:
    # a driver not known to take multi-row statements: fast_executemany (psqlODBC takes it
    # without the bytea column, timestamps sized with their fraction) or, refused for bytea
    # (HY090), plain executemany for the rest of the load
    from shir.adapters import copy_load

    monkeypatch.setattr(copy_load, "_STATEMENT_PARAMS", {})
    c, table = pg
    out = tmp_path / "rows.parquet"
    query = f"SELECT {columns} FROM {table} ORDER BY id"
    c.execute(f"CREATE TABLE {table}_one AS {query} LIMIT 0")
    try:
        with OdbcSource(pg_odbc) as db:
            assert rows_per_statement(db.driver.driver_name, 11) == 1
            copy_query(db, query, FolderSink(out), "parquet", "out")
            with out.open("rb") as f:
                assert load_file(db, f"{table}_one", f, "parquet", f"one-{table}",
                                 batch_rows=BATCH).rows == ROWS
        assert c.execute(f"SELECT count(*) FROM (({query}) EXCEPT ALL "
                         f"SELECT * FROM {table}_one) x").fetchone()[0] == 0
    finally:
        c.execute(f"DROP TABLE {table}_one")
