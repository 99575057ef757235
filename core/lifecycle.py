"""The node lifecycle: creating the runtime, registering, heartbeats, sessions, failover, updates.

Theory of operation
-------------------
Equinox order: the events (``shir.core.events``), how they evolve the model (``EVOLVE``), the
decisions (``DECIDE``, one function per command), what the events tell whom (``EFFECTS``,
``ANSWERS``), then the timed rules (``RULES``). ``shir.core.decide`` merges these tables with
the other concerns'; nothing here writes into another module's tables.

Every command is stamped with ``at``, the host's current time. Before acting, a decision settles
everything that time has made due (a node silent too long goes Offline, the dispatcher fails
over, an expired version takes its node Offline...), exactly as a ``Tick(at)`` would. Then it
checks the command, and refuses it with a typed :class:`~shir.core.errors.DomainError` whose
message says what was wrong, or emits the events it causes; then it settles again, because those
events can change statuses and the dispatcher. So a heartbeat from a node that hibernated emits,
in order: the node going Offline, the failover, the node rejoining under a new session, the
heartbeat, the node coming back Online, and (if nobody else could dispatch) a *new* term for it.

Timed rules, in order (each returns the events due at ``at`` and its next due time):
offline auto-expiry (before statuses: a removed node must no longer count for the majority or
as a live peer), node statuses (``shir.core.rules.STATUS_RULES``), version-expiry warnings, and
the dispatcher (``rules.choose_dispatcher``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from shir.core import commands as cmd
from shir.core import events as ev
from shir.core.effects import AnnounceDispatcher, Disconnect, StartSession
from shir.core.errors import (
    InvalidCommand,
    MachineAlreadyRegistered,
    NodeNameTaken,
    NodeOffline,
    RemoteAccessDisabled,
    RuntimeAlreadyExists,
    StaleSession,
    TooManyNodes,
    UpgradeInProgress,
)
from shir.core.jobs import ConcurrencyLimitSet, ReleaseReason
from shir.core.kernel import (
    DAY_S,
    MAX_REMEMBERED_REMOVALS,
    NEVER,
    Decider,
    Events,
    Handler,
    Model,
    Node,
    RuntimeInfo,
    RuntimeState,
    TimedRule,
    check_name,
    check_time,
    emit,
    first_at,
    node_of,
    runtime_of,
)
from shir.core.keys import (
    AuthKey,
    InvalidAuthKey,
    RegeneratedKey,
    WrongRuntimeKey,
    matches,
    parse_auth_key,
)
from shir.core.leasing import lease_end
from shir.core.model import KeyName, NodeStatus, check_setting_bounds
from shir.core.rules import (
    DOWN,
    choose_dispatcher,
    context,
    derive_status,
    is_allowed,
    is_silent,
)

__all__ = [
    "ANSWERS",
    "DECIDE",
    "DISPATCH_TRIGGERS",
    "EFFECTS",
    "EVOLVE",
    "RULES",
    "choose_the_dispatcher",
    "derive_statuses",
    "expire_offline_nodes",
    "warn_expiring_versions",
]

# --- evolve: one handler per event type ------------------------------------------------------

def _runtime_created(m: Model, e: ev.RuntimeCreated) -> None:
    m.runtime = RuntimeInfo(e.runtime_id, e.factory_id, e.name, e.description, e.settings, e.at)
    m.jobs.window_s = e.settings.duplicate_window_s
    m.keys = {KeyName.KEY1: e.key1, KeyName.KEY2: e.key2}


def _auth_key_regenerated(m: Model, e: ev.AuthKeyRegenerated) -> None:
    m.keys[e.key.name] = e.key


def _node_registered(m: Model, e: ev.NodeRegistered) -> None:
    m.nodes[e.node] = Node(e.node, m.next_seq, e.machine_id, e.cores, e.memory_mb, e.at, e.metrics,
                           intranet_address=e.intranet_address, cert_sha256=e.cert_sha256,
                           envelope_key=e.envelope_key)
    m.next_seq += 1
    if e.node in m.removed:
        m.removed = {k: v for k, v in m.removed.items() if k != e.node}


def _node_removed(m: Model, e: ev.NodeRemoved | ev.NodeLeft) -> None:
    del m.nodes[e.node]
    # remembered (boundedly, copy-on-write) so that if it speaks again it is told why
    kept = [(k, v) for k, v in m.removed.items() if k != e.node][1 - MAX_REMEMBERED_REMOVALS:]
    why = e.reason if type(e) is ev.NodeRemoved else "it left the runtime"
    m.removed = {**dict(kept), e.node: (why, e.at)}
    if m.syncs:  # no sync to a node that is gone (copy-on-write, see Model)
        m.syncs = {k: v for k, v in m.syncs.items() if k[1] != e.node}


def _heartbeat_received(m: Model, e: ev.HeartbeatReceived) -> None:
    n = m.nodes[e.node]
    if n.last_seen_at is None:
        n.live_since = e.at
    n.last_seen_at = e.at
    n.metrics = e.metrics


def _node_status_changed(m: Model, e: ev.NodeStatusChanged) -> None:
    n = m.nodes[e.node]
    if e.status is NodeStatus.OFFLINE and n.status is not NodeStatus.OFFLINE:
        n.offline_since = e.at
    elif e.status is not NodeStatus.OFFLINE:
        n.offline_since = None
    n.status = e.status
    n.reasons = e.reasons


def _node_rejoined(m: Model, e: ev.NodeRejoined) -> None:
    n = m.nodes[e.node]
    n.session = e.session
    n.last_seen_at = e.at
    n.live_since = e.at


def _dispatcher_changed(m: Model, e: ev.DispatcherChanged) -> None:
    m.term = e.term
    m.dispatcher = e.node


def _version_expiry_warned(m: Model, e: ev.VersionExpiryWarned) -> None:
    m.nodes[e.node].warned_version = e.version


def _upgrade_started(m: Model, e: ev.UpgradeStarted) -> None:
    m.nodes[e.node].upgrading_to = e.to_version


def _upgrade_finished(m: Model, e: ev.UpgradeFinished) -> None:
    n = m.nodes[e.node]
    n.upgrading_to = None
    n.last_seen_at = e.at  # the node reported the outcome itself
    n.metrics = attrs.evolve(
        n.metrics, version=e.version, version_released_at=e.version_released_at
    )
    n.last_update = (
        f"updated to {e.version} at {e.at:g} s" if e.ok
        else f"failed at {e.at:g} s and rolled back to {e.version}: {e.reason}"
    )


EVOLVE: dict[type, Callable[[Model, Any], None]] = {
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


# --- decide: one function per command -------------------------------------------------------

def _create_runtime(m: Model, c: cmd.CreateRuntime, k: Decider) -> Events:
    for what, v in (("runtime_id", c.runtime_id), ("factory_id", c.factory_id), ("name", c.name)):
        check_name(what, v)
    check_setting_bounds(c.settings)
    for slot, key in ((KeyName.KEY1, c.key1), (KeyName.KEY2, c.key2)):
        if key.name is not slot or key.runtime_id != c.runtime_id or not key.salt:
            raise InvalidCommand(
                f"{slot.value} must be made with AuthKey.from_seed({c.runtime_id!r}, "
                f"KeyName.{slot.name}, ...)"
            )
    e = ev.RuntimeCreated(
        c.runtime_id, c.factory_id, c.name, c.description, c.settings,
        c.key1.verifier(), c.key2.verifier(), c.at,
    )
    if m.runtime is not None:
        rt = m.runtime
        same = (rt.runtime_id, rt.factory_id, rt.name, rt.description, rt.settings) == (
            e.runtime_id, e.factory_id, e.name, e.description, e.settings
        )
        if same and m.keys.get(KeyName.KEY1) == e.key1 and m.keys.get(KeyName.KEY2) == e.key2:
            return []
        raise RuntimeAlreadyExists(
            f"runtime {rt.name!r} ({rt.runtime_id}) already exists in this stream; "
            "a stream holds one runtime"
        )
    check_time(m, c.at)
    return [e]


def _regenerate_auth_key(m: Model, c: cmd.RegenerateAuthKey, k: Decider) -> Events:
    rt = runtime_of(m)
    key = c.key
    if key.runtime_id != rt.runtime_id or not key.salt:
        raise InvalidCommand(
            f"the new key must be made with AuthKey.from_seed({rt.runtime_id!r}, ...)"
        )
    current = m.keys[key.name]
    if key.generation == current.generation and key.verifier() == current:
        return []
    if key.generation <= current.generation:
        raise InvalidCommand(
            f"{key.name.value} is at generation {current.generation}; a regenerated key needs "
            f"a higher generation, got {key.generation}"
        )
    s, out = k.timed(m, c.at)  # settle first, like every command: no deadline may lag behind now
    emit(s, out, ev.AuthKeyRegenerated(key.verifier(), c.at))
    return out


def _check_auth_key(m: Model, text: str) -> KeyName:
    rt = runtime_of(m)
    key: AuthKey = parse_auth_key(text)
    if key.runtime_id != rt.runtime_id:
        raise WrongRuntimeKey(
            f"this auth key belongs to runtime {key.runtime_id!r:.60}, not to {rt.runtime_id!r}; "
            "copy a key of this runtime"
        )
    verifier = m.keys[key.name]
    if key.generation < verifier.generation:
        raise RegeneratedKey(
            f"{key.name.value} was regenerated (now generation {verifier.generation}); "
            f"this is generation {key.generation}: copy the current {key.name.value} "
            "or the other key"
        )
    if key.generation != verifier.generation or not matches(verifier, key):
        raise InvalidAuthKey(
            f"this {key.name.value} is not valid for runtime {rt.runtime_id!r}; copy it again"
        )
    return key.name


_MAX_ADDRESS = 261  # a 253-character DNS name or a bracketed IPv6 address, ':', a port
_HOST_PORT = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([0-9]{1,5})"
)
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


_ENVELOPE_KEY_BYTES = 32  # a raw X25519 public key


def _check_envelope_key(key: object) -> bytes | None:
    if key is not None and not (isinstance(key, bytes) and len(key) == _ENVELOPE_KEY_BYTES):
        size = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise InvalidCommand(
            f"envelope_key must be the node's raw {_ENVELOPE_KEY_BYTES}-byte X25519 public key, "
            f"got {size}"
        )
    return key


def _check_intranet(c: cmd.RegisterNode) -> tuple[str | None, str | None]:
    """Validate the node's intranet address and certificate fingerprint (lower-cased)."""
    address, cert = c.intranet_address, c.cert_sha256
    if address is not None:
        port = None
        if isinstance(address, str) and len(address) <= _MAX_ADDRESS:
            match = _HOST_PORT.fullmatch(address)
            port = int(match.group(1)) if match else None
        if port is None or not 1 <= port <= 65535:
            raise InvalidCommand(
                f"intranet_address must be 'host:port' (a DNS name, an IPv4 address or a "
                f"[bracketed] IPv6 address, and a port 1-65535), got {address!r:.80}"
            )
    if cert is not None:
        if not isinstance(cert, str) or not _SHA256_HEX.fullmatch(cert):
            raise InvalidCommand(
                "cert_sha256 must be the certificate's SHA-256 fingerprint as 64 hex digits, "
                f"got {cert!r:.80}"
            )
        cert = cert.lower()
    return address, cert


