"""The host loop around the core: the one loop every host shares.

The simulator, the property-test machine and the node host all drive the core the same way:
read the stream's tail, fold it, decide, append the events under the expected version, fold
them, and carry out the effects. The store's conditional append is the linearization point:

- ``ConcurrencyConflict`` (another writer appended first): re-read the tail and decide again on
  the newer state, up to ``max_conflict_retries`` times; a command that the newer state already
  satisfies yields no events, and one it now refuses raises the core's ``DomainError``. The
  other writer's events may be stamped later than the command (its clock runs ahead): the
  command is then decided again at the log's time, ``max(command.at, state.now)``, since the
  core refuses time going backwards and the command lost the race, it did not come earlier.
- ``AppendOutcomeUnknown`` (the store cannot say whether it took the append): re-read; if the
  events landed, their effects follow from the log; if not, nothing was stored and the error is
  raised so the caller may retry.

Effects are always computed from events that are in the log, never from a guess: ``handle``
returns the events' effects (``effects_of``) and the answer to the command's sender
(``answer``). A command refused because its sender is fenced or stale raises a
:class:`~shir.core.errors.Fenced` error whose ``reply`` the host sends back to the sender.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from shir.core.decide import answer, decide, effects_of, next_deadline
from shir.core.errors import DomainError
from shir.core.state import RuntimeState, fold, initial
from shir.core.store import (
    AppendOutcomeUnknown,
    ConcurrencyConflict,
    EventStore,
    InMemoryEventStore,
)

__all__ = ["AppendOutcomeUnknown", "ConcurrencyConflict", "Driver"]


Listener = Callable[[Sequence[object]], None]


class Driver:
    """Drive one runtime's core against an event store.

    ``listeners`` see every batch of events this driver folds, its own and other writers'.
    """

    def __init__(self, store: EventStore | None = None, stream: str = "runtime",
                 listeners: Sequence[Listener] = (), max_conflict_retries: int = 8) -> None:
        self.store: EventStore = store if store is not None else InMemoryEventStore()
        self.stream = stream
        self.listeners = list(listeners)
        self.max_conflict_retries = max_conflict_retries
        self.version = 0
        self.state: RuntimeState = initial()
        self.recoveries = 0  # appends whose outcome had to be re-read
        self.conflicts = 0  # appends that lost to another writer and were decided again
        self.catch_up()

    def catch_up(self) -> list[object]:
        """Fold the events other writers appended since this driver last looked; return them."""
        tail = self.store.read(self.stream, self.version)
        if tail:
            self.state = fold(self.state, tail)
            self.version += len(tail)
            for listener in self.listeners:
                listener(tail)
        return tail

    def handle(self, command: object) -> tuple[object, ...]:
        """Decide ``command``, store and fold its events; return the effects to carry out.

        The effects are those of the stored events and the answer to the command's sender;
        each names its recipient (``effect.to``).

        Raises the core's ``DomainError`` when the command is refused (also when it is refused
        only after a conflict showed a newer state; a :class:`~shir.core.errors.Fenced` one
        carries the ``reply`` to send), :class:`ConcurrencyConflict` when other writers kept
        winning ``max_conflict_retries`` times in a row, and :class:`AppendOutcomeUnknown` when
        the store may have lost the events and a re-read shows it did: nothing was stored either
        way, and the caller may retry.
        """
        # One command is the common case (every message a host receives): the same steps as
        # ``handle_all``, without its per-command bookkeeping.
        for attempt in range(self.max_conflict_retries + 1):
            if attempt:
                command = _restamped(command, self.state.now)
            events = decide(self.state, command)
            if events:
                try:
                    landed = self._store(events, self.state, events, attempt)
                except _DecideAgain:
                    continue
                if landed is not None:
                    events = landed
            state = self.state
            return effects_of(events, state) + answer(command, events, state)
        raise AssertionError("unreachable")  # pragma: no cover

    def handle_all(self, commands: Sequence[object]) -> list[tuple[object, ...] | DomainError]:
        """Decide ``commands`` in order and store all their events in one append.

        Group commit: a host with several commands at hand (a dispatcher with a batch of job
        requests) pays for one durable append instead of one each. Each command is decided on
        the state its predecessors leave; one the core refuses adds no events and gets its
        ``DomainError`` in its place of the result, so it holds none of the others back. A
        conflict decides them all again on the newer state. Returns, per command, what
        :meth:`handle` would return for it (its effects and answer) or its error; the store's
        errors are raised as by :meth:`handle`.
        """
        return self._handle(tuple(commands))

    def _handle(self, commands: tuple[object, ...]) -> list[tuple[object, ...] | DomainError]:
        for attempt in range(self.max_conflict_retries + 1):
            if attempt:
                commands = tuple(_restamped(c, self.state.now) for c in commands)
            state = self.state  # folding spends a state: a copy once a later command needs it
            copied = False
            events: list[object] = []
            pending: tuple[object, ...] = ()  # events not yet folded into ``state``
            decided: list[tuple[object, ...] | DomainError] = []
            for command in commands:
                if pending:
                    if not copied:
                        state, copied = state.copy(), True
                    state = fold(state, pending)
                try:
                    pending = tuple(decide(state, command))
                except DomainError as exc:
                    decided.append(exc)
                    pending = ()
                    continue
                events.extend(pending)
                decided.append(pending)
            if events:
                try:
                    landed = self._store(events, state, pending, attempt)
                except _DecideAgain:
                    continue
                if landed is not None and len(commands) == 1 and (
                    not isinstance(decided[0], DomainError)
                ):
                    decided = [landed]
            return [
                d if isinstance(d, DomainError)
                else effects_of(d, self.state) + answer(c, d, self.state)
                for c, d in zip(commands, decided, strict=True)
            ]
        raise AssertionError("unreachable")  # pragma: no cover

    def _store(self, events: Sequence[object], state: RuntimeState, tail: tuple[object, ...],
               attempt: int) -> tuple[object, ...] | None:
        """Append ``events`` (decided on ``state`` plus ``tail``) and fold them.

        Returns None when they were stored as decided, and the events read back when the
        store could not say and a re-read shows they landed. Raises ``_DecideAgain`` when
        another writer went first (this driver caught up with it).
        """
        try:
            self.version = self.store.append(self.stream, events, self.version)
        except ConcurrencyConflict:
            self.conflicts += 1
            self.catch_up()
            if attempt == self.max_conflict_retries:
                raise
            raise _DecideAgain from None
        except AppendOutcomeUnknown:
            # Re-read: the events either landed (fold them from the log) or did not (decide
            # again next time). Effects follow from what is in the log, never from a guess.
            self.recoveries += 1
            landed = tuple(self.catch_up())
            if not landed:
                raise
            return landed
        self.state = fold(state, tail)
        for listener in self.listeners:
            listener(events)
        return None

    def deadline(self) -> float | None:
        """When the core next needs a ``Tick``."""
        return next_deadline(self.state)


class _DecideAgain(Exception):
    """Another writer appended first: decide again on the newer state."""


def _restamped(command: object, now: float) -> object:
    """``command`` at ``now`` if the log has moved past its time (see the module docstring)."""
    at = getattr(command, "at", None)
    if isinstance(at, (int, float)) and at < now:
        return attrs.evolve(command, at=now)  # type: ignore[misc]
    return command
