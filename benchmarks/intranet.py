"""What a request on the intranet channel costs, against a bare mutual-TLS request in stdlib ssl.

The channel opens one connection per request: TCP connect, a TLS 1.3 handshake in which both
sides present RSA-2048 certificates, one message and its answer. The baseline does exactly that
with the standard library alone (same certificates, a server thread that echoes), without shir's
pin checks, certificate-rule checks, framing or threads per connection. Two measurements:

- ``intranet_ping``: :meth:`Intranet.check_peer` (8-byte ping, pong) against a bare 8-byte echo;
- ``intranet_envelope_64k``: :meth:`Intranet.send_envelope` of a 64 KiB envelope, answered by an
  ACK, against a bare send of 64 KiB answered by one byte.

Rounds alternate between shir and the baseline; the value is requests per second, median of the
rounds. Prints one JSON object per line (``name``, ``value``, ``unit``, ``baseline``,
``ratio`` = value / baseline; 1.0 means the channel adds nothing).

    .venv/bin/python benchmarks/intranet.py [--rounds 7] [--n 40]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shir.adapters.intranet import EnvelopeMessage, Intranet, Peer
from shir.adapters.intranet_tls import IntranetIdentity, create_identity
from shir.adapters.protect import PortableProtector

ENVELOPE = b"\x00" * (64 * 1024 - 256)


def identity(root: Path, name: str) -> IntranetIdentity:
    now = dt.datetime.now(dt.UTC)
    return create_identity(root / name, name, PortableProtector(root / name / "p.key"),
                           not_before=now - dt.timedelta(hours=1),
                           not_after=now + dt.timedelta(days=30))


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class BareServer:
    """Mutual TLS with the stdlib alone: read ``size`` bytes, answer ``answer``."""

    def __init__(self, server: IntranetIdentity, client: IntranetIdentity) -> None:
        self.ctx = server.server_context([client.cert_der])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.size = 8
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the channel does
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                data = _read(tls, self.size)
                tls.sendall(data if self.size == 8 else b"k")

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.listener.close()


def bare_request(ctx: ssl.SSLContext, port: int, payload: bytes, answer_size: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(payload)
            assert len(_read(tls, answer_size)) == answer_size


def rate(fn: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=40, help="requests per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = identity(Path(tmp), "a"), identity(Path(tmp), "b")
        bare = BareServer(b, a)
        with Intranet("a", a, port=0, check_interval_s=None) as ca, \
                Intranet("b", b, port=0, check_interval_s=None,
                         on_envelope=lambda s, m: None) as cb:
            directory = {"a": Peer(ca.address, a.fingerprint), "b": Peer(cb.address, b.fingerprint)}
            ca.set_peers(directory)
            cb.set_peers(directory)
            assert ca.check_peer("b")
            message = EnvelopeMessage("bench", 1, ENVELOPE)
            ctx = a.client_context()  # made once, as the channel makes its own
            cases = {
                "intranet_ping": (lambda: ca.check_peer("b"), 8,
                                  lambda: bare_request(ctx, bare.port, b"12345678", 8)),
                "intranet_envelope_64k": (lambda: ca.send_envelope("b", message),
                                          len(ENVELOPE),
                                          lambda: bare_request(ctx, bare.port, ENVELOPE, 1)),
            }
            for name, (shir, size, baseline) in cases.items():
                bare.size = size
                ours, theirs = [], []
                for _ in range(args.rounds):
                    ours.append(rate(shir, args.n))
                    theirs.append(rate(baseline, args.n))
                value, base = statistics.median(ours), statistics.median(theirs)
                print(json.dumps({"name": name, "value": round(value, 1), "unit": "requests/s",
                                  "baseline": round(base, 1), "ratio": round(value / base, 3)}))
        bare.stop()


if __name__ == "__main__":
    main()
