"""A real node runs the ``copy`` job kind: PostgreSQL (psqlODBC) to a blob on Azurite, the
database password and the storage connection string read from the node's credential store.

The database password (random for each test run) and the storage account key are the secrets
watched: neither may appear in the node's log, the job's history, the status output or the
runtime's store; they reach only the database and the storage service.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from node_helpers import cluster, shir, wait_for

from shir.adapters.credentials_cli import DataDir
from shir.adapters.node_host import job_id_for
from shir.adapters.odbc import format_connection_string, parse_connection_string

pytestmark = pytest.mark.services
FAST = ("--heartbeat-interval", "0.5", "--missed-heartbeats", "3", "--lock-duration", "10")


def test_a_node_runs_a_copy_job_with_credentials_from_its_store(
        tmp_path: Path, pg_odbc: str, azurite_connection_string: str) -> None:
    import pyodbc
    from azure.storage.blob import BlobServiceClient

    db = pyodbc.connect(pg_odbc, autocommit=True)
    try:
        db.execute("DROP TABLE IF EXISTS node_copy")
        db.execute("CREATE TABLE node_copy (id int PRIMARY KEY, s text)")
        db.execute("INSERT INTO node_copy SELECT g, md5(g::text) FROM generate_series(1, 500) g")
    finally:
        db.close()
    pairs = parse_connection_string(pg_odbc)
    password = pairs.pop("pwd")  # the secret: it lives only in the node's credential store
    source = format_connection_string(pairs)
    container, blob = f"node-copy-{uuid.uuid4().hex[:8]}", "rows.csv"
    home = tmp_path / "home-a"
    data = DataDir(home)
    store = data.store(data.protector())
    store.put("pg", 1, password.encode())
    store.put("storage", 1, azurite_connection_string.encode())
    spec = {"source": source, "credential": "pg", "format": "csv",
            "query": "SELECT id, s FROM node_copy ORDER BY id",
            "sink": {"container": container, "blob": blob, "credential": "storage"}}
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        c.start("a")
        wait_for("a Online", lambda: (n := c.state().node("a")) is not None
                 and n.status.value == "Online", 20)
        shir("job", "submit", "--store", c.store_url, "--kind", "copy", "--spec",
             json.dumps(spec), "--id", "copy-1")
        wait_for("the copy job completed", lambda: c.state().jobs.completed == 1, 90, poll_s=0.3)
        shown = shir("job", "show", "--store", c.store_url, "copy-1").stdout
        status = shir("status", "--store", c.store_url, "--json").stdout
    client = BlobServiceClient.from_connection_string(azurite_connection_string)
    body = client.get_blob_client(container, blob).download_blob().readall().decode()
    assert body.splitlines()[0] == "id,s" and len(body.splitlines()) == 501
    assert "completed" in shown and job_id_for("copy-1") in shown
    account_key = parse_connection_string(azurite_connection_string).get("accountkey", "")
    everything = ((tmp_path / "a.log").read_text() + shown + status
                  + (tmp_path / "rt.db").read_bytes().decode("latin-1"))
    for secret in (password, account_key):
        assert secret and secret not in everything
