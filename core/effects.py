"""Effects: what a host must carry out after events are stored. Values, never actions.

The host protocol
-----------------
Every effect names its recipient in ``effect.to`` (a :class:`Recipient`): one node, every node,
or the factory side (the cloud service that queued the jobs). A host routes by that lookup,
never by the effect's type, and carries out only what is addressed to it.

The tables that say which event calls for which effect live with each concern (``lifecycle``,
``leasing``, ``credentials``); ``shir.core.decide`` merges them and holds the two functions
below (also exported as ``shir.core.effects_of`` and ``shir.core.answer``). A host gets effects
from three places, and nowhere else:

- ``effects_of(events, state)``: what stored events call for. A pure function of the events
  (and of the state after folding them, for :class:`DispatchWanted`), so a host that crashed
  after storing and before acting, or a node that only reads the log another node wrote,
  recomputes the same effects.
- ``answer(command, events, state)``: what the *sender* of an accepted command must be told
  beyond that (a registration that was already satisfied still starts the node's session;
  a keep-alive naming leases that have ended tells the node to stop those copies).
- a refused command from a fenced or stale sender raises a :class:`~shir.core.errors.Fenced`
  error whose ``reply`` is the effect to send back (see docs/architecture.md for the table).

``Driver.handle`` returns the first two together; hosts catch ``Fenced`` for the third.
"""

from __future__ import annotations

import enum
import functools

import attrs

from shir.core.jobs import LeaseToken

__all__ = [
    "EVERY_NODE",
    "FACTORY",
    "AnnounceDispatcher",
    "DeliverJob",
    "Disconnect",
    "DispatchWanted",
    "PublishJobResult",
    "Recipient",
    "Role",
    "StartSession",
    "StopJob",
    "to_node",
]


class Role(enum.Enum):
    """Who an effect is for."""

    NODE = "node"  # the one node named in ``Recipient.node``
    EVERY_NODE = "every_node"  # every registered node
    FACTORY = "factory"  # the factory side: the cloud service that queued the jobs


@attrs.frozen
class Recipient:
    """The recipient of an effect: a role, and the node's name for ``Role.NODE``."""

    role: Role
    node: str | None = None


EVERY_NODE = Recipient(Role.EVERY_NODE)
FACTORY = Recipient(Role.FACTORY)


@functools.lru_cache(maxsize=256)
def to_node(name: str) -> Recipient:
    """The recipient ``name`` (one node). Cached: every effect's ``to`` is one of a few."""
    return Recipient(Role.NODE, name)


@attrs.frozen
class AnnounceDispatcher:
    """Tell nodes the new term and who dispatches in it (None: nobody).

    ``to_node`` None: every node (a new term); a name: that node only (the reply to a sender
    that acted on an older term).
    """

    term: int
    node: str | None
    to_node: str | None = None

    @property
    def to(self) -> Recipient:
        """Every node, or the one it answers."""
        return EVERY_NODE if self.to_node is None else to_node(self.to_node)


@attrs.frozen
class StartSession:
    """Tell ``node`` its session (on registering, and on rejoining after a gap): messages of
    other sessions are refused from now on. The node adopts ``session`` as it is."""

    node: str
    session: int

    @property
    def to(self) -> Recipient:
        """The node."""
        return to_node(self.node)


@attrs.frozen
class Disconnect:
    """Tell ``node`` it is not (or no longer) part of the runtime."""

    node: str
    reason: str

    @property
    def to(self) -> Recipient:
        """The node."""
        return to_node(self.node)


@attrs.frozen
class DeliverJob:
    """Hand the job to ``token.node``: run it, renew before ``expires_at``, then complete it.

    A delivery of a job the node still runs under an *older* token replaces that copy (the old
    lease has ended; its result would be refused).
    """

    token: LeaseToken
    expires_at: float

    @property
    def to(self) -> Recipient:
        """The node the job was leased to."""
        return to_node(self.token.node)


@attrs.frozen
class StopJob:
    """Tell ``token.node`` to stop working on a lease that ended (its result would be refused)."""

    token: LeaseToken
    reason: str

    @property
    def to(self) -> Recipient:
        """The node that held the lease."""
        return to_node(self.token.node)


@attrs.frozen
class DispatchWanted:
    """Tell the dispatcher of ``term`` to send ``DispatchJobs``: work waits and something
    changed that may let it be placed (a job queued first in its queue, a slot freed, a node
    came up...)."""

    node: str
    term: int

    @property
    def to(self) -> Recipient:
        """The dispatcher."""
        return to_node(self.node)


@attrs.frozen
class PublishJobResult:
    """Tell the factory side how a job ended: ``outcome`` is "completed" or "dead_lettered"."""

    job_id: str
    idempotency_key: str
    outcome: str
    detail: str

    @property
    def to(self) -> Recipient:
        """The factory side."""
        return FACTORY
