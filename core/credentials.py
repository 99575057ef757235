"""Credentials: the latest version of each, which node holds what, and the sync that catches up.

Theory of operation
-------------------
A credential (of one linked service) is known to the core only by id and version, never by its
secret. A user saves a version on one node (``SaveCredential`` -> ``CredentialSaved``): that node
now holds it, and versions of a credential only grow, so the runtime's *latest* version of each
credential is the highest ever saved. What every other node holds is what it last reported
(``NodeMetrics.credentials`` in its heartbeats).

A node holding less than the latest version of some credential (or none) is *behind*: it is
Limited (the ``STATUS_RULES`` row "credential version behind", with a reason such as
``credential sql-1 at v1, latest v2``) and the dispatcher gives it no job that needs that version
unless the job carries it (the dispatch rule in ``shir.core.leasing``).

Sync rule, applied whenever ``decide`` settles (after every lifecycle command and at every
deadline): for each credential and each node that is behind and *up* (Initializing, Online,
Limited or Inactive: not Offline, not Upgrading), if no sync of the latest version to it is
*outstanding*, emit ``CredentialSyncRequested(credential, version, holder, node)``. The holder is
an Online or Limited node with a working control channel that holds the latest version: Online
before Limited, then the earliest registered; a re-request after a timeout takes the next such
holder after the previous one, so one holder that cannot seal does not stall the sync. Limited
holders count because a node behind on one credential is Limited yet may be the only holder of
another: requiring Online would deadlock two such nodes.

The request's effect ``SealCredentialFor`` asks the holder to seal an envelope for the target
(``shir.adapters.envelope``) and send ``ShareCredential``, stored as ``CredentialShared`` with the
ciphertext; its effect ``DeliverCredential`` hands the envelope to the target, which opens and
stores it and reports the version in its next heartbeat. That report ends the sync
(``CredentialSynced``); the node becomes Online again when nothing else limits it.

A sync is outstanding from its request until it ends, except that it lapses (and is requested
again) when:

- nothing happened for ``SYNC_TIMEOUT_HEARTBEATS`` heartbeat intervals (30 s by default) since
  the request, or since the share when the envelope was stored but not yet reported as held;
- it is still waiting for its holder, and that holder can no longer share (Offline, removed, no
  control channel, no longer holding the version): re-requested at once, from another holder;
- the target rejoined after being Offline (a new session): whatever was under way was lost;
- a newer version was saved meanwhile.

So a new node receives every credential, and so does a node that rejoins. Sync timeouts are
deadlines like any other (``next_deadline``): a tick at one always re-requests something.

State stays bounded: the latest version of each credential, and at most one outstanding sync per
(credential, node); what nodes hold lives in their metrics already.

The module is in Equinox order: errors and commands, events and effects, state and ``EVOLVE``,
``EFFECTS``, the decisions (``DECIDE``), then the timed rule (``request_syncs`` in ``RULES``),
and the queries. ``shir.core.decide`` merges its tables with the other concerns'.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from shir.core.codec import event, value
from shir.core.effects import Recipient, to_node
from shir.core.errors import DomainError, InvalidCommand, NodeOffline
from shir.core.kernel import (
    Decider,
    Events,
    Handler,
    Model,
    Node,
    RuntimeState,
    TimedRule,
    emit,
    first_at,
    node_of,
    runtime_of,
)
from shir.core.model import CredentialVersion, NodeStatus, RuntimeSettings
from shir.core.rules import DOWN

__all__ = [
    "DECIDE",
    "EFFECTS",
    "EVOLVE",
    "MAX_ENVELOPE_BYTES",
    "RULES",
    "SYNC_TIMEOUT_HEARTBEATS",
    "CredentialNotHeld",
    "CredentialSaved",
    "CredentialShared",
    "CredentialStatus",
    "CredentialSync",
    "CredentialSyncRequested",
    "CredentialSynced",
    "DeliverCredential",
    "LatestCredential",
    "NodeCredentials",
    "SaveCredential",
    "SealCredentialFor",
    "ShareCredential",
    "StaleCredentialVersion",
    "UnknownCredential",
    "check_credential",
    "credential_status",
    "request_syncs",
    "sync_timeout_s",
]

SYNC_TIMEOUT_HEARTBEATS = 3  # a sync with no progress for this many heartbeat intervals lapses
MAX_ENVELOPE_BYTES = 64 * 1024  # a sealed credential is its plaintext plus ~200 bytes
MAX_VERSION = 2**63 - 1  # as the envelope format (u64) and the adapters allow

# Same rule as the adapters' credential ids: they name files on every platform.
_CREDENTIAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def sync_timeout_s(settings: RuntimeSettings) -> float:
    """How long a sync may make no progress before it is requested again."""
    return SYNC_TIMEOUT_HEARTBEATS * settings.heartbeat_interval_s


# --- errors ------------------------------------------------------------------------------------

class UnknownCredential(DomainError):
    """No version of this credential was ever saved in the runtime."""


class StaleCredentialVersion(DomainError):
    """The version is not the one the command needs (not newer for a save, not latest to share)."""


class CredentialNotHeld(DomainError):
    """The sending node does not hold the version it would share (per what it last reported)."""


# --- commands ----------------------------------------------------------------------------------

@attrs.frozen
class SaveCredential:
    """A user saved ``version`` of a credential on ``node`` (which stored it, encrypted)."""

    credential_id: str
    version: int
    node: str
    at: float


def _envelope_repr(envelope: bytes) -> str:
    return f"<{len(envelope)} bytes>"


@attrs.frozen
class ShareCredential:
    """``from_node`` sealed ``version`` for ``to_node``: ``envelope`` is ciphertext for it."""

    credential_id: str
    version: int
    from_node: str
    to_node: str
    envelope: bytes = attrs.field(repr=_envelope_repr)
    at: float


# --- events ------------------------------------------------------------------------------------

@event("credential_saved")
@attrs.frozen
class CredentialSaved:
    """A user saved a new version of a credential on ``node``; it is the runtime's latest."""

    credential_id: str
    version: int
    node: str
    at: float


