"""The node host's credential parts: envelopes between two nodes over the real intranet (mutual
TLS on loopback, real stores), and the bundle a job carries. No processes, no services.

A refused envelope (tampered, for another node or key, from a node with no registered key, a
rollback) is answered with a reason that says what was wrong, and the target's store is left
exactly as it was.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest
from canary import CANARY_BYTES

from shir.adapters.carried import (
    MAX_CARRIED_BYTES,
    BadCarriedCredential,
    carried_ids,
    open_carried,
    seal_for_nodes,
)
from shir.adapters.credstore import LocalCredentialStore
from shir.adapters.envelope import NodeKeys, seal
from shir.adapters.intranet import EnvelopeMessage, Intranet, Peer, PeerRefused
from shir.adapters.intranet_tls import create_identity
from shir.adapters.node_credentials import HostCredentials, node_keys
from shir.adapters.node_jobs import credentials_named, pack_spec, split_carried, unpack_spec
from shir.adapters.protect import IdentityConflict, PortableProtector, WrongRecipient
from shir.core.credentials import SealCredentialFor

NOW = dt.datetime.now(dt.UTC)


@attrs.frozen
class _Published:
    name: str
    envelope_key: bytes | None


class _Log:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        self.records.append({"level": level, "event": event, **fields})


@attrs.define
class _Node:
    creds: HostCredentials
    channel: Intranet
    log: _Log


def _node(root: Path, name: str) -> _Node:
    protector = PortableProtector(root / name / "protector.key", machine_id=f"machine-{name}")
    identity = create_identity(root / name / "intranet", name, protector,
                               not_before=NOW - dt.timedelta(hours=1),
                               not_after=NOW + dt.timedelta(days=30))
    log = _Log()
    creds = HostCredentials(name, NodeKeys.generate(),
                            LocalCredentialStore(root / name / "credentials", protector), log)
    channel = Intranet(name, identity, port=0, on_envelope=creds.receive, check_interval_s=None,
                       timeout_s=2.0)
    channel.start()
    creds.send_envelope = channel.send_envelope
    return _Node(creds, channel, log)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, _Node]]:
    """Nodes a and b, each knowing the other's intranet pin and envelope key."""
    nodes = {n: _node(tmp_path, n) for n in "ab"}
    try:
        peers = {n: Peer(x.channel.address, x.channel.identity.fingerprint)
                 for n, x in nodes.items()}
        published = [_Published(n, x.creds.keys.public) for n, x in nodes.items()]
        for x in nodes.values():
            x.channel.set_peers(peers)
            x.creds.set_nodes(published)
        yield nodes
    finally:
        for x in nodes.values():
            x.channel.stop()


def _store_bytes(node: _Node) -> dict[str, bytes]:
    d = node.creds.store.directory
    return {p.name: p.read_bytes() for p in d.iterdir()} if d.is_dir() else {}


