"""The node lifecycle rules, as data, in one place.

Theory of operation
-------------------
A node's status is not set by hand: it is *derived* from facts (when it last spoke, what it
reported, whether it is being upgraded) by the ordered table ``STATUS_RULES``. Each row names a
status and a check that returns a reason or None. The first status with at least one reason wins;
all of that status's reasons are kept (a node can be Limited for two reasons at once). A node
with no reason anywhere is Online.

After every command ``decide`` re-derives each node's status; a difference becomes a
``NodeStatusChanged`` event. ``TRANSITIONS``, written by hand, lists the status changes the
rules allow and what causes each: ``decide`` asserts every change it emits is listed (a test
plants an unlisted one), and docs/state-machine.md is generated from it
(``python -m shir.core.rules``), with a test that keeps the two in sync. A node never returns to
Initializing, an Offline or InitializeFailed node cannot start an update (``StartUpgrade`` is
refused), and a node fails to initialize only from Initializing.

Dispatcher rule: the dispatcher keeps its role while it is *eligible* (Online or Limited, with a
working control channel). When it is not, the eligible node registered earliest takes over, in a
new term; if none is eligible the term still advances, to "no dispatcher". Terms only grow, so
anything stamped with an older term is refused.

Runtime status: NeedRegistration without nodes; Online when every node is Online; Offline when
no node is Online or Limited; Limited otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import attrs

from shir.core.errors import DomainError, UnknownNode
from shir.core.kernel import DAY_S, FIRST_HEARTBEAT_PENDING, Model, Node, runtime_status
from shir.core.keys import InvalidAuthKey
from shir.core.model import NodeStatus

__all__ = [
    "DOWN",
    "STATUS_RULES",
    "TRANSITIONS",
    "Context",
    "StatusRule",
    "derive_status",
    "is_silent",
    "local_status",
    "mermaid",
    "runtime_status",
]


@attrs.frozen
class Context:
    """Runtime-wide facts the status checks need, computed once per settle."""

    now: float
    offline_after_s: float
    version_lifetime_s: float
    majority_version: str | None
    majority_config: str | None  # None unless a strict majority agrees
    live_nodes: frozenset[str]
    # when each live node became live (None: unknown), so a report older than that is no verdict
    live_since: Mapping[str, float | None] = attrs.field(factory=dict)
    # (credential id, latest version) of every saved credential, by id (shir.core.credentials)
    latest_credentials: tuple[tuple[str, int], ...] = ()

    def facts(self) -> tuple[object, ...]:
        """Everything but the time, as a tuple: status derivations made with equal facts agree
        (until a node's own due time)."""
        return (
            self.offline_after_s, self.version_lifetime_s, self.majority_version,
            self.majority_config, self.live_nodes, tuple(self.live_since.items()),
            self.latest_credentials,
        )


Check = Callable[[Node, Context], "str | None"]


@attrs.frozen
class StatusRule:
    """One row of the status table: ``check`` returns why ``status`` applies, or None."""

    status: NodeStatus
    name: str
    check: Check


def is_silent(n: Node, now: float, offline_after_s: float) -> bool:
    """Has the node missed enough heartbeats to count as Offline?"""
    seen = n.registered_at if n.last_seen_at is None else n.last_seen_at
    return now - seen >= offline_after_s


def _upgrading(n: Node, c: Context) -> str | None:
    return f"installing version {n.upgrading_to}" if n.upgrading_to is not None else None


def _initialize_failed(n: Node, c: Context) -> str | None:
    if n.last_seen_at is not None or not is_silent(n, c.now, c.offline_after_s):
        return None
    return (
        f"no heartbeat within {c.offline_after_s:g} s of registering: check that the node's "
        "host service is running and can reach the service"
    )


def _silent(n: Node, c: Context) -> str | None:
    # Reasons must not change with every tick (each change is an event): no elapsed times here.
    if n.last_seen_at is None or not is_silent(n, c.now, c.offline_after_s):
        return None
    return f"missed heartbeats for {c.offline_after_s:g} s"


def _version_expired(n: Node, c: Context) -> str | None:
    released = n.metrics.version_released_at
    if released is None or c.now < released + c.version_lifetime_s:
        return None
    return f"version {n.metrics.version} expired; update the node"


def _first_heartbeat_pending(n: Node, c: Context) -> str | None:
    return FIRST_HEARTBEAT_PENDING if n.last_seen_at is None else None


def _config_differs(n: Node, c: Context) -> str | None:
    if c.majority_config is None or n.metrics.config_hash == c.majority_config:
        return None
    return "configuration differs from the majority of nodes"


def reports_unreachable(reported_at: float | None, peers: tuple[str, ...], peer: str,
                        peer_live_since: float | None) -> bool:
    """Whether a node's last reachability report (``peers``, taken at ``reported_at``) says
    ``peer`` is unreachable. A report taken before the peer became live (it joined, or woke
    from hibernation, since) says nothing about it: the peer is unknown, not unreachable.
    """
    if peer in peers:
        return False
    return reported_at is None or peer_live_since is None or peer_live_since <= reported_at


def _peer_unreachable(n: Node, c: Context) -> str | None:
    peers = n.metrics.reachable_peers
    missing = sorted(
        p for p in c.live_nodes
        if p != n.name and reports_unreachable(n.last_seen_at, peers, p, c.live_since.get(p))
    )
    if not missing:
        return None
    return f"cannot reach {', '.join(missing)} on the intranet port"


def _control_channel(n: Node, c: Context) -> str | None:
    return None if n.metrics.control_channel_ok else "control channel unreachable"


def _version_minority(n: Node, c: Context) -> str | None:
    if c.majority_version is None or n.metrics.version == c.majority_version:
        return None
    return f"runs version {n.metrics.version}; the runtime runs {c.majority_version}"


def _credential_behind(n: Node, c: Context) -> str | None:
    if not c.latest_credentials:
        return None
    held = {cv.credential_id: cv.version for cv in n.metrics.credentials}
    lag = []
    for cid, latest in c.latest_credentials:
        have = held.get(cid, 0)
        if have < latest:
            at = f"at v{have}" if have else "missing"
            lag.append(f"credential {cid} {at}, latest v{latest}")
    return "; ".join(lag) or None


STATUS_RULES: tuple[StatusRule, ...] = (
    StatusRule(NodeStatus.UPGRADING, "update in progress", _upgrading),
    StatusRule(NodeStatus.INITIALIZE_FAILED, "first heartbeat never came", _initialize_failed),
    StatusRule(NodeStatus.OFFLINE, "missed heartbeats", _silent),
    StatusRule(NodeStatus.OFFLINE, "version expired", _version_expired),
    StatusRule(NodeStatus.INITIALIZING, "first heartbeat pending", _first_heartbeat_pending),
    StatusRule(NodeStatus.INACTIVE, "configuration differs", _config_differs),
    StatusRule(NodeStatus.LIMITED, "peer port unreachable", _peer_unreachable),
    StatusRule(NodeStatus.LIMITED, "control channel trouble", _control_channel),
    StatusRule(NodeStatus.LIMITED, "version differs from the runtime's", _version_minority),
    StatusRule(NodeStatus.LIMITED, "credential version behind", _credential_behind),
)


@attrs.frozen
class Transition:
    """A status change that can happen, and what causes it."""

    source: NodeStatus
    target: NodeStatus
    cause: str


_INIT, _ON, _LIM, _OFF, _UPG, _INACT, _FAILED = (
    NodeStatus.INITIALIZING, NodeStatus.ONLINE, NodeStatus.LIMITED, NodeStatus.OFFLINE,
    NodeStatus.UPGRADING, NodeStatus.INACTIVE, NodeStatus.INITIALIZE_FAILED,
)
_LIMITED_BY = "peer port, control channel, version or credential lags"
_SILENT_OR_EXPIRED = "missed heartbeats or version expired"

# The authoritative table: every status change the rules allow, and its cause. Written by hand;
# docs/state-machine.md is generated from it, and decide refuses to emit a change not in it.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(_INIT, _ON, "first heartbeat, all checks pass"),
    Transition(_INIT, _LIM, f"first heartbeat; {_LIMITED_BY}"),
    Transition(_INIT, _INACT, "first heartbeat; configuration differs from the majority"),
    Transition(_INIT, _FAILED, "no heartbeat within the offline time of registering"),
    Transition(_INIT, _OFF, "version expired before the first heartbeat"),
    Transition(_INIT, _UPG, "update started before the first heartbeat"),
    Transition(_ON, _LIM, _LIMITED_BY),
    Transition(_ON, _INACT, "configuration differs from the majority"),
    Transition(_ON, _OFF, _SILENT_OR_EXPIRED),
    Transition(_ON, _UPG, "update started"),
    Transition(_LIM, _ON, "all checks pass"),
    Transition(_LIM, _INACT, "configuration differs from the majority"),
    Transition(_LIM, _OFF, _SILENT_OR_EXPIRED),
    Transition(_LIM, _UPG, "update started"),
    Transition(_INACT, _ON, "configuration agrees again, all checks pass"),
    Transition(_INACT, _LIM, f"configuration agrees again; {_LIMITED_BY}"),
    Transition(_INACT, _OFF, _SILENT_OR_EXPIRED),
    Transition(_INACT, _UPG, "update started"),
    Transition(_OFF, _ON, "heard again (rejoined), all checks pass"),
    Transition(_OFF, _LIM, f"heard again (rejoined); {_LIMITED_BY}"),
    Transition(_OFF, _INACT, "heard again (rejoined); configuration differs"),
    Transition(_UPG, _ON, "update finished, all checks pass"),
    Transition(_UPG, _LIM, f"update finished; {_LIMITED_BY}"),
    Transition(_UPG, _INACT, "update finished; configuration differs"),
    Transition(_UPG, _OFF, "update finished on an expired version"),
    Transition(_FAILED, _ON, "first heartbeat at last (rejoined), all checks pass"),
    Transition(_FAILED, _LIM, f"first heartbeat at last (rejoined); {_LIMITED_BY}"),
    Transition(_FAILED, _INACT, "first heartbeat at last (rejoined); configuration differs"),
    Transition(_FAILED, _OFF, "first heartbeat at last (rejoined) on an expired version"),
)
_ALLOWED = frozenset((t.source, t.target) for t in TRANSITIONS)


