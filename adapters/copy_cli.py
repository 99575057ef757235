"""``shir copy``: the copy activity on the command line.

::

    shir copy --source ODBC --query SQL --sink SINK --format csv|jsonl|parquet [--job-id ID]
    shir copy --from SINK --format csv|jsonl|parquet --to ODBC --table NAME [--job-id ID]
    shir copy --source ODBC --query SQL --staging CONTAINER --to ODBC --table NAME [--format F]

SINK is a local path, a ``file://`` URL, a Blob URL with a SAS token
(``https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB?SAS``; Azurite's
``http://127.0.0.1:PORT/ACCOUNT/CONTAINER/BLOB?SAS``), ``env:NAME`` (any of these, read from the
environment variable NAME), or ``blob`` / a storage connection string together with
``--container`` and ``--blob`` (``blob`` reads the connection string from
``SHIR_BLOB_CONNECTION_STRING``). The ODBC password comes from ``SHIR_ODBC_PASSWORD`` when the
connection string has none; one given on the command line works, with a warning. Without
``--job-id`` the job id is a digest of the command's source, query and sink, so running the
same command again resumes or is a no-op. A staged copy goes from the query through one blob in
the ``--staging`` container (deleted once loaded: ``shir.adapters.copy_staged``) into the table.
``--transaction-rows N`` makes a load commit every N rows, resumable. Exit codes: 0 done, 2 bad
input or a failure (the message names the part at fault; nothing was committed, or, loading in
several transactions, the rows of the committed ones, which a retry goes on from).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import attrs

__all__ = ["add_commands"]

PASSWORD_ENV = "SHIR_ODBC_PASSWORD"
BLOB_ENV = "SHIR_BLOB_CONNECTION_STRING"


def add_commands(subparsers: Any) -> None:
    """Add ``copy`` to an ``add_subparsers()`` result (heavy imports wait for the run)."""
    p = subparsers.add_parser(
        "copy", help="copy query results to a file or blob, or a file into a table",
        description="The copy activity on the command line: query results to a file or blob, "
                    "a file or blob into a table, or a staged copy through Blob storage. See "
                    "docs/copy.md.",
    )
    p.add_argument("--source", help="ODBC connection string to read from")
    p.add_argument("--query", help="the SELECT to copy (give it an ORDER BY to resume exactly)")
    p.add_argument("--sink", help="where to write: path, file:// URL, Blob URL with SAS, "
                                  "env:NAME, 'blob' or a connection string")
    p.add_argument("--from", dest="from_", metavar="SINK", help="the file or blob to load")
    p.add_argument("--to", help="ODBC connection string to load into")
    p.add_argument("--table", help="the table to load into")
    p.add_argument("--staging", metavar="CONTAINER",
                   help="staged copy (--source/--query to --to/--table): the interim Blob "
                        "container: a container URL with SAS (sp=rwd), env:NAME, or 'blob' / a "
                        "connection string with --container")
    p.add_argument("--format", choices=("csv", "jsonl", "parquet"),
                   help="the file format (required; a staged copy's default: parquet)")
    p.add_argument("--transaction-rows", type=int, metavar="N",
                   help="a load commits every N rows (resumable; default: one transaction)")
    p.add_argument("--engine", default="auto", choices=("auto", "arrow", "pyodbc"),
                   help="how rows are fetched: arrow (arrow-odbc, shir[arrow]), pyodbc, "
                        "or auto (arrow when installed; default)")
    p.add_argument("--container", help="Blob container")
    p.add_argument("--blob", help="Blob name")
    p.add_argument("--job-id", help="idempotency key (default: digest of the command)")
    p.add_argument("--delimiter", default=",")
    p.add_argument("--quote", default='"')
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--null", default="", help="text of NULL in CSV (default: empty)")
    p.add_argument("--no-header", action="store_true")
    p.add_argument("--part-size-kib", type=int, metavar="KIB",
                   help="size of the parts (Blob blocks) in KiB: default 4096, doubling every "
                        "10,000 parts; up to 5 parts are held in memory at once")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(handler=_run)


def _fail(message: str) -> int:
    print(f"shir copy: error: {message}", file=sys.stderr)
    return 2


def _with_password(conn: str, what: str) -> str:
    from shir.adapters.odbc import format_connection_string, parse_connection_string

    pairs = parse_connection_string(conn)
    if "pwd" in pairs or "password" in pairs:
        print(f"shir copy: warning: the {what} connection string holds a password; other users "
              f"can see command lines: set {PASSWORD_ENV} instead", file=sys.stderr)
        return conn
    if os.environ.get(PASSWORD_ENV):
        return format_connection_string({**pairs, "Pwd": os.environ[PASSWORD_ENV]})
    return conn


def _sink(spec: str, args: argparse.Namespace, *, option: str = "--sink",
          permissions: str = "rw", staged: Callable[[str], str] | None = None) -> Any:
    """The sink ``spec`` names; ``staged`` (a staging container): the blob's name from the
    URL's path prefix."""
    from shir.adapters.copy_sinks import BlobSink, BlobUrl, FolderSink, open_blob_service

    if spec.startswith("env:"):  # kept off the command line, where other users can read it
        name = spec[4:]
        spec = os.environ.get(name, "")
        if not spec:
            raise ValueError(f"{option} env:{name}: the environment variable {name} is empty "
                             "or not set")
    elif spec.lower().startswith(("http://", "https://")) and "sig=" in spec.lower():
        print(f"shir copy: warning: the SAS token in {option} is visible to other users in the "
              f"process list (it is never printed or logged): {option} env:NAME reads the URL "
              "from an environment variable instead", file=sys.stderr)
    if spec.lower().startswith(("http://", "https://")):
        if args.container or args.blob:
            raise ValueError(f"{option}: a Blob URL names its container and blob; leave out "
                             "--container and --blob")
        url = BlobUrl.parse(spec)
        if staged is not None:
            url = attrs.evolve(url, blob=staged(url.blob))
        return BlobSink.from_url(url, permissions=permissions)
    if spec == "blob" or "accountname=" in spec.lower() or "blobendpoint=" in spec.lower():
        blob = args.blob if staged is None else staged("")
        if not (args.container and blob):
            raise ValueError(f"{option}: a Blob sink needs --container"
                             f"{' and --blob' if staged is None else ''}")
        conn = os.environ.get(BLOB_ENV, "") if spec == "blob" else spec
        if not conn:
            raise ValueError(f"{option} blob: set {BLOB_ENV} to the storage connection string")
        if spec != "blob" and "accountkey=" in spec.lower():
            print(f"shir copy: warning: the Blob connection string holds a key; set {BLOB_ENV} "
                  f"and pass {option} blob instead", file=sys.stderr)
        return BlobSink(open_blob_service(conn), args.container, blob)
    if staged is not None:
        raise ValueError(f"{option}: expected a container URL with a SAS token, env:NAME, or "
                         "'blob' / a storage connection string with --container")
    if spec.startswith("file://"):
        return FolderSink(unquote(urlparse(spec).path))
    return FolderSink(Path(spec))


