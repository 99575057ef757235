"""Loads in several transactions against real PostgreSQL: resumed after SIGKILL and cancel,
never a duplicate or a missing row; a cancel between batches; a file that changed."""

from __future__ import annotations

import io
import random
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyodbc")

from copy_kill_helpers import load_source_file, load_trial, prepare

from shir.adapters.copy_load import LoadCancelled, LoadError, is_loaded, load_file
from shir.adapters.odbc import OdbcSource

pytestmark = pytest.mark.services

ROWS = 30_000


@pytest.fixture(scope="module")
def source_file(pg_odbc: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    prepare(pg_odbc, rows=ROWS)
    path = tmp_path_factory.mktemp("load") / "rows.csv"
    return path, load_source_file(pg_odbc, str(path))


@pytest.fixture
def target(pg_odbc: str):
    import pyodbc

    c = pyodbc.connect(pg_odbc, autocommit=True)
    table = "load_" + uuid.uuid4().hex[:8]
    c.execute(f"CREATE TABLE {table} (LIKE copy_kill)")  # no primary key: duplicates would fit
    yield c, table
    c.execute(f"DROP TABLE {table}")
    c.close()


def _count(c: Any, table: str) -> int:
    return int(c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _equal_to_source(c: Any, table: str) -> bool:
    return c.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {table} EXCEPT ALL SELECT * FROM copy_kill) "
        f"UNION ALL (SELECT * FROM copy_kill EXCEPT ALL SELECT * FROM {table})) x"
    ).fetchone()[0] == 0


def test_sigkill_mid_load_then_retry_leaves_every_row_once(
    pg_odbc: str, source_file: tuple[Path, int]
) -> None:
    path, rows = source_file
    rng = random.Random(7)
    name = uuid.uuid4().hex[:6]
    results = [load_trial(pg_odbc, str(path), rows, f"{name}-{i}", rng, transaction_rows=3_000)
               for i in range(2)]
    assert any(r["killed"] and r["committed_at_kill"] for r in results), results


class _CancelAfter(io.RawIOBase):
    """A file that sets ``event`` once ``limit`` bytes of it were read."""

    def __init__(self, path: Path, limit: int, event: threading.Event) -> None:
        self._file = path.open("rb")
        self._limit, self._event, self._read = limit, event, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._file.readinto(buffer)
        self._read += n
        if self._read >= self._limit:
            self._event.set()
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def test_a_cancel_between_batches_rolls_back_only_the_transaction_in_progress(
    pg_odbc: str, source_file: tuple[Path, int], target: Any
) -> None:
    path, rows = source_file
    c, table = target
    size = path.stat().st_size
    with OdbcSource(pg_odbc) as dst:
        cancel = threading.Event()
        with pytest.raises(LoadCancelled, match="rolled back"):
            load_file(dst, table, _CancelAfter(path, size // 2, cancel), "csv", f"one-txn-{table}",
                      batch_rows=1_000, cancel=cancel)
        assert _count(c, table) == 0 and not is_loaded(dst, f"one-txn-{table}")  # one transaction
        cancel = threading.Event()
        with pytest.raises(LoadCancelled):
            load_file(dst, table, _CancelAfter(path, size // 2, cancel), "csv", f"txns-{table}",
                      batch_rows=1_000, transaction_rows=7_000, cancel=cancel)
        kept = _count(c, table)
        assert kept > 0 and kept % 7_000 == 0  # whole transactions only
        with path.open("rb") as f:
            done = load_file(dst, table, f, "csv", f"txns-{table}", batch_rows=1_000,
                             transaction_rows=7_000)
        assert (done.resumed_from, done.rows) == (kept, rows - kept)
        assert is_loaded(dst, f"txns-{table}")
        with path.open("rb") as f:
            assert load_file(dst, table, f, "csv", f"txns-{table}", transaction_rows=7_000).skipped
    assert _count(c, table) == rows and _equal_to_source(c, table)


def test_a_retry_with_a_shorter_file_is_refused(
    pg_odbc: str, source_file: tuple[Path, int], target: Any, tmp_path: Path
) -> None:
    path, _ = source_file
    c, table = target
    short = tmp_path / "short.csv"
    short.write_bytes(b"".join(path.open("rb").readlines()[:2_001]))  # header + 2,000 rows
    with OdbcSource(pg_odbc) as dst:
        cancel = threading.Event()
        with pytest.raises(LoadCancelled):
            load_file(dst, table, _CancelAfter(path, path.stat().st_size // 2, cancel), "csv",
                      f"shrunk-{table}", batch_rows=1_000, transaction_rows=5_000, cancel=cancel)
        kept = _count(c, table)
        with short.open("rb") as f, pytest.raises(LoadError, match="fewer records"):
            load_file(dst, table, f, "csv", f"shrunk-{table}", transaction_rows=5_000)
    assert _count(c, table) == kept  # nothing more loaded


def test_a_load_racing_another_attempt_of_its_job_fails_instead_of_doubling(
    pg_odbc: str, source_file: tuple[Path, int], target: Any
) -> None:
    from shir.adapters.copy_load import _Marker

    path, rows = source_file
    c, table = target
    with OdbcSource(pg_odbc) as dst:
        cancel = threading.Event()
        with pytest.raises(LoadCancelled):
            load_file(dst, table, _CancelAfter(path, path.stat().st_size // 3, cancel), "csv",
                      f"race-{table}", batch_rows=1_000, transaction_rows=4_000, cancel=cancel)
        # another attempt reads the marker, then this one moves it on
        cursor = dst._connection.cursor()
        stale = _Marker(cursor, f"race-{table}", table)
        with path.open("rb") as f:
            load_file(dst, table, f, "csv", f"race-{table}", transaction_rows=4_000)
        with pytest.raises(LoadError, match="another attempt"):
            stale.advance(1, done=False)
        dst._connection.rollback()
        cursor.close()
    assert _count(c, table) == rows and _equal_to_source(c, table)
