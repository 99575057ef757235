"""An event store in one SQLite file, shared by several processes on one machine.

Theory of operation
-------------------
The file holds three tables of this store (and may hold others, such as the embedded control
channel's)::

    shir_meta(key, value)                 format name and version of the file
    shir_events(stream, version, data)    one row per event; data = shir.core.codec.encode(event)
    shir_snapshots(stream, version, data) the latest snapshot per stream

The connection runs in WAL mode (readers never block the writer, nor the writer readers) with a
busy timeout, so several node processes can share the file. An append is one ``BEGIN
IMMEDIATE`` transaction: it takes the file's write lock first, then reads the stream's version
and inserts the rows only if it is the version the writer expected; otherwise it rolls back and
raises :class:`~shir.core.store.ConcurrencyConflict`. Holding the write lock from the check to
the commit is what makes the check and the insert one step: two processes can never both
append at one version, and a batch lands whole or not at all (the primary key ``(stream,
version)`` backs this up). Events are encoded before the transaction starts, so a codec error
writes nothing and the lock is held only for the inserts.

Durability: ``synchronous=FULL`` by default (every commit is flushed to disk before ``append``
returns); ``fsync=False`` uses ``NORMAL``, which in WAL mode survives a process crash but may
lose the last commits on a power loss.

Formats: ``shir_meta`` names the format (``shir-sqlite-store``) and its version. Opening a file
written by a newer shir (a higher version) is refused with :class:`UnsupportedStoreFormat`
rather than guessed at; a SQLite file that is not a shir store, or a file that is not SQLite at
all, is refused with :class:`NotAShirStore`.

Busy file: a writer that waits for the write lock longer than ``busy_timeout_s`` gets a
:class:`StoreBusy` error (nothing was appended), never a silent retry forever.

One store object serialises its own calls with a lock, so threads may share one; any number of
store objects, in any number of processes on the machine, may share the file. (SQLite's locks
do not work over network file systems: use the Blob store for nodes on several machines.)
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from shir.adapters.closing import CloseOnExit
from shir.core.codec import decode, encode
from shir.core.store import (
    AppendOutcomeUnknown,
    Snapshot,
    StoreError,
    check_append,
    check_snapshot,
    check_stream_name,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NotAShirStore",
    "SQLiteEventStore",
    "StoreBusy",
    "UnsupportedStoreFormat",
    "enable_wal",
]


def enable_wal(db: sqlite3.Connection, timeout_s: float) -> str:
    """Switch ``db`` to WAL mode and return the journal mode SQLite reports.

    Several processes opening a new file at once can get "database is locked" from this pragma
    at once, without SQLite's busy handler waiting (seen here about once in seven races of six
    openers), so it is retried, bounded by ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    for attempt in range(10_000):
        try:
            return str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(min(0.005 * (attempt + 1), 0.05))
    raise sqlite3.OperationalError("database is locked")  # pragma: no cover (bounded above)

