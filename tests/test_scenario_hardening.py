"""Issue 17: every class of bad scenario input is refused when the file is read (exit 2).

One test per class, parametrised over the members of the class found so far, so the whole class
stays closed: a type the loader does not check, a name the core refuses, a metric that does not
exist, a magnitude beyond the documented limits.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import pytest

from shir.core.model import RuntimeSettings
from shir.sim import cli
from shir.sim.scenario import LIMITS, metric_names

NODE = '[[nodes]]\nname = "n1"\n'
TINY = 'duration_s = 5\ndrain_s = 1\n'


def shir(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
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