def _register_node(m: Model, c: cmd.RegisterNode, k: Decider) -> Events:
    rt = runtime_of(m)
    check_name("node name", c.node)
    check_name("machine_id", c.machine_id)
    address, cert = _check_intranet(c)
    envelope_key = _check_envelope_key(c.envelope_key)
    if not (isinstance(c.cores, int) and c.cores >= 1):
        raise InvalidCommand(f"cores must be a positive integer, got {c.cores!r}")
    if not (isinstance(c.memory_mb, int) and c.memory_mb >= 1):
        raise InvalidCommand(f"memory_mb must be a positive integer, got {c.memory_mb!r}")
    key_name = _check_auth_key(m, c.auth_key)
    existing = m.nodes.get(c.node)
    if existing is not None:
        if existing.machine_id == c.machine_id:
            if (existing.intranet_address, existing.cert_sha256) != (address, cert):
                raise InvalidCommand(
                    f"node {c.node!r} is registered with intranet address "
                    f"{existing.intranet_address!r} and certificate {existing.cert_sha256!r:.20}; "
                    f"this registration gives {address!r:.80} and {cert!r:.20}: remove the "
                    "node, then register it again"
                )
            if existing.envelope_key != envelope_key:
                raise InvalidCommand(
                    f"node {c.node!r} is registered with another envelope key than this "
                    "registration gives (its machine's node identity changed): remove the "
                    "node, then register it again"
                )
            return _restarted(m, c.node, c.at, k)  # already registered: satisfied
        raise NodeNameTaken(
            f"node name {c.node!r} is taken by machine {existing.machine_id!r}; "
            "choose another name or remove that node first"
        )
    for n in m.nodes.values():
        if n.machine_id == c.machine_id:
            raise MachineAlreadyRegistered(
                f"machine {c.machine_id!r} already hosts node {n.name!r}; "
                "a machine runs one node of one runtime"
            )
    limit = rt.settings.max_nodes
    if len(m.nodes) >= limit:
        raise TooManyNodes(
            f"runtime {rt.name!r} already has {len(m.nodes)} nodes (max {limit}); "
            "remove one before adding another"
        )
    closed = [n.name for n in m.nodes.values() if not n.metrics.remote_access]
    if closed:
        raise RemoteAccessDisabled(
            f"node {c.node!r} cannot join: remote access from intranet (TCP "
            f"{rt.settings.intranet_port}) is off on {', '.join(closed)}, as a new install leaves "
            "it. Turn it on there (in the product: Configuration Manager > Settings > Remote "
            "access to intranet; in shir the node reports remote_access=True in its heartbeats, "
            "and a scenario sets remote_access = true under its [[nodes]]), then register "
            f"{c.node!r} again"
        )
    s, out = k.timed(m, c.at)
    emit(s, out, ev.NodeRegistered(
        c.node, c.machine_id, c.cores, c.memory_mb, key_name, c.metrics, c.at, address, cert,
        envelope_key,
    ))
    k.settle(s, c.at, out)
    return out


