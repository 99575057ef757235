"""Job requests per second through Service Bus, from submit to a durable entry in the log.

shir: ``ServiceBusChannel.send`` of N job requests, then a dispatcher loop that receives
them (``max_count`` = its free capacity, 32), hands each batch to the core's ``Driver`` as
``SubmitJob`` commands stored in one append (``Driver.handle_all``: one flush of the SQLite
event store, WAL, synchronous=FULL, per batch), and completes each message only after that
append. Baseline: the SDK alone, sending the same encoded messages in
batches and receiving them in peek-lock mode (32 at a time), completing each, with no log.
Both run against the same broker, in alternating rounds of the same run, each round on fresh
queues; the figure is the median rate.

The broker is the wire-level test double ``tests/sbbroker.py`` (not Azure), started here on a
free loopback port and stopped by its PID, unless SHIR_SB_CONNECTION_STRING names one.

    .venv/bin/python benchmarks/servicebus.py              # 5 rounds of 1000 requests
    .venv/bin/python benchmarks/servicebus.py --rounds 3 --n 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from azure.servicebus import ServiceBusClient, ServiceBusMessage

from shir.adapters.channel import JobRequest
from shir.adapters.servicebus import ServiceBusChannel
from shir.adapters.servicebus_messages import CONTENT_TYPE, encode_request
from shir.adapters.sqlitestore import SQLiteEventStore
from shir.core import AuthKey, CreateRuntime, KeyName, SubmitJob
from shir.core.driver import Driver

ROOT = Path(__file__).resolve().parent.parent
CAPACITY = 32  # the dispatcher's free slots: what one receive may lock


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """A connection string: the given one, or the test broker's, started for this run."""
    given = os.environ.get("SHIR_SB_CONNECTION_STRING")
    if given:
        yield given
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/sbbroker.py"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        if not proc.stdout.readline().startswith("PORT"):
            raise SystemExit("the Service Bus test broker did not start (pip install "
                             "'shir[sbtest]')")
        key = secrets.token_urlsafe(32)
        yield (f"Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=Root;SharedAccessKey={key};"
               "UseDevelopmentEmulator=true")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def requests(n: int) -> list[JobRequest]:
    run = uuid.uuid4().hex[:8]
    return [JobRequest(f"{run}-{i}", "touch", b'{"sink": "out.txt"}') for i in range(n)]


def new_runtime(folder: str) -> Driver:
    k1, k2 = (AuthKey.from_seed("rt-bench", k, 1, bytes(48)) for k in KeyName)
    driver = Driver(SQLiteEventStore(Path(folder) / "runtime.db"), stream="rt-bench")
    driver.handle(CreateRuntime("rt-bench", "factory", "bench", k1, k2, time.time()))
    return driver


def through_shir(conn: str, batch: list[JobRequest], folder: str) -> float:
    """Seconds from the first send to the last message completed after its append."""
    driver = new_runtime(folder)
    queue = "bench-" + uuid.uuid4().hex[:10]
    with ServiceBusChannel(conn, queue=queue) as channel:
        # A running node has its links open and has learnt the queue's lock (one renewal).
        channel.send([JobRequest("warm-up-" + queue, "touch")])
        for r in channel.receive(1, 5.0):
            channel.complete(r.lock_token)
        start = time.perf_counter()
        channel.send(batch)
        done = 0
        while done < len(batch):
            got = channel.receive(CAPACITY, 1.0)
            # One durable append for the whole batch (group commit), then settle each message.
            outcomes = driver.handle_all([
                SubmitJob(f"job-{r.request.message_id}", r.request.message_id, time.time(),
                          spec=r.request.spec) for r in got])
            for r, outcome in zip(got, outcomes, strict=True):
                assert not isinstance(outcome, Exception), outcome
                channel.complete(r.lock_token)  # only now: the job is durably in the log
                done += 1
        elapsed = time.perf_counter() - start
    driver.store.close()  # type: ignore[attr-defined]
    return elapsed


def bare_sdk(conn: str, batch: list[JobRequest]) -> float:
    """The SDK alone: send the same messages, receive and complete them; no log."""
    queue = "bench-" + uuid.uuid4().hex[:10]
    messages = [ServiceBusMessage(encode_request(r), message_id=r.message_id, subject=r.kind,
                                  content_type=CONTENT_TYPE) for r in batch]
    with ServiceBusClient.from_connection_string(conn) as client, \
            client.get_queue_sender(queue) as sender, \
            client.get_queue_receiver(queue, prefetch_count=0) as receiver:
        sender.send_messages(ServiceBusMessage(b"warm-up", message_id="warm-up-" + queue))
        for m in receiver.receive_messages(max_message_count=1, max_wait_time=5.0):
            receiver.complete_message(m)
        start = time.perf_counter()
        for i in range(0, len(messages), 100):  # 100 small messages fit one batch
            sender.send_messages(messages[i:i + 100])
        done = 0
        while done < len(messages):
            for m in receiver.receive_messages(max_message_count=CAPACITY, max_wait_time=1.0):
                receiver.complete_message(m)
                done += 1
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args(argv)
    shir_rates, sdk_rates = [], []
    with broker() as conn, tempfile.TemporaryDirectory(prefix="shir-bench-sb-") as tmp:
        for r in range(args.rounds):
            batch = requests(args.n)
            folder = os.path.join(tmp, f"round-{r}")
            os.mkdir(folder)
            shir_rates.append(args.n / through_shir(conn, batch, folder))
            sdk_rates.append(args.n / bare_sdk(conn, requests(args.n)))
    value, baseline = statistics.median(shir_rates), statistics.median(sdk_rates)
    print(json.dumps({
        "name": "servicebus_submit_to_log", "value": round(value, 1), "unit": "requests/s",
        "baseline": round(baseline, 1), "ratio": round(value / baseline, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
