"""Backups, restore onto another machine, and the local credential store they restore into."""

from __future__ import annotations

import stat
import time
import unicodedata
from pathlib import Path

import pytest
from canary import CANARY, CANARY_BYTES

from shir.adapters.backup import (
    MAX_MEMORY_KIB,
    Backup,
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
from shir.adapters.envelope import NodeKeys
from shir.adapters.protect import (
    BadBackupFile,
    CredentialError,
    CredentialNotFound,
    IdentityConflict,
    InvalidCredentialId,
    InvalidKdfParameters,
    MissingIdentity,
    MissingPassword,
    PortableProtector,
    RollbackRefused,
    TamperedCiphertext,
    VersionConflict,
    WrongKey,
    WrongPassword,
)

CHEAP = KdfParams(memory_kib=8, iterations=1, lanes=1)  # Argon2id's minimum: tests stay fast
IDENTITY = NodeIdentity("ir-prod", "node-1", NodeKeys.generate())
CREDENTIALS = {"sql-password": {1: b"old", 2: CANARY_BYTES}, "api-key": {7: b"k" * 40}}


def machine(tmp_path: Path, name: str) -> PortableProtector:
    return PortableProtector(tmp_path / name / "protector.key", machine_id=name, user="svc")


def store_on(tmp_path: Path, name: str) -> LocalCredentialStore:
    return LocalCredentialStore(tmp_path / name / "credentials", machine(tmp_path, name))


@pytest.fixture
def backup_file(tmp_path: Path) -> Path:
    path = tmp_path / "node-1.bak"
    write_backup(path, IDENTITY, CREDENTIALS, CANARY, kdf=CHEAP)
    return path


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# --- the backup file ---------------------------------------------------------------------------


def test_round_trip(backup_file: Path) -> None:
    backup = read_backup(backup_file, CANARY)
    assert backup.identity == IDENTITY
    assert backup.identity.keys.private_bytes() == IDENTITY.keys.private_bytes()
    assert {cid: dict(v) for cid, v in backup.credentials.items()} == CREDENTIALS
    assert backup.latest() == {"sql-password": (2, CANARY_BYTES), "api-key": (7, b"k" * 40)}


def test_file_is_private_and_holds_no_plaintext(backup_file: Path) -> None:
    data = backup_file.read_bytes()
    assert stat.S_IMODE(backup_file.stat().st_mode) == 0o600
    assert data.startswith(b"SHIRBAK\x00\x01\x01")
    assert CANARY_BYTES not in data and b"k" * 40 not in data
    assert IDENTITY.keys.private_bytes() not in data
    assert [p.name for p in backup_file.parent.iterdir()] == ["node-1.bak"]


def test_kdf_parameters_are_recorded_in_the_header(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    write_backup(path, IDENTITY, {}, CANARY, kdf=KdfParams(memory_kib=64, iterations=2, lanes=2))
    header = path.read_bytes()[10:22]
    assert header == (64).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
    assert read_backup(path, CANARY).credentials == {}


def test_default_kdf_parameters_are_the_documented_ones() -> None:
    assert KdfParams() == KdfParams(memory_kib=65536, iterations=3, lanes=4)


@pytest.mark.parametrize(
    "kwargs",
    [{"memory_kib": 7}, {"iterations": 0}, {"lanes": 0}, {"memory_kib": 15, "lanes": 2},
     {"memory_kib": MAX_MEMORY_KIB + 1}, {"iterations": True}],
)  # fmt: skip
def test_invalid_kdf_parameters_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidKdfParameters):
        KdfParams(**kwargs)


def test_wrong_password(backup_file: Path) -> None:
    with pytest.raises(WrongPassword, match="SHIR_BACKUP_PASSWORD"):
        read_backup(backup_file, CANARY + "x")


def test_empty_password_is_refused(tmp_path: Path, backup_file: Path) -> None:
    with pytest.raises(MissingPassword):
        read_backup(backup_file, "")
    with pytest.raises(MissingPassword):
        write_backup(tmp_path / "x.bak", IDENTITY, {}, "", kdf=CHEAP)
    assert not (tmp_path / "x.bak").exists()


def test_password_is_unicode_normalised(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    write_backup(path, IDENTITY, {}, unicodedata.normalize("NFC", "pässwörd"), kdf=CHEAP)
    assert read_backup(path, unicodedata.normalize("NFD", "pässwörd")).identity == IDENTITY


def test_flipped_ciphertext_is_a_bad_file(backup_file: Path) -> None:
    data = bytearray(backup_file.read_bytes())
    data[-30] ^= 0x01
    backup_file.write_bytes(bytes(data))
    with pytest.raises(BadBackupFile, match="damaged"):
        read_backup(backup_file, CANARY)


def test_every_flipped_byte_is_refused(backup_file: Path) -> None:
    original = backup_file.read_bytes()
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        backup_file.write_bytes(bytes(data))
        with pytest.raises((BadBackupFile, WrongPassword)):
            read_backup(backup_file, CANARY)


@pytest.mark.parametrize("keep", [0, 5, 8, 9, 15, 30, 60, -16, -1])
def test_truncated_file_is_a_bad_file(backup_file: Path, keep: int) -> None:
    backup_file.write_bytes(backup_file.read_bytes()[:keep])
    with pytest.raises(BadBackupFile):
        read_backup(backup_file, CANARY)


def test_huge_kdf_memory_in_an_altered_header_is_refused_before_deriving(
    backup_file: Path,
) -> None:
    data = bytearray(backup_file.read_bytes())
    data[10:14] = b"\xff\xff\xff\xff"
    backup_file.write_bytes(bytes(data))
    with pytest.raises(BadBackupFile, match="key-derivation parameters"):
        read_backup(backup_file, CANARY)


def test_missing_or_foreign_file_is_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(BadBackupFile, match="cannot read"):
        read_backup(tmp_path / "absent.bak", CANARY)
    (tmp_path / "notes.txt").write_text("hello, not a backup at all")
    with pytest.raises(BadBackupFile, match="not a shir backup"):
        read_backup(tmp_path / "notes.txt", CANARY)


def test_unknown_format_is_refused(backup_file: Path) -> None:
    data = bytearray(backup_file.read_bytes())
    data[8] = 9
    backup_file.write_bytes(bytes(data))
    with pytest.raises(BadBackupFile, match="newer shir"):
        read_backup(backup_file, CANARY)


def test_invalid_credentials_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    for bad in ({"../x": {1: b"s"}}, {"id": {0: b"s"}}, {"id": {}}, {"id": {1: "str"}}):
        with pytest.raises(CredentialError):
            write_backup(path, IDENTITY, bad, CANARY, kdf=CHEAP)  # type: ignore[arg-type]
    assert files_under(tmp_path) == []


def test_overwriting_replaces_the_whole_file(backup_file: Path) -> None:
    write_backup(backup_file, IDENTITY, {}, CANARY, kdf=CHEAP)
    assert read_backup(backup_file, CANARY).credentials == {}


def test_repr_hides_secrets(backup_file: Path) -> None:
    backup = read_backup(backup_file, CANARY)
    text = repr(backup) + str(backup) + repr(backup.identity)
    assert CANARY not in text and "sql-password" in text and "[1, 2]" in text


# --- restore onto another machine --------------------------------------------------------------


def test_restore_reprotects_with_the_target_machine(tmp_path: Path) -> None:
    source = store_on(tmp_path, "machine-a")
    source.put("sql-password", 2, CANARY_BYTES)
    source.put("api-key", 7, b"k" * 40)
    path = tmp_path / "a.bak"
    write_backup(path, IDENTITY, credentials_of(source), CANARY, kdf=CHEAP)

    target = store_on(tmp_path, "machine-b")
    identity_file = tmp_path / "machine-b" / "identity.node"
    restored = restore_backup(read_backup(path, CANARY), target, identity_file=identity_file)

    assert restored == {"api-key": 7, "sql-password": 2}
    assert target.versions() == source.versions() == {"api-key": 7, "sql-password": 2}
    for credential_id in restored:
        assert target.get(credential_id) == source.get(credential_id)
        # same secret, different machine: the files differ and don't open on the other machine
        source_file = source.path_of(credential_id).read_bytes()
        target_file = target.path_of(credential_id).read_bytes()
        assert source_file != target_file
        assert CANARY_BYTES not in target_file
    with pytest.raises(WrongKey):
        LocalCredentialStore(target.directory, source.protector).get("sql-password")
    assert load_identity(identity_file, target.protector) == IDENTITY


def test_restore_writes_the_newest_version(tmp_path: Path, backup_file: Path) -> None:
    target = store_on(tmp_path, "machine-b")
    restore_backup(read_backup(backup_file, CANARY), target)
    assert target.get("sql-password") == (2, CANARY_BYTES)


def test_restore_again_is_a_no_op(tmp_path: Path, backup_file: Path) -> None:
    target = store_on(tmp_path, "machine-b")
    identity_file = tmp_path / "machine-b" / "identity.node"
    backup = read_backup(backup_file, CANARY)
    restore_backup(backup, target, identity_file=identity_file)
    before = {p: p.read_bytes() for p in files_under(tmp_path / "machine-b")}
    assert restore_backup(backup, target, identity_file=identity_file) == {
        "api-key": 7,
        "sql-password": 2,
    }
    assert {p: p.read_bytes() for p in files_under(tmp_path / "machine-b")} == before


def test_failed_read_restores_nothing(tmp_path: Path, backup_file: Path) -> None:
    target_dir = tmp_path / "machine-b"
    for password, path in [(CANARY + "!", backup_file), (CANARY, tmp_path / "absent.bak")]:
        with pytest.raises(CredentialError):
            restore_backup(read_backup(path, password), store_on(tmp_path, "machine-b"))
    assert files_under(target_dir) == []


def test_restore_is_all_or_nothing_on_rollback(tmp_path: Path, backup_file: Path) -> None:
    target = store_on(tmp_path, "machine-b")
    target.put("sql-password", 5, b"newer")  # the target already moved on
    identity_file = tmp_path / "machine-b" / "identity.node"
    before = {p: p.read_bytes() for p in files_under(tmp_path / "machine-b")}
    with pytest.raises(RollbackRefused, match="version 5"):
        restore_backup(read_backup(backup_file, CANARY), target, identity_file=identity_file)
    assert {p: p.read_bytes() for p in files_under(tmp_path / "machine-b")} == before
    assert target.versions() == {"sql-password": 5}  # api-key was not written either


def test_restore_refuses_another_identity(tmp_path: Path, backup_file: Path) -> None:
    target = store_on(tmp_path, "machine-b")
    identity_file = tmp_path / "machine-b" / "identity.node"
    other = NodeIdentity("ir-prod", "node-2", NodeKeys.generate())
    save_identity(identity_file, other, target.protector)
    with pytest.raises(IdentityConflict, match="empty data directory"):
        restore_backup(read_backup(backup_file, CANARY), target, identity_file=identity_file)
    assert target.versions() == {}
    assert load_identity(identity_file, target.protector) == other


def test_identity_round_trip_and_absence(tmp_path: Path) -> None:
    protector = machine(tmp_path, "m")
    path = tmp_path / "m" / "identity.node"
    with pytest.raises(MissingIdentity, match="credentials init"):
        load_identity(path, protector)
    save_identity(path, IDENTITY, protector)
    assert IDENTITY.keys.private_bytes() not in path.read_bytes()
    assert load_identity(path, protector) == IDENTITY
    with pytest.raises(WrongKey):
        load_identity(path, machine(tmp_path, "other"))


def test_identity_names_are_checked() -> None:
    with pytest.raises(CredentialError, match="node name"):
        NodeIdentity("ir", "bad\nname", NodeKeys.generate())
    with pytest.raises(CredentialError, match="runtime id"):
        NodeIdentity("", "n", NodeKeys.generate())


def test_backup_validates_what_it_is_given() -> None:
    with pytest.raises(InvalidCredentialId):
        Backup(IDENTITY, {"a b": {1: b"x"}})


# --- the local credential store ----------------------------------------------------------------


def test_store_round_trip(tmp_path: Path) -> None:
    store = store_on(tmp_path, "m")
    assert store.versions() == {}
    assert store.put("sql-password", 1, CANARY_BYTES) is True
    assert store.get("sql-password") == (1, CANARY_BYTES)
    assert store.put("sql-password", 3, b"rotated") is True
    assert store.get("sql-password") == (3, b"rotated")
    assert store.versions() == {"sql-password": 3}
    assert store.version_of("sql-password") == 3 and store.version_of("absent") == 0
    path = store.path_of("sql-password")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in store.directory.iterdir()] == ["sql-password.cred"]
    assert "hidden" in repr(store.get("sql-password"))


def test_store_refuses_an_older_version(tmp_path: Path) -> None:
    store = store_on(tmp_path, "m")
    store.put("id", 3, CANARY_BYTES)
    with pytest.raises(RollbackRefused, match="version 3"):
        store.put("id", 2, b"older")
    assert store.get("id") == (3, CANARY_BYTES)


def test_store_same_version_is_a_no_op_or_a_conflict(tmp_path: Path) -> None:
    store = store_on(tmp_path, "m")
    store.put("id", 3, CANARY_BYTES)
    before = store.path_of("id").read_bytes()
    assert store.put("id", 3, CANARY_BYTES) is False
    assert store.path_of("id").read_bytes() == before
    with pytest.raises(VersionConflict):
        store.put("id", 3, b"different")


@pytest.mark.parametrize("credential_id", ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "é"])
def test_store_refuses_unsafe_ids(tmp_path: Path, credential_id: str) -> None:
    store = store_on(tmp_path, "m")
    with pytest.raises(InvalidCredentialId):
        store.put(credential_id, 1, b"x")
    with pytest.raises(InvalidCredentialId):
        store.get(credential_id)
    assert files_under(tmp_path) == []


