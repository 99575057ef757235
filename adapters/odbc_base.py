"""What every ODBC user shares, without pyodbc: the errors, connection strings (parse, format,
the PostgreSQL and SQLite builders), the scrubbing of the secrets in them, and the
descriptions of result columns and drivers.

:mod:`shir.adapters.odbc` (the pyodbc source) and :mod:`shir.adapters.copy_arrow` (arrow-odbc)
both use it, and re-export what they raise; a caller that only builds or checks a connection
string needs neither driver library.

**Secrets.** A connection string's secret values (any key with ``pwd``, ``password``, ``secret``
or ``token`` in its name) never leave through an error: :func:`scrubber` replaces them in a
driver's message (and withholds a message holding one too short to replace safely), and
:func:`describe_target` names the target by its non-secret keys only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from shir.core.errors import ShirError

__all__ = [
    "DEFAULT_FETCH_ROWS",
    "Column",
    "ConnectFailed",
    "ConnectionLost",
    "DriverInfo",
    "DriverNotInstalled",
    "InvalidConnectionString",
    "OdbcError",
    "QueryCancelled",
    "QueryFailed",
    "QueryTimedOut",
    "describe_target",
    "format_connection_string",
    "parse_connection_string",
    "postgresql_connection_string",
    "scrubber",
    "sqlite_connection_string",
]

#: Rows per server round trip for psqlODBC's declare/fetch cursor (its ``Fetch`` option).
DEFAULT_FETCH_ROWS = 10_000

_SECRET_KEY = re.compile(r"pwd|password|secret|token", re.IGNORECASE)
# A `key=value` pair in text a driver echoes back, for keys that hold secrets.
_SECRET_PAIR = re.compile(
    r"(?i)\b([a-z_]*(?:pwd|password|secret|token)[a-z_]*\s*=\s*)(\{(?:[^}]|\}\})*\}?|[^;\s]*)"
)
# Keys that name what a connection reaches, in the order the target is described.
_TARGET_KEYS = (
    ("driver", "driver"),
    ("dsn", "DSN"),
    ("server", "server"),
    ("host", "host"),
    ("servername", "server"),
    ("port", "port"),
    ("database", "database"),
    ("dbname", "database"),
    ("uid", "user"),
    ("user", "user"),
    ("username", "user"),
)
# Secrets shorter than this are not replaced inside a driver message (it would garble the
# text); a message that contains one is withheld instead.
_MIN_SCRUB_CHARS = 4



# --- errors -----------------------------------------------------------------------------------


class OdbcError(ShirError):
    """An ODBC source could not be opened or read; the message says what and where.

    ``sqlstate`` is the ODBC SQLSTATE when the driver gave one; ``driver_message`` is the
    driver's text with secrets replaced by ``***``. Neither ever holds a password.
    """

    def __init__(
        self, message: str, *, sqlstate: str | None = None, driver_message: str = ""
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.driver_message = driver_message


class InvalidConnectionString(OdbcError, ValueError):
    """A connection string that cannot be parsed (its content is never repeated)."""


class DriverNotInstalled(OdbcError):
    """The ODBC driver the connection string names is not registered or cannot be loaded."""


class ConnectFailed(OdbcError):
    """The driver could not connect: unreachable host or port, wrong credentials, no database."""


class ConnectionLost(OdbcError):
    """The connection broke during a query (server restart, network, backend terminated)."""


class QueryFailed(OdbcError):
    """The database refused or failed the query (syntax, missing table, division by zero...)."""


class QueryCancelled(OdbcError):
    """The query was cancelled: by :meth:`OdbcSource.cancel`, a timeout, or the server."""


class QueryTimedOut(QueryCancelled):
    """A call ran longer than ``timeout_s`` (or the server's ``statement_timeout``)."""


# --- connection strings -----------------------------------------------------------------------


def _escape(value: str) -> str:
    # ODBC: a value with ; { } (or edge spaces, or =) goes in braces, with } doubled inside.
    if value and not re.search(r"[;{}=]|^\s|\s$", value):
        return value
    return "{" + value.replace("}", "}}") + "}"


def format_connection_string(pairs: Mapping[str, str | int]) -> str:
    """Join ``key=value`` pairs into an ODBC connection string, escaping values as ODBC does.

    Values that contain ``;``, ``{``, ``}`` or ``=``, start or end with a space, or are empty are
    put in braces with each ``}`` doubled (``p;w}d`` -> ``{p;w}}d}``); unixODBC, psqlODBC and
    SQLite ODBC all read that back as the original value. ``Driver`` is always braced. Keys
    must be non-empty and free of ``;``, ``=``, ``{`` and ``}``.
    """
    parts = []
    for key, raw in pairs.items():
        if not key or re.search(r"[;={}]", key) or key != key.strip():
            raise InvalidConnectionString(f"invalid connection string key {key!r}")
        value = str(raw)
        if key.lower() == "driver":
            parts.append(f"{key}={{{value.replace('}', '}}')}}}")
        else:
            parts.append(f"{key}={_escape(value)}")
    return ";".join(parts)


def parse_connection_string(connection_string: str) -> dict[str, str]:
    """The ``key=value`` pairs of an ODBC connection string, keys in lower case.

    Braced values are unescaped (``{p;w}}d}`` -> ``p;w}d``). Raises
    :class:`InvalidConnectionString`, whose message never repeats the string (it may hold a
    password).
    """
    pairs: dict[str, str] = {}
    text, i, n = connection_string, 0, len(connection_string)
    while i < n:
        if text[i] in "; ":
            i += 1
            continue
        eq = text.find("=", i)
        if eq < 0:
            raise InvalidConnectionString(
                f"connection string: the pair at character {i} has no '=' (content not shown)"
            )
        key = text[i:eq].strip().lower()
        j = eq + 1
        if text[j : j + 1] == "{":
            value_chars: list[str] = []
            j += 1
            while True:
                if j >= n:
                    raise InvalidConnectionString(
                        f"connection string: the braced value at character {eq + 1} is not "
                        "closed (content not shown)"
                    )
                if text[j] == "}":
                    if text[j + 1 : j + 2] == "}":
                        value_chars.append("}")
                        j += 2
                        continue
                    j += 1
                    break
                value_chars.append(text[j])
                j += 1
            value = "".join(value_chars)
            end = text.find(";", j)
            if text[j : end if end >= 0 else n].strip():
                raise InvalidConnectionString(
                    f"connection string: text after the braced value at character {eq + 1} "
                    "(content not shown)"
                )
            i = n if end < 0 else end + 1
        else:
            end = text.find(";", j)
            end = n if end < 0 else end
            value = text[j:end].strip()
            i = end + 1
        pairs[key] = value
    return pairs


def postgresql_connection_string(
    host: str,
    port: int,
    database: str,
    user: str,
    password: str,
    *,
    fetch_rows: int = DEFAULT_FETCH_ROWS,
    time_zone: str | None = "UTC",
    statement_timeout_s: float | None = None,
    driver: str = "PostgreSQL Unicode",
    extra: Mapping[str, str | int] | None = None,
) -> str:
    """A psqlODBC connection string that streams: ``UseDeclareFetch=1;Fetch=<fetch_rows>``.

    Without declare/fetch psqlODBC reads the whole result into memory before the first row.
    ``BoolsAsChar=0`` makes ``boolean`` columns come back as ``bool`` (not ``'1'``/``'0'``).
    ``time_zone`` is set as the session's ``TimeZone`` (psqlODBC hands ``timestamptz`` back as a
    naive ``datetime`` in the session's zone, so "UTC" makes them UTC; None keeps the server's
    default). ``statement_timeout_s`` sets the server's ``statement_timeout``, which bounds each
    ``FETCH`` as well as the query (unlike a client-side cancel, see the module docs).
    ``extra`` adds driver options, e.g. ``{"SSLmode": "verify-full"}``. Every value is escaped
    (:func:`format_connection_string`), so passwords may contain ``;``, ``{`` and ``}``.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    if fetch_rows < 1:
        raise ValueError(f"fetch_rows must be at least 1, got {fetch_rows}")
    settings = []
    if time_zone is not None:
        settings.append("SET TimeZone = '" + time_zone.replace("'", "''") + "'")
    if statement_timeout_s is not None:
        if statement_timeout_s <= 0:
            raise ValueError(f"statement_timeout_s must be positive, got {statement_timeout_s}")
        settings.append(f"SET statement_timeout = {max(1, math.ceil(statement_timeout_s * 1000))}")
    pairs: dict[str, str | int] = {
        "Driver": driver,
        "Server": host,
        "Port": port,
        "Database": database,
        "Uid": user,
        "Pwd": password,
        "UseDeclareFetch": 1,
        "Fetch": fetch_rows,
        "BoolsAsChar": 0,  # boolean as bool; psqlODBC's default hands back '1'/'0' strings
    }
    if settings:
        pairs["ConnSettings"] = "; ".join(settings)
    pairs.update(extra or {})
    return format_connection_string(pairs)


def sqlite_connection_string(
    path: str | Path, *, driver: str = "SQLite3", extra: Mapping[str, str | int] | None = None
) -> str:
    """An SQLite ODBC connection string for the database file at ``path`` (the embedded default).

    SQLite ODBC creates the file if it does not exist. ``extra`` adds driver options such as
    ``{"Timeout": 5000}`` (ms to wait on a locked database).
    """
    return format_connection_string({"Driver": driver, "Database": str(path), **(extra or {})})


# --- descriptions -----------------------------------------------------------------------------


@attrs.frozen
class Column:
    """One result column, as the driver describes it before the first row is fetched.

    ``python_type`` is the type pyodbc reports for the column (``int``, ``str``,
    ``decimal.Decimal``, ``float``, ``datetime.datetime``...; for binary columns it says
    ``bytearray`` and the values are ``bytes``). ``size`` is the
    driver's column size (characters for text, digits of precision for exact numbers),
    ``scale`` the digits after the point; ``nullable`` is None when the driver does not know.
    ``time_zone``: for a timestamp column whose values are instants, the zone they are in
    (``"UTC"``, set by the copy for PostgreSQL ``timestamptz``: :mod:`shir.adapters.copy_zones`);
    None for wall-clock timestamps and whenever it is not known (the driver does not say).
    """

    name: str
    python_type: type
    size: int | None
    scale: int | None
    nullable: bool | None
    time_zone: str | None = None


@attrs.frozen
class DriverInfo:
    """Which driver and database a source talks to (ODBC ``SQLGetInfo``)."""

    driver_name: str
    driver_version: str
    dbms_name: str
    dbms_version: str

    def __str__(self) -> str:
        return (
            f"{self.dbms_name} {self.dbms_version} via {self.driver_name} {self.driver_version}"
        )


# --- secrets ----------------------------------------------------------------------------------


def scrubber(pairs: Mapping[str, str]) -> Callable[[str], str]:
    """A function that removes the secret values of ``pairs`` from text.

    A closure, so the secrets are not an attribute of the source (``vars()`` shows no password).
    """
    secrets = sorted(
        {v for k, v in pairs.items() if _SECRET_KEY.search(k) and v}, key=len, reverse=True
    )
    forms = [form for s in secrets for form in dict.fromkeys((s, _escape(s)))]

    def scrub(text: str) -> str:
        text = _SECRET_PAIR.sub(lambda m: m.group(1) + "***", text)
        for form in forms:
            if form in text:
                if len(form) < _MIN_SCRUB_CHARS:
                    return "(driver message withheld: it may contain the password)"
                text = text.replace(form, "***")
        return text

    return scrub


def describe_target(pairs: Mapping[str, str]) -> str:
    """How errors name what ``pairs`` connect to: driver, server, port, database, user (never
    a secret)."""
    seen: dict[str, str] = {}
    for key, label in _TARGET_KEYS:
        if key in pairs and label not in seen:
            seen[label] = pairs[key]
    if not seen:
        return "an unnamed ODBC target"
    return ", ".join(
        f"driver {{{value}}}" if label == "driver" else f"{label} {value}"
        for label, value in seen.items()
    )
