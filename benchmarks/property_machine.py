"""Examples per second of the cluster machine, against a trivial three-rule state machine.

Both run through Hypothesis' own ``run_state_machine_as_test`` with the same settings (the
generate phase only, derandomized so every round draws the same examples, no database, the
same number of examples and steps per example), in alternating rounds, so both see the same
conditions. The trivial machine keeps a counter with
three rules (add, subtract, reset) and one invariant: what it costs is Hypothesis' own
overhead per example. The cluster machine adds a SimPy World driving the core, the invariant
checks and, at teardown, the heal, the drain (until the cluster is at rest, 60 s at most) and
the end-of-run checks.

Prints JSON lines (name, value, unit, baseline, ratio), medians of the rounds:

- ``property_machine``: cluster-machine examples per second; baseline the trivial machine's;
  ratio = cluster / trivial (goal >= 0.5).
- ``property_machine_steps``: the same, per rule executed (steps per second), since the two
  machines may not run the same number of steps per example.

    .venv/bin/python benchmarks/property_machine.py [--rounds 5] [--examples 100] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from shir.sim.testing import ClusterMachine


class Counter(RuleBasedStateMachine):
    """The trivial baseline: three rules and an invariant over one integer."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    @rule(k=st.integers(0, 10))
    def add(self, k: int) -> None:
        self.n += k

    @rule(k=st.integers(0, 10))
    def subtract(self, k: int) -> None:
        self.n -= k

    @rule()
    def reset(self) -> None:
        self.n = 0

    @invariant()
    def bounded(self) -> None:
        assert -1000 <= self.n <= 1000


class _Counted:
    """Counts the rules run by every example of the counted machines."""

    steps = 0


def counted(machine: type[RuleBasedStateMachine]) -> type[RuleBasedStateMachine]:
    """A subclass that counts its steps (Hypothesis checks invariants after each rule, and
    once before the first)."""

    class Counting(machine):  # type: ignore[valid-type,misc]
        failure_dir = None

        def check_invariants(self, *args: object, **kwargs: object) -> None:
            _Counted.steps += 1
            super().check_invariants(*args, **kwargs)  # type: ignore[arg-type]

    Counting.__name__ = machine.__name__
    return Counting


def rate(machine: type[RuleBasedStateMachine], examples: int, steps: int) -> tuple[float, float]:
    """(examples per second, rules per second) of one run."""
    s = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                 database=None, phases=[Phase.generate], derandomize=True,
                 suppress_health_check=list(HealthCheck))
    _Counted.steps = 0
    started = time.perf_counter()
    run_state_machine_as_test(machine, settings=s)
    wall = time.perf_counter() - started
    return examples / wall, (_Counted.steps - examples) / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="stateful_step_count of both")
    args = p.parse_args(argv)
    cluster, trivial = counted(ClusterMachine), counted(Counter)
    rate(cluster, 5, args.steps)  # warm up: imports, strategy caches
    rate(trivial, 5, args.steps)
    ex: dict[str, list[float]] = {"cluster": [], "trivial": []}
    per_step: dict[str, list[float]] = {"cluster": [], "trivial": []}
    for _ in range(args.rounds):
        for name, machine in (("cluster", cluster), ("trivial", trivial)):
            e, r = rate(machine, args.examples, args.steps)
            ex[name].append(e)
            per_step[name].append(r)
    for name, unit, data in (("property_machine", "examples/s", ex),
                             ("property_machine_steps", "steps/s", per_step)):
        value, base = statistics.median(data["cluster"]), statistics.median(data["trivial"])
        print(json.dumps({"name": name, "value": round(value, 1), "unit": unit,
                          "baseline": round(base, 1), "ratio": round(value / base, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
