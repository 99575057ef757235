"""Capacity queries over the job book: job counters, and when to scale out or up.

Read-only views of a :class:`RuntimeState` (nothing here decides or emits): ``job_stats`` counts
the jobs and the capacity of the working nodes; ``scale_advice`` reads the latest heartbeat
metrics of each working node and says when to add a node (CPU high, memory low) or raise a
node's limit (its slots full while CPU and memory idle), as the product's guidance describes.
"""

from __future__ import annotations

import attrs

from shir.core.kernel import RuntimeState
from shir.core.leasing import LIMIT_RANGE, limit_of
from shir.core.model import NodeStatus

__all__ = ["JobStats", "ScaleAdvice", "ScaleThresholds", "job_stats", "requests_wanted",
           "scale_advice"]


@attrs.frozen
class JobStats:
    """Counters of the job book (finished jobs leave only these)."""

    queued: int
    running: int
    submitted: int
    completed: int
    dead_lettered: int
    released: int
    capacity: int  # sum of the limits of Online and Limited nodes


def job_stats(state: RuntimeState) -> JobStats:
    """The job counters and the runtime's current capacity."""
    m = state.model()
    b = m.jobs
    cap = sum(
        limit_of(b, n) for n in m.nodes.values()
        if n.status in (NodeStatus.ONLINE, NodeStatus.LIMITED)
    )
    return JobStats(b.queued(), len(b.leases), b.submitted, b.completed, b.dead_lettered,
                    b.released, cap)


def requests_wanted(state: RuntimeState, most: int) -> int:
    """How many job requests the dispatcher should take from the control channel now, at most
    ``most``: the runtime's free capacity, less what already waits in the log. The rest wait
    in the channel (Service Bus keeps them, unlocked, for whichever node dispatches next)
    instead of piling up in the log faster than nodes can run them."""
    st = job_stats(state)
    return max(0, min(most, st.capacity - st.running - st.queued))


@attrs.frozen
class ScaleThresholds:
    """When to advise scaling, as the product's guidance describes. All configurable."""

    cpu_high_pct: float = 80.0  # "CPU high"
    memory_low_ratio: float = 0.2  # available / total below this is "memory low"
    cpu_idle_pct: float = 50.0  # "not utilized well"
    memory_idle_ratio: float = 0.5


@attrs.frozen
class ScaleAdvice:
    """One piece of advice: ``scale_out`` (add a node) or ``scale_up`` (raise a node's limit)."""

    kind: str
    node: str
    reason: str
    suggested_limit: int | None = None


def scale_advice(
    state: RuntimeState, thresholds: ScaleThresholds = ScaleThresholds()
) -> tuple[ScaleAdvice, ...]:
    """Advice from the latest heartbeat metrics of every Online or Limited node.

    Memory low and CPU high: add a node. Concurrency saturated while CPU and memory idle: raise
    that node's limit.
    """
    m = state.model()
    b = m.jobs
    out = []
    for n in m.nodes.values():
        if n.status not in (NodeStatus.ONLINE, NodeStatus.LIMITED) or n.last_seen_at is None:
            continue
        mem_ratio = n.metrics.available_memory_mb / n.memory_mb
        cpu = n.metrics.cpu_pct
        limit = limit_of(b, n)
        running = b.running(n.name)
        if cpu >= thresholds.cpu_high_pct and mem_ratio <= thresholds.memory_low_ratio:
            out.append(ScaleAdvice(
                "scale_out", n.name,
                f"CPU {cpu:.0f}% and only {mem_ratio:.0%} memory available: add a node",
            ))
        elif (running >= limit and cpu <= thresholds.cpu_idle_pct
              and mem_ratio >= thresholds.memory_idle_ratio):
            suggested = min(LIMIT_RANGE[1], limit * 2)
            out.append(ScaleAdvice(
                "scale_up", n.name,
                f"{running}/{limit} jobs running while CPU {cpu:.0f}% and {mem_ratio:.0%} memory "
                f"free: raise the limit",
                suggested,
            ))
    return tuple(out)
