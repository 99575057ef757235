"""The core's own cost in the `reference` run, per command type: the run's commands replayed
through a bare Driver, against the bare SimPy model of benchmarks/sim_reference.py.

The simulator is run once with its Driver's ``handle`` recording every command and whether its
append landed; the commands are then handed, in order, to a fresh ``Driver`` on an in-memory
store that loses exactly the appends the run lost (its ``append_unknown`` faults), so the replay
decides the same events (checked: the same count). No SimPy, no network, no listeners: what is
left is decide, append, fold, effects and the Driver's own steps. It is the floor of
``sim_reference_core`` without its timing wrappers, and a steadier figure than a whole run
(process CPU time, minimum of the rounds).

Prints JSON lines (name, value, unit, baseline, ratio):

- ``core_replay``: process CPU seconds of the whole replay; baseline the bare model's
  (process CPU, minimum of the rounds); ratio = replay / bare.
- ``core_replay_<Command>``: microseconds per command of that type (the five costliest types),
  with the command count as ``baseline`` and no ratio.

    .venv/bin/python benchmarks/core_replay.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

from sim_reference import bare_model

from shir.core.driver import AppendOutcomeUnknown, Driver
from shir.core.errors import DomainError
from shir.core.store import InMemoryEventStore
from shir.sim.scenario import load_scenario
from shir.sim.world import World


class _LosingStore(InMemoryEventStore):
    """Loses the next append (outcome unknown, nothing stored) when ``lose`` is set."""

    lose = False

    def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
        if self.lose:
            raise AppendOutcomeUnknown("lost, as in the recorded run")
        return super().append(stream, events, expected_version)


def record() -> tuple[list[tuple[object, bool]], int]:
    """Run `reference`; return its commands (with whether their append was lost) and events."""
    commands: list[tuple[object, bool]] = []
    handle = Driver.handle

    def recording(self: Driver, command: object) -> tuple[object, ...]:
        version = self.version
        try:
            return handle(self, command)
        finally:
            commands.append((command, self.version == version))

    Driver.handle = recording  # type: ignore[method-assign]
    try:
        world = World(load_scenario("reference"))
        world.run()
    finally:
        Driver.handle = handle  # type: ignore[method-assign]
    return commands, len(world.events_log)


def replay(commands: list[tuple[object, bool]], per_type: dict[str, float] | None = None
           ) -> tuple[float, int]:
    """Replay ``commands``; return process CPU seconds and the events stored.

    With ``per_type``, add each command's wall seconds to its type's entry (slower: two clock
    reads per command)."""
    store = _LosingStore()
    driver = Driver(store)
    handle, clock = driver.handle, time.perf_counter
    gc.collect()
    gc.disable()  # the run itself collects rarely (World.run): keep the replay comparable
    try:
        started = time.process_time()
        for command, lost in commands:
            store.lose = lost
            t = clock() if per_type is not None else 0.0
            try:  # noqa: SIM105 (contextlib.suppress costs more than what is measured)
                handle(command)
            except (DomainError, AppendOutcomeUnknown):
                pass
            if per_type is not None:
                per_type[type(command).__name__] += clock() - t
        return time.process_time() - started, driver.version
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    commands, events = record()
    sc = load_scenario("reference")
    total = sc.duration_s + sc.drain_s
    ours, bare = [], []
    for _ in range(args.rounds):
        gc.collect()
        t = time.process_time()
        bare_model(sc, total)
        bare.append(time.process_time() - t)
        seconds, stored = replay(commands)
        if stored != events:
            raise SystemExit(f"the replay stored {stored} events, the run {events}")
        ours.append(seconds)
    print(json.dumps({"name": "core_replay", "value": round(min(ours), 3), "unit": "s",
                      "baseline": round(min(bare), 3), "ratio": round(min(ours) / min(bare), 3)}))
    spent: defaultdict[str, float] = defaultdict(float)
    replay(commands, spent)
    counts = Counter(type(c).__name__ for c, _lost in commands)
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])[:5]:
        print(json.dumps({"name": f"core_replay_{name}",
                          "value": round(seconds / counts[name] * 1e6, 1),
                          "unit": "us per command", "baseline": counts[name], "ratio": None}))


if __name__ == "__main__":
    main()
