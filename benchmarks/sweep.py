"""Seeds per second of ``shir sim sweep`` with 1 and 2 workers, on the local process pool and on a
loopback Dask LocalCluster, all in the same run (rounds alternate between the four set-ups).

Prints JSON lines (name, value, unit, baseline, ratio), medians of the rounds:

- ``sweep_pool_2_workers``: seeds/s on the local pool with 2 workers; baseline 1 worker;
  ratio = 2 vs 1 (goal >= 1.8 on a machine with 2 idle cores).
- ``sweep_dask_2_workers``: the same on a LocalCluster of 2 worker processes.
- ``sweep_dask_overhead_per_seed``: wall ms per seed on Dask against the local pool, both with
  2 workers, from the workers being ready to the last result: what is left out on both sides
  is starting the workers and importing the simulator in them (the pool forks workers from a
  process that imported it; Dask workers import it before the clock starts). Everything else
  is in: scheduling, sending the scenario with each batch, results coming back, the
  scheduler and nannies sharing the machine's cores; ratio = dask / pool, goal <= 1.10.
  ``paired_ratio`` is the median of each round's dask / pool (run back to back, so a change
  in the machine's load between rounds cancels out).
- ``sweep_dask_cpu_per_seed``: CPU ms per seed, 2 workers, Dask against the pool: the worker
  processes (all their threads, from their first batch to their last) and the sweep's own
  process (which hosts the LocalCluster's scheduler and nannies) from the first result to the
  last. Unlike wall time it hardly moves with other work on the machine, so on a shared
  machine it says more about Dask's own cost.
- ``sweep_dask_startup``: seconds to start a LocalCluster of 2 workers (about 2.5 s idle),
  paid once per sweep; baseline = the 2-worker pool's whole run.

Each line also carries ``rounds`` and ``load_1m`` (the machine's load average when it
finished): on a shared machine, run several rounds and read the figures with the load.

    .venv/bin/python benchmarks/sweep.py [--rounds 5] [--seeds 200] [--scenario crash-mid-job]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from shir.sim.scenario import Scenario, load_scenario
from shir.sim.sweep import SweepResult, parse_cluster, run_batch, sweep


def timed_batch(scenario: Scenario, seeds: Sequence[int],
                until_s: float | None) -> list[dict[str, Any]]:
    """:func:`run_batch`, with its worker process's CPU time (every thread of it: a Dask
    worker's event loop too) before and after, on the batch's first record."""
    cpu0 = time.process_time()
    records = run_batch(scenario, seeds, until_s)
    records[0]["cpu"] = (cpu0, time.process_time())
    return records


def worker_cpu_s(r: SweepResult) -> float:
    """CPU seconds each worker process spent from its first batch's start to its last one's
    end (all its threads), summed over the workers."""
    spans: dict[int, tuple[float, float]] = {}
    for x in r.records:
        if "cpu" in x:
            a, b = x["cpu"]
            lo, hi = spans.get(x["pid"], (a, b))
            spans[x["pid"]] = (min(lo, a), max(hi, b))
    return sum(b - a for a, b in spans.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--scenario", default="crash-mid-job")
    args = ap.parse_args()
    sc = load_scenario(args.scenario)
    seeds = list(range(sc.seed, sc.seed + args.seeds))
    # a pool and its Dask twin back to back, so that each pair sees about the same load
    setups = {"pool1": (None, 1), "dask1": ("local:1", None), "pool2": (None, 2),
              "dask2": ("local:2", None)}
    run_s: dict[str, list[float]] = {k: [] for k in setups}
    cpu_s: dict[str, list[float]] = {k: [] for k in setups}
    startup_s: list[float] = []
    hashes: dict[str, list[str | None]] = {}
    for _ in range(max(1, args.rounds)):
        for name, (where, workers) in setups.items():
            mine = [0.0, 0.0]  # this process's CPU at the first and the last result

            def on_batch(_: object, mine: list[float] = mine) -> None:
                mine[0] = mine[0] or time.process_time()
                mine[1] = time.process_time()

            r = sweep(sc, seeds, cluster=parse_cluster(where, workers), batch_fn=timed_batch,
                      on_batch=on_batch)
            assert len(r.records) == len(seeds)
            run_s[name].append(r.run_s)
            # the sweep's own process hosts the LocalCluster's scheduler and nannies
            cpu_s[name].append(worker_cpu_s(r) + mine[1] - mine[0])
            if name == "dask2":
                startup_s.append(r.startup_s)
            hashes[name] = [x["event_log_sha256"] for x in r.records]
    assert all(h == hashes["pool1"] for h in hashes.values()), "hashes differ between set-ups"
    rate = {k: len(seeds) / statistics.median(v) for k, v in run_s.items()}
    ms = {k: 1000 / v for k, v in rate.items()}

    paired = statistics.median(d / p for d, p in zip(run_s["dask2"], run_s["pool2"], strict=True))
    rounds = max(1, args.rounds)
    load_1m = round(os.getloadavg()[0], 2)

    def line(name: str, value: float, unit: str, baseline: float, **more: float) -> None:
        print(json.dumps({"name": name, "value": round(value, 3), "unit": unit,
                          "baseline": round(baseline, 3),
                          "ratio": round(value / baseline, 3) if baseline else None,
                          **more, "rounds": rounds, "load_1m": load_1m}))

    line("sweep_pool_2_workers", rate["pool2"], "seeds/s", rate["pool1"])
    line("sweep_dask_2_workers", rate["dask2"], "seeds/s", rate["dask1"])
    line("sweep_dask_1_worker", rate["dask1"], "seeds/s", rate["pool1"])
    line("sweep_dask_overhead_per_seed", ms["dask2"], "ms/seed", ms["pool2"],
         paired_ratio=round(paired, 3))
    cpu_ms = {k: 1000 * statistics.median(v) / len(seeds) for k, v in cpu_s.items()}
    line("sweep_dask_cpu_per_seed", cpu_ms["dask2"], "cpu ms/seed", cpu_ms["pool2"])
    line("sweep_dask_startup", statistics.median(startup_s), "s",
         statistics.median(run_s["pool2"]))


if __name__ == "__main__":
    main()
