"""Properties of the runtime lifecycle over random command sequences (Hypothesis, stateful).

The machine drives ``Rig`` (tests/rig.py) with registrations under valid and
invalid keys, heartbeats of random subsets with random metrics, hibernation (a node stops
heartbeating and later wakes under its old session), time jumps, ticks, removals, key
regeneration and updates. After every command it checks:

- refused commands (``DomainError``) leave the fingerprint unchanged, and never name a secret;
- decider laws: repeating a just-applied command at the same time yields no events, and
  ``fold(fold(a), b) == fold(a + b)`` (checked per step and over the whole log at the end);
- never more than ``max_nodes`` (<= 4) nodes;
- one dispatcher per term, terms strictly increasing across the event stream;
- the dispatcher is an eligible node, and "no dispatcher" only when none is eligible;
- every status change is a listed ``rules.TRANSITIONS`` edge (a ``NodeStatusChanged`` that keeps
  the status changes only the reasons);
- ``next_deadline`` lies ahead of the state's clock, a tick before it yields nothing, a tick at
  it yields something, and it equals the deadline of a fresh fold of the log;
- a node back from hibernation cannot act under its old session (``StaleSession``).

Set SHIR_LIFECYCLE_EXAMPLES to run more (or fewer) examples than the default 200.
"""

from __future__ import annotations

import os

import attrs
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from rig import DAY_S, Rig

from shir.core import (
    DispatcherChanged,
    DomainError,
    FinishUpgrade,
    Heartbeat,
    KeyName,
    NodeRegistered,
    NodeRemoved,
    NodeStatus,
    NodeStatusChanged,
    RegenerateAuthKey,
    RemoveNode,
    RuntimeSettings,
    StartUpgrade,
    Tick,
    decide,
    fold,
    initial,
    next_deadline,
)
from shir.core.errors import StaleSession
from shir.core.rules import TRANSITIONS, is_eligible_dispatcher
from shir.core.state import FIRST_HEARTBEAT_PENDING

EXAMPLES = int(os.environ.get("SHIR_LIFECYCLE_EXAMPLES", "200"))
STEPS = 80

NAMES = ("n1", "n2", "n3", "n4", "n5")
MACHINES = ("m1", "m2", "m3", "m4", "m5")
VERSIONS = ("5.0", "5.1", "4.9")
EDGES = frozenset((t.source, t.target) for t in TRANSITIONS)

names = st.sampled_from(NAMES)
# Time a command waits before it is sent: mostly none, sometimes past a deadline or an expiry.
gaps = st.sampled_from([0.0, 0.0, 0.0, 5.0, 40.0, 150.0, 700.0])
# Seconds until a version's warning (275 days old) or expiry (365 days old) falls due.
releases = st.one_of(
    st.none(),
    st.tuples(st.sampled_from([275, 365]), st.floats(0, 60)),
)


