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
import functools
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
    "naive_utc",
    "read_records",
    "value_kind",
]

FORMATS = ("csv", "jsonl", "parquet")
#: How a copy fetches rows (shir.adapters.copy_arrow.open_source): arrow-odbc, pyodbc, or auto.
ENGINES = ("auto", "arrow", "pyodbc")


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


def value_kind(name: str, python_type: type, fmt: str) -> type:
    """The supported kind of column ``name``'s values (``bytearray`` counts as ``bytes``);
    ``UnsupportedType`` naming the column, its type and ``fmt`` for any other type."""
    for t in _SUPPORTED:
        if issubclass(python_type, t):
            return bytes if t is bytearray else t
    raise UnsupportedType(
        f"column {name!r}: its type {python_type.__name__} cannot be written as {fmt}; cast it "
        "in the query (e.g. CAST(x AS VARCHAR)) or leave it out. Nothing was written."
    )


@attrs.frozen
class _Form:
    """How one kind of value becomes text, as C functions applied in turn over a whole column.

    NULL is replaced by ``stand_in`` first (None itself when every step takes None: ``str(None)``
    is ``'None'``, which no int, numeric, float or date/time has as text), and the text of the
    stand-in (``marker``) is then mapped to the format's NULL, all without a Python frame per
    value. ``unique``: no real value has the marker as text; when not, a column that holds the
    stand-in itself takes the slow, exact path.
    """

    steps: tuple[Callable[[Any], Any], ...]
    stand_in: Any = None
    unique: bool = True

    @property
    def marker(self) -> str:
        value = self.stand_in
        for step in self.steps:
            value = step(value)
        return str(value)

    def texts(self, column: Sequence[Any], null: str,
              fixes: dict[str, str] | None = None) -> Sequence[Any]:
        """``column`` as text, NULL as ``null``, then any text in ``fixes`` replaced."""
        has_null = None in column
        if has_null and not self.unique and self.stand_in in column:
            fix = (fixes or {}).get
            return [null if v is None else fix(t := self._one(v), t) for v in column]
        values: Iterable[Any] = column
        if has_null and self.stand_in is not None:
            values = map({None: self.stand_in}.get, column, column)
        for step in self.steps:
            values = map(step, values)
        texts = list(values)
        if has_null:
            fixes = {**(fixes or {}), self.marker: null}
        return texts if not fixes else list(map(fixes.get, texts, texts))

    def _one(self, value: Any) -> str:
        for step in self.steps:
            value = step(value)
        return str(value)


_B64 = (functools.partial(binascii.b2a_base64, newline=False), bytes.decode)
_NULL_BYTES = b"\x00shir:null\x00"  # stands for NULL in a bytes column while it is encoded
_NULL_TEXT = "\x00shir:null\x00"  # the same in a text column (JSON)
_BOOL_TEXT = {True: "true", False: "false", None: "None"}.__getitem__
_JSON_QUOTE = '"%s"'.__mod__

_CSV_FORMS: dict[type, _Form] = {
    int: _Form((str,)), decimal.Decimal: _Form((str,)), float: _Form((repr,)),
    bool: _Form((_BOOL_TEXT,)), uuid.UUID: _Form((str,)), dt.datetime: _Form((str,)),
    dt.date: _Form((str,)), dt.time: _Form((str,)),
    bytes: _Form(_B64, _NULL_BYTES, unique=False),
}
# JSON: numbers bare, numeric as a string (a JSON number would come back as a float), the
# date/time types as ISO 8601 strings with "T".
_JSON_FORMS: dict[type, _Form] = {
    int: _Form((repr,)), float: _Form((repr,)), bool: _Form((_BOOL_TEXT,)),
    decimal.Decimal: _Form((_JSON_QUOTE,)), uuid.UUID: _Form((_JSON_QUOTE,)),
    dt.datetime: _Form((dt.datetime.isoformat, _JSON_QUOTE), dt.datetime.min, unique=False),
    dt.date: _Form((dt.date.isoformat, _JSON_QUOTE), dt.date.min, unique=False),
    dt.time: _Form((dt.time.isoformat, _JSON_QUOTE), dt.time.min, unique=False),
    bytes: _Form((*_B64, _JSON_QUOTE), _NULL_BYTES, unique=False),
    str: _Form((json.encoder.encode_basestring,), _NULL_TEXT, unique=False),
}
# A timestamp column of instants (Column.time_zone "UTC": naive values in UTC) gets its offset.
_CSV_ZONED = _Form((str, "%s+00:00".__mod__))
_JSON_ZONED = _Form((dt.datetime.isoformat, '"%s+00:00"'.__mod__), dt.datetime.min, unique=False)
#: The characters each kind's CSV text can hold (None: anything), on both engines: a column
#: whose alphabet misses the delimiter, the quote and the null text never needs quoting, so it
#: is never scanned. (numeric: ``NaN`` and ``Infinity`` as both engines write them.)
ALPHABETS: dict[type, str | None] = {
    int: "-0123456789", decimal.Decimal: "-+.0123456789EINaNfinity",
    float: "-+.0123456789einfa", bool: "truefals", uuid.UUID: "-0123456789abcdef",
    dt.datetime: "-+:. 0123456789", dt.date: "-0123456789", dt.time: "-+:.0123456789",
    bytes: "+/=0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", str: None,
}


