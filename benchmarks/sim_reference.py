"""How fast the simulator runs the `reference` scenario, against a bare SimPy model of that work.

The bare model has the same shape as shir's world with the core taken out: four nodes with a
heartbeat process each, Poisson job arrivals at 10/s, exponential durations (mean 30 s), a
dispatcher that is nudged and coalesces nudges, messages with latency, renewals every half lock,
completions. It keeps a queue and per-node counts and nothing else: no decisions, no event log,
no invariants, no faults. shir's run checks every invariant after every step and replays the
log at the end.

Prints JSON lines (name, value, unit, baseline, ratio), medians of the rounds, which alternate:

- ``sim_reference_speed``: simulated seconds per wall second (goal >= 1000), baseline the bare
  model's, ratio = shir / bare.
- ``sim_reference_wall``: wall seconds of one run, baseline the bare model's, ratio = shir / bare
  (goal <= 3).
- ``sim_reference_core``: of one more run per round, the seconds spent in the core's work alone:
  in the world's ``Driver`` (``handle``, ``handle_all``, ``deadline``: decide, the store's
  ``append``, fold, effects, answers, the next deadline), less its listeners (simulator code);
  baseline the bare model's wall seconds. Its ratio is a floor for ``sim_reference_wall``'s:
  however lean the simulator, the run cannot take less than the core's own work.

    .venv/bin/python benchmarks/sim_reference.py [--rounds 3] [--until 3600]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections import deque
from collections.abc import Callable

import simpy

from shir.sim.scenario import Scenario, load_scenario
from shir.sim.world import run


def bare_model(sc: Scenario, until_s: float) -> float:
    """Run the bare model; return simulated seconds."""
    env = simpy.Environment()
    rng = random.Random(1)
    latency, jitter = sc.network.latency_s, sc.network.jitter_s
    hb = sc.settings.heartbeat_interval_s
    renew_every = sc.settings.lock_duration_s / 2
    limits = {n.name: n.concurrency_limit or 32 for n in sc.nodes}
    running = dict.fromkeys(limits, 0)
    queue: deque[float] = deque()
    nudge_pending = [False]

    def later(delay: float, fn: Callable[[], None]) -> None:
        env.timeout(delay).callbacks.append(lambda _e: fn())

    def send(fn: Callable[[], None]) -> None:
        later(latency + rng.random() * jitter, fn)

    def heartbeat(name: str):  # type: ignore[no-untyped-def]
        while True:
            send(lambda: None)
            yield env.timeout(hb)

    def nudge() -> None:
        if not nudge_pending[0]:
            nudge_pending[0] = True
            later(0.25, lambda: send(dispatch))

    def dispatch() -> None:
        nudge_pending[0] = False
        for name in limits:
            while queue and running[name] < limits[name]:
                work = queue.popleft()
                running[name] += 1
                send(lambda n=name, w=work: start(n, w))

    def start(name: str, work: float) -> None:
        end = env.now + work
        arm(name, end)

    def arm(name: str, end: float) -> None:
        later(min(end, env.now + renew_every) - env.now, lambda: fire(name, end))

    def fire(name: str, end: float) -> None:
        if env.now >= end:
            send(lambda: complete(name))
        else:
            send(lambda: None)  # renewal
            arm(name, end)

    def complete(name: str) -> None:
        running[name] -= 1
        nudge()

    def workload():  # type: ignore[no-untyped-def]
        wl = sc.workload
        while True:
            yield env.timeout(rng.expovariate(wl.rate_per_s))
            if env.now >= sc.duration_s:
                return
            queue.append(rng.expovariate(1.0 / wl.duration.mean_s))
            nudge()

    for n in sc.nodes:
        env.process(heartbeat(n.name))
    env.process(workload())
    env.run(until=until_s)
    return env.now


def core_seconds(sc: Scenario, until_s: float | None) -> float:
    """Run once with the core's work timed; return the seconds spent in it.

    The core's work is everything the world's ``Driver`` does when the simulator calls it
    (``handle``, ``handle_all``, ``deadline``: decide, the store's append, fold, effects,
    answers, next deadline), less the time in its listeners, which are the simulator's own
    code. Timing the Driver's entry points rather than each core function inside them costs
    fewer clock reads and cannot miss a step the Driver takes.
    """
    from shir.sim.world import World

    spent = [0.0]
    depth = [0]
    clock = time.perf_counter

    def timed(fn: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            depth[0] += 1
            if depth[0] > 1:  # re-entered from a listener: already counted by the outer call
                try:
                    return fn(*args)
                finally:
                    depth[0] -= 1
            start = clock()
            try:
                return fn(*args)
            finally:
                spent[0] += clock() - start
                depth[0] -= 1
        return call

    def untimed(fn: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            start = clock()
            try:
                return fn(*args)
            finally:
                spent[0] -= clock() - start
        return call

    world = World(sc, None, until_s)
    d = world.driver
    d.handle = timed(d.handle)  # type: ignore[method-assign]
    d.handle_all = timed(d.handle_all)  # type: ignore[method-assign]
    d.deadline = timed(d.deadline)  # type: ignore[method-assign]
    d.listeners = [untimed(f) for f in d.listeners]
    world.run()
    return spent[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--until", type=float, default=None, help="simulated seconds (default: all)")
    args = ap.parse_args()
    sc = load_scenario("reference")
    total = (args.until or sc.duration_s) + sc.drain_s
    ours, bare, cores = [], [], []
    for _ in range(args.rounds):
        gc.collect()
        t = time.perf_counter()
        bare_model(sc, total)
        bare.append(time.perf_counter() - t)
        gc.collect()
        t = time.perf_counter()
        result = run(sc, until_s=args.until)
        ours.append(time.perf_counter() - t)
        if not result.ok:
            raise SystemExit(f"the reference run failed: {result.to_json()}")
        gc.collect()
        cores.append(core_seconds(sc, args.until))
    wall, wall_bare = statistics.median(ours), statistics.median(bare)
    speed, speed_bare = result.simulated_s / wall, total / wall_bare
    core = statistics.median(cores)
    for name, value, unit, baseline in (
        ("sim_reference_speed", speed, "simulated s per wall s", speed_bare),
        ("sim_reference_wall", wall, "s", wall_bare),
        ("sim_reference_core", core, "s", wall_bare),
    ):
        print(json.dumps({"name": name, "value": round(value, 3), "unit": unit,
                          "baseline": round(baseline, 3), "ratio": round(value / baseline, 3)}))


if __name__ == "__main__":
    main()
