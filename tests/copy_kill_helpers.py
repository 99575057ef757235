"""SIGKILL a `shir copy` mid-copy, check that nothing is visible, retry, compare bytes; and
SIGKILL a load in several transactions, check the table holds what the marker counts, retry,
compare rows.

Used by tests/test_copy.py and tests/test_copy_load.py (a few trials each) and
scripts/copy_kill_trials (20 trials).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

QUERY = "SELECT id, s, n, ts, b FROM copy_kill ORDER BY id"


def prepare(pg_odbc: str, rows: int = 250_000) -> None:
    """(Re)create the table the trials copy: mixed types with NULLs."""
    import pyodbc

    c = pyodbc.connect(pg_odbc, autocommit=True)
    c.execute("DROP TABLE IF EXISTS copy_kill")
    c.execute("CREATE TABLE copy_kill (id int PRIMARY KEY, s text, n numeric(18,4), "
              "ts timestamp, b bytea)")
    c.execute(
        "INSERT INTO copy_kill SELECT g, CASE WHEN g % 7 = 0 THEN NULL ELSE md5(g::text) END, "
        "CASE WHEN g % 5 = 0 THEN NULL ELSE (g * 1.2345)::numeric(18,4) END, "
        "timestamp '2020-01-01' + g * interval '1 second', "
        "CASE WHEN g % 3 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END "
        f"FROM generate_series(1, {int(rows)}) g"
    )
    c.close()


def _command(pg_odbc: str, blob: str, engine: str) -> list[str]:
    return [sys.executable, "-m", "shir.adapters.cli", "copy", "--source", pg_odbc,
            "--query", QUERY, "--sink", "blob", "--container", "copy-kill", "--blob", blob,
            "--format", "csv", "--part-size-kib", "64", "--quiet", "--job-id", f"kill-{blob}",
            "--engine", engine]


def _kill_once(proc: subprocess.Popen[bytes], ready: Any, rng: random.Random, *,
               max_delay_s: float, timeout_s: float) -> None:
    """SIGKILL ``proc`` a random moment (up to ``max_delay_s``) after ``ready()`` first holds,
    or when ``timeout_s`` passed; nothing if it exited first. Waits for it."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                time.sleep(rng.uniform(0, max_delay_s))
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def trial(pg_odbc: str, blob_conn: str, name: str, reference: bytes,
          rng: random.Random, engine: str = "auto") -> dict[str, Any]:
    """One trial of ``shir copy --engine ENGINE`` (auto: arrow when arrow-odbc is installed);
    returns what it saw. Raises AssertionError when a rule broke."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    env = {**os.environ, "SHIR_BLOB_CONNECTION_STRING": blob_conn}
    client = BlobServiceClient.from_connection_string(blob_conn).get_blob_client(
        "copy-kill", name)
    proc = subprocess.Popen(_command(pg_odbc, name, engine), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def staged() -> bool:
        try:
            return len(client.get_block_list("uncommitted")[1]) >= 1
        except ResourceNotFoundError:
            return False

    _kill_once(proc, staged, rng, max_delay_s=0.2, timeout_s=30)
    killed = proc.returncode == -signal.SIGKILL
    visible = True
    try:
        client.get_blob_properties()
    except ResourceNotFoundError:
        visible = False
    if visible:  # it committed before the kill landed: then it must be whole
        data = client.download_blob().readall()
        assert data == reference, f"{name}: a blob visible after SIGKILL is not the whole copy"
    killed = killed and not visible  # killed mid-copy, before the commit
    staged_before_retry = len(client.get_block_list("uncommitted")[1]) if not visible else 0
    retry = subprocess.run(_command(pg_odbc, name, engine), env=env, capture_output=True,
                           text=True, timeout=120)
    assert retry.returncode == 0, f"{name}: the retry failed: {retry.stderr[-500:]}"
    data = client.download_blob().readall()
    assert data == reference, f"{name}: the retried blob differs from the reference"
    return {"trial": name, "engine": engine, "killed": killed,
            "staged_blocks_at_kill": staged_before_retry, "bytes": len(data)}


def reference_bytes(pg_odbc: str, blob_conn: str) -> bytes:
    """The blob an uninterrupted copy writes (another job id and blob name), on the pyodbc
    engine: a trial on the arrow engine must also match it byte for byte."""
    from azure.storage.blob import BlobServiceClient

    env = {**os.environ, "SHIR_BLOB_CONNECTION_STRING": blob_conn}
    name = f"reference-{uuid.uuid4().hex[:8]}"  # a fresh job: not one an earlier run committed
    subprocess.run(_command(pg_odbc, name, "pyodbc"), env=env, check=True, capture_output=True,
                   timeout=120)
    return (BlobServiceClient.from_connection_string(blob_conn)
            .get_blob_client("copy-kill", name).download_blob().readall())


def load_source_file(pg_odbc: str, path: str) -> int:
    """Write ``QUERY``'s rows (the table of :func:`prepare`) to the CSV file ``path`` once;
    returns how many rows it holds."""
    from shir.adapters.copy import copy_query
    from shir.adapters.copy_sinks import FolderSink
    from shir.adapters.odbc import OdbcSource

    with OdbcSource(pg_odbc) as src:
        return copy_query(src, QUERY, FolderSink(path), "csv", f"load-source-{uuid.uuid4()}").rows


def load_trial(pg_odbc: str, path: str, rows: int, name: str, rng: random.Random,
               transaction_rows: int = 5_000) -> dict[str, Any]:
    """SIGKILL ``shir copy --from PATH --transaction-rows N`` once a transaction is committed,
    check that the table holds exactly the rows the marker counts, retry, and check the table
    equals ``copy_kill`` row for row (no duplicate, none missing). Raises AssertionError."""
    import pyodbc

    table = f"load_kill_{name.replace('-', '_')}"
    job = f"load-kill-{name}"
    c = pyodbc.connect(pg_odbc, autocommit=True)
    c.execute(f"DROP TABLE IF EXISTS {table}")
    c.execute(f"CREATE TABLE {table} (LIKE copy_kill)")  # no primary key: a duplicate would fit
    command = [sys.executable, "-m", "shir.adapters.cli", "copy", "--from", path, "--format",
               "csv", "--to", pg_odbc, "--table", table, "--transaction-rows",
               str(transaction_rows), "--job-id", job]

    def marker() -> tuple[int, bool]:
        found = c.execute("SELECT row_count, loaded_at FROM shir_load_marker WHERE job_id = ?",
                          job).fetchone()
        return (0, False) if found is None else (int(found[0]), found[1] is not None)

    def one_committed() -> bool:
        with contextlib.suppress(pyodbc.Error):  # the marker table may not exist yet
            return marker()[0] >= transaction_rows
        return False

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_once(proc, one_committed, rng, max_delay_s=0.5, timeout_s=60)
    committed, done = marker()
    in_table = c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    assert in_table == committed, (f"{name}: {in_table} rows in the table after the kill, the "
                                   f"marker says {committed}")
    killed = proc.returncode == -signal.SIGKILL and not done
    retry = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, f"{name}: the retry failed: {retry.stderr[-500:]}"
    if killed and committed:
        assert f"resumed after the {committed} rows" in retry.stdout, retry.stdout
    count = c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    differ = c.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {table} EXCEPT ALL SELECT * FROM copy_kill) "
        f"UNION ALL (SELECT * FROM copy_kill EXCEPT ALL SELECT * FROM {table})) x").fetchone()[0]
    assert (count, differ) == (rows, 0), f"{name}: {count} rows, {differ} differ after the retry"
    assert marker() == (rows, True)
    c.execute(f"DROP TABLE {table}")
    c.close()
    return {"trial": name, "killed": killed, "committed_at_kill": committed, "rows": count}