class Lifecycle(RuleBasedStateMachine):
    c: Rig

    @initialize(
        expiry=st.sampled_from([None, 100.0]),
        warning_days=st.sampled_from([90, 0]),
        max_nodes=st.sampled_from([4, 4, 2]),
        seed=st.integers(0, 2**16),
        start_with=st.integers(0, 4),
    )
    def create(
        self, expiry: float | None, warning_days: int, max_nodes: int, seed: int,
        start_with: int,
    ) -> None:
        self.c = Rig(
            RuntimeSettings(
                offline_expiry_s=expiry, version_warning_days=warning_days, max_nodes=max_nodes
            ),
            seed=seed,
            check_caches=True,
        )
        self.asleep: set[str] = set()
        self.old_keys: list[str] = []
        self.foreign_key = Rig(runtime_id="rt-other", seed=seed + 1).key_text()
        self.status: dict[str, tuple[NodeStatus, tuple[str, ...]]] = {}
        self.term = 0
        self.term_holder: dict[int, str | None] = {}
        self.observe(self.c.log)
        for name in NAMES[: min(start_with, max_nodes)]:  # most runs start with a cluster
            command = self.c.register_cmd(name)
            self.run(command)
            self.c.adopt(command)
        self.heartbeat_awake(1.0)

    # --- the checks every command goes through ----------------------------------------------

    def run(self, command: object) -> tuple[object, ...] | DomainError:
        """Decide and apply ``command`` through the cluster, checking the per-step properties."""
        c = self.c
        before = c.state.copy()
        fingerprint = before.fingerprint()
        try:
            events = c.handle(command)
        except DomainError as err:
            assert c.state.fingerprint() == fingerprint, f"refused {command!r} changed the state"
            for key in c.keys.values():
                assert key.text.rsplit("@", 1)[1] not in str(err), "a refusal named a secret"
            event(f"refused: {type(err).__name__}")
            return err
        if events:
            assert fold(before, events) == c.state  # fold(fold(a), b) == fold(a + b), per step
            assert c.state.now == command.at  # type: ignore[attr-defined]
        assert decide(c.state, command) == (), f"repeating {command!r} yielded events"
        self.observe(events)
        return events

    def observe(self, events: tuple[object, ...] | list[object]) -> None:
        for e in events:
            event(f"event: {type(e).__name__}")
            if isinstance(e, NodeRegistered):
                self.status[e.node] = (NodeStatus.INITIALIZING, (FIRST_HEARTBEAT_PENDING,))
            elif isinstance(e, NodeStatusChanged):
                source, reasons = self.status[e.node]
                if e.status is source:
                    assert e.reasons != reasons, f"{e} changed nothing"
                else:
                    assert (source, e.status) in EDGES, f"unlisted {source} -> {e.status}"
                self.status[e.node] = (e.status, e.reasons)
            elif isinstance(e, NodeRemoved):
                del self.status[e.node]
                self.asleep.discard(e.node)
            elif isinstance(e, DispatcherChanged):
                assert e.term > self.term, f"term {e.term} after {self.term}"
                assert e.term not in self.term_holder
                self.term, self.term_holder[e.term] = e.term, e.node

    # --- rules ------------------------------------------------------------------------------

    @rule(
        node=names,
        machine=st.sampled_from(MACHINES),
        key=st.sampled_from(["key1", "key2", "key1", "old", "foreign", "garbled", "text"]),
        text=st.text(max_size=30),
        remote_access=st.booleans(),
        position=st.integers(0, 60),
        gap=gaps,
    )
    def register(
        self, node: str, machine: str, key: str, text: str, remote_access: bool, position: int,
        gap: float,
    ) -> None:
        c = self.c
        c.now += gap
        valid = c.key_text(KeyName.KEY1 if key == "key1" else KeyName.KEY2)
        if key == "old":
            key_text = self.old_keys[position % len(self.old_keys)] if self.old_keys else text
        elif key == "foreign":
            key_text = self.foreign_key
        elif key == "garbled":
            i = position % len(valid)
            key_text = valid[:i] + (text[:1] or "x") + valid[i + 1 :]
        elif key == "text":
            key_text = text
        else:
            key_text = valid
        command = c.register_cmd(
            node, machine=machine, key=key_text, remote_access=remote_access
        )
        if not isinstance(self.run(command), DomainError):
            c.adopt(command)

    @rule(
        nodes=st.sets(names, min_size=1),
        drop=st.sets(names, max_size=2),
        cpu=st.floats(0, 100),
        dt=st.floats(0, 15),
    )
    def heartbeat(self, nodes: set[str], drop: set[str], cpu: float, dt: float) -> None:
        c = self.c
        c.now += dt
        for n in sorted(nodes):
            if n in c.sessions and n not in self.asleep:
                peers = tuple(p for p in sorted(c.sessions) if p != n and p not in drop)
                self.run(c.heartbeat_cmd(n, reachable_peers=peers, cpu_pct=cpu))

    @rule(dt=st.floats(0, 30))
    def heartbeat_awake(self, dt: float) -> None:
        c = self.c
        c.now += dt
        for n in sorted(c.sessions):
            if n not in self.asleep and n in c.sessions:
                self.run(c.heartbeat_cmd(n))

    @rule(
        node=names,
        field=st.sampled_from(["control", "version", "config", "remote", "released"]),
        flag=st.booleans(),
        version=st.sampled_from(VERSIONS),
        release=releases,
    )
    def change_report(
        self, node: str, field: str, flag: bool, version: str,
        release: tuple[int, float] | None,
    ) -> None:
        """Change what ``node`` reports from now on, and heartbeat it unless it sleeps."""
        c = self.c
        if node not in c.reports:
            return
        if field == "control":
            c.report(node, control_channel_ok=flag)
        elif field == "version":
            c.report(node, version=version)
        elif field == "config":
            c.report(node, config_hash="cfg-a" if flag else "cfg-b")
        elif field == "remote":
            c.report(node, remote_access=flag)
        else:
            c.report(node, version_released_at=self.released(release))
        if node not in self.asleep:
            self.run(c.heartbeat_cmd(node))

    def released(self, release: tuple[int, float] | None) -> float | None:
        if release is None:
            return None
        age_days, in_s = release
        return self.c.now + in_s - age_days * DAY_S

    @rule(dt=st.one_of(st.floats(0, 60), st.floats(60, 800)))
    def advance(self, dt: float) -> None:
        self.c.now += dt

    @rule(offset=st.floats(0, 1, exclude_max=True))
    def tick_at_deadline(self, offset: float) -> None:
        c = self.c
        deadline = next_deadline(c.state)
        if deadline is None:
            return
        now = c.state.now
        early = now + (deadline - now) * offset
        if now <= early < deadline:
            assert decide(c.state, Tick(early)) == (), "a tick before the deadline did something"
        c.now = max(c.now, deadline)
        events = self.run(Tick(c.now))
        assert events, f"a tick at the deadline {deadline} found nothing due"

    @rule()
    def tick_now(self) -> None:
        self.run(Tick(self.c.now))

    @precondition(lambda self: len(self.asleep) < len(self.c.sessions))
    @rule(node=names)
    def hibernate(self, node: str) -> None:
        if node in self.c.sessions:
            self.asleep.add(node)

    @precondition(lambda self: bool(self.asleep))
    @rule(data=st.data(), dt=st.floats(0, 120))
    def wake(self, data: st.DataObject, dt: float) -> None:
        c = self.c
        node = data.draw(st.sampled_from(sorted(self.asleep)))
        self.asleep.discard(node)
        c.now += dt
        old = c.sessions[node]
        command = c.heartbeat_cmd(node)
        self.run(command)
        if node in c.sessions and c.sessions[node] != old:
            # The node rejoined: anything else under its old session is refused from now on.
            again = Heartbeat(node, old, attrs.evolve(command.metrics, cpu_pct=-1.0), c.now)
            assert isinstance(self.run(again), StaleSession)
            event("fenced: old session refused after a rejoin")

    @rule(node=names, gap=gaps)
    def remove(self, node: str, gap: float) -> None:
        self.c.now += gap
        self.run(RemoveNode(node, self.c.now))

    @rule(slot=st.sampled_from(KeyName), gap=gaps)
    def regenerate(self, slot: KeyName, gap: float) -> None:
        c = self.c
        c.now += gap
        key = c.new_key(slot, c.keys[slot].generation + 1)
        old = c.keys[slot].text
        if not isinstance(self.run(RegenerateAuthKey(key, c.now)), DomainError):
            self.old_keys.append(old)
            c.keys[slot] = key

    @rule(node=names, version=st.sampled_from(VERSIONS), gap=gaps)
    def start_upgrade(self, node: str, version: str, gap: float) -> None:
        self.c.now += gap
        self.run(StartUpgrade(node, version, self.c.now))

    @rule(node=names, ok=st.booleans(), release=releases, gap=gaps)
    def finish_upgrade(
        self, node: str, ok: bool, release: tuple[int, float] | None, gap: float
    ) -> None:
        c = self.c
        c.now += gap
        record = c.state.node(node)
        target = record.upgrading_to if record else None
        released = self.released(release)
        result = self.run(FinishUpgrade(node, ok, c.now, released))
        if ok and target is not None and not isinstance(result, DomainError):
            c.report(node, version=target, version_released_at=released)

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def at_most_max_nodes(self) -> None:
        assert len(self.c.state.nodes) <= self.c.settings.max_nodes <= 4

    @invariant()
    def the_dispatcher_is_eligible(self) -> None:
        state = self.c.state
        eligible = [n.name for n in state.nodes if is_eligible_dispatcher(n)]
        if state.dispatcher is None:
            assert not eligible, f"nobody dispatches, yet {eligible} could"
        else:
            assert state.dispatcher in eligible, f"{state.dispatcher} dispatches, not eligible"
        assert (state.term, state.dispatcher) == (
            self.term, self.term_holder.get(self.term) if self.term else None
        )

    @invariant()
    def drivers_know_their_sessions(self) -> None:
        for n in self.c.state.nodes:
            assert self.c.sessions[n.name] == n.session

    @invariant()
    def the_deadline_lies_ahead(self) -> None:
        state = self.c.state
        deadline = next_deadline(state)
        assert deadline is None or deadline > state.now, f"deadline {deadline} <= {state.now}"

    def teardown(self) -> None:
        if not hasattr(self, "c"):
            return
        log, state = self.c.log, self.c.state
        fresh = fold(initial(), log)
        assert fresh == state
        assert next_deadline(fresh) == next_deadline(state)
        half = len(log) // 2
        assert fold(fold(initial(), log[:half]), log[half:]) == state


Lifecycle.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycle = Lifecycle.TestCase
