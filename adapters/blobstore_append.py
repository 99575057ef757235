"""The Blob event store's append path: conditional Append Blocks, rollover and lost answers.

Every append is one *Append Block* of all its frames, which the service applies whole or not at
all, so a batch never lands in part.

**Optimistic concurrency is enforced by the service.** An append sends
``appendpos_condition=E``, where ``E`` is the byte length of the segment at the version the
writer expects: the service applies the block only if the blob is exactly ``E`` bytes long, and
refuses it otherwise (412 ``AppendPositionConditionNotMet``). A segment only grows, so its
length names its version; of two writers that read the same version, exactly one lands and the
other re-reads the tail and gets :class:`~shir.core.store.ConcurrencyConflict` with the actual
version. Nothing is checked on the client alone.

Rollover: when an append reports that its segment holds ``segment_max_appends`` blocks (10,000
by default: a cold open reads the last segment only, so this bounds it), the writer seals it
(Seal is idempotent and a sealed blob refuses appends); the next append re-reads the sealed
segment and creates the next one (``If-None-Match: *``), whose base version every writer
computes alike because a sealed segment never changes. A writer that finds a segment full and
unsealed (the sealing writer died) seals it itself. Racing writers on a new segment are decided
by its append position 0.

Appends whose outcome is unknown: the SDK's automatic retries of read timeouts and 5xx answers
are turned off for Append Block (a retry of a block that did land would fail its own position
condition and look like a conflict). After such a failure the store re-reads the tail: if the
bytes at the position it used are the batch it sent, the append landed; if the stream is still
at the expected version, it appends again (the position condition lets at most one attempt
land); otherwise :class:`ConcurrencyConflict`. If even the re-read fails,
:class:`BlobAppendOutcomeUnknown`: re-read the stream before deciding again. Caveat: another
writer's byte-identical batch at the same version is taken for this one's; events carry their
time and node, so two hosts practically never produce one.

This module is separate because it is the only one that writes a segment, and its retries and
their outcomes are what the racing tests exercise; it reads only through the
:class:`~shir.adapters.blobstore_read.SegmentReader`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ServiceResponseError,
)

from shir.adapters.blobstore_layout import BASE_KEY, Segment, Stream, segment_blob
from shir.adapters.blobstore_read import SegmentReader
from shir.adapters.blobstore_service import BlobContainer, BlobServiceError, error_code, status_of
from shir.adapters.framing import CHECKPOINT_EVERY
from shir.core.store import AppendOutcomeUnknown, ConcurrencyConflict, StoreError

__all__ = ["BlobAppendOutcomeUnknown", "SegmentAppender"]

# Conflicts, rollovers and unknown outcomes each end in a retry; more than this in one append
# means the stream keeps moving faster than this writer can read it.
_MAX_ATTEMPTS = 8


class BlobAppendOutcomeUnknown(AppendOutcomeUnknown):
    """An append may or may not have landed, and re-reading the stream failed too.

    Re-read the stream (``read``/``version``) before deciding again: the events are either
    there in full or not at all.
    """


class _Landed(Exception):  # control flow inside SegmentAppender.append: never escapes it
    """An append whose outcome was unknown turns out to have landed."""


class SegmentAppender:
    """Appends encoded batches to a stream's tail segment, rolling over to the next when full.

    Not thread-safe: the store calls it under its lock.
    """

    def __init__(
        self, container: BlobContainer, reader: SegmentReader, segment_max_appends: int
    ) -> None:
        self._container = container
        self._reader = reader
        self._segment_max_appends = segment_max_appends

    def append(self, st: Stream, data: bytes, sizes: list[int], expected: int) -> int:
        """Append the frames ``data`` (of ``sizes`` bytes each) if the stream is at
        ``expected``, which its index says it is; return the new version."""
        try:
            return self._try_append(st, data, sizes, expected)
        except _Landed:
            return expected + len(sizes)  # an earlier attempt landed after all

    def _try_append(self, st: Stream, data: bytes, sizes: list[int], expected: int) -> int:
        maybe_landed: tuple[int, int] | None = None  # (segment, position) of an unknown outcome
        for attempt in range(_MAX_ATTEMPTS):
            seg = st.segments[-1]
            if seg.sealed:
                self._reader.sync(st)  # its final records, then the segment after it
                self._check_version(st, expected, data, maybe_landed)
                continue
            if not seg.exists:
                self._create_segment(st, seg)
            assert seg.index is not None  # the tail is indexed before an append
            position = seg.index.end
            blob = self._container.blob(segment_blob(st.name, seg.number))
            try:
                # No SDK retry once the request may have reached the service (see module doc).
                result = blob.append_block(
                    data, appendpos_condition=position, retry_read=0, retry_status=0
                )
            except HttpResponseError as exc:
                status, code = status_of(exc), error_code(exc)
                if status == 412 or code in ("BlobIsSealed", "BlockCountExceedsLimit"):
                    if code == "BlockCountExceedsLimit":
                        self._seal(st, seg)  # its sealer died: the segment is full anyway
                    seg.etag = None  # the service says it moved: read it, whatever the ETag
                    self._reader.sync(st)
                    self._check_version(st, expected, data, maybe_landed)
                    continue  # same version, the segment was sealed: on to the next one
                if status == 404:
                    self._reader.sync(st)  # raises: the segment (or container) was deleted
                    continue
                if status is not None and (status >= 500 or status == 408):
                    maybe_landed = (seg.number, position)
                    self._resolve(st, expected, data, maybe_landed, attempt)
                    continue
                self._container.fail(exc, f"append to stream {st.name!r}")
            except ServiceResponseError:
                maybe_landed = (seg.number, position)
                self._resolve(st, expected, data, maybe_landed, attempt)
                continue
            except AzureError as exc:  # not sent (ServiceRequestError): nothing landed
                self._container.fail(exc, f"append to stream {st.name!r}")
            self._appended(st, seg, position, sizes, result)
            return st.version()
        if maybe_landed is not None:
            # An attempt whose answer was lost may still land (on Azure, a timed-out request
            # can): the caller must re-read, not assume nothing was stored.
            raise BlobAppendOutcomeUnknown(
                f"could not append to stream {st.name!r} in {_MAX_ATTEMPTS} attempts, and one "
                "attempt's outcome is unknown: re-read the stream before deciding again"
            )
        raise BlobServiceError(
            f"could not append to stream {st.name!r} in {_MAX_ATTEMPTS} attempts: the stream "
            "kept moving or the service kept failing; re-read it and retry"
        )

    def _appended(
        self, st: Stream, seg: Segment, position: int, sizes: list[int],
        result: dict[str, Any],
    ) -> None:
        """Index our own append from its response, without reading it back."""
        index = seg.index
        assert index is not None
        offset = position
        for size in sizes:
            if index.count % CHECKPOINT_EVERY == 0:
                index.checkpoints.append(offset)
            offset += size
            index.count += 1
        index.end = offset
        seg.etag = str(result.get("etag") or "") or None
        blocks = result.get("blob_committed_block_count")
        if isinstance(blocks, int) and blocks >= self._segment_max_appends:
            with contextlib.suppress(BlobServiceError):
                self._seal(st, seg)  # best effort: the next writer that finds it full seals it

    def _check_version(
        self, st: Stream, expected: int, data: bytes, maybe_landed: tuple[int, int] | None
    ) -> None:
        """Return if the stream is still at ``expected``; raise :class:`_Landed` if an attempt
        of unknown outcome is what moved it, :class:`ConcurrencyConflict` otherwise."""
        actual = st.version()
        if actual == expected:
            return
        if maybe_landed is not None and self._landed(st, data, maybe_landed):
            raise _Landed
        raise ConcurrencyConflict(st.name, expected, actual)

    def _resolve(
        self, st: Stream, expected: int, data: bytes, where: tuple[int, int], attempt: int
    ) -> None:
        """After an append of unknown outcome: return to append again, raise :class:`_Landed`
        if it landed, or :class:`ConcurrencyConflict`."""
        try:
            self._reader.sync(st)
        except StoreError:
            raise BlobAppendOutcomeUnknown(
                f"the append to stream {st.name!r} at version {expected} may or may not have "
                "landed, and re-reading the stream failed too: re-read the stream before "
                "deciding again (its events are either all there or not at all)"
            ) from None
        self._check_version(st, expected, data, where)
        time.sleep(min(0.05 * 2**attempt, 2.0))  # the service was struggling: back off

    def _landed(self, st: Stream, data: bytes, where: tuple[int, int]) -> bool:
        number, position = where
        blob = self._container.blob(segment_blob(st.name, number))
        try:
            found = blob.download_blob(offset=position, length=len(data)).readall()
        except AzureError:
            raise BlobAppendOutcomeUnknown(
                f"the append to stream {st.name!r} may or may not have landed, and reading "
                "it back failed: re-read the stream before deciding again"
            ) from None
        return found == data

    def _create_segment(self, st: Stream, seg: Segment) -> None:
        blob = self._container.blob(segment_blob(st.name, seg.number))

        def create() -> None:
            # Another writer creating it is fine: its append position decides who goes first.
            with contextlib.suppress(ResourceExistsError):
                blob.create_append_blob(metadata={BASE_KEY: str(seg.base)}, if_none_match="*")

        self._container.write(create, f"create a segment of stream {st.name!r}")
        seg.exists = True
        # Its creation time, so that a blob deleted and created again is told apart from it
        # (one request per segment; an append's answer does not carry it). Best effort: the
        # next download of the segment learns it too.
        with contextlib.suppress(BlobServiceError):
            self._reader.properties(st, seg)

    def _seal(self, st: Stream, seg: Segment) -> None:
        blob = self._container.blob(segment_blob(st.name, seg.number))
        try:
            blob.seal_append_blob()
        except AzureError as exc:
            self._container.fail(exc, f"seal a full segment of stream {st.name!r}")
        # Others may have appended before the seal: ``sealed`` is set only by a download that
        # reads the segment to its end, so the next segment's base is never computed too soon.
        seg.etag = None
