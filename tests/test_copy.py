"""The copy activity against real PostgreSQL (psqlODBC), SQLite ODBC and Azurite."""

from __future__ import annotations

import decimal
import random
import re
import socket
import uuid
from pathlib import Path

import pytest

pytest.importorskip("pyodbc")

from copy_kill_helpers import prepare, reference_bytes, trial

from shir.adapters.cli import main
from shir.adapters.copy import copy_query
from shir.adapters.copy_formats import CsvOptions, UnsupportedType, make_encoder
from shir.adapters.copy_load import ChunkReader, load_file
from shir.adapters.copy_sinks import BlobSink, FolderSink, open_blob_service
from shir.adapters.odbc import Column, OdbcSource, sqlite_connection_string

pytestmark = pytest.mark.services

TYPES = ("id int PRIMARY KEY, s text, n numeric(18,4), ts timestamp, tz timestamptz, b bytea, "
         "d date, f double precision, ok boolean, big bigint, v varchar(20), t time")
ROWS = """
(1, 'a,"b"' || chr(10) || 'c;|', 12345678901234.5678, '2024-01-02 03:04:05.123456',
 '2024-01-02 03:04:05+02', '\\x00ff10', '2024-02-29', 1.5, true, 9007199254740993, 'é€',
 '03:04:05.123456'),
(2, '', 0.0001, '1970-01-01 00:00:00', '1999-12-31 23:59:59.999999+00', '', '0001-01-01',
 -0.0, false, -1, '', '00:00:00'),
(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(4, 'NULL', -99999999999999.9999, '2038-01-19 03:14:08', '2024-06-01 12:00:00.5-07',
 '\\x0a0d22', '9999-12-31', 1e300, true, 0, ' x ', '23:59:59.999999')
"""
# The instants of column tz as the copy writes them (in UTC, with their offset).
TZ_UTC = ("2024-01-02 01:04:05", "1999-12-31 23:59:59.999999", "2024-06-01 19:00:00.500000")


def in_zone(connection_string: str, zone: str) -> str:
    """``connection_string`` whose session starts in ``zone`` (psqlODBC's ConnSettings): a copy
    that wrote a timestamptz as local time would shift it when loaded in another zone."""
    return f"{connection_string};ConnSettings={{SET TimeZone='{zone}'}}"


def assert_instants_written_in_utc(data: bytes, fmt: str) -> None:
    """The tz column of ROWS in the file: each value in UTC with its offset."""
    if fmt == "parquet":
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        assert str(table.schema.field("tz").type) == "timestamp[us, tz=UTC]"
        assert str(table.schema.field("ts").type) == "timestamp[us]"  # wall clock: no zone
        assert [v and v.isoformat(" ") for v in table.column("tz").to_pylist()] == [
            TZ_UTC[0] + "+00:00", TZ_UTC[1] + "+00:00", None, TZ_UTC[2] + "+00:00"]
        return
    text = data.decode()
    for value in TZ_UTC:
        written = (value.replace(" ", "T") if fmt == "jsonl" else value) + "+00:00"
        assert written in text, (written, text)
    assert "+02" not in text and "-07" not in text and "+05:30" not in text


@pytest.fixture
def pg(pg_odbc: str):
    import pyodbc

    c = pyodbc.connect(pg_odbc, autocommit=True)
    table = "copy_" + uuid.uuid4().hex[:8]
    c.execute(f"CREATE TABLE {table} ({TYPES})")
    c.execute(f"INSERT INTO {table} VALUES {ROWS}")
    c.execute(f"CREATE TABLE {table}_back (LIKE {table})")
    yield c, table
    c.execute(f"DROP TABLE {table}")
    c.execute(f"DROP TABLE {table}_back")
    c.close()


