"""Benchmark: `shir copy` PostgreSQL (psqlODBC) -> Azurite, beside its halves and a pandas script.

    .venv/bin/python benchmarks/copy.py [--rows N] [--formats csv,jsonl]

N mixed rows (integer, text, numeric(18,4), timestamp, bytea, with NULLs). Every figure is
measured in this run, each in its own child process (so its peak RSS is its own):
  drain     bare pyodbc fetchmany(10000) of the same query (the fetch half alone)
  upload    bare BlobClient.upload_blob of the same bytes (the upload half alone)
  copy-FMT  shir.adapters.copy.copy_query into a block blob
  pandas    read_sql -> to_csv -> upload_blob (skipped, and said so, if pandas is missing)
  psql      psql \\copy (query) TO STDOUT CSV (the physical anchor)
Uses the services of scripts/test when its variables are set, else starts its own
(benchmarks/services.py). Prints JSON lines {name, value, unit, baseline, ratio}.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this module would shadow the
# standard library's `copy`: take the folder off before anything imports it.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402 - after the sys.path fix above
import json  # noqa: E402 - after the sys.path fix above
import os  # noqa: E402 - after the sys.path fix above
import resource  # noqa: E402 - after the sys.path fix above
import subprocess  # noqa: E402 - after the sys.path fix above
import time  # noqa: E402 - after the sys.path fix above

QUERY = "SELECT id, s, n, ts, b FROM bench_copy ORDER BY id"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(name: str, env: dict[str, str]) -> dict[str, float]:
    import pyodbc

    pg, blob = env["SHIR_PG_ODBC"], env["SHIR_AZURITE_CONNECTION_STRING"]
    t0 = time.perf_counter()
    rows = 0
    if name == "drain":
        c = pyodbc.connect(pg, autocommit=False)
        cur = c.execute(QUERY)
        while batch := cur.fetchmany(10_000):
            rows += len(batch)
    elif name.startswith("copy-"):
        from shir.adapters.copy import copy_query
        from shir.adapters.copy_sinks import BlobSink, open_blob_service
        from shir.adapters.odbc import OdbcSource

        fmt = name.split("-", 1)[1]
        sink = BlobSink(open_blob_service(blob), "bench", f"copy.{fmt}")
        with OdbcSource(pg) as src:
            t0 = time.perf_counter()
            rows = copy_query(src, QUERY, sink, fmt, f"bench-{fmt}-{time.time_ns()}").rows
    elif name == "upload":
        from azure.storage.blob import BlobServiceClient

        svc = BlobServiceClient.from_connection_string(blob)
        data = svc.get_blob_client("bench", "copy.csv").download_blob().readall()
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
    return {"seconds": time.perf_counter() - t0, "rows": rows, "rss_mb": _rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--formats", default="csv,jsonl")
    ap.add_argument("--step")
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args.step, dict(os.environ))))
        return
    import importlib.util

    import pyodbc

    spec = importlib.util.spec_from_file_location("shir_bench_services", HERE / "services.py")
    assert spec and spec.loader
    services_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(services_module)
    services = services_module.services

    with services() as env:
        c = pyodbc.connect(env["SHIR_PG_ODBC"], autocommit=True)
        c.execute("DROP TABLE IF EXISTS bench_copy")
        c.execute("CREATE TABLE bench_copy (id int PRIMARY KEY, s text, n numeric(18,4), "
                  "ts timestamp, b bytea)")
        c.execute(
            "INSERT INTO bench_copy SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE "
            "md5(g::text) || repeat('x', g % 40) END, "
            "CASE WHEN g % 7 = 0 THEN NULL ELSE (g * 1.2345)::numeric(18,4) END, "
            "CASE WHEN g % 11 = 0 THEN NULL ELSE timestamp '2020-01-01' + g * interval '1 s' END,"
            " CASE WHEN g % 3 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END "
            f"FROM generate_series(1, {args.rows}) g")
        c.execute("VACUUM ANALYZE bench_copy")
        c.close()
        child_env = {**os.environ, **env}

        def run(name: str) -> dict[str, float] | None:
            p = subprocess.run([sys.executable, __file__, "--step", name], env=child_env,
                               capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                print(json.dumps({"name": name, "error": p.stderr.strip().splitlines()[-1:]}))
                return None
            return json.loads(p.stdout)

        n = args.rows
        drain = run("drain")
        copies = {f: run(f"copy-{f}") for f in args.formats.split(",")}
        upload = run("upload")
        psql = run("psql")
        try:
            import pandas  # noqa: F401
            pandas_r = run("pandas")
        except ImportError:
            pandas_r = None
            print(json.dumps({"name": "pandas read_sql->to_csv->upload_blob",
                              "skipped": "pandas is not installed (pip install pandas)"}))

        def rate(r: dict[str, float] | None) -> float:
            return n / r["seconds"] if r else float("nan")

        def emit(name: str, value: float, unit: str, baseline: float | None) -> None:
            ratio = value / baseline if baseline else None
            print(json.dumps({"name": name, "value": round(value, 1), "unit": unit,
                              "baseline": None if baseline is None else round(baseline, 1),
                              "ratio": None if ratio is None else round(ratio, 3)}))

        assert drain and upload
        up_rows_s = n / upload["seconds"]
        emit("bare pyodbc drain", rate(drain), "rows/s", None)
        emit("bare upload_blob of the CSV bytes", up_rows_s, "rows/s", None)
        emit("psql \\copy TO STDOUT CSV (anchor)", rate(psql), "rows/s", None)
        slower = min(rate(drain), up_rows_s)
        serial = n / (drain["seconds"] + upload["seconds"])
        for f, r in copies.items():
            emit(f"shir copy {f} vs bare drain", rate(r), "rows/s", rate(drain))
            emit(f"shir copy {f} vs slower half (min of drain, upload)", rate(r), "rows/s",
                 slower)
            emit(f"shir copy {f} vs drain then upload in series", rate(r), "rows/s", serial)
            emit(f"shir copy {f} vs psql \\copy", rate(r), "rows/s", rate(psql))
            if pandas_r:
                emit(f"shir copy {f} vs pandas script", rate(r), "rows/s", rate(pandas_r))
            if r:
                emit(f"shir copy {f} peak RSS", r["rss_mb"], "MB", drain["rss_mb"])
        if pandas_r:
            emit("pandas script peak RSS", pandas_r["rss_mb"], "MB", None)


if __name__ == "__main__":
    main()
