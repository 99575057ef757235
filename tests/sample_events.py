"""A tiny test-only aggregate used by the store contract and the codec tests.

Two events registered with the codec under ``test.`` tags (registration is global, and the prefix
lets product code tell test types apart), a fold to a frozen state, and the state's own
serialisation (msgpack) so snapshots can be taken and loaded like a real aggregate's.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import msgpack

from shir.core.codec import event

__all__ = ["CounterAdded", "NoteWritten", "TallyState", "dump_state", "fold", "load_state"]


@event("test.counter_added")
@attrs.frozen
class CounterAdded:
    """The counter grew (or shrank) by ``amount``."""

    amount: int


@event("test.note_written")
@attrs.frozen
class NoteWritten:
    """A note was appended."""

    text: str


@attrs.frozen
class TallyState:
    """What the test aggregate remembers: the running total and every note, in order."""

    total: int = 0
    notes: tuple[str, ...] = ()


def evolve(state: TallyState, evt: object) -> TallyState:
    """Apply one event."""
    if isinstance(evt, CounterAdded):
        return TallyState(state.total + evt.amount, state.notes)
    if isinstance(evt, NoteWritten):
        return TallyState(state.total, (*state.notes, evt.text))
    raise TypeError(f"not a test aggregate event: {evt!r}")


def fold(events: Iterable[object], state: TallyState | None = None) -> TallyState:
    """Fold ``events`` onto ``state`` (the initial state by default)."""
    current = state if state is not None else TallyState()
    for evt in events:
        current = evolve(current, evt)
    return current


def dump_state(state: TallyState) -> bytes:
    """Serialise a state for a snapshot."""
    # Totals are sums of random ints and may leave msgpack's 64-bit range: keep them as text.
    data: bytes = msgpack.packb([str(state.total), list(state.notes)], use_bin_type=True)
    return data


def load_state(data: bytes) -> TallyState:
    """Inverse of :func:`dump_state`."""
    total, notes = msgpack.unpackb(data, raw=False)
    return TallyState(int(total), tuple(notes))
