"""`shir sim sweep` at scale: batches on a local pool and on a loopback Dask LocalCluster, the same
per-seed hashes on both, no seed lost when a worker is SIGKILLed, distributions and --out."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import unavailable

from shir.adapters.cli import main
from shir.sim import sweep
from shir.sim.scenario import Scenario, load_scenario

SHORT = "crash-mid-job"  # a built-in that runs in a fraction of a second
UNTIL_S = 60.0
SEEDS = list(range(100, 108))


def _dask() -> Any:
    try:
        import cloudpickle
        import distributed
    except ImportError:
        unavailable("Dask distributed is not installed (pip install 'shir[dask]')")
    # the killing batch below lives in this test module, which spawned workers cannot import
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return distributed


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario(SHORT)


@pytest.fixture(scope="module")
def reference(scenario: Scenario) -> dict[int, str]:
    """Each seed's hash, run here in this process, one after another."""
    return {r["seed"]: r["event_log_sha256"] for r in sweep.run_batch(scenario, SEEDS, UNTIL_S)}


def hashes(result: sweep.SweepResult) -> dict[int, str]:
    return {r["seed"]: r["event_log_sha256"] for r in result.records}


def no_seed_lost(result: sweep.SweepResult) -> bool:
    """Every seed ran to its end (a failed expectation is the run's own outcome; --until 60
    cuts this scenario short, so some do fail, the same way in every run)."""
    return all(r["error"] is None and r["event_log_sha256"] for r in result.records)


def kill_once(marker: str, victim: int, scenario: Scenario, seeds: Sequence[int],
              until_s: float | None) -> list[dict[str, Any]]:
    """A batch that SIGKILLs its own worker process the first time it holds ``victim``."""
    if victim in seeds:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return sweep.run_batch(scenario, seeds, until_s)


def kill_always(scenario: Scenario, seeds: Sequence[int],
                until_s: float | None) -> list[dict[str, Any]]:
    """A batch that kills every worker that runs seed 103 (a poison seed)."""
    if 103 in seeds:
        os.kill(os.getpid(), signal.SIGKILL)
    return sweep.run_batch(scenario, seeds, until_s)


# -- the local pool --------------------------------------------------------------------------


def test_pool_results_are_sorted_by_seed_and_match_a_serial_run(
    scenario: Scenario, reference: dict[int, str],
) -> None:
    result = sweep.sweep(scenario, SEEDS, UNTIL_S, cluster=sweep.parse_cluster(None, 2),
                         batch_size=3)
    assert [r["seed"] for r in result.records] == SEEDS
    assert hashes(result) == reference
    assert result.retried == 0 and result.workers == 2 and result.batch_size == 3
    assert len({r["pid"] for r in result.records}) >= 1


def test_pool_worker_sigkilled_mid_sweep_loses_no_seed(
    scenario: Scenario, reference: dict[int, str], tmp_path: Path,
) -> None:
    batch_fn = functools.partial(kill_once, str(tmp_path / "killed"), 104)
    result = sweep.sweep(scenario, SEEDS, UNTIL_S, cluster=sweep.parse_cluster(None, 2),
                         batch_size=2, batch_fn=batch_fn)
    assert (tmp_path / "killed").exists()  # the worker did die
    assert hashes(result) == reference  # every seed, each with the hash of a serial run
    assert no_seed_lost(result)
    assert result.retried >= 2  # at least the batch that held seed 104 ran again


def test_pool_poison_seed_is_reported_not_retried_forever(scenario: Scenario) -> None:
    result = sweep.sweep(scenario, SEEDS, UNTIL_S, cluster=sweep.parse_cluster(None, 2),
                         batch_size=2, batch_fn=kill_always)
    failed = {r["seed"]: r for r in result.failed if r["error"]}
    assert set(failed) == {102, 103}  # the poison seed's batch, and nothing else
    assert "died running this seed's batch 3 times" in failed[103]["error"]
    assert [r["seed"] for r in result.records] == SEEDS


# -- Dask ------------------------------------------------------------------------------------


