"""The root of every error shir raises on purpose.

Each subclass names what was wrong in its message and, where the caller can fix it, what to do.
Messages never contain secrets (auth keys, passwords, credential plaintext).
"""

from __future__ import annotations

__all__ = [
    "DomainError",
    "InvalidCommand",
    "MachineAlreadyRegistered",
    "NodeNameTaken",
    "NodeOffline",
    "RemoteAccessDisabled",
    "RuntimeAlreadyExists",
    "RuntimeNotFound",
    "ShirError",
    "StaleSession",
    "StaleTerm",
    "TimeWentBackwards",
    "TooManyNodes",
    "UnknownNode",
    "UpgradeInProgress",
]


class ShirError(Exception):
    """Base class of all errors raised by shir."""


class DomainError(ShirError):
    """A command was refused by the core; the state it was given is unchanged."""


class InvalidCommand(DomainError, ValueError):
    """A command's fields are malformed (empty name, negative count, ...)."""


class RuntimeNotFound(DomainError):
    """The command needs a runtime, and none has been created."""


class RuntimeAlreadyExists(DomainError):
    """A different runtime already lives in this stream."""


class UnknownNode(DomainError):
    """The command names a node that is not registered."""


class NodeNameTaken(DomainError):
    """Another machine already registered under this node name."""


class MachineAlreadyRegistered(DomainError):
    """The machine already hosts a node of this runtime (one runtime per machine)."""


class TooManyNodes(DomainError):
    """The runtime already has its maximum number of nodes."""


class RemoteAccessDisabled(DomainError):
    """A second node may join only when remote access from the intranet is on everywhere."""


class StaleSession(DomainError):
    """A node spoke with a session that ended when it went Offline; it must rejoin."""


class StaleTerm(DomainError):
    """A message carries a dispatcher term that is over; the sender is fenced."""


class TimeWentBackwards(DomainError):
    """A command is stamped earlier than what the runtime has already seen."""


class UpgradeInProgress(DomainError):
    """Updates roll one node at a time, and another node is updating."""


class NodeOffline(DomainError):
    """The command needs the node up, and it is Offline."""
