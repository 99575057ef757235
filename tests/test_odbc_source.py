"""The ODBC source adapter against real drivers: SQLite ODBC (embedded) and psqlODBC + PostgreSQL.

SQLite tests need only the SQLite3 ODBC driver; PostgreSQL tests (marked ``services``) need the
throwaway server that scripts/test starts (``SHIR_PG_ODBC``). Every table is a TEMP table of
the source's own connection, or lives in a temporary SQLite file; every source is closed.
The canary part checks that a password never shows in errors, tracebacks (frame locals
included), reprs or logs; it lives here rather than in test_no_secret_leaks.py so the two
files can change independently.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from canary import CANARY

pyodbc = pytest.importorskip("pyodbc")

from shir.adapters.odbc import (  # noqa: E402 - after the importorskip
    Column,
    ConnectFailed,
    ConnectionLost,
    DriverNotInstalled,
    InvalidConnectionString,
    OdbcError,
    OdbcSource,
    QueryCancelled,
    QueryFailed,
    QueryTimedOut,
    format_connection_string,
    parse_connection_string,
    postgresql_connection_string,
    sqlite_connection_string,
)
from shir.core.errors import ShirError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Values an ODBC connection string must escape; each survives format -> parse unchanged.
AWKWARD = ["p;w", "p{w", "p}w", "}", "{pw}", "p}}w", "p=w", " pw", "pw ", "", "ü✓ 'q\""]
# A recursive CTE that keeps SQLite busy for minutes unless interrupted.
SQLITE_SPIN = (
    "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 2000000000)"
    " SELECT count(*) FROM r"
)


def rows_of(stream: Iterator[tuple[tuple[Any, ...], ...]]) -> list[tuple[Any, ...]]:
    return [row for batch in stream for row in batch]


# --- connection strings (no driver needed) ----------------------------------------------------


@pytest.mark.parametrize("value", AWKWARD)
def test_format_then_parse_gives_back_every_value(value: str) -> None:
    text = format_connection_string({"Driver": "X", "Server": "h", "Pwd": value, "Port": 5})
    assert parse_connection_string(text) == {"driver": "X", "server": "h", "pwd": value,
                                             "port": "5"}  # fmt: skip


def test_values_are_braced_only_when_needed() -> None:
    assert format_connection_string({"Server": "db.local", "Pwd": "a;b}c"}) == (
        "Server=db.local;Pwd={a;b}}c}"
    )
    assert format_connection_string({"Driver": "SQLite3"}) == "Driver={SQLite3}"


def test_parse_reads_what_people_write() -> None:
    text = " Driver={PostgreSQL Unicode}; SERVER = h ;Port=5;;Pwd={x;y};Extra={a}}b};"
    assert parse_connection_string(text) == {
        "driver": "PostgreSQL Unicode", "server": "h", "port": "5", "pwd": "x;y", "extra": "a}b",
    }  # fmt: skip


@pytest.mark.parametrize("text", [
    f"Pwd={{{CANARY}", f"Server=h;{CANARY}", f"Pwd={{{CANARY}}}x",
    # an unbraced password with ; and = in it: its tail reads as a key, which is not repeated
    f"Pwd=ab;{CANARY}={{x", f"Pwd=ab;{CANARY}={{x}}y",
])  # fmt: skip
def test_malformed_strings_are_refused_without_repeating_them(text: str) -> None:
    with pytest.raises(InvalidConnectionString) as caught:
        parse_connection_string(text)
    assert CANARY not in str(caught.value)
    assert isinstance(caught.value, ShirError) and isinstance(caught.value, ValueError)


def test_bad_keys_are_refused() -> None:
    for key in ("", "a;b", "a=b", " a", "{a}"):
        with pytest.raises(InvalidConnectionString):
            format_connection_string({key: "v"})


def test_postgresql_builder_streams_and_escapes() -> None:
    text = postgresql_connection_string(
        "db.example", 5433, "sales", "reader", "p;w}d", fetch_rows=500, statement_timeout_s=2.5,
        extra={"SSLmode": "require"},
    )
    assert parse_connection_string(text) == {
        "driver": "PostgreSQL Unicode", "server": "db.example", "port": "5433",
        "database": "sales", "uid": "reader", "pwd": "p;w}d", "usedeclarefetch": "1",
        "fetch": "500", "boolsaschar": "0",
        "connsettings": "SET TimeZone = 'UTC'; SET statement_timeout = 2500",
        "sslmode": "require",
    }  # fmt: skip
    plain = parse_connection_string(postgresql_connection_string("h", 1, "d", "u", "p",
                                                                 time_zone=None))  # fmt: skip
    assert "connsettings" not in plain and plain["fetch"] == "10000"
    for bad in ({"port": 0}, {"port": 70000}, {"fetch_rows": 0}, {"statement_timeout_s": 0}):
        kwargs: dict[str, Any] = {"port": 5432, **bad}
        with pytest.raises(ValueError):
            postgresql_connection_string("h", database="d", user="u", password="p", **kwargs)


def test_sqlite_builder(tmp_path: Path) -> None:
    path = tmp_path / "we;ird {name}.sqlite3"
    text = sqlite_connection_string(path, extra={"Timeout": 5000})
    assert parse_connection_string(text) == {"driver": "SQLite3", "database": str(path),
                                             "timeout": "5000"}  # fmt: skip


# --- import without pyodbc ----------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_without_pyodbc_the_import_error_says_what_to_install() -> None:
    result = run_python(
        "import sys; sys.modules['pyodbc'] = None\n"
        "import shir.adapters, shir.adapters.filestore\n"  # the package itself still imports
        "try:\n"
        "    import shir.adapters.odbc\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    print('imported')\n"
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'shir[odbc]'" in result.stdout
    assert "odbc-postgresql" in result.stdout and "libsqliteodbc" in result.stdout
    assert "unixodbc" in result.stdout


# --- SQLite ODBC ----------------------------------------------------------------------------------


@pytest.fixture
def sqlite(
    tmp_path: Path, require_odbc_driver: Callable[[str, str], None]
) -> Iterator[OdbcSource]:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    with OdbcSource(sqlite_connection_string(tmp_path / "source.sqlite3")) as source:
        yield source
    assert source.closed


def test_sqlite_streams_batches_of_the_requested_size(sqlite: OdbcSource) -> None:
    sqlite.execute("CREATE TEMP TABLE t (id INTEGER PRIMARY KEY, label TEXT)")
    inserted = sqlite.execute(
        "INSERT INTO t WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g"
        " WHERE i < 2500) SELECT i, 'row ' || i FROM g"
    )
    assert inserted == 2500
    stream = sqlite.read("SELECT id, label FROM t ORDER BY id", batch_rows=400)
    sizes = [len(batch) for batch in stream]
    assert sizes == [400] * 6 + [100]
    assert stream.rows_read == 2500 and stream.batches_read == 7
    # a whole number of batches: no empty batch at the end
    exact = sqlite.read("SELECT id FROM t WHERE id <= 800 ORDER BY id", batch_rows=400)
    batches = list(exact)
    assert [len(b) for b in batches] == [400, 400]
    assert batches[1][-1] == (800,)
    assert all(type(row) is tuple for row in batches[0])


def test_sqlite_column_descriptions_come_before_the_first_batch(sqlite: OdbcSource) -> None:
    sqlite.execute("CREATE TEMP TABLE t (id INTEGER, label VARCHAR(20), amount NUMERIC(12,2))")
    with sqlite.read("SELECT id, label, amount FROM t") as stream:
        assert stream.column_names == ("id", "label", "amount")
        assert stream.columns[0] == Column("id", int, 10, 0, True)
        assert stream.columns[1].python_type is str and stream.columns[1].size == 20
        assert stream.columns[2].python_type is float  # SQLite's NUMERIC: REAL or INTEGER
        assert list(stream) == []  # an empty result yields no batch at all


def test_sqlite_values_unicode_nulls_numeric_timestamps(sqlite: OdbcSource) -> None:
    sqlite.execute(
        "CREATE TEMP TABLE t (id INTEGER, amount NUMERIC(12,2), label TEXT, at TIMESTAMP,"
        " day DATE, ratio REAL, raw BLOB, dec DECIMAL(10,3))"
    )
    at = dt.datetime(2024, 2, 29, 23, 59, 58, 123000)
    sqlite.execute(
        "INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (1, Decimal("1000.05"), "naïve ✓ 日本 🙂", at, dt.date(2024, 2, 29), 0.5, b"\x00\xff",
         Decimal("2.125")),
    )  # fmt: skip
    sqlite.execute("INSERT INTO t (id) VALUES (2)")
    with sqlite.read("SELECT * FROM t ORDER BY id") as stream:
        types = {c.name: c.python_type for c in stream.columns}
        first, second = rows_of(stream)
    assert first == (1, 1000.05, "naïve ✓ 日本 🙂", at, dt.date(2024, 2, 29), 0.5, b"\x00\xff",
                     "2.125")  # fmt: skip
    # As the driver gives them: NUMERIC -> float (the stored REAL), DECIMAL -> str.
    assert type(first[1]) is float and type(first[7]) is str
    assert types["amount"] is float and types["at"] is dt.datetime and types["dec"] is str
    assert type(first[6]) is bytes
    assert second == (2, None, None, None, None, None, None, None)


def test_sqlite_failing_query_then_the_source_reads_again(sqlite: OdbcSource) -> None:
    with pytest.raises(QueryFailed) as caught:
        sqlite.read("SELECT * FROM no_such_table")
    error = caught.value
    assert error.sqlstate == "HY000"
    assert "no such table: no_such_table" in str(error)
    assert "database " in str(error) and "SQLite3" in str(error)  # names the target
    assert error.__cause__ is None and error.__context__ is None
    with pytest.raises(QueryFailed, match="syntax error"):
        sqlite.read("SELEC 1")
    with pytest.raises(QueryFailed, match="no result set"):
        sqlite.read("CREATE TEMP TABLE t (x)")
    assert rows_of(sqlite.read("SELECT ? + 1", (41,))) == [(42,)]
    # pyodbc's own parameter check gives (message, SQLSTATE): the state is still found
    with pytest.raises(QueryFailed) as caught:
        sqlite.read("SELECT 1", (1,))
    assert caught.value.sqlstate == "HY000"
    assert str(caught.value).endswith("0 parameter markers, but 1 parameters were supplied")
    with pytest.raises(TypeError, match="params must be a sequence"):
        sqlite.read("SELECT ?", "x")
    with pytest.raises(ValueError, match="batch_rows"):
        sqlite.read("SELECT 1", batch_rows=0)


def test_sqlite_one_read_at_a_time_and_close_early(sqlite: OdbcSource) -> None:
    stream = sqlite.read("SELECT 1 UNION ALL SELECT 2", batch_rows=1)
    assert next(stream) == ((1,),)
    with pytest.raises(OdbcError, match="a read is still open"):
        sqlite.read("SELECT 3")
    stream.close()
    assert list(stream) == []
    assert rows_of(sqlite.read("SELECT 3")) == [(3,)]  # a short batch closed that read


def test_sqlite_timeout_interrupts_a_long_query(tmp_path: Path, sqlite: OdbcSource) -> None:
    with OdbcSource(sqlite_connection_string(tmp_path / "t.sqlite3"), timeout_s=0.3) as source:
        start = time.monotonic()
        with pytest.raises(QueryTimedOut, match=r"timeout_s=0\.3"):
            source.read(SQLITE_SPIN)
        assert time.monotonic() - start < 5
        assert rows_of(source.read("SELECT 'still usable'")) == [("still usable",)]
        assert isinstance(QueryTimedOut("x"), QueryCancelled)
        assert any(t.name.startswith("shir-odbc-watchdog") for t in threading.enumerate())
    # close() stops the watchdog thread
    assert not any(t.name.startswith("shir-odbc-watchdog") for t in threading.enumerate())


def test_a_source_dropped_without_close_does_not_live_on_in_its_watchdog(
    tmp_path: Path, require_odbc_driver: Callable[[str, str], None]
) -> None:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    source = OdbcSource(sqlite_connection_string(tmp_path / "t.sqlite3"), timeout_s=30)
    assert rows_of(source.read("SELECT 1")) == [(1,)]  # the first timed call starts it
    watchdog = source._watchdog
    assert watchdog is not None and watchdog.is_alive()
    collected = weakref.ref(source)
    del source
    gc.collect()
    assert collected() is None, "the watchdog thread kept the source alive"
    watchdog.join(timeout=5)
    assert not watchdog.is_alive()


def test_sqlite_cancel_from_another_thread(sqlite: OdbcSource) -> None:
    timer = threading.Timer(0.3, sqlite.cancel)
    timer.start()
    start = time.monotonic()
    with pytest.raises(QueryCancelled) as caught:
        sqlite.read(SQLITE_SPIN)
    timer.join()
    assert not isinstance(caught.value, QueryTimedOut)
    assert time.monotonic() - start < 5
    sqlite.cancel()  # no read open: nothing happens
    assert rows_of(sqlite.read("SELECT 1")) == [(1,)]


def test_cancel_between_batches_stops_the_read(sqlite: OdbcSource) -> None:
    stream = sqlite.read("SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3", batch_rows=1)
    next(stream)
    sqlite.cancel()
    with pytest.raises(QueryCancelled):
        next(stream)
    assert rows_of(sqlite.read("SELECT 4")) == [(4,)]


def test_sqlite_cancel_during_a_fetch_does_not_crash(tmp_path: Path) -> None:
    """SQLite ODBC's SQLCancel frees the result a fetch in another thread is reading. With
    freed memory unmapped at once (a small mmap threshold) that crashed within a few tries."""
    code = (
        "import random, sys, threading, time\n"
        "from shir.adapters.odbc import OdbcSource, QueryCancelled, sqlite_connection_string\n"
        "with OdbcSource(sqlite_connection_string(sys.argv[1])) as s:\n"
        "    s.execute('CREATE TABLE t (i INTEGER, pad TEXT)')\n"
        "    s.execute(\"INSERT INTO t WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1\"\n"
        "              \" FROM g WHERE i < 30000) SELECT i, printf('%040d', i) FROM g\")\n"
        "    stream = s.read('SELECT i, pad FROM t', batch_rows=30000)\n"
        "    start = time.monotonic(); next(stream); fetch_s = time.monotonic() - start\n"
        "    stream.close()\n"
        "    rng, cancelled = random.Random(7), 0\n"
        "    for _ in range(40):\n"
        "        stream = s.read('SELECT i, pad FROM t', batch_rows=30000)\n"
        "        timer = threading.Timer(rng.uniform(0, fetch_s), s.cancel)\n"
        "        timer.start()\n"
        "        try:\n"
        "            assert [r[0] for r in next(stream)] == list(range(1, 30001))\n"
        "        except QueryCancelled:\n"
        "            cancelled += 1\n"
        "        timer.join()\n"
        "        stream.close()\n"
        "print('cancelled', cancelled)\n"
    )
    if "SQLite3" not in pyodbc.drivers():
        pytest.skip("the ODBC driver {SQLite3} is not installed (libsqliteodbc)")
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "t.sqlite3")], capture_output=True, text=True,
        timeout=120, cwd=ROOT, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )  # fmt: skip
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    # a cancel that lands in the fetch stops the read once the fetch returns
    assert int(result.stdout.split()[1]) > 0, result.stdout


def test_unknown_driver_names_what_is_installed(tmp_path: Path) -> None:
    with pytest.raises(DriverNotInstalled) as caught:
        OdbcSource(f"Driver={{No Such Driver}};Database={tmp_path / 'x'}")
    message = str(caught.value)
    assert "{No Such Driver} is not installed" in message and "odbcinst -q -d" in message
    for installed in pyodbc.drivers():
        assert installed in message


def test_missing_driver_names_the_debian_package(tmp_path: Path) -> None:
    # An empty odbcinst.ini: unixODBC knows no driver at all, as on a fresh machine.
    (tmp_path / "odbcinst.ini").write_text("")
    (tmp_path / "odbc.ini").write_text("")
    result = subprocess.run(
        [sys.executable, "-c",
         "from shir.adapters.odbc import OdbcSource, postgresql_connection_string as pg\n"
         "for s in ('Driver={SQLite3};Database=x', pg('h', 5432, 'd', 'u', 'p')):\n"
         "    try:\n"
         "        OdbcSource(s)\n"
         "    except Exception as e:\n"
         "        print(type(e).__name__, e)\n"],
        capture_output=True, text=True, timeout=60,
        env={"ODBCSYSINI": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sqlite_line, pg_line = result.stdout.splitlines()
    assert sqlite_line.startswith("DriverNotInstalled the ODBC driver {SQLite3} is not installed")
    assert "apt-get install libsqliteodbc" in sqlite_line and "odbcinst -q -d" in sqlite_line
    assert "apt-get install odbc-postgresql" in pg_line


def test_driver_library_that_cannot_be_loaded() -> None:
    with pytest.raises(DriverNotInstalled) as caught:
        OdbcSource("Driver=/nonexistent/libnothing.so;Database=x")
    assert caught.value.sqlstate == "01000"
    assert "Can't open lib" in str(caught.value) and "odbcinst -q -d" in str(caught.value)


def test_sqlite_unopenable_file(require_odbc_driver: Callable[[str, str], None]) -> None:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    with pytest.raises(ConnectFailed, match=r"database /nonexistent/dir/x\.db"):
        OdbcSource(sqlite_connection_string("/nonexistent/dir/x.db"))


def test_repr_names_target_and_driver(sqlite: OdbcSource) -> None:
    assert re.fullmatch(
        r"<OdbcSource driver \{SQLite3\}, database .*source\.sqlite3 \(SQLite [\d.]+ via "
        r"sqlite3odbc\.so [\d.]+\) timeout_s=None open>", repr(sqlite)
    )
    stream = sqlite.read("SELECT 1 AS one")
    assert "reading" in repr(sqlite) and repr(stream).startswith("<RowStream ('one',)")
    stream.close()


def test_docs_sources_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, require_odbc_driver: Callable[[str, str], None]
) -> None:
    """Every ```python block of docs/sources.md runs, in order, in one namespace."""
    require_odbc_driver("SQLite3", "libsqliteodbc")
    monkeypatch.chdir(tmp_path)  # the example writes its database file in the working folder
    page = (ROOT / "docs" / "sources.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", page, re.S | re.M)
    assert blocks, "docs/sources.md lost its runnable example"
    namespace: dict[str, object] = {"__name__": "docs.sources"}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/sources.md (python block {i})", "exec"), namespace)


# --- PostgreSQL through psqlODBC ------------------------------------------------------------------


@pytest.fixture
def pg_parts(pg_odbc: str, require_odbc_driver: Callable[[str, str], None]) -> dict[str, Any]:
    """The fixture's server, port, database, user and password, for the builder."""
    require_odbc_driver("PostgreSQL Unicode", "odbc-postgresql")
    pairs = parse_connection_string(pg_odbc)
    return {"host": pairs["server"], "port": int(pairs["port"]), "database": pairs["database"],
            "user": pairs["uid"], "password": pairs["pwd"]}  # fmt: skip


@pytest.fixture
def pg(pg_parts: dict[str, Any]) -> Iterator[OdbcSource]:
    with OdbcSource(postgresql_connection_string(**pg_parts)) as source:
        yield source


def backend_pid(source: OdbcSource) -> int:
    (((pid,),),) = source.read("SELECT pg_backend_pid()")
    return int(pid)


@pytest.mark.services
def test_pg_streams_in_batches_of_the_requested_size(pg: OdbcSource) -> None:
    pg.execute("CREATE TEMP TABLE t AS SELECT g AS id, 'row ' || g AS label"
               " FROM generate_series(1, 2500) g")  # fmt: skip
    stream = pg.read("SELECT id, label FROM t ORDER BY id", batch_rows=400)
    batches = list(stream)
    assert [len(b) for b in batches] == [400] * 6 + [100]
    assert batches[0][0] == (1, "row 1") and batches[-1][-1] == (2500, "row 2500")
    assert stream.rows_read == 2500 and stream.batches_read == 7
    assert [len(b) for b in pg.read("SELECT id FROM t WHERE id <= 800", batch_rows=400)] == [
        400, 400,
    ]


@pytest.mark.services
@pytest.mark.parametrize("batch_rows", [2, 3, 10])  # ends on a short batch, an empty fetch, both
def test_pg_a_second_result_set_fails_the_read_instead_of_vanishing(
    pg: OdbcSource, batch_rows: int
) -> None:
    stream = pg.read("SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3; SELECT 42",
                     batch_rows=batch_rows)  # fmt: skip
    with pytest.raises(QueryFailed, match="more than one result set"):
        list(stream)
    assert rows_of(pg.read("SELECT 'still usable'")) == [("still usable",)]


@pytest.mark.services
def test_pg_statements_without_rows_before_the_select_are_run(pg: OdbcSource) -> None:
    assert rows_of(pg.read("SET LOCAL statement_timeout = '5s'; SELECT 7")) == [(7,)]
    assert rows_of(pg.read("SELECT 1; SET LOCAL work_mem = '8MB'")) == [(1,)]


@pytest.mark.services
def test_pg_streams_through_a_server_side_cursor(pg_parts: dict[str, Any]) -> None:
    cs = postgresql_connection_string(**pg_parts, fetch_rows=500)
    with OdbcSource(cs) as source, OdbcSource(cs) as observer:
        pid = backend_pid(source)
        stream = source.read("SELECT g FROM generate_series(1, 2500) g", batch_rows=400)
        assert len(next(stream)) == 400
        # psqlODBC declared a cursor and fetches 500 rows per round trip
        (((last_query,),),) = observer.read(
            "SELECT query FROM pg_stat_activity WHERE pid = ?", (pid,)
        )
        assert re.search(r"(?i)declare .* cursor .*fetch 500 in", last_query), last_query
        stream.close()
        # Rows are computed as they are fetched: the error at row 1000 surfaces only with the
        # fetch of rows 501-1000, in the second batch (a buffering driver fails the execute).
        stream = source.read("SELECT 1 / (1000 - g) FROM generate_series(1, 2500) g",
                             batch_rows=400)  # fmt: skip
        assert len(next(stream)) == 400
        with pytest.raises(QueryFailed) as caught:
            next(stream)
        assert caught.value.sqlstate == "22012"


@pytest.mark.services
def test_pg_columns_and_values(pg: OdbcSource) -> None:
    pg.execute(
        "CREATE TEMP TABLE t (id bigint, amount numeric(12, 2), big numeric, ratio float8,"
        " label text, code varchar(8), at timestamp, at_tz timestamptz, day date, flag boolean,"
        " raw bytea)"
    )
    at = dt.datetime(2024, 2, 29, 23, 59, 58, 123456)
    pg.execute(
        "INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?, '2024-01-01 12:00:00+05:30', ?, ?, ?)",
        (2**40, Decimal("1000.05"), Decimal("12345678901234567890.000000001"), 0.1,
         "naïve ✓ 日本 🙂", "abc", at, dt.date(2024, 2, 29), True, b"\x00\xff"),
    )  # fmt: skip
    pg.execute("INSERT INTO t (id) VALUES (2)")
    with pg.read("SELECT * FROM t ORDER BY id DESC") as stream:
        columns = {c.name: c for c in stream.columns}
        first, second = rows_of(stream)
    assert columns["amount"] == Column("amount", Decimal, 12, 2, True)
    assert columns["code"].python_type is str and columns["code"].size == 8
    assert columns["at"].python_type is dt.datetime and columns["flag"].python_type is bool
    assert first == (
        2**40, Decimal("1000.05"), Decimal("12345678901234567890.000000001"), 0.1,
        "naïve ✓ 日本 🙂", "abc", at, dt.datetime(2024, 1, 1, 6, 30), dt.date(2024, 2, 29),
        True, b"\x00\xff",
    )  # fmt: skip
    # numeric is exact: Decimal, not float; timestamptz arrives as naive UTC (the builder's zone)
    assert type(first[1]) is Decimal and type(first[2]) is Decimal
    assert second == (2, *([None] * 10))


@pytest.mark.services
def test_pg_bad_credentials(pg_parts: dict[str, Any]) -> None:
    cs = postgresql_connection_string(**{**pg_parts, "password": "wrong-password"})
    with pytest.raises(ConnectFailed) as caught:
        OdbcSource(cs)
    message = str(caught.value)
    assert caught.value.sqlstate == "08001"
    assert "password authentication failed" in message
    for part in (f"server {pg_parts['host']}", f"port {pg_parts['port']}",
                 f"database {pg_parts['database']}", f"user {pg_parts['user']}"):  # fmt: skip
        assert part in message
    assert "wrong-password" not in message


@pytest.mark.services
def test_pg_closed_port(pg_parts: dict[str, Any]) -> None:
    cs = postgresql_connection_string(**{**pg_parts, "port": 9})  # discard: closed on loopback
    with pytest.raises(ConnectFailed, match=r"port 9, database .*Connection refused"):
        OdbcSource(cs, connect_timeout_s=5)


@pytest.mark.services
def test_pg_failing_queries_roll_back_and_the_source_goes_on(pg: OdbcSource) -> None:
    with pytest.raises(QueryFailed) as caught:
        pg.read("SELECT * FROM no_such_table")
    assert caught.value.sqlstate == "42P01"
    assert 'relation "no_such_table" does not exist' in caught.value.driver_message
    with pytest.raises(QueryFailed) as caught:
        rows_of(pg.read("SELECT 1 / (g - 3) FROM generate_series(1, 5) g", batch_rows=1))
    assert caught.value.sqlstate == "22012"
    assert rows_of(pg.read("SELECT 'fine'")) == [("fine",)]  # the aborted transaction is gone


@pytest.mark.services
def test_pg_timeout_cancels_the_query(pg_parts: dict[str, Any]) -> None:
    with OdbcSource(postgresql_connection_string(**pg_parts), timeout_s=0.5) as source:
        start = time.monotonic()
        with pytest.raises(QueryTimedOut) as caught:
            source.read("SELECT pg_sleep(10)")
        assert time.monotonic() - start < 3
        assert caught.value.sqlstate == "57014"  # PostgreSQL's query_canceled
        assert rows_of(source.read("SELECT 'usable'")) == [("usable",)]


@pytest.mark.services
def test_pg_execute_that_committed_is_not_reported_as_stopped(pg_parts: dict[str, Any]) -> None:
    """A commit that outlives timeout_s (or meets a cancel) but succeeds has happened: execute
    returns its count rather than an error that would invite a second, duplicate insert."""
    with OdbcSource(postgresql_connection_string(**pg_parts), timeout_s=0.5) as source:
        source.execute("CREATE TEMP TABLE t (id int)")
        source.execute(
            "CREATE FUNCTION pg_temp.slow() RETURNS trigger LANGUAGE plpgsql"
            " AS 'BEGIN PERFORM pg_sleep(1); RETURN NULL; END'"
        )
        source.execute(  # runs at COMMIT: the INSERT is quick, the commit takes 1 s
            "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED"
            " FOR EACH ROW EXECUTE FUNCTION pg_temp.slow()"
        )
        start = time.monotonic()
        assert source.execute("INSERT INTO t VALUES (1)") == 1
        assert time.monotonic() - start >= 0.9  # the deadline passed during the commit
        timer = threading.Timer(0.3, source.cancel)
        timer.start()
        assert source.execute("INSERT INTO t VALUES (2)") == 1
        timer.join()
        assert rows_of(source.read("SELECT id FROM t ORDER BY id")) == [(1,), (2,)]


@pytest.mark.services
def test_pg_cancel_from_another_thread(pg: OdbcSource) -> None:
    timer = threading.Timer(0.3, pg.cancel)
    timer.start()
    start = time.monotonic()
    with pytest.raises(QueryCancelled, match=r"cancelled \(OdbcSource\.cancel\)"):
        pg.read("SELECT pg_sleep(10)")
    timer.join()
    assert time.monotonic() - start < 3
    assert rows_of(pg.read("SELECT 1")) == [(1,)]


@pytest.mark.services
def test_pg_slow_fetch_timeout(pg_parts: dict[str, Any]) -> None:
    """psqlODBC ignores SQLCancel while fetching a declare/fetch block: the timeout comes
    late but comes; the server's statement_timeout bounds the fetch itself."""
    slow = ("SELECT g, pg_sleep(CASE WHEN g > 100 THEN 0.02 ELSE 0 END)"
            " FROM generate_series(1, 400) g")  # fmt: skip
    cs = postgresql_connection_string(**pg_parts, fetch_rows=100)
    with OdbcSource(cs, timeout_s=0.5) as source:
        stream = source.read(slow, batch_rows=100)
        assert len(next(stream)) == 100
        start = time.monotonic()
        with pytest.raises(QueryTimedOut):
            next(stream)  # one FETCH of 100 rows x 20 ms
        assert 0.5 <= time.monotonic() - start < 10
    bounded = postgresql_connection_string(**pg_parts, fetch_rows=100, statement_timeout_s=0.5)
    with OdbcSource(bounded) as source:
        stream = source.read(slow, batch_rows=100)
        next(stream)
        start = time.monotonic()
        with pytest.raises(QueryTimedOut) as caught:
            next(stream)
        assert time.monotonic() - start < 1.8
        assert caught.value.sqlstate == "57014" and "statement timeout" in str(caught.value)


@pytest.mark.services
def test_pg_connection_lost_mid_read(pg: OdbcSource, pg_parts: dict[str, Any]) -> None:
    pid = backend_pid(pg)
    stream = pg.read("SELECT g FROM generate_series(1, 100000) g", batch_rows=10)
    next(stream)
    with OdbcSource(postgresql_connection_string(**pg_parts)) as admin:
        assert rows_of(admin.read("SELECT pg_terminate_backend(?)", (pid,))) == [(True,)]
    with pytest.raises(ConnectionLost) as caught:
        rows_of(stream)  # the first 10 000 rows are in the client; the next FETCH fails
    assert caught.value.sqlstate in ("57P01", "08S01")
    with pytest.raises(ConnectionLost):
        pg.read("SELECT 1")


@pytest.mark.services
def test_pg_without_declare_fetch_warns(
    pg_odbc: str, pg_parts: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shir.adapters.odbc")
    buffered = re.sub(r"(?i);UseDeclareFetch=1", "", pg_odbc)
    with OdbcSource(buffered):
        pass
    assert "reads each whole result into memory" in caplog.text
    caplog.clear()
    with OdbcSource(postgresql_connection_string(**pg_parts)) as source:
        assert source.driver.driver_name.startswith("psqlodbc")
        assert source.driver.dbms_name == "PostgreSQL"
    assert caplog.text == ""


# --- no secret leaks ----------------------------------------------------------------------------


def assert_clean(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret leaked into {where}: {text!r}"


def refused(
    action: Callable[[], object], error: type[Exception], secrets: list[str],
    *, query_has_secret: bool = False,
) -> Exception:
    """Run ``action``; it must raise ``error`` holding no secret, not even in frame locals
    (unless the caller put the secret in the query text, which the adapter's frames hold)."""
    with pytest.raises(error) as caught:
        action()
    exc = caught.value
    assert_clean("".join(traceback.format_exception(exc)), secrets, "a formatted traceback")
    assert_clean(repr(exc) + str(exc) + repr(exc.args) + repr(vars(exc)), secrets, "the error")
    tb = None if query_has_secret else exc.__traceback__
    while tb is not None:  # frames of the adapter only: the test's own frame holds the secret
        if tb.tb_frame.f_code.co_filename.endswith("odbc.py"):
            assert_clean(repr(tb.tb_frame.f_locals), secrets, "an adapter frame's locals")
        tb = tb.tb_next
    return exc


def test_canary_sqlite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
    require_odbc_driver: Callable[[str, str], None],
) -> None:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    caplog.set_level(logging.DEBUG)
    secrets = [CANARY, "s3cr3t"]
    cs = sqlite_connection_string(tmp_path / "db.sqlite3", extra={"Pwd": CANARY})
    with OdbcSource(cs, timeout_s=5) as source:
        assert_clean(repr(source) + str(source) + repr(vars(source)), secrets, "the source")
        # the driver echoes the table name, which is the password: the message is scrubbed
        error = refused(lambda: source.read(f'SELECT * FROM "{CANARY}"'), QueryFailed, secrets,
                        query_has_secret=True)  # fmt: skip
        assert "no such table: ***" in str(error)
        stream = source.read("SELECT 1")
        assert_clean(repr(stream), secrets, "the stream")
        stream.close()
    short = "abc"  # too short to cut out of a message: the message is withheld instead
    with OdbcSource(sqlite_connection_string(tmp_path / "db.sqlite3", extra={"Pwd": short})) as s:
        error = refused(lambda: s.read(f'SELECT * FROM "{short}"'), QueryFailed, [short],
                        query_has_secret=True)  # fmt: skip
        assert "driver message withheld" in str(error)
    for bad in (f"Driver={{SQLite3}};Pwd={{{CANARY}", f"Driver={{SQLite3}};{CANARY}"):
        refused(lambda b=bad: OdbcSource(b), InvalidConnectionString, secrets)  # type: ignore[misc]
    refused(lambda: OdbcSource(f"Driver={{Nope}};Pwd={CANARY}"), DriverNotInstalled, secrets)
    # a lone surrogate (bytes that were not UTF-8, e.g. from os.environ) cannot be encoded:
    # the UnicodeEncodeError would carry the whole string
    error = refused(lambda: OdbcSource(f"{cs};Pwd={CANARY}\udcff"), InvalidConnectionString,
                    secrets)  # fmt: skip
    assert error.__cause__ is None and error.__context__ is None
    refused(lambda: OdbcSource(f"Driver=/nonexistent/x.so;PWD={CANARY}"), DriverNotInstalled,
            secrets)  # fmt: skip
    logged = "".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert_clean(logged, secrets, "the log")


@pytest.mark.services
def test_canary_postgresql(pg_parts: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    password = pg_parts["password"]
    secrets = [CANARY, password]
    wrong = postgresql_connection_string(**{**pg_parts, "password": CANARY})
    refused(lambda: OdbcSource(wrong), ConnectFailed, secrets)
    closed = postgresql_connection_string(**{**pg_parts, "password": CANARY, "port": 9})
    refused(lambda: OdbcSource(closed), ConnectFailed, secrets)
    with OdbcSource(postgresql_connection_string(**pg_parts), timeout_s=0.5) as source:
        assert_clean(repr(source) + repr(vars(source)), secrets, "the source")
        # The server echoes a value that is the password (built from halves: not in the query)
        half = len(password) // 2
        error = refused(lambda: source.read("SELECT (? || ?)::integer", (password[:half],
                        password[half:])), QueryFailed, secrets)  # fmt: skip
        # The password is random hex: "invalid input syntax" as a rule, "out of range" when its
        # leading digits overflow an integer first (PostgreSQL 15 parses digits before checking
        # the rest). Either way the server quoted the value, and the value is masked.
        assert re.search(r'(invalid input syntax for type integer: |value )"\*\*\*"', str(error))
        refused(lambda: source.read("SELECT pg_sleep(5)"), QueryTimedOut, secrets)
        with source.read("SELECT 1") as stream:
            assert_clean(repr(stream), secrets, "the stream")
    logged = "".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert_clean(logged, secrets, "the log")
