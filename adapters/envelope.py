"""Node-to-node credential sync envelopes: one credential version, sealed for one named node.

Theory of operation
-------------------
Every node has a long-lived X25519 key pair (:class:`NodeKeys`); the cluster knows each node's
public key by name. To send version ``v`` of credential ``c`` to node ``B``, node ``A`` seals it
the way HPKE's *auth mode* (RFC 9180) does, with a fresh ephemeral key ``E``::

    ikm  = X25519(E, B) || X25519(A, B)        # ephemeral-static, then static-static
    key  = HKDF-SHA256(ikm, info = label | E.pub | A.pub | B.pub | B's name)
    blob = header | AES-256-GCM(key, nonce, plaintext, associated data = header)

The ephemeral-static secret makes every envelope's key fresh; the static-static one
authenticates the sender: only the holder of ``A``'s private key (or of ``B``'s) can produce a
key that opens, so an envelope forged with any other key is refused. The header carries what the
recipient checks before and after decrypting, and is authenticated as associated data::

    b"SHIRENV" | format (1 byte, = 1) | credential id (u16 length + UTF-8) | version (u64)
    | recipient name (u16 length + UTF-8) | recipient public key (32) | sender public key (32)
    | ephemeral public key (32) | nonce (12) | ciphertext + 16-byte tag

Opening refuses, with typed errors: an envelope for another node name or another key of this
node (:class:`WrongRecipient`), from another sender than expected (:class:`UnknownSender`),
altered or forged bytes (:class:`TamperedCiphertext`), and a version not newer than the last one
the recipient accepted for that credential: the same version is a replay
(:class:`ReplayedEnvelope`), an older one a rollback (:class:`RollbackRefused`). The version is
checked after authentication, so only a genuine old envelope can cause those two.

Limits (as in HPKE auth mode): whoever steals ``B``'s private key can forge envelopes to ``B``
from anyone, and read past envelopes to ``B``; rotate node keys when a machine is compromised.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shir.adapters.protect import (
    BadPublicKey,
    ByteReader,
    CredentialError,
    ReplayedEnvelope,
    RollbackRefused,
    TamperedCiphertext,
    UnknownSender,
    WrongRecipient,
    check_credential_id,
    check_name,
    check_version,
    len_prefixed,
    text_field,
)

__all__ = [
    "MAX_PLAINTEXT_BYTES",
    "PUBLIC_KEY_SIZE",
    "NodeKeys",
    "OpenedEnvelope",
    "derive_key",
    "exchange",
    "fingerprint",
    "load_public_key",
    "open_envelope",
    "seal",
]

PUBLIC_KEY_SIZE = 32
# The largest credential value a sealed envelope carries within MAX_ENVELOPE_BYTES (64 KiB):
# the header (two names of at most 128 characters, three keys, a nonce) and the tag take < 1 KiB.
MAX_PLAINTEXT_BYTES = 63 * 1024
_MAGIC = b"SHIRENV"
_FORMAT = 1
_NONCE_SIZE = 12
_INFO_LABEL = b"shir/envelope/v1"


def fingerprint(public_key: bytes) -> str:
    """A short, printable name for a public key (first 8 bytes of its SHA-256, in hex)."""
    return hashlib.sha256(bytes(public_key)).hexdigest()[:16]


def load_public_key(raw: bytes, what: str = "public key") -> X25519PublicKey:
    """Parse a raw 32-byte X25519 public key; raise :class:`BadPublicKey` otherwise."""
    if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) != PUBLIC_KEY_SIZE:
        size = len(raw) if isinstance(raw, bytes | bytearray | memoryview) else type(raw).__name__
        raise BadPublicKey(
            f"{what} must be {PUBLIC_KEY_SIZE} raw bytes of an X25519 public key, got {size}; "
            "copy the key again from the node that published it"
        )
    return X25519PublicKey.from_public_bytes(bytes(raw))


def exchange(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    """X25519 of ``private`` and raw ``public``, refusing degenerate (low-order) public keys."""
    try:
        return private.exchange(load_public_key(public, what))
    except ValueError:  # all-zero shared secret: a low-order point, never an honest key
        raise BadPublicKey(
            f"{what} is a degenerate X25519 point that no honest node uses; the key is wrong "
            "or the bytes were altered"
        ) from None


def derive_key(ikm: bytes, label: bytes, *context: bytes | str) -> bytes:
    """HKDF-SHA256 of ``ikm`` to a 32-byte AES key, bound to ``label`` and every ``context``
    field (length-prefixed, so fields cannot run into each other)."""
    info = label + b"".join(
        len_prefixed(c.encode("utf-8") if isinstance(c, str) else c) for c in context
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def _raw_private(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@attrs.frozen(repr=False)
class NodeKeys:
    """A node's long-lived X25519 key pair.

    ``public`` is what other nodes (and offline encrypters) are told; the private half is
    reachable only through :meth:`private_bytes` (to save it protected, or into a backup) and
    is never printed. Two ``NodeKeys`` are equal when their public keys are.
    """

    private_key: X25519PrivateKey = attrs.field(eq=False)
    public: bytes = attrs.field(
        init=False,
        default=attrs.Factory(lambda self: _raw_public(self.private_key), takes_self=True),
    )

    @classmethod
    def generate(cls) -> NodeKeys:
        """A fresh random key pair."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> NodeKeys:
        """The key pair whose private key is the raw 32 bytes ``raw``."""
        if not isinstance(raw, bytes | bytearray) or len(raw) != 32:
            raise CredentialError(
                "a node private key must be 32 raw bytes; the stored identity is damaged, "
                "restore it from a backup"
            )
        return cls(X25519PrivateKey.from_private_bytes(bytes(raw)))

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key. Secret: store it only protected or encrypted."""
        return _raw_private(self.private_key)

    @property
    def fingerprint(self) -> str:
        """:func:`fingerprint` of the public key."""
        return fingerprint(self.public)

    def __repr__(self) -> str:
        return f"NodeKeys(public={self.fingerprint}, private=<hidden>)"


class OpenedEnvelope(NamedTuple):
    """What :func:`open_envelope` returns: ``(credential_id, version, plaintext)``."""

    credential_id: str
    version: int
    plaintext: bytes

    def __repr__(self) -> str:
        # the plaintext is the secret: show only its size
        return (
            f"OpenedEnvelope(credential_id={self.credential_id!r}, version={self.version}, "
            f"plaintext=<{len(self.plaintext)} bytes hidden>)"
        )



def seal(
    credential_id: str,
    version: int,
    plaintext: bytes,
    sender: NodeKeys,
    recipient_public: bytes,
    recipient_name: str,
) -> bytes:
    """Seal version ``version`` of ``credential_id`` for node ``recipient_name`` only.

    ``recipient_public`` is that node's raw X25519 public key. Only that node's private key
    opens the result, and it can check that ``sender`` sealed it.
    """
    check_credential_id(credential_id)
    check_version(version)
    check_name(recipient_name, "recipient node name")
    recipient_public = bytes(recipient_public)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw_public(ephemeral)
    ikm = exchange(ephemeral, recipient_public, "the recipient's public key") + exchange(
        sender.private_key, recipient_public, "the recipient's public key"
    )
    key = derive_key(ikm, _INFO_LABEL, ephemeral_public, sender.public, recipient_public,
                     recipient_name)
    nonce = os.urandom(_NONCE_SIZE)
    header = (
        _MAGIC
        + bytes([_FORMAT])
        + text_field(credential_id, "credential id")
        + version.to_bytes(8, "big")
        + text_field(recipient_name, "recipient node name")
        + recipient_public
        + sender.public
        + ephemeral_public
        + nonce
    )
    return header + AESGCM(key).encrypt(nonce, bytes(plaintext), header)


def open_envelope(
    blob: bytes,
    recipient: NodeKeys,
    recipient_name: str,
    sender_public: bytes,
    last_seen_version: int,
) -> OpenedEnvelope:
    """Open an envelope sealed for this node (``recipient``, ``recipient_name``).

    ``sender_public`` is the public key of the node the envelope must come from, and
    ``last_seen_version`` the newest version of that credential this node already accepted
    (0 when it has none): only a strictly newer version is returned.
    """
    if isinstance(last_seen_version, bool) or not isinstance(last_seen_version, int):
        raise CredentialError(f"last_seen_version must be an int, not {last_seen_version!r}")
    reader = ByteReader(blob, "the credential envelope", TamperedCiphertext)
    reader.header(_MAGIC, _FORMAT, "is not a shir credential envelope (bad magic)",
                  "upgrade this node, or the envelope is damaged")
    credential_id = reader.text()
    version = reader.u64()
    sealed_for = reader.text()
    recipient_public = reader.take(PUBLIC_KEY_SIZE)
    claimed_sender = reader.take(PUBLIC_KEY_SIZE)
    ephemeral_public = reader.take(PUBLIC_KEY_SIZE)
    nonce = reader.take(_NONCE_SIZE)
    header = bytes(blob[: reader.position])
    sealed = reader.rest()
    shown_id = credential_id[:128]  # unauthenticated until decrypted: keep messages short

    if sealed_for != recipient_name:
        raise WrongRecipient(
            f"the envelope for credential {shown_id!r} was sealed for node "
            f"{sealed_for[:150]!r}, not for this node {recipient_name!r}; it was delivered to "
            "the wrong node"
        )
    if recipient_public != recipient.public:
        raise WrongRecipient(
            f"the envelope for credential {shown_id!r} was sealed for key "
            f"{fingerprint(recipient_public)} of node {recipient_name!r}, but this node's key is "
            f"{recipient.fingerprint}: the sender has an outdated public key for this node; "
            "republish it and sync again"
        )
    if claimed_sender != bytes(sender_public):
        raise UnknownSender(
            f"the envelope for credential {shown_id!r} comes from key "
            f"{fingerprint(claimed_sender)}, not from the expected sender "
            f"{fingerprint(bytes(sender_public))}; it is refused (forged, or the sender's key "
            "changed: check the cluster's node keys)"
        )
    try:
        ikm = exchange(recipient.private_key, ephemeral_public, "the envelope's ephemeral key")
        ikm += exchange(recipient.private_key, claimed_sender, "the sender's public key")
        key = derive_key(ikm, _INFO_LABEL, ephemeral_public, claimed_sender, recipient.public,
                         sealed_for)
        plaintext = AESGCM(key).decrypt(nonce, sealed, header)
    except (InvalidTag, BadPublicKey):
        raise TamperedCiphertext(
            f"the envelope for credential {shown_id!r} failed authentication: it was "
            "altered in transit or forged with a key other than the sender's; it is refused, "
            "ask the sender to sync again"
        ) from None
    if version == last_seen_version:
        raise ReplayedEnvelope(
            f"the envelope carries version {version} of credential {shown_id!r}, which this "
            "node already holds: a duplicate or replayed envelope, ignored"
        )
    if version < last_seen_version:
        raise RollbackRefused(
            f"the envelope carries version {version} of credential {shown_id!r}, older than "
            f"version {last_seen_version} which this node already holds: rollback refused"
        )
    try:
        check_credential_id(credential_id)
        check_version(version)
    except CredentialError as exc:  # authentic but invalid: a sender bug, not an attack
        raise TamperedCiphertext(f"the envelope is authentic but invalid: {exc}") from None
    return OpenedEnvelope(credential_id, version, plaintext)
