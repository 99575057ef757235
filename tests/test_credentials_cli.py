"""``shir credentials ...`` end to end through main(): init, backup, restore, encrypt."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from canary import CANARY, CANARY_BYTES

from shir.adapters.backup import load_identity
from shir.adapters.credentials_cli import PASSWORD_ENV, DataDir, main
from shir.adapters.offline import decrypt_offline

CHEAP_KDF = ["--kdf-memory-kib", "8", "--kdf-iterations", "1", "--kdf-lanes", "1"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["credentials", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def init(capsys: pytest.CaptureFixture[str], data_dir: Path, node: str = "node-1") -> DataDir:
    code, out, err = run(
        capsys, "init", "--data-dir", str(data_dir), "--runtime-id", "ir-prod", "--node-name", node
    )
    assert (code, err) == (0, "")
    assert f"initialised node {node!r}" in out
    return DataDir(data_dir)


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(PASSWORD_ENV, CANARY)
    return CANARY


@pytest.fixture
def node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> DataDir:
    """An initialised node holding two credentials."""
    data = init(capsys, tmp_path / "node-1")
    store = data.store(data.protector())
    store.put("sql-password", 2, CANARY_BYTES)
    store.put("api-key", 1, b"k" * 40)
    return data


@pytest.fixture
def backup_file(
    tmp_path: Path, node: DataDir, password: str, capsys: pytest.CaptureFixture[str]
) -> Path:
    out = tmp_path / "node-1.bak"
    code, stdout, err = run(
        capsys, "backup", "--data-dir", str(node.root), "--out", str(out), *CHEAP_KDF
    )
    assert (code, err) == (0, "")
    assert "with 2 credentials" in stdout
    return out


def test_init_creates_identity_store_and_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = init(capsys, tmp_path / "d")
    assert data.credentials_dir.is_dir()
    identity = load_identity(data.identity_file, data.protector())
    assert (identity.runtime_id, identity.node_name) == ("ir-prod", "node-1")
    published = base64.b64decode(data.public_key_file.read_text().strip(), validate=True)
    assert published == identity.keys.public


def test_init_twice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = init(capsys, tmp_path / "d")
    before = data.identity_file.read_bytes()
    code, _, err = run(
        capsys, "init", "--data-dir", str(data.root), "--runtime-id", "r", "--node-name", "n"
    )
    assert code == 2 and "already initialised" in err
    assert data.identity_file.read_bytes() == before


def test_init_refuses_a_bad_node_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "init", "--data-dir", str(tmp_path / "d"), "--runtime-id", "r", "--node-name", ""
    )
    assert code == 2 and "--node-name" in err
    assert not (tmp_path / "d").exists()


def test_backup_then_restore_into_another_data_dir(
    tmp_path: Path, node: DataDir, backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "node-1-rebuilt"
    code, out, err = run(capsys, "restore", "--data-dir", str(target), str(backup_file))
    assert (code, err) == (0, "")
    assert "with 2 credentials" in out
    restored = DataDir(target)
    source_store = node.store(node.protector())
    target_store = restored.store(restored.protector())
    assert target_store.versions() == {"api-key": 1, "sql-password": 2}
    assert target_store.get("sql-password") == (2, CANARY_BYTES)
    assert load_identity(restored.identity_file, restored.protector()) == load_identity(
        node.identity_file, node.protector()
    )
    assert restored.public_key_file.read_bytes() == node.public_key_file.read_bytes()
    # re-protected with the target's own machine key: same secret, different file
    assert (
        target_store.path_of("sql-password").read_bytes()
        != source_store.path_of("sql-password").read_bytes()
    )


def test_restore_twice_is_fine(
    tmp_path: Path, backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(tmp_path / "t")
    assert run(capsys, "restore", "--data-dir", target, str(backup_file))[0] == 0
    assert run(capsys, "restore", "--data-dir", target, str(backup_file))[0] == 0


def test_restore_onto_another_node_is_refused(
    tmp_path: Path, backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = init(capsys, tmp_path / "other", node="node-2")
    code, _, err = run(capsys, "restore", "--data-dir", str(other.root), str(backup_file))
    assert code == 2 and "empty data directory" in err
    assert other.store(other.protector()).versions() == {}


def test_restore_with_the_wrong_password_writes_nothing(
    tmp_path: Path, backup_file: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv(PASSWORD_ENV, "not the password")
    target = tmp_path / "t"
    code, out, err = run(capsys, "restore", "--data-dir", str(target), str(backup_file))
    assert (code, out) == (2, "")
    assert "restore: error: the password does not open backup file" in err
    assert not target.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_restore_of_a_damaged_file_writes_nothing(
    tmp_path: Path, backup_file: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    data = bytearray(backup_file.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x10
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data.clear()
    backup_file.write_bytes(bytes(data))
    target = tmp_path / "t"
    code, _, err = run(capsys, "restore", "--data-dir", str(target), str(backup_file))
    assert code == 2 and str(backup_file) in err
    assert not target.exists()


def test_restore_of_a_missing_file(
    tmp_path: Path, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "restore", "--data-dir", str(tmp_path / "t"), "absent.bak")
    assert code == 2 and "cannot read backup file absent.bak" in err


def test_backup_needs_a_password_and_never_takes_one_on_the_command_line(
    tmp_path: Path, node: DataDir, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    out = tmp_path / "b.bak"
    code, _, err = run(capsys, "backup", "--data-dir", str(node.root), "--out", str(out))
    assert code == 2 and PASSWORD_ENV in err and not out.exists()
    monkeypatch.setenv(PASSWORD_ENV, "")
    code, _, err = run(capsys, "backup", "--data-dir", str(node.root), "--out", str(out))
    assert code == 2 and "empty" in err and not out.exists()
    code, _, err = run(
        capsys, "backup", "--data-dir", str(node.root), "--out", str(out), "--password", "x"
    )
    assert code == 2 and "unrecognized arguments" in err and not out.exists()


def test_backup_refuses_to_overwrite_without_force(
    node: DataDir, backup_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = backup_file.read_bytes()
    args = ["backup", "--data-dir", str(node.root), "--out", str(backup_file), *CHEAP_KDF]
    code, _, err = run(capsys, *args)
    assert code == 2 and "--force" in err and backup_file.read_bytes() == before
    assert run(capsys, *args, "--force")[0] == 0
    assert backup_file.read_bytes() != before


def test_backup_of_an_uninitialised_dir(
    tmp_path: Path, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.bak"
    code, _, err = run(capsys, "backup", "--data-dir", str(tmp_path / "x"), "--out", str(out))
    assert code == 2 and "credentials init" in err and not out.exists()


def test_backup_refuses_bad_kdf_parameters(
    tmp_path: Path, node: DataDir, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.bak"
    args = ["backup", "--data-dir", str(node.root), "--out", str(out), "--kdf-lanes", "0"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "lanes" in err and not out.exists()


def test_backup_into_a_missing_folder(
    tmp_path: Path, node: DataDir, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "no" / "such" / "b.bak"
    code, _, err = run(
        capsys, "backup", "--data-dir", str(node.root), "--out", str(out), *CHEAP_KDF
    )
    # the folder is named, not the temporary file the atomic write would have made
    assert code == 2 and f"folder {out.parent} does not exist" in err and ".tmp" not in err


@pytest.mark.parametrize("key_as", ["file", "base64"])
def test_encrypt_for_a_runtime(
    tmp_path: Path, node: DataDir, capsys: pytest.CaptureFixture[str], key_as: str
) -> None:
    secret = tmp_path / "inputs" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(CANARY_BYTES)
    key = str(node.public_key_file)
    if key_as == "base64":
        key = node.public_key_file.read_text().strip()
    code, out, err = run(
        capsys, "encrypt", "--runtime-public-key", key, "--runtime-id", "ir-prod",
        "--credential-id", "sql-password", "--in", str(secret),
    )  # fmt: skip
    assert (code, err) == (0, "")
    blob = base64.b64decode(out.strip(), validate=True)
    keys = load_identity(node.identity_file, node.protector()).keys
    assert decrypt_offline(blob, keys, "ir-prod") == ("sql-password", CANARY_BYTES)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--runtime-public-key", "bm90IGEga2V5"], "--runtime-public-key"),
        (["--runtime-public-key", "@@@"], "--runtime-public-key"),
        (["--credential-id", "../etc/passwd"], "invalid credential id"),
        (["--runtime-id", ""], "--runtime-id"),
        (["--in", "/nonexistent/secret"], "/nonexistent/secret"),
    ],
)
def test_encrypt_bad_input(
    tmp_path: Path, node: DataDir, capsys: pytest.CaptureFixture[str],
    args: list[str], expected: str,
) -> None:  # fmt: skip
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x")
    options = {
        "--runtime-public-key": str(node.public_key_file),
        "--runtime-id": "ir-prod",
        "--credential-id": "id",
        "--in": str(secret),
    }
    options.update(dict(zip(args[::2], args[1::2], strict=True)))
    code, out, err = run(capsys, "encrypt", *[x for kv in options.items() for x in kv])
    assert (code, out) == (2, "")
    assert err.startswith("shir credentials encrypt: error:") and expected in err


def test_encrypt_reads_stdin_through_the_module_entry_point(node: DataDir) -> None:
    env = {**os.environ}
    env.pop(PASSWORD_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "shir.adapters.credentials_cli", "credentials", "encrypt",
         "--runtime-public-key", str(node.public_key_file), "--runtime-id", "ir-prod",
         "--credential-id", "from-stdin"],
        input=CANARY_BYTES, capture_output=True, check=False, env=env, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, b"")
    assert CANARY_BYTES not in done.stdout
    keys = load_identity(node.identity_file, node.protector()).keys
    blob = base64.b64decode(done.stdout.strip(), validate=True)
    assert decrypt_offline(blob, keys, "ir-prod") == ("from-stdin", CANARY_BYTES)


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["credentials"]) == 2
    assert main(["credentials", "frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["credentials", "backup", "--help"]) == 0
    assert PASSWORD_ENV in capsys.readouterr().out


def test_encrypt_of_an_empty_secret_is_refused(
    tmp_path: Path, node: DataDir, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    code, out, err = run(
        capsys, "encrypt", "--runtime-public-key", str(node.public_key_file),
        "--runtime-id", "ir-prod", "--credential-id", "c", "--in", str(empty),
    )  # fmt: skip
    assert (code, out) == (2, "")
    assert "the secret to encrypt is empty" in err


def test_restore_refuses_a_costly_header_and_names_the_flag(
    tmp_path: Path, backup_file: Path, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(backup_file.read_bytes())
    data[10:14] = (4 * 1024 * 1024).to_bytes(4, "big")  # the largest memory KdfParams allows
    backup_file.write_bytes(bytes(data))
    code, out, err = run(capsys, "restore", "--data-dir", str(tmp_path / "new"), str(backup_file))
    assert (code, out) == (2, "")
    assert "asks for Argon2id memory_kib 4194304" in err and "--kdf-max-memory-kib" in err
    assert not (tmp_path / "new" / "identity.node").exists()



@pytest.mark.parametrize(("flag", "value"), [
    ("--node-name", "   "), ("--node-name", "n" * 129), ("--node-name", "a\tb"),
    ("--node-name", ""), ("--runtime-id", " "), ("--runtime-id", "r\x7f"),
])
def test_init_refuses_a_name_the_core_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """A node set up under a name the core refuses could never register (issue 17)."""
    names = {"--runtime-id": "ir-prod", "--node-name": "node-1", flag: value}
    code, _, err = run(capsys, "init", "--data-dir", str(tmp_path / "d"),
                       *(x for item in names.items() for x in item))
    assert code == 2 and f"invalid {flag}" in err and "1-128 printable characters" in err
    assert not (tmp_path / "d").exists()


def test_set_saves_the_next_version_from_the_environment(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shir.adapters.credentials_cli import VALUE_ENV

    data_dir = str(tmp_path / "home")
    (tmp_path / "home").mkdir()  # the node's home; a folder that does not exist is refused
    monkeypatch.setenv(VALUE_ENV, CANARY)
    code, out, err = run(capsys, "set", "--data-dir", data_dir, "--credential-id", "pg")
    assert (code, err) == (0, "") and "'pg' v1" in out
    monkeypatch.setenv(VALUE_ENV, "second")
    assert run(capsys, "set", "--data-dir", data_dir, "--credential-id", "pg")[0] == 0
    store = DataDir(Path(data_dir)).store(DataDir(Path(data_dir)).protector())
    assert store.get("pg") == (2, b"second")
    code, out, err = run(capsys, "set", "--data-dir", data_dir, "--credential-id", "pg",
                         "--version", "1")
    assert code == 2 and "refusing to go back to version 1" in err
    monkeypatch.setenv(VALUE_ENV, "")
    code, out, err = run(capsys, "set", "--data-dir", data_dir, "--credential-id", "pg")
    assert code == 2 and "is empty" in err
    monkeypatch.delenv(VALUE_ENV)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code, out, err = run(capsys, "set", "--data-dir", data_dir, "--credential-id", "pg")
    assert code == 2 and f"set {VALUE_ENV}" in err
    assert store.get("pg") == (2, b"second") and CANARY not in out + err
