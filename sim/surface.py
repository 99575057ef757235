"""Sharing and proxy settings in the simulator: linked factories with workloads of their own,
grants revoked mid-run, and proxy changes that restart a node's host service.

Scenario tables (docs/simulation.md and docs/operations.md show them in use)::

    [[links]]                      # a linked runtime in another data factory
    name = "lk-b"                  # the linked runtime's id
    factory = "factory-b"
    tenant = "tenant-sim"          # default: the shared runtime's tenant
    managed_identity = true        # false: the grant is refused (managed identity required)
    granted_by_role = "Owner"      # or "Owner (inherited)", "Contributor", "Reader"
    link_at_s = 5                  # the owner grants access, then the factory links
    rate_per_s = 0.5               # its own Poisson workload, job durations as in [workload]
    revoke_at_s = 200              # optional: the owner revokes the grant

    [[proxy_changes]]              # a user saves proxy settings on a node
    node = "node-2"
    at_s = 120
    mode = "custom"                # none, system or custom
    address = "proxy.contoso.com"  # custom only: address and port required
    port = 8888
    user = "svc-proxy"             # optional; the simulated host seals user and password,
    password = "not-a-real-one"    # so only ciphertext reaches the core
    restart_s = 5                  # how long the host service takes to restart

The shared runtime is the scenario's runtime, in factory ``factory-sim`` of tenant
``tenant-sim``. A linked factory stops submitting when told its work is suspended
(``SuspendLinkedWork``); submissions already on their way are refused by the core.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs

from shir.core.proxy import ProxyMode, ProxySettings, SaveProxySettings
from shir.core.sharing import (
    AccessRole,
    FactoryRef,
    GrantAccess,
    LinkRuntime,
    Principal,
    RevokeAccess,
    SuspendLinkedWork,
    resource_id,
    sharing_state,
)
from shir.sim.network import CONTROL, SERVICE

if TYPE_CHECKING:
    from shir.sim.world import World

__all__ = [
    "SHARED_FACTORY",
    "LinkSpec",
    "ProxyChange",
    "Surface",
    "parse_link",
    "parse_proxy_change",
]

SHARED_FACTORY = FactoryRef("factory-sim", "tenant-sim", "msi-factory-sim")
OWNER_NAME = "owner@sim"
FACTORY_SIDE = "factory"  # the recipient of effects for the factory side


@attrs.frozen
class LinkSpec:
    """A linked runtime in another factory, with its own workload."""

    name: str
    factory: str
    tenant: str = SHARED_FACTORY.tenant_id
    managed_identity: bool = True
    granted_by_role: str = AccessRole.OWNER.value
    link_at_s: float = 0.0
    rate_per_s: float = 0.5
    revoke_at_s: float | None = None


@attrs.frozen
class ProxyChange:
    """A user saves proxy settings on a node at ``at_s``."""

    node: str
    at_s: float
    mode: str = "custom"
    address: str = ""
    port: int = 0
    user: str = attrs.field(default="", repr=False)
    password: str = attrs.field(default="", repr=False)
    restart_s: float = 5.0


def _time(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f".{key}: expected a time in seconds >= 0, got {v!r:.40}")
    return float(v)


def _check_keys(data: Mapping[str, Any], cls: type, required: tuple[str, ...]) -> None:
    allowed = {f.name for f in attrs.fields(cls)}
    for k in data:
        if k not in allowed:
            raise ValueError(f".{k}: not a field; it takes {', '.join(sorted(allowed))}")
    for k in required:
        if k not in data:
            raise ValueError(f".{k}: required")


def _text(data: Mapping[str, Any], key: str, default: str) -> str:
    v = data.get(key, default)
    if not isinstance(v, str):
        raise ValueError(f".{key}: expected a string, got {v!r:.40}")
    return v


def parse_link(data: Mapping[str, Any]) -> LinkSpec:
    """A ``[[links]]`` table; ``ValueError('.key: expected ...')`` on bad input."""
    _check_keys(data, LinkSpec, ("name", "factory"))
    roles = [r.value for r in AccessRole]
    role = _text(data, "granted_by_role", AccessRole.OWNER.value)
    if role not in roles:
        raise ValueError(f".granted_by_role: expected one of {', '.join(roles)}, got {role!r:.40}")
    mi = data.get("managed_identity", True)
    if not isinstance(mi, bool):
        raise ValueError(f".managed_identity: expected true or false, got {mi!r:.40}")
    rate = _time(data.get("rate_per_s", 0.5), "rate_per_s")
    if rate > 100:
        raise ValueError(f".rate_per_s: expected a number <= 100 (the limit), got {rate:g}")
    revoke = data.get("revoke_at_s")
    return LinkSpec(
        _text(data, "name", ""), _text(data, "factory", ""),
        _text(data, "tenant", SHARED_FACTORY.tenant_id), mi, role,
        _time(data.get("link_at_s", 0.0), "link_at_s"), rate,
        None if revoke is None else _time(revoke, "revoke_at_s"),
    )


def parse_proxy_change(data: Mapping[str, Any], nodes: set[str]) -> ProxyChange:
    """A ``[[proxy_changes]]`` table; the core's own rules check the settings themselves."""
    _check_keys(data, ProxyChange, ("node", "at_s"))
    node = _text(data, "node", "")
    if node not in nodes:
        raise ValueError(f".node: expected one of the nodes {sorted(nodes)}, got {node!r:.40}")
    mode = _text(data, "mode", "custom")
    if mode not in [m.value for m in ProxyMode]:
        raise ValueError(f".mode: expected none, system or custom, got {mode!r:.40}")
    port = data.get("port", 0)
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f".port: expected a whole number, got {port!r:.40}")
    change = ProxyChange(
        node, _time(data["at_s"], "at_s"), mode, _text(data, "address", ""), port,
        _text(data, "user", ""), _text(data, "password", ""),
        _time(data.get("restart_s", 5.0), "restart_s"),
    )
    from shir.core.proxy import check_proxy  # the core's rule, not a copy

    try:
        check_proxy(_settings(change))
    except ValueError as exc:
        raise ValueError(f": {exc}") from None
    return change


