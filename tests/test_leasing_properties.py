"""Properties of job leasing over random interleavings, checked on the full event stream.

A schedule is a list of operations: submit (keys drawn from a small pool, so duplicates are
common), dispatch by the current dispatcher, dispatch by a node under the term it last heard of,
renew, complete (sometimes twice), abandon, fail, replay of any token ever delivered (mostly
stale), a node going silent (lost or hibernating) and waking (sometimes acting on its old work
before its first heartbeat), removal and re-registration, credential and limit changes, and time
advancing while a host loop heartbeats the awake nodes and ticks at every deadline.

Nodes only learn what the effects tell them (``DeliverJob``, ``StopJob``, ``StartSession``,
``AnnounceDispatcher``) while awake, as real nodes would. After the schedule, every node wakes,
holds every credential version, heartbeats, and completes everything it is given until the
queue drains.

Checked after every command: a refused command changes nothing; no lease survives on an Offline
or removed node; commands that should succeed (dispatch by the dispatcher, acting on a live
lease) do. Checked on the event stream (``check_stream``): one live lease per job; no assignment
above a node's limit or to a node lacking the job's credentials; delivery numbers go up by one;
a queued, running or recently completed key is never queued again, and is at most once
completed per duplicate window; and at the end, every submitted job ended exactly once
(completed or dead-lettered), none lost. Finally, replaying the log from scratch gives the
same state.

Set SHIR_LEASING_EXAMPLES to run more examples than the fast default.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import attrs
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from rig import Rig

from shir.core import (
    AbandonJob,
    AnnounceDispatcher,
    CompleteJob,
    CredentialVersion,
    DeliverJob,
    DispatcherChanged,
    DispatchJobs,
    DomainError,
    FailJob,
    Heartbeat,
    HeartbeatReceived,
    JobCompleted,
    JobDeadLettered,
    JobLeased,
    JobReleased,
    JobSubmitted,
    LeaseRenewed,
    LeasesRenewed,
    LeaseToken,
    NodeMetrics,
    NodeRegistered,
    NodeStatus,
    RemoveNode,
    RenewLease,
    RuntimeSettings,
    RuntimeState,
    SetConcurrencyLimit,
    StaleLease,
    StopJob,
    SubmitJob,
    Tick,
    UnknownJob,
    fold,
    initial,
    job_stats,
    next_deadline,
)
from shir.core.errors import StaleTerm
from shir.core.jobs import requirement_of
from shir.core.leasing import NotDispatcher
from shir.sim.invariants import Checkers

NODES = ("n1", "n2", "n3")
DB = "db"
SETTINGS = RuntimeSettings(max_deliveries=3, duplicate_window_s=120.0)
HEARTBEAT_S = SETTINGS.heartbeat_interval_s
EXAMPLES = int(os.environ.get("SHIR_LEASING_EXAMPLES", "200"))

# (needs, carried): none; version 1; version 2; version 3 carried; version 3 not carried (it
# waits until a node holds version 3, which every node does in the final phase)
NEEDS: tuple[tuple[tuple[CredentialVersion, ...], tuple[str, ...]], ...] = (
    ((), ()),
    ((CredentialVersion(DB, 1),), ()),
    ((CredentialVersion(DB, 2),), ()),
    ((CredentialVersion(DB, 3),), (DB,)),
    ((CredentialVersion(DB, 3),), ()),
)
STALE = (StaleLease, UnknownJob)


class World:
    """One runtime with three nodes, driven as hosts and nodes would drive it: the shared
    ``rig.Rig`` keeps the state, log, effects and sessions; this adds what nodes know and do."""

    def __init__(self) -> None:
        self.rig = Rig(SETTINGS, runtime_id="rt-p", seed=11, check_caches=True)
        self.awake = dict.fromkeys(NODES, True)
        self.creds = dict.fromkeys(NODES, 2)  # the version of DB each node holds
        self.held: dict[str, list[LeaseToken]] = {n: [] for n in NODES}  # what each node runs
        self.heard_term = dict.fromkeys(NODES, 0)  # the latest term each node was told of
        self.history: list[LeaseToken] = []  # every token ever delivered
        self.completed_at: dict[str, float] = {}  # idempotency key -> last completion
        self.jobs = 0
        self.notes: set[str] = set()  # what happened, for Hypothesis' statistics
        for n in NODES:
            self.register(n)
        for n in NODES:
            self.heartbeat(n)

    # --- plumbing ---------------------------------------------------------------------------

    @property
    def state(self) -> RuntimeState:
        return self.rig.state

    @property
    def log(self) -> list[object]:
        return self.rig.log

    @property
    def now(self) -> float:
        return self.rig.now

    @now.setter
    def now(self, t: float) -> None:
        self.rig.now = t

    @property
    def sessions(self) -> dict[str, int]:
        return self.rig.sessions

    def handle(self, command: Any, allowed: tuple[type[DomainError], ...] = ()
               ) -> tuple[object, ...] | None:
        """Run ``command``; a refusal must be one of ``allowed`` and must change nothing."""
        before = self.state.fingerprint()
        seen = len(self.rig.effects)
        try:
            events = self.rig.handle(command)
        except DomainError as err:
            assert isinstance(err, allowed), f"{command!r} refused: {err!r}"
            assert self.state.fingerprint() == before, f"refused {command!r} changed the state"
            self.notes.add(f"refused: {type(err).__name__}")
            return None
        for e in events:
            if isinstance(e, JobCompleted):
                self.completed_at[e.idempotency_key] = e.at
            elif isinstance(e, (JobReleased, JobDeadLettered)):
                self.notes.add(f"{type(e).__name__}: {e.reason.value}")
        for fx in self.rig.effects[seen:]:
            self.receive(fx)
        self.check_leases_end_with_their_node()
        return events

    def receive(self, fx: object) -> None:
        """Nodes act on effects only while awake (a hibernating node misses them); the rig
        adopts each ``StartSession``."""
        if isinstance(fx, AnnounceDispatcher):
            for n in NODES:
                if self.awake[n]:
                    self.heard_term[n] = fx.term
        elif isinstance(fx, DeliverJob):
            self.history.append(fx.token)
            if self.awake[fx.token.node]:
                self.held[fx.token.node].append(fx.token)
        elif (isinstance(fx, StopJob) and self.awake[fx.token.node]
              and fx.token in self.held[fx.token.node]):
            self.held[fx.token.node].remove(fx.token)

    def check_leases_end_with_their_node(self) -> None:
        for lease in self.state.jobs.leases.values():
            node = self.state.node(lease.token.node)
            assert node is not None, f"{lease.token} outlived its removed node"
            assert node.status is not NodeStatus.OFFLINE, f"{lease.token} outlived its node"

    def live(self, token: LeaseToken) -> bool:
        lease = self.state.jobs.leases.get(token.job_id)
        return lease is not None and lease.token == token

    # --- nodes ------------------------------------------------------------------------------

    def register(self, node: str) -> None:
        command = self.rig.register_cmd(node, cores=2, memory_mb=4096)
        self.handle(command)
        self.rig.adopt(command)

    def metrics(self, node: str) -> NodeMetrics:
        return NodeMetrics(
            available_memory_mb=4096, version="5.0", config_hash="cfg", remote_access=True,
            reachable_peers=tuple(p for p in NODES if p != node),
            credentials=(CredentialVersion(DB, self.creds[node]),),
        )

    def heartbeat(self, node: str) -> None:
        self.handle(Heartbeat(node, self.sessions[node], self.metrics(node), self.now))

    def advance(self, dt: float) -> None:
        """A host loop: awake nodes heartbeat every 10 s; a tick at every deadline."""
        end = self.now + dt
        while True:
            deadline = next_deadline(self.state)
            beat = (math.floor(self.now / HEARTBEAT_S) + 1) * HEARTBEAT_S
            t = min(end, beat, math.inf if deadline is None else max(deadline, self.now))
            if deadline is not None and deadline <= t:
                self.handle(Tick(t))
                after = next_deadline(self.state)
                assert after is None or after > t, f"Tick({t}) left deadline {after} due"
            self.now = t
            if t == beat:
                for n in NODES:
                    if self.awake[n]:
                        self.heartbeat(n)
            if t >= end:
                return

    # --- operations -------------------------------------------------------------------------

    def submit(self, again: int | None, needs_index: int, count: int = 1) -> None:
        """Submit ``count`` jobs with new keys, or one with the key of an earlier submission."""
        if again is None:
            for _ in range(count):
                self.submit_key(f"k{self.jobs + 1}", needs_index)
        else:
            self.submit_key(f"k{again % self.jobs + 1 if self.jobs else 1}", needs_index)

    def submit_key(self, key: str, needs_index: int) -> None:
        self.jobs += 1
        done = self.completed_at.get(key)
        fresh = key not in self.state.jobs.active_keys and (
            done is None or self.now - done >= SETTINGS.duplicate_window_s)
        needs, carried = NEEDS[needs_index]
        events = self.handle(SubmitJob(f"j{self.jobs}", key, self.now, needs, carried))
        assert events is not None
        assert any(isinstance(e, JobSubmitted) for e in events) == fresh, (
            f"key {key}: expected {'a new job' if fresh else 'a duplicate'}")
        if not fresh:
            self.notes.add("duplicate key")
        elif done is not None:
            self.notes.add("key again after the duplicate window")

    def dispatch(self, one: bool = False) -> None:
        d = self.state.dispatcher
        if d is not None and self.awake[d]:
            self.handle(DispatchJobs(d, self.state.term, self.now, 1 if one else None))

    def dispatch_as_heard(self, node: str) -> None:
        """``node`` dispatches under the term it last heard of (stale after a gap)."""
        if self.awake[node] and self.state.node(node) is not None:
            current = (self.state.dispatcher, self.state.term) == (node, self.heard_term[node])
            allowed = () if current else (StaleTerm, NotDispatcher)
            self.handle(DispatchJobs(node, self.heard_term[node], self.now), allowed)

    def act(self, verb: str, node: str, index: int, twice: bool = False) -> None:
        if not self.awake[node] or not self.held[node]:
            return
        token = self.held[node][index % len(self.held[node])]
        self.send(verb, token, twice)

    def renew(self, node: str, index: int) -> None:
        self.act("renew", node, index)

    def complete(self, node: str, index: int, twice: bool) -> None:
        self.act("complete", node, index, twice)

    def abandon(self, node: str, index: int) -> None:
        self.act("abandon", node, index)

    def fail(self, node: str, index: int) -> None:
        self.act("fail", node, index)

    def send(self, verb: str, token: LeaseToken, twice: bool = False) -> None:
        command = {
            "renew": RenewLease, "complete": CompleteJob, "abandon": AbandonJob, "fail": FailJob,
        }[verb](token, self.now)
        self.handle(command, () if self.live(token) else STALE)
        if verb != "renew" and token in self.held[token.node]:
            self.held[token.node].remove(token)
        if twice and verb == "complete":
            before = len(self.log)
            again = self.handle(command, STALE)
            assert not again, f"a second {command!r} had events: {again}"
            assert len(self.log) == before

    def replay(self, index: int) -> None:
        """A node sends completion for any token it was ever given (duplicated message)."""
        if self.history:
            token = self.history[index % len(self.history)]
            if self.awake[token.node]:
                self.send("complete", token)

    def silence(self, node: str) -> None:
        self.awake[node] = False

    def wake(self, node: str, act_first: bool) -> None:
        if self.awake[node]:
            return
        self.awake[node] = True
        if act_first:  # finishes what it ran before the gap, then heartbeats
            for token in list(self.held[node]):
                self.send("complete", token)
        self.heartbeat(node)

    def set_limit(self, node: str, limit: int | None) -> None:
        self.handle(SetConcurrencyLimit(node, limit, self.now))

    def rotate(self, node: str, version: int) -> None:
        self.creds[node] = version
        if self.awake[node]:
            self.heartbeat(node)

    def remove(self, node: str) -> None:
        """Remove ``node``; the same machine registers again at once."""
        self.handle(RemoveNode(node, self.now))
        self.held[node].clear()
        self.heard_term[node] = 0
        self.register(node)
        if self.awake[node]:
            self.heartbeat(node)

    def drain(self) -> None:
        """Final phase: everyone recovers, holds every version, and completes what it gets."""
        for n in NODES:
            self.creds[n] = 3
            if self.awake[n]:
                self.heartbeat(n)
            else:
                self.wake(n, act_first=False)
        for _ in range(200):
            stats = job_stats(self.state)
            if stats.queued == 0 and stats.running == 0:
                return
            self.advance(5.0)
            self.dispatch()
            for n in NODES:
                for token in list(self.held[n]):
                    self.send("complete", token)
        stats = job_stats(self.state)
        raise AssertionError(f"the queue did not drain once nodes recovered: {stats}")


# --- the checker on the event stream ---------------------------------------------------------

def _holds(creds: tuple[CredentialVersion, ...], need: tuple[CredentialVersion, ...]) -> bool:
    held = {c.credential_id: c.version for c in creds}
    return all(held.get(c.credential_id, 0) >= c.version for c in need)


def check_stream(log: list[object], s: RuntimeSettings, final: bool) -> None:
    # The lease rules (one live lease per job, renewals and ends name it, deliveries go up by
    # one, leases only in the current term, no node above its limit, terms grow by one) are the
    # simulator's own checkers, the one lease checker; this adds what a leasing test also knows.
    # (Its "effects" check counts a key completed twice at all: the simulator never reuses a key,
    # these schedules do after the duplicate window, which the checks below allow.)
    checkers = Checkers(clock=lambda: 0.0, presented_generation=lambda node: None)
    checkers.on_events(log)
    broken = [v for v in checkers.violations if " effects: " not in v]
    assert not broken, "\n".join(broken)
    creds: dict[str, tuple[CredentialVersion, ...]] = {}
    live: set[str] = set()
    need: dict[str, tuple[CredentialVersion, ...]] = {}
    key_of: dict[str, str] = {}
    ended: Counter[str] = Counter()
    active: dict[str, str] = {}
    completed_at: dict[str, float] = {}

    for e in log:
        if isinstance(e, (NodeRegistered, HeartbeatReceived)):
            creds[e.node] = e.metrics.credentials
        elif isinstance(e, JobSubmitted):
            key = e.idempotency_key
            assert e.job_id not in key_of, f"job id {e.job_id} queued twice"
            assert key not in active, f"key {key} queued again while {active.get(key)} is live"
            done = completed_at.get(key)
            assert done is None or e.at - done >= s.duplicate_window_s, (
                f"key {key} queued again {e.at - done:g} s after its completion")
            key_of[e.job_id] = key
            active[key] = e.job_id
            need[e.job_id] = requirement_of(e.needs, e.carried)
        elif isinstance(e, JobLeased):
            job, node = e.token.job_id, e.token.node
            assert job in key_of and not ended[job], f"{job} leased but not queued"
            assert _holds(creds[node], need[job]), f"{node} lacks {need[job]} for {job}"
            live.add(job)
        elif isinstance(e, LeaseRenewed):
            assert e.expires_at == e.at + s.lock_duration_s
        elif isinstance(e, LeasesRenewed):
            assert e.expires_at == e.at + s.lock_duration_s
            jobs = [t.job_id for t in e.tokens]
            assert jobs and len(set(jobs)) == len(jobs), f"renewed {jobs}: empty or twice"
            assert all(j in live for j in jobs), f"renewed {jobs}, live are {sorted(live)}"
        elif isinstance(e, JobCompleted):
            live.discard(e.token.job_id)
            key = e.idempotency_key
            assert key_of[e.token.job_id] == key
            done = completed_at.get(key)
            assert done is None or e.at - done >= s.duplicate_window_s, (
                f"key {key} completed twice within the duplicate window: a duplicate effect")
            completed_at[key] = e.at
            ended[e.token.job_id] += 1
            del active[key]
        elif isinstance(e, JobReleased):
            live.discard(e.token.job_id)
            assert e.token.delivery < s.max_deliveries, f"{e.token} should be dead-lettered"
        elif isinstance(e, JobDeadLettered):
            live.discard(e.token.job_id)
            assert e.token.delivery == s.max_deliveries, f"{e.token} dead-lettered early"
            assert e.detail, "a dead letter says why"
            ended[e.token.job_id] += 1
            del active[e.idempotency_key]
    if final:
        assert not live, f"leases left after draining: {sorted(live)}"
        wrong = {j: ended[j] for j in key_of if ended[j] != 1}
        assert not wrong, f"jobs not ended exactly once (lost or doubled): {wrong}"


# --- the property ----------------------------------------------------------------------------

node = st.sampled_from(NODES)
index = st.integers(0, 7)
# operation -> (weight, its arguments); one_of picks branches evenly, so weights repeat them
OPERATIONS: dict[str, tuple[int, tuple[st.SearchStrategy[Any], ...]]] = {
    "submit": (4, (st.none() | st.integers(0, 100), st.integers(0, len(NEEDS) - 1),
                   st.integers(1, 4))),
    "dispatch": (3, (st.booleans(),)),
    "advance": (3, (st.floats(0.5, 45.0, allow_nan=False),)),
    "complete": (3, (node, index, st.booleans())),
    "renew": (1, (node, index)),
    "abandon": (1, (node, index)),
    "fail": (2, (node, index)),
    "replay": (1, (st.integers(0, 1000),)),
    "dispatch_as_heard": (1, (node,)),
    "silence": (1, (node,)),
    "wake": (1, (node, st.booleans())),
    "set_limit": (1, (node, st.sampled_from([None, 1, 2, 3, 6]))),
    "rotate": (1, (node, st.integers(1, 3))),
    "remove": (1, (node,)),
}
OPS = st.one_of([
    st.tuples(st.just(name), *args)
    for name, (weight, args) in OPERATIONS.items() for _ in range(weight)
])


def run(ops: list[tuple[Any, ...]]) -> World:
    w = World()
    for op in ops:
        getattr(w, op[0])(*op[1:])
    check_stream(w.log, SETTINGS, final=False)
    w.drain()
    check_stream(w.log, SETTINGS, final=True)
    replayed = fold(initial(), w.log)
    assert replayed.fingerprint() == w.state.fingerprint(), "replaying the log differs"
    return w


HIBERNATING_DISPATCHER = [
    ("submit", None, 0, 2), ("submit", None, 1, 1), ("submit", None, 2, 1),
    ("submit", None, 3, 1), ("submit", None, 4, 1), ("submit", 0, 0, 1), ("dispatch", False),
    ("silence", "n1"), ("advance", 45.0),
    ("dispatch", False), ("wake", "n1", True), ("dispatch_as_heard", "n1"),
    ("complete", "n2", 0, True), ("fail", "n3", 0), ("replay", 0), ("set_limit", "n2", 1),
    ("remove", "n3"), ("advance", 45.0), ("advance", 45.0), ("dispatch", False),
]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(ops=HIBERNATING_DISPATCHER)
@given(ops=st.lists(OPS, min_size=20, max_size=80))
def test_leasing_invariants_hold_over_random_interleavings(ops: list[tuple[Any, ...]]) -> None:
    w = run(ops)
    for note in sorted(w.notes):
        event(note)


def test_the_hibernation_schedule_exercises_fencing() -> None:
    """The explicit example above does what it claims: a fenced dispatcher, redeliveries."""
    w = run(HIBERNATING_DISPATCHER)
    assert {"JobReleased: node_lost", "duplicate key", "refused: StaleTerm",
            "refused: StaleLease"} <= w.notes
    assert any(isinstance(e, DispatcherChanged) and e.node == "n2" for e in w.log)
    stats = job_stats(w.state)
    assert stats.submitted == 6 and stats.completed + stats.dead_lettered == 6


def test_check_stream_catches_a_second_live_lease() -> None:
    """The checker itself: a forged stream with two leases of one job must fail."""
    w = World()
    w.submit(0, 0)
    w.dispatch()
    leased = next(e for e in w.log if isinstance(e, JobLeased))
    forged = [*w.log, attrs.evolve(leased, token=attrs.evolve(leased.token, node="n2"))]
    try:
        check_stream(forged, SETTINGS, final=False)
    except AssertionError as err:
        assert "while" in str(err)
    else:
        raise AssertionError("check_stream missed a second live lease")
