"""``shir node proxy``: set a node's proxy on its machine, as the product's Configuration Manager.

::

    shir node proxy --store STORE --name NODE [--home DIR] none|system|custom
                    [--address HOST --port N] [--user USER]

The password comes from ``SHIR_PROXY_PASSWORD``, else a prompt when a user is given in a
terminal (one given with ``--password`` works, with a warning: command lines are visible to
other users). The user and password are sealed with this machine's protector (the node's home
holds its key) before anything leaves the process: the log and the home keep ciphertext only.

The store is opened through the new setting, so a setting that cannot reach it is refused
before it is saved. Then ``SaveProxySettings`` goes to the runtime (the node's running host
restarts to use it), and the home keeps the setting for the host's next start. For a node not
registered yet only the home keeps it: its first run connects with it and, as it registers,
records it in the runtime (as the product sets a proxy during registration). Bad input exits
2 with the core's message; nothing is saved then.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path
from typing import Any

from shir.core.errors import ShirError

__all__ = ["PASSWORD_ENV", "add_proxy_command"]

PASSWORD_ENV = "SHIR_PROXY_PASSWORD"
_TRIES = 5
# An interactive check of the new setting: a few quick retries, not the SDK's minute of them.
_QUICK_RETRIES: dict[str, Any] = {"retry_total": 2, "initial_backoff": 1, "increment_base": 2}


def add_proxy_command(commands: Any) -> None:
    """Add ``node proxy`` to the ``node`` command's subparsers."""
    from shir.adapters.node_cli import cli_errors

    p = commands.add_parser(
        "proxy", help="set this node's proxy (none, system or custom); its host restarts",
        description="Set a node's proxy on its machine, as the product's Configuration "
                    "Manager does; its host restarts with it. See docs/node.md.",
    )
    p.add_argument("mode", choices=("none", "system", "custom"),
                   help="none: direct (the proxy variables are ignored); system: the "
                        "HTTPS_PROXY/HTTP_PROXY/NO_PROXY variables; custom: --address and --port")
    p.add_argument("--store", required=True, help="the runtime's event store URL")
    p.add_argument("--name", required=True, help="the node's name in the runtime")
    p.add_argument("--home", help="the node's home folder (default: $SHIR_HOME or "
                                  "~/.local/state/shir/node): its protector seals the secrets")
    p.add_argument("--address", default="", help="custom: the proxy's host name or IP address")
    p.add_argument("--port", type=int, default=0, help="custom: the proxy's port")
    p.add_argument("--user", default="", help="custom: the proxy's user name (optional)")
    p.add_argument("--password", help=f"the proxy's password: prefer {PASSWORD_ENV} or the "
                                      "prompt (command lines are visible to other users)")
    p.set_defaults(handler=lambda a: cli_errors("shir node proxy", lambda: _set(a)))


def _password(args: argparse.Namespace) -> str:
    if args.password is not None:
        print(f"shir node proxy: warning: other users can see command lines: set {PASSWORD_ENV} "
              "instead of --password", file=sys.stderr)
        return str(args.password)
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env is not None:
        return from_env
    if args.user and sys.stdin.isatty():
        try:
            return getpass.getpass(f"Password of proxy user {args.user} (empty: none): ")
        except EOFError:  # Ctrl-D, or input closed: nothing is saved
            raise ShirError(f"no password read; set {PASSWORD_ENV}, or type it (empty for "
                            "none)") from None
    return ""


def _set(args: argparse.Namespace) -> int:
    from shir.adapters.node_config import default_home
    from shir.adapters.node_credentials import home_identity
    from shir.adapters.protect import default_protector
    from shir.adapters.proxy import client_proxy, save_home_proxy, seal_proxy_settings
    from shir.adapters.runtime_cli import STREAM
    from shir.adapters.stores import open_store
    from shir.core.driver import AppendOutcomeUnknown, ConcurrencyConflict, Driver
    from shir.core.proxy import ProxyMode, ProxySettings, SaveProxySettings, saved_proxy

    home = Path(args.home) if args.home else default_home()
    mode = ProxyMode(args.mode)
    password = _password(args) if mode is ProxyMode.CUSTOM else ""
    protector = default_protector(home)
    # InvalidProxySettings (exit 2) names what is wrong before anything is sealed or sent
    sealed = seal_proxy_settings(protector, mode, args.address, args.port, args.user, password)
    del password
    local = args.store.strip().startswith(("sqlite:", "file:"))  # no proxy, no SDK retries
    store = open_store(args.store, create=False, proxy=client_proxy(sealed, protector),
                       **({} if local else _QUICK_RETRIES))
    try:
        driver = Driver(store, STREAM)
        if driver.state.runtime is None:
            raise ShirError("the store holds no runtime: check --store")
        # the setting is sealed with the home's key and kept there: another node's home
        # would hold what the named node could never open
        home_identity(home, driver.state.runtime.runtime_id, args.name)
        registered = any(n.name == args.name for n in driver.state.nodes)
        changed = (saved_proxy(driver.state, args.name) or ProxySettings()) != sealed
        for _ in range(_TRIES if registered else 0):
            try:
                driver.handle(SaveProxySettings(args.name, sealed,
                                                max(time.time(), driver.state.now)))
                break
            except (ConcurrencyConflict, AppendOutcomeUnknown):
                driver.catch_up()  # a node wrote meanwhile: decide again on the newer log
        else:
            if registered:
                raise ShirError("could not save the proxy setting: the store kept changing; "
                                "retry")
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()
    save_home_proxy(home, sealed)
    if not registered:
        print(f"node {args.name} is not registered yet: {sealed.describe()} kept in {home}; "
              "its first run uses it and records it in the runtime")
    elif changed:
        print(f"node {args.name}: {sealed.describe()} saved; its host restarts to use it")
    else:
        print(f"node {args.name}: {sealed.describe()} (unchanged)")
    return 0
