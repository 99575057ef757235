"""A finished job's result reaches the reply queue even when the host that should publish it
is killed first: real ``shir node run`` processes, a real SIGKILL, the embedded channel in its
own SQLite file (held locked by the test so that publishing cannot happen in time).
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest
from node_helpers import Cluster, cluster, shir, wait_for

from shir.adapters.embedded_channel import EmbeddedChannel
from shir.adapters.node_host import job_id_for
from shir.core import jobs as jb


def _finished(c: Cluster, job_id: str) -> object | None:
    return next((e for e in c.events()
                 if isinstance(e, (jb.JobCompleted, jb.JobDeadLettered))
                 and e.token.job_id == job_id), None)


@pytest.mark.parametrize("outcome", ["completed", "dead_lettered"])
def test_a_result_the_killed_host_never_published_is_published_after_its_restart(
        tmp_path: Path, outcome: str) -> None:
    channel_path = tmp_path / "channel.db"
    channel_url = f"sqlite:///{channel_path}"
    sink = tmp_path / "sink"
    sink.mkdir()
    with cluster(tmp_path, f"sqlite:///{tmp_path}/store.db", channel_url) as c:
        c.create("--max-deliveries", "1")  # a failed delivery is dead-lettered at once
        c.start("n1")
        wait_for("n1 Online", lambda: [n.status.value for n in c.state().nodes] == ["Online"],
                 30)
        params = ["--param", f"sink={sink}", "--param", "seconds=3"]
        if outcome == "dead_lettered":
            params += ["--param", "fail=true"]
        shir("job", "submit", "--store", c.store_url, "--channel", channel_url, "--kind",
             "touch", *params, "--id", "r1")
        job = job_id_for("r1")
        wait_for("the job leased", lambda: job in c.state().jobs.leases, 30)
        # Hold the channel's write lock: the host can store the job's end in the log (another
        # file) but not publish its result, and is killed before it could.
        lock = sqlite3.connect(channel_path, timeout=5, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            ended = wait_for("the job's end in the log", lambda: _finished(c, job), 40)
            c.signal("n1", signal.SIGKILL)
            c.procs["n1"].wait(10)
        finally:
            lock.rollback()
            lock.close()
        assert type(ended).__name__ == ("JobCompleted" if outcome == "completed"
                                        else "JobDeadLettered")
        reader = EmbeddedChannel(channel_path)
        try:
            assert reader.results("r1") == []  # the killed host never published it
            c.start("n1")  # the same machine (home): its host starts again
            results = wait_for("the result on the reply queue",
                               lambda: reader.results("r1"), 30)
            assert [(r.job_id, r.outcome) for r in results] == [(job, outcome)]
            # it is recorded as published: a later start does not publish it again
            wait_for("the publication recorded",
                     lambda: not c.state().model().jobs.unpublished, 20)
        finally:
            reader.close()
        assert c.stop_all()["n1"] == 0


def test_a_result_the_channel_refused_is_published_by_the_dispatchers_next_sweep(
        tmp_path: Path) -> None:
    """One host, driven turn by turn on a clock of its own: the reply queue is locked when the
    job completes, so publishing fails; the result stays unpublished in the log (no record
    sent), and the dispatcher's sweep publishes it once the channel works again."""
    from shir.adapters.channel import JobRequest
    from shir.adapters.node_host import DISPATCH_POLL_S, NodeHost
    from shir.adapters.stores import open_store
    from shir.core.model import NodeMetrics

    url = f"sqlite:///{tmp_path / 'store.db'}"
    keys = json.loads(shir("runtime", "create", "--store", url, "--name", "rt", "--json").stdout)
    channel_path = tmp_path / "channel.db"
    channel = EmbeddedChannel(channel_path, busy_timeout_s=0.2)
    now = [1000.0]
    logged: list[str] = []
    host = NodeHost(store=open_store(url, create=False), channel=channel,
                    key_text=keys["key1"], name="n1", machine_id="m1",
                    metrics=lambda running: NodeMetrics(running_jobs=running), cores=2,
                    memory_mb=2048, clock=lambda: now[0],
                    log=lambda level, event, **f: logged.append(event))
    try:
        host.register()
        host._begin_serving()
        channel.send([JobRequest("r1", "touch", json.dumps({"sink": str(tmp_path)}).encode())])
        job = job_id_for("r1")
        for _ in range(50):  # pulled, dispatched, started
            host._turn()
            if job in host.running:
                break
        host.running[job].thread.join(10)
        lock = sqlite3.connect(channel_path, timeout=5, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            now[0] += 0.1
            host._turn()  # completes the job; its result cannot be published
        finally:
            lock.rollback()
            lock.close()
        assert "result_not_published" in logged and job not in host.running
        assert list(host.driver.state.model().jobs.unpublished) == [job]
        assert channel.results("r1") == []
        now[0] += 0.1
        host._turn()  # not yet the sweep's time
        assert channel.results("r1") == []
        now[0] += DISPATCH_POLL_S
        host._turn()
        assert [(r.job_id, r.outcome) for r in channel.results("r1")] == [(job, "completed")]
        assert not host.driver.state.model().jobs.unpublished  # recorded: not published again
    finally:
        host._cancel_all()
        channel.close()
