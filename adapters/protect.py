"""Protecting secrets at rest on one machine, and the errors of every credential adapter.

Theory of operation
-------------------
A :class:`Protector` turns a secret into an opaque blob that only this machine (and, for DPAPI
user scope, this account) can turn back into the secret. It is the shape of Windows DPAPI's
``CryptProtectData``: an optional *entropy* is mixed in, and unprotecting with different entropy
fails, so a caller can bind a blob to its purpose (the credential store passes credential id and
version, so blobs cannot be swapped between credentials).

On Windows the node uses DPAPI (:mod:`shir.adapters.dpapi`). Everywhere else it uses
:class:`PortableProtector`: AES-256-GCM under a 32-byte machine key kept in a key file of mode
0600, created on first use. The machine id and user name are bound as associated data together
with the entropy, so a blob (and even the key file) copied to another machine or account does
not open there. Moving secrets between machines is what backups and sync envelopes are for.

Portable blob layout (all integers big-endian)::

    b"SHP" | version (1 byte, = 1) | key id (8 bytes) | nonce (12 bytes) | AES-GCM ciphertext+tag

The *key id* is the first 8 bytes of SHA-256 over a label and the key: it reveals nothing
useful about the key and lets a blob from another key fail with :class:`WrongKey` rather
than with a generic authentication failure.

This module also holds what every credential adapter shares: the :class:`CredentialError`
hierarchy (messages say what was wrong and what to do, and never contain plaintext, passwords
or keys), :func:`write_file_atomically` (nothing is ever partially written), and
:class:`ByteReader` for the small binary formats.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import struct
import sys
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shir.core.errors import InvalidCommand, ShirError
from shir.core.kernel import check_name as _core_check_name  # the core's own rule

__all__ = [
    "MAX_VERSION",
    "BadBackupFile",
    "BadKeyFile",
    "BadPublicKey",
    "ByteReader",
    "CredentialError",
    "CredentialNotFound",
    "IdentityConflict",
    "InsecureKeyFile",
    "InvalidCredentialId",
    "InvalidKdfParameters",
    "MissingIdentity",
    "MissingKeyFile",
    "MissingPassword",
    "PortableProtector",
    "Protector",
    "ProtectorUnavailable",
    "ReplayedEnvelope",
    "RollbackRefused",
    "TamperedCiphertext",
    "UnknownSender",
    "VersionConflict",
    "WrongKey",
    "WrongPassword",
    "WrongRecipient",
    "check_credential_id",
    "check_name",
    "check_version",
    "default_machine_id",
    "default_protector",
    "default_user",
    "len_prefixed",
    "text_field",
    "write_file_atomically",
]

log = logging.getLogger(__name__)


# --- errors -----------------------------------------------------------------------------------


class CredentialError(ShirError):
    """A credential could not be protected, stored, synchronised, backed up or restored.

    Messages name what was wrong and what to do; they never contain secret material.
    """


class TamperedCiphertext(CredentialError):
    """Encrypted bytes failed authentication or are malformed: altered, truncated or foreign."""


class WrongKey(CredentialError):
    """The blob was protected under a different key than the one offered."""


class MissingKeyFile(WrongKey):
    """The machine key file needed to open a blob does not exist."""


class BadKeyFile(CredentialError):
    """The machine key file exists but is not a shir key file (wrong size, kind or header)."""


class InsecureKeyFile(CredentialError):
    """The machine key file can be read by other users; it is refused until fixed."""


class ProtectorUnavailable(CredentialError):
    """The protector cannot work on this platform (DPAPI off Windows)."""


class WrongPassword(CredentialError):
    """The password does not open the backup."""


class MissingPassword(CredentialError):
    """No usable password was given (empty, or no terminal to ask on)."""


class InvalidKdfParameters(CredentialError):
    """Key-derivation parameters outside the supported range."""


class BadBackupFile(CredentialError):
    """A backup file is truncated, altered, of an unknown format, or not a backup at all."""


class WrongRecipient(CredentialError):
    """The envelope or offline blob was sealed for another node, runtime or key."""


class UnknownSender(CredentialError):
    """The envelope claims a sender other than the one the recipient expects."""


class RollbackRefused(CredentialError):
    """A credential version older than the one already held was refused."""


class ReplayedEnvelope(RollbackRefused):
    """An envelope for the version already held arrived again (a replay or duplicate)."""


class VersionConflict(CredentialError):
    """The same credential version arrived with a different secret: two writers disagree."""


class InvalidCredentialId(CredentialError, ValueError):
    """A credential id that cannot name a file or a field safely."""


class CredentialNotFound(CredentialError, KeyError):
    """No credential with that id is stored."""

    def __str__(self) -> str:
        # KeyError's str() quotes its argument; keep the plain message
        return str(self.args[0]) if self.args else ""


class BadPublicKey(CredentialError, ValueError):
    """Bytes that are not an X25519 public key (32 bytes)."""


class MissingIdentity(CredentialError):
    """A data directory holds no node identity yet."""


class IdentityConflict(CredentialError):
    """A data directory already holds a different node identity."""


# --- shared helpers ---------------------------------------------------------------------------


def write_file_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same folder (so the rename cannot cross file
    systems), which is fsynced, renamed over ``path`` with :func:`os.replace`, and the folder
    is fsynced so the rename itself survives a crash. The file is created with ``mode``
    (0600 by default: everything written here is someone's secret, if only as ciphertext).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_BINARY, mode)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Flush a folder's entries (a rename, a link) to disk; a no-op where that is impossible."""
    if os.name != "posix":
        return  # Windows cannot open a directory for fsync; NTFS journals the rename
    fd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def len_prefixed(data: bytes) -> bytes:
    """``data`` preceded by its 4-byte big-endian length: fields that cannot run into each other."""
    return struct.pack(">I", len(data)) + data


