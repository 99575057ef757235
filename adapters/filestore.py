"""An event store in a directory of append-only files.

Theory of operation
-------------------
Each stream is one file, ``<stream>.events``, holding a sequence of *frames*::

    4 bytes  big-endian payload length
    4 bytes  big-endian CRC32 (zlib.crc32) of the payload
    n bytes  payload = shir.core.codec.encode(event)

The framing, the scanner and the snapshot format live in :mod:`shir.adapters.framing`, shared with
the Blob store.

An append encodes every event first (a codec error writes nothing), then writes all the frames
with a single ``write`` and, unless ``fsync=False``, an ``fdatasync`` before returning: once
``append`` returns, the events are on disk. A crash or a full disk during that write can leave a
*torn tail*: a partial frame at the end of the file. The first access to a stream scans it,
checking every frame's length and CRC (and that the last payload decodes), and indexes the record
count and end offset; the expected-version check of later appends uses that index.

Damage is never repaired silently:

- a bad frame with nothing valid after it is a torn tail: every operation on the stream raises
  :class:`TornTail` (file, byte offset, bytes that follow) until ``store.repair(stream)``
  truncates the file at the last good record;
- a bad frame with intact frames after it is :class:`CorruptStream`: the damage is not the
  unacknowledged end of an append, and ``repair`` refuses to drop good records.

Known limit: the frames of one append carry no batch marker, so a crash in the middle of a
multi-event append can leave its first events intact and only the last one torn; after
``repair`` those first events stay in the stream.

Snapshots live in ``<stream>.snapshot``: one frame whose payload is the snapshot version
(8 bytes, big-endian) followed by its data, replaced atomically (temporary file in the same
directory, fsync, ``os.replace``, fsync of the directory).

Single writer: the index lives in this process, so only one process may have a directory open.
The constructor takes an exclusive ``flock`` on ``<directory>/.lock`` and refuses with
:class:`StoreLocked` when another store holds it (another process, or another store object in
this one); ``close()`` releases it. Within a process the store serialises its own calls with a
lock, so threads may share one instance.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import threading
from collections.abc import Sequence

import attrs

from shir.adapters.closing import CloseOnExit
from shir.adapters.framing import (
    CHECKPOINT_EVERY,
    HEADER,
    HEADER_SIZE,
    CorruptSnapshot,
    Damage,
    Index,
    encode_frames,
    parse_snapshot,
    read_frames,
    scan,
    snapshot_frame,
)
from shir.adapters.framing import MAX_RECORD_BYTES as MAX_RECORD_BYTES  # public here too
from shir.core.store import (
    Snapshot,
    StoreError,
    check_append,
    check_snapshot,
    check_stream_name,
)

__all__ = [
    "CorruptSnapshot",
    "CorruptStream",
    "FileEventStore",
    "RepairReport",
    "StoreLocked",
    "TornTail",
    "read_stream_file",
]

_CHUNK = 1024 * 1024
_fdatasync = getattr(os, "fdatasync", os.fsync)


class TornTail(StoreError):
    """The stream file ends in an incomplete or unreadable record; ``repair`` truncates it."""

    def __init__(
        self, stream: str, path: str, offset: int, trailing_bytes: int, good_records: int,
        reason: str,
    ) -> None:
        super().__init__(
            f"{path}: torn tail at byte offset {offset}: {trailing_bytes} byte(s) forming one "
            f"incomplete record ({reason}) follow the last good record (#{good_records}); an "
            "append was cut short (crash or full disk). Call "
            f"store.repair({stream!r}) to truncate the file at offset {offset} (from a shell: "
            f"truncate -s {offset} {shlex.quote(path)}; copy the file first to keep the tail)"
        )
        self.stream = stream
        self.path = path
        self.offset = offset
        self.trailing_bytes = trailing_bytes
        self.good_records = good_records
        self.reason = reason


class CorruptStream(StoreError):
    """A record inside the stream is damaged while later records are intact."""

    def __init__(
        self, stream: str, path: str, offset: int, good_records: int, reason: str,
        next_good_offset: int | None,
    ) -> None:
        after = (
            f"intact records follow at byte offset {next_good_offset}, so this is not a torn "
            "tail and store.repair() refuses to drop them"
            if next_good_offset is not None
            else "the file changed after it was scanned"
        )
        super().__init__(
            f"{path}: record #{good_records + 1} at byte offset {offset} is damaged ({reason}); "
            f"{after}. Restore the file from a backup, or inspect and fix it by hand"
        )
        self.stream = stream
        self.path = path
        self.offset = offset
        self.good_records = good_records
        self.reason = reason
        self.next_good_offset = next_good_offset


class StoreLocked(StoreError):
    """Another store already has the directory open for writing."""


@attrs.frozen
class RepairReport:
    """What :meth:`FileEventStore.repair` did to a stream file."""

    stream: str
    path: str
    #: Records kept (the stream's version after the repair).
    records_kept: int
    #: Byte offset the file was truncated at (its new size).
    truncated_at: int
    #: Bytes cut from the end; 0 when the stream was already sound.
    bytes_removed: int
    #: Why the tail was bad, or ``None`` when nothing was cut.
    reason: str | None
    #: True when a snapshot beyond the kept records was deleted with the tail.
    snapshot_removed: bool = False


class _Reader:
    """Random access to a file through a window of ``_CHUNK`` bytes (frames rarely straddle)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size
        self._start = 0
        self._buf = b""

    def get(self, offset: int, n: int) -> bytes:
        rel = offset - self._start
        if rel < 0 or rel + n > len(self._buf):
            self._start = offset
            self._buf = _pread_all(self._fd, min(max(n, _CHUNK), self.size - offset), offset)
            rel = 0
        return self._buf[rel : rel + n]


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        part = os.pread(fd, n, offset)
        if not part:
            break
        parts.append(part)
        n -= len(part)
        offset += len(part)
    return b"".join(parts)


