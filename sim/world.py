"""The simulated world: a SimPy cluster that drives the pure core exactly as real hosts would.

Theory of operation
-------------------
A :class:`World` is one run of a scenario with a seed. It is made of parts, one module each:

*The service* (``shir.sim.service``, :class:`ServiceHost`) holds the runtime's event log and runs
the core through a :class:`Driver`: every command that reaches it is decided at the service's
clock (``env.now``), stored, folded, and its effects are sent to the recipient each names. It
ticks at the core's next deadline. It decides nothing the core decides (docs/architecture.md,
"The host protocol").

*Nodes* (``shir.sim.node``) are one SimPy process each (the heartbeat loop); the jobs a node
runs are timers on that node, not processes.

*The network* (``shir.sim.network``) carries every message with a latency, through partitions
and message faults.

*The workload* (``shir.sim.workload``) submits jobs as the scenario says.

*Faults* (``shir.sim.faults``: each kind's start and end beside its definition) are scheduled
from the scenario and from the seed. At ``duration_s`` the workload stops and every fault heals;
the run goes on for ``drain_s`` so work can finish, then the final checks run (no job lost,
replay equals state). This module holds the run itself: set-up, faults, the end-of-run checks
and the report.

Every random draw comes from a generator derived from the seed and a fixed stream name, and
nothing iterates a set: the same scenario and seed give the same event log, byte for byte.
"""

from __future__ import annotations

import gc
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import simpy
from simpy.events import NORMAL

from shir.core import commands as cmd
from shir.core.codec import encode_all
from shir.core.credentials import credential_status
from shir.core.driver import Driver
from shir.core.keys import AuthKey
from shir.core.model import CredentialVersion, KeyName, NodeStatus
from shir.core.monitoring import monitoring_view, render
from shir.core.snapshot import snapshot_bytes
from shir.sim.faults import FAULT_KINDS, Fault, draw_faults
from shir.sim.invariants import Checkers, check_snapshot
from shir.sim.network import INTRANET, Network
from shir.sim.node import SimNode
from shir.sim.scenario import Scenario
from shir.sim.service import FlakyStore, ServiceHost
from shir.sim.surface import Surface
from shir.sim.workload import Workload

__all__ = ["RunResult", "World", "run"]

@attrs.define
class RunResult:
    """What happened in one run: the report ``shir sim run --json`` prints, and more."""

    scenario: str
    seed: int
    simulated_s: float
    wall_s: float
    duration_s: float  # workload and faults end here; the drain phase follows
    events: int
    event_log_sha256: str
    invariant_violations: list[str]
    jobs: dict[str, int]
    failovers: int
    max_dispatcher_gap_s: float
    max_offline_detect_s: float
    refusals: dict[str, int]
    store_recoveries: int
    timeline: dict[str, Any]
    log: list[object] = attrs.field(repr=False, factory=list)
    expectations: dict[str, list[str]] = attrs.field(factory=lambda: {"passed": [], "failed": []})
    monitoring: str = ""  # the monitoring view at the end of the run (shir.core.monitoring)
    # nodes never registered by the end, with why their latest registration was refused
    join_refused: dict[str, str] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        """True when no invariant and no expectation failed."""
        return not self.invariant_violations and not self.expectations["failed"]

    def metric(self, name: str) -> float | None:
        """A metric by its report name (``jobs.lost``, ``failovers``, ``refusals.StaleLease``)."""
        if name.startswith("jobs."):
            v = self.jobs.get(name[5:])
            return None if v is None else float(v)
        if name.startswith("refusals."):
            return float(self.refusals.get(name[9:], 0))
        if name == "invariant_violations":
            return float(len(self.invariant_violations))
        v = getattr(self, name, None)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def to_json(self) -> dict[str, Any]:
        """The JSON report (without the timeline and the log)."""
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "simulated_s": round(self.simulated_s, 3),
            "duration_s": round(self.duration_s, 3),
            "wall_s": round(self.wall_s, 3),
            "events": self.events,
            "event_log_sha256": self.event_log_sha256,
            "invariant_violations": self.invariant_violations,
            "expectations": self.expectations,
            "jobs": self.jobs,
            "failovers": self.failovers,
            "max_dispatcher_gap_s": round(self.max_dispatcher_gap_s, 3),
            "max_offline_detect_s": round(self.max_offline_detect_s, 3),
            "refusals": self.refusals,
            "store_recoveries": self.store_recoveries,
            "ok": self.ok,
        }