def _restarted(m: Model, node: str, at: float, k: Decider) -> Events:
    """A registered node registering again from its machine: its host started anew (one host
    runs per machine), so the jobs its old process held died with it. Their leases end now
    and the jobs go back to the queue, instead of waiting out their locks."""
    if not m.jobs.node_leases.get(node):
        return []
    s, out = k.timed(m, at)
    held = sorted(s.jobs.node_leases.get(node, ())) if node in s.nodes else []
    why = f"node {node} started again (registered anew from its machine)"
    for e in [lease_end(s, s.jobs.leases[j], ReleaseReason.NODE_LOST, why, at)
              for j in held if j not in s.pending]:
        emit(s, out, e)
    k.settle(s, at, out)
    return out


def _remove_node(m: Model, c: cmd.RemoveNode, k: Decider) -> Events:
    runtime_of(m)
    if c.node not in m.nodes:
        return []
    s, out = k.timed(m, c.at)
    if c.node in s.nodes:  # settling may have expired it already
        for e in _removal(s, c.node, "removed by a user", c.at):
            emit(s, out, e)
        k.settle(s, c.at, out)
    return out


def _leave_runtime(m: Model, c: cmd.LeaveRuntime, k: Decider) -> Events:
    runtime_of(m)
    n = m.nodes.get(c.node)
    if n is None:
        return []  # already left (or removed): satisfied
    _check_session(n, c.node, c.session)
    s, out = k.timed(m, c.at)
    if c.node not in s.nodes:  # settling may have expired it already
        return out
    for e in _removal(s, c.node, "", c.at, left=True):
        emit(s, out, e)
    k.settle(s, c.at, out)
    return out


