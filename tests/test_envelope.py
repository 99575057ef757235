"""Sync envelopes open only at the named recipient, from the expected sender, if newer."""

from __future__ import annotations

import pytest
from canary import CANARY_BYTES
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shir.adapters.envelope import NodeKeys, fingerprint, open_envelope, seal
from shir.adapters.protect import (
    BadPublicKey,
    CredentialError,
    InvalidCredentialId,
    ReplayedEnvelope,
    RollbackRefused,
    TamperedCiphertext,
    UnknownSender,
    WrongRecipient,
)

ALICE = NodeKeys.generate()
BOB = NodeKeys.generate()
MALLORY = NodeKeys.generate()


def sealed(version: int = 3, plaintext: bytes = CANARY_BYTES, sender: NodeKeys = ALICE) -> bytes:
    return seal("sql-password", version, plaintext, sender, BOB.public, "node-b")


def test_round_trip() -> None:
    opened = open_envelope(sealed(), BOB, "node-b", ALICE.public, last_seen_version=2)
    assert opened == ("sql-password", 3, CANARY_BYTES)
    assert (opened.credential_id, opened.version, opened.plaintext) == opened
    assert CANARY_BYTES not in sealed()


def test_first_version_opens_with_nothing_seen() -> None:
    blob = sealed(version=1, plaintext=b"")
    assert open_envelope(blob, BOB, "node-b", ALICE.public, 0) == ("sql-password", 1, b"")


def test_each_envelope_is_fresh() -> None:
    assert sealed() != sealed()


def test_node_keys_serialise_as_raw_bytes() -> None:
    again = NodeKeys.from_private_bytes(ALICE.private_bytes())
    assert again == ALICE and again.public == ALICE.public and len(ALICE.public) == 32
    assert again != BOB
    assert "private=<hidden>" in repr(ALICE) and ALICE.fingerprint == fingerprint(ALICE.public)


def test_other_node_name_is_wrong_recipient() -> None:
    with pytest.raises(WrongRecipient, match="'node-b', not for this node 'node-c'"):
        open_envelope(sealed(), BOB, "node-c", ALICE.public, 0)


def test_other_node_key_is_wrong_recipient() -> None:
    # the right name but another key: the sender holds an outdated key for this node
    with pytest.raises(WrongRecipient, match="outdated public key"):
        open_envelope(sealed(), MALLORY, "node-b", ALICE.public, 0)


def test_unexpected_sender_is_refused() -> None:
    with pytest.raises(UnknownSender):
        open_envelope(sealed(sender=MALLORY), BOB, "node-b", ALICE.public, 0)


def test_forgery_claiming_the_expected_sender_is_refused() -> None:
    # Mallory seals with her key, then rewrites the header to claim Alice's public key: the
    # static-static secret she mixed in is hers, so the key derived by Bob does not match
    forged = bytearray(sealed(sender=MALLORY))
    at = forged.index(MALLORY.public)
    forged[at : at + 32] = ALICE.public
    with pytest.raises(TamperedCiphertext, match="forged"):
        open_envelope(bytes(forged), BOB, "node-b", ALICE.public, 0)


def test_every_flipped_byte_is_refused() -> None:
    blob = sealed(plaintext=b"short")
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(CredentialError):
            open_envelope(bytes(tampered), BOB, "node-b", ALICE.public, 0)


def test_flipped_ciphertext_is_tampered() -> None:
    blob = bytearray(sealed())
    blob[-20] ^= 0x80
    with pytest.raises(TamperedCiphertext):
        open_envelope(bytes(blob), BOB, "node-b", ALICE.public, 0)


def test_altered_version_in_header_is_tampered() -> None:
    blob = bytearray(sealed(version=3))
    at = 7 + 1 + 2 + len(b"sql-password")
    assert blob[at : at + 8] == (3).to_bytes(8, "big")
    blob[at : at + 8] = (9).to_bytes(8, "big")  # claim a newer version to beat the rollback check
    with pytest.raises(TamperedCiphertext):
        open_envelope(bytes(blob), BOB, "node-b", ALICE.public, 5)


@pytest.mark.parametrize("keep", [0, 6, 8, 20, 100, -1])
def test_truncated_envelope_is_tampered(keep: int) -> None:
    with pytest.raises(TamperedCiphertext):
        open_envelope(sealed()[:keep], BOB, "node-b", ALICE.public, 0)


def test_not_an_envelope() -> None:
    with pytest.raises(TamperedCiphertext, match="not a shir credential envelope"):
        open_envelope(b"hello world, this is not an envelope" * 4, BOB, "node-b", ALICE.public, 0)


def test_unknown_format_is_refused() -> None:
    blob = bytearray(sealed())
    blob[7] = 2
    with pytest.raises(TamperedCiphertext, match="format 2"):
        open_envelope(bytes(blob), BOB, "node-b", ALICE.public, 0)


def test_same_version_again_is_a_replay() -> None:
    with pytest.raises(ReplayedEnvelope, match="already holds"):
        open_envelope(sealed(version=3), BOB, "node-b", ALICE.public, 3)


def test_older_version_is_a_rollback() -> None:
    with pytest.raises(RollbackRefused, match="older than version 4") as refused:
        open_envelope(sealed(version=3), BOB, "node-b", ALICE.public, 4)
    assert not isinstance(refused.value, ReplayedEnvelope)


def test_replay_is_a_kind_of_rollback() -> None:
    assert issubclass(ReplayedEnvelope, RollbackRefused)


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33])
def test_seal_refuses_a_malformed_recipient_key(bad: bytes) -> None:
    with pytest.raises(BadPublicKey):
        seal("id", 1, b"x", ALICE, bad, "node-b")


def test_seal_refuses_a_low_order_recipient_key() -> None:
    with pytest.raises(BadPublicKey, match="degenerate"):
        seal("id", 1, b"x", ALICE, bytes(32), "node-b")


@pytest.mark.parametrize("credential_id", ["", "../etc", "a/b", "x" * 129, "sp ace"])
def test_seal_refuses_bad_credential_ids(credential_id: str) -> None:
    with pytest.raises(InvalidCredentialId):
        seal(credential_id, 1, b"x", ALICE, BOB.public, "node-b")


@pytest.mark.parametrize("version", [0, -1, 2**63, True, 1.5])
def test_seal_refuses_bad_versions(version: object) -> None:
    with pytest.raises(CredentialError, match="version"):
        seal("id", version, b"x", ALICE, BOB.public, "node-b")  # type: ignore[arg-type]


def test_from_private_bytes_refuses_the_wrong_size() -> None:
    with pytest.raises(CredentialError):
        NodeKeys.from_private_bytes(b"\x00" * 31)


def test_keys_from_the_library_interoperate() -> None:
    raw = X25519PrivateKey.generate()
    keys = NodeKeys(raw)
    blob = seal("id", 1, b"x", ALICE, keys.public, "n")
    assert open_envelope(blob, keys, "n", ALICE.public, 0).plaintext == b"x"
