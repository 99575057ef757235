"""The kernel: the runtime's model and the helpers every concern's decisions share.

Theory of operation
-------------------
The state of one runtime lives in a mutable :class:`Model` and is handed out as a
:class:`RuntimeState`, a small immutable *handle* stamped with the model's generation.
``evolve(state, event)`` (``shir.core.state``) applies the event to the model in place and
returns a new handle; the old handle is then *spent*: using it again raises :class:`SpentState`
instead of silently showing newer data. This is what makes replay fast (no copy per event; a
queue of 100k jobs is not copied per assignment) while keeping the functional contract honest.
To branch, call ``state.copy()`` first: the copy is independent.

Every read a user can make (``nodes``, ``dispatcher``, ``status``...) returns values or copies,
never the model's own objects.

The concerns (``lifecycle``, ``leasing``, ``credentials``) decide on a *scratch* model
(``Model.scratch``) with the helpers below, and ``shir.core.decide`` composes them: a handler
is ``(model, command, decider) -> events``, where the :class:`Decider` starts a decision at a
time (settling what is due first) and settles again after the handler's own events. This module
imports no concern, so no concern imports another's private names to share these.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs

from shir.core.effects import Disconnect
from shir.core.errors import (
    InvalidCommand,
    RuntimeNotFound,
    ShirError,
    TimeWentBackwards,
    UnknownNode,
)
from shir.core.jobs import JOB_EVOLVE, JobBook
from shir.core.model import (
    KeyName,
    KeyVerifier,
    NodeMetrics,
    NodeStatus,
    RuntimeSettings,
    RuntimeStatus,
)

__all__ = [
    "DAY_S",
    "FIRST_HEARTBEAT_PENDING",
    "JOB_EVENTS",
    "MAX_NAME",
    "MAX_REMEMBERED_REMOVALS",
    "NEVER",
    "Decider",
    "Events",
    "Handler",
    "Model",
    "Node",
    "Rule",
    "RuntimeInfo",
    "RuntimeState",
    "SpentState",
    "TimedRule",
    "apply",
    "check_name",
    "check_time",
    "check_utf8",
    "emit",
    "first_at",
    "node_of",
    "runtime_of",
    "runtime_status",
]

DAY_S = 86_400.0
NEVER = float("inf")
MAX_NAME = 128
Events = list[object]

FIRST_HEARTBEAT_PENDING = "waiting for the first heartbeat"
MAX_REMEMBERED_REMOVALS = 16


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
    last_update: str = ""  # the outcome of its latest update, in words ("" if none)
    # when it last became live (first heartbeat, or rejoining after silence): a peer's
    # reachability report taken before then says nothing about it
    live_since: float | None = None
    envelope_key: bytes | None = None  # its X25519 public key for credential envelopes, if said

    def clone(self) -> Node:
        """An independent copy (the fields themselves are immutable values)."""
        # Spelled out: copy.copy goes through attrs' __getstate__ and is 5x slower.
        return Node(
            self.name, self.seq, self.machine_id, self.cores, self.memory_mb, self.registered_at,
            self.metrics, self.last_seen_at, self.session, self.status, self.reasons,
            self.offline_since, self.upgrading_to, self.warned_version, self.intranet_address,
            self.cert_sha256, self.last_update, self.live_since, self.envelope_key,
        )

    def facts(self) -> tuple[Any, ...]:
        """Every field, as a tuple: equal tuples, the same node record (a test checks that no
        field is left out)."""
        return (
            self.name, self.seq, self.machine_id, self.cores, self.memory_mb, self.registered_at,
            self.metrics, self.last_seen_at, self.session, self.status, self.reasons,
            self.offline_since, self.upgrading_to, self.warned_version, self.intranet_address,
            self.cert_sha256, self.last_update, self.live_since, self.envelope_key,
        )


class Model:
    """The mutable body behind :class:`RuntimeState`: the concerns' handlers and rules only.

    ``evolve`` is the merged evolve table (``shir.core.decide.EVOLVE``), handed in by
    ``shir.core.state.initial``: :func:`apply` looks handlers up in it.
    """

    __slots__ = (
        "credentials", "dirty", "dispatcher", "due", "evolve", "gen", "job_rules", "jobs", "keys",
        "marks", "next_seq", "nodes", "now", "pending", "proxies", "removed", "rule_due", "rules",
        "runtime", "scratched", "settled", "sharing", "status_memo", "syncs", "term", "wild",
    )

    def __init__(self, evolve: Mapping[type, Callable[[Model, Any], None]],
                 rules: tuple[TimedRule, ...] = ()) -> None:
        self.evolve = evolve
        # The timed rules (``shir.core.decide.RULES`` when the state was made) and what settling
        # them needs to skip the ones with nothing to do: derived, never persisted (a restored
        # or copied model starts with every rule dirty and recomputes).
        self.rules = rules
        self.marks, self.wild = _marks(rules)
        self.job_rules = tuple(i for i, r in enumerate(rules) if r.moved_by_jobs)
        # A lower bound of each rule's next due time (NEVER: none), valid while its bit in
        # ``dirty`` is clear. A lifecycle event sets the bits of the rules that read it
        # (``TimedRule.reads``); a job event only lowers the bounds of ``moved_by_jobs`` rules.
        self.rule_due = [NEVER] * len(rules)
        self.dirty = (1 << len(rules)) - 1
        # The earliest of ``rule_due``, or None when a rule is dirty: most decisions compare
        # one float and settle nothing.
        self.due: float | None = None
        # Status derivation, per node: (its facts, the runtime-wide facts, until when the
        # derivation holds) when it last found no change (``lifecycle.derive_statuses``).
        self.status_memo: dict[str, tuple[tuple[Any, ...], tuple[Any, ...], float]] = {}
        # The scratch model of the decision under way, and the last decision's events with its
        # scratch model: folding those very events adopts the scratch's caches (``fold``).
        self.scratched: Model | None = None
        self.settled: tuple[tuple[object, ...], Model] | None = None
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
        # Credentials (shir.core.credentials): the latest version of each, and the outstanding
        # syncs by (credential, node). Copy-on-write: handlers rebind them, never change them in
        # place, so scratch models can share them.
        # (Values are credentials.LatestCredential and CredentialSync: the kernel imports no
        # concern.)
        self.credentials: dict[str, Any] = {}
        self.syncs: dict[tuple[str, str], Any] = {}
        # Sharing (shir.core.sharing: a SharingState; None: nothing shared yet) and proxy
        # settings by (node, seq) (shir.core.proxy): copy-on-write like the credentials.
        self.sharing: Any = None
        self.proxies: dict[tuple[str, int], Any] = {}
        # The latest removals (name -> (reason, at)), so a removed node that speaks again is told
        # why it needs registration. Copy-on-write, at most MAX_REMEMBERED_REMOVALS.
        self.removed: dict[str, tuple[str, float]] = {}

    def scratch(self) -> Model:
        """A copy whose node records may be changed freely (for ``decide``'s what-if).

        The job book is shared, read-only; job events go to ``pending`` instead.
        """
        m = Model.__new__(Model)
        for name in Model.__slots__:
            setattr(m, name, getattr(self, name))
        m.keys = dict(self.keys)
        m.nodes = {name: n.clone() for name, n in self.nodes.items()}
        m.pending = set()
        m.rule_due = list(self.rule_due)
        m.status_memo = dict(self.status_memo)
        m.scratched = m.settled = None
        return m

    def jobs_moved(self, at: float) -> None:
        """A job event may make the ``moved_by_jobs`` rules due at ``at`` (a lease's expiry):
        lower their bounds (called by the job handlers, ``shir.core.jobs``)."""
        if self.due is not None and at < self.due:
            self.due = at
        dues = self.rule_due
        for i in self.job_rules:
            if at < dues[i]:
                dues[i] = at


class RuntimeState:
    """An immutable view of one runtime's state at one point of its event stream."""

    __slots__ = ("_gen", "_m")

    def __init__(self, model: Model) -> None:
        self._m = model
        self._gen = model.gen

    def model(self) -> Model:
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
            None if m.sharing is None else (
                tuple(m.sharing.grants.items()), tuple(m.sharing.links.items())),
            tuple(sorted(m.proxies.items())),
            tuple(m.removed.items()),
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




def runtime_status(m: Model) -> RuntimeStatus:
    """The runtime's status, derived from its nodes: NeedRegistration without nodes; Online
    when every node is Online; Offline when no node is Online or Limited; Limited otherwise."""
    if not m.nodes:
        return RuntimeStatus.NEED_REGISTRATION
    statuses = [n.status for n in m.nodes.values()]
    if all(s is NodeStatus.ONLINE for s in statuses):
        return RuntimeStatus.ONLINE
    if not any(s in (NodeStatus.ONLINE, NodeStatus.LIMITED) for s in statuses):
        return RuntimeStatus.OFFLINE
    return RuntimeStatus.LIMITED


def apply(m: Model, events: Iterable[object]) -> None:
    """Apply events to a model in place (``decide`` uses it on scratch models)."""
    table = m.evolve
    now = m.now
    dirty = m.dirty
    for e in events:
        t = type(e)
        table[t](m, e)
        if t not in JOB_EVENTS:
            dirty |= m.marks.get(t, m.wild)
        at = e.at  # type: ignore[attr-defined]
        if at > now:
            now = at
    m.now = now
    if dirty != m.dirty:
        m.dirty = dirty
        m.due = None


# --- helpers the concerns' decisions share --------------------------------------------------

def check_name(what: str, value: str) -> None:
    """Refuse a name that is empty, over-long or holds control characters."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise InvalidCommand(f"{what} must be 1-{MAX_NAME} characters, got {value!r:.60}")
    if any(ord(ch) < 32 for ch in value):
        raise InvalidCommand(f"{what} must not contain control characters")
    check_utf8(what, value)


def check_utf8(what: str, value: str) -> None:
    """Refuse text that cannot be stored: a lone surrogate (from bytes that were not UTF-8, or a
    JSON ``\\udXXX`` escape) would be decided, and then fail when the store encodes it."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidCommand(
                f"{what} {ascii(value)[:60]} is not UTF-8 text (it holds a lone surrogate): "
                "send names and ids as UTF-8"
            ) from None


def runtime_of(m: Model) -> RuntimeInfo:
    """The runtime; refuses the command when none was created yet."""
    if m.runtime is None:
        raise RuntimeNotFound("no runtime exists in this stream yet; send CreateRuntime first")
    return m.runtime


def node_of(m: Model, name: str) -> Node:
    """The registered node ``name``; refuses the command (``UnknownNode``) when there is none."""
    n = m.nodes.get(name)
    if n is None:
        rt = m.runtime.name if m.runtime else "?"
        gone = m.removed.get(name)
        if gone is not None:
            reason, at = gone
            raise UnknownNode(
                f"node {name!r:.60} was removed from runtime {rt!r} at {at:g} s ({reason}): "
                "it needs registration; register it again with an auth key",
                Disconnect(name, f"removed at {at:g} s ({reason}): register again"),
            )
        known = ", ".join(m.nodes) or "none"
        raise UnknownNode(
            f"node {name!r:.60} is not registered in runtime {rt!r} (nodes: {known}); "
            "register it with an auth key first",
            Disconnect(name, "not registered"),
        )
    return n


def check_time(m: Model, at: float) -> None:
    """Refuse a time that is not a number or is earlier than what the model has seen."""
    if not isinstance(at, (int, float)) or at != at:
        raise InvalidCommand(f"'at' must be a number of seconds, got {at!r}")
    if at < m.now:
        raise TimeWentBackwards(
            f"command stamped at {at:g} s, but the runtime has already seen {m.now:g} s; "
            "drive the core with one non-decreasing clock"
        )


JOB_EVENTS = frozenset(JOB_EVOLVE)  # job events never touch a scratch model's node records


def emit(s: Model, out: Events, e: object) -> None:
    """Record ``e`` as decided and apply it to the scratch model ``s``."""
    if type(e) in JOB_EVENTS:
        # The job book is shared with the real model: note the job instead (see Model.pending).
        token = getattr(e, "token", None)
        if token is not None:
            s.pending.add(token.job_id)
    else:
        apply(s, (e,))
    out.append(e)


def first_at(start: float, span: float) -> float:
    """``start + span``, or the next float up if needed for ``t - start >= span`` to hold.

    That is the test the rules apply, and ``start + span`` can round below it: a tick there
    would find nothing due, and the same deadline would come back forever.
    """
    t = start + span
    while t - start < span:
        t = math.nextafter(t, math.inf)
    return t


# --- how decisions and timed rules are composed ---------------------------------------------

Rule = Callable[[Model, float], tuple[Events, "float | None"]]


@attrs.frozen
class TimedRule:
    """One timed rule of a concern: ``due(model, at)`` returns the events due at ``at`` and the
    rule's next due time (None: none): it must find nothing before that time while the facts
    it reads stay the same.

    ``reads``: the (non-job) event types whose facts it reads; None: any. A decision settles
    the rule only when one of them was applied since it last found nothing, or its due time
    has come. ``moved_by_jobs``: job events can make it due (a new lease's expiry).
    """

    name: str
    due: Rule
    moved_by_jobs: bool = False
    reads: frozenset[type] | None = None


@functools.lru_cache(maxsize=8)
def _marks(rules: tuple[TimedRule, ...]) -> tuple[dict[type, int], int]:
    """Which rules each event type dirties (a bit per rule), and the bits of the rules that
    read every event (``reads=None``)."""
    wild = sum(1 << i for i, r in enumerate(rules) if r.reads is None)
    marks: dict[type, int] = {}
    for i, r in enumerate(rules):
        for t in r.reads or ():
            marks[t] = marks.get(t, wild) | 1 << i
    return marks, wild


class Decider(Protocol):
    """What ``shir.core.decide`` hands every handler: the composed timed rules."""

    def timed(self, m: Model, at: float, *, jobs_only: bool = False) -> tuple[Model, Events]:
        """Start a decision at ``at``: check the clock, settle what is due on a scratch model."""
        ...

    def settle(self, s: Model, at: float, out: Events) -> None:
        """Emit what every timed rule finds due at ``at`` on the scratch model ``s``."""
        ...


Handler = Callable[[Model, Any, Decider], Events]
