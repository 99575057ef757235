"""Benchmark: `shir copy` PostgreSQL (psqlODBC) -> Azurite, beside its halves and a pandas script.

    .venv/bin/python benchmarks/copy_bench.py [--rows N] [--repeat R] [--formats csv,jsonl,parquet]
                                        [--steps drain,floor,copy-csv,...]
                                        [--flat-rows M] [--flat-repeat F]

N mixed rows (integer, text, numeric(18,4), timestamp, bytea, with NULLs). Every figure is
measured in this run, each in its own child process (so its peak RSS is its own), each step R
times, interleaved (medians; the machine may be shared):
  drain     bare pyodbc fetchmany(10000) of the same query (the fetch half alone)
  floor     the bare drain plus shir's CSV encoder in the same thread, nothing uploaded: the
            least per-row work CSV needs (what the copy cannot beat on a CPU-bound machine)
  upload    bare BlobClient.upload_blob of the same bytes (the upload half alone)
  copy-FMT  `shir copy ... --sink blob --engine pyodbc` into a block blob (the command's own
            code, run in the step's process: the password and the storage connection string
            come from the environment, as a user would give them)
  arrow-drain  arrow-odbc's bare drain into record batches (the Arrow engine's fetch half)
  arrow-FMT `shir copy ... --engine arrow` the same way (csv, jsonl, parquet)
  pandas    read_sql -> to_csv -> upload_blob (skipped, and said so, if pandas is missing)
  psql      psql \\copy (query) TO STDOUT CSV (the physical anchor)
Then (unless --flat-rows 0) the table is made again with M rows (5,000,000) and every copy step
(copy-FMT, arrow-FMT) runs F times (1) more: their peak RSS at M rows beside the one at N rows
(ratio: growth; flat memory is a ratio near 1) and their rate beside the drain at M rows.
Peak RSS is the step's own process's (VmHWM of its address space), never this script's. The
load average is printed at the start and at the end (the machine may be shared).
Uses the services of scripts/test when its variables are set, else starts its own
(benchmarks/services.py). Prints JSON lines {name, value, unit, baseline, ratio}; client CPU
is the child's user+system seconds (the database and Azurite are other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

QUERY = "SELECT id, s, n, ts, b FROM bench_copy ORDER BY id"


def _rss_mb() -> float:
    """This process's own peak RSS (VmHWM of its address space). Not ``ru_maxrss``: Linux carries
    that across exec from the address space the child was forked or vforked from, so a child's
    figure would be at least its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the benchmark needs Linux)")


def _load() -> dict[str, object]:
    return {"name": "load average (1, 5, 15 min)", "value": [round(x, 2) for x in os.getloadavg()],
            "cores": os.cpu_count()}


def _make_table(pg: str, rows: int) -> None:
    import pyodbc

    c = pyodbc.connect(pg, autocommit=True)
    c.execute("DROP TABLE IF EXISTS bench_copy")
    c.execute("CREATE TABLE bench_copy (id int PRIMARY KEY, s text, n numeric(18,4), "
              "ts timestamp, b bytea)")
    c.execute(
        "INSERT INTO bench_copy SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE "
        "md5(g::text) || repeat('x', g % 40) END, "
        "CASE WHEN g % 7 = 0 THEN NULL ELSE (g * 1.2345)::numeric(18,4) END, "
        "CASE WHEN g % 11 = 0 THEN NULL ELSE timestamp '2020-01-01' + g * interval '1 s' END,"
        " CASE WHEN g % 3 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END "
        f"FROM generate_series(1, {rows}) g")
    c.execute("VACUUM ANALYZE bench_copy")
    c.close()


