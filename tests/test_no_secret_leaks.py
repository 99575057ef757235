"""No secret leaks: the canary (used as plaintext, entropy and password) and the keys never appear
in an error message, a repr, a log record, the CLI's output, or a written file (but as ciphertext).

Every refusal of the credential adapters is exercised below with the canary in play; each error's
full formatted traceback (message, args, chained causes) is searched for the secrets in several
encodings, and so are the repr and str of every object the adapters return.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from canary import CANARY, CANARY_BYTES

from shir.adapters.backup import (
    KdfParams,
    NodeIdentity,
    read_backup,
    restore_backup,
    save_identity,
    write_backup,
)
from shir.adapters.credentials_cli import PASSWORD_ENV, DataDir, main
from shir.adapters.credstore import LocalCredentialStore
from shir.adapters.envelope import NodeKeys, open_envelope, seal
from shir.adapters.offline import decrypt_offline, encrypt_for_runtime
from shir.adapters.protect import CredentialError, PortableProtector

CHEAP = KdfParams(memory_kib=8, iterations=1, lanes=1)
SENDER = NodeKeys.generate()
RECIPIENT = NodeKeys.generate()
STRANGER = NodeKeys.generate()
SECRET_KEYS = [SENDER.private_bytes(), RECIPIENT.private_bytes(), STRANGER.private_bytes()]


def text_forms(secret: bytes) -> list[str]:
    """How a secret could show up in text: raw, as a bytes repr, hex, base64."""
    forms = [secret.hex(), base64.b64encode(secret).decode("ascii")[:16], repr(secret)[2:-1]]
    with contextlib.suppress(UnicodeDecodeError):
        forms.append(secret.decode("utf-8"))
    return forms


SECRET_TEXT = [form for secret in [CANARY_BYTES, *SECRET_KEYS] for form in text_forms(secret)]
SECRET_BYTES = [CANARY_BYTES, CANARY.encode("utf-16-le"), CANARY_BYTES.hex().encode(), *SECRET_KEYS]


def assert_no_secret(text: str, where: str) -> None:
    for form in SECRET_TEXT:
        assert form not in text, f"a secret leaked into {where}: {text!r}"


def refused(action: Callable[[], object]) -> CredentialError:
    """Run ``action``, which must fail with a CredentialError that holds no secret."""
    with pytest.raises(CredentialError) as caught:
        action()
    error = caught.value
    assert_no_secret("".join(traceback.format_exception(error)), "a formatted traceback")
    assert_no_secret(repr(error) + str(error) + repr(error.args), "an error's repr/str/args")
    assert_no_secret(repr(vars(error)), "an error's attributes")
    return error


def clean(value: object) -> object:
    """Assert ``value``'s repr and str hold no secret; return it."""
    assert_no_secret(repr(value) + str(value), f"the repr of a {type(value).__name__}")
    return value


@pytest.fixture
def written(tmp_path: Path) -> Path:
    """Where the adapters write; inputs the tests hand them live elsewhere."""
    path = tmp_path / "written"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def no_leaks_in_logs_output_or_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    # in teardown, caplog.records is the teardown phase's: look at every phase's records
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records:
        assert_no_secret(formatter.format(record) + repr(record.args), "a log record")
    out, err = capsys.readouterr()
    assert_no_secret(out, "stdout")
    assert_no_secret(err, "stderr")
    for path in (tmp_path / "written").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for form in SECRET_BYTES:
                assert form not in data, f"a secret is in the clear in {path}"


def protector(root: Path, name: str = "m", machine_id: str = "machine-a") -> PortableProtector:
    return PortableProtector(root / name / "protector.key", machine_id=machine_id, user="svc")


