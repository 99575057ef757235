"""Where a copy lands: a local folder or an Azure Blob block blob; nothing partial is ever visible.

Theory of operation
-------------------
A sink opens a :class:`SinkWriter` for one job id. The pipeline hands it numbered parts
(``put(part, data, through_md5)``, parts numbered from 0 in file order; ``data`` then belongs
to the writer, which may keep it until the part is uploaded; ``through_md5`` is the MD5 of the
whole output up to the end of this part) and finally ``commit(md5)`` with the MD5 of the whole
content, or ``abort()``.

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
  the part number, the part's length and the MD5 of the output through the part's end (equal
  digests: equal output up to there; with the length, the part's bytes are equal too). So a
  retried job with the same id finds the blocks its first attempt staged
  (``get_block_list("uncommitted")``) and skips uploading any part whose id is already there:
  its content is then known to be identical. The digest is the pipeline's running MD5 of the
  content, so no part is hashed twice (MD5 runs at about 360 MiB/s here: a second pass cost
  0.2-0.3 us of CPU per CSV row). A blob already
  committed by the same job id is left as it is (the retry is a no-op).

Errors are :class:`SinkError`, naming the sink (never its key).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import ipaddress
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs

from shir.core.errors import ShirError

if TYPE_CHECKING:
    from shir.adapters.proxy import ClientProxy

__all__ = [
    "BlobSink",
    "BlobUrl",
    "FolderSink",
    "SinkError",
    "SinkWriter",
    "check_permissions",
    "open_blob_service",
    "scrub_sas",
]


class SinkError(ShirError):
    """The sink refused or failed; the message names it and what to do."""


class SinkWriter:
    """One job's output in progress: ``put`` parts, then ``commit`` or ``abort``."""

    already_done = False  #: the same job committed this output before: nothing to write

    def put(self, part: int, data: bytes | bytearray,
            through_md5: bytes) -> None:  # pragma: no cover - interface
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

    def put(self, part: int, data: bytes | bytearray, through_md5: bytes) -> None:
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


@attrs.frozen(repr=False)
class BlobUrl:
    """A Blob or container URL split into what the SDK takes: ``account_url`` (with the account
    in the path for Azurite's ``http://127.0.0.1:PORT/ACCOUNT``), ``container``, ``blob`` ("" for
    a container URL) and the SAS token (``None`` without one). Its repr shows no token."""

    account_url: str
    container: str
    blob: str
    sas: str | None

    @classmethod
    def parse(cls, url: str) -> BlobUrl:
        """Split ``https://ACCOUNT.blob.core.windows.net/CONTAINER[/BLOB][?SAS]`` (or the
        path-style form on an IP address or localhost); raises :class:`SinkError`."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not host:
            raise SinkError("Blob URL: expected https://ACCOUNT.blob.core.windows.net/CONTAINER/"
                            "BLOB?SAS (content not shown)")
        path = parts.path.lstrip("/")
        base = f"{parts.scheme}://{parts.netloc}"
        if host == "localhost" or _is_ip(host):  # Azurite, path-style: the account comes first
            account, _, path = path.partition("/")
            base += "/" + account
        container, _, blob = path.partition("/")
        if not container:
            raise SinkError(f"Blob URL {base}: it names no container")
        return cls(base, unquote(container), unquote(blob), parts.query or None)

    def permissions(self) -> str | None:
        """The SAS token's ``sp`` (None: no token, or a token that does not say)."""
        return dict(parse_qsl(self.sas or "")).get("sp")

    def __repr__(self) -> str:
        token = "***" if self.sas else None
        return f"BlobUrl({self.account_url}/{self.container}/{self.blob}, sas={token})"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_SAS_SIG = re.compile(r"(?i)(sig(?:=|%3D))[^&\s'\"<>]+")
_NEEDS = {"r": "read", "w": "write", "d": "delete"}