class ByteReader:
    """Reads the fields of a small binary format, refusing short or malformed input.

    Every failure raises ``error`` with a message naming ``what`` is being read, so callers get
    their own typed error (:class:`TamperedCiphertext`, :class:`BadBackupFile`) for free.
    """

    def __init__(self, data: bytes, what: str, error: type[CredentialError]) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        self._what = what
        self._error = error

    @property
    def position(self) -> int:
        """How many bytes have been consumed."""
        return self._pos

    def fail(self, problem: str) -> CredentialError:
        """An error of the reader's type saying ``problem`` about the input."""
        return self._error(f"{self._what} {problem}")

    def header(self, magic: bytes, fmt: int, foreign: str, upgrade: str) -> None:
        """Check the magic and format byte a shir binary format starts with.

        ``foreign`` says what the input is when the magic is wrong; ``upgrade`` what to do
        when it has another format.
        """
        if self.take(len(magic)) != magic:
            raise self.fail(foreign)
        found = self.u8()
        if found != fmt:
            raise self.fail(f"has format {found}; this shir reads format {fmt}: {upgrade}")

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        if n < 0 or self._pos + n > len(self._data):
            raise self.fail(
                "is truncated: it ends before all its fields were read; it was cut short or "
                "is not what it claims to be"
            )
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def u8(self) -> int:
        """An unsigned byte."""
        return self.take(1)[0]

    def u16(self) -> int:
        """A big-endian unsigned 16-bit integer."""
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        """A big-endian unsigned 32-bit integer."""
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        """A big-endian unsigned 64-bit integer."""
        return int(struct.unpack(">Q", self.take(8))[0])

    def text(self) -> str:
        """A UTF-8 string preceded by its 2-byte length."""
        raw = self.take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("holds a text field that is not UTF-8") from None

    def rest(self) -> bytes:
        """Everything not read yet."""
        return self.take(len(self._data) - self._pos)


def text_field(value: str, what: str) -> bytes:
    """``value`` as UTF-8 after its 2-byte length: the writer side of :meth:`ByteReader.text`."""
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"{what} is {len(raw)} bytes of UTF-8; the limit is 65535")
    return struct.pack(">H", len(raw)) + raw


_CREDENTIAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_VERSION = 2**63 - 1


