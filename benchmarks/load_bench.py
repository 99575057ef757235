"""Benchmark: `shir copy --from FILE --to ODBC` (a load into PostgreSQL via psqlODBC) beside psql.

    .venv/bin/python benchmarks/load_bench.py [--rows N] [--repeat R] [--steps a,b,...]
                                              [--plain-rows M]

N mixed rows (int, text with quotes, commas and line breaks, numeric(18,4), timestamp,
timestamptz, bytea, NULLs in every column but the key) are made in PostgreSQL, then written
once, untimed, as the files every step loads: shir's own CSV and Parquet (`shir copy` out to a
folder) and PostgreSQL's CSV (`psql \\copy TO`: bytea as hex, which psql reads back; shir's
CSV carries bytea as base64). Every step loads all N rows into an empty table of the same
columns (emptied, untimed, before each step), in its own child process, R times, interleaved
(medians; the machine may be shared):
  shir-csv, shir-parquet  `shir copy --from FILE --format F --to ODBC --table T` (the command's
            own code in the child: the password from SHIR_ODBC_PASSWORD, as a user gives it)
  psql      psql \\copy T FROM 'FILE' CSV HEADER (the physical anchor: COPY, no ODBC)
  pyodbc-fast  a plain pyodbc script: the Parquet read with pyarrow into row tuples, then
            `cursor.fast_executemany = True; cursor.executemany(INSERT ... VALUES (?,...))`
            in batches of 10,000, one commit; the timestamp and bytea parameters sized by hand
            (`setinputsizes`: without, psqlODBC refuses the bytea column, HY090)
  pyodbc-plain  the same with fast_executemany off, on the first M rows only (--plain-rows,
            default 20,000: a round trip per row), reported as rows/s
No pandas step: `to_sql` takes a bare DBAPI connection for SQLite only, and SQLAlchemy is not
a dependency (pyodbc-fast is the insert a pandas script would end up calling).
After every step the table is checked (untimed): N rows (M for pyodbc-plain), and after the
shir steps equal to the source row for row (EXCEPT ALL both ways). Uses the services of
scripts/test when its variables are set, else starts its own (benchmarks/services.py). Prints
JSON lines {name, value, unit, baseline, ratio}; client CPU is the child's user+system seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

COLUMNS = "id, s, n, ts, tz, b"
SCHEMA = ("(id int PRIMARY KEY, s text, n numeric(18,4), ts timestamp, tz timestamptz, "
          "b bytea)")
SOURCE, TARGET = "bench_load_src", "bench_load_dst"


def _load_average() -> dict[str, object]:
    return {"name": "load average (1, 5, 15 min)",
            "value": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count()}


def _connect(pg: str) -> Any:
    import pyodbc

    return pyodbc.connect(pg, autocommit=True)


def _make_source(pg: str, rows: int) -> None:
    c = _connect(pg)
    for table in (SOURCE, TARGET):
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(f"CREATE TABLE {table} {SCHEMA}")
    # text: quotes, a comma, a line break and a non-ASCII letter in some rows
    c.execute(
        f"INSERT INTO {SOURCE} SELECT g, CASE WHEN g % 10 = 0 THEN NULL "
        "WHEN g % 10 = 1 THEN 'say \"hi\", ' || g || E'\\nnext line é' "
        "ELSE md5(g::text) || repeat('x', g % 40) END, "
        "CASE WHEN g % 7 = 0 THEN NULL ELSE (g * 1.2345 - 50000)::numeric(18,4) END, "
        "CASE WHEN g % 11 = 0 THEN NULL "
        "ELSE timestamp '2020-01-01' + g * interval '1.000123 s' END, "
        "CASE WHEN g % 13 = 0 THEN NULL "
        "ELSE timestamptz '2021-06-01 00:00:00+00' + g * interval '7.5 s' END, "
        "CASE WHEN g % 3 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END "
        f"FROM generate_series(1, {rows}) g")
    c.execute(f"VACUUM ANALYZE {SOURCE}")
    c.close()


def _pg_parts(pg: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in pg.split(";") if "=" in p)


def _psql(pg: str, command: str) -> None:
    parts = _pg_parts(pg)
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p",
                    parts["Port"], "-U", "shir", "-d", "shir", "-c", command],
                   env={**os.environ, "PGPASSWORD": parts["Pwd"]}, check=True,
                   capture_output=True)


def _shir(args: list[str], pg: str) -> str:
    """Run ``shir`` in this process with the password taken from the environment."""
    from shir.adapters.cli import main as shir

    pairs = [p for p in pg.split(";") if p and not p.lower().startswith("pwd=")]
    os.environ["SHIR_ODBC_PASSWORD"] = _pg_parts(pg)["Pwd"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = shir([a.replace("{ODBC}", ";".join(pairs)) for a in args])
    if code != 0:
        raise SystemExit(f"shir exited {code}: {out.getvalue()[-300:]}")
    return out.getvalue()


def _write_files(pg: str, folder: Path) -> None:
    for fmt in ("csv", "parquet"):
        _shir(["copy", "--source", "{ODBC}", "--query",
               f"SELECT {COLUMNS} FROM {SOURCE} ORDER BY id", "--sink",
               str(folder / f"rows.{fmt}"), "--format", fmt, "--engine", "pyodbc", "--quiet"],
              pg)
    _psql(pg, f"\\copy (SELECT {COLUMNS} FROM {SOURCE} ORDER BY id) TO "
              f"'{folder / 'rows.pgcsv'}' CSV HEADER")


def _cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _parquet_rows(path: Path, limit: int | None) -> list[tuple[Any, ...]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    return list(zip(*(table.column(i).to_pylist() for i in range(table.num_columns)),
                    strict=True))


def step(name: str, env: dict[str, str], folder: Path, plain_rows: int) -> dict[str, float]:
    """Run one step in this (child) process; its seconds, rows and CPU."""
    pg = env["SHIR_PG_ODBC"]
    cpu0, t0 = _cpu_s(), time.perf_counter()
    if name.startswith("shir-"):
        fmt = name.split("-", 1)[1]
        _shir(["copy", "--from", str(folder / f"rows.{fmt}"), "--format", fmt, "--to",
               "{ODBC}", "--table", TARGET, "--job-id", f"bench-{name}-{time.time_ns()}",
               "--quiet"], pg)
    elif name == "psql":
        _psql(pg, f"\\copy {TARGET} ({COLUMNS}) FROM '{folder / 'rows.pgcsv'}' CSV HEADER")
    elif name.startswith("pyodbc-"):
        import pyodbc

        rows = _parquet_rows(folder / "rows.parquet",
                             plain_rows if name == "pyodbc-plain" else None)
        c = pyodbc.connect(pg, autocommit=False)
        cur = c.cursor()
        if name == "pyodbc-fast":
            # psqlODBC refuses parameter arrays with a bytes parameter it sizes itself (HY090),
            # and a timestamp it sizes loses its microseconds: both sized by hand
            cur.fast_executemany = True
            stamp = (pyodbc.SQL_TYPE_TIMESTAMP, 26, 6)
            cur.setinputsizes([None, None, None, stamp, stamp, (pyodbc.SQL_VARBINARY, 64, 0)])
        sql = f"INSERT INTO {TARGET} ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
        for i in range(0, len(rows), 10_000):
            cur.executemany(sql, rows[i:i + 10_000])
        c.commit()
        c.close()
    else:
        raise SystemExit(f"unknown step {name}")
    return {"seconds": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0}


def _check(pg: str, name: str, rows: int) -> None:
    """The load is all there (and, for shir's, equal to the source): else the figure is void."""
    c = _connect(pg)
    got = c.execute(f"SELECT count(*) FROM {TARGET}").fetchone()[0]
    if got != rows:
        raise SystemExit(f"{name}: {got} rows in {TARGET}, expected {rows}")
    if name.startswith("shir-"):
        for a, b in ((SOURCE, TARGET), (TARGET, SOURCE)):
            diff = c.execute(f"SELECT count(*) FROM (SELECT {COLUMNS} FROM {a} EXCEPT ALL "
                             f"SELECT {COLUMNS} FROM {b}) d").fetchone()[0]
            if diff:
                raise SystemExit(f"{name}: {diff} rows of {a} are not in {b}")
    c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plain-rows", type=int, default=20_000,
                    help="rows loaded by the plain executemany step (a round trip per row)")
    ap.add_argument("--steps", help="only these steps (default: all)")
    ap.add_argument("--step")
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args.step, dict(os.environ), Path(args.folder), args.plain_rows)))
        return
    from services import services  # benchmarks/services.py: this script's folder is on sys.path

    steps = ["shir-csv", "shir-parquet", "psql", "pyodbc-fast", "pyodbc-plain"]
    print(json.dumps({"name": "pandas read_csv -> to_sql", "skipped": "to_sql takes no bare "
                      "pyodbc connection (SQLite only) and SQLAlchemy is not a dependency of "
                      "shir's bench extra; pyodbc-fast is what a pandas script would call"}))
    if args.steps:
        steps = [s for s in steps if s in args.steps.split(",")]
    plain = min(args.plain_rows, args.rows)
    print(json.dumps(_load_average()))
    with services() as env, tempfile.TemporaryDirectory(
            prefix="shir-load-bench-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # psql's \copy reads as the client, but keep it readable anyway
        pg = env["SHIR_PG_ODBC"]
        _make_source(pg, args.rows)
        _write_files(pg, folder)
        child_env = {**os.environ, **env}
        samples: dict[str, list[dict[str, float]]] = {s: [] for s in steps}
        for _ in range(args.repeat):
            for name in steps:
                c = _connect(pg)
                c.execute(f"TRUNCATE {TARGET}")
                c.close()
                p = subprocess.run([sys.executable, __file__, "--step", name, "--folder", tmp,
                                    "--plain-rows", str(plain)], env=child_env,
                                   capture_output=True, text=True, timeout=3600)
                if p.returncode != 0:
                    print(json.dumps({"name": name,
                                      "error": p.stderr.strip().splitlines()[-3:]}))
                    continue
                _check(pg, name, plain if name == "pyodbc-plain" else args.rows)
                samples[name].append(json.loads(p.stdout))
    print(json.dumps(_load_average()))

    def median(name: str, key: str) -> float | None:
        got = [r[key] for r in samples.get(name, ())]
        return statistics.median(got) if got else None

    def rate(name: str) -> float | None:
        seconds = median(name, "seconds")
        n = plain if name == "pyodbc-plain" else args.rows
        return n / seconds if seconds else None

    def emit(name: str, value: float | None, unit: str, baseline: float | None = None) -> None:
        if value is None or (" vs " in name and baseline is None):
            return  # a step that did not run (--steps) or failed (its error was printed)
        print(json.dumps({"name": name, "value": round(value, 1), "unit": unit,
                          "baseline": None if baseline is None else round(baseline, 1),
                          "ratio": None if not baseline else round(value / baseline, 3),
                          "rows": args.rows, "runs": args.repeat}))

    emit("psql \\copy FROM CSV (anchor)", rate("psql"), "rows/s")
    emit("plain pyodbc fast_executemany", rate("pyodbc-fast"), "rows/s")
    emit(f"plain pyodbc executemany ({plain} rows)", rate("pyodbc-plain"), "rows/s")
    for fmt in ("csv", "parquet"):
        r = rate(f"shir-{fmt}")
        emit(f"shir load {fmt} vs psql \\copy FROM", r, "rows/s", rate("psql"))
        emit(f"shir load {fmt} vs pyodbc fast_executemany", r, "rows/s", rate("pyodbc-fast"))
        emit(f"shir load {fmt} vs pyodbc plain executemany", r, "rows/s", rate("pyodbc-plain"))
        cpu = median(f"shir-{fmt}", "cpu_s")
        fast_cpu = median("pyodbc-fast", "cpu_s")
        emit(f"shir load {fmt} client CPU per row", None if cpu is None else cpu / args.rows * 1e6,
             "us/row", None if fast_cpu is None else fast_cpu / args.rows * 1e6)


if __name__ == "__main__":
    main()