def _check_session(n: Node, node: str, session: int) -> None:
    if session == n.session:
        return
    # A higher session is stale too: one of an earlier registration under this name.
    why = "which ended" if session < n.session else "not given since it last registered"
    raise StaleSession(
        f"node {node!r} spoke in session {session}, {why}; its session is {n.session}: "
        "adopt it and act only under the current dispatcher term",
        StartSession(node, n.session),
    )


def _heartbeat(m: Model, c: cmd.Heartbeat, k: Decider) -> Events:
    rt = runtime_of(m)
    n = node_of(m, c.node)
    if n.last_seen_at == c.at and n.metrics == c.metrics and n.session - 1 <= c.session:
        # The same heartbeat again: satisfied, even when it is the one that made the node
        # rejoin (it was sent under the session that the rejoin ended).
        return []
    _check_session(n, c.node, c.session)
    s, out = k.timed(m, c.at)
    n = node_of(s, c.node)
    offline_after = rt.settings.offline_after_s
    if is_silent(n, c.at, offline_after) and n.upgrading_to is None:
        seen = n.registered_at if n.last_seen_at is None else n.last_seen_at
        emit(s, out, ev.NodeRejoined(c.node, n.session + 1, c.at - seen, c.at))
    emit(s, out, ev.HeartbeatReceived(c.node, c.metrics, c.at))
    k.settle(s, c.at, out)
    return out


