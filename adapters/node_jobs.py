"""Job kinds a node host can run, and the worker thread that runs one delivery.

A job's ``spec`` in the log is ``KIND`` + NUL + the kind's parameters (bytes the factory side
encoded; never a secret). A kind is a function ``run(ctx)`` that returns when the work is done,
raises :class:`JobFailed` (or any exception) when it failed, and returns early when
``ctx.cancelled`` is set (its lease ended: whatever it would report is refused).

Built-in kinds:

``copy``
    The copy activity (see :func:`kinds_for`).
``touch``
    The test job: ``{"sink": DIR, "seconds": S}``. Sleeps ``S`` seconds (waking early when
    cancelled), then writes a file named by the job id into ``DIR`` atomically (temp file, fsync,
    then ``link``, which refuses to replace): the first delivery to commit wins, and a late
    delivery that finds the file is done already. So a job's effect on the sink happens once
    however many times it was delivered, and a checker counts files. ``"fail": true`` makes it
    fail instead (for the retry and dead-letter paths).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from shir.core.errors import ShirError
from shir.core.jobs import LeaseToken

if TYPE_CHECKING:
    from shir.adapters.proxy import ClientProxy

__all__ = ["KINDS", "JobContext", "JobFailed", "JobRun", "kinds_for", "pack_spec", "unpack_spec"]

MAX_KIND = 64


class JobFailed(ShirError):
    """The job's work failed; the message says why (it goes into the log: no secrets)."""


@attrs.define
class JobContext:
    """What a kind's ``run`` gets: the delivery, its parameters, and a cancel flag."""

    token: LeaseToken
    params: bytes
    cancelled: threading.Event


def pack_spec(kind: str, params: bytes) -> bytes:
    """The job spec kept in the log for ``kind`` with ``params``."""
    if not kind or len(kind) > MAX_KIND or "\0" in kind:
        raise ValueError(f"job kind must be 1-{MAX_KIND} characters without NUL")
    return kind.encode() + b"\0" + params


def unpack_spec(spec: bytes) -> tuple[str, bytes]:
    """(kind, params) of a job spec; kind '' when the spec has none."""
    kind, sep, params = spec.partition(b"\0")
    if not sep:
        return "", spec
    return kind.decode("utf-8", "replace"), params


def _json_params(params: bytes) -> dict[str, Any]:
    try:
        data = json.loads(params or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise JobFailed("the job's parameters are not JSON") from None
    if not isinstance(data, dict):
        raise JobFailed("the job's parameters must be a JSON object")
    return data


def _touch(ctx: JobContext) -> None:
    p = _json_params(ctx.params)
    sink, seconds = p.get("sink"), p.get("seconds", 0.0)
    if not isinstance(sink, str) or not sink:
        raise JobFailed("touch needs a 'sink' folder")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
            or not 0 <= seconds <= 3600:
        raise JobFailed("touch 'seconds' must be a number 0..3600")
    if ctx.cancelled.wait(seconds):
        return
    if p.get("fail"):
        raise JobFailed("told to fail")
    folder = Path(sink)
    if not folder.is_dir():
        raise JobFailed(f"the sink folder {sink} does not exist")
    final = folder / ctx.token.job_id
    if final.exists():
        return  # a delivery before this one committed the effect
    tmp = folder / f".tmp-{ctx.token.job_id}-{uuid.uuid4().hex}"
    body = json.dumps(attrs.asdict(ctx.token)).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, final)  # atomic and never replaces: one effect per job id
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


KINDS: dict[str, Callable[[JobContext], None]] = {"touch": _touch}


def kinds_for(
    home: Path, proxy: ClientProxy | None = None,
) -> dict[str, Callable[[JobContext], None]]:
    """The kinds a node host with this home runs: ``touch`` and ``copy``.

    ``copy`` is the copy activity (:mod:`shir.adapters.copy_job`); the credentials its spec
    names are read from this machine's credential store (``HOME/credentials``, the data dir of
    ``shir credentials``), opened when a copy runs. Its Blob sink goes through ``proxy`` (the
    node's proxy).
    """

    def copy(ctx: JobContext) -> None:
        from shir.adapters.copy_job import CopyJobError, run_copy_job, store_resolver
        from shir.adapters.credentials_cli import DataDir

        data = DataDir(home)
        try:
            run_copy_job(ctx.params, job_id=ctx.token.job_id, delivery=ctx.token.delivery,
                         resolve_credential=store_resolver(data.store(data.protector())),
                         cancel=ctx.cancelled, proxy=proxy)
        except CopyJobError as exc:
            raise JobFailed(str(exc)) from None  # its message holds no password or key

    return {**KINDS, "copy": copy}


class JobRun:
    """One delivery running in its own thread; ``done`` receives (run, error or None) at the end.

    A cancelled run reports nothing: its lease ended, and the core would refuse its result.
    """

    def __init__(self, token: LeaseToken, spec: bytes,
                 done: Callable[[JobRun, str | None], None],
                 kinds: dict[str, Callable[[JobContext], None]] = KINDS) -> None:
        self.token = token
        self.cancelled = threading.Event()
        kind, params = unpack_spec(spec)
        self.kind = kind
        self._kinds = kinds
        self._run = kinds.get(kind)
        self._ctx = JobContext(token, params, self.cancelled)
        self._done = done
        self.thread = threading.Thread(target=self._main, name=f"job-{token.job_id}", daemon=True)

    def start(self) -> None:
        """Start the work."""
        self.thread.start()

    def _main(self) -> None:
        if self._run is None:
            known = ", ".join(sorted(self._kinds))
            self._done(self, f"this node cannot run job kind {self.kind!r} (it runs: {known})")
            return
        try:
            self._run(self._ctx)
        except Exception as exc:  # any failure of the work is the job's failure
            if not self.cancelled.is_set():
                detail = str(exc) if isinstance(exc, JobFailed) else type(exc).__name__
                self._done(self, detail or "failed")
            return
        if not self.cancelled.is_set():
            self._done(self, None)