def is_allowed(source: NodeStatus, target: NodeStatus) -> bool:
    """Is ``source -> target`` a listed transition?"""
    return (source, target) in _ALLOWED


def _version_key(v: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in v.split("."))


def context(m: Model, now: float) -> Context:
    """Compute the runtime-wide facts for deriving statuses at ``now``."""
    settings = m.runtime.settings if m.runtime else None
    offline_after = settings.offline_after_s if settings else 30.0
    lifetime = (settings.version_lifetime_days if settings else 365) * DAY_S
    live = [
        n
        for n in m.nodes.values()
        if n.upgrading_to is None and not is_silent(n, now, offline_after)
    ]
    reporting = [n for n in live if n.last_seen_at is not None]
    versions: dict[str, int] = {}
    configs: dict[str, int] = {}
    for n in reporting:
        versions[n.metrics.version] = versions.get(n.metrics.version, 0) + 1
        configs[n.metrics.config_hash] = configs.get(n.metrics.config_hash, 0) + 1
    majority_version = None
    if versions:
        # most common; a tie goes to the newer version (updates roll forward)
        majority_version = (
            next(iter(versions)) if len(versions) == 1
            else max(versions, key=lambda v: (versions[v], _version_key(v)))
        )
    # a strict majority, so never a tie
    majority_config = next((h for h, k in configs.items() if k * 2 > len(reporting)), None)
    return Context(
        now, offline_after, lifetime, majority_version, majority_config,
        frozenset(n.name for n in reporting),
        {n.name: n.live_since for n in reporting},
        tuple((cid, m.credentials[cid].version) for cid in sorted(m.credentials))
        if m.credentials else (),
    )