@event("credential_sync_requested")
@attrs.frozen
class CredentialSyncRequested:
    """``to_node`` is behind: ``from_node``, which holds ``version``, is asked to seal it for it."""

    credential_id: str
    version: int
    from_node: str
    to_node: str
    at: float


@event("credential_shared")
@attrs.frozen
class CredentialShared:
    """``from_node`` sealed ``version`` for ``to_node``: ``envelope`` is ciphertext for it only."""

    credential_id: str
    version: int
    from_node: str
    to_node: str
    envelope: bytes = attrs.field(repr=_envelope_repr)
    at: float


@event("credential_synced")
@attrs.frozen
class CredentialSynced:
    """``node`` reported holding ``version``: the sync to it is over."""

    credential_id: str
    version: int
    node: str
    at: float


# --- effects -----------------------------------------------------------------------------------

@attrs.frozen
class SealCredentialFor:
    """On ``from_node``: seal ``version`` for ``to_node`` and send ``ShareCredential``."""

    credential_id: str
    version: int
    from_node: str
    to_node: str

    @property
    def to(self) -> Recipient:
        """The holder that seals."""
        return to_node(self.from_node)


@attrs.frozen
class DeliverCredential:
    """Hand ``envelope`` to ``to_node``: it opens it, stores the credential, and reports
    ``version`` in its next heartbeat."""

    to_node: str
    credential_id: str
    version: int
    envelope: bytes = attrs.field(repr=_envelope_repr)

    @property
    def to(self) -> Recipient:
        """The node that receives the envelope."""
        return to_node(self.to_node)


# --- state -------------------------------------------------------------------------------------

@value
@attrs.frozen
class LatestCredential:
    """The latest version of one credential, and where it was saved."""

    credential_id: str
    version: int
    node: str
    saved_at: float


