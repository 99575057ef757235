"""The intranet channel: mutual TLS between a runtime's registered nodes, on the intranet port.

Theory of operation
-------------------
Every node listens on its intranet port (default 8060) and dials its peers there. A node knows
its peers from the runtime's log: each registered node publishes its intranet address and the
SHA-256 fingerprint of its certificate (:mod:`shir.adapters.intranet_tls`), and the node host
hands the current set to :meth:`Intranet.set_peers` whenever the log changes. Only those
fingerprints are accepted, both ways; anything else is refused with a logged reason:

- *dialing* a peer, a node presents its own certificate and accepts the server only if the
  server's certificate has the fingerprint pinned for that peer's name (and is still valid);
- *accepting*, the server's TLS context trusts exactly the certificates of current members that
  introduced themselves. An **introduction** is a connection without a client certificate whose
  only message is the node's certificate: the server takes it only if its fingerprint is pinned
  for a registered node (a certificate is public; holding it proves nothing, presenting it in a
  handshake later proves possession of its key). A dialer introduces itself on first contact
  with each peer, and again, retrying once, when its handshake is refused (the peer restarted
  and forgot it). After every handshake the server looks the client's fingerprint up in the
  *current* directory again, so a node removed from the log is refused at once, even on a
  connection accepted a moment before.

One request per connection, answered, then closed (:mod:`shir.adapters.intranet_wire`):

- **credential-sync envelopes** (:meth:`Intranet.send_envelope`): the receiver's ``on_envelope``
  callback gets the sender's node name (authenticated by its pin) and the envelope; it opens it
  (:func:`shir.adapters.envelope.open_envelope`) and stores it. A ``ShirError`` it raises is
  sent back as the refusal's reason (shir's messages hold no secrets);
- **reachability checks**: a ping with a deadline (:meth:`Intranet.check_peer`), and a monitor
  thread that checks every peer each ``check_interval_s``; :meth:`Intranet.reachable_peers` is
  what the node host reports as ``NodeMetrics.reachable_peers``, from which the core derives its
  "peer port unreachable" reason.

**Remote access off** (``remote_access=False``): nothing listens, the port is closed, and the
node neither dials nor checks peers (the core refuses a second node in that case anyway).

Every wait is bounded: sockets carry deadlines, the accept loop polls its stop flag, at most
``max_connections`` connections are served at once (more are closed unanswered), frames are
bounded per type before their body is read, and :meth:`Intranet.stop` joins every thread with
a timeout. Logs name peers by address, node name and fingerprint prefix, never key material or
envelope bytes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import attrs

from shir.adapters.intranet_tls import (
    IntranetError,
    IntranetIdentity,
    cert_fingerprint,
    certificate_problem,
)
from shir.adapters.intranet_wire import (
    EnvelopeMessage,
    MessageType,
    OversizedMessage,
    ProtocolError,
    limit_of,
    read_frame,
    write_frame,
)
from shir.core.errors import ShirError

__all__ = [
    "DEFAULT_INTRANET_PORT",
    "EnvelopeHandler",
    "EnvelopeMessage",
    "Intranet",
    "IntranetClosed",
    "IntranetError",
    "OversizedMessage",
    "Peer",
    "PeerRefused",
    "PeerUnreachable",
    "PublishedNode",
    "UnknownPeer",
    "directory_from_nodes",
    "parse_address",
]

log = logging.getLogger("shir.adapters.intranet")

DEFAULT_INTRANET_PORT = 8060
EnvelopeHandler = Callable[[str, EnvelopeMessage], None]


class PeerUnreachable(IntranetError):
    """The peer's intranet port did not answer in time (down, closed, or the network)."""


class PeerRefused(IntranetError):
    """The peer answered but the exchange was refused (by it, or by this node's pin check)."""


class UnknownPeer(IntranetError):
    """The name is not a registered node of this runtime (as far as this node's log shows)."""


class IntranetClosed(IntranetError):
    """Remote access is off (or the channel is stopped): nothing is sent or received."""


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"`` for IPv6) as ``(host, port)``; ``ValueError`` if not."""
    host, sep, port = str(address).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"intranet address {str(address)[:100]!r} is not host:port "
                         "(for example 10.0.0.5:8060)")
    return host, int(port)


