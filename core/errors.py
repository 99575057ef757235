"""The root of every error shir raises on purpose.

Each subclass names what was wrong in its message and, where the caller can fix it, what to do.
Messages never contain secrets (auth keys, passwords, credential plaintext).
"""

from __future__ import annotations

__all__ = [
    "DomainError",
    "Fenced",
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


class Fenced(DomainError):
    """The sender is fenced or stale: it acted on a view of the runtime that is over.

    ``reply`` is the effect the host must send back (its ``to`` names the sender), so the sender
    catches up: a stale term gets the current dispatcher, a stale session the current session,
    an unknown node a disconnect, a lost lease a stop. No host re-derives it from state.
    """

    def __init__(self, message: str, reply: object) -> None:
        super().__init__(message)
        self.reply = reply


class UnknownNode(Fenced):
    """The command names a node that is not registered (reply: ``Disconnect``)."""


class NodeNameTaken(DomainError):
    """Another machine already registered under this node name."""


class MachineAlreadyRegistered(DomainError):
    """The machine already hosts a node of this runtime (one runtime per machine)."""


class TooManyNodes(DomainError):
    """The runtime already has its maximum number of nodes."""


class RemoteAccessDisabled(DomainError):
    """A second node may join only when remote access from the intranet is on everywhere."""


class StaleSession(Fenced):
    """A node spoke with a session that is not its current one (reply: ``StartSession``)."""


class StaleTerm(Fenced):
    """A message carries a dispatcher term that is over; the sender is fenced (reply:
    ``AnnounceDispatcher`` of the current term, to the sender)."""


class TimeWentBackwards(DomainError):
    """A command is stamped earlier than what the runtime has already seen."""


class UpgradeInProgress(DomainError):
    """Updates roll one node at a time, and another node is updating."""


class NodeOffline(DomainError):
    """The command needs the node up, and it is Offline."""
