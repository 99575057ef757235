"""The reverse copy: a CSV, JSON lines or Parquet file (folder or Blob) into an ODBC table, once.

Theory of operation
-------------------
:func:`load_file` asks the target table for its columns (``SELECT * FROM t WHERE 1=0``: an
unknown table fails here, before any row is read), converts each field to the type of its
column (see :func:`shir.adapters.copy_formats.decoder_for`), and inserts the rows in batches,
by default all inside **one transaction**. On PostgreSQL (psqlODBC) and SQLite a batch goes in
**multi-row** statements, ``INSERT ... VALUES (?, ?), (?, ?), ...`` of up to
``_STATEMENT_PARAMS`` parameters each, a round trip per statement (measured on psqlODBC: 12x
plain ``executemany``, a round trip per row; pyodbc's ``fast_executemany`` gave 2.5x, and
psqlODBC refuses it for a bytea column). Other drivers get a single-row ``INSERT`` by
``fast_executemany``, plain ``executemany`` where the driver refuses to bind a batch. The same
transaction writes the job's row into a marker table (``shir_load_marker``, created if
missing), whose primary key is the job id: a retried load finds its marker and does nothing,
and two racing loads of one job cannot both commit. A failure anywhere rolls everything back:
no partial load is visible.

**Several transactions** (``transaction_rows``, for files too large to load in one): every
``transaction_rows`` rows are committed together with the marker row's ``row_count`` (how many
records of the file are in) and ``loaded_at`` NULL (not done); the last transaction sets
``loaded_at``. A retry (after a failure, a cancel, or the process killed) reads the marker,
skips that many records of the file and goes on, so no row is missing and none is doubled. The
marker only moves from the count the attempt read (``UPDATE ... WHERE row_count = ?``): a
second attempt running at the same time fails instead. What this gives up: readers see the
rows committed so far while the load runs, and after a failure until a retry completes.

Cancel: the job's event is looked at after every batch; the transaction in progress is rolled
back (:class:`LoadCancelled`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import itertools
import math
import re
import shutil
import tempfile
import threading
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

__all__ = [
    "MARKER_TABLE",
    "ChunkReader",
    "LoadCancelled",
    "LoadError",
    "LoadResult",
    "is_loaded",
    "load_file",
    "rows_per_statement",
]

MARKER_TABLE = "shir_load_marker"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


class LoadError(ShirError):
    """The load could not run; its transaction in progress was rolled back."""


class LoadCancelled(LoadError):
    """The load was cancelled (the job's cancel event) between two batches."""


@attrs.frozen
class LoadResult:
    """Rows inserted (0 and ``skipped`` when this job id had been loaded before);
    ``resumed_from``: rows an earlier attempt had committed, which this one skipped."""

    rows: int
    skipped: bool = False
    resumed_from: int = 0


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


def is_loaded(source: OdbcSource, job_id: str) -> bool:
    """Whether the load of ``job_id`` into ``source``'s database has finished (its marker row
    says so); False too when no load ever ran there (no marker table)."""
    try:
        with source.read(f"SELECT loaded_at FROM {MARKER_TABLE} WHERE job_id = ?",
                         (job_id,)) as rows:
            found = [r for batch in rows for r in batch]
    except QueryFailed:
        return False
    return bool(found) and found[0][0] is not None


def load_file(
    source: OdbcSource,
    table: str,
    binary: io.RawIOBase | io.BufferedIOBase,
    fmt: str,
    job_id: str,
    *,
    csv_options: CsvOptions | None = None,
    batch_rows: int = 5_000,
    transaction_rows: int | None = None,
    cancel: threading.Event | None = None,
    what: str = "the file",
) -> LoadResult:
    """Insert the rows of ``binary`` (``fmt`` csv, jsonl or parquet) into ``table`` once per job
    id. A Parquet stream that cannot seek (a Blob download) is spooled to a temporary file.
    ``what`` names the file in errors (a record that does not parse, text in another encoding).

    ``transaction_rows`` None (the default): one transaction, all or nothing. A number: a commit
    every that many rows, each with the job's marker row saying how many rows are in; a retry
    skips that many records of the file and goes on (the file must be the same). ``cancel`` is
    looked at between batches: the transaction in progress is rolled back and
    :class:`LoadCancelled` raised.
    """
    if not _IDENTIFIER.fullmatch(table):
        raise LoadError(f"table {table!r}: expected a name like orders or sales.orders")
    if transaction_rows is not None and transaction_rows < 1:
        raise LoadError(f"transaction_rows must be at least 1, got {transaction_rows}")
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
        marker = _Marker(cursor, job_id, table)
        if marker.done:
            return LoadResult(0, skipped=True)
        typed = fmt == "parquet"  # Parquet values come typed; text formats are parsed
        names: tuple[str, ...] | None
        if typed:
            from shir.adapters.copy_parquet import read_parquet_records

            names, records = read_parquet_records(_seekable(binary))
        else:
            encoding = (csv_options or CsvOptions()).encoding if fmt == "csv" else "utf-8"
            try:
                names, records = read_records(binary, fmt, csv_options)
            except ValueError as exc:  # the header or the first JSON line
                raise LoadError(_unparsed(exc, 1, what, fmt, encoding)) from None
            records = _parsed(records, what, fmt, encoding)
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
        inserter = _Inserter(cursor, source, table, targets)
        resumed = marker.rows
        if resumed and sum(1 for _ in itertools.islice(records, resumed)) < resumed:
            raise LoadError(f"the file has fewer records than the {resumed} an earlier attempt "
                            f"of job {job_id!r} loaded: it changed since; nothing more was "
                            "loaded")
        per_txn = transaction_rows or math.inf
        in_txn = 0
        batch: list[Sequence[Any]] = []

        def flush() -> None:
            nonlocal in_txn
            inserter.insert(batch)
            in_txn += len(batch)
            batch.clear()
            if cancel is not None and cancel.is_set():
                raise LoadCancelled(f"the load into {table} was cancelled; its transaction in "
                                    f"progress was rolled back ({marker.rows} rows of earlier "
                                    "transactions stay committed for a retry)")

        for n, record in enumerate(records, start=resumed + 1):
            if len(record) != len(decoders):
                raise LoadError(f"record {n}: {len(record)} fields, the table takes "
                                f"{len(decoders)}")
            try:
                batch.append([None if v is None else d(v) for d, v in
                              zip(decoders, record, strict=True)])
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise LoadError(f"record {n}: a field does not fit its column ({exc})") from None
            if len(batch) >= min(batch_rows, per_txn - in_txn):
                flush()
            if in_txn >= per_txn:  # a full transaction: commit it with the marker
                marker.advance(in_txn, done=False)
                conn.commit()
                in_txn = 0
        if batch:
            flush()
        marker.advance(in_txn, done=True)
        conn.commit()
        committed = True
        return LoadResult(marker.rows - resumed, resumed_from=resumed)
    except pyodbc.Error as exc:
        state = exc.args[0] if exc.args else "?"
        raise LoadError(f"{source.target}: loading into {table} failed [{state}]; the "
                        "transaction in progress was rolled back") from None
    except FormatError as exc:
        raise LoadError(f"{exc}; the transaction in progress was rolled back") from None
    finally:
        if not committed:
            with contextlib.suppress(pyodbc.Error):
                conn.rollback()
        with contextlib.suppress(pyodbc.Error):
            cursor.close()


def _parsed(records: Iterator[Sequence[Any]], what: str, fmt: str,
            encoding: str) -> Iterator[Sequence[Any]]:
    """``records``; one that does not parse is a :class:`LoadError` saying what to check."""
    n = 1
    try:
        for record in records:
            yield record
            n += 1
    except ValueError as exc:  # a UnicodeDecodeError, or a JSON line that does not parse
        raise LoadError(_unparsed(exc, n, what, fmt, encoding)) from None


def _unparsed(exc: ValueError, n: int, what: str, fmt: str, encoding: str) -> str:
    if isinstance(exc, UnicodeDecodeError):  # decoded a block at a time: no record number
        advice = "give its --encoding" if fmt == "csv" else "JSON lines are UTF-8"
        return (f"{what} is not {encoding} text (it holds the byte "
                f"0x{exc.object[exc.start]:02x}): {advice}; nothing was loaded from it")
    return f"{what}: record {n} is not {fmt} ({exc}): check --format; nothing was loaded from it"


class _Marker:
    """The job's row in the marker table: how many rows are in, and whether the load is done
    (``loaded_at`` set). Advanced in the transaction of the rows it counts, and only from the
    count this attempt read: a second attempt running at once fails instead of double-counting.
    """

    def __init__(self, cursor: Any, job_id: str, table: str) -> None:
        self._cursor, self.job_id, self.table = cursor, job_id, table
        cursor.execute(f"SELECT row_count, loaded_at FROM {MARKER_TABLE} WHERE job_id = ?",
                       job_id)
        row = cursor.fetchone()
        self._exists = row is not None
        self.rows = int(row[0] or 0) if row is not None else 0
        self.done = row is not None and row[1] is not None

    def advance(self, rows: int, *, done: bool) -> None:
        cursor = self._cursor
        cursor.setinputsizes(None)  # the rows' parameter sizes are not the marker's
        total = self.rows + rows
        loaded_at = dt.datetime.now(dt.UTC).isoformat() if done else None
        if not self._exists:  # the primary key: a racing attempt's insert fails
            cursor.execute(f"INSERT INTO {MARKER_TABLE} (job_id, table_name, row_count, "
                           "loaded_at) VALUES (?, ?, ?, ?)", self.job_id, self.table, total,
                           loaded_at)
        else:
            cursor.execute(f"UPDATE {MARKER_TABLE} SET row_count = ?, loaded_at = ? WHERE "
                           "job_id = ? AND row_count = ? AND loaded_at IS NULL", total,
                           loaded_at, self.job_id, self.rows)
            if cursor.rowcount != 1:
                raise LoadError(f"another attempt of job {self.job_id!r} loaded rows into "
                                f"{self.table} meanwhile; this one rolled back: retry it")
        self._exists = True
        self.rows = total
        self.done = done


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


# Parameters in one multi-row INSERT. psqlODBC loses its connection ("lost synchronization with
# server") on large ones (measured here: a one-column INSERT of 7,498 rows passed, of 7,499
# failed; six columns failed at 16,380); SQLite builds before 3.32 take 999. Past ~100 rows a
# statement the round trip is paid off (measured: 100 and 1,000 rows of six columns a statement
# gave 100-130k rows/s alike), so the bound stays far below psqlODBC's failures.
_STATEMENT_PARAMS = {"psqlodbc": 2_000, "sqlite": 999}


def rows_per_statement(driver_name: str, columns: int) -> int:
    """Rows a multi-row ``INSERT`` of ``columns`` columns carries on the driver
    ``driver_name`` (the ODBC ``SQL_DRIVER_NAME``); 1 where multi-row statements are not used
    (a driver not verified here: Oracle before 23c has no multi-row ``VALUES``)."""
    name = driver_name.lower()
    for prefix, params in _STATEMENT_PARAMS.items():
        if name.startswith(prefix):
            return max(1, params // max(1, columns))
    return 1


class _Inserter:
    """Inserts batches of rows into one table: multi-row statements where the driver takes
    them (the full-size statement's text built once per batch), else
    ``fast_executemany`` of the single-row statement, falling back to plain ``executemany``
    for good when the driver refuses to bind a batch."""

    def __init__(self, cursor: Any, source: OdbcSource, table: str,
                 targets: Sequence[tuple[str, type]]) -> None:
        self._cursor, self._source, self._table = cursor, source, table
        self._head = f"INSERT INTO {table} ({', '.join(n for n, _ in targets)}) VALUES "
        self._row = f"({', '.join('?' for _ in targets)})"
        self._per_statement = rows_per_statement(source.driver.driver_name, len(targets))
        self._sizes = [_INPUT_SIZES.get(t) for _, t in targets]
        self._fast = True

    def _statement(self, rows: int) -> str:
        return self._head + ", ".join(itertools.repeat(self._row, rows))

    def insert(self, batch: Sequence[Sequence[Any]]) -> None:
        """Insert ``batch`` in the transaction in progress (:class:`LoadError` if refused)."""
        cursor = self._cursor
        try:
            if self._per_statement > 1:
                k = self._per_statement
                full = self._statement(k)
                for i in range(0, len(batch), k):
                    rows = batch[i:i + k]
                    cursor.execute(full if len(rows) == k else self._statement(len(rows)),
                                   [v for row in rows for v in row])
                return
            cursor.setinputsizes(self._sizes)
            if self._fast:
                cursor.fast_executemany = True
                try:
                    cursor.executemany(self._statement(1), batch)
                    return
                except pyodbc.Error as exc:
                    # refused while binding, before anything reached the server (psqlODBC
                    # gives HY090 for any bytes parameter): go on without parameter arrays
                    if not exc.args or exc.args[0] not in ("HY090", "HYC00", "HY104"):
                        raise
                    self._fast = cursor.fast_executemany = False
            cursor.executemany(self._statement(1), batch)
        except pyodbc.Error as exc:
            state = exc.args[0] if exc.args else "?"
            message = str(exc.args[1] if len(exc.args) > 1 else exc)[:300]
            raise LoadError(f"{self._source.target}: inserting into {self._table} failed "
                            f"[{state}]: {message}; the transaction in progress was rolled "
                            "back") from None


_ = OdbcError
