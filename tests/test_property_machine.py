"""The cluster machine (shir.sim.testing.ClusterMachine) over the real core and simulator.

- ``TestClusterMachine`` runs it with the ``shir-quick`` profile (40 examples, derandomized),
  or with the profile named by ``SHIR_HYPOTHESIS_PROFILE`` (``shir-ci``: 1000 fresh examples):

      SHIR_HYPOTHESIS_PROFILE=shir-ci .venv/bin/python -m pytest tests/test_property_machine.py

- what the machine runs replays exactly: the event log of each example hashes the same as a
  ``World`` run of its recorded scenario, and the end-of-run checks agree;
- a drain that ends early (the cluster at rest) misses nothing: run on to its longest, only
  heartbeats are received and the end-of-run checks agree;
- on failure the schedule is reported as a scenario that parses back and names its seed;
- the example of docs/property-testing.md runs;
- regression scenarios of simulator bugs the machine found (all fixed since).
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from shir.adapters.cli import main as shir_main
from shir.sim.scenario import parse_scenario
from shir.sim.testing import PROFILES, ClusterMachine, final_violations, profile
from shir.sim.world import World

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = Path(__file__).parent / "scenarios"
PROFILE = os.environ.get("SHIR_HYPOTHESIS_PROFILE") or "shir-quick"


class Cluster(ClusterMachine):
    """The machine as shipped (a subclass, so this module's settings stay its own)."""


TestClusterMachine = Cluster.test_case(PROFILE)


def test_profiles_are_registered() -> None:
    assert profile("shir-ci").max_examples >= 1000
    assert profile("shir-quick").max_examples < profile("shir-ci").max_examples
    assert set(PROFILES) == {"shir-quick", "shir-ci"}
    with pytest.raises(ValueError, match="unknown Hypothesis profile"):
        profile("nope")


class Replayed(ClusterMachine):
    """After each passing example, replay its recorded scenario in a fresh World."""

    compared = 0

    def teardown(self) -> None:
        super().teardown()
        if self.world is None or sys.exc_info()[1] is not None:
            return
        result = World(self.scenario()).run()
        assert result.event_log_sha256 == self.world.hasher.hexdigest(), self.trace
        assert result.invariant_violations == self.final
        Replayed.compared += 1


def test_every_example_replays_byte_for_byte_from_its_scenario() -> None:
    Replayed.compared = 0
    Replayed.last_failure = None
    run_state_machine_as_test(Replayed, settings=settings(
        max_examples=60, stateful_step_count=25, derandomize=True, deadline=None,
        database=None, suppress_health_check=list(HealthCheck)))
    assert Replayed.compared >= 50
    # examples Hypothesis abandoned (out of data) are no failures
    assert Replayed.last_failure is None, Replayed.last_failure.error


class DrainedOn(ClusterMachine):
    """After each passing example whose drain ended early, run on to the longest drain."""

    early = 0

    def teardown(self) -> None:
        super().teardown()
        if self.world is None or sys.exc_info()[1] is not None:
            return
        assert self._end_s is not None and self.checks is not None
        w = self.world
        late = max([f.end_s - self._end_s for f in self.faults if f.kind == "upgrade"] + [0.0])
        longest = self._end_s + self.drain_s + late
        if self.now >= longest:
            return
        seen = len(w.events_log)
        w.env.run(until=longest)
        after = sorted({type(e).__name__ for e in w.events_log[seen:]} - {"HeartbeatReceived"})
        assert not after, (after, self.trace)
        assert final_violations(w) + self.checks.violations == self.final, self.trace
        DrainedOn.early += 1


def test_a_drain_ends_early_only_when_the_rest_would_change_nothing() -> None:
    """The drain ends once the cluster is at rest; from there to its longest, only heartbeats
    may be received, and the end-of-run checks must find what they found when it ended."""
    DrainedOn.early = 0
    run_state_machine_as_test(DrainedOn, settings=settings(
        max_examples=60, stateful_step_count=25, derandomize=True, deadline=None,
        database=None, suppress_health_check=list(HealthCheck)))
    assert DrainedOn.early >= 20  # most examples come to rest before the longest drain


class Fails(ClusterMachine):
    """A machine whose end check cannot hold once a job completed."""

    def at_end(self) -> None:
        assert self.world is not None
        assert not self.world.checkers.completed_keys, "a job completed"


def test_a_failure_is_reported_as_a_replayable_scenario(tmp_path: Path) -> None:
    Fails.failure_dir = tmp_path
    with pytest.raises(AssertionError, match="a job completed"):
        run_state_machine_as_test(Fails, settings=settings(
            max_examples=100, stateful_step_count=10, derandomize=True, deadline=None,
            database=None, phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck)))
    failure = Fails.last_failure
    assert failure is not None and failure.path is not None
    assert failure.path.read_text(encoding="utf-8") == failure.toml
    scenario = parse_scenario(tomllib.loads(failure.toml), str(failure.path))
    assert attrs.evolve(scenario, source=failure.scenario.source) == failure.scenario
    assert re.fullmatch(r"shir sim run \S+\.toml --seed \d+", failure.replay_command)
    assert failure.trace[0].startswith("start with") and len(failure.trace) <= 6
    # shir sim run replays it and passes: a completed job is no invariant violation
    assert shir_main(["sim", "run", str(failure.path), "--seed", str(failure.seed)]) == 0


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(encoding="utf-8"), re.S | re.M)


def test_the_documented_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    page = ROOT / "docs" / "property-testing.md"
    blocks = python_blocks(page)
    assert blocks, "docs/property-testing.md lost its runnable example"
    namespace: dict[str, object] = {"__name__": "docs.property_testing"}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"{page} (python block {i})", "exec"), namespace)  # our own doc
    assert "examples passed" in capsys.readouterr().out


# Simulator bugs the machine found. Each scenario was shrunk by the machine, then cut down by
# hand to one node, with an expectation that says what must happen.
FIXED = [
    "regression-lost-start-session.toml",
    "regression-lost-registration-reply.toml",
    "regression-lost-finish-upgrade.toml",
]


@pytest.mark.parametrize("name", FIXED)
def test_regressions_of_fixed_simulator_bugs(name: str) -> None:
    assert shir_main(["sim", "run", str(SCENARIOS / name)]) == 0
