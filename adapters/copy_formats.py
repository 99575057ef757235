"""File formats of the copy activity: delimited text (RFC 4180), JSON lines (and Parquet, in
:mod:`shir.adapters.copy_parquet`), both ways.

Theory of operation
-------------------
An :class:`Encoder` is built from a result's :class:`~shir.adapters.odbc.Column` list *before*
any row is read, so a column whose type the format cannot hold is refused
(:class:`UnsupportedType`) before anything is written or committed. ``encode(batch)`` turns a
batch of row tuples into bytes; the caller cuts those bytes into parts.

Speed: the text encoders work a batch *column by column* (``zip(*rows)``): each column is turned
into text by a C function mapped over it (``str``, ``repr``, base64...), a column is scanned for
characters that need quoting once per batch (as one joined string) and only when its type's
alphabet can hold them, and the lines are joined with ``str.join`` or a ``%`` template. No
Python frame runs per value unless a column of the batch holds NULLs or values to quote.

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

In CSV a text value equal to the null representation is quoted, so it stays apart from NULL.
"""

from __future__ import annotations

import base64
import binascii
import codecs
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

FORMATS = ("csv", "jsonl", "parquet")


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


def _kind(name: str, python_type: type, fmt: str) -> type:
    for t in _SUPPORTED:
        if issubclass(python_type, t):
            return bytes if t is bytearray else t
    raise UnsupportedType(
        f"column {name!r}: its type {python_type.__name__} cannot be written as {fmt}; cast it "
        "in the query (e.g. CAST(x AS VARCHAR)) or leave it out. Nothing was written."
    )


def _b64(v: bytes) -> str:
    return binascii.b2a_base64(v, newline=False).decode("ascii")


_BOOL_TEXT = {True: "true", False: "false"}.__getitem__

# Per kind, the function that turns one (non-NULL) value into text; str() for the rest. All
# are C functions, mapped over a whole column at once (no Python frame per value).
_CSV_TEXT: dict[type, Callable[[Any], str]] = {
    bytes: _b64, bool: _BOOL_TEXT, float: repr,
}
# The characters each kind's text can hold (None: anything): a column whose alphabet misses the
# delimiter and the quote never needs quoting, so it is never scanned.
_ALPHABET: dict[type, str | None] = {
    int: "-0123456789", decimal.Decimal: "-+.0123456789EInfinity",
    float: "-+.0123456789einfa", bool: "truefals", uuid.UUID: "-0123456789abcdef",
    dt.datetime: "-+:. 0123456789", dt.date: "-0123456789", dt.time: "-+:.0123456789",
    bytes: "+/=0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", str: None,
}


class Encoder:
    """Turns batches of rows of known columns into bytes of one format (see the module docs)."""

    content_type = "application/octet-stream"
    extension = ""

    def header(self) -> bytes:
        """Bytes that open the file (the CSV header line), or ``b""``."""
        return b""

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes:
        """The bytes of ``rows``; raises :class:`FormatError` for a value it cannot hold."""
        raise NotImplementedError

    def finish(self) -> bytes:
        """Bytes that close the file (Parquet's footer), or ``b""``."""
        return b""


def _texts(column: Sequence[Any], to_text: Callable[[Any], str] | None,
           null: str | None) -> Sequence[Any]:
    """``column`` as text with NULL as ``null``: one C-level pass when it holds no NULL."""
    if None not in column:
        return column if to_text is None else list(map(to_text, column))
    if to_text is None:
        return [null if v is None else v for v in column]
    return [null if v is None else to_text(v) for v in column]