def _start_upgrade(m: Model, c: cmd.StartUpgrade, k: Decider) -> Events:
    runtime_of(m)
    n = node_of(m, c.node)
    check_name("to_version", c.to_version)
    if n.upgrading_to == c.to_version or (
        n.upgrading_to is None and n.metrics.version == c.to_version
    ):
        return []
    busy = [o.name for o in m.nodes.values() if o.upgrading_to is not None]
    if busy:
        raise UpgradeInProgress(
            f"node {busy[0]!r} is updating; updates roll one node at a time: "
            "finish that one first"
        )
    s, out = k.timed(m, c.at)
    status = node_of(s, c.node).status
    if status in DOWN:  # settling may have expired it: refuse
        raise NodeOffline(f"node {c.node!r} is {status.value}; bring it back before updating it")
    emit(s, out, ev.UpgradeStarted(c.node, n.metrics.version, c.to_version, c.at))
    k.settle(s, c.at, out)
    return out


def _finish_upgrade(m: Model, c: cmd.FinishUpgrade, k: Decider) -> Events:
    runtime_of(m)
    n = node_of(m, c.node)
    if n.upgrading_to is None:
        return []  # no update in progress: a repeated report is satisfied
    s, out = k.timed(m, c.at)
    if c.ok:
        e = ev.UpgradeFinished(c.node, True, n.upgrading_to, c.version_released_at, c.reason, c.at)
    else:
        e = ev.UpgradeFinished(
            c.node, False, n.metrics.version, n.metrics.version_released_at,
            c.reason or f"update to {n.upgrading_to} failed; rolled back", c.at,
        )
    emit(s, out, e)
    k.settle(s, c.at, out)
    return out


