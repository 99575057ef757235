"""The copy's Arrow engine (arrow-odbc) against real PostgreSQL (psqlODBC), SQLite ODBC and
Azurite: the same round trips as tests/test_copy.py, and the same CSV bytes as the pyodbc engine
except where docs/copy.md says they differ."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

pytest.importorskip("pyodbc")
pytest.importorskip("arrow_odbc")

from test_copy import (  # noqa: F401 - pg: the fixture
    _differences,
    assert_instants_written_in_utc,
    in_zone,
    pg,
)

from shir.adapters.copy import CopyCancelled, copy_query
from shir.adapters.copy_arrow import ArrowOdbcSource, NotArrowFaithful, open_source
from shir.adapters.copy_formats import CsvOptions
from shir.adapters.copy_load import ChunkReader, load_file
from shir.adapters.copy_sinks import BlobSink, FolderSink, open_blob_service
from shir.adapters.odbc import ConnectFailed, OdbcSource, QueryFailed, sqlite_connection_string

pytestmark = pytest.mark.services


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_arrow_round_trip_postgresql_blob_postgresql_is_value_identical(
    pg, pg_odbc: str, azurite_connection_string: str, fmt: str  # noqa: F811
) -> None:
    c, table = pg
    sink = BlobSink(open_blob_service(azurite_connection_string), "copy-tests",
                    f"{table}.arrow.{fmt}")
    # read in one zone, loaded in another: timestamptz must travel as an instant
    source = open_source(in_zone(pg_odbc, "Asia/Kolkata"), fmt, "arrow")
    assert isinstance(source, ArrowOdbcSource)
    result = copy_query(source, f"SELECT * FROM {table} ORDER BY id", sink, fmt, f"a-{table}")
    assert result.rows == 4
    assert_instants_written_in_utc(sink.client().download_blob().readall(), fmt)
    with OdbcSource(in_zone(pg_odbc, "America/Los_Angeles")) as src:
        load_file(src, f"{table}_back", ChunkReader(sink.client().download_blob().chunks()),
                  fmt, f"load-{table}")
    assert _differences(c, table, f"{table}_back") == 0


@pytest.mark.parametrize("options", [CsvOptions(), CsvOptions(delimiter=";", quote="'",
                                                              encoding="utf-16", null="\\N")])
def test_arrow_csv_bytes_match_the_pyodbc_engine_but_for_floats(
    pg, pg_odbc: str, tmp_path: Path, options: CsvOptions  # noqa: F811
) -> None:
    c, table = pg
    query = f"SELECT id, s, n, ts, tz, b, d, ok, big, v, t FROM {table} ORDER BY id"
    a, p = tmp_path / "a.csv", tmp_path / "p.csv"
    zoned = in_zone(pg_odbc, "Asia/Kolkata")  # both write timestamptz in UTC with +00:00
    copy_query(open_source(zoned, "csv", "arrow"), query, FolderSink(a), "csv", "a",
               csv_options=options)
    with OdbcSource(zoned) as src:
        copy_query(src, query, FolderSink(p), "csv", "p", csv_options=options)
    assert a.read_bytes() == p.read_bytes()
    # floats: Arrow's shortest text, Python's repr; the same doubles once loaded
    f_a, f_p = tmp_path / "fa.csv", tmp_path / "fp.csv"
    copy_query(open_source(pg_odbc, "csv", "arrow"), f"SELECT f FROM {table} ORDER BY id",
               FolderSink(f_a), "csv", "fa")
    with OdbcSource(pg_odbc) as src:
        copy_query(src, f"SELECT f FROM {table} ORDER BY id", FolderSink(f_p), "csv", "fp")
    assert f_a.read_text().split() == ["f", "1.5", "0", "1e+300"]  # -0.0 in SQL is numeric 0
    assert f_p.read_text().split() == ["f", "1.5", "0.0", "1e+300"]
    whole = tmp_path / "w.csv"
    copy_query(open_source(pg_odbc, "csv", "arrow"), f"SELECT * FROM {table} ORDER BY id",
               FolderSink(whole), "csv", "w", csv_options=options)
    with OdbcSource(pg_odbc) as src, whole.open("rb") as f:
        load_file(src, f"{table}_back", f, "csv", f"w-{table}", csv_options=options)
    assert _differences(c, table, f"{table}_back") == 0


def test_arrow_json_lines_match_the_pyodbc_engine_but_for_floats(
    pg, pg_odbc: str, tmp_path: Path  # noqa: F811
) -> None:
    _, table = pg
    query = f"SELECT id, s, n, ts, tz, b, d, ok, big, v, t FROM {table} ORDER BY id"
    a, p = tmp_path / "a.jsonl", tmp_path / "p.jsonl"
    zoned = in_zone(pg_odbc, "Asia/Kolkata")
    copy_query(open_source(zoned, "jsonl", "arrow"), query, FolderSink(a), "jsonl", "a")
    with OdbcSource(zoned) as src:
        copy_query(src, query, FolderSink(p), "jsonl", "p")
    assert a.read_bytes() == p.read_bytes()
    f_a = tmp_path / "fa.jsonl"
    copy_query(open_source(pg_odbc, "jsonl", "arrow"), f"SELECT f FROM {table} ORDER BY id",
               FolderSink(f_a), "jsonl", "fa")
    assert f_a.read_text().split() == ['{"f":1.5}', '{"f":0}', '{"f":null}', '{"f":1e+300}']
    with pytest.raises(Exception, match="no JSON representation"):
        copy_query(open_source(pg_odbc, "jsonl", "arrow"), "SELECT 'NaN'::float8 AS f",
                   FolderSink(tmp_path / "nan.jsonl"), "jsonl", "nan")
    assert not (tmp_path / "nan.jsonl").exists()


def test_auto_engine_picks_arrow_and_falls_back_for_a_type_it_does_not_carry(
    pg_odbc: str, tmp_path: Path
) -> None:
    import pyarrow as pa

    from shir.adapters.copy_arrow import _check_faithful

    assert isinstance(open_source(pg_odbc, "csv"), ArrowOdbcSource)
    assert isinstance(open_source(pg_odbc, "jsonl"), ArrowOdbcSource)
    assert isinstance(open_source(pg_odbc, "parquet", "pyodbc"), OdbcSource)
    with pytest.raises(NotArrowFaithful, match="'d'"):
        _check_faithful(pa.schema([("d", pa.duration("us"))]), pa)

    class Refusing(ArrowOdbcSource):  # psqlODBC hands every type here over as one it carries
        def read(self, query: str, *, batch_rows: int = 10_000):  # type: ignore[override]
            raise NotArrowFaithful("column 'i': not carried")

    query = "SELECT 1 AS id, interval '1 day' AS i"
    out = tmp_path / "i.csv"
    with pytest.raises(NotArrowFaithful):  # the explicit arrow engine does not fall back
        copy_query(Refusing(pg_odbc), query, FolderSink(out), "csv", "i")
    assert copy_query(Refusing(pg_odbc, fallback=True), query, FolderSink(out), "csv",
                      "i").rows == 1
    assert out.read_bytes() == b"id,i\r\n1,1 day\r\n"


def test_arrow_errors_name_the_target_and_never_the_password(pg_odbc: str) -> None:
    secret = re.search(r"Pwd=([^;]*)", pg_odbc, re.I).group(1)  # type: ignore[union-attr]
    bad = pg_odbc.replace(f"Pwd={secret}", f"Pwd={secret}zz")
    with pytest.raises(ConnectFailed, match="cannot connect to driver") as info:
        ArrowOdbcSource(bad).read("SELECT 1")
    assert secret not in str(info.value) and "zz" not in str(info.value)
    with pytest.raises(QueryFailed, match="42P01") as info2:
        ArrowOdbcSource(pg_odbc).read("SELECT * FROM no_such_table_x")
    assert secret not in str(info2.value)
    assert secret not in repr(ArrowOdbcSource(pg_odbc)) and secret not in str(
        vars(ArrowOdbcSource(pg_odbc)))


def test_a_value_longer_than_the_buffer_is_an_error_and_nothing_is_committed(
    pg_odbc: str, tmp_path: Path
) -> None:
    out = tmp_path / "long.csv"
    source = ArrowOdbcSource(pg_odbc, max_text_size=100)
    with pytest.raises(QueryFailed, match="longer than the arrow engine's buffer"):
        copy_query(source, "SELECT repeat('x', 500)::text AS s", FolderSink(out), "csv", "l")
    assert list(tmp_path.iterdir()) == []


def test_arrow_cancel_commits_nothing(pg_odbc: str, tmp_path: Path) -> None:
    from copy_kill_helpers import prepare

    prepare(pg_odbc, rows=30_000)
    out = tmp_path / "c.parquet"
    cancel = threading.Event()

    def progress(p) -> None:
        if p.rows >= 2_000:
            cancel.set()

    with pytest.raises(CopyCancelled):
        copy_query(open_source(pg_odbc, "parquet", "arrow"), "SELECT * FROM copy_kill ORDER BY id",
                   FolderSink(out), "parquet", "c", progress=progress, cancel=cancel,
                   batch_rows=1_000)
    assert list(tmp_path.iterdir()) == []
    done = copy_query(open_source(pg_odbc, "parquet", "arrow"),
                      "SELECT * FROM copy_kill ORDER BY id", FolderSink(out), "parquet", "c")
    assert done.rows == 30_000


def test_sqlite_odbc_arrow_to_folder_and_back(require_odbc_driver, tmp_path: Path) -> None:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    db = sqlite_connection_string(tmp_path / "s.db")
    with OdbcSource(db) as src:
        src.execute("CREATE TABLE t (id INTEGER, s TEXT(50), f REAL, b BLOB)")
        src.execute("INSERT INTO t VALUES (1, 'x,\"y\"', 1.25, x'00ff'), (2, '', NULL, NULL), "
                    "(3, NULL, -2.5, x'')")
        src.execute("CREATE TABLE u (id INTEGER, s TEXT(50), f REAL, b BLOB)")
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"t.{fmt}"
        copy_query(open_source(db, fmt, "arrow"), "SELECT * FROM t ORDER BY id", FolderSink(out),
                   fmt, fmt)
        with OdbcSource(db) as src:
            with out.open("rb") as f:
                load_file(src, "u", f, fmt, fmt)
            assert list(src.read("SELECT * FROM u ORDER BY id")) == list(
                src.read("SELECT * FROM t ORDER BY id"))
            src.execute("DELETE FROM u")
            src.execute("DELETE FROM shir_load_marker")


def test_the_job_spec_takes_an_engine() -> None:
    from shir.adapters.copy_job import CopyJobError, parse_copy_spec

    base = {"source": "Driver={PostgreSQL Unicode};Server=db;Uid=etl", "query": "SELECT 1",
            "sink": {"folder": "/tmp/x.csv"}, "format": "csv"}
    assert parse_copy_spec(base).engine == "auto"
    assert parse_copy_spec({**base, "engine": "pyodbc"}).engine == "pyodbc"
    with pytest.raises(CopyJobError, match="'engine' must be one of auto, arrow, pyodbc"):
        parse_copy_spec({**base, "engine": "fast"})
