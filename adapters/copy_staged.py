"""Staged copy: from an ODBC query to an ODBC table through interim Blob storage, then cleaned up.

Theory of operation
-------------------
The product's staged copy moves data in two hops when the runtime cannot (or should not) write
to the sink directly: the source's rows go to an interim Blob container first, then from there
into the sink, and the interim data is deleted afterwards. :func:`staged_copy` does the same
with the copy's two halves, both idempotent by the job id:

1. **stage**: :func:`~shir.adapters.copy.copy_query` writes the query's rows into one staged
   blob (its name derives from the job id: :func:`staged_blob_name`), committed once with the
   job id in its metadata;
2. **load**: :func:`~shir.adapters.copy_load.load_file` inserts the staged blob's rows into the
   table, its marker row (keyed by the job id) in the same transaction as the rows;
3. **clean up**: the staged blob is deleted.

A retry with the same job id starts by asking the target for the job's marker: loaded already,
it only deletes a staged blob left behind (a cleanup that failed) and returns ``skipped``.
Otherwise the staged blob is looked for: committed by this job, the source is not read again;
else the stage runs (resuming the blocks an earlier attempt staged). Then the load runs. So a
retried staged copy resumes or is a no-op, and never inserts a row twice.

Failures name their hop (:class:`StagedCopyError` ``hop``: ``stage`` or ``load``).
A failed stage commits nothing anywhere (its uncommitted blocks stay for a retry; the service
drops them after a week); a failed load commits nothing in the table (a load in one transaction,
the default; with ``transaction_rows`` the rows of the transactions committed so far are
visible, and a retry resumes after them) and keeps the staged blob, so a retry loads it without
reading the source again. A cleanup the service refuses is not a failure (the data is loaded):
the result says ``cleaned_up=False``, a warning is logged, and the next run of the job deletes
the staged blob.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from shir.adapters.copy_formats import CsvOptions
from shir.adapters.copy_sinks import BlobSink, SinkError
from shir.core.errors import ShirError

__all__ = ["StagedCopyError", "StagedResult", "staged_blob_name", "staged_copy"]

HOPS = ("stage", "load")
log = logging.getLogger(__name__)


class StagedCopyError(ShirError):
    """A staged copy failed in ``hop`` (``stage`` or ``load``); the message says
    what was left where. ``cause`` is the hop's own error."""

    def __init__(self, hop: str, message: str, cause: BaseException) -> None:
        assert hop in HOPS
        super().__init__(message)
        self.hop = hop
        self.cause = cause


@attrs.frozen
class StagedResult:
    """What a staged copy did: rows staged (0 when the stage was found committed) and loaded,
    whether the job had been loaded before (``skipped``) and whether the staged blob is gone."""

    staged_rows: int
    loaded_rows: int
    skipped: bool
    cleaned_up: bool
    elapsed_s: float


def staged_blob_name(job_id: str, fmt: str, prefix: str = "") -> str:
    """The staged blob of ``job_id``: ``[prefix/]shir-staging/<digest>.<fmt>``."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:32]
    folder = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return f"{folder}shir-staging/{digest}.{fmt}"


def staged_copy(
    source: Any,
    query: str,
    staging: BlobSink,
    target: Any,
    table: str,
    fmt: str,
    job_id: str,
    *,
    csv_options: CsvOptions | None = None,
    progress: Callable[[Any], None] | None = None,
    cancel: threading.Event | None = None,
    transaction_rows: int | None = None,
    **copy_options: Any,
) -> StagedResult:
    """Copy ``query``'s rows on ``source`` into ``table`` on ``target`` (an
    :class:`~shir.adapters.odbc.OdbcSource`) through the blob ``staging`` names; see the
    module docs. ``copy_options`` go to :func:`~shir.adapters.copy.copy_query`
    (``part_size_bytes``, ``batch_rows``). Raises :class:`StagedCopyError`."""
    from shir.adapters.copy import copy_query
    from shir.adapters.copy_load import ChunkReader, is_loaded, load_file

    started = time.monotonic()
    where = staging.describe()
    if is_loaded(target, job_id):
        return StagedResult(0, 0, True, _clean_up(staging), time.monotonic() - started)
    try:
        # staged by an earlier attempt: the source is not read again
        staged_rows = 0 if staging.committed_by(job_id) is not None else copy_query(
            source, query, staging, fmt, job_id, csv_options=csv_options, progress=progress,
            cancel=cancel, **copy_options).rows
    except ShirError as exc:
        raise StagedCopyError(
            "stage", f"staged copy, hop 1 of 2 (source -> {where}) failed: {exc}; nothing was "
            f"loaded into {table} (blocks already staged are kept: a retry of the job resumes "
            "them)", exc) from None
    try:
        loaded = load_file(target, table, ChunkReader(staging.download()), fmt, job_id,
                           csv_options=csv_options, cancel=cancel,
                           transaction_rows=transaction_rows)
    except ShirError as exc:
        raise StagedCopyError(
            "load", f"staged copy, hop 2 of 2 ({where} -> table {table}) failed: {exc}; the "
            "staged blob is kept: a retry of the job loads it without reading the source "
            "again", exc) from None
    return StagedResult(staged_rows, loaded.rows, loaded.skipped, _clean_up(staging),
                        time.monotonic() - started)


def _clean_up(staging: BlobSink) -> bool:
    """Delete the staged blob (gone already is fine); False when the service refused."""
    try:
        staging.delete()
    except SinkError as exc:
        log.warning("staged copy: the data is loaded but the staged blob was not deleted (%s); "
                    "the next run of the job deletes it", exc)
        return False
    return True
