"""Staged copy: PostgreSQL -> Azurite staging container -> PostgreSQL (and SQLite ODBC)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyodbc")
pytest.importorskip("azure.storage.blob")

from test_copy import _differences, pg  # noqa: F401 - pg: the fixture
from test_copy_sas import Sas, node_credentials, sas  # noqa: F401 - sas: the fixture

from shir.adapters.cli import main
from shir.adapters.copy_load import is_loaded
from shir.adapters.copy_sinks import BlobSink, SinkError, open_blob_service
from shir.adapters.copy_staged import StagedCopyError, staged_blob_name, staged_copy
from shir.adapters.odbc import OdbcSource, sqlite_connection_string

pytestmark = pytest.mark.services


def _staged_blobs(service: Any, container: str) -> list[str]:
    client = service.get_container_client(container)
    if not client.exists():  # a stage that failed before its first block never created it
        return []
    return [b.name for b in client.list_blobs(name_starts_with="shir-staging/")]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_staged_copy_lands_every_row_once_and_deletes_the_staged_blob(
    pg, pg_odbc: str, azurite_connection_string: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: Any, fmt: str,
) -> None:
    c, table = pg
    container = "staging-" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("SHIR_BLOB_CONNECTION_STRING", azurite_connection_string)
    command = ["copy", "--source", pg_odbc, "--query", f"SELECT * FROM {table} ORDER BY id",
               "--staging", "blob", "--container", container, "--to", pg_odbc,
               "--table", f"{table}_back", "--quiet", "--format", fmt]
    assert main(command) == 0
    assert "staged copy: 4 rows into" in capsys.readouterr().out
    service = open_blob_service(azurite_connection_string)
    assert _staged_blobs(service, container) == []  # cleaned up
    assert main(command) == 0  # the same job again: loaded already, nothing inserted
    assert "already loaded" in capsys.readouterr().out
    assert c.execute(f"SELECT count(*) FROM {table}_back").fetchone()[0] == 4
    assert _differences(c, table, f"{table}_back") == 0
    service.delete_container(container)


def test_a_failed_load_hop_commits_nothing_and_the_retry_loads_the_staged_blob(
    pg, pg_odbc: str, azurite_connection_string: str  # noqa: F811
) -> None:
    c, table = pg
    c.execute(f"CREATE TABLE {table}_keep AS SELECT * FROM {table}")  # to compare at the end
    c.execute(f"ALTER TABLE {table}_back ADD CONSTRAINT small CHECK (id < 4)")
    service = open_blob_service(azurite_connection_string)
    job = f"staged-{table}"
    staging = BlobSink(service, "staging", staged_blob_name(job, "parquet"))
    query = f"SELECT * FROM {table} ORDER BY id"
    try:
        with OdbcSource(pg_odbc) as src, OdbcSource(pg_odbc) as dst:
            with pytest.raises(StagedCopyError) as failed:
                staged_copy(src, query, staging, dst, f"{table}_back", "parquet", job)
            assert failed.value.hop == "load" and "hop 2 of 2" in str(failed.value)
            assert "23514" in str(failed.value)  # the CHECK violation, named
            assert c.execute(f"SELECT count(*) FROM {table}_back").fetchone()[0] == 0
            assert staging.client().get_blob_properties().metadata["shir_rows"] == "4"
            # fixed target; the source table is gone: the retry must load the staged blob
            c.execute(f"ALTER TABLE {table}_back DROP CONSTRAINT small")
            c.execute(f"ALTER TABLE {table} RENAME TO {table}_gone")
            done = staged_copy(src, query, staging, dst, f"{table}_back", "parquet", job)
            assert (done.staged_rows, done.loaded_rows, done.cleaned_up) == (0, 4, True)
            assert is_loaded(dst, job)
            again = staged_copy(src, query, staging, dst, f"{table}_back", "parquet", job)
            assert again.skipped and again.loaded_rows == 0
        assert _differences(c, f"{table}_keep", f"{table}_back") == 0
        with pytest.raises(Exception, match=r"BlobNotFound|does not exist|cannot read"):
            next(staging.download())
    finally:
        c.execute(f"ALTER TABLE IF EXISTS {table}_gone RENAME TO {table}")
        c.execute(f"DROP TABLE {table}_keep")


def test_a_failed_stage_hop_commits_nothing_anywhere(
    pg, pg_odbc: str, azurite_connection_string: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    capsys: Any,
) -> None:
    c, table = pg
    container = "staging-" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("SHIR_BLOB_CONNECTION_STRING", azurite_connection_string)
    assert main(["copy", "--source", pg_odbc, "--query", "SELECT * FROM no_such_table",
                 "--staging", "blob", "--container", container, "--to", pg_odbc,
                 "--table", f"{table}_back"]) == 2
    err = capsys.readouterr().err
    assert "hop 1 of 2 (source -> Blob sink" in err and "no_such_table" in err
    assert "Traceback" not in err
    service = open_blob_service(azurite_connection_string)
    assert _staged_blobs(service, container) == []
    assert c.execute(f"SELECT count(*) FROM {table}_back").fetchone()[0] == 0


def test_staging_through_a_container_sas_needs_delete_permission(
    pg, pg_odbc: str, sas: Sas, capsys: Any  # noqa: F811
) -> None:
    c, table = pg
    base = ["copy", "--source", pg_odbc, "--query", f"SELECT * FROM {table} ORDER BY id",
            "--to", pg_odbc, "--table", f"{table}_back", "--quiet", "--staging"]
    assert main([*base, sas.container_url("rw")]) == 2
    err = capsys.readouterr().err
    assert "does not grant delete permission" in err and f"{sas.container}/shir-staging/" in err
    url = sas.container_url("rwd").replace("?", "/nightly?")  # a path prefix in the container
    assert main([*base, url]) == 0
    out = capsys.readouterr()
    assert f"{sas.container}/nightly/shir-staging/" in out.out
    assert [b.name for b in sas.service.get_container_client(sas.container).list_blobs()] == []
    assert _differences(c, table, f"{table}_back") == 0
    sas.assert_not_in(out.out + out.err, "the output")


def test_staged_copy_between_sqlite_databases(
    require_odbc_driver: Any, tmp_path: Path, azurite_connection_string: str
) -> None:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    service = open_blob_service(azurite_connection_string)
    staging = BlobSink(service, "staging", staged_blob_name("sqlite", "csv"))
    with OdbcSource(sqlite_connection_string(tmp_path / "a.db")) as src, \
            OdbcSource(sqlite_connection_string(tmp_path / "b.db")) as dst:
        src.execute("CREATE TABLE t (id INTEGER, s TEXT, f REAL, b BLOB)")
        src.execute("INSERT INTO t VALUES (1, 'x', 1.25, x'00ff'), (2, '', NULL, NULL), "
                    "(3, NULL, -2.5, x'')")
        dst.execute("CREATE TABLE t (id INTEGER, s TEXT, f REAL, b BLOB)")
        done = staged_copy(src, "SELECT * FROM t ORDER BY id", staging, dst, "t", "csv",
                           "sqlite")
        assert (done.staged_rows, done.loaded_rows, done.cleaned_up) == (3, 3, True)
        assert list(dst.read("SELECT * FROM t ORDER BY id")) == list(
            src.read("SELECT * FROM t ORDER BY id"))
    with pytest.raises(SinkError):
        next(staging.download())


def test_a_staged_copy_job_runs_once_per_job_id_and_names_a_failed_hop(
    pg, pg_odbc: str, azurite_connection_string: str, tmp_path: Path  # noqa: F811
) -> None:
    from shir.adapters.copy_job import CopyJobError, run_copy_job

    c, table = pg
    resolve, odbc = node_credentials(tmp_path, pg_odbc, storage=azurite_connection_string)
    container = "staging-" + uuid.uuid4().hex[:8]
    spec = {"source": odbc, "credential": "pg", "query": f"SELECT * FROM {table} ORDER BY id",
            "staging": {"container": container, "credential": "storage"}, "target": odbc,
            "target_credential": "pg", "table": f"{table}_back", "format": "parquet"}
    c.execute(f"ALTER TABLE {table}_back ADD CONSTRAINT small CHECK (id < 4)")
    with pytest.raises(CopyJobError) as failed:
        run_copy_job(spec, job_id=f"job-{table}", delivery=1, resolve_credential=resolve)
    assert failed.value.part == "target" and "hop 2 of 2" in str(failed.value)
    assert c.execute(f"SELECT count(*) FROM {table}_back").fetchone()[0] == 0
    c.execute(f"ALTER TABLE {table}_back DROP CONSTRAINT small")
    done = run_copy_job(spec, job_id=f"job-{table}", delivery=2, resolve_credential=resolve)
    assert done.rows == 4 and not done.skipped
    assert run_copy_job(spec, job_id=f"job-{table}", delivery=3,
                        resolve_credential=resolve).skipped
    assert _differences(c, table, f"{table}_back") == 0
    service = open_blob_service(azurite_connection_string)
    assert _staged_blobs(service, container) == []
    service.delete_container(container)