class FileEventStore(CloseOnExit):
    """The :class:`~shir.core.store.EventStore` port on a local directory; see the module doc.

    ``fsync=False`` skips the flushes to disk: appends then survive a process crash but not a
    power loss or kernel crash. For tests and throwaway simulations.
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._dir = os.fspath(directory)
        self._fsync = fsync
        self._mutex = threading.Lock()
        self._index: dict[str, Index] = {}
        os.makedirs(self._dir, exist_ok=True)
        self._lock_fd: int | None = self._acquire_lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def _acquire_lock(self) -> int:
        path = os.path.join(self._dir, ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _pread_all(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StoreLocked(
                f"{self._dir} is already open for writing by another FileEventStore (pid "
                f"{holder}); a directory has a single writer: close() the other store or stop "
                "that process first"
            ) from None
        # The pid is only a hint for the message above; the flock is what excludes.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def close(self) -> None:
        """Release the directory lock. Safe to call twice; the store is unusable after."""
        with self._mutex:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor drops the flock
                self._lock_fd = None
                self._index.clear()

    def __del__(self) -> None:
        # Best effort: a forgotten store must not keep its directory locked forever.
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- paths and index ---------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The directory holding the stream files."""
        return self._dir

    def path_of(self, stream: str) -> str:
        """The file holding ``stream``'s events."""
        return os.path.join(self._dir, check_stream_name(stream) + ".events")

    def _snapshot_path(self, stream: str) -> str:
        return os.path.join(self._dir, stream + ".snapshot")

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise StoreError(f"the FileEventStore on {self._dir} is closed; open a new one")

    def _load_index(self, stream: str) -> Index:
        """The stream's index, scanning the file on first access; raises on damage."""
        self._check_open()
        index = self._index.get(stream)
        if index is not None:
            return index
        path = self.path_of(stream)
        index, damage = self._scan(path)
        if damage is not None:
            raise self._damage_error(stream, path, damage)
        self._index[stream] = index
        return index

    @staticmethod
    def _scan(path: str) -> tuple[Index, Damage | None]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return Index(0, 0, []), None
        try:
            return scan(_Reader(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)

    @staticmethod
    def _damage_error(stream: str, path: str, damage: Damage) -> StoreError:
        if damage.next_good_offset is not None:
            return CorruptStream(
                stream, path, damage.offset, damage.good_records, damage.reason,
                damage.next_good_offset,
            )
        size = os.stat(path).st_size
        return TornTail(
            stream, path, damage.offset, size - damage.offset, damage.good_records,
            damage.reason,
        )

    def _sync_dir(self) -> None:
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the EventStore port -----------------------------------------------------------------

    def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
        """Append ``events`` if the stream is at ``expected_version``; return the new version.

        The version check uses this process's index (single writer, see the module doc).
        """
        with self._mutex:
            index = self._load_index(stream)
            check_append(stream, expected_version, index.count)
            if not events:
                return index.count
            data, sizes = encode_frames(events)  # codec errors surface before any write
            path = self.path_of(stream)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size != index.end:
                    del self._index[stream]
                    raise StoreError(
                        f"{path} is {size} bytes but this store indexed {index.end}: another "
                        "program wrote to it; reopen the store to rescan it"
                    )
                self._write_frames(fd, stream, data, index.end)
            finally:
                os.close(fd)
            if index.end == 0 and self._fsync:
                self._sync_dir()  # make the new file's directory entry durable too
            base = index.count
            offset = index.end
            for i, size in enumerate(sizes):
                if (base + i) % CHECKPOINT_EVERY == 0:
                    index.checkpoints.append(offset)
                offset += size
            index.count += len(events)
            index.end = offset
            return index.count

    def _write_frames(self, fd: int, stream: str, data: bytes, end: int) -> None:
        try:
            written = os.pwrite(fd, data, end)
            while written < len(data):  # a short write (signal, quota): finish it
                written += os.pwrite(fd, data[written:], end + written)
            if self._fsync:
                _fdatasync(fd)
        except OSError:
            # Undo the partial append so the in-process view stays all-or-nothing; if even
            # that fails, forget the index so the next access rescans and reports the tail.
            try:
                os.ftruncate(fd, end)
            except OSError:
                self._index.pop(stream, None)
            raise

    def read(self, stream: str, from_version: int = 0) -> list[object]:
        """The events after ``from_version``, decoded, checking each record's CRC."""
        if type(from_version) is not int or from_version < 0:
            raise StoreError(f"from_version must be a non-negative int, got {from_version!r}")
        with self._mutex:
            index = self._load_index(stream)
            if from_version >= index.count:
                return []
            path = self.path_of(stream)
            fd = os.open(path, os.O_RDONLY)
            try:
                return self._read_from(fd, stream, path, index, from_version)
            finally:
                os.close(fd)

    def _read_from(
        self, fd: int, stream: str, path: str, index: Index, from_version: int
    ) -> list[object]:
        slot = from_version // CHECKPOINT_EVERY
        number = slot * CHECKPOINT_EVERY
        offset = index.checkpoints[slot]
        # Walk headers only up to the first wanted record, then read the rest in one go.
        while number < from_version:
            (length, _) = HEADER.unpack(_pread_all(fd, HEADER_SIZE, offset))
            offset += HEADER_SIZE + length
            number += 1
        data = _pread_all(fd, index.end - offset, offset)
        out, bad = read_frames(data, offset, number)
        if bad is not None:
            raise self._changed(stream, path, *bad)
        return out

    def _changed(
        self, stream: str, path: str, offset: int, number: int, reason: str
    ) -> CorruptStream:
        self._index.pop(stream, None)  # rescan on next access
        return CorruptStream(stream, path, offset, number, reason, None)

    def version(self, stream: str) -> int:
        """How many events the stream holds (scanning it on first access)."""
        with self._mutex:
            return self._load_index(stream).count

    def save_snapshot(self, stream: str, snapshot: Snapshot) -> None:
        """Replace the stream's snapshot atomically."""
        with self._mutex:
            check_snapshot(stream, snapshot, self._load_index(stream).count)
            frame = snapshot_frame(snapshot)
            path = self._snapshot_path(stream)
            tmp = os.path.join(self._dir, f".{stream}.snapshot.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, frame)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self._fsync:
                self._sync_dir()

    def load_snapshot(self, stream: str) -> Snapshot | None:
        """The stream's snapshot, or ``None``; :class:`CorruptSnapshot` if it is damaged."""
        with self._mutex:
            self._check_open()
            path = self._snapshot_path(check_stream_name(stream))
            try:
                with open(path, "rb") as f:
                    frame = f.read()
            except FileNotFoundError:
                return None
            snapshot = parse_snapshot(path, frame)
            count = self._load_index(stream).count
            if snapshot.version > count:
                raise CorruptSnapshot(
                    f"{path}: snapshot at version {snapshot.version} is beyond the stream's "
                    f"{count} events (was the stream truncated?); delete the snapshot file and "
                    "replay the stream from the start"
                )
            return snapshot

    # -- repair ------------------------------------------------------------------------------

    def repair(self, stream: str) -> RepairReport:
        """Truncate a torn tail at the last good record and report what was cut.

        A sound stream is left alone (``bytes_removed == 0``). Damage followed by intact
        records raises :class:`CorruptStream`: repair never drops good records. A snapshot
        beyond the records kept is deleted too, as it would describe events that are gone.
        """
        with self._mutex:
            self._check_open()
            path = self.path_of(stream)
            self._index.pop(stream, None)
            index, damage = self._scan(path)
            if damage is None:
                self._index[stream] = index
                return RepairReport(stream, path, index.count, index.end, 0, None)
            if damage.next_good_offset is not None:
                raise self._damage_error(stream, path, damage)
            fd = os.open(path, os.O_WRONLY)
            try:
                size = os.fstat(fd).st_size
                os.ftruncate(fd, damage.offset)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            snapshot_removed = self._drop_snapshot_beyond(stream, index.count)
            self._index[stream] = index
            return RepairReport(
                stream, path, index.count, damage.offset, size - damage.offset, damage.reason,
                snapshot_removed,
            )

    def _drop_snapshot_beyond(self, stream: str, count: int) -> bool:
        path = self._snapshot_path(stream)
        try:
            with open(path, "rb") as f:
                frame = f.read()
        except FileNotFoundError:
            return False
        try:
            beyond = parse_snapshot(path, frame).version > count
        except CorruptSnapshot:
            return False  # not ours to judge here; load_snapshot reports it
        if beyond:
            os.remove(path)
            if self._fsync:
                self._sync_dir()
        return beyond


def read_stream_file(path: str | os.PathLike[str]) -> list[object]:
    """Every event in one stream file, read without opening a store: no lock, no writes.

    For inspecting a log (``shir sim replay``), even one in a folder a running store holds or
    one the reader may not write. Raises :class:`TornTail` / :class:`CorruptStream` on damage,
    as the store would.
    """
    path = os.fspath(path)
    stream = check_stream_name(os.path.basename(path).removesuffix(".events"))
    index, damage = FileEventStore._scan(path)
    if damage is not None:
        raise FileEventStore._damage_error(stream, path, damage)
    fd = os.open(path, os.O_RDONLY)
    try:
        out, bad = read_frames(_pread_all(fd, index.end, 0), 0, 0)
    finally:
        os.close(fd)
    if bad is not None:
        offset, number, reason = bad
        raise CorruptStream(stream, path, offset, number, reason, None)
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
