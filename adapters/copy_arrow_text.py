"""Text from Arrow record batches: the Arrow engine's CSV and JSON lines encoders.

Each column of a batch becomes text at once with Arrow compute kernels, and one element-wise
join makes the lines, so no Python object is made per value except where a rare value needs it
(a JSON string with a control character). They write the same bytes as the pyodbc engine's
:class:`~shir.adapters.copy_formats.CsvEncoder` and
:class:`~shir.adapters.copy_formats.JsonLinesEncoder`, except floats: Arrow's shortest text
(``100``, ``-0``, ``0.00001``) where Python's ``repr`` writes ``100.0``, ``-0.0``, ``1e-05``,
the same double read back (tests/test_copy_formats.py compares them).

The batches are what :class:`~shir.adapters.copy_arrow.ArrowStream` yields: numeric as the
driver's text (the schema the encoder is built with says ``decimal128(p, s)``), a
``timestamptz`` column as a naive timestamp in UTC (the schema says ``tz=UTC``).
"""

from __future__ import annotations

import array
import binascii
import codecs
import datetime as dt
import decimal
import functools
import itertools
import json
from collections.abc import Sequence
from typing import Any

from shir.adapters.copy_formats import ALPHABETS, CsvEncoder, CsvOptions, Encoder, FormatError
from shir.adapters.copy_parquet import load_pyarrow

__all__ = ["ArrowCsvEncoder", "ArrowJsonLinesEncoder"]


def _compute() -> tuple[Any, Any]:
    pa = load_pyarrow()
    import pyarrow.compute as pc

    return pa, pc


def _strings(pa: Any, texts: Sequence[bytes]) -> Any:
    """A string array of UTF-8 ``texts``, built from buffers: converting Python values with
    ``pa.array`` or ``pa.scalar`` imports pandas when it is installed (about 50 MB)."""
    offsets = array.array("i", itertools.accumulate(map(len, texts), initial=0))
    return pa.StringArray.from_buffers(len(texts), pa.py_buffer(offsets.tobytes()),
                                       pa.py_buffer(b"".join(texts)))


