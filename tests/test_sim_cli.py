"""`shir sim run|sweep|replay|list` and the mounted `shir credentials`, as a user runs them."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from shir.adapters.cli import main
from shir.core import events as ev
from shir.sim import cli
from shir.sim.faults import FAULT_KINDS
from shir.sim.scenario import builtin_names

HERE = Path(__file__).resolve().parent
BROKEN = HERE / "scenarios" / "broken-expectation.toml"
SHORT = "crash-mid-job"  # a built-in that runs in a fraction of a second
RUN_KEYS = {
    "scenario", "seed", "simulated_s", "wall_s", "events", "event_log_sha256",
    "invariant_violations", "expectations", "jobs", "failovers", "max_dispatcher_gap_s",
    "max_offline_detect_s",
}
JOB_KEYS = {"submitted", "completed", "dead_lettered", "lost", "duplicate_effects"}


def shir(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``shir ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def shir_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (or the module, if it is not on this interpreter's
    bin folder) in a fresh process."""
    script = Path(sys.executable).with_name("shir")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "shir.adapters.cli"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=120,
                          env=env, check=False)


def scenario_file(tmp_path: Path, text: str, name: str = "s.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


MINIMAL = '[[nodes]]\nname = "node-1"\n'


# -- run ------------------------------------------------------------------------------------


def test_run_prints_a_readable_report_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = shir(capsys, "sim", "run", SHORT)
    assert code == 0, out + err
    for label in ("scenario", "seed", "time", "events", "jobs", "failovers", "max gaps",
                  "refusals", "expectations", "invariants"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert "x real time" in out
    assert "✓ jobs.lost == 0" in out
    assert "✗" not in out
    assert out.rstrip().endswith("result        PASS")
    assert "replay" not in out + err


def test_run_json_is_one_object_with_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = shir(capsys, "sim", "run", SHORT, "--json", "--seed", "5")
    assert code == 0, err
    data = json.loads(out)  # the whole of stdout is one JSON object
    assert set(data) >= RUN_KEYS
    assert set(data["jobs"]) >= JOB_KEYS
    assert set(data["expectations"]) == {"passed", "failed"}
    assert isinstance(data["invariant_violations"], list)
    assert data["seed"] == 5 and data["scenario"] == SHORT and data["ok"] is True
    assert len(data["event_log_sha256"]) == 64
    assert err == ""


def test_until_takes_units_and_shortens_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = shir(capsys, "sim", "run", "reference", "--until", "1m", "--json")
    data = json.loads(out)
    assert code in (0, 1)  # a minute of the reference scenario; what matters is its length
    assert data["simulated_s"] == 60 + 600  # until, then the scenario's drain


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("1.5h", 5400.0),
    (" 10 S ", 10.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "5x", "1d", "m", "1e9999", "nan", "1h30m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="90, 90s, 15m, 2h"):
        cli.parse_duration(text)


def test_a_failed_expectation_exits_1_and_its_replay_command_reproduces_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = shir(capsys, "sim", "run", str(BROKEN))
    assert code == 1
    assert "✗ max_dispatcher_gap_s <= 5" in out
    assert "result        FAIL" in out
    replay = out.strip().splitlines()[-1].strip()
    assert replay == f"shir sim run {shlex.quote(str(BROKEN))} --seed 2"

    # In JSON mode stdout stays one object; the seed and the command go to stderr.
    code, out, err = shir(capsys, "sim", "run", str(BROKEN), "--json")
    assert code == 1
    first = json.loads(out)
    assert first["ok"] is False and first["expectations"]["failed"]
    assert "seed 2 failed" in err and replay in err

    # The printed command, run again in a fresh process, gives the same failure and log.
    again = shir_process(*shlex.split(replay)[1:], "--json")
    assert again.returncode == 1, again.stderr
    second = json.loads(again.stdout)
    assert second["event_log_sha256"] == first["event_log_sha256"]
    assert second["expectations"] == first["expectations"]
    assert replay in again.stderr


def test_the_replay_command_keeps_until(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = shir(capsys, "sim", "run", str(BROKEN), "--seed", "3", "--until", "100s")
    assert code == 1
    assert out.strip().endswith(f"shir sim run {shlex.quote(str(BROKEN))} --seed 3 --until 100s")


def test_console_script_with_another_hash_seed_gives_the_same_log(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = shir(capsys, "sim", "run", SHORT, "--json")
    assert code == 0
    here = json.loads(out)["event_log_sha256"]
    env = {**os.environ, "PYTHONHASHSEED": "99" if os.environ.get("PYTHONHASHSEED") != "99"
           else "7"}
    there = shir_process("sim", "run", SHORT, "--json", env=env)
    assert there.returncode == 0, there.stderr
    assert json.loads(there.stdout)["event_log_sha256"] == here


# -- bad input: exit 2, a message naming file, key and what was expected, no traceback -----


def bad(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = shir(capsys, *argv)
    assert code == 2, out + err
    assert out == ""
    return err


def test_unknown_fault_kind_lists_the_valid_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = scenario_file(tmp_path, MINIMAL + '[[faults]]\nkind = "meteor"\nat_s = 5\n')
    err = bad(capsys, "sim", "run", path)
    assert path in err and "faults[0].kind" in err and "'meteor'" in err
    for kind in FAULT_KINDS:
        assert kind in err


def test_unknown_top_level_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = scenario_file(tmp_path, 'durations = 5\n' + MINIMAL)
    err = bad(capsys, "sim", "run", path)
    assert f"{path}: durations: expected one of the keys" in err
    assert "duration_s" in err


def test_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = scenario_file(tmp_path, MINIMAL + '[workload]\nrate_per_s = "fast"\n')
    err = bad(capsys, "sim", "run", path)
    assert f"{path}: workload.rate_per_s: expected a number" in err and "'fast'" in err


def test_missing_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = scenario_file(tmp_path, 'name = "empty"\n')
    err = bad(capsys, "sim", "run", path)
    assert f"{path}: nodes: expected an array of tables [[nodes]]" in err


def test_not_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = scenario_file(tmp_path, "name = \n")
    assert f"{path}: not valid TOML" in bad(capsys, "sim", "run", path)


def test_unknown_scenario_lists_the_built_ins(capsys: pytest.CaptureFixture[str]) -> None:
    err = bad(capsys, "sim", "run", "no-such-scenario")
    assert "no built-in scenario 'no-such-scenario'" in err
    for name in builtin_names():
        assert name in err


def test_missing_scenario_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = bad(capsys, "sim", "run", str(tmp_path / "gone.toml"))
    assert "gone.toml: cannot read the scenario file" in err


@pytest.mark.parametrize("until", ["5x", "0", "-1m", "soon"])
def test_bad_duration(capsys: pytest.CaptureFixture[str], until: str) -> None:
    err = bad(capsys, "sim", "run", SHORT, f"--until={until}")
    assert f"invalid duration '{until}'" in err and "90, 90s, 15m, 2h" in err


@pytest.mark.parametrize("argv", [
    ("sim", "run", SHORT, "--seed", "-1"),
    ("sim", "run", SHORT, "--seed", "many"),
    ("sim", "sweep", SHORT, "--seeds", "0"),
    ("sim", "sweep", SHORT),
    ("sim",),
    ("sim", "fly"),
    (),
])
def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    assert "error:" in bad(capsys, *argv)


def test_plot_without_matplotlib_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    err = bad(capsys, "sim", "run", SHORT, "--plot", str(tmp_path / "t.png"))
    assert "pip install 'shir[plot]'" in err
    assert not (tmp_path / "t.png").exists()


def test_plot_draws_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("shir.sim.plot")
    png = tmp_path / "timeline.png"
    code, out, err = shir(capsys, "sim", "run", SHORT, "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot          {png}" in out


# -- list -----------------------------------------------------------------------------------


def test_list_shows_every_built_in_with_its_description(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = shir(capsys, "sim", "list")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) >= 8
    assert [line.split()[0] for line in lines] == list(builtin_names())
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # each has a description


# -- --log and replay -----------------------------------------------------------------------


def test_log_then_replay_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run.events"
    code, out, err = shir(capsys, "sim", "run", "dispatcher-hibernates", "--json", "--log",
                          str(log))
    assert code == 0, err
    run = json.loads(out)
    assert log.is_file()

    code, out, err = shir(capsys, "sim", "replay", str(log), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["events"] == run["events"]
    assert summary["invariant_violations"] == [] and summary["ok"] is True
    assert summary["runtime"] == "dispatcher-hibernates"
    assert set(summary["nodes"]) == {"node-1", "node-2", "node-3"}
    assert summary["dispatcher"] == "node-2" and summary["term"] == 2
    assert summary["jobs"]["submitted"] == run["jobs"]["submitted"]
    assert summary["jobs"]["completed"] == run["jobs"]["completed"]
    assert summary["jobs"]["lost"] == 0

    code, out, _ = shir(capsys, "sim", "replay", str(log))
    assert code == 0
    assert "term          2, dispatcher node-2" in out
    assert "invariants    all held" in out
    assert "node-1        Online" in out


def test_log_is_never_overwritten_and_needs_the_events_suffix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    existing = tmp_path / "old.events"
    existing.write_bytes(b"precious")
    assert "the file exists" in bad(capsys, "sim", "run", SHORT, "--log", str(existing))
    assert existing.read_bytes() == b"precious"
    assert "ending in .events" in bad(capsys, "sim", "run", SHORT, "--log",
                                      str(tmp_path / "run.log"))
    assert "invalid stream name" in bad(capsys, "sim", "run", SHORT, "--log",
                                        str(tmp_path / "-x.events"))


def test_replay_of_a_damaged_log_exits_2_with_the_store_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    log = tmp_path / "run.events"
    assert shir(capsys, "sim", "run", SHORT, "--log", str(log))[0] == 0
    data = log.read_bytes()
    log.write_bytes(data[:-3])  # a torn tail: the last record cut short
    err = bad(capsys, "sim", "replay", str(log))
    assert "torn tail" in err and str(log) in err
    log.write_bytes(b"\x00" * 5 + data[5:])  # damage inside, good records after it
    assert "cannot read the event log" in bad(capsys, "sim", "replay", str(log))
    assert "no such file" in bad(capsys, "sim", "replay", str(tmp_path / "none.events"))
    assert "ending in .events" in bad(capsys, "sim", "replay", str(BROKEN))


def test_replay_finds_violations_in_a_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from shir.adapters.filestore import FileEventStore
    from shir.sim.scenario import load_scenario
    from shir.sim.world import run

    events = run(load_scenario(SHORT)).log
    # A forged log: the first dispatcher term skips ahead, which no decider may do.
    forged = [attrs.evolve(e, term=e.term + 5) if type(e) is ev.DispatcherChanged else e
              for e in events]
    with FileEventStore(tmp_path, fsync=False) as store:
        store.append("forged", forged, 0)
    code, out, _ = shir(capsys, "sim", "replay", str(tmp_path / "forged.events"))
    assert code == 1
    assert "terms: term went from 0 to 6" in out


# -- sweep ----------------------------------------------------------------------------------


def test_sweep_runs_seeds_in_worker_processes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = shir(capsys, "sim", "sweep", SHORT, "--seeds", "3", "--workers", "2",
                          "--json")
    assert code == 0, out + err
    data = json.loads(out)
    assert data["runs"] == 3 and data["failures"] == 0 and data["failing_seeds"] == []
    assert data["seeds"] == {"first": 3, "last": 5}  # crash-mid-job's seed is 3
    assert data["workers"] == 2 and data["wall_s"] > 0 and data["ok"] is True


def test_sweep_reports_each_failing_seed_with_its_replay_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = shir(capsys, "sim", "sweep", str(BROKEN), "--seeds", "2", "--workers", "2",
                        "--until", "90")
    assert code == 1
    assert "failures      2" in out
    for seed in (2, 3):
        assert f"seed {seed}: shir sim run {shlex.quote(str(BROKEN))} --seed {seed} --until 90" \
            in out
    assert "✗ max_dispatcher_gap_s <= 5" in out


# -- the command tree -----------------------------------------------------------------------


def test_help_lists_sim_and_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = shir(capsys, "--help")
    assert code == 0
    assert "sim" in out and "credentials" in out


def test_credentials_commands_are_mounted(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = shir(capsys, "credentials", "--help")
    assert code == 0
    for command in ("init", "backup", "restore", "encrypt"):
        assert command in out


def test_credentials_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = shir(capsys, "credentials", "restore", "--data-dir", str(tmp_path),
                        str(tmp_path / "missing.backup"))
    assert code == 2 and "error" in err
