"""Password-protected backups of a node: its identity and every credential it holds.

Theory of operation
-------------------
A backup is what lets a node's secrets outlive its machine. It holds the node identity (runtime
id, node name, the node's X25519 private key) and its credentials (id -> version -> plaintext),
encrypted under a key derived from a password, and nothing machine-bound: restoring it on
another machine re-protects every secret with *that* machine's protector.

Key derivation is Argon2id (RFC 9106), then HKDF-SHA256 splits the result into an AES-256-GCM
key and a 16-byte password check::

    master = Argon2id(password (UTF-8, NFC), salt (16 random bytes), memory, iterations, lanes)
    key    = HKDF(master, info="shir/backup/v1/encrypt")
    check  = HKDF(master, info="shir/backup/v1/check")[:16]

The check tells a wrong password (:class:`WrongPassword`) from a damaged file
(:class:`BadBackupFile`); it gives an attacker nothing the ciphertext does not (each guess still
costs one Argon2id run). File layout (integers big-endian); everything before the ciphertext is
authenticated as associated data, so the KDF parameters and salt cannot be altered unnoticed::

    b"SHIRBAK\\0" | format (1 byte, = 1) | kdf (1 byte, 1 = Argon2id) | memory KiB (u32)
    | iterations (u32) | lanes (u32) | salt length (1 byte) + salt | check (16) | nonce (12)
    | AES-256-GCM ciphertext + tag of a JSON document

Default parameters (:class:`KdfParams`): 64 MiB, 3 iterations, 4 lanes, RFC 9106's second
recommended option for memory-constrained settings: ~0.15 s on the development machine. A
backup is written rarely and is the one file that holds every secret in a form an attacker can
test passwords against offline, so it gets the costly end; raise them on bigger machines, lower
them only in tests. Reading refuses parameters above :data:`MAX_MEMORY_KIB` /
:data:`MAX_ITERATIONS` / :data:`MAX_LANES`, so an altered header cannot make a restore allocate
unbounded memory before the password is checked.

Restoring is all-or-nothing as far as a file system allows: everything is read, decrypted and
checked against the target store first (identity, no rollback of any credential), then written,
each file atomically. A crash part-way leaves some credentials written; running the restore
again completes it, because storing a version already held is a no-op.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shir.adapters.credstore import LocalCredentialStore
from shir.adapters.envelope import NodeKeys
from shir.adapters.protect import (
    BadBackupFile,
    ByteReader,
    CredentialError,
    IdentityConflict,
    InvalidKdfParameters,
    MissingIdentity,
    MissingPassword,
    Protector,
    TamperedCiphertext,
    WrongPassword,
    check_credential_id,
    check_name,
    check_version,
    write_file_atomically,
)

__all__ = [
    "MAX_ITERATIONS",
    "MAX_LANES",
    "MAX_MEMORY_KIB",
    "Backup",
    "KdfParams",
    "NodeIdentity",
    "credentials_of",
    "load_identity",
    "read_backup",
    "restore_backup",
    "save_identity",
    "write_backup",
]

log = logging.getLogger(__name__)

MAX_MEMORY_KIB = 4 * 1024 * 1024  # 4 GiB: far above any sane setting, bounded all the same
MAX_ITERATIONS = 64
MAX_LANES = 64

_MAGIC = b"SHIRBAK\x00"
_FORMAT = 1
_KDF_ARGON2ID = 1
_SALT_SIZE = 16
_CHECK_SIZE = 16
_NONCE_SIZE = 12


def _positive_int(maximum: int) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise InvalidKdfParameters(
                f"Argon2id {attribute.name} must be a whole number from 1 to {maximum}, "
                f"not {value!r}"
            )

    return check


@attrs.frozen
class KdfParams:
    """Argon2id cost parameters for a backup's password.

    ``memory_kib`` is the memory per derivation in KiB (at least 8 per lane), ``iterations``
    the passes over it, ``lanes`` the parallelism. Defaults: 64 MiB, 3, 4 (RFC 9106, second
    recommended option). Tests use the minimum (8 KiB, 1, 1) to stay fast.
    """

    memory_kib: int = attrs.field(default=64 * 1024, validator=_positive_int(MAX_MEMORY_KIB))
    iterations: int = attrs.field(default=3, validator=_positive_int(MAX_ITERATIONS))
    lanes: int = attrs.field(default=4, validator=_positive_int(MAX_LANES))

    def __attrs_post_init__(self) -> None:
        if self.memory_kib < 8 * self.lanes:
            raise InvalidKdfParameters(
                f"Argon2id needs at least 8 KiB of memory per lane: {self.lanes} lanes need "
                f"memory_kib >= {8 * self.lanes}, not {self.memory_kib}"
            )


@attrs.frozen
class NodeIdentity:
    """Who a node is: its runtime, its name, and its X25519 key pair (private half hidden)."""

    runtime_id: str = attrs.field(validator=lambda _i, _a, v: check_name(v, "runtime id"))
    node_name: str = attrs.field(validator=lambda _i, _a, v: check_name(v, "node name"))
    keys: NodeKeys


def _freeze_credentials(
    credentials: Mapping[str, Mapping[int, bytes]],
) -> Mapping[str, Mapping[int, bytes]]:
    frozen: dict[str, Mapping[int, bytes]] = {}
    for credential_id, versions in credentials.items():
        check_credential_id(credential_id)
        if not versions:
            raise CredentialError(
                f"credential {credential_id!r} has no versions; leave it out of the backup"
            )
        checked: dict[int, bytes] = {}
        for version, plaintext in versions.items():
            check_version(version)
            if not isinstance(plaintext, bytes | bytearray):
                raise CredentialError(
                    f"credential {credential_id!r} version {version} is a "
                    f"{type(plaintext).__name__}, not bytes; encode it first"
                )
            checked[version] = bytes(plaintext)
        frozen[credential_id] = MappingProxyType(dict(sorted(checked.items())))
    return MappingProxyType(dict(sorted(frozen.items())))


@attrs.frozen(repr=False)
class Backup:
    """The contents of a backup file: a node identity and its credentials by id and version."""

    identity: NodeIdentity
    credentials: Mapping[str, Mapping[int, bytes]] = attrs.field(
        converter=_freeze_credentials, eq=False, factory=dict
    )

    def latest(self) -> dict[str, tuple[int, bytes]]:
        """The newest version of each credential and its plaintext, by id."""
        return {cid: max(versions.items()) for cid, versions in self.credentials.items()}

    def __repr__(self) -> str:
        # ids and versions are not secret; plaintexts and the private key are
        held = {cid: sorted(versions) for cid, versions in self.credentials.items()}
        return f"Backup(identity={self.identity!r}, credentials={held!r})"


def credentials_of(store: LocalCredentialStore) -> dict[str, dict[int, bytes]]:
    """Everything ``store`` holds, shaped for :func:`write_backup` (one version per id)."""
    out: dict[str, dict[int, bytes]] = {}
    for credential_id in store.versions():
        version, plaintext = store.get(credential_id)
        out[credential_id] = {version: plaintext}
    return out


# --- the file ---------------------------------------------------------------------------------


def _password_bytes(password: str) -> bytes:
    if not isinstance(password, str) or not password:
        raise MissingPassword(
            "the backup password is empty; set SHIR_BACKUP_PASSWORD or type one when asked"
        )
    # NFC so the same password typed on another keyboard/OS derives the same key
    return unicodedata.normalize("NFC", password).encode("utf-8")


def _derive(password: bytes, salt: bytes, kdf: KdfParams) -> tuple[bytes, bytes]:
    master = Argon2id(
        salt=salt,
        length=32,
        iterations=kdf.iterations,
        lanes=kdf.lanes,
        memory_cost=kdf.memory_kib,
    ).derive(password)
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"shir/backup/v1/encrypt").derive(master)
    check = HKDF(hashes.SHA256(), _CHECK_SIZE, salt=None, info=b"shir/backup/v1/check").derive(
        master
    )
    return key, check


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def write_backup(
    path: Path,
    identity: NodeIdentity,
    credentials: Mapping[str, Mapping[int, bytes]],
    password: str,
    *,
    kdf: KdfParams | None = None,
) -> None:
    """Write ``identity`` and ``credentials`` to ``path``, encrypted under ``password``.

    The file appears complete or not at all (temp file, fsync, rename), with mode 0600.
    ``kdf`` defaults to :class:`KdfParams()` (64 MiB, 3 iterations, 4 lanes).
    """
    kdf = kdf if kdf is not None else KdfParams()
    contents = Backup(identity, credentials)  # validates ids, versions and types
    secret = _password_bytes(password)
    document = {
        "runtime_id": identity.runtime_id,
        "node_name": identity.node_name,
        "node_private_key": _b64(identity.keys.private_bytes()),
        "credentials": {
            cid: {str(v): _b64(p) for v, p in versions.items()}
            for cid, versions in contents.credentials.items()
        },
    }
    salt = os.urandom(_SALT_SIZE)
    nonce = os.urandom(_NONCE_SIZE)
    key, check = _derive(secret, salt, kdf)
    header = (
        _MAGIC
        + bytes([_FORMAT, _KDF_ARGON2ID])
        + kdf.memory_kib.to_bytes(4, "big")
        + kdf.iterations.to_bytes(4, "big")
        + kdf.lanes.to_bytes(4, "big")
        + bytes([len(salt)])
        + salt
        + check
        + nonce
    )
    payload = json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
    write_file_atomically(Path(path), header + AESGCM(key).encrypt(nonce, payload, header))
    log.info(
        "wrote backup %s: node %s of runtime %s, %d credentials",
        path,
        identity.node_name,
        identity.runtime_id,
        len(contents.credentials),
    )


def read_backup(path: Path, password: str, *, max_kdf: KdfParams | None = None) -> Backup:
    """Read and decrypt the backup at ``path``.

    The key-derivation cost named in the file's header is bounded by ``max_kdf`` (default
    :class:`KdfParams()`, what shir writes unless told otherwise) *before* any work is spent:
    the header is only authenticated after the costly derivation, so an altered one could
    otherwise make a restore spend seconds and gigabytes. Raises :class:`BadBackupFile` naming
    the parameter when the file asks for more; pass a higher ``max_kdf`` for a backup written
    with higher settings. Raises :class:`WrongPassword` when ``password`` does not open it,
    :class:`BadBackupFile` when it is missing, truncated, altered or not a backup. Writes nothing.
    """
    secret = _password_bytes(password)
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadBackupFile(f"cannot read backup file {path}: {exc.strerror}") from None
    reader = ByteReader(data, f"backup file {path}", BadBackupFile)
    reader.header(_MAGIC, _FORMAT, "is not a shir backup (bad magic): check the file name",
                  "use a newer shir to restore it")
    kdf_id = reader.u8()
    if kdf_id != _KDF_ARGON2ID:
        raise reader.fail(f"names key derivation {kdf_id}, which this shir does not know")
    memory_kib, iterations, lanes = reader.u32(), reader.u32(), reader.u32()
    try:
        kdf = KdfParams(memory_kib=memory_kib, iterations=iterations, lanes=lanes)
    except InvalidKdfParameters as exc:
        raise reader.fail(f"has unusable key-derivation parameters ({exc}); damaged") from None
    _check_cost(kdf, max_kdf if max_kdf is not None else KdfParams(), path)
    salt = reader.take(reader.u8())
    if len(salt) < 8:
        raise reader.fail(f"has a {len(salt)}-byte salt; at least 8 are needed; it is damaged")
    check = reader.take(_CHECK_SIZE)
    nonce = reader.take(_NONCE_SIZE)
    header = data[: reader.position]
    sealed = reader.rest()
    key, expected_check = _derive(secret, salt, kdf)
    if not hmac.compare_digest(check, expected_check):
        raise WrongPassword(
            f"the password does not open backup file {path} (or the file's header was altered); "
            "check SHIR_BACKUP_PASSWORD or retype it"
        )
    try:
        payload = AESGCM(key).decrypt(nonce, sealed, header)
    except InvalidTag:
        raise BadBackupFile(
            f"backup file {path} is damaged: the password is right but the encrypted contents "
            "fail authentication (truncated or altered); use another copy of the backup"
        ) from None
    return _parse_document(payload, path)


def _check_cost(kdf: KdfParams, ceiling: KdfParams, path: Path) -> None:
    # why: the header is authenticated only after the derivation it describes, so its cost
    # must be bounded first, by what this reader agreed to spend
    for name, flag in (("memory_kib", "--kdf-max-memory-kib"),
                       ("iterations", "--kdf-max-iterations"), ("lanes", "--kdf-max-lanes")):
        asked, allowed = getattr(kdf, name), getattr(ceiling, name)
        if asked > allowed:
            raise BadBackupFile(
                f"backup file {path} asks for Argon2id {name} {asked}, above the {allowed} this "
                f"restore allows (shir writes {getattr(KdfParams(), name)} by default); it may "
                f"have been altered. If you wrote it with higher --kdf-* settings, restore with "
                f"{flag} {asked}"
            )


def _parse_document(payload: bytes, path: Path) -> Backup:
    def bad(problem: str) -> BadBackupFile:
        return BadBackupFile(
            f"backup file {path} decrypts but its contents are invalid ({problem}); it was "
            "written by an incompatible tool"
        )

    try:
        document = json.loads(payload)
        runtime_id = document["runtime_id"]
        node_name = document["node_name"]
        keys = NodeKeys.from_private_bytes(
            base64.b64decode(document["node_private_key"], validate=True)
        )
        raw = document["credentials"]
        if not isinstance(raw, dict):
            raise bad("credentials is not an object")
        credentials = {
            cid: {int(v): base64.b64decode(p, validate=True) for v, p in versions.items()}
            for cid, versions in raw.items()
        }
        return Backup(NodeIdentity(runtime_id, node_name, keys), credentials)
    except BadBackupFile:
        raise
    except CredentialError as exc:
        raise bad(str(exc)) from None
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        # the exception text could quote plaintext: name only its kind
        raise bad(f"{type(exc).__name__} while reading the fields") from None


# --- node identity on disk --------------------------------------------------------------------

_IDENTITY_MAGIC = b"SHIRNODE"
_IDENTITY_FORMAT = 1
_IDENTITY_ENTROPY = b"shir/identity/v1"


def save_identity(path: Path, identity: NodeIdentity, protector: Protector) -> None:
    """Write ``identity`` to ``path``, its private key protected by ``protector``."""
    document = {
        "runtime_id": identity.runtime_id,
        "node_name": identity.node_name,
        "node_private_key": _b64(identity.keys.private_bytes()),
    }
    payload = json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
    blob = protector.protect(payload, _IDENTITY_ENTROPY)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file_atomically(path, _IDENTITY_MAGIC + bytes([_IDENTITY_FORMAT]) + blob)


def load_identity(path: Path, protector: Protector) -> NodeIdentity:
    """Read the identity saved by :func:`save_identity` at ``path``.

    Raises :class:`MissingIdentity` when there is none, :class:`TamperedCiphertext` (or another
    protector error) when it does not open.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingIdentity(
            f"no node identity at {path}: initialise the node first (shir credentials init) "
            "or restore a backup into it"
        ) from None
    reader = ByteReader(data, f"node identity file {path}", TamperedCiphertext)
    if reader.take(len(_IDENTITY_MAGIC)) != _IDENTITY_MAGIC:
        raise reader.fail("is not a shir node identity (bad magic)")
    fmt = reader.u8()
    if fmt != _IDENTITY_FORMAT:
        raise reader.fail(f"has format {fmt}; this shir reads format {_IDENTITY_FORMAT}")
    payload = protector.unprotect(reader.rest(), _IDENTITY_ENTROPY)
    try:
        document = json.loads(payload)
        keys = NodeKeys.from_private_bytes(base64.b64decode(document["node_private_key"]))
        return NodeIdentity(document["runtime_id"], document["node_name"], keys)
    except (ValueError, KeyError, TypeError, binascii.Error, CredentialError):
        raise TamperedCiphertext(
            f"node identity file {path} opens but its contents are invalid; restore the node "
            "from a backup"
        ) from None


