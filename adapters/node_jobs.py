"""Job kinds a node host can run, and the worker thread that runs one delivery.

A job's ``spec`` in the log is ``KIND`` + NUL + the kind's parameters (bytes the factory side
encoded; never a secret). A job that carries a credential has it in front, as ciphertext sealed
for each node (:mod:`shir.adapters.carried`): NUL + its length (u32, big-endian) + the bundle +
``KIND`` + NUL + parameters. A kind is never empty, so the leading NUL tells the two apart (and
an older node, finding kind ``''``, refuses the job instead of misreading it).

A kind is a function ``run(ctx)`` that returns when the work is done,
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
import struct
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

__all__ = ["KINDS", "KIND_NAMES", "JobContext", "JobFailed", "JobRun", "check_request",
           "credentials_named", "kinds_for", "pack_spec", "split_carried", "unpack_spec"]

MAX_KIND = 64


class JobFailed(ShirError):
    """The job's work failed; the message says why (it goes into the log: no secrets)."""


@attrs.define
class JobContext:
    """What a kind's ``run`` gets: the delivery, its parameters, and a cancel flag."""

    token: LeaseToken
    params: bytes
    cancelled: threading.Event
    carried: bytes = b""  # the credential bundle the job carries (ciphertext), if any


_CARRIED_LEN = struct.Struct(">I")


def pack_spec(kind: str, params: bytes, carried: bytes = b"") -> bytes:
    """The job spec kept in the log for ``kind`` with ``params`` (and a ``carried`` bundle)."""
    if not kind or len(kind) > MAX_KIND or "\0" in kind:
        raise ValueError(f"job kind must be 1-{MAX_KIND} characters without NUL")
    head = b"\0" + _CARRIED_LEN.pack(len(carried)) + carried if carried else b""
    return head + kind.encode() + b"\0" + params


def split_carried(spec: bytes) -> tuple[bytes, bytes]:
    """(the carried bundle or b"", the rest of the spec: kind + NUL + params)."""
    if not spec.startswith(b"\0") or len(spec) < 1 + _CARRIED_LEN.size:
        return b"", spec
    (n,) = _CARRIED_LEN.unpack_from(spec, 1)
    start = 1 + _CARRIED_LEN.size
    if n > len(spec) - start:  # bounded by the spec itself: a bad length is a bad spec
        return b"", spec
    return spec[start:start + n], spec[start + n:]


def credentials_named(kind: str, params: bytes) -> tuple[str, ...]:
    """The ids of the credentials a job of ``kind`` with ``params`` reads (a copy's); () when
    it names none or its parameters do not parse (it fails on its node, saying why)."""
    if kind != "copy":
        return ()
    from shir.adapters.copy_job import CopyJobError, parse_copy_spec

    try:
        spec = parse_copy_spec(params)
    except CopyJobError:
        return ()
    return tuple(c for c in (spec.odbc_credential, spec.sink.credential) if c is not None)


def unpack_spec(spec: bytes) -> tuple[str, bytes]:
    """(kind, params) of a job spec (a carried bundle skipped); kind '' when it has none."""
    kind, sep, params = split_carried(spec)[1].partition(b"\0")
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


def _touch_params(params: bytes) -> tuple[dict[str, Any], str, float]:
    """(the parameters, the sink folder, the seconds to wait) of a touch job; JobFailed if not."""
    p = _json_params(params)
    sink, seconds = p.get("sink"), p.get("seconds", 0.0)
    if not isinstance(sink, str) or not sink:
        raise JobFailed("touch needs a 'sink' folder")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
            or not 0 <= seconds <= 3600:
        raise JobFailed("touch 'seconds' must be a number 0..3600")
    return p, sink, seconds


def _touch(ctx: JobContext) -> None:
    p, sink, seconds = _touch_params(ctx.params)
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
KIND_NAMES = ("copy", "touch")  # what kinds_for gives every node host


def check_request(kind: str, params: bytes) -> None:
    """Refuse, before it is queued, a request that every node would fail (and retry until it
    is dead-lettered): an unknown kind, or parameters its kind refuses. Raises ShirError."""
    if kind not in KIND_NAMES:
        raise JobFailed(f"--kind {kind!r}: a node runs the kinds {', '.join(KIND_NAMES)}")
    if kind == "touch":
        _touch_params(params)
    else:
        from shir.adapters.copy_job import parse_copy_spec

        parse_copy_spec(params)


def kinds_for(
    home: Path, proxy: ClientProxy | None = None,
) -> dict[str, Callable[[JobContext], None]]:
    """The kinds a node host with this home runs: ``touch`` and ``copy``.

    ``copy`` is the copy activity (:mod:`shir.adapters.copy_job`); the credentials its spec
    names are read from this machine's credential store (``HOME/credentials``, the data dir of
    ``shir credentials``), opened when a copy runs, except one the job carries: that one is
    opened with the node's key (``HOME/identity.node``) and used for this job only. Its Blob
    sink goes through ``proxy`` (the node's proxy).
    """

    def copy(ctx: JobContext) -> None:
        from shir.adapters.backup import load_identity
        from shir.adapters.carried import open_carried
        from shir.adapters.copy_job import CopyJobError, run_copy_job, store_resolver
        from shir.adapters.credentials_cli import DataDir
        from shir.adapters.protect import CredentialError

        data = DataDir(home)
        protector = data.protector()
        from_store = store_resolver(data.store(protector))
        carried: dict[str, bytes] = {}
        if ctx.carried:
            try:
                me = load_identity(data.identity_file, protector)
                carried = open_carried(ctx.carried, me.node_name, me.keys, me.runtime_id)
            except CredentialError as exc:  # names the credential and the node, never a secret
                raise JobFailed(f"the job's carried credential was refused: {exc}") from None

        def resolve(credential_id: str) -> str:
            if credential_id in carried:
                return carried[credential_id].decode("utf-8")
            return from_store(credential_id)

        try:
            run_copy_job(ctx.params, job_id=ctx.token.job_id, delivery=ctx.token.delivery,
                         resolve_credential=resolve, cancel=ctx.cancelled, proxy=proxy)
        except CopyJobError as exc:
            raise JobFailed(str(exc)) from None  # its message holds no password or key

    return {**KINDS, "copy": copy}  # KIND_NAMES lists these (check_request refuses others)


class JobRun:
    """One delivery running in its own thread; ``done`` receives (run, error or None) at the end.

    A cancelled run reports nothing: its lease ended, and the core would refuse its result.
    """

    def __init__(self, token: LeaseToken, spec: bytes,
                 done: Callable[[JobRun, str | None], None],
                 kinds: dict[str, Callable[[JobContext], None]] = KINDS) -> None:
        self.token = token
        self.cancelled = threading.Event()
        carried, _ = split_carried(spec)
        kind, params = unpack_spec(spec)
        self.kind = kind
        self._kinds = kinds
        self._run = kinds.get(kind)
        self._ctx = JobContext(token, params, self.cancelled, carried)
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
