"""What one job assignment costs with 1k, 10k and 100k jobs queued: it must not grow with them.

Four nodes of 32 slots each (16 cores, 32 GiB: the default limit is 32). For each queue size, a
runtime is set up with that many jobs queued; then, repeatedly, the dispatcher's
``DispatchJobs`` fills all 128 slots and its events are folded (timed: ``decide`` + ``fold``),
and the 128 jobs are completed and 128 new ones submitted, so the queue keeps its size (not
timed). The value is microseconds per ``JobLeased`` (per assignment decision): the timed
time of a round's fills divided by the jobs they leased, median of the rounds. Rounds alternate
between the queue sizes so all three see the same conditions. Time is the thread's CPU time
(``time.thread_time``), so other processes on a busy machine do not count; the garbage
collector is off while timing, as ``timeit`` does, so what is measured is the decision, not
collection of the long-lived queue.

Prints one JSON object per line: ``name``, ``value`` (us per assignment), ``unit``,
``baseline`` (the 1k figure of the same run) and ``ratio`` (value / baseline: flat is ~1.0),
then a one-line summary on stderr.

    .venv/bin/python benchmarks/assign.py [--rounds 7] [--fills 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

from shir.core import (
    AuthKey,
    CompleteJob,
    CreateRuntime,
    DispatchJobs,
    Heartbeat,
    JobLeased,
    KeyName,
    NodeMetrics,
    RegisterNode,
    RuntimeState,
    SubmitJob,
    concurrency_limit,
    decide,
    fold,
    handle,
    initial,
)

NODES = ("n1", "n2", "n3", "n4")
SLOTS = 32
CORES, MEMORY_MB = 16, 32 * 1024  # default limit min(2 x 16, 32 GiB) = 32
SIZES = (1_000, 10_000, 100_000)


class Runtime:
    """One runtime with ``queued`` jobs waiting, driven through the public API."""

    def __init__(self, queued: int) -> None:
        rng = random.Random(1)
        k1, k2 = (AuthKey.from_seed("rt-b", k, 1, rng.randbytes(48)) for k in KeyName)
        self.state: RuntimeState = initial()
        self.now = 0.0
        self.jobs = 0
        self.run(CreateRuntime("rt-b", "factory-b", "bench", k1, k2, 0.0))
        for n in NODES:
            self.run(RegisterNode(k1.text, n, f"m-{n}", CORES, MEMORY_MB, 0.0,
                                  NodeMetrics(remote_access=True)))
        self.heartbeat(1.0)
        assert self.state.dispatcher == "n1"
        assert all(concurrency_limit(self.state, n) == SLOTS for n in NODES)
        self.submit(queued)

    def run(self, command: object) -> tuple[object, ...]:
        d = handle(self.state, command)
        self.state = d.state
        return d.events

    def heartbeat(self, at: float) -> None:
        self.now = at
        for n in NODES:
            peers = tuple(p for p in NODES if p != n)
            metrics = NodeMetrics(available_memory_mb=MEMORY_MB, version="5.0",
                                  reachable_peers=peers, remote_access=True)
            self.run(Heartbeat(n, 1, metrics, at))

    def submit(self, n: int) -> None:
        for _ in range(n):
            self.jobs += 1
            self.run(SubmitJob(f"job-{self.jobs}", f"key-{self.jobs}", self.now, size_mb=64.0))

    def fill(self) -> tuple[float, int]:
        """Fill every free slot (timed: decide + fold); complete those jobs and top the queue
        up again (untimed). Returns (seconds, jobs leased)."""
        command = DispatchJobs("n1", self.state.term, self.now)
        state = self.state
        start = time.thread_time()
        events = decide(state, command)
        self.state = fold(state, events)
        elapsed = time.thread_time() - start
        leased = [e for e in events if type(e) is JobLeased]
        assert len(leased) == len(events) == len(NODES) * SLOTS, "every slot filled, no more"
        for e in leased:
            self.run(CompleteJob(e.token, self.now))
        self.submit(len(leased))
        self.heartbeat(self.now + 1.0)
        return elapsed, len(leased)


def one_round(rt: Runtime, fills: int) -> float:
    """Microseconds per assignment over ``fills`` fills."""
    seconds, leased = 0.0, 0
    gc.collect()
    gc.disable()
    try:
        for _ in range(fills):
            s, n = rt.fill()
            seconds += s
            leased += n
    finally:
        gc.enable()
    return seconds / leased * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds (>= 5); the median counts")
    parser.add_argument("--fills", type=int, default=10, help="128-slot fills per round")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")

    runtimes = {n: Runtime(n) for n in SIZES}
    for rt in runtimes.values():  # warm up: caches, the first fill's allocations
        one_round(rt, 1)
    samples: dict[int, list[float]] = {n: [] for n in SIZES}
    for _ in range(args.rounds):
        for n, rt in runtimes.items():
            samples[n].append(one_round(rt, args.fills))
    for n, rt in runtimes.items():
        queued = rt.state.jobs.queued()
        assert queued == n, f"the queue should stay at {n}, is {queued}"

    medians = {n: statistics.median(v) for n, v in samples.items()}
    baseline = medians[SIZES[0]]
    for n in SIZES:
        print(json.dumps({
            "name": f"assign_{n // 1000}k_queued",
            "value": round(medians[n], 3),
            "unit": "us/assignment",
            "baseline": round(baseline, 3),
            "ratio": round(medians[n] / baseline, 3),
        }))
    summary = ", ".join(
        f"{n // 1000}k queued {medians[n]:.2f} us (x{medians[n] / baseline:.2f})" for n in SIZES
    )
    print(f"assign: {summary} per assignment (decide + fold), 4 nodes x {SLOTS} slots, "
          f"median of {args.rounds} rounds of {args.fills} fills", file=sys.stderr)


if __name__ == "__main__":
    main()
