"""``shir``: the command line's composition root, and the ``shir`` entry point.

It builds the top-level parser and mounts each command group from the module that owns it.

The convention for a command group (``sim``, ``cert``, ``credentials``, ``copy``, ...): its
module exposes ``add_commands(subparsers)``, which adds the group's parser to an
``add_subparsers()`` result and sets ``handler`` on every leaf parser. ``args.handler(args)``
runs the command and returns its exit code (0 done and everything held, 1 a check failed, 2 bad
input, the reason printed on stderr as ``shir <group> <command>: error: ...``; never a traceback
for a user's mistake). A leaf whose output may be read in part (``| head``) also sets
``reader_may_leave=True``. To mount a new group, add one line to :data:`GROUPS`: its name, where
its ``add_commands`` is (``"module:function"``) and a one-line help. A group's module is imported
only when that group runs, so one group's heavy imports never slow another's start.

This is the one module of ``shir.adapters`` that may import ``shir.sim`` (tests/test_layering.py
checks it): here the simulator's commands get the file event store for ``run --log`` and
``replay``, since ``shir.sim`` imports no adapter.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shir.core.codec import CodecError
from shir.core.errors import ShirError
from shir.core.store import EventStore, StoreError

__all__ = ["GROUPS", "FileLogs", "UnreadableLog", "add_sim_commands", "build_parser", "main",
           "read_log"]

# One line per command group: (name, "module:function" adding it, help in ``shir --help``).
GROUPS: tuple[tuple[str, str, str], ...] = (
    ("sim", "shir.adapters.cli:add_sim_commands", "run fault-injection simulations"),
    ("cert", "shir.adapters.cert_cli:add_commands",
     "check the intranet channel's TLS certificate against the product's rules"),
    ("credentials", "shir.adapters.credentials_cli:add_commands",
     "node identity, credential backup and restore, offline encryption"),
    ("copy", "shir.adapters.copy_cli:add_commands",
     "copy query results to a file or blob, or a file into a table"),
    ("runtime", "shir.adapters.runtime_cli:add_runtime_commands",
     "create a self-hosted runtime, regenerate its auth keys"),
    ("node", "shir.adapters.node_cli:add_commands", "run this machine as a node of a runtime"),
    ("job", "shir.adapters.runtime_cli:add_job_commands", "submit a job, show what became of one"),
    ("status", "shir.adapters.runtime_cli:add_status_command",
     "the runtime's status: nodes, dispatcher, term, queue"),
)


class FileLogs:
    """``shir sim run --log`` and ``shir sim replay`` on the file event store
    (:mod:`shir.adapters.filestore`): a log ``dir/name.events`` is stream ``name`` in ``dir``."""

    @contextmanager
    def writer(self, log: str, directory: Path) -> Iterator[EventStore]:
        """The file store of ``directory``, its lock taken now."""
        from shir.adapters.filestore import FileEventStore, StoreLocked
        from shir.sim.cli import UsageError

        try:
            store = FileEventStore(directory)
        except StoreLocked:
            raise UsageError(
                f"--log {log}: another process holds the event store in {directory} (its "
                ".lock); wait for it to finish or log into another folder"
            ) from None
        except OSError as exc:
            raise UsageError(f"--log {log}: {exc.strerror or exc}") from None
        with store:
            yield store

    def read(self, log: str, path: Path) -> list[object]:
        """Every record of ``path``, read without the store's lock or write access."""
        from shir.sim.cli import UsageError

        try:
            return read_log(log, path)
        except UnreadableLog as exc:
            raise UsageError(str(exc)) from None


class UnreadableLog(ShirError):
    """An event log file that cannot be read; the message names it and what to do."""


def read_log(log: str, path: Path) -> list[object]:
    """Every record of the event log file ``path`` (``log``: how the user named it), read
    without the store's lock or write access; :class:`UnreadableLog` when it cannot be."""
    from shir.adapters.filestore import TornTail, read_stream_file

    try:
        return read_stream_file(path)
    except TornTail as exc:
        if exc.good_records == 0:  # advising `truncate -s 0` would destroy someone's file
            raise UnreadableLog(
                f"{log} is not a shir event log: its first record cannot be read "
                f"({exc.reason}); give a FILE.events written by shir sim run --log"
            ) from None
        raise UnreadableLog(
            f"cannot read the event log: {log}: torn tail at byte offset {exc.offset} "
            f"after record #{exc.good_records} (an append was cut short). To keep the "
            f"{exc.good_records} good records, truncate the file there: "
            f"truncate -s {exc.offset} {shlex.quote(log)} (copy it first to keep the "
            "damaged tail)"
        ) from None
    except StoreError as exc:  # its message names the file
        raise UnreadableLog(f"cannot read the event log: {exc}") from None
    except CodecError as exc:
        raise UnreadableLog(f"cannot read the event log {log}: {exc}") from None
    except OSError as exc:
        raise UnreadableLog(f"{log}: {exc.strerror or exc}") from None


def add_sim_commands(subparsers: Any) -> None:
    """Mount ``shir sim ...`` with the file event store for its logs."""
    from shir.sim.cli import add_commands

    add_commands(subparsers, logs=FileLogs())


def _adder(target: str) -> Callable[[Any], None]:
    module, _, function = target.partition(":")
    adder: Callable[[Any], None] = getattr(importlib.import_module(module), function)
    return adder


def build_parser(groups: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``shir`` parser with the command groups named in ``groups`` mounted in full; every
    other group is listed in ``--help`` only, so its module is not imported."""
    parser = argparse.ArgumentParser(
        prog="shir",
        description="A self-hosted integration runtime as an event-sourced state machine, with a "
                    "deterministic fault-injection simulator.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, target, help_text in GROUPS:
        if name in groups:
            _adder(target)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shir`` command line; returns the exit code."""
    # No shir command calls BLAS, but numpy (which pyarrow imports) starts OpenBLAS's thread
    # pool, whose threads spin at start: 90 ms of CPU per process here (0.05 s with one). The
    # user's own setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is None:  # `>&-`: print() would drop the output (a new runtime's keys) silently
        if sys.stderr is not None:
            print("shir: error: standard output is closed; send it to a file or to /dev/null "
                  "(> /dev/null) instead", file=sys.stderr)
        return 2
    parser = build_parser(argv[:1])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad usage (message printed), 0 on --help
        return exc.code if isinstance(exc.code, int) else 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    command = getattr(args, f"{args.command}_command", None)
    prog = f"shir {args.command}{f' {command}' if command else ''}"
    try:
        code = handler(args)
        sys.stdout.flush()  # a full disk shows here, not as a traceback at exit
        return code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UnicodeEncodeError:
        # Linux hands over an argument's bytes that are not UTF-8 as lone surrogates: a path
        # may hold them, but a name, an id or a parameter cannot be stored or sent
        bad = next((a for a in argv if not _is_utf8(a)), None)
        if bad is None:
            raise
        shown = repr(bad.encode("utf-8", "surrogateescape"))[2:-1]
        print(f"{prog}: error: argument '{shown[:80]}' is not UTF-8 text: names, ids and "
              "parameters must be UTF-8; retype it (or set the terminal to UTF-8)",
              file=sys.stderr)
        return 2
    except BrokenPipeError:  # `shir sim list | head`: the reader left; say nothing more
        _drop_stdout()
        # a listing read in part did what was asked; a run's verdict cut off did not
        return 0 if getattr(args, "reader_may_leave", False) else 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        _drop_stdout()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: cannot write its output ({exc.strerror}{where}): free space "
              "there, or send the output elsewhere", file=sys.stderr)
        return 2


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