def _cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def step(name: str, env: dict[str, str]) -> dict[str, float]:
    import pyodbc

    pg, blob = env["SHIR_PG_ODBC"], env["SHIR_AZURITE_CONNECTION_STRING"]
    t0 = time.perf_counter()
    cpu0 = _cpu_s()
    rows = 0
    if name in ("drain", "floor"):
        c = pyodbc.connect(pg, autocommit=False)
        cpu0 = _cpu_s()
        t0 = time.perf_counter()
        cur = c.execute(QUERY)
        if name == "floor":
            from shir.adapters.copy_formats import make_encoder
            from shir.adapters.odbc import Column

            encode = make_encoder("csv", [Column(d[0], d[1], d[3], d[5], d[6])
                                          for d in cur.description]).encode
            while batch := cur.fetchmany(10_000):
                rows += len(batch)
                encode(batch)
        else:
            while batch := cur.fetchmany(10_000):
                rows += len(batch)
    elif name == "arrow-drain":
        from shir.adapters.copy_arrow import ArrowOdbcSource

        stream = ArrowOdbcSource(pg).read(QUERY)
        for batch in stream.driver_rows():
            rows += batch.num_rows
    elif name.startswith(("arrow-", "copy-")):  # the command itself: its peak RSS is the figure
        import contextlib
        import io
        import re

        from shir.adapters.cli import main as shir

        fmt = name.split("-", 1)[1]
        engine = "arrow" if name.startswith("arrow-") else "pyodbc"
        pairs = [p for p in pg.split(";") if p and not p.lower().startswith("pwd=")]
        os.environ["SHIR_ODBC_PASSWORD"] = next(
            p.split("=", 1)[1] for p in pg.split(";") if p.lower().startswith("pwd="))
        os.environ["SHIR_BLOB_CONNECTION_STRING"] = blob
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = shir(["copy", "--source", ";".join(pairs), "--query", QUERY, "--sink", "blob",
                         "--container", "bench", "--blob", f"{engine}.{fmt}", "--format", fmt,
                         "--engine", engine, "--job-id", f"bench-{name}-{time.time_ns()}",
                         "--quiet"])
        copied = re.search(r"copied (\d+) rows", out.getvalue())
        if code != 0 or copied is None:
            raise SystemExit(f"shir copy exited {code}: {out.getvalue()[-300:]}")
        rows = int(copied.group(1))
    elif name == "upload":
        from azure.storage.blob import BlobServiceClient

        svc = BlobServiceClient.from_connection_string(blob)
        data = svc.get_blob_client("bench", "pyodbc.csv").download_blob().readall()
        t0 = time.perf_counter()
        svc.get_blob_client("bench", "upload.csv").upload_blob(data, overwrite=True,
                                                                max_concurrency=4)
        rows = -1
    elif name == "pandas":
        import io

        import pandas as pd
        from azure.storage.blob import BlobServiceClient

        c = pyodbc.connect(pg)
        import warnings

        warnings.simplefilter("ignore")
        frame = pd.read_sql(QUERY, c)
        buf = io.StringIO()
        frame.to_csv(buf, index=False)
        BlobServiceClient.from_connection_string(blob).get_blob_client(
            "bench", "pandas.csv").upload_blob(buf.getvalue().encode(), overwrite=True)
        rows = len(frame)
    elif name == "psql":
        parts = dict(p.split("=", 1) for p in pg.split(";") if "=" in p)
        penv = {**os.environ, "PGPASSWORD": parts["Pwd"]}
        out = subprocess.run(
            ["psql", "-X", "-h", "127.0.0.1", "-p", parts["Port"], "-U", "shir", "-d", "shir",
             "-c", f"\\copy ({QUERY}) TO STDOUT CSV"], env=penv, capture_output=True, check=True)
        rows = out.stdout.count(b"\n")  # close enough: a few values hold line breaks? none here
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": rows, "rss_mb": _rss_mb(), "cpu_s": _cpu_s() - cpu0,
            "pandas_loaded": float("pandas" in sys.modules)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--formats", default="csv,jsonl,parquet")
    ap.add_argument("--steps", help="only these steps (default: all)")
    ap.add_argument("--flat-rows", type=int, default=5_000_000,
                    help="rows of the second table, for peak RSS growth (0: none)")
    ap.add_argument("--flat-repeat", type=int, default=1)
    ap.add_argument("--step")
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args.step, dict(os.environ))))
        return
    import importlib.util
    import statistics

    from services import services  # benchmarks/services.py: this script's folder is on sys.path

    formats = args.formats.split(",")
    arrow = [f for f in formats if f in ("csv", "jsonl", "parquet")]
    steps = ["drain", "floor", *(f"copy-{f}" for f in formats), "upload", "psql"]
    if importlib.util.find_spec("arrow_odbc"):
        steps[1:1] = ["arrow-drain", *(f"arrow-{f}" for f in arrow)]
    else:
        arrow = []
        print(json.dumps({"name": "arrow engine", "skipped": "arrow-odbc is not installed "
                          "(pip install 'shir[arrow]')"}))
    if importlib.util.find_spec("pandas"):  # not imported here: the children inherit peak RSS
        steps.append("pandas")
    else:
        print(json.dumps({"name": "pandas read_sql->to_csv->upload_blob",
                          "skipped": "pandas is not installed (pip install 'shir[bench]')"}))
    if args.steps:
        steps = [s for s in steps if s in args.steps.split(",")]
    copies = [s for s in steps if s.startswith(("copy-", "arrow-")) and s != "arrow-drain"]
    flat_steps = [s for s in ("drain", *copies) if s in steps] if args.flat_rows else []
    print(json.dumps(_load()))
    with services() as env:
        _make_table(env["SHIR_PG_ODBC"], args.rows)
        child_env = {**os.environ, **env}

        def run(name: str) -> dict[str, float] | None:
            p = subprocess.run([sys.executable, __file__, "--step", name], env=child_env,
                               capture_output=True, text=True, timeout=3600)
            if p.returncode != 0:
                print(json.dumps({"name": name, "error": p.stderr.strip().splitlines()[-1:]}))
                return None
            return dict(json.loads(p.stdout))

        samples: dict[str, list[dict[str, float]]] = {s: [] for s in steps}
        for _ in range(args.repeat):
            for name in steps:
                r = run(name)
                if r is not None:
                    samples[name].append(r)
        flat: dict[str, list[dict[str, float]]] = {s: [] for s in flat_steps}
        if flat_steps:
            _make_table(env["SHIR_PG_ODBC"], args.flat_rows)
            for _ in range(args.flat_repeat):
                for name in flat_steps:
                    r = run(name)
                    if r is not None:
                        flat[name].append(r)
    print(json.dumps(_load()))

    n = args.rows

    def median(name: str, key: str, of: dict[str, list[dict[str, float]]] = samples
               ) -> float | None:
        got = [r[key] for r in of.get(name, ())]
        return statistics.median(got) if got else None

    def rate(name: str) -> float | None:
        seconds = median(name, "seconds")
        return n / seconds if seconds else None

    def emit(name: str, value: float | None, unit: str, baseline: float | None = None,
             rows: int = n, runs: int = args.repeat) -> None:
        if value is None or (" vs " in name and baseline is None):
            return  # a step that did not run (--steps) or failed (its error was printed)
        ratio = value / baseline if baseline else None
        print(json.dumps({"name": name, "value": round(value, 1), "unit": unit,
                          "baseline": None if baseline is None else round(baseline, 1),
                          "ratio": None if ratio is None else round(ratio, 3),
                          "rows": rows, "runs": runs}))

    drain, upload = rate("drain"), rate("upload")
    slower = min(x for x in (drain, upload) if x) if drain or upload else None
    emit("bare pyodbc drain", drain, "rows/s")
    emit("bare upload_blob of the CSV bytes", upload, "rows/s")
    emit("psql \\copy TO STDOUT CSV (anchor)", rate("psql"), "rows/s")
    emit("floor: drain + CSV encode, one thread, no upload", rate("floor"), "rows/s", drain)
    emit("arrow-odbc bare drain", rate("arrow-drain"), "rows/s", drain)
    for name in ("drain", "floor", "arrow-drain", *(f"copy-{f}" for f in formats),
                 *(f"arrow-{f}" for f in arrow)):
        cpu = median(name, "cpu_s")
        emit(f"{name} client CPU per row", None if cpu is None else cpu / n * 1e6, "us/row",
             None if median("drain", "cpu_s") is None else median("drain", "cpu_s") / n * 1e6)
    for f in formats:
        r = rate(f"copy-{f}")
        emit(f"shir copy {f} vs bare drain", r, "rows/s", drain)
        emit(f"shir copy {f} vs slower half (min of drain, upload)", r, "rows/s", slower)
        emit(f"shir copy {f} vs floor (drain + encode)", r, "rows/s", rate("floor"))
        emit(f"shir copy {f} vs psql \\copy", r, "rows/s", rate("psql"))
        emit(f"shir copy {f} vs pandas script", r, "rows/s", rate("pandas"))
        if f != "csv":
            emit(f"shir copy {f} vs shir copy csv", r, "rows/s", rate("copy-csv"))
        emit(f"shir copy {f} peak RSS", median(f"copy-{f}", "rss_mb"), "MB",
             median("drain", "rss_mb"))
        if median(f"copy-{f}", "pandas_loaded"):  # pyarrow's pa.array imports it if installed
            print(json.dumps({"name": f"shir copy {f} peak RSS",
                              "note": "includes pandas, which pyarrow imported (about 50 MB)"}))
    for f in arrow:
        r = rate(f"arrow-{f}")
        emit(f"shir copy {f} --engine arrow vs bare drain", r, "rows/s", drain)
        emit(f"shir copy {f} --engine arrow vs slower half (min of drain, upload)", r, "rows/s",
             slower)
        emit(f"shir copy {f} --engine arrow vs pandas script", r, "rows/s", rate("pandas"))
        emit(f"shir copy {f} --engine arrow vs --engine pyodbc", r, "rows/s", rate(f"copy-{f}"))
        emit(f"shir copy {f} --engine arrow vs psql \\copy", r, "rows/s", rate("psql"))
        emit(f"shir copy {f} --engine arrow peak RSS", median(f"arrow-{f}", "rss_mb"), "MB",
             median("drain", "rss_mb"))
        if median(f"arrow-{f}", "pandas_loaded"):  # a defect: the engine must never load it
            print(json.dumps({"name": f"shir copy {f} --engine arrow peak RSS",
                              "note": "includes pandas, which pyarrow imported (about 50 MB)"}))
    emit("arrow-odbc bare drain peak RSS", median("arrow-drain", "rss_mb"), "MB")
    emit("pandas script peak RSS", median("pandas", "rss_mb"), "MB")
    m = args.flat_rows
    flat_drain = median("drain", "seconds", flat)
    for name in flat_steps[1:]:
        fmt = name.split("-", 1)[1]
        label = f"shir copy {fmt}" + (" --engine arrow" if name.startswith("arrow-") else "")
        emit(f"{label} peak RSS at {m} rows vs at {n}", median(name, "rss_mb", flat), "MB",
             median(name, "rss_mb"), rows=m, runs=args.flat_repeat)
        seconds = median(name, "seconds", flat)
        emit(f"{label} at {m} rows vs bare drain", m / seconds if seconds else None, "rows/s",
             m / flat_drain if flat_drain else None, rows=m, runs=args.flat_repeat)


if __name__ == "__main__":
    main()
