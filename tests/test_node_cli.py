"""The node host's command line with real processes: refusals, the home lock, config errors,
draining on SIGTERM, job show, status (live and recorded), and no key in logs, output or store.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from node_helpers import SHIR, Cluster, cluster, free_ports, shir, wait_for

from shir.adapters.channel import JobRequest
from shir.adapters.embedded_channel import EmbeddedChannel
from shir.adapters.node_host import job_id_for
from shir.adapters.node_jobs import MAX_KIND
from shir.adapters.stores import open_store
from shir.core.commands import RegisterNode
from shir.core.driver import Driver
from shir.core.model import NodeMetrics

FAST = ("--heartbeat-interval", "0.5", "--missed-heartbeats", "3", "--lock-duration", "3")


def _secret_parts(key: str) -> list[str]:
    return [key, key.rsplit("@", 1)[1]]


def _registered(c: Cluster, name: str) -> bool:
    node = c.state().node(name)
    return node is not None and node.status.value == "Online"


def _run_to_end(c: Cluster, name: str, *extra: str, key: str | None = None,
                timeout_s: float = 30) -> tuple[int, str]:
    p = c.start(name, *extra, key=key)
    code = p.wait(timeout_s)
    return code, (c.root / f"{name}.log").read_text()


def test_runtime_create_prints_two_keys_once_and_the_store_keeps_only_verifiers(
        tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/rt.db"
    out = shir("runtime", "create", "--store", store, "--name", "plant").stdout
    lines = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith("key"))
    assert set(lines) == {"key1", "key2"} and lines["key1"] != lines["key2"]
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for key in lines.values():
        for part in _secret_parts(key):
            assert part.encode() not in data
    again = shir("runtime", "create", "--store", store, "--name", "plant", check=False)
    assert again.returncode == 2 and "already holds runtime 'plant'" in again.stderr
    assert "Traceback" not in again.stderr


def test_a_regenerated_key_is_refused_naming_the_key_and_what_to_do(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        keys = c.create(*FAST)
        new = shir("runtime", "regenerate-key", "--store", c.store_url, "key1").stdout
        assert new.startswith("key1: IR@") and keys["key1"] not in new
        code, log = _run_to_end(c, "old", key=keys["key1"])
        assert code == 2
        assert "key1 was regenerated" in log and "copy the current key1 or the other key" in log
        for part in _secret_parts(keys["key1"]) + _secret_parts(new.split(": ", 1)[1].strip()):
            assert part not in log
        c.start("fresh", key=new.split(": ", 1)[1].strip())
        wait_for("the node with the new key Online", lambda: _registered(c, "fresh"), 20)


def test_a_fifth_node_is_refused(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        keys = c.create(*FAST)
        driver = Driver(open_store(c.store_url, create=False))
        for i in range(4):  # four machines registered earlier (through the core itself)
            driver.handle(RegisterNode(keys["key2"], f"m{i}", f"machine-{i}", 2, 4096,
                                       time.time(), NodeMetrics(remote_access=True)))
        code, log = _run_to_end(c, "fifth")
        assert code == 2 and "already has 4 nodes (max 4)" in log and "remove one" in log


def test_a_second_node_is_refused_while_remote_access_is_off(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        c.start("first", "--remote-access", "off")
        wait_for("the first node Online", lambda: _registered(c, "first"), 20)
        code, log = _run_to_end(c, "second")
        assert code == 2
        assert "remote access from intranet (TCP 8060) is off on first" in log


def test_one_node_host_per_home(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        first = c.start("a")
        wait_for("a Online", lambda: _registered(c, "a"), 20)
        second = subprocess.run(
            [*SHIR, "node", "run", "--store", c.store_url, "--name", "b",
             "--home", str(tmp_path / "home-a"), "--key", c.keys["key1"]],
            capture_output=True, text=True, timeout=30)
        assert second.returncode == 2
        assert f"node 'a', PID {first.pid}" in second.stderr
        assert "one node host per machine" in second.stderr
        assert "Traceback" not in second.stderr


def test_a_refused_registration_leaves_the_home_free_for_another_name(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        c.start("a")
        wait_for("a Online", lambda: _registered(c, "a"), 20)
        home = tmp_path / "home-x"  # another machine asks for the name 'a', which is taken
        taken = subprocess.run(
            [*SHIR, "node", "run", "--store", c.store_url, "--name", "a", "--home", str(home),
             "--key", c.keys["key1"], "--intranet-port", str(free_ports(1)[0])],
            capture_output=True, text=True, timeout=30)
        assert taken.returncode == 2 and "is taken by machine" in taken.stderr
        # its new identity named 'a' was never registered: kept, it refused every other name
        assert not (home / "identity.node").exists() and not (home / "node.pub").exists()


@pytest.mark.parametrize(("toml", "message"), [
    ("heartbeat_interval_s = -1\n",
     "heartbeat_interval_s must be a number of seconds above 0, at most 3600"),
    ("concurrency_limit = true\n", "concurrency_limit must be an integer 1..256"),
    ("log_level = 'loud'\n", "log_level must be one of debug, info, warning, error"),
    ("intranet_port = 70000\n", "intranet_port must be a TCP port 1..65535"),
    ("colour = 'blue'\n", "unknown key 'colour'"),
    ("store = \n", "is not valid UTF-8 TOML"),
])
def test_config_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "host.toml"
    config.write_text(toml)
    p = shir("node", "run", "--store", f"sqlite:///{tmp_path}/rt.db", "--key", "IR@x@key1@1@y",
             "--name", "n", "--home", str(tmp_path / "h"), "--config", str(config), check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


def test_store_errors_are_clear(tmp_path: Path) -> None:
    foreign_key = "IR@x@key1@1@" + "A" * 43
    base = ["node", "run", "--key", foreign_key, "--name", "n", "--home", str(tmp_path / "h")]
    missing = shir(*base, "--store", f"sqlite:///{tmp_path}/nothing/rt.db", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    empty = tmp_path / "empty.db"
    open_store(f"sqlite:///{empty}", create=True).close()  # type: ignore[attr-defined]
    p = shir(*base, "--store", f"sqlite:///{empty}", check=False)
    assert p.returncode == 2 and "holds no runtime: create one with shir runtime create" in p.stderr
    other = tmp_path / "other.db"
    shir("runtime", "create", "--store", f"sqlite:///{other}", "--name", "other")
    p = shir(*base, "--store", f"sqlite:///{other}", check=False)
    assert p.returncode == 2 and "belongs to runtime 'x', not to" in p.stderr
    db = sqlite3.connect(other)
    db.execute("UPDATE shir_meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    p = shir(*base, "--store", f"sqlite:///{other}", check=False)
    assert p.returncode == 2 and "newer" in p.stderr and "Traceback" not in p.stderr
    p = shir("status", "--store", "http://127.0.0.1:9/devstoreaccount1/c?sv=1&sig=zzz",
             check=False, timeout_s=90)
    assert p.returncode == 2 and "sig=zzz" not in p.stderr and "Traceback" not in p.stderr


def test_sigterm_drains_running_jobs_and_status_job_show_and_logs_hold_no_key(
        tmp_path: Path) -> None:
    sink = tmp_path / "sink"
    sink.mkdir()
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        keys = c.create(*FAST)
        p = c.start("solo")
        wait_for("solo Online", lambda: _registered(c, "solo"), 20)
        shir("job", "submit", "--store", c.store_url, "--kind", "touch", "--param",
             f"sink={sink}", "--param", "seconds=4", "--id", "slow")
        wait_for("the job started", lambda: any(
            r.get("event") == "job_started" for r in c.log_records("solo")), 20)
        live = json.loads(shir("status", "--store", c.store_url, "--json").stdout)
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert (sink / job_id_for("slow")).exists()  # finished before leaving
        shown = shir("job", "show", "--store", c.store_url, "slow").stdout
        assert "completed" in shown and "solo" in shown
        assert "reply queue      completed at" in shown  # the dispatcher published it
        record = json.loads(shir("job", "show", "--store", c.store_url, "slow", "--json").stdout)
        assert [r["outcome"] for r in record["published"]] == ["completed"]
        text = shir("status", "--store", c.store_url).stdout
    node = live["nodes"][0]
    assert live["status"] == "Online" and live["dispatcher"] == "solo" and live["term"] == 1
    assert {"name", "status", "reasons", "role", "version", "cpu_pct", "available_memory_mb",
            "running_jobs", "limit", "last_heartbeat_at"} <= set(node)
    assert node["role"] == "dispatcher" and node["running_jobs"] == 1
    assert node["available_memory_mb"] > 0 and node["version"]
    events = [r["event"] for r in c.log_records("solo")]
    assert events.index("draining") < events.index("job_completed") < events.index("stopped")
    everything = ((tmp_path / "solo.log").read_text() + text + json.dumps(live)
                  + (tmp_path / "rt.db").read_bytes().decode("latin-1"))
    for key in keys.values():
        if key.startswith("IR@"):
            for part in _secret_parts(key):
                assert part not in everything


def test_job_show_reports_a_request_the_dispatcher_refused(tmp_path: Path) -> None:
    # a request the runtime refuses for good never reaches the log: it is dead-lettered on the
    # channel with the reason, and `job show` reads it there
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        p = shir("job", "submit", "--store", c.store_url, "--kind", "k" * (MAX_KIND + 1),
                 check=False)
        assert p.returncode == 2 and "--kind" in p.stderr and "Traceback" not in p.stderr
        channel = EmbeddedChannel.from_url(c.store_url)
        try:
            channel.send([JobRequest("odd", "k" * (MAX_KIND + 1), b"{}")])
        finally:
            channel.close()
        c.start("solo")
        wait_for("the request refused", lambda: shir(
            "job", "show", "--store", c.store_url, "odd", check=False).returncode == 0, 20)
        record = json.loads(shir("job", "show", "--store", c.store_url, "odd", "--json").stdout)
        assert record["state"] == "refused" and "job kind" in record["reason"]
        p = shir("job", "show", "--store", c.store_url, "never-sent", check=False)
        assert p.returncode == 2 and "no job 'never-sent'" in p.stderr


def test_status_reads_a_recorded_log(tmp_path: Path) -> None:
    log = tmp_path / "run.events"
    shir("sim", "run", "dispatcher-hibernates", "--log", str(log), "--until", "60", check=False)
    p = shir("status", "--store", str(log), "--json")
    report = json.loads(p.stdout)
    assert report["nodes"] and {"status", "term", "dispatcher"} <= set(report)
    # the monitoring view of the same state rides along: the same nodes, statuses and term
    view = report["monitoring"]
    assert [n["name"] for n in view["nodes"]] == [n["name"] for n in report["nodes"]]
    assert [n["status"] for n in view["nodes"]] == [n["status"] for n in report["nodes"]]
    text = shir("status", "--store", str(log)).stdout
    detail = shir("status", "--store", str(log), "--detail").stdout
    assert detail.startswith(text.rstrip("\n")) and "remote access from intranet" in detail
    assert "remote access from intranet" not in text


def test_a_node_killed_with_sigkill_restarts_on_its_home(tmp_path: Path) -> None:
    # the kernel drops the home lock of a killed host: no stale lock, and the same machine
    # (the id kept in its home) registers again as the same node; the job its old process ran
    # is given back at once, not after its 60 s lock
    sink = tmp_path / "sink"
    sink.mkdir()
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create("--heartbeat-interval", "0.5", "--missed-heartbeats", "3",
                 "--lock-duration", "60")
        first = c.start("a")
        wait_for("a Online", lambda: _registered(c, "a"), 20)
        shir("job", "submit", "--store", c.store_url, "--kind", "touch", "--param",
             f"sink={sink}", "--param", "seconds=30", "--id", "long")
        wait_for("the job started", lambda: any(
            r.get("event") == "job_started" for r in c.log_records("a")), 20)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = time.monotonic()
        c.start("a")
        wait_for("a registered again", lambda: sum(
            r.get("event") == "registered" for r in c.log_records("a")) == 2, 20)
        state = c.state()
        assert [n.name for n in state.nodes] == ["a"] and state.dispatcher == "a"

        def redelivered() -> bool:
            shown = json.loads(shir("job", "show", "--store", c.store_url, "long",
                                    "--json").stdout)
            return shown.get("delivery", 0) >= 2

        wait_for("the job delivered again", redelivered, 20)
        assert time.monotonic() - killed_at < 30  # well inside the 60 s lock
        history = json.loads(shir("job", "show", "--store", c.store_url, "long",
                                  "--json").stdout)["history"]
        # (on a loaded machine the new process may miss heartbeats and lose it again later)
        assert [h["event"] for h in history[:4]] == ["submitted", "leased", "released", "leased"]
        assert "started again" in history[2]["detail"]


def test_a_non_member_is_refused_on_the_intranet_port(tmp_path: Path) -> None:
    from shir.adapters.intranet import Intranet, Peer
    from shir.adapters.intranet_tls import load_or_create_identity

    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        c.start("a")
        wait_for("a Online", lambda: _registered(c, "a"), 20)
        a = c.state().node("a")
        assert a is not None and a.intranet_address == f"127.0.0.1:{c.ports['a']}"
        assert a.cert_sha256 is not None
        # a stranger that knows a's address and certificate, but is not in the runtime's log
        stranger = Intranet("stranger", load_or_create_identity(tmp_path / "s", "stranger"),
                            peers={"a": Peer(a.intranet_address, a.cert_sha256)},
                            port=0, check_interval_s=None, timeout_s=3.0)
        try:
            assert stranger.check_peer("a") is False
        finally:
            stranger.stop()
        wait_for("a's log to name the refusal", lambda: any(
            "not the certificate of a registered node" in r.get("message", "")
            for r in c.log_records("a")), 10)


def test_remote_access_off_opens_no_port_and_publishes_no_address(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        c.start("solo", "--remote-access", "off")
        wait_for("solo Online", lambda: _registered(c, "solo"), 20)
        node = c.state().node("solo")
        assert node is not None and node.intranet_address is None and node.cert_sha256 is None
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", c.ports["solo"])) != 0
