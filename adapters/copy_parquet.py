"""Parquet for the copy activity (pyarrow, in the ``parquet`` extra), both ways.

Theory of operation
-------------------
:class:`ParquetEncoder` maps each result column to an Arrow type once, before any row
(:func:`arrow_type`), so a column Parquet cannot hold faithfully is refused up front. Each
fetched batch becomes one Arrow array per column (``pa.array`` over the column, converted in
C++); batches are buffered until ``row_group_rows`` rows (50,000) and then written as one row
group by a ``pyarrow.parquet.ParquetWriter`` into an in-memory collector, whose bytes
``encode`` hands on (the copy cuts them into parts). ``finish`` writes the last row group and
the footer. Memory: one row group of Arrow arrays (compact: no Python object per value) plus
the writer's buffers for it; snappy, no dictionary encoding. Arrow's C++ default memory pool
is mimalloc returning freed memory at once when pyarrow is first imported here
(:func:`arrow_allocator_first`).
(``pa.array`` imports pandas when it is installed: about 50 MB more.) The writer is pyarrow's
own (``pyarrow._parquet``): ``pyarrow.parquet`` would import ``pyarrow.fs`` too (8 MB).

Types, faithfully: integer -> int64; numeric -> decimal128(precision, scale) (decimal256 above
38 digits; the driver's precision and scale, so a value with more digits than its column
declares is a :class:`~shir.adapters.copy_formats.FormatError`); float -> float64; text ->
string; bytes -> binary; boolean -> bool; timestamp -> timestamp[us], and a column of instants
(``Column.time_zone``, PostgreSQL ``timestamptz``: :mod:`shir.adapters.copy_zones`) ->
timestamp[us, tz=UTC]; date -> date32; time -> time64[us]; uuid -> string. NULL is Parquet's null.

Reading (:func:`read_parquet_records`) needs a seekable file (the footer is at the end): the
load spools a Blob download into a temporary file first.
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from shir.adapters.copy_formats import Encoder, FormatError, UnsupportedType, value_kind

__all__ = ["ParquetEncoder", "arrow_allocator_first", "arrow_type", "load_pyarrow",
           "read_parquet_records"]

DEFAULT_ROW_GROUP_ROWS = 50_000  # a row group is buffered whole by the writer: bounds memory


def arrow_allocator_first() -> None:
    """Have Arrow's C++ default memory pool be mimalloc giving freed memory back at once
    (``MIMALLOC_PURGE_DELAY=0``, ``MIMALLOC_ARENA_EAGER_COMMIT=0``); each variable the user
    set stays as it is. Effective only before pyarrow's first import, which picks
    the pool and mimalloc reads its options once. The Parquet writer allocates its pages from
    that pool whatever pyarrow's Python-level pool is: with glibc's allocator a 5 M-row Parquet
    copy peaked anywhere from 139 to 220 MB from run to run (fragmented arenas), with
    mimalloc's defaults at 154 MB (freed pages kept 10 ms), and so at 135-142 MB."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")
    os.environ.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")


def load_pyarrow() -> Any:
    """pyarrow, imported after :func:`arrow_allocator_first`; a clear error without it."""
    arrow_allocator_first()
    try:
        import pyarrow as pa
    except ImportError:
        raise FormatError("Parquet needs pyarrow: pip install 'shir[parquet]'") from None
    return pa


def _writer_class() -> Any:
    """pyarrow's Parquet writer itself (``pyarrow._parquet``), which ``pyarrow.parquet`` wraps:
    importing ``pyarrow.parquet`` imports ``pyarrow.fs`` and with it the S3, GCS, Azure and HDFS
    file systems (8 MB of peak RSS) that writing into memory never uses."""
    load_pyarrow()
    from pyarrow._parquet import ParquetWriter

    return ParquetWriter


