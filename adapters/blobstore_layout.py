"""How the Blob event store lays a stream out in a container, and its index of the segments.

One container holds, per stream::

    <stream>/events.00000000   append blob: the stream's first events  ("segment" 0)
    <stream>/events.00000001   append blob: the events after segment 0 was sealed
    ...
    <stream>/snapshot          block blob: the latest snapshot

Segments hold the frames of :mod:`shir.adapters.framing` (length, CRC32, codec payload), the
same records as the file store. Each segment's metadata ``shir_base_version`` says how many
events come before it.

Why append blobs, not block blobs with conditional commits: an ``If-Match`` commit of a block
list re-sends the whole list (the cost of an append grows with the stream), two writers
staging blocks before committing can overwrite each other's uncommitted blocks, and an ETag
condition also fails on changes that do not move the version (metadata, sealing). The append
position (:mod:`~shir.adapters.blobstore_append`) is exactly the condition the port needs, at
one request per append.

Why segments: an append blob takes at most 50,000 blocks, one per append, and a runtime
appends at least a heartbeat per node every 10 s (about 35,000 appends a day for four nodes),
so a single blob per stream would be full in under two days. A full segment is sealed, and a
sealed segment never changes, so the base version of the segment after it (its final count
plus its own base) is the same for every writer. A writer takes a segment as sealed only from
an answer known to describe the bytes it indexed (:mod:`~shir.adapters.blobstore_read` says
which answers are): a base computed from any other would skip records.

This module is separate because the read and the append path both keep this index and both
name blobs the same way; it is bookkeeping only, with no request and no SDK.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping

import attrs

from shir.adapters.framing import CHECKPOINT_EVERY, Index

__all__ = [
    "BASE_KEY",
    "DEFAULT_SEGMENT_APPENDS",
    "MAX_APPEND_BYTES",
    "MAX_BLOCKS_PER_BLOB",
    "Segment",
    "Stream",
    "base_of",
    "checkpoint",
    "segment_blob",
    "segment_number",
    "segments_prefix",
    "snapshot_blob",
]

#: The service's limit of blocks (appends) in one append blob.
MAX_BLOCKS_PER_BLOB = 50_000
#: Appends per segment by default: a cold open downloads the last segment, at most this many
#: appends (about 1.5 s on Azurite, measured; a GET spanning 50,000 blocks there failed with
#: HTTP 500 after 90 s), at a cost of about six extra requests per segment.
DEFAULT_SEGMENT_APPENDS = 10_000
#: The largest append: one Append Block, whose limit is 4 MiB on service versions before
#: 2022-11-02 (100 MiB after); the smaller keeps the store correct on every account.
MAX_APPEND_BYTES = 4 * 1024 * 1024
#: The segment metadata that holds how many events come before it.
BASE_KEY = "shir_base_version"
_SEGMENT_NAME = re.compile(r"events\.(\d{8})")


def segment_blob(stream: str, number: int) -> str:
    """The name of segment ``number`` of ``stream``."""
    return f"{stream}/events.{number:08d}"


def segments_prefix(stream: str) -> str:
    """What the names of ``stream``'s segments (and perhaps stray blobs) start with."""
    return f"{stream}/events."


def segment_number(stream: str, blob: str) -> int | None:
    """The segment number that ``blob`` names in ``stream``; None for a stray blob."""
    match = _SEGMENT_NAME.fullmatch(blob[len(stream) + 1 :])
    return None if match is None else int(match.group(1))


def snapshot_blob(stream: str) -> str:
    """The name of ``stream``'s snapshot blob."""
    return f"{stream}/snapshot"


def base_of(metadata: Mapping[str, str] | None) -> int | None:
    """A segment's base version from its blob's metadata; None if missing or not a number."""
    value = (metadata or {}).get(BASE_KEY)
    if value is None or not str(value).isdigit():
        return None
    return int(value)


def checkpoint(index: Index | None, record: int) -> tuple[int, int]:
    """The offset and number of the indexed record at or before ``record``."""
    if index is None or not index.checkpoints:
        return 0, 0
    slot = min(record // CHECKPOINT_EVERY, len(index.checkpoints) - 1)
    return index.checkpoints[slot], slot * CHECKPOINT_EVERY


@attrs.define
class Segment:
    """What the store knows of one segment (mutable: the paths update it as they learn)."""

    number: int
    #: Events in the stream before this segment.
    base: int
    #: False until the blob is known to exist (the next append creates it).
    exists: bool
    #: Set from the service's answer to a download that read the blob to its end, so the
    #: index holds the segment's final records when it is True.
    sealed: bool = False
    #: None until the blob is read (a sealed segment found by listing).
    index: Index | None = None
    #: The blob's ETag when ``index`` covered all of it; None: unknown.
    etag: str | None = None
    #: The blob's creation time, from the first answer that carried it: a blob deleted and
    #: created again keeps its name but not this.
    created: datetime.datetime | None = None

    @classmethod
    def not_created(cls, number: int, base: int) -> Segment:
        """A segment whose blob the next append creates: empty, and indexed as such."""
        return cls(number, base, exists=False, index=Index(0, 0, []))


@attrs.define
class Stream:
    """A stream's segments in order; the last (the tail) is the one appends go to."""

    name: str
    segments: list[Segment]

    def version(self) -> int:
        """How many events the stream holds, as far as the index knows."""
        tail = self.segments[-1]
        assert tail.index is not None
        return tail.base + tail.index.count

    def segment_of(self, version: int) -> int:
        """The first segment holding events after ``version`` (the tail if none does)."""
        for i, seg in enumerate(self.segments[:-1]):
            if version < seg.base + self._count(i):
                return i
        return len(self.segments) - 1

    def _count(self, i: int) -> int:
        seg = self.segments[i]
        if seg.index is not None:
            return seg.index.count
        return self.segments[i + 1].base - seg.base  # listed, not read: the next one says

    def follow_seal(self) -> bool:
        """If the tail is sealed, index the next segment (maybe not created yet) after it.

        Its base is the sealed tail's final count: the same for every writer.
        """
        tail = self.segments[-1]
        if not tail.sealed or tail.index is None:
            return False
        self.segments.append(Segment.not_created(tail.number + 1, tail.base + tail.index.count))
        return True
