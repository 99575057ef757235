"""Issue 17: every class of bad scenario input is refused when the file is read (exit 2).

One test per class, parametrised over the members of the class found so far, so the whole class
stays closed: a type the loader does not check, a name the core refuses, a metric that does not
exist, a magnitude beyond the documented limits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import attrs
import pytest

from shir.adapters.cli import main
from shir.core.model import RuntimeSettings
from shir.sim.scenario import LIMITS, metric_names

NODE = '[[nodes]]\nname = "n1"\n'
TINY = 'duration_s = 5\ndrain_s = 1\n'


def shir(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | bytes,
            *expected: str) -> str:
    path = tmp_path / "s.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.perf_counter()
    code, out, err = shir(capsys, "sim", "run", str(path))
    assert time.perf_counter() - started < 10
    assert (code, out) == (2, ""), err
    assert str(path) in err
    for x in expected:
        assert x in err, err
    return err


def test_a_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(tmp_path, capsys, b'name = "caf\xe9"\n' + NODE.encode(), "not a UTF-8 text file",
            "byte 11")


_INT_SETTINGS = [f.name for f in attrs.fields(RuntimeSettings) if str(f.type) == "int"]
_FLOAT_SETTINGS = [f.name for f in attrs.fields(RuntimeSettings) if str(f.type).startswith("float")]


@pytest.mark.parametrize(("name", "value"), [
    *((n, v) for n in _INT_SETTINGS for v in ("true", "2.5", '"3"')),
    *((n, v) for n in _FLOAT_SETTINGS for v in ("true", '"10"', "nan", "inf")),
])
def test_every_setting_of_the_wrong_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    refused(tmp_path, capsys, f"{TINY}[settings]\n{name} = {value}\n{NODE}", f"settings.{name}")


def test_a_float_where_a_setting_wants_a_number_may_be_an_integer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(f"{TINY}[settings]\nheartbeat_interval_s = 2\nlock_duration_s = 30\n{NODE}")
    assert shir(capsys, "sim", "run", str(path))[0] == 0


@pytest.mark.parametrize("key", ["nodes[0].cores", "nodes[0].memory_mb", "seed"])
def test_node_integers_refuse_bools_and_floats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    table, _, name = key.rpartition(".")
    for value in ("true", "2.5"):
        body = f"{NODE}{name} = {value}\n" if table else f"{name} = {value}\n{NODE}"
        refused(tmp_path, capsys, TINY + body, key)


@pytest.mark.parametrize("text", ["duration_s = 0\ndrain_s = 0\n", "duration_s = 0\n"])
def test_no_workload_window(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    refused(tmp_path, capsys, text + NODE, "duration_s", "> 0")


@pytest.mark.parametrize(("field", "value"), [
    ("name", '"' + "n" * 129 + '"'), ("name", '"a\\u0001b"'), ("name", '"   "'), ("name", '""'),
    ("name", '"a\\tb"'), ("version", '""'), ("version", '"  "'), ("version", '"5\\n40"'),
])
def test_names_the_core_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: str
) -> None:
    body = f'[[nodes]]\n{field} = {value}\n' + ('' if field == "name" else 'name = "n1"\n')
    refused(tmp_path, capsys, TINY + body, f"nodes[0].{field}", "the core accepts")


@pytest.mark.parametrize("limit", ["0", "257", "100000", "true", "1.5"])
def test_a_concurrency_limit_the_core_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    refused(tmp_path, capsys, f"{TINY}{NODE}concurrency_limit = {limit}\n",
            "nodes[0].concurrency_limit")


@pytest.mark.parametrize("metric", [
    "refusals.StaleLeese", "refusals.", "refusals.staleLease", "jobs.complete", "jobs.",
    "failover", "Failovers", "",
])
def test_an_unknown_metric_is_refused_when_the_file_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metric: str
) -> None:
    err = refused(
        tmp_path, capsys,
        f'{TINY}{NODE}[[expect]]\nkind = "metric"\nmetric = "{metric}"\nmax = 0\n',
        "expect[0].metric",
    )  # fmt: skip
    for valid in metric_names():  # the complete list, refusals included
        assert valid in err
    assert "replay" not in err


def test_every_listed_metric_is_one_a_run_reports(capsys: pytest.CaptureFixture[str]) -> None:
    from shir.sim.scenario import load_scenario
    from shir.sim.world import run

    result = run(load_scenario("crash-mid-job"), seed=1, until_s=5)
    missing = [m for m in metric_names() if result.metric(m) is None]
    assert not missing


@pytest.mark.parametrize(("text", "key"), [
    ("duration_s = 1e12\n", "duration_s + drain_s"),
    (f"duration_s = {LIMITS['simulated_s']}\ndrain_s = 1\n", "duration_s + drain_s"),
    ("drain_s = 1e12\n", "duration_s + drain_s"),
    (f"{TINY}[settings]\nheartbeat_interval_s = 1e-6\n", "settings.heartbeat_interval_s"),
    (f"{TINY}[workload]\nrate_per_s = 1e9\n", "workload.rate_per_s"),
    ("duration_s = 500000\n[workload]\nrate_per_s = 50\n", "workload.rate_per_s"),
    (f"{TINY}[random_faults]\nper_hour = 1e9\nkinds = [\"crash\"]\n", "random_faults.per_hour"),
    ("duration_s = 300000\n[settings]\nheartbeat_interval_s = 0.1\n", "heartbeats"),
])
def test_absurd_magnitudes_are_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    refused(tmp_path, capsys, text + NODE, key, "limit")


@pytest.mark.parametrize("until", ["1000000h", "200h", "604801"])
def test_an_absurd_until_is_refused_at_once(
    capsys: pytest.CaptureFixture[str], until: str
) -> None:
    started = time.perf_counter()
    code, out, err = shir(capsys, "sim", "run", "crash-mid-job", "--until", until)
    assert (code, out) == (2, "") and "--until" in err and "limit" in err
    assert time.perf_counter() - started < 10


def test_the_starter_scenario_the_readme_points_to_runs_and_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(__file__).resolve().parents[1]
    starter = root / "docs" / "examples" / "my.toml"
    assert f"shir sim run {starter.relative_to(root)}" in (root / "README.md").read_text()
    log = tmp_path / "run.events"
    code, out, _ = shir(capsys, "sim", "run", str(starter), "--log", str(log))
    assert code == 0 and "PASS" in out
    assert shir(capsys, "sim", "replay", str(log))[0] == 0


# remote access on for both: whichever registers first, the other may join
TWO = NODE + 'remote_access = true\n[[nodes]]\nname = "n2"\nremote_access = true\n'


@pytest.mark.parametrize(("body", "key"), [
    # a stop before a start: no job would arrive
    ('[workload]\nstart_at_s = 4\nstop_at_s = 2\n', "workload.stop_at_s"),
    # fault kinds without a rate, a rate without kinds, other keys without either
    ('[random_faults]\nkinds = ["crash"]\n', "random_faults.per_hour"),
    ('[random_faults]\nkinds = ["crash"]\nper_hour = 0\n', "random_faults.per_hour"),
    ('[random_faults]\nper_hour = 60\n', "random_faults.kinds"),
    ('[random_faults]\nper_hour = 60\nkinds = []\n', "random_faults.kinds"),
    ('[random_faults]\nmax_duration_s = 60\n', "random_faults.kinds"),
    ('[random_faults]\nper_hour = 60\nkinds = ["credential_drift"]\n', "random_faults.kinds"),
    # a partition of a node from itself
    ('[[faults]]\nkind = "partition"\nnode = "n1"\npeer = "n1"\nduration_s = 2\n',
     "faults[0].peer"),
    # an empty version, or one the core refuses
    ('[[faults]]\nkind = "upgrade"\nnode = "n1"\nversion = ""\nduration_s = 2\n',
     "faults[0].version"),
    ('[[faults]]\nkind = "version_skew"\nnode = "n1"\nversion = " "\n', "faults[0].version"),
    ('[[faults]]\nkind = "version_skew"\nnode = "n1"\nversion = "5\\u0000"\n', "faults[0].version"),
    # a fault that would change nothing
    ('[[faults]]\nkind = "crash"\nnode = "n1"\nduration_s = 0\n', "faults[0].duration_s"),
    ('[[faults]]\nkind = "version_skew"\nnode = "n1"\nversion = "5.39"\nduration_s = 0\n',
     "faults[0].duration_s"),
    ('[[faults]]\nkind = "drop"\nduration_s = 2\nprobability = 0\n', "faults[0].probability"),
    ('[[faults]]\nkind = "delay"\nduration_s = 2\nextra_s = 0\n', "faults[0].extra_s"),
    ('[[faults]]\nkind = "clock_jump"\nnode = "n1"\nextra_s = 0\n', "faults[0].extra_s"),
    ('[[faults]]\nkind = "slow"\nnode = "n1"\nduration_s = 2\nfactor = 1\n', "faults[0].factor"),
    # a credential id the core refuses, or one listed twice
    ('[[faults]]\nkind = "rotate_credential"\nnode = "n1"\ncredential = " x"\n',
     "faults[0].credential"),
    ('[workload]\nneeds = [{ credential = "a b" }]\n', "workload.needs[0]"),
    ('[workload]\nneeds = [{ credential = "a" }, { credential = "a", version = 2 }]\n',
     "workload.needs[1].credential"),
    # a runtime name the core refuses (the run would fail at its first command)
    ('name = ""\n', "name"),
    ('name = "a\\u0007b"\n', "name"),
    # fields the kind ignores
    ('[workload]\nduration = { kind = "fixed", mean_s = 2, max_s = 9 }\n',
     "workload.duration.max_s"),
    ('[[expect]]\nkind = "metric"\nmetric = "failovers"\nmax = 0\nat_s = 3\n', "expect[0].at_s"),
    ('[[expect]]\nkind = "metric"\nmetric = "failovers"\nmax = 0\nnode = "n1"\n', "expect[0].node"),
    ('[[expect]]\nkind = "dispatcher"\nat_s = 3\nstatus = "Online"\n', "expect[0].status"),
    ('[[expect]]\nkind = "status"\nat_s = 3\nnode = "n1"\nstatus = "Online"\nmax = 1\n',
     "expect[0].max"),
    # an expectation after the run's end would read the last state instead
    ('[[expect]]\nkind = "dispatcher"\nat_s = 7\nnode = "n1"\n', "expect[0].at_s"),
])
def test_lenient_inputs_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, key: str
) -> None:
    head, _, rest = body.partition("[")  # top-level keys go before the first table
    refused(tmp_path, capsys, f"{TINY}{head}{TWO}[{rest}" if rest else f"{TINY}{head}{TWO}", key)


@pytest.mark.parametrize("at", ["5", "9"])
def test_a_fault_after_the_workload_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], at: str
) -> None:
    err = refused(tmp_path, capsys, f'{TINY}{TWO}[[faults]]\nkind = "crash"\nnode = "n2"\n'
                  f'at_s = {at}\nduration_s = 1\n', "faults[0].at_s", "before duration_s (5 s)",
                  f"crash n2 @{at}s")
    assert "got" in err


def test_the_report_lists_the_faults_that_ran_and_those_until_cut_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "f.toml"
    path.write_text('duration_s = 60\ndrain_s = 5\n' + TWO + '[[faults]]\nkind = "crash"\n'
                    'node = "n2"\nat_s = 10\nduration_s = 5\n[[faults]]\nkind = "partition"\n'
                    'node = "n1"\npeer = "n2"\nat_s = 40\nduration_s = 30\n')
    code, out, _ = shir(capsys, "sim", "run", str(path))
    assert code == 0
    assert "faults        2 started\n  crash n2 @10s for 5s\n  partition n1->n2 @40s for 30s " \
           "(healed at 60s: the workload ended)\n" in out
    code, out, _ = shir(capsys, "sim", "run", str(path), "--until", "20")
    assert code == 0
    assert "faults        1 started\n  crash n2 @10s for 5s\n  not run: 1 scripted at or after " \
           "the workload's end (20.0 s):\n    partition n1->n2 @40s for 30s\n" in out
    code, out, _ = shir(capsys, "sim", "run", str(path), "--until", "20", "--json")
    assert json.loads(out)["faults"] == {"started": ["crash n2 @10s for 5s"],
                                         "not_run": ["partition n1->n2 @40s for 30s"]}


def test_an_expectation_after_a_shortened_run_fails_as_not_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "e.toml"
    path.write_text(f'duration_s = 60\ndrain_s = 5\n{TWO}[[expect]]\nkind = "status"\n'
                    'node = "n1"\nat_s = 50\nstatus = "Online"\n')
    assert shir(capsys, "sim", "run", str(path))[0] == 0
    code, out, _ = shir(capsys, "sim", "run", str(path), "--until", "20")
    assert code == 1 and "at 50 s n1 is Online: not checked: the run ended at 25 s" in out


def test_the_report_names_a_node_that_never_joined(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "late.toml"
    path.write_text(f'{TINY}{TWO}join_at_s = 100\n')
    code, out, _ = shir(capsys, "sim", "run", str(path))
    assert code == 0 and "not joined    n2 (join_at_s after the run's end)" in out
    code, out, _ = shir(capsys, "sim", "run", str(path), "--json")
    assert json.loads(out)["nodes_not_joined"] == ["n2"]
    path.write_text(f'{TINY}{TWO}join_at_s = 3\n')
    assert "not joined" not in shir(capsys, "sim", "run", str(path))[1]
