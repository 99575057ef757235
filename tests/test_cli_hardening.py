"""Issue 17: the CLI's contract on damaged logs, clobbering writes, locks and pipes.

Exit 0 only when what was asked ran and held, 1 only when an invariant failed, 2 for every user
mistake, and never a traceback. One test per class, over the members of the class found so far.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from shir.adapters.cli import main
from shir.adapters.filestore import FileEventStore
from shir.sim.scenario import load_scenario
from shir.sim.world import run

SHORT = "crash-mid-job"


def shir(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="module")
def events() -> list[object]:
    return list(run(load_scenario(SHORT), seed=3).log)


@pytest.fixture(scope="module")
def other_run() -> list[object]:
    return list(run(load_scenario("dispatcher-hibernates"), seed=4, until_s=60).log)


def write_log(folder: Path, name: str, records: list[object]) -> Path:
    with FileEventStore(folder, fsync=False) as store:
        store.append(name, records, 0)
    return folder / f"{name}.events"


PIECES: dict[str, Callable[[list[object], list[object]], list[object]]] = {
    "second-half": lambda e, _o: e[len(e) // 2 :],
    "without-the-first": lambda e, _o: e[1:],
    "reversed": lambda e, _o: e[::-1],
    "two-swapped": lambda e, _o: [e[1], e[0], *e[2:]],
    "another-run-appended": lambda e, o: e + o,
    "another-run-spliced": lambda e, o: e[: len(e) // 2] + o[len(o) // 2 :],
}


@pytest.mark.parametrize("piece", sorted(PIECES))
def test_a_log_that_is_framed_but_not_a_whole_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], events: list[object],
    other_run: list[object], piece: str,
) -> None:  # fmt: skip
    log = write_log(tmp_path, "piece", PIECES[piece](events, other_run))
    code, _, err = shir(capsys, "sim", "replay", str(log))
    assert code in (1, 2)
    if code == 2:
        assert "record #" in err and "not one whole stream" in err


def test_the_second_half_names_its_first_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], events: list[object]
) -> None:
    log = write_log(tmp_path, "half", events[len(events) // 2 :])
    code, _, err = shir(capsys, "sim", "replay", str(log))
    assert code == 2 and "record #1 " in err


def test_a_second_run_appended_is_damage_naming_its_first_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], events: list[object],
    other_run: list[object],
) -> None:  # fmt: skip
    log = write_log(tmp_path, "two", events + other_run)
    code, _, err = shir(capsys, "sim", "replay", str(log))
    assert code == 2 and f"record #{len(events) + 1} creates the runtime again" in err


def test_time_going_backwards_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], events: list[object]
) -> None:
    late = max(i for i, e in enumerate(events) if getattr(e, "at", 0) > 1)
    moved = attrs.evolve(events[late], at=0.0)  # type: ignore[misc]
    log = write_log(tmp_path, "back", [*events[:late], moved, *events[late + 1 :]])
    code, out, _ = shir(capsys, "sim", "replay", str(log))
    assert code == 1 and f"time went backwards at record #{late + 1}" in out


def test_replay_takes_no_lock_and_needs_no_write_access(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], events: list[object]
) -> None:
    log = write_log(tmp_path, "run", events)
    with FileEventStore(tmp_path):  # another writer holds the folder
        tmp_path.chmod(0o555)
        try:
            code, out, _ = shir(capsys, "sim", "replay", str(log))
        finally:
            tmp_path.chmod(0o755)
    assert code == 0 and "all held" in out


def test_a_torn_tail_says_which_command_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], events: list[object]
) -> None:
    log = write_log(tmp_path, "run", events)
    size = log.stat().st_size
    log.write_bytes(log.read_bytes()[:-3])
    code, _, err = shir(capsys, "sim", "replay", str(log))
    assert code == 2 and "store.repair" not in err and "truncate -s" in err
    offset = int(err.split("truncate -s ")[1].split()[0])
    assert 0 < offset < size - 3
    os.truncate(log, offset)  # the command the message gives, done here
    assert shir(capsys, "sim", "replay", str(log))[0] in (0, 1)


def test_a_locked_log_folder_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FileEventStore(tmp_path):
        started = time.perf_counter()
        code, out, err = shir(capsys, "sim", "run", "dispatcher-hibernates", "--log",
                              str(tmp_path / "run.events"))
        assert time.perf_counter() - started < 2  # refused, not run first
    assert (code, out) == (2, "") and "another process holds the event store" in err
    assert not (tmp_path / "run.events").exists()


@pytest.mark.parametrize("plot", ["same-as-log", "run.svg", "run", "run.events",
                                  "missing/run.png"])
def test_plot_never_clobbers_the_log_and_writes_only_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], plot: str
) -> None:
    log = tmp_path / "run.events"
    target = log if plot == "same-as-log" else tmp_path / plot
    code, out, err = shir(capsys, "sim", "run", SHORT, "--log", str(log), "--plot", str(target))
    assert (code, out) == (2, "") and "--plot" in err
    assert not log.exists() and not target.exists()


def test_list_into_a_reader_that_leaves_exits_0() -> None:
    script = Path(sys.executable).with_name("shir")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "shir.adapters.cli"]
    done = subprocess.run(
        f"{' '.join(cmd)} sim list | head -c 1; exit ${{PIPESTATUS[0]}}", shell=True,
        executable="/bin/bash", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr
