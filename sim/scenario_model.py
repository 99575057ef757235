"""What a scenario is: the data classes a scenario file becomes, and the metrics it may name.

:mod:`shir.sim.scenario` reads a file into these classes (and re-exports them: import them from
there); docs/simulation.md describes every field with its default and limit.
"""

from __future__ import annotations

import attrs

from shir.core.errors import DomainError
from shir.core.model import RuntimeSettings
from shir.sim.faults import Fault
from shir.sim.surface import LinkSpec, ProxyChange

__all__ = [
    "DurationDist",
    "Expectation",
    "NetworkSpec",
    "NodeSpec",
    "RandomFaults",
    "Scenario",
    "Workload",
    "metric_names",
]


@attrs.frozen
class DurationDist:
    """How long a job runs on a node of speed 1."""

    kind: str = "exponential"  # exponential | fixed | uniform
    mean_s: float = 30.0
    min_s: float = 0.0
    max_s: float = 0.0


@attrs.frozen
class Workload:
    """Jobs arriving as a Poisson process."""

    rate_per_s: float = 1.0
    duration: DurationDist = DurationDist()
    start_at_s: float = 0.0
    stop_at_s: float | None = None  # default: the scenario's duration
    needs: tuple[tuple[str, int], ...] = ()  # credential versions every job needs
    duplicate_submit_p: float = 0.0  # the service resends a submission (same key)


@attrs.frozen
class NodeSpec:
    """One machine that joins the runtime."""

    name: str
    cores: int = 4
    memory_mb: int = 8192
    version: str = "5.40"
    version_released_at: float | None = None
    join_at_s: float = 0.0
    key: str = "key1"
    concurrency_limit: int | None = None
    speed: float = 1.0  # job speed factor (a slow node < 1)
    remote_access: bool = False  # off, as on a fresh install: turn it on for a second node


@attrs.frozen
class NetworkSpec:
    """Message delays between nodes and the control channel."""

    latency_s: float = 0.005
    jitter_s: float = 0.002


@attrs.frozen
class RandomFaults:
    """Faults drawn from the seed: ``per_hour`` on average, kinds chosen uniformly."""

    per_hour: float = 0.0
    kinds: tuple[str, ...] = ()
    min_duration_s: float = 5.0
    max_duration_s: float = 120.0
    probability: float = 0.2  # for message faults: the drop/duplicate probability


@attrs.frozen
class Expectation:
    """Something that must hold: ``dispatcher`` / ``status`` at a time, or a ``metric`` bound."""

    kind: str
    at_s: float | None = None
    node: str | None = None
    status: str | None = None
    metric: str | None = None
    max: float | None = None
    min: float | None = None
    equals: float | None = None

    def describe(self) -> str:
        """A one-line description for reports."""
        if self.kind == "dispatcher":
            return f"at {self.at_s:g} s the dispatcher is {self.node or 'nobody'}"
        if self.kind == "status":
            return f"at {self.at_s:g} s {self.node} is {self.status}"
        bounds = []
        if self.min is not None:
            bounds.append(f">= {self.min:g}")
        if self.max is not None:
            bounds.append(f"<= {self.max:g}")
        if self.equals is not None:
            bounds.append(f"== {self.equals:g}")
        return f"{self.metric} {' and '.join(bounds)}"


@attrs.frozen
class Scenario:
    """A whole simulation: topology, settings, workload, faults and expectations."""

    name: str
    nodes: tuple[NodeSpec, ...]
    description: str = ""
    seed: int = 1
    duration_s: float = 600.0
    drain_s: float = 300.0
    settings: RuntimeSettings = RuntimeSettings()
    workload: Workload = Workload()
    network: NetworkSpec = NetworkSpec()
    faults: tuple[Fault, ...] = ()
    random_faults: RandomFaults = RandomFaults()
    expect: tuple[Expectation, ...] = ()
    source: str = "<memory>"
    links: tuple[LinkSpec, ...] = ()  # shir.sim.surface
    proxy_changes: tuple[ProxyChange, ...] = ()


# --- the metrics an [[expect]] may bound -------------------------------------------------------

_JOB_METRICS = ("submitted", "completed", "dead_lettered", "redelivered", "unfinished", "lost",
                "duplicate_effects")
_PLAIN_METRICS = ("failovers", "max_dispatcher_gap_s", "max_offline_detect_s",
                  "invariant_violations", "store_recoveries", "events", "simulated_s")


def _error_names() -> list[str]:
    seen: list[str] = []
    todo: list[type] = [DomainError]
    while todo:
        cls = todo.pop()
        if cls is not DomainError and cls.__name__ not in seen:
            seen.append(cls.__name__)
        todo.extend(cls.__subclasses__())
    return sorted({*seen, "AppendOutcomeUnknown"})


def metric_names() -> tuple[str, ...]:
    """Every metric an expectation may name (refusals.X for every refusal the sim counts)."""
    return (*(f"jobs.{j}" for j in _JOB_METRICS), *_PLAIN_METRICS,
            *(f"refusals.{e}" for e in _error_names()))
