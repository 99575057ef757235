"""``shir credentials ...``: set up a node's secrets, back them up, restore them, encrypt offline.

Commands (each returns an exit code: 0 done, 2 bad input, with the reason on stderr)::

    shir credentials init    --data-dir D --runtime-id R --node-name N
    shir credentials set     --data-dir D --credential-id C [--version N]
    shir credentials backup  --data-dir D --out FILE [--force] [--kdf-memory-kib ...]
    shir credentials restore --data-dir D FILE
    shir credentials encrypt --runtime-public-key FILE_OR_BASE64 --runtime-id R
                             --credential-id C [--in FILE]        (else reads stdin)

A data directory holds ``identity.node`` (the node identity, protected with the machine's
protector), ``node.pub`` (the node's public key in base64: what ``encrypt`` needs),
``credentials/`` (the :class:`LocalCredentialStore`) and, off Windows, ``protector.key``.

``set`` saves a credential on this machine: the value comes from ``SHIR_CREDENTIAL_VALUE`` or a
prompt, and is stored as the next version (or ``--version N``). A node host running on this data
directory (its ``--home``) notices it at its next heartbeat and syncs it to the runtime's other
nodes (:mod:`shir.adapters.node_credentials`).

Backup passwords come from the environment variable ``SHIR_BACKUP_PASSWORD`` or, when it is
unset and a terminal is attached, from a prompt; never from the command line, where other
users could read them in the process list.

:func:`add_commands` mounts the commands on any ``argparse`` sub-parsers (each parser sets
``handler``: call ``args.handler(args)`` for the exit code); :func:`main` runs them alone, as
``python -m shir.adapters.credentials_cli credentials ...``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shir.adapters.backup import (
    KdfParams,
    NodeIdentity,
    credentials_of,
    load_identity,
    read_backup,
    restore_backup,
    save_identity,
    write_backup,
)
from shir.adapters.credstore import LocalCredentialStore
from shir.adapters.envelope import MAX_PLAINTEXT_BYTES, PUBLIC_KEY_SIZE, NodeKeys
from shir.adapters.offline import encrypt_for_runtime
from shir.adapters.protect import (
    BadPublicKey,
    CredentialError,
    IdentityConflict,
    MissingPassword,
    Protector,
    check_credential_id,
    check_name,
    default_protector,
    write_file_atomically,
)

__all__ = ["PASSWORD_ENV", "VALUE_ENV", "DataDir", "add_commands", "main", "read_value"]

PASSWORD_ENV = "SHIR_BACKUP_PASSWORD"
VALUE_ENV = "SHIR_CREDENTIAL_VALUE"

Handler = Callable[[argparse.Namespace], int]


class DataDir:
    """Where a node keeps its identity, public key and credential store."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.identity_file = self.root / "identity.node"
        self.public_key_file = self.root / "node.pub"
        self.credentials_dir = self.root / "credentials"

    def protector(self) -> Protector:
        """This machine's protector for this data directory."""
        return default_protector(self.root)

    def store(self, protector: Protector) -> LocalCredentialStore:
        """The node's credential store."""
        return LocalCredentialStore(self.credentials_dir, protector)

    def publish_public_key(self, keys: NodeKeys) -> None:
        """Write ``node.pub``: the base64 public key offline encrypters need (not secret)."""
        text = base64.b64encode(keys.public).decode("ascii") + "\n"
        write_file_atomically(self.public_key_file, text.encode("ascii"), mode=0o644)


def _read_password(*, confirm: bool) -> str:
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env is not None:
        if not from_env:
            raise MissingPassword(f"{PASSWORD_ENV} is set but empty; set it to the password")
        return from_env
    if not sys.stdin.isatty():
        raise MissingPassword(
            f"no backup password: set {PASSWORD_ENV}, or run in a terminal to be asked"
        )
    password = getpass.getpass("Backup password: ")
    if not password:
        raise MissingPassword("the backup password is empty; type one")
    if confirm and getpass.getpass("Repeat the password: ") != password:
        raise MissingPassword("the two passwords differ; run the command again")
    return password


def read_value(what: str, command_line: str | None = None, prog: str = "shir") -> bytes:
    """A credential's value: from the command line (with a warning: other users can see it),
    else :data:`VALUE_ENV`, else a prompt when a terminal is attached."""
    if command_line is not None:
        print(f"{prog}: warning: other users can see command lines: set {VALUE_ENV} instead",
              file=sys.stderr)
        value = command_line
    elif os.environ.get(VALUE_ENV) is not None:
        value = os.environ[VALUE_ENV]
    elif sys.stdin.isatty():
        value = getpass.getpass(f"Value of {what}: ")
    else:
        raise MissingPassword(f"no value for {what}: set {VALUE_ENV}, or run in a terminal to "
                              "be asked")
    if not value:
        raise MissingPassword(f"the value of {what} is empty")
    return value.encode("utf-8")


