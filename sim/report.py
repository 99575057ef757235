"""Expectations: checking a run against what its scenario says must hold."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shir.sim.scenario import Expectation, Scenario

if TYPE_CHECKING:
    from shir.sim.world import RunResult

__all__ = ["evaluate"]


Row = tuple[Any, ...]


def _at(series: list[Row], t: float, key: object | None = None) -> Row | None:
    """The last entry of a time series at or before ``t`` (matching ``key`` in column 1)."""
    last = None
    for row in series:
        if row[0] > t:
            break
        if key is None or row[1] == key:
            last = row
    return last


def _check(e: Expectation, result: RunResult) -> str | None:
    """None when the expectation holds, else why not."""
    tl = result.timeline
    if e.at_s is not None and e.at_s > result.simulated_s:  # --until made the run shorter
        return f"not checked: the run ended at {result.simulated_s:g} s"
    if e.kind == "dispatcher":
        assert e.at_s is not None
        row = _at(tl["dispatcher"], e.at_s)
        actual = row[2] if row else None
        return None if actual == e.node else f"the dispatcher was {actual or 'nobody'}"
    if e.kind == "status":
        assert e.at_s is not None
        row = _at(tl["status"], e.at_s, e.node)
        actual = row[2] if row else "NeedRegistration"
        return None if actual == e.status else f"{e.node} was {actual}"
    assert e.metric is not None
    value = result.metric(e.metric)
    if value is None:
        return f"no metric {e.metric!r}"
    if e.max is not None and value > e.max:
        return f"it was {value:g}"
    if e.min is not None and value < e.min:
        return f"it was {value:g}"
    if e.equals is not None and value != e.equals:
        return f"it was {value:g}"
    return None


def evaluate(scenario: Scenario, result: RunResult) -> None:
    """Fill ``result.expectations`` with the passed and failed expectations of ``scenario``."""
    passed, failed = [], []
    for e in scenario.expect:
        why = _check(e, result)
        if why is None:
            passed.append(e.describe())
        else:
            failed.append(f"{e.describe()}: {why}")
    result.expectations = {"passed": passed, "failed": failed}
