"""Events: past-tense facts about one runtime. Registered with the codec under stable tags.

Events never carry secrets: auth keys appear as salted verifiers, credentials (elsewhere) as ids,
versions and ciphertext for a named recipient.
"""

from __future__ import annotations

from typing import Any

import attrs

from shir.core.codec import event
from shir.core.model import KeyName, KeyVerifier, NodeMetrics, NodeStatus, RuntimeSettings

__all__ = [
    "AuthKeyRegenerated",
    "DispatcherChanged",
    "HeartbeatReceived",
    "NodeLeft",
    "NodeRegistered",
    "NodeRejoined",
    "NodeRemoved",
    "NodeStatusChanged",
    "RuntimeCreated",
    "UpgradeFinished",
    "UpgradeStarted",
    "VersionExpiryWarned",
]


@event("runtime_created")
@attrs.frozen
class RuntimeCreated:
    """A self-hosted runtime was created in one data factory."""

    runtime_id: str
    factory_id: str
    name: str
    description: str
    settings: RuntimeSettings
    key1: KeyVerifier
    key2: KeyVerifier
    at: float


@event("auth_key_regenerated")
@attrs.frozen
class AuthKeyRegenerated:
    """One auth key was replaced; the previous one registers nothing from now on."""

    key: KeyVerifier
    at: float


def _v1_to_v2(fields: list[Any]) -> list[Any]:  # v2 added intranet_address, cert_sha256
    return [*fields, None, None]


def _v2_to_v3(fields: list[Any]) -> list[Any]:  # v3 added envelope_key
    return [*fields, None]


@event("node_registered", version=3, upcasters={1: _v1_to_v2, 2: _v2_to_v3})
@attrs.frozen
class NodeRegistered:
    """A machine joined the runtime as a node; peers reach it at ``intranet_address``, pin
    its intranet certificate by ``cert_sha256``, and seal credentials for it with its X25519
    public key ``envelope_key`` (each None when it gave none)."""

    node: str
    machine_id: str
    cores: int
    memory_mb: int
    key_name: KeyName
    metrics: NodeMetrics
    at: float
    intranet_address: str | None = None
    cert_sha256: str | None = None
    envelope_key: bytes | None = None


@event("node_left")
@attrs.frozen
class NodeLeft:
    """A node left the runtime by itself (a graceful shutdown); its leases were released."""

    node: str
    at: float


@event("node_removed")
@attrs.frozen
class NodeRemoved:
    """A node left the runtime (removed by a user, or expired after a long time offline)."""

    node: str
    reason: str
    at: float


@event("heartbeat_received")
@attrs.frozen
class HeartbeatReceived:
    """A node reported that it is alive, with its metrics."""

    node: str
    metrics: NodeMetrics
    at: float


@event("node_status_changed")
@attrs.frozen
class NodeStatusChanged:
    """A node's status changed; ``reasons`` say why it is not simply Online."""

    node: str
    status: NodeStatus
    reasons: tuple[str, ...]
    at: float


@event("node_rejoined")
@attrs.frozen
class NodeRejoined:
    """A silent node spoke again (woke from hibernation, healed partition) and got a new session.

    Nothing it held before the gap is honoured: its leases ended when it went Offline, and its
    dispatcher term, if it had one, is over.
    """

    node: str
    session: int
    gap_s: float
    at: float


@event("dispatcher_changed")
@attrs.frozen
class DispatcherChanged:
    """A new dispatcher term began (``node`` is None when no node can dispatch)."""

    term: int
    node: str | None
    reason: str
    at: float


@event("version_expiry_warned")
@attrs.frozen
class VersionExpiryWarned:
    """A node runs a version that expires soon."""

    node: str
    version: str
    expires_at: float
    at: float


@event("upgrade_started")
@attrs.frozen
class UpgradeStarted:
    """A node began installing another version (one node at a time)."""

    node: str
    from_version: str
    to_version: str
    at: float


@event("upgrade_finished")
@attrs.frozen
class UpgradeFinished:
    """A node's update ended: on success it runs ``version``; on failure it rolled back to it."""

    node: str
    ok: bool
    version: str
    version_released_at: float | None
    reason: str
    at: float
