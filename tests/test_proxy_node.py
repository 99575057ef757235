"""A real ``shir node run`` on a Blob store (Azurite) through a custom proxy, end to end.

The node starts direct; ``shir node proxy`` sets a custom proxy: the host restarts in place
(same PID, still registered) and from then on the store's traffic goes through the proxy with
its credentials, and jobs run. A second change moves it to another proxy. Stopped and started
again, the host uses its home's setting from the start. Canary: the proxy passwords never appear
in the node's log, ``shir status``, the store's bytes, the channel's file or the home.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest

pytest.importorskip("azure.storage.blob")

from fwdproxy import ForwardProxy, basic
from node_helpers import SHORT, cluster, shir, wait_for

from shir.adapters.copy_sinks import open_blob_service
from shir.adapters.node_host import job_id_for

USER = "svc-proxy"
PASSWORD_1 = "canary-NodePx1-" + uuid.uuid4().hex
PASSWORD_2 = "canary-NodePx2-" + uuid.uuid4().hex
SECRETS = (PASSWORD_1, PASSWORD_2)


def _records(c, name: str, event: str) -> list[dict]:
    return [r for r in c.log_records(name) if r.get("event") == event]


def _set_proxy(c, home: Path, port: int, password: str) -> str:
    out = shir("node", "proxy", "--store", c.store_url, "--name", "n1", "--home", str(home),
               "custom", "--address", "127.0.0.1", "--port", str(port), "--user", USER,
               env={"SHIR_PROXY_PASSWORD": password})
    assert password not in out.stdout + out.stderr
    return out.stdout


def _run_jobs(c, sink: Path, channel: str, tag: str, count: int = 5) -> None:
    shir("job", "submit", "--store", c.store_url, "--channel", channel, "--kind", "touch",
         "--param", f"sink={sink}", "--param", "seconds=0", "--count", str(count), "--id", tag)
    wanted = {job_id_for(f"{tag}-{i}") for i in range(count)}
    wait_for(f"jobs {tag} done", lambda: wanted <= {p.name for p in sink.iterdir()}, 60)


def _through(proxy: ForwardProxy, password: str, since: int = 0) -> int:
    seen = proxy.seen[since:]
    assert seen and all(s.authorization == basic(USER, password) and s.allowed for s in seen)
    return len(proxy.seen)


def test_a_node_host_follows_its_proxy_setting_through_restarts(
    tmp_path: Path, azurite_connection_string: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    container = f"pxnode-{uuid.uuid4().hex[:10]}"
    store = f"{azurite_connection_string.rstrip(';')};Container={container}"
    channel = f"sqlite:///{tmp_path / 'channel.db'}"
    sink = tmp_path / "sink"
    sink.mkdir()
    home = tmp_path / "home-n1"
    with ForwardProxy(USER, PASSWORD_1) as p1, ForwardProxy(USER, PASSWORD_2) as p2, \
            cluster(tmp_path, store, channel) as c:
        c.create(*SHORT)
        proc = c.start("n1")
        wait_for("n1 Online", lambda: [n.status.value for n in c.state().nodes] == ["Online"],
                 30)
        assert p1.seen == [] and p2.seen == []  # direct so far

        # 1. a custom proxy: the host restarts in place and goes through it
        assert "its host restarts" in _set_proxy(c, home, p1.port, PASSWORD_1)
        wait_for("a restart through proxy 1", lambda: len(_records(c, "n1", "starting")) == 2,
                 30)
        starting = _records(c, "n1", "starting")[-1]
        assert starting["proxy"] == f"custom proxy 127.0.0.1:{p1.port} (with user and password)"
        assert proc.poll() is None and starting["pid"] == proc.pid  # restarted in the process
        wait_for("traffic through proxy 1", lambda: len(p1.seen) > 5, 30)
        _run_jobs(c, sink, channel, "px1")
        n1_seen = _through(p1, PASSWORD_1)
        assert p2.seen == []

        # 2. another proxy: proxy 1 sees nothing more once the host restarted onto proxy 2
        _set_proxy(c, home, p2.port, PASSWORD_2)
        wait_for("a restart through proxy 2", lambda: len(_records(c, "n1", "starting")) == 3,
                 30)
        wait_for("traffic through proxy 2", lambda: len(p2.seen) > 5, 30)
        settled = len(p1.seen)
        _run_jobs(c, sink, channel, "px2")
        _through(p2, PASSWORD_2)
        assert len(p1.seen) == settled and settled >= n1_seen
        assert [r["event"] for r in _records(c, "n1", "stopped")] == ["stopped"] * 2
        assert all(r["left"] is False for r in _records(c, "n1", "stopped"))  # stayed registered
        names = [type(e).__name__ for e in c.events()]
        assert "NodeLeft" not in names and names.count("ProxySettingsSaved") == 2

        # 3. stopped (it leaves), started again: its home's setting is used from the start
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        before = len(p2.seen)
        c.start("n1")
        wait_for("n1 Online again", lambda: [n.status.value for n in c.state().nodes]
                 == ["Online"], 30)
        _run_jobs(c, sink, channel, "px3")
        _through(p2, PASSWORD_2, since=before)
        starts = _records(c, "n1", "starting")
        assert len(starts) == 4 and str(p2.port) in starts[-1]["proxy"]  # no restart loop
        names = [type(e).__name__ for e in c.events()]
        assert names.count("ProxySettingsSaved") == 3  # the new registration got the home's

        status = shir("status", "--store", store, "--json", "--detail")
        assert f"custom proxy 127.0.0.1:{p2.port}" in status.stdout
        codes = c.stop_all()
        assert codes["n1"] == 0

    # the canary: no password in the log, status, the store's bytes, the channel, the home
    texts = [(tmp_path / "n1.log").read_bytes(), status.stdout.encode(), status.stderr.encode()]
    service = open_blob_service(azurite_connection_string)
    blobs = service.get_container_client(container)
    texts += [blobs.download_blob(b.name).readall() for b in blobs.list_blobs()]
    texts += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
              and p.stat().st_size < 64 << 20 and not p.name.endswith(".log")]
    for secret in SECRETS:
        assert not any(secret.encode() in t for t in texts), "a proxy password leaked"
    assert json.loads(status.stdout)["nodes"]
    assert os.environ.get("SHIR_PROXY_PASSWORD") is None


def test_the_host_follows_the_log_and_brings_its_machines_setting_to_a_new_registration(
    tmp_path: Path,
) -> None:
    """In process, on SQLite: which setting wins when, and that no restart is wanted twice."""
    from shir.adapters.node_host import NodeHost
    from shir.core.driver import Driver
    from shir.core.model import NodeMetrics
    from shir.core.proxy import (
        ProxyMode,
        ProxySettings,
        RestartHostService,
        SaveProxySettings,
        saved_proxy,
    )

    url = f"sqlite:///{tmp_path / 'rt.db'}"
    key = json.loads(shir("runtime", "create", "--store", url, "--name", "rt", "--json").stdout)
    a = ProxySettings(ProxyMode.CUSTOM, "proxy-a.contoso.com", 3128)
    b = ProxySettings(ProxyMode.SYSTEM)
    logged: list[tuple[str, dict]] = []

    def host(proxy: ProxySettings) -> NodeHost:
        from shir.adapters.stores import open_store

        return NodeHost(store=open_store(url, create=False), channel=None,
                        key_text=key["key1"], name="n1", machine_id="m1",
                        metrics=lambda running: NodeMetrics(running_jobs=running), cores=2,
                        memory_mb=1024, proxy=proxy,
                        log=lambda level, event, **f: logged.append((event, f)))

    first = host(a)  # a new registration: the machine's setting goes to the log, no restart
    first.register()
    assert saved_proxy(first.driver.state, "n1") == a and first.restart_to is None
    assert not first.stop.is_set()

    from shir.adapters.stores import open_store

    cli = Driver(open_store(url, create=False))  # as shir node proxy does, meanwhile
    cli.handle(SaveProxySettings("n1", b, cli.state.now + 1))
    first.driver.catch_up()  # what a turn of the host loop does first
    first._drain_effects()
    assert first.restart_to == b and first.stop.is_set()
    assert [e for e, _ in logged].count("restart_wanted") == 1
    first._effects.append((RestartHostService("n1", "again"), False))
    first._drain_effects()  # the same change seen again wants no second restart
    assert [e for e, _ in logged].count("restart_wanted") == 1
    assert first._drain() == 0 and ("stopped", {"left": False, "restart": True}) in logged

    stale = host(a)  # started with an older home: the log's setting wins at registration
    stale.register()
    assert stale.restart_to == b
    fresh = host(b)
    fresh.register()
    assert fresh.restart_to is None and not fresh.stop.is_set()
    names = [type(e).__name__ for e in cli.store.read("runtime")]
    assert "NodeLeft" not in names and names.count("ProxySettingsSaved") == 2
    fresh.draining = True  # stopping for good (SIGTERM): a change seen now is not a restart
    cli.catch_up()
    cli.handle(SaveProxySettings("n1", a, cli.state.now + 1))
    fresh.driver.catch_up()
    fresh._drain_effects()
    assert fresh.restart_to is None
