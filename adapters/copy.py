"""The copy activity: stream a query's rows from ODBC into a sink, or a file into an ODBC table.

Theory of operation
-------------------
:func:`copy_query` runs three stages that overlap through bounded queues, so memory stays
flat whatever the table size: a fetch thread drains the :class:`~shir.adapters.odbc.RowStream`
(the driver's rows as they come, no per-row copy) into a queue of at most ``queue_batches``
batches; the calling thread encodes each batch and cuts the bytes into parts of
``part_size_bytes`` (4 MiB, doubling every 10,000 parts: see :func:`part_size`); the sink
uploads parts (a Blob sink with bounded parallelism, at most ``max_parallel`` parts in flight).
A part is handed to the sink as the buffer it was gathered in, never copied. The encoder is
built from the result's columns before the first row, so a type the format cannot hold fails
before anything is written; its ``finish()`` bytes (Parquet's footer) end the content.

Speed: the fetch (pyodbc building Python objects) and the encoding (turning them into text)
both need the GIL, so on a CPU-bound machine the copy costs their sum; what the fetch thread
buys is overlap with the database's own work and the upload (benchmarks/copy_bench.py: the copy
beats the drain-then-encode floor in one thread, docs/copy.md has the figures).

The sink commits once, after the last row, with the content's MD5; any
failure or a cancel aborts it and nothing becomes visible.

Idempotent by job id: the sink's temporary name / block ids derive from it, a retry of a job
resumes (Blob: parts already staged are not uploaded again) or overwrites its temporary file,
and a job whose output is already committed is not run again. The query must return rows in a
stable order (``ORDER BY``) for a resumed blob to be byte-identical; the block ids hold each
part's MD5, so a part that differs is uploaded again rather than trusted.

:func:`load_file` (module :mod:`shir.adapters.copy_load`) is the reverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from shir.adapters.copy_formats import CsvOptions, UnsupportedType, make_encoder
from shir.adapters.copy_sinks import SinkWriter
from shir.core.errors import ShirError

__all__ = ["CopyCancelled", "CopyResult", "Progress", "copy_query", "part_size"]

#: The first parts' size. Memory holds up to ``max_parallel + 1`` parts (those uploading and the
#: one being gathered): 4 MiB parts peaked 7-9 MB lower than 8 MiB on the benchmark's copy,
#: at no measurable cost in speed on loopback (docs/copy.md).
DEFAULT_PART_SIZE_BYTES = 4 * 1024 * 1024
#: A block blob holds at most 50,000 blocks: the part size doubles every this many parts (4 MiB
#: parts reach 39 GiB, 8 MiB the next 78 GiB, ... so 50,000 parts hold 1.2 TiB), keeping memory
#: small for common tables without capping a large one.
PARTS_PER_SIZE = 10_000
#: The part size stops doubling at this (Azure's largest block is 4,000 MiB).
MAX_PART_SIZE_BYTES = 256 * 1024 * 1024


class CopyCancelled(ShirError):
    """The copy was cancelled; nothing was committed."""


@attrs.frozen
class Progress:
    """How far a copy is: rows and bytes so far, seconds since it started, rows per second."""

    rows: int
    bytes: int
    elapsed_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0


@attrs.frozen
class CopyResult:
    """What a finished copy wrote (``skipped``: the job had already committed this output)."""

    rows: int
    bytes: int
    parts: int
    md5_hex: str
    elapsed_s: float
    skipped: bool = False


_END = object()


def copy_query(
    source: Any,
    query: str,
    sink: Any,
    fmt: str,
    job_id: str,
    *,
    csv_options: CsvOptions | None = None,
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
    batch_rows: int = 10_000,
    queue_batches: int = 4,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> CopyResult:
    """Copy the rows of ``query`` on ``source`` into ``sink`` as ``fmt``.

    ``source`` is an :class:`~shir.adapters.odbc.OdbcSource` (the pyodbc engine) or an
    :class:`~shir.adapters.copy_arrow.ArrowOdbcSource` (the Arrow engine; build either with
    :func:`~shir.adapters.copy_arrow.open_source`).

    Raises the source's :class:`~shir.adapters.odbc.OdbcError`, a
    :class:`~shir.adapters.copy_formats.FormatError`, a
    :class:`~shir.adapters.copy_sinks.SinkError` or :class:`CopyCancelled`; in every case
    nothing was committed.
    """
    started = time.monotonic()
    user_cancel = cancel or threading.Event()
    stop = threading.Event()  # ours: set on any failure, never the caller's event

    def stopped() -> bool:
        return stop.is_set() or user_cancel.is_set()

    fallback = contextlib.ExitStack()  # the pyodbc source the auto engine falls back to
    try:
        stream = _read(source, query, batch_rows)
    except UnsupportedType:  # the Arrow engine's NotArrowFaithful, before any row
        if not getattr(source, "fallback", False):
            raise
        source = fallback.enter_context(source.pyodbc_source())
        stream = _read(source, query, batch_rows)
    try:
        with_encoder = getattr(stream, "encoder", None)  # the Arrow engine's own encoders
        encoder = (with_encoder(fmt, csv_options) if with_encoder is not None
                   else make_encoder(fmt, stream.columns, csv_options))  # refuses types up front
        writer: SinkWriter = sink.open(job_id)
    except BaseException:
        stream.close()
        fallback.close()
        raise
    if writer.already_done:
        stream.close()
        fallback.close()
        return CopyResult(0, 0, 0, "", time.monotonic() - started, skipped=True)

    batches: queue.Queue[Any] = queue.Queue(maxsize=queue_batches)
    failure: list[BaseException] = []

    def fetch() -> None:
        try:
            for batch in stream.driver_rows():  # no per-row copy: encoders read by column
                while True:
                    if stopped():
                        return
                    try:
                        batches.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:
            failure.append(exc)
        finally:
            stream.close()
            while True:  # the consumer may have stopped: never block forever on the end marker
                try:
                    batches.put(_END, timeout=0.2)
                    break
                except queue.Full:
                    if stopped():
                        break

    fetcher = threading.Thread(target=fetch, name="shir-copy-fetch", daemon=True)
    md5 = hashlib.md5()
    rows = parts = 0
    pending = bytearray(encoder.header())
    total = len(pending)
    committed = False
    fetcher.start()
    try:
        while True:
            if user_cancel.is_set():
                source.cancel()
                raise CopyCancelled("the copy was cancelled; nothing was committed")
            try:
                batch = batches.get(timeout=0.2)
            except queue.Empty:
                continue
            if batch is _END:
                break
            data = encoder.encode(batch)
            rows += len(batch)
            pending += data
            total += len(data)
            if len(pending) >= part_size(part_size_bytes, parts):
                parts = _flush(writer, pending, parts, md5)
                pending = bytearray()  # the sink owns the flushed buffer now
            if progress is not None:
                progress(Progress(rows, total, time.monotonic() - started))
        if failure:
            raise failure[0]
        if user_cancel.is_set():
            raise CopyCancelled("the copy was cancelled; nothing was committed")
        tail = encoder.finish()
        pending += tail
        total += len(tail)
        if pending or parts == 0:
            parts = _flush(writer, pending, parts, md5)
        writer.commit(md5.digest(), rows)
        committed = True
    finally:
        if not committed:
            stop.set()
            writer.abort()
        fetcher.join(10)
        fallback.close()
    return CopyResult(rows, total, parts, md5.hexdigest(), time.monotonic() - started)


def part_size(first_bytes: int, part: int) -> int:
    """The size at which part number ``part`` is cut: ``first_bytes``, doubled every
    :data:`PARTS_PER_SIZE` parts, at most :data:`MAX_PART_SIZE_BYTES` (or ``first_bytes`` if
    larger). A function of the part number only, so a retried job cuts the same parts."""
    return max(first_bytes, min(first_bytes << (part // PARTS_PER_SIZE), MAX_PART_SIZE_BYTES))


def _read(source: Any, query: str, batch_rows: int) -> Any:
    """The source's stream of ``query``; a pyodbc source's ``timestamptz`` columns as instants
    (the arrow engine does that in its own ``read``)."""
    from shir.adapters.odbc import OdbcSource

    if isinstance(source, OdbcSource):
        from shir.adapters.copy_zones import read_instants

        return read_instants(source, query, batch_rows)
    return source.read(query, batch_rows=batch_rows)


def _flush(writer: SinkWriter, pending: bytearray, parts: int, md5: Any) -> int:
    """Hand ``pending`` itself to the sink (no copy: a part is several MiB) with the content's
    MD5 through it (the Blob sink's block id: no second hash of the part); the caller starts a
    new buffer."""
    md5.update(pending)
    writer.put(parts, pending, md5.copy().digest())
    return parts + 1