@value
@attrs.frozen
class CredentialSync:
    """An outstanding sync of ``version`` to ``to_node`` (see the module docstring)."""

    credential_id: str
    version: int
    from_node: str
    to_node: str
    session: int  # the target's session when requested; a rejoin ends it
    requested_at: float
    shared_at: float | None = None  # when the envelope was stored

    @property
    def since(self) -> float:
        """When it last made progress (the timeout runs from here)."""
        return self.requested_at if self.shared_at is None else self.shared_at


# The model's ``credentials`` and ``syncs`` dicts are copy-on-write: handlers rebind them, never
# change them in place, so a scratch model (which shares them) never writes through to the real
# one. They change only on credential events, which are rare.

def _held(n: Node) -> dict[str, int]:
    return {cv.credential_id: cv.version for cv in n.metrics.credentials}


def _saved(m: Model, e: CredentialSaved) -> None:
    m.credentials = {
        **m.credentials,
        e.credential_id: LatestCredential(e.credential_id, e.version, e.node, e.at),
    }
    n = m.nodes[e.node]
    have = n.metrics.credentials
    cv = CredentialVersion(e.credential_id, e.version)
    if any(h.credential_id == e.credential_id for h in have):
        have = tuple(cv if h.credential_id == e.credential_id else h for h in have)
    else:
        have = (*have, cv)
    n.metrics = attrs.evolve(n.metrics, credentials=have)
    key = (e.credential_id, e.node)
    if key in m.syncs:
        m.syncs = {k: v for k, v in m.syncs.items() if k != key}


def _sync_requested(m: Model, e: CredentialSyncRequested) -> None:
    session = m.nodes[e.to_node].session
    m.syncs = {
        **m.syncs,
        (e.credential_id, e.to_node): CredentialSync(
            e.credential_id, e.version, e.from_node, e.to_node, session, e.at
        ),
    }


def _shared(m: Model, e: CredentialShared) -> None:
    session = m.nodes[e.to_node].session
    key = (e.credential_id, e.to_node)
    rec = m.syncs.get(key)
    requested_at = e.at
    if rec is not None and rec.version == e.version and rec.session == session:
        requested_at = rec.requested_at
    m.syncs = {
        **m.syncs,
        key: CredentialSync(
            e.credential_id, e.version, e.from_node, e.to_node, session, requested_at, e.at
        ),
    }


def _synced(m: Model, e: CredentialSynced) -> None:
    key = (e.credential_id, e.node)
    m.syncs = {k: v for k, v in m.syncs.items() if k != key}


EVOLVE: dict[type, Callable[[Model, Any], None]] = {
    CredentialSaved: _saved,
    CredentialSyncRequested: _sync_requested,
    CredentialShared: _shared,
    CredentialSynced: _synced,
}


EFFECTS: dict[type, Callable[[Any], tuple[object, ...]]] = {
    CredentialSyncRequested: lambda e: (
        SealCredentialFor(e.credential_id, e.version, e.from_node, e.to_node),
    ),
    CredentialShared: lambda e: (
        DeliverCredential(e.to_node, e.credential_id, e.version, e.envelope),
    ),
}


# --- decisions ---------------------------------------------------------------------------------

def check_credential(credential_id: str, version: int) -> None:
    """Refuse (``InvalidCommand``) a malformed credential id or a version out of range."""
    if not isinstance(credential_id, str) or not _CREDENTIAL_ID.fullmatch(credential_id):
        shown = credential_id[:40] if isinstance(credential_id, str) else type(credential_id)
        raise InvalidCommand(
            f"invalid credential id {shown!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidCommand(
            f"invalid version {version!r} of credential {credential_id!r}: versions are whole "
            f"numbers from 1 to {MAX_VERSION}"
        )