def _differences(c, a: str, b: str) -> int:
    return c.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) UNION ALL "
        f"(SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})) x").fetchone()[0]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_round_trip_postgresql_blob_postgresql_is_value_identical(
    pg, pg_odbc: str, azurite_connection_string: str, fmt: str
) -> None:
    c, table = pg
    service = open_blob_service(azurite_connection_string)
    sink = BlobSink(service, "copy-tests", f"{table}.{fmt}")
    # read in one zone, loaded in another: timestamptz must travel as an instant
    with OdbcSource(in_zone(pg_odbc, "Asia/Kolkata")) as src:
        result = copy_query(src, f"SELECT * FROM {table} ORDER BY id", sink, fmt, f"j-{table}")
        assert result.rows == 4
        props = sink.client().get_blob_properties()
        assert props.metadata["shir_job_id"] == f"j-{table}"
        assert bytes(props.content_settings.content_md5).hex() == result.md5_hex
        again = copy_query(src, f"SELECT * FROM {table} ORDER BY id", sink, fmt, f"j-{table}")
        assert again.skipped  # same job id: nothing rewritten
    assert_instants_written_in_utc(sink.client().download_blob().readall(), fmt)
    with OdbcSource(in_zone(pg_odbc, "America/Los_Angeles")) as dst:
        for _ in range(2):  # the second, a retried load, must add nothing
            stream = ChunkReader(sink.client().download_blob().chunks())
            load_file(dst, f"{table}_back", stream, fmt, f"load-{table}")
    assert c.execute(f"SELECT count(*) FROM {table}_back").fetchone()[0] == 4
    assert _differences(c, table, f"{table}_back") == 0


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_timestamps_and_times_keep_their_fractions_on_the_fast_insert_path(
    pg, pg_odbc: str, tmp_path: Path, fmt: str
) -> None:
    # no empty bytea here, so psqlODBC takes fast_executemany for every batch (which sized
    # timestamp parameters without a fraction and dropped the microseconds)
    c, table = pg
    c.execute(f"CREATE TABLE {table}_z AS SELECT id, ts, tz, t FROM {table} WHERE false")
    try:
        out = tmp_path / f"z.{fmt}"
        query = f"SELECT id, ts, tz, t FROM {table} ORDER BY id"
        with OdbcSource(in_zone(pg_odbc, "Pacific/Chatham")) as src:
            copy_query(src, query, FolderSink(out), fmt, "z")
        with OdbcSource(in_zone(pg_odbc, "Asia/Kolkata")) as dst, out.open("rb") as f:
            assert load_file(dst, f"{table}_z", f, fmt, f"z-{table}-{fmt}").rows == 4
        assert c.execute(
            f"SELECT count(*) FROM (({query}) EXCEPT ALL (SELECT * FROM {table}_z)) x"
        ).fetchone()[0] == 0
    finally:
        c.execute(f"DROP TABLE {table}_z")


def test_a_file_with_offsets_loads_the_instants_it_names(pg, pg_odbc: str, tmp_path: Path
                                                         ) -> None:
    c, table = pg
    given = tmp_path / "given.csv"
    given.write_text("id,ts,tz\r\n1,2024-01-02 03:04:05.25,2024-01-02 03:04:05.5+02:00\r\n"
                     "2,2024-01-02 03:04:05+02:00,2024-01-02 03:04:05\r\n")
    with OdbcSource(in_zone(pg_odbc, "America/Los_Angeles")) as dst, given.open("rb") as f:
        load_file(dst, f"{table}_back", f, "csv", f"given-{table}")
    c.execute("SET TimeZone = 'UTC'")
    got = c.execute(f"SELECT id, ts::text, tz::text FROM {table}_back ORDER BY id").fetchall()
    # an offset is converted to UTC; a value without one into timestamptz is read as UTC
    assert [tuple(r) for r in got] == [
        (1, "2024-01-02 03:04:05.25", "2024-01-02 01:04:05.5+00"),
        (2, "2024-01-02 01:04:05", "2024-01-02 03:04:05+00")]


