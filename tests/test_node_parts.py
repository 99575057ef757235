"""The node host's parts without processes: config, home lock, machine id, load, touch job."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from shir.adapters.node_config import (
    ConfigError,
    HomeLock,
    HomeLocked,
    SystemLoad,
    load_config,
    machine_id,
)
from shir.adapters.node_jobs import JobRun, pack_spec, unpack_spec
from shir.core.jobs import LeaseToken


def test_options_override_the_file_and_every_key_is_checked(tmp_path: Path) -> None:
    f = tmp_path / "host.toml"
    f.write_text("store = 'sqlite:///a.db'\nheartbeat_interval_s = 5\nlog_level = 'debug'\n")
    c = load_config(str(f), {"heartbeat_interval_s": 2.0, "store": None})
    assert (c.store, c.heartbeat_interval_s, c.log_level) == ("sqlite:///a.db", 2.0, "debug")
    with pytest.raises(ConfigError, match="option --concurrency-limit: concurrency_limit"):
        load_config(None, {"concurrency_limit": 0})
    f.write_text("store = 'DefaultEndpointsProtocol=https;AccountKey=s3cr3t'\nremote_access = 1\n")
    with pytest.raises(ConfigError, match="remote_access must be true or false") as exc:
        load_config(str(f), {})
    assert "s3cr3t" not in str(exc.value)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(str(tmp_path / "missing.toml"), {})


def test_one_home_one_host_and_the_lock_names_the_holder(tmp_path: Path) -> None:
    lock = HomeLock(tmp_path / "home", "alpha")
    with pytest.raises(HomeLocked, match=r"node 'alpha', PID \d+"):
        HomeLock(tmp_path / "home", "beta")
    lock.release()
    HomeLock(tmp_path / "home", "beta").release()  # free again once released


def test_machine_id_is_made_once_per_home(tmp_path: Path) -> None:
    first = machine_id(tmp_path)
    assert first.startswith("machine-") and machine_id(tmp_path) == first
    other = tmp_path / "other"
    other.mkdir()
    assert machine_id(other) != first


def test_system_load_reads_proc() -> None:
    load = SystemLoad()
    total, available = load.memory_mb()
    assert 0 < available <= total
    assert 0.0 <= load.cpu_pct() <= 100.0


def test_spec_round_trip() -> None:
    assert unpack_spec(pack_spec("touch", b'{"a": 1}')) == ("touch", b'{"a": 1}')
    assert unpack_spec(b"no kind") == ("", b"no kind")
    with pytest.raises(ValueError):
        pack_spec("", b"")


def _run(token: LeaseToken, params: dict[str, object]) -> str | None:
    done: list[str | None] = []
    run = JobRun(token, pack_spec("touch", json.dumps(params).encode()),
                 lambda _r, error: done.append(error))
    run.start()
    run.thread.join(10)
    return done[0]


def test_touch_commits_once_per_job_id(tmp_path: Path) -> None:
    first = LeaseToken("j1", "a", 1, 1)
    again = LeaseToken("j1", "b", 2, 2)
    assert _run(first, {"sink": str(tmp_path), "seconds": 0}) is None
    assert _run(again, {"sink": str(tmp_path), "seconds": 0}) is None  # done already: no effect
    assert [p.name for p in tmp_path.iterdir()] == ["j1"]
    assert json.loads((tmp_path / "j1").read_text())["node"] == "a"
    assert _run(LeaseToken("j2", "a", 1, 1), {"sink": str(tmp_path / "no")}) == (
        f"the sink folder {tmp_path / 'no'} does not exist")
    assert _run(LeaseToken("j3", "a", 1, 1), {"sink": str(tmp_path), "fail": True}) == (
        "told to fail")


def test_a_cancelled_touch_reports_nothing_and_writes_nothing(tmp_path: Path) -> None:
    done: list[str | None] = []
    run = JobRun(LeaseToken("j1", "a", 1, 1),
                 pack_spec("touch", json.dumps({"sink": str(tmp_path), "seconds": 30}).encode()),
                 lambda _r, error: done.append(error))
    run.start()
    threading.Timer(0.1, run.cancelled.set).start()
    run.thread.join(10)
    assert not run.thread.is_alive() and done == [] and not list(tmp_path.iterdir())


def test_an_unknown_kind_fails_with_what_the_node_runs() -> None:
    done: list[str | None] = []
    run = JobRun(LeaseToken("j1", "a", 1, 1), pack_spec("teleport", b"{}"),
                 lambda _r, error: done.append(error))
    run.start()
    run.thread.join(10)
    assert done == ["this node cannot run job kind 'teleport' (it runs: touch)"]
