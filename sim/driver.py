"""The host loop around the core, shared by the simulator and the property-test machine.

A driver does what a real host does with the pure core and nothing more: decide, append the events
to the event store under optimistic concurrency, fold them, and hand back the effects. When an
append's outcome is unknown (the store may or may not have taken it), it re-reads the stream and
folds whatever landed, so the state never drifts from the log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shir.core import decide, effects_of, fold, initial, next_deadline
from shir.core.state import RuntimeState
from shir.core.store import AppendOutcomeUnknown, EventStore, InMemoryEventStore

__all__ = ["AppendOutcomeUnknown", "Driver"]


Listener = Callable[[Sequence[object]], None]


class Driver:
    """Drive one runtime's core against an event store."""

    def __init__(self, store: EventStore | None = None, stream: str = "runtime",
                 listeners: Sequence[Listener] = ()) -> None:
        self.store: EventStore = store if store is not None else InMemoryEventStore()
        self.stream = stream
        self.listeners = list(listeners)
        self.version = 0
        self.state: RuntimeState = initial()
        self.recoveries = 0  # appends whose outcome had to be re-read
        self._catch_up()

    def _catch_up(self) -> list[object]:
        tail = self.store.read(self.stream, self.version)
        if tail:
            self.state = fold(self.state, tail)
            self.version += len(tail)
            for listener in self.listeners:
                listener(tail)
        return tail

    def handle(self, command: object) -> tuple[object, ...]:
        """Decide ``command``, store and fold its events; return the effects to carry out.

        Raises the core's ``DomainError`` when the command is refused, and
        :class:`AppendOutcomeUnknown` when the store may have lost the events and a re-read
        shows it did: nothing was stored either way, and the caller may retry.
        """
        events = decide(self.state, command)
        if not events:
            return ()
        try:
            self.version = self.store.append(self.stream, events, self.version)
        except AppendOutcomeUnknown:
            # Re-read: the events either landed (fold them from the log) or did not (decide
            # again next time). Effects follow from what is in the log, never from a guess.
            self.recoveries += 1
            landed = self._catch_up()
            if not landed:
                raise
            return effects_of(landed)
        self.state = fold(self.state, events)
        for listener in self.listeners:
            listener(events)
        return effects_of(events)

    def deadline(self) -> float | None:
        """When the core next needs a ``Tick``."""
        return next_deadline(self.state)
