"""A node's proxy on its machine: sealed secrets, the copy kept in its home, and client options.

The core keeps proxy settings only with their secrets as ciphertext (``shir.core.proxy``). A
node's host seals them here with the machine's protector (DPAPI on Windows, the portable
protector elsewhere), each bound to its purpose, so a sealed password cannot be passed off as
the user name, and opens them only to connect.

Where a setting lives: the runtime's log records each change (``ProxySettingsSaved``), and the
node's home keeps the last one the node saw (``HOME/proxy.settings``, sealed as in the log),
because the store itself may be reachable only through the proxy: a host starts with its home's
setting, and restarts when the log says otherwise (:mod:`shir.adapters.node_cli`).

:class:`ClientProxy` is the one place that turns a setting into options for the Azure clients:

- ``none``: direct, and the environment's proxy variables are ignored (HTTP clients get
  ``use_env_settings=False``; Service Bus speaks AMQP over TCP, which never reads them);
- ``system``: the environment's ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` (the HTTP
  clients read them per request; Service Bus uses the proxy they name for its namespace);
- ``custom``: the address and port, with Basic credentials when a user is set.

Service Bus through a proxy means AMQP over WebSockets (port 443 through ``CONNECT``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import attrs

from shir.adapters.protect import CredentialError, Protector, write_file_atomically
from shir.core.codec import CodecError, decode_value, encode_value
from shir.core.errors import ShirError
from shir.core.proxy import ProxyMode, ProxySettings, check_proxy

__all__ = [
    "HOME_FILE",
    "ClientProxy",
    "ProxyError",
    "client_proxy",
    "load_home_proxy",
    "open_proxy_secrets",
    "proxy_refused",
    "redact_userinfo",
    "save_home_proxy",
    "seal_proxy_settings",
]

HOME_FILE = "proxy.settings"
_USER = b"shir-proxy-user"
_PASSWORD = b"shir-proxy-password"
_407 = re.compile(r"\b407\b")
_USERINFO = re.compile(r"://[^/@\s'\"]*@")
_MAX_FILE_BYTES = 4 * 4096 + 1024  # two sealed secrets at their bound, and the rest


class ProxyError(ShirError):
    """A proxy setting cannot be used on this machine; the message says what to do."""


def seal_proxy_settings(
    protector: Protector,
    mode: ProxyMode,
    address: str = "",
    port: int = 0,
    user: str = "",
    password: str = "",
) -> ProxySettings:
    """Proxy settings with ``user`` and ``password`` sealed by ``protector`` (empty: none).

    Raises ``InvalidProxySettings`` for what the core would refuse, before anything is sealed.
    """
    # the core's rules on stand-ins: which secrets are given matters, not their value
    check_proxy(ProxySettings(mode, address, port, b"u" * bool(user), b"p" * bool(password)))
    return ProxySettings(
        mode, address, port,
        protector.protect(user.encode(), _USER) if user else b"",
        protector.protect(password.encode(), _PASSWORD) if password else b"",
    )


def open_proxy_secrets(protector: Protector, settings: ProxySettings) -> tuple[str, str]:
    """The user and password of ``settings`` in clear, for connecting only (never log them)."""
    user = protector.unprotect(settings.user, _USER).decode() if settings.user else ""
    password = (
        protector.unprotect(settings.password, _PASSWORD).decode() if settings.password else ""
    )
    return user, password


# --- the copy in the node's home ---------------------------------------------------------------

def load_home_proxy(home: Path) -> ProxySettings:
    """The setting kept in ``home`` (no proxy when none was kept)."""
    path = Path(home) / HOME_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ProxySettings()
    except OSError as exc:
        raise ProxyError(f"cannot read the proxy setting {path}: {exc.strerror}") from None
    try:
        if len(raw) > _MAX_FILE_BYTES:
            raise CodecError("too large")
        settings = decode_value(ProxySettings, raw)
        check_proxy(settings)
    except (CodecError, ShirError, ValueError, TypeError):
        raise ProxyError(
            f"{path} is not a proxy setting shir wrote: delete it and set the proxy again with "
            "shir node proxy"
        ) from None
    return settings


def save_home_proxy(home: Path, settings: ProxySettings) -> None:
    """Keep ``settings`` (sealed) in ``home``, replacing the file whole (mode 0600)."""
    check_proxy(settings)
    try:
        Path(home).mkdir(parents=True, exist_ok=True)
        write_file_atomically(Path(home) / HOME_FILE, encode_value(settings))
    except OSError as exc:
        raise ProxyError(f"cannot keep the proxy setting in {home}: {exc.strerror}") from None


# --- options for the Azure clients -------------------------------------------------------------

def _host(address: str) -> str:
    return address[1:-1] if address.startswith("[") else address


@attrs.frozen
class ClientProxy:
    """How this node's Azure clients reach the cloud, from one :class:`ProxySettings`.

    Holds the user and password in clear for the clients (never in its repr); build it with
    :func:`client_proxy`.
    """

    settings: ProxySettings = ProxySettings()
    user: str = attrs.field(default="", repr=False)
    password: str = attrs.field(default="", repr=False)
    environ: Mapping[str, str] = attrs.field(factory=dict, repr=False)  # *_PROXY, for system

    def describe(self) -> str:
        """The proxy for messages: mode and address, never a user or password."""
        if self.settings.mode is ProxyMode.SYSTEM:
            found = self._system_url("https") or self._system_url("http")
            if found is None:
                return "system proxy (none set in HTTPS_PROXY or HTTP_PROXY)"
            parts = urlsplit(found)
            return f"system proxy {parts.hostname}:{parts.port or 80}"
        return self.settings.describe()

    def blob_options(self) -> dict[str, Any]:
        """Keyword options for an Azure Storage client (``BlobServiceClient``...)."""
        mode = self.settings.mode
        if mode is ProxyMode.SYSTEM:
            return {"use_env_settings": True}
        if mode is ProxyMode.NONE:
            return {"use_env_settings": False}
        url = self._custom_url()
        return {"use_env_settings": False, "proxies": {"http": url, "https": url}}

    def servicebus_options(self, namespace: str) -> dict[str, Any]:
        """Keyword options for ``ServiceBusClient`` on ``namespace`` (a host name).

        Empty when no proxy applies (AMQP over TCP); else AMQP over WebSockets through it.
        """
        proxy: dict[str, Any]
        mode = self.settings.mode
        if mode is ProxyMode.CUSTOM:
            proxy = {"proxy_hostname": _host(self.settings.address),
                     "proxy_port": self.settings.port}
            if self.user:
                proxy.update(username=self.user, password=self.password)
        elif mode is ProxyMode.SYSTEM:
            host = namespace.rsplit(":", 1)[0]
            url = self._system_url("https") or self._system_url("http")
            if url is None or self._bypassed(host):
                return {}
            parts = urlsplit(url)
            proxy = {"proxy_hostname": parts.hostname or "", "proxy_port": parts.port or 80}
            if parts.username:
                proxy.update(username=unquote(parts.username),
                             password=unquote(parts.password or ""))
        else:
            return {}
        from azure.servicebus import TransportType

        return {"transport_type": TransportType.AmqpOverWebsocket, "http_proxy": proxy}

    def secrets(self) -> tuple[str, ...]:
        """Every secret these options carry (for scrubbing SDK text), longest first."""
        found = [self.password, quote(self.password, safe="")] if self.password else []
        if self.settings.mode is ProxyMode.SYSTEM:
            for scheme in ("https", "http"):
                url = self._system_url(scheme)
                password = urlsplit(url).password if url else None
                if password:
                    found += [password, unquote(password)]
        return tuple(sorted({s for s in found if s}, key=len, reverse=True))

    def _custom_url(self) -> str:
        address = self.settings.address
        host = f"[{address}]" if ":" in address and not address.startswith("[") else address
        auth = ""
        if self.user:
            auth = quote(self.user, safe="") + ":" + quote(self.password, safe="") + "@"
        return f"http://{auth}{host}:{self.settings.port}"

    def _system_url(self, scheme: str) -> str | None:
        found = _environment_proxies(self.environ).get(scheme)
        if not found:
            return None
        return found if "://" in found else "http://" + found

    def _bypassed(self, host: str) -> bool:
        """Whether NO_PROXY names ``host``: ``*``, the host, or a domain it is in."""
        no_proxy = self.environ.get("no_proxy") or self.environ.get("NO_PROXY") or ""
        host = host.lower().rstrip(".")
        for entry in no_proxy.split(","):
            entry = entry.strip().lower().lstrip("*").lstrip(".").rsplit(":", 1)[0]
            if no_proxy.strip() == "*" or (entry and (host == entry
                                                      or host.endswith("." + entry))):
                return True
        return False


def _environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """``{scheme: url}`` from ``*_proxy`` variables, lowercase winning (as the stdlib reads)."""
    found: dict[str, str] = {}
    for name in sorted(environ, key=lambda n: n.islower()):  # upper first, lower overrides
        if name.lower().endswith("_proxy") and environ[name]:
            found[name.lower()[:-len("_proxy")]] = environ[name]
    return found


def client_proxy(
    settings: ProxySettings, protector: Protector, environ: Mapping[str, str] | None = None,
) -> ClientProxy:
    """The client options for ``settings``, its secrets opened with this machine's protector.

    ``environ`` (default: this process's) supplies the ``system`` proxy variables. Raises
    :class:`ProxyError` when the secrets were sealed on another machine or are damaged.
    """
    check_proxy(settings)
    try:
        user, password = open_proxy_secrets(protector, settings)
    except (CredentialError, UnicodeDecodeError):
        raise ProxyError(
            f"the user or password of the {settings.describe()} cannot be opened on this "
            "machine (sealed elsewhere, or damaged): set the proxy again with shir node proxy"
        ) from None
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k.lower().endswith("_proxy")}  # nothing else
    return ClientProxy(settings, user, password, env)


def proxy_refused(exc: BaseException) -> bool:
    """Whether ``exc`` (from an Azure SDK) is a proxy refusing its credentials (HTTP 407)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "status_code", None) == 407 or _407.search(str(e)):
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "inner_exception", None)
    return False


def redact_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of any URL in it taken out (a proxy URL's)."""
    return _USERINFO.sub("://(redacted)@", text)
