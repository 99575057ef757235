"""Length- and CRC-framed event records: the byte format the file and Blob event stores share.

Theory of operation
-------------------
A stream's bytes are a sequence of *frames*::

    4 bytes  big-endian payload length
    4 bytes  big-endian CRC32 (zlib.crc32) of the payload
    n bytes  payload = shir.core.codec.encode(event)

:func:`encode_frames` turns a batch of events into the bytes of one append, encoding every event
before anything is written. :func:`scan` walks frames from a known-good position, checking each
length and CRC (and that the last payload decodes), and returns what it indexed plus a
:class:`Damage` describing the first bad frame: ``next_good_offset`` tells a torn tail (nothing
intact follows) from damage in the middle. :func:`read_frames` decodes a run of frames already
indexed. The store decides what a damage means for its medium and which error to raise.

A snapshot is one frame whose payload is the snapshot version (8 bytes, big-endian) followed by
its data (:func:`snapshot_frame`, :func:`parse_snapshot`).

This module does no I/O: a store hands it bytes, or a :class:`FrameReader` over its medium.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Protocol

import attrs

from shir.core.codec import CorruptRecord, decode, encode
from shir.core.store import Snapshot, StoreError

__all__ = [
    "CHECKPOINT_EVERY",
    "HEADER",
    "HEADER_SIZE",
    "MAX_RECORD_BYTES",
    "BytesReader",
    "CorruptSnapshot",
    "Damage",
    "FrameReader",
    "Index",
    "encode_frames",
    "parse_snapshot",
    "read_frames",
    "scan",
    "snapshot_frame",
]

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size
_VERSION = struct.Struct(">Q")
# Larger frames are refused on write and treated as damage on read: a bit flip in a length
# field must not make the scanner read gigabytes.
MAX_RECORD_BYTES = 64 * 1024 * 1024
# Every this many records an index remembers a frame offset, so reading from a snapshot's
# version skips most of the stream instead of walking every header.
CHECKPOINT_EVERY = 256


class CorruptSnapshot(StoreError):
    """The stored snapshot cannot be trusted; the events are intact and can be replayed."""


@attrs.define
class Index:
    """Where the intact records of a stream (or of one part of it) are."""

    count: int
    end: int
    # checkpoints[i] is the byte offset of record number i * CHECKPOINT_EVERY (0-based).
    checkpoints: list[int]


@attrs.frozen
class Damage:
    """The first bad frame a :func:`scan` met."""

    offset: int
    good_records: int
    reason: str
    #: Where an intact, decodable frame starts after the damage; ``None`` for a torn tail.
    next_good_offset: int | None


class FrameReader(Protocol):
    """Random access to a stream's bytes: ``size`` bytes, read with ``get``."""

    size: int

    def get(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at absolute ``offset``."""
        ...


class BytesReader:
    """A :class:`FrameReader` over bytes that start at absolute offset ``base`` of a stream."""

    def __init__(self, data: bytes, base: int = 0) -> None:
        self._data = data
        self._base = base
        self.size = base + len(data)

    def get(self, offset: int, n: int) -> bytes:
        rel = offset - self._base
        return self._data[rel : rel + n]


def encode_frames(events: Sequence[object]) -> tuple[bytes, list[int]]:
    """The frames of ``events`` as one byte string, and each frame's size in bytes.

    Every event is encoded before anything is returned, so a codec error writes nothing.
    """
    parts: list[bytes] = []
    sizes: list[int] = []
    for evt in events:
        payload = encode(evt)
        if len(payload) > MAX_RECORD_BYTES:
            raise StoreError(
                f"event {type(evt).__name__} encodes to {len(payload)} bytes, over the "
                f"{MAX_RECORD_BYTES}-byte record limit: keep large data out of events"
            )
        parts.append(HEADER.pack(len(payload), zlib.crc32(payload)))
        parts.append(payload)
        sizes.append(HEADER_SIZE + len(payload))
    return b"".join(parts), sizes


def frame_problem(reader: FrameReader, offset: int) -> tuple[str | None, bytes, int]:
    """Check the frame at ``offset``: (problem or None, payload, frame end)."""
    remaining = reader.size - offset
    if remaining < HEADER_SIZE:
        return f"short header: {remaining} of {HEADER_SIZE} bytes", b"", 0
    length, crc = HEADER.unpack(reader.get(offset, HEADER_SIZE))
    if length > MAX_RECORD_BYTES:
        return f"implausible length {length}", b"", 0
    if length > remaining - HEADER_SIZE:
        return f"short payload: {remaining - HEADER_SIZE} of {length} bytes", b"", 0
    payload = reader.get(offset + HEADER_SIZE, length)
    if zlib.crc32(payload) != crc:
        return "CRC mismatch", b"", 0
    return None, payload, offset + HEADER_SIZE + length


def codec_refuses(payload: bytes) -> str | None:
    """Why the codec calls ``payload`` malformed, or ``None``."""
    # Only a malformed record counts as damage; an unknown tag or a newer schema version is an
    # intact record written by a newer shir, which read() reports as such.
    try:
        decode(payload)
    except CorruptRecord as exc:
        return f"the codec refuses the payload: {exc}"
    except Exception:
        return None
    return None


def next_good_frame(reader: FrameReader, start: int) -> int | None:
    """The first offset at or after ``start`` where an intact, decodable frame begins."""
    for offset in range(start, reader.size - HEADER_SIZE + 1):
        problem, payload, _ = frame_problem(reader, offset)
        if problem is None and codec_refuses(payload) is None:
            return offset
    return None


def scan(
    reader: FrameReader, offset: int = 0, count: int = 0, checkpoints: Sequence[int] = ()
) -> tuple[Index, Damage | None]:
    """Index the intact frames from ``offset`` (record number ``count``) to the reader's end.

    ``checkpoints`` are those already known for the records before ``count``. Returns the index
    of the intact prefix and the damage after it, if any.
    """
    first = count
    last_start = -1
    last_payload = b""
    marks = list(checkpoints)
    while offset < reader.size:
        problem, payload, end = frame_problem(reader, offset)
        if problem is not None:
            index = Index(count, offset, marks)
            return index, Damage(offset, count, problem, next_good_frame(reader, offset + 1))
        if count % CHECKPOINT_EVERY == 0:
            marks.append(offset)
        last_start, last_payload = offset, payload
        offset = end
        count += 1
    if count > first:
        # A CRC-valid frame the codec refuses cannot come from a torn write, but a record that
        # cannot be read must not be appended after either.
        problem = codec_refuses(last_payload)
        if problem is not None:
            if (count - 1) % CHECKPOINT_EVERY == 0:
                marks.pop()
            index = Index(count - 1, last_start, marks)
            return index, Damage(last_start, count - 1, problem, None)
    return Index(count, offset, marks), None


def read_frames(
    data: bytes, offset: int, number: int
) -> tuple[list[object], tuple[int, int, str] | None]:
    """Decode the frames filling ``data``, which starts at ``offset``, record ``number``.

    Returns the events, and for a bad frame (the bytes changed since they were indexed) its
    offset, record number and what is wrong with it; the events before it are returned.
    """
    unpack_from = HEADER.unpack_from
    crc32 = zlib.crc32
    out: list[object] = []
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < HEADER_SIZE:
            return out, (offset + pos, number, "short header")
        length, crc = unpack_from(data, pos)
        start = pos + HEADER_SIZE
        payload = data[start : start + length]
        if len(payload) != length or crc32(payload) != crc:
            return out, (offset + pos, number, "CRC mismatch")
        try:
            out.append(decode(payload))
        except CorruptRecord as exc:
            return out, (offset + pos, number, str(exc))
        pos = start + length
        number += 1
    return out, None


def snapshot_frame(snapshot: Snapshot) -> bytes:
    """The bytes that store ``snapshot``: one frame of its version and data."""
    if not isinstance(snapshot.data, bytes):
        raise StoreError(
            f"snapshot data must be bytes, got {type(snapshot.data).__name__}: serialise "
            "the state before saving it"
        )
    payload = _VERSION.pack(snapshot.version) + snapshot.data
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def parse_snapshot(where: str, frame: bytes) -> Snapshot:
    """The snapshot in ``frame`` (read from ``where``); :class:`CorruptSnapshot` if damaged."""
    what = (
        "; delete it and replay the stream from the start (the events are the source of truth)"
    )
    if len(frame) < HEADER_SIZE + _VERSION.size:
        raise CorruptSnapshot(f"{where}: snapshot file is truncated ({len(frame)} bytes){what}")
    length, crc = HEADER.unpack_from(frame, 0)
    payload = frame[HEADER_SIZE:]
    if length != len(payload):
        raise CorruptSnapshot(
            f"{where}: snapshot frame says {length} bytes but {len(payload)} follow{what}"
        )
    if zlib.crc32(payload) != crc:
        raise CorruptSnapshot(f"{where}: snapshot CRC mismatch{what}")
    (version,) = _VERSION.unpack_from(payload, 0)
    return Snapshot(version=version, data=payload[_VERSION.size :])
