"""Protectors pass the shared contract; the portable one also guards its key file."""

from __future__ import annotations

import multiprocessing
import os
import stat
import sys
from pathlib import Path

import pytest
from canary import CANARY_BYTES
from protector_contract import ProtectorContract

from shir.adapters.dpapi import DpapiProtector
from shir.adapters.protect import (
    BadKeyFile,
    InsecureKeyFile,
    MissingKeyFile,
    PortableProtector,
    Protector,
    ProtectorUnavailable,
    TamperedCiphertext,
    WrongKey,
    default_machine_id,
    default_protector,
    default_user,
)


def portable(tmp_path: Path, name: str = "machine.key", **kwargs: str) -> PortableProtector:
    kwargs.setdefault("machine_id", "machine-a")
    kwargs.setdefault("user", "svc-shir")
    return PortableProtector(tmp_path / "keys" / name, **kwargs)


class TestPortableProtector(ProtectorContract):
    def make_protector(self, tmp_path: Path) -> Protector:
        return portable(tmp_path)

    def make_other_protector(self, tmp_path: Path) -> Protector:
        return portable(tmp_path, "other.key")


@pytest.mark.skipif(sys.platform != "win32", reason="DPAPI exists only on Windows")
class TestDpapiProtector(ProtectorContract):
    def make_protector(self, tmp_path: Path) -> Protector:
        return DpapiProtector(scope="user")

    def make_other_protector(self, tmp_path: Path) -> Protector:
        return DpapiProtector(scope="machine")


# --- the portable protector's key file ---------------------------------------------------------


def test_key_file_is_created_on_first_use_with_mode_0600(tmp_path: Path) -> None:
    protector = portable(tmp_path)
    assert not protector.key_file.exists()
    protector.protect(CANARY_BYTES)
    assert stat.S_IMODE(protector.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(protector.key_file.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in protector.key_file.parent.iterdir()) == ["machine.key"]


def test_blob_has_a_versioned_header(tmp_path: Path) -> None:
    blob = portable(tmp_path).protect(b"x")
    assert blob[:4] == b"SHP\x01"
    assert len(blob) == 4 + 8 + 12 + 1 + 16  # header, key id, nonce, ciphertext, tag


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o601])
def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    protector = portable(tmp_path)
    blob = protector.protect(CANARY_BYTES)
    protector.key_file.chmod(mode)
    fresh = portable(tmp_path)
    with pytest.raises(InsecureKeyFile) as refused:
        fresh.unprotect(blob)
    assert f"chmod 600 {protector.key_file}" in str(refused.value)
    with pytest.raises(InsecureKeyFile):
        fresh.protect(b"new")
    protector.key_file.chmod(0o600)
    assert portable(tmp_path).unprotect(blob) == CANARY_BYTES


def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    protector = portable(tmp_path)
    blob = protector.protect(CANARY_BYTES)
    protector.key_file.chmod(0o400)
    assert portable(tmp_path).unprotect(blob) == CANARY_BYTES


def test_unprotect_without_a_key_file_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    blob = portable(tmp_path, "a.key").protect(CANARY_BYTES)
    reader = portable(tmp_path, "b.key")
    with pytest.raises(MissingKeyFile):
        reader.unprotect(blob)
    assert not reader.key_file.exists()


def test_blob_from_another_key_is_wrong_key(tmp_path: Path) -> None:
    blob = portable(tmp_path, "a.key").protect(CANARY_BYTES)
    other = portable(tmp_path, "b.key")
    other.protect(b"create the key")
    with pytest.raises(WrongKey, match="different machine key"):
        other.unprotect(blob)


@pytest.mark.parametrize("field", ["machine_id", "user"])
def test_other_machine_id_or_user_is_refused_even_with_the_same_key_file(
    tmp_path: Path, field: str
) -> None:
    blob = portable(tmp_path).protect(CANARY_BYTES, b"e")
    moved = portable(tmp_path, **{field: "somewhere-else"})
    with pytest.raises(TamperedCiphertext, match="machine id"):
        moved.unprotect(blob, b"e")


def test_bound_fields_cannot_shift_between_each_other(tmp_path: Path) -> None:
    blob = portable(tmp_path, machine_id="ab", user="c").protect(CANARY_BYTES)
    with pytest.raises(TamperedCiphertext):
        portable(tmp_path, machine_id="a", user="bc").unprotect(blob)


@pytest.mark.parametrize("content", [b"", b"short", b"SHIRKEY\x01" + b"k" * 31, b"X" * 40])
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    protector = portable(tmp_path)
    protector.key_file.parent.mkdir()
    fd = os.open(protector.key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(BadKeyFile, match="not a shir machine key"):
        protector.protect(CANARY_BYTES)


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    real = portable(tmp_path, "real.key")
    real.protect(b"create")
    link = real.key_file.with_name("link.key")
    link.symlink_to(real.key_file)
    with pytest.raises(BadKeyFile, match="symbolic link"):
        portable(tmp_path, "link.key").protect(CANARY_BYTES)


def test_key_file_directory_is_not_a_regular_file(tmp_path: Path) -> None:
    protector = portable(tmp_path)
    protector.key_file.mkdir(parents=True)
    with pytest.raises(BadKeyFile):
        protector.protect(CANARY_BYTES)


def _race_for_key(key_file: str, barrier: object, results: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    blob = PortableProtector(Path(key_file), machine_id="m", user="u").protect(b"from a racer")
    results.put(blob)  # type: ignore[attr-defined]


def test_processes_racing_to_create_the_key_share_one_key(tmp_path: Path) -> None:
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    racers = 6
    for round_number in range(3):
        key_file = tmp_path / f"round{round_number}" / "machine.key"
        barrier = context.Barrier(racers)
        results = context.Queue()
        processes = [
            context.Process(target=_race_for_key, args=(str(key_file), barrier, results))
            for _ in range(racers)
        ]
        for process in processes:
            process.start()
        blobs = [results.get(timeout=30) for _ in processes]
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
        # every racer ended up with the same key: one key id, and one protector opens all
        assert len({blob[4:12] for blob in blobs}) == 1
        reader = PortableProtector(key_file, machine_id="m", user="u")
        assert all(reader.unprotect(blob) == b"from a racer" for blob in blobs)
        assert [p.name for p in key_file.parent.iterdir()] == ["machine.key"]


def test_defaults_name_this_machine_and_user(tmp_path: Path) -> None:
    protector = PortableProtector(tmp_path / "k")
    assert protector.machine_id == default_machine_id() != ""
    assert protector.user == default_user() != ""
    assert protector.name == "portable-aesgcm"


def test_default_protector_for_this_platform(tmp_path: Path) -> None:
    protector = default_protector(tmp_path)
    if sys.platform == "win32":
        assert isinstance(protector, DpapiProtector)
    else:
        assert protector == PortableProtector(tmp_path / "protector.key")


def test_dpapi_is_refused_clearly_off_windows() -> None:
    if sys.platform == "win32":
        assert DpapiProtector(scope="machine").name == "dpapi-machine"
    else:
        with pytest.raises(ProtectorUnavailable, match="only on Windows"):
            DpapiProtector()
