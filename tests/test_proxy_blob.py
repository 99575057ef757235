"""The node's proxy applied to the Blob clients: the event store and the copy activity's sink.

Against Azurite, through the test forward proxy (tests/fwdproxy.py) on loopback, which records
what reached it: in ``custom`` and ``system`` modes every request goes through it with the
right Proxy-Authorization; ``none`` never touches it even with the proxy variables set; a wrong
proxy password gives an error that names the proxy and never the password.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("azure.storage.blob")

from fwdproxy import PASSWORD, USER, ForwardProxy, basic, sealed_custom

from shir.adapters.copy_sinks import BlobSink, SinkError, open_blob_service
from shir.adapters.protect import PortableProtector
from shir.adapters.proxy import (
    ClientProxy,
    ProxyError,
    client_proxy,
    load_home_proxy,
    save_home_proxy,
    seal_proxy_settings,
)
from shir.adapters.stores import open_store
from shir.core.proxy import ProxyMode, ProxySettings
from shir.core.store import StoreError

EVENTS = 5


def _store_url(connection_string: str) -> str:
    return f"{connection_string.rstrip(';')};Container=px-{uuid.uuid4().hex[:10]}"


def _blob_port(connection_string: str) -> int:
    endpoint = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
    return urlsplit(endpoint["BlobEndpoint"]).port or 0


def _append_and_read(url: str, proxy: ClientProxy | None) -> None:
    from shir.core.events import NodeLeft

    store = open_store(url, proxy=proxy)
    try:
        for i in range(EVENTS):
            store.append("rt", [NodeLeft(f"n{i}", float(i))], i)
        assert len(store.read("rt")) == EVENTS
    finally:
        store.close()


def _through(proxy: ForwardProxy, connection_string: str, auth: str) -> list[str]:
    seen = proxy.seen
    assert seen, "nothing went through the proxy"
    port = _blob_port(connection_string)
    assert all(s.host_port == ("127.0.0.1", port) for s in seen)
    assert all(s.authorization == auth and s.allowed for s in seen)
    return [s.method for s in seen]


def test_the_blob_store_goes_through_a_custom_proxy_with_its_credentials(
    azurite_connection_string: str, proxy: ForwardProxy, protector: PortableProtector,
    clean_env: pytest.MonkeyPatch,
) -> None:
    _append_and_read(_store_url(azurite_connection_string), sealed_custom(protector, proxy.port))
    methods = _through(proxy, azurite_connection_string, basic(USER, PASSWORD))
    assert methods.count("PUT") >= EVENTS  # every append (Append Block) went through it


def test_the_blob_store_goes_through_the_system_proxy_named_by_the_environment(
    azurite_connection_string: str, proxy: ForwardProxy, protector: PortableProtector,
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("HTTP_PROXY", proxy.url_for())
    system = client_proxy(ProxySettings(ProxyMode.SYSTEM), protector)
    assert PASSWORD not in repr(system) and PASSWORD not in system.describe()
    assert system.describe() == f"system proxy 127.0.0.1:{proxy.port}"
    _append_and_read(_store_url(azurite_connection_string), system)
    assert _through(proxy, azurite_connection_string, basic(USER, PASSWORD)).count("PUT") >= 5


def test_the_system_proxy_honours_no_proxy(
    azurite_connection_string: str, proxy: ForwardProxy, protector: PortableProtector,
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("HTTP_PROXY", proxy.url)
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    _append_and_read(_store_url(azurite_connection_string),
                     client_proxy(ProxySettings(ProxyMode.SYSTEM), protector))
    assert proxy.seen == []


def test_no_proxy_ignores_the_proxy_variables(
    azurite_connection_string: str, proxy: ForwardProxy, protector: PortableProtector,
    clean_env: pytest.MonkeyPatch,
) -> None:
    proxy.name_in_every_variable(clean_env)
    _append_and_read(_store_url(azurite_connection_string),
                     client_proxy(ProxySettings(), protector))
    assert proxy.seen == []
    # the control: without the node's setting, the SDK does read them
    _append_and_read(_store_url(azurite_connection_string), None)
    assert proxy.seen


def test_a_wrong_proxy_password_names_the_proxy_never_the_password(
    azurite_connection_string: str, proxy: ForwardProxy, protector: PortableProtector,
    clean_env: pytest.MonkeyPatch,
) -> None:
    wrong = "canary-wrong-" + uuid.uuid4().hex
    with pytest.raises(StoreError) as info:
        open_store(_store_url(azurite_connection_string), retry_total=0,
                   proxy=sealed_custom(protector, proxy.port, wrong))
    message = str(info.value)
    assert f"custom proxy 127.0.0.1:{proxy.port}" in message and "407" in message
    assert "shir node proxy" in message
    assert wrong not in message and PASSWORD not in message and USER not in message
    assert proxy.seen and not any(s.allowed for s in proxy.seen)

    with pytest.raises(SinkError) as sink_info:
        _sink(azurite_connection_string, sealed_custom(protector, proxy.port, wrong)
              ).open("job-1")
    assert f"custom proxy 127.0.0.1:{proxy.port}" in str(sink_info.value)
    assert "407" in str(sink_info.value) and wrong not in str(sink_info.value)


def test_an_unreachable_proxy_is_named(
    azurite_connection_string: str, protector: PortableProtector, clean_env: pytest.MonkeyPatch,
) -> None:
    with ForwardProxy() as gone:
        port = gone.port  # a loopback port nothing listens on once it is stopped
    with pytest.raises(StoreError) as info:
        open_store(_store_url(azurite_connection_string), retry_total=0,
                   proxy=sealed_custom(protector, port))
    message = str(info.value)
    assert f"through the custom proxy 127.0.0.1:{port}" in message and PASSWORD not in message


def _sink(connection_string: str, proxy: ClientProxy, blob: str = "out.bin") -> BlobSink:
    service = open_blob_service(connection_string, proxy)
    return BlobSink(service, f"px-{uuid.uuid4().hex[:10]}", blob, via=proxy.describe())


def _write(sink: BlobSink, parts: int = 3) -> bytes:
    writer = sink.open("job-" + uuid.uuid4().hex[:8])
    data = b""
    for i in range(parts):
        chunk = bytes([i]) * 70_000
        data += chunk
        writer.put(i, chunk, hashlib.md5(data).digest())
    writer.commit(hashlib.md5(data).digest(), parts)
    return data


@pytest.mark.parametrize("mode", ["custom", "system"])
def test_the_copy_sink_goes_through_the_proxy(
    mode: str, azurite_connection_string: str, proxy: ForwardProxy,
    protector: PortableProtector, clean_env: pytest.MonkeyPatch,
) -> None:
    if mode == "custom":
        cp = sealed_custom(protector, proxy.port)
    else:
        clean_env.setenv("HTTP_PROXY", proxy.url_for())
        cp = client_proxy(ProxySettings(ProxyMode.SYSTEM), protector)
    sink = _sink(azurite_connection_string, cp)
    data = _write(sink)
    seen = proxy.seen
    _through(proxy, azurite_connection_string, basic(USER, PASSWORD))
    assert sum("comp=block&" in s.target for s in seen) == 3  # each part staged through it
    assert any("comp=blocklist" in s.target for s in seen)
    direct = open_blob_service(azurite_connection_string)  # read back without the proxy
    assert direct.get_blob_client(sink.container, sink.blob).download_blob().readall() == data


def test_the_home_keeps_the_sealed_setting(tmp_path: Path, protector: PortableProtector) -> None:
    home = tmp_path / "home"
    assert load_home_proxy(home) == ProxySettings()  # nothing kept: no proxy
    sealed = seal_proxy_settings(protector, ProxyMode.CUSTOM, "proxy.contoso.com", 3128, USER,
                                 PASSWORD)
    save_home_proxy(home, sealed)
    raw = (home / "proxy.settings").read_bytes()
    assert PASSWORD.encode() not in raw and USER.encode() not in raw
    assert (home / "proxy.settings").stat().st_mode & 0o077 == 0
    assert load_home_proxy(home) == sealed
    (home / "proxy.settings").write_bytes(b"\x00garbage")
    with pytest.raises(ProxyError, match="delete it and set the proxy again"):
        load_home_proxy(home)
    other = PortableProtector(tmp_path / "other.key", machine_id="m2", user="svc")
    with pytest.raises(ProxyError, match="cannot be opened on this machine") as info:
        client_proxy(sealed, other)
    assert PASSWORD not in str(info.value)


def test_client_options_for_each_mode(protector: PortableProtector) -> None:
    custom = sealed_custom(protector, 3128)
    assert PASSWORD not in repr(custom) and USER not in repr(custom)
    options = custom.blob_options()
    assert options["use_env_settings"] is False
    assert options["proxies"]["https"] == f"http://{USER}:{PASSWORD}@127.0.0.1:3128"
    assert ClientProxy().blob_options() == {"use_env_settings": False}
    assert ClientProxy(ProxySettings(ProxyMode.SYSTEM)).blob_options() == {
        "use_env_settings": True}
    odd = client_proxy(seal_proxy_settings(protector, ProxyMode.CUSTOM, "::1", 8080, "a@b",
                                           "p:w/d"), protector)
    assert odd.blob_options()["proxies"]["http"] == "http://a%40b:p%3Aw%2Fd@[::1]:8080"
    assert json.dumps(odd.servicebus_options("ns.servicebus.windows.net")["http_proxy"]) == \
        json.dumps({"proxy_hostname": "::1", "proxy_port": 8080, "username": "a@b",
                    "password": "p:w/d"})


def test_a_copy_job_writes_its_blob_sink_through_the_node_proxy(
    tmp_path: Path, pg_odbc: str, azurite_connection_string: str, proxy: ForwardProxy,
    protector: PortableProtector, clean_env: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("pyodbc")
    from shir.adapters.copy_job import run_copy_job, store_resolver
    from shir.adapters.credstore import LocalCredentialStore
    from shir.adapters.odbc import format_connection_string, parse_connection_string

    store = LocalCredentialStore(tmp_path / "credentials", protector)
    store.put("storage", 1, azurite_connection_string.encode())
    pairs = parse_connection_string(pg_odbc)
    store.put("pg-password", 1, pairs.pop("pwd").encode())
    container = f"px-{uuid.uuid4().hex[:10]}"
    spec = {"source": format_connection_string(pairs), "credential": "pg-password",
            "format": "csv",
            "query": "SELECT g AS id, md5(g::text) AS s FROM generate_series(1, 3000) AS g",
            "sink": {"container": container, "blob": "out.csv", "credential": "storage"}}
    done = run_copy_job(json.dumps(spec).encode(), job_id="job-px", delivery=1,
                        resolve_credential=store_resolver(store),
                        proxy=sealed_custom(protector, proxy.port))
    assert done.rows == 3000
    seen = proxy.seen
    _through(proxy, azurite_connection_string, basic(USER, PASSWORD))
    assert any("comp=blocklist" in s.target and container in s.target for s in seen)
