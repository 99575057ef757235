"""The event store port, and an in-memory implementation.

A *stream* is the ordered list of events of one aggregate (one runtime). Its *version* is the
number of events in it, so an empty stream is at version 0 and the first event is number 1.
Appends are optimistic: the writer says which version it last saw and the store refuses the
append with :class:`ConcurrencyConflict` when the stream has moved since, so two writers can never
interleave decisions made on different states.

A :class:`Snapshot` is a state already folded up to some version, serialised by the caller.
Loading the snapshot and folding the events after it must give the same state as folding the
whole stream; the contract tests check that for every store.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from shir.core.errors import ShirError

__all__ = [
    "AppendOutcomeUnknown",
    "ConcurrencyConflict",
    "EventStore",
    "InMemoryEventStore",
    "InvalidStreamName",
    "Snapshot",
    "StoreError",
    "check_append",
    "check_snapshot",
    "check_stream_name",
]


class StoreError(ShirError):
    """The event store could not do what was asked."""


class ConcurrencyConflict(StoreError):
    """The stream moved since the writer read it; re-read, decide again, retry."""

    def __init__(self, stream: str, expected_version: int, actual_version: int) -> None:
        super().__init__(
            f"stream {stream!r} is at version {actual_version}, not {expected_version} as the "
            "writer expected: another writer appended first; re-read the stream, decide again "
            "and retry"
        )
        self.stream = stream
        self.expected_version = expected_version
        self.actual_version = actual_version


class AppendOutcomeUnknown(StoreError):
    """The store did not say whether an append landed (a timeout, a dropped connection).

    The events are in the stream in full or not at all: re-read the stream before deciding
    again (``shir.core.driver.Driver`` does).
    """


class InvalidStreamName(StoreError, ValueError):
    """A stream name that no store accepts."""


_STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_stream_name(stream: str) -> str:
    """Return ``stream`` if it is a valid name; raise :class:`InvalidStreamName` otherwise.

    Names are 1-128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a
    letter or digit, so that every store (a file name, a blob name) can hold them unchanged.
    """
    if not isinstance(stream, str) or not _STREAM_NAME.fullmatch(stream):
        raise InvalidStreamName(
            f"invalid stream name {stream!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return stream


@attrs.frozen
class Snapshot:
    """A state folded up to ``version`` events, serialised by its owner as ``data``."""

    version: int
    data: bytes


@runtime_checkable
class EventStore(Protocol):
    """Where a stream's events are kept. Every implementation passes the store contract tests."""

    def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
        """Append ``events`` atomically if the stream is at ``expected_version``.

        Returns the new version. Raises :class:`ConcurrencyConflict` when the stream is at
        another version; nothing is appended then. Raises :class:`AppendOutcomeUnknown` when
        the store cannot tell whether the append landed.
        """
        ...

    def read(self, stream: str, from_version: int = 0) -> list[object]:
        """The events after ``from_version`` (all of them by default), in order."""
        ...

    def version(self, stream: str) -> int:
        """How many events the stream holds (0 for a stream never written)."""
        ...

    def save_snapshot(self, stream: str, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` as the stream's latest; its version must not exceed the stream's."""
        ...

    def load_snapshot(self, stream: str) -> Snapshot | None:
        """The latest snapshot saved for the stream, if any."""
        ...


def check_append(stream: str, expected_version: int, actual_version: int) -> None:
    """Shared precondition of every store's ``append``."""
    if type(expected_version) is not int or expected_version < 0:
        raise StoreError(
            f"expected_version must be a non-negative int, got {expected_version!r}"
        )
    if expected_version != actual_version:
        raise ConcurrencyConflict(stream, expected_version, actual_version)


def check_snapshot(stream: str, snapshot: Snapshot, actual_version: int) -> None:
    """Shared precondition of every store's ``save_snapshot``."""
    if not 0 <= snapshot.version <= actual_version:
        raise StoreError(
            f"snapshot of {stream!r} at version {snapshot.version} is outside the stream "
            f"(0..{actual_version}): take snapshots only of events already appended"
        )


class InMemoryEventStore:
    """An event store in a dict: for tests, the simulator and embedding without persistence.

    Events are kept as the objects given (they are immutable), so replay costs no decoding.
    """

    def __init__(self) -> None:
        self._streams: dict[str, list[object]] = {}
        self._snapshots: dict[str, Snapshot] = {}

    def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
        log = self._streams.get(stream)
        if log is None:
            check_stream_name(stream)  # names of existing streams were checked already
        check_append(stream, expected_version, 0 if log is None else len(log))
        if log is None:
            log = self._streams[stream] = []
        log.extend(events)
        return len(log)

    def read(self, stream: str, from_version: int = 0) -> list[object]:
        return list(self._streams.get(check_stream_name(stream), ())[from_version:])

    def version(self, stream: str) -> int:
        return len(self._streams.get(check_stream_name(stream), ()))

    def save_snapshot(self, stream: str, snapshot: Snapshot) -> None:
        check_snapshot(stream, snapshot, self.version(stream))
        self._snapshots[stream] = snapshot

    def load_snapshot(self, stream: str) -> Snapshot | None:
        return self._snapshots.get(check_stream_name(stream))
