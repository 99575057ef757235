"""The copy's encoders against their own readers, on values chosen to trip the fast paths."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import random
import uuid

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
