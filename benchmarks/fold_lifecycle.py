"""How fast a recorded 4-node lifecycle stream folds, against a plain-dict fold of the same events.

The stream is recorded by driving the core as a host would (seeded, so every run folds the same
events): four nodes heartbeat every 10 s with varying metrics, and now and then a node
hibernates for a few minutes (Offline, failover, rejoin under a new session), loses its control
channel (Limited, failover), or is updated (one node at a time, some updates fail and roll
back); the host ticks at every deadline. It runs until at least ``--events`` events exist
(60 000 by default: about 40 simulated hours; heartbeats are most of it, as in a real log).

Then, in alternating rounds, it times:

- ``fold(initial(), events)``: shir's replay (the value);
- ``fold_lifecycle``'s baseline, a plain-dict fold of the same list keeping the last event per
  (type, node): ``last[type(e), getattr(e, "node", None)] = e``, about the least a reducer that
  tells nodes apart can do (the goal is a ratio >= 0.25);
- ``fold_lifecycle_vs_bare_dict``'s baseline, ``last[type(e)] = e``: a floor, not a reducer.

Prints one JSON object per line: ``name``, ``value`` (events/s through shir's fold, median of
the rounds), ``unit``, ``baseline`` (events/s of the dict fold, same run) and ``ratio`` (value /
baseline). Time is the thread's CPU time with the garbage collector off,
as ``timeit`` does. A summary of the stream goes to stderr. ``--profile`` prints where shir's
fold spends its time instead.

    .venv/bin/python benchmarks/fold_lifecycle.py [--rounds 7] [--events 60000] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from shir.core import (
    AuthKey,
    CreateRuntime,
    DomainError,
    FinishUpgrade,
    Heartbeat,
    KeyName,
    NodeMetrics,
    RegisterNode,
    StartSession,
    StartUpgrade,
    Tick,
    fold,
    handle,
    initial,
    next_deadline,
)

NODES = ("n1", "n2", "n3", "n4")
HEARTBEAT_S = 10.0


class Recorder:
    """Drives one runtime through the public API and keeps every event (a host's log)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        keys = [AuthKey.from_seed("rt-bench", k, 1, self.rng.randbytes(48)) for k in KeyName]
        self.state = initial()
        self.events: list[object] = []
        self.now = 0.0
        self.send(CreateRuntime("rt-bench", "factory-1", "bench", keys[0], keys[1], 0.0))
        self.sessions: dict[str, int] = {}
        self.version = {n: "5.44" for n in NODES}
        self.control_ok = dict.fromkeys(NODES, True)
        self.asleep_until = dict.fromkeys(NODES, 0.0)
        self.glitch_ends: dict[str, float] = {}
        for i, n in enumerate(NODES):
            self.send(RegisterNode(keys[i % 2].text, n, f"machine-{n}", 8, 16_384, float(i),
                                   NodeMetrics(remote_access=True)))
            self.sessions[n] = 1
        self.upgrading: str | None = None
        self.upgrade_done_at = 0.0

    def send(self, command: object) -> None:
        try:
            d = handle(self.state, command)
        except DomainError:
            return  # e.g. an update refused because its node is Offline: a host moves on
        self.state = d.state
        self.events.extend(d.events)
        for fx in d.effects:
            if isinstance(fx, StartSession):
                self.sessions[fx.node] = fx.session

    def metrics(self, node: str) -> NodeMetrics:
        r = self.rng
        return NodeMetrics(
            cpu_pct=round(r.uniform(5, 95), 1),
            available_memory_mb=r.randrange(2_048, 12_288, 64),
            running_jobs=r.randrange(0, 16),
            version=self.version[node],
            reachable_peers=tuple(p for p in NODES if p != node),
            remote_access=True,
            control_channel_ok=self.control_ok[node],
            config_hash="cfg-1",
        )

    def step(self, t: float) -> None:
        """One heartbeat period: faults start or end, awake nodes heartbeat, deadlines tick."""
        r = self.rng
        if r.random() < 0.004:  # a machine hibernates for 1-10 minutes
            self.asleep_until[r.choice(NODES)] = t + r.uniform(60, 600)
        if r.random() < 0.003:  # a control-channel outage of 0.5-5 minutes
            n = r.choice(NODES)
            self.control_ok[n] = False
            self.glitch_ends[n] = t + r.uniform(30, 300)
        for n, end in list(self.glitch_ends.items()):
            if t >= end:
                self.control_ok[n] = True
                del self.glitch_ends[n]
        if self.upgrading is None and r.random() < 0.002:
            n = r.choice(NODES)
            to = f"5.{int(self.version[n].split('.')[1]) + 1}"
            self.send(StartUpgrade(n, to, t))
            if self.state.node(n) and self.state.node(n).upgrading_to == to:
                self.upgrading, self.upgrade_done_at = n, t + r.uniform(60, 180)
        if self.upgrading is not None and t >= self.upgrade_done_at:
            n, ok = self.upgrading, r.random() < 0.8
            target = self.state.node(n).upgrading_to
            self.send(FinishUpgrade(n, ok, t))
            if ok:
                self.version[n] = target
            self.upgrading = None
        for i, n in enumerate(NODES):
            if n == self.upgrading or t < self.asleep_until[n]:
                continue
            at = t + i * 0.25  # nodes are not in lockstep
            self.tick_until(at)
            self.send(Heartbeat(n, self.sessions[n], self.metrics(n), at))

    def tick_until(self, t: float) -> None:
        while (deadline := next_deadline(self.state)) is not None and deadline <= t:
            self.send(Tick(deadline))

    def record(self, at_least: int) -> list[object]:
        t = 10.0
        while len(self.events) < at_least:
            self.step(t)
            t += HEARTBEAT_S
        self.now = t
        return self.events


def shir_fold(events: Sequence[object]) -> object:
    return fold(initial(), events)


def dict_fold(events: Sequence[object]) -> object:
    last: dict[tuple[type, object], object] = {}
    for e in events:
        last[type(e), getattr(e, "node", None)] = e
    return last


def bare_dict_fold(events: Sequence[object]) -> object:
    last: dict[type, object] = {}
    for e in events:
        last[type(e)] = e
    return last


def timed(fn: Callable[[Sequence[object]], object], events: Sequence[object]) -> float:
    """Events per second of thread CPU time, GC off."""
    gc.collect()
    gc.disable()
    try:
        start = time.thread_time()
        fn(events)
        elapsed = time.thread_time() - start
    finally:
        gc.enable()
    return len(events) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median is reported")
    parser.add_argument("--events", type=int, default=60_000, help="events to record (at least)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile shir's fold, then exit")
    args = parser.parse_args()

    rec = Recorder(args.seed)
    events = rec.record(args.events)
    assert shir_fold(events) == rec.state, "the recorded stream must refold to the driven state"
    kinds = collections.Counter(type(e).__name__ for e in events)
    print(
        f"{len(events)} events over {rec.now / 3600:.1f} simulated hours: "
        + ", ".join(f"{k} {v}" for k, v in kinds.most_common()),
        file=sys.stderr,
    )

    if args.profile:
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            shir_fold(events)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(12)
        return

    ours, theirs, bare = [], [], []
    for _ in range(args.rounds):  # alternating, so drift hits all three alike
        ours.append(timed(shir_fold, events))
        theirs.append(timed(dict_fold, events))
        bare.append(timed(bare_dict_fold, events))
    value = statistics.median(ours)
    for name, baseline in (
        ("fold_lifecycle", statistics.median(theirs)),
        ("fold_lifecycle_vs_bare_dict", statistics.median(bare)),
    ):
        print(json.dumps({
            "name": name,
            "value": round(value),
            "unit": "events/s",
            "baseline": round(baseline),
            "ratio": round(value / baseline, 3),
        }))


if __name__ == "__main__":
    main()
