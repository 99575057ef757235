"""The copy's Arrow engine: ODBC rows fetched straight into Arrow record batches (arrow-odbc, in
the ``arrow`` extra) and written by pyarrow, with no Python object per value.

Theory of operation
-------------------
pyodbc builds a Python object per value (about 2.6 µs a row on the benchmark's rows) and the
text encoders turn those objects back into text (1.9 µs more), all under the GIL: that is the
pyodbc engine's floor (docs/copy.md). arrow-odbc binds column buffers and fills them in Rust;
the text encoders of :mod:`shir.adapters.copy_arrow_text` (CSV, JSON lines) and
:class:`ArrowParquetEncoder` turn each batch into bytes with Arrow compute kernels and
pyarrow's Parquet writer.

:class:`ArrowOdbcSource` stands where an :class:`~shir.adapters.odbc.OdbcSource` does for
:func:`~shir.adapters.copy.copy_query`: ``read(query)`` executes and returns a stream whose
``driver_rows()`` yields record batches and whose ``encoder(fmt, options)`` builds the
format's encoder from the result's Arrow schema, before any row.

Faithful types (checked before the first row; anything else is :class:`NotArrowFaithful`,
and the ``auto`` engine then runs the query on the pyodbc engine instead):

* integers, text, binary, date, timestamp, time, boolean: as arrow-odbc maps them; on
  PostgreSQL the connection's ``TimeZone`` is UTC and a ``timestamptz`` column is written as
  ``timestamp[us, tz=UTC]`` (:mod:`shir.adapters.copy_zones` asks the server which, on a
  pyodbc connection), with ``+00:00`` in CSV and JSON lines;
* numeric: fetched as the driver's text (exact, whatever the declared precision), cast to
  ``decimal128(p, s)`` for Parquet (a value with more digits than declared is an error);
* floating point: psqlODBC describes ``double precision`` as ``SQL_FLOAT(17)``, which arrow-odbc
  maps to float32 (lossy): every float is fetched as float64 instead (exact for ``real`` too).

Memory: arrow-odbc allocates its transit buffer from the columns' declared widths (psqlODBC:
``text`` 8,190 characters, ``varchar(n)`` n); ``max_bytes_per_batch`` (4 MiB) caps it, so a
wide row gets fewer rows per fetch (about 100 on the benchmark's rows); the stream joins those
into compact batches of ``batch_rows`` (actual lengths) for the encoders. The engine sets, once
and process-wide, Arrow's C++ default memory pool to mimalloc returning freed memory at once
(before pyarrow's first import: :func:`~shir.adapters.copy_parquet.arrow_allocator_first`; with
its defaults it keeps freed pages, and glibc's arenas fragment under the Parquet writer), the
Python-level pool that the compute kernels use to the system allocator, and, on glibc, a fixed
mmap threshold of 1 MiB (:func:`_fix_mmap_threshold`). Importing pyarrow, its compute module,
arrow-odbc and the Blob SDK is about 100 MB of the copy's peak RSS (docs/copy.md).

A text or binary value longer than its bound (the declared width, or ``max_text_size`` /
``max_binary_size``) is an error, never truncated.

Secrets: the connection string lives only in closures (not attributes); arrow-odbc's errors are
scrubbed with the ODBC adapter's scrubber and name the target, as OdbcSource's do.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import re
from collections.abc import Callable, Iterator
from typing import Any

from shir.adapters.copy_arrow_text import ArrowCsvEncoder, ArrowJsonLinesEncoder
from shir.adapters.copy_formats import (
    ENGINES,
    CsvOptions,
    Encoder,
    FormatError,
    UnsupportedType,
)
from shir.adapters.copy_parquet import ParquetEncoder, arrow_allocator_first
from shir.adapters.copy_zones import utc_connection_string, zoned_arrow_schema
from shir.adapters.odbc_base import (
    ConnectFailed,
    QueryFailed,
    describe_target,
    parse_connection_string,
    scrubber,
)

__all__ = ["ENGINES", "ArrowOdbcSource", "NotArrowFaithful", "arrow_available"]

ARROW_FORMATS = ("csv", "jsonl", "parquet")
#: arrow-odbc's transit buffer: 4 MiB peaks 3-6 MB lower than 8 MiB for about 4% more client CPU
#: (twice the fetches and joins; docs/copy.md)
DEFAULT_MAX_BYTES_PER_BATCH = 4 * 1024 * 1024
#: glibc's mmap threshold while the arrow engine runs; see :func:`_fix_mmap_threshold`.
MMAP_THRESHOLD_BYTES = 1024 * 1024
#: Bound of a binary column whose driver declares none (psqlODBC's ``bytea``): a longer value is
#: an error (the pyodbc engine has no such bound). Text has the driver's declared width.
DEFAULT_MAX_BINARY_SIZE = 8190


class NotArrowFaithful(UnsupportedType):
    """The result has a column the Arrow engine cannot carry faithfully."""


def arrow_available() -> bool:
    """Whether the ``arrow`` extra (arrow-odbc and pyarrow) is installed."""
    arrow_allocator_first()
    try:
        import arrow_odbc  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _modules() -> tuple[Any, Any, Any]:
    arrow_allocator_first()
    try:
        import arrow_odbc
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:
        raise FormatError("the arrow engine needs arrow-odbc: pip install 'shir[arrow]' (or use "
                          "--engine pyodbc)") from None
    return arrow_odbc, pa, pc


def _fetch_schema(schema: Any, pa: Any, *, decimals_as_text: bool = True) -> Any:
    """The schema arrow-odbc is told to fetch: numeric as text, every float as float64,
    fixed-size binary as binary (without ``decimals_as_text``: the schema the copy writes)."""
    fields = []
    for f in schema:
        t = f.type
        if pa.types.is_decimal(t):
            t = pa.string() if decimals_as_text else t
        elif pa.types.is_floating(t):
            t = pa.float64()
        elif pa.types.is_fixed_size_binary(t):  # SQLite ODBC's BLOB: values vary in length
            t = pa.binary()
        fields.append(pa.field(f.name, t, f.nullable))
    return pa.schema(fields)


def _check_faithful(schema: Any, pa: Any) -> None:
    ok = (pa.types.is_integer, pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
          pa.types.is_large_binary, pa.types.is_floating, pa.types.is_decimal,
          pa.types.is_boolean, pa.types.is_date32, pa.types.is_timestamp, pa.types.is_time)
    for f in schema:
        if not any(test(f.type) for test in ok):
            raise NotArrowFaithful(
                f"column {f.name!r}: arrow-odbc reads it as {f.type}, which the arrow engine "
                "does not carry; use --engine pyodbc or cast it in the query. Nothing was written."
            )


class ArrowOdbcSource:
    """An ODBC connection string read through arrow-odbc; see the module docs.

    ``fallback`` (the ``auto`` engine): when the result has a type the Arrow engine does not
    carry, :func:`~shir.adapters.copy.copy_query` reads the query with ``pyodbc_source()``.
    """

    def __init__(self, connection_string: str, *, fallback: bool = False,
                 max_text_size: int | None = None,
                 max_binary_size: int | None = DEFAULT_MAX_BINARY_SIZE,
                 max_bytes_per_batch: int = DEFAULT_MAX_BYTES_PER_BATCH) -> None:
        arrow_odbc, pa, _ = _modules()
        if pa.default_memory_pool().backend_name != "system":
            # the kernels' pool: as little CPU as mimalloc for the same peak here, and pyarrow may
            # have been imported before arrow_allocator_first (mimalloc's defaults keep freed
            # pages: 30-40 MB more peak RSS on the benchmark's copy)
            pa.set_memory_pool(pa.system_memory_pool())
        _fix_mmap_threshold()
        connection_string = utc_connection_string(connection_string)  # timestamptz as UTC
        pairs = parse_connection_string(connection_string)
        scrub = scrubber(pairs)
        self.target = describe_target(pairs)
        self.fallback = fallback
        self._cancelled = False
        target = self.target

        def reader(query: str, batch_rows: int) -> Any:
            schemas: list[Any] = []

            def fetch_as(schema: Any) -> Any:
                schemas.append(schema)
                return _fetch_schema(schema, pa)

            try:
                reader = arrow_odbc.read_arrow_batches_from_odbc(
                    query, connection_string, batch_size=batch_rows,
                    max_bytes_per_batch=max_bytes_per_batch, max_text_size=max_text_size,
                    max_binary_size=max_binary_size, map_schema=fetch_as,
                    fetch_concurrently=False)
            except arrow_odbc.Error as exc:
                raise _translate(exc, scrub, target) from None
            return reader, _fetch_schema(schemas[0], pa, decimals_as_text=False)

        def pyodbc_source() -> Any:
            from shir.adapters.odbc import OdbcSource

            return OdbcSource(connection_string)

        self._reader = reader
        self.pyodbc_source = pyodbc_source
        self._scrub = scrub

    def read(self, query: str, *, batch_rows: int = 10_000) -> ArrowStream:
        """Execute ``query``; raises ConnectFailed, QueryFailed or NotArrowFaithful."""
        _, pa, _ = _modules()
        reader, described = self._reader(query, batch_rows)
        _check_faithful(described, pa)
        described = zoned_arrow_schema(described, self.pyodbc_source, query)
        return ArrowStream(reader, described, self._scrub, self.target, batch_rows)

    def cancel(self) -> None:
        """Nothing to interrupt in flight: the copy stops between batches."""
        self._cancelled = True

    def __enter__(self) -> ArrowOdbcSource:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"ArrowOdbcSource({self.target})"


@functools.cache
def _fix_mmap_threshold() -> None:
    """Fix glibc malloc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES` (process-wide, once;
    not on another C library, nor when ``MALLOC_MMAP_THRESHOLD_`` is set).

    glibc raises the threshold to the size of the largest block freed so far (up to 32 MiB) and
    its trim threshold to twice that: after the first multi-MiB part is freed, parts and Arrow
    buffers come from the heap arenas of the five threads a copy runs, and 13-15 MB of freed
    memory stays resident in them (``mallinfo2`` at the peak of the benchmark's copy). A fixed
    threshold gives every block of 1 MiB or more back to the system when it is freed: 6-8 MB
    less peak RSS for 2-5% more client CPU (page faults on fresh mappings; 256 KiB saved 1-2 MB
    more for 5-9% more CPU; docs/copy.md).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the user's choice
        return
    m_mmap_threshold = -3  # malloc.h
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)


def _translate(exc: BaseException, scrub: Callable[[str], str], target: str) -> Exception:
    """arrow-odbc's error as the ODBC adapter's, scrubbed (its text names no secret here, but
    a driver may echo connection-string values)."""
    message = " ".join(scrub(str(a)) for a in exc.args).replace("\n", " ").strip()
    found = re.search(r"State: ([0-9A-Z]{5})", message)
    state = found.group(1) if found else None
    if "SQLDriverConnect" in message:
        return ConnectFailed(f"cannot connect to {target} [{state or 'no SQLSTATE'}]: {message}",
                             sqlstate=state, driver_message=message)
    if "too large to be written into the allocated buffer" in message:
        return QueryFailed(
            f"{target}: a text or binary value is longer than the arrow engine's buffer for "
            f"its column ({message}); raise max_text_size/max_binary_size or use the pyodbc "
            "engine (--engine pyodbc). Nothing was committed.")
    return QueryFailed(f"{target}: {message}", sqlstate=state, driver_message=message)


class ArrowStream:
    """The batches of one query (pyarrow RecordBatch) and the encoders that take them."""

    def __init__(self, reader: Any, described: Any, scrub: Callable[[str], str],
                 target: str, batch_rows: int) -> None:
        self._reader = reader
        self._batch_rows = batch_rows
        self.columns = described  # the driver's types (numeric with precision and scale)
        self._scrub, self._target = scrub, target

    def driver_rows(self) -> Iterator[Any]:
        """Record batches of about ``batch_rows`` rows: the transit buffer is sized by declared
        widths (a few hundred rows of ``text``), so its small batches are joined into compact
        ones (actual lengths) before the encoders' per-batch work."""
        arrow_odbc, pa, _ = _modules()
        pending: list[Any] = []
        rows = 0
        try:
            for batch in self._reader:
                pending.append(batch)
                rows += batch.num_rows
                if rows >= self._batch_rows:
                    yield _joined(pa, pending)
                    pending, rows = [], 0
        except arrow_odbc.Error as exc:
            raise _translate(exc, self._scrub, self._target) from None
        if pending:
            yield _joined(pa, pending)

    def encoder(self, fmt: str, options: CsvOptions | None) -> Encoder:
        if fmt == "csv":
            return ArrowCsvEncoder(self.columns, options or CsvOptions())
        if fmt == "jsonl":
            return ArrowJsonLinesEncoder(self.columns)
        if fmt == "parquet":
            return ArrowParquetEncoder(self.columns)
        raise NotArrowFaithful(f"the arrow engine writes {', '.join(ARROW_FORMATS)}, not {fmt}")

    def close(self) -> None:
        self._reader = iter(())


def _joined(pa: Any, batches: list[Any]) -> Any:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


class ArrowParquetEncoder(ParquetEncoder):
    """Record batches -> Parquet row groups (the writer of
    :class:`~shir.adapters.copy_parquet.ParquetEncoder`): numeric text cast to its declared
    ``decimal128(p, s)``, a value with more digits an error; row groups of 20,000 rows."""

    def __init__(self, described: Any, *, row_group_rows: int = 20_000) -> None:
        _, pa, self._pc = _modules()
        self.names = list(described.names)
        self._start(pa.schema([pa.field(f.name, f.type) for f in described]), row_group_rows)

    def encode(self, rows: Any) -> bytes:
        pa, pc = self._pa, self._pc
        arrays = []
        for field, column in zip(self._schema, rows.columns, strict=True):
            if column.type != field.type:
                try:
                    column = pc.cast(column, field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise FormatError(
                        f"parquet: column {field.name!r}: a value does not fit {field.type} "
                        f"({str(exc).splitlines()[0][:200]})") from None
            arrays.append(column)
        return self._add(pa.record_batch(arrays, schema=self._schema))


def open_source(connection_string: str, fmt: str, engine: str = "auto") -> Any:
    """The source the copy reads with: ``arrow`` (arrow-odbc), ``pyodbc``, or ``auto`` (arrow
    when installed, falling back to pyodbc for a result whose
    types the arrow engine does not carry)."""
    if engine not in ENGINES:
        raise FormatError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "arrow" and fmt not in ARROW_FORMATS:
        raise FormatError(f"the arrow engine writes {', '.join(ARROW_FORMATS)}; use "
                          f"--engine pyodbc for {fmt}")
    if engine == "arrow" or (engine == "auto" and fmt in ARROW_FORMATS and arrow_available()):
        return ArrowOdbcSource(connection_string, fallback=engine == "auto")
    from shir.adapters.odbc import OdbcSource

    return OdbcSource(connection_string)