def _base64(pa: Any, column: Any) -> Any:
    """Standard base64 of each value of a binary array, as a string array (nulls kept), in a
    few vectorised steps: each value is zero-padded to a multiple of 3 bytes, so the base64 of
    all of them at once is the values' base64 texts end to end; then each padded value's last
    one or two characters become ``=``. About 7x cheaper than a Python call per value."""
    import numpy as np

    n = len(column)
    if column.offset:  # a slice: its buffers start before it
        column = pa.concat_arrays([column])
    validity, offsets, values = column.buffers()
    wide = pa.types.is_large_binary(column.type)
    ends = np.frombuffer(offsets, np.int64 if wide else np.int32, n + 1)
    lengths = np.diff(ends)
    data = np.frombuffer(values, np.uint8, int(ends[-1]))[int(ends[0]):] if n else \
        np.zeros(0, np.uint8)
    if column.null_count:  # a null slot may hold bytes: drop them
        # from the validity bitmap: a boolean array's to_numpy imports pandas (about 50 MB)
        valid = np.unpackbits(np.frombuffer(validity, np.uint8), count=n,
                              bitorder="little").astype(bool)
        if lengths[~valid].any():
            data = data[np.repeat(valid, lengths)]
            lengths = np.where(valid, lengths, 0)
    pad = -lengths % 3
    if pad.any():  # each value moves right by the padding of the values before it
        padded = np.zeros(len(data) + int(pad.sum()), np.uint8)
        padded[np.arange(len(data)) + np.repeat(np.cumsum(pad) - pad, lengths)] = data
        data = padded
    text = np.frombuffer(bytearray(binascii.b2a_base64(data.data, newline=False)), np.uint8)
    text_ends = np.cumsum((lengths + pad) // 3 * 4)
    text[text_ends[pad == 2] - 2] = ord("=")
    text[text_ends[pad > 0] - 1] = ord("=")
    text_offsets = np.zeros(n + 1, np.int32)
    text_offsets[1:] = text_ends
    return pa.StringArray.from_buffers(n, pa.py_buffer(text_offsets), pa.py_buffer(text),
                                       validity if column.null_count else None,
                                       column.null_count)


# The kind whose text each Arrow type's text is, for the characters it can hold
# (copy_formats.ALPHABETS; Arrow's float text is as narrow as repr's): numeric is the driver's
# text, timestamps and times as str writes them, bytes base64.
_KINDS = (
    ("is_integer", int), ("is_floating", float), ("is_decimal", decimal.Decimal),
    ("is_boolean", bool), ("is_date32", dt.date), ("is_timestamp", dt.datetime),
    ("is_time", dt.time), ("is_binary", bytes), ("is_large_binary", bytes),
)


class ArrowCsvEncoder(CsvEncoder):
    """RFC 4180 from record batches, the same bytes as :class:`CsvEncoder` except floats.

    Each column becomes text with Arrow kernels (timestamps and times without a ``.000000``
    fraction, as Python's ``str`` writes them; bytes as base64, vectorised: :func:`_base64`);
    values that need quoting are quoted, checked only in columns whose text can need it; one
    element-wise join makes the lines. Floats are Arrow's shortest text (``100``, ``-0``,
    ``0.00001``) where Python's ``repr`` writes ``100.0``, ``-0.0``, ``1e-05``: the same double
    read back.
    """

    def __init__(self, schema: Any, options: CsvOptions) -> None:
        self._pa, self._pc = _compute()
        pa = self._pa
        self.options = options
        self.names = list(schema.names)
        self._schema = schema
        self._specials = (options.delimiter, options.quote, "\r", "\n")  # for header()
        self._encode = codecs.getincrementalencoder(options.encoding)().encode
        self._utf8 = codecs.lookup(options.encoding).name == "utf-8"
        texts = (options.quote, "", options.null, options.delimiter, "\r\n", "+00:00")
        (self._quote, self._empty_text, self._null, self._delimiter, self._crlf,
         self._utc) = _strings(pa, [t.encode() for t in texts])  # scalars, see _strings
        self._needs_quote = "[" + "".join("\\" + c if c in "\\]^-" else c
                                          for c in (options.delimiter, options.quote)) + "\r\n]"
        self._checks = [self._quoting_checks(field.type) for field in schema]

    def _quoting_checks(self, t: Any) -> tuple[bool, bool, bool]:
        """Which checks a column of type ``t`` needs: (specials, empty text, the null text)."""
        pa, o = self._pa, self.options
        kind = next((k for test, k in _KINDS if getattr(pa.types, test)(t)), str)
        alphabet = ALPHABETS[kind]
        if alphabet is None:  # text: anything
            return True, True, bool(o.null)
        specials = any(c in alphabet for c in (o.delimiter, o.quote))
        empty = pa.types.is_binary(t) or pa.types.is_large_binary(t)  # b"" is ""
        null = bool(o.null) and set(o.null) <= set(alphabet)
        return specials, empty, null

    def _column_text(self, column: Any) -> Any:
        pa, pc = self._pa, self._pc
        t = column.type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return _base64(pa, column)
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return column
        if pa.types.is_timestamp(t) or pa.types.is_time(t):
            return _whole_seconds_text(pa, pc, column)
        return pc.cast(column, pa.string())

    def encode(self, rows: Any) -> bytes:
        pc = self._pc
        o = self.options
        texts = []
        for column, field, (specials, empty, null) in zip(rows.columns, self._schema,
                                                          self._checks, strict=True):
            text = self._column_text(column)
            if getattr(field.type, "tz", None):  # an instant, in UTC: its offset after it
                text = pc.binary_join_element_wise(text, self._empty_text, self._utc)
            masks = []
            if specials:
                masks.append(pc.match_substring_regex(text, self._needs_quote))
            if empty:
                masks.append(pc.equal(text, self._empty_text))
            if null:  # a value that reads as NULL
                masks.append(pc.equal(text, self._null))
            if masks:
                mask = functools.reduce(pc.or_, masks)
                if pc.any(mask).as_py():
                    quoted = pc.binary_join_element_wise(
                        self._quote, pc.replace_substring(text, o.quote, o.quote * 2),
                        self._quote, self._empty_text)
                    text = pc.if_else(mask, quoted, text)
            texts.append(text)
        # the line break joins the last column (its NULL as the null text): one pass less over
        # whole lines than joining it after them
        texts[-1] = pc.binary_join_element_wise(
            pc.fill_null(texts[-1], self._null), self._crlf, self._empty_text)
        lines = pc.binary_join_element_wise(*texts, self._delimiter, null_handling="replace",
                                            null_replacement=o.null)
        data = _buffer_bytes(lines)
        if self._utf8:
            return data
        try:
            return self._encode(str(data, "utf-8"))
        except UnicodeEncodeError as exc:
            raise FormatError(
                f"csv: a text value has a character that {o.encoding} cannot encode "
                f"({exc.reason}); choose another encoding (e.g. utf-8)") from None


class ArrowJsonLinesEncoder(Encoder):
    """One JSON object per line from record batches (see the module docs): numbers bare,
    numeric, dates, times and base64 bytes as strings, NULL as ``null``; a float that JSON
    cannot hold (NaN, infinity) is a :class:`FormatError`."""

    content_type = "application/x-ndjson"
    extension = ".jsonl"

    def __init__(self, schema: Any) -> None:
        self._pa, self._pc = _compute()
        pa = self._pa
        self.names = list(schema.names)
        self._schema = schema
        # the literal text around the values: {"id": ... ,"s": ... }\n
        keys = [json.dumps(n, ensure_ascii=False) + ":" for n in self.names]
        pieces = ["{" + keys[0], *("," + k for k in keys[1:]), "}\n"]
        self._pieces = list(_strings(pa, [p.encode() for p in pieces]))  # scalars: _strings
        self._quote, self._empty, self._utc = _strings(pa, [b'"', b"", b"+00:00"])
        self._needs_escape = "[\\x00-\\x1f\\\\\"]"  # what encode_basestring escapes

    def _column_json(self, column: Any, field: Any) -> Any:
        pa, pc = self._pa, self._pc
        t = column.type
        if pa.types.is_integer(t) or pa.types.is_boolean(t):
            return pc.cast(column, pa.string())
        if pa.types.is_floating(t):
            bad = pc.and_(pc.is_valid(column), pc.invert(pc.is_finite(column)))
            if pc.any(bad).as_py():
                value = pc.filter(column, bad)[0].as_py()
                raise FormatError(f"jsonl: the float {value!r} has no JSON representation")
            return pc.cast(column, pa.string())
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            if pa.types.is_decimal(field.type):  # numeric: the driver's digits, as a string
                return self._quoted(column)
            return self._json_strings(column)
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return self._quoted(_base64(pa, column))
        if not (pa.types.is_timestamp(t) or pa.types.is_time(t)):  # a date
            return self._quoted(pc.cast(column, pa.string()))
        text = _whole_seconds_text(pa, pc, column)
        if pa.types.is_timestamp(t):  # ISO 8601 with T, as datetime.isoformat writes
            text = pc.replace_substring(text, " ", "T", max_replacements=1)
            if getattr(field.type, "tz", None):
                text = pc.binary_join_element_wise(text, self._empty, self._utc)
        return self._quoted(text)

    def _quoted(self, text: Any) -> Any:
        return self._pc.binary_join_element_wise(self._quote, text, self._quote, self._empty)

    def _json_strings(self, column: Any) -> Any:
        """JSON strings, escaped as :func:`json.encoder.encode_basestring` does; only values
        with a quote, a backslash or a control character go through it, one by one."""
        pa, pc = self._pa, self._pc
        text = self._quoted(column)
        # NULL rows: false (Kleene logic; fill_null(False) would build a scalar from a Python
        # value, and pyarrow imports pandas to do that)
        escape = pc.and_kleene(pc.match_substring_regex(column, self._needs_escape),
                               pc.is_valid(column))
        if pc.any(escape).as_py():
            fixed = [json.encoder.encode_basestring(v).encode()
                     for v in pc.filter(column, escape).to_pylist()]
            text = pc.replace_with_mask(text, escape, _strings(pa, fixed))
        return text

    def encode(self, rows: Any) -> bytes:
        values = [self._column_json(c, f) for c, f in zip(rows.columns, self._schema,
                                                         strict=True)]
        parts = [p for pair in zip(self._pieces, values, strict=False) for p in pair]
        lines = self._pc.binary_join_element_wise(
            *parts, self._pieces[-1], self._empty, null_handling="replace",
            null_replacement="null")
        return _buffer_bytes(lines)


def _whole_seconds_text(pa: Any, pc: Any, column: Any) -> Any:
    """A timestamp or time column as text, whole seconds without a fraction (``00:00:01``,
    ``00:00:01.500000``), as Python's ``str`` and ``isoformat`` write them."""
    t = column.type
    whole = pc.cast(column, pa.timestamp("s", t.tz) if pa.types.is_timestamp(t)
                    else pa.time32("s"), safe=False)
    text = pc.cast(whole, pa.string())
    fraction = pc.not_equal(pc.cast(whole, t), column)
    if pc.any(fraction).as_py():
        text = pc.if_else(fraction, pc.cast(column, pa.string()), text)
    return text


def _buffer_bytes(lines: Any) -> bytes:
    """The bytes of a string array's values, end to end (its lines), in one copy."""
    _, offsets, values = lines.buffers()
    bounds = memoryview(offsets).cast("i")  # int32 offsets: one past each line's end
    return memoryview(values)[bounds[lines.offset]:bounds[lines.offset + len(lines)]].tobytes()
