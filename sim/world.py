"""The simulated world: a SimPy cluster that drives the pure core exactly as real hosts would.

Theory of operation
-------------------
*The service* holds the runtime's event log and runs the core through a :class:`Driver`: every
command that reaches it is decided at the service's clock (``env.now``), stored, folded, and its
effects are sent out as messages. It asks the core for its next deadline and ticks then.

*Nodes* (``shir.sim.node``) are one SimPy process each (the heartbeat loop); the jobs a node
runs are timers on that node, not processes. The dispatcher node sends ``DispatchJobs`` under the
term it believes in when the core says a dispatch is wanted (and on a slow poll).

The service is a host like any other (docs/architecture.md, "The host protocol"): it sends each
effect to the recipient the effect names (``effect.to``), and answers a refused sender with the
reply its ``Fenced`` refusal carries. It decides nothing the core decides; it only batches the
transport (the same message to the same node within ``NUDGE_COALESCE_S`` goes once).

*The network* (``shir.sim.network``) carries every message with a latency, through partitions
and message faults.

*Faults* (``shir.sim.faults``: each kind's start and end beside its definition) are scheduled
from the scenario and from the seed. At ``duration_s`` the workload stops
and every fault heals; the run goes on for ``drain_s`` so work can finish, then the final checks
run (no job lost, replay equals state).

Every random draw comes from a generator derived from the seed and a fixed stream name, and
nothing iterates a set: the same scenario and seed give the same event log, byte for byte.
"""

from __future__ import annotations

import gc
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
import simpy

from shir.core import commands as cmd
from shir.core import effects as fx
from shir.core import events as ev
from shir.core import jobs
from shir.core.codec import encode
from shir.core.credentials import (
    SaveCredential,
    credential_status,
)
from shir.core.driver import AppendOutcomeUnknown, Driver
from shir.core.errors import DomainError, Fenced
from shir.core.keys import AuthKey
from shir.core.leasing import (
    RenewLeases,
    SetConcurrencyLimit,
    SubmitJob,
    default_limit,
)
from shir.core.model import CredentialVersion, KeyName, NodeStatus
from shir.core.monitoring import monitoring_view, render
from shir.core.sharing import SubmitLinkedJob
from shir.core.snapshot import snapshot_bytes
from shir.core.store import InMemoryEventStore
from shir.sim.faults import FAULT_KINDS, Fault, draw_faults
from shir.sim.invariants import Checkers, check_snapshot
from shir.sim.network import CONTROL, HB, INTRANET, SERVICE, Network
from shir.sim.node import NUDGE_COALESCE_S, SimNode
from shir.sim.scenario import NodeSpec, Scenario
from shir.sim.surface import Surface

__all__ = ["RunResult", "World", "run"]

_JOB_EVENTS = frozenset(jobs.JOB_EVOLVE)


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