def _progress(args: argparse.Namespace) -> Any:
    if args.quiet or not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(p: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2:
            last[0] = now
            print(f"\r  {p.rows:>12,} rows  {p.bytes / 1e6:>9.1f} MB  {p.rows_per_s:>9,.0f} "
                  "rows/s", end="", file=sys.stderr, flush=True)

    return show


def _run_staged(args: argparse.Namespace, options: Any) -> int:
    """--source/--query -> the staging container -> --to/--table (errors raise)."""
    from shir.adapters.copy_arrow import open_source
    from shir.adapters.copy_staged import staged_blob_name, staged_copy
    from shir.adapters.odbc import OdbcSource

    if not (args.source and args.query and args.to and args.table) or args.sink or args.from_:
        return _fail("a staged copy takes --source, --query, --staging, --to and --table "
                     "(not --sink/--from)")
    fmt = args.format or "parquet"
    job = args.job_id or hashlib.sha256("\0".join(
        ("staged", args.source, args.query, args.to, args.table, fmt)).encode()
    ).hexdigest()[:32]
    staging = _sink(args.staging, args, option="--staging", permissions="rwd",
                    staged=lambda prefix: staged_blob_name(job, fmt, prefix))
    with open_source(_with_password(args.source, "--source"), fmt, args.engine) as source, \
            OdbcSource(_with_password(args.to, "--to")) as target:
        done = staged_copy(source, args.query, staging, target, args.table, fmt, job,
                           csv_options=options, progress=_progress(args),
                           transaction_rows=args.transaction_rows,
                           part_size_bytes=_part_size_bytes(args))
    if not done.cleaned_up:
        print(f"shir copy: warning: the staged blob {staging.describe()} was not deleted; the "
              "next run of this command deletes it", file=sys.stderr)
    earlier = "" if done.staged_rows else " (the staged blob of an earlier attempt)"
    return _report(args, done.skipped, f"job {job}: already loaded into {args.table}; nothing to "
                   "do", f"staged copy: {done.loaded_rows} rows into {args.table} through "
                   f"{staging.describe()} in {done.elapsed_s:.1f} s{earlier}")


def _part_size_bytes(args: argparse.Namespace) -> int:
    from shir.adapters.copy import DEFAULT_PART_SIZE_BYTES

    return DEFAULT_PART_SIZE_BYTES if args.part_size_kib is None else args.part_size_kib * 1024


def _report(args: argparse.Namespace, skipped: bool, nothing_to_do: str, done: str) -> int:
    """End the progress line, say what the run did; exit code 0."""
    if _progress(args):
        print(file=sys.stderr)
    print(nothing_to_do if skipped else done)
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        from shir.adapters.copy import copy_query
        from shir.adapters.copy_arrow import open_source
        from shir.adapters.copy_formats import CsvOptions
        from shir.adapters.copy_load import ChunkReader, load_file
        from shir.adapters.copy_sinks import BlobSink
        from shir.adapters.odbc import OdbcSource
        from shir.core.errors import ShirError
    except ImportError as exc:
        return _fail(str(exc))
    try:
        options = CsvOptions(delimiter=args.delimiter, quote=args.quote, encoding=args.encoding,
                             null=args.null, header=not args.no_header)
        if args.part_size_kib is not None and not 64 <= args.part_size_kib <= 256 * 1024:
            return _fail("--part-size-kib must be between 64 and 262144 (256 MiB)")
        if args.transaction_rows is not None and args.transaction_rows < 1:
            return _fail(f"--transaction-rows {args.transaction_rows}: give a number of rows "
                         "above 0")
        if args.staging is not None:
            return _run_staged(args, options)
        if args.format is None:
            return _fail("--format is required (csv, jsonl or parquet)")
        if args.source is not None:
            if not (args.query and args.sink) or args.from_ or args.to:
                return _fail("copy out takes --source, --query and --sink (not --from/--to)")
            sink = _sink(args.sink, args)
            job = args.job_id or hashlib.sha256(
                "\0".join((args.source, args.query, sink.describe(), args.format)).encode()
            ).hexdigest()[:32]
            opened = open_source(_with_password(args.source, "--source"), args.format,
                                 args.engine)
            with opened as source:
                result = copy_query(source, args.query, sink, args.format, job,
                                    csv_options=options, progress=_progress(args),
                                    part_size_bytes=_part_size_bytes(args))
            return _report(args, result.skipped,
                           f"job {job}: already copied to {sink.describe()}; nothing to do",
                           f"copied {result.rows} rows ({result.bytes} bytes, {result.parts} "
                           f"parts) to {sink.describe()} in {result.elapsed_s:.1f} s, md5 "
                           f"{result.md5_hex}")
        if args.from_ is not None:
            if not (args.to and args.table):
                return _fail("a load takes --from, --to and --table")
            sink = _sink(args.from_, args, option="--from", permissions="r")
            job = args.job_id or hashlib.sha256(
                "\0".join((sink.describe(), args.to, args.table, args.format)).encode()
            ).hexdigest()[:32]
            if isinstance(sink, BlobSink):
                stream: Any = ChunkReader(sink.download())
            else:
                try:
                    stream = open(sink.path, "rb")  # noqa: SIM115 - closed below
                except OSError as exc:
                    return _fail(f"{sink.describe()}: cannot read it: {exc.strerror}")
            with OdbcSource(_with_password(args.to, "--to")) as target:
                loaded = load_file(target, args.table, stream, args.format, job,
                                   csv_options=options, transaction_rows=args.transaction_rows,
                                   what=sink.describe())
            stream.close()
            if loaded.skipped:
                print(f"job {job}: already loaded into {args.table}; nothing to do")
            else:
                resumed = (f" (resumed after the {loaded.resumed_from} rows an earlier attempt "
                           "committed)" if loaded.resumed_from else "")
                print(f"loaded {loaded.rows} rows into {args.table}{resumed}")
            return 0
        return _fail("give --source/--query/--sink to copy out, or --from/--to/--table to load")
    except (ShirError, ValueError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # the Blob SDK's errors on download: name the part, no traceback
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        if isinstance(exc, ResourceNotFoundError):
            return _fail("the Blob (or its container) does not exist")
        if isinstance(exc, AzureError):
            return _fail(f"Blob service: {type(exc).__name__}")
        raise
