"""Blob URLs with SAS tokens as the copy's sinks and sources, against Azurite and PostgreSQL.

The SAS tokens are generated here with the Azurite account's key; the signature is the secret
that must never show up in output, logs, errors or reprs.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import pytest

pytest.importorskip("pyodbc")
pytest.importorskip("azure.storage.blob")

from test_copy import _differences, pg  # noqa: F401 - pg: the fixture

from shir.adapters.cli import main
from shir.adapters.copy import copy_query
from shir.adapters.copy_sinks import BlobSink, BlobUrl, SinkError, open_blob_service
from shir.adapters.odbc import OdbcSource

pytestmark = pytest.mark.services


class Sas:
    """Makes SAS URLs for blobs of one Azurite container and remembers every signature."""

    def __init__(self, connection_string: str) -> None:
        self.service = open_blob_service(connection_string)
        self.container = "sas-" + uuid.uuid4().hex[:8]
        self.service.create_container(self.container)
        self.signatures: list[str] = []

    def blob_url(self, blob: str, permission: str, *, expires_in_s: float = 3600,
                 signed_for: str | None = None) -> str:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        token = generate_blob_sas(
            self.service.account_name, self.container, signed_for or blob,
            account_key=self.service.credential.account_key,
            permission=BlobSasPermissions.from_string(permission),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in_s),
            start=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        self.signatures.append(dict(parse_qsl(token))["sig"])
        return f"{self.service.url.rstrip('/')}/{self.container}/{quote(blob)}?{token}"

    def container_url(self, permission: str) -> str:
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        token = generate_container_sas(
            self.service.account_name, self.container,
            account_key=self.service.credential.account_key,
            permission=ContainerSasPermissions.from_string(permission),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        self.signatures.append(dict(parse_qsl(token))["sig"])
        return f"{self.service.url.rstrip('/')}/{self.container}?{token}"

    def forms(self) -> list[str]:
        """Each signature as it could leak: as is, URL-quoted, and its first 16 characters."""
        return [f for sig in self.signatures for f in (sig, quote(sig, safe=""), sig[:16])]

    def assert_not_in(self, text: str, where: str) -> None:
        for form in self.forms():
            assert form not in text, f"a SAS signature leaked into {where}: {text!r}"

    def blob(self, name: str) -> Any:
        return self.service.get_blob_client(self.container, name)

    def nothing_written(self, name: str) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            committed, uncommitted = self.blob(name).get_block_list("all")
        except ResourceNotFoundError:
            return True
        return not committed and not uncommitted


@pytest.fixture
def sas(azurite_connection_string: str) -> Iterator[Sas]:
    made = Sas(azurite_connection_string)
    yield made
    made.service.delete_container(made.container)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # the SDK's HTTP logging too
    return caplog


def test_copy_out_and_load_back_through_sas_urls_shows_no_signature(
    pg, pg_odbc: str, sas: Sas, all_logs: pytest.LogCaptureFixture, capsys: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, table = pg
    sink_url = sas.blob_url("out/rows.csv", "rw")
    query = f"SELECT * FROM {table} ORDER BY id"
    assert main(["copy", "--source", pg_odbc, "--query", query, "--sink", sink_url,
                 "--format", "csv", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "copied 4 rows" in out.out
    assert f"devstoreaccount1/{sas.container}/out/rows.csv" in out.out
    assert "SAS token in --sink is visible" in out.err  # on the command line: warned
    props = sas.blob("out/rows.csv").get_blob_properties()
    assert props.metadata["shir_rows"] == "4"
    # the same command again: the same job id, found committed
    assert main(["copy", "--source", pg_odbc, "--query", query, "--sink", sink_url,
                 "--format", "csv", "--quiet"]) == 0
    assert "already copied" in capsys.readouterr().out
    # the load reads the URL from the environment (no warning) with a read-only SAS
    monkeypatch.setenv("ROWS_URL", sas.blob_url("out/rows.csv", "r"))
    for _ in range(2):  # the second is a retried load: no rows added
        assert main(["copy", "--from", "env:ROWS_URL", "--format", "csv", "--to", pg_odbc,
                     "--table", f"{table}_back"]) == 0
    out2 = capsys.readouterr()
    assert "loaded 4 rows" in out2.out and "already loaded" in out2.out
    assert "SAS" not in out2.err
    assert _differences(c, table, f"{table}_back") == 0
    sink = BlobSink.from_url(sink_url)
    reprs = repr(sink) + repr(BlobUrl.parse(sink_url))
    for where, text in [("stdout", out.out + out2.out), ("stderr", out.err + out2.err),
                        ("logs", all_logs.text), ("repr", reprs), ("describe", sink.describe()),
                        ("attributes", repr(vars(sink)))]:
        sas.assert_not_in(text, where)
    assert len(all_logs.records) > 0  # the SDK did log its requests: they were searched


def test_a_sas_without_write_permission_is_refused_naming_the_sink_and_permission(
    pg_odbc: str, sas: Sas, all_logs: pytest.LogCaptureFixture, capsys: Any
) -> None:
    read_only = sas.blob_url("ro.csv", "r")
    assert main(["copy", "--source", pg_odbc, "--query", "SELECT 1 AS x", "--sink", read_only,
                 "--format", "csv"]) == 2
    err = capsys.readouterr().err
    assert f"Blob sink devstoreaccount1/{sas.container}/ro.csv" in err
    assert "does not grant write permission" in err and "Traceback" not in err
    assert sas.nothing_written("ro.csv")
    sas.assert_not_in(err + all_logs.text, "the refusal")


def test_the_service_refusing_a_sas_is_a_sink_error_and_commits_nothing(
    pg_odbc: str, sas: Sas, all_logs: pytest.LogCaptureFixture
) -> None:
    cases = [
        # read-only, past our own check: the service refuses the first block
        (BlobSink.from_url(sas.blob_url("a.csv", "r"), permissions=""), "a.csv",
         "does not grant the permission"),
        # signed for another blob
        (BlobSink.from_url(sas.blob_url("b.csv", "rw", signed_for="other.csv")), "b.csv",
         "refused"),
        # expired
        (BlobSink.from_url(sas.blob_url("c.csv", "rw", expires_in_s=-60)), "c.csv",
         "refused"),
    ]
    with OdbcSource(pg_odbc) as src:
        for sink, name, expected in cases:
            with pytest.raises(SinkError) as caught:
                copy_query(src, "SELECT generate_series(1, 1000) AS x", sink, "csv",
                           f"refused-{name}", part_size_bytes=1024)
            message = str(caught.value)
            assert sink.describe() in message and expected in message, message
            assert sas.nothing_written(name)
            sas.assert_not_in(message + repr(caught.value.args), "the error")
    sas.assert_not_in(all_logs.text, "logs")


def test_an_unreachable_blob_url_names_the_sink_and_hides_the_signature(
    pg_odbc: str, sas: Sas, all_logs: pytest.LogCaptureFixture
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    url = sas.blob_url("x.csv", "rw").replace(sas.service.url.split("/")[2], f"127.0.0.1:{port}")
    sink = BlobSink.from_url(url, retry_total=0)  # the SDK's default retries take a minute
    with OdbcSource(pg_odbc) as src, pytest.raises(SinkError) as caught:
        copy_query(src, "SELECT 1 AS x", sink, "csv", "unreachable")
    assert sink.describe() in str(caught.value)
    with pytest.raises(SinkError, match="cannot read it") as read:
        next(sink.download())
    for text in (str(caught.value), str(read.value), all_logs.text):
        sas.assert_not_in(text, "an error or the logs")


def test_blob_url_parsing() -> None:
    u = BlobUrl.parse("https://acct.blob.core.windows.net/landing/2024/01/o%20k.csv?sp=rw&sig=s")
    assert (u.account_url, u.container, u.blob, u.permissions()) == (
        "https://acct.blob.core.windows.net", "landing", "2024/01/o k.csv", "rw")
    a = BlobUrl.parse("http://127.0.0.1:10000/devstoreaccount1/c/b.parquet")
    assert (a.account_url, a.container, a.blob, a.sas) == (
        "http://127.0.0.1:10000/devstoreaccount1", "c", "b.parquet", None)
    assert "sig=s" not in repr(u)
    for bad in ("ftp://x/c/b", "https:///c/b", "https://acct.blob.core.windows.net/"):
        with pytest.raises(SinkError):
            BlobUrl.parse(bad)
    with pytest.raises(SinkError, match="names a container, not a blob"):
        BlobSink.from_url("https://acct.blob.core.windows.net/c?sp=rw&sig=s")


def node_credentials(folder: Path, pg_odbc: str, **secrets: str) -> tuple[Any, str]:
    """A node's credential store holding the database password as ``pg`` and ``secrets``;
    returns (its resolver, the connection string without the password)."""
    from shir.adapters.copy_job import store_resolver
    from shir.adapters.credstore import LocalCredentialStore
    from shir.adapters.odbc import format_connection_string, parse_connection_string
    from shir.adapters.protect import PortableProtector

    store = LocalCredentialStore(folder / "credentials",
                                 PortableProtector(folder / "key", machine_id="m", user="svc"))
    pairs = parse_connection_string(pg_odbc)
    store.put("pg", 1, pairs.pop("pwd").encode())
    for name, secret in secrets.items():
        store.put(name, 1, secret.encode())
    return store_resolver(store), format_connection_string(pairs)


def test_a_copy_job_takes_sas_urls_from_the_credential_store(
    pg, pg_odbc: str, sas: Sas, tmp_path: Path, all_logs: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    from shir.adapters.copy_job import CopyJobError, run_copy_job

    c, table = pg
    resolve, odbc = node_credentials(
        tmp_path, pg_odbc,
        landing=sas.container_url("rw"),  # a container SAS: the blob's name in the spec
        rows=sas.blob_url("job/rows.parquet", "r"),  # a blob SAS alone
        ro=sas.container_url("r"))
    out = {"source": odbc, "credential": "pg", "query": f"SELECT * FROM {table} ORDER BY id",
           "format": "parquet", "sink": {"blob": "job/rows.parquet", "credential": "landing"}}
    assert run_copy_job(out, job_id=f"sas-{table}", delivery=1, resolve_credential=resolve
                        ).rows == 4
    assert sas.blob("job/rows.parquet").get_blob_properties().metadata["shir_delivery"] == "1"
    load = {"target": odbc, "credential": "pg", "table": f"{table}_back", "format": "parquet",
            "from": {"credential": "rows"}}
    for delivery in (1, 2):
        run_copy_job(load, job_id=f"sas-load-{table}", delivery=delivery,
                     resolve_credential=resolve)
    assert _differences(c, table, f"{table}_back") == 0
    refusals = [
        ({**out, "sink": {"blob": "x.parquet", "credential": "ro"}}, "sink",
         "does not grant write permission"),
        ({**out, "sink": {"credential": "landing"}}, "spec", "give 'blob'"),
        ({**out, "sink": {"container": "c", "blob": "x", "credential": "rows"}}, "spec",
         "leave those out"),
    ]
    for spec, part, expected in refusals:
        with pytest.raises(CopyJobError) as caught:
            run_copy_job(spec, job_id="refused", delivery=1, resolve_credential=resolve)
        assert caught.value.part == part and expected in str(caught.value), caught.value
        sas.assert_not_in(str(caught.value), "a job error")
    assert sas.nothing_written("x.parquet")
    sas.assert_not_in(all_logs.text, "logs")
