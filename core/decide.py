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
    JOB_EVENTS,
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
DISPATCH_TRIGGERS = {**lifecycle.DISPATCH_TRIGGERS, **leasing.DISPATCH_TRIGGERS}


def current_rules() -> tuple[TimedRule, ...]:
    """``RULES`` as they are now (a test may patch them): the rules a new state settles."""
    return RULES


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
    m.scratched = None
    try:
        events = tuple(handler(m, command, _DECIDER))
    finally:
        if m.pending:  # decision-scoped: empty again once the decision is over
            m.pending.clear()
    s = m.scratched
    if s is not None:
        m.scratched = None
        # The scratch model has had exactly these events applied, and its caches (rule due
        # times, status memo) are up to date with them: folding them may adopt its caches
        # instead of settling the same rules again. Not with job events, which a scratch
        # model only notes (``emit``).
        if events and not any(type(e) in JOB_EVENTS for e in events):
            m.settled = (events, s)
    return events


def settle(s: Model, at: float, out: Events) -> None:
    """Emit what the timed rules find due at ``at``, in order, on the scratch model ``s``.

    A rule runs only when its due time has come or a fact it reads changed since it last found
    nothing (``TimedRule.reads``); any other rule would find nothing.
    """
    if s.runtime is None:
        return
    dues = s.rule_due
    for i, rule in enumerate(s.rules):
        bit = 1 << i
        if not s.dirty & bit and dues[i] > at:
            continue
        events, nxt = rule.due(s, at)
        if events:
            for e in events:
                emit(s, out, e)
            s.dirty |= bit  # what it emitted changes what it reads: look again next time
            s.due = None
        else:
            dues[i] = NEVER if nxt is None else nxt
            s.dirty &= ~bit


def timed(m: Model, at: float, *, jobs_only: bool = False) -> tuple[Model, Events]:
    """Start a decision at ``at``: check the clock, settle what is due on a scratch model.

    ``jobs_only`` decisions emit job events only, which never touch the scratch model: when
    nothing is due they get the model itself instead of cloned node records (the common case,
    and the one that must stay cheap; ``decide`` empties ``pending`` when it is over).
    """
    check_time(m, at)
    out: Events = []
    due = m.due
    if (due is not None and at < due) or not _due(m, at):
        if jobs_only:
            return m, out
        s = m.scratched = m.scratch()
        return s, out
    s = m.scratched = m.scratch()
    settle(s, at, out)
    return s, out


class _Composed:
    """The :class:`~shir.core.kernel.Decider` every handler gets: this module's functions."""

    timed = staticmethod(timed)
    settle = staticmethod(settle)


_DECIDER = _Composed()


# --- deadlines -------------------------------------------------------------------------------

def next_deadline(state: RuntimeState) -> float | None:
    """When the next timeout falls due: send ``Tick(at=deadline)`` then. None if nothing waits."""
    m = state.model()
    if m.runtime is None:
        return None
    for i in m.job_rules:  # job events only lowered their bounds: make them exact
        m.dirty |= 1 << i
    due = _refresh(m, m.now)
    return None if due == NEVER else due


def _refresh(m: Model, at: float) -> float:
    """Bring the rules' due times up to date as far as ``at``; return the earliest.

    A dirty rule, or one whose (lower-bound) due time is at or before ``at``, is asked again
    at ``m.now`` (a rule that finds something due then is due at ``m.now``). Only caches change
    (``rule_due``, ``dirty``, ``due``): the model means the same.
    """
    dues = m.rule_due
    dirty = m.dirty
    for i, rule in enumerate(m.rules):
        if dirty & 1 << i or dues[i] <= at:
            events, nxt = rule.due(m, m.now)
            if events:
                dues[i] = m.now
            else:
                dues[i] = NEVER if nxt is None else nxt
                dirty &= ~(1 << i)
    m.dirty = dirty
    due = min(dues, default=NEVER)
    m.due = None if dirty else due
    return due


def _due(m: Model, at: float) -> bool:
    """Is any rule due at ``at``? (If not, settling would find nothing to do.) ``timed``
    first compares ``at`` with ``m.due``, which answers most decisions."""
    return m.runtime is not None and _refresh(m, at) <= at


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
    wanted = state is None  # without the state, no dispatch hint at all: stop looking
    for e in events:
        t = type(e)
        f = table.get(t)
        if f is not None:
            out.extend(f(e))
        if not wanted and t in triggers:
            test = triggers[t]
            wanted = test is None or test(state.model(), e)  # type: ignore[union-attr]
    if wanted and state is not None:
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
