"""Timestamps with a time zone in the copy: read as instants, written with their zone, loaded back.

Theory of operation
-------------------
psqlODBC hands a PostgreSQL ``timestamptz`` over as a naive ``datetime`` in the session's
``TimeZone`` (it drops the offset), and describes it exactly like a ``timestamp``. So the copy
does two things on a PostgreSQL connection before it reads:

* it sets the session's ``TimeZone`` to UTC (:func:`use_utc` on a pyodbc source;
  :func:`utc_connection_string` adds it to psqlODBC's ``ConnSettings`` for a connection the copy
  does not hold, the arrow engine's): every ``timestamptz`` then arrives as UTC wall time;
* it asks the server which result columns are ``timestamptz`` (:func:`instant_columns`: the
  query wrapped as ``SELECT * FROM (query) LIMIT 0`` and its columns' ``pg_typeof``; read
  only, nothing executed beyond planning). Those columns get ``time_zone="UTC"``
  (:func:`with_zones`) and every format writes them with their zone: ``+00:00`` in CSV and JSON
  lines, ``timestamp[us, tz=UTC]`` in Parquet.

A query the server cannot wrap (several statements, say) is copied without zones, as before,
with a warning in the log: its values are still UTC, only the ``+00:00`` is missing.

The load sets the target session's ``TimeZone`` to UTC too and converts a value with an offset
to UTC (:func:`~shir.adapters.copy_formats.naive_utc`) before binding it (pyodbc binds a
``datetime``'s wall time and drops its ``tzinfo``): a ``timestamptz`` comes back as the same
instant, and a value without an offset is read as UTC. Other databases (SQLite has no zoned
type) are left as they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from shir.adapters.odbc import (
    Column,
    OdbcError,
    OdbcSource,
    RowStream,
    format_connection_string,
    parse_connection_string,
)

__all__ = [
    "instant_columns",
    "is_postgresql",
    "read_instants",
    "use_utc",
    "utc_connection_string",
    "with_zones",
    "zoned_arrow_schema",
]

log = logging.getLogger(__name__)

SET_UTC = "SET TimeZone = 'UTC'"
_ZONED = "timestamp with time zone"
_TRAILING = re.compile(r"[\s;]+$")


def is_postgresql(source: OdbcSource) -> bool:
    """Whether ``source`` talks to PostgreSQL (whose ``timestamptz`` needs this module)."""
    return source.driver.dbms_name.lower().startswith("postgresql")


def utc_connection_string(connection_string: str) -> str:
    """``connection_string`` with ``SET TimeZone = 'UTC'`` run last at connect, when it names a
    psqlODBC driver (its ``ConnSettings``); any other string is returned unchanged."""
    pairs = parse_connection_string(connection_string)
    if "postgresql" not in pairs.get("driver", "").lower():
        return connection_string
    given = {k: v for k, v in pairs.items() if k != "connsettings"}
    settings = pairs.get("connsettings", "").strip().rstrip(";")
    # last, so that it wins over a TimeZone the user's own settings set
    given["ConnSettings"] = f"{settings}; {SET_UTC}" if settings else SET_UTC
    return format_connection_string(given)


def use_utc(source: OdbcSource) -> None:
    """Set a PostgreSQL source's session ``TimeZone`` to UTC (other databases: nothing)."""
    if is_postgresql(source):
        source.execute(SET_UTC)


def instant_columns(source: OdbcSource, query: str) -> frozenset[int] | None:
    """The indexes of ``query``'s result columns that hold instants (``timestamptz``).

    PostgreSQL only (an empty set elsewhere). Runs the query wrapped in ``LIMIT 0`` (planned,
    no row read); None when the server cannot wrap it (the caller warns once the query itself
    has run: a query that fails anyway needs no warning about its zones).
    """
    if not is_postgresql(source):
        return frozenset()
    # the line break ends a trailing "-- comment" of the query before the parenthesis
    inner = f"SELECT * FROM ({_TRAILING.sub('', query)}\n) AS shir_q LIMIT 0"
    try:
        with source.read(inner) as probe:
            count = len(probe.columns)
        names = ", ".join(f"c{i}" for i in range(count))
        types = ", ".join(f"pg_typeof(t.c{i})::text" for i in range(count))
        with source.read(f"SELECT {types} FROM (SELECT 1) AS one LEFT JOIN ({inner}) "
                         f"AS t({names}) ON true") as described:
            found = [row for batch in described for row in batch]
    except OdbcError:
        return None
    return frozenset(i for i, name in enumerate(found[0]) if name == _ZONED)


def _warn_unknown(target: str) -> None:
    log.warning("%s: could not tell which columns of the query are timestamptz (it cannot be "
                "wrapped in a subquery); their values are UTC, written without +00:00", target)


def with_zones(columns: Iterable[Column], zoned: frozenset[int]) -> tuple[Column, ...]:
    """``columns`` with ``time_zone="UTC"`` on those whose index is in ``zoned``."""
    return tuple(attrs.evolve(c, time_zone="UTC") if i in zoned else c
                 for i, c in enumerate(columns))


def read_instants(source: OdbcSource, query: str, batch_rows: int) -> RowStream:
    """``source.read(query)`` with the session in UTC and its ``timestamptz`` columns marked
    ``time_zone="UTC"`` (PostgreSQL; other databases: a plain read)."""
    use_utc(source)
    zoned = instant_columns(source, query)
    stream = source.read(query, batch_rows=batch_rows)
    if zoned is None:
        _warn_unknown(source.target)
    else:
        stream.columns = with_zones(stream.columns, zoned)
    return stream


def zoned_arrow_schema(schema: Any, open_source: Callable[[], OdbcSource], query: str) -> Any:
    """``schema`` (pyarrow, of ``query``'s result) with its ``timestamptz`` columns as
    ``timestamp[us, tz=UTC]``. ``open_source`` opens a pyodbc source on the same database (in
    UTC: :func:`utc_connection_string`) to ask; called only when the schema has timestamps."""
    import pyarrow as pa

    if not any(pa.types.is_timestamp(f.type) for f in schema):
        return schema
    with open_source() as source:
        zoned = instant_columns(source, query)
    if zoned is None:
        _warn_unknown(source.target)
        return schema
    return pa.schema([f.with_type(pa.timestamp("us", tz="UTC")) if i in zoned else f
                      for i, f in enumerate(schema)])
