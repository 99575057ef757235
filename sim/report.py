"""A run against its scenario: the expectations checked, and the human report of the run."""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING, Any, TextIO

from shir.sim.scenario import Expectation, Scenario

if TYPE_CHECKING:
    from shir.sim.world import RunResult

__all__ = ["MAX_LISTED", "evaluate", "fault_report", "format_report", "listed", "mark",
           "not_joined"]

MAX_LISTED = 20  # items of a list shown in a human report; --json has them all


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


# --- the human report ---------------------------------------------------------------------

def mark(ok: bool, stream: TextIO) -> str:
    """A check mark, or plain words when the terminal's encoding has no such glyphs."""
    glyph = "✓" if ok else "✗"
    try:
        glyph.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "ok  " if ok else "FAIL"
    return glyph


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:,.0f} s"


def fault_report(result: RunResult, scenario: Scenario) -> dict[str, list[str]]:
    """The faults that started in a run, and the scripted ones that did not (``--until`` ended
    the workload first): each as its one-line description."""
    end = result.duration_s
    started = []
    for f in result.timeline.get("faults_started", ()):
        cut = f.duration_s and f.at_s + f.duration_s > end
        started.append(f.describe() + (f" (healed at {end:g}s: the workload ended)" if cut else ""))
    not_run = [f.describe() for f in scenario.faults if f.at_s >= end]
    return {"started": started, "not_run": not_run}


def not_joined(result: RunResult, scenario: Scenario) -> list[str]:
    """Nodes whose ``join_at_s`` is after the run's end: they never joined."""
    return [n.name for n in scenario.nodes if n.join_at_s > result.simulated_s]


def listed(items: list[str], prefix: str) -> list[str]:
    """Report lines for ``items``, each after ``prefix``, the first ``MAX_LISTED`` of them."""
    lines = [f"  {prefix}{x}" for x in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more (--json lists them all)")
    return lines


def format_report(result: RunResult, scenario: Scenario, out: TextIO) -> str:
    """The human report of one run."""
    j = result.jobs
    speed = result.simulated_s / result.wall_s if result.wall_s > 0 else math.inf
    lines = [f"scenario      {scenario.name}"]
    if scenario.description:
        lines += textwrap.wrap(scenario.description, 100, initial_indent=" " * 14,
                               subsequent_indent=" " * 14)
    lines += [
        f"seed          {result.seed}",
        f"time          {_fmt_s(result.simulated_s)} simulated in {result.wall_s:.2f} s wall "
        f"({speed:,.0f}x real time)",
        f"events        {result.events:,}, sha256 {result.event_log_sha256}",
        f"jobs          {j['submitted']:,} submitted, {j['completed']:,} completed, "
        f"{j['dead_lettered']} dead-lettered, {j.get('unfinished', 0)} unfinished, "
        f"{j['lost']} lost, {j['duplicate_effects']} duplicate effects",
        f"failovers     {result.failovers}",
        f"max gaps      dispatcher {result.max_dispatcher_gap_s:.1f} s, "
        f"offline detection {result.max_offline_detect_s:.1f} s",
        "refusals      " + (", ".join(f"{k} {v}" for k, v in result.refusals.items()) or "none"),
    ]
    faults = fault_report(result, scenario)
    lines.append(f"faults        {len(faults['started'])} started" if faults["started"]
                 else "faults        none started")
    lines += listed(faults["started"], "")
    if faults["not_run"]:
        lines.append(f"  not run: {len(faults['not_run'])} scripted at or after the workload's "
                     f"end ({_fmt_s(result.duration_s)}):")
        lines += listed(faults["not_run"], "  ")
    late = not_joined(result, scenario)
    if late:
        lines.append(f"not joined    {', '.join(late)} (join_at_s after the run's end)")
    for node, why in result.join_refused.items():  # the registration the core refused last
        lines.append(f"not joined    {node}: {why}")
    exp = result.expectations
    if exp["passed"] or exp["failed"]:
        lines.append(f"expectations  {len(exp['passed'])} passed, {len(exp['failed'])} failed")
        lines += [f"  {mark(True, out)} {e}" for e in exp["passed"]]
        lines += [f"  {mark(False, out)} {e}" for e in exp["failed"]]
    else:
        lines.append("expectations  none in this scenario")
    v = result.invariant_violations
    if v:
        lines.append(f"invariants    {len(v)} violated")
        lines += listed(v, f"{mark(False, out)} ")
    else:
        lines.append("invariants    all held")
    if result.monitoring:  # the monitoring view at the end of the run (shir.core.monitoring)
        lines += ["monitoring", textwrap.indent(result.monitoring, "  ")]
    lines.append("result        " + ("PASS" if result.ok else "FAIL"))
    return "\n".join(lines)
