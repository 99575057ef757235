"""Proxy settings: how each node reaches the cloud service, and the restart a change needs.

Theory of operation
-------------------
Each node has its own HTTP proxy setting, as each machine has its own Configuration Manager:

- ``none``: connect directly;
- ``system``: use what the machine's service configuration says (diahost.exe.config and
  diawp.exe.config in the product; directly when they say nothing);
- ``custom``: this address and port (both required), with an optional user and password.

The user and password are secrets: the node's host encrypts them (DPAPI on Windows,
``shir.adapters.protect`` elsewhere) before it sends ``SaveProxySettings``, so the core, the
events and the log only ever hold ciphertext, which reprs show as a byte count. The address
must not smuggle credentials in (``user:password@host`` is refused, with where to put them).

Saving a setting that differs from the node's current one records ``ProxySettingsSaved`` and
yields ``RestartHostService`` for that node: the product restarts its host service to pick the
proxy up, and so must a host of shir. Saving the same setting again changes nothing.

State stays bounded: one setting per registered node (a removed node's setting is dropped at
the next save, and ignored before that because it names the node's registration).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from typing import Any

import attrs

from shir.core.codec import event, value
from shir.core.effects import Recipient, to_node
from shir.core.errors import InvalidCommand
from shir.core.kernel import (
    Decider,
    Events,
    Handler,
    Model,
    RuntimeState,
    TimedRule,
    emit,
    node_of,
    runtime_of,
)

__all__ = [
    "DECIDE",
    "EFFECTS",
    "EVOLVE",
    "MAX_SECRET_BYTES",
    "RULES",
    "InvalidProxySettings",
    "ProxyMode",
    "ProxySettings",
    "ProxySettingsSaved",
    "RestartHostService",
    "SaveProxySettings",
    "check_proxy",
    "proxy_of",
    "saved_proxy",
]

MAX_SECRET_BYTES = 4096  # ciphertext of a user name or password: far above any real one
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class ProxyMode(enum.Enum):
    """Which proxy a node uses to reach the cloud service."""

    NONE = "none"
    SYSTEM = "system"
    CUSTOM = "custom"


def _secret_repr(v: bytes) -> str:
    return f"<{len(v)} bytes encrypted>" if v else "<none>"


@value
@attrs.frozen
class ProxySettings:
    """One node's proxy setting. ``user`` and ``password`` are ciphertext (empty: none)."""

    mode: ProxyMode = ProxyMode.NONE
    address: str = ""
    port: int = 0
    user: bytes = attrs.field(default=b"", repr=_secret_repr)
    password: bytes = attrs.field(default=b"", repr=_secret_repr)

    def describe(self) -> str:
        """A line for status output: mode and address, never the (encrypted) secrets."""
        if self.mode is not ProxyMode.CUSTOM:
            return {ProxyMode.NONE: "no proxy", ProxyMode.SYSTEM: "system proxy"}[self.mode]
        auth = " (with user and password)" if self.password else (
            " (with user)" if self.user else "")
        return f"custom proxy {self.address}:{self.port}{auth}"


class InvalidProxySettings(InvalidCommand):
    """A proxy setting is malformed; the message says which field and what is expected."""


def _check_address(address: str) -> None:
    if not isinstance(address, str) or not address:
        raise InvalidProxySettings(
            "a custom proxy needs an address: a host name (proxy.contoso.com) or an IP address"
        )
    if "@" in address:
        raise InvalidProxySettings(
            "the proxy address must not contain a user or password ('user:password@host'); "
            "give the host alone and put the user and password in their own fields, which are "
            "kept encrypted"
        )
    if "://" in address:
        raise InvalidProxySettings(
            f"give the proxy address without a scheme (proxy.contoso.com, not "
            f"{address[:60]!r}); the port goes in its own field"
        )
    if len(address) > 253 or any(ch.isspace() or ord(ch) < 32 for ch in address):
        raise InvalidProxySettings(
            f"{address[:60]!r} is not a host name: at most 253 characters, no spaces"
        )
    literal = address[1:-1] if address.startswith("[") and address.endswith("]") else address
    try:
        ipaddress.ip_address(literal)
        return
    except ValueError:
        pass
    if ":" in address:
        raise InvalidProxySettings(
            f"{address[:60]!r} is not a host name or IP address; put the port in its own field"
        )
    labels = address.rstrip(".").split(".")
    if labels[-1].isdigit() or not all(_LABEL.fullmatch(lb) for lb in labels):
        raise InvalidProxySettings(
            f"{address[:60]!r} is not a valid host name or IP address: use labels of letters, "
            "digits and '-' (1-63 characters each) separated by dots, or an address like "
            "10.0.0.5"
        )