def test_store_missing_credential(tmp_path: Path) -> None:
    with pytest.raises(CredentialNotFound, match="not stored"):
        store_on(tmp_path, "m").get("absent")


def test_blobs_cannot_be_swapped_between_credentials(tmp_path: Path) -> None:
    store = store_on(tmp_path, "m")
    store.put("a", 1, CANARY_BYTES)
    store.put("b", 1, b"other")
    store.path_of("b").write_bytes(store.path_of("a").read_bytes())
    with pytest.raises(TamperedCiphertext, match="does not open"):
        store.get("b")


def test_edited_version_header_is_refused(tmp_path: Path) -> None:
    store = store_on(tmp_path, "m")
    store.put("a", 1, CANARY_BYTES)
    data = bytearray(store.path_of("a").read_bytes())
    data[9:17] = (9).to_bytes(8, "big")
    store.path_of("a").write_bytes(bytes(data))
    assert store.versions() == {"a": 9}  # the header says so, but it does not open
    with pytest.raises(TamperedCiphertext):
        store.get("a")


def test_versions_skip_temp_and_foreign_files(tmp_path: Path) -> None:
    store = store_on(tmp_path, "m")
    store.put("a", 2, b"x")
    (store.directory / ".a.cred.1234.tmp").write_bytes(b"half")
    (store.directory / "README").write_text("not a credential")
    assert store.versions() == {"a": 2}


