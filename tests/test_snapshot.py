"""Snapshots: bytes that restore to an equal state; folding the tail onto it gives the live one."""

from __future__ import annotations

import msgpack
import pytest

from shir.core.codec import CorruptRecord, UnsupportedEventVersion
from shir.core.snapshot import restore, snapshot_bytes
from shir.core.state import fold, initial
from shir.sim.scenario import parse_scenario
from shir.sim.world import World

SCENARIO = {
    "name": "snapshot-test",
    "seed": 3,
    "duration_s": 240,
    "drain_s": 60,
    "nodes": [{"name": "a", "remote_access": True}, {"name": "b", "remote_access": True},
              {"name": "c", "concurrency_limit": 2, "remote_access": True}],
    "workload": {"rate_per_s": 2, "duration": {"kind": "exponential", "mean_s": 20}},
    "faults": [
        {"kind": "hibernate", "node": "a", "at_s": 60, "duration_s": 50},
        {"kind": "crash", "node": "b", "at_s": 150, "duration_s": 40},
    ],
}


def _world_log() -> tuple[list[object], object]:
    w = World(parse_scenario(SCENARIO))
    w.setup()
    w.env.run(until=200)  # mid-run: queued and leased jobs, an Offline node, a failover
    return list(w.events_log), w.driver.state


def test_snapshot_round_trip_equals_the_state_mid_run() -> None:
    _log, live = _world_log()
    assert live.model().jobs.leases, "the test needs live leases in the state"
    assert restore(snapshot_bytes(live)) == live


def test_snapshot_plus_tail_equals_full_replay() -> None:
    log, _live = _world_log()
    for cut in (0, 1, len(log) // 3, len(log) - 1, len(log)):
        snap = snapshot_bytes(fold(initial(), log[:cut]))
        assert fold(restore(snap), log[cut:]) == fold(initial(), log)


def test_restored_state_is_independent() -> None:
    _log, live = _world_log()
    data = snapshot_bytes(live)
    a, b = restore(data), restore(data)
    a.model().jobs.jobs.clear()
    assert b == live


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, "x"]), msgpack.packb({"a": 1}),
                                  msgpack.packb([1] + [None] * 13)])
def test_damaged_snapshot_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(CorruptRecord):
        restore(data)


def test_newer_snapshot_format_is_refused() -> None:
    with pytest.raises(UnsupportedEventVersion, match="rebuild it from the event log"):
        restore(msgpack.packb([99]))
