"""File formats of the copy activity: delimited text (RFC 4180) and JSON lines, both ways.

Theory of operation
-------------------
An :class:`Encoder` is built from a result's :class:`~shir.adapters.odbc.Column` list *before*
any row is read, so a column whose type the format cannot hold is refused
(:class:`UnsupportedType`) before anything is written or committed. ``encode(batch)`` turns a
batch of row tuples into bytes; the caller cuts those bytes into parts.

Values, faithfully:

============  =====================================  =====================================
type          CSV                                    JSON lines
============  =====================================  =====================================
NULL          the null representation (default       ``null``
              empty, unquoted)
text          as is; empty text is ``""`` (quoted)   string
integer       digits                                 number
numeric       ``str(Decimal)``: every digit and the  string ``"123.4500"`` (a JSON number
              scale kept (``1.2300``)                would be read back as a float)
float         ``repr``                               number (NaN/infinity refused)
timestamp     ISO 8601 (``2024-01-02 03:04:05.5``,   ISO 8601 with ``T``, as a string
              ``+HH:MM`` offset if zoned)
date, time    ISO 8601                               the same, as a string
bytes         base64 (RFC 4648)                      base64 string
boolean       ``true``/``false``                     ``true``/``false``
============  =====================================  =====================================

Decoding goes the other way given the target column types (see :func:`decoder_for`): the load
asks the target table for its columns and converts each field to what that column holds.

Limit: a CSV text value holding U+0000 is refused by the CSV encoder (the marker it uses to
quote empty text; PostgreSQL text never holds U+0000).
"""

from __future__ import annotations

import base64
import codecs
import csv
import datetime as dt
import decimal
import io
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs

from shir.core.errors import ShirError

__all__ = [
    "FORMATS",
    "CsvOptions",
    "Encoder",
    "FormatError",
    "UnsupportedType",
    "decoder_for",
    "make_encoder",
    "read_records",
]

FORMATS = ("csv", "jsonl")


class FormatError(ShirError):
    """A value or a file that the format cannot hold or could not read."""


class UnsupportedType(FormatError):
    """A column whose type the chosen format cannot hold; raised before any row is written."""


@attrs.frozen
class CsvOptions:
    """Delimited-text settings: one-character delimiter and quote, text encoding, NULL text."""

    delimiter: str = ","
    quote: str = '"'
    encoding: str = "utf-8"
    null: str = ""
    header: bool = True

    def __attrs_post_init__(self) -> None:
        if len(self.delimiter) != 1 or len(self.quote) != 1 or self.delimiter == self.quote:
            raise FormatError(
                "csv: delimiter and quote must be single, different characters "
                f"(got {self.delimiter!r} and {self.quote!r})"
            )
        if any(c in self.null for c in (self.delimiter, self.quote, "\r", "\n")):
            raise FormatError("csv: the null representation may not hold the delimiter, the "
                              "quote or a line break")
        try:
            "".encode(self.encoding)
        except LookupError:
            raise FormatError(f"csv: unknown text encoding {self.encoding!r}") from None


_SUPPORTED = (bool, int, str, float, decimal.Decimal, dt.datetime, dt.date, dt.time, bytes,
              bytearray, uuid.UUID)
_NULL = "\x01\x02"  # stands for NULL in a one-column CSV inside the csv writer
_EMPTY = "\x00"  # stands for empty text inside the csv writer; replaced by "" afterwards


def _kind(name: str, python_type: type, fmt: str) -> type:
    for t in _SUPPORTED:
        if issubclass(python_type, t):
            return bytes if t is bytearray else t
    raise UnsupportedType(
        f"column {name!r}: its type {python_type.__name__} cannot be written as {fmt}; cast it "
        "in the query (e.g. CAST(x AS VARCHAR)) or leave it out. Nothing was written."
    )


def _b64(v: bytes) -> str:
    return base64.b64encode(v).decode("ascii")


def _csv_b64(v: bytes) -> str:
    return base64.b64encode(v).decode("ascii") or _EMPTY  # empty bytes are not NULL


def _iso(v: Any) -> str:
    return str(v.isoformat())


def _bool_text(v: bool) -> str:
    return "true" if v else "false"


class Encoder:
    """Turns batches of rows of known columns into bytes of one format (see the module docs)."""

    content_type = "application/octet-stream"
    extension = ""

    def header(self) -> bytes:
        """Bytes that open the file (the CSV header line), or ``b""``."""
        return b""

    def encode(self, rows: Sequence[tuple[Any, ...]]) -> bytes:
        """The bytes of ``rows``; raises :class:`FormatError` for a value it cannot hold."""
        raise NotImplementedError


