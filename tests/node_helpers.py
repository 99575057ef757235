"""Real ``shir node run`` processes on loopback, and the failover trial the node tests run.

Used by tests/test_node_e2e.py (one trial on SQLite, one on Azurite) and scripts/node_trials
(N trials). Every wait is bounded; every process is stopped by its own PID in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shir.adapters.stores import open_store
from shir.core.state import RuntimeState, fold, initial

SHIR = [sys.executable, "-m", "shir.adapters.cli"]
STREAM = "runtime"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback TCP ports."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def shir(*args: str, timeout_s: float = 60, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``shir`` command to the end."""
    p = subprocess.run([*SHIR, *args], capture_output=True, text=True, timeout=timeout_s,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"shir {' '.join(args[:2])} exited {p.returncode}: {p.stderr[-2000:]}")
    return p


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float,
             poll_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


class Cluster:
    """A runtime in a store and its node processes (one home and intranet port each)."""

    def __init__(self, root: Path, store: str, channel: str | None = None) -> None:
        self.root = root
        self.store_url = store
        self.channel = channel
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopped: set[str] = set()
        self.keys: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self._store: Any = None
        self._events: list[object] = []

    def create(self, *settings: str) -> dict[str, str]:
        """``shir runtime create`` with ``settings`` options; keeps and returns the keys."""
        out = shir("runtime", "create", "--store", self.store_url, "--name", "e2e", "--json",
                   *settings)
        self.keys = json.loads(out.stdout)
        return self.keys

    def node_args(self, name: str, key: str | None = None, *extra: str) -> list[str]:
        if name not in self.ports:  # one port per node: a restarted node keeps its address
            self.ports[name] = free_ports(1)[0]
        args = ["node", "run", "--store", self.store_url, "--name", name,
                "--home", str(self.root / f"home-{name}"),
                "--intranet-port", str(self.ports[name]), *extra]
        if self.channel:
            args += ["--channel", self.channel]
        return args

    def start(self, name: str, *extra: str, key: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``shir node run`` for ``name`` (key from the environment, not argv)."""
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - kept for the process
        env = {**os.environ, "SHIR_AUTH_KEY": key or self.keys["key1"]}
        p = subprocess.Popen([*SHIR, *self.node_args(name, None, *extra)], stdout=log,
                             stderr=log, stdin=subprocess.DEVNULL, env=env)
        log.close()
        self.procs[name] = p
        return p

    def log_records(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in (self.root / f"{name}.log").read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "not-json", "line": line})
        return out

    # -- the log, read as an outside observer -------------------------------------------------

    def events(self) -> list[object]:
        if self._store is None:
            self._store = open_store(self.store_url, create=False)
        self._events.extend(self._store.read(STREAM, len(self._events)))
        return self._events

    def state(self) -> RuntimeState:
        return fold(initial(), self.events())

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].send_signal(sig)
        if sig is signal.SIGSTOP:
            self.stopped.add(name)
        elif sig is signal.SIGCONT:
            self.stopped.discard(name)

    def stop_all(self, timeout_s: float = 15) -> dict[str, int | None]:
        """SIGTERM every node still running (SIGCONT first if stopped), then SIGKILL."""
        for name, p in self.procs.items():
            if p.poll() is None:
                if name in self.stopped:
                    p.send_signal(signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout_s
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
                codes[name] = None
        if self._store is not None and hasattr(self._store, "close"):
            self._store.close()
        return codes


@contextmanager
def cluster(root: Path, store: str, channel: str | None = None) -> Iterator[Cluster]:
    """A :class:`Cluster` whose processes are all stopped on the way out."""
    c = Cluster(root, store, channel)
    try:
        yield c
    finally:
        c.stop_all()


# -- the failover trial -----------------------------------------------------------------------

SHORT = ("--heartbeat-interval", "0.5", "--missed-heartbeats", "3", "--lock-duration", "3")
OFFLINE_AFTER_S = 1.5


def failover_trial(root: Path, store: str, channel: str | None = None, jobs: int = 200,
                   job_s: float = 0.3, timeout_s: float = 120,
                   settings: tuple[str, ...] = SHORT, offline_after_s: float = OFFLINE_AFTER_S,
                   lock_s: float = 3.0, sigstop: bool = True) -> dict[str, Any]:
    """Four nodes, ``jobs`` touch jobs, the dispatcher SIGKILLed, another node SIGSTOPped past
    its leases and continued (unless not ``sigstop``). Returns what it measured; raises
    AssertionError on a broken rule. ``settings`` are ``runtime create`` options, and
    ``offline_after_s`` and ``lock_s`` what they make of offline detection and leases.
    """
    from shir.adapters.node_host import job_id_for
    from shir.core import events as ev
    from shir.core import jobs as jb

    sink = root / "sink"
    sink.mkdir()
    t_start = time.monotonic()
    with cluster(root, store, channel) as c:
        c.create(*settings)
        names = ["n1", "n2", "n3", "n4"]
        for i, name in enumerate(names):
            c.start(name, key=c.keys["key1" if i % 2 == 0 else "key2"])
        wait_for("four nodes Online", lambda: [n.status.value for n in c.state().nodes]
                 == ["Online"] * 4, 30)
        submit = ["job", "submit", "--store", store, "--kind", "touch", "--param",
                  f"sink={sink}", "--param", f"seconds={job_s}", "--count", str(jobs),
                  "--id", "e2e"]
        if channel:
            submit[2:2] = ["--channel", channel]
        shir(*submit)
        expected = {job_id_for(f"e2e-{i}") for i in range(jobs)}
        # let a quarter of the work finish, then kill the dispatcher mid-run
        wait_for("a quarter of the jobs", lambda: c.state().jobs.completed >= jobs // 4,
                 timeout_s)
        old = c.state().dispatcher
        assert old in names, old
        t_kill = time.time()
        c.signal(old, signal.SIGKILL)

        def new_dispatcher() -> Any:
            for e in c.events():
                if isinstance(e, ev.DispatcherChanged) and e.at >= t_kill and e.node not in (
                        None, old):
                    return e
            return None

        changed = wait_for("a new dispatcher", new_dispatcher, 5 * offline_after_s + 10)
        failover_s = changed.at - t_kill
        # stop a worker that holds leases, past its leases, then continue it
        others = [n for n in names if n not in (old, changed.node)]

        def leases_held() -> dict[str, set[str]]:
            """Live leases of the other workers whose work has started (their logs say)."""
            held: dict[str, set[str]] = {}
            for lease in c.state().jobs.leases.values():
                if lease.token.node in others:
                    held.setdefault(lease.token.node, set()).add(lease.token.job_id)
            for name, jobs_ in list(held.items()):
                started = {r.get("job") for r in c.log_records(name)
                           if r.get("event") == "job_started"}
                held[name] = jobs_ & started
            return {n: j for n, j in held.items() if j}

        victim, stopped_with = "", []
        if sigstop:
            held = wait_for("a worker running jobs", leases_held, 10, poll_s=0.02)
            victim = max(held, key=lambda n: len(held[n]))
            c.signal(victim, signal.SIGSTOP)
            stopped_with = sorted(held[victim])
            time.sleep(offline_after_s + lock_s + 1.0)  # offline detection + the lock + margin
            c.signal(victim, signal.SIGCONT)
        wait_for(f"all {jobs} jobs completed", lambda: c.state().jobs.completed >= jobs,
                 timeout_s)
        if sigstop:
            wait_for(f"{victim} back Online", lambda: (n := c.state().node(victim)) is not None
                     and n.status.value == "Online", 30)
        from shir.adapters.channels import open_channel

        reply = open_channel(channel or store)
        try:
            wanted = {f"e2e-{i}" for i in range(jobs)}
            wait_for("every result on the reply queue", lambda: wanted <= {
                r.message_id for r in reply.results() if r.outcome == "completed"}, 20)
        finally:
            reply.close()
        time.sleep(0.5)  # let the continued node report what it held
        events = c.events()
        codes = c.stop_all()
    # -- checks: the sink, the log, the logs ---------------------------------------------------
    files = {p.name for p in sink.iterdir() if not p.name.startswith(".tmp-")}
    assert files == expected, (
        f"sink: {len(files)} files; missing {sorted(expected - files)[:5]}, "
        f"unexpected {sorted(files - expected)[:5]}")
    completions: dict[str, int] = {}
    released: set[Any] = set()
    for e in events:
        if isinstance(e, jb.JobCompleted):
            completions[e.token.job_id] = completions.get(e.token.job_id, 0) + 1
            assert e.token not in released, f"completed under an ended lease: {e.token}"
        elif isinstance(e, (jb.JobReleased, jb.JobDeadLettered)):
            released.add(e.token)
    assert set(completions) == expected and set(completions.values()) == {1}, (
        f"completions: {len(completions)} jobs, counts {sorted(set(completions.values()))}")
    terms = [e.term for e in events if isinstance(e, ev.DispatcherChanged)]
    assert terms == sorted(set(terms)), f"terms must only grow: {terms}"
    assert failover_s <= 3 * offline_after_s, f"failover took {failover_s:.2f} s"
    late = []
    if sigstop:
        late = [r for r in c.log_records(victim)
                if r.get("event") in ("late_work_refused", "lease_lost")]
        rejoined = any(isinstance(e, ev.NodeRejoined) and e.node == victim for e in events)
        assert rejoined, f"{victim} did not rejoin under a new session"
        assert late, f"{victim} held {stopped_with[:3]}... and reported no refused late work"
    for name in names:
        if name != old:
            assert codes[name] == 0, f"{name} exited {codes[name]}: {c.log_records(name)[-3:]}"
        bad = [r for r in c.log_records(name) if r.get("event") == "not-json"]
        assert not bad, f"{name} wrote non-JSON lines: {bad[:3]}"
    return {
        "failover_s": round(failover_s, 2), "offline_after_s": offline_after_s,
        "killed": old, "new_dispatcher": changed.node, "stopped": victim,
        "stopped_with_leases": len(stopped_with), "late_work_refused": len(late),
        "jobs": jobs, "wall_s": round(time.monotonic() - t_start, 1),
    }