def test_csv_options_and_folder_round_trip(pg, pg_odbc: str, tmp_path: Path) -> None:
    c, table = pg
    options = CsvOptions(delimiter=";", quote="'", encoding="utf-16", null="\\N")
    out = tmp_path / "out.csv"
    with OdbcSource(pg_odbc) as src:
        copy_query(src, f"SELECT * FROM {table} ORDER BY id", FolderSink(out), "csv",
                   f"f1-{table}", csv_options=options)
        assert out.read_bytes().decode("utf-16").startswith("id;s;n;")
        assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temporary left
        with out.open("rb") as f:
            loaded = load_file(src, f"{table}_back", f, "csv", f"f1-{table}", csv_options=options)
            assert loaded.rows == 4
    assert _differences(c, table, f"{table}_back") == 0


def test_a_failing_load_commits_nothing(pg, pg_odbc: str, tmp_path: Path) -> None:
    c, table = pg
    bad = tmp_path / "bad.csv"
    bad.write_text("id,n\r\n10,1.5\r\n11,not-a-number\r\n")
    with OdbcSource(pg_odbc) as src, bad.open("rb") as f, pytest.raises(
        Exception, match="record 2"
    ):
        load_file(src, f"{table}_back", f, "csv", "bad")
    assert c.execute(f"SELECT count(*) FROM {table}_back").fetchone()[0] == 0


def test_sqlite_odbc_to_folder_and_back(require_odbc_driver, tmp_path: Path) -> None:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    db = sqlite_connection_string(tmp_path / "s.db")
    with OdbcSource(db) as src:
        src.execute("CREATE TABLE t (id INTEGER, s TEXT, f REAL, b BLOB)")
        src.execute("INSERT INTO t VALUES (1, 'x', 1.25, x'00ff'), (2, '', NULL, NULL), "
                    "(3, NULL, -2.5, x'')")
        src.execute("CREATE TABLE u (id INTEGER, s TEXT, f REAL, b BLOB)")
        for fmt in ("csv", "jsonl"):
            out = tmp_path / f"t.{fmt}"
            copy_query(src, "SELECT * FROM t ORDER BY id", FolderSink(out), fmt, fmt)
            with out.open("rb") as f:
                load_file(src, "u", f, fmt, fmt)
            with out.open("rb") as f:
                assert load_file(src, "u", f, fmt, fmt).skipped
            rows = list(src.read("SELECT * FROM u ORDER BY id"))
            expected = list(src.read("SELECT * FROM t ORDER BY id"))
            assert rows == expected
            src.execute("DELETE FROM u")


def test_a_type_the_format_cannot_hold_is_refused_before_any_row() -> None:
    col = Column(name="c", python_type=complex, size=None, scale=None, nullable=None)
    for fmt in ("csv", "jsonl"):
        with pytest.raises(UnsupportedType, match="column 'c'"):
            make_encoder(fmt, [col])
    jsonl = make_encoder("jsonl", [Column("f", float, None, None, None)])
    with pytest.raises(Exception, match="no JSON representation"):
        jsonl.encode([(float("nan"),)])
    csv = make_encoder("csv", [Column("n", decimal.Decimal, 18, 4, None)])
    assert csv.encode([(decimal.Decimal("1.2300"),), (None,)]) == b"1.2300\r\n\r\n"


