"""The intranet channel on real loopback sockets: members talk, everyone else is refused."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from canary import CANARY_BYTES
from rig import Rig

from shir.adapters.envelope import NodeKeys, open_envelope, seal
from shir.adapters.intranet import (
    EnvelopeMessage,
    Intranet,
    IntranetClosed,
    OversizedMessage,
    Peer,
    PeerRefused,
    PeerUnreachable,
    UnknownPeer,
    directory_from_nodes,
    parse_address,
)
from shir.adapters.intranet_tls import IntranetIdentity, create_identity
from shir.adapters.intranet_wire import HEADER, MessageType, read_frame, write_frame
from shir.adapters.protect import PortableProtector, ReplayedEnvelope
from shir.core import RemoveNode

NOW = dt.datetime.now(dt.UTC)
Ids = dict[str, IntranetIdentity]
LOG = "shir.adapters.intranet"


def _identity(root: Path, name: str, *, expired: bool = False) -> IntranetIdentity:
    protector = PortableProtector(root / name / "protector.key", machine_id=f"machine-{name}")
    if expired:
        start, end = NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1)
    else:
        start, end = NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=365)
    return create_identity(root / name / "intranet", name, protector,
                           not_before=start, not_after=end)


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Ids:
    """Identities of members a, b, c, of an outsider x, and of e whose certificate expired."""
    root = tmp_path_factory.mktemp("intranet-ids")
    out = {n: _identity(root, n) for n in "abcx"}
    out["e"] = _identity(root, "e", expired=True)
    return out


class Node:
    """One started channel and the envelopes it received (sender, message)."""

    def __init__(self, name: str, identity: IntranetIdentity, **kw: object) -> None:
        self.received: list[tuple[str, EnvelopeMessage]] = []
        self.handler: Callable[[str, EnvelopeMessage], None] = (
            lambda sender, m: self.received.append((sender, m)))
        kw.setdefault("check_interval_s", None)
        kw.setdefault("timeout_s", 2.0)
        self.channel = Intranet(name, identity, port=0,
                                on_envelope=lambda s, m: self.handler(s, m), **kw)  # type: ignore[arg-type]
        self.channel.start()

    def peer(self) -> Peer:
        return Peer(self.channel.address, self.channel.identity.fingerprint)


@contextlib.contextmanager
def cluster(ids: Ids, names: str, **kw: object) -> Iterator[dict[str, Node]]:
    """Start nodes ``names``; each one's directory lists all of them."""
    nodes = {n: Node(n, ids[n], **kw) for n in names}
    try:
        directory = {n: node.peer() for n, node in nodes.items()}
        for node in nodes.values():
            node.channel.set_peers(directory)
        yield nodes
    finally:
        for node in nodes.values():
            node.channel.stop()


def msg(version: int = 1, envelope: bytes = b"sealed-bytes") -> EnvelopeMessage:
    return EnvelopeMessage("sql-password", version, envelope)


def test_two_nodes_exchange_sealed_envelopes(ids: Ids) -> None:
    keys = {"a": NodeKeys.generate(), "b": NodeKeys.generate()}
    opened: list[bytes] = []
    with cluster(ids, "ab") as nodes:
        def open_at_b(sender: str, m: EnvelopeMessage) -> None:
            o = open_envelope(m.envelope, keys["b"], "b", keys[sender].public, 0)
            opened.append(o.plaintext)

        nodes["b"].handler = open_at_b
        blob = seal("sql-password", 1, CANARY_BYTES, keys["a"], keys["b"].public, "b")
        nodes["a"].channel.send_envelope("b", EnvelopeMessage("sql-password", 1, blob))
        nodes["b"].channel.send_envelope("a", msg(7))
        assert opened == [CANARY_BYTES]
        assert nodes["a"].received == [("b", msg(7))]


def test_three_nodes_each_reach_each_other(ids: Ids) -> None:
    with cluster(ids, "abc") as nodes:
        for s in "abc":
            for r in "abc":
                if s != r:
                    nodes[s].channel.send_envelope(r, msg(envelope=f"{s}->{r}".encode()))
        for r in "abc":
            got = sorted((sender, m.envelope) for sender, m in nodes[r].received)
            assert got == sorted((s, f"{s}->{r}".encode()) for s in "abc" if s != r)
        assert nodes["a"].channel.check_all() == {"b": True, "c": True}


