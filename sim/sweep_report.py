"""What a sweep found, and how it is reported: the per-seed records, their distributions, the
human report, ``--json`` and ``--out FILE.jsonl``.

:mod:`shir.sim.sweep` runs the seeds and re-exports these names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "METRICS",
    "PERCENTILES",
    "Record",
    "SweepResult",
    "distribution",
    "format_report",
    "iter_reasons",
    "to_json",
    "write_jsonl",
]

# The distributions a sweep reports, by metric name (the names [[expect]] uses).
METRICS = (
    "max_dispatcher_gap_s",
    "max_offline_detect_s",
    "failovers",
    "jobs.redelivered",
    "jobs.unfinished",
    "jobs.dead_lettered",
)
PERCENTILES = (50, 95, 99)

# One seed's run: seed, ok, error, violations, failed expectations, times, the event log's
# hash and METRICS (built by shir.sim.sweep's workers; small and picklable).
Record = dict[str, Any]


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 (nearest rank) and max of ``values``; all None when empty."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        out[f"p{p}"] = ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else None
    out["max"] = ordered[-1] if ordered else None
    return out


@attrs.define
class SweepResult:
    """What a sweep found: one record per seed (sorted by seed) and how it ran."""

    scenario: str
    seeds: list[int]
    records: list[Record]
    where: str
    workers: int
    batch_size: int  # the largest batch
    retried: int
    wall_s: float
    startup_s: float = 0.0  # starting or reaching the workers and importing the simulator
    run_s: float = 0.0  # from the workers being ready to the last result (no start or stop)

    @property
    def failed(self) -> list[Record]:
        return [r for r in self.records if not r["ok"]]

    def distributions(self) -> dict[str, dict[str, float | None]]:
        """Per metric, its distribution over the seeds that ran to the end."""
        return {m: distribution([r["metrics"][m] for r in self.records
                                 if r["metrics"].get(m) is not None]) for m in METRICS}

    @property
    def seeds_per_s(self) -> float:
        return len(self.records) / self.wall_s if self.wall_s > 0 else math.inf

def write_jsonl(result: SweepResult, path: Path) -> None:
    """One JSON object per seed, in seed order (for notebooks: ``pandas.read_json(lines=True)``)."""
    with path.open("w", encoding="utf-8") as f:
        for r in result.records:
            f.write(json.dumps(_public(r), separators=(",", ":")) + "\n")


def _public(r: Record) -> Record:
    """A seed's record without the worker's process id."""
    return {k: v for k, v in r.items() if k != "pid"}


def iter_reasons(r: Record, limit: int = 3) -> Iterator[str]:
    """Why a seed failed: the simulator error, then violations and failed expectations."""
    if r["error"]:
        yield r["error"]
    yield from r["invariant_violations"][:limit]
    yield from r["expectations_failed"][:limit]


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def format_report(result: SweepResult, replays: dict[int, str], mark: Callable[[bool], str],
                  simulated_s: float) -> str:
    """The human report of a sweep."""
    s = result.seeds
    lines = [
        f"sweep         {result.scenario}: seeds {s[0]}..{s[-1]} ({len(result.records)} runs on "
        f"{result.where}, batches of up to {result.batch_size})",
        f"wall time     {result.wall_s:.2f} s ({result.seeds_per_s:,.1f} seeds/s; "
        f"{simulated_s:,.1f} s simulated"
        + (f"; {result.startup_s:.1f} s of it starting the workers)"
           if result.startup_s >= 0.05 else ")"),
        f"retried       {result.retried} seed{'s' if result.retried != 1 else ''} "
        "(their worker died; reruns are deterministic)",
        f"{'metric':24} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}",
    ]
    for m, d in result.distributions().items():
        lines.append(f"  {m:22} " + " ".join(f"{_fmt(d[k]):>9}" for k in ("p50", "p95", "p99",
                                                                            "max")))
    failed = result.failed
    lines.append(f"failures      {len(failed)}")
    for r in failed:
        lines.append(f"  seed {r['seed']}: {replays[r['seed']]}")
        lines += [f"      {mark(False)} {w}" for w in iter_reasons(r)]
    lines.append("result        " + ("PASS" if not failed else "FAIL"))
    return "\n".join(lines)


def to_json(result: SweepResult, replays: dict[int, str]) -> dict[str, Any]:
    """The ``--json`` report: totals, distributions, failures, and every seed."""
    failed = [dict(_public(r), replay=replays[r["seed"]]) for r in result.failed]
    return {
        "scenario": result.scenario,
        "seeds": {"first": result.seeds[0], "last": result.seeds[-1]},
        "runs": len(result.records),
        "failures": len(failed),
        "failing_seeds": [r["seed"] for r in failed],
        "failed_runs": failed,
        "where": result.where,
        "workers": result.workers,
        "batch_size": result.batch_size,
        "retried": result.retried,
        "wall_s": round(result.wall_s, 3),
        "startup_s": round(result.startup_s, 3),
        "run_s": round(result.run_s, 3),
        "seeds_per_s": round(result.seeds_per_s, 3),
        "simulated_s": round(sum(r["simulated_s"] for r in result.records), 3),
        "distributions": result.distributions(),
        "per_seed": [{"seed": r["seed"], "ok": r["ok"],
                      "event_log_sha256": r["event_log_sha256"], "metrics": r["metrics"]}
                     for r in result.records],
        "ok": not failed,
    }