def _cmd_set(args: argparse.Namespace) -> int:
    data = DataDir(args.data_dir)
    check_credential_id(args.credential_id)
    if not data.root.is_dir():  # a typo would save it where no node host reads it
        raise CredentialError(
            f"--data-dir {data.root} does not exist: give the node's data directory (its "
            "--home), or make one with shir credentials init"
        )
    store = data.store(data.protector())
    held = store.version_of(args.credential_id)
    version = held + 1 if args.version is None else args.version
    value = read_value(f"credential {args.credential_id}")
    if len(value) > MAX_PLAINTEXT_BYTES:  # saved, it could never be sealed for another node
        raise CredentialError(
            f"the value of credential {args.credential_id} is {len(value)} bytes; at most "
            f"{MAX_PLAINTEXT_BYTES} fit the sealed envelope that carries it to the other nodes"
        )
    store.put(args.credential_id, version, value)
    print(f"saved credential {args.credential_id!r} v{version} in {data.credentials_dir}")
    return 0


def _parse_public_key(value: str) -> bytes:
    """A raw X25519 public key from a file (base64 or 32 raw bytes) or a base64 string."""
    path = Path(value)
    source = "the argument"
    raw: bytes = value.encode("ascii", "replace")
    if len(value) < 4096 and path.is_file():
        raw = path.read_bytes()
        source = f"file {path}"
        if len(raw) == PUBLIC_KEY_SIZE:
            return raw
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != PUBLIC_KEY_SIZE:
        raise BadPublicKey(
            f"--runtime-public-key: {source} is neither a readable key file nor base64 of a "
            f"{PUBLIC_KEY_SIZE}-byte X25519 public key; pass the runtime's node.pub or its text"
        )
    return key


def _cmd_init(args: argparse.Namespace) -> int:
    data = DataDir(args.data_dir)
    check_name(args.runtime_id, "--runtime-id")
    check_name(args.node_name, "--node-name")
    if data.identity_file.exists():
        raise IdentityConflict(
            f"{data.root} is already initialised (it has {data.identity_file.name}); use "
            "another --data-dir, or restore a backup into an empty one"
        )
    protector = data.protector()
    identity = NodeIdentity(args.runtime_id, args.node_name, NodeKeys.generate())
    save_identity(data.identity_file, identity, protector)
    data.credentials_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data.publish_public_key(identity.keys)
    print(
        f"initialised node {identity.node_name!r} of runtime {identity.runtime_id!r} in "
        f"{data.root} (protector {protector.name}); public key in {data.public_key_file}"
    )
    return 0


def _cmd_backup(args: argparse.Namespace) -> int:
    data = DataDir(args.data_dir)
    out = Path(args.out)
    kdf = KdfParams(
        memory_kib=args.kdf_memory_kib, iterations=args.kdf_iterations, lanes=args.kdf_lanes
    )
    if out.is_dir():
        raise CredentialError(f"--out: {out} is a folder; give the path of the backup file")
    if out.exists() and not args.force:
        raise CredentialError(f"--out: {out} already exists; choose another name or add --force")
    if not out.parent.is_dir():
        raise CredentialError(f"--out: folder {out.parent} does not exist; create it first")
    protector = data.protector()
    identity = load_identity(data.identity_file, protector)
    credentials = credentials_of(data.store(protector))
    password = _read_password(confirm=True)
    write_backup(out, identity, credentials, password, kdf=kdf)
    print(
        f"backed up node {identity.node_name!r} of runtime {identity.runtime_id!r} with "
        f"{len(credentials)} credentials to {out}"
    )
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    data = DataDir(args.data_dir)
    password = _read_password(confirm=False)
    ceiling = KdfParams(memory_kib=args.kdf_max_memory_kib, iterations=args.kdf_max_iterations,
                        lanes=args.kdf_max_lanes)
    backup = read_backup(Path(args.file), password, max_kdf=ceiling)
    protector = data.protector()
    restored = restore_backup(backup, data.store(protector), identity_file=data.identity_file)
    data.credentials_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    data.publish_public_key(backup.identity.keys)
    print(
        f"restored node {backup.identity.node_name!r} of runtime "
        f"{backup.identity.runtime_id!r} with {len(restored)} credentials into {data.root} "
        f"(protector {protector.name})"
    )
    return 0


def _cmd_encrypt(args: argparse.Namespace) -> int:
    runtime_public = _parse_public_key(args.runtime_public_key)
    check_name(args.runtime_id, "--runtime-id")
    check_credential_id(args.credential_id)
    # stdin is taken as-is: use printf, not echo, unless the secret ends with a newline
    source = Path(args.input).read_bytes if args.input is not None else sys.stdin.buffer.read
    plaintext = source()
    if not plaintext:
        # why: an empty secret is always a mistake (an empty file, a forgotten pipe)
        raise CredentialError(
            "the secret to encrypt is empty; pass it on stdin (printf '%s' \"$SECRET\" | ...) "
            "or with --in FILE"
        )
    blob = encrypt_for_runtime(runtime_public, args.runtime_id, args.credential_id, plaintext)
    sys.stdout.write(base64.b64encode(blob).decode("ascii") + "\n")
    return 0


