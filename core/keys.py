"""Auth keys: their text form, and the salted verifiers the runtime keeps instead of them.

A key's text is ``IR@<runtime id>@<key1|key2>@<generation>@<secret>``: the runtime id lets a key
of another runtime be refused *as such*, and the generation lets a regenerated key be named as
regenerated instead of merely "wrong". Only the secret part is secret. The runtime stores
``sha256(salt || secret)`` and compares digests with :func:`hmac.compare_digest`, in constant time.

The core has no randomness of its own: the driver passes the random bytes in (``seed``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

import attrs

from shir.core.errors import DomainError
from shir.core.model import KeyName, KeyVerifier

__all__ = [
    "AuthKey",
    "InvalidAuthKey",
    "RegeneratedKey",
    "WrongRuntimeKey",
    "matches",
    "parse_auth_key",
]

_SEED_BYTES = 48  # 32 bytes of secret, 16 of salt
_PREFIX = "IR"


class InvalidAuthKey(DomainError):
    """An auth key was refused; the message says why without repeating the key."""


class WrongRuntimeKey(InvalidAuthKey):
    """The key belongs to another runtime."""


class RegeneratedKey(InvalidAuthKey):
    """The key was valid once, but has since been regenerated."""


@attrs.frozen(repr=False)
class AuthKey:
    """An auth key with its secret. Lives in commands and in the caller's hands, never in events."""

    runtime_id: str
    name: KeyName
    generation: int
    secret: bytes
    salt: bytes = b""

    @classmethod
    def from_seed(cls, runtime_id: str, name: KeyName, generation: int, seed: bytes) -> AuthKey:
        """Make a key from ``seed``: at least 48 random bytes the caller drew (e.g. os.urandom)."""
        if len(seed) < _SEED_BYTES:
            raise InvalidAuthKey(f"a key seed needs at least {_SEED_BYTES} random bytes")
        if "@" in runtime_id or not runtime_id:
            raise InvalidAuthKey(f"runtime id {runtime_id!r} must be non-empty and contain no '@'")
        return cls(runtime_id, name, generation, seed[:32], seed[32:48])

    @property
    def text(self) -> str:
        """The key as a user pastes it into a node."""
        secret = base64.urlsafe_b64encode(self.secret).decode().rstrip("=")
        return f"{_PREFIX}@{self.runtime_id}@{self.name.value}@{self.generation}@{secret}"

    def verifier(self) -> KeyVerifier:
        """The salted digest the runtime keeps in place of this key."""
        return KeyVerifier(self.name, self.generation, self.salt, _digest(self.salt, self.secret))

    def __repr__(self) -> str:
        return (
            f"AuthKey(runtime_id={self.runtime_id!r}, name={self.name.value}, "
            f"generation={self.generation}, secret=<hidden>)"
        )


def _digest(salt: bytes, secret: bytes) -> bytes:
    return hashlib.sha256(salt + secret).digest()


def parse_auth_key(text: str) -> AuthKey:
    """Parse a pasted key; the salt is unknown to the holder and left empty."""
    parts = text.strip().split("@") if isinstance(text, str) else []
    if len(parts) != 5 or parts[0] != _PREFIX:
        raise InvalidAuthKey(
            "not an auth key: expected the form IR@<runtime>@<key1|key2>@<generation>@<secret>; "
            "copy the key again from the runtime"
        )
    _, runtime_id, name, generation, secret = parts
    try:
        key_name = KeyName(name)
    except ValueError:
        raise InvalidAuthKey(
            f"auth key names slot {name[:10]!r}; only key1 and key2 exist"
        ) from None
    if not (generation.isascii() and generation.isdigit()):  # int() refuses '²', isdigit() not
        raise InvalidAuthKey("auth key generation is not a number; copy the key again")
    try:
        raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    except (binascii.Error, ValueError):
        raise InvalidAuthKey("auth key secret is not valid base64; copy the key again") from None
    return AuthKey(runtime_id, key_name, int(generation), raw)


def matches(verifier: KeyVerifier, key: AuthKey) -> bool:
    """Constant-time check of a presented key against a stored verifier."""
    return hmac.compare_digest(_digest(verifier.salt, key.secret), verifier.digest)