def _save(m: Model, c: SaveCredential, k: Decider) -> Events:
    runtime_of(m)
    check_credential(c.credential_id, c.version)
    node = node_of(m, c.node)
    latest = m.credentials.get(c.credential_id)
    if latest is not None:
        if (latest.version, latest.node) == (c.version, c.node) and (
            node.registered_at <= latest.saved_at  # not a new node that took the name since
        ):
            return []  # this very save again: satisfied
        if c.version <= latest.version:
            raise StaleCredentialVersion(
                f"credential {c.credential_id!r} is already at v{latest.version} (saved on "
                f"{latest.node}); versions only grow: save it as v{latest.version + 1} or later, "
                f"not v{c.version}"
            )
    s, out = k.timed(m, c.at)
    status = node_of(s, c.node).status
    if status in DOWN:  # settling may have made it Offline
        raise NodeOffline(
            f"node {c.node!r} is {status.value}; save credential {c.credential_id!r} on a node "
            "that is up, and it will reach the others by sync"
        )
    emit(s, out, CredentialSaved(c.credential_id, c.version, c.node, c.at))
    k.settle(s, c.at, out)
    return out


def _share(m: Model, c: ShareCredential, k: Decider) -> Events:
    runtime_of(m)
    check_credential(c.credential_id, c.version)
    if not isinstance(c.envelope, bytes) or not 0 < len(c.envelope) <= MAX_ENVELOPE_BYTES:
        size = len(c.envelope) if isinstance(c.envelope, bytes) else type(c.envelope).__name__
        raise InvalidCommand(
            f"envelope must be 1-{MAX_ENVELOPE_BYTES} bytes of ciphertext sealed for "
            f"{c.to_node!r:.60}, got {size}"
        )
    latest = m.credentials.get(c.credential_id)
    if latest is None:
        raise UnknownCredential(
            f"no version of credential {c.credential_id!r} was ever saved in this runtime; "
            "save it on a node first"
        )
    if c.version != latest.version:
        if c.version < latest.version:
            why = f"v{c.version} is outdated: seal v{latest.version} instead"
        else:
            why = f"v{c.version} was never saved: share the latest, v{latest.version}"
        raise StaleCredentialVersion(
            f"credential {c.credential_id!r} is at v{latest.version}; {why}"
        )
    if c.from_node == c.to_node:
        raise InvalidCommand(f"node {c.to_node!r:.60} cannot share a credential with itself")
    node_of(m, c.from_node)
    target = node_of(m, c.to_node)
    if _held(target).get(c.credential_id, 0) >= c.version:
        return []  # the target already holds it: satisfied
    rec = m.syncs.get((c.credential_id, c.to_node))
    if (
        rec is not None and rec.shared_at is not None and rec.version == c.version
        and rec.session == target.session
    ):
        return []  # already shared with it and not lapsed: satisfied
    s, out = k.timed(m, c.at)
    sender = node_of(s, c.from_node)  # settling may have expired either node
    node_of(s, c.to_node)
    have = _held(sender).get(c.credential_id, 0)
    if have < c.version:
        held = f"v{have}" if have else "no version"
        raise CredentialNotHeld(
            f"node {c.from_node!r} last reported {held} of credential {c.credential_id!r}, not "
            f"v{c.version}; only a node that holds v{c.version} can share it"
        )
    emit(s, out, CredentialShared(
        c.credential_id, c.version, c.from_node, c.to_node, c.envelope, c.at
    ))
    return out


DECIDE: dict[type, Handler] = {
    SaveCredential: _save,
    ShareCredential: _share,
}


# --- the sync rule -----------------------------------------------------------------------------

_TARGETS = frozenset(
    (NodeStatus.INITIALIZING, NodeStatus.ONLINE, NodeStatus.LIMITED, NodeStatus.INACTIVE)
)


def _can_share(n: Node) -> bool:
    return n.status in (NodeStatus.ONLINE, NodeStatus.LIMITED) and n.metrics.control_channel_ok


