"""Smoke tests of the real components the adapters stand on (started by scripts/test)."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

pytestmark = pytest.mark.services


def test_azurite_blob_round_trip(azurite_connection_string: str) -> None:
    blob = pytest.importorskip("azure.storage.blob")
    service = blob.BlobServiceClient.from_connection_string(azurite_connection_string)
    container = service.create_container(f"smoke-{uuid.uuid4().hex[:12]}")
    try:
        payload = os.urandom(1024 * 1024)
        container.upload_blob("one-megabyte.bin", payload)
        downloaded = container.download_blob("one-megabyte.bin").readall()
        assert len(downloaded) == len(payload)
        assert downloaded == payload
        assert [b.name for b in container.list_blobs()] == ["one-megabyte.bin"]
    finally:
        container.delete_container()
    assert container.container_name not in {c.name for c in service.list_containers()}


def test_postgresql_odbc_streams_rows(
    pg_odbc: str, require_odbc_driver: Callable[[str, str], None]
) -> None:
    pyodbc = pytest.importorskip("pyodbc")
    require_odbc_driver("PostgreSQL Unicode", "odbc-postgresql")
    start = dt.datetime(2024, 1, 1, 12, 0, 0)
    rows = [
        (
            i,
            Decimal(i) / 100 + Decimal("1000.05"),
            f"row {i} naïve ✓",
            start + dt.timedelta(seconds=i),
        )
        for i in range(2500)
    ]
    with pyodbc.connect(pg_odbc, autocommit=False) as conn:
        cur = conn.cursor()
        cur.execute(
            "CREATE TEMP TABLE smoke (id integer PRIMARY KEY, amount numeric(12, 2),"
            " label text, at timestamp)"
        )
        cur.executemany("INSERT INTO smoke (id, amount, label, at) VALUES (?, ?, ?, ?)", rows)
        cur.execute("SELECT count(*) FROM smoke")
        assert cur.fetchone()[0] == len(rows)

        cur.execute("SELECT id, amount, label, at FROM smoke ORDER BY id")
        seen: list[tuple[object, ...]] = []
        batches = 0
        while batch := cur.fetchmany(400):
            batches += 1
            seen.extend(tuple(r) for r in batch)
        assert batches == 7
        assert len(seen) == len(rows)
        assert seen == rows
        assert isinstance(seen[-1][1], Decimal)
        assert isinstance(seen[-1][3], dt.datetime)
        conn.rollback()


def test_sqlite_odbc_embedded(
    tmp_path: Path, require_odbc_driver: Callable[[str, str], None]
) -> None:
    pyodbc = pytest.importorskip("pyodbc")
    require_odbc_driver("SQLite3", "libsqliteodbc")
    database = tmp_path / "smoke.sqlite3"
    with pyodbc.connect(f"Driver={{SQLite3}};Database={database}", autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("CREATE TABLE smoke (id INTEGER PRIMARY KEY, amount NUMERIC, label TEXT)")
        cur.executemany(
            "INSERT INTO smoke (id, amount, label) VALUES (?, ?, ?)",
            [(i, i + 0.25, f"row {i} ✓") for i in range(100)],
        )
        cur.execute("SELECT id, amount, label FROM smoke ORDER BY id")
        seen = [tuple(r) for r in cur.fetchmany(1000)]
    assert len(seen) == 100
    assert seen[7] == (7, 7.25, "row 7 ✓")
    # The SQLite driver hands NUMERIC back as float, not Decimal: adapters must not assume Decimal.
    assert isinstance(seen[7][1], float)
    assert database.stat().st_size > 0
