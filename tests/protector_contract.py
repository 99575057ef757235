"""The behaviour every :class:`~shir.adapters.protect.Protector` must have.

Subclass :class:`ProtectorContract` once per protector and implement :meth:`make_protector`
and :meth:`make_other_protector`; the class itself is not collected because its name does not
start with ``Test``.
"""

from __future__ import annotations

import abc
from pathlib import Path

import pytest
from canary import CANARY_BYTES

from shir.adapters.protect import CredentialError, Protector

__all__ = ["ProtectorContract"]


class ProtectorContract(abc.ABC):
    """Abstract contract tests; subclasses provide protectors."""

    @abc.abstractmethod
    def make_protector(self, tmp_path: Path) -> Protector:
        """A working protector (the same one for the same ``tmp_path``)."""

    @abc.abstractmethod
    def make_other_protector(self, tmp_path: Path) -> Protector:
        """A protector with a different key from :meth:`make_protector`'s."""

    @pytest.fixture
    def protector(self, tmp_path: Path) -> Protector:
        return self.make_protector(tmp_path)

    def test_is_a_protector_with_a_name(self, protector: Protector) -> None:
        assert isinstance(protector, Protector)
        assert protector.name

    def test_round_trip(self, protector: Protector) -> None:
        blob = protector.protect(CANARY_BYTES, b"purpose")
        assert CANARY_BYTES not in blob
        assert protector.unprotect(blob, b"purpose") == CANARY_BYTES

    def test_round_trip_without_entropy(self, protector: Protector) -> None:
        assert protector.unprotect(protector.protect(CANARY_BYTES)) == CANARY_BYTES

    def test_empty_plaintext(self, protector: Protector) -> None:
        assert protector.unprotect(protector.protect(b"", b"e"), b"e") == b""

    def test_each_blob_is_fresh(self, protector: Protector) -> None:
        assert protector.protect(CANARY_BYTES) != protector.protect(CANARY_BYTES)

    def test_large_plaintext(self, protector: Protector) -> None:
        big = CANARY_BYTES * (4 * 1024 * 1024 // len(CANARY_BYTES))
        assert protector.unprotect(protector.protect(big, b"big"), b"big") == big

    def test_a_new_instance_on_the_same_machine_opens_the_blob(self, tmp_path: Path) -> None:
        blob = self.make_protector(tmp_path).protect(CANARY_BYTES, b"e")
        assert self.make_protector(tmp_path).unprotect(blob, b"e") == CANARY_BYTES

    @pytest.mark.parametrize(("used", "offered"), [(b"a", b"b"), (b"a", b""), (b"", b"a")])
    def test_entropy_mismatch_is_refused(
        self, protector: Protector, used: bytes, offered: bytes
    ) -> None:
        blob = protector.protect(CANARY_BYTES, used)
        with pytest.raises(CredentialError):
            protector.unprotect(blob, offered)

    def test_every_flipped_byte_is_refused(self, protector: Protector) -> None:
        blob = protector.protect(b"short secret", b"e")
        for i in range(len(blob)):
            tampered = bytearray(blob)
            tampered[i] ^= 0x01
            with pytest.raises(CredentialError):
                protector.unprotect(bytes(tampered), b"e")

    @pytest.mark.parametrize("keep", [0, 1, 3, 10, -1])
    def test_truncated_blob_is_refused(self, protector: Protector, keep: int) -> None:
        blob = protector.protect(CANARY_BYTES, b"e")
        with pytest.raises(CredentialError):
            protector.unprotect(blob[:keep], b"e")

    def test_appended_bytes_are_refused(self, protector: Protector) -> None:
        blob = protector.protect(CANARY_BYTES, b"e")
        with pytest.raises(CredentialError):
            protector.unprotect(blob + b"\x00", b"e")

    def test_blob_from_another_key_is_refused(self, tmp_path: Path) -> None:
        blob = self.make_other_protector(tmp_path).protect(CANARY_BYTES, b"e")
        with pytest.raises(CredentialError):
            self.make_protector(tmp_path).unprotect(blob, b"e")
