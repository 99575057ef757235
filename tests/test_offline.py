"""Offline encryption: anyone with the runtime's public key encrypts; only the runtime reads."""

from __future__ import annotations

import pytest
from canary import CANARY_BYTES

from shir.adapters.envelope import NodeKeys
from shir.adapters.offline import decrypt_offline, encrypt_for_runtime
from shir.adapters.protect import (
    BadPublicKey,
    CredentialError,
    InvalidCredentialId,
    TamperedCiphertext,
    WrongRecipient,
)

RUNTIME = NodeKeys.generate()


def encrypted(plaintext: bytes = CANARY_BYTES, credential_id: str = "sql-password") -> bytes:
    return encrypt_for_runtime(RUNTIME.public, "ir-prod", credential_id, plaintext)


def test_round_trip() -> None:
    blob = encrypted()
    assert CANARY_BYTES not in blob
    assert decrypt_offline(blob, RUNTIME, "ir-prod") == ("sql-password", CANARY_BYTES)


def test_empty_and_large_plaintexts() -> None:
    big = CANARY_BYTES * 100_000
    assert decrypt_offline(encrypted(b""), RUNTIME, "ir-prod").plaintext == b""
    assert decrypt_offline(encrypted(big), RUNTIME, "ir-prod").plaintext == big


def test_each_blob_is_fresh() -> None:
    assert encrypted() != encrypted()


def test_other_runtime_id_is_wrong_recipient() -> None:
    with pytest.raises(WrongRecipient, match="'ir-prod', not for this runtime 'ir-test'"):
        decrypt_offline(encrypted(), RUNTIME, "ir-test")


def test_other_runtime_key_is_wrong_recipient() -> None:
    with pytest.raises(WrongRecipient, match="fetch the current public key"):
        decrypt_offline(encrypted(), NodeKeys.generate(), "ir-prod")


def test_relabelled_credential_id_is_tampered() -> None:
    blob = encrypted(credential_id="aaaa")
    relabelled = blob.replace(b"aaaa", b"bbbb", 1)
    assert relabelled != blob
    with pytest.raises(TamperedCiphertext):
        decrypt_offline(relabelled, RUNTIME, "ir-prod")


def test_every_flipped_byte_is_refused() -> None:
    blob = encrypted(b"short")
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(CredentialError):
            decrypt_offline(bytes(tampered), RUNTIME, "ir-prod")


def test_flipped_ciphertext_is_tampered() -> None:
    blob = bytearray(encrypted())
    blob[-1] ^= 0x01
    with pytest.raises(TamperedCiphertext, match="altered or truncated"):
        decrypt_offline(bytes(blob), RUNTIME, "ir-prod")


@pytest.mark.parametrize("keep", [0, 5, 9, 40, -1])
def test_truncated_blob_is_tampered(keep: int) -> None:
    with pytest.raises(TamperedCiphertext):
        decrypt_offline(encrypted()[:keep], RUNTIME, "ir-prod")


def test_an_envelope_is_not_an_offline_blob() -> None:
    with pytest.raises(TamperedCiphertext, match="bad magic"):
        decrypt_offline(b"SHIRENV\x01" + bytes(200), RUNTIME, "ir-prod")


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(32)])
def test_bad_runtime_public_key_is_refused(key: bytes) -> None:
    with pytest.raises(BadPublicKey):
        encrypt_for_runtime(key, "ir-prod", "id", b"x")


def test_bad_ids_are_refused() -> None:
    with pytest.raises(InvalidCredentialId):
        encrypt_for_runtime(RUNTIME.public, "ir-prod", "../x", b"x")
    with pytest.raises(CredentialError, match="runtime id"):
        encrypt_for_runtime(RUNTIME.public, "", "id", b"x")
