"""The node host's job kind ``copy``: parse a job's spec, resolve its credentials, run the copy.

Theory of operation
-------------------
A ``copy`` job's parameters are a small JSON object (bytes in the log, never a secret), parsed
and validated by :func:`parse_copy_spec` into a :class:`CopyJobSpec` before anything connects.
Two directions:

* out: ``{"source": ODBC, "query": SQL, "sink": SINK, "format": "csv"|"jsonl"|"parquet"}``
* load: ``{"from": SINK, "format": ..., "target": ODBC, "table": NAME}``
* staged (:mod:`shir.adapters.copy_staged`): ``{"source": ODBC, "query": SQL, "staging":
  CONTAINER, "target": ODBC, "target_credential": ID, "table": NAME, "format": ...}``, where
  ``CONTAINER`` is ``{"container": C, "credential": ID}`` (a connection string) or
  ``{"credential": ID}`` (a container SAS URL with ``sp=rwd``), with an optional ``"blob"``:
  a path prefix for the staged blob

``SINK`` is ``{"folder": "/abs/path/file.csv"}`` or ``{"container": C, "blob": B,
"credential": ID}`` where credential ``ID`` holds the storage connection string; or
``{"blob": B, "credential": ID}`` with a container SAS URL in ``ID``, or ``{"credential": ID}``
with a blob SAS URL (the token stays in the credential store, never in the spec). The ODBC
connection strings carry no password; ``"credential": ID`` beside them names the credential
whose plaintext is the password. Options: ``"csv": {"delimiter", "quote", "encoding", "null",
"header"}``, ``"part_size_bytes"``, ``"batch_rows"``; a load's ``"transaction_rows"`` (commit
every that many rows, resumable; default: one transaction).

:func:`run_copy_job` resolves each credential through the caller's ``resolve_credential`` (the
node's credential store: :func:`store_resolver`), runs :func:`~shir.adapters.copy.copy_query`
or :func:`~shir.adapters.copy_load.load_file` with the **job id** as the idempotency key, so a
redelivery of the same job (any delivery number) resumes the staged blocks, finds the output
committed and does nothing, or finds the load's marker and inserts nothing (or, loading in
several transactions, goes on after the rows committed): never a duplicate.
The delivery number goes into the committed blob's metadata, for the record. ``cancel`` (the
lease was lost) stops the copy and commits nothing; it stops a load between batches, rolling
back the transaction in progress.

Every failure is a :class:`CopyJobError` naming the part at fault (``spec``, ``credential``,
``source``, ``target``, ``format``, ``sink``, ``cancelled``) and whether a redelivery may
succeed (``retryable``); its message never holds a password or key.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from shir.adapters.copy import DEFAULT_PART_SIZE_BYTES
from shir.core.errors import ShirError

if TYPE_CHECKING:
    from shir.adapters.proxy import ClientProxy

__all__ = [
    "CopyJobError",
    "CopyJobResult",
    "CopyJobSpec",
    "SinkSpec",
    "parse_copy_spec",
    "run_copy_job",
    "store_resolver",
]

MAX_SPEC_BYTES = 64 * 1024  # a spec is a few hundred bytes; bound what is parsed
_PARTS = ("spec", "credential", "source", "target", "format", "sink", "cancelled")


class CopyJobError(ShirError):
    """A copy job failed; ``part`` names what was at fault, ``retryable`` whether a
    redelivery may succeed. Nothing was committed."""

    def __init__(self, part: str, message: str, *, retryable: bool = False) -> None:
        assert part in _PARTS
        super().__init__(f"copy job: {part}: {message}")
        self.part = part
        self.retryable = retryable


@attrs.frozen
class SinkSpec:
    """A folder file (``path``) or a blob (``container``/``blob`` with a ``credential`` id
    holding the storage connection string)."""

    path: str | None = None
    container: str | None = None
    blob: str | None = None
    credential: str | None = None


@attrs.frozen
class CopyJobSpec:
    """A validated ``copy`` job: out (``query`` into ``sink``) or load (``sink`` into
    ``table``). ``odbc`` is the source (out) or target (load) connection string, without
    password; ``odbc_credential`` the id of the credential holding it."""

    odbc: str
    odbc_credential: str | None
    sink: SinkSpec
    format: str
    query: str | None = None
    table: str | None = None
    csv: Mapping[str, Any] = attrs.field(factory=dict)
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES
    batch_rows: int = 10_000
    engine: str = "auto"
    transaction_rows: int | None = None
    staging: SinkSpec | None = None  #: a staged copy's interim container
    target: str | None = None  #: a staged copy's target connection string, without password
    target_credential: str | None = None

    @property
    def direction(self) -> str:
        if self.staging is not None:
            return "staged"
        return "out" if self.query is not None else "load"


def _bad(message: str) -> CopyJobError:
    return CopyJobError("spec", message)


def _text(data: Mapping[str, Any], key: str, *, required: bool = True,
          limit: int = 16_384) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _bad(f"{key!r} must be a non-empty string of at most {limit} characters")
    return value


def _credential_id(data: Mapping[str, Any], key: str) -> str | None:
    from shir.adapters.protect import InvalidCredentialId, check_credential_id

    value = _text(data, key, required=False, limit=128)
    if value is None:
        return None
    try:
        return check_credential_id(value)
    except InvalidCredentialId as exc:
        raise _bad(f"{key!r}: {exc}") from None


def _int(data: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(f"{key!r} must be an integer from {low} to {high}")
    return value


def _sink(value: Any, key: str) -> SinkSpec:
    if not isinstance(value, dict):
        raise _bad(f"{key!r} must be an object: {{\"folder\": PATH}} or "
                   "{\"container\": C, \"blob\": B, \"credential\": ID}")
    if "folder" in value:
        path = _text(value, "folder")
        assert path is not None
        if not path.startswith("/"):
            raise _bad(f"{key!r}: the folder path must be absolute")
        return SinkSpec(path=path)
    return SinkSpec(container=_text(value, "container", required=False, limit=63),
                    blob=_text(value, "blob", required=False, limit=1024),
                    credential=_credential_id(value, "credential") or _need(key))


def _need(key: str) -> str:
    raise _bad(f"{key!r}: a blob needs 'credential', the id of the credential holding the "
               "storage connection string or a SAS URL")


def blob_sink(spec: SinkSpec, secret: str, *, permissions: str,
              metadata: Mapping[str, str] | None = None, proxy: ClientProxy | None = None
              ) -> Any:
    """The :class:`~shir.adapters.copy_sinks.BlobSink` of a blob sink spec whose credential's
    plaintext is ``secret``: a storage connection string (with ``container`` and ``blob``), a
    container SAS URL (with ``blob``) or a blob SAS URL (alone); through ``proxy`` (the
    node's) when given."""
    from shir.adapters.copy_sinks import BlobSink, BlobUrl, open_blob_service

    if not secret.lower().startswith(("http://", "https://")):
        if not (spec.container and spec.blob):
            raise _bad("a blob whose credential is a connection string needs 'container' and "
                       "'blob'")
        return BlobSink(open_blob_service(secret, proxy), spec.container, spec.blob,
                        metadata=metadata, via=proxy.describe() if proxy is not None else "")
    url = BlobUrl.parse(secret)
    if spec.container or (url.blob and spec.blob):
        raise _bad(f"credential {spec.credential!r} is a SAS URL that names the container"
                   f"{' and the blob' if url.blob else ''}: leave those out of the spec")
    if not (url.blob or spec.blob):
        raise _bad(f"credential {spec.credential!r} is a container SAS URL: give 'blob'")
    return BlobSink.from_url(attrs.evolve(url, blob=url.blob or spec.blob or ""),
                             permissions=permissions, metadata=metadata, proxy=proxy)


def _no_password(conn: str, key: str) -> str:
    from shir.adapters.odbc import InvalidConnectionString, parse_connection_string

    try:
        pairs = parse_connection_string(conn)
    except InvalidConnectionString as exc:
        raise _bad(f"{key!r}: {exc}") from None
    if any(k in pairs for k in ("pwd", "password")):
        raise _bad(f"{key!r} holds a password: a job spec is stored in the log; keep the "
                   "password in the credential store and name it with 'credential'")
    return conn


def parse_copy_spec(raw: bytes | str | Mapping[str, Any]) -> CopyJobSpec:
    """The :class:`CopyJobSpec` of a job's parameters (JSON bytes or text, or a mapping).

    Raises :class:`CopyJobError` (part ``spec``) naming the field that is wrong.
    """
    if isinstance(raw, bytes | str):
        if len(raw) > MAX_SPEC_BYTES:
            raise _bad(f"the spec is larger than {MAX_SPEC_BYTES} bytes")
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _bad("the spec is not JSON") from None
    if not isinstance(raw, Mapping):
        raise _bad("the spec must be a JSON object")
    from shir.adapters.copy_formats import ENGINES, FORMATS

    fmt = raw.get("format")
    if fmt not in FORMATS:
        raise _bad(f"'format' must be one of {', '.join(FORMATS)}")
    csv = raw.get("csv", {})
    allowed = {"delimiter", "quote", "encoding", "null", "header"}
    if not isinstance(csv, dict) or set(csv) - allowed:
        raise _bad(f"'csv' must be an object with keys among {', '.join(sorted(allowed))}")
    common = {"format": fmt, "csv": csv,
              "part_size_bytes": _int(raw, "part_size_bytes", DEFAULT_PART_SIZE_BYTES, 64 << 10,
                                      256 << 20),
              "batch_rows": _int(raw, "batch_rows", 10_000, 1, 1_000_000)}
    per_txn = (None if raw.get("transaction_rows") is None
               else _int(raw, "transaction_rows", 0, 1, 1_000_000_000))
    engine = raw.get("engine", "auto")
    if engine not in ENGINES:
        raise _bad(f"'engine' must be one of {', '.join(ENGINES)}")
    if "staging" in raw:
        if "sink" in raw or "from" in raw:
            raise _bad("a staged copy takes 'source', 'query', 'staging', 'target' and "
                       "'table' (not 'sink' or 'from')")
        staging = _sink(raw.get("staging"), "staging")
        if staging.path is not None:
            raise _bad("'staging' must be a Blob container, not a folder")
        return CopyJobSpec(odbc=_no_password(_text(raw, "source") or "", "source"),
                           odbc_credential=_credential_id(raw, "credential"),
                           sink=staging, staging=staging, query=_text(raw, "query"),
                           target=_no_password(_text(raw, "target") or "", "target"),
                           target_credential=_credential_id(raw, "target_credential"),
                           table=_text(raw, "table", limit=400), engine=engine,
                           transaction_rows=per_txn, **common)
    if "query" in raw:
        if "from" in raw or "table" in raw:
            raise _bad("give 'source', 'query' and 'sink' (out) or 'from', 'target' and "
                       "'table' (load), not both")
        return CopyJobSpec(odbc=_no_password(_text(raw, "source") or "", "source"),
                           odbc_credential=_credential_id(raw, "credential"),
                           sink=_sink(raw.get("sink"), "sink"), query=_text(raw, "query"),
                           engine=engine, **common)
    if "table" in raw:
        return CopyJobSpec(odbc=_no_password(_text(raw, "target") or "", "target"),
                           odbc_credential=_credential_id(raw, "credential"),
                           sink=_sink(raw.get("from"), "from"),
                           table=_text(raw, "table", limit=400), transaction_rows=per_txn,
                           **common)
    raise _bad("a copy job needs 'query' (copy out) or 'table' (load)")


@attrs.frozen
class CopyJobResult:
    """What a copy job did (``skipped``: a delivery before this one had done it)."""

    rows: int
    bytes: int
    skipped: bool
    md5_hex: str = ""


def store_resolver(store: Any) -> Callable[[str], str]:
    """A ``resolve_credential`` over a node's :class:`~shir.adapters.credstore.
    LocalCredentialStore`: the credential's plaintext, as UTF-8 text."""

    def resolve(credential_id: str) -> str:
        return bytes(store.get(credential_id).plaintext).decode("utf-8")

    return resolve


def _resolve(resolve: Callable[[str], str], credential_id: str) -> str:
    try:
        secret = resolve(credential_id)
    except Exception as exc:  # the store's errors name the credential, never its plaintext
        raise CopyJobError("credential", f"credential {credential_id!r} could not be read "
                           f"({type(exc).__name__}: {exc})") from None
    if not isinstance(secret, str) or not secret:
        raise CopyJobError("credential", f"credential {credential_id!r} is empty")
    return secret


def run_copy_job(
    params: bytes | str | Mapping[str, Any] | CopyJobSpec,
    *,
    job_id: str,
    delivery: int,
    resolve_credential: Callable[[str], str],
    progress: Callable[[Any], None] | None = None,
    cancel: threading.Event | None = None,
    proxy: ClientProxy | None = None,
) -> CopyJobResult:
    """Run one delivery of the ``copy`` job ``job_id``; see the module docs.

    ``proxy`` is the node's proxy, applied to a Blob sink's client (ODBC sources are on the
    private network: no proxy applies to them).

    ``progress`` gets :class:`~shir.adapters.copy.Progress` (rows, bytes, elapsed_s) per
    batch of a copy out. Raises :class:`CopyJobError`; nothing is committed then.
    """
    spec = params if isinstance(params, CopyJobSpec) else parse_copy_spec(params)
    from shir.adapters.copy import copy_query
    from shir.adapters.copy_arrow import open_source
    from shir.adapters.copy_formats import CsvOptions, FormatError
    from shir.adapters.copy_sinks import FolderSink
    from shir.adapters.copy_staged import StagedCopyError, staged_blob_name, staged_copy
    from shir.adapters.odbc import (
        OdbcError,
        OdbcSource,
        format_connection_string,
        parse_connection_string,
    )

    odbc_part = "target" if spec.direction == "load" else "source"
    try:
        options = CsvOptions(**spec.csv)
    except (FormatError, TypeError) as exc:
        raise CopyJobError("spec", f"'csv': {exc}") from None

    def with_password(conn: str, credential: str | None) -> str:
        if credential is None:
            return conn
        password = _resolve(resolve_credential, credential)
        return format_connection_string({**parse_connection_string(conn), "Pwd": password})

    conn = with_password(spec.odbc, spec.odbc_credential)
    try:
        if spec.sink.path is not None:
            sink: Any = FolderSink(spec.sink.path)
        else:
            assert spec.sink.credential is not None
            sink_spec = spec.sink
            if spec.direction == "staged":  # the staged blob's name: from the job id
                sink_spec = attrs.evolve(sink_spec, blob=staged_blob_name(
                    job_id, spec.format, sink_spec.blob or ""))
            sink = blob_sink(sink_spec, _resolve(resolve_credential, spec.sink.credential),
                             permissions={"out": "rw", "load": "r"}.get(spec.direction, "rwd"),
                             metadata={"shir_delivery": str(delivery)}, proxy=proxy)
        if spec.direction == "staged":
            assert spec.target is not None
            target = with_password(spec.target, spec.target_credential)
            try:
                opened_target = OdbcSource(target)
            except OdbcError as exc:
                raise _job_error(exc, "target", str(exc)) from None
            with opened_target, open_source(conn, spec.format, spec.engine) as odbc:
                del conn, target
                staged = staged_copy(odbc, spec.query or "", sink, opened_target,
                                     spec.table or "", spec.format, job_id, csv_options=options,
                                     progress=progress, cancel=cancel,
                                     transaction_rows=spec.transaction_rows,
                                     part_size_bytes=spec.part_size_bytes,
                                     batch_rows=spec.batch_rows)
            return CopyJobResult(staged.loaded_rows, 0, staged.skipped)
        opened = (open_source(conn, spec.format, spec.engine) if spec.direction == "out"
                  else OdbcSource(conn))
        with opened as odbc:
            del conn
            if spec.direction == "out":
                assert spec.query is not None
                done = copy_query(odbc, spec.query, sink, spec.format, job_id,
                                  csv_options=options, part_size_bytes=spec.part_size_bytes,
                                  batch_rows=spec.batch_rows, progress=progress, cancel=cancel)
                return CopyJobResult(done.rows, done.bytes, done.skipped, done.md5_hex)
            assert spec.table is not None
            loaded = _load(odbc, sink, spec, options, job_id, cancel)
            return CopyJobResult(loaded.rows, 0, loaded.skipped)
    except CopyJobError:
        raise
    except StagedCopyError as exc:  # the hop's own error says which part; the message, the hop
        raise _job_error(exc.cause, "source" if exc.hop == "stage" else "target", str(exc)
                         ) from None
    except ShirError as exc:
        raise _job_error(exc, odbc_part, str(exc)) from None


def _job_error(exc: BaseException, odbc_part: str, message: str) -> CopyJobError:
    """The :class:`CopyJobError` of an adapter's error (``odbc_part``: which database)."""
    from shir.adapters.copy import CopyCancelled
    from shir.adapters.copy_formats import FormatError
    from shir.adapters.copy_load import LoadCancelled, LoadError
    from shir.adapters.copy_sinks import SinkError
    from shir.adapters.odbc import ConnectFailed, ConnectionLost, OdbcError

    if isinstance(exc, CopyCancelled | LoadCancelled):
        return CopyJobError("cancelled", message, retryable=True)
    if isinstance(exc, ConnectFailed | ConnectionLost):
        return CopyJobError(odbc_part, message, retryable=_transient(exc))
    if isinstance(exc, OdbcError):
        return CopyJobError(odbc_part, message)
    if isinstance(exc, LoadError):
        return CopyJobError("target", message)
    if isinstance(exc, FormatError):
        return CopyJobError("format", message)
    if isinstance(exc, SinkError):
        return CopyJobError("sink", message, retryable=True)
    raise exc


def _transient(exc: Any) -> bool:
    # a wrong password or a refused login stays so on a redelivery; a network failure may not
    state = str(getattr(exc, "sqlstate", "") or "")
    text = str(getattr(exc, "driver_message", "") or "").lower()
    refused = ("authentication", "password", "login failed", "pg_hba.conf", "access denied")
    return not (state.startswith("28") or any(word in text for word in refused))


def _load(odbc: Any, sink: Any, spec: CopyJobSpec, options: Any, job_id: str,
          cancel: threading.Event | None) -> Any:
    from shir.adapters.copy_load import ChunkReader, load_file

    if cancel is not None and cancel.is_set():
        raise CopyJobError("cancelled", "the lease was lost before the load began",
                           retryable=True)
    if spec.sink.path is not None:
        try:
            stream: Any = open(spec.sink.path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise CopyJobError("sink", f"{sink.describe()}: cannot read it: {exc.strerror}"
                               ) from None
    else:
        stream = ChunkReader(sink.download())
    with stream:
        return load_file(odbc, spec.table or "", stream, spec.format, job_id,
                         csv_options=options, batch_rows=min(spec.batch_rows, 50_000),
                         transaction_rows=spec.transaction_rows, cancel=cancel)