def _data_dir(text: str) -> Path:
    """``--data-dir``: an empty value (``"$DIR"`` with DIR unset) is not the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("--data-dir is empty: give the node's data directory")
    return Path(text)


def _guarded(name: str, command: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (CredentialError, OSError) as exc:
            # both kinds name the file or field at fault and never carry secrets
            reason = str(exc) if isinstance(exc, CredentialError) else _os_reason(exc)
            print(f"shir credentials {name}: error: {reason}", file=sys.stderr)
            return 2

    return run


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


def add_commands(subparsers: Any) -> None:
    """Add ``credentials init|backup|restore|encrypt`` to an ``add_subparsers()`` result.

    Every leaf parser sets ``handler``; ``args.handler(args)`` runs the command and returns its
    exit code (0 done, 2 bad input).
    """
    credentials = subparsers.add_parser(
        "credentials",
        help="node identity, credential backup and restore, offline encryption",
        description="Manage a node's identity and credentials.",
    )
    commands = credentials.add_subparsers(dest="credentials_command", metavar="COMMAND")
    commands.required = True

    init = commands.add_parser("init", help="create a node identity and an empty store")
    init.add_argument("--data-dir", required=True, type=_data_dir, help="the node's data directory")
    init.add_argument("--runtime-id", required=True, help="the runtime this node belongs to")
    init.add_argument("--node-name", required=True, help="this node's name in the runtime")
    init.set_defaults(handler=_guarded("init", _cmd_init))

    save = commands.add_parser(
        "set", help="save a credential on this machine (synced by a running node host)",
        description=f"The value comes from {VALUE_ENV} or a prompt, never the command line.")
    save.add_argument("--data-dir", required=True, type=_data_dir,
                      help="the node's data directory (its --home)")
    save.add_argument("--credential-id", required=True, help="the credential's id")
    save.add_argument("--version", type=int,
                      help="the version to save (default: the one held here + 1)")
    save.set_defaults(handler=_guarded("set", _cmd_set))

    backup = commands.add_parser(
        "backup",
        help="write a password-protected backup of the node",
        description=f"The password comes from {PASSWORD_ENV} or a prompt, never the command line.",
    )
    backup.add_argument("--data-dir", required=True, type=_data_dir,
                        help="the node's data directory")
    backup.add_argument("--out", required=True, type=Path, help="the backup file to write")
    backup.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    defaults = KdfParams()
    backup.add_argument(
        "--kdf-memory-kib", type=int, default=defaults.memory_kib,
        help=f"Argon2id memory in KiB (default {defaults.memory_kib})",
    )  # fmt: skip
    backup.add_argument(
        "--kdf-iterations", type=int, default=defaults.iterations,
        help=f"Argon2id passes (default {defaults.iterations})",
    )  # fmt: skip
    backup.add_argument(
        "--kdf-lanes", type=int, default=defaults.lanes,
        help=f"Argon2id parallelism (default {defaults.lanes})",
    )  # fmt: skip
    backup.set_defaults(handler=_guarded("backup", _cmd_backup))

    restore = commands.add_parser(
        "restore",
        help="restore a backup into a data directory, re-protected for this machine",
        description=f"The password comes from {PASSWORD_ENV} or a prompt, never the command line.",
    )
    restore.add_argument("--data-dir", required=True, type=_data_dir, help="the data directory")
    restore.add_argument("file", type=Path, help="the backup file")
    for name, default, what in (("memory-kib", defaults.memory_kib, "memory in KiB"),
                                ("iterations", defaults.iterations, "passes"),
                                ("lanes", defaults.lanes, "parallelism")):
        restore.add_argument(
            f"--kdf-max-{name}", type=int, default=default,
            help=f"refuse a backup asking for more Argon2id {what} than this (default {default})",
        )  # fmt: skip
    restore.set_defaults(handler=_guarded("restore", _cmd_restore))

    encrypt = commands.add_parser(
        "encrypt",
        help="encrypt a credential for a runtime, offline",
        description="Prints the encrypted credential in base64 on stdout.",
    )
    encrypt.add_argument(
        "--runtime-public-key", required=True, metavar="FILE_OR_BASE64",
        help="the runtime's node.pub file, or its base64 text",
    )  # fmt: skip
    encrypt.add_argument("--runtime-id", required=True, help="the runtime's id")
    encrypt.add_argument("--credential-id", required=True, help="the credential's id")
    encrypt.add_argument(
        "--in", dest="input", type=Path, help="read the secret from FILE (default: stdin)"
    )
    encrypt.set_defaults(handler=_guarded("encrypt", _cmd_encrypt))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``credentials ...`` commands alone; returns the exit code."""
    parser = argparse.ArgumentParser(prog="shir", description="shir credential commands")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    add_commands(subparsers)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return exc.code if isinstance(exc.code, int) else 2
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