def test_cli_errors_name_the_part_and_exit_2(pg_odbc: str, tmp_path: Path, capsys) -> None:
    wrong = pg_odbc.replace("Pwd=", "Pwd=wrong")
    password = pg_odbc.split("Pwd=")[1].split(";")[0]
    out = tmp_path / "o.csv"
    assert main(["copy", "--source", wrong, "--query", "SELECT 1", "--sink", str(out),
                 "--format", "csv"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "127.0.0.1" in err and password not in err
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    unreachable = re.sub(r"Port=\d+", f"Port={port}", pg_odbc)
    assert main(["copy", "--source", unreachable, "--query", "SELECT 1", "--sink", str(out),
                 "--format", "csv"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and f"port {port}" in err and password not in err
    assert main(["copy", "--source", pg_odbc, "--query", "SELECT * FROM no_such_table",
                 "--sink", str(out), "--format", "csv"]) == 2
    assert "no_such_table" in capsys.readouterr().err
    assert main(["copy", "--source", pg_odbc, "--query", "SELECT 1", "--sink",
                 str(tmp_path / "missing" / "o.csv"), "--format", "csv"]) == 2
    assert "folder sink" in capsys.readouterr().err
    assert main(["copy", "--source", pg_odbc, "--query", "SELECT 1", "--sink", str(out),
                 "--format", "csv", "--part-size-kib", "0"]) == 2
    assert "--part-size-kib must be between 64" in capsys.readouterr().err
    assert main(["copy", "--from", str(out), "--format", "csv", "--to", pg_odbc,
                 "--table", "no_such_table"]) == 2
    assert not out.exists()
    out.write_text("a\r\n1\r\n")
    assert main(["copy", "--from", str(out), "--format", "csv", "--to", pg_odbc,
                 "--table", "no_such_table"]) == 2
    err = capsys.readouterr().err
    assert "no_such_table" in err and password not in err


def test_cli_copy_out_and_in(pg, pg_odbc: str, tmp_path: Path, capsys) -> None:
    c, table = pg
    out = tmp_path / "o.jsonl"
    assert main(["copy", "--source", pg_odbc, "--query", f"SELECT * FROM {table} ORDER BY id",
                 "--sink", f"file://{out}", "--format", "jsonl"]) == 0
    for _ in range(2):
        assert main(["copy", "--from", str(out), "--format", "jsonl", "--to", pg_odbc,
                     "--table", f"{table}_back"]) == 0
    captured = capsys.readouterr()
    assert "already loaded" in captured.out and "warning" in captured.err
    password = pg_odbc.split("Pwd=")[1].split(";")[0]
    assert password not in captured.out + captured.err  # accepted with a warning, not shown
    assert _differences(c, table, f"{table}_back") == 0


def test_sigkill_mid_copy_leaves_nothing_and_the_retry_is_byte_identical(
    pg_odbc: str, azurite_connection_string: str
) -> None:
    prepare(pg_odbc)
    ref = reference_bytes(pg_odbc, azurite_connection_string)
    rng = random.Random(3)
    name = uuid.uuid4().hex[:8]
    results = [trial(pg_odbc, azurite_connection_string, f"{name}-{i}", ref, rng)
               for i in range(2)]
    assert any(r["killed"] for r in results)


def test_progress_is_reported_and_a_cancel_commits_nothing(pg_odbc: str, tmp_path: Path) -> None:
    import threading

    from shir.adapters.copy import CopyCancelled

    prepare(pg_odbc, rows=30_000)
    out = tmp_path / "c.csv"
    seen = []
    cancel = threading.Event()

    def progress(p) -> None:
        seen.append(p)
        if p.rows >= 10_000:
            cancel.set()

    with OdbcSource(pg_odbc) as src:
        with pytest.raises(CopyCancelled):
            copy_query(src, "SELECT * FROM copy_kill ORDER BY id", FolderSink(out), "csv", "c",
                       progress=progress, cancel=cancel, batch_rows=1_000)
        assert seen and seen[0].rows == 1_000 and seen[0].bytes > 0
        assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary
        done = copy_query(src, "SELECT * FROM copy_kill ORDER BY id", FolderSink(out), "csv",
                          "c", progress=seen.append)
    assert done.rows == 30_000 and seen[-1].rows == 30_000 and seen[-1].rows_per_s > 0
    assert out.read_bytes().count(b"\r\n") >= 30_001


def test_timestamptz_columns_are_found_whatever_the_query_looks_like(pg_odbc: str) -> None:
    from shir.adapters.copy_zones import instant_columns

    with OdbcSource(pg_odbc) as src:
        assert instant_columns(src, "SELECT now() AS a, 1 AS a -- same names, a comment") == {0}
        assert instant_columns(
            src, "WITH x AS (SELECT now()::timestamp AS t, now() AS z) SELECT * FROM x "
                 "ORDER BY 1;  ") == {1}
        assert instant_columns(src, "SELECT 1 AS n") == frozenset()
        assert instant_columns(src, "SELECT 1; SELECT now()") is None  # cannot be wrapped
