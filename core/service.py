"""The one-call way to drive the core: ``handle(state, command) -> Decision``."""

from __future__ import annotations

import attrs

from shir.core.decide import answer, decide, effects_of
from shir.core.state import RuntimeState, fold

__all__ = ["Decision", "handle"]


@attrs.frozen
class Decision:
    """The outcome of one command: the new state, the events to store, the effects to carry out."""

    state: RuntimeState
    events: tuple[object, ...]
    effects: tuple[object, ...]


def handle(state: RuntimeState, command: object) -> Decision:
    """Decide ``command``, fold its events, and compute their effects and the sender's answer.

    On refusal the ``DomainError`` propagates and ``state`` stays usable and unchanged; on
    success ``state`` is spent (use ``Decision.state``). A driver that persists events should
    store ``events`` before carrying out ``effects``.
    """
    events = decide(state, command)
    if not events:
        return Decision(state, events, answer(command, events, state))
    state = fold(state, events)
    return Decision(state, events, effects_of(events, state) + answer(command, events, state))
