"""The decider, composed: ``decide(state, command) -> events`` from the concerns' tables.

Theory of operation
-------------------
Five concerns each export their own tables, in Equinox order: ``EVOLVE`` (how their events
change the model), ``DECIDE`` (one handler per command), ``EFFECTS`` and ``ANSWERS`` (what the
events and the accepted commands tell whom) and ``RULES`` (timed rules). This module merges
them, in this order, and nothing else writes into them:

1. ``lifecycle``: the runtime, nodes, sessions, statuses, the dispatcher;
2. ``leasing``: jobs and their leases;
3. ``credentials``: credential versions and their sync;
4. ``sharing``: grants to other data factories, linked runtimes and their jobs;
5. ``proxy``: each node's proxy settings, and the restart a change needs.

The order is the settle order: a decision settles the timed rules one after the other, each
seeing what the ones before it emitted (leases end *after* their node went Offline; a sync is
requested *after* a node's status is known; sharing and proxy have no timed rules). A handler
gets the model and the command, and a :class:`~shir.core.kernel.Decider` (this module's
``timed``/``settle``) to start its decision at its time and settle again after its own events.

``decide`` never changes the state it is given; it works on a scratch copy of the (at most
four) node records. A command that is already satisfied yields no events.
"""

from __future__ import annotations

from collections.abc import Iterable

from shir.core import credentials, leasing, lifecycle, proxy, sharing
from shir.core.effects import DispatchWanted
from shir.core.errors import InvalidCommand
from shir.core.kernel import (
    NEVER,
    Events,
    Model,
    RuntimeState,
    TimedRule,
    check_time,
    emit,
)

__all__ = [
    "ANSWERS",
    "DECIDE",
    "DISPATCH_TRIGGERS",
    "EFFECTS",
    "EVOLVE",
    "RULES",
    "answer",
    "decide",
    "effects_of",
    "next_deadline",
]

# the stated order (see the module docstring)
CONCERNS = (lifecycle, leasing, credentials, sharing, proxy)

DECIDE = {**lifecycle.DECIDE, **leasing.DECIDE, **credentials.DECIDE, **sharing.DECIDE,
          **proxy.DECIDE}
EVOLVE = {**lifecycle.EVOLVE, **leasing.EVOLVE, **credentials.EVOLVE, **sharing.EVOLVE,
          **proxy.EVOLVE}
EFFECTS = {**lifecycle.EFFECTS, **leasing.EFFECTS, **credentials.EFFECTS, **sharing.EFFECTS,
           **proxy.EFFECTS}
ANSWERS = {**lifecycle.ANSWERS, **leasing.ANSWERS}
RULES: tuple[TimedRule, ...] = (
    *lifecycle.RULES, *leasing.RULES, *credentials.RULES, *sharing.RULES, *proxy.RULES,
)
DISPATCH_TRIGGERS = lifecycle.DISPATCH_TRIGGERS | leasing.DISPATCH_TRIGGERS


# --- deciding --------------------------------------------------------------------------------

def decide(state: RuntimeState, command: object) -> tuple[object, ...]:
    """The events ``command`` causes in ``state``; raises a ``DomainError`` to refuse it.

    ``state`` is left unchanged either way.
    """
    handler = DECIDE.get(type(command))
    if handler is None:
        raise InvalidCommand(
            f"{type(command).__name__} is not a command; expected one of "
            + ", ".join(sorted(t.__name__ for t in DECIDE))
        )
    m = state.model()
    try:
        return tuple(handler(m, command, _DECIDER))
    finally:
        if m.pending:  # decision-scoped: empty again once the decision is over
            m.pending.clear()


def settle(s: Model, at: float, out: Events) -> None:
    """Emit what every timed rule finds due at ``at``, in order, on the scratch model ``s``."""
    if s.runtime is None:
        return
    for rule in RULES:
        events, _next = rule.due(s, at)
        for e in events:
            emit(s, out, e)


def timed(m: Model, at: float, *, jobs_only: bool = False) -> tuple[Model, Events]:
    """Start a decision at ``at``: check the clock, settle what is due on a scratch model.

    ``jobs_only`` decisions emit job events only, which never touch the scratch model: when
    nothing is due they get the model itself instead of cloned node records (the common case,
    and the one that must stay cheap; ``decide`` empties ``pending`` when it is over).
    """
    check_time(m, at)
    out: Events = []
    if not _due(m, at):
        return (m if jobs_only else m.scratch()), out
    s = m.scratch()
    settle(s, at, out)
    return s, out


class _Composed:
    """The :class:`~shir.core.kernel.Decider` every handler gets: this module's functions,
    looked up when called (so a test may patch ``RULES``)."""

    @staticmethod
    def timed(m: Model, at: float, *, jobs_only: bool = False) -> tuple[Model, Events]:
        return timed(m, at, jobs_only=jobs_only)

    @staticmethod
    def settle(s: Model, at: float, out: Events) -> None:
        settle(s, at, out)


_DECIDER = _Composed()


# --- deadlines -------------------------------------------------------------------------------

def next_deadline(state: RuntimeState) -> float | None:
    """When the next timeout falls due: send ``Tick(at=deadline)`` then. None if nothing waits."""
    return _deadline(state.model())


def _due_of(rule: TimedRule, m: Model) -> float:
    events, nxt = rule.due(m, m.now)
    if events:  # due now (a rule that only time triggers, such as a sync to re-request)
        return m.now
    return NEVER if nxt is None else nxt


def _deadline(m: Model) -> float | None:
    if m.runtime is None:
        return None
    cached = m.node_due  # the rules job events cannot move, cached until a lifecycle event
    if cached is None or cached <= m.now:
        cached = m.node_due = min(
            (_due_of(r, m) for r in RULES if not r.moved_by_jobs), default=NEVER
        )
    due = min((_due_of(r, m) for r in RULES if r.moved_by_jobs), default=NEVER)
    due = min(due, cached)
    return None if due == NEVER else due


def _due(m: Model, at: float) -> bool:
    """Is any rule due at ``at``? (If not, settling would find nothing to do.)"""
    due = m.due
    if due is not None and at < due:
        return False
    deadline = _deadline(m)
    m.due = NEVER if deadline is None else deadline  # a cache; the meaning is unchanged
    return deadline is not None and deadline <= at


# --- effects and answers ---------------------------------------------------------------------

def effects_of(events: Iterable[object], state: RuntimeState | None = None
               ) -> tuple[object, ...]:
    """The effects the given (stored) events call for, in order.

    With ``state`` (the state after folding ``events``), a ``DispatchWanted`` follows when one
    of the events may let queued work be placed and a dispatcher exists to place it.
    """
    out: list[object] = []
    table = EFFECTS
    triggers = DISPATCH_TRIGGERS
    triggered = False
    for e in events:
        t = type(e)
        f = table.get(t)
        if f is not None:
            out.extend(f(e))
        if t in triggers:
            triggered = True
    if triggered and state is not None:
        m = state.model()
        if m.dispatcher is not None and m.jobs.queues:
            out.append(DispatchWanted(m.dispatcher, m.term))
    return tuple(out)


def answer(command: object, events: tuple[object, ...], state: RuntimeState
           ) -> tuple[object, ...]:
    """What the sender of accepted ``command`` must be told beyond the events' effects.

    ``events`` are the ones it caused (maybe none), ``state`` the state after folding them.
    """
    f = ANSWERS.get(type(command))
    return f(command, events, state) if f is not None else ()
