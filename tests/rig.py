"""The one test rig: ``Rig`` runs one runtime through ``shir.core`` as a host would.

It plays the part a real host plays: it keeps the current state handle, the event log, each
node's session (learned from ``StartSession`` effects, as a node would), and what each node
reports. The example-based tests and the Hypothesis state machines drive the core through it
(``credential_helpers.CredCluster`` adds what nodes do with credentials).

    c = Rig()                          # runtime "rt-1", keys from a seeded generator, t = 0
    c.register_n(2)                    # nodes n1, n2 (metrics: version 5.0, all peers reachable)
    c.heartbeat_all(at=10)             # both Online; n1 dispatches in term 1
    r = Rig.online(2, at=1.0)          # the same in one step
    r.submit_n(3); r.dispatch()        # jobs j1..j3 queued, then leased by the dispatcher
    err = c.refused(cmd)               # asserts a DomainError and an unchanged fingerprint
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any, Self

import attrs
import pytest

from shir.core import (
    AuthKey,
    CompleteJob,
    CreateRuntime,
    DispatcherChanged,
    DispatchJobs,
    DomainError,
    FinishUpgrade,
    Heartbeat,
    JobLeased,
    KeyName,
    LeaseToken,
    NodeMetrics,
    NodeStatus,
    NodeStatusChanged,
    RegenerateAuthKey,
    RegisterNode,
    RemoveNode,
    RuntimeSettings,
    RuntimeState,
    StartSession,
    StartUpgrade,
    SubmitJob,
    Tick,
    decide,
    handle,
    initial,
    next_deadline,
)

DAY_S = 86_400.0
VERSION = "5.0"
CONFIG = "cfg-a"


def names(events: Iterable[object]) -> list[str]:
    """The event types of ``events``, by class name, in order."""
    return [type(e).__name__ for e in events]


def of_type(events: Iterable[object], cls: type) -> list[Any]:
    """The events of one type, in order."""
    return [e for e in events if isinstance(e, cls)]


def statuses(events: Iterable[object], node: str) -> list[NodeStatus]:
    """The statuses ``node`` went through in ``events``."""
    return [e.status for e in events if isinstance(e, NodeStatusChanged) and e.node == node]


def terms(events: Iterable[object]) -> list[tuple[int, str | None]]:
    """(term, dispatcher) of each ``DispatcherChanged`` in ``events``."""
    return [(e.term, e.node) for e in events if isinstance(e, DispatcherChanged)]


def recomputed(state: RuntimeState) -> RuntimeState:
    """A copy of ``state`` without the core's derived caches: every timed rule dirty, and made
    dirty again by any lifecycle event (whatever it reads), no node status derived yet."""
    copy = state.copy()
    m = copy.model()
    m.dirty = m.wild = (1 << len(m.rules)) - 1
    m.marks = {}
    m.due = None
    m.rule_due = [math.inf] * len(m.rules)
    m.status_memo = {}
    return copy


class Rig:
    """One runtime, driven the way a host drives the core. Every field is plain and public."""

    def __init__(
        self,
        settings: RuntimeSettings | None = None,
        *,
        runtime_id: str = "rt-1",
        seed: int = 0,
        at: float = 0.0,
        check_caches: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.runtime_id = runtime_id
        self.settings = settings or RuntimeSettings()
        self.keys = {k: self.new_key(k, 1) for k in KeyName}
        self.state: RuntimeState = initial()
        self.log: list[object] = []  # every event, in order
        self.effects: list[object] = []
        self.sessions: dict[str, int] = {}  # what each node believes its session is
        self.reports: dict[str, NodeMetrics] = {}  # what each node reports in its heartbeats
        self.machines: dict[str, str] = {}
        self.isolated: set[str] = set()  # nodes that report no reachable peer
        self.now = at
        self.check_caches = check_caches
        self.create = CreateRuntime(
            runtime_id, "factory-1", "shir-test", self.keys[KeyName.KEY1],
            self.keys[KeyName.KEY2], at, "a test runtime", self.settings,
        )
        self.handle(self.create)

    @classmethod
    def online(cls, n: int = 2, settings: RuntimeSettings | None = None, *, at: float = 1.0,
               cores: int = 4, memory_mb: int = 8192, **kw: Any) -> Self:
        """A runtime with nodes n1..n<n> registered at 0, all Online after one heartbeat at
        ``at``; n1 dispatches. ``kw`` goes to the constructor (a subclass's options)."""
        c = cls(settings, **kw)
        for i in range(1, n + 1):
            c.register(f"n{i}", cores=cores, memory_mb=memory_mb)
        c.heartbeat_all(at)
        assert [c.status(x) for x in c.sessions] == [NodeStatus.ONLINE] * n
        return c

    # --- plumbing ---------------------------------------------------------------------------

    def new_key(self, name: KeyName, generation: int, runtime_id: str | None = None) -> AuthKey:
        """A key of this runtime (or ``runtime_id``) from the seeded generator."""
        return AuthKey.from_seed(
            runtime_id or self.runtime_id, name, generation, self.rng.randbytes(48)
        )

    def handle(self, command: Any) -> tuple[object, ...]:
        """Run one command; keep the new state, log and effects; return its events.

        With ``check_caches`` set, the core's derived caches (which rules may be due, node
        statuses already derived) must change nothing: the command decided on a copy whose
        caches are dropped gives the same events (or the same refusal), and so does
        ``next_deadline`` afterwards.
        """
        if self.check_caches:
            try:
                expected: object = decide(recomputed(self.state), command)
            except DomainError as err:
                expected = type(err)
        try:
            d = handle(self.state, command)
        except DomainError as err:
            if self.check_caches:
                assert expected is type(err), f"{command!r}: {err!r}; from scratch {expected}"
            raise
        if self.check_caches:
            assert d.events == expected, f"{command!r}: cached {d.events}, from scratch {expected}"
            assert next_deadline(d.state) == next_deadline(recomputed(d.state))
        self.state = d.state
        self.log.extend(d.events)
        self.effects.extend(d.effects)
        self.now = max(self.now, command.at)
        for fx in d.effects:
            if isinstance(fx, StartSession) and fx.node in self.machines:  # adopt() does the first
                self.sessions[fx.node] = fx.session
        for name in list(self.sessions):
            if self.state.node(name) is None:
                del self.sessions[name], self.reports[name], self.machines[name]
        return d.events

    def refused(self, command: Any, error: type[DomainError] = DomainError) -> DomainError:
        """Assert the core refuses ``command`` with ``error`` and leaves the state as it was."""
        before = self.state.fingerprint()
        with pytest.raises(error) as info:
            handle(self.state, command)
        assert self.state.fingerprint() == before, "a refused command changed the state"
        return info.value

    def at(self, at: float | None) -> float:
        return self.now if at is None else at

    # --- commands ---------------------------------------------------------------------------

    def key_text(self, name: KeyName = KeyName.KEY1) -> str:
        return self.keys[name].text

    def register_cmd(
        self,
        node: str,
        *,
        machine: str | None = None,
        key: str | None = None,
        at: float | None = None,
        remote_access: bool = True,
        cores: int = 4,
        memory_mb: int = 8192,
    ) -> RegisterNode:
        return RegisterNode(
            self.key_text() if key is None else key, node, machine or f"machine-{node}",
            cores, memory_mb, self.at(at), NodeMetrics(remote_access=remote_access),
        )

    def register(self, node: str, **kw: Any) -> tuple[object, ...]:
        """Register ``node`` (key1 unless ``key=``); it reports healthy metrics from then on."""
        command = self.register_cmd(node, **kw)
        events = self.handle(command)
        self.adopt(command)
        return events

    def adopt(self, command: RegisterNode) -> None:
        """Play the registered machine: session 1, healthy metrics (version 5.0, config a)."""
        node = command.node
        if self.state.node(node) is None or node in self.sessions:
            return
        self.sessions[node] = 1
        self.machines[node] = command.machine_id
        self.reports[node] = NodeMetrics(
            available_memory_mb=command.memory_mb, version=VERSION, config_hash=CONFIG,
            remote_access=command.metrics.remote_access,
        )

    def register_n(self, n: int, *, at: float | None = None) -> list[str]:
        """Register nodes n1..n<n> (those not registered yet); return all their names."""
        out = [f"n{i}" for i in range(1, n + 1)]
        for name in out:
            if name not in self.sessions:
                self.register(name, at=at)
        return out

    def metrics(self, node: str, **changes: Any) -> NodeMetrics:
        """What ``node`` reports: its standing report, every other node reachable (none if it
        is in ``isolated``), ``changes``."""
        others = tuple(sorted(p for p in self.sessions if p != node))
        peers = () if node in self.isolated else others
        changes.setdefault("reachable_peers", peers)
        return attrs.evolve(self.reports[node], **changes)

    def report(self, node: str, **changes: Any) -> None:
        """Change what ``node`` reports from now on (e.g. ``control_channel_ok=False``)."""
        self.reports[node] = attrs.evolve(self.reports[node], **changes)

    def heartbeat_cmd(
        self, node: str, *, at: float | None = None, session: int | None = None, **changes: Any
    ) -> Heartbeat:
        return Heartbeat(
            node, self.sessions[node] if session is None else session,
            self.metrics(node, **changes), self.at(at),
        )

    def heartbeat(self, node: str, at: float | None = None, **kw: Any) -> tuple[object, ...]:
        return self.handle(self.heartbeat_cmd(node, at=at, **kw))

    def heartbeat_all(
        self, at: float | None = None, *, skip: Sequence[str] = ()
    ) -> tuple[object, ...]:
        """Every registered node not in ``skip`` heartbeats at ``at``, in registration order."""
        out: list[object] = []
        for n in self.state.nodes:
            if n.name not in skip:
                out.extend(self.heartbeat(n.name, at=at))
        return tuple(out)

    def tick(self, at: float | None = None) -> tuple[object, ...]:
        return self.handle(Tick(self.at(at)))

    def run(self, until: float, *, every: float = 10.0, skip: Sequence[str] = ()) -> list[object]:
        """Heartbeat every ``every`` seconds (except ``skip``) and tick at every deadline that
        falls before ``until``, the way a host's loop would; return the events."""
        out: list[object] = []
        t = self.now
        ticked: float | None = None
        while True:
            beat = t + every
            deadline = next_deadline(self.state)
            if deadline is not None and self.now <= deadline <= min(beat, until):
                assert deadline != ticked, f"a tick at the deadline {deadline} changed nothing"
                ticked = deadline
                out.extend(self.tick(deadline))
                continue
            if beat > until:
                break
            t = beat
            out.extend(self.heartbeat_all(t, skip=skip))
        return out

    def remove(self, node: str, at: float | None = None) -> tuple[object, ...]:
        return self.handle(RemoveNode(node, self.at(at)))

    def regenerate(self, name: KeyName, at: float | None = None) -> tuple[object, ...]:
        key = self.new_key(name, self.keys[name].generation + 1)
        events = self.handle(RegenerateAuthKey(key, self.at(at)))
        self.keys[name] = key
        return events

    def start_upgrade(self, node: str, to: str, at: float | None = None) -> tuple[object, ...]:
        return self.handle(StartUpgrade(node, to, self.at(at)))

    def finish_upgrade(
        self, node: str, ok: bool, at: float | None = None, released_at: float | None = None
    ) -> tuple[object, ...]:
        """Report the update's end; on success ``node`` reports the new version from then on."""
        target = self.state.node(node).upgrading_to if self.state.node(node) else None
        events = self.handle(FinishUpgrade(node, ok, self.at(at), released_at))
        if ok and target is not None:
            self.report(node, version=target, version_released_at=released_at)
        return events

    # --- jobs -------------------------------------------------------------------------------

    def submit(self, job: str, key: str | None = None, at: float | None = None,
               **kw: Any) -> tuple[object, ...]:
        return self.handle(SubmitJob(job, key or f"key-{job}", self.at(at), **kw))

    def submit_n(self, n: int, prefix: str = "j", **kw: Any) -> list[str]:
        """Submit jobs <prefix>1..<prefix><n>; return their ids."""
        jobs = [f"{prefix}{i}" for i in range(1, n + 1)]
        for j in jobs:
            self.submit(j, **kw)
        return jobs

    def dispatch(self, at: float | None = None, *, max_jobs: int | None = None) -> list[JobLeased]:
        """The dispatcher of the current term dispatches; return the leases it made."""
        node, term = self.state.dispatcher, self.state.term
        assert node is not None, "no dispatcher"
        return of_type(self.handle(DispatchJobs(node, term, self.at(at), max_jobs)), JobLeased)

    def token(self, job: str) -> LeaseToken:
        lease = self.state.jobs.leases.get(job)
        assert lease is not None, f"{job} is not leased"
        return lease.token

    def tokens(self, node: str) -> list[LeaseToken]:
        return sorted((ls.token for ls in self.state.jobs.leases.values()
                       if ls.token.node == node), key=lambda t: t.job_id)

    def complete(self, job: str, at: float | None = None) -> tuple[object, ...]:
        return self.handle(CompleteJob(self.token(job), self.at(at)))

    def queue(self) -> list[str]:
        """Queued job ids, oldest first (all requirement queues merged by submission order)."""
        b = self.state.jobs
        queued = [j for q in b.queues.values() for j in q]
        return sorted(queued, key=lambda j: b.jobs[j].seq)

    # --- reads ------------------------------------------------------------------------------

    def status(self, node: str) -> NodeStatus:
        n = self.state.node(node)
        assert n is not None, f"{node} is not registered"
        return n.status

    def reasons(self, node: str) -> tuple[str, ...]:
        n = self.state.node(node)
        assert n is not None, f"{node} is not registered"
        return n.reasons
