"""An event store on Azure Blob Storage: each stream a chain of append blobs.

Theory of operation
-------------------
One container holds, per stream::

    <stream>/events.00000000   append blob: the stream's first events  ("segment" 0)
    <stream>/events.00000001   append blob: the events after segment 0 was sealed
    ...
    <stream>/snapshot          block blob: the latest snapshot

Segments hold the frames of :mod:`shir.adapters.framing` (length, CRC32, codec payload), the
same records as the file store. Every append is one *Append Block* of all its frames, which
the service applies whole or not at all, so a batch never lands in part. Each segment's
metadata ``shir_base_version`` says how many events come before it.

**Optimistic concurrency is enforced by the service.** An append sends
``appendpos_condition=E``, where ``E`` is the byte length of the segment at the version the
writer expects: the service applies the block only if the blob is exactly ``E`` bytes long, and
refuses it otherwise (412 ``AppendPositionConditionNotMet``). A segment only grows, so its
length names its version; of two writers that read the same version, exactly one lands and the
other re-reads the tail and gets :class:`~shir.core.store.ConcurrencyConflict` with the actual
version. Nothing is checked on the client alone.

Why append blobs, not block blobs with conditional commits: an ``If-Match`` commit of a block
list re-sends the whole list (the cost of an append grows with the stream), two writers
staging blocks before committing can overwrite each other's uncommitted blocks, and an ETag
condition also fails on changes that do not move the version (metadata, sealing). The append
position is exactly the condition the port needs, at one request per append.

Why segments: an append blob takes at most 50,000 blocks, one per append, and a runtime
appends at least a heartbeat per node every 10 s (about 35,000 appends a day for four nodes),
so a single blob per stream would be full in under two days. When an append reports that its
segment holds ``segment_max_appends`` blocks (10,000 by default: a cold open reads the last
segment only, so this bounds it), the writer seals it (Seal is idempotent and a
sealed blob refuses appends); the next append re-reads the sealed segment and creates the next
one (``If-None-Match: *``), whose base version every writer computes alike because a sealed
segment never changes. A writer takes a segment as sealed only from an answer known to
describe the bytes it indexed (a HEAD that finds nothing after them): Azurite builds a
download's ETag and sealed flag after reading its body, so they can be newer than the bytes,
and a base computed from such an answer would skip records (seen in the racing tests). A
writer that finds a segment full and unsealed (the sealing writer died) seals it itself.
Racing writers on a new segment are decided by its append position 0.

Appends whose outcome is unknown: the SDK's automatic retries of read timeouts and 5xx answers
are turned off for Append Block (a retry of a block that did land would fail its own position
condition and look like a conflict). After such a failure the store re-reads the tail: if the
bytes at the position it used are the batch it sent, the append landed; if the stream is still
at the expected version, it appends again (the position condition lets at most one attempt
land); otherwise :class:`ConcurrencyConflict`. If even the re-read fails,
:class:`BlobAppendOutcomeUnknown`: re-read the stream before deciding again. Caveat: another
writer's byte-identical batch at the same version is taken for this one's; events carry their
time and node, so two hosts practically never produce one.

Index and reads: per stream and segment the store keeps, in memory, the record count, the end
offset, the offset of every 256th record and, when it has one, an ETag known to match that end
(from its own append's answer or a HEAD). ``version`` asks for the bytes after the indexed end:
with ``If-None-Match: <ETag>`` when it holds such an ETag (a 304 when nothing changed), else a
ranged GET that brings nothing back; either is one request. ``read(v)`` downloads from the
checkpoint at or before ``v``, never the stream before it, and indexes whatever other writers
appended. Opening a stream lists its segments and reads only the last one; earlier segments are
downloaded when a read needs them.

Damage is never skipped: a record whose length or CRC is wrong, or whose payload the codec
refuses, raises :class:`TornBlobTail` (nothing intact after it) or :class:`CorruptBlobStream`
(intact records after it, or the blob changed under an index) on every access until fixed by
hand. Append Block is atomic, so neither comes from a crash of a shir writer; append blobs
cannot be truncated, so there is no ``repair``. A segment deleted (or deleted and created
again, told by its creation time, which has a resolution of one second) under an index raises
:class:`CorruptBlobStream` once, and the next call reads the stream afresh.

Credentials: the connection string or credential lives only inside the SDK client. Errors name
the endpoint (without its query string), the container, the blob and the service's error code,
never the key or SAS token; SDK errors are not chained into them. The SDK's own logs redact
credentials; urllib3 logs each request's URL at DEBUG, which with a SAS holds the signature, so
the store adds a filter to that logger that redacts ``sig=``.

One store object serialises its own calls with a lock, so threads may share one; any number of
store objects, in any number of processes, may write one stream.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

import attrs

try:
    from azure.core import MatchConditions
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.storage.blob import BlobProperties, BlobServiceClient, BlobType, ContainerClient
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shir.adapters.blobstore needs the Azure Storage SDK (azure-storage-blob): "
        "pip install 'shir[azure]'"
    ) from exc

from shir.adapters.closing import CloseOnExit
from shir.adapters.framing import (
    CHECKPOINT_EVERY,
    HEADER,
    HEADER_SIZE,
    BytesReader,
    CorruptSnapshot,
    Damage,
    Index,
    encode_frames,
    parse_snapshot,
    read_frames,
    scan,
    snapshot_frame,
)
from shir.adapters.proxy import proxy_refused, redact_userinfo
from shir.core.store import (
    AppendOutcomeUnknown,
    ConcurrencyConflict,
    Snapshot,
    StoreError,
    check_append,
    check_snapshot,
    check_stream_name,
)

__all__ = [
    "DEFAULT_SEGMENT_APPENDS",
    "MAX_APPEND_BYTES",
    "MAX_BLOCKS_PER_BLOB",
    "BlobAppendOutcomeUnknown",
    "BlobEventStore",
    "BlobServiceError",
    "CorruptBlobStream",
    "CorruptSnapshot",
    "InvalidConnectionString",
    "InvalidContainerName",
    "TornBlobTail",
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
_BASE_KEY = "shir_base_version"
_SEGMENT_NAME = re.compile(r"events\.(\d{8})")
# Azure's rule: 3-63 characters, lowercase letters, digits and single hyphens between them.
_CONTAINER_NAME = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
# Conflicts, rollovers and unknown outcomes each end in a retry; more than this in one append
# means the stream keeps moving faster than this writer can read it.
_MAX_ATTEMPTS = 8
_SECRET_LOOKING = re.compile(
    r"(?i)(sig|signature|accountkey|sharedaccesssignature|secret|token|password)=[^&;\s'\"]*"
)


class BlobServiceError(StoreError):
    """The Blob service refused a request, or could not be reached; the message says why."""

    def __init__(
        self, message: str, status: int | None = None, error_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class InvalidConnectionString(StoreError, ValueError):
    """The connection string cannot be parsed (its content is never repeated)."""


class InvalidContainerName(StoreError, ValueError):
    """A container name that Azure does not accept."""


class BlobAppendOutcomeUnknown(AppendOutcomeUnknown):
    """An append may or may not have landed, and re-reading the stream failed too.

    Re-read the stream (``read``/``version``) before deciding again: the events are either
    there in full or not at all.
    """


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


@attrs.define
class _Segment:
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


@attrs.define
class _Stream:
    name: str
    segments: list[_Segment]


def _segment_blob(stream: str, number: int) -> str:
    return f"{stream}/events.{number:08d}"


def _snapshot_blob(stream: str) -> str:
    return f"{stream}/snapshot"


def _redact(text: str) -> str:
    """The first line of an SDK message, shortened, with anything that looks secret removed."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = redact_userinfo(line)  # a proxy URL's user and password
    return _SECRET_LOOKING.sub(r"\1=(redacted)", line)[:200]


