"""A new user's mistakes on the runtime, job, status, credentials and cert commands.

Each test is one mistake found by running the commands by hand as a new (and hostile) user: the
command must exit 2 (or do what was asked), say what was wrong and what to do, never print a
traceback, and leave no stray file or half-done state behind.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from shir.adapters.cli import main


def shir(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    assert shir(capsys, "runtime", "create", "--store", url, "--name", "rt")[0] == 0
    return url


# -- job submit -------------------------------------------------------------------------------


def test_a_job_submitted_to_a_store_that_does_not_exist_is_refused_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo.db"
    code, out, err = shir(capsys, "job", "submit", "--store", f"sqlite:///{typo}",
                          "--kind", "touch", "--param", "sink=/tmp")
    assert code == 2 and out == ""
    assert "no SQLite store at" in err and "shir runtime create" in err
    assert not typo.exists()


def test_a_job_submitted_to_a_store_without_a_runtime_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shir.adapters.stores import open_store

    open_store(f"sqlite:///{tmp_path / 'empty.db'}", create=True).close()  # type: ignore[attr-defined]
    code, out, err = shir(capsys, "job", "submit", "--store", f"sqlite:///{tmp_path / 'empty.db'}",
                          "--kind", "touch", "--param", "sink=/tmp")
    assert code == 2 and out == ""
    assert "holds no runtime" in err and "shir runtime create" in err


def test_an_empty_idempotency_key_is_refused_not_replaced(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--id "$KEY"` with KEY unset: a fresh random id would lose the idempotency asked for
    code, out, err = shir(capsys, "job", "submit", "--store", store, "--kind", "touch",
                          "--param", "sink=/tmp", "--id", "")
    assert code == 2 and out == ""
    assert "--id" in err and "empty" in err


@pytest.mark.parametrize(("params", "said"), [
    (("--kind", "bogus"), "--kind 'bogus'"),
    (("--kind", "touch"), "'sink'"),
    (("--kind", "touch", "--param", "sink=/tmp", "--param", "seconds=-5"), "'seconds'"),
    (("--kind", "touch", "--param", "sink=/tmp", "--param", "seconds=1e12"), "'seconds'"),
    (("--kind", "touch", "--param", "sink=/tmp", "--param", "seconds=1e999"), "seconds=1e999"),
    (("--kind", "copy", "--param", "x=NaN"), "x=NaN"),
])
def test_a_request_every_node_would_dead_letter_is_refused_before_it_is_queued(
    store: str, capsys: pytest.CaptureFixture[str], params: tuple[str, ...], said: str
) -> None:
    code, out, err = shir(capsys, "job", "submit", "--store", store, *params)
    assert code == 2 and out == ""
    assert said in err
    code, out, _ = shir(capsys, "status", "--store", store, "--json")
    assert code == 0 and json.loads(out)["channel_depth"] == 0  # nothing was queued


def test_submitted_ids_read_in_part_still_exit_0(store: str, tmp_path: Path) -> None:
    # `| head -1`: every request was queued; only the list of ids was cut short
    proc = subprocess.run(
        f"{sys.executable} -m shir.adapters.cli job submit --store {store} --kind touch "
        f"--param sink={tmp_path} --count 20000 --id many | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout == "many-0\n"
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


# -- status, job show -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("status",), ("job", "show", "x")])
def test_a_channel_that_does_not_exist_is_refused_and_not_created(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    typo = tmp_path / "typo-channel.db"
    code, _, err = shir(capsys, *command, "--store", store, "--channel", f"sqlite:///{typo}")
    assert code == 2
    assert "no control channel at" in err and "--channel" in err
    assert not typo.exists()


def test_the_status_of_a_torn_recording_says_which_command_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run.events"
    shir(capsys, "sim", "run", "crash-mid-job", "--until", "30", "--log", str(log))
    with open(log, "r+b") as f:
        f.truncate(os.path.getsize(log) - 5)
    code, _, err = shir(capsys, "status", "--store", str(log))
    assert code == 2
    assert "truncate -s" in err and "store.repair" not in err


def test_the_status_of_an_empty_recording_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "empty.events"
    log.write_bytes(b"")
    code, _, err = shir(capsys, "status", "--store", str(log))
    assert code == 2
    assert str(log) in err and "unrecognised" not in err


@pytest.mark.parametrize("command", ["status", "replay"])
def test_a_file_that_is_no_event_log_is_not_called_torn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # advising `truncate -s 0` on a file that was never a log would destroy it
    junk = tmp_path / "notes.events"
    junk.write_bytes(b"These are my notes, not an event log.\n" * 3)
    argv = ["status", "--store", str(junk)] if command == "status" else \
        ["sim", "replay", str(junk)]
    code, _, err = shir(capsys, *argv)
    assert code == 2
    assert "not a shir event log" in err
    assert "truncate" not in err


# -- node run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1e308", "-3", "0"])
def test_a_heartbeat_interval_out_of_range_names_the_option_and_the_range(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, _, err = shir(capsys, "node", "run", "--store", store, "--key", "IR@x@key1@1@y",
                        "--name", "n1", "--home", str(tmp_path / "h"),
                        "--heartbeat-interval", value)
    assert code == 2
    assert "--heartbeat-interval:" in err and "--heartbeat-interval-s" not in err
    assert "3600" in err


@pytest.mark.parametrize("option", ["--home", "--store", "--config"])
def test_an_empty_path_is_refused_not_taken_as_the_default(
    store: str, capsys: pytest.CaptureFixture[str], option: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHIR_HOME", str(tmp_path / "default-home"))
    args = ["node", "run", "--key", "IR@x@key1@1@y", "--name", "n1", "--store", store,
            "--home", str(tmp_path / "h"), "--config", str(tmp_path / "host.toml")]
    (tmp_path / "host.toml").write_text("")
    args[args.index(option) + 1] = ""
    code, _, err = shir(capsys, *args)
    assert code == 2
    assert f"{option} is empty" in err
    assert not (tmp_path / "default-home").exists()


# -- credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["init", "set"])
def test_an_empty_data_dir_is_refused_not_taken_as_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHIR_CREDENTIAL_VALUE", "v")
    extra = ["--runtime-id", "r", "--node-name", "n"] if command == "init" else \
        ["--credential-id", "c"]
    code, _, err = shir(capsys, "credentials", command, "--data-dir", "", *extra)
    assert code == 2
    assert "--data-dir is empty" in err
    assert list(tmp_path.iterdir()) == []


def test_a_credential_saved_into_a_folder_that_does_not_exist_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a typo in --data-dir would save it where no node host reads it, and say it was saved
    monkeypatch.setenv("SHIR_CREDENTIAL_VALUE", "v")
    code, out, err = shir(capsys, "credentials", "set", "--data-dir", str(tmp_path / "typo"),
                          "--credential-id", "c")
    assert code == 2 and out == ""
    assert "does not exist" in err and "--home" in err
    assert not (tmp_path / "typo").exists()


def test_a_backup_onto_a_folder_names_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHIR_BACKUP_PASSWORD", "pw")
    data = tmp_path / "d"
    assert shir(capsys, "credentials", "init", "--data-dir", str(data), "--runtime-id", "r",
                "--node-name", "n")[0] == 0
    (tmp_path / "out").mkdir()
    code, _, err = shir(capsys, "credentials", "backup", "--data-dir", str(data), "--out",
                        str(tmp_path / "out"), "--force", "--kdf-memory-kib", "64")
    assert code == 2
    assert f"--out: {tmp_path / 'out'} is a folder" in err and ".tmp" not in err
    assert list((tmp_path / "out").iterdir()) == []


# -- bytes that are not UTF-8 -----------------------------------------------------------------

NOT_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands such argv over


@pytest.mark.parametrize("argv", [
    ("runtime", "create", "--name", NOT_UTF8),
    ("runtime", "create", "--name", "rt", "--factory", NOT_UTF8),
    ("job", "submit", "--kind", "touch", "--param", "sink=/tmp", "--id", NOT_UTF8),
    ("job", "submit", "--kind", NOT_UTF8),
    ("job", "show", NOT_UTF8),
])
def test_text_that_is_not_utf8_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    if argv[0] == "job":
        assert shir(capsys, "runtime", "create", "--store", url, "--name", "rt")[0] == 0
    code, out, err = shir(capsys, *argv[:2], "--store", url, *argv[2:])
    assert code == 2 and out == ""
    # the CLI names the argument's bytes; the core, refusing a name first, its text
    assert "not UTF-8" in err and ("caf\\xe9" in err or "caf\\udce9" in err)
    if argv[0] == "runtime":
        assert not (tmp_path / "rt.db").exists()


def test_a_refused_runtime_create_leaves_no_store_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in (("--name", ""), ("--name", "rt", "--heartbeat-interval", "0")):
        code, _, err = shir(capsys, "runtime", "create", "--store",
                            f"sqlite:///{tmp_path / 'rt.db'}", *bad)
        assert code == 2 and "must" in err
        assert not (tmp_path / "rt.db").exists()


# -- sim sweep --------------------------------------------------------------------------------


def test_an_absurd_number_of_seeds_is_refused_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    # 10^11 seeds was taken: the sweep listed them and grew to 2.6 GB in 8 s before any run
    code, out, err = shir(capsys, "sim", "sweep", "crash-mid-job", "--seeds", "99999999999")
    assert code == 2 and out == ""
    assert "--seeds" in err and "<= 1,000,000" in err


# -- help -------------------------------------------------------------------------------------


def _leaf_helps() -> dict[str, str]:
    import argparse

    from shir.adapters.cli import GROUPS, build_parser

    helps: dict[str, str] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        helps[name] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}")

    walk(build_parser(tuple(g[0] for g in GROUPS)), "shir")
    return helps


def test_every_help_is_plain_text_without_docstring_markup() -> None:
    helps = _leaf_helps()
    assert len(helps) > 20  # every group mounted, every leaf walked
    marked = {name: text for name, text in helps.items()
              if "``" in text or ":mod:" in text or ":class:" in text}
    assert marked == {}


def test_a_torn_file_store_says_which_shell_command_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"file://{tmp_path / 'fs'}"
    assert shir(capsys, "runtime", "create", "--store", url, "--name", "rt")[0] == 0
    log = tmp_path / "fs" / "runtime.events"
    with open(log, "r+b") as f:
        f.truncate(os.path.getsize(log) - 3)
    code, _, err = shir(capsys, "status", "--store", url)
    assert code == 2
    assert f"truncate -s 0 {log}" in err  # a CLI user has no store object to call repair on


def test_a_damaged_sqlite_store_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    assert shir(capsys, "runtime", "create", "--store", url, "--name", "rt")[0] == 0
    assert shir(capsys, "job", "submit", "--store", url, "--kind", "touch", "--param",
                f"sink={tmp_path}")[0] == 0  # the channel's tables too
    with closing(sqlite3.connect(tmp_path / "rt.db")) as db:  # every page in the file itself
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = (tmp_path / "rt.db").read_bytes()
    # the schema page intact and the tables' pages overwritten: it fails at the first read
    (tmp_path / "scrambled.db").write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))
    for page in range(1, len(data) // 4096):  # and a copy cut short at every page
        (tmp_path / f"cut{page}.db").write_bytes(data[: page * 4096])
    for damaged in sorted(tmp_path.glob("[cs]*.db")):
        code, _, err = shir(capsys, "status", "--store", f"sqlite:///{damaged}")
        assert code == 2, damaged
        if "malformed" in err or damaged.name == "scrambled.db":
            assert "malformed" in err and "restore" in err and "backup" in err


# -- where the output goes --------------------------------------------------------------------


def _shell(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(f"{sys.executable} -m shir.adapters.cli {command}", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["sim list", "runtime create --store {url} --name rt"])
def test_a_closed_stdout_is_refused_before_anything_is_done(
    tmp_path: Path, command: str
) -> None:
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    proc = _shell(command.format(url=url) + " >&-")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "standard output is closed" in proc.stderr
    assert not (tmp_path / "rt.db").exists()  # no runtime whose keys nobody saw


def test_keys_that_cannot_be_printed_create_no_runtime(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    proc = _shell(f"runtime create --store {url} --name rt > /dev/full")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "No space left on device" in proc.stderr and "nothing was created" in proc.stderr
    status = _shell(f"status --store {url}")
    assert status.returncode == 2 and "holds no runtime" in status.stderr


def test_a_regenerated_key_that_cannot_be_printed_says_to_regenerate_again(
    tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    assert _shell(f"runtime create --store {url} --name rt").returncode == 0
    proc = _shell(f"runtime regenerate-key --store {url} key1 > /dev/full")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "regenerate-key key1 again" in proc.stderr


@pytest.mark.parametrize("command", [
    "sim list", "sim run crash-mid-job --until 20", "status --store {url}",
    "job submit --store {url} --kind touch --param sink=/tmp",
])
def test_output_to_a_full_disk_is_an_error_not_a_traceback(tmp_path: Path, command: str) -> None:
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    assert _shell(f"runtime create --store {url} --name rt").returncode == 0
    proc = _shell(command.format(url=url) + " > /dev/full")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert "No space left on device" in proc.stderr


def test_racing_creates_make_one_runtime_and_void_the_others_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    procs = [subprocess.Popen([sys.executable, "-m", "shir.adapters.cli", "runtime", "create",
                               "--store", url, "--name", f"rt{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 2, 2, 2]
    for code, out, err in results:
        assert "Traceback" not in err
        if code == 2 and "key1:" in out:  # printed, then lost the race
            assert "the keys printed above belong to no runtime" in err


def test_status_says_when_it_could_not_read_the_control_channel(store: str) -> None:
    from shir.adapters.channel import ChannelError
    from shir.adapters.status import render, status_of
    from shir.adapters.stores import open_store
    from shir.core.driver import Driver

    class Unreachable:
        def queue_depth(self) -> int:
            raise ChannelError("Service Bus 127.0.0.1:9 (queue depth) failed: refused")

    state = Driver(open_store(store, create=False), "runtime").state
    report = status_of(state, state.now, Unreachable())
    assert report["channel_error"] == "Service Bus 127.0.0.1:9 (queue depth) failed: refused"
    assert "control channel not read (Service Bus 127.0.0.1:9" in render(report)


def test_a_credential_too_large_to_sync_is_refused_when_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 100 kB was saved and `set` said so, but the core refuses a ShareCredential envelope
    # over 64 KiB (and so does the intranet's frame limit): it could never reach another node
    from shir.adapters.envelope import MAX_PLAINTEXT_BYTES, NodeKeys, seal
    from shir.core.credentials import MAX_ENVELOPE_BYTES

    longest = seal("c" * 128, 2**63 - 1, b"v" * MAX_PLAINTEXT_BYTES, NodeKeys.generate(),
                   NodeKeys.generate().public, "n" * 128)
    assert len(longest) <= MAX_ENVELOPE_BYTES  # the largest value allowed does fit
    data = tmp_path / "home"
    data.mkdir()
    monkeypatch.setenv("SHIR_CREDENTIAL_VALUE", "v" * (MAX_PLAINTEXT_BYTES + 1))
    code, out, err = shir(capsys, "credentials", "set", "--data-dir", str(data),
                          "--credential-id", "big")
    assert code == 2 and out == ""
    assert f"at most {MAX_PLAINTEXT_BYTES}" in err
    assert not (data / "credentials").exists() or not list((data / "credentials").iterdir())


def test_count_without_watch_is_refused_not_ignored(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = shir(capsys, "status", "--store", store, "--count", "5")
    assert code == 2 and out == ""
    assert "--count" in err and "--watch" in err


# -- copy --from: a file that is not what --format and --encoding say ---------------------------


@pytest.mark.parametrize(("name", "content", "fmt", "said"), [
    ("latin1.csv", b"a,b\n1,caf\xe9\n", "csv", "latin1.csv is not utf-8 text"),
    ("table.csv", b"a,b\n1,x\n", "jsonl", "table.csv: record 1 is not jsonl"),
])
def test_a_file_to_load_that_does_not_parse_is_named_with_what_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    require_odbc_driver: Callable[[str, str], None],
    name: str, content: bytes, fmt: str, said: str,
) -> None:
    require_odbc_driver("SQLite3", "libsqliteodbc")
    db = tmp_path / "t.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (a INTEGER, b TEXT)")
    (tmp_path / name).write_bytes(content)
    code, out, err = shir(capsys, "copy", "--from", str(tmp_path / name), "--format", fmt,
                          "--to", f"Driver=SQLite3;Database={db}", "--table", "t")
    assert code == 2 and out == ""
    assert said in err and ("--encoding" in err if fmt == "csv" else "--format" in err)
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