def _tick(m: Model, c: cmd.Tick, k: Decider) -> Events:
    if m.runtime is None:
        return []
    _s, out = k.timed(m, c.at)
    return out


DECIDE: dict[type, Handler] = {
    cmd.CreateRuntime: _create_runtime,
    cmd.RegenerateAuthKey: _regenerate_auth_key,
    cmd.RegisterNode: _register_node,
    cmd.RemoveNode: _remove_node,
    cmd.LeaveRuntime: _leave_runtime,
    cmd.Heartbeat: _heartbeat,
    cmd.StartUpgrade: _start_upgrade,
    cmd.FinishUpgrade: _finish_upgrade,
    cmd.Tick: _tick,
}


# --- effects: what the events tell whom ------------------------------------------------------

EFFECTS: dict[type, Callable[[Any], tuple[object, ...]]] = {
    ev.DispatcherChanged: lambda e: (AnnounceDispatcher(e.term, e.node),),
    ev.NodeRegistered: lambda e: (StartSession(e.node, 1),),
    ev.NodeRejoined: lambda e: (StartSession(e.node, e.session),),
    ev.NodeRemoved: lambda e: (Disconnect(e.node, e.reason),),
}

# A new dispatcher, or a node that can (or no longer can) take work: queued work may be placed.
# A new dispatcher, a status changed: queued work may be placed (see leasing.DISPATCH_TRIGGERS).
DISPATCH_TRIGGERS: dict[type, Callable[[Model, Any], bool] | None] = {
    ev.DispatcherChanged: None, ev.NodeStatusChanged: None,
}


def _answer_register(c: cmd.RegisterNode, events: tuple[object, ...], state: RuntimeState
                     ) -> tuple[object, ...]:
    if events:
        return ()  # NodeRegistered's own effect starts the session
    node = state.model().nodes.get(c.node)
    # Satisfied (already registered from this machine): the first answer may have been lost.
    return (StartSession(node.name, node.session),) if node is not None else ()


ANSWERS: dict[type, Callable[[Any, tuple[object, ...], RuntimeState], tuple[object, ...]]] = {
    cmd.RegisterNode: _answer_register,
}


# --- timed rules: the events due at ``at``, and the next due time ---------------------------

def _removal(s: Model, node: str, reason: str, at: float, *, left: bool = False) -> Events:
    """A node's removal (``left``: its own leaving): its leases end first, redelivered at once,
    then its limit override, then the node itself."""
    b = s.jobs
    why = f"node {node} left the runtime" if left else f"node {node} was removed"
    out: Events = [
        lease_end(s, b.leases[job_id], ReleaseReason.NODE_LOST, why, at)
        for job_id in sorted(b.node_leases.get(node, ())) if job_id not in s.pending
    ]
    if node in b.limits:  # an override must not outlive its node (a new one may take the name)
        out.append(ConcurrencyLimitSet(node, None, at))
    out.append(ev.NodeLeft(node, at) if left else ev.NodeRemoved(node, reason, at))
    return out


def expire_offline_nodes(s: Model, at: float) -> tuple[Events, float | None]:
    """Remove nodes Offline for ``offline_expiry_s`` (when auto-expiry is on)."""
    rt = s.runtime
    expiry = rt.settings.offline_expiry_s if rt is not None else None
    if expiry is None:
        return [], None
    out: Events = []
    nxt: float | None = None
    for n in s.nodes.values():
        if n.offline_since is None:
            continue
        if n.status is NodeStatus.OFFLINE and at - n.offline_since >= expiry:
            out += _removal(s, n.name, f"offline for {expiry:g} s (auto-expiry)", at)
        else:
            due = first_at(n.offline_since, expiry)
            nxt = due if nxt is None else min(nxt, due)
    return out, nxt


