"""The node host's ``copy`` job kind, called directly: spec, credentials, redelivery, errors."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from pathlib import Path

import pytest

pytest.importorskip("pyodbc")

from copy_kill_helpers import prepare

from shir.adapters.copy_job import CopyJobError, parse_copy_spec, run_copy_job, store_resolver
from shir.adapters.copy_sinks import open_blob_service
from shir.adapters.credstore import LocalCredentialStore
from shir.adapters.odbc import format_connection_string, parse_connection_string
from shir.adapters.protect import PortableProtector

QUERY = "SELECT id, s, n, ts, b FROM copy_kill ORDER BY id"


def _spec_error(raw) -> CopyJobError:
    with pytest.raises(CopyJobError) as info:
        parse_copy_spec(raw)
    assert info.value.part == "spec" and not info.value.retryable
    return info.value


def test_the_spec_is_validated_field_by_field() -> None:
    good = {"source": "Driver={PostgreSQL Unicode};Server=db;Uid=etl", "credential": "pg",
            "query": "SELECT 1", "sink": {"folder": "/tmp/x.csv"}, "format": "csv"}
    spec = parse_copy_spec(json.dumps(good).encode())
    assert spec.direction == "out" and spec.sink.path == "/tmp/x.csv"
    assert spec.odbc_credential == "pg" and spec.batch_rows == 10_000
    load = parse_copy_spec({"target": good["source"], "table": "t", "format": "parquet",
                            "from": {"container": "c", "blob": "b", "credential": "st"}})
    assert load.direction == "load" and load.sink.credential == "st"
    assert "not JSON" in str(_spec_error(b"{nope"))
    assert "larger than" in str(_spec_error(b" " * 70_000))
    assert "format" in str(_spec_error({**good, "format": "xml"}))
    with_password = {**good, "source": good["source"] + ";Pwd=hunter22"}
    message = str(_spec_error(with_password))
    assert "holds a password" in message and "hunter22" not in message
    assert "credential id" in str(_spec_error({**good, "credential": "../etc"}))
    assert "'query'" in str(_spec_error({**good, "query": ""}))
    assert "absolute" in str(_spec_error({**good, "sink": {"folder": "x.csv"}}))
    assert "'credential'" in str(_spec_error({**good, "sink": {"container": "c", "blob": "b"}}))
    assert "batch_rows" in str(_spec_error({**good, "batch_rows": 0}))
    assert "'csv'" in str(_spec_error({**good, "csv": {"sep": ";"}}))
    assert "not both" in str(_spec_error({**good, "table": "t"}))
    assert "needs 'query'" in str(_spec_error({"format": "csv"}))
    staged = {**good, "sink": None, "staging": {"container": "s", "credential": "st"},
              "target": good["source"], "table": "t"}
    del staged["sink"]
    assert parse_copy_spec(staged).direction == "staged"
    assert "not 'sink'" in str(_spec_error({**staged, "sink": good["sink"]}))
    assert "not a folder" in str(_spec_error({**staged, "staging": {"folder": "/tmp/s"}}))
    assert "holds a password" in str(_spec_error({**staged, "target": "Driver=x;Pwd=p"}))


@pytest.fixture
def node(tmp_path: Path, pg_odbc: str, azurite_connection_string: str):
    """A node's credential store holding the database password and the storage connection
    string, and the spec fields that name them (the source without its password)."""
    store = LocalCredentialStore(
        tmp_path / "credentials",
        PortableProtector(tmp_path / "protector.key", machine_id="m", user="svc"))
    pairs = parse_connection_string(pg_odbc)
    password = pairs.pop("pwd")
    store.put("pg-password", 1, password.encode())
    store.put("storage", 1, azurite_connection_string.encode())
    source = format_connection_string(pairs)
    return store, source, password


def _blob(azurite_connection_string: str, container: str, name: str):
    return open_blob_service(azurite_connection_string).get_blob_client(container, name)


def _exists(client) -> bool:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        client.get_blob_properties()
        return True
    except ResourceNotFoundError:
        return False


def test_a_redelivered_job_resumes_then_is_a_no_op_and_a_load_never_duplicates(
    node, pg_odbc: str, azurite_connection_string: str
) -> None:
    import pyodbc

    store, source, password = node
    prepare(pg_odbc, rows=20_000)
    name = f"job-{uuid.uuid4().hex[:8]}"
    spec = {"source": source, "credential": "pg-password", "query": QUERY, "format": "csv",
            "sink": {"container": "jobs", "blob": f"{name}.csv", "credential": "storage"},
            "part_size_bytes": 65_536, "batch_rows": 1_000}
    params = json.dumps(spec).encode()
    assert password not in params.decode()
    resolve = store_resolver(store)
    client = _blob(azurite_connection_string, "jobs", f"{name}.csv")

    lost = threading.Event()  # the lease is lost after some batches: delivery 1 stops

    def progress(p) -> None:
        if p.rows >= 8_000:
            lost.set()

    with pytest.raises(CopyJobError) as info:
        run_copy_job(params, job_id=name, delivery=1, resolve_credential=resolve,
                     progress=progress, cancel=lost)
    assert info.value.part == "cancelled" and info.value.retryable
    assert not _exists(client)  # nothing visible
    staged = len(client.get_block_list("uncommitted")[1])
    assert staged > 0

    seen = []
    done = run_copy_job(params, job_id=name, delivery=2, resolve_credential=resolve,
                        progress=seen.append)
    assert done.rows == 20_000 and not done.skipped and seen[-1].rows == 20_000
    props = client.get_blob_properties()
    assert props.metadata["shir_job_id"] == name and props.metadata["shir_delivery"] == "2"
    data = client.download_blob().readall()
    again = run_copy_job(params, job_id=name, delivery=3, resolve_credential=resolve)
    assert again.skipped and client.download_blob().readall() == data

    # the reference: the same query copied by another job in one go
    ref = run_copy_job({**spec, "sink": {**spec["sink"], "blob": f"{name}-ref.csv"}},
                       job_id=f"{name}-ref", delivery=1, resolve_credential=resolve)
    assert ref.md5_hex == done.md5_hex
    assert _blob(azurite_connection_string, "jobs", f"{name}-ref.csv").download_blob(
    ).readall() == data

    c = pyodbc.connect(pg_odbc, autocommit=True)
    c.execute(f"CREATE TABLE {name.replace('-', '_')} (LIKE copy_kill)")
    try:
        load = {"target": source, "credential": "pg-password", "format": "csv",
                "table": name.replace("-", "_"), "from": spec["sink"]}
        for delivery in (1, 2):
            run_copy_job(load, job_id=f"load-{name}", delivery=delivery,
                         resolve_credential=resolve)
        assert c.execute(f"SELECT count(*) FROM {name.replace('-', '_')}").fetchone()[0] \
            == 20_000
    finally:
        c.execute(f"DROP TABLE {name.replace('-', '_')}")
        c.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_each_bad_input_names_its_part_and_commits_nothing(
    node, tmp_path: Path, pg_odbc: str, azurite_connection_string: str
) -> None:
    store, source, password = node
    prepare(pg_odbc, rows=100)
    resolve = store_resolver(store)
    store.put("wrong", 1, b"not-the-password")
    store.put("bad-storage", 1, b"this is not a connection string")
    out = tmp_path / "o.csv"
    base = {"source": source, "credential": "pg-password", "query": QUERY, "format": "csv",
            "sink": {"folder": str(out)}}
    unreachable = format_connection_string(
        {**parse_connection_string(source), "port": str(_closed_port())})
    name = uuid.uuid4().hex[:8]
    cases = [
        ({**base, "credential": "wrong"}, "source", False),
        ({**base, "source": unreachable}, "source", True),
        ({**base, "credential": "missing"}, "credential", False),
        ({**base, "query": "SELECT * FROM no_such_table"}, "source", False),
        ({**base, "query": "SELECT 'NaN'::float8 AS f", "format": "jsonl"}, "format", False),
        ({**base, "query": "SELECT 'NaN'::numeric(9,2) AS n", "format": "parquet"}, "format",
         False),
        ({**base, "sink": {"folder": str(tmp_path / "no" / "o.csv")}}, "sink", True),
        ({**base, "sink": {"container": "jobs", "blob": "x", "credential": "bad-storage"}},
         "sink", True),
        ({**base, "sink": {"container": "Bad_Container!", "blob": f"{name}.csv",
                           "credential": "storage"}}, "sink", True),
        ({"target": source, "credential": "pg-password", "format": "csv",
          "table": "no_such_table", "from": {"folder": str(tmp_path / "missing.csv")}},
         "sink", False),
    ]
    for spec, part, retryable in cases:
        with pytest.raises(CopyJobError) as info:
            run_copy_job(spec, job_id=f"bad-{name}", delivery=1, resolve_credential=resolve)
        message = str(info.value)
        assert info.value.part == part, message
        assert info.value.retryable == retryable, message
        assert password not in message and "not-the-password" not in message
        assert "Eby8vdM02x" not in message  # the storage key
        assert list(tmp_path.glob("o.csv*")) == [] and not out.exists()
    out.write_text("a\r\n1\r\n")
    with pytest.raises(CopyJobError) as info:
        run_copy_job({"target": source, "credential": "pg-password", "format": "csv",
                      "table": "no_such_table", "from": {"folder": str(out)}},
                     job_id=f"bad-{name}", delivery=1, resolve_credential=resolve)
    assert info.value.part == "target" and "no_such_table" in str(info.value)
