"""Runtime state: ``initial``, ``evolve`` and ``fold``.

The state of one runtime is a :class:`~shir.core.kernel.RuntimeState`, a handle over a mutable
model that ``evolve`` and ``fold`` change in place (the handle passed in is then *spent*; see
``shir.core.kernel`` for why). The event handlers are the concerns' ``EVOLVE`` tables, merged in
``shir.core.decide``.
"""

from __future__ import annotations

from collections.abc import Iterable

from shir.core.decide import EVOLVE, current_rules
from shir.core.kernel import (
    FIRST_HEARTBEAT_PENDING,
    Model,
    Node,
    RuntimeInfo,
    RuntimeState,
    SpentState,
    apply,
)

__all__ = [
    "EVOLVE",
    "FIRST_HEARTBEAT_PENDING",
    "Node",
    "RuntimeInfo",
    "RuntimeState",
    "SpentState",
    "evolve",
    "fold",
    "initial",
]


def initial() -> RuntimeState:
    """The state before any event: no runtime, no nodes, term 0."""
    return RuntimeState(Model(EVOLVE, current_rules()))


def fold(state: RuntimeState, events: Iterable[object]) -> RuntimeState:
    """Apply ``events`` in order; ``state`` is spent afterwards (see ``shir.core.kernel``)."""
    m = state.model()
    settled = m.settled
    apply(m, events)
    if settled is not None:
        m.settled = None
        if settled[0] is events:
            # the events ``decide`` just returned, applied on its scratch model too: its
            # caches hold for this model now (see ``decide``)
            s = settled[1]
            m.rule_due, m.dirty, m.due, m.status_memo = s.rule_due, s.dirty, s.due, s.status_memo
    m.gen += 1
    return RuntimeState(m)


def evolve(state: RuntimeState, event: object) -> RuntimeState:
    """Apply one event; ``state`` is spent afterwards."""
    return fold(state, (event,))
