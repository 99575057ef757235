"""An event store on Azure Blob Storage: each stream a chain of append blobs.

Theory of operation
-------------------
Each stream is a chain of append blobs ("segments") holding the framed records of
:mod:`shir.adapters.framing`, plus one block blob for its snapshot. Every append is one
*Append Block* conditional on the segment's length, so the service, not the client, decides
which of two racing writers lands; a full segment is sealed and the next one continues it.
Damage is never skipped, and no error names a key or SAS token.

The store is read one part at a time, each module saying what it holds and why:

- :mod:`shir.adapters.blobstore_layout`: the blob names, the segments' metadata, why append
  blobs and why segments, and the in-memory index of a stream's segments (no requests);
- :mod:`shir.adapters.blobstore_service`: the container handle and the errors it raises, told
  without secrets;
- :mod:`shir.adapters.blobstore_read`: listing, downloading and indexing segments, and the
  damage they may hold;
- :mod:`shir.adapters.blobstore_append`: the conditional appends, rollover to a new segment, and
  appends whose answer was lost;
- this module: the :class:`~shir.core.store.EventStore` port composing them, and snapshots
  (one block blob a stream, replaced whole by Put Blob). Import the store and its errors from
  here: this module says what to install when the Azure SDK is missing.

One store object serialises its own calls with a lock, so threads may share one; any number of
store objects, in any number of processes, may write one stream.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

try:
    from azure.core.exceptions import AzureError, HttpResponseError, ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient, BlobType, ContainerClient
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shir.adapters.blobstore needs the Azure Storage SDK (azure-storage-blob): "
        "pip install 'shir[azure]'"
    ) from exc

from shir.adapters.blobstore_append import BlobAppendOutcomeUnknown, SegmentAppender
from shir.adapters.blobstore_layout import (
    DEFAULT_SEGMENT_APPENDS,
    MAX_APPEND_BYTES,
    MAX_BLOCKS_PER_BLOB,
    Stream,
    segment_blob,
    snapshot_blob,
)
from shir.adapters.blobstore_read import CorruptBlobStream, SegmentReader, TornBlobTail
from shir.adapters.blobstore_service import (
    BlobContainer,
    BlobServiceError,
    InvalidConnectionString,
    InvalidContainerName,
    check_container_name,
    describe_bad_connection_string,
    status_of,
)
from shir.adapters.closing import CloseOnExit
from shir.adapters.framing import CorruptSnapshot, encode_frames, parse_snapshot, snapshot_frame
from shir.core.store import Snapshot, StoreError, check_append, check_snapshot

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
        self._container = BlobContainer(container, via)
        self._reader = SegmentReader(self._container)
        self._appender = SegmentAppender(self._container, self._reader, segment_max_appends)
        self._mutex = threading.Lock()
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
        check_container_name(container)
        try:
            service = BlobServiceClient.from_connection_string(
                connection_string, **client_options
            )
        except (ValueError, TypeError, AttributeError):
            raise InvalidConnectionString(describe_bad_connection_string(connection_string)) \
                from None
        return cls(service.get_container_client(container),
                   segment_max_appends=segment_max_appends, via=via)

    def __repr__(self) -> str:
        return (
            f"BlobEventStore(endpoint={self._container.endpoint!r}, "
            f"container={self._container.name!r})"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the SDK client's connections. Safe to call twice; the store is unusable after."""
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._reader.clear()
                self._container.client.close()

    @property
    def container_name(self) -> str:
        """The container holding the streams."""
        return self._container.name

    def container_exists(self) -> bool:
        """Whether the container exists, by one request that also proves the endpoint and the
        credential work (else :class:`BlobServiceError`, saying what failed)."""
        with self._mutex:
            self._check_open()
            try:
                # Listing (not Get Container Properties) because a container SAS may list but
                # not read the container's properties; the store lists blobs itself anyway.
                pages = self._container.client.list_blobs(results_per_page=1).by_page()
                next(iter(pages), None)
            except ResourceNotFoundError:
                return False
            except AzureError as exc:
                self._container.fail(exc, "list the container")
            return True

    def blob_names(self, stream: str) -> list[str]:
        """The names of the blobs holding ``stream``'s events, in order (for tools and tests)."""
        with self._mutex:
            st = self._stream(stream)
            self._reader.sync(st)
            return [segment_blob(stream, s.number) for s in st.segments if s.exists]

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
            if tail.index is None or expected_version != st.version() or not events:
                self._reader.sync(st)
            check_append(stream, expected_version, st.version())
            if not events:
                return expected_version
            data, sizes = encode_frames(events)  # codec errors surface before any request
            if len(data) > MAX_APPEND_BYTES:
                raise StoreError(
                    f"{len(events)} event(s) encode to {len(data)} bytes, over the "
                    f"{MAX_APPEND_BYTES} bytes one atomic Append Block takes: keep large data "
                    "out of events"
                )
            return self._appender.append(st, data, sizes, expected_version)

    def read(self, stream: str, from_version: int = 0) -> list[object]:
        """The events after ``from_version``, downloading only the segments' bytes after it."""
        if type(from_version) is not int or from_version < 0:
            raise StoreError(f"from_version must be a non-negative int, got {from_version!r}")
        with self._mutex:
            return self._reader.read(self._stream(stream), from_version)

    def version(self, stream: str) -> int:
        """How many events the stream holds now (one conditional request when unchanged)."""
        with self._mutex:
            st = self._stream(stream)
            self._reader.sync(st)
            return st.version()

    def save_snapshot(self, stream: str, snapshot: Snapshot) -> None:
        """Replace the stream's snapshot blob (Put Blob replaces a blob atomically)."""
        with self._mutex:
            st = self._stream(stream)
            if st.segments[-1].index is None or snapshot.version > st.version():
                self._reader.sync(st)
            check_snapshot(stream, snapshot, st.version())
            frame = snapshot_frame(snapshot)
            blob = self._container.blob(snapshot_blob(stream))
            self._container.write(
                lambda: blob.upload_blob(frame, blob_type=BlobType.BLOCKBLOB, overwrite=True),
                f"write the snapshot of {stream!r}",
            )

    def load_snapshot(self, stream: str) -> Snapshot | None:
        """The stream's snapshot, or ``None``; :class:`CorruptSnapshot` if it is damaged."""
        with self._mutex:
            st = self._stream(stream)
            name = snapshot_blob(stream)
            try:
                frame = self._container.blob(name).download_blob().readall()
            except HttpResponseError as exc:
                if status_of(exc) == 404:
                    return None
                self._container.fail(exc, f"read the snapshot of {stream!r}")
            except AzureError as exc:
                self._container.fail(exc, f"read the snapshot of {stream!r}")
            where = self._container.where(name)
            snapshot = parse_snapshot(where, frame)
            if st.segments[-1].index is None or snapshot.version > st.version():
                self._reader.sync(st)
            if snapshot.version > st.version():
                raise CorruptSnapshot(
                    f"{where}: snapshot at version {snapshot.version} is beyond the "
                    f"stream's {st.version()} events (were its segments deleted?); delete the "
                    "snapshot blob and replay the stream from the start"
                )
            return snapshot

    def _stream(self, stream: str) -> Stream:
        """The stream's index (listed on first use)."""
        self._check_open()
        return self._reader.open(stream)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(
                f"the BlobEventStore on container {self._container.name!r} is closed"
            )
