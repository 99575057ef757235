"""Throwaway loopback PostgreSQL and Azurite for a benchmark or a script, as scripts/test does.

``with services() as env:`` yields the same variables scripts/test exports
(SHIR_PG_ODBC, SHIR_PG_PORT, SHIR_AZURITE_CONNECTION_STRING, SHIR_AZURITE_BLOB_URL). When they
are already set (run under scripts/test), nothing is started and they are used as they are.
Both services are stopped by their own PIDs on exit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
KEYS = ("SHIR_PG_ODBC", "SHIR_PG_PORT", "SHIR_AZURITE_CONNECTION_STRING", "SHIR_AZURITE_BLOB_URL")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not found:
        raise SystemExit("PostgreSQL is not installed: apt-get install postgresql")
    return found[-1]


@contextlib.contextmanager
def services() -> Iterator[dict[str, str]]:
    """Yield the services' environment variables; start them unless already given."""
    if all(os.environ.get(k) for k in KEYS):
        yield {k: os.environ[k] for k in KEYS}
        return
    az_port, pg_port = _free_ports(2)
    run = Path(tempfile.mkdtemp(prefix="shir-bench-", dir="/tmp"))
    run.chmod(0o755)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    azurite = ROOT / ".services/azurite/node_modules/.bin/azurite-blob"
    az = pg_started = None
    try:
        az = subprocess.Popen(
            [str(azurite), "--blobHost", "127.0.0.1", "--blobPort", str(az_port), "--location",
             str(run / "azurite"), "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        data = run / "pg"
        data.mkdir()
        (run / "sock").mkdir()
        if as_pg:
            shutil.chown(data, "postgres")
            shutil.chown(run / "sock", "postgres")
        pg = _pg_bin()
        subprocess.run([*as_pg, str(pg / "initdb"), "-D", str(data / "d"), "-U", "postgres",
                        "-E", "UTF8", "--locale=C", "--auth-local=trust",
                        "--auth-host=scram-sha-256", "--no-sync"],
                       check=True, capture_output=True, cwd=run)
        subprocess.run([*as_pg, str(pg / "pg_ctl"), "start", "-D", str(data / "d"), "-w",
                        "-t", "30", "-l", str(data / "log"), "-o",
                        f"-c listen_addresses=127.0.0.1 -p {pg_port} -k {run / 'sock'} "
                        "-c fsync=off -c full_page_writes=off"],
                       check=True, capture_output=True, cwd=run)
        pg_started = (pg, data / "d")
        password = secrets.token_hex(16)
        subprocess.run([str(pg / "psql"), "-X", "-q", "-h", str(run / "sock"), "-p", str(pg_port),
                        "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1",
                        "-c", f"CREATE ROLE shir LOGIN PASSWORD '{password}'",
                        "-c", "CREATE DATABASE shir OWNER shir"], check=True, capture_output=True)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", az_port), 1):
                break
            if time.monotonic() > deadline or az.poll() is not None:
                raise SystemExit("Azurite did not start")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{az_port}/devstoreaccount1"
        yield {
            "SHIR_PG_PORT": str(pg_port),
            "SHIR_PG_ODBC": (
                f"Driver={{PostgreSQL Unicode}};Server=127.0.0.1;Port={pg_port};Database=shir;"
                f"Uid=shir;Pwd={password};UseDeclareFetch=1;Fetch=10000"
            ),
            "SHIR_AZURITE_BLOB_URL": url,
            "SHIR_AZURITE_CONNECTION_STRING": (
                "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                f"AccountKey={AZURITE_KEY};BlobEndpoint={url};"
            ),
        }
    finally:
        if pg_started is not None:
            subprocess.run([*as_pg, str(pg_started[0] / "pg_ctl"), "stop", "-D", str(pg_started[1]),
                            "-m", "fast", "-w"], capture_output=True, cwd=run)
        if az is not None:
            az.terminate()
            az.wait(10)
        shutil.rmtree(run, ignore_errors=True)
