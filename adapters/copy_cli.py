"""``shir copy``: the copy activity on the command line.

::

    shir copy --source ODBC --query SQL --sink SINK --format csv|jsonl|parquet [--job-id ID]
    shir copy --from SINK --format csv|jsonl|parquet --to ODBC --table NAME [--job-id ID]

SINK is a local path, a ``file://`` URL, or ``blob`` / a storage connection string together
with ``--container`` and ``--blob`` (``blob`` reads the connection string from
``SHIR_BLOB_CONNECTION_STRING``). The ODBC password comes from ``SHIR_ODBC_PASSWORD`` when the
connection string has none; one given on the command line works, with a warning. Without
``--job-id`` the job id is a digest of the command's source, query and sink, so running the
same command again resumes or is a no-op. Exit codes: 0 done, 2 bad input or a failure (the
message names the part at fault; nothing was committed).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["add_commands"]

PASSWORD_ENV = "SHIR_ODBC_PASSWORD"
BLOB_ENV = "SHIR_BLOB_CONNECTION_STRING"


def add_commands(subparsers: Any) -> None:
    """Add ``copy`` to an ``add_subparsers()`` result (heavy imports wait for the run)."""
    p = subparsers.add_parser(
        "copy", help="copy query results to a file or blob, or a file into a table",
        description=__doc__.split("::")[0].strip() if __doc__ else None,
    )
    p.add_argument("--source", help="ODBC connection string to read from")
    p.add_argument("--query", help="the SELECT to copy (give it an ORDER BY to resume exactly)")
    p.add_argument("--sink", help="where to write: path, file:// URL, 'blob' or a connection "
                                  "string")
    p.add_argument("--from", dest="from_", metavar="SINK", help="the file or blob to load")
    p.add_argument("--to", help="ODBC connection string to load into")
    p.add_argument("--table", help="the table to load into")
    p.add_argument("--format", required=True, choices=("csv", "jsonl", "parquet"))
    p.add_argument("--engine", default="auto", choices=("auto", "arrow", "pyodbc"),
                   help="how rows are fetched: arrow (arrow-odbc, shir[arrow]; CSV and "
                        "Parquet), pyodbc, or auto (arrow when installed; default)")
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


def _sink(spec: str, args: argparse.Namespace) -> Any:
    from shir.adapters.copy_sinks import BlobSink, FolderSink, open_blob_service

    if spec == "blob" or "accountname=" in spec.lower() or "blobendpoint=" in spec.lower():
        if not (args.container and args.blob):
            raise ValueError("a Blob sink needs --container and --blob")
        conn = os.environ.get(BLOB_ENV, "") if spec == "blob" else spec
        if not conn:
            raise ValueError(f"--sink blob: set {BLOB_ENV} to the storage connection string")
        if spec != "blob" and "accountkey=" in spec.lower():
            print(f"shir copy: warning: the Blob connection string holds a key; set {BLOB_ENV} "
                  "and pass --sink blob instead", file=sys.stderr)
        return BlobSink(open_blob_service(conn), args.container, args.blob)
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


def _run(args: argparse.Namespace) -> int:
    try:
        from shir.adapters.copy import DEFAULT_PART_SIZE_BYTES, copy_query
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
                                    part_size_bytes=DEFAULT_PART_SIZE_BYTES
                                    if args.part_size_kib is None
                                    else args.part_size_kib * 1024)
            if _progress(args):
                print(file=sys.stderr)
            if result.skipped:
                print(f"job {job}: already copied to {sink.describe()}; nothing to do")
            else:
                print(f"copied {result.rows} rows ({result.bytes} bytes, {result.parts} parts) "
                      f"to {sink.describe()} in {result.elapsed_s:.1f} s, md5 {result.md5_hex}")
            return 0
        if args.from_ is not None:
            if not (args.to and args.table):
                return _fail("a load takes --from, --to and --table")
            sink = _sink(args.from_, args)
            job = args.job_id or hashlib.sha256(
                "\0".join((sink.describe(), args.to, args.table, args.format)).encode()
            ).hexdigest()[:32]
            if isinstance(sink, BlobSink):
                stream: Any = ChunkReader(sink.client().download_blob().chunks())
            else:
                try:
                    stream = open(sink.path, "rb")  # noqa: SIM115 - closed below
                except OSError as exc:
                    return _fail(f"{sink.describe()}: cannot read it: {exc.strerror}")
            with OdbcSource(_with_password(args.to, "--to")) as target:
                loaded = load_file(target, args.table, stream, args.format, job,
                                   csv_options=options)
            stream.close()
            if loaded.skipped:
                print(f"job {job}: already loaded into {args.table}; nothing to do")
            else:
                print(f"loaded {loaded.rows} rows into {args.table}")
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