def test_dask_local_cluster_gives_the_same_hashes_as_the_local_pool(
    scenario: Scenario, reference: dict[int, str],
) -> None:
    _dask()
    result = sweep.sweep(scenario, SEEDS, UNTIL_S, cluster=sweep.parse_cluster("local:2", None),
                         batch_size=3)
    assert [r["seed"] for r in result.records] == SEEDS
    assert hashes(result) == reference
    assert result.workers == 2 and result.retried == 0 and no_seed_lost(result)
    assert "LocalCluster of 2 workers" in result.where
    assert len({r["pid"] for r in result.records}) == 2  # both worker processes ran batches


# local:1 too: with one worker, nothing else holds what it held, and every batch must still run
@pytest.mark.parametrize("where", ["local:2", "local:1"])
def test_dask_worker_sigkilled_mid_sweep_loses_no_seed(
    scenario: Scenario, reference: dict[int, str], tmp_path: Path, where: str,
) -> None:
    _dask()
    batch_fn = functools.partial(kill_once, str(tmp_path / "killed"), 104)
    result = sweep.sweep(scenario, SEEDS, UNTIL_S, cluster=sweep.parse_cluster(where, None),
                         batch_size=2, batch_fn=batch_fn)
    assert (tmp_path / "killed").exists()
    assert hashes(result) == reference
    assert no_seed_lost(result)
    assert result.retried >= 2  # the scheduler reran the batch holding seed 104


# -- the report ------------------------------------------------------------------------------


def test_batches_hand_out_every_seed_in_order_sized_by_run_time() -> None:
    seeds = list(range(1000))
    plan = sweep.Batches(seeds, workers=2)
    sizes, handed = [], []
    while plan:
        batch = plan.take()
        handed += batch
        sizes.append(len(batch))
        if len(sizes) == 4:  # results come back: a run takes 10 ms
            plan.observe([{"wall_s": 0.01}] * 6)
    assert handed == seeds
    assert sizes[:4] == [1, 1, 2, 2]  # the first result comes after one run
    assert max(sizes) == round(sweep.BATCH_S / 0.01)  # then about a second of runs per batch
    tail = sizes[sizes.index(max(sizes)):]
    assert tail == sorted(tail, reverse=True)  # shrinking towards the end...
    assert min(tail[:-1]) == round(sweep.TAIL_BATCH_S / 0.01)  # ...but not to single runs
    fixed = sweep.Batches(seeds[:7], workers=2, batch_size=3)
    assert [fixed.take() for _ in range(3)] == [(0, 1, 2), (3, 4, 5), (6,)] and not fixed


def test_distribution_is_nearest_rank() -> None:
    d = sweep.distribution([float(x) for x in range(100, 0, -1)])
    assert d == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert sweep.distribution([]) == {"p50": None, "p95": None, "p99": None, "max": None}
    assert sweep.distribution([3.0]) == {"p50": 3.0, "p95": 3.0, "p99": 3.0, "max": 3.0}


def shir(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_json_has_distributions_and_every_seeds_hash_and_out_writes_one_line_per_seed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, reference: dict[int, str],
    scenario: Scenario,
) -> None:
    out_file = tmp_path / "sweep.jsonl"
    first = scenario.seed
    code, out, err = shir(capsys, "sim", "sweep", SHORT, "--seeds", "4", "--workers", "2",
                          "--until", "60", "--json", "--out", str(out_file))
    assert code in (0, 1), err  # --until 60 cuts the scenario short: expectations may fail
    data = json.loads(out)
    per_seed = data["per_seed"]
    assert [p["seed"] for p in per_seed] == list(range(first, first + 4))
    own = {r["seed"]: r["event_log_sha256"]
           for r in sweep.run_batch(scenario, range(first, first + 4), UNTIL_S)}
    assert {p["seed"]: p["event_log_sha256"] for p in per_seed} == own
    assert set(data["distributions"]) == set(sweep.METRICS)
    gaps = [p["metrics"]["max_dispatcher_gap_s"] for p in per_seed]
    assert data["distributions"]["max_dispatcher_gap_s"]["max"] == max(gaps)
    assert data["retried"] == 0 and data["runs"] == 4
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [x["seed"] for x in lines] == [p["seed"] for p in per_seed]
    assert all("pid" not in x and x["metrics"] for x in lines)