def check_credential_id(credential_id: str) -> str:
    """Return ``credential_id`` if valid; raise :class:`InvalidCredentialId` otherwise.

    Ids are 1-128 letters, digits, ``.``, ``_`` or ``-`` starting with a letter or digit, so
    they can name a file on every platform without escaping (no ``..``, no separators).
    """
    if not isinstance(credential_id, str) or not _CREDENTIAL_ID.fullmatch(credential_id):
        shown = credential_id[:40] if isinstance(credential_id, str) else type(credential_id)
        raise InvalidCredentialId(
            f"invalid credential id {shown!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return credential_id


def check_version(version: int, what: str = "credential version") -> int:
    """Return ``version`` if it is an int from 1 to 2**63-1; raise :class:`CredentialError`."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise CredentialError(
            f"invalid {what} {version!r}: versions are whole numbers from 1 to {MAX_VERSION}"
        )
    return version


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a usable runtime id or node name; raise :class:`CredentialError`.

    Names are printable (they appear in file headers and messages) and names the core accepts:
    1-128 characters, not only whitespace; a node set up under another name could never register.
    """
    try:
        if not isinstance(value, str) or not value.isprintable():
            raise InvalidCommand(what)
        _core_check_name(what, value)
    except InvalidCommand:
        shown = value[:40] if isinstance(value, str) else type(value)
        raise CredentialError(
            f"invalid {what} {shown!r}: use 1-128 printable characters, not only spaces"
        ) from None
    return value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# --- the protector port -----------------------------------------------------------------------


@runtime_checkable
class Protector(Protocol):
    """Protects secrets so only this machine (or account) can read them back.

    ``unprotect(protect(p, e), e) == p``; any other entropy, an altered blob or a blob from
    another key raises a :class:`CredentialError`.
    """

    @property
    def name(self) -> str:
        """A short name for logs and messages (``"portable-aesgcm"``, ``"dpapi-user"``)."""
        ...

    def protect(self, plaintext: bytes, entropy: bytes = b"") -> bytes:
        """Encrypt ``plaintext``, bound to ``entropy``; return an opaque blob."""
        ...

    def unprotect(self, blob: bytes, entropy: bytes = b"") -> bytes:
        """Return the plaintext of ``blob`` if it was protected here with the same ``entropy``."""
        ...


def default_machine_id() -> str:
    """``/etc/machine-id`` when it exists and is not empty, else the host name."""
    try:
        machine_id = Path("/etc/machine-id").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        machine_id = ""
    return machine_id or socket.gethostname()


def default_user() -> str:
    """The login name of the current user (``uid-N`` when the system has no name for it)."""
    try:
        return getpass.getuser()
    except Exception:  # no LOGNAME/USER and no passwd entry (containers): fall back to the uid
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown-user"


_BLOB_MAGIC = b"SHP"
_BLOB_VERSION = 1
_KEY_FILE_MAGIC = b"SHIRKEY\x01"
_KEY_SIZE = 32
_KEY_ID_SIZE = 8
_NONCE_SIZE = 12
_HEADER_SIZE = len(_BLOB_MAGIC) + 1 + _KEY_ID_SIZE + _NONCE_SIZE
_AAD_LABEL = b"shir/protect/v1"


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"shir/protect/key-id\x00" + key).digest()[:_KEY_ID_SIZE]


def _machine_id_or_default(value: str | None) -> str:
    return default_machine_id() if value is None else str(value)


def _user_or_default(value: str | None) -> str:
    return default_user() if value is None else str(value)


@attrs.frozen
class _Key:
    """The loaded machine key; never printed."""

    secret: bytes = attrs.field(repr=False)
    key_id: bytes