def request_syncs(m: Model, at: float) -> tuple[Events, float | None]:
    """What the sync rule calls for at ``at`` (events), and the next time it will call again."""
    rt = m.runtime
    if rt is None or not m.credentials:
        return [], None
    timeout = sync_timeout_s(rt.settings)
    nodes = list(m.nodes.values())  # registration order
    held = {n.name: _held(n) for n in nodes}
    syncs = m.syncs
    done: list[object] = []
    requests: list[object] = []
    nxt: float | None = None
    for cid in sorted(m.credentials):
        latest = m.credentials[cid].version
        holders = [n for n in nodes if _can_share(n) and held[n.name].get(cid, 0) >= latest]
        holders.sort(key=lambda n: n.status is not NodeStatus.ONLINE)  # stable: then by seq
        for n in nodes:
            have = held[n.name].get(cid, 0)
            rec = syncs.get((cid, n.name))
            if have >= latest:
                if rec is not None:
                    done.append(CredentialSynced(cid, have, n.name, at))
                continue
            if n.status not in _TARGETS or not holders:
                continue
            previous = None
            if rec is not None and rec.version == latest and rec.session == n.session:
                waiting_on_gone_holder = rec.shared_at is None and all(
                    h.name != rec.from_node for h in holders
                )
                if not waiting_on_gone_holder:
                    due = first_at(rec.since, timeout)
                    if at < due:
                        nxt = due if nxt is None else min(nxt, due)
                        continue
                    previous = rec.from_node
            holder = holders[0]
            if previous is not None:
                names = [h.name for h in holders]
                if previous in names:
                    holder = holders[(names.index(previous) + 1) % len(holders)]
            requests.append(CredentialSyncRequested(cid, latest, holder.name, n.name, at))
    return done + requests, nxt


RULES: tuple[TimedRule, ...] = (TimedRule("credential syncs", request_syncs),)


# --- queries -----------------------------------------------------------------------------------

@attrs.frozen
class NodeCredentials:
    """What one node holds (as it last reported) and the latest versions it lacks."""

    node: str
    status: NodeStatus
    held: tuple[CredentialVersion, ...]  # by credential id
    behind: tuple[CredentialVersion, ...]  # the latest versions it does not hold


@attrs.frozen
class CredentialStatus:
    """The credential sync status of a runtime (see :func:`credential_status`)."""

    latest: tuple[CredentialVersion, ...]  # the latest version of each credential, by id
    nodes: tuple[NodeCredentials, ...]  # in registration order
    behind: tuple[str, ...]  # nodes that lack a latest version, whatever their status
    syncs: tuple[CredentialSync, ...]  # outstanding, by (credential, node)

    def latest_version(self, credential_id: str) -> int | None:
        """The latest version of ``credential_id``, or None if it was never saved."""
        return next((cv.version for cv in self.latest if cv.credential_id == credential_id),
                    None)

    @property
    def converged(self) -> bool:
        """Does every Online or Limited node hold the latest version of every credential?"""
        return not any(
            n.behind for n in self.nodes if n.status in (NodeStatus.ONLINE, NodeStatus.LIMITED)
        )


def credential_status(state: RuntimeState) -> CredentialStatus:
    """Latest versions, what each node holds, which nodes are behind, and outstanding syncs."""
    m = state.model()
    latest = tuple(
        CredentialVersion(cid, m.credentials[cid].version) for cid in sorted(m.credentials)
    )
    nodes = []
    for n in m.nodes.values():
        have = _held(n)
        nodes.append(NodeCredentials(
            n.name, n.status,
            tuple(sorted(n.metrics.credentials, key=lambda cv: cv.credential_id)),
            tuple(cv for cv in latest if have.get(cv.credential_id, 0) < cv.version),
        ))
    return CredentialStatus(
        latest,
        tuple(nodes),
        tuple(n.node for n in nodes if n.behind),
        tuple(m.syncs[k] for k in sorted(m.syncs)),
    )

