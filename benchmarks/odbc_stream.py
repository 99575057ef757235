"""Rows per second streamed from PostgreSQL through ``OdbcSource`` against bare pyodbc.

A table of ``--rows`` mixed rows (integer, numeric(12,2), text with non-ASCII characters,
timestamp, boolean, and a text column that is NULL in every third row) is created in the
database of ``SHIR_PG_ODBC`` and dropped at the end. Each round reads all of it on connections
opened once from the same connection string: through ``OdbcSource.read(..., batch_rows=B)``
(rows come out as tuples of tuples), through bare pyodbc ``cursor.execute`` +
``cursor.fetchmany(B)`` (rows stay ``pyodbc.Row``; a rollback at the end, as the adapter does),
and through an ``OdbcSource`` with ``timeout_s`` set, so its watchdog runs on every call. The
three reads alternate call by call (execute, then one batch each, the first turn rotating), and
each reader's rate counts only its own calls: all three see the same load.

Wall-clock rates move with whatever else runs on the machine (the server is another process),
so a second figure counts only this process's CPU time (``time.process_time``, all threads,
the watchdog included): where the adapter's own cost would show, and steadier under load.

Prints one JSON object per line: ``name``, ``value`` (median of the rounds), ``unit``
(``rows/s`` of wall time, or ``rows/cpu-s`` of this process's CPU time), ``baseline`` (bare
pyodbc's median, same run) and ``ratio`` (value / baseline), then a one-line summary on stderr.

    SHIR_PG_ODBC='Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5432;Database=shir;Uid=shir;\
Pwd=...;UseDeclareFetch=1;Fetch=10000' .venv/bin/python benchmarks/odbc_stream.py \
[--rows 200000] [--rounds 5] [--batch-rows 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

try:
    import pyodbc

    from shir.adapters.odbc import OdbcSource
except ImportError as exc:  # the message says what to install
    sys.exit(f"odbc_stream: {exc}")

NEEDS_PG = """\
odbc_stream needs a PostgreSQL database reached through psqlODBC: set SHIR_PG_ODBC to its ODBC
connection string, for example
  SHIR_PG_ODBC='Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5432;Database=shir;Uid=shir;\
Pwd=...;UseDeclareFetch=1;Fetch=10000'
(shir.adapters.odbc.postgresql_connection_string() builds one). The user needs to create and
drop a table. For a throwaway server, do what scripts/test does: apt-get install unixodbc
odbc-postgresql postgresql, then initdb a temporary data folder and start it with pg_ctl on a free
loopback port as the postgres user, create a role and database, and stop it by its pid after."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the table")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (>= 3); medians count")
    parser.add_argument("--batch-rows", type=int, default=10_000, help="rows per fetchmany")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    connection_string = os.environ.get("SHIR_PG_ODBC", "")
    if not connection_string:
        sys.exit(NEEDS_PG)

    table = f"shir_bench_{uuid.uuid4().hex[:12]}"
    query = f"SELECT id, amount, label, at, flag, note FROM {table} ORDER BY id"
    batch_rows = args.batch_rows
    setup = pyodbc.connect(connection_string, autocommit=True)
    try:
        setup.execute(
            f"CREATE TABLE {table} (id integer PRIMARY KEY, amount numeric(12, 2), label text,"
            " at timestamp, flag boolean, note text)"
        )
        setup.execute(
            f"INSERT INTO {table} SELECT g, g / 100.0 + 1000.05, 'row ' || g || ' naïve ✓',"
            " timestamp '2024-01-01' + g * interval '1 second', g % 2 = 0,"
            " CASE WHEN g % 3 = 0 THEN NULL ELSE 'note ' || g END"
            f" FROM generate_series(1, {args.rows}) g"
        )
        setup.execute(f"ANALYZE {table}")
        source = OdbcSource(connection_string)
        watched = OdbcSource(connection_string, timeout_s=60.0)
        bare = pyodbc.connect(connection_string, autocommit=False)
        try:
            run(args, source, watched, bare, query, batch_rows)
        finally:
            source.close()
            watched.close()
            bare.close()
    finally:
        setup.execute(f"DROP TABLE IF EXISTS {table}")
        setup.close()


