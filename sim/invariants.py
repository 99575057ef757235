"""Invariant checkers: they read the event stream, apart from the workload and from the core.

Each checker keeps its own small shadow of what the events say (never the core's state), checks
every batch of events as it is stored, and reports violations as plain sentences with the time.
``check_snapshot`` checks at the end that a snapshot taken midway plus the tail of the log gives
the same state as the whole log.

The checks (docs/simulation.md explains each):

- ``terms``: terms only grow, by one, and each term has exactly one dispatcher announcement.
- ``leases``: at most one live lease per job; every renewal or end names the live lease;
  deliveries of a job go up by one.
- ``capacity``: no assignment takes a node above its concurrency limit.
- ``effects``: at most one completion per idempotency key (no duplicate effect).
- ``membership``: at most max_nodes nodes; a node registers only with a key generation that
  was current when it registered.
- ``replay``: a snapshot taken midway, as bytes, restored and folded with the tail of the log,
  equals the live state (the fold of the whole log). ``shir sim replay`` and the tests also
  decode a whole recorded log and fold it to the same state.
- ``lost`` (at the end): every accepted job is completed, dead-lettered, or still in the queue.
- ``credentials`` (at the end, after the drain): every Online or Limited node holds the latest
  version of every credential (versions converge).

:class:`ClusterChecks` adds the failover checks the property machine (``shir.sim.testing``) runs
on top of these: they also watch the commands the core accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from shir.core import events as ev
from shir.core import jobs
from shir.core.leasing import DispatchJobs, default_limit
from shir.core.model import KeyName, NodeStatus
from shir.core.snapshot import restore
from shir.core.state import RuntimeState, fold

if TYPE_CHECKING:
    from shir.sim.world import World

__all__ = ["Checkers", "ClusterChecks", "check_snapshot"]


class Checkers:
    """All stream checkers; ``on_events`` is a driver listener."""

    def __init__(self, clock: Callable[[], float],
                 presented_generation: Callable[[str], int | None]) -> None:
        self.clock = clock
        self.presented_generation = presented_generation
        self.violations: list[str] = []
        self.term = 0
        self.max_nodes = 4
        self.nodes: dict[str, int] = {}  # node -> default limit
        self.limits: dict[str, int] = {}  # overrides
        self.running: dict[str, int] = {}
        self.live: dict[str, jobs.LeaseToken] = {}
        self.deliveries: dict[str, int] = {}
        self.completed_keys: set[str] = set()
        self.dead_keys: set[str] = set()
        self.duplicate_effects = 0
        self.key_generation: dict[KeyName, int] = {}
        self.handlers: dict[type, Callable[[Any], None]] = {
            ev.RuntimeCreated: self._runtime_created,
            ev.AuthKeyRegenerated: self._key_regenerated,
            ev.NodeRegistered: self._node_registered,
            ev.NodeRemoved: self._node_removed,
            ev.NodeLeft: self._node_removed,
            ev.DispatcherChanged: self._dispatcher_changed,
            jobs.JobLeased: self._leased,
            jobs.LeaseRenewed: self._renewed,
            jobs.LeasesRenewed: self._renewed_many,
            jobs.JobCompleted: self._completed,
            jobs.JobReleased: self._ended,
            jobs.JobDeadLettered: self._ended,
            jobs.ConcurrencyLimitSet: self._limit_set,
        }

    def fail(self, what: str) -> None:
        """Record a violation, stamped with the simulated time."""
        self.violations.append(f"t={self.clock():.3f}s {what}")

    def on_events(self, events: Sequence[object]) -> None:
        """Check one stored batch."""
        handlers = self.handlers
        for e in events:
            h = handlers.get(type(e))
            if h is not None:
                h(e)

    # -- membership
    def _runtime_created(self, e: ev.RuntimeCreated) -> None:
        self.max_nodes = e.settings.max_nodes
        self.key_generation = {KeyName.KEY1: e.key1.generation, KeyName.KEY2: e.key2.generation}

    def _key_regenerated(self, e: ev.AuthKeyRegenerated) -> None:
        self.key_generation[e.key.name] = e.key.generation

    def _node_registered(self, e: ev.NodeRegistered) -> None:
        self.nodes[e.node] = default_limit(e.cores, e.memory_mb)
        if len(self.nodes) > self.max_nodes:
            self.fail(f"membership: {len(self.nodes)} nodes, more than {self.max_nodes}")
        presented = self.presented_generation(e.node)
        current = self.key_generation.get(e.key_name)
        if presented is not None and presented != current:
            self.fail(
                f"membership: {e.node} joined with {e.key_name.value} generation {presented}, "
                f"but generation {current} was current"
            )

    def _node_removed(self, e: ev.NodeRemoved | ev.NodeLeft) -> None:
        self.nodes.pop(e.node, None)
        if self.running.get(e.node):
            self.fail(f"leases: {e.node} removed while holding {self.running[e.node]} leases")

    # -- terms
    def _dispatcher_changed(self, e: ev.DispatcherChanged) -> None:
        if e.term != self.term + 1:
            self.fail(f"terms: term went from {self.term} to {e.term} (must grow by one)")
        self.term = max(self.term, e.term)

    # -- leases and capacity
    def _limit_set(self, e: jobs.ConcurrencyLimitSet) -> None:
        if e.limit is None:
            self.limits.pop(e.node, None)
        else:
            self.limits[e.node] = e.limit

    def _leased(self, e: jobs.JobLeased) -> None:
        t = e.token
        if t.job_id in self.live:
            self.fail(f"leases: {t.job_id} leased to {t.node} while {self.live[t.job_id]} is live")
        if t.delivery != self.deliveries.get(t.job_id, 0) + 1:
            self.fail(f"leases: {t.job_id} delivery {t.delivery} after "
                      f"{self.deliveries.get(t.job_id, 0)} (deliveries go up by one)")
        if t.term != self.term:
            self.fail(f"terms: {t.job_id} leased under term {t.term} during term {self.term}")
        self.deliveries[t.job_id] = t.delivery
        self.live[t.job_id] = t
        n = self.running.get(t.node, 0) + 1
        self.running[t.node] = n
        limit = self.limits.get(t.node, self.nodes.get(t.node, 0))
        if n > limit:
            self.fail(f"capacity: {t.node} runs {n} jobs, above its limit {limit}")

    def _check_live(self, token: jobs.LeaseToken, what: str) -> bool:
        live = self.live.get(token.job_id)
        if live != token:
            self.fail(f"leases: {what} of {token.job_id} with {token}, live lease is {live}")
            return False
        return True

    def _renewed(self, e: jobs.LeaseRenewed) -> None:
        self._check_live(e.token, "renewal")

    def _renewed_many(self, e: jobs.LeasesRenewed) -> None:
        live = self.live
        for token in e.tokens:
            if live.get(token.job_id) != token:
                self._check_live(token, "renewal")

    def _end(self, token: jobs.LeaseToken, what: str) -> None:
        if self._check_live(token, what):
            del self.live[token.job_id]
            self.running[token.node] -= 1

    def _completed(self, e: jobs.JobCompleted) -> None:
        self._end(e.token, "completion")
        if e.idempotency_key in self.completed_keys:
            self.duplicate_effects += 1
            self.fail(f"effects: idempotency key {e.idempotency_key} completed twice")
        self.completed_keys.add(e.idempotency_key)
        self.deliveries.pop(e.token.job_id, None)

    def _ended(self, e: jobs.JobReleased | jobs.JobDeadLettered) -> None:
        self._end(e.token, "release")
        if isinstance(e, jobs.JobDeadLettered):
            self.deliveries.pop(e.token.job_id, None)
            self.dead_keys.add(e.idempotency_key)


def check_snapshot(snapshot: bytes | None, tail: Sequence[object], live: RuntimeState) -> list[str]:
    """A snapshot taken midway (as bytes), restored and folded with the tail, must equal the
    live state, which is the fold of the whole log."""
    if snapshot is None:
        return []
    if fold(restore(snapshot), tail) != live:
        return ["replay: snapshot + tail differs from the full replay (the live state)"]
    return []


class ClusterChecks:
    """Failover invariants over the commands the core accepts and the events it stores.

    - ``dispatchers``: in each term, dispatches are accepted from one node only;
    - ``fencing``: an accepted ``DispatchJobs`` carries the current term and comes from its
      dispatcher; no lease is renewed or completed after its node went Offline since it was
      granted (a node back from hibernation cannot act under its old term or lease);
    - ``offline-leases``: a node that is Offline (or removed) holds no lease.

    Attach to a World before it runs: a driver listener for the events, and a wrapper around
    ``world.driver.handle`` to see which commands were accepted.
    """

    CATEGORIES = ("dispatchers", "fencing", "offline-leases")

    def __init__(self, world: World) -> None:
        self.world = world
        self.violations: list[str] = []
        self.status: dict[str, NodeStatus] = {}
        self.leases: dict[str, set[str]] = {}  # node -> jobs it holds
        self.epoch: dict[str, int] = {}  # node -> how many times it went Offline or was removed
        self.lease_epoch: dict[str, int] = {}  # job -> its node's epoch when leased
        self.dispatchers: dict[int, set[str]] = {}  # term -> nodes whose dispatch was accepted
        driver = world.driver
        driver.listeners.append(self.on_events)
        inner = driver.handle

        def handle(command: object) -> tuple[object, ...]:
            effects = inner(command)  # raises when refused
            if type(command) is DispatchJobs:
                self.on_dispatch(command)
            return effects

        driver.handle = handle  # type: ignore[method-assign]

    def fail(self, category: str, what: str) -> None:
        """Record a violation stamped with the simulated time."""
        self.violations.append(f"t={self.world.env.now:.3f}s {category}: {what}")

    def of(self, category: str) -> list[str]:
        """The violations of one category."""
        tag = f" {category}: "
        return [v for v in self.violations if tag in v]

    def on_dispatch(self, c: DispatchJobs) -> None:
        state = self.world.driver.state
        term, dispatcher = state.term, state.dispatcher
        if c.term != term or c.node != dispatcher:
            self.fail("fencing", f"{c.node} dispatched under term {c.term} during term {term} "
                                 f"(dispatcher {dispatcher}), and the core accepted it")
        seen = self.dispatchers.setdefault(term, set())
        seen.add(c.node)
        if len(seen) > 1:
            self.fail("dispatchers", f"term {term} had dispatches from {sorted(seen)}")

    def on_events(self, batch: Sequence[object]) -> None:
        lost: list[str] = []
        for e in batch:
            t = type(e)
            if t is ev.NodeStatusChanged:
                before = self.status.get(e.node)  # type: ignore[attr-defined]
                self.status[e.node] = e.status  # type: ignore[attr-defined]
                if e.status is NodeStatus.OFFLINE and before is not NodeStatus.OFFLINE:  # type: ignore[attr-defined]
                    self.epoch[e.node] = self.epoch.get(e.node, 0) + 1  # type: ignore[attr-defined]
                    lost.append(e.node)  # type: ignore[attr-defined]
            elif t is ev.NodeRemoved or t is ev.NodeLeft:
                self.status.pop(e.node, None)  # type: ignore[attr-defined]
                self.epoch[e.node] = self.epoch.get(e.node, 0) + 1  # type: ignore[attr-defined]
                lost.append(e.node)  # type: ignore[attr-defined]
            elif t is ev.NodeRegistered:
                self.status[e.node] = NodeStatus.INITIALIZING  # type: ignore[attr-defined]
            elif t is jobs.JobLeased:
                token = e.token  # type: ignore[attr-defined]
                self.leases.setdefault(token.node, set()).add(token.job_id)
                self.lease_epoch[token.job_id] = self.epoch.get(token.node, 0)
                if self.status.get(token.node) is not NodeStatus.OFFLINE:
                    continue
                self.fail("offline-leases", f"{token.job_id} leased to {token.node}, Offline")
            elif t is jobs.LeaseRenewed or t is jobs.LeasesRenewed or t is jobs.JobCompleted:
                tokens = e.tokens if t is jobs.LeasesRenewed else (e.token,)  # type: ignore[attr-defined]
                for token in tokens:
                    granted = self.lease_epoch.get(token.job_id)
                    if granted is not None and granted != self.epoch.get(token.node, 0):
                        verb = "completed" if t is jobs.JobCompleted else "renewed"
                        self.fail("fencing", f"{token.node} {verb} {token.job_id} under a "
                                             "lease granted before it went Offline")
                    if t is jobs.JobCompleted:
                        self._end(token)
            elif t is jobs.JobReleased or t is jobs.JobDeadLettered:
                self._end(e.token)  # type: ignore[attr-defined]
        for node in lost:
            held = self.leases.get(node)
            if held and self.status.get(node, NodeStatus.OFFLINE) is NodeStatus.OFFLINE:
                self.fail("offline-leases", f"{node} went Offline (or was removed) still holding "
                                            f"{len(held)} lease(s): {sorted(held)[:3]}")

    def _end(self, token: jobs.LeaseToken) -> None:
        held = self.leases.get(token.node)
        if held is not None:
            held.discard(token.job_id)
        self.lease_epoch.pop(token.job_id, None)