def _fingerprint(value: str) -> str:
    fp = str(value).replace(":", "").lower()
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError(f"certificate fingerprint {str(value)[:80]!r} is not a SHA-256 in hex")
    return fp


def _address(value: str) -> str:
    parse_address(value)
    return value


@attrs.frozen
class Peer:
    """Where a registered node listens and the fingerprint its certificate must have."""

    address: str = attrs.field(converter=_address)
    fingerprint: str = attrs.field(converter=_fingerprint)


class PublishedNode(Protocol):
    """What a registered node publishes through the log (``shir.core``'s ``Node``)."""

    @property
    def name(self) -> str: ...

    @property
    def intranet_address(self) -> str | None: ...

    @property
    def cert_sha256(self) -> str | None: ...


def directory_from_nodes(nodes: Iterable[PublishedNode]) -> dict[str, Peer]:
    """The peer directory of the runtime's registered nodes (``RuntimeState.nodes``).

    A node that published no intranet address or fingerprint (remote access off, or an older
    shir) is left out: it can neither be dialed nor accepted. Malformed values are left out too,
    with a logged reason.
    """
    out: dict[str, Peer] = {}
    for n in nodes:
        if n.intranet_address is None or n.cert_sha256 is None:
            continue
        try:
            out[n.name] = Peer(n.intranet_address, n.cert_sha256)
        except ValueError as exc:
            log.warning("intranet: node %r is left out of the peer directory: %s", n.name, exc)
    return out


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Refused(Exception):
    """Internal: end a served connection with a REFUSED reason (and log it)."""