class _FlakyStore(InMemoryEventStore):
    """An in-memory store whose appends may end with an unknown outcome (fault append_unknown)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.p = 0.0

    def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
        if self.p and self.rng.random() < self.p:
            if self.rng.random() < 0.5:
                super().append(stream, events, expected_version)
            raise AppendOutcomeUnknown("append timed out; outcome unknown")
        return super().append(stream, events, expected_version)


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
        self.store = _FlakyStore(self._rng("store"))
        self.checkers = Checkers(lambda: self.env.now, self._presented_generation)
        self.driver = Driver(self.store, "runtime", [self._on_events, self.checkers.on_events])
        self.net = Network(self, self._rng("network"))
        self.nodes: dict[str, SimNode] = {s.name: SimNode(self, s) for s in scenario.nodes}
        self.node_names = tuple(self.nodes)
        self.limits: dict[str, int] = {}
        self.slow: dict[str, float] = {}
        self.job_work: dict[str, float] = {}
        self.refusals: Counter[str] = Counter()
        self._last_sent: dict[tuple[str, type], tuple[object, float]] = {}  # see _carry_out
        self.keys: dict[str, AuthKey] = {}
        # what every new job needs: the latest saved version of each workload credential
        self.job_needs = tuple(CredentialVersion(cid, v) for cid, v in scenario.workload.needs)
        self.submitted_keys: dict[str, str] = {}  # key -> job id
        self.workload_rng = self._rng("workload")
        self.jobs_made = 0
        self.tick_at: float | None = None
        self._tick_gen = 0
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
            self._hasher.update(b"".join(map(encode, log[self._hashed:])))
            self._hashed = len(log)
        return self._hasher

    # -- scheduling helpers (callbacks, not processes)
    def later(self, delay: float, fn: Callable[[], object]) -> None:
        def fire(_event: object) -> None:
            fn()

        self.env.timeout(max(0.0, delay)).callbacks.append(fire)

    def at(self, when: float, fn: Callable[[], object]) -> None:
        self.later(when - self.env.now, fn)

    # -- the service side --------------------------------------------------------------------
    def handle(self, command: object, sender: str | None = None) -> tuple[object, ...]:
        try:
            effects = self.driver.handle(command)
        except AppendOutcomeUnknown:
            self.refusals["AppendOutcomeUnknown"] += 1
            self.append_lost_at = self.env.now
            # The service retries its own commands that were not stored. Nodes retry theirs by
            # their own rhythm (heartbeats, renewals; a lost completion ends in redelivery), a
            # Tick reschedules itself, and a StartUpgrade that did not land skips that upgrade.
            if sender is None and not isinstance(command, (cmd.Tick, cmd.StartUpgrade)):
                retry: Any = command  # every command is a frozen attrs class with an `at`
                self.later(1.0, lambda: self.handle(attrs.evolve(retry, at=self.env.now)))
            return ()
        except DomainError as exc:
            self.refusals[type(exc).__name__] += 1
            if type(command) is cmd.RegisterNode:  # the report says why a node never joined
                self.join_refused[command.node] = str(exc)
            if sender is not None:
                self.nodes[sender].refused(command)
                if isinstance(exc, Fenced):  # the sender is stale: tell it what it missed
                    self._carry_out(exc.reply)
            return ()
        if type(command) is RenewLeases:  # each token answered "lease lost" was refused
            lost = sum(type(e) is fx.StopJob for e in effects)
            if lost:
                self.refusals["StaleLease"] += lost
        for effect in effects:
            self._carry_out(effect)
        return effects

    def _carry_out(self, effect: object) -> None:
        """Send ``effect`` to the recipient it names (the factory side's are for the workload,
        which learns outcomes from the log itself)."""
        to: fx.Recipient = effect.to  # type: ignore[attr-defined]
        if to.role is fx.Role.NODE:
            names: Sequence[str] = (to.node,)  # type: ignore[assignment]
        elif to.role is fx.Role.EVERY_NODE:
            names = self.node_names
        else:
            self.surface.to_factory(effect)  # linked factories hear theirs (shir.sim.surface)
            return
        now = self.env.now
        sent = self._last_sent
        for name in names:
            node = self.nodes.get(name)
            if node is None:
                continue
            # Transport batching, not a decision: the same message to the same node again within
            # the coalescing window is sent once (a burst of DispatchWanted, mostly).
            key = (name, type(effect))
            last = sent.get(key)
            if last is not None and last[0] == effect and now - last[1] < NUDGE_COALESCE_S:
                continue
            sent[key] = (effect, now)
            self.net.send(SERVICE, name, CONTROL, partial(node.receive, effect))

    def send(self, src: str, dst: str, channel: str, make: Callable[..., Any]) -> None:
        """Send a message; towards the service ``make(at)`` builds the command on arrival."""
        if dst == SERVICE:
            self.net.send(src, dst, channel, lambda: self.handle(make(self.env.now), src))
        else:
            self.net.send(src, dst, channel, make)

    def send_heartbeat(self, node: SimNode) -> None:
        name, session, metrics = node.name, node.session, node.metrics()
        self.send(name, SERVICE, HB, lambda at: cmd.Heartbeat(name, session, metrics, at))

    def register(self, node: SimNode) -> None:
        spec = node.spec
        key = self.keys[spec.key]
        node.key_generation = key.generation
        metrics = node.metrics()
        self.send(node.name, SERVICE, HB, lambda at: cmd.RegisterNode(
            key.text, spec.name, f"machine-{spec.name}", spec.cores, spec.memory_mb, at, metrics))

    def _presented_generation(self, node: str) -> int | None:
        n = self.nodes.get(node)
        return n.key_generation if n else None

    def _on_events(self, events: Sequence[object]) -> None:
        now = self.env.now
        self.events_log.extend(events)
        lifecycle = False
        for e in events:
            if type(e) not in _JOB_EVENTS:
                lifecycle = True
                self._observe(e, now)
        if lifecycle or self.tick_at is None:
            self._schedule_tick()

    def _observe(self, e: object, now: float) -> None:
        t = type(e)
        if t is ev.NodeStatusChanged:
            self.timeline["status"].append((now, e.node, e.status.value))  # type: ignore[attr-defined]
            if e.status is NodeStatus.OFFLINE:  # type: ignore[attr-defined]
                since = self.down_since.pop(e.node, None)  # type: ignore[attr-defined]
                if since is not None:
                    self.max_detect = max(self.max_detect, now - since)
        elif t is ev.DispatcherChanged:
            self.timeline["dispatcher"].append((now, e.term, e.node))  # type: ignore[attr-defined]
            if self.dispatcher is not None and e.node != self.dispatcher:  # type: ignore[attr-defined]
                self.failovers += 1
            self.dispatcher = e.node  # type: ignore[attr-defined]
            self._update_gap()
        elif t is ev.NodeRegistered:
            self.timeline["status"].append((now, e.node, NodeStatus.INITIALIZING.value))  # type: ignore[attr-defined]
            limit = self.nodes[e.node].spec.concurrency_limit  # type: ignore[attr-defined]
            self.limits[e.node] = limit or default_limit(e.cores, e.memory_mb)  # type: ignore[attr-defined]
        elif t is ev.NodeRemoved:
            self.timeline["status"].append((now, e.node, "Removed"))  # type: ignore[attr-defined]

    # -- ticks: the core's deadlines
    def _schedule_tick(self) -> None:
        deadline = self.driver.deadline()
        if deadline is None:
            return
        if self.tick_at is not None and self.tick_at <= deadline:
            return
        self.tick_at = deadline
        self._tick_gen += 1
        gen = self._tick_gen
        self.at(deadline, lambda: self._tick(gen))

    def _tick(self, gen: int) -> None:
        if gen != self._tick_gen:
            return
        self.tick_at = None
        now = self.env.now
        self.handle(cmd.Tick(now))
        deadline = self.driver.deadline()
        if self.append_lost_at == now:  # the store lost the tick's events: tick again soon
            self.tick_at = None
            self._tick_gen += 1
            gen = self._tick_gen
            self.tick_at = now + 0.1
            self.at(now + 0.1, lambda: self._tick(gen))
            return
        if deadline is not None and deadline <= now:
            # A tick must resolve what is due; a deadline that stays in the past would spin
            # the simulation forever at one instant. Report it and move on.
            self.checkers.fail(f"deadlines: Tick({now:g}) left the deadline at {deadline:g}")
            self.tick_at = now + 1.0
            self._tick_gen += 1
            gen = self._tick_gen
            self.at(now + 1.0, lambda: self._tick(gen))
            return
        self._schedule_tick()

    # -- dispatcher gap: no *working* dispatcher (none, or one that is down in fact)
    def _working_dispatcher(self) -> bool:
        d = self.dispatcher
        node = self.nodes.get(d) if d else None
        return node is not None and node.alive() and self.net.link_ok(d, SERVICE, CONTROL)  # type: ignore[arg-type]

    def _update_gap(self) -> None:
        now = self.env.now
        working = self._working_dispatcher()
        if working and self.gap_started is not None:
            self.max_gap = max(self.max_gap, now - self.gap_started)
            self.gap_started = None
        elif not working and self.gap_started is None:
            self.gap_started = now

    # -- workload ----------------------------------------------------------------------------
    def workload(self) -> Any:
        wl = self.scenario.workload
        rng = self.workload_rng
        stop = min(self.duration_s, wl.stop_at_s if wl.stop_at_s is not None else self.duration_s)
        if wl.rate_per_s <= 0:
            return
        env = self.env
        if wl.start_at_s > env.now:
            yield env.timeout(wl.start_at_s - env.now)
        while True:
            yield env.timeout(rng.expovariate(wl.rate_per_s))
            if env.now >= stop:
                return
            self.submit_job()

    def submit_job(self, link: str | None = None) -> None:
        """The service submits one job of the scenario's workload (or of linked runtime
        ``link``'s), now."""
        wl = self.scenario.workload
        rng = self.workload_rng
        env = self.env
        self.jobs_made += 1
        n = self.jobs_made
        job_id = f"job-{n}"
        key = f"key-{n}"
        dist = wl.duration
        if dist.kind == "exponential":
            work = rng.expovariate(1.0 / dist.mean_s) if dist.mean_s > 0 else 0.0
        elif dist.kind == "uniform":
            work = rng.uniform(dist.min_s, dist.max_s)
        else:
            work = dist.mean_s
        self.job_work[job_id] = work
        self.submitted_keys[key] = job_id
        submit: Any = (SubmitJob(job_id, key, env.now, self.job_needs) if link is None
                       else SubmitLinkedJob(link, job_id, key, env.now, self.job_needs))
        self.handle(submit)
        if link is not None and self.append_lost_at != env.now and (
            key not in self.driver.state.model().jobs.active_keys
        ):
            del self.submitted_keys[key]  # refused (a revoked link): never accepted, not lost
            return
        if wl.duplicate_submit_p and rng.random() < wl.duplicate_submit_p:
            self.later(rng.random() * 5.0, lambda: self.handle(
                attrs.evolve(submit, at=self.env.now)))

    def sampler(self) -> Any:
        env = self.env
        while True:
            b = self.driver.state.model().jobs
            self.timeline["samples"].append((env.now, b.queued(), len(b.leases)))
            yield env.timeout(max(1.0, self.duration_s / 600))

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

        self._update_gap()
        if end is not None and f.duration_s:
            done = end

            def finish() -> None:
                if self._active_ends.pop(id(f), None) is not None:
                    done()
                    self._update_gap()

            self._active_ends[id(f)] = finish
            self.later(f.duration_s, finish)

    _active_ends: dict[int, Callable[[], None]]

    def intranet_ok(self, a: str, b: str) -> bool:
        peer = self.nodes[b]
        return (peer.alive() and peer.registered and self.net.link_ok(a, b, INTRANET)
                and self.net.link_ok(b, a, INTRANET))

    def regenerate_key(self, slot: str) -> None:
        """A user regenerates ``slot``; operators paste the new key from then on."""
        old = self.keys[slot]
        seed = self._rng(f"key:{slot}:{old.generation + 1}").randbytes(48)
        new = AuthKey.from_seed(old.runtime_id, old.name, old.generation + 1, seed)
        self.handle(cmd.RegenerateAuthKey(new, self.env.now))  # retried if not stored
        self.keys[slot] = new  # operators paste the new key from now on

    def upgrade(self, node: SimNode, f: Fault) -> None:
        """Update ``node`` as ``f`` says (the service restarts it to install)."""
        name = node.name
        self.handle(cmd.StartUpgrade(name, f.version or node.version, self.env.now))
        n = self.driver.state.node(name)
        if n is None or n.upgrading_to is None:
            return
        node.crash()  # the service restarts to install
        node.up = False

        def finish() -> None:
            ok = not f.fail
            if ok:
                node.version = f.version or node.version
                if node.released_at is not None:
                    node.released_at = self.env.now  # a new version: its year starts now
            node.restart()
            self.handle(cmd.FinishUpgrade(name, ok, self.env.now, node.released_at,
                                          "" if ok else "installer failed"))

        self.later(f.duration_s, finish)

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
        self._update_gap()

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
        self.handle(cmd.CreateRuntime(rid, "factory-sim", sc.name, self.keys["key1"],
                                      self.keys["key2"], 0.0, sc.description, sc.settings))
        for spec in sc.nodes:
            self.env.process(self.nodes[spec.name].process())
            if spec.concurrency_limit is not None:
                self.at(spec.join_at_s + 1.0, partial(self._set_limit, spec))
        if sc.workload.needs:
            # a user saves every credential the workload needs through the first node to join
            first = min(sc.nodes, key=lambda n: n.join_at_s)
            for cid, version in sc.workload.needs:
                self.at(first.join_at_s + 0.5,
                        partial(self.save_credential, first.name, cid, version))
        self.env.process(self.workload())
        self.env.process(self.sampler())
        self.schedule_faults()
        self.surface.schedule()
        # The snapshot is taken as the faults end: the drain phase is the tail it must replay.
        self.at(self.duration_s, self._take_snapshot)
        self.at(self.duration_s, self.heal_all)

    def save_credential(self, node: str, credential: str, version: int | None = None) -> None:
        """A user saves ``credential`` (the next version unless given) through ``node``."""
        latest = credential_status(self.driver.state).latest_version(credential) or 0
        version = latest + 1 if version is None else version
        if not self.nodes[node].alive():
            self.later(1.0, partial(self.save_credential, node, credential, version))
            return
        self.handle(SaveCredential(credential, version, node, self.env.now))
        if credential_status(self.driver.state).latest_version(credential) != version:
            # refused (the node is not registered yet, or offline): the user tries again
            self.later(1.0, partial(self.save_credential, node, credential, version))
            return
        held = self.nodes[node].credentials
        held[credential] = max(held.get(credential, 0), version)
        self.job_needs = tuple(
            CredentialVersion(c.credential_id, version) if c.credential_id == credential else c
            for c in self.job_needs
        )

    def _set_limit(self, spec: NodeSpec) -> None:
        self.handle(SetConcurrencyLimit(spec.name, spec.concurrency_limit, self.env.now))

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


def run(scenario: Scenario, seed: int | None = None, until_s: float | None = None) -> RunResult:
    """Run ``scenario`` (with ``seed`` instead of its own, for ``until_s`` instead of its
    duration) and evaluate its expectations."""
    from shir.sim.report import evaluate

    world = World(scenario, seed, until_s)
    result = world.run()
    evaluate(scenario, result)
    return result

