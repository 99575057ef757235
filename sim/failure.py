"""What the cluster machine reports when a run fails, and how to replay it.

A :class:`Failure` is the failing schedule written as a scenario file (:func:`record_failure`)
with the command that replays it in the simulator; :func:`replay` runs such a file with the
machine's :class:`~shir.sim.invariants.ClusterChecks` attached, to see a violation that
``shir sim run`` does not check. ``shir.sim.testing`` re-exports the public names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import attrs

from shir.sim.invariants import ClusterChecks
from shir.sim.scenario import Scenario, load_scenario
from shir.sim.strategies import NEVER_S, to_toml
from shir.sim.world import RunResult, World

__all__ = ["SCHEDULE_DESCRIPTION", "Failure", "final_violations", "record_failure", "replay"]

SCHEDULE_DESCRIPTION = "A fault schedule found by shir.sim.testing.ClusterMachine"


def final_violations(world: World) -> list[str]:
    """The end-of-run checks of ``World.run`` (see :meth:`World.final_violations`)."""
    return world.final_violations()


def replay(scenario: Scenario | str | Path, seed: int | None = None) -> RunResult:
    """Run a scenario (or a file, or a built-in name) like ``shir sim run``, with
    :class:`ClusterChecks` attached: its violations join ``invariant_violations``."""
    from shir.sim.report import evaluate

    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    world = World(sc, seed)
    checks = ClusterChecks(world)
    result = world.run()
    result.invariant_violations.extend(checks.violations)
    evaluate(sc, result)
    return result


@attrs.frozen
class Failure:
    """The last failing run of a machine class: what failed and the schedule that replays it."""

    scenario: Scenario
    seed: int
    error: str
    trace: tuple[str, ...]  # what the machine's rules did, in order (start included)
    toml: str
    path: Path | None  # where the TOML was saved (the final, shrunk run only)

    @property
    def replay_command(self) -> str:
        """The command that replays the schedule in the simulator."""
        return f"shir sim run {self.path or 'FILE.toml'} --seed {self.seed}"

    @property
    def schedule_length(self) -> int:
        """Faults plus nodes joining after the start: the size of the schedule."""
        late = sum(1 for n in self.scenario.nodes if 0 < n.join_at_s < NEVER_S)
        return len(self.scenario.faults) + late


def record_failure(scenario: Scenario, error: BaseException, trace: Sequence[str],
                   folder: Path | None = None, prefix: str = "ClusterMachine") -> Failure:
    """``scenario``'s failure with ``error`` as a scenario file whose comment says what failed
    (and, for a violation only :class:`ClusterChecks` sees, to replay it with :func:`replay`);
    saved in ``folder`` as ``PREFIX-DIGEST.toml`` when ``folder`` is given."""
    unchecked = [c for c in ClusterChecks.CATEGORIES if f" {c}: " in str(error)]
    comment = [
        f"{SCHEDULE_DESCRIPTION}.",
        f"It failed with: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if str(error) else f"It failed with {type(error).__name__}",
    ]
    if unchecked:
        comment.append(
            f"shir sim run does not check {', '.join(unchecked)}: replay it with "
            "shir.sim.testing.replay(FILE, seed) to see the violation")
    text = to_toml(scenario, "\n".join(comment))
    path = None
    if folder is not None:
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        path = Path(folder) / f"{prefix}-{digest}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return Failure(scenario, scenario.seed, f"{type(error).__name__}: {error}", tuple(trace),
                   text, path)