def run(
    args: argparse.Namespace, source: OdbcSource, watched: OdbcSource, bare: Any, query: str,
    batch_rows: int,
) -> None:
    def through(src: OdbcSource) -> Iterator[int]:
        stream = src.read(query, batch_rows=batch_rows)
        yield 0
        for batch in stream:
            yield len(batch)

    def bare_read() -> Iterator[int]:
        cursor = bare.cursor()
        cursor.execute(query)
        yield 0
        while batch := cursor.fetchmany(batch_rows):
            yield len(batch)
        cursor.close()
        bare.rollback()

    # Same rows, same values: the adapter's first batch equals bare pyodbc's as tuples.
    with source.read(query, batch_rows=100) as stream:
        first = next(stream)
    cursor = bare.cursor()
    assert first == tuple(tuple(r) for r in cursor.execute(query).fetchmany(100))
    cursor.close()
    bare.rollback()

    readers: dict[str, Callable[[], Iterator[int]]] = {
        "odbc_stream": lambda: through(source),
        "odbc_stream_timeout": lambda: through(watched),
        "bare": bare_read,
    }
    for make in readers.values():  # warm up: server caches, first-call allocations
        for _ in make():
            pass
    wall: dict[str, list[float]] = {name: [] for name in readers}
    cpu: dict[str, list[float]] = {name: [] for name in readers}
    names = list(readers)
    for _ in range(args.rounds):
        # The three reads run side by side, one call (execute or fetch) each in turn, and who
        # goes first rotates: every reader sees the same load at the scale of one batch.
        calls = {name: make() for name, make in readers.items()}
        wall_s = dict.fromkeys(names, 0.0)
        cpu_s = dict.fromkeys(names, 0.0)
        rows = dict.fromkeys(names, 0)
        turn = 0
        while calls:
            turn += 1
            for name in names[turn % 3 :] + names[: turn % 3]:
                if name not in calls:
                    continue
                start, start_cpu = time.perf_counter(), time.process_time()
                got = next(calls[name], None)
                wall_s[name] += time.perf_counter() - start
                cpu_s[name] += time.process_time() - start_cpu
                if got is None:
                    del calls[name]
                else:
                    rows[name] += got
        for name in names:
            assert rows[name] == args.rows, f"{name} read {rows[name]} rows, not {args.rows}"
            wall[name].append(rows[name] / wall_s[name])
            cpu[name].append(rows[name] / cpu_s[name])

    medians = {name: statistics.median(v) for name, v in wall.items()}
    cpu_medians = {name: statistics.median(v) for name, v in cpu.items()}
    baseline = medians["bare"]
    lines = [(name, medians[name], "rows/s", baseline)
             for name in ("odbc_stream", "odbc_stream_timeout")]  # fmt: skip
    lines.append(("odbc_stream_client_cpu", cpu_medians["odbc_stream"], "rows/cpu-s",
                  cpu_medians["bare"]))  # fmt: skip
    for name, value, unit, base in lines:
        print(json.dumps({
            "name": name,
            "value": round(value),
            "unit": unit,
            "baseline": round(base),
            "ratio": round(value / base, 3),
        }))
    print(
        f"odbc_stream: {medians['odbc_stream']:,.0f} rows/s through OdbcSource "
        f"(x{medians['odbc_stream'] / baseline:.2f}), {medians['odbc_stream_timeout']:,.0f} "
        f"with timeout_s (x{medians['odbc_stream_timeout'] / baseline:.2f}), bare pyodbc "
        f"{baseline:,.0f}; client CPU per row x"
        f"{cpu_medians['bare'] / cpu_medians['odbc_stream']:.2f} of bare; {args.rows} rows, "
        f"batch_rows={batch_rows}, median of {args.rounds} "
        f"rounds ({source.driver})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