def check_proxy(p: ProxySettings) -> None:
    """Refuse a malformed setting with :class:`InvalidProxySettings` (the rules above)."""
    if not isinstance(p, ProxySettings) or not isinstance(p.mode, ProxyMode):
        raise InvalidProxySettings("proxy settings must be a ProxySettings with a ProxyMode")
    for name in ("user", "password"):
        v = getattr(p, name)
        if not isinstance(v, bytes) or len(v) > MAX_SECRET_BYTES:
            raise InvalidProxySettings(
                f"the proxy {name} must be at most {MAX_SECRET_BYTES} bytes of ciphertext "
                "(encrypt it on the node before sending)"
            )
    if p.mode is not ProxyMode.CUSTOM:
        if p.address or p.port or p.user or p.password:
            raise InvalidProxySettings(
                f"mode {p.mode.value!r} uses no address, port, user or password; choose mode "
                "'custom' to give them"
            )
        return
    _check_address(p.address)
    if isinstance(p.port, bool) or not isinstance(p.port, int) or not 1 <= p.port <= 65535:
        raise InvalidProxySettings(
            f"a custom proxy needs a port from 1 to 65535, got {p.port!r:.20}"
        )
    if p.password and not p.user:
        raise InvalidProxySettings("a proxy password needs a user name; give both or neither")


# --- command, event, effect --------------------------------------------------------------------

@attrs.frozen
class SaveProxySettings:
    """Save ``settings`` on ``node`` (secrets already encrypted by the node's host)."""

    node: str
    settings: ProxySettings
    at: float


@event("proxy_settings_saved")
@attrs.frozen
class ProxySettingsSaved:
    """``node`` uses ``settings`` from its next start (secrets as ciphertext only)."""

    node: str
    node_seq: int  # which registration of that name: a new node of the same name starts afresh
    settings: ProxySettings
    at: float


@attrs.frozen
class RestartHostService:
    """To ``node``: restart the host service (it picks up new settings as it starts)."""

    node: str
    reason: str

    @property
    def to(self) -> Recipient:
        """The node."""
        return to_node(self.node)


# --- state -------------------------------------------------------------------------------------

def _saved(m: Model, e: ProxySettingsSaved) -> None:
    # Copy-on-write (scratch models share the dict); drop the settings of nodes that are gone.
    live = {(n.name, n.seq) for n in m.nodes.values()}
    kept = {k: v for k, v in m.proxies.items() if k in live and k[0] != e.node}
    kept[(e.node, e.node_seq)] = e.settings
    m.proxies = kept


EVOLVE: dict[type, Callable[[Model, Any], None]] = {ProxySettingsSaved: _saved}

EFFECTS: dict[type, Callable[[Any], tuple[object, ...]]] = {
    ProxySettingsSaved: lambda e: (
        RestartHostService(e.node, f"proxy settings changed to {e.settings.describe()}"),
    ),
}


def _saved_in(m: Model, node: str) -> ProxySettings | None:
    n = m.nodes.get(node)
    if n is None:
        return None
    saved: ProxySettings | None = m.proxies.get((node, n.seq))
    return saved


def saved_proxy(state: RuntimeState, node: str) -> ProxySettings | None:
    """The setting saved for ``node``'s current registration; None when none was (a node that
    registers anew starts with none saved: its host brings the machine's own setting)."""
    return _saved_in(state.model(), node)


def proxy_of(m: Model, node: str) -> ProxySettings:
    """The proxy setting in force on ``node`` (no proxy until one is saved)."""
    return _saved_in(m, node) or ProxySettings()


def _save(m: Model, c: SaveProxySettings, k: Decider) -> Events:
    runtime_of(m)
    n = node_of(m, c.node)
    check_proxy(c.settings)
    if proxy_of(m, c.node) == c.settings:
        return []  # unchanged: nothing to save, nothing to restart
    s, out = k.timed(m, c.at)
    n = node_of(s, c.node)  # settling may have expired it
    emit(s, out, ProxySettingsSaved(c.node, n.seq, c.settings, c.at))
    return out


DECIDE: dict[type, Handler] = {SaveProxySettings: _save}

RULES: tuple[TimedRule, ...] = ()  # nothing here waits on time