def _seal(text: str) -> bytes:
    """What the simulated host sends for a secret: a stand-in for ciphertext, never the text."""
    return b"sim-sealed:" + hashlib.sha256(text.encode()).digest()[:16] if text else b""


def _settings(c: ProxyChange) -> ProxySettings:
    return ProxySettings(ProxyMode(c.mode), c.address, c.port, _seal(c.user), _seal(c.password))


class Surface:
    """Carries out a scenario's links and proxy changes in one world."""

    def __init__(self, world: World) -> None:
        self.w = world
        self.suspended: set[str] = set()  # links the factory side was told are suspended
        self.restart_s = {c.node: c.restart_s for c in world.scenario.proxy_changes}

    def schedule(self) -> None:
        """Arm every link, revocation and proxy change of the scenario."""
        w = self.w
        for link in w.scenario.links:
            w.at(link.link_at_s, partial(self._link, link))
            if link.revoke_at_s is not None:
                w.at(link.revoke_at_s, partial(self._revoke, link))
        for change in w.scenario.proxy_changes:
            w.at(change.at_s, partial(self._save_proxy, change))

    def _link(self, link: LinkSpec) -> None:
        w = self.w
        now = w.env.now
        grantee = FactoryRef(link.factory, link.tenant,
                             f"msi-{link.factory}" if link.managed_identity else None)
        granter = Principal(OWNER_NAME, AccessRole(link.granted_by_role))
        w.service.handle(GrantAccess(SHARED_FACTORY, grantee, granter, now))
        rt = w.driver.state.runtime
        assert rt is not None
        w.service.handle(LinkRuntime(link.name, link.factory, resource_id(rt), now))
        if link.name in sharing_state(w.driver.state.model()).links:
            w.env.process(self._workload(link))

    def _revoke(self, link: LinkSpec) -> None:
        w = self.w
        owner = Principal(OWNER_NAME, AccessRole.OWNER)
        w.service.handle(RevokeAccess(link.factory, owner, w.env.now))

    def _workload(self, link: LinkSpec) -> Any:
        w = self.w
        env = w.env
        rng = w._rng(f"link:{link.name}")  # one stream per link, derived from the seed
        while link.rate_per_s > 0:
            yield env.timeout(rng.expovariate(link.rate_per_s))
            if env.now >= w.duration_s or link.name in self.suspended:
                return
            w.workload.submit_job(link=link.name)

    def _save_proxy(self, change: ProxyChange) -> None:
        w = self.w
        if w.nodes[change.node].alive():  # the user saves it on the machine itself
            w.service.handle(SaveProxySettings(change.node, _settings(change), w.env.now))

    def to_factory(self, effect: object) -> None:
        """An effect for the factory side: a linked factory told its work is suspended stops
        submitting (after the message's latency). The others are the workload's business."""
        if type(effect) is SuspendLinkedWork:
            links = effect.links
            self.w.net.send(SERVICE, FACTORY_SIDE, CONTROL, lambda: self.suspended.update(links))

    def restart(self, name: str) -> None:
        """The host service stops (running work and memory lost) and starts again; as it
        starts it reads the runtime's term and dispatcher from the log, as a real host does."""
        w = self.w
        node = w.nodes[name]
        if not node.alive():
            return
        node.crash()

        def start() -> None:
            if node.up:  # the drain phase restarted it already
                return
            node.restart()
            state = w.driver.state
            node.term, node.dispatcher = state.term, state.dispatcher
            if node.dispatcher == name:
                node.nudge()

        w.later(self.restart_s.get(name, 5.0), start)
