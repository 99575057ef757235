"""Value types shared by commands, events and state: statuses, settings, metrics.

Every default below is documented in docs/embedding.md with the system it was anchored on.
"""

from __future__ import annotations

import enum

import attrs

from shir.core.codec import value
from shir.core.errors import DomainError

__all__ = [
    "SETTING_BOUNDS_S",
    "CredentialVersion",
    "InvalidSettings",
    "KeyName",
    "KeyVerifier",
    "NodeMetrics",
    "NodeStatus",
    "RuntimeSettings",
    "RuntimeStatus",
    "check_setting_bounds",
]


class NodeStatus(enum.Enum):
    """What a registered node can currently do (names as the product shows them)."""

    # Not (or no longer) registered: what a node shows itself when the runtime refuses it as
    # unknown or refuses its key (``rules.local_status``). No registered node has it.
    NEED_REGISTRATION = "NeedRegistration"
    INITIALIZING = "Initializing"  # registered, first heartbeat not seen yet
    INITIALIZE_FAILED = "InitializeFailed"  # registered, but its first heartbeat never came
    ONLINE = "Online"
    LIMITED = "Limited"  # up, but a peer port, the control channel, a version or credential lags
    OFFLINE = "Offline"  # missed heartbeats, hibernating, or running an expired version
    UPGRADING = "Upgrading"
    INACTIVE = "Inactive"  # configuration differs from the majority of nodes


class RuntimeStatus(enum.Enum):
    """The runtime's status, derived from its nodes' (see ``rules.runtime_status``)."""

    NEED_REGISTRATION = "NeedRegistration"  # created, no node registered
    ONLINE = "Online"  # every node Online
    LIMITED = "Limited"  # some node can work, some cannot work fully
    OFFLINE = "Offline"  # no node can work


class KeyName(enum.Enum):
    """The runtime's two auth keys; either registers a node."""

    KEY1 = "key1"
    KEY2 = "key2"


class InvalidSettings(DomainError, ValueError):
    """A runtime setting is out of its documented range."""


#: Upper bounds of a new runtime's timings: a mistyped exponent (1e308 s) would mean no node is
#: ever found Offline. A day between heartbeats or for a lease; Service Bus's 7-day duplicate
#: detection window.
SETTING_BOUNDS_S = (("heartbeat_interval_s", 86400), ("lock_duration_s", 86400),
                    ("duplicate_window_s", 604800))


def check_setting_bounds(settings: RuntimeSettings) -> None:
    """Refuse (``InvalidSettings``) settings beyond ``SETTING_BOUNDS_S``: what creating a
    runtime checks (reading a log does not, so logs from before the bounds still read)."""
    for name, most in SETTING_BOUNDS_S:
        v = getattr(settings, name)
        if v > most:
            raise InvalidSettings(
                f"{name} must be a number of seconds above 0 and at most {most}, got {v!r}")


@value
@attrs.frozen
class RuntimeSettings:
    """Tunables of one runtime. Every field has a documented default and range."""

    heartbeat_interval_s: float = 10.0
    missed_heartbeats_offline: int = 3
    lock_duration_s: float = 60.0
    max_deliveries: int = 10
    max_nodes: int = 4
    intranet_port: int = 8060
    offline_expiry_s: float | None = None  # auto-remove nodes offline this long; off by default
    version_lifetime_days: int = 365
    version_warning_days: int = 90
    # Completed idempotency keys are remembered this long (Service Bus duplicate detection: 10 min)
    duplicate_window_s: float = 600.0

    def __attrs_post_init__(self) -> None:
        # Only what every log ever written holds: the upper bounds of ``SETTING_BOUNDS_S`` are
        # checked when a runtime is created, so a log from before them still reads.
        for name, most in SETTING_BOUNDS_S:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise InvalidSettings(
                    f"{name} must be a number of seconds above 0 and at most {most}, got {v!r}")
        if not 1 <= self.missed_heartbeats_offline <= 100:
            raise InvalidSettings(
                f"missed_heartbeats_offline must be 1..100, got {self.missed_heartbeats_offline}"
            )
        if not 1 <= self.max_deliveries <= 1000:
            raise InvalidSettings(f"max_deliveries must be 1..1000, got {self.max_deliveries}")
        if not 1 <= self.max_nodes <= 4:
            raise InvalidSettings(
                f"max_nodes must be 1..4 (the product allows at most four), got {self.max_nodes}"
            )
        if not 1 <= self.intranet_port <= 65535:
            raise InvalidSettings(f"intranet_port must be 1..65535, got {self.intranet_port}")
        if self.offline_expiry_s is not None and not self.offline_expiry_s > 0:
            raise InvalidSettings(
                f"offline_expiry_s must be positive or None (off), got {self.offline_expiry_s}"
            )
        if not 0 <= self.version_warning_days < self.version_lifetime_days:
            raise InvalidSettings(
                "version_warning_days must be >= 0 and below version_lifetime_days, got "
                f"{self.version_warning_days} and {self.version_lifetime_days}"
            )

    @property
    def offline_after_s(self) -> float:
        """Silence after which a node counts as Offline."""
        return self.heartbeat_interval_s * self.missed_heartbeats_offline


@value
@attrs.frozen
class KeyVerifier:
    """What the runtime keeps of an auth key: never the key, only a salted digest."""

    name: KeyName
    generation: int
    salt: bytes
    digest: bytes

    def __repr__(self) -> str:  # digests are not secrets, but there is no reason to print them
        return f"KeyVerifier(name={self.name.value}, generation={self.generation})"


@value
@attrs.frozen
class CredentialVersion:
    """A credential (of one linked service) by id, at one version. Never its secret."""

    credential_id: str
    version: int


@value
@attrs.frozen
class NodeMetrics:
    """What a node reports with every heartbeat."""

    cpu_pct: float = 0.0
    available_memory_mb: int = 0
    running_jobs: int = 0
    version: str = ""
    version_released_at: float | None = None  # same clock as `at`; None: never expires
    reachable_peers: tuple[str, ...] = ()  # peers whose intranet port answered
    control_channel_ok: bool = True
    remote_access: bool = False  # "remote access from intranet": off, as a fresh install has it
    config_hash: str = ""  # digest of the node's settings; differing from the majority -> Inactive
    credentials: tuple[CredentialVersion, ...] = ()  # the versions this node holds