def _zoned(column: Any, kind: type) -> bool:
    """Whether ``column`` holds instants (see ``Column.time_zone``), which get their offset."""
    zone = getattr(column, "time_zone", None)
    if zone is None or kind is not dt.datetime:
        return False
    if zone != "UTC":
        raise UnsupportedType(f"column {column.name!r}: timestamps in zone {zone!r}; the copy "
                              "writes instants in UTC only")
    return True


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
        self._forms: list[_Form | None] = []  # None: text, passed through
        self._scan: list[bool] = []  # may this column's text need quoting?
        specials = {options.delimiter, options.quote, "\r", "\n"}
        for c in columns:
            kind = value_kind(c.name, c.python_type, "csv")
            self._forms.append(_CSV_ZONED if _zoned(c, kind) else _CSV_FORMS.get(kind))
            alphabet = ALPHABETS[kind]
            # scanned too when its text can equal the null text (`--null 1`: a 1 is quoted)
            self._scan.append(alphabet is None or any(ch in alphabet for ch in specials)
                              or (bool(options.null) and set(options.null) <= set(alphabet)))
        self._specials = tuple(specials)
        # empty bytes are text "" and need quotes to differ from NULL
        self._empty = {"": options.quote * 2}
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
        for values, form, scan in zip(by_column, self._forms, self._scan, strict=True):
            column: Sequence[Any] = values
            if form is not None and not scan:
                column = form.texts(column, null, self._empty)
            else:  # quote first: a value equal to the null text is quoted, NULL is not
                if form is not None:
                    column = form.texts(column, "\x00")
                    column = list(map({"\x00": None}.get, column, column))
                column = self._quoted(column, null)
                if None in column:
                    column = list(map({None: null}.get, column, column))
            columns.append(column)
        return self._text(map(self.options.delimiter.join, zip(*columns, strict=True)))

    def _quoted(self, column: Sequence[Any], null: str) -> Sequence[Any]:
        """``column`` with every value that needs it quoted (None stays None)."""
        probe = "\x1f".join(filter(None, column))  # non-empty values only, in C
        if not (any(ch in probe for ch in self._specials) or "" in column
                or (null and null in column)):
            return column
        specials, q = self._specials, self.options.quote
        return [v if v is None else q + v.replace(q, q + q) + q
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


class JsonLinesEncoder(Encoder):
    """One JSON object per line, built column by column like :class:`CsvEncoder`: each
    column becomes JSON text at once and a ``%`` template joins a row's fields."""

    content_type = "application/x-ndjson"
    extension = ".jsonl"

    def __init__(self, columns: Sequence[Any]) -> None:
        self.names = tuple(c.name for c in columns)
        self._kinds = [value_kind(c.name, c.python_type, "jsonl") for c in columns]
        self._forms = [_JSON_ZONED if _zoned(c, k) else _JSON_FORMS[k]
                       for c, k in zip(columns, self._kinds, strict=True)]
        fields = ",".join(json.dumps(n, ensure_ascii=False).replace("%", "%%") + ":%s"
                          for n in self.names)
        self._template = "{" + fields + "}"

    def encode(self, rows: Sequence[Sequence[Any]]) -> bytes:
        columns = []
        by_column = zip(*rows, strict=True)
        for column, form, kind in zip(by_column, self._forms, self._kinds, strict=True):
            text = form.texts(column, "null")
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


def naive_utc(value: Any) -> Any:
    """A ``datetime`` with an offset as UTC wall time without ``tzinfo`` (what pyodbc binds: it
    drops ``tzinfo``; the load's PostgreSQL session is in UTC); anything else unchanged."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def _parse_datetime(v: str) -> dt.datetime:
    return naive_utc(dt.datetime.fromisoformat(v))  # type: ignore[no-any-return]


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