def scrub_sas(text: str) -> str:
    """``text`` with every SAS signature (``sig=...``) replaced by ``***``."""
    return _SAS_SIG.sub(r"\1***", text)


class _ScrubSasFilter(logging.Filter):
    """Rewrites a log record without SAS signatures (urllib3 logs each request's full URL at
    DEBUG; the SDK redacts its own, this is the guard for any other)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "sig=" in text.lower() or "sig%3d" in text.lower():
            record.msg, record.args = scrub_sas(text), None
        return True


_SCRUB_FILTER = _ScrubSasFilter()
# Loggers that write request URLs; a filter applies to the records of its own logger only.
_URL_LOGGERS = ("urllib3.connectionpool", "azure.core.pipeline.policies.http_logging_policy")


def _guard_logs() -> None:
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if _SCRUB_FILTER not in logger.filters:
            logger.addFilter(_SCRUB_FILTER)


def check_permissions(url: BlobUrl, needed: str, what: str) -> None:
    """Refuse, before any request, a SAS token whose ``sp`` lacks a permission in ``needed``."""
    granted = url.permissions()
    if granted is None:
        return
    missing = [_NEEDS[p] for p in needed if p not in granted]
    if missing:
        raise SinkError(
            f"{what}: the SAS token does not grant {' or '.join(missing)} permission (it grants "
            f"sp={granted}; this needs {' and '.join(_NEEDS[p] for p in needed)}: sp={needed}); "
            "nothing was written")


class BlobSink:
    """A block blob ``container/blob``; ``max_parallel`` parts upload at a time. ``metadata``
    is recorded on the blob at the commit, beside the job id and the row count. Built from a
    service client, or from a Blob URL with a SAS token (:meth:`from_url`). ``via`` names the
    proxy the client goes through (``ClientProxy.describe()``), for errors."""

    def __init__(self, service: Any, container: str, blob: str, *, max_parallel: int = 4,
                 create_container: bool = True, metadata: Mapping[str, str] | None = None,
                 via: str = "") -> None:
        self._init(service.get_container_client(container), blob, max_parallel=max_parallel,
                   create_container=create_container, metadata=metadata, via=via)

    def _init(self, containers: Any, blob: str, *, max_parallel: int = 4,
              create_container: bool = True, metadata: Mapping[str, str] | None = None,
              via: str = "") -> None:
        self._containers = containers
        self.account_name: str = containers.account_name
        self.container: str = containers.container_name
        self.blob = blob
        self.max_parallel = max_parallel
        self.create_container = create_container
        self.metadata = dict(metadata or {})
        self.via = via

    @classmethod
    def from_url(cls, url: str | BlobUrl, *, permissions: str = "rw", max_parallel: int = 4,
                 metadata: Mapping[str, str] | None = None, proxy: ClientProxy | None = None,
                 **client_options: Any) -> BlobSink:
        """The blob a URL names, with the URL's SAS token as its credential (never shown: not
        in :meth:`describe`, the repr or an error). ``permissions`` the SAS must grant (a sink
        needs ``rw``: it reads what an earlier attempt left; a load needs ``r``) is checked
        before any request. The container must exist (a SAS cannot create it).
        ``proxy``: the node's, as for :func:`open_blob_service`. ``client_options`` go to the
        SDK's client (``retry_total``, ``connection_timeout``...)."""
        from azure.storage.blob import ContainerClient

        parsed = url if isinstance(url, BlobUrl) else BlobUrl.parse(url)
        _guard_logs()
        options = {**(proxy.blob_options() if proxy is not None else {}), **client_options}
        containers = ContainerClient(parsed.account_url, parsed.container, credential=parsed.sas,
                                     **options)
        sink = cls.__new__(cls)
        sink._init(containers, parsed.blob, max_parallel=max_parallel, create_container=False,
                   metadata=metadata, via=proxy.describe() if proxy is not None else "")
        if not parsed.blob:
            raise SinkError(f"{sink.describe()}: the URL names a container, not a blob")
        check_permissions(parsed, permissions, sink.describe())
        return sink

    def describe(self) -> str:
        return f"Blob sink {self.account_name}/{self.container}/{self.blob}"

    def _refused(self, doing: str, exc: Exception) -> SinkError:
        return SinkError(f"{self.describe()}: {doing}: {_reason(exc, self.via)}")

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    def client(self) -> Any:
        return self._containers.get_blob_client(self.blob)

    def committed_by(self, job_id: str) -> int | None:
        """The row count of the blob when job ``job_id`` committed it, else None."""
        from azure.core.exceptions import AzureError

        try:
            return self._committed_by(self.client(), job_id)
        except AzureError as exc:
            raise self._refused("the service refused", exc) from None

    @staticmethod
    def _committed_by(client: Any, job_id: str) -> int | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            metadata = client.get_blob_properties().metadata
        except ResourceNotFoundError:
            return None
        if metadata.get("shir_job_id") != job_id:
            return None
        return int(metadata.get("shir_rows") or 0)

    def delete(self) -> None:
        """Delete the blob (one that does not exist is fine); a refusal is a SinkError."""
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            self.client().delete_blob()
        except ResourceNotFoundError:
            pass
        except AzureError as exc:
            raise self._refused("cannot delete it", exc) from None

    def download(self) -> Iterator[bytes]:
        """The blob's bytes in chunks (a load's input); a refusal is a :class:`SinkError`."""
        from azure.core.exceptions import AzureError

        try:
            return self.client().download_blob().chunks()  # type: ignore[no-any-return]
        except AzureError as exc:
            raise self._refused("cannot read it", exc) from None

    def open(self, job_id: str) -> SinkWriter:
        from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

        client = self.client()
        try:
            if self.create_container:
                with contextlib.suppress(ResourceExistsError):
                    self._containers.create_container()
            if self._committed_by(client, job_id):
                return _DoneWriter()
            try:
                _, uncommitted = client.get_block_list("uncommitted")
                staged = {b.id for b in uncommitted}
            except ResourceNotFoundError:
                staged = set()
        except AzureError as exc:
            raise self._refused("the service refused", exc) from None
        return _BlobWriter(self, client, _job_tag(job_id), job_id, staged)


