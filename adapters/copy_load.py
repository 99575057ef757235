"""The reverse copy: a CSV, JSON lines or Parquet file (folder or Blob) into an ODBC table, once.

Theory of operation
-------------------
:func:`load_file` asks the target table for its columns (``SELECT * FROM t WHERE 1=0``: an
unknown table fails here, before any row is read), converts each field to the type of its
column (see :func:`shir.adapters.copy_formats.decoder_for`), and inserts the rows in batches of
parameterised ``INSERT`` statements (pyodbc ``fast_executemany`` where the driver takes it,
plain ``executemany`` otherwise), all inside **one transaction**. The same transaction writes
the job id into a marker table (``shir_load_marker``, created if missing), whose primary key
is the job id: a retried load finds its marker and does nothing, and two racing loads of one
job cannot both commit. A failure anywhere rolls everything back: no partial load is visible.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import pyodbc

from shir.adapters.copy_formats import (
    CsvOptions,
    FormatError,
    decoder_for,
    naive_utc,
    read_records,
)
from shir.adapters.copy_zones import use_utc
from shir.adapters.odbc import OdbcError, OdbcSource, QueryFailed
from shir.core.errors import ShirError

__all__ = ["MARKER_TABLE", "ChunkReader", "LoadError", "LoadResult", "load_file"]

MARKER_TABLE = "shir_load_marker"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


class LoadError(ShirError):
    """The load could not run; nothing was committed."""


@attrs.frozen
class LoadResult:
    """Rows inserted (0 and ``skipped`` when this job id had been loaded before)."""

    rows: int
    skipped: bool = False


class ChunkReader(io.RawIOBase):
    """A readable binary stream over an iterator of byte chunks (a Blob download)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._rest = chunk
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


def _ensure_marker(source: OdbcSource) -> None:
    with contextlib.suppress(QueryFailed):  # exists already (no portable IF NOT EXISTS)
        source.execute(
            f"CREATE TABLE {MARKER_TABLE} (job_id VARCHAR(200) PRIMARY KEY, "
            "table_name VARCHAR(400), row_count BIGINT, loaded_at VARCHAR(40))"
        )


def load_file(
    source: OdbcSource,
    table: str,
    binary: io.RawIOBase | io.BufferedIOBase,
    fmt: str,
    job_id: str,
    *,
    csv_options: CsvOptions | None = None,
    batch_rows: int = 5_000,
) -> LoadResult:
    """Insert the rows of ``binary`` (``fmt`` csv, jsonl or parquet) into ``table`` once per job
    id. A Parquet stream that cannot seek (a Blob download) is spooled to a temporary file."""
    if not _IDENTIFIER.fullmatch(table):
        raise LoadError(f"table {table!r}: expected a name like orders or sales.orders")
    _ensure_marker(source)
    use_utc(source)  # timestamptz values are bound as UTC wall time
    conn = source._connection  # the load needs one transaction across statements
    cursor = conn.cursor()
    committed = False
    try:
        try:
            cursor.execute(f"SELECT * FROM {table} WHERE 1=0")
        except pyodbc.Error:
            raise LoadError(
                f"{source.target}: table {table} does not exist or cannot be read"
            ) from None
        columns = [(d[0], d[1]) for d in cursor.description]
        cursor.execute(f"SELECT 1 FROM {MARKER_TABLE} WHERE job_id = ?", job_id)
        if cursor.fetchone() is not None:
            return LoadResult(0, skipped=True)
        typed = fmt == "parquet"  # Parquet values come typed; text formats are parsed
        names: tuple[str, ...] | None
        if typed:
            from shir.adapters.copy_parquet import read_parquet_records

            names, records = read_parquet_records(_seekable(binary))
        else:
            names, records = read_records(binary, fmt, csv_options)
        by_name = {n.lower(): (n, t) for n, t in columns}
        if names:
            missing = [n for n in names if n.lower() not in by_name]
            if missing:
                raise LoadError(f"table {table} has no column {', '.join(missing)} "
                                "(named in the file)")
            targets = [by_name[n.lower()] for n in names]
        else:
            targets = columns
        decoders = [_binding(t, typed) for _, t in targets]
        sql = (f"INSERT INTO {table} ({', '.join(n for n, _ in targets)}) VALUES "
               f"({', '.join('?' for _ in targets)})")
        fast = _fast_executemany_ok(source)
        cursor.fast_executemany = fast
        cursor.setinputsizes([_INPUT_SIZES.get(t) for _, t in targets])
        rows = 0
        batch: list[Sequence[Any]] = []
        for n, record in enumerate(records, start=1):
            if len(record) != len(decoders):
                raise LoadError(f"record {n}: {len(record)} fields, the table takes "
                                f"{len(decoders)}")
            try:
                batch.append([None if v is None else d(v) for d, v in
                              zip(decoders, record, strict=True)])
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise LoadError(f"record {n}: a field does not fit its column ({exc})") from None
            if len(batch) >= batch_rows:
                _insert(cursor, sql, batch, source, table)
                rows += len(batch)
                batch.clear()
        if batch:
            _insert(cursor, sql, batch, source, table)
            rows += len(batch)
        cursor.setinputsizes(None)  # the rows' sizes; not the marker's
        cursor.execute(
            f"INSERT INTO {MARKER_TABLE} (job_id, table_name, row_count, loaded_at) "
            "VALUES (?, ?, ?, ?)", job_id, table, rows, dt.datetime.now(dt.UTC).isoformat(),
        )
        conn.commit()
        committed = True
        return LoadResult(rows)
    except pyodbc.Error as exc:
        state = exc.args[0] if exc.args else "?"
        raise LoadError(f"{source.target}: loading into {table} failed [{state}]; nothing "
                        "was committed") from None
    except FormatError as exc:
        raise LoadError(f"{exc}; nothing was committed") from None
    finally:
        if not committed:
            with contextlib.suppress(pyodbc.Error):
                conn.rollback()
        with contextlib.suppress(pyodbc.Error):
            cursor.close()