class Intranet:
    """One node's end of the intranet channel: a server, a client and a reachability monitor.

    ``peers`` maps node names to :class:`Peer` (this node's own name is ignored). ``on_envelope``
    runs on a server thread for each envelope a member sends; keep it short (queue the work).
    """

    def __init__(self, node_name: str, identity: IntranetIdentity, *,
                 peers: Mapping[str, Peer] | None = None,
                 on_envelope: EnvelopeHandler | None = None,
                 host: str = "127.0.0.1", port: int = DEFAULT_INTRANET_PORT,
                 remote_access: bool = True, timeout_s: float = 3.0,
                 check_interval_s: float | None = 5.0, max_connections: int = 16,
                 clock: Callable[[], dt.datetime] = _utc_now) -> None:
        self.node_name = node_name
        self.identity = identity
        self.remote_access = remote_access
        self.timeout_s = timeout_s
        self.check_interval_s = check_interval_s
        self._on_envelope = on_envelope
        self._host, self._port = host, port
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}
        self._trusted: dict[str, bytes] = {}  # fingerprint -> DER of introduced members
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx = identity.client_context()
        self._intro_ctx = identity.client_context(present_certificate=False)
        self._introduced: set[str] = set()  # fingerprints of peers that took our certificate
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._wake_monitor = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handlers: set[threading.Thread] = set()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._reachable: dict[str, bool] = {}
        self.set_peers(peers or {})

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the intranet port and start the monitor; nothing at all if remote access
        is off. Raises :class:`IntranetError` if the port cannot be bound."""
        if not self.remote_access or self._listener is not None:
            return
        try:
            listener = socket.create_server((self._host, self._port), reuse_port=False)
        except OSError as exc:
            where = f"cannot listen on the intranet port {self._host}:{self._port} ({exc.strerror})"
            if exc.errno == errno.EADDRINUSE:
                raise IntranetError(
                    f"{where}: another program (or another node host on this machine) uses it; "
                    "choose another with --intranet-port"
                ) from None
            raise IntranetError(  # EADDRNOTAVAIL, a name that does not resolve, EACCES...
                f"{where}: {self._host} is not an address of this machine it may listen on; "
                "give --intranet-host an address of one of its interfaces (or a name that "
                "resolves to one)"
            ) from None
        listener.settimeout(0.2)  # the accept loop checks its stop flag this often
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._spawn(self._accept_loop, "intranet-accept")
        if self.check_interval_s is not None:
            self._spawn(self._monitor_loop, "intranet-monitor")
        log.info("intranet channel listening on %s (certificate sha256 %s)", self.address,
                 self.identity.fingerprint[:16])

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the port and join every thread, waiting at most about ``timeout_s``.

        A stopped channel stays closed; to reopen (remote access turned back on), make a new one.
        """
        self._stopping.set()
        self._wake_monitor.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:  # the accept loop first: then no new handler starts
            t.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
        for t in list(self._handlers):
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in [*self._threads, *self._handlers] if t.is_alive()]
        if alive:
            log.warning("intranet threads still running after %.1f s: %s", timeout_s, alive)

    def __enter__(self) -> Intranet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``host:port`` this node listens on (the bound port once started)."""
        return f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The intranet port (the one actually bound, once started with port 0)."""
        return self._port

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=f"{name}-{self.node_name}", daemon=True)
        self._threads.append(t)
        t.start()

    # --- membership ----------------------------------------------------------------------------

    def set_peers(self, peers: Mapping[str, Peer]) -> None:
        """Replace the directory of registered nodes; removed ones are refused from now on."""
        current = {n: p for n, p in peers.items() if n != self.node_name}
        with self._lock:
            self._peers = current
            pinned = {p.fingerprint for p in current.values()}
            kept = {fp: der for fp, der in self._trusted.items() if fp in pinned}
            if kept.keys() != self._trusted.keys() or self._server_ctx is None:
                self._trusted = kept
                self._server_ctx = self.identity.server_context(kept.values())
            self._reachable = {n: ok for n, ok in self._reachable.items() if n in current}
        self._wake_monitor.set()

    def peers(self) -> dict[str, Peer]:
        """A copy of the current directory."""
        with self._lock:
            return dict(self._peers)

    def _member_by_fingerprint(self, fp: str) -> str | None:
        with self._lock:
            names = [n for n, p in self._peers.items() if p.fingerprint == fp]
        return names[0] if len(names) == 1 else None

    # --- server --------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # closed
            if not self._slots.acquire(blocking=False):
                log.warning("intranet: refused a connection from %s:%s: %d connections already "
                            "being served", addr[0], addr[1], len(self._handlers))
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                                 name=f"intranet-conn-{self.node_name}")
            self._handlers.add(t)
            t.start()

    def _serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        who = f"{addr[0]}:{addr[1]}"
        deadline = time.monotonic() + 2 * self.timeout_s  # handshake and request, all told
        sock: socket.socket = conn  # what owns the descriptor: the TLS socket once wrapped
        try:
            conn.settimeout(self.timeout_s)  # ssl takes it as the whole handshake's limit
            # every write is a whole message: Nagle would only hold a tail back for the peer's
            # delayed ACK (measured: 64 KiB envelopes took ~25 ms instead of ~2)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                ctx = self._server_ctx
            assert ctx is not None
            sock = tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except ssl.SSLCertVerificationError as exc:
                # INFO: a member meets this after this node restarted, then introduces itself;
                # a non-member's introduction is what is refused at WARNING
                log.info("intranet: refused %s: its certificate is not accepted (%s); only the "
                         "registered nodes of this runtime may connect", who, exc.verify_message)
                return
            try:
                self._answer(tls, who, deadline)
            except _Refused as exc:
                log.warning("intranet: refused %s: %s", who, exc)
                with contextlib.suppress(OSError, IntranetError):
                    write_frame(tls, MessageType.REFUSED, str(exc).encode()[:1024])
        except (OSError, ProtocolError) as exc:  # timeouts, resets, handshake failures
            log.info("intranet: connection from %s ended: %s", who, _describe(exc))
        finally:
            sock.close()
            self._handlers.discard(threading.current_thread())
            self._slots.release()

    def _answer(self, tls: ssl.SSLSocket, who: str, deadline: float) -> None:
        der = tls.getpeercert(binary_form=True)
        try:
            mtype, body = read_frame(tls, deadline)
        except OversizedMessage as exc:
            raise _Refused(str(exc)) from None
        except ProtocolError as exc:
            raise _Refused(f"malformed message: {exc}") from None
        if der is None:
            if mtype is not MessageType.INTRODUCE:
                raise _Refused("present a certificate of a registered node of this runtime")
            self._accept_introduction(body, who)
            write_frame(tls, MessageType.ACK)
            return
        name = self._member(der)
        if mtype is MessageType.PING:
            write_frame(tls, MessageType.PONG, body)
        elif mtype is MessageType.ENVELOPE:
            try:
                message = EnvelopeMessage.decode(body)
            except ProtocolError as exc:
                raise _Refused(str(exc)) from None
            self._receive_envelope(name, message)
            write_frame(tls, MessageType.ACK)
        else:
            raise _Refused(f"unexpected {mtype.name} message")

    def _member(self, der: bytes) -> str:
        """The registered node whose pinned certificate ``der`` is; :class:`_Refused` if none,
        or if the certificate is no longer usable (expired)."""
        fp = cert_fingerprint(der)
        name = self._member_by_fingerprint(fp)
        if name is None:
            raise _Refused(f"certificate sha256 {fp[:16]}... is not the certificate of a "
                           "registered node of this runtime; register the node first")
        problem = certificate_problem(der, self._clock())
        if problem is not None:
            raise _Refused(f"node {name!r}'s certificate is not usable: {problem}")
        return name

    def _accept_introduction(self, der: bytes, who: str) -> None:
        fp = cert_fingerprint(der)
        name = self._member(der)
        with self._lock:
            peer = self._peers.get(name)
            if peer is None or peer.fingerprint != fp or fp in self._trusted:
                return  # already trusted, or the directory changed meanwhile
            self._trusted[fp] = der
            self._server_ctx = self.identity.server_context(self._trusted.values())
        log.info("intranet: node %r (%s) introduced its certificate sha256 %s", name, who,
                 fp[:16])

    def _receive_envelope(self, sender: str, message: EnvelopeMessage) -> None:
        if self._on_envelope is None:
            raise _Refused("this node does not take credential envelopes")
        try:
            self._on_envelope(sender, message)
        except ShirError as exc:  # shir's messages never hold secrets
            raise _Refused(str(exc)) from None
        except Exception as exc:
            log.error("intranet: storing the envelope for credential %r v%d from %r failed "
                      "with %s", message.credential_id[:128], message.version, sender,
                      type(exc).__name__)
            raise _Refused(f"the receiving node failed to store it ({type(exc).__name__}); "
                           "see that node's log") from None

    # --- client --------------------------------------------------------------------------------

    def send_envelope(self, peer: str, message: EnvelopeMessage,
                      timeout_s: float | None = None) -> None:
        """Deliver ``message`` to node ``peer``; return once it took it.

        Raises :class:`PeerUnreachable`, :class:`PeerRefused` (with the peer's reason),
        :class:`UnknownPeer` or :class:`IntranetClosed`.
        """
        self._request(peer, MessageType.ENVELOPE, message.encode(), MessageType.ACK, timeout_s)

    def check_peer(self, peer: str, timeout_s: float | None = None) -> bool:
        """Does node ``peer`` answer a ping on its intranet port within ``timeout_s``?"""
        nonce = os.urandom(8)
        try:
            body = self._request(peer, MessageType.PING, nonce, MessageType.PONG, timeout_s)
        except IntranetError as exc:
            log.debug("intranet: check of %r failed: %s", peer, exc)
            return False
        return body == nonce

    def _request(self, peer: str, mtype: MessageType, body: bytes, expect: MessageType,
                 timeout_s: float | None) -> bytes:
        if not self.remote_access or self._stopping.is_set():
            raise IntranetClosed("the intranet channel is closed (remote access is off, or the "
                                 "node is stopping)")
        with self._lock:
            target = self._peers.get(peer)
        if target is None:
            raise UnknownPeer(f"{peer!r} is not a registered node of this runtime (with an "
                              "intranet address) as far as this node's log shows")
        if len(body) > limit_of(mtype):
            raise OversizedMessage(f"a {mtype.name} message of {len(body)} bytes is over its "
                                   f"{limit_of(mtype)}-byte limit and was not sent")
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        if target.fingerprint not in self._introduced:  # first contact: hand our certificate
            self._introduce(peer, target, deadline)
        try:
            return self._exchange(peer, target, mtype, body, expect, deadline, self._client_ctx)
        except _Retry:
            # our certificate is no longer trusted there (it restarted): introduce it, retry once
            self._introduce(peer, target, deadline)
            try:
                return self._exchange(peer, target, mtype, body, expect, deadline,
                                      self._client_ctx)
            except _Retry as exc:
                raise PeerRefused(f"node {peer!r} refused this node's certificate after its "
                                  f"introduction: {exc}") from None

    def _introduce(self, peer: str, target: Peer, deadline: float) -> None:
        self._introduced.discard(target.fingerprint)
        self._exchange(peer, target, MessageType.INTRODUCE, self.identity.cert_der,
                       MessageType.ACK, deadline, self._intro_ctx)
        self._introduced.add(target.fingerprint)

    def _exchange(self, peer: str, target: Peer, mtype: MessageType, body: bytes,
                  expect: MessageType, deadline: float, ctx: ssl.SSLContext) -> bytes:
        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerUnreachable(f"node {peer!r} at {target.address} did not answer in time")
            return left

        host, port = parse_address(target.address)
        try:
            sock = socket.create_connection((host, port), timeout=remaining())
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see _serve
        except OSError as exc:
            raise PeerUnreachable(f"node {peer!r} at {target.address} is unreachable: "
                                  f"{_describe(exc)}") from None
        tls: ssl.SSLSocket | None = None
        try:
            tls = ctx.wrap_socket(sock, do_handshake_on_connect=False)
            tls.settimeout(remaining())
            tls.do_handshake()
            self._check_server(peer, target, tls.getpeercert(binary_form=True))
            tls.settimeout(remaining())
            write_frame(tls, mtype, body)
            got, reply = read_frame(tls, deadline)
        except TimeoutError:
            raise PeerUnreachable(f"node {peer!r} at {target.address} did not answer in "
                                  "time") from None
        except (ssl.SSLError, ConnectionError, ProtocolError) as exc:
            if ctx is self._intro_ctx:
                raise PeerRefused(f"node {peer!r} refused the introduction: "
                                  f"{_describe(exc)}") from None
            raise _Retry(_describe(exc)) from None
        except OSError as exc:
            raise PeerUnreachable(f"node {peer!r} at {target.address}: {_describe(exc)}") from None
        finally:
            (tls or sock).close()  # wrapping detached sock: close what owns the descriptor
        if got is MessageType.REFUSED:
            reason = reply.decode("utf-8", "replace")
            raise PeerRefused(f"node {peer!r} refused: {reason}")
        if got is not expect:
            raise PeerRefused(f"node {peer!r} answered {got.name} instead of {expect.name}")
        return reply

    def _check_server(self, peer: str, target: Peer, der: bytes | None) -> None:
        fp = cert_fingerprint(der) if der else "none"
        if fp != target.fingerprint:
            log.warning("intranet: refused node %r at %s: it presented certificate sha256 %s, "
                        "but the runtime's log pins %s", peer, target.address, fp[:16],
                        target.fingerprint[:16])
            raise PeerRefused(f"node {peer!r} at {target.address} presented another certificate "
                              f"(sha256 {fp[:16]}...) than the one registered for it "
                              f"({target.fingerprint[:16]}...)")
        assert der is not None
        problem = certificate_problem(der, self._clock())
        if problem is not None:
            raise PeerRefused(f"node {peer!r}'s certificate is not usable: {problem}")

    # --- reachability --------------------------------------------------------------------------

    def check_all(self, timeout_s: float | None = None) -> dict[str, bool]:
        """Ping every peer at once; each answer is awaited at most ``timeout_s``."""
        peers = sorted(self.peers())
        results: dict[str, bool] = {}

        def check(name: str) -> None:
            results[name] = self.check_peer(name, timeout_s)

        threads = [threading.Thread(target=check, args=(n,), daemon=True) for n in peers]
        for t in threads:
            t.start()
        limit = (self.timeout_s if timeout_s is None else timeout_s) + 1.0
        deadline = time.monotonic() + limit
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return {n: results.get(n, False) for n in peers}

    def reachable_peers(self) -> tuple[str, ...]:
        """The peers whose intranet port answered the latest check: ``NodeMetrics``'s
        ``reachable_peers``. Empty while remote access is off."""
        with self._lock:
            return tuple(sorted(n for n, ok in self._reachable.items() if ok))

    def _monitor_loop(self) -> None:
        assert self.check_interval_s is not None
        while not self._stopping.is_set():
            self._wake_monitor.clear()
            results = self.check_all()
            with self._lock:
                for name, ok in results.items():
                    if name in self._peers and self._reachable.get(name) != ok:
                        log.info("intranet: node %r is %s", name,
                                 "reachable" if ok else "unreachable")
                    if name in self._peers:
                        self._reachable[name] = ok
            self._wake_monitor.wait(self.check_interval_s)


class _Retry(Exception):
    """Internal: the handshake or exchange failed in a way an introduction may cure."""


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a socket or TLS failure."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc.strerror or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
