"""The monitoring view: what a runtime and its nodes are doing, as a pure query over its state.

This is the product's monitoring page as values: :func:`monitoring_view` reads a state (never
changes it) and returns a :class:`RuntimeView`; :func:`render` turns it into the text that
``shir sim replay``, the simulator's report and ``shir status`` print. Everything is as of the
state's own time (``state.now``): the view adds no clock of its own.

Fields the state does not hold are ``None`` and rendered as "unavailable", never invented:
nodes do not report bytes sent and received, and shir does not model auto-update settings.
The shared side lists its links; :func:`linked_view` is the linked side, which shows its target.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from shir.core.kernel import DAY_S, Model, Node, RuntimeState
from shir.core.leasing import concurrency_limit
from shir.core.model import NodeStatus, RuntimeStatus
from shir.core.proxy import proxy_of
from shir.core.rules import context
from shir.core.sharing import Link, resource_id, sharing_state

__all__ = [
    "UNAVAILABLE",
    "LinkView",
    "LinkedRuntimeView",
    "NodeView",
    "RuntimeView",
    "linked_view",
    "monitoring_view",
    "render",
    "render_linked",
    "view_to_json",
]

UNAVAILABLE = "unavailable"
DISPATCHER_ROLE = "dispatcher/worker"  # the dispatcher runs jobs too
WORKER_ROLE = "worker"


@attrs.frozen
class NodeView:
    """One node as the monitoring page shows it."""

    name: str
    status: NodeStatus
    reasons: tuple[str, ...]
    role: str  # "dispatcher/worker" or "worker"
    version: str
    version_status: str
    registered_at: float
    last_connect_at: float | None  # None: never heartbeat
    offline_since: float | None
    cpu_pct: float | None  # None until the first heartbeat
    available_memory_mb: int | None
    running_jobs: int  # leases the runtime holds for it
    job_limit: int
    remote_access: bool
    proxy: str
    sent_bytes: int | None = None  # nodes do not report traffic: unavailable
    received_bytes: int | None = None
    last_update: str | None = None  # None: never updated since it registered


@attrs.frozen
class LinkView:
    """A linked runtime, seen from the shared runtime."""

    linked_runtime_id: str
    factory_id: str
    status: str  # "Active" or "Revoked"
    linked_at: float
    revoked_at: float | None
    jobs_submitted: int
    jobs_running: int
    jobs_queued: int


@attrs.frozen
class RuntimeView:
    """The runtime as the monitoring page shows it."""

    name: str
    runtime_id: str
    factory_id: str
    resource_id: str
    status: RuntimeStatus
    version: str | None  # the majority's; None before any node reported
    auto_update: str | None  # not modelled: unavailable
    capacity: int  # the sum of the nodes' concurrent-job limits
    available_capacity: int  # the same over nodes that can take work (Online or Limited)
    running_jobs: int
    queue_depth: int
    dispatcher: str | None
    term: int
    at: float
    nodes: tuple[NodeView, ...]
    links: tuple[LinkView, ...]


@attrs.frozen
class LinkedRuntimeView:
    """A linked runtime's own page: its target and what runs there for it."""

    linked_runtime_id: str
    factory_id: str
    target_resource_id: str
    target_name: str
    target_status: RuntimeStatus
    status: str  # "Active" or "Revoked"
    revoked_at: float | None
    nodes: tuple[str, ...]  # the shared runtime's nodes, where its jobs run
    jobs_submitted: int
    jobs_running: int
    jobs_queued: int


def _version_status(n: Node, now: float, majority: str | None, lifetime_s: float,
                    warning_s: float) -> str:
    if n.upgrading_to is not None:
        return f"updating to {n.upgrading_to}"
    released = n.metrics.version_released_at
    if released is not None:
        expires = released + lifetime_s
        if now >= expires:
            return "expired: update the node"
        if now >= expires - warning_s:
            return f"expires in {max(1, int((expires - now) // DAY_S))} days: update soon"
    if n.last_seen_at is None:
        return UNAVAILABLE
    if majority is not None and n.metrics.version != majority:
        return f"differs from the runtime's {majority}"
    return "matches the runtime"


def _link_view(m: Model, link: Link) -> LinkView:
    b = m.jobs
    live = [j for j in link.jobs if j in b.jobs]
    running = sum(1 for j in live if j in b.leases)
    return LinkView(
        link.linked_runtime_id, link.factory_id, "Active" if link.active else "Revoked",
        link.linked_at, link.revoked_at, link.submitted, running, len(live) - running,
    )