def _row_transform(
    converters: Sequence[Callable[[Any], Any] | None],
) -> Callable[[Any], Any] | None:
    """One generated function converting the columns that need it (None: no column does)."""
    if all(c is None for c in converters):
        return None
    parts: list[str] = []
    env: dict[str, Any] = {}
    for i, conv in enumerate(converters):
        if conv is None:
            parts.append(f"r[{i}]")
        else:
            env[f"c{i}"] = conv
            parts.append(f"(None if r[{i}] is None else c{i}(r[{i}]))")
    src = "lambda r: (" + ", ".join(parts) + ",)"
    fn: Callable[[Any], Any] = eval(src, env)  # built from column indexes only, no data
    return fn


def _csv_text(v: str) -> str:
    if v == "":
        return _EMPTY
    if _EMPTY in v:
        raise FormatError("csv: a text value holds U+0000, which CSV output cannot carry")
    return v


class CsvEncoder(Encoder):
    content_type = "text/csv"
    extension = ".csv"

    def __init__(self, columns: Sequence[Any], options: CsvOptions) -> None:
        self.options = options
        self.names = [c.name for c in columns]
        convs: list[Callable[[Any], Any] | None] = []
        for c in columns:
            kind = _kind(c.name, c.python_type, "csv")
            table: dict[type, Callable[[Any], Any]] = {
                # datetime, date, time: the csv module's str() is ISO 8601 with a space between
                # date and time, which fromisoformat reads back; no Python call per value
                bytes: _csv_b64, str: _csv_text,
                bool: _bool_text, uuid.UUID: str, float: repr,
            }
            convs.append(table.get(kind))
        self._transform = _row_transform(convs)
        self._null_is_empty = options.null == ""
        # the csv module writes a lone empty field as "" (else the line would look blank): a
        # one-column NULL goes through a marker so it stays an empty, unquoted line
        self._lone_null = self._null_is_empty and len(self.names) == 1
        if not self._null_is_empty or self._lone_null:
            none_to = _NULL if self._lone_null else options.null
            inner = self._transform

            def with_null(r: Any) -> Any:
                r = inner(r) if inner else r
                return tuple(none_to if v is None else v for v in r)

            self._transform = with_null
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, delimiter=options.delimiter,
                                  quotechar=options.quote, lineterminator="\r\n",
                                  quoting=csv.QUOTE_MINIMAL, doublequote=True)
        self._quoted_empty = options.quote * 2
        # incremental: utf-16 and utf-8-sig write their BOM once, not once per batch
        self._encode = codecs.getincrementalencoder(options.encoding)().encode

    def header(self) -> bytes:
        if not self.options.header:
            return b""
        return self._chunk([tuple(self.names)], transform=False)

    def encode(self, rows: Sequence[tuple[Any, ...]]) -> bytes:
        return self._chunk(rows, transform=True)

    def _chunk(self, rows: Iterable[tuple[Any, ...]], *, transform: bool) -> bytes:
        buf = self._buffer
        buf.seek(0)
        buf.truncate()
        if transform and self._transform is not None:
            rows = map(self._transform, rows)
        try:
            self._writer.writerows(rows)
        except csv.Error as exc:
            raise FormatError(f"csv: a value could not be written: {exc}") from None
        text = buf.getvalue()
        if _EMPTY in text:
            text = text.replace(_EMPTY, self._quoted_empty)
        if self._lone_null:
            text = text.replace(_NULL, "")
        try:
            return self._encode(text)
        except UnicodeEncodeError as exc:
            raise FormatError(
                f"csv: a text value has a character that {self.options.encoding} cannot "
                f"encode ({exc.reason}); choose another encoding (e.g. utf-8)"
            ) from None


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise FormatError(f"jsonl: the float {v!r} has no JSON representation")
    return v


class JsonLinesEncoder(Encoder):
    content_type = "application/x-ndjson"
    extension = ".jsonl"

    def __init__(self, columns: Sequence[Any]) -> None:
        self.names = tuple(c.name for c in columns)
        convs: list[Callable[[Any], Any] | None] = []
        for c in columns:
            kind = _kind(c.name, c.python_type, "jsonl")
            table: dict[type, Callable[[Any], Any]] = {
                bytes: _b64, decimal.Decimal: str, dt.datetime: _iso, dt.date: _iso,
                dt.time: _iso, uuid.UUID: str, float: _finite,
            }
            convs.append(table.get(kind))
        self._transform = _row_transform(convs)
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                                       allow_nan=False).encode

    def encode(self, rows: Sequence[tuple[Any, ...]]) -> bytes:
        names, dumps, transform = self.names, self._dumps, self._transform
        if transform is not None:
            rows = list(map(transform, rows))
        lines = [dumps(dict(zip(names, r, strict=True))) for r in rows]
        lines.append("")
        return "\n".join(lines).encode("utf-8")