def test_a_restarted_peer_is_reached_again(ids: Ids) -> None:
    with cluster(ids, "ab") as nodes:
        nodes["a"].channel.send_envelope("b", msg(1))
        old = nodes["b"].channel
        old.stop()
        # b comes back on the same port, with the same identity, knowing nobody yet
        nodes["b"].channel = Intranet("b", ids["b"], port=old.port, timeout_s=2.0,
                                      check_interval_s=None, on_envelope=old._on_envelope)
        nodes["b"].channel.start()
        nodes["b"].channel.set_peers(nodes["a"].channel.peers() | {"a": nodes["a"].peer()})
        nodes["a"].channel.send_envelope("b", msg(2))  # a's first try fails; it re-introduces
        assert [m.version for _, m in nodes["b"].received] == [1, 2]


def test_the_channel_negotiates_tls_1_3(ids: Ids) -> None:
    with cluster(ids, "a") as nodes:
        ctx = ids["b"].client_context(present_certificate=False)
        with socket.create_connection(("127.0.0.1", nodes["a"].channel.port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:
            assert tls.version() == "TLSv1.3"


def test_a_non_member_is_refused_with_a_logged_reason(
        ids: Ids, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG)
    with cluster(ids, "b") as nodes:
        outsider = Node("x", ids["x"])
        try:
            outsider.channel.set_peers({"b": nodes["b"].peer()})
            with pytest.raises(PeerRefused, match="not the certificate of a registered node"):
                outsider.channel.send_envelope("b", msg())
            assert not outsider.channel.check_peer("b")
        finally:
            outsider.channel.stop()
        # presenting its certificate straight away fails the handshake itself
        ctx = ids["x"].client_context()
        with socket.create_connection(("127.0.0.1", nodes["b"].channel.port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls, \
                pytest.raises((ssl.SSLError, ConnectionError)):  # on the write or the read
            write_frame(tls, MessageType.PING, b"12345678")
            read_frame(tls)
        assert nodes["b"].received == []
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("is not the certificate of a registered node" in m for m in refusals)
    assert any("certificate is not accepted" in m for m in refusals)


def test_a_removed_member_is_refused_at_once(ids: Ids) -> None:
    with cluster(ids, "abc") as nodes:
        nodes["a"].channel.send_envelope("b", msg(1))
        assert nodes["a"].channel.check_peer("b")
        without_a = {n: p for n, p in nodes["b"].channel.peers().items() if n != "a"}
        nodes["b"].channel.set_peers(without_a)  # the log shows a removed
        with pytest.raises(PeerRefused, match="not the certificate of a registered node"):
            nodes["a"].channel.send_envelope("b", msg(2))
        assert not nodes["a"].channel.check_peer("b")
        assert [m.version for _, m in nodes["b"].received] == [1]
        # and b no longer dials a
        with pytest.raises(UnknownPeer, match="'a' is not a registered node"):
            nodes["b"].channel.send_envelope("a", msg(3))
        nodes["c"].channel.send_envelope("b", msg(4))  # the others are unaffected


def test_an_expired_certificate_is_refused_both_ways(ids: Ids) -> None:
    with cluster(ids, "be") as nodes:
        with pytest.raises(PeerRefused, match="expired"):
            nodes["e"].channel.send_envelope("b", msg())
        with pytest.raises(PeerRefused, match="expired"):
            nodes["b"].channel.send_envelope("e", msg())
        assert nodes["b"].received == [] and nodes["e"].received == []


def test_a_certificate_other_than_the_pinned_one_is_refused(ids: Ids) -> None:
    with cluster(ids, "abc") as nodes:
        directory = nodes["a"].channel.peers()
        # a's log pins c's certificate for b: b is refused when a dials it
        nodes["a"].channel.set_peers({**directory, "b": Peer(directory["b"].address,
                                                             ids["c"].fingerprint)})
        with pytest.raises(PeerRefused, match="presented another certificate"):
            nodes["a"].channel.send_envelope("b", msg())
        # b's log pins x's certificate for a: a is refused when it dials b
        nodes["b"].channel.set_peers({**nodes["b"].channel.peers(),
                                      "a": Peer(directory["b"].address, ids["x"].fingerprint)})
        nodes["a"].channel.set_peers(directory)
        with pytest.raises(PeerRefused, match="not the certificate of a registered node"):
            nodes["a"].channel.send_envelope("b", msg())
        assert nodes["b"].received == []


def _read_refusal(tls: ssl.SSLSocket) -> str:
    mtype, body = read_frame(tls)
    assert mtype is MessageType.REFUSED
    return body.decode()


def test_an_oversized_message_is_refused_before_its_body_is_read(
        ids: Ids) -> None:
    # the server would wait 30 s for a body it read; the client gives up after 5
    with cluster(ids, "ab", timeout_s=30.0) as nodes:
        nodes["a"].channel.send_envelope("b", msg())  # a is introduced to b
        port = nodes["b"].channel.port
        ten_mb = 10 * 1024 * 1024
        for ctx, mtype in ((ids["a"].client_context(), MessageType.ENVELOPE),
                           (ids["a"].client_context(present_certificate=False),
                            MessageType.INTRODUCE)):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw) as tls:
                tls.sendall(HEADER.pack(b"SI", 1, int(mtype), ten_mb))  # no body follows
                assert f"of {ten_mb} bytes is over" in _read_refusal(tls)
        with pytest.raises(OversizedMessage, match=r"over its .* limit and was not sent"):
            nodes["a"].channel.send_envelope("b", msg(envelope=b"x" * (ten_mb)))
        assert len(nodes["b"].received) == 1


def test_garbage_and_wrong_messages_are_refused(ids: Ids) -> None:
    with cluster(ids, "ab") as nodes:
        nodes["a"].channel.check_peer("b")  # introduced
        port = nodes["b"].channel.port
        cases = ((ids["a"].client_context(), b"GARBAGE!", "bad magic"),
                 (ids["a"].client_context(), HEADER.pack(b"SI", 1, int(MessageType.ENVELOPE), 3)
                  + b"\x00\x00\x00", "credential id"),
                 (ids["a"].client_context(present_certificate=False),
                  HEADER.pack(b"SI", 1, int(MessageType.PING), 8) + b"12345678",
                  "present a certificate"))
        for ctx, data, reason in cases:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw) as tls:
                tls.sendall(data)
                assert reason in _read_refusal(tls)


def test_a_down_peer_is_unreachable_within_the_timeout(ids: Ids) -> None:
    with cluster(ids, "ab") as nodes:
        assert nodes["a"].channel.check_peer("b")
        nodes["b"].channel.stop()
        started = time.monotonic()
        assert not nodes["a"].channel.check_peer("b", timeout_s=1.0)
        with pytest.raises(PeerUnreachable):
            nodes["a"].channel.send_envelope("b", msg(), timeout_s=1.0)
        assert time.monotonic() - started < 2.0
        # a port that accepts connections but never answers: the deadline still holds
        with socket.create_server(("127.0.0.1", 0)) as silent:
            addr = f"127.0.0.1:{silent.getsockname()[1]}"
            nodes["a"].channel.set_peers({"b": Peer(addr, ids["b"].fingerprint)})
            started = time.monotonic()
            assert not nodes["a"].channel.check_peer("b", timeout_s=1.0)
            assert time.monotonic() - started < 1.75


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_the_monitor_reports_which_peers_answer(ids: Ids) -> None:
    with cluster(ids, "abc", check_interval_s=0.2, timeout_s=1.0) as nodes:
        a = nodes["a"].channel
        assert _wait_for(lambda: a.reachable_peers() == ("b", "c"))
        nodes["c"].channel.stop()
        assert _wait_for(lambda: a.reachable_peers() == ("b",))
        a.set_peers({"a": nodes["a"].peer()})  # b and c removed from the log
        assert a.reachable_peers() == ()


def test_remote_access_off_closes_the_port(ids: Ids) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # a free port, released before the node "uses" it
    channel = Intranet("a", ids["a"], port=port, remote_access=False)
    channel.start()
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        channel.set_peers({"b": Peer(f"127.0.0.1:{port}", ids["b"].fingerprint)})
        with pytest.raises(IntranetClosed, match="remote access is off"):
            channel.send_envelope("b", msg())
        assert not channel.check_peer("b") and channel.reachable_peers() == ()
    finally:
        channel.stop()


def test_the_receivers_refusal_comes_back_to_the_sender(ids: Ids) -> None:
    with cluster(ids, "ab") as nodes:
        def refuse(sender: str, m: EnvelopeMessage) -> None:
            raise ReplayedEnvelope(f"version {m.version} of {m.credential_id!r} already held")

        nodes["b"].handler = refuse
        with pytest.raises(PeerRefused, match="version 1 of 'sql-password' already held"):
            nodes["a"].channel.send_envelope("b", msg())

        def crash(sender: str, m: EnvelopeMessage) -> None:
            raise RuntimeError(CANARY_BYTES.decode())

        nodes["b"].handler = crash
        with pytest.raises(PeerRefused, match="failed to store it \\(RuntimeError\\)") as info:
            nodes["a"].channel.send_envelope("b", msg())
        assert CANARY_BYTES.decode() not in str(info.value)


def test_connections_beyond_the_limit_are_closed_unanswered(ids: Ids) -> None:
    # b would wait 30 s for a handshake on a connection it serves; the test waits 5
    with cluster(ids, "ab", max_connections=1, timeout_s=30.0) as nodes:
        port = nodes["b"].channel.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as hog:
            # accepted first (the backlog is FIFO), it holds b's only slot
            with socket.create_connection(("127.0.0.1", port), timeout=5) as second:
                assert second.recv(1) == b""  # closed by b at once, without a word
            hog.sendall(b"x")  # not a TLS hello: b drops it and frees the slot
        assert _wait_for(lambda: nodes["a"].channel.check_peer("b"))


def _trickle(sock: socket.socket | ssl.SSLSocket, head: bytes) -> float:
    """Send ``head``, then a byte every 0.2 s until the peer cuts the connection: seconds taken."""
    sock.sendall(head)
    started = time.monotonic()
    with pytest.raises(OSError):  # reset or broken pipe once the peer has cut it off
        for _ in range(40):  # 8 s if nothing stopped it
            sock.sendall(b"\x00")
            time.sleep(0.2)
    return time.monotonic() - started


def test_a_peer_trickling_bytes_is_cut_off_at_the_deadline(ids: Ids) -> None:
    # each byte comes well within b's 1 s per-read timeout: only whole-exchange deadlines end it
    with cluster(ids, "ab", timeout_s=1.0) as nodes:
        nodes["a"].channel.check_peer("b")  # a is introduced
        address = ("127.0.0.1", nodes["b"].channel.port)
        with socket.create_connection(address, timeout=5) as raw:  # during the handshake
            assert _trickle(raw, bytes([0x16, 0x03, 0x01, 0x40, 0x00])) < 3.0
        with socket.create_connection(address, timeout=5) as raw, \
                ids["a"].client_context().wrap_socket(raw) as tls:  # after it, mid-message
            assert _trickle(tls, HEADER.pack(b"SI", 1, int(MessageType.ENVELOPE), 1000)) < 3.0


def test_no_key_material_or_credential_in_logs_or_errors(
        ids: Ids, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys = {"a": NodeKeys.generate(), "b": NodeKeys.generate()}
    errors: list[str] = []
    with cluster(ids, "abe") as nodes:
        blob = seal("sql-password", 1, CANARY_BYTES, keys["a"], keys["b"].public, "b")
        canary_msg = EnvelopeMessage("sql-password", 1, blob + CANARY_BYTES)
        nodes["a"].channel.send_envelope("b", canary_msg)
        for sender, target in (("e", "b"), ("a", "e")):
            try:
                nodes[sender].channel.send_envelope(target, canary_msg)
            except PeerRefused as exc:
                errors.append(str(exc) + repr(exc))
        errors.append(repr(canary_msg) + repr(nodes["a"].received) + repr(nodes["b"].received))
    secrets_ = [CANARY_BYTES.decode(), blob.hex()[:32]]
    for identity in ids.values():
        key_pem = identity.key_path.read_text()
        assert "ENCRYPTED PRIVATE KEY" in key_pem and identity.key_path.stat().st_mode & 0o077 == 0
        secrets_ += [key_pem.splitlines()[1], identity._password.hex()]  # type: ignore[union-attr]
        assert identity._password not in (identity.key_path.parent / "node.key.pass").read_bytes()
        errors.append(repr(identity))
    text = caplog.text + "\n".join(errors)
    assert "refused" in text and len(errors) == 3 + len(ids)
    for s in secrets_:
        assert s not in text


@pytest.mark.parametrize("address", ["127.0.0.1", "host:0", ":80", "h:99999", "h:x"])
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        parse_address(address)
    with pytest.raises(ValueError):
        Peer(address, "0" * 64)
    assert parse_address("[::1]:8060") == ("::1", 8060)


def test_a_fingerprint_must_be_sha256_hex() -> None:
    assert Peer("h:1", "AB:" * 31 + "AB").fingerprint == "ab" * 32
    with pytest.raises(ValueError, match="not a SHA-256"):
        Peer("h:1", "abc")


def test_a_busy_port_gives_a_clear_error(ids: Ids) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        channel = Intranet("a", ids["a"], port=taken.getsockname()[1])
        with pytest.raises(Exception, match="choose another with --intranet-port"):
            channel.start()


def test_an_address_this_machine_cannot_listen_on_is_named_not_called_busy(ids: Ids) -> None:
    channel = Intranet("a", ids["a"], host="192.0.2.1", port=0)  # TEST-NET-1: on no interface
    with pytest.raises(Exception, match="--intranet-host") as caught:
        channel.start()
    assert "not an address of this machine" in str(caught.value)
    assert "uses it" not in str(caught.value)


def test_stop_joins_every_thread(ids: Ids) -> None:
    before = set(threading.enumerate())
    with cluster(ids, "ab", check_interval_s=0.1):
        pass
    assert _wait_for(lambda: set(threading.enumerate()) <= before, 5.0)


def test_the_directory_follows_what_nodes_published(caplog: pytest.LogCaptureFixture) -> None:
    @attrs.frozen
    class Published:  # the fields RegisterNode/NodeRegistered/Node carry
        name: str
        intranet_address: str | None
        cert_sha256: str | None

    fp = "ab" * 32
    nodes = [Published("a", "10.0.0.1:8060", fp), Published("b", None, None),
             Published("c", "10.0.0.3:8060", None), Published("d", "nohost", fp)]
    assert directory_from_nodes(nodes) == {"a": Peer("10.0.0.1:8060", fp)}
    assert "'d' is left out of the peer directory" in caplog.text


def test_membership_follows_the_runtimes_log(ids: Ids) -> None:
    """Nodes register with their address and fingerprint through the core; a RemoveNode in the
    log is enough for the others to refuse the removed node."""
    c = Rig()
    with cluster(ids, "abc") as nodes:
        for n, node in nodes.items():
            c.handle(attrs.evolve(c.register_cmd(n, at=1.0), intranet_address=node.channel.address,
                                  cert_sha256=node.channel.identity.fingerprint))

        def follow_the_log() -> None:
            for node in nodes.values():
                node.channel.set_peers(directory_from_nodes(c.state.nodes))

        follow_the_log()
        assert set(directory_from_nodes(c.state.nodes)) == {"a", "b", "c"}
        nodes["a"].channel.send_envelope("b", msg(1))
        c.handle(RemoveNode("a", at=2.0))
        follow_the_log()
        with pytest.raises(PeerRefused, match="not the certificate of a registered node"):
            nodes["a"].channel.send_envelope("b", msg(2))
        nodes["c"].channel.send_envelope("b", msg(3))
        assert [(s, m.version) for s, m in nodes["b"].received] == [("a", 1), ("c", 3)]