def derive_status(n: Node, c: Context) -> tuple[NodeStatus, tuple[str, ...]]:
    """Apply ``STATUS_RULES`` to one node."""
    found: NodeStatus | None = None
    reasons: list[str] = []
    for rule in STATUS_RULES:
        if found is not None and rule.status is not found:
            break
        why = rule.check(n, c)
        if why is not None:
            found = rule.status
            reasons.append(why)
    return (found or NodeStatus.ONLINE), tuple(reasons)


DOWN = frozenset((NodeStatus.OFFLINE, NodeStatus.INITIALIZE_FAILED))  # silent: cannot act


def local_status(refusal: DomainError) -> tuple[NodeStatus, str] | None:
    """The status a node shows itself after the runtime refused it, with the reason to show.

    NeedRegistration when its registration is lost or never happened: it is unknown to the
    runtime (removed, for example by offline expiry, and speaking again) or its auth key is
    refused (regenerated before it registered, another runtime's, mistyped). The reason is the
    refusal's own message, which says what to do. None: the refusal does not touch registration.
    """
    if isinstance(refusal, (UnknownNode, InvalidAuthKey)):
        return NodeStatus.NEED_REGISTRATION, str(refusal)
    return None


def is_eligible_dispatcher(n: Node) -> bool:
    """Can this node dispatch work? Online or Limited, with a working control channel."""
    return (
        n.status in (NodeStatus.ONLINE, NodeStatus.LIMITED) and n.metrics.control_channel_ok
    )


