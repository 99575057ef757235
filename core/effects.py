"""Effects: what a driver must carry out after events are stored. Values, never actions.

The core does not know whether a simulator or a real host carries them out. ``effects_of`` is a
pure function of the stored events, so a driver that crashes after storing events and before
acting can recompute the effects from its log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

from shir.core import events as ev
from shir.core import jobs
from shir.core.jobs import LeaseToken

__all__ = [
    "AnnounceDispatcher",
    "DeliverJob",
    "Disconnect",
    "StartSession",
    "StopJob",
    "effects_of",
]


@attrs.frozen
class AnnounceDispatcher:
    """Tell every node the new term and who dispatches in it (None: nobody)."""

    term: int
    node: str | None


@attrs.frozen
class StartSession:
    """Tell ``node`` its new session: messages of older sessions are refused from now on."""

    node: str
    session: int


@attrs.frozen
class Disconnect:
    """Tell ``node`` it is no longer part of the runtime."""

    node: str
    reason: str


@attrs.frozen
class DeliverJob:
    """Hand the job to ``token.node``: run it, renew before ``expires_at``, then complete it."""

    token: LeaseToken
    expires_at: float


@attrs.frozen
class StopJob:
    """Tell ``token.node`` to stop working on a lease that ended (its result would be refused)."""

    token: LeaseToken
    reason: str


EFFECTS: dict[type, Callable[[Any], tuple[object, ...]]] = {
    ev.DispatcherChanged: lambda e: (AnnounceDispatcher(e.term, e.node),),
    ev.NodeRejoined: lambda e: (StartSession(e.node, e.session),),
    ev.NodeRemoved: lambda e: (Disconnect(e.node, e.reason),),
    jobs.JobLeased: lambda e: (DeliverJob(e.token, e.expires_at),),
    jobs.JobReleased: lambda e: (StopJob(e.token, e.detail),),
    jobs.JobDeadLettered: lambda e: (StopJob(e.token, e.detail),),
}


def effects_of(events: Iterable[object]) -> tuple[object, ...]:
    """The effects the given (stored) events call for, in order."""
    out: list[object] = []
    table = EFFECTS
    for e in events:
        f = table.get(type(e))
        if f is not None:
            out.extend(f(e))
    return tuple(out)