def test_protector_refusals(written: Path) -> None:
    good = protector(written)
    blob = clean(good.protect(CANARY_BYTES, CANARY_BYTES))  # the canary as entropy, too
    assert isinstance(blob, bytes)
    clean(good)
    refused(lambda: good.unprotect(blob, b"other entropy"))
    refused(lambda: good.unprotect(blob[:-1] + bytes([blob[-1] ^ 1]), CANARY_BYTES))
    refused(lambda: good.unprotect(blob[:10], CANARY_BYTES))
    refused(lambda: protector(written, "other").unprotect(blob, CANARY_BYTES))  # no key file
    other = protector(written, "other")
    other.protect(b"x")
    refused(lambda: other.unprotect(blob, CANARY_BYTES))  # another key
    refused(lambda: protector(written, machine_id="elsewhere").unprotect(blob, CANARY_BYTES))
    key_hex = good.key_file.read_bytes()[8:].hex()
    os.chmod(good.key_file, 0o644)
    error = refused(lambda: protector(written).unprotect(blob, CANARY_BYTES))
    assert key_hex not in str(error)
    os.chmod(good.key_file, 0o600)
    good.key_file.write_bytes(good.key_file.read_bytes()[:20])
    error = refused(lambda: protector(written).unprotect(blob, CANARY_BYTES))
    assert key_hex[:20] not in str(error)


def test_envelope_refusals() -> None:
    def sealed(version: int = 5, sender: NodeKeys = SENDER) -> bytes:
        return seal("db", version, CANARY_BYTES, sender, RECIPIENT.public, "node-b")

    clean(SENDER)
    clean(open_envelope(sealed(), RECIPIENT, "node-b", SENDER.public, 4))
    refused(lambda: open_envelope(sealed(), RECIPIENT, "node-c", SENDER.public, 0))
    refused(lambda: open_envelope(sealed(), STRANGER, "node-b", SENDER.public, 0))
    refused(lambda: open_envelope(sealed(sender=STRANGER), RECIPIENT, "node-b", SENDER.public, 0))
    forged = bytearray(sealed(sender=STRANGER))
    at = forged.index(STRANGER.public)
    forged[at : at + 32] = SENDER.public
    refused(lambda: open_envelope(bytes(forged), RECIPIENT, "node-b", SENDER.public, 0))
    tampered = bytearray(sealed())
    tampered[-3] ^= 0x40
    refused(lambda: open_envelope(bytes(tampered), RECIPIENT, "node-b", SENDER.public, 0))
    refused(lambda: open_envelope(sealed()[:-20], RECIPIENT, "node-b", SENDER.public, 0))
    refused(lambda: open_envelope(sealed(), RECIPIENT, "node-b", SENDER.public, 5))  # replay
    refused(lambda: open_envelope(sealed(), RECIPIENT, "node-b", SENDER.public, 9))  # rollback
    refused(lambda: seal("db", 1, CANARY_BYTES, SENDER, bytes(32), "node-b"))
    refused(lambda: seal("db", 1, CANARY_BYTES, SENDER, b"short", "node-b"))
    refused(lambda: seal("../db", 1, CANARY_BYTES, SENDER, RECIPIENT.public, "node-b"))
    refused(lambda: seal("db", 0, CANARY_BYTES, SENDER, RECIPIENT.public, "node-b"))
    refused(lambda: NodeKeys.from_private_bytes(SENDER.private_bytes()[:31]))


def test_offline_refusals() -> None:
    blob = encrypt_for_runtime(RECIPIENT.public, "ir-prod", "db", CANARY_BYTES)
    clean(decrypt_offline(blob, RECIPIENT, "ir-prod"))
    refused(lambda: decrypt_offline(blob, RECIPIENT, "ir-test"))
    refused(lambda: decrypt_offline(blob, STRANGER, "ir-prod"))
    refused(lambda: decrypt_offline(blob[:-1] + bytes([blob[-1] ^ 1]), RECIPIENT, "ir-prod"))
    refused(lambda: decrypt_offline(blob[:30], RECIPIENT, "ir-prod"))
    refused(lambda: encrypt_for_runtime(b"\x00" * 31, "ir-prod", "db", CANARY_BYTES))
    refused(lambda: encrypt_for_runtime(RECIPIENT.public, "ir-prod", "a b", CANARY_BYTES))