def _wait_shared(node: _Node, timeout_s: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done := node.creds.finished():
            return done
        if any(r["event"] == "credential_not_shared" for r in node.log.records):
            return []
        time.sleep(0.02)
    raise AssertionError("the share neither finished nor failed")


def test_a_holder_seals_and_sends_and_the_target_stores_and_reports(
        pair: dict[str, _Node]) -> None:
    a, b = pair["a"], pair["b"]
    a.creds.store.put("pg", 2, CANARY_BYTES)
    a.creds.share(SealCredentialFor("pg", 2, "a", "b"), b.creds.keys.public)
    (make,) = _wait_shared(a)
    shared = make(5.0)  # the command the host stamps and records
    assert (shared.credential_id, shared.version, shared.from_node, shared.to_node, shared.at) \
        == ("pg", 2, "a", "b", 5.0)
    assert CANARY_BYTES not in shared.envelope and CANARY_BYTES.hex() not in repr(shared)
    assert b.creds.store.get("pg") == (2, CANARY_BYTES)
    assert b.creds.report_soon.is_set()
    assert b.creds.held() == a.creds.held()
    # the same envelope again (an answer lost on the way back): taken, nothing changes
    before = _store_bytes(b)
    a.channel.send_envelope("b", EnvelopeMessage("pg", 2, shared.envelope))
    assert _store_bytes(b) == before
    everything = json.dumps(a.log.records + b.log.records).encode()
    assert CANARY_BYTES not in everything


def _refused(a: _Node, b: _Node, message: EnvelopeMessage) -> str:
    before = _store_bytes(b)
    with pytest.raises(PeerRefused) as info:
        a.channel.send_envelope("b", message)
    assert _store_bytes(b) == before, "a refused envelope changed the target's store"
    assert not b.creds.report_soon.is_set()
    assert CANARY_BYTES not in str(info.value).encode()
    return str(info.value)


def test_a_tampered_envelope_is_refused_and_changes_nothing(pair: dict[str, _Node]) -> None:
    a, b = pair["a"], pair["b"]
    b.creds.store.put("pg", 1, b"old secret")
    envelope = bytearray(seal("pg", 2, CANARY_BYTES, a.creds.keys, b.creds.keys.public, "b"))
    envelope[-20] ^= 0x01
    reason = _refused(a, b, EnvelopeMessage("pg", 2, bytes(envelope)))
    assert "failed authentication" in reason and "altered in transit or forged" in reason
    assert b.creds.store.get("pg") == (1, b"old secret")


def test_an_envelope_for_another_node_or_key_is_refused(pair: dict[str, _Node]) -> None:
    a, b = pair["a"], pair["b"]
    for_c = seal("pg", 1, CANARY_BYTES, a.creds.keys, b.creds.keys.public, "c")
    assert "sealed for node 'c', not for this node 'b'" in _refused(
        a, b, EnvelopeMessage("pg", 1, for_c))
    other_key = seal("pg", 1, CANARY_BYTES, a.creds.keys, NodeKeys.generate().public, "b")
    assert "sealed for key" in _refused(a, b, EnvelopeMessage("pg", 1, other_key))
    assert b.creds.store.version_of("pg") == 0


def test_an_envelope_from_an_unexpected_sender_or_older_is_refused(
        pair: dict[str, _Node]) -> None:
    a, b = pair["a"], pair["b"]
    forged = seal("pg", 1, CANARY_BYTES, NodeKeys.generate(), b.creds.keys.public, "b")
    assert "not from the expected sender" in _refused(a, b, EnvelopeMessage("pg", 1, forged))
    relabelled = seal("pg", 1, CANARY_BYTES, a.creds.keys, b.creds.keys.public, "b")
    assert "was sent as 'pg' v7" in _refused(a, b, EnvelopeMessage("pg", 7, relabelled))
    b.creds.store.put("pg", 3, b"newer")
    old = seal("pg", 2, CANARY_BYTES, a.creds.keys, b.creds.keys.public, "b")
    assert "rollback refused" in _refused(a, b, EnvelopeMessage("pg", 2, old))
    b.creds.set_nodes([_Published("a", None)])  # a no longer has a registered key
    fresh = seal("pg", 4, CANARY_BYTES, a.creds.keys, b.creds.keys.public, "b")
    assert "registered no envelope key" in _refused(a, b, EnvelopeMessage("pg", 4, fresh))
    assert b.creds.store.get("pg") == (3, b"newer")


def test_a_holder_that_cannot_share_says_why(pair: dict[str, _Node]) -> None:
    a, b = pair["a"], pair["b"]
    a.creds.store.put("pg", 2, CANARY_BYTES)
    a.creds.share(SealCredentialFor("pg", 1, "a", "b"), b.creds.keys.public)
    assert _wait_shared(a) == []
    assert "holds v2, not v1" in a.log.records[-1]["reason"]
    a.creds.share(SealCredentialFor("pg", 2, "a", "b"), None)
    assert "registered no envelope key" in a.log.records[-1]["reason"]
    a.creds.send_envelope = None
    a.creds.share(SealCredentialFor("pg", 2, "a", "b"), b.creds.keys.public)
    assert "remote access is off" in a.log.records[-1]["reason"]
    assert b.creds.store.version_of("pg") == 0


def test_node_keys_are_made_once_and_a_foreign_home_is_refused(tmp_path: Path) -> None:
    keys = node_keys(tmp_path, "ir-1", "a")
    assert node_keys(tmp_path, "ir-1", "a") == keys
    assert (tmp_path / "node.pub").is_file()
    with pytest.raises(IdentityConflict, match="run this node with its own --home"):
        node_keys(tmp_path, "ir-2", "a")
    with pytest.raises(IdentityConflict, match="not of node 'b'"):
        node_keys(tmp_path, "ir-1", "b")


# --- a credential a job carries ------------------------------------------------------------------

def test_a_carried_credential_opens_only_on_the_nodes_it_was_sealed_for() -> None:
    keys = {n: NodeKeys.generate() for n in "ab"}
    bundle = seal_for_nodes("pg", CANARY_BYTES, "ir-1", {n: k.public for n, k in keys.items()})
    assert CANARY_BYTES not in bundle and carried_ids(bundle) == ("pg",) and carried_ids(b"") == ()
    for n, k in keys.items():
        assert open_carried(bundle, n, k, "ir-1") == {"pg": CANARY_BYTES}
    with pytest.raises(BadCarriedCredential, match=r"not for node 'c'.*submit the job again"):
        open_carried(bundle, "c", NodeKeys.generate(), "ir-1")
    with pytest.raises(WrongRecipient, match="encrypted for key"):
        open_carried(bundle, "a", keys["b"], "ir-1")  # a's box, b's key
    with pytest.raises(WrongRecipient, match="runtime 'ir-1', not for this runtime 'ir-2'"):
        open_carried(bundle, "a", keys["a"], "ir-2")


def test_a_tampered_or_malformed_bundle_is_refused() -> None:
    k = NodeKeys.generate()
    doc = msgpack.unpackb(seal_for_nodes("pg", CANARY_BYTES, "ir-1", {"a": k.public}))
    box = bytearray(doc["sealed"]["a"])
    box[-1] ^= 1
    tampered = msgpack.packb({**doc, "sealed": {"a": bytes(box)}})
    with pytest.raises(Exception, match="failed authentication") as info:
        open_carried(tampered, "a", k, "ir-1")
    assert CANARY_BYTES not in str(info.value).encode()
    relabelled = msgpack.packb({**doc, "credential": "other"})
    with pytest.raises(BadCarriedCredential, match="holds credential 'pg', not 'other'"):
        open_carried(relabelled, "a", k, "ir-1")
    for bad in (b"\xc1", msgpack.packb([1]), msgpack.packb({"v": 2}),
                b"x" * (MAX_CARRIED_BYTES + 1),
                msgpack.packb({"v": 1, "credential": "../x", "sealed": {}}),
                msgpack.packb({"v": 1, "credential": "pg", "sealed": {"a": "text"}})):
        with pytest.raises(BadCarriedCredential, match=r"bundle|1-49152 bytes"):
            carried_ids(bad)
    with pytest.raises(BadCarriedCredential, match="start its nodes"):
        seal_for_nodes("pg", b"x", "ir-1", {})
    with pytest.raises(BadCarriedCredential, match="more than"):
        seal_for_nodes("pg", b"x" * 20_000, "ir-1", {n: k.public for n in "abc"})


def test_a_spec_carries_its_bundle_in_front_of_kind_and_params() -> None:
    assert split_carried(pack_spec("copy", b"{}")) == (b"", b"copy\0{}")
    spec = pack_spec("copy", b"{\"a\": \"\\u0000\"}\0x", b"\0bundle\0")
    assert split_carried(spec) == (b"\0bundle\0", b"copy\0{\"a\": \"\\u0000\"}\0x")
    assert unpack_spec(spec) == ("copy", b"{\"a\": \"\\u0000\"}\0x")
    assert unpack_spec(b"\0\xff\xff\xff\xffcopy\0{}")[0] == ""  # a length past the end: no kind
    named = credentials_named("copy", json.dumps({
        "source": "Driver={x}", "credential": "pg", "format": "csv", "query": "SELECT 1",
        "sink": {"container": "c", "blob": "b", "credential": "st"}}).encode())
    assert named == ("pg", "st")
    assert credentials_named("copy", b"not json") == () == credentials_named("touch", b"{}")


def test_an_unreadable_store_holds_nothing_and_says_why(tmp_path: Path) -> None:
    log = _Log()
    protector = PortableProtector(tmp_path / "protector.key", machine_id="m")
    store = LocalCredentialStore(tmp_path / "credentials", protector)
    creds = HostCredentials("a", NodeKeys.generate(), store, log)
    assert creds.held() == ()  # no folder yet
    store.put("pg", 1, CANARY_BYTES)
    store.put("api", 2, b"k")
    (tmp_path / "credentials" / "api.cred").write_bytes(b"damaged")
    assert [(cv.credential_id, cv.version) for cv in creds.held()] == [("pg", 1)]
    assert log.records[-1]["event"] == "credential_unreadable"
    assert log.records[-1]["credential"] == "api"
    other = HostCredentials("b", NodeKeys.generate(),
                            LocalCredentialStore(tmp_path / "protector.key", protector), log)
    assert other.held() == ()  # a file, not a folder
    assert log.records[-1]["event"] == "credential_store_unreadable"
    assert CANARY_BYTES not in json.dumps(log.records).encode()


def test_a_copy_job_whose_carried_credential_does_not_open_fails_saying_why(
        tmp_path: Path) -> None:
    from shir.adapters.node_jobs import JobContext, JobFailed, kinds_for
    from shir.core.jobs import LeaseToken

    keys = node_keys(tmp_path, "ir-1", "a")
    spec = json.dumps({"source": "Driver={none}", "credential": "pg", "format": "csv",
                       "query": "SELECT 1", "sink": {"folder": str(tmp_path / "x.csv")}})
    copy = kinds_for(tmp_path)["copy"]
    token = LeaseToken("j1", "a", 1, 1)
    for_b = seal_for_nodes("pg", CANARY_BYTES, "ir-1", {"b": NodeKeys.generate().public})
    with pytest.raises(JobFailed, match=r"carried credential was refused: .*not for node 'a'"):
        copy(JobContext(token, spec.encode(), threading.Event(), for_b))
    doc = msgpack.unpackb(seal_for_nodes("pg", CANARY_BYTES, "ir-1", {"a": keys.public}))
    box = bytearray(doc["sealed"]["a"])
    box[-3] ^= 0x10
    tampered = msgpack.packb({**doc, "sealed": {"a": bytes(box)}})
    with pytest.raises(JobFailed, match=r"refused: .*failed authentication"):
        copy(JobContext(token, spec.encode(), threading.Event(), tampered))
    assert not (tmp_path / "x.csv").exists()
