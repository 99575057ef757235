"""What ``shir status`` shows: the runtime's status read from its folded log.

:func:`status_of` makes one JSON-ready dict (the ``--json`` output); :func:`render` the text
form. Both read only the state (and the control channel's queue depth, when there is one):
they hold no secret to leak (auth keys are only verifiers in the log, and are not shown).
"""

from __future__ import annotations

import time
from typing import Any

from shir.core.capacity import job_stats, scale_advice
from shir.core.errors import ShirError
from shir.core.leasing import concurrency_limit
from shir.core.state import RuntimeState

__all__ = ["render", "status_of"]


def status_of(state: RuntimeState, now: float, channel: Any = None) -> dict[str, Any]:
    """The runtime's status as of ``state`` (the log's tail), observed at ``now``."""
    rt = state.runtime
    assert rt is not None
    stats = job_stats(state)
    leases = state.jobs.leases
    running: dict[str, int] = {}
    for lease in leases.values():
        running[lease.token.node] = running.get(lease.token.node, 0) + 1
    nodes = []
    for n in state.nodes:
        m = n.metrics
        nodes.append({
            "name": n.name,
            "status": n.status.value,
            "reasons": list(n.reasons),
            "role": "dispatcher" if n.name == state.dispatcher else "worker",
            "version": m.version,
            "last_heartbeat_at": n.last_seen_at,
            "last_heartbeat_age_s": None if n.last_seen_at is None
            else round(max(0.0, now - n.last_seen_at), 1),
            "cpu_pct": m.cpu_pct,
            "available_memory_mb": m.available_memory_mb,
            "running_jobs": running.get(n.name, 0),
            "limit": concurrency_limit(state, n.name),
            "session": n.session,
        })
    channel_depth, channel_error = None, None
    if channel is not None:
        try:
            channel_depth = channel.queue_depth()
        except Exception as exc:  # say so: a silent gap reads as "nothing waiting"
            # a shir error names no secret; another exception's text might
            channel_error = str(exc) if isinstance(exc, ShirError) else type(exc).__name__
    return {
        "runtime": rt.name,
        "runtime_id": rt.runtime_id,
        "factory": rt.factory_id,
        "status": state.status.value,
        "term": state.term,
        "dispatcher": state.dispatcher,
        "nodes": nodes,
        "queue_depth": stats.queued,
        "channel_depth": channel_depth,
        "channel_error": channel_error,
        "jobs": {
            "submitted": stats.submitted, "running": stats.running,
            "completed": stats.completed, "dead_lettered": stats.dead_lettered,
            "released": stats.released, "capacity": stats.capacity,
        },
        "advice": [a.reason for a in scale_advice(state)],
        "log_time": state.now,
    }


def _when(at: float | None) -> str:
    return "never" if at is None else time.strftime("%H:%M:%S", time.localtime(at))


def render(report: dict[str, Any]) -> str:
    """The text form of :func:`status_of`'s report."""
    lines = [
        f"runtime   {report['runtime']} ({report['runtime_id']}), factory {report['factory']}",
        f"status    {report['status']}",
        f"term      {report['term']}, dispatcher {report['dispatcher'] or 'none'}",
    ]
    j = report["jobs"]
    channel = report["channel_depth"]
    lines.append(
        f"queue     {report['queue_depth']} queued in the log"
        + (f", {channel} waiting in the control channel" if channel is not None else "")
        + (f", control channel not read ({report['channel_error']})"
           if report.get("channel_error") else "")
        + f"; {j['running']} running, {j['completed']} completed, "
        f"{j['dead_lettered']} dead-lettered; capacity {j['capacity']}"
    )
    lines.append("nodes")
    header = ("NAME", "STATUS", "ROLE", "VERSION", "HEARTBEAT", "CPU", "MEM FREE", "JOBS")
    rows = [header]
    for n in report["nodes"]:
        rows.append((
            n["name"], n["status"], n["role"], n["version"] or "-",
            _when(n["last_heartbeat_at"]), f"{n['cpu_pct']:.0f}%",
            f"{n['available_memory_mb']} MB", f"{n['running_jobs']}/{n['limit']}",
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = (str(v).ljust(w) for v, w in zip(r, widths, strict=True))
        lines.append(("  " + "  ".join(cells)).rstrip())
    for n in report["nodes"]:
        if n["reasons"]:
            lines.append(f"  {n['name']}: {'; '.join(n['reasons'])}")
    for advice in report["advice"]:
        lines.append(f"advice    {advice}")
    return "\n".join(lines)