class _RedactSignatures(logging.Filter):
    """Takes SAS signatures out of urllib3's log records, which hold whole request URLs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _SECRET_LOOKING.sub(r"\1=(redacted)", a) if isinstance(a, str) else a
                for a in record.args
            )
        return True


def _guard_transport_logs() -> None:
    # The SDK redacts its own logs, but the HTTP library under it logs each request line at
    # DEBUG, and with a SAS credential that line carries the signature.
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RedactSignatures) for f in logger.filters):
        logger.addFilter(_RedactSignatures())


def _status(exc: AzureError) -> int | None:
    return getattr(exc, "status_code", None)


def _code(exc: AzureError) -> str:
    code = getattr(exc, "error_code", None)
    # The SDK gives the codes it maps to no exception class as StorageErrorCode members, whose
    # str() is "StorageErrorCode.SERVER_BUSY": the service's own code is their value.
    return str(getattr(code, "value", code) or "")


def _check_container_name(name: str) -> str:
    if not isinstance(name, str) or not _CONTAINER_NAME.fullmatch(name):
        raise InvalidContainerName(
            f"invalid container name {name!r}: Azure wants 3-63 characters of lowercase "
            "letters, digits and single hyphens, starting and ending with a letter or digit"
        )
    return name


class BlobEventStore(CloseOnExit):
    """The :class:`~shir.core.store.EventStore` port on Azure Blob Storage; see the module doc.

    ``container`` is a :class:`azure.storage.blob.ContainerClient` with whatever credential the
    host uses (account key, SAS, Entra ID); the container is created on the first write if it
    is missing. :meth:`from_connection_string` builds one from a connection string.
    ``segment_max_appends`` (10,000 by default, at most the service's 50,000) is how many
    appends a segment takes before it is sealed. ``via`` names the proxy the client goes
    through (``ClientProxy.describe()``), for errors; empty when it connects directly.
    """

    def __init__(
        self, container: ContainerClient, *, segment_max_appends: int = DEFAULT_SEGMENT_APPENDS,
        via: str = "",
    ) -> None:
        if type(segment_max_appends) is not int or not (
            1 <= segment_max_appends <= MAX_BLOCKS_PER_BLOB
        ):
            raise StoreError(
                f"segment_max_appends must be an int from 1 to {MAX_BLOCKS_PER_BLOB}, got "
                f"{segment_max_appends!r}"
            )
        self._container = container
        self._name = _check_container_name(container.container_name)
        parts = urlsplit(container.url)
        # Never the query string: with a SAS credential it holds the signature.
        self._endpoint = f"{parts.scheme}://{parts.netloc}{parts.path.rsplit('/', 1)[0]}"
        # A SAS from a connection string lives in the URL, not in ``credential``.
        self._has_credential = container.credential is not None or "sig=" in parts.query
        _guard_transport_logs()
        self._segment_max_appends = segment_max_appends
        self._via = via
        self._mutex = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._closed = False

    @classmethod
    def from_connection_string(
        cls, connection_string: str, container: str, *,
        segment_max_appends: int = DEFAULT_SEGMENT_APPENDS, via: str = "",
        **client_options: Any,
    ) -> BlobEventStore:
        """A store on ``container`` of the account that ``connection_string`` names.

        ``client_options`` go to the SDK client (``retry_total``, ``connection_timeout``,
        ``proxies``...); ``via`` is as in the constructor.
        """
        _check_container_name(container)
        try:
            service = BlobServiceClient.from_connection_string(
                connection_string, **client_options
            )
        except (ValueError, TypeError, AttributeError):
            raise InvalidConnectionString(_describe_bad_connection_string(connection_string)) \
                from None
        return cls(service.get_container_client(container),
                   segment_max_appends=segment_max_appends, via=via)

    def __repr__(self) -> str:
        return f"BlobEventStore(endpoint={self._endpoint!r}, container={self._name!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the SDK client's connections. Safe to call twice; the store is unusable after."""
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._streams.clear()
                self._container.close()

    @property
    def container_name(self) -> str:
        """The container holding the streams."""
        return self._name

    def blob_names(self, stream: str) -> list[str]:
        """The names of the blobs holding ``stream``'s events, in order (for tools and tests)."""
        with self._mutex:
            st = self._stream(stream)
            self._sync(st)
            return [_segment_blob(stream, s.number) for s in st.segments if s.exists]

    # -- the EventStore port -----------------------------------------------------------------

    def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
        """Append ``events`` if the stream is at ``expected_version``; return the new version.

        The service checks the version (the append position condition): a writer that lost a
        race gets :class:`ConcurrencyConflict` with the version the stream is at.
        """
        check_append(stream, expected_version, expected_version)  # the argument's type only
        with self._mutex:
            st = self._stream(stream)
            tail = st.segments[-1]
            # A stale index is refreshed before refusing; an empty append is checked for real.
            if tail.index is None or expected_version != _version(st) or not events:
                self._sync(st)
            check_append(stream, expected_version, _version(st))
            if not events:
                return expected_version
            data, sizes = encode_frames(events)  # codec errors surface before any request
            if len(data) > MAX_APPEND_BYTES:
                raise StoreError(
                    f"{len(events)} event(s) encode to {len(data)} bytes, over the "
                    f"{MAX_APPEND_BYTES} bytes one atomic Append Block takes: keep large data "
                    "out of events"
                )
            return self._append(st, data, sizes, expected_version)

    def read(self, stream: str, from_version: int = 0) -> list[object]:
        """The events after ``from_version``, downloading only the segments' bytes after it."""
        if type(from_version) is not int or from_version < 0:
            raise StoreError(f"from_version must be a non-negative int, got {from_version!r}")
        with self._mutex:
            st = self._stream(stream)
            out: list[object] = []
            i = _segment_of(st, from_version)
            while i < len(st.segments):
                seg = st.segments[i]
                out.extend(self._fetch(st, i, max(from_version - seg.base, 0)))
                if i == len(st.segments) - 1:
                    _follow_seal(st)  # the tail was just read in full: its seal is final
                i += 1
            return out

    def version(self, stream: str) -> int:
        """How many events the stream holds now (one conditional request when unchanged)."""
        with self._mutex:
            st = self._stream(stream)
            self._sync(st)
            return _version(st)

    def save_snapshot(self, stream: str, snapshot: Snapshot) -> None:
        """Replace the stream's snapshot blob (Put Blob replaces a blob atomically)."""
        with self._mutex:
            st = self._stream(stream)
            if st.segments[-1].index is None or snapshot.version > _version(st):
                self._sync(st)
            check_snapshot(stream, snapshot, _version(st))
            frame = snapshot_frame(snapshot)
            blob = self._container.get_blob_client(_snapshot_blob(stream))
            for attempt in range(2):
                try:
                    blob.upload_blob(frame, blob_type=BlobType.BLOCKBLOB, overwrite=True)
                    return
                except AzureError as exc:
                    if attempt or _code(exc) != "ContainerNotFound":
                        self._raise(exc, f"write the snapshot of {stream!r}")
                    self._create_container()

    def load_snapshot(self, stream: str) -> Snapshot | None:
        """The stream's snapshot, or ``None``; :class:`CorruptSnapshot` if it is damaged."""
        with self._mutex:
            st = self._stream(stream)
            name = _snapshot_blob(stream)
            try:
                frame = self._container.get_blob_client(name).download_blob().readall()
            except HttpResponseError as exc:
                if _status(exc) == 404:
                    return None
                self._raise(exc, f"read the snapshot of {stream!r}")
            except AzureError as exc:
                self._raise(exc, f"read the snapshot of {stream!r}")
            snapshot = parse_snapshot(self._where(name), frame)
            if st.segments[-1].index is None or snapshot.version > _version(st):
                self._sync(st)
            if snapshot.version > _version(st):
                raise CorruptSnapshot(
                    f"{self._where(name)}: snapshot at version {snapshot.version} is beyond the "
                    f"stream's {_version(st)} events (were its segments deleted?); delete the "
                    "snapshot blob and replay the stream from the start"
                )
            return snapshot

    # -- streams and segments ----------------------------------------------------------------

    def _where(self, blob: str) -> str:
        return f"{self._endpoint}/{self._name}/{blob}"

    def _stream(self, stream: str) -> _Stream:
        """The stream's index; opening a stream lists its segments (one request)."""
        if self._closed:
            raise StoreError(f"the BlobEventStore on container {self._name!r} is closed")
        st = self._streams.get(stream)
        if st is not None:
            return st
        check_stream_name(stream)
        segments: list[_Segment] = []
        try:
            listing = list(self._container.list_blobs(
                name_starts_with=f"{stream}/events.", include=["metadata"]
            ))
        except HttpResponseError as exc:
            if _code(exc) != "ContainerNotFound":
                self._raise(exc, f"list the blobs of stream {stream!r}")
            listing = []
        except AzureError as exc:
            self._raise(exc, f"list the blobs of stream {stream!r}")
        for props in sorted(listing, key=lambda p: str(p.name)):
            name = str(props.name)
            match = _SEGMENT_NAME.fullmatch(name[len(stream) + 1 :])
            if match is None:
                continue  # not ours: a stray blob under the prefix
            number = int(match.group(1))
            base = _base_of(props)
            previous = segments[-1].base if segments else 0
            if number != len(segments) or base is None or base < previous or (
                number == 0 and base != 0
            ):
                raise CorruptBlobStream(
                    stream, self._where(name),
                    f"segment {number} (metadata {_BASE_KEY}={base}) does not continue the "
                    f"{len(segments)} segment(s) before it"
                )
            segments.append(_Segment(number, base, exists=True, sealed=True,
                                     created=props.creation_time))
        if segments:
            segments[-1].sealed = False  # the download that indexes it says whether it is
        else:
            segments.append(_Segment(0, 0, exists=False, index=Index(0, 0, [])))
        st = self._streams[stream] = _Stream(stream, segments)
        return st

    def _sync(self, st: _Stream) -> None:
        """Index whatever was appended to the stream since it was last read."""
        while True:
            self._fetch(st, len(st.segments) - 1, None)
            if not _follow_seal(st):
                return

    def _fetch(self, st: _Stream, i: int, from_record: int | None) -> list[object]:
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
                offset, number = _checkpoint(index, from_record)
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
            f"{self._where(_segment_blob(st.name, seg.number))}: the blob kept changing while "
            "it was read; retry"
        )

    def _download(
        self, st: _Stream, seg: _Segment, offset: int, etag: str | None
    ) -> tuple[bytes, BlobProperties | None, bool]:
        """The segment's bytes from ``offset`` to its end, its properties, and whether those
        properties are known to describe exactly those bytes.

        A GET's are not: Azurite (3.35.0, measured) builds a download's ETag and sealed flag
        after reading its body, so both can be newer than the bytes. A HEAD's are, and so is
        the answer to our own append. ``(b"", None, False)`` when ``etag`` still matches, or
        when a segment not created yet is still missing.
        """
        name = _segment_blob(st.name, seg.number)
        blob = self._container.get_blob_client(name)
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
                status = _status(exc)
                if status == 304:
                    return b"", None, False
                if status == 404:
                    if seg.exists:
                        self._streams.pop(st.name, None)
                        raise CorruptBlobStream(
                            st.name, self._where(name),
                            "the blob is gone although this store saw it: the stream was "
                            "deleted behind the store's back"
                        ) from None
                    return b"", None, False
                if status == 416:
                    # Nothing after ``offset`` (Azure answers a range at the end this way).
                    props = self._properties(st, seg)
                    if props.size == offset:
                        return b"", props, True
                    continue  # it grew since the 416: download again
                if status != 412:
                    self._raise(exc, f"read stream {st.name!r}")
                # 412: the blob grew between the chunks of one large download: start again.
            except AzureError as exc:
                self._raise(exc, f"read stream {st.name!r}")
        raise BlobServiceError(
            f"{self._where(name)}: the blob kept changing during three downloads; retry",
        )

    def _properties(self, st: _Stream, seg: _Segment) -> BlobProperties:
        """The segment's properties (a HEAD: they describe one moment of the blob)."""
        name = _segment_blob(st.name, seg.number)
        try:
            props = self._container.get_blob_client(name).get_blob_properties()
        except AzureError as exc:
            if _status(exc) == 404:
                self._streams.pop(st.name, None)
                raise CorruptBlobStream(
                    st.name, self._where(name), "the blob is gone although this store saw it: "
                    "the stream was deleted behind the store's back"
                ) from None
            self._raise(exc, f"read stream {st.name!r}")
        self._check_same_blob(st, seg, props)
        index = seg.index
        if index is not None and props.size < index.end:
            self._streams.pop(st.name, None)
            raise CorruptBlobStream(
                st.name, self._where(name), f"the blob holds {props.size} bytes but this "
                f"store indexed {index.end}: it was replaced behind the store's back"
            )
        return props

    def _check_same_blob(self, st: _Stream, seg: _Segment, props: BlobProperties) -> None:
        """Raise if the segment's blob is not the one this store indexed (same name, created
        again): its bytes after the index would be spliced onto records that are gone."""
        created = props.creation_time
        if created is None or seg.created is None:
            seg.created = seg.created or created
            return
        if created != seg.created:
            self._streams.pop(st.name, None)  # the next call lists and reads the stream afresh
            raise CorruptBlobStream(
                st.name, self._where(_segment_blob(st.name, seg.number)),
                f"the blob was created again after this store read it (at {created}, not "
                f"{seg.created}): the stream was deleted and written again behind the "
                "store's back, and the events this store knew are gone"
            )

    def _confirm_seal(self, st: _Stream, seg: _Segment) -> bool:
        """True if the segment is sealed with nothing after the index: its count is final."""
        props = self._properties(st, seg)
        assert seg.index is not None
        if props.size != seg.index.end:
            seg.etag = None
            return False
        seg.sealed = bool(props.is_append_blob_sealed)
        seg.etag = props.etag
        return True

    def _absorb(
        self, st: _Stream, i: int, offset: int, data: bytes, props: BlobProperties,
        consistent: bool,
    ) -> bool:
        """Index the bytes of ``data`` (starting at ``offset``) beyond the segment's index.

        Returns whether the answer says the blob is sealed. The segment is marked sealed, and
        its ETag kept, only when ``props`` are ``consistent`` with ``data``.
        """
        seg = st.segments[i]
        name = self._where(_segment_blob(st.name, seg.number))
        if props.blob_type != BlobType.APPENDBLOB:
            raise CorruptBlobStream(st.name, name, f"it is a {props.blob_type}, not an append "
                                    "blob: something other than shir wrote it")
        self._check_same_blob(st, seg, props)
        base = _base_of(props)
        if base != seg.base:
            raise CorruptBlobStream(
                st.name, name, f"its metadata {_BASE_KEY}={base} should be {seg.base}, the "
                "events in the segments before it"
            )
        first_read = seg.index is None
        index = seg.index if seg.index is not None else Index(0, 0, [])
        end = offset + len(data)
        if end < index.end:
            self._streams.pop(st.name, None)
            raise CorruptBlobStream(
                st.name, name, f"the blob holds {end} bytes but this store indexed "
                f"{index.end}: it was replaced behind the store's back"
            )
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

    def _damage_error(self, st: _Stream, seg: _Segment, damage: Damage, end: int) -> StoreError:
        name = self._where(_segment_blob(st.name, seg.number))
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
        self, st: _Stream, seg: _Segment, data: bytes, offset: int, number: int,
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
            self._streams.pop(st.name, None)  # re-list and re-read on the next access
            at, record, reason = bad
            raise CorruptBlobStream(
                st.name, self._where(_segment_blob(st.name, seg.number)),
                f"event #{seg.base + record + 1} at byte offset {at} is damaged ({reason}); "
                "the blob changed after this store indexed it"
            )
        return out

    # -- appending ---------------------------------------------------------------------------

    def _append(self, st: _Stream, data: bytes, sizes: list[int], expected: int) -> int:
        try:
            return self._try_append(st, data, sizes, expected)
        except _Landed:
            return expected + len(sizes)  # an earlier attempt landed after all

    def _try_append(self, st: _Stream, data: bytes, sizes: list[int], expected: int) -> int:
        maybe_landed: tuple[int, int] | None = None  # (segment, position) of an unknown outcome
        for attempt in range(_MAX_ATTEMPTS):
            seg = st.segments[-1]
            if seg.sealed:
                self._sync(st)  # its final records, then the segment after it
                self._check_version(st, expected, data, maybe_landed)
                continue
            if not seg.exists:
                self._create_segment(st, seg)
            assert seg.index is not None  # the tail is indexed before an append
            position = seg.index.end
            blob = self._container.get_blob_client(_segment_blob(st.name, seg.number))
            try:
                # No SDK retry once the request may have reached the service (see module doc).
                result = blob.append_block(
                    data, appendpos_condition=position, retry_read=0, retry_status=0
                )
            except HttpResponseError as exc:
                status, code = _status(exc), _code(exc)
                if status == 412 or code in ("BlobIsSealed", "BlockCountExceedsLimit"):
                    if code == "BlockCountExceedsLimit":
                        self._seal(st, seg)  # its sealer died: the segment is full anyway
                    seg.etag = None  # the service says it moved: read it, whatever the ETag
                    self._sync(st)
                    self._check_version(st, expected, data, maybe_landed)
                    continue  # same version, the segment was sealed: on to the next one
                if status == 404:
                    self._sync(st)  # raises: the segment (or container) was deleted
                    continue
                if status is not None and (status >= 500 or status == 408):
                    maybe_landed = (seg.number, position)
                    self._resolve(st, expected, data, maybe_landed, attempt)
                    continue
                self._raise(exc, f"append to stream {st.name!r}")
            except ServiceResponseError:
                maybe_landed = (seg.number, position)
                self._resolve(st, expected, data, maybe_landed, attempt)
                continue
            except AzureError as exc:  # not sent (ServiceRequestError): nothing landed
                self._raise(exc, f"append to stream {st.name!r}")
            self._appended(st, seg, position, sizes, result)
            return _version(st)
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
        self, st: _Stream, seg: _Segment, position: int, sizes: list[int],
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
        self, st: _Stream, expected: int, data: bytes, maybe_landed: tuple[int, int] | None
    ) -> None:
        """Return if the stream is still at ``expected``; raise :class:`_Landed` if an attempt
        of unknown outcome is what moved it, :class:`ConcurrencyConflict` otherwise."""
        actual = _version(st)
        if actual == expected:
            return
        if maybe_landed is not None and self._landed(st, data, maybe_landed):
            raise _Landed
        raise ConcurrencyConflict(st.name, expected, actual)

    def _resolve(
        self, st: _Stream, expected: int, data: bytes, where: tuple[int, int], attempt: int
    ) -> None:
        """After an append of unknown outcome: return to append again, raise :class:`_Landed`
        if it landed, or :class:`ConcurrencyConflict`."""
        try:
            self._sync(st)
        except StoreError:
            raise BlobAppendOutcomeUnknown(
                f"the append to stream {st.name!r} at version {expected} may or may not have "
                "landed, and re-reading the stream failed too: re-read the stream before "
                "deciding again (its events are either all there or not at all)"
            ) from None
        self._check_version(st, expected, data, where)
        time.sleep(min(0.05 * 2**attempt, 2.0))  # the service was struggling: back off

    def _landed(self, st: _Stream, data: bytes, where: tuple[int, int]) -> bool:
        number, position = where
        blob = self._container.get_blob_client(_segment_blob(st.name, number))
        try:
            found = blob.download_blob(offset=position, length=len(data)).readall()
        except AzureError:
            raise BlobAppendOutcomeUnknown(
                f"the append to stream {st.name!r} may or may not have landed, and reading "
                "it back failed: re-read the stream before deciding again"
            ) from None
        return found == data

    def _create_segment(self, st: _Stream, seg: _Segment) -> None:
        blob = self._container.get_blob_client(_segment_blob(st.name, seg.number))
        for attempt in range(2):
            try:
                blob.create_append_blob(metadata={_BASE_KEY: str(seg.base)}, if_none_match="*")
                break
            except ResourceExistsError:
                break  # another writer created it: its append position decides who goes first
            except AzureError as exc:
                if attempt or _code(exc) != "ContainerNotFound":
                    self._raise(exc, f"create a segment of stream {st.name!r}")
                self._create_container()
        seg.exists = True
        # Its creation time, so that a blob deleted and created again is told apart from it
        # (one request per segment; an append's answer does not carry it). Best effort: the
        # next download of the segment learns it too.
        with contextlib.suppress(BlobServiceError):
            self._properties(st, seg)

    def _seal(self, st: _Stream, seg: _Segment) -> None:
        blob = self._container.get_blob_client(_segment_blob(st.name, seg.number))
        try:
            blob.seal_append_blob()
        except AzureError as exc:
            self._raise(exc, f"seal a full segment of stream {st.name!r}")
        # Others may have appended before the seal: ``sealed`` is set only by a download that
        # reads the segment to its end, so the next segment's base is never computed too soon.
        seg.etag = None

    def _create_container(self) -> None:
        try:
            self._container.create_container()
        except ResourceExistsError:
            pass  # created meanwhile by another writer
        except AzureError as exc:
            self._raise(exc, "create the container")

    # -- errors ------------------------------------------------------------------------------

    def _raise(self, exc: AzureError, doing: str) -> NoReturn:
        """Raise a :class:`BlobServiceError` for ``exc`` that names no secret."""
        where = f"{self._endpoint}/{self._name}"
        status, code = _status(exc), _code(exc)
        if self._via and proxy_refused(exc):
            message = (
                f"{where}: the {self._via} refused this node's proxy credentials while trying "
                f"to {doing} (HTTP 407 Proxy Authentication Required): set the proxy's user "
                "and password again with shir node proxy (they are not shown here)"
            )
        elif self._via and isinstance(exc, ServiceRequestError):
            message = (
                f"could not reach the Blob endpoint {self._endpoint} through the {self._via} "
                f"to {doing} ({_redact(str(exc))}): check the proxy's address and port "
                "(shir node proxy), that it is running, and that it lets this endpoint through"
            )
        elif isinstance(exc, ServiceRequestError):
            message = (
                f"could not reach the Blob endpoint {self._endpoint} to {doing} "
                f"({_redact(str(exc))}): check BlobEndpoint (or AccountName and EndpointSuffix) "
                "in the connection string, the network, and that the service is running"
            )
        elif isinstance(exc, ServiceResponseError):
            message = (
                f"the connection to {self._endpoint} failed while trying to {doing} "
                f"({_redact(str(exc))}); retry"
            )
        elif isinstance(exc, ClientAuthenticationError) and status is None:
            # Raised before anything was sent: signing with the key, or getting a token, failed.
            if type(exc).__name__ == "AzureSigningError":  # the SDK's (private) signing error
                hint = (
                    "the AccountKey is not a valid base64 account key (it is not shown here): "
                    "copy key1 or key2 again from the storage account's Access keys page"
                )
            else:
                hint = f"the credential could not get a token ({_redact(str(exc))})"
            message = f"{where}: could not sign the request to {doing}: {hint}"
        elif status in (401, 403):
            hint = (
                "the AccountKey, SharedAccessSignature or token is wrong, expired, or lacks "
                "permission on this container (it is not shown here)"
                if self._has_credential
                else "the connection string has no AccountKey or SharedAccessSignature: add one"
            )
            message = (
                f"{where}: the storage account refused to let this store {doing} "
                f"({code or 'access denied'}, HTTP {status}): {hint}"
            )
        else:
            request_id = ""
            response = getattr(exc, "response", None)
            if response is not None:
                request_id = str(response.headers.get("x-ms-request-id") or "")
            detail = (
                f"({code or 'no error code'}, HTTP {status}"
                f"{', request id ' + request_id if request_id else ''})"
            )
            if status is not None and (status >= 500 or status in (408, 429)):
                # Throttling (503 ServerBusy) and failures: nothing the user sent was wrong.
                message = (
                    f"{where}: the Blob service failed to {doing} {detail}: it is throttling "
                    "this account or failing, and the SDK's retries ran out; retry later "
                    "(the client option retry_total sets how often the SDK retries)"
                )
            else:
                message = f"{where}: the Blob service refused to {doing} {detail}"
        raise BlobServiceError(message, status, code or None) from None


