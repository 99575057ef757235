"""Offline credential encryption, like the product's encrypt-credential command.

Theory of operation
-------------------
A runtime publishes an X25519 public key. Anyone holding it can encrypt a credential for that
runtime without reaching it (no port 8060, no Credential Manager), hand the result to whoever
configures the linked service, and only the runtime can decrypt it. It is a sealed box: the
encrypter is anonymous, with a fresh ephemeral key per blob::

    key  = HKDF-SHA256(X25519(E, R), info = label | E.pub | R.pub | runtime id | credential id)
    blob = header | AES-256-GCM(key, nonce, plaintext, associated data = header)

    header = b"SHIROFF" | format (1 byte, = 1) | runtime id (u16 length + UTF-8)
             | credential id (u16 length + UTF-8) | runtime public key (32)
             | ephemeral public key (32) | nonce (12)

Runtime id and credential id are bound as associated data (and into the key), so a blob cannot
be replayed against another runtime or relabelled as another credential. Because the sender is
anonymous, the runtime learns only *that* someone with the public key wrote it: authorise the
path the blob travels by (the control plane), not the blob.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shir.adapters.envelope import (
    PUBLIC_KEY_SIZE,
    NodeKeys,
    derive_key,
    exchange,
    fingerprint,
    load_public_key,
)
from shir.adapters.protect import (
    BadPublicKey,
    ByteReader,
    CredentialError,
    TamperedCiphertext,
    WrongRecipient,
    check_credential_id,
    check_name,
    text_field,
)

__all__ = ["OfflineCredential", "decrypt_offline", "encrypt_for_runtime"]

_MAGIC = b"SHIROFF"
_FORMAT = 1
_NONCE_SIZE = 12
_INFO_LABEL = b"shir/offline/v1"


class OfflineCredential(NamedTuple):
    """What :func:`decrypt_offline` returns: ``(credential_id, plaintext)``."""

    credential_id: str
    plaintext: bytes

    def __repr__(self) -> str:
        # the plaintext is the secret: show only its size
        return (
            f"OfflineCredential(credential_id={self.credential_id!r}, "
            f"plaintext=<{len(self.plaintext)} bytes hidden>)"
        )



def encrypt_for_runtime(
    runtime_public: bytes, runtime_id: str, credential_id: str, plaintext: bytes
) -> bytes:
    """Encrypt ``plaintext`` so that only runtime ``runtime_id`` (holding the private half of
    ``runtime_public``, a raw 32-byte X25519 key) can read it, as ``credential_id``."""
    load_public_key(runtime_public, "the runtime public key")
    check_name(runtime_id, "runtime id")
    check_credential_id(credential_id)
    runtime_public = bytes(runtime_public)
    ephemeral = NodeKeys.generate()
    shared = exchange(ephemeral.private_key, runtime_public, "the runtime public key")
    key = derive_key(shared, _INFO_LABEL, ephemeral.public, runtime_public, runtime_id,
                     credential_id)
    nonce = os.urandom(_NONCE_SIZE)
    header = (
        _MAGIC
        + bytes([_FORMAT])
        + text_field(runtime_id, "runtime id")
        + text_field(credential_id, "credential id")
        + runtime_public
        + ephemeral.public
        + nonce
    )
    return header + AESGCM(key).encrypt(nonce, bytes(plaintext), header)


def decrypt_offline(blob: bytes, runtime_keys: NodeKeys, runtime_id: str) -> OfflineCredential:
    """Decrypt a blob made by :func:`encrypt_for_runtime` for this runtime.

    Raises :class:`WrongRecipient` for a blob meant for another runtime id or key, and
    :class:`TamperedCiphertext` for altered, truncated or foreign bytes.
    """
    reader = ByteReader(blob, "the offline-encrypted credential", TamperedCiphertext)
    reader.header(_MAGIC, _FORMAT, "is not a shir offline-encrypted credential (bad magic)",
                  "upgrade the runtime, or encrypt the credential again with its version of "
                  "the tool")
    meant_for = reader.text()
    credential_id = reader.text()
    meant_key = reader.take(PUBLIC_KEY_SIZE)
    ephemeral_public = reader.take(PUBLIC_KEY_SIZE)
    nonce = reader.take(_NONCE_SIZE)
    header = bytes(blob[: reader.position])
    sealed = reader.rest()
    shown_id = credential_id[:128]  # unauthenticated until decrypted: keep messages short
    if meant_for != runtime_id:
        raise WrongRecipient(
            f"credential {shown_id!r} was encrypted for runtime {meant_for[:150]!r}, not for "
            f"this runtime {runtime_id!r}; encrypt it again with this runtime's public key"
        )
    if meant_key != runtime_keys.public:
        raise WrongRecipient(
            f"credential {shown_id!r} was encrypted for key {fingerprint(meant_key)} of runtime "
            f"{runtime_id!r}, but its key is now {runtime_keys.fingerprint}; fetch the current "
            "public key and encrypt it again"
        )
    try:
        shared = exchange(runtime_keys.private_key, ephemeral_public, "the ephemeral key")
        key = derive_key(shared, _INFO_LABEL, ephemeral_public, meant_key, meant_for,
                         credential_id)
        plaintext = AESGCM(key).decrypt(nonce, sealed, header)
    except (InvalidTag, BadPublicKey):
        raise TamperedCiphertext(
            f"offline-encrypted credential {shown_id!r} failed authentication: it was altered "
            "or truncated after encryption; encrypt it again"
        ) from None
    try:
        check_credential_id(credential_id)
    except CredentialError as exc:  # authentic but invalid: the encrypter's bug
        raise TamperedCiphertext(f"the offline-encrypted credential is invalid: {exc}") from None
    return OfflineCredential(credential_id, plaintext)
