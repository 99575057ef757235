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

__all__ = ["AnnounceDispatcher", "Disconnect", "StartSession", "effects_of"]


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


EFFECTS: dict[type, Callable[[Any], tuple[object, ...]]] = {
    ev.DispatcherChanged: lambda e: (AnnounceDispatcher(e.term, e.node),),
    ev.NodeRejoined: lambda e: (StartSession(e.node, e.session),),
    ev.NodeRemoved: lambda e: (Disconnect(e.node, e.reason),),
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
