"""Runtime state, ``evolve`` and ``fold``.

Theory of operation
-------------------
The state of one runtime lives in a private mutable ``_Model`` and is handed out as a
:class:`RuntimeState`, a small immutable *handle* stamped with the model's generation.
``evolve(state, event)`` applies the event to the model in place and returns a new handle; the
old handle is then *spent*: using it again raises :class:`SpentState` instead of silently showing
newer data. This is what makes replay fast (no copy per event; a queue of 100k jobs is not copied
per assignment) while keeping the functional contract honest. To branch, call ``state.copy()``
first: the copy is independent.

Every read a user can make (``nodes``, ``dispatcher``, ``status``...) returns values or copies,
never the model's own objects.

Event handlers live in the ``EVOLVE`` table below: one small function per event type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from shir.core import events as ev
from shir.core.errors import ShirError
from shir.core.jobs import JOB_EVOLVE, JobBook
from shir.core.model import (
    KeyName,
    KeyVerifier,
    NodeMetrics,
    NodeStatus,
    RuntimeSettings,
    RuntimeStatus,
)

if TYPE_CHECKING:
    from shir.core.credentials import CredentialSync, LatestCredential

__all__ = [
    "FIRST_HEARTBEAT_PENDING",
    "Node", "RuntimeInfo", "RuntimeState", "SpentState", "evolve", "fold", "initial"]


FIRST_HEARTBEAT_PENDING = "waiting for the first heartbeat"


class SpentState(ShirError):
    """A state handle was used after it had been evolved."""


@attrs.frozen
class RuntimeInfo:
    """The runtime resource: one self-hosted runtime in one data factory."""

    runtime_id: str
    factory_id: str
    name: str
    description: str
    settings: RuntimeSettings
    created_at: float
    type: str = "SelfHosted"


@attrs.define(slots=True)
class Node:
    """One registered node. Read from ``RuntimeState.nodes``: those are copies."""

    name: str
    seq: int  # registration order; the dispatcher rule prefers the earliest
    machine_id: str
    cores: int
    memory_mb: int
    registered_at: float
    metrics: NodeMetrics
    last_seen_at: float | None = None  # None until the first heartbeat
    session: int = 1
    status: NodeStatus = NodeStatus.INITIALIZING
    reasons: tuple[str, ...] = (FIRST_HEARTBEAT_PENDING,)
    offline_since: float | None = None
    upgrading_to: str | None = None
    warned_version: str = ""  # version whose expiry warning was already given
    intranet_address: str | None = None  # "host:port" where peers reach it, if it said
    cert_sha256: str | None = None  # fingerprint of its intranet TLS certificate, if it said

    def clone(self) -> Node:
        """An independent copy (the fields themselves are immutable values)."""
        # Spelled out: copy.copy goes through attrs' __getstate__ and is 5x slower.
        return Node(
            self.name, self.seq, self.machine_id, self.cores, self.memory_mb, self.registered_at,
            self.metrics, self.last_seen_at, self.session, self.status, self.reasons,
            self.offline_since, self.upgrading_to, self.warned_version, self.intranet_address,
            self.cert_sha256,
        )


class _Model:
    """The mutable body behind :class:`RuntimeState`. Private: handlers and ``decide`` only."""

    __slots__ = (
        "credentials", "dispatcher", "due", "gen", "jobs", "keys", "next_seq", "node_due",
        "nodes", "now", "pending", "runtime", "syncs", "term",
    )

    def __init__(self) -> None:
        self.gen = 0
        self.runtime: RuntimeInfo | None = None
        self.keys: dict[KeyName, KeyVerifier] = {}
        self.nodes: dict[str, Node] = {}
        self.next_seq = 1
        self.term = 0
        self.dispatcher: str | None = None
        self.now = float("-inf")
        self.jobs = JobBook()
        # Job ids whose lease ``decide`` has already ended or granted in the decision under way.
        # Job events are never applied to a scratch model (the job book is shared, and copying
        # a long queue per decision would make assignment cost grow with the queue).
        self.pending: set[str] = set()
        # Cached earliest node deadline (silence, version, expiry); None: recompute. Only
        # lifecycle events move it, so job traffic never pays for it.
        self.node_due: float | None = None
        # A lower bound of the next deadline of any kind; None: recompute. Lease events only
        # lower it (job handlers), lifecycle events clear it: most decisions compare one float.
        self.due: float | None = None
        # Credentials (shir.core.credentials): the latest version of each, and the outstanding
        # syncs by (credential, node). Copy-on-write: handlers rebind them, never change them in
        # place, so scratch models can share them.
        self.credentials: dict[str, LatestCredential] = {}
        self.syncs: dict[tuple[str, str], CredentialSync] = {}

    def scratch(self) -> _Model:
        """A copy whose node records may be changed freely (for ``decide``'s what-if).

        The job book is shared, read-only; job events go to ``pending`` instead.
        """
        m = _Model.__new__(_Model)
        for name in _Model.__slots__:
            setattr(m, name, getattr(self, name))
        m.keys = dict(self.keys)
        m.nodes = {name: n.clone() for name, n in self.nodes.items()}
        m.pending = set()
        return m


class RuntimeState:
    """An immutable view of one runtime's state at one point of its event stream."""

    __slots__ = ("_gen", "_m")

    def __init__(self, model: _Model) -> None:
        self._m = model
        self._gen = model.gen

    def model(self) -> _Model:
        """The live model behind this handle (core-internal); raises if the handle is spent."""
        m = self._m
        if m.gen != self._gen:
            raise SpentState(
                "this RuntimeState was already evolved: use the state that evolve/fold returned, "
                "or call state.copy() before evolving to keep a branch"
            )
        return m

    def copy(self) -> RuntimeState:
        """An independent state equal to this one, which can be evolved separately."""
        m = self.model().scratch()
        m.jobs = m.jobs.copy()
        m.gen = 0
        return RuntimeState(m)

    @property
    def runtime(self) -> RuntimeInfo | None:
        """The runtime resource, or None before ``CreateRuntime``."""
        return self.model().runtime

    @property
    def settings(self) -> RuntimeSettings:
        """The runtime's settings (defaults before it is created)."""
        rt = self.model().runtime
        return rt.settings if rt else RuntimeSettings()

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Copies of the registered nodes, in registration order."""
        return tuple(n.clone() for n in self.model().nodes.values())

    def node(self, name: str) -> Node | None:
        """A copy of the node called ``name``, if registered."""
        n = self.model().nodes.get(name)
        return n.clone() if n else None

    @property
    def dispatcher(self) -> str | None:
        """The node that dispatches work in the current term, if any."""
        return self.model().dispatcher

    @property
    def term(self) -> int:
        """The current dispatcher term: starts at 0 and only grows."""
        return self.model().term

    @property
    def now(self) -> float:
        """The latest time this state has seen."""
        return self.model().now

    @property
    def jobs(self) -> JobBook:
        """A copy of the job book: queue, leases and counters (see ``shir.core.jobs``)."""
        return self.model().jobs.copy()

    @property
    def key_generations(self) -> dict[KeyName, int]:
        """The current generation of each auth key."""
        return {k: v.generation for k, v in self.model().keys.items()}

    @property
    def status(self) -> RuntimeStatus:
        """The runtime's status, derived from its nodes."""
        from shir.core.rules import runtime_status  # rules imports state: break the cycle here

        return runtime_status(self.model())

    def fingerprint(self) -> tuple[Any, ...]:
        """Everything in the state, as plain values: equal states have equal fingerprints."""
        m = self.model()
        return (
            m.runtime,
            tuple(sorted((k.value, v) for k, v in m.keys.items())),
            tuple((name, attrs.astuple(n, recurse=False)) for name, n in m.nodes.items()),
            m.next_seq,
            m.term,
            m.dispatcher,
            m.now,
            m.jobs.fingerprint(),
            tuple(sorted(m.credentials.items())),
            tuple(sorted(m.syncs.items())),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuntimeState):
            return NotImplemented
        return self.fingerprint() == other.fingerprint()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        m = self._m
        if m.gen != self._gen:
            return "RuntimeState(<spent>)"
        name = m.runtime.name if m.runtime else None
        return (
            f"RuntimeState(runtime={name!r}, nodes={list(m.nodes)}, term={m.term}, "
            f"dispatcher={m.dispatcher!r})"
        )


def initial() -> RuntimeState:
    """The state before any event: no runtime, no nodes, term 0."""
    return RuntimeState(_Model())


# --- evolve handlers: one per event type ---------------------------------------------------

def _runtime_created(m: _Model, e: ev.RuntimeCreated) -> None:
    m.runtime = RuntimeInfo(e.runtime_id, e.factory_id, e.name, e.description, e.settings, e.at)
    m.jobs.window_s = e.settings.duplicate_window_s
    m.keys = {KeyName.KEY1: e.key1, KeyName.KEY2: e.key2}


def _auth_key_regenerated(m: _Model, e: ev.AuthKeyRegenerated) -> None:
    m.keys[e.key.name] = e.key


def _node_registered(m: _Model, e: ev.NodeRegistered) -> None:
    m.nodes[e.node] = Node(e.node, m.next_seq, e.machine_id, e.cores, e.memory_mb, e.at, e.metrics,
                           intranet_address=e.intranet_address, cert_sha256=e.cert_sha256)
    m.next_seq += 1


def _node_removed(m: _Model, e: ev.NodeRemoved | ev.NodeLeft) -> None:
    del m.nodes[e.node]
    if m.syncs:  # no sync to a node that is gone (copy-on-write, see _Model)
        m.syncs = {k: v for k, v in m.syncs.items() if k[1] != e.node}


def _heartbeat_received(m: _Model, e: ev.HeartbeatReceived) -> None:
    n = m.nodes[e.node]
    n.last_seen_at = e.at
    n.metrics = e.metrics


def _node_status_changed(m: _Model, e: ev.NodeStatusChanged) -> None:
    n = m.nodes[e.node]
    if e.status is NodeStatus.OFFLINE and n.status is not NodeStatus.OFFLINE:
        n.offline_since = e.at
    elif e.status is not NodeStatus.OFFLINE:
        n.offline_since = None
    n.status = e.status
    n.reasons = e.reasons


def _node_rejoined(m: _Model, e: ev.NodeRejoined) -> None:
    n = m.nodes[e.node]
    n.session = e.session
    n.last_seen_at = e.at


def _dispatcher_changed(m: _Model, e: ev.DispatcherChanged) -> None:
    m.term = e.term
    m.dispatcher = e.node


def _version_expiry_warned(m: _Model, e: ev.VersionExpiryWarned) -> None:
    m.nodes[e.node].warned_version = e.version


def _upgrade_started(m: _Model, e: ev.UpgradeStarted) -> None:
    m.nodes[e.node].upgrading_to = e.to_version


def _upgrade_finished(m: _Model, e: ev.UpgradeFinished) -> None:
    n = m.nodes[e.node]
    n.upgrading_to = None
    n.last_seen_at = e.at  # the node reported the outcome itself
    n.metrics = attrs.evolve(
        n.metrics, version=e.version, version_released_at=e.version_released_at
    )


EVOLVE: dict[type, Callable[[_Model, Any], None]] = {
    ev.RuntimeCreated: _runtime_created,
    ev.AuthKeyRegenerated: _auth_key_regenerated,
    ev.NodeRegistered: _node_registered,
    ev.NodeRemoved: _node_removed,
    ev.NodeLeft: _node_removed,
    ev.HeartbeatReceived: _heartbeat_received,
    ev.NodeStatusChanged: _node_status_changed,
    ev.NodeRejoined: _node_rejoined,
    ev.DispatcherChanged: _dispatcher_changed,
    ev.VersionExpiryWarned: _version_expiry_warned,
    ev.UpgradeStarted: _upgrade_started,
    ev.UpgradeFinished: _upgrade_finished,
}


EVOLVE.update(JOB_EVOLVE)


_JOB_TYPES = frozenset(JOB_EVOLVE)


def apply(m: _Model, events: Iterable[object]) -> None:
    """Apply events to a model in place (core-internal; ``decide`` uses it on scratch models)."""
    table = EVOLVE
    job_types = _JOB_TYPES
    now = m.now
    lifecycle = False
    for e in events:
        t = type(e)
        table[t](m, e)
        if t not in job_types:
            lifecycle = True
        at = e.at  # type: ignore[attr-defined]
        if at > now:
            now = at
    m.now = now
    if lifecycle:
        m.node_due = m.due = None


def fold(state: RuntimeState, events: Iterable[object]) -> RuntimeState:
    """Apply ``events`` in order; ``state`` is spent afterwards (see the module docstring)."""
    m = state.model()
    apply(m, events)
    m.gen += 1
    return RuntimeState(m)


def evolve(state: RuntimeState, event: object) -> RuntimeState:
    """Apply one event; ``state`` is spent afterwards."""
    return fold(state, (event,))