def test_store_refusals(written: Path) -> None:
    store = LocalCredentialStore(written / "store", protector(written))
    clean(store)
    store.put("db", 3, CANARY_BYTES)
    store.put("other", 1, b"x")
    clean(store.get("db"))
    clean(store.versions())
    refused(lambda: store.put("db", 2, CANARY_BYTES))
    refused(lambda: store.put("db", 3, CANARY_BYTES + b"!"))
    refused(lambda: store.put("../db", 1, CANARY_BYTES))
    refused(lambda: store.get("absent"))
    refused(lambda: LocalCredentialStore(store.directory, protector(written, "x")).get("db"))
    store.path_of("other").write_bytes(store.path_of("db").read_bytes())
    refused(lambda: store.get("other"))


def test_backup_refusals(written: Path) -> None:
    identity = clean(NodeIdentity("ir-prod", "node-1", SENDER))
    assert isinstance(identity, NodeIdentity)
    path = written / "node.bak"
    write_backup(path, identity, {"db": {1: b"old", 2: CANARY_BYTES}}, CANARY, kdf=CHEAP)
    backup = clean(read_backup(path, CANARY))
    clean(backup.latest().keys())
    refused(lambda: read_backup(path, CANARY + "?"))
    refused(lambda: read_backup(path, ""))
    refused(lambda: read_backup(written / "absent.bak", CANARY))
    data = path.read_bytes()
    for damaged in (data[:-7], data[: len(data) // 2], data[:-1] + bytes([data[-1] ^ 1])):
        broken = written / "broken.bak"
        broken.write_bytes(damaged)
        refused(lambda b=broken: read_backup(b, CANARY))  # type: ignore[misc]
    refused(lambda: write_backup(written / "x.bak", identity, {"db": {0: CANARY_BYTES}}, CANARY))
    refused(lambda: write_backup(written / "x.bak", identity, {"db": {1: CANARY}}, CANARY))  # type: ignore[dict-item]
    refused(lambda: KdfParams(memory_kib=1))

    target = LocalCredentialStore(written / "target", protector(written, "target"))
    target.put("db", 9, b"newer")
    refused(lambda: restore_backup(read_backup(path, CANARY), target))
    conflicting = LocalCredentialStore(written / "conflict", protector(written, "c"))
    conflicting.put("db", 2, b"same version, other secret")
    refused(lambda: restore_backup(read_backup(path, CANARY), conflicting))
    identity_file = written / "other-node" / "identity.node"
    other_protector = protector(written, "other-node")
    save_identity(identity_file, NodeIdentity("ir-prod", "node-2", STRANGER), other_protector)
    fresh = LocalCredentialStore(written / "other-node" / "credentials", other_protector)
    refused(lambda: restore_backup(read_backup(path, CANARY), fresh, identity_file=identity_file))


def test_cli_refusals(written: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, CANARY)
    node = str(written / "node")

    def cli(*argv: str) -> int:
        return main(["credentials", *argv])

    assert cli("init", "--data-dir", node, "--runtime-id", "ir", "--node-name", "n1") == 0
    data = DataDir(Path(node))
    data.store(data.protector()).put("db", 1, CANARY_BYTES)
    out = str(written / "node.bak")
    cheap = ["--kdf-memory-kib", "8", "--kdf-iterations", "1", "--kdf-lanes", "1"]
    assert cli("backup", "--data-dir", node, "--out", out, *cheap) == 0
    assert cli("backup", "--data-dir", node, "--out", out, *cheap) == 2  # exists
    assert cli("restore", "--data-dir", str(written / "copy"), out) == 0
    inputs = tmp_path / "inputs"  # the user's own plaintext file, not written by shir
    inputs.mkdir()
    (inputs / "secret").write_bytes(CANARY_BYTES)
    encrypt = ["encrypt", "--runtime-public-key", str(data.public_key_file), "--runtime-id", "ir"]
    assert cli(*encrypt, "--credential-id", "db", "--in", str(inputs / "secret")) == 0
    assert cli(*encrypt, "--credential-id", "../db", "--in", str(inputs / "secret")) == 2
    assert cli("encrypt", "--runtime-public-key", CANARY, "--runtime-id", "ir",
               "--credential-id", "db", "--in", str(inputs / "secret")) == 2  # fmt: skip

    monkeypatch.setenv(PASSWORD_ENV, CANARY + "-wrong")
    assert cli("restore", "--data-dir", str(written / "copy2"), out) == 2
    monkeypatch.setenv(PASSWORD_ENV, CANARY)
    damaged = written / "damaged.bak"
    damaged.write_bytes(Path(out).read_bytes()[:-3])
    assert cli("restore", "--data-dir", str(written / "copy3"), str(damaged)) == 2
    assert cli("restore", "--data-dir", node, out) == 0  # same node: fine
    assert cli("restore", "--data-dir", str(written / "copy"), str(written / "absent")) == 2
    monkeypatch.delenv(PASSWORD_ENV)
    assert cli("backup", "--data-dir", node, "--out", str(written / "n.bak")) == 2


@pytest.mark.services
def test_blob_store_refusals(
    azurite_connection_string: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The canary as account key and as SAS signature: every refusal and repr stays clean."""
    blobstore = pytest.importorskip("shir.adapters.blobstore")
    from azure.storage.blob import BlobServiceClient
    from sample_events import CounterAdded

    from shir.core.store import Snapshot, StoreError

    key = base64.b64encode(CANARY_BYTES * 4).decode("ascii")  # starts with the canary's base64
    parts = dict(p.split("=", 1) for p in azurite_connection_string.split(";") if p)
    endpoint = parts["BlobEndpoint"]
    with_key = f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};" \
        f"BlobEndpoint={endpoint};"
    with_sas = f"BlobEndpoint={endpoint};SharedAccessSignature=sv=2025-11-05&sp=rwdlac&sig={key}"
    unreachable = with_key.replace(endpoint, "http://127.0.0.1:9/devstoreaccount1")

    def blob_refused(action: Callable[[], object], error: type[Exception] = StoreError) -> None:
        with pytest.raises(error) as caught:
            action()
        exc = caught.value
        assert_no_secret("".join(traceback.format_exception(exc)), "a formatted traceback")
        assert_no_secret(repr(exc) + str(exc) + repr(exc.args), "an error's repr/str/args")
        assert_no_secret(repr(vars(exc)), "an error's attributes")

    for connection_string in (with_key, with_sas, unreachable):
        store = clean(blobstore.BlobEventStore.from_connection_string(
            connection_string, "canary-test", retry_total=0
        ))
        blob_refused(lambda s=store: s.version("rt"))
        blob_refused(lambda s=store: s.append("rt", [], 0))
        blob_refused(lambda s=store: s.load_snapshot("rt"))
        store.close()
    for malformed in (key, f"junk;AccountKey={key};x", f"AccountKey={key}", CANARY):
        blob_refused(
            lambda m=malformed: blobstore.BlobEventStore.from_connection_string(m, "events"),
            blobstore.InvalidConnectionString,
        )
    blob_refused(
        lambda: blobstore.BlobEventStore.from_connection_string(with_key, "Not_Valid"),
        blobstore.InvalidContainerName,
    )
    # The real (well-known) Azurite key on the success path: never in a repr or a log record.
    azurite_key = parts["AccountKey"]
    caplog.set_level(logging.DEBUG)
    container = f"canary-{os.urandom(6).hex()}"
    with blobstore.BlobEventStore.from_connection_string(
        azurite_connection_string, container
    ) as store:
        assert store.append("rt", [CounterAdded(1)], 0) == 1
        assert store.read("rt") == [CounterAdded(1)]
        store.save_snapshot("rt", Snapshot(1, b"state"))
        assert azurite_key not in repr(store)
    service = BlobServiceClient.from_connection_string(azurite_connection_string)
    service.delete_container(container)
    logged = "".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert azurite_key not in logged and azurite_key[:20] not in logged
