"""``decide(state, command) -> events``: the runtime's decisions.

Theory of operation
-------------------
Every command is stamped with ``at``, the driver's current time. Before acting, ``decide``
settles everything that time has made due (a node silent too long goes Offline, the dispatcher
fails over, an expired version takes its node Offline...), exactly as a ``Tick(at)`` would. Then it
checks the command, and refuses it with a typed :class:`~shir.core.errors.DomainError` whose
message says what was wrong, or emits the events it causes; then it settles again, because those
events can change statuses and the dispatcher. So a heartbeat from a node that hibernated emits, in
order: the node going Offline, the failover, the node rejoining under a new session, the
heartbeat, the node coming back Online, and (if nobody else could dispatch) a *new* term for it.

``decide`` never changes the state it is given; it works on a scratch copy of the (at most four)
node records. A command that is already satisfied yields no events.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from shir.core import commands as cmd
from shir.core import events as ev
from shir.core.effects import Disconnect, StartSession
from shir.core.errors import (
    InvalidCommand,
    MachineAlreadyRegistered,
    NodeNameTaken,
    NodeOffline,
    RemoteAccessDisabled,
    RuntimeAlreadyExists,
    RuntimeNotFound,
    StaleSession,
    TimeWentBackwards,
    TooManyNodes,
    UnknownNode,
    UpgradeInProgress,
)
from shir.core.jobs import (
    JOB_EVOLVE,
    ConcurrencyLimitSet,
    JobDeadLettered,
    JobReleased,
    Lease,
    ReleaseReason,
)
from shir.core.keys import (
    AuthKey,
    InvalidAuthKey,
    RegeneratedKey,
    WrongRuntimeKey,
    matches,
    parse_auth_key,
)
from shir.core.model import KeyName, NodeStatus
from shir.core.rules import (
    DAY_S,
    choose_dispatcher,
    context,
    derive_status,
    is_allowed,
    is_silent,
)
from shir.core.state import Node, RuntimeState, _Model, apply

__all__ = ["decide", "next_deadline"]

Events = list[object]

# Modules with rules of their own (core/credentials.py) register here: every settle ends with the
# settle hooks, and the deadline hooks' deadlines join the node deadlines. A hook's deadline must
# be a time at which its settle hook emits something (a tick there must not find nothing to do).
SETTLE_HOOKS: list[Callable[[_Model, float, Events], None]] = []
DEADLINE_HOOKS: list[Callable[[_Model], float | None]] = []

_MAX_NAME = 128


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME:
        raise InvalidCommand(f"{what} must be 1-{_MAX_NAME} characters, got {value!r:.60}")
    if any(ord(ch) < 32 for ch in value):
        raise InvalidCommand(f"{what} must not contain control characters")


def _runtime(m: _Model) -> Any:
    if m.runtime is None:
        raise RuntimeNotFound("no runtime exists in this stream yet; send CreateRuntime first")
    return m.runtime


def _node(m: _Model, name: str) -> Node:
    n = m.nodes.get(name)
    if n is None:
        rt = m.runtime.name if m.runtime else "?"
        known = ", ".join(m.nodes) or "none"
        raise UnknownNode(
            f"node {name!r:.60} is not registered in runtime {rt!r} (nodes: {known}); "
            "register it with an auth key first",
            Disconnect(name, "not registered"),
        )
    return n


def _check_time(m: _Model, at: float) -> None:
    if not isinstance(at, (int, float)) or at != at:
        raise InvalidCommand(f"'at' must be a number of seconds, got {at!r}")
    if at < m.now:
        raise TimeWentBackwards(
            f"command stamped at {at:g} s, but the runtime has already seen {m.now:g} s; "
            "drive the core with one non-decreasing clock"
        )


def _emit(s: _Model, out: Events, e: object) -> None:
    """Record ``e`` as decided and apply it to the scratch model ``s``."""
    if type(e) in JOB_EVOLVE:
        # The job book is shared with the real model: note the job instead (see _Model.pending).
        token = getattr(e, "token", None)
        if token is not None:
            s.pending.add(token.job_id)
    else:
        apply(s, (e,))
    out.append(e)


def _remove(s: _Model, out: Events, node: str, reason: str, at: float) -> None:
    if node in s.jobs.limits:  # an override must not outlive its node (a new one may take the name)
        _emit(s, out, ConcurrencyLimitSet(node, None, at))
    _emit(s, out, ev.NodeRemoved(node, reason, at))


def _settle(s: _Model, at: float, out: Events) -> None:
    """Emit what time and the latest facts make due; ``s`` is the scratch model."""
    rt = s.runtime
    if rt is None:
        return
    settings = rt.settings
    expiry = settings.offline_expiry_s
    if expiry is not None:
        # Before deriving statuses: a removed node must no longer count for the majority or
        # as a live peer (a node Offline for an expired version still heartbeats).
        for n in list(s.nodes.values()):
            if (
                n.status is NodeStatus.OFFLINE
                and n.offline_since is not None
                and at - n.offline_since >= expiry
            ):
                _remove(s, out, n.name, f"offline for {expiry:g} s (auto-expiry)", at)
    c = context(s, at)
    for n in list(s.nodes.values()):
        status, reasons = derive_status(n, c)
        if status is not n.status or reasons != n.reasons:
            if status is not n.status and not is_allowed(n.status, status):
                raise AssertionError(f"unlisted transition {n.status} -> {status}")
            _emit(s, out, ev.NodeStatusChanged(n.name, status, reasons, at))
        released = n.metrics.version_released_at
        if released is not None and n.warned_version != n.metrics.version:
            expires = released + settings.version_lifetime_days * DAY_S
            if expires - settings.version_warning_days * DAY_S <= at < expires:
                _emit(s, out, ev.VersionExpiryWarned(n.name, n.metrics.version, expires, at))
    _settle_dispatcher(s, at, out)
    _settle_leases(s, at, out)
    for hook in SETTLE_HOOKS:
        hook(s, at, out)


def _settle_dispatcher(s: _Model, at: float, out: Events) -> None:
    current = s.dispatcher
    chosen = choose_dispatcher(s.nodes.values(), current)
    if chosen == current:
        return
    if current is None:
        reason = f"{chosen} is the first eligible node"
    else:
        gone = s.nodes.get(current)
        why = "was removed" if gone is None else f"is {gone.status.value}"
        reason = f"{current} {why}; " + (
            f"{chosen} takes over" if chosen else "no node can dispatch"
        )
    _emit(s, out, ev.DispatcherChanged(s.term + 1, chosen, reason, at))


def end_lease(s: _Model, out: Events, lease: Lease, reason: ReleaseReason, detail: str,
              at: float) -> None:
    """End a lease without completion: back to the queue, or dead-letter after max deliveries."""
    token = lease.token
    max_deliveries = _runtime(s).settings.max_deliveries
    if token.delivery >= max_deliveries:
        key = s.jobs.jobs[token.job_id].idempotency_key
        detail = f"{detail}; delivered {token.delivery} times (max {max_deliveries})"
        _emit(s, out, JobDeadLettered(token, key, reason, detail, at))
    else:
        _emit(s, out, JobReleased(token, reason, detail, at))


def _settle_leases(s: _Model, at: float, out: Events) -> None:
    """End the leases of nodes that went Offline or were removed, and those that expired."""
    b = s.jobs
    if not b.leases:
        return
    for node in sorted(b.node_leases):
        n = s.nodes.get(node)
        if n is not None and n.status is not NodeStatus.OFFLINE:
            continue
        why = f"node {node} was removed" if n is None else f"node {node} went Offline"
        for job_id in sorted(b.node_leases[node]):
            if job_id not in s.pending:
                end_lease(s, out, b.leases[job_id], ReleaseReason.NODE_LOST, why, at)
    for lease in b.expired(at):
        if lease.token.job_id not in s.pending:
            end_lease(s, out, lease, ReleaseReason.EXPIRED,
                      f"lease expired at {lease.expires_at:g} s without renewal", at)


def _due(m: _Model, at: float) -> bool:
    """Is any timeout due at ``at``? (If not, settling would find nothing to do.)"""
    due = m.due
    if due is not None and at < due:
        return False
    deadline = _deadline(m)
    m.due = _NEVER if deadline is None else deadline  # a cache; the meaning is unchanged
    return deadline is not None and deadline <= at


def _timed(m: _Model, at: float, *, jobs_only: bool = False) -> tuple[_Model, Events]:
    """Start a decision at ``at``: check the clock, settle what is due on a scratch model.

    ``jobs_only`` decisions emit job events only, which never touch the scratch model: when
    nothing is due they get a shallow copy instead of cloned node records (the common case,
    and the one that must stay cheap).
    """
    _check_time(m, at)
    out: Events = []
    if not _due(m, at):
        if jobs_only:
            # Job events never touch the model they are emitted on; only ``pending`` is
            # written, and ``decide`` empties it when the decision is over.
            return m, out
        return m.scratch(), out
    s = m.scratch()
    _settle(s, at, out)
    return s, out


# --- one function per command ----------------------------------------------------------------

def _create_runtime(m: _Model, c: cmd.CreateRuntime) -> Events:
    for what, v in (("runtime_id", c.runtime_id), ("factory_id", c.factory_id), ("name", c.name)):
        _check_name(what, v)
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
    _check_time(m, c.at)
    return [e]


def _regenerate_auth_key(m: _Model, c: cmd.RegenerateAuthKey) -> Events:
    rt = _runtime(m)
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
    s, out = _timed(m, c.at)  # settle first, like every command: no deadline may lag behind now
    _emit(s, out, ev.AuthKeyRegenerated(key.verifier(), c.at))
    return out


def _check_auth_key(m: _Model, text: str) -> KeyName:
    rt = _runtime(m)
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


def _register_node(m: _Model, c: cmd.RegisterNode) -> Events:
    rt = _runtime(m)
    _check_name("node name", c.node)
    _check_name("machine_id", c.machine_id)
    address, cert = _check_intranet(c)
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
            return []  # already registered: satisfied
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
            f"enable 'remote access from intranet' (TCP {rt.settings.intranet_port}) on "
            f"{', '.join(closed)} before adding another node"
        )
    s, out = _timed(m, c.at)
    _emit(s, out, ev.NodeRegistered(
        c.node, c.machine_id, c.cores, c.memory_mb, key_name, c.metrics, c.at, address, cert
    ))
    _settle(s, c.at, out)
    return out


def _remove_node(m: _Model, c: cmd.RemoveNode) -> Events:
    _runtime(m)
    if c.node not in m.nodes:
        return []
    s, out = _timed(m, c.at)
    if c.node in s.nodes:  # settling may have expired it already
        _remove(s, out, c.node, "removed by a user", c.at)
        _settle(s, c.at, out)
    return out


def _leave_runtime(m: _Model, c: cmd.LeaveRuntime) -> Events:
    _runtime(m)
    n = m.nodes.get(c.node)
    if n is None:
        return []  # already left (or removed): satisfied
    _check_session(n, c.node, c.session)
    s, out = _timed(m, c.at)
    if c.node not in s.nodes:  # settling may have expired it already
        return out
    b = s.jobs
    for job_id in sorted(b.node_leases.get(c.node, ())):
        if job_id not in s.pending:  # redelivered at once, as for a node that went Offline
            end_lease(s, out, b.leases[job_id], ReleaseReason.NODE_LOST,
                      f"node {c.node} left the runtime", c.at)
    if c.node in b.limits:  # an override must not outlive its node
        _emit(s, out, ConcurrencyLimitSet(c.node, None, c.at))
    _emit(s, out, ev.NodeLeft(c.node, c.at))
    _settle(s, c.at, out)
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


def _heartbeat(m: _Model, c: cmd.Heartbeat) -> Events:
    rt = _runtime(m)
    n = _node(m, c.node)
    if n.last_seen_at == c.at and n.metrics == c.metrics and n.session - 1 <= c.session:
        # The same heartbeat again: satisfied, even when it is the one that made the node
        # rejoin (it was sent under the session that the rejoin ended).
        return []
    _check_session(n, c.node, c.session)
    s, out = _timed(m, c.at)
    n = _node(s, c.node)
    offline_after = rt.settings.offline_after_s
    if is_silent(n, c.at, offline_after) and n.upgrading_to is None:
        seen = n.registered_at if n.last_seen_at is None else n.last_seen_at
        _emit(s, out, ev.NodeRejoined(c.node, n.session + 1, c.at - seen, c.at))
    _emit(s, out, ev.HeartbeatReceived(c.node, c.metrics, c.at))
    _settle(s, c.at, out)
    return out


def _start_upgrade(m: _Model, c: cmd.StartUpgrade) -> Events:
    _runtime(m)
    n = _node(m, c.node)
    _check_name("to_version", c.to_version)
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
    s, out = _timed(m, c.at)
    if _node(s, c.node).status is NodeStatus.OFFLINE:  # settling may have expired it: refuse
        raise NodeOffline(f"node {c.node!r} is Offline; bring it back before updating it")
    _emit(s, out, ev.UpgradeStarted(c.node, n.metrics.version, c.to_version, c.at))
    _settle(s, c.at, out)
    return out


def _finish_upgrade(m: _Model, c: cmd.FinishUpgrade) -> Events:
    _runtime(m)
    n = _node(m, c.node)
    if n.upgrading_to is None:
        return []  # no update in progress: a repeated report is satisfied
    s, out = _timed(m, c.at)
    if c.ok:
        e = ev.UpgradeFinished(c.node, True, n.upgrading_to, c.version_released_at, c.reason, c.at)
    else:
        e = ev.UpgradeFinished(
            c.node, False, n.metrics.version, n.metrics.version_released_at,
            c.reason or f"update to {n.upgrading_to} failed; rolled back", c.at,
        )
    _emit(s, out, e)
    _settle(s, c.at, out)
    return out


def _tick(m: _Model, c: cmd.Tick) -> Events:
    if m.runtime is None:
        return []
    _s, out = _timed(m, c.at)
    return out


DECIDE: dict[type, Callable[[_Model, Any], Events]] = {
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


def decide(state: RuntimeState, command: object) -> tuple[object, ...]:
    """The events ``command`` causes in ``state``; raises a ``DomainError`` to refuse it.

    ``state`` is left unchanged either way.
    """
    handler = DECIDE.get(type(command))
    if handler is None:
        raise InvalidCommand(
            f"{type(command).__name__} is not a command; expected one of "
            + ", ".join(sorted(t.__name__ for t in DECIDE))
        )
    m = state.model()
    try:
        return tuple(handler(m, command))
    finally:
        if m.pending:  # decision-scoped: empty again once the decision is over
            m.pending.clear()


def next_deadline(state: RuntimeState) -> float | None:
    """When the next timeout falls due: send ``Tick(at=deadline)`` then. None if nothing waits."""
    return _deadline(state.model())


def _deadline(m: _Model) -> float | None:
    node_due = m.node_due
    if node_due is None or node_due <= m.now:  # the cache was computed at an earlier "now"
        node_due = m.node_due = _node_deadline(m)
    expiry = m.jobs.next_expiry()
    if expiry is None or (node_due is not None and node_due < expiry):
        return None if node_due == _NEVER else node_due
    return expiry


_NEVER = float("inf")


def _first_at(start: float, span: float) -> float:
    """``start + span``, or the next float up if needed for ``t - start >= span`` to hold.

    That is the test the checks apply, and ``start + span`` can round below it: a tick there
    would find nothing due, and the same deadline would come back forever.
    """
    t = start + span
    while t - start < span:
        t = math.nextafter(t, math.inf)
    return t


def _node_deadline(m: _Model) -> float:
    rt = m.runtime
    if rt is None:
        return _NEVER
    settings = rt.settings
    offline_after = settings.offline_after_s
    deadlines: list[float] = []
    for n in m.nodes.values():
        if n.upgrading_to is None:
            seen = n.registered_at if n.last_seen_at is None else n.last_seen_at
            silent_at = _first_at(seen, offline_after)
            if n.status is not NodeStatus.OFFLINE or silent_at > m.now:
                deadlines.append(silent_at)
        released = n.metrics.version_released_at
        if released is not None:
            expires = released + settings.version_lifetime_days * DAY_S
            warn = expires - settings.version_warning_days * DAY_S
            if n.warned_version != n.metrics.version and m.now < warn < expires:
                deadlines.append(warn)
            elif expires > m.now and n.upgrading_to is None:
                # An updating node stays Upgrading whatever its version, so a tick at expiry
                # would find nothing to do and the deadline would never clear; FinishUpgrade
                # settles the expiry instead.
                deadlines.append(expires)
        if settings.offline_expiry_s is not None and n.offline_since is not None:
            deadlines.append(_first_at(n.offline_since, settings.offline_expiry_s))
    for hook in DEADLINE_HOOKS:
        d = hook(m)
        if d is not None:
            deadlines.append(d)
    return min(deadlines) if deadlines else _NEVER