# --- restore ----------------------------------------------------------------------------------


def restore_backup(
    backup: Backup,
    store: LocalCredentialStore,
    *,
    identity_file: Path | None = None,
) -> dict[str, int]:
    """Save the newest version of every credential in ``backup`` into ``store``.

    With ``identity_file``, the node identity is saved there too (protected by the store's
    protector); an identity already there must be the same node, else
    :class:`IdentityConflict`. Everything is checked before anything is written: a credential
    the store already holds at a newer version (:class:`RollbackRefused`) or with the same
    version but another secret (:class:`VersionConflict`) fails the whole restore. Returns the
    version restored of each credential (including those already held).
    """
    identity_to_write = False
    if identity_file is not None:
        try:
            current = load_identity(identity_file, store.protector)
        except MissingIdentity:
            identity_to_write = True
        else:
            if current != backup.identity:
                raise IdentityConflict(
                    f"{identity_file} already holds node {current.node_name!r} of runtime "
                    f"{current.runtime_id!r} (key {current.keys.fingerprint}), and the backup is "
                    f"of node {backup.identity.node_name!r} of runtime "
                    f"{backup.identity.runtime_id!r} (key {backup.identity.keys.fingerprint}); "
                    "restore into an empty data directory"
                )
    latest = backup.latest()
    to_write = {
        cid: (version, plaintext)
        for cid, (version, plaintext) in latest.items()
        if store.check_put(cid, version, plaintext)  # raises before anything is written
    }
    if identity_to_write and identity_file is not None:
        save_identity(identity_file, backup.identity, store.protector)
    for cid, (version, plaintext) in to_write.items():
        store.put(cid, version, plaintext)
    log.info(
        "restored node %s of runtime %s: %d credentials (%d written, %d already held)",
        backup.identity.node_name,
        backup.identity.runtime_id,
        len(latest),
        len(to_write),
        len(latest) - len(to_write),
    )
    return {cid: version for cid, (version, _) in latest.items()}
