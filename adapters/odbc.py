"""Reading a copy job's source rows over ODBC: what a node uses to reach on-premises databases.

Theory of operation
-------------------
An :class:`OdbcSource` is one ODBC connection, opened from a connection string. ``read(query)``
executes the query at once (so a bad query fails at the call, not at the first batch), exposes
the result's :class:`Column` descriptions, and returns a :class:`RowStream` that yields the rows
in batches of ``batch_rows`` tuples, each fetched with ``cursor.fetchmany``: the adapter never
holds more than one batch. One read is open at a time; it ends (cursor closed, transaction
rolled back: a source only reads, and this releases the snapshot and locks) when the stream is
exhausted, closed, or fails.

Streaming needs the driver's help. psqlODBC by default materialises the whole result in the
client on execute; with ``UseDeclareFetch=1;Fetch=N`` it declares a server-side cursor and
fetches ``N`` rows at a time. :func:`postgresql_connection_string` always sets both; a psqlODBC
connection without them gets a warning in the log. SQLite ODBC 0.9998 builds the whole result
in memory on execute: it steps row by row only outside a transaction, and a source reads in one.

**Values are passed through as the driver gives them.** Each driver hands back the Python type
that holds its stored value exactly: PostgreSQL ``numeric`` is exact, and psqlODBC returns
``Decimal`` (a float would lose digits); SQLite has no decimal type (a ``NUMERIC`` column
stores REAL or INTEGER), and its driver returns ``float``, which *is* the stored value (a
``Decimal`` would invent precision the source never had). Converting per value would also cost
Python work on the hot path. Rows are turned from ``pyodbc.Row`` into plain tuples, so callers
never depend on pyodbc types; :attr:`Column.python_type` tells a sink per column what to expect.
docs/sources.md has the table of what each driver returns.

**Timeouts are enforced by the adapter, not the driver.** pyodbc's ``connection.timeout``
(``SQL_ATTR_QUERY_TIMEOUT``) does not work with either driver here: psqlODBC 13.02 refuses the
attribute ("unsupported connect attribute 113") and SQLite ODBC 0.9998 accepts it and lets a
query run on. With ``timeout_s`` set, a watchdog thread calls ``SQLCancel`` (pyodbc's
``cursor.cancel()``) on any execute or fetch that runs longer; :meth:`OdbcSource.cancel` does
the same on demand from another thread. Both drivers honour the cancel during execute (psqlODBC
sends PostgreSQL a cancel request; SQLite interrupts). psqlODBC ignores it while fetching the
next block of a declare/fetch cursor, so that fetch runs to its end and the read *then* raises
:class:`QueryTimedOut`: a call that outlives its deadline never returns rows. SQLite fetches are
never cancelled (its ``SQLCancel`` frees the result under the fetch and crashes the process;
they only read the result the execute built): they too end, then the read stops. A commit in
:meth:`OdbcSource.execute` that succeeds stands, however late, and is not reported as stopped.
For a hard bound on PostgreSQL fetches too, set ``statement_timeout_s`` in
:func:`postgresql_connection_string` (the server's ``statement_timeout`` applies to every
``FETCH``).

**Secrets.** The connection string is not kept: the source keeps the non-secret parts that
name the target and a scrubber for the password (:mod:`shir.adapters.odbc_base`). Errors carry
the SQLSTATE and the scrubbed driver message, name the target, never include the query text or
the connection string, and are raised without chaining the pyodbc exception.

Errors (all :class:`OdbcError`, a :class:`~shir.core.errors.ShirError`):
:class:`DriverNotInstalled`, :class:`ConnectFailed`, :class:`QueryFailed`,
:class:`QueryCancelled` (and its :class:`QueryTimedOut`), :class:`ConnectionLost`,
:class:`InvalidConnectionString`.

Threads: a source is used from one thread; only :meth:`OdbcSource.cancel` may be called from
another.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

try:
    import pyodbc
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shir.adapters.odbc needs pyodbc and the unixODBC driver manager: "
        "pip install 'shir[odbc]', and on Debian/Ubuntu "
        "apt-get install unixodbc odbc-postgresql libsqliteodbc "
        "(the last two: the PostgreSQL and SQLite ODBC drivers)"
    ) from exc

from shir.adapters.closing import CloseOnExit
from shir.adapters.odbc_base import (
    DEFAULT_FETCH_ROWS,
    Column,
    ConnectFailed,
    ConnectionLost,
    DriverInfo,
    DriverNotInstalled,
    InvalidConnectionString,
    OdbcError,
    QueryCancelled,
    QueryFailed,
    QueryTimedOut,
    describe_target,
    format_connection_string,
    parse_connection_string,
    postgresql_connection_string,
    scrubber,
    sqlite_connection_string,
)

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_FETCH_ROWS",
    "Column",
    "ConnectFailed",
    "ConnectionLost",
    "DriverInfo",
    "DriverNotInstalled",
    "InvalidConnectionString",
    "OdbcError",
    "OdbcSource",
    "QueryCancelled",
    "QueryFailed",
    "QueryTimedOut",
    "RowStream",
    "format_connection_string",
    "parse_connection_string",
    "postgresql_connection_string",
    "sqlite_connection_string",
]

log = logging.getLogger(__name__)

#: Rows per batch that :meth:`OdbcSource.read` yields unless told otherwise.
DEFAULT_BATCH_ROWS = 10_000
# Driver names (lower case) -> the Debian/Ubuntu package that provides them.
_DEBIAN_PACKAGES = {
    "postgresql unicode": "odbc-postgresql",
    "postgresql ansi": "odbc-postgresql",
    "sqlite3": "libsqliteodbc",
    "sqlite": "libsqliteodbc",
}
# SQLSTATEs at connect that mean the driver itself could not be found or loaded.
_DRIVER_MISSING_STATES = frozenset({"IM002", "IM003"})
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
# --- driver errors ------------------------------------------------------------------------------


def _missing_driver_message(driver: str, installed: Sequence[str]) -> str:
    package = _DEBIAN_PACKAGES.get(driver.lower())
    how = (
        f"on Debian/Ubuntu: apt-get install {package}"
        if package
        else "install the database vendor's ODBC driver and register it in odbcinst.ini"
    )
    return (
        f"the ODBC driver {{{driver}}} is not installed ({how}); `odbcinst -q -d` lists the "
        f"installed drivers, here: {', '.join(installed) or 'none'}"
    )


def _error_parts(exc: BaseException, scrub: Callable[[str], str]) -> tuple[str | None, str]:
    """(SQLSTATE, scrubbed driver message) of a pyodbc error."""
    args = exc.args
    state: str | None = None
    if (
        len(args) == 2 and isinstance(args[1], str) and _SQLSTATE.fullmatch(args[1])
        and not _SQLSTATE.fullmatch(str(args[0]))
    ):
        args = (args[1], args[0])  # pyodbc's own checks: (message, SQLSTATE)
    if len(args) >= 2 and isinstance(args[0], str) and _SQLSTATE.fullmatch(args[0]):
        state, message = args[0], str(args[1])
    else:
        message = " ".join(str(a) for a in args)
    if state is not None and message.startswith(f"[{state}] "):
        message = message[len(state) + 3 :]  # pyodbc repeats the state in the text
    message = re.sub(r"\s*\n\s*", " ", message).strip()
    return state, scrub(message)


# --- the source -------------------------------------------------------------------------------


@attrs.define
class _Call:
    """The one ODBC call in flight, for the watchdog and :meth:`OdbcSource.cancel`."""

    cursor: Any
    deadline: float  # time.monotonic(); inf: no timeout
    interruptible: bool = True  # False: never SQLCancel it, stop the read once it returns
    timed_out: bool = False


class OdbcSource(CloseOnExit):
    """One ODBC connection that reads source rows in batches; see the module docs.

    ``OdbcSource(connection_string, timeout_s=30)`` connects at once (``connect_timeout_s``
    bounds the login, where the driver supports it). Use it as a context manager or call
    :meth:`close`. ``timeout_s`` bounds every execute and fetch call (None: no bound).
    ``target`` names what it reaches (driver, server, port, database, user: never the
    password) and ``driver`` which driver and database answered.
    """

    driver: DriverInfo
    _connection: Any

    def __init__(
        self,
        connection_string: str,
        *,
        timeout_s: float | None = None,
        connect_timeout_s: float | None = 30.0,
    ) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
        self.target = "an ODBC target"
        self.timeout_s = timeout_s
        self._scrub: Callable[[str], str] = str
        self._lock = threading.Condition()
        self._call: _Call | None = None
        self._cancel_requested = False
        self._busy = False  # a read or execute is under way: cancel() applies to it
        self._stream: RowStream | None = None
        self._watchdog: threading.Thread | None = None
        self._watchdog_wakes_at = math.inf
        self._closed = False
        self._cancel_fetches = True  # see _open
        error = self._open(connection_string, connect_timeout_s)
        # Tools that record tracebacks with frame locals (crash reporters) must not find the
        # password: drop the string, and raise with a traceback that starts here.
        del connection_string
        if error is not None:
            raise error.with_traceback(None)

    # -- opening ------------------------------------------------------------------------------

    def _open(self, connection_string: str, connect_timeout_s: float | None) -> OdbcError | None:
        """Parse, check the driver and connect; returns the error instead of raising it."""
        try:
            pairs = parse_connection_string(connection_string)
        except InvalidConnectionString as exc:
            return exc
        self._scrub = scrubber(pairs)
        self.target = describe_target(pairs)
        driver = pairs.get("driver")
        if driver is not None and "/" not in driver:  # not a DSN, nor a library path
            installed = pyodbc.drivers()
            if driver.lower() not in {d.lower() for d in installed}:
                return DriverNotInstalled(_missing_driver_message(driver, installed))
        login_timeout = 0 if connect_timeout_s is None else max(1, math.ceil(connect_timeout_s))
        try:
            # autocommit off: a read runs in one transaction, rolled back when it ends
            self._connection = pyodbc.connect(
                connection_string, autocommit=False, timeout=login_timeout
            )
        except (UnicodeError, ValueError):
            # UnicodeEncodeError holds the whole string (.object): not raised, not chained
            return InvalidConnectionString(
                "connection string: it holds characters that cannot be encoded for the driver, "
                "such as a lone surrogate from bytes that were not UTF-8 (content not shown)"
            )
        except pyodbc.Error as exc:
            state, message = _error_parts(exc, self._scrub)
            if state in _DRIVER_MISSING_STATES or "can't open lib" in message.lower():
                return DriverNotInstalled(
                    f"{self.target}: the ODBC driver could not be loaded [{state}]: {message}. "
                    "`odbcinst -q -d` lists the installed drivers; on Debian/Ubuntu the "
                    "PostgreSQL driver is odbc-postgresql and the SQLite one libsqliteodbc",
                    sqlstate=state, driver_message=message,
                )
            return ConnectFailed(
                f"cannot connect to {self.target} [{state or 'no SQLSTATE'}]: {message}",
                sqlstate=state, driver_message=message,
            )
        info = self._connection.getinfo
        try:
            self.driver = DriverInfo(
                driver_name=str(info(pyodbc.SQL_DRIVER_NAME)),
                driver_version=str(info(pyodbc.SQL_DRIVER_VER)),
                dbms_name=str(info(pyodbc.SQL_DBMS_NAME)),
                dbms_version=str(info(pyodbc.SQL_DBMS_VER)),
            )
        except pyodbc.Error as exc:
            self._connection.close()
            state, message = _error_parts(exc, self._scrub)
            return ConnectFailed(
                f"{self.target}: connected, but the driver did not describe itself "
                f"[{state or 'no SQLSTATE'}]: {message}", sqlstate=state, driver_message=message,
            )
        log.debug("connected to %s: %s", self.target, self.driver)
        # SQLite ODBC's SQLCancel also frees the statement's result, under a fetch running in
        # another thread: the process crashes. Its fetches only read the result the execute
        # built, so they need no cancel; a timed-out or cancelled fetch stops once it returns.
        self._cancel_fetches = not self.driver.driver_name.lower().startswith("sqlite")
        if self.driver.driver_name.lower().startswith("psqlodbc") and "dsn" not in pairs and (
            pairs.get("usedeclarefetch") != "1"
        ):
            log.warning(
                "%s: psqlODBC without UseDeclareFetch=1 reads each whole result into memory "
                "before the first row; build the connection string with "
                "postgresql_connection_string() or add UseDeclareFetch=1;Fetch=10000",
                self.target,
            )
        return None

    # -- reading ------------------------------------------------------------------------------

    def read(
        self, query: str, params: Sequence[Any] = (), *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> RowStream:
        """Execute ``query`` (``?`` placeholders bound to ``params``) and stream its rows.

        Returns a :class:`RowStream`: its ``columns`` are known now, and iterating it yields
        tuples of at most ``batch_rows`` row tuples (only the last one shorter). Raises
        :class:`QueryFailed`, :class:`QueryCancelled`/:class:`QueryTimedOut` or
        :class:`ConnectionLost`; then nothing stays open.
        """
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        self._begin(params)
        cursor = self._open_cursor()
        try:
            self._run(cursor, cursor.execute, query, *params)
            description = cursor.description
            # Statements before the one with rows (``SET ...; SELECT ...``) leave no result set.
            while description is None and self._run(cursor, cursor.nextset):
                description = cursor.description
            if description is None:
                raise QueryFailed(
                    f"{self.target}: the statement returned no result set to read "
                    "(use execute() for statements without rows)"
                )
        except BaseException:
            self._finish(cursor)
            raise
        columns = tuple(
            Column(name=d[0], python_type=d[1], size=d[3], scale=d[5], nullable=d[6])
            for d in description
        )
        self._stream = RowStream(self, cursor, columns, batch_rows)
        return self._stream

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run a statement that returns no rows, and commit; returns the affected row count.

        For session set-up (``SET ...``, a ``TEMP`` table to read from); the copy itself only
        reads. Same errors and timeout as :meth:`read`; a failed statement is rolled back.
        """
        self._begin(params)
        cursor = self._open_cursor()
        committed = False
        try:
            self._run(cursor, cursor.execute, statement, *params)
            count = int(cursor.rowcount)
            self._run(cursor, self._connection.commit, done_stands=True)
            committed = True
            return count
        finally:
            self._finish(cursor, rollback=not committed)

    def cancel(self) -> None:
        """Cancel the open read from another thread; it raises :class:`QueryCancelled`.

        The call in flight, if any, is cancelled through the driver (``SQLCancel``); a read
        between calls stops at its next one. Without an open read this does nothing.
        """
        with self._lock:
            if not self._busy:
                return
            self._cancel_requested = True
            if self._call is not None and self._call.interruptible:
                with contextlib.suppress(pyodbc.Error):
                    self._call.cursor.cancel()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Close the open read, stop the watchdog and close the connection (idempotent)."""
        if self._closed:
            return
        if self._stream is not None:
            self._stream.close()
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._watchdog is not None:
            self._watchdog.join()
        with contextlib.suppress(pyodbc.Error):
            self._connection.close()
        log.debug("closed the connection to %s", self.target)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "reading" if self._stream else "open"
        driver = getattr(self, "driver", "not connected")  # a failed __init__ has none
        return f"<OdbcSource {self.target} ({driver}) timeout_s={self.timeout_s} {state}>"

    # -- internals ----------------------------------------------------------------------------

    def _begin(self, params: Sequence[Any]) -> None:
        if isinstance(params, str | bytes):
            raise TypeError("params must be a sequence of values, not a single str or bytes")
        if self._closed:
            raise OdbcError(f"{self.target}: the source is closed")
        if self._stream is not None:
            raise OdbcError(
                f"{self.target}: a read is still open on this source; finish or close it first"
            )
        with self._lock:
            self._busy = True
            self._cancel_requested = False

    def _open_cursor(self) -> Any:
        error: OdbcError | None = None
        try:
            return self._connection.cursor()
        except pyodbc.Error as exc:
            error = self._translate(exc)
        with self._lock:
            self._busy = False
        raise error

    def _run(
        self, cursor: Any, call: Callable[..., Any], *args: Any, interruptible: bool = True,
        done_stands: bool = False,
    ) -> Any:
        """``call(*args)`` under the timeout and cancel, with pyodbc errors translated.

        ``done_stands``: a call that succeeded returns even if it outlived its deadline or a
        cancel came meanwhile (a commit that happened cannot be reported as stopped).
        """
        deadline = math.inf if self.timeout_s is None else time.monotonic() + self.timeout_s
        with self._lock:
            if self._cancel_requested:
                raise self._cancelled()
            self._call = running = _Call(cursor, deadline, interruptible)
            if deadline < self._watchdog_wakes_at:
                self._start_or_wake_watchdog()
        error: OdbcError | None = None
        result: Any = None
        try:
            result = call(*args)
        except pyodbc.Error as exc:
            error = self._translate(exc)
        finally:
            with self._lock:  # waits for a cancel in progress: the cursor is ours again after
                self._call = None
                cancelled = self._cancel_requested
        if done_stands and error is None:
            return result
        if cancelled:
            raise self._cancelled()
        if running.timed_out:  # even if the driver ignored the cancel and the call finished
            raise QueryTimedOut(
                f"{self.target}: a call ran longer than timeout_s={self.timeout_s}, and the "
                "read was stopped" + ("" if error is None else
                                      f" (the driver cancelled the call [{error.sqlstate}])"),
                sqlstate=None if error is None else error.sqlstate,
                driver_message="" if error is None else error.driver_message,
            )
        if error is not None:
            raise error
        return result

    def _cancelled(self) -> QueryCancelled:
        return QueryCancelled(f"{self.target}: the read was cancelled (OdbcSource.cancel)")

    def _translate(self, exc: BaseException) -> OdbcError:
        state, message = _error_parts(exc, self._scrub)
        where = f"{self.target} [{state or 'no SQLSTATE'}]: {message}"
        kw: dict[str, Any] = {"sqlstate": state, "driver_message": message}
        if state in ("HYT00", "HYT01") or (state == "57014" and "timeout" in message.lower()):
            return QueryTimedOut(f"the query timed out on {where}", **kw)
        if state in ("HY008", "57014"):
            return QueryCancelled(f"the query was cancelled on {where}", **kw)
        if state is not None and (state.startswith("08") or state.startswith("57P")):
            return ConnectionLost(f"lost the connection to {where}", **kw)
        return QueryFailed(f"the query failed on {where}", **kw)

    def _finish(self, cursor: Any, *, rollback: bool = True) -> None:
        """Close ``cursor`` and end the transaction; failures here are logged, not raised."""
        for step in (cursor.close, self._connection.rollback if rollback else None):
            if step is None:
                continue
            try:
                step()
            except pyodbc.Error as exc:
                state, message = _error_parts(exc, self._scrub)
                log.debug("%s: cleanup step failed [%s]: %s", self.target, state, message)
        self._stream = None
        with self._lock:
            self._busy = False

    def _start_or_wake_watchdog(self) -> None:
        # called with the lock held
        if self._watchdog is None:
            # The thread holds the source only weakly, and is woken when the source is
            # collected: a source dropped without close() does not live on in its watchdog.
            weakref.finalize(self, _wake_all, self._lock)
            self._watchdog = threading.Thread(
                target=_watch, args=(weakref.ref(self), self._lock),
                name=f"shir-odbc-watchdog {self.target}", daemon=True,
            )
            self._watchdog.start()
        else:
            self._lock.notify()


def _wake_all(lock: threading.Condition) -> None:
    with lock:
        lock.notify_all()


def _watch(ref: weakref.ref[OdbcSource], lock: threading.Condition) -> None:
    """Cancel the call in flight once its deadline passes (the watchdog thread of one source).

    Ends when the source is closed or collected; holds it strongly only between waits.
    """
    with lock:
        while True:
            source = ref()
            if source is None or source._closed:
                return
            running = source._call
            if running is None or running.timed_out:
                # nothing to watch (or already cancelled): sleep until a call starts
                source._watchdog_wakes_at = math.inf
                del source, running
                lock.wait()
                continue
            left_s = running.deadline - time.monotonic()
            if left_s > 0:
                source._watchdog_wakes_at = running.deadline
                del source, running
                lock.wait(left_s)
                continue
            running.timed_out = True
            if not running.interruptible:
                continue
            # The lock stays held: the reading thread cannot close the cursor meanwhile.
            with contextlib.suppress(pyodbc.Error):
                running.cursor.cancel()


def _one_tuple(row: Any) -> tuple[Any, ...]:
    return (row[0],)


class RowStream(CloseOnExit):
    """The rows of one :meth:`OdbcSource.read`: ``columns`` and an iterator of batches.

    Each batch is a tuple of row tuples, ``batch_rows`` long except the last; no empty batch
    is yielded. The stream closes itself (and the source can read again) as soon as it has
    returned the last row, i.e. with a short batch or an empty fetch, and when a fetch fails;
    close it (or use ``with``) to stop early.
    """

    def __init__(
        self, source: OdbcSource, cursor: Any, columns: tuple[Column, ...], batch_rows: int
    ) -> None:
        self._source = source
        self._cursor = cursor
        self.columns = columns
        self.batch_rows = batch_rows
        self.rows_read = 0
        self.batches_read = 0
        self._open = True
        # itemgetter copies a pyodbc.Row into a tuple about 1.5x as fast as tuple(row) does
        self._as_tuple: Callable[[Any], tuple[Any, ...]] = (
            operator.itemgetter(*range(len(columns))) if len(columns) > 1 else _one_tuple
        )

    @property
    def column_names(self) -> tuple[str, ...]:
        """The columns' names, in result order."""
        return tuple(c.name for c in self.columns)

    def __iter__(self) -> Iterator[tuple[tuple[Any, ...], ...]]:
        return self

    def __next__(self) -> tuple[tuple[Any, ...], ...]:
        return tuple(map(self._as_tuple, self._next_rows()))

    def driver_rows(self) -> Iterator[Sequence[Sequence[Any]]]:
        """The batches as the driver hands them over: lists of row sequences (``pyodbc.Row``),
        without the per-row copy into a tuple. For a caller that only indexes or iterates the
        rows (the copy's encoders, ``zip(*rows)``) and keeps no row past its batch.
        """
        while True:
            try:
                yield self._next_rows()
            except StopIteration:
                return

    def _next_rows(self) -> Sequence[Any]:
        if not self._open:
            raise StopIteration
        try:
            rows = self._source._run(
                self._cursor, self._cursor.fetchmany, self.batch_rows,
                interruptible=self._source._cancel_fetches,
            )
        except BaseException:
            self.close()
            raise
        if not rows:
            self._check_no_more_results()
            self.close()
            raise StopIteration
        self.rows_read += len(rows)
        self.batches_read += 1
        if len(rows) < self.batch_rows:  # pyodbc's fetchmany comes up short only at the end
            self._check_no_more_results()
            self.close()
        return rows  # type: ignore[no-any-return]

    def _check_no_more_results(self) -> None:
        """Refuse a query whose later statements return rows too (``SELECT 1; SELECT 2``).

        psqlODBC would hand over the first result set and drop the rest without a word, and a
        copy that silently misses rows is worse than one that fails.
        """
        source, cursor = self._source, self._cursor
        try:
            while source._run(cursor, cursor.nextset, interruptible=source._cancel_fetches):
                if cursor.description is not None:
                    self.close()
                    raise QueryFailed(
                        f"{source.target}: the query returned more than one result set; a read "
                        "streams one: send each SELECT as its own read"
                    )
        except QueryFailed as exc:
            if exc.sqlstate not in ("HYC00", "IM001"):  # not "the driver cannot tell"
                self.close()
                raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the cursor and end the read's transaction (idempotent)."""
        if self._open:
            self._open = False
            self._source._finish(self._cursor)
            log.debug(
                "%s: read %d rows in %d batches", self._source.target, self.rows_read,
                self.batches_read,
            )

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return (
            f"<RowStream {self.column_names} batch_rows={self.batch_rows} "
            f"rows_read={self.rows_read} {state}>"
        )
