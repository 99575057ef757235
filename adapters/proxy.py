"""Proxy secrets on a node: seal the user and password before the core sees them, open them to
connect.

The core keeps proxy settings only with their secrets as ciphertext (``shir.core.proxy``). A
node's host seals them here with the machine's protector (DPAPI on Windows, the portable
protector elsewhere), each bound to its purpose, so a sealed password cannot be passed off as
the user name, and opens them only when it connects through the proxy.
"""

from __future__ import annotations

from shir.adapters.protect import Protector
from shir.core.proxy import ProxyMode, ProxySettings, check_proxy

__all__ = ["open_proxy_secrets", "seal_proxy_settings"]

_USER = b"shir-proxy-user"
_PASSWORD = b"shir-proxy-password"


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