def make_encoder(
    fmt: str, columns: Sequence[Any], csv_options: CsvOptions | None = None
) -> Encoder:
    """The encoder of ``fmt`` (``csv`` or ``jsonl``) for ``columns``; refuses unknown types."""
    if fmt == "csv":
        return CsvEncoder(columns, csv_options or CsvOptions())
    if fmt == "jsonl":
        return JsonLinesEncoder(columns)
    raise FormatError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


# --- reading ---------------------------------------------------------------------------------


def _parse_bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("true", "t", "1"):
        return True
    if v.lower() in ("false", "f", "0"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _parse_datetime(v: str) -> dt.datetime:
    return dt.datetime.fromisoformat(v)


_DECODERS: dict[type, Callable[[Any], Any]] = {
    bool: _parse_bool,
    int: int,
    float: float,
    decimal.Decimal: decimal.Decimal,
    dt.datetime: _parse_datetime,
    dt.date: dt.date.fromisoformat,
    dt.time: dt.time.fromisoformat,
    bytes: lambda v: base64.b64decode(v, validate=True),
    uuid.UUID: str,
    str: str,
}


def decoder_for(python_type: type) -> Callable[[Any], Any]:
    """Converts a field read from a file to the Python value for a column of ``python_type``."""
    for t in _SUPPORTED:
        if issubclass(python_type, t):
            return _DECODERS[bytes if t is bytearray else t]
    return str


def _csv_records(text: Iterator[str], options: CsvOptions) -> Iterator[list[str | None]]:
    """RFC 4180 records; an unquoted field equal to the null text is None, ``""`` is ""."""
    d, q = re.escape(options.delimiter), re.escape(options.quote)
    field = re.compile(f'{q}((?:[^{q}]|{q}{q})*){q}(?={d}|$)|([^{d}{q}]*)(?={d}|$)', re.S)
    qq, qch, null = options.quote * 2, options.quote, options.null
    pending = ""
    for line in text:
        record = pending + line
        if record.count(qch) % 2:  # a quoted field goes on over a line break
            pending = record
            continue
        pending = ""
        record = record[:-2] if record.endswith("\r\n") else record.rstrip("\n")
        out: list[str | None] = []
        pos = 0
        while True:
            m = field.match(record, pos)
            if m is None:
                raise FormatError(f"csv: a malformed record near {record[pos:pos + 40]!r}")
            if m.group(1) is not None:
                out.append(m.group(1).replace(qq, qch))
            else:
                raw = m.group(2)
                out.append(None if raw == null else raw)
            pos = m.end()
            if pos >= len(record):
                break
            pos += 1  # the delimiter
            if pos == len(record):
                out.append(None if null == "" else "")
                break
        yield out
    if pending:
        raise FormatError("csv: the file ends inside a quoted field")


def read_records(
    binary: io.RawIOBase | io.BufferedIOBase, fmt: str, csv_options: CsvOptions | None = None
) -> tuple[tuple[str, ...] | None, Iterator[Sequence[Any]]]:
    """(column names if the file names them, iterator of records) of a CSV or JSON lines file.

    JSON lines records are dicts turned into lists in the order of the first line's keys.
    """
    if fmt == "csv":
        options = csv_options or CsvOptions()
        text = io.TextIOWrapper(binary, encoding=options.encoding, newline="")  # type: ignore[type-var]
        records = _csv_records(text, options)
        names = None
        if options.header:
            first = next(records, None)
            if first is None:
                raise FormatError("csv: the file is empty (no header line)")
            names = tuple(x or "" for x in first)
        return names, records
    if fmt == "jsonl":
        lines = io.TextIOWrapper(binary, encoding="utf-8", newline="\n")  # type: ignore[type-var]
        first_line = lines.readline()
        if not first_line.strip():
            return (), iter(())
        first = json.loads(first_line)
        keys = tuple(first)

        def gen() -> Iterator[Sequence[Any]]:
            yield [first[k] for k in keys]
            for n, line in enumerate(lines, start=2):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    yield [obj[k] for k in keys]
                except (ValueError, KeyError) as exc:
                    raise FormatError(f"jsonl: line {n} is not a row like line 1 ({exc})") from None

        return keys, gen()
    raise FormatError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
