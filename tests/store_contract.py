"""The behaviour every :class:`~shir.core.store.EventStore` must have.

Subclass :class:`EventStoreContract` once per store (``class TestMyStore(EventStoreContract)``)
and implement :meth:`~EventStoreContract.make_store`; the class itself is not collected because
its name does not start with ``Test``.
"""

from __future__ import annotations

import abc
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_events import CounterAdded, NoteWritten, dump_state, fold, load_state

from shir.core.store import (
    ConcurrencyConflict,
    EventStore,
    InvalidStreamName,
    Snapshot,
    StoreError,
)

__all__ = ["SNAPSHOT_DAMAGE", "EventStoreContract", "damaged_snapshot"]

# Ways to damage a stored snapshot (the file and Blob stores share its framing).
SNAPSHOT_DAMAGE = ["flip", "truncate", "empty", "extend"]


def damaged_snapshot(data: bytes, damage: str) -> bytes:
    """``data`` (a stored snapshot) damaged one of the ways in :data:`SNAPSHOT_DAMAGE`."""
    if damage == "flip":
        return data[:-3] + bytes([data[-3] ^ 0x01]) + data[-2:]
    if damage == "truncate":
        return data[:-4]
    if damage == "empty":
        return b""
    assert damage == "extend", damage
    return data + b"\x00"

sample_events = st.lists(
    st.one_of(
        st.builds(CounterAdded, st.integers(min_value=-(2**63), max_value=2**64 - 1)),
        st.builds(NoteWritten, st.text(max_size=10)),
    ),
    max_size=30,
)


class EventStoreContract(abc.ABC):
    """Abstract contract tests; subclasses provide a fresh, empty store."""

    @abc.abstractmethod
    def make_store(self, tmp_path: Path) -> EventStore:
        """A new empty store keeping whatever it persists under ``tmp_path``."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> EventStore:
        return self.make_store(tmp_path)

    def test_is_an_event_store(self, store: EventStore) -> None:
        assert isinstance(store, EventStore)

    def test_empty_stream_is_version_zero_and_reads_empty(self, store: EventStore) -> None:
        assert store.version("rt-1") == 0
        assert store.read("rt-1") == []
        assert store.load_snapshot("rt-1") is None

    def test_append_returns_new_version(self, store: EventStore) -> None:
        assert store.append("rt-1", [CounterAdded(1), NoteWritten("a")], 0) == 2
        assert store.append("rt-1", [CounterAdded(2)], 2) == 3
        assert store.version("rt-1") == 3
        assert store.read("rt-1") == [CounterAdded(1), NoteWritten("a"), CounterAdded(2)]

    def test_read_from_version(self, store: EventStore) -> None:
        events = [CounterAdded(i) for i in range(5)]
        store.append("rt-1", events, 0)
        for v in range(6):
            assert store.read("rt-1", from_version=v) == events[v:]
        assert store.read("rt-1", from_version=9) == []

    def test_conflict_leaves_stream_unchanged(self, store: EventStore) -> None:
        store.append("rt-1", [CounterAdded(1)], 0)
        for wrong in (0, 2, 7):
            with pytest.raises(ConcurrencyConflict) as info:
                store.append("rt-1", [NoteWritten("lost")], wrong)
            assert (info.value.stream, info.value.expected_version) == ("rt-1", wrong)
            assert info.value.actual_version == 1
            assert "rt-1" in str(info.value)
        assert store.version("rt-1") == 1
        assert store.read("rt-1") == [CounterAdded(1)]

    def test_negative_expected_version_refused(self, store: EventStore) -> None:
        with pytest.raises(StoreError, match="expected_version"):
            store.append("rt-1", [CounterAdded(1)], -1)
        assert store.version("rt-1") == 0

    def test_append_empty_list(self, store: EventStore) -> None:
        assert store.append("rt-1", [], 0) == 0
        store.append("rt-1", [CounterAdded(1)], 0)
        assert store.append("rt-1", [], 1) == 1
        assert store.read("rt-1") == [CounterAdded(1)]
        with pytest.raises(ConcurrencyConflict):
            store.append("rt-1", [], 0)  # the version is checked even for nothing

    def test_streams_are_independent(self, store: EventStore) -> None:
        store.append("a", [CounterAdded(1)], 0)
        store.append("b", [NoteWritten("x"), NoteWritten("y")], 0)
        store.append("a", [CounterAdded(2)], 1)
        assert store.read("a") == [CounterAdded(1), CounterAdded(2)]
        assert store.read("b") == [NoteWritten("x"), NoteWritten("y")]
        store.save_snapshot("a", Snapshot(1, b"a1"))
        assert store.load_snapshot("b") is None

    @pytest.mark.parametrize("name", ["../x", "", "a/b", ".hidden", "a b", "x" * 129])
    def test_invalid_stream_names_refused(self, store: EventStore, name: str) -> None:
        with pytest.raises(InvalidStreamName, match="stream name"):
            store.append(name, [CounterAdded(1)], 0)
        with pytest.raises(InvalidStreamName):
            store.read(name)
        with pytest.raises(InvalidStreamName):
            store.version(name)
        with pytest.raises(InvalidStreamName):
            store.save_snapshot(name, Snapshot(0, b""))
        with pytest.raises(InvalidStreamName):
            store.load_snapshot(name)

    def test_snapshot_round_trip(self, store: EventStore) -> None:
        store.append("rt-1", [CounterAdded(3), NoteWritten("n")], 0)
        store.save_snapshot("rt-1", Snapshot(1, b"state-at-1"))
        assert store.load_snapshot("rt-1") == Snapshot(1, b"state-at-1")
        store.save_snapshot("rt-1", Snapshot(2, b"\x00state-at-2\xff"))
        assert store.load_snapshot("rt-1") == Snapshot(2, b"\x00state-at-2\xff")
        store.save_snapshot("rt-1", Snapshot(0, b""))
        assert store.load_snapshot("rt-1") == Snapshot(0, b"")

    def test_snapshot_beyond_stream_refused(self, store: EventStore) -> None:
        store.append("rt-1", [CounterAdded(3)], 0)
        store.save_snapshot("rt-1", Snapshot(1, b"ok"))
        for bad in (2, -1):
            with pytest.raises(StoreError, match="outside the stream"):
                store.save_snapshot("rt-1", Snapshot(bad, b"too far"))
        assert store.load_snapshot("rt-1") == Snapshot(1, b"ok")

    # One test function, one subclass per store: "differing executors" is the design here, and
    # each example builds its own store, so nothing leaks from one class's run to another's.
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    )
    @given(events=sample_events, data=st.data())
    def test_snapshot_plus_tail_equals_full_replay(
        self, events: list[object], data: st.DataObject
    ) -> None:
        # A fresh store per example: function-scoped fixtures are not reset between examples.
        with tempfile.TemporaryDirectory() as tmp:
            store = self.make_store(Path(tmp))
            version = 0
            # Append in random batches, as a real aggregate would, one decision at a time.
            while version < len(events):
                size = data.draw(st.integers(1, len(events) - version), label="batch")
                version = store.append("rt-1", events[version : version + size], version)
            at = data.draw(st.integers(0, len(events)), label="snapshot at")
            store.save_snapshot("rt-1", Snapshot(at, dump_state(fold(events[:at]))))
            snap = store.load_snapshot("rt-1")
            assert snap is not None
            replayed = fold(store.read("rt-1", from_version=snap.version), load_state(snap.data))
            assert replayed == fold(store.read("rt-1")) == fold(events)
            close = getattr(store, "close", None)
            if close is not None:
                close()
