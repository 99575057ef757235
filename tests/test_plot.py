"""plot_timeline draws a PNG of a run; timeline_frames gives the same timeline as plain data.

One short run with a failover (the dispatcher hibernates), a crash and a partition feeds every
test here.
"""

from __future__ import annotations

import itertools
import struct
import sys

import pytest

from shir.sim.plot import STATUS_COLOURS, plot_timeline, timeline_frames
from shir.sim.scenario import parse_scenario
from shir.sim.world import RunResult, run

SCENARIO = {
    "name": "plot-test",
    "seed": 5,
    "duration_s": 240,
    "drain_s": 40,
    "settings": {"heartbeat_interval_s": 5},
    "nodes": [
        {"name": f"node-{i}", "cores": 8, "memory_mb": 16384, "join_at_s": 0 if i == 1 else 2,
         "remote_access": True}
        for i in range(1, 5)
    ],
    "workload": {"rate_per_s": 1, "duration": {"kind": "exponential", "mean_s": 15}},
    "faults": [
        {"kind": "hibernate", "node": "node-1", "at_s": 60, "duration_s": 60},
        {"kind": "crash", "node": "node-3", "at_s": 150, "duration_s": 30},
        {"kind": "partition", "node": "node-2", "at_s": 170, "duration_s": 20},
        {"kind": "drop", "at_s": 90, "duration_s": 10, "probability": 0.2},
    ],
}


@pytest.fixture(scope="module")
def result() -> RunResult:
    r = run(parse_scenario(SCENARIO))
    assert r.failovers >= 1, "the scenario should fail over (the dispatcher hibernates)"
    assert len(r.timeline["faults"]) == 4
    return r


def test_plot_timeline_writes_a_1600x900_png(result: RunResult, tmp_path) -> None:
    path = tmp_path / "timeline.png"
    plot_timeline(result, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1600, 900)
    assert 20_000 < len(data) < 2_000_000


def test_plot_timeline_takes_a_str_path(result: RunResult, tmp_path) -> None:
    path = tmp_path / "as-str.png"
    plot_timeline(result, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_status_intervals_cover_the_run_without_overlap(result: RunResult) -> None:
    fr = timeline_frames(result)
    end = result.simulated_s
    assert fr["end_s"] == end
    assert sorted(fr["status"]) == [f"node-{i}" for i in range(1, 5)]
    for node, intervals in fr["status"].items():
        assert intervals, node
        assert intervals[0][2] == "Initializing"
        assert intervals[0][0] < 5, "a node is drawn from its registration"
        assert intervals[-1][1] == end
        for (s1, e1, st1), (s2, _e2, st2) in itertools.pairwise(intervals):
            assert s1 < e1 == s2, (node, s1, e1, s2)  # contiguous, no overlap, no empty interval
            assert st1 != st2, "adjacent intervals with the same status are merged"
        assert {st for _s, _e, st in intervals} <= set(STATUS_COLOURS)


def test_status_intervals_agree_with_the_timeline(result: RunResult) -> None:
    fr = timeline_frames(result)
    # the node that hibernated was Offline for a while, and the last word on each node holds
    assert any(st == "Offline" for _s, _e, st in fr["status"]["node-1"])
    for node, intervals in fr["status"].items():
        last = [st for _t, n, st in result.timeline["status"] if n == node][-1]
        assert intervals[-1][2] == last


def test_dispatcher_intervals_follow_the_terms(result: RunResult) -> None:
    fr = timeline_frames(result)
    terms = result.timeline["dispatcher"]
    assert len(fr["dispatcher"]) == len(terms) >= 2
    assert fr["dispatcher"][0][3] == "node-1"
    assert fr["dispatcher"][-1][1] == result.simulated_s
    for (s1, e1, t1, _n1), (s2, _e2, t2, _n2) in itertools.pairwise(fr["dispatcher"]):
        assert s1 <= e1 == s2
        assert t2 > t1
    assert {n for *_x, n in fr["dispatcher"]} >= {"node-1"}
    assert len({n for *_x, n in fr["dispatcher"]}) >= 2


def test_samples_and_faults_are_plain_lists(result: RunResult) -> None:
    fr = timeline_frames(result)
    s = fr["samples"]
    assert len(s["t_s"]) == len(s["queued"]) == len(s["running"]) == len(
        result.timeline["samples"]
    )
    assert s["t_s"] == sorted(s["t_s"])
    kinds = [f["kind"] for f in fr["faults"]]
    assert kinds == ["hibernate", "drop", "crash", "partition"]  # by start time
    hib = fr["faults"][0]
    assert (hib["node"], hib["start_s"], hib["end_s"]) == ("node-1", 60.0, 120.0)


def test_plot_without_matplotlib_says_how_to_get_it(result: RunResult, tmp_path, monkeypatch):
    # None in sys.modules makes an import fail, also of submodules imported by earlier tests
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'shir\[plot\]'"):
        plot_timeline(result, tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()