# What a refusal means for a copy, by the service's error code.
_HINTS = {
    "AuthorizationPermissionMismatch": "the SAS token does not grant the permission this needs "
                                       "(a sink needs read and write, a load read)",
    "AuthorizationFailure": "the SAS token was refused: expired, not yet valid, or for "
                            "another blob or container",
    "AuthenticationFailed": "the SAS token or key was refused: expired, not yet valid, or "
                            "signed for another resource",
    "AuthorizationResourceTypeMismatch": "the SAS token is not valid for this kind of resource",
    "BlobNotFound": "the blob does not exist",
    "ContainerNotFound": "the container does not exist (a SAS cannot create it)",
}


def _reason(exc: Exception, via: str = "") -> str:
    """The service's refusal in one line, without any SAS signature or proxy credentials;
    ``via``: the proxy the client goes through (its refusals are named)."""
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
        return scrub_sas(f"could not connect through the {via} ({text[:200]}): check its "
                         "address and port (shir node proxy) and that it is running")
    hint = _HINTS.get(str(code))
    if hint:
        text = f"{hint} ({text[:160]})"
    return scrub_sas(f"{code or type(exc).__name__} (HTTP {status}): {text[:300]}" if status
                     else text[:200])


class _DoneWriter(SinkWriter):
    already_done = True

    def put(self, part: int, data: bytes | bytearray, through_md5: bytes) -> None:
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

    def put(self, part: int, data: bytes | bytearray, through_md5: bytes) -> None:
        if self._error is not None:
            raise self._error
        # 50 characters, as Blob wants every id of a blob the same length (the SDK base64s it)
        block_id = f"{self.tag}-{part:06d}-{len(data):09d}-{through_md5.hex()[:16]}"
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
