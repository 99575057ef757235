"""The Blob event store's read path: listing a stream's segments, indexing and decoding them.

Index and reads: per stream and segment the store keeps, in memory, the record count, the end
offset, the offset of every 256th record and, when it has one, an ETag known to match that end
(from its own append's answer or a HEAD). ``version`` asks for the bytes after the indexed end:
with ``If-None-Match: <ETag>`` when it holds such an ETag (a 304 when nothing changed), else a
ranged GET that brings nothing back; either is one request. ``read(v)`` downloads from the
checkpoint at or before ``v``, never the stream before it, and indexes whatever other writers
appended. Opening a stream lists its segments and reads only the last one; earlier segments are
downloaded when a read needs them.

Which answers describe the bytes: a segment is taken as sealed (and the next segment's base
computed from it, :meth:`~shir.adapters.blobstore_layout.Stream.follow_seal`) only from an
answer known to describe the bytes indexed, a HEAD that finds nothing after them. Azurite
builds a download's ETag and sealed flag after reading its body, so they can be newer than the
bytes, and a base computed from such an answer would skip records (seen in the racing tests).

Damage is never skipped: a record whose length or CRC is wrong, or whose payload the codec
refuses, raises :class:`TornBlobTail` (nothing intact after it) or :class:`CorruptBlobStream`
(intact records after it, or the blob changed under an index) on every access until fixed by
hand. Append Block is atomic, so neither comes from a crash of a shir writer; append blobs
cannot be truncated, so there is no ``repair``. A segment deleted (or deleted and created
again, told by its creation time, which has a resolution of one second) under an index raises
:class:`CorruptBlobStream` once, and the next call reads the stream afresh.

This module is separate because it is the one place that decides what the store believes about
a segment's bytes; the append path only asks it to :meth:`SegmentReader.sync` a stream.
"""

from __future__ import annotations

from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import AzureError, HttpResponseError
from azure.storage.blob import BlobProperties, BlobType

from shir.adapters.blobstore_layout import (
    BASE_KEY,
    Segment,
    Stream,
    base_of,
    checkpoint,
    segment_blob,
    segment_number,
    segments_prefix,
)
from shir.adapters.blobstore_service import BlobContainer, BlobServiceError, error_code, status_of
from shir.adapters.framing import (
    HEADER,
    HEADER_SIZE,
    BytesReader,
    Damage,
    Index,
    read_frames,
    scan,
)
from shir.core.store import StoreError, check_stream_name

__all__ = ["CorruptBlobStream", "SegmentReader", "TornBlobTail"]


class TornBlobTail(StoreError):
    """A segment ends in bytes that do not form a whole record."""

    def __init__(
        self, stream: str, blob: str, offset: int, trailing_bytes: int, good_records: int,
        reason: str,
    ) -> None:
        super().__init__(
            f"{blob}: torn tail at byte offset {offset}: {trailing_bytes} byte(s) that do not "
            f"form a whole record ({reason}) follow event #{good_records} of stream {stream!r}. "
            "shir appends whole records in one atomic Append Block, so another program wrote "
            "them. An append blob cannot be truncated: stop the writers and rewrite the blob "
            f"with only its first {offset} bytes (same metadata), or restore it from a backup"
        )
        self.stream = stream
        self.blob = blob
        self.offset = offset
        self.trailing_bytes = trailing_bytes
        self.good_records = good_records
        self.reason = reason


class CorruptBlobStream(StoreError):
    """A stream's blobs are damaged or inconsistent, and not only at the tail."""

    def __init__(self, stream: str, blob: str, detail: str) -> None:
        super().__init__(
            f"{blob}: {detail}. Restore stream {stream!r} from a backup, or inspect and fix "
            "its blobs by hand"
        )
        self.stream = stream
        self.blob = blob
        self.detail = detail


_GONE = (
    "the blob is gone although this store saw it: the stream was deleted behind the store's back"
)


