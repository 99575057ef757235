"""The cluster machine catches real bugs: deliberately broken variants of the core.

Each variant is patched into ``shir.core`` for one test only (monkeypatch), then the unchanged
:class:`~shir.sim.testing.ClusterMachine` runs against it. The test asserts that Hypothesis
finds the bug, that it shrank to a short schedule, and that the schedule replays in the
simulator: it fails against the broken core and passes against the real one.

- ``fencing disabled``: a ``DispatchJobs`` under a term that is over is served (as if its
  sender were still the dispatcher) instead of being refused with ``StaleTerm``;
- ``completion not idempotent``: a second ``CompleteJob`` with the token that already
  completed the job emits another ``JobCompleted`` (and folding counts it again);
- ``leases kept on Offline``: the merged ``RULES`` get a lease rule that skips ``NODE_LOST``:
  a node that goes Offline keeps its leases until they expire.

``tests/scenarios/regression-completion-not-idempotent.toml`` is the shrunk schedule of the
second, checked in: ``shir sim run`` fails on it against that variant and passes on the core.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from shir.adapters.cli import main as shir_main
from shir.core.jobs import JobCompleted, ReleaseReason
from shir.core.leasing import CompleteJob, DispatchJobs, lease_end
from shir.sim.testing import ClusterMachine, replay

decide_module = importlib.import_module("shir.core.decide")
leasing_module = importlib.import_module("shir.core.leasing")

SCENARIOS = Path(__file__).parent / "scenarios"
HUNT = settings(
    max_examples=300,
    stateful_step_count=20,
    deadline=None,
    database=None,
    derandomize=True,  # the same examples every run: the test is deterministic
    phases=[Phase.generate, Phase.shrink],
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)
MAX_SCHEDULE = 6  # faults and late joins in the shrunk schedule
MAX_RULES = 10  # rules the shrunk example ran: start, injections, time steps


# --- the broken variants -----------------------------------------------------------------

def fencing_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    dispatch = leasing_module._dispatch

    def unfenced(m: Any, c: DispatchJobs, k: Any) -> list[object]:
        if c.term < m.term and m.dispatcher is not None:
            c = attrs.evolve(c, term=m.term, node=m.dispatcher)  # the stale sender is served
        return dispatch(m, c, k)

    monkeypatch.setitem(decide_module.DECIDE, DispatchJobs, unfenced)


def completion_not_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    complete = leasing_module._complete
    evolve_completed = decide_module.EVOLVE[JobCompleted]

    def complete_again(m: Any, c: CompleteJob, k: Any) -> list[object]:
        b = m.jobs
        if c.token.job_id not in b.jobs and b.recent_jobs.get(c.token.job_id) == c.token:
            key = next(k for k, (token, _at) in b.recent.items() if token == c.token)
            return [JobCompleted(c.token, key, c.at)]  # instead of "already done: nothing"
        return complete(m, c, k)

    def count_again(m: Any, e: JobCompleted) -> None:
        if e.token.job_id not in m.jobs.leases:
            m.jobs.completed += 1
            return
        evolve_completed(m, e)

    monkeypatch.setitem(decide_module.DECIDE, CompleteJob, complete_again)
    monkeypatch.setitem(decide_module.EVOLVE, JobCompleted, count_again)


def leases_kept_on_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def end_leases(s: Any, at: float) -> tuple[list[object], float | None]:
        out: list[object] = [  # expiry only: no NODE_LOST
            lease_end(s, lease, ReleaseReason.EXPIRED,
                      f"lease expired at {lease.expires_at:g} s without renewal", at)
            for lease in s.jobs.expired(at) if lease.token.job_id not in s.pending
        ]
        return out, s.jobs.next_expiry()

    rules = tuple(
        attrs.evolve(r, due=end_leases) if r.due is leasing_module.end_leases else r
        for r in decide_module.RULES
    )
    assert rules != decide_module.RULES
    monkeypatch.setattr(decide_module, "RULES", rules)


Variant = Callable[[pytest.MonkeyPatch], None]


def hunt(variant: Variant, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Run a fresh subclass of the machine against ``variant``; return its shrunk failure."""

    class Hunted(ClusterMachine):
        failure_dir = tmp_path

    variant(monkeypatch)
    with pytest.raises(Exception):  # noqa: B017 - any failure Hypothesis reports
        run_state_machine_as_test(Hunted, settings=HUNT)
    failure = Hunted.last_failure
    assert failure is not None and failure.path is not None
    return failure


@pytest.mark.parametrize(("variant", "found_as"), [
    (fencing_disabled, "fencing: node-1 dispatched under term 1"),
    (completion_not_idempotent, "effects: idempotency key"),
    (leases_kept_on_offline, "offline-leases:"),
], ids=["fencing-disabled", "completion-not-idempotent", "leases-kept-on-offline"])
def test_the_machine_catches_and_shrinks_a_broken_core(
    variant: Variant, found_as: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    failure = hunt(variant, monkeypatch, tmp_path)
    assert found_as in failure.error, failure.error
    assert failure.schedule_length <= MAX_SCHEDULE, failure.toml
    assert len(failure.trace) <= MAX_RULES, failure.trace
    assert f"--seed {failure.seed}" in failure.replay_command
    # the saved schedule replays to the same failure against the broken core...
    broken = replay(failure.path, failure.seed)
    assert any(found_as in v for v in broken.invariant_violations), broken.invariant_violations
    # ...and holds against the real one
    monkeypatch.undo()
    real = replay(failure.path, failure.seed)
    assert real.ok, real.invariant_violations


REGRESSION = SCENARIOS / "regression-completion-not-idempotent.toml"


def test_the_checked_in_regression_fails_on_the_broken_core_and_passes_on_the_real_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    assert shir_main(["sim", "run", str(REGRESSION)]) == 0, capsys.readouterr().out
    completion_not_idempotent(monkeypatch)
    assert shir_main(["sim", "run", str(REGRESSION)]) == 1
    out = capsys.readouterr().out
    assert "completed twice" in out and "shir sim run" in out
