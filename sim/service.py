"""The service host: the side of the simulated world that holds the runtime's log.

Every command that reaches the service is decided by the core through a :class:`Driver` at the
service's clock (``env.now``), stored, folded, and its effects are sent to the recipient each
names (``effect.to``): one node, every node, or the factory side (linked factories hear theirs
through ``shir.sim.surface``). A refused sender gets the reply its ``Fenced`` refusal carries.
The service decides nothing the core decides; it only batches the transport (the same message to
the same node within ``NUDGE_COALESCE_S`` goes once) and retries its own commands that were not
stored. The factory side's job results count as published when the service carries them out;
it records that (``ConfirmResultsPublished``) once per ``CONFIRM_EVERY_S`` for all of them, as a
host does once per turn. It ticks at the core's next deadline, and it carries out what users do
through the service: regenerate a key, update a node, save a credential, set a concurrency limit.

The world's ``service`` is a :class:`ServiceHost`; the run itself (set-up, faults, end-of-run
checks) lives in ``shir.sim.world``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs

from shir.core import commands as cmd
from shir.core import effects as fx
from shir.core import events as ev
from shir.core import jobs
from shir.core.credentials import SaveCredential, credential_status
from shir.core.driver import AppendOutcomeUnknown
from shir.core.errors import DomainError, Fenced
from shir.core.keys import AuthKey
from shir.core.leasing import (
    MAX_CONFIRMED,
    ConfirmResultsPublished,
    RenewLeases,
    SetConcurrencyLimit,
    default_limit,
)
from shir.core.model import CredentialVersion, NodeStatus
from shir.core.store import InMemoryEventStore
from shir.sim.network import CONTROL, HB, SERVICE
from shir.sim.node import NUDGE_COALESCE_S

if TYPE_CHECKING:
    from shir.sim.faults import Fault
    from shir.sim.node import SimNode
    from shir.sim.scenario import NodeSpec
    from shir.sim.world import World

__all__ = ["FlakyStore", "ServiceHost"]

_JOB_EVENTS = frozenset(jobs.JOB_EVOLVE)
CONFIRM_EVERY_S = 1.0  # published results are recorded in the log this often, in one command


class FlakyStore(InMemoryEventStore):
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


class ServiceHost:
    """The service of one World: it handles commands, carries out effects and ticks."""

    def __init__(self, world: World) -> None:
        self.w = world
        self._last_sent: dict[tuple[str, type], tuple[object, float]] = {}  # see _carry_out
        self.tick_at: float | None = None
        self._tick_gen = 0
        self._published: list[str] = []  # job ids whose results went out, not yet recorded

    def handle(self, command: object, sender: str | None = None) -> tuple[object, ...]:
        """Decide ``command`` (from node ``sender``, or the service's own if None) and carry out
        its effects; a refusal is counted and answered, never raised."""
        try:
            effects = self.w.driver.handle(command)
        except AppendOutcomeUnknown:
            self.w.refusals["AppendOutcomeUnknown"] += 1
            self.w.append_lost_at = self.w.env.now
            # The service retries its own commands that were not stored. Nodes retry theirs by
            # their own rhythm (heartbeats, renewals; a lost completion ends in redelivery), a
            # Tick reschedules itself, and a StartUpgrade that did not land skips that upgrade.
            if sender is None and not isinstance(command, (cmd.Tick, cmd.StartUpgrade)):
                retry: Any = command  # every command is a frozen attrs class with an `at`
                self.w.later(1.0, lambda: self.handle(attrs.evolve(retry, at=self.w.env.now)))
            return ()
        except DomainError as exc:
            self.w.refusals[type(exc).__name__] += 1
            if type(command) is cmd.RegisterNode:  # the report says why a node never joined
                self.w.join_refused[command.node] = str(exc)
            if sender is not None:
                self.w.nodes[sender].refused(command)
                if isinstance(exc, Fenced):  # the sender is stale: tell it what it missed
                    self._carry_out(exc.reply)
            return ()
        if type(command) is RenewLeases:  # each token answered "lease lost" was refused
            lost = sum(type(e) is fx.StopJob for e in effects)
            if lost:
                self.w.refusals["StaleLease"] += lost
        for effect in effects:
            self._carry_out(effect)
        return effects

    def _carry_out(self, effect: object) -> None:
        """Send ``effect`` to the recipient it names (the factory side's are for the workload,
        which learns outcomes from the log itself)."""
        to: fx.Recipient = effect.to  # type: ignore[attr-defined]
        role = to.role
        if role is fx.Role.NODE:
            self._send_to(to.node, effect)  # type: ignore[arg-type]
        elif role is fx.Role.EVERY_NODE:
            for name in self.w.node_names:
                self._send_to(name, effect)
        else:
            if type(effect) is fx.PublishJobResult:
                if not self._published:
                    self.w.later(CONFIRM_EVERY_S, self._confirm_published)
                self._published.append(effect.job_id)
            self.w.surface.to_factory(effect)  # linked factories hear theirs (shir.sim.surface)

    def _confirm_published(self) -> None:
        ids, self._published = self._published, []
        for i in range(0, len(ids), MAX_CONFIRMED):
            self.handle(ConfirmResultsPublished(tuple(ids[i:i + MAX_CONFIRMED]), self.w.env.now))

    def _send_to(self, name: str, effect: object) -> None:
        node = self.w.nodes.get(name)
        if node is None:
            return
        # Transport batching, not a decision: the same message to the same node again within
        # the coalescing window is sent once (a burst of DispatchWanted, mostly).
        now = self.w.env.now
        key = (name, type(effect))
        sent = self._last_sent
        last = sent.get(key)
        if last is not None and now - last[1] < NUDGE_COALESCE_S and last[0] == effect:
            return
        sent[key] = (effect, now)
        self.w.net.send(SERVICE, name, CONTROL, partial(node.receive, effect))

    def send(self, src: str, dst: str, channel: str, make: Callable[..., Any]) -> None:
        """Send a message; towards the service ``make(at)`` builds the command on arrival."""
        if dst == SERVICE:
            self.w.net.send(src, dst, channel, lambda: self.handle(make(self.w.env.now), src))
        else:
            self.w.net.send(src, dst, channel, make)

    def send_heartbeat(self, node: SimNode) -> None:
        """``node`` sends a heartbeat with its session and current metrics."""
        name, session, metrics = node.name, node.session, node.metrics()
        self.send(name, SERVICE, HB, lambda at: cmd.Heartbeat(name, session, metrics, at))

    def register(self, node: SimNode) -> None:
        """``node`` registers with the key its operator pasted (the slot its spec names)."""
        spec = node.spec
        key = self.w.keys[spec.key]
        node.key_generation = key.generation
        metrics = node.metrics()
        # a fake public key, derived from the name so that runs stay deterministic (the sim's
        # envelopes are fakes too: nothing is sealed for it)
        envelope_key = hashlib.sha256(f"sim envelope key {spec.name}".encode()).digest()
        self.send(node.name, SERVICE, HB, lambda at: cmd.RegisterNode(
            key.text, spec.name, f"machine-{spec.name}", spec.cores, spec.memory_mb, at, metrics,
            envelope_key=envelope_key))

    def presented_generation(self, node: str) -> int | None:
        """The generation of the key ``node`` presented when it registered (for the checks)."""
        n = self.w.nodes.get(node)
        return n.key_generation if n else None

    def on_events(self, events: Sequence[object]) -> None:
        """The Driver's listener: log the stored events, observe them, reschedule the tick."""
        now = self.w.env.now
        self.w.events_log.extend(events)
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
            self.w.timeline["status"].append((now, e.node, e.status.value))  # type: ignore[attr-defined]
            if e.status is NodeStatus.OFFLINE:  # type: ignore[attr-defined]
                since = self.w.down_since.pop(e.node, None)  # type: ignore[attr-defined]
                if since is not None:
                    self.w.max_detect = max(self.w.max_detect, now - since)
        elif t is ev.DispatcherChanged:
            self.w.timeline["dispatcher"].append((now, e.term, e.node))  # type: ignore[attr-defined]
            if self.w.dispatcher is not None and e.node != self.w.dispatcher:  # type: ignore[attr-defined]
                self.w.failovers += 1
            self.w.dispatcher = e.node  # type: ignore[attr-defined]
            self.update_gap()
        elif t is ev.NodeRegistered:
            self.w.timeline["status"].append((now, e.node, NodeStatus.INITIALIZING.value))  # type: ignore[attr-defined]
            limit = self.w.nodes[e.node].spec.concurrency_limit  # type: ignore[attr-defined]
            self.w.limits[e.node] = limit or default_limit(e.cores, e.memory_mb)  # type: ignore[attr-defined]
        elif t is ev.NodeRemoved:
            self.w.timeline["status"].append((now, e.node, "Removed"))  # type: ignore[attr-defined]

    # -- ticks: the core's deadlines
    def _schedule_tick(self) -> None:
        deadline = self.w.driver.deadline()
        if deadline is None:
            return
        if self.tick_at is not None and self.tick_at <= deadline:
            return
        self.tick_at = deadline
        self._tick_gen += 1
        gen = self._tick_gen
        self.w.at(deadline, lambda: self._tick(gen))

    def _tick(self, gen: int) -> None:
        if gen != self._tick_gen:
            return
        self.tick_at = None
        now = self.w.env.now
        self.handle(cmd.Tick(now))
        deadline = self.w.driver.deadline()
        if self.w.append_lost_at == now:  # the store lost the tick's events: tick again soon
            self.tick_at = None
            self._tick_gen += 1
            gen = self._tick_gen
            self.tick_at = now + 0.1
            self.w.at(now + 0.1, lambda: self._tick(gen))
            return
        if deadline is not None and deadline <= now:
            # A tick must resolve what is due; a deadline that stays in the past would spin
            # the simulation forever at one instant. Report it and move on.
            self.w.checkers.fail(f"deadlines: Tick({now:g}) left the deadline at {deadline:g}")
            self.tick_at = now + 1.0
            self._tick_gen += 1
            gen = self._tick_gen
            self.w.at(now + 1.0, lambda: self._tick(gen))
            return
        self._schedule_tick()

    # -- dispatcher gap: no *working* dispatcher (none, or one that is down in fact)
    def _working_dispatcher(self) -> bool:
        d = self.w.dispatcher
        node = self.w.nodes.get(d) if d else None
        return node is not None and node.alive() and self.w.net.link_ok(d, SERVICE, CONTROL)  # type: ignore[arg-type]

    def update_gap(self) -> None:
        """Start or end the current dispatcher gap (the ``max_dispatcher_gap_s`` metric)."""
        now = self.w.env.now
        working = self._working_dispatcher()
        if working and self.w.gap_started is not None:
            self.w.max_gap = max(self.w.max_gap, now - self.w.gap_started)
            self.w.gap_started = None
        elif not working and self.w.gap_started is None:
            self.w.gap_started = now


    def regenerate_key(self, slot: str) -> None:
        """A user regenerates ``slot``; operators paste the new key from then on."""
        old = self.w.keys[slot]
        seed = self.w._rng(f"key:{slot}:{old.generation + 1}").randbytes(48)
        new = AuthKey.from_seed(old.runtime_id, old.name, old.generation + 1, seed)
        self.handle(cmd.RegenerateAuthKey(new, self.w.env.now))  # retried if not stored
        self.w.keys[slot] = new  # operators paste the new key from now on

    def upgrade(self, node: SimNode, f: Fault) -> None:
        """Update ``node`` as ``f`` says (the service restarts it to install)."""
        name = node.name
        self.handle(cmd.StartUpgrade(name, f.version or node.version, self.w.env.now))
        n = self.w.driver.state.node(name)
        if n is None or n.upgrading_to is None:
            return
        node.crash()  # the service restarts to install
        node.up = False

        def finish() -> None:
            ok = not f.fail
            if ok:
                node.version = f.version or node.version
                if node.released_at is not None:
                    node.released_at = self.w.env.now  # a new version: its year starts now
            node.restart()
            self.handle(cmd.FinishUpgrade(name, ok, self.w.env.now, node.released_at,
                                          "" if ok else "installer failed"))

        self.w.later(f.duration_s, finish)

    def save_credential(self, node: str, credential: str,
                        version: int | None = None) -> None:
        """A user saves ``credential`` (the next version unless given) through ``node``."""
        latest = credential_status(self.w.driver.state).latest_version(credential) or 0
        version = latest + 1 if version is None else version
        if not self.w.nodes[node].alive():
            self.w.later(1.0, partial(self.save_credential, node, credential, version))
            return
        self.handle(SaveCredential(credential, version, node, self.w.env.now))
        if credential_status(self.w.driver.state).latest_version(credential) != version:
            # refused (the node is not registered yet, or offline): the user tries again
            self.w.later(1.0, partial(self.save_credential, node, credential, version))
            return
        held = self.w.nodes[node].credentials
        held[credential] = max(held.get(credential, 0), version)
        self.w.job_needs = tuple(
            CredentialVersion(c.credential_id, version) if c.credential_id == credential else c
            for c in self.w.job_needs
        )

    def set_limit(self, spec: NodeSpec) -> None:
        """A user sets the concurrency limit the scenario gives ``spec``'s node."""
        self.handle(SetConcurrencyLimit(spec.name, spec.concurrency_limit, self.w.env.now))
