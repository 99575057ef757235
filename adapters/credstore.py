"""A node's local encrypted copy of its credentials: one protected file per credential.

Theory of operation
-------------------
Each node keeps the newest version of every credential it holds in ``directory``, one file per
credential named ``<credential id>.cred``, written atomically (temp file, fsync,
``os.replace``)::

    b"SHIRCRED" | format (1 byte, = 1) | version (u64) | protector blob

The protector blob is the plaintext protected with the node's :class:`Protector` (DPAPI on
Windows, the portable protector elsewhere), with the credential id and version as entropy: a
blob copied into another credential's file, or a header edited to claim another version, fails
to open instead of serving the wrong secret.

Versions only move forward: storing an older version than the one held raises
:class:`RollbackRefused`; storing the same version again is a no-op when the secret is the same
(so a restore or a sync can be re-run after a crash) and :class:`VersionConflict` when it is not.

A store has one writer process (the node host); within it, writes are serialised by a lock.
Someone who can write the directory can still put back an old file of the same credential: the
store cannot detect that on its own; the cluster's version sync (the core) does.
"""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path
from typing import NamedTuple

import attrs

from shir.adapters.protect import (
    ByteReader,
    CredentialNotFound,
    InvalidCredentialId,
    Protector,
    RollbackRefused,
    TamperedCiphertext,
    VersionConflict,
    check_credential_id,
    check_version,
    len_prefixed,
    write_file_atomically,
)

__all__ = ["LocalCredentialStore", "StoredCredential"]

log = logging.getLogger(__name__)

_MAGIC = b"SHIRCRED"
_FORMAT = 1
_SUFFIX = ".cred"
_ENTROPY_LABEL = b"shir/credstore/v1"


class StoredCredential(NamedTuple):
    """What :meth:`LocalCredentialStore.get` returns: ``(version, plaintext)``."""

    version: int
    plaintext: bytes

    def __repr__(self) -> str:
        # the plaintext is the secret: show only its size
        return (
            f"StoredCredential(version={self.version}, "
            f"plaintext=<{len(self.plaintext)} bytes hidden>)"
        )


def _entropy(credential_id: str, version: int) -> bytes:
    return _ENTROPY_LABEL + len_prefixed(credential_id.encode("ascii")) + version.to_bytes(8, "big")


def _is_credential_id(name: str) -> bool:
    try:
        check_credential_id(name)
    except InvalidCredentialId:
        return False
    return True


@attrs.frozen
class LocalCredentialStore:
    """The credentials of one node, each in its own file protected by ``protector``."""

    directory: Path = attrs.field(converter=Path)
    protector: Protector
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock, repr=False, eq=False)

    def path_of(self, credential_id: str) -> Path:
        """The file that holds ``credential_id`` (which is validated first)."""
        return self.directory / f"{check_credential_id(credential_id)}{_SUFFIX}"

    def versions(self) -> dict[str, int]:
        """The version held of every stored credential, by id (read from the file headers)."""
        if not self.directory.is_dir():
            return {}
        held: dict[str, int] = {}
        for path in sorted(self.directory.iterdir()):
            credential_id = path.name.removesuffix(_SUFFIX)
            if path.name == credential_id or not _is_credential_id(credential_id):
                continue  # temp files of an interrupted write (".x.tmp"), or foreign files
            held[credential_id] = self._read(credential_id, path)[0]
        return held

    def version_of(self, credential_id: str) -> int:
        """The version held of ``credential_id``, 0 when there is none."""
        path = self.path_of(credential_id)
        if not path.exists():
            return 0
        return self._read(credential_id, path)[0]

    def get(self, credential_id: str) -> StoredCredential:
        """The newest version of ``credential_id`` and its plaintext.

        Raises :class:`CredentialNotFound` when it is not stored, :class:`TamperedCiphertext`
        (or another :class:`CredentialError` from the protector) when its file does not open.
        """
        path = self.path_of(credential_id)
        if not path.exists():
            raise CredentialNotFound(
                f"credential {credential_id!r} is not stored in {self.directory}; sync it from "
                "another node, restore a backup, or set it again"
            )
        version, blob = self._read(credential_id, path)
        try:
            plaintext = self.protector.unprotect(blob, _entropy(credential_id, version))
        except TamperedCiphertext as exc:
            raise TamperedCiphertext(
                f"credential file {path} does not open: {exc}; it was altered or copied from "
                "another credential or machine; restore it from a backup or set it again"
            ) from None
        return StoredCredential(version, plaintext)

    def check_put(self, credential_id: str, version: int, plaintext: bytes) -> bool:
        """Whether :meth:`put` would write (``True``) or find it already held (``False``).

        Raises what :meth:`put` would raise, without writing anything: use it to validate a
        batch before writing any of it.
        """
        check_credential_id(credential_id)
        check_version(version)
        held = self.version_of(credential_id)
        if held == 0 or version > held:
            return True
        if version < held:
            raise RollbackRefused(
                f"credential {credential_id!r} is at version {held} in {self.directory}; "
                f"refusing to go back to version {version}"
            )
        if hmac.compare_digest(self.get(credential_id).plaintext, bytes(plaintext)):
            return False
        raise VersionConflict(
            f"credential {credential_id!r} version {version} is already stored with a different "
            "secret; two writers used the same version number: set the credential again with a "
            "new version"
        )

    def put(self, credential_id: str, version: int, plaintext: bytes) -> bool:
        """Store ``plaintext`` as version ``version`` of ``credential_id``.

        Returns ``True`` when written, ``False`` when exactly that version was already held.
        Raises :class:`RollbackRefused` for an older version than held and
        :class:`VersionConflict` for the held version with a different secret.
        """
        with self._lock:
            if not self.check_put(credential_id, version, plaintext):
                return False
            blob = self.protector.protect(bytes(plaintext), _entropy(credential_id, version))
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            data = _MAGIC + bytes([_FORMAT]) + version.to_bytes(8, "big") + blob
            write_file_atomically(self.path_of(credential_id), data)
        log.info("stored credential %s version %d", credential_id, version)
        return True

    def _read(self, credential_id: str, path: Path) -> tuple[int, bytes]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CredentialNotFound(
                f"credential {credential_id!r} is not stored in {self.directory}"
            ) from None
        reader = ByteReader(data, f"credential file {path}", TamperedCiphertext)
        reader.header(_MAGIC, _FORMAT,
                      "is not a shir credential file (bad magic); move it out of the way",
                      "upgrade shir")
        version = reader.u64()
        if version < 1:
            raise reader.fail("claims version 0; it is damaged")
        return version, reader.rest()