FORMAT_NAME = "shir-sqlite-store"
#: The version of the file layout this code writes; a file with a higher one is refused.
FORMAT_VERSION = 1
DEFAULT_BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shir_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shir_events (
    stream TEXT NOT NULL, version INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (stream, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shir_snapshots (
    stream TEXT PRIMARY KEY, version INTEGER NOT NULL, data BLOB NOT NULL
) WITHOUT ROWID;
"""


class NotAShirStore(StoreError):
    """The file is not SQLite, or is SQLite without shir's tables."""


class UnsupportedStoreFormat(StoreError):
    """The file was written by a newer shir (or another program using the same table)."""


class StoreBusy(StoreError):
    """Another process held the file's write lock for longer than the busy timeout."""


def _is_busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


class SQLiteEventStore(CloseOnExit):
    """The :class:`~shir.core.store.EventStore` port on a SQLite file; see the module doc.

    ``create=False`` refuses a file that does not exist yet (a node joining a runtime must not
    create an empty store by a typo). ``busy_timeout_s`` bounds how long an operation waits for
    another process's write lock.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, create: bool = True, fsync: bool = True,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        self._path = os.fspath(path)
        self._busy_timeout_s = busy_timeout_s
        self._mutex = threading.Lock()
        folder = os.path.dirname(os.path.abspath(self._path))
        if not os.path.isdir(folder):
            raise StoreError(
                f"cannot open the SQLite store {self._path}: the folder {folder} does not exist; "
                "create it first or give another path"
            )
        if not create and not os.path.exists(self._path):
            raise StoreError(
                f"there is no SQLite store at {self._path}: check the path, or create the "
                "runtime first (shir runtime create --store sqlite:///PATH)"
            )
        try:
            # isolation_level=None: no implicit transactions; this class opens its own.
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self._path, timeout=busy_timeout_s, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store {self._path}: {exc}") from None
        try:
            self._setup(fsync)
        except BaseException as exc:
            self._db.close()
            self._db = None
            if isinstance(exc, sqlite3.Error):  # a damaged file shows in any statement
                raise self._error(exc, "open") from None
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def _setup(self, fsync: bool) -> None:
        db = self._connection()
        try:
            mode = enable_wal(db, self._busy_timeout_s)
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "open") from None
        if str(mode).lower() != "wal":
            raise StoreError(
                f"{self._path}: SQLite refused WAL mode (journal mode is {mode}); the file must "
                "be on a local file system that supports shared memory"
            )
        db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys=ON")
        with self._transaction(db, "open"):
            tables = {
                row[0] for row in db.execute(
                    "SELECT name FROM sqlite_master WHERE type='table' "
                    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"  # SQLite's own tables
                )
            }
            if "shir_meta" not in tables and not tables <= _KNOWN_TABLES:
                raise NotAShirStore(
                    f"{self._path} is a SQLite database of another program (it has no shir_meta "
                    "table): give the path of a shir store, or a new file"
                )
            # One statement at a time: executescript would commit the open transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM shir_meta").fetchall())
            if not meta:
                db.executemany(
                    "INSERT INTO shir_meta (key, value) VALUES (?, ?)",
                    [("format", FORMAT_NAME), ("format_version", str(FORMAT_VERSION))],
                )
            else:
                self._check_format(meta)

    def _check_format(self, meta: dict[str, str]) -> None:
        if meta.get("format") != FORMAT_NAME:
            raise NotAShirStore(
                f"{self._path} is not a shir event store (its shir_meta table names the format "
                f"{meta.get('format')!r}, not {FORMAT_NAME!r}): give the path of a shir store"
            )
        raw = meta.get("format_version", "")
        version = int(raw) if raw.isdigit() else None
        if version is None:
            raise NotAShirStore(
                f"{self._path}: the store's format version {raw!r} is not a number; the file "
                "was damaged or written by another program"
            )
        if version > FORMAT_VERSION:
            raise UnsupportedStoreFormat(
                f"{self._path} was written in store format {version} by a newer shir; this "
                f"shir reads format {FORMAT_VERSION} and earlier: upgrade shir on this machine"
            )

    def close(self) -> None:
        """Close the connection. Safe to call twice; the store is unusable after."""
        with self._mutex:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __repr__(self) -> str:
        return f"SQLiteEventStore(path={self._path!r})"

    @property
    def path(self) -> str:
        """The SQLite file."""
        return self._path

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the SQLiteEventStore on {self._path} is closed; open a new one")
        return self._db

    @contextmanager
    def _transaction(self, db: sqlite3.Connection, doing: str) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock is held from the first read on."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from None
        try:
            yield
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.rollback()
            raise self._error(exc, doing) from None

    def _error(self, exc: sqlite3.Error, doing: str) -> StoreError:
        if _is_busy(exc):
            return StoreBusy(
                f"{self._path}: another process held the store's write lock for more than "
                f"{self._busy_timeout_s:g} s, so this store could not {doing}; nothing was "
                "written: retry, or raise busy_timeout_s"
            )
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
            return NotAShirStore(
                f"{self._path} is not a SQLite database (and so not a shir store): give the "
                "path of a shir store, or a new file"
            )
        if isinstance(exc, sqlite3.DatabaseError) and "malformed" in str(exc):
            return StoreError(
                f"{self._path}: SQLite failed to {doing}: {exc} (the file is damaged: a copy "
                "cut short, or a crash without fsync): restore it from a backup; nothing was "
                "written"
            )
        return StoreError(f"{self._path}: SQLite failed to {doing}: {exc}")

    # -- the EventStore port -----------------------------------------------------------------

    def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
        """Append ``events`` if the stream is at ``expected_version``; return the new version.

        The check and the inserts run in one ``BEGIN IMMEDIATE`` transaction (see the module
        doc). A failure of the commit itself raises
        :class:`~shir.core.store.AppendOutcomeUnknown`.
        """
        check_stream_name(stream)
        payloads = [encode(e) for e in events]  # codec errors surface before any write
        with self._mutex:
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error(exc, "append") from None
            try:
                actual = self._version(db, stream)
                check_append(stream, expected_version, actual)
                db.executemany(
                    "INSERT INTO shir_events (stream, version, data) VALUES (?, ?, ?)",
                    [(stream, actual + i + 1, p) for i, p in enumerate(payloads)],
                )
            except BaseException as exc:
                if db.in_transaction:
                    db.rollback()
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc, "append") from None
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.rollback()
                if _is_busy(exc):  # the commit did not happen; SQLite says so for busy
                    raise self._error(exc, "append") from None
                raise AppendOutcomeUnknown(
                    f"{self._path}: the commit of an append to {stream!r} failed ({exc}); the "
                    "events are in the stream in full or not at all: re-read it before "
                    "deciding again"
                ) from None
            return actual + len(payloads)

    @staticmethod
    def _version(db: sqlite3.Connection, stream: str) -> int:
        row = db.execute(
            "SELECT MAX(version) FROM shir_events WHERE stream = ?", (stream,)
        ).fetchone()
        return int(row[0] or 0)

    def read(self, stream: str, from_version: int = 0) -> list[object]:
        """The events after ``from_version``, decoded, in order."""
        check_stream_name(stream)
        if type(from_version) is not int or from_version < 0:
            raise StoreError(f"from_version must be a non-negative int, got {from_version!r}")
        with self._mutex:
            db = self._connection()
            try:
                rows = db.execute(
                    "SELECT data FROM shir_events WHERE stream = ? AND version > ? "
                    "ORDER BY version",
                    (stream, from_version),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from None
        return [decode(row[0]) for row in rows]

    def version(self, stream: str) -> int:
        """How many events the stream holds."""
        check_stream_name(stream)
        with self._mutex:
            db = self._connection()
            try:
                return self._version(db, stream)
            except sqlite3.Error as exc:
                raise self._error(exc, "read the version") from None

    def save_snapshot(self, stream: str, snapshot: Snapshot) -> None:
        """Replace the stream's snapshot (in a transaction that checks it against the stream)."""
        check_stream_name(stream)
        with self._mutex:
            db = self._connection()
            with self._transaction(db, "save a snapshot"):
                try:
                    check_snapshot(stream, snapshot, self._version(db, stream))
                    db.execute(
                        "INSERT OR REPLACE INTO shir_snapshots (stream, version, data) "
                        "VALUES (?, ?, ?)",
                        (stream, snapshot.version, bytes(snapshot.data)),
                    )
                except sqlite3.Error as exc:
                    raise self._error(exc, "save a snapshot") from None

    def load_snapshot(self, stream: str) -> Snapshot | None:
        """The stream's latest snapshot, or ``None``."""
        check_stream_name(stream)
        with self._mutex:
            db = self._connection()
            try:
                row = db.execute(
                    "SELECT version, data FROM shir_snapshots WHERE stream = ?", (stream,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc, "load a snapshot") from None
        return None if row is None else Snapshot(int(row[0]), bytes(row[1]))

    def streams(self) -> list[str]:
        """The names of the streams holding at least one event (for tools such as status)."""
        with self._mutex:
            db = self._connection()
            try:
                rows = db.execute("SELECT DISTINCT stream FROM shir_events ORDER BY stream")
                return [row[0] for row in rows.fetchall()]
            except sqlite3.Error as exc:
                raise self._error(exc, "list the streams") from None


# Tables other shir adapters keep in the same file (the embedded control channel): a file that
# holds only those is still one of ours.
_KNOWN_TABLES = frozenset(
    {"shir_meta", "shir_events", "shir_snapshots", "shir_channel_meta", "shir_channel_messages",
     "shir_channel_results"}
)