def choose_dispatcher(nodes: Iterable[Node], current: str | None) -> str | None:
    """The dispatcher rule (see the module docstring)."""
    eligible = [n for n in nodes if is_eligible_dispatcher(n)]
    if current is not None and any(n.name == current for n in eligible):
        return current
    return min(eligible, key=lambda n: n.seq).name if eligible else None


def mermaid() -> str:
    """docs/state-machine.md, generated from ``STATUS_RULES`` and ``TRANSITIONS``."""
    lines = [
        "# Node state machine",
        "",
        "Generated from `shir.core.rules` by `python -m shir.core.rules > docs/state-machine.md`;",
        "a test fails when this file and the rules disagree. Do not edit by hand.",
        "",
        "## Status rules, in priority order",
        "",
        "The first status with a reason wins; a node with no reason is Online.",
        "",
        "| # | status | rule |",
        "|---|---|---|",
    ]
    for i, rule in enumerate(STATUS_RULES, 1):
        lines.append(f"| {i} | {rule.status.value} | {rule.name} |")
    lines += [
        f"| {len(STATUS_RULES) + 1} | Online | otherwise |",
        "",
        "## Transitions",
        "",
        "Every status change the rules allow (`shir.core.rules.TRANSITIONS`, written by hand),",
        "labelled with its cause. A node enters Initializing only when it registers, and an",
        "Offline or InitializeFailed node cannot start an update.",
        "",
        "NeedRegistration is what a node shows itself while the runtime does not know it: before",
        "it registers, and after it was removed (by a user, or by offline expiry) and speaks",
        "again, or when its key is refused (`rules.local_status`); no registered node has it.",
        "",
        "```mermaid",
        "stateDiagram-v2",
        "    [*] --> NeedRegistration: installed",
        "    NeedRegistration --> Initializing: NodeRegistered",
        "    NeedRegistration --> NeedRegistration: key refused (regenerated, another runtime's)",
    ]
    for t in TRANSITIONS:
        lines.append(f"    {t.source.value} --> {t.target.value}: {t.cause}")
    lines += ["    Offline --> NeedRegistration: offline expiry (NodeRemoved), then it speaks",
              "```", "",
              "From any status a node also leaves the runtime when a user removes it",
              "(`NodeRemoved`, then NeedRegistration) or when it leaves by itself (`NodeLeft`).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(mermaid(), end="")
