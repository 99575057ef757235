"""Seeds per second of ``shir sim sweep`` with 1 and 2 workers, on the local process pool and on a
loopback Dask LocalCluster, all in the same run (rounds alternate between the four set-ups).

Prints JSON lines (name, value, unit, baseline, ratio), medians of the rounds:

- ``sweep_pool_2_workers``: seeds/s on the local pool with 2 workers; baseline 1 worker;
  ratio = 2 vs 1 (goal >= 1.8 on a machine with 2 idle cores).
- ``sweep_dask_2_workers``: the same on a LocalCluster of 2 worker processes.
- ``sweep_dask_overhead_per_seed``: wall ms per seed on Dask against the local pool, both with
  2 workers, from the workers being ready to the last result (the cluster's start, about 2.5 s,
  is reported apart as ``sweep_dask_startup``); ratio = dask / pool, goal <= 1.10.
- ``sweep_dask_startup``: seconds to start a LocalCluster of 2 workers; baseline the pool's
  first-result latency is not comparable, so baseline = the 2-worker pool's whole sweep.

    .venv/bin/python benchmarks/sweep.py [--rounds 2] [--seeds 200] [--scenario crash-mid-job]
"""

from __future__ import annotations

import argparse
import json
import statistics

from shir.sim.scenario import load_scenario
from shir.sim.sweep import parse_cluster, sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--scenario", default="crash-mid-job")
    args = ap.parse_args()
    sc = load_scenario(args.scenario)
    seeds = list(range(sc.seed, sc.seed + args.seeds))
    setups = {"pool1": (None, 1), "pool2": (None, 2), "dask1": ("local:1", None),
              "dask2": ("local:2", None)}
    run_s: dict[str, list[float]] = {k: [] for k in setups}
    startup_s: list[float] = []
    hashes: dict[str, list[str | None]] = {}
    for _ in range(max(1, args.rounds)):
        for name, (where, workers) in setups.items():
            r = sweep(sc, seeds, cluster=parse_cluster(where, workers))
            assert len(r.records) == len(seeds)
            run_s[name].append(r.run_s)
            if name == "dask2":
                startup_s.append(r.startup_s)
            hashes[name] = [x["event_log_sha256"] for x in r.records]
    assert all(h == hashes["pool1"] for h in hashes.values()), "hashes differ between set-ups"
    rate = {k: len(seeds) / statistics.median(v) for k, v in run_s.items()}
    ms = {k: 1000 / v for k, v in rate.items()}

    def line(name: str, value: float, unit: str, baseline: float) -> None:
        print(json.dumps({"name": name, "value": round(value, 3), "unit": unit,
                          "baseline": round(baseline, 3),
                          "ratio": round(value / baseline, 3) if baseline else None}))

    line("sweep_pool_2_workers", rate["pool2"], "seeds/s", rate["pool1"])
    line("sweep_dask_2_workers", rate["dask2"], "seeds/s", rate["dask1"])
    line("sweep_dask_1_worker", rate["dask1"], "seeds/s", rate["pool1"])
    line("sweep_dask_overhead_per_seed", ms["dask2"], "ms/seed", ms["pool2"])
    line("sweep_dask_startup", statistics.median(startup_s), "s",
         statistics.median(run_s["pool2"]))


if __name__ == "__main__":
    main()