def monitoring_view(state: RuntimeState) -> RuntimeView:
    """The monitoring page of the runtime in ``state`` (which must have been created)."""
    m = state.model()
    rt = m.runtime
    if rt is None:
        raise ValueError("no runtime in this state yet: nothing to monitor")
    settings = rt.settings
    now = m.now
    c = context(m, now)
    b = m.jobs
    nodes = []
    capacity = available = 0
    for n in m.nodes.values():
        limit = concurrency_limit(state, n.name)
        capacity += limit
        if n.status in (NodeStatus.ONLINE, NodeStatus.LIMITED):
            available += limit
        reported = n.last_seen_at is not None
        nodes.append(NodeView(
            name=n.name,
            status=n.status,
            reasons=n.reasons,
            role=DISPATCHER_ROLE if n.name == m.dispatcher else WORKER_ROLE,
            version=n.metrics.version,
            version_status=_version_status(
                n, now, c.majority_version, settings.version_lifetime_days * DAY_S,
                settings.version_warning_days * DAY_S,
            ),
            registered_at=n.registered_at,
            last_connect_at=n.last_seen_at,
            offline_since=n.offline_since,
            cpu_pct=n.metrics.cpu_pct if reported else None,
            available_memory_mb=n.metrics.available_memory_mb if reported else None,
            running_jobs=b.running(n.name),
            job_limit=limit,
            remote_access=n.metrics.remote_access,
            proxy=proxy_of(m, n.name).describe(),
            last_update=n.last_update or None,
        ))
    return RuntimeView(
        name=rt.name,
        runtime_id=rt.runtime_id,
        factory_id=rt.factory_id,
        resource_id=resource_id(rt),
        status=state.status,
        version=c.majority_version,
        auto_update=None,
        capacity=capacity,
        available_capacity=available,
        running_jobs=len(b.leases),
        queue_depth=b.queued(),
        dispatcher=m.dispatcher,
        term=m.term,
        at=now,
        nodes=tuple(nodes),
        links=tuple(_link_view(m, link) for link in sharing_state(m).links.values()),
    )


def linked_view(state: RuntimeState, linked_runtime_id: str) -> LinkedRuntimeView:
    """The page of linked runtime ``linked_runtime_id``, which references the runtime in
    ``state``; raises ``KeyError`` naming it when no such link exists."""
    m = state.model()
    rt = m.runtime
    link = sharing_state(m).links.get(linked_runtime_id)
    if rt is None or link is None:
        raise KeyError(f"no linked runtime {linked_runtime_id!r} references this runtime")
    lv = _link_view(m, link)
    return LinkedRuntimeView(
        linked_runtime_id, link.factory_id, resource_id(rt), rt.name, state.status, lv.status,
        lv.revoked_at, tuple(m.nodes), lv.jobs_submitted, lv.jobs_running, lv.jobs_queued,
    )


def view_to_json(view: RuntimeView | LinkedRuntimeView) -> dict[str, Any]:
    """The view as JSON-ready values (statuses by their names, as the product shows them)."""

    def plain(_inst: object, _field: object, v: object) -> object:
        return v.value if isinstance(v, enum.Enum) else v

    return attrs.asdict(view, value_serializer=plain)


# --- text --------------------------------------------------------------------------------------

def _t(seconds: float) -> str:
    return f"{round(seconds, 1):g} s"


def _opt(v: object, unit: str = "") -> str:
    if v is None:
        return UNAVAILABLE
    if isinstance(v, float):
        return f"{v:g}{unit}"
    return f"{v}{unit}"


def render(view: RuntimeView) -> str:
    """The monitoring page as text (no secrets: proxies show mode and address only)."""
    lines = [
        f"runtime {view.name} ({view.runtime_id}) in factory {view.factory_id}: "
        f"{view.status.value} at {_t(view.at)}",
        f"  resource id: {view.resource_id}",
        f"  version: {view.version or UNAVAILABLE}; auto-update: "
        f"{view.auto_update or UNAVAILABLE + ' (not modelled)'}",
        f"  capacity: {view.available_capacity} of {view.capacity} concurrent jobs available; "
        f"running {view.running_jobs}; queued {view.queue_depth}",
        f"  dispatcher: {view.dispatcher or 'none'} (term {view.term})",
        "  nodes:",
    ]
    if not view.nodes:
        lines.append("    none registered: register a node with an auth key")
    for n in view.nodes:
        lines.append(f"    {n.name}: {n.status.value}, {n.role}")
        for why in n.reasons:
            lines.append(f"      why: {why}")
        if n.offline_since is not None:
            lines.append(f"      offline since {_t(n.offline_since)}")
        lines += [
            f"      version {n.version or UNAVAILABLE} ({n.version_status})",
            f"      registered at {_t(n.registered_at)}; last connected "
            + ("never" if n.last_connect_at is None else f"at {_t(n.last_connect_at)}"),
            f"      CPU {_opt(n.cpu_pct, '%')}; available memory "
            f"{_opt(n.available_memory_mb, ' MB')}; jobs {n.running_jobs} of {n.job_limit}",
            f"      sent/received: {_opt(n.sent_bytes)}/{_opt(n.received_bytes)} (nodes do not "
            "report traffic)",
            f"      last update: {n.last_update or 'none since it registered'}",
            f"      remote access from intranet: {'on' if n.remote_access else 'off'}; "
            f"{n.proxy}",
        ]
    if view.links:
        lines.append("  linked runtimes (sharing):")
    for lk in view.links:
        state = lk.status if lk.revoked_at is None else f"{lk.status} at {_t(lk.revoked_at)}"
        lines.append(
            f"    {lk.linked_runtime_id} in factory {lk.factory_id}: {state}; jobs submitted "
            f"{lk.jobs_submitted}, running {lk.jobs_running}, queued {lk.jobs_queued}"
        )
    return "\n".join(lines)


def render_linked(view: LinkedRuntimeView) -> str:
    """A linked runtime's page as text."""
    state = view.status if view.revoked_at is None else f"{view.status} at {_t(view.revoked_at)}"
    return "\n".join([
        f"linked runtime {view.linked_runtime_id} in factory {view.factory_id}: {state}",
        f"  target: {view.target_name} ({view.target_resource_id}), "
        f"{view.target_status.value}",
        f"  runs on: {', '.join(view.nodes) or 'no nodes'}",
        f"  jobs submitted {view.jobs_submitted}, running {view.jobs_running}, "
        f"queued {view.jobs_queued}",
    ])