@attrs.frozen
class PortableProtector:
    """AES-256-GCM under a per-machine key file: the protector everywhere DPAPI is not.

    The key file (``key_file``) is created on first :meth:`protect`, with mode 0600, atomically
    and exclusively: it is written in full to a temporary file and hard-linked into place, so a
    reader never sees half a key, and when two processes race, the loser's link fails and both
    use the winner's key. A key file that other users could read is refused (the message gives
    the ``chmod`` that fixes it), as are symlinks and files of the wrong size.

    ``machine_id`` (default :func:`default_machine_id`) and ``user`` (default
    :func:`default_user`) are bound into every blob as associated data with the entropy.

    Protection is only as strong as the file permissions: anyone who can read the key file as
    this user (or root) can read the secrets, which is also true of DPAPI user scope.
    """

    key_file: Path = attrs.field(converter=Path)
    machine_id: str = attrs.field(kw_only=True, default=None, converter=_machine_id_or_default)
    user: str = attrs.field(kw_only=True, default=None, converter=_user_or_default)
    _cache: dict[str, _Key] = attrs.field(init=False, factory=dict, repr=False, eq=False)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock, repr=False, eq=False)

    @property
    def name(self) -> str:
        """``"portable-aesgcm"``."""
        return "portable-aesgcm"

    def protect(self, plaintext: bytes, entropy: bytes = b"") -> bytes:
        """Encrypt ``plaintext`` under the machine key (creating it on first use)."""
        key = self._key(create=True)
        nonce = os.urandom(_NONCE_SIZE)  # random 96-bit nonces: safe far beyond 2**32 blobs/key
        header = _BLOB_MAGIC + bytes([_BLOB_VERSION]) + key.key_id + nonce
        sealed = AESGCM(key.secret).encrypt(nonce, bytes(plaintext), self._aad(header, entropy))
        return header + sealed

    def unprotect(self, blob: bytes, entropy: bytes = b"") -> bytes:
        """Decrypt a blob made by :meth:`protect` on this machine, for this user and entropy."""
        reader = ByteReader(blob, "the protected blob", TamperedCiphertext)
        if reader.take(len(_BLOB_MAGIC)) != _BLOB_MAGIC:
            raise reader.fail(
                "was not made by the portable protector (bad magic); it may come from DPAPI "
                "or be another kind of file"
            )
        version = reader.u8()
        if version != _BLOB_VERSION:
            raise reader.fail(
                f"has format version {version}; this shir reads version {_BLOB_VERSION}: "
                "upgrade shir, or the blob is damaged"
            )
        key_id = reader.take(_KEY_ID_SIZE)
        nonce = reader.take(_NONCE_SIZE)
        sealed = reader.rest()
        key = self._key(create=False)
        if key_id != key.key_id:
            raise WrongKey(
                f"the blob was protected with a different machine key than {self.key_file} "
                f"(key id {key_id.hex()}, this key is {key.key_id.hex()}): secrets do not move "
                "between machines as files; restore them from a backup or let the cluster "
                "sync them"
            )
        header = bytes(blob[:_HEADER_SIZE])
        try:
            return AESGCM(key.secret).decrypt(nonce, sealed, self._aad(header, entropy))
        except InvalidTag:
            raise TamperedCiphertext(
                "the protected blob failed authentication: it was altered, or it was protected "
                f"for another purpose (entropy), machine id or user than machine id "
                f"{self.machine_id!r} and user {self.user!r}; the secret must be set again or "
                "restored from a backup"
            ) from None

    def _aad(self, header: bytes, entropy: bytes) -> bytes:
        # length-prefixed so (machine "ab", user "c") never equals (machine "a", user "bc")
        return (
            _AAD_LABEL
            + len_prefixed(header)
            + len_prefixed(self.machine_id.encode("utf-8"))
            + len_prefixed(self.user.encode("utf-8"))
            + len_prefixed(bytes(entropy))
        )

    def _key(self, *, create: bool) -> _Key:
        with self._lock:
            cached = self._cache.get("key")
            if cached is not None:
                return cached
            try:
                key = self._load()
            except MissingKeyFile:
                if not create:
                    raise
                key = self._create()
            self._cache["key"] = key
            return key

    def _load(self) -> _Key:
        path = self.key_file
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW | _O_BINARY)
        except FileNotFoundError:
            raise MissingKeyFile(
                f"machine key file {path} does not exist, so nothing protected with it can be "
                "opened here; if this is a new machine, restore the secrets from a backup"
            ) from None
        except OSError as exc:
            if path.is_symlink():
                raise BadKeyFile(
                    f"machine key file {path} is a symbolic link; refused so the key cannot be "
                    "redirected: replace it with the real file"
                ) from None
            raise BadKeyFile(f"cannot open machine key file {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadKeyFile(f"machine key file {path} is not a regular file")
            if os.name == "posix" and st.st_mode & 0o077:
                raise InsecureKeyFile(
                    f"machine key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
                    f"other users can access it, so it is refused; run `chmod 600 {path}` (and "
                    "consider the secrets it protected exposed if others did read it)"
                )
            data = os.read(fd, len(_KEY_FILE_MAGIC) + _KEY_SIZE + 1)
        finally:
            os.close(fd)
        if len(data) != len(_KEY_FILE_MAGIC) + _KEY_SIZE or not data.startswith(_KEY_FILE_MAGIC):
            raise BadKeyFile(
                f"machine key file {path} is not a shir machine key ({len(data)} bytes, expected "
                f"{len(_KEY_FILE_MAGIC) + _KEY_SIZE} starting with the shir header); restore it "
                "from your own copy, or move it aside to start a new key (secrets protected "
                "with the old key are then lost)"
            )
        secret = data[len(_KEY_FILE_MAGIC) :]
        return _Key(secret=secret, key_id=_key_id(secret))

    def _create(self) -> _Key:
        path = self.key_file
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_BINARY, 0o600)
        try:
            try:
                _write_all(fd, _KEY_FILE_MAGIC + os.urandom(_KEY_SIZE))
                os.fsync(fd)
            finally:
                os.close(fd)
            # link() is create-exclusive like O_EXCL but publishes a complete file: the loser
            # of a race gets FileExistsError and adopts the winner's key
            try:
                os.link(tmp, path)
                log.info("created machine key file %s", path)
            except FileExistsError:
                pass
        finally:
            _unlink_quietly(tmp)
        fsync_directory(path.parent)
        return self._load()


def default_protector(data_dir: Path) -> Protector:
    """The protector a node uses for ``data_dir``: DPAPI (user scope) on Windows, else portable.

    The portable protector keeps its key in ``data_dir / "protector.key"``.
    """
    if sys.platform == "win32":
        from shir.adapters.dpapi import DpapiProtector

        return DpapiProtector(scope="user")
    return PortableProtector(Path(data_dir) / "protector.key")
