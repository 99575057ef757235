"""The embedded control channel: a peek-lock queue of job requests in a SQLite file.

For one site without Azure: the factory side (``shir job submit``) and the runtime's dispatcher
share a SQLite file, which may be the event store's own file (the tables differ)::

    shir_channel_meta(key, value)       format name and version
    shir_channel_messages               one row per request: its state (active, completed,
                                        dead), delivery count, lock token and lock expiry
    shir_channel_results                the reply queue: one row per (message id, outcome)

Semantics follow Azure Service Bus peek-lock queues (see :mod:`shir.adapters.channel`):

- ``receive`` locks up to ``max_count`` visible requests, oldest first, for ``lock_duration_s``
  and raises each one's delivery count; it polls (every ``poll_interval_s``) until something is
  there or ``wait_s`` has passed.
- ``renew``, ``complete``, ``abandon`` and ``dead_letter`` take the lock token; a token that is
  unknown, settled, or whose lock has expired raises :class:`~shir.adapters.channel.LockLost`.
- A lock that expires makes the request visible again; the next delivery has the count + 1.
- A request whose delivery count has reached ``max_delivery_count`` is dead-lettered (reason
  ``MaxDeliveryCountExceeded``) instead of becoming visible again, by abandon or by expiry.
- ``send`` is idempotent by message id: a second send of an id already in the queue (or
  completed within ``duplicate_window_s``) is dropped, as Service Bus duplicate detection does.

Every operation is one ``BEGIN IMMEDIATE`` transaction, so several processes may share the
file. Time is wall-clock seconds from ``clock`` (``time.time`` by default; tests pass their
own).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from shir.adapters.channel import (
    ChannelError,
    DeadLetter,
    JobRequest,
    JobResult,
    LockLost,
    ReceivedRequest,
)
from shir.adapters.closing import CloseOnExit
from shir.adapters.sqlitestore import enable_wal

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "DeadLetter", "EmbeddedChannel"]

FORMAT_NAME = "shir-embedded-channel"
FORMAT_VERSION = 1
MAX_SPEC_BYTES = 64 * 1024
MAX_CREDENTIAL_BYTES = 64 * 1024
MAX_DELIVERIES_REASON = "MaxDeliveryCountExceeded"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shir_channel_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS shir_channel_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL, spec BLOB NOT NULL, credential BLOB NOT NULL,
        state TEXT NOT NULL, delivery_count INTEGER NOT NULL,
        lock_token TEXT UNIQUE, locked_until REAL,
        settled_at REAL, dead_reason TEXT, enqueued_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS shir_channel_visible ON shir_channel_messages (state, seq)",
    """CREATE TABLE IF NOT EXISTS shir_channel_results (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL, job_id TEXT NOT NULL, outcome TEXT NOT NULL,
        detail TEXT NOT NULL, at REAL NOT NULL, UNIQUE (message_id, outcome))""",
)


class EmbeddedChannel(CloseOnExit):
    """The :class:`~shir.adapters.channel.ControlChannel` port on a SQLite file."""

    def __init__(
        self, path: str | os.PathLike[str], *, lock_duration_s: float = 60.0,
        max_delivery_count: int = 10, duplicate_window_s: float = 600.0,
        poll_interval_s: float = 0.05, busy_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not lock_duration_s > 0 or type(max_delivery_count) is not int or \
                max_delivery_count < 1:
            raise ChannelError(
                "lock_duration_s must be > 0 and max_delivery_count an int >= 1, got "
                f"{lock_duration_s!r} and {max_delivery_count!r}"
            )
        self._path = os.fspath(path)
        self._lock_duration_s = float(lock_duration_s)
        self._max_deliveries = max_delivery_count
        self._duplicate_window_s = duplicate_window_s
        self._poll_s = poll_interval_s
        self._busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._mutex = threading.Lock()
        folder = os.path.dirname(os.path.abspath(self._path))
        if not os.path.isdir(folder):
            raise ChannelError(
                f"cannot open the embedded channel {self._path}: the folder {folder} does not "
                "exist; create it first or give another path"
            )
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self._path, timeout=busy_timeout_s, isolation_level=None,
                check_same_thread=False,
            )
            enable_wal(self._db, busy_timeout_s)
            self._db.execute("PRAGMA synchronous=FULL")
            with self._transaction("open"):
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._check_format()
        except sqlite3.Error as exc:
            self._close_quietly()
            raise self._error(exc, "open") from None
        except BaseException:
            self._close_quietly()
            raise

    @classmethod
    def from_url(cls, url: str, **options: object) -> EmbeddedChannel:
        """A channel on ``sqlite:///PATH``, the path read as ``open_store`` reads it."""
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            scheme = url.split(":", 1)[0] if ":" in url else ""
            shown = f"a {scheme}: URL" if scheme.isalnum() else "that value"  # never the value:
            raise ChannelError(  # it may be a Service Bus connection string with its key
                f"{shown} is not an embedded channel URL: write sqlite:///PATH (three slashes, "
                "then the path of the SQLite file)"
            )
        return cls(url[len("sqlite:///"):], **options)  # type: ignore[arg-type]

    def _check_format(self) -> None:
        db = self._conn()
        meta = dict(db.execute("SELECT key, value FROM shir_channel_meta").fetchall())
        if not meta:
            db.executemany(
                "INSERT INTO shir_channel_meta (key, value) VALUES (?, ?)",
                [("format", FORMAT_NAME), ("format_version", str(FORMAT_VERSION))],
            )
            return
        version = meta.get("format_version", "")
        if meta.get("format") != FORMAT_NAME or not version.isdigit():
            raise ChannelError(
                f"{self._path}: the shir_channel_meta table is not an embedded channel's "
                "(another program wrote it): give another file"
            )
        if int(version) > FORMAT_VERSION:
            raise ChannelError(
                f"{self._path} holds an embedded channel in format {version}, written by a "
                f"newer shir; this shir reads format {FORMAT_VERSION}: upgrade shir here"
            )

    def __repr__(self) -> str:
        return f"EmbeddedChannel(path={self._path!r})"

    # -- plumbing ----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ChannelError(f"the embedded channel on {self._path} is closed; open a new one")
        return self._db

    def _close_quietly(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.rollback()
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.rollback()
            raise self._error(exc, doing) from None

    def _error(self, exc: sqlite3.Error, doing: str) -> ChannelError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return ChannelError(
                f"{self._path}: another process held the channel's write lock for more than "
                f"{self._busy_timeout_s:g} s, so this channel could not {doing}; retry"
            )
        if "not a database" in text:
            return ChannelError(f"{self._path} is not a SQLite database: give another file")
        return ChannelError(f"{self._path}: SQLite failed to {doing}: {text}")

    def _reclaim_expired(self, db: sqlite3.Connection, now: float) -> None:
        """Expired locks: visible again, or dead-lettered when out of deliveries."""
        db.execute(
            "UPDATE shir_channel_messages SET state = 'dead', lock_token = NULL, "
            "locked_until = NULL, settled_at = ?, dead_reason = ? "
            "WHERE state = 'active' AND lock_token IS NOT NULL AND locked_until <= ? "
            "AND delivery_count >= ?",
            (now, self._dead_reason("its lock expired"), now, self._max_deliveries),
        )
        db.execute(
            "UPDATE shir_channel_messages SET lock_token = NULL, locked_until = NULL "
            "WHERE state = 'active' AND lock_token IS NOT NULL AND locked_until <= ?",
            (now,),
        )

    def _dead_reason(self, last: str) -> str:
        return (
            f"{MAX_DELIVERIES_REASON}: delivered {self._max_deliveries} time(s), the maximum; "
            f"{last} the last time"
        )

    def _locked(self, db: sqlite3.Connection, token: str, now: float, doing: str) -> int:
        row = db.execute(
            "SELECT seq, locked_until FROM shir_channel_messages "
            "WHERE lock_token = ? AND state = 'active'",
            (token,),
        ).fetchone()
        if row is None or row[1] <= now:
            why = "has expired" if row is not None else "is settled, expired or unknown"
            raise LockLost(
                f"cannot {doing}: the lock {token!r} {why}; another delivery of the request "
                "may own it now: do not act on this delivery"
            )
        return int(row[0])

    # -- the ControlChannel port -------------------------------------------------------------

    def send(self, requests: Sequence[JobRequest]) -> None:
        """Queue ``requests``; a message id already queued (or recently completed) is dropped."""
        rows = []
        for r in requests:
            if not isinstance(r, JobRequest):
                raise ChannelError(f"send takes JobRequest objects, got {type(r).__name__}")
            if not r.message_id or len(r.message_id) > 128:
                raise ChannelError(
                    f"a job request's message_id must be 1-128 characters, got "
                    f"{len(r.message_id)}"
                )
            if len(r.spec) > MAX_SPEC_BYTES or len(r.credential) > MAX_CREDENTIAL_BYTES:
                raise ChannelError(
                    f"job request {r.message_id!r} is too large (spec {len(r.spec)} bytes, "
                    f"credential {len(r.credential)} bytes; at most {MAX_SPEC_BYTES} each)"
                )
            rows.append((r.message_id, r.kind, bytes(r.spec), bytes(r.credential)))
        with self._mutex, self._transaction("send") as db:
            now = self._clock()
            # Completed ids older than the window may be sent again (as Service Bus allows).
            db.execute(
                "DELETE FROM shir_channel_messages WHERE state = 'completed' AND settled_at < ?",
                (now - self._duplicate_window_s,),
            )
            db.executemany(
                "INSERT OR IGNORE INTO shir_channel_messages (message_id, kind, spec, "
                "credential, state, delivery_count, enqueued_at) "
                "VALUES (?, ?, ?, ?, 'active', 0, ?)",
                [(*row, now) for row in rows],
            )

    def receive(self, max_count: int, wait_s: float) -> list[ReceivedRequest]:
        """Lock up to ``max_count`` visible requests, polling for at most ``wait_s`` seconds."""
        if type(max_count) is not int or max_count < 1:
            raise ChannelError(f"max_count must be an int >= 1, got {max_count!r}")
        deadline = time.monotonic() + max(0.0, wait_s)  # waiting is real time, locks are clock
        while True:
            got = self._receive_now(max_count)
            remaining = deadline - time.monotonic()
            if got or remaining <= 0:
                return got
            time.sleep(min(self._poll_s, remaining))

    def _receive_now(self, max_count: int) -> list[ReceivedRequest]:
        with self._mutex, self._transaction("receive") as db:
            now = self._clock()
            self._reclaim_expired(db, now)
            rows = db.execute(
                "SELECT seq, message_id, kind, spec, credential, delivery_count "
                "FROM shir_channel_messages WHERE state = 'active' AND lock_token IS NULL "
                "ORDER BY seq LIMIT ?",
                (max_count,),
            ).fetchall()
            until = now + self._lock_duration_s
            out = []
            for seq, message_id, kind, spec, credential, count in rows:
                token = str(uuid.uuid4())
                db.execute(
                    "UPDATE shir_channel_messages SET lock_token = ?, locked_until = ?, "
                    "delivery_count = ? WHERE seq = ?",
                    (token, until, count + 1, seq),
                )
                request = JobRequest(message_id, kind, bytes(spec), bytes(credential))
                out.append(ReceivedRequest(request, token, count + 1, until))
            return out

    def renew(self, lock_token: str) -> float:
        """Extend the lock by the lock duration from now; return the new ``locked_until``."""
        with self._mutex, self._transaction("renew a lock") as db:
            now = self._clock()
            seq = self._locked(db, lock_token, now, "renew the lock")
            until = now + self._lock_duration_s
            db.execute(
                "UPDATE shir_channel_messages SET locked_until = ? WHERE seq = ?", (until, seq)
            )
            return until

    def complete(self, lock_token: str) -> None:
        """Remove the request for good (its id stays known for the duplicate window)."""
        with self._mutex, self._transaction("complete a request") as db:
            now = self._clock()
            seq = self._locked(db, lock_token, now, "complete the request")
            db.execute(
                "UPDATE shir_channel_messages SET state = 'completed', lock_token = NULL, "
                "locked_until = NULL, settled_at = ? WHERE seq = ?",
                (now, seq),
            )

    def abandon(self, lock_token: str) -> None:
        """Make the request visible again, or dead-letter it when out of deliveries."""
        with self._mutex, self._transaction("abandon a request") as db:
            now = self._clock()
            seq = self._locked(db, lock_token, now, "abandon the request")
            db.execute(
                "UPDATE shir_channel_messages SET state = CASE WHEN delivery_count >= ? "
                "THEN 'dead' ELSE 'active' END, dead_reason = CASE WHEN delivery_count >= ? "
                "THEN ? END, settled_at = ?, lock_token = NULL, locked_until = NULL "
                "WHERE seq = ?",
                (self._max_deliveries, self._max_deliveries,
                 self._dead_reason("it was abandoned"), now, seq),
            )

    def dead_letter(self, lock_token: str, reason: str) -> None:
        """Move the request to the dead-letter queue with ``reason``."""
        with self._mutex, self._transaction("dead-letter a request") as db:
            now = self._clock()
            seq = self._locked(db, lock_token, now, "dead-letter the request")
            db.execute(
                "UPDATE shir_channel_messages SET state = 'dead', dead_reason = ?, "
                "settled_at = ?, lock_token = NULL, locked_until = NULL WHERE seq = ?",
                (str(reason), now, seq),
            )

    def dead_letters(self) -> list[DeadLetter]:
        """The dead-letter queue, oldest request first (expired locks are reclaimed first)."""
        with self._mutex, self._transaction("read the dead-letter queue") as db:
            self._reclaim_expired(db, self._clock())
            rows = db.execute(
                "SELECT message_id, kind, spec, credential, dead_reason, delivery_count, "
                "settled_at FROM shir_channel_messages WHERE state = 'dead' ORDER BY seq"
            ).fetchall()
        return [
            DeadLetter(JobRequest(m, k, bytes(s), bytes(c)), r or "", int(n), float(at))
            for m, k, s, c, r, n, at in rows
        ]

    def queue_depth(self) -> int:
        """How many requests wait or are locked (not completed, not dead-lettered)."""
        with self._mutex:
            try:
                row = self._conn().execute(
                    "SELECT COUNT(*) FROM shir_channel_messages WHERE state = 'active'"
                ).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc, "count the queue") from None
        return int(row[0])

    def publish_result(self, result: JobResult) -> None:
        """Publish ``result``; a second one for the same message id and outcome is dropped."""
        with self._mutex, self._transaction("publish a result") as db:
            db.execute(
                "INSERT OR IGNORE INTO shir_channel_results (message_id, job_id, outcome, "
                "detail, at) VALUES (?, ?, ?, ?, ?)",
                (result.message_id, result.job_id, result.outcome, result.detail,
                 float(result.at)),
            )

    def results(self, message_id: str | None = None) -> list[JobResult]:
        """Results published so far, in publication order (all, or one request's)."""
        query = "SELECT message_id, job_id, outcome, detail, at FROM shir_channel_results"
        args: tuple[str, ...] = ()
        if message_id is not None:
            query += " WHERE message_id = ?"
            args = (message_id,)
        with self._mutex:
            try:
                rows = self._conn().execute(query + " ORDER BY seq", args).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "read the results") from None
        return [JobResult(m, j, o, d, float(a)) for m, j, o, d, a in rows]

    def close(self) -> None:
        """Close the connection. Safe to call twice; the channel is unusable after."""
        with self._mutex:
            self._close_quietly()