class _Landed(Exception):  # control flow inside _append: never escapes it
    """An append whose outcome was unknown turns out to have landed."""


def _version(st: _Stream) -> int:
    tail = st.segments[-1]
    assert tail.index is not None
    return tail.base + tail.index.count


def _count(st: _Stream, i: int) -> int:
    seg = st.segments[i]
    if seg.index is not None:
        return seg.index.count
    return st.segments[i + 1].base - seg.base  # listed, not read: the next one says


def _segment_of(st: _Stream, version: int) -> int:
    """The first segment holding events after ``version`` (the tail if none does)."""
    for i, seg in enumerate(st.segments[:-1]):
        if version < seg.base + _count(st, i):
            return i
    return len(st.segments) - 1


def _follow_seal(st: _Stream) -> bool:
    """If the tail is sealed, index the next segment (maybe not created yet) after it.

    Its base is the sealed tail's final count: the same for every writer.
    """
    tail = st.segments[-1]
    if not tail.sealed or tail.index is None:
        return False
    nxt = _Segment(tail.number + 1, tail.base + tail.index.count, exists=False,
                   index=Index(0, 0, []))
    st.segments.append(nxt)
    return True


def _checkpoint(index: Index | None, record: int) -> tuple[int, int]:
    """The offset and number of the indexed record at or before ``record``."""
    if index is None or not index.checkpoints:
        return 0, 0
    slot = min(record // CHECKPOINT_EVERY, len(index.checkpoints) - 1)
    return index.checkpoints[slot], slot * CHECKPOINT_EVERY


def _base_of(props: BlobProperties) -> int | None:
    value = (props.metadata or {}).get(_BASE_KEY)
    if value is None or not str(value).isdigit():
        return None
    return int(value)


def _describe_bad_connection_string(connection_string: object) -> str:
    # Only key names are repeated, and only when they look like names: a user who pasted a
    # bare key in place of the string must not see it echoed.
    keys = []
    if isinstance(connection_string, str):
        for part in connection_string.split(";"):
            name, sep, _ = part.partition("=")
            if sep and re.fullmatch(r"[A-Za-z]{1,40}", name.strip()):
                keys.append(name.strip())
    found = f"it has the keys {', '.join(keys)}" if keys else "it has no Key=Value pairs"
    return (
        "the Azure Storage connection string is malformed (its content is not shown): "
        f"{found}; expected DefaultEndpointsProtocol, AccountName, and AccountKey or "
        "SharedAccessSignature (plus BlobEndpoint for an emulator), as the portal's Access keys "
        "page shows it"
    )
