"""A small HTTP forward proxy for the tests: CONNECT tunnels and absolute-URI requests.

Written for shir's proxy tests (it is not a product): it listens on a free loopback port,
optionally demands Basic authentication (``407 Proxy Authentication Required`` otherwise), and
records every request that reached it (method, target, the ``Proxy-Authorization`` it carried),
so a test can say which traffic went through it and with which credentials.

- ``CONNECT host:port``: tunnelled when the target is a loopback address, else answered
  ``502 Bad Gateway`` after being recorded (the tests never leave the machine: a CONNECT to a
  Service Bus namespace is recorded, not carried).
- ``GET http://host:port/path`` (any method): forwarded to a loopback origin in origin form, with
  ``Connection: close`` on both legs, so each client connection carries one request.

Bounded: at most ``max_connections`` at once (more are refused), headers at most 64 KiB, every
socket with a timeout; :meth:`ForwardProxy.stop` closes the listener and every live socket and
joins the threads. Use it as a context manager.

The proxy tests also share :func:`sealed_custom` (a ``custom`` setting on the loopback proxy,
sealed and opened as a node host does); their fixtures ``proxy`` (this proxy with ``USER`` and
``PASSWORD``), ``clean_env`` and ``protector`` are in conftest.py.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import socket
import threading
import uuid
from types import TracebackType
from typing import Any

import attrs

USER = "svc-proxy"
PASSWORD = "canary-Pr0xy-" + uuid.uuid4().hex  # the proxy tests' canary: only the proxy sees it
MAX_HEAD = 64 * 1024
TIMEOUT_S = 30.0

def sealed_custom(protector: Any, port: int, password: str = PASSWORD, user: str = USER) -> Any:
    """A ``ClientProxy`` for a custom proxy on 127.0.0.1:``port``, its secrets sealed first."""
    from shir.adapters.proxy import client_proxy, seal_proxy_settings
    from shir.core.proxy import ProxyMode

    sealed = seal_proxy_settings(protector, ProxyMode.CUSTOM, "127.0.0.1", port, user, password)
    assert password.encode() not in sealed.password  # sealed, not kept in clear
    return client_proxy(sealed, protector, environ={})


@attrs.frozen
class Seen:
    """One request that reached the proxy."""

    method: str
    target: str  # host:port for CONNECT, the absolute URI otherwise
    authorization: str | None  # the Proxy-Authorization header as sent, if any
    allowed: bool  # whether it passed the proxy's authentication

    @property
    def host_port(self) -> tuple[str, int]:
        """The target's host and port."""
        rest = self.target.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = rest.rpartition(":")
        return host.strip("[]"), int(port or (443 if self.target.startswith("https") else 80))


def basic(user: str, password: str) -> str:
    """The Proxy-Authorization value for ``user`` and ``password``."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ForwardProxy:
    """The proxy; ``seen`` lists what reached it (see the module doc)."""

    def __init__(self, user: str | None = None, password: str | None = None,
                 max_connections: int = 64) -> None:
        self._expected = basic(user, password or "") if user is not None else None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.address = "127.0.0.1"
        self._slots = threading.BoundedSemaphore(max_connections)
        self._mutex = threading.Lock()
        self._seen: list[Seen] = []
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="fwdproxy", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no credentials)."""
        return f"http://{self.address}:{self.port}"

    def url_for(self, user: str = USER, password: str = PASSWORD) -> str:
        """``http://USER:PASSWORD@127.0.0.1:PORT``, as a proxy variable names a proxy."""
        return f"http://{user}:{password}@{self.address}:{self.port}"

    def name_in_every_variable(self, env: Any) -> None:
        """Set HTTP(S)_PROXY, upper and lower case, to this proxy on ``env`` (a monkeypatch)."""
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.setenv(name, self.url_for())

    @property
    def seen(self) -> list[Seen]:
        """A copy of the requests recorded so far."""
        with self._mutex:
            return list(self._seen)

    def __enter__(self) -> ForwardProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Close the listener and every live connection; join the threads."""
        self._stopping.set()
        self._acceptor.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._mutex:
            live = list(self._sockets)
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(5)

    # -- serving -------------------------------------------------------------------------------

    def _track(self, s: socket.socket) -> socket.socket:
        s.settimeout(TIMEOUT_S)
        with self._mutex:
            self._sockets.add(s)
        return s

    def _forget(self, *sockets: socket.socket | None) -> None:
        for s in sockets:
            if s is None:
                continue
            with self._mutex:
                self._sockets.discard(s)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                client.close()  # bounded: refuse beyond max_connections
                continue
            t = threading.Thread(target=self._serve, args=(self._track(client),), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, client: socket.socket) -> None:
        origin: socket.socket | None = None
        try:
            head, rest = _read_head(client)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = [*lines[0].split(" "), "", ""][:3]
            headers = [ln for ln in lines[1:] if ln]
            auth = next((ln.split(":", 1)[1].strip() for ln in headers
                         if ln.lower().startswith("proxy-authorization:")), None)
            allowed = self._expected is None or auth == self._expected
            with self._mutex:
                self._seen.append(Seen(method, target, auth, allowed))
            if not allowed:
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                               b"Proxy-Authenticate: Basic realm=\"shir-test\"\r\n"
                               b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            seen = Seen(method, target, auth, allowed)
            host, port = seen.host_port
            if not _is_loopback(host):
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
                return
            origin = self._track(socket.create_connection((host, port), timeout=TIMEOUT_S))
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                if rest:
                    origin.sendall(rest)
                self._pipe_both(client, origin, rewrite_response=False)
                return
            path = "/" + target.split("://", 1)[-1].partition("/")[2]
            kept = [h for h in headers if h.split(":", 1)[0].strip().lower() not in
                    ("proxy-authorization", "proxy-connection", "connection", "keep-alive")]
            out = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""])
            origin.sendall(out.encode("latin-1") + rest)
            self._pipe_both(client, origin, rewrite_response=True)
        except OSError:
            pass
        finally:
            self._forget(client, origin)
            self._slots.release()

    def _pipe_both(self, client: socket.socket, origin: socket.socket, *,
                   rewrite_response: bool) -> None:
        up = threading.Thread(target=_pipe, args=(client, origin), daemon=True)
        up.start()
        if rewrite_response:
            head, rest = _read_head(origin)
            if head is None:
                return
            lines = [ln for ln in head.decode("latin-1").split("\r\n") if ln]
            lines = [ln for ln in lines if ln.split(":", 1)[0].strip().lower()
                     not in ("connection", "keep-alive")]
            client.sendall("\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1")
                           + rest)
        _pipe(origin, client)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            origin.shutdown(socket.SHUT_RDWR)
        up.join(TIMEOUT_S)


def _read_head(s: socket.socket) -> tuple[bytes | None, bytes]:
    """The bytes up to the blank line ending the head (None if the peer closed first)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            return None, b""
        chunk = s.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            chunk = src.recv(65536)
            if not chunk:
                break
            dst.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