def test_damaged_file_is_refused(tmp_path: Path) -> None:
    store = store_on(tmp_path, "m")
    store.put("a", 2, b"x")
    store.path_of("a").write_bytes(b"SHIRC")
    with pytest.raises(TamperedCiphertext, match="truncated"):
        store.get("a")


@pytest.mark.parametrize(
    ("offset", "field", "value"),
    [(10, "memory_kib", MAX_MEMORY_KIB), (14, "iterations", 64), (18, "lanes", 64),
     (10, "memory_kib", KdfParams().memory_kib + 1),
     (14, "iterations", KdfParams().iterations + 1)],
)
def test_a_header_asking_for_more_than_shir_writes_is_refused_at_once(
    backup_file: Path, offset: int, field: str, value: int
) -> None:
    # the whole class: any parameter above the reader's ceiling, up to the largest allowed
    data = bytearray(backup_file.read_bytes())
    data[offset : offset + 4] = value.to_bytes(4, "big")
    if field == "lanes":  # keep memory >= 8 KiB per lane so only the ceiling refuses it
        data[10:14] = (8 * value).to_bytes(4, "big")
    backup_file.write_bytes(bytes(data))
    started = time.perf_counter()
    with pytest.raises(BadBackupFile, match=f"asks for Argon2id {field} {value}.*--kdf-max-"):
        read_backup(backup_file, CANARY)
    assert time.perf_counter() - started < 0.5  # refused before any derivation


def test_a_higher_ceiling_opens_a_backup_written_with_higher_settings(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    costly = KdfParams(memory_kib=16, iterations=KdfParams().iterations + 1, lanes=1)
    write_backup(path, IDENTITY, {}, CANARY, kdf=costly)
    with pytest.raises(BadBackupFile, match="iterations"):
        read_backup(path, CANARY)
    assert read_backup(path, CANARY, max_kdf=KdfParams(iterations=4)).identity == IDENTITY