class World:
    """One simulation run of a scenario with a seed."""

    def __init__(self, scenario: Scenario, seed: int | None = None,
                 until_s: float | None = None) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.duration_s = scenario.duration_s if until_s is None else until_s
        self.env = simpy.Environment()
        self.events_log: list[object] = []
        self._hasher = hashlib.sha256()
        self._hashed = 0  # events_log[:_hashed] are in _hasher
        self.store = FlakyStore(self._rng("store"))
        self.service = ServiceHost(self)
        self.workload = Workload(self)
        self.checkers = Checkers(lambda: self.env.now, self.service.presented_generation)
        self.driver = Driver(self.store, "runtime",
                             [self.service.on_events, self.checkers.on_events])
        self.net = Network(self, self._rng("network"))
        self.nodes: dict[str, SimNode] = {s.name: SimNode(self, s) for s in scenario.nodes}
        self.node_names = tuple(self.nodes)
        self.limits: dict[str, int] = {}
        self.slow: dict[str, float] = {}
        self.job_work: dict[str, float] = {}
        self.refusals: Counter[str] = Counter()
        self.keys: dict[str, AuthKey] = {}
        # what every new job needs: the latest saved version of each workload credential
        self.job_needs = tuple(CredentialVersion(cid, v) for cid, v in scenario.workload.needs)
        self.submitted_keys: dict[str, str] = {}  # key -> job id
        self.workload_rng = self._rng("workload")
        self.jobs_made = 0
        self.snapshot: bytes | None = None
        self.snapshot_at = 0
        # metrics
        self.failovers = 0
        self.dispatcher: str | None = None
        self.gap_started: float | None = 0.0
        self.max_gap = 0.0
        self.down_since: dict[str, float] = {}
        self.max_detect = 0.0
        self.timeline: dict[str, Any] = {
            "status": [], "dispatcher": [], "samples": [], "faults": [],
            "faults_started": [],  # the Fault of each row of "faults", for reports
        }
        self.healing = False
        self.append_lost_at: float | None = None
        self.surface = Surface(self)  # links and proxy changes (shir.sim.surface)
        self.join_refused: dict[str, str] = {}  # node -> why its latest registration was refused

    # -- randomness: one generator per named stream, derived from the seed
    def _rng(self, stream: str) -> random.Random:
        return random.Random(f"shir:{self.seed}:{stream}")

    @property
    def hasher(self) -> Any:
        """SHA-256 of the encoded event log so far (a ``hashlib`` object; take ``hexdigest()``).

        Brought up to date when asked: hashing batch by batch as events arrived cost a few
        percent of a run in per-batch overhead.
        """
        log = self.events_log
        if self._hashed < len(log):
            self._hasher.update(encode_all(log[self._hashed:]))
            self._hashed = len(log)
        return self._hasher

    # -- scheduling helpers (callbacks, not processes)
    def later(self, delay: float, fn: Callable[[], object]) -> None:
        """Call ``fn`` after ``delay`` simulated seconds (in the order a SimPy timeout would)."""
        self.env.schedule(_Call(fn), NORMAL, delay if delay > 0.0 else 0.0)  # type: ignore[arg-type]

    def at(self, when: float, fn: Callable[[], object]) -> None:
        self.later(when - self.env.now, fn)

    # -- faults ------------------------------------------------------------------------------
    def schedule_faults(self) -> None:
        sc = self.scenario
        rf = sc.random_faults
        drawn = draw_faults(self._rng("faults"), rf.kinds, rf.per_hour, self.duration_s,
                            self.node_names, rf.min_duration_s, rf.max_duration_s, rf.probability,
                            tuple(cid for cid, _v in sc.workload.needs))
        for f in (*sc.faults, *drawn):
            if f.at_s < self.duration_s:
                self.at(f.at_s, partial(self._start_fault, f))

    def _start_fault(self, f: Fault) -> None:
        if self.healing:
            return
        now = self.env.now
        self.timeline["faults"].append((now, f.kind, f.node, f.duration_s))
        self.timeline["faults_started"].append(f)
        node = self.nodes.get(f.node) if f.node else None
        kind = FAULT_KINDS[f.kind]
        end = kind.start(self, f, node)
        if node is not None and end is not None and kind.silences:
            # time to detection is measured from here, if the node is still silent then
            self.down_since.setdefault(node.name, now)
            heal, name = end, node.name

            def end() -> None:
                heal()
                self.down_since.pop(name, None)

        self.service.update_gap()
        if end is not None and f.duration_s:
            done = end

            def finish() -> None:
                if self._active_ends.pop(id(f), None) is not None:
                    done()
                    self.service.update_gap()

            self._active_ends[id(f)] = finish
            self.later(f.duration_s, finish)

    _active_ends: dict[int, Callable[[], None]]

    def intranet_ok(self, a: str, b: str) -> bool:
        peer = self.nodes[b]
        return (peer.alive() and peer.registered and self.net.link_ok(a, b, INTRANET)
                and self.net.link_ok(b, a, INTRANET))

    def heal_all(self) -> None:
        """End every fault now and stop new ones: the drain phase begins."""
        self.healing = True
        for finish in list(self._active_ends.values()):
            finish()
        self.net.message_faults.clear()
        self.net.blocked.clear()
        self.store.p = 0.0
        for node in self.nodes.values():
            node.reported_version = None
            node.clock_rate = 1.0
            if not node.up:
                node.restart()
            if node.paused:
                node.resume(0.0)
        self.slow.clear()
        self.service.update_gap()

    # -- the run -----------------------------------------------------------------------------
    def setup(self) -> None:
        sc = self.scenario
        self._active_ends = {}
        rid = "rt-" + sc.name.replace(" ", "-")[:60]
        keyrng = self._rng("keys")
        self.keys = {
            "key1": AuthKey.from_seed(rid, KeyName.KEY1, 1, keyrng.randbytes(48)),
            "key2": AuthKey.from_seed(rid, KeyName.KEY2, 1, keyrng.randbytes(48)),
        }
        self.service.handle(cmd.CreateRuntime(rid, "factory-sim", sc.name, self.keys["key1"],
                                              self.keys["key2"], 0.0, sc.description, sc.settings))
        for spec in sc.nodes:
            self.env.process(self.nodes[spec.name].process())
            if spec.concurrency_limit is not None:
                self.at(spec.join_at_s + 1.0, partial(self.service.set_limit, spec))
        if sc.workload.needs:
            # a user saves every credential the workload needs through the first node to join
            first = min(sc.nodes, key=lambda n: n.join_at_s)
            for cid, version in sc.workload.needs:
                self.at(first.join_at_s + 0.5,
                        partial(self.service.save_credential, first.name, cid, version))
        self.env.process(self.workload.arrivals())
        self.env.process(self.workload.sampler())
        self.schedule_faults()
        self.surface.schedule()
        # The snapshot is taken as the faults end: the drain phase is the tail it must replay.
        self.at(self.duration_s, self._take_snapshot)
        self.at(self.duration_s, self.heal_all)

    def final_violations(self) -> list[str]:
        """Every invariant violation, with the end-of-run checks: snapshot + tail equals the
        live state, no job lost, credentials converged."""
        violations = list(self.checkers.violations)
        violations += check_snapshot(self.snapshot, self.events_log[self.snapshot_at:],
                                     self.driver.state)
        lost = self._lost_keys()
        if lost:
            violations.append(f"lost: {len(lost)} jobs vanished, e.g. {lost[:3]}")
        behind = [n for n in credential_status(self.driver.state).nodes
                  if n.behind and n.status in (NodeStatus.ONLINE, NodeStatus.LIMITED)]
        if behind:
            lacking = "; ".join(
                n.node + " lacks " + ", ".join(f"{c.credential_id} v{c.version}" for c in n.behind)
                for n in behind
            )
            violations.append(f"credentials: not converged after the drain: {lacking}")
        return violations

    def _lost_keys(self) -> list[str]:
        """Submitted keys that are neither completed, dead-lettered nor still held."""
        active = self.driver.state.model().jobs.active_keys
        c = self.checkers
        return [k for k in self.submitted_keys
                if k not in c.completed_keys and k not in active and k not in c.dead_keys]

    def _take_snapshot(self) -> None:
        self.snapshot = snapshot_bytes(self.driver.state)
        self.snapshot_at = len(self.events_log)

    def run(self) -> RunResult:
        """Run the scenario to the end of its drain phase and check everything."""
        # The run keeps its whole event log alive, so the default collector would rescan a
        # growing heap over and over (a fifth of the run's time, and again in the end-of-run
        # checks); collect less often instead.
        threshold = gc.get_threshold()
        gc.set_threshold(100_000, 50, 100)
        try:
            return self._run()
        finally:
            gc.set_threshold(*threshold)

    def _run(self) -> RunResult:
        started = time.perf_counter()
        self.setup()
        self.env.run(until=self.duration_s + self.scenario.drain_s)
        wall = time.perf_counter() - started
        if self.gap_started is not None:
            self.max_gap = max(self.max_gap, self.env.now - self.gap_started)
        violations = self.final_violations()
        b = self.driver.state.model().jobs
        active = b.active_keys
        c = self.checkers
        completed = len(c.completed_keys)
        dead = b.dead_lettered
        lost = self._lost_keys()
        return RunResult(
            scenario=self.scenario.name,
            seed=self.seed,
            simulated_s=self.env.now,
            wall_s=wall,
            duration_s=self.duration_s,
            events=len(self.events_log),
            event_log_sha256=self.hasher.hexdigest(),
            invariant_violations=violations,
            jobs={
                "submitted": len(self.submitted_keys),
                "completed": completed,
                "dead_lettered": dead,
                "redelivered": b.released,
                "unfinished": len(active),
                "lost": len(lost),
                "duplicate_effects": c.duplicate_effects,
            },
            failovers=self.failovers,
            max_dispatcher_gap_s=self.max_gap,
            max_offline_detect_s=self.max_detect,
            refusals=dict(sorted(self.refusals.items())),
            store_recoveries=self.driver.recoveries,
            timeline=self.timeline,
            log=self.events_log,
            monitoring=render(monitoring_view(self.driver.state)),
            join_refused={n: why for n, why in self.join_refused.items()
                          if self.driver.state.node(n) is None},
        )


class _Call:
    """A scheduled call: all ``Environment.step`` reads of an event (``callbacks``, ``_ok``).

    Most of a run's steps are messages and timers that only call a function; a full
    ``simpy.Timeout`` per step (its checks, value and callback list) cost a tenth of the run.
    ``env.schedule`` orders it exactly as a timeout made at the same moment.
    """

    __slots__ = ("callbacks", "fn")
    _ok = True

    def __init__(self, fn: Callable[[], object]) -> None:
        self.callbacks: tuple[Callable[[_Call], None], ...] | None = _FIRE
        self.fn = fn


def _fire(call: _Call) -> None:
    call.fn()


_FIRE = (_fire,)


def run(scenario: Scenario, seed: int | None = None, until_s: float | None = None) -> RunResult:
    """Run ``scenario`` (with ``seed`` instead of its own, for ``until_s`` instead of its
    duration) and evaluate its expectations."""
    from shir.sim.report import evaluate

    world = World(scenario, seed, until_s)
    result = world.run()
    evaluate(scenario, result)
    return result