def arrow_type(column: Any) -> Any:
    """The Arrow type that holds ``column``'s values exactly; raises UnsupportedType."""
    pa = load_pyarrow()
    kind = value_kind(column.name, column.python_type, "parquet")
    if kind is decimal.Decimal:
        precision, scale = column.size or 0, column.scale or 0
        if not 0 < precision <= 76 or not 0 <= scale <= precision:
            raise UnsupportedType(
                f"column {column.name!r}: a numeric without a declared precision and scale "
                f"(the driver says {column.size}, {column.scale}) has no Parquet decimal type; "
                "cast it in the query (e.g. CAST(x AS NUMERIC(18,4))). Nothing was written."
            )
        return (pa.decimal128 if precision <= 38 else pa.decimal256)(precision, scale)
    if kind is dt.datetime and getattr(column, "time_zone", None):
        return pa.timestamp("us", tz=column.time_zone)  # naive values are read as UTC
    return {
        bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string(),
        bytes: pa.binary(), dt.datetime: pa.timestamp("us"), dt.date: pa.date32(),
        dt.time: pa.time64("us"), uuid.UUID: pa.string(),
    }[kind]


class _Collector(io.RawIOBase):
    """A write-only stream that keeps what was written until :meth:`take`."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._buffer += data
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class ParquetEncoder(Encoder):
    """Batches of rows -> Parquet row groups; see the module docs."""

    content_type = "application/vnd.apache.parquet"
    extension = ".parquet"

    def __init__(self, columns: Sequence[Any], *,
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> None:
        pa = load_pyarrow()
        self.names = [c.name for c in columns]
        self._types = [arrow_type(c) for c in columns]
        self._uuid = [value_kind(c.name, c.python_type, "parquet") is uuid.UUID for c in columns]
        self._start(pa.schema([pa.field(n, t) for n, t in zip(self.names, self._types,
                                                                strict=True)]), row_group_rows)

    def _start(self, schema: Any, row_group_rows: int) -> None:
        """Open the writer of ``schema`` (also the arrow engine's encoder's start)."""
        self._pa = load_pyarrow()
        self._schema = schema
        self._sink = _Collector()
        # no dictionary encoding: its builders tripled the writer's memory per row group, and on
        # the benchmark's mostly distinct values the file came out 12% larger with it
        # pyarrow.parquet.ParquetWriter's own defaults, spelled out: the same file as through it
        self._writer = _writer_class()(
            self._sink, self._schema, compression="snappy", use_dictionary=False,
            version="2.6", write_statistics=True, use_deprecated_int96_timestamps=False,
            writer_engine_version="V2", data_page_version="1.0", store_schema=True)
        self._row_group_rows = row_group_rows
        self._pending: list[Any] = []
        self._pending_rows = 0

    def _add(self, batch: Any) -> bytes:
        """Buffer a record batch; write a row group once enough rows are buffered."""
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows >= self._row_group_rows:
            self._write_row_group()
        return self._sink.take()

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes:
        pa = self._pa
        arrays = []
        for name, values, arrow, is_uuid in zip(self.names, zip(*rows, strict=True),
                                                self._types, self._uuid, strict=True):
            column: Sequence[Any] = values
            if is_uuid:
                column = [None if v is None else str(v) for v in values]
            try:
                arrays.append(pa.array(column, type=arrow))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise FormatError(f"parquet: column {name!r}: a value does not fit {arrow} "
                                  f"({str(exc).splitlines()[0][:200]})") from None
        return self._add(pa.record_batch(arrays, schema=self._schema))

    def _write_row_group(self) -> None:
        if self._pending:
            table = self._pa.Table.from_batches(self._pending, schema=self._schema)
            self._writer.write_table(table, row_group_size=max(1, table.num_rows))
            self._pending.clear()
            self._pending_rows = 0

    def finish(self) -> bytes:
        self._write_row_group()
        self._writer.close()
        return self._sink.take()


def read_parquet_records(
    binary: Any, batch_rows: int = 10_000
) -> tuple[tuple[str, ...], Iterator[Sequence[Any]]]:
    """(column names, iterator of rows of Python values) of a Parquet file (seekable)."""
    pa = load_pyarrow()
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(binary)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FormatError(f"parquet: not a Parquet file ({str(exc).splitlines()[0][:200]})"
                          ) from None
    names = tuple(parquet.schema_arrow.names)

    def rows() -> Iterator[Sequence[Any]]:
        for batch in parquet.iter_batches(batch_size=batch_rows):
            yield from zip(*(c.to_pylist() for c in batch.columns), strict=True)

    return names, rows()
