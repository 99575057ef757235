"""Commands: what a user or a node asks the runtime to do. Imperative names; ``at`` is now.

Commands may hold secrets (an auth key being registered or generated); they are never stored.
"""

from __future__ import annotations

import attrs

from shir.core.keys import AuthKey
from shir.core.model import NodeMetrics, RuntimeSettings

__all__ = [
    "CreateRuntime",
    "FinishUpgrade",
    "Heartbeat",
    "LeaveRuntime",
    "RegenerateAuthKey",
    "RegisterNode",
    "RemoveNode",
    "StartUpgrade",
    "Tick",
]


@attrs.frozen
class CreateRuntime:
    """Create the runtime in a data factory with its two auth keys."""

    runtime_id: str
    factory_id: str
    name: str
    key1: AuthKey
    key2: AuthKey
    at: float
    description: str = ""
    settings: RuntimeSettings = RuntimeSettings()


@attrs.frozen
class RegenerateAuthKey:
    """Replace one auth key with ``key`` (a higher generation of the same slot)."""

    key: AuthKey
    at: float


@attrs.frozen
class RegisterNode:
    """Join a machine to the runtime with an auth key's text, as a user pastes it."""

    auth_key: str = attrs.field(repr=False)
    node: str
    machine_id: str
    cores: int
    memory_mb: int
    at: float
    metrics: NodeMetrics = NodeMetrics()
    # Where peers reach the node on the intranet ("host:port") and the SHA-256 fingerprint (hex)
    # of its intranet TLS certificate: kept in the log, so peers pin each other through it.
    intranet_address: str | None = None
    cert_sha256: str | None = None
    # The node's X25519 public key (raw bytes) for credential envelopes: a holder seals a
    # credential version for it (``shir.core.credentials``). Public; never the private half.
    envelope_key: bytes | None = None


@attrs.frozen
class RemoveNode:
    """Remove a node from the runtime."""

    node: str
    at: float


@attrs.frozen
class LeaveRuntime:
    """A node leaves the runtime for good (a graceful shutdown): its leases go back to the
    queue at once instead of when it would have been seen Offline. ``session`` is its own."""

    node: str
    session: int
    at: float


@attrs.frozen
class Heartbeat:
    """A node says it is alive. ``session`` is the one the runtime last gave the node."""

    node: str
    session: int
    metrics: NodeMetrics
    at: float


@attrs.frozen
class StartUpgrade:
    """Begin installing ``to_version`` on one node."""

    node: str
    to_version: str
    at: float


@attrs.frozen
class FinishUpgrade:
    """Report the end of a node's update; a failed one rolls back to the previous version."""

    node: str
    ok: bool
    at: float
    version_released_at: float | None = None
    reason: str = ""


@attrs.frozen
class Tick:
    """Time has reached ``at``: decide the timeouts that are due."""

    at: float