class SegmentReader:
    """The store's index of its streams, brought up to date by reading their segments.

    Not thread-safe: the store calls it under its lock.
    """

    def __init__(self, container: BlobContainer) -> None:
        self._container = container
        self._streams: dict[str, Stream] = {}

    def clear(self) -> None:
        """Forget every stream (the store is closing)."""
        self._streams.clear()

    def open(self, stream: str) -> Stream:
        """The stream's index; opening a stream lists its segments (one request)."""
        st = self._streams.get(stream)
        if st is not None:
            return st
        check_stream_name(stream)
        segments: list[Segment] = []
        try:
            listing = list(self._container.client.list_blobs(
                name_starts_with=segments_prefix(stream), include=["metadata"]
            ))
        except HttpResponseError as exc:
            if error_code(exc) != "ContainerNotFound":
                self._container.fail(exc, f"list the blobs of stream {stream!r}")
            listing = []
        except AzureError as exc:
            self._container.fail(exc, f"list the blobs of stream {stream!r}")
        for props in sorted(listing, key=lambda p: str(p.name)):
            name = str(props.name)
            number = segment_number(stream, name)
            if number is None:
                continue  # not ours: a stray blob under the prefix
            base = base_of(props.metadata)
            previous = segments[-1].base if segments else 0
            if number != len(segments) or base is None or base < previous or (
                number == 0 and base != 0
            ):
                raise CorruptBlobStream(
                    stream, self._container.where(name),
                    f"segment {number} (metadata {BASE_KEY}={base}) does not continue the "
                    f"{len(segments)} segment(s) before it"
                )
            segments.append(Segment(number, base, exists=True, sealed=True,
                                    created=props.creation_time))
        if segments:
            segments[-1].sealed = False  # the download that indexes it says whether it is
        else:
            segments.append(Segment.not_created(0, 0))
        st = self._streams[stream] = Stream(stream, segments)
        return st

    def sync(self, st: Stream) -> None:
        """Index whatever was appended to the stream since it was last read."""
        while True:
            self._fetch(st, len(st.segments) - 1, None)
            if not st.follow_seal():
                return

    def read(self, st: Stream, from_version: int) -> list[object]:
        """The events after ``from_version``, downloading only the segments' bytes after it."""
        out: list[object] = []
        i = st.segment_of(from_version)
        while i < len(st.segments):
            seg = st.segments[i]
            out.extend(self._fetch(st, i, max(from_version - seg.base, 0)))
            if i == len(st.segments) - 1:
                st.follow_seal()  # the tail was just read in full: its seal is final
            i += 1
        return out

    def properties(self, st: Stream, seg: Segment) -> BlobProperties:
        """The segment's properties (a HEAD: they describe one moment of the blob)."""
        try:
            props = self._container.blob(segment_blob(st.name, seg.number)).get_blob_properties()
        except AzureError as exc:
            if status_of(exc) == 404:
                raise self._lost(st, seg, _GONE) from None
            self._container.fail(exc, f"read stream {st.name!r}")
        self._check_same_blob(st, seg, props)
        index = seg.index
        if index is not None and props.size < index.end:
            raise self._lost(st, seg, _replaced(props.size, index.end))
        return props

    # -- one segment ---------------------------------------------------------------------------

    def _fetch(self, st: Stream, i: int, from_record: int | None) -> list[object]:
        """Bring segment ``i``'s index up to date and decode its records from ``from_record``.

        With ``from_record=None`` only the bytes after the index are asked for (conditionally
        on the ETag when it is trusted); nothing is decoded.
        """
        seg = st.segments[i]
        for _ in range(3):
            index = seg.index
            if from_record is None or (index is not None and from_record >= index.count):
                offset, number = (index.end, index.count) if index is not None else (0, 0)
                etag = seg.etag
            else:
                offset, number = checkpoint(index, from_record)
                etag = None  # the bytes are wanted even if nothing changed
            data, props, consistent = self._download(st, seg, offset, etag)
            if props is None:
                return []
            says_sealed = self._absorb(st, i, offset, data, props, consistent)
            tail = i == len(st.segments) - 1
            if says_sealed and not seg.sealed and tail and not self._confirm_seal(st, seg):
                continue  # it grew before it was sealed: read the rest
            if from_record is None:
                return []
            index = seg.index
            assert index is not None  # _absorb indexed it
            return self._decode(st, seg, data[: max(index.end - offset, 0)], offset, number,
                                from_record)
        raise BlobServiceError(
            f"{self._container.where(segment_blob(st.name, seg.number))}: the blob kept "
            "changing while it was read; retry"
        )

    def _download(
        self, st: Stream, seg: Segment, offset: int, etag: str | None
    ) -> tuple[bytes, BlobProperties | None, bool]:
        """The segment's bytes from ``offset`` to its end, its properties, and whether those
        properties are known to describe exactly those bytes.

        A GET's are not: Azurite (3.35.0, measured) builds a download's ETag and sealed flag
        after reading its body, so both can be newer than the bytes. A HEAD's are, and so is
        the answer to our own append. ``(b"", None, False)`` when ``etag`` still matches, or
        when a segment not created yet is still missing.
        """
        name = segment_blob(st.name, seg.number)
        blob = self._container.blob(name)
        conditions: dict[str, Any] = (
            {"etag": etag, "match_condition": MatchConditions.IfModified} if etag else {}
        )
        for _ in range(3):
            try:
                # Always a range: without one, the SDK answers a 416 (empty blob) with a second,
                # unconditional GET whose ETag may be newer than the bytes it returns.
                downloader = blob.download_blob(offset=offset, **conditions)
                return downloader.readall(), downloader.properties, False
            except HttpResponseError as exc:
                status = status_of(exc)
                if status == 304:
                    return b"", None, False
                if status == 404:
                    if seg.exists:
                        raise self._lost(st, seg, _GONE) from None
                    return b"", None, False
                if status == 416:
                    # Nothing after ``offset`` (Azure answers a range at the end this way).
                    props = self.properties(st, seg)
                    if props.size == offset:
                        return b"", props, True
                    continue  # it grew since the 416: download again
                if status != 412:
                    self._container.fail(exc, f"read stream {st.name!r}")
                # 412: the blob grew between the chunks of one large download: start again.
            except AzureError as exc:
                self._container.fail(exc, f"read stream {st.name!r}")
        raise BlobServiceError(
            f"{self._container.where(name)}: the blob kept changing during three downloads; "
            "retry",
        )

    def _check_same_blob(self, st: Stream, seg: Segment, props: BlobProperties) -> None:
        """Raise if the segment's blob is not the one this store indexed (same name, created
        again): its bytes after the index would be spliced onto records that are gone."""
        created = props.creation_time
        if created is None or seg.created is None:
            seg.created = seg.created or created
            return
        if created != seg.created:
            raise self._lost(
                st, seg, f"the blob was created again after this store read it (at {created}, "
                f"not {seg.created}): the stream was deleted and written again behind the "
                "store's back, and the events this store knew are gone"
            )

    def _confirm_seal(self, st: Stream, seg: Segment) -> bool:
        """True if the segment is sealed with nothing after the index: its count is final."""
        props = self.properties(st, seg)
        assert seg.index is not None
        if props.size != seg.index.end:
            seg.etag = None
            return False
        seg.sealed = bool(props.is_append_blob_sealed)
        seg.etag = props.etag
        return True

    def _absorb(
        self, st: Stream, i: int, offset: int, data: bytes, props: BlobProperties,
        consistent: bool,
    ) -> bool:
        """Index the bytes of ``data`` (starting at ``offset``) beyond the segment's index.

        Returns whether the answer says the blob is sealed. The segment is marked sealed, and
        its ETag kept, only when ``props`` are ``consistent`` with ``data``.
        """
        seg = st.segments[i]
        name = self._container.where(segment_blob(st.name, seg.number))
        if props.blob_type != BlobType.APPENDBLOB:
            raise CorruptBlobStream(st.name, name, f"it is a {props.blob_type}, not an append "
                                    "blob: something other than shir wrote it")
        self._check_same_blob(st, seg, props)
        base = base_of(props.metadata)
        if base != seg.base:
            raise CorruptBlobStream(
                st.name, name, f"its metadata {BASE_KEY}={base} should be {seg.base}, the "
                "events in the segments before it"
            )
        first_read = seg.index is None
        index = seg.index if seg.index is not None else Index(0, 0, [])
        end = offset + len(data)
        if end < index.end:
            raise self._lost(st, seg, _replaced(end, index.end))
        grew = end > index.end
        if grew:
            found, damage = scan(BytesReader(data, offset), index.end, index.count,
                                 index.checkpoints)
            if damage is not None:
                raise self._damage_error(st, seg, damage, end)
            index = found
        seg.index = index
        seg.exists = True
        says_sealed = bool(props.is_append_blob_sealed)
        if consistent:
            seg.etag = props.etag
        elif grew or first_read:
            seg.etag = None  # a kept ETag describes the blob at the index's old end only
        seg.sealed = says_sealed and consistent
        if first_read and i + 1 < len(st.segments):
            # Sealed before the next segment was created, so what was read is all of it.
            expected = st.segments[i + 1].base - seg.base
            if index.count != expected or not says_sealed:
                raise CorruptBlobStream(
                    st.name, name, f"the segment holds {index.count} events"
                    f"{'' if says_sealed else ' and is not sealed'} but the next one says it "
                    f"holds {expected}"
                )
            seg.sealed = True
        return says_sealed

    def _damage_error(self, st: Stream, seg: Segment, damage: Damage, end: int) -> StoreError:
        name = self._container.where(segment_blob(st.name, seg.number))
        good = seg.base + damage.good_records
        if damage.next_good_offset is None:
            return TornBlobTail(st.name, name, damage.offset, end - damage.offset, good,
                                damage.reason)
        return CorruptBlobStream(
            st.name, name, f"event #{good + 1} at byte offset {damage.offset} is damaged "
            f"({damage.reason}); intact records follow at byte offset "
            f"{damage.next_good_offset}, so this is not a torn tail"
        )

    def _decode(
        self, st: Stream, seg: Segment, data: bytes, offset: int, number: int,
        from_record: int,
    ) -> list[object]:
        pos = 0
        # Walk headers in memory up to the first wanted record (at most 255 of them).
        while number < from_record and pos + HEADER_SIZE <= len(data):
            (length, _) = HEADER.unpack_from(data, pos)
            pos += HEADER_SIZE + length
            number += 1
        out: list[object] = []
        bad: tuple[int, int, str] | None = None
        if pos > len(data) or (number < from_record and pos < len(data)):
            bad = (offset + pos, number, "short header")
        elif number == from_record:
            out, bad = read_frames(data[pos:], offset + pos, number)
        if bad is not None:
            at, record, reason = bad
            raise self._lost(
                st, seg, f"event #{seg.base + record + 1} at byte offset {at} is damaged "
                f"({reason}); the blob changed after this store indexed it"
            )
        return out

    def _lost(self, st: Stream, seg: Segment, detail: str) -> CorruptBlobStream:
        """Forget the stream, so the next call lists and reads it afresh, and say why."""
        self._streams.pop(st.name, None)
        return CorruptBlobStream(
            st.name, self._container.where(segment_blob(st.name, seg.number)), detail
        )


def _replaced(size: int, indexed: int) -> str:
    return (
        f"the blob holds {size} bytes but this store indexed {indexed}: it was replaced behind "
        "the store's back"
    )
