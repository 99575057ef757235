"""Where a copy lands: a local folder or an Azure Blob block blob; nothing partial is ever visible.

Theory of operation
-------------------
A sink opens a :class:`SinkWriter` for one job id. The pipeline hands it numbered parts
(``put(part, data)``, parts numbered from 0 in file order; ``data`` then belongs to the writer,
which may keep it until the part is uploaded) and finally ``commit(md5)`` with the
MD5 of the whole content, or ``abort()``.

* :class:`FolderSink` writes the parts in order to a hidden temporary file next to the target
  (``.<name>.<job>.<attempt>.partial``), fsyncs it, renames it over the target and fsyncs the
  folder. Until the rename nothing at the target name changes; a killed copy leaves only the
  hidden temporary file, which the next run of the same job deletes. Each attempt has its own
  file, so two deliveries of one job running at once cannot mix their bytes (the last rename
  wins, with a whole file).
* :class:`BlobSink` stages every part as a block of the block blob (bounded parallel uploads:
  ``max_parallel`` parts in flight, each held in memory until staged)
  and commits the block list once at the end, with ``Content-MD5`` and the job id in the
  metadata. Uncommitted blocks are invisible to readers. A block id is derived from the job id,
  the part number and the part's own MD5, so a retried job with the same id finds the blocks
  its first attempt staged (``get_block_list("uncommitted")``) and skips uploading any part
  whose id is already there: its content is then known to be identical. A blob already
  committed by the same job id is left as it is (the retry is a no-op).

Errors are :class:`SinkError`, naming the sink (never its key).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shir.core.errors import ShirError

if TYPE_CHECKING:
    from shir.adapters.proxy import ClientProxy

__all__ = ["BlobSink", "FolderSink", "SinkError", "SinkWriter", "open_blob_service"]


class SinkError(ShirError):
    """The sink refused or failed; the message names it and what to do."""


class SinkWriter:
    """One job's output in progress: ``put`` parts, then ``commit`` or ``abort``."""

    already_done = False  #: the same job committed this output before: nothing to write

    def put(self, part: int, data: bytes | bytearray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def commit(self, md5: bytes, rows: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _job_tag(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()[:16]


class FolderSink:
    """A file at ``path`` on the local file system."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"folder sink {self.path}"

    def open(self, job_id: str) -> SinkWriter:
        folder = self.path.parent
        if not folder.is_dir():
            raise SinkError(f"{self.describe()}: the folder {folder} does not exist")
        if self.path.is_dir():
            raise SinkError(f"{self.describe()}: the target is a folder; name a file")
        prefix = f".{self.path.name}.{_job_tag(job_id)}."
        for stale in folder.glob(f"{glob.escape(prefix)}*.partial"):  # of killed attempts
            with contextlib.suppress(OSError):
                stale.unlink()
        # each attempt writes its own file: two deliveries of one job at once never mix bytes
        return _FolderWriter(self.path, folder / f"{prefix}{uuid.uuid4().hex[:12]}.partial")


class _FolderWriter(SinkWriter):
    def __init__(self, path: Path, temp: Path) -> None:
        self.path, self.temp = path, temp
        self._next = 0
        try:
            self._file = open(temp, "wb")  # noqa: SIM115 - closed in commit/abort
        except OSError as exc:
            raise SinkError(f"folder sink {path}: cannot write {temp}: {exc.strerror}") from None

    def put(self, part: int, data: bytes | bytearray) -> None:
        if part != self._next:
            raise SinkError(f"folder sink {self.path}: part {part} came before {self._next}")
        self._next += 1
        try:
            self._file.write(data)
        except OSError as exc:
            raise SinkError(f"folder sink {self.path}: write failed: {exc.strerror}") from None

    def commit(self, md5: bytes, rows: int) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.temp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SinkError(f"folder sink {self.path}: commit failed: {exc.strerror}") from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.temp.unlink()


def open_blob_service(connection_string: str, proxy: ClientProxy | None = None) -> Any:
    """A ``BlobServiceClient`` from a connection string, through ``proxy`` when given (the
    node's); a bad string is a :class:`SinkError`."""
    try:
        from azure.storage.blob import BlobServiceClient
    except ImportError:
        raise SinkError("Blob sinks need azure-storage-blob: pip install 'shir[azure]'") from None
    try:
        return BlobServiceClient.from_connection_string(
            connection_string, **(proxy.blob_options() if proxy is not None else {}))
    except (ValueError, TypeError):
        raise SinkError("Blob sink: the connection string is not a storage connection string "
                        "(expected AccountName=...;AccountKey=...; content not shown)") from None


class BlobSink:
    """A block blob ``container/blob``; ``max_parallel`` parts upload at a time. ``metadata``
    is recorded on the blob at the commit, beside the job id and the row count. ``via`` names
    the proxy ``service`` goes through (``ClientProxy.describe()``), for errors."""

    def __init__(self, service: Any, container: str, blob: str, *, max_parallel: int = 4,
                 create_container: bool = True, metadata: Mapping[str, str] | None = None,
                 via: str = "") -> None:
        self.service, self.container, self.blob = service, container, blob
        self.max_parallel = max_parallel
        self.create_container = create_container
        self.metadata = dict(metadata or {})
        self.via = via

    def describe(self) -> str:
        return f"Blob sink {self.service.account_name}/{self.container}/{self.blob}"

    def client(self) -> Any:
        return self.service.get_blob_client(self.container, self.blob)

    def open(self, job_id: str) -> SinkWriter:
        from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

        client = self.client()
        try:
            if self.create_container:
                with contextlib.suppress(ResourceExistsError):
                    self.service.get_container_client(self.container).create_container()
            try:
                props = client.get_blob_properties()
                if props.metadata.get("shir_job_id") == job_id:
                    return _DoneWriter()
            except ResourceNotFoundError:
                pass
            try:
                _, uncommitted = client.get_block_list("uncommitted")
                staged = {b.id for b in uncommitted}
            except ResourceNotFoundError:
                staged = set()
        except AzureError as exc:
            raise SinkError(f"{self.describe()}: the service refused: "
                            f"{_reason(exc, self.via)}") from None
        return _BlobWriter(self, client, _job_tag(job_id), job_id, staged)


def _reason(exc: Exception, via: str = "") -> str:
    from azure.core.exceptions import ServiceRequestError

    from shir.adapters.proxy import proxy_refused, redact_userinfo

    if via and proxy_refused(exc):
        return (f"the {via} refused this node's proxy credentials (HTTP 407 Proxy "
                "Authentication Required): set its user and password again with shir node "
                "proxy (they are not shown here)")
    code = getattr(exc, "error_code", None)
    status = getattr(exc, "status_code", None)
    text = redact_userinfo(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
    if via and isinstance(exc, ServiceRequestError):
        return (f"could not connect through the {via} ({text[:200]}): check its address and "
                "port (shir node proxy) and that it is running")
    return f"{code or type(exc).__name__} (HTTP {status}): {text[:200]}" if status else text[:200]


class _DoneWriter(SinkWriter):
    already_done = True

    def put(self, part: int, data: bytes | bytearray) -> None:
        pass

    def commit(self, md5: bytes, rows: int) -> None:
        pass

    def abort(self) -> None:
        pass


class _BlobWriter(SinkWriter):
    def __init__(self, sink: BlobSink, client: Any, tag: str, job_id: str, staged: set[str]):
        self.sink, self.client, self.tag, self.job_id = sink, client, tag, job_id
        self.staged = staged
        self.ids: list[str] = []
        self.skipped_parts = 0
        self._pool = ThreadPoolExecutor(sink.max_parallel, thread_name_prefix="shir-blob-put")
        # bounds memory: a part waits for a free upload, none queue (a queue bought no speed on
        # loopback and cost up to max_parallel more parts of peak RSS)
        self._slots = threading.BoundedSemaphore(sink.max_parallel)
        self._futures: list[Future[None]] = []
        self._error: BaseException | None = None

    def put(self, part: int, data: bytes | bytearray) -> None:
        if self._error is not None:
            raise self._error
        digest = hashlib.md5(data).hexdigest()[:16]
        block_id = f"{self.tag}-{part:06d}-{digest}"  # the SDK base64-encodes it
        self.ids.append(block_id)
        if block_id in self.staged:  # staged by an earlier attempt of this job: same bytes
            self.skipped_parts += 1
            return
        self._slots.acquire()
        future = self._pool.submit(self._stage, block_id, data)
        future.add_done_callback(lambda f: self._slots.release())
        self._futures.append(future)
        self._futures = [f for f in self._futures if not f.done() or f.exception()]

    def _stage(self, block_id: str, data: bytes | bytearray) -> None:
        from azure.core.exceptions import AzureError

        try:
            self.client.stage_block(block_id, data, length=len(data), validate_content=False)
        except AzureError as exc:
            self._error = SinkError(f"{self.sink.describe()}: staging a block failed: "
                                    f"{_reason(exc, self.sink.via)}")
            raise self._error from None

    def _drain(self) -> None:
        for f in self._futures:
            f.exception()
        self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error

    def commit(self, md5: bytes, rows: int) -> None:
        from azure.core.exceptions import AzureError
        from azure.storage.blob import BlobBlock, ContentSettings

        self._drain()
        try:
            self.client.commit_block_list(
                [BlobBlock(block_id=i) for i in self.ids],
                content_settings=ContentSettings(content_md5=bytearray(md5)),
                metadata={**self.sink.metadata, "shir_job_id": self.job_id,
                          "shir_rows": str(rows)},
            )
        except AzureError as exc:
            raise SinkError(f"{self.sink.describe()}: committing the blob failed: "
                            f"{_reason(exc, self.sink.via)}") from None

    def abort(self) -> None:
        # Staged blocks stay uncommitted (invisible; the service drops them after a week) so a
        # retry of this job can reuse them.
        self._pool.shutdown(wait=True, cancel_futures=True)