def test_human_report_prints_a_row_per_metric(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = shir(capsys, "sim", "sweep", SHORT, "--seeds", "3", "--workers", "1")
    assert code == 0
    assert "p50" in out and "p99" in out and "retried       0 seeds" in out
    for metric in sweep.METRICS:
        assert any(line.split()[:1] == [metric] for line in out.splitlines()), metric


@pytest.mark.parametrize(("argv", "message"), [
    (("--cluster", "local:zero"), "expected local or local:WORKERS"),
    (("--cluster", "local:100000"), "WORKERS an integer from 1 to 64"),
    (("--workers", "100000"), "--workers 100000: expected 1..64"),
    (("--cluster", "nowhere"), "a Dask scheduler address such as tcp://"),
    (("--out", "x.csv"), "expected a file name ending in .jsonl"),
    (("--out", "/no/such/dir/x.jsonl"), "no such directory"),
])
def test_bad_sweep_options_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str,
) -> None:
    code, _, err = shir(capsys, "sim", "sweep", SHORT, "--seeds", "2", *argv)
    assert code == 2
    assert message in err


def test_cluster_without_dask_says_which_extra_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "distributed" else real(name, *a))
    code, _, err = shir(capsys, "sim", "sweep", SHORT, "--seeds", "2", "--cluster", "local")
    assert code == 2
    assert "pip install 'shir[dask]'" in err


def test_the_simulator_imports_without_dask_or_tqdm() -> None:
    code = ("import sys, shir.sim.cli, shir.sim.sweep; "
            "print(sorted(m for m in ('distributed', 'dask', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def tty_streams() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    yield io.StringIO(), _Terminal()


def test_progress_bar_only_on_a_terminal(
    scenario: Scenario, tty_streams: tuple[io.StringIO, io.StringIO],
) -> None:
    pytest.importorskip("tqdm")
    piped, terminal = tty_streams
    for stream in (piped, terminal):
        result = sweep.sweep(scenario, SEEDS[:4], UNTIL_S, cluster=sweep.parse_cluster(None, 1),
                             batch_size=2, progress=stream)
    assert piped.getvalue() == ""
    drawn = terminal.getvalue()
    assert "4/4" in drawn and f"failed={len(result.failed)}" in drawn  # failures so far
    assert "seed/s" in drawn or "s/seed" in drawn  # the rate


def fail_batch(scenario: Scenario, seeds: Sequence[int],
               until_s: float | None) -> list[dict[str, Any]]:
    """A batch function that raises for seed 105 (not a run's failure: the batch's)."""
    if 105 in seeds:
        raise RuntimeError("no such luck")
    return sweep.run_batch(scenario, seeds, until_s)


def test_a_batch_that_raises_is_reported_as_its_seeds_failures(scenario: Scenario) -> None:
    result = sweep.sweep(scenario, SEEDS, UNTIL_S, cluster=sweep.parse_cluster(None, 2),
                         batch_size=2, batch_fn=fail_batch)
    errors = {r["seed"]: r["error"] for r in result.records if r["error"]}
    assert errors == {104: "the batch failed: RuntimeError: no such luck",
                      105: "the batch failed: RuntimeError: no such luck"}
    assert [r["seed"] for r in result.records] == SEEDS and result.retried == 0


def test_a_port_that_answers_nothing_is_no_scheduler_and_the_sweep_says_so_in_time(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    _dask()
    import socket

    monkeypatch.setattr(sweep, "CONNECT_TIMEOUT_S", 2.0)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code, _, err = shir(capsys, "sim", "sweep", SHORT, "--seeds", "2", "--cluster", address)
        took = time.monotonic() - started
    assert code == 2
    assert f"--cluster {address}: nothing answered as a Dask scheduler within 2 s" in err
    assert took < 10  # it hung forever before


def test_a_closed_port_is_no_scheduler_either(capsys: pytest.CaptureFixture[str]) -> None:
    _dask()
    import socket

    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = shir(capsys, "sim", "sweep", SHORT, "--seeds", "2",
                        "--cluster", f"tcp://127.0.0.1:{port}")
    assert code == 2
    assert "cannot reach a Dask scheduler there" in err and "Traceback" not in err
