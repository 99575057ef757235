"""The copy's encoders against their own readers, on values chosen to trip the fast paths."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import random
import uuid
from typing import Any

import attrs
import pytest

pytest.importorskip("pyodbc")

from shir.adapters.copy_formats import (
    CsvOptions,
    FormatError,
    decoder_for,
    make_encoder,
    read_records,
)
from shir.adapters.odbc import Column

COLUMNS = (
    Column("id", int, 10, 0, False), Column("s", str, None, None, True),
    Column("n", decimal.Decimal, 18, 4, True), Column("ts", dt.datetime, None, None, True),
    Column("b", bytearray, None, None, True), Column("f", float, None, None, True),
    Column("ok", bool, None, None, True), Column("d", dt.date, None, None, True),
    Column("t", dt.time, None, None, True), Column("u", uuid.UUID, None, None, True),
)
# Values that look like what the encoders use inside: their NULL stand-ins, the null texts,
# quotes, delimiters, line breaks, empty text and bytes, the smallest dates.
TRICKY = {
    "s": ["", "\\N", "NULL", "None", "null", "\x00shir:null\x00", 'a,"b"\r\nc', ";'|", " x ",
          "é€\U0001f600", "\x00", "AHNoaXI6bnVsbAA="],
    "n": [decimal.Decimal("0.0001"), decimal.Decimal("-99999999999999.9999"),
          decimal.Decimal("1.2300")],
    "ts": [dt.datetime.min, dt.datetime(2024, 2, 29, 23, 59, 59, 999999)],
    "b": [b"", b"\x00shir:null\x00", b"\x00\xff", bytes(range(256))],
    "f": [0.0, -0.0, 1e300, 5e-324],
    "ok": [True, False],
    "d": [dt.date.min, dt.date(9999, 12, 31)],
    "t": [dt.time.min, dt.time(23, 59, 59, 1)],
    "u": [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)],
}


def _rows(seed: int, n: int) -> list[tuple]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row: list = [i]
        for c in COLUMNS[1:]:
            row.append(None if rng.random() < 0.3 else rng.choice(TRICKY[c.name]))
        rows.append(tuple(row))
    return rows


def _expected(rows: list[tuple]) -> list[tuple]:
    # uuid goes out as text; the reader gives text back for it
    return [(*r[:-1], None if r[-1] is None else str(r[-1])) for r in rows]


def _decode(records, columns=COLUMNS) -> list[tuple]:
    decoders = [decoder_for(c.python_type) for c in columns]
    return [tuple(None if v is None else d(v) for d, v in zip(decoders, r, strict=True))
            for r in records]


@pytest.mark.parametrize("options", [
    CsvOptions(), CsvOptions(delimiter=";", quote="'", encoding="utf-16", null="\\N"),
    CsvOptions(delimiter=".", null="NULL"), CsvOptions(delimiter="+", null="None"),
    # null texts that a number or a boolean writes: those values must be quoted
    CsvOptions(null="1"), CsvOptions(null="true"), CsvOptions(null="2024-02-29"),
])
@pytest.mark.parametrize("seed", range(4))
def test_csv_reads_back_what_it_wrote(options: CsvOptions, seed: int) -> None:
    rows = _rows(seed, 300)
    encoder = make_encoder("csv", COLUMNS, options)
    data = encoder.header() + b"".join(encoder.encode(rows[i:i + 50]) for i in range(0, 300, 50))
    names, records = read_records(io.BytesIO(data), "csv", options)
    assert names == tuple(c.name for c in COLUMNS)
    assert _decode(records) == _expected(rows)


@pytest.mark.parametrize("seed", range(4))
def test_json_lines_read_back_what_they_wrote(seed: int) -> None:
    rows = _rows(seed, 300)
    encoder = make_encoder("jsonl", COLUMNS)
    data = b"".join(encoder.encode(rows[i:i + 50]) for i in range(0, 300, 50))
    names, records = read_records(io.BytesIO(data), "jsonl")
    assert names == tuple(c.name for c in COLUMNS)
    assert _decode(records) == _expected(rows)


def test_csv_keeps_a_one_column_null_apart_from_empty_text() -> None:
    encoder = make_encoder("csv", [Column("s", str, None, None, True)])
    assert encoder.encode([("",), (None,), ("x",)]) == b'""\r\n\r\nx\r\n'
    encoder = make_encoder("csv", [Column("b", bytes, None, None, True)])
    assert encoder.encode([(b"",), (None,)]) == b'""\r\n\r\n'


def test_json_refuses_floats_it_cannot_hold() -> None:
    encoder = make_encoder("jsonl", [Column("f", float, None, None, True)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(FormatError, match="no JSON representation"):
            encoder.encode([(1.0,), (None,), (bad,)])


def test_parquet_holds_every_type_and_null() -> None:
    pytest.importorskip("pyarrow")
    from shir.adapters.copy_parquet import ParquetEncoder, read_parquet_records

    rows = _rows(7, 500)
    encoder = ParquetEncoder(COLUMNS, row_group_rows=120)
    data = b"".join(encoder.encode(rows[i:i + 50]) for i in range(0, 500, 50)) + encoder.finish()
    names, records = read_parquet_records(io.BytesIO(data))
    assert names == tuple(c.name for c in COLUMNS)
    assert [tuple(r) for r in records] == _expected(rows)


def test_parquet_refuses_what_it_cannot_hold_exactly() -> None:
    pytest.importorskip("pyarrow")
    from shir.adapters.copy_formats import UnsupportedType
    from shir.adapters.copy_parquet import ParquetEncoder

    with pytest.raises(UnsupportedType, match=r"column 'n'.*NUMERIC"):
        ParquetEncoder([Column("n", decimal.Decimal, None, None, True)])
    encoder = ParquetEncoder([Column("n", decimal.Decimal, 5, 2, True)])
    with pytest.raises(FormatError, match="column 'n'"):
        encoder.encode([(decimal.Decimal("1.234"),)])


ARROW_CSV_OPTIONS = [
    CsvOptions(), CsvOptions(delimiter=";", quote="'", null="\\N"),
    # delimiters, quotes and null texts that non-text values can hold: their checks must run
    CsvOptions(delimiter="-", quote="0", null="1"), CsvOptions(delimiter="A", quote="+"),
    CsvOptions(delimiter=":", quote="=", null="true"), CsvOptions(delimiter=" ", null="2024"),
]


def _arrow_batch(seed: int, n: int) -> tuple[list[Any], list[tuple], Any, Any]:
    """Columns, rows of tricky values (bytes of every length around base64's 3-byte groups,
    timestamps and times with and without a fraction) and the same rows as a record batch as
    arrow-odbc gives it (numeric as the driver's text), with the schema the encoders get."""
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("numpy")
    columns = [c for c in COLUMNS if c.name not in ("f", "u")]  # floats differ; uuid: pyodbc
    rng = random.Random(seed)
    tricky = {**TRICKY, "b": [*TRICKY["b"], *(rng.randbytes(k) for k in range(1, 12))],
              "ts": [*TRICKY["ts"], dt.datetime(1969, 12, 31, 23, 59, 59, 999999),
                     dt.datetime(2020, 1, 1, 0, 0, 1)],
              "t": [*TRICKY["t"], dt.time(0, 0, 1), dt.time(12, 0, 0, 500000)],
              "s": [*TRICKY["s"], 'q"uote', "back\\slash", "\x1f\t\x08\x0c", "\u2028"]}
    rows = [(i, *(None if rng.random() < 0.3 else rng.choice(tricky[c.name])
                  for c in columns[1:])) for i in range(n)]
    types = {"id": pa.int32(), "s": pa.string(), "n": pa.string(), "ts": pa.timestamp("us"),
             "b": pa.binary(), "ok": pa.bool_(), "d": pa.date32(), "t": pa.time64("us")}
    batch = pa.record_batch(
        [pa.array([None if r[k] is None else str(r[k]) if c.name == "n" else r[k]
                   for r in rows], types[c.name]) for k, c in enumerate(columns)],
        names=[c.name for c in columns])
    described = pa.schema([pa.field(c.name, pa.decimal128(18, 4) if c.name == "n"
                                    else types[c.name]) for c in columns])
    return columns, rows, batch, described


SLICES = ((0, 400), (0, 1), (3, 40), (17, 399))  # offsets into the batch's buffers


@pytest.mark.parametrize("options", ARROW_CSV_OPTIONS, ids=range(len(ARROW_CSV_OPTIONS)))
def test_the_arrow_csv_encoder_writes_the_pyodbc_encoders_bytes(options: CsvOptions) -> None:
    """The arrow engine's vectorised text (base64, timestamps without a zero fraction, quoting
    checked only where a kind's text can need it) against the pyodbc engine's encoder."""
    from shir.adapters.copy_arrow_text import ArrowCsvEncoder

    columns, rows, batch, described = _arrow_batch(11, 400)
    arrow = ArrowCsvEncoder(described, options)
    pyodbc = make_encoder("csv", columns, options)
    assert arrow.header() == pyodbc.header()
    for start, stop in SLICES:
        assert arrow.encode(batch.slice(start, stop - start)) == pyodbc.encode(
            rows[start:stop]), (options, start, stop)


@pytest.mark.parametrize("seed", range(3))
def test_the_arrow_json_lines_encoder_writes_the_pyodbc_encoders_bytes(seed: int) -> None:
    """JSON strings escaped as json.encoder does (quotes, backslashes, control characters),
    ISO 8601 with T, numeric and bytes as strings, NULL as null; and odd column names."""
    pa = pytest.importorskip("pyarrow")
    from shir.adapters.copy_arrow_text import ArrowJsonLinesEncoder

    columns, rows, batch, described = _arrow_batch(seed, 400)
    names = [c.name if c.name != "s" else 'we"ird %s\\né' for c in columns]
    columns = [attrs.evolve(c, name=n) for n, c in zip(names, columns, strict=True)]
    batch = pa.record_batch(batch.columns, names=names)
    described = pa.schema([f.with_name(n) for f, n in zip(described, names, strict=True)])
    arrow = ArrowJsonLinesEncoder(described)
    pyodbc = make_encoder("jsonl", columns)
    for start, stop in SLICES:
        assert arrow.encode(batch.slice(start, stop - start)) == pyodbc.encode(
            rows[start:stop]), (start, stop)
    data = arrow.encode(batch)
    names_back, records = read_records(io.BytesIO(data), "jsonl")
    assert list(names_back) == names and len(list(records)) == 400


def test_the_arrow_json_lines_encoder_refuses_what_json_cannot_hold() -> None:
    pa = pytest.importorskip("pyarrow")
    from shir.adapters.copy_arrow_text import ArrowJsonLinesEncoder

    encoder = ArrowJsonLinesEncoder(pa.schema([("f", pa.float64())]))
    assert encoder.encode(pa.record_batch([pa.array([1.5, None, -0.0])], names=["f"])) == \
        b'{"f":1.5}\n{"f":null}\n{"f":-0}\n'
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(FormatError, match="no JSON representation"):
            encoder.encode(pa.record_batch([pa.array([1.0, None, bad])], names=["f"]))


def test_vectorised_base64_matches_pythons_on_any_binary_array() -> None:
    """Lengths around the 3-byte groups, NULLs, null slots that still hold bytes (Arrow allows
    it), slices and 64-bit offsets."""
    pa = pytest.importorskip("pyarrow")
    np = pytest.importorskip("numpy")
    import binascii

    from shir.adapters.copy_arrow_text import _base64

    rng = random.Random(5)
    for _ in range(500):
        values = [None if rng.random() < 0.2 else rng.randbytes(rng.randrange(12))
                  for _ in range(rng.randrange(40))]
        a = pa.array(values, pa.binary())
        if values and rng.random() < 0.3:  # every slot two bytes long, NULL or not
            a = pa.Array.from_buffers(
                pa.binary(), len(a), [a.buffers()[0],
                                      pa.py_buffer(np.arange(len(a) + 1, dtype=np.int32) * 2),
                                      pa.py_buffer(rng.randbytes(2 * len(a)))],
                null_count=a.null_count)
        if len(a) > 3 and rng.random() < 0.5:
            a = a.slice(rng.randrange(3))
        if rng.random() < 0.2:
            a = a.cast(pa.large_binary())
        want = [None if v is None else binascii.b2a_base64(v, newline=False).decode()
                for v in a.to_pylist()]
        assert _base64(pa, a).to_pylist() == want


def test_the_arrow_encoders_never_import_pandas() -> None:
    """pyarrow imports pandas (about 50 MB of peak RSS) to turn a Python value into an Arrow
    scalar or a boolean array into numpy; the encoders must never take such a path. A fresh
    interpreter records every attempt to import pandas (installed or not) while they run."""
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("numpy")
    import subprocess
    import sys

    _, _, batch, described = _arrow_batch(3, 300)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    schema = pa.BufferOutputStream()
    with pa.ipc.new_stream(schema, described) as writer:
        pass
    child = """
import sys
import pyarrow as pa
data, schema = sys.stdin.buffer.read().split(b"--schema--")
batch = pa.ipc.open_stream(data).read_next_batch()
described = pa.ipc.open_stream(schema).schema
from shir.adapters.copy_arrow import ArrowParquetEncoder
from shir.adapters.copy_arrow_text import ArrowCsvEncoder, ArrowJsonLinesEncoder
from shir.adapters.copy_formats import CsvOptions
tried = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pandas":
            tried.append(name)
        return None
sys.meta_path.insert(0, Watch())
for options in (CsvOptions(), CsvOptions(null="1", delimiter="-")):
    ArrowCsvEncoder(described, options).encode(batch)
ArrowJsonLinesEncoder(described).encode(batch)
parquet = ArrowParquetEncoder(described)
parquet.encode(batch)
parquet.finish()
print(sorted(set(tried)) or "none")
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120,
                         input=sink.getvalue().to_pybytes() + b"--schema--"
                         + schema.getvalue().to_pybytes())
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "none"