def derive_statuses(s: Model, at: float) -> tuple[Events, float | None]:
    """Re-derive the status of each node whose facts changed (``rules.STATUS_RULES``).

    A node's derivation depends on its own record, the runtime-wide facts (``rules.Context``
    without the time) and the time only through its next due time; while none of these has
    changed since it last found the node's status right, it is not derived again
    (``Model.status_memo``, a cache a test compares with deriving every node).
    """
    rt = s.runtime
    if rt is None or not s.nodes:
        return [], None
    settings = rt.settings
    c = context(s, at)
    facts = c.facts()
    memo = s.status_memo
    if len(memo) > len(s.nodes):  # bounded by the nodes there are: forget removed ones
        s.status_memo = memo = {k: v for k, v in memo.items() if k in s.nodes}
    out: Events = []
    nxt = NEVER
    for n in s.nodes.values():
        own = n.facts()
        seen = memo.get(n.name)
        if seen is not None and at < seen[2] and seen[1] == facts and seen[0] == own:
            nxt = min(nxt, seen[2])
            continue
        status, reasons = derive_status(n, c)
        changed = status is not n.status or reasons != n.reasons
        if changed:
            if status is not n.status and not is_allowed(n.status, status):
                raise AssertionError(f"unlisted transition {n.status} -> {status}")
            out.append(ev.NodeStatusChanged(n.name, status, reasons, at))
        due = NEVER
        if n.upgrading_to is None:
            last = n.registered_at if n.last_seen_at is None else n.last_seen_at
            silent_at = first_at(last, settings.offline_after_s)
            if n.status not in DOWN or silent_at > at:
                due = silent_at
            released = n.metrics.version_released_at
            # An updating node stays Upgrading whatever its version, so a tick at expiry would
            # find nothing to do; FinishUpgrade settles the expiry instead.
            if released is not None:
                expires = released + settings.version_lifetime_days * DAY_S
                if expires > at:
                    due = min(due, expires)
        if not changed:
            memo[n.name] = (own, facts, due)
        nxt = min(nxt, due)
    return out, None if nxt == NEVER else nxt


def warn_expiring_versions(s: Model, at: float) -> tuple[Events, float | None]:
    """Warn once per version, ``version_warning_days`` before it expires."""
    rt = s.runtime
    if rt is None:
        return [], None
    settings = rt.settings
    out: Events = []
    nxt: float | None = None
    for n in s.nodes.values():
        released = n.metrics.version_released_at
        if released is None or n.warned_version == n.metrics.version:
            continue
        expires = released + settings.version_lifetime_days * DAY_S
        warn = expires - settings.version_warning_days * DAY_S
        if warn <= at < expires:
            out.append(ev.VersionExpiryWarned(n.name, n.metrics.version, expires, at))
        elif at < warn < expires:
            nxt = warn if nxt is None else min(nxt, warn)
    return out, nxt


def choose_the_dispatcher(s: Model, at: float) -> tuple[Events, float | None]:
    """A new term when the dispatcher is no longer eligible (``rules.choose_dispatcher``)."""
    current = s.dispatcher
    chosen = choose_dispatcher(s.nodes.values(), current)
    if chosen == current:
        return [], None
    if current is None:
        reason = f"{chosen} is the first eligible node"
    else:
        gone = s.nodes.get(current)
        why = "was removed" if gone is None else f"is {gone.status.value}"
        reason = f"{current} {why}; " + (
            f"{chosen} takes over" if chosen else "no node can dispatch"
        )
    return [ev.DispatcherChanged(s.term + 1, chosen, reason, at)], None


RULES: tuple[TimedRule, ...] = (
    TimedRule("offline auto-expiry", expire_offline_nodes, reads=frozenset({
        ev.RuntimeCreated, ev.NodeRegistered, ev.NodeRemoved, ev.NodeLeft, ev.NodeStatusChanged,
    })),
    TimedRule("node statuses", derive_statuses),
    TimedRule("version-expiry warnings", warn_expiring_versions),
    TimedRule("dispatcher", choose_the_dispatcher),
)
