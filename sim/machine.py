"""The cluster machine: a Hypothesis state machine over a simulated cluster, and replay.

Theory of operation
-------------------
:class:`ClusterMachine` is a Hypothesis ``RuleBasedStateMachine`` whose system under test is a
simulated cluster: a :class:`~shir.sim.world.World`, the simulator's own, driving the core
through the same :class:`~shir.core.driver.Driver`. Its rules do only what a scenario file can
say (a node joins, hibernates, crashes, is partitioned, a key is regenerated, any other fault
kind, time passes), each at the current simulated time, and every one is recorded. So whatever
the machine finds, the recorded schedule reproduces in the simulator: on failure it is printed
as a scenario TOML (:func:`to_toml`) with the ``shir sim run FILE --seed N`` command that
replays it, and Hypothesis has already shrunk it.

Replaying is exact, byte for byte, because the machine builds its World the way a scenario run
does and makes SimPy order simultaneous events as the replay will:

- every node the run may ever have is declared from the start (the network draws a latency for
  each message to each of them, joined or not); a node that never joined is written with a
  ``join_at_s`` far past the end;
- injections at one instant are applied before anything else happens at that instant (as the
  replay's fault timers, scheduled at set-up, come first), faults in recorded order, then joins
  in node order;
- the machine's own times lie on a grid (0.25, 1.25, 2.25, ...), never on the whole or half
  seconds where set-up timers fire and nodes that joined at 0 heartbeat, so no injection ties
  with an event the replay would order differently;
- the World runs with an endless duration; the end is chosen at teardown (at or after the
  workload stops), and there, as the replay's timers would, the machine takes the snapshot,
  heals every fault and drains.

``tests/test_property_machine.py`` checks this: the event log of random machine runs hashes the
same as ``World(machine.scenario()).run()``.

The invariants are the simulator's checkers (:class:`~shir.sim.invariants.Checkers`) plus
:class:`ClusterChecks`, which also watch the commands the core accepts: one dispatcher per
term, no dispatch under an old term, no lease held by an Offline node and none used after its
node went Offline. ``shir sim run`` checks only the former; :func:`replay` runs a scenario with
both.

The strategies the machine draws from (its set-ups among them) live in ``shir.sim.strategies``;
what it reports on failure (:class:`Failure`) and :func:`replay` in ``shir.sim.failure``.
``shir.sim.testing`` re-exports the public names of all three.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

try:
    from hypothesis import note
    from hypothesis import strategies as st
    from hypothesis.control import current_build_context
    from hypothesis.errors import StopTest, UnsatisfiedAssumption
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        initialize,
        invariant,
        precondition,
        rule,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shir.sim.testing needs Hypothesis: pip install 'shir[testing]' (or hypothesis)"
    ) from exc

from shir.core import events as ev
from shir.core.credentials import credential_status
from shir.core.model import NodeStatus
from shir.sim.failure import (
    SCHEDULE_DESCRIPTION,
    Failure,
    final_violations,
    record_failure,
    replay,
)
from shir.sim.faults import FAULT_KINDS, Fault
from shir.sim.invariants import ClusterChecks
from shir.sim.scenario import Scenario
from shir.sim.strategies import (
    CREDENTIALS,
    NEVER_S,
    ClusterSetup,
    cluster_setups,
    faults,
    profile,
)
from shir.sim.world import World

__all__ = [
    "ClusterMachine",
    "ClusterSetup",
    "Failure",
    "cluster_setups",
    "final_violations",
    "replay",
]

# --- the cluster machine -----------------------------------------------------------------------

_EDGE = 0.25  # the machine's times are k + 0.25 (see the module docstring)
# The drain may end once nothing but heartbeats happened for this long: longer than anything the
# World schedules after an event it caused (a duplicate submit comes up to 5 s after the
# original, retries of a refused or unstored command after 1 s).
_QUIET_S = 6.0
_MECHANICS = ("hibernate", "crash", "partition", "control_partition", "regenerate_key", "burst",
              "rotate_credential", "credential_drift")
_OTHER_KINDS = tuple(k for k in FAULT_KINDS if k not in _MECHANICS)
_node_index = st.integers(0, 4)
# How Hypothesis abandons an example (out of data, or an assumption failed): no failure to report.
_DISCARDED = (StopTest, UnsatisfiedAssumption)
_other_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], st.SearchStrategy[Fault]] = {}


def _other_faults(nodes: tuple[str, ...], credentials: tuple[str, ...]
                  ) -> st.SearchStrategy[Fault]:
    s = _other_cache.get((nodes, credentials))
    if s is None:
        s = _other_cache[nodes, credentials] = faults(nodes, st.just(0.0), _OTHER_KINDS,
                                                      credentials)
    return s


_durations = st.integers(1, 120).map(float)


class ClusterMachine(RuleBasedStateMachine):
    """A simulated cluster under random fault schedules; see the module docstring.

    Subclass it to add rules and invariants: read ``self.world`` (the World), ``self.state``
    (the core's state), ``self.now``, ``self.nodes`` (names of joined nodes); inject with
    :meth:`inject` (a ``Fault`` at ``self.now``) so that the schedule stays replayable (the
    ``advance`` rule lets time pass); check more at the end in :meth:`at_end`; call
    ``super().teardown()`` first if you override teardown.
    """

    drain_s = 60.0  # the longest drain after healing (it ends sooner once the cluster is at rest)
    drain_ends_at_rest = True  # False: always drain ``drain_s`` (an end check that needs time)
    failure_dir: Path | None = Path(".hypothesis") / "shir"
    last_failure: Failure | None = None  # set on the class whose run failed

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.setup: ClusterSetup | None = None
        self.now = 0.0
        self.horizon = 0.0  # the furthest time the machine has tried to reach
        self.faults: list[Fault] = []  # applied, in order
        self.joined: dict[str, float] = {}  # node -> when it joined (applied)
        self._pending: list[Fault] = []  # recorded at ``now``, applied before time moves on
        self._pending_joins: list[str] = []
        self.trace: list[str] = []  # what each recording rule did, in order
        self._last_term = 0
        self._end_s: float | None = None  # set by teardown: the scenario's duration_s
        self._drain_s: float | None = None  # set by teardown
        # An exception being handled around the whole run is not this run's failure.
        self._outer_error = sys.exc_info()[1]
        self.checks: ClusterChecks | None = None
        self.final: list[str] | None = None  # teardown's violations

    # -- set-up
    @initialize(setup=cluster_setups())
    def start(self, setup: ClusterSetup) -> None:
        """Build the World as a scenario run would, and run it to the first grid point."""
        self.trace.append(f"start with {len(setup.nodes)} node(s), seed {setup.seed}")
        self.setup = setup
        for spec in setup.nodes:
            if spec.join_at_s == 0.0:
                self.joined[spec.name] = 0.0
        self.world = World(self.scenario(duration_s=NEVER_S), setup.seed, until_s=NEVER_S)
        self.checks = ClusterChecks(self.world)
        self.world.setup()
        self._run(_EDGE)

    # -- what subclasses use
    @property
    def state(self) -> Any:
        """The core's current state (a ``RuntimeState``)."""
        assert self.world is not None
        return self.world.driver.state

    @property
    def nodes(self) -> list[str]:
        """Names of the nodes that have joined (or join now), in declaration order."""
        assert self.setup is not None
        return [n.name for n in self.setup.nodes
                if n.name in self.joined or n.name in self._pending_joins]

    @property
    def credentials(self) -> tuple[str, ...]:
        """Ids of the credentials the workload's jobs need (``CREDENTIALS`` if none)."""
        assert self.setup is not None
        return tuple(c for c, _v in self.setup.workload.needs) or CREDENTIALS

    def inject(self, fault: Fault) -> None:
        """Record ``fault`` to start at ``self.now`` (its ``at_s`` is replaced)."""
        fault = attrs.evolve(fault, at_s=self.now)
        self.trace.append(fault.describe())
        self._pending.append(fault)

    def scenario(self, duration_s: float | None = None) -> Scenario:
        """The schedule so far as a scenario (applied injections only) ending at
        ``duration_s`` (default: the furthest time reached)."""
        assert self.setup is not None
        setup = self.setup
        nodes = tuple(
            attrs.evolve(n, join_at_s=self.joined.get(n.name, NEVER_S)) for n in setup.nodes
        )
        return Scenario(
            name="cluster-machine",
            nodes=nodes,
            description=SCHEDULE_DESCRIPTION,
            seed=setup.seed,
            duration_s=duration_s if duration_s is not None else (
                self._end_s if self._end_s is not None else self.horizon),
            drain_s=self.drain_s if self._drain_s is None else self._drain_s,
            settings=setup.settings,
            workload=setup.workload,
            faults=tuple(self.faults),
        )

    # -- rules: all expressible in a scenario file
    @precondition(lambda self: len(self.nodes) < len(self.setup.nodes))
    @rule(i=_node_index)
    def join(self, i: int) -> None:
        """A node that was not there registers now (a fifth one must be refused)."""
        waiting = [n.name for n in self.setup.nodes  # type: ignore[union-attr]
                   if n.name not in self.nodes]
        name = waiting[i % len(waiting)]
        self.trace.append(f"join {name} @{self.now:g}s")
        self._pending_joins.append(name)

    def _node(self, i: int) -> str:
        names = self.nodes
        return names[i % len(names)]

    @precondition(lambda self: self.nodes)
    @rule(i=_node_index, duration_s=_durations)
    def hibernate(self, i: int, duration_s: float) -> None:
        """The machine sleeps; it wakes after ``duration_s`` with its clock jumped."""
        self.inject(Fault("hibernate", self.now, node=self._node(i), duration_s=duration_s))

    @precondition(lambda self: self.nodes)
    @rule(i=_node_index, duration_s=_durations)
    def crash(self, i: int, duration_s: float) -> None:
        """The node's process dies and restarts after ``duration_s``."""
        self.inject(Fault("crash", self.now, node=self._node(i), duration_s=duration_s))

    @precondition(lambda self: self.nodes)
    @rule(i=_node_index, peer=st.none() | _node_index, duration_s=_durations,
          oneway=st.booleans())
    def partition(self, i: int, peer: int | None, duration_s: float, oneway: bool) -> None:
        """The node loses the intranet to one peer (or all)."""
        node = self._node(i)
        others = [n for n in self.nodes if n != node]
        other = others[peer % len(others)] if peer is not None and others else None
        self.inject(Fault("partition", self.now, node=node, peer=other, duration_s=duration_s,
                          oneway=oneway))

    @precondition(lambda self: self.nodes)
    @rule(i=_node_index, duration_s=_durations, oneway=st.booleans())
    def control_partition(self, i: int, duration_s: float, oneway: bool) -> None:
        """The node loses the control channel (both ways, or only node -> service)."""
        self.inject(Fault("control_partition", self.now, node=self._node(i),
                          duration_s=duration_s, oneway=oneway))

    @rule(count=st.integers(1, 10))
    def burst(self, count: int) -> None:
        """The service submits ``count`` jobs at once (durations drawn like the workload's)."""
        self.inject(Fault("burst", self.now, count=count))

    @precondition(lambda self: self.nodes and self.setup.workload.needs)
    @rule(i=_node_index, c=st.integers(0, 3))
    def save_credential(self, i: int, c: int) -> None:
        """A user saves the next version of a credential the jobs need, through a node."""
        creds = self.credentials
        self.inject(Fault("rotate_credential", self.now, node=self._node(i),
                          credential=creds[c % len(creds)]))

    @precondition(lambda self: len(self.nodes) > 1 and self.setup.workload.needs)
    @rule(i=_node_index, c=st.integers(0, 3))
    def credential_drift(self, i: int, c: int) -> None:
        """A node's copy of a credential falls a version behind (or is lost), provided another
        node still holds the latest version to sync it from: when the last copy is lost only
        a user can save it again, and the run's convergence check would rightly fail."""
        creds = self.credentials
        cid = creds[c % len(creds)]
        node = self._node(i)
        w = self.world
        assert w is not None
        latest = credential_status(self.state).latest_version(cid) or 0
        drifting = {f.node for f in self._pending if f.kind == "credential_drift"
                    and f.credential == cid}
        holders = [n for n in self.nodes if n != node and n not in drifting
                   and w.nodes[n].credentials.get(cid, 0) >= latest > 0]
        saving = any(f.kind == "rotate_credential" and f.credential == cid for f in self._pending)
        if holders and not saving:  # a save now would have the drifting node as its only holder
            self.inject(Fault("credential_drift", self.now, node=node, credential=cid))

    @rule(key=st.sampled_from(("key1", "key2")))
    def regenerate_key(self, key: str) -> None:
        """A user regenerates an auth key."""
        self.inject(Fault("regenerate_key", self.now, key=key))

    @precondition(lambda self: self.nodes)
    @rule(data=st.data())
    def other_fault(self, data: st.DataObject) -> None:
        """Any other fault kind: stall, isolate, message faults, clocks, slowness, versions,
        upgrades, store appends with an unknown outcome."""
        self.inject(data.draw(_other_faults(tuple(self.nodes), self.credentials)))

    @rule(dt=st.integers(0, 59).map(lambda k: 60 - k))
    def advance(self, dt: int) -> None:
        """Simulated time runs ``dt`` seconds (1..60; it shrinks towards 60, so a shrunk
        schedule has one long step where it would have had many short ones)."""
        self.trace.append(f"advance {dt}s to {self.now + dt:g}s")
        self._run(self.now + dt)

    @rule()
    def tick(self) -> None:
        """Time runs until just past the core's next deadline (or one second, if none)."""
        deadline = self.world.driver.deadline()  # type: ignore[union-attr]
        target = self.now + 1.0
        if deadline is not None and deadline < self.now + 600:
            target = max(target, math.floor(deadline - _EDGE) + 1 + _EDGE)
        self.trace.append(f"tick to {target:g}s")
        self._run(target)

    # -- invariants
    @invariant()
    def checkers_hold(self) -> None:
        """The simulator's stream checkers found nothing."""
        if self.world is not None:
            assert not self.world.checkers.violations, self.world.checkers.violations

    @invariant()
    def at_most_four_nodes(self) -> None:
        if self.world is not None:
            nodes = self.state.nodes
            assert len(nodes) <= min(4, self.state.settings.max_nodes), [n.name for n in nodes]

    @invariant()
    def one_dispatcher_per_term(self) -> None:
        if self.checks is not None:
            assert not self.checks.of("dispatchers"), self.checks.of("dispatchers")

    @invariant()
    def terms_never_decrease(self) -> None:
        if self.world is not None:
            term = self.state.term
            assert term >= self._last_term, f"term went from {self._last_term} to {term}"
            self._last_term = term

    @invariant()
    def no_action_under_an_old_term(self) -> None:
        """A node back from hibernation (or any silence) cannot dispatch under its old term,
        nor renew or complete a lease granted before it went Offline."""
        if self.checks is not None:
            assert not self.checks.of("fencing"), self.checks.of("fencing")

    @invariant()
    def offline_nodes_hold_no_leases(self) -> None:
        if self.checks is not None:
            assert not self.checks.of("offline-leases"), self.checks.of("offline-leases")

    # -- the end
    def teardown(self) -> None:
        """Heal everything, drain, and check: no job lost, no duplicate effect, snapshot plus
        tail equals the live state. On failure, report the schedule as a scenario."""
        if self.world is None:
            return
        error = sys.exc_info()[1]
        if error is None or error is self._outer_error:
            try:
                self._finish()
            except BaseException as exc:
                self._report(exc)
                raise
        elif not isinstance(error, _DISCARDED):
            self._report(error)

    def _finish(self) -> None:
        assert self.setup is not None and self.world is not None
        if self._pending or self._pending_joins:
            self._run(self.now + 1)
        stop = self.setup.workload.stop_at_s or 0.0
        if stop > self.now:
            self._run(stop)  # the replay's workload stops at the end: it must be over here too
        w = self.world
        end = self._end_s = self.now
        # heal_all ends every fault but an update in progress: drain past it as well
        late = max([f.end_s - end for f in self.faults if f.kind == "upgrade"] + [0.0])
        longest = self._drain_s = self.drain_s + late
        w._take_snapshot()  # what World.setup schedules at the end
        w.heal_all()
        assert self.checks is not None
        self._drain(end, late)
        self._drain_s = self.now - end  # grid times: exact, so the replay ends here too
        self.final = final_violations(w) + list(self.checks.violations)
        if self.final and self._drain_s < longest:
            # A failure is reported after the whole drain, as it was before drains could end
            # early: the schedule then replays against a fixed core as it always did.
            self._run(end + longest)
            self._drain_s = longest
            self.final = final_violations(w) + list(self.checks.violations)
        assert not self.final, self.final
        assert w.checkers.duplicate_effects == 0
        self.at_end()

    def _drain(self, end: float, late: float) -> None:
        """Run the drain until the cluster is at rest, and at most ``self._drain_s``; the
        drain's length becomes the scenario's ``drain_s``, so the replay runs exactly as long.

        At rest (:meth:`at_rest`, true at two probes a second apart, with no event but
        ``HeartbeatReceived`` for ``_QUIET_S`` and every message sent before the heal landed),
        the rest of the drain could only repeat heartbeats that change nothing: the end-of-run
        checks would find the same. ``tests/test_property_machine.py`` runs examples on to the
        full drain and checks just that.
        """
        w = self.world
        assert w is not None and self._drain_s is not None
        limit = end + self._drain_s
        if not self.drain_ends_at_rest:
            self._run(limit)
            return
        net = w.scenario.network
        # the longest a message sent before the heal can take; message faults stack
        in_flight = net.latency_s + net.jitter_s + sum(
            f.extra_s if f.kind in ("delay", "reorder")
            else net.latency_s if f.kind == "duplicate" else 0.0 for f in self.faults)
        earliest = end + late + in_flight + 1.0  # + 1 s: a retry of a command lost before it
        active_at = [end]  # when the last event other than a heartbeat's receipt was stored

        def watch(batch: Sequence[object]) -> None:
            if any(type(e) is not ev.HeartbeatReceived for e in batch):
                active_at[0] = w.env.now

        rest_at: float | None = None  # the last probe that found the cluster at rest
        w.driver.listeners.append(watch)
        try:
            while self.now < limit:
                t = max(earliest, active_at[0] + _QUIET_S, self.now + 1.0)
                self._run(min(math.ceil(t - _EDGE) + _EDGE, limit))
                if active_at[0] > self.now - _QUIET_S or not self.at_rest():
                    rest_at = None
                elif rest_at is not None and active_at[0] <= rest_at:
                    # At rest a second ago, and since: any message in flight then has landed,
                    # and nothing but a heartbeat was sent in between.
                    return
                else:
                    rest_at = self.now
        finally:
            w.driver.listeners.remove(watch)

    def at_rest(self) -> bool:
        """Is the cluster at rest: every node that joined alive, running nothing, believing
        itself the dispatcher only if it is, in the current term, and (if the core has room
        for it) Online and reporting what the core last recorded; no job queued or leased;
        credentials synced?

        At rest, nothing can happen but heartbeats that change nothing: no job can start, no
        credential sync is due, no node can be lost or dispatch under an old term. A subclass
        with state of its own extends it (``super().at_rest() and ...``).
        """
        w = self.world
        assert w is not None
        state = self.state
        if state.dispatcher is None or state.model().jobs.jobs:
            return False
        core = {n.name: n for n in state.nodes}
        if any(n.status is not NodeStatus.ONLINE for n in core.values()):
            return False
        full = len(core) >= state.settings.max_nodes
        for name in self.joined:
            node = w.nodes[name]
            if not node.alive() or node.running or node.deferred:
                return False
            # One that missed an announcement may keep an old view while it waits for none:
            # only a node that believes it dispatches acts on it (its polls).
            if node.dispatcher == name and (name != state.dispatcher or node.term != state.term):
                return False
            recorded = core.get(name)
            if recorded is None:
                if node.registered or not full:  # a node kept out by a full runtime stays out
                    return False
            elif not node.registered or recorded.metrics != node.metrics():
                return False
        status = credential_status(state)
        return not status.behind and not status.syncs

    def at_end(self) -> None:
        """Override to check more at the end: called after the drain (which ended with the
        cluster at rest, or after ``drain_s``) and the end-of-run checks. A failure here is
        reported like any other."""

    def _run(self, t: float) -> None:
        w = self.world
        assert w is not None
        for f in self._pending:
            w._start_fault(f)  # what the replay's fault timer does
            self.faults.append(f)
        self._pending.clear()
        if self._pending_joins:
            order = [n.name for n in self.setup.nodes]  # type: ignore[union-attr]
            for name in sorted(self._pending_joins, key=order.index):
                node = w.nodes[name]
                node.spec = attrs.evolve(node.spec, join_at_s=self.now)
                w.env.process(node.process())  # registers now, like the replay's join timer
                self.joined[name] = self.now
            self._pending_joins.clear()
        self.horizon = max(self.horizon, t)
        w.env.run(until=t)
        self.now = t

    def _report(self, error: BaseException) -> None:
        if self.setup is None:
            return
        cls = type(self)
        try:
            final = current_build_context().is_final
        except Exception:
            final = False
        failure = cls.last_failure = record_failure(  # the file: for the final, shrunk run only
            self.scenario(), error, self.trace, cls.failure_dir if final else None, cls.__name__)
        with contextlib.suppress(Exception):  # outside a Hypothesis test: nothing to note
            note(f"The failing schedule as a scenario"
                 f"{f' (saved to {failure.path})' if failure.path else ''}:\n\n{failure.toml}\n"
                 f"Replay it: {failure.replay_command}")

    @classmethod
    def test_case(cls, profile_name: str | None = None) -> type:
        """The machine as a unittest ``TestCase`` with a shir profile's settings (see
        :func:`profile`): ``TestMyCluster = MyMachine.test_case()``."""
        case = cls.TestCase
        case.settings = profile(profile_name)
        return case