class CsvEncoder(Encoder):
    """RFC 4180, built column by column: each column of a batch is turned into text at once
    (C functions mapped over it), scanned once for characters that need quoting, and the lines
    are joined by ``str.join``; only a column that holds such a value is quoted value by value.
    """

    content_type = "text/csv"
    extension = ".csv"

    def __init__(self, columns: Sequence[Any], options: CsvOptions) -> None:
        self.options = options
        self.names = [c.name for c in columns]
        self._to_text: list[Callable[[Any], str] | None] = []
        self._scan: list[bool] = []  # may this column's text need quoting?
        specials = {options.delimiter, options.quote, "\r", "\n"}
        for c in columns:
            kind = _kind(c.name, c.python_type, "csv")
            self._to_text.append(None if kind is str else _CSV_TEXT.get(kind, str))
            alphabet = _ALPHABET[kind]
            # empty bytes are text "" and need quotes to differ from an empty NULL
            self._scan.append(alphabet is None or kind is bytes
                              or any(ch in alphabet for ch in specials))
        self._specials = tuple(specials)
        q = options.quote
        self._quote_all = lambda v: q + v.replace(q, q + q) + q
        # incremental: utf-16 and utf-8-sig write their BOM once, not once per batch
        self._encode = codecs.getincrementalencoder(options.encoding)().encode

    def header(self) -> bytes:
        if not self.options.header:
            return b""
        names = self._quoted(self.names, self.options.null)
        return self._text([self.options.delimiter.join(names)])

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes:
        null = self.options.null
        columns = []
        by_column = zip(*rows, strict=True)
        for column, to_text, scan in zip(by_column, self._to_text, self._scan, strict=True):
            if not scan:
                column = _texts(column, to_text, null)
            else:  # quote first: a value equal to the null text is quoted, NULL is not
                if to_text is not None:
                    column = _texts(column, to_text, None)
                column = self._quoted(column, null)
                if None in column:
                    column = [null if v is None else v for v in column]
            columns.append(column)
        return self._text(map(self.options.delimiter.join, zip(*columns, strict=True)))

    def _quoted(self, column: Sequence[Any], null: str) -> Sequence[Any]:
        """``column`` with every value that needs it quoted (None stays None)."""
        probe = "\x1f".join(filter(None, column))  # non-empty values only, in C
        if not (any(ch in probe for ch in self._specials) or "" in column
                or (null and null in column)):
            return column
        specials, quote_all = self._specials, self._quote_all
        return [v if v is None else quote_all(v)
                if v == "" or v == null or any(ch in v for ch in specials) else v
                for v in column]

    def _text(self, lines: Iterable[str]) -> bytes:
        text = "\r\n".join(lines) + "\r\n"
        try:
            return self._encode(text)
        except UnicodeEncodeError as exc:
            raise FormatError(
                f"csv: a text value has a character that {self.options.encoding} cannot "
                f"encode ({exc.reason}); choose another encoding (e.g. utf-8)"
            ) from None


def _json_quoted(to_text: Callable[[Any], str]) -> Callable[[Any], str]:
    quoted = '"%s"'.__mod__
    return lambda v: quoted(to_text(v))


# JSON text of one non-NULL value per kind; the datetime types as ISO 8601 with "T".
_JSON_TEXT: dict[type, Callable[[Any], str]] = {
    str: json.encoder.encode_basestring,  # type: ignore[attr-defined]
    int: repr, float: repr, bool: _BOOL_TEXT,
    decimal.Decimal: '"%s"'.__mod__, uuid.UUID: '"%s"'.__mod__,
    dt.datetime: _json_quoted(dt.datetime.isoformat), dt.date: _json_quoted(dt.date.isoformat),
    dt.time: _json_quoted(dt.time.isoformat), bytes: _json_quoted(_b64),
}


class JsonLinesEncoder(Encoder):
    """One JSON object per line, built column by column like :class:`CsvEncoder`: each
    column becomes JSON text at once and a ``%`` template joins a row's fields."""

    content_type = "application/x-ndjson"
    extension = ".jsonl"

    def __init__(self, columns: Sequence[Any]) -> None:
        self.names = tuple(c.name for c in columns)
        self._kinds = [_kind(c.name, c.python_type, "jsonl") for c in columns]
        self._to_text = [_JSON_TEXT[k] for k in self._kinds]
        fields = ",".join(json.dumps(n, ensure_ascii=False).replace("%", "%%") + ":%s"
                          for n in self.names)
        self._template = "{" + fields + "}"

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes:
        columns = []
        by_column = zip(*rows, strict=True)
        for column, to_text, kind in zip(by_column, self._to_text, self._kinds, strict=True):
            text = _texts(column, to_text, "null")
            if kind is float and "n" in "".join(text).replace("null", ""):  # nan, inf
                bad = next(v for v in column if v is not None and not math.isfinite(v))
                raise FormatError(f"jsonl: the float {bad!r} has no JSON representation")
            columns.append(text)
        lines = map(self._template.__mod__, zip(*columns, strict=True))
        return ("\n".join(lines) + "\n").encode("utf-8")


def make_encoder(
    fmt: str, columns: Sequence[Any], csv_options: CsvOptions | None = None
) -> Encoder:
    """The encoder of ``fmt`` for ``columns``; refuses a type the format cannot hold."""
    if fmt == "csv":
        return CsvEncoder(columns, csv_options or CsvOptions())
    if fmt == "jsonl":
        return JsonLinesEncoder(columns)
    if fmt == "parquet":
        from shir.adapters.copy_parquet import ParquetEncoder

        return ParquetEncoder(columns)
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