def _as_is(value: Any) -> Any:
    return value


# Bound with their fraction of a second: with fast_executemany, pyodbc sizes a timestamp
# parameter from the driver's description (psqlODBC: no fraction) and drops the microseconds;
# a time is bound as text, as ODBC's time struct has no fraction at all.
_INPUT_SIZES = {dt.datetime: (pyodbc.SQL_TYPE_TIMESTAMP, 26, 6),
                dt.time: (pyodbc.SQL_WVARCHAR, 32, 0)}


def _time_text(value: Any) -> str:
    return (value if isinstance(value, dt.time) else dt.time.fromisoformat(value)).isoformat()


def _binding(python_type: type, typed: bool) -> Callable[[Any], Any]:
    """How a field read from the file is bound for a column of ``python_type``: parsed from
    text (CSV, JSON lines) or as read (Parquet); a timestamp with a zone as UTC wall time (the
    session is in UTC), a time as its ISO text."""
    if python_type is dt.time:
        return _time_text
    if typed:
        return naive_utc if issubclass(python_type, dt.datetime) else _as_is
    return decoder_for(python_type)


def _seekable(binary: io.RawIOBase | io.BufferedIOBase) -> Any:
    """``binary`` if it can seek, else a temporary file holding it (flat memory)."""
    if binary.seekable():
        return binary
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the load drops it
    shutil.copyfileobj(binary, spool, 1 << 20)
    spool.seek(0)
    return spool


def _fast_executemany_ok(source: OdbcSource) -> bool:
    # SQLite ODBC has no parameter arrays; psqlODBC does.
    return not source.driver.driver_name.lower().startswith("sqlite")


def _insert(cursor: Any, sql: str, batch: list[Sequence[Any]], source: OdbcSource,
            table: str) -> None:
    try:
        if cursor.fast_executemany:
            try:
                cursor.executemany(sql, batch)
                return
            except pyodbc.Error as exc:
                # refused while binding, before anything reached the server (psqlODBC: empty
                # bytes give HY090): go on without parameter arrays
                if not exc.args or exc.args[0] not in ("HY090", "HYC00", "HY104"):
                    raise
                cursor.fast_executemany = False
        cursor.executemany(sql, batch)
    except pyodbc.Error as exc:
        state = exc.args[0] if exc.args else "?"
        message = str(exc.args[1] if len(exc.args) > 1 else exc)[:300]
        raise LoadError(f"{source.target}: inserting into {table} failed [{state}]: "
                        f"{message}; nothing was committed") from None


_ = OdbcError
