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


def test_results_the_channel_refused_are_published_by_the_dispatchers_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One host, driven turn by turn on a clock of its own: the reply queue is locked when its
    three jobs complete, so publishing fails; the results stay unpublished in the log (no
    record sent), and the dispatcher's sweep publishes them once the channel works again: at
    most MAX_RESULTS_PER_TURN a turn (here 2), and nothing more in a sweep after a failure."""
    from shir.adapters import node_duties
    from shir.adapters.channel import JobRequest
    from shir.adapters.node_host import DISPATCH_POLL_S, NodeHost
    from shir.adapters.stores import open_store
    from shir.core.model import NodeMetrics

    monkeypatch.setattr(node_duties, "MAX_RESULTS_PER_TURN", 2)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    keys = json.loads(shir("runtime", "create", "--store", url, "--name", "rt", "--json").stdout)
    channel_path = tmp_path / "channel.db"
    channel = EmbeddedChannel(channel_path, busy_timeout_s=0.2)
    now = [1000.0]
    logged: list[str] = []
    host = NodeHost(store=open_store(url, create=False), channel=channel,
                    key_text=keys["key1"], name="n1", machine_id="m1",
                    metrics=lambda running: NodeMetrics(running_jobs=running), cores=2,
                    memory_mb=4096, clock=lambda: now[0],
                    log=lambda level, event, **f: logged.append(event))

    def published() -> list[str]:
        return sorted(r.message_id for r in channel.results())

    def turn(after_s: float = 0.1) -> None:
        now[0] += after_s
        host._turn()

    try:
        host.register()
        host._begin_serving()
        params = json.dumps({"sink": str(tmp_path)}).encode()
        channel.send([JobRequest(f"r{i}", "touch", params) for i in (1, 2, 3)])
        jobs = {job_id_for(f"r{i}") for i in (1, 2, 3)}
        for _ in range(50):  # pulled, dispatched, started
            turn()
            if set(host.running) == jobs:
                break
        for run in list(host.running.values()):
            run.thread.join(10)
        lock = sqlite3.connect(channel_path, timeout=5, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            turn()  # completes the jobs; their results cannot be published
            assert not host.running and logged.count("result_not_published") == 3
            turn(DISPATCH_POLL_S)  # the sweep's time: one try, then it waits for the next
            assert logged.count("result_not_published") == 4
        finally:
            lock.rollback()
            lock.close()
        assert set(host.driver.state.model().jobs.unpublished) == jobs
        assert published() == []
        turn()  # not yet the sweep's time
        assert published() == []
        turn(DISPATCH_POLL_S)
        assert len(published()) == 2  # at most two a turn: the rest on the next one
        turn()
        assert published() == ["r1", "r2", "r3"]
        assert not host.driver.state.model().jobs.unpublished  # recorded: not published again
    finally:
        host._cancel_all()
        channel.close()
