"""``shir node run``: start a node host on this machine (see :mod:`shir.adapters.node_host`).

::

    shir node run --store STORE --key KEY --name NAME [--home DIR] [--intranet-port 8060]
                  [--config FILE] [--channel URL] [--remote-access on|off]

The key may also come from ``SHIR_AUTH_KEY`` (command lines are visible to other users). Logs
are JSON lines on stderr and never contain the key, a password or a credential. SIGTERM and
SIGINT drain running jobs (bounded by ``drain_timeout_s``) and leave; exit 0. A refused
registration (wrong, regenerated or foreign key, too many nodes, remote access off) exits 2
with the core's message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shir.core.errors import ShirError

__all__ = ["JsonLog", "add_commands", "cli_errors", "open_channel", "shir_version"]

KEY_ENV = "SHIR_AUTH_KEY"
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def shir_version() -> str:
    """The installed shir version (what a node reports in its heartbeats)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shir")
    except PackageNotFoundError:
        return "0.0.0"


class JsonLog:
    """JSON lines on a stream: ``{"ts", "level", "event", "node", ...fields}``.

    Callers pass names, ids and messages of shir's own errors, which never hold secrets.
    """

    def __init__(self, node: str, level: str = "info", stream: Any = None) -> None:
        self.node = node
        self.level = _LEVELS[level]
        self.stream = stream if stream is not None else sys.stderr
        self._mutex = threading.Lock()

    def __call__(self, level: str, event: str, **fields: Any) -> None:
        if _LEVELS[level] < self.level:
            return
        record = {"ts": round(time.time(), 3), "level": level, "event": event, "node": self.node}
        record.update(fields)
        line = json.dumps(record, default=str)
        with self._mutex:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not stop the node


def open_channel(url: str, lock_duration_s: float = 60.0, proxy: Any = None) -> Any:
    """The control channel ``url`` names (the forms are in :mod:`shir.adapters.channels`).

    ``lock_duration_s`` bounds how long a request received by a dispatcher that then died
    stays invisible on the embedded channel; a node host passes its runtime's job lock
    duration. On Service Bus the queue's own lock duration applies, and ``proxy`` (a
    :class:`~shir.adapters.proxy.ClientProxy`, the node's) is how its client connects.
    """
    from shir.adapters.channels import open_channel as open_any

    if url.strip().startswith("sqlite:"):
        return open_any(url, lock_duration_s=lock_duration_s)
    return open_any(url, proxy=proxy)


def cli_errors(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a shir error (bad input, refusal, store trouble) prints one line, exit 2."""
    try:
        return body()
    except ShirError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def add_commands(subparsers: Any) -> None:
    """Add ``node run`` and ``node proxy`` to an ``add_subparsers()`` result."""
    node = subparsers.add_parser("node", help="run a node of a self-hosted runtime",
                                 description="Run this machine as a node of a runtime.")
    cmds = node.add_subparsers(dest="node_command", metavar="COMMAND")
    cmds.required = True
    run = cmds.add_parser(
        "run", help="register this machine and serve jobs until stopped",
        description="Start a node host on this machine: it registers with the runtime and "
                    "serves jobs until SIGTERM or SIGINT. Keys and defaults: see docs/node.md.",
    )
    run.add_argument("--store", help="the runtime's event store URL (or 'store' in --config)")
    run.add_argument("--key", help=f"an auth key of the runtime (or set {KEY_ENV})")
    run.add_argument("--name", required=True, help="this node's name in the runtime")
    run.add_argument("--home", help="this machine's state folder (default: $SHIR_HOME or "
                                    "~/.local/state/shir/node); one node host per home")
    run.add_argument("--intranet-port", type=int, help="the intranet port (default 8060)")
    run.add_argument("--intranet-host", help="the address peers dial to reach this node "
                                             "(default 127.0.0.1)")
    run.add_argument("--config", help="a TOML host config (see docs/node.md)")
    run.add_argument("--channel", help="control channel URL (default: the store's SQLite file)")
    run.add_argument("--remote-access", choices=("on", "off"),
                     help="remote access from the intranet (default on)")
    run.add_argument("--heartbeat-interval", type=float, metavar="S",
                     help="heartbeat every S seconds (at most the runtime's interval)")
    run.add_argument("--concurrency-limit", type=int, metavar="N",
                     help="override this node's concurrent-job limit")
    run.add_argument("--log-level", help="debug, info, warning or error (default info)")
    run.set_defaults(handler=lambda args: cli_errors("shir node run", lambda: _run(args)))
    from shir.adapters.proxy_cli import add_proxy_command

    add_proxy_command(cmds)


def _run(args: argparse.Namespace) -> int:
    from shir.adapters.node_config import HomeLock, default_home, load_config, machine_id

    for option in ("store", "key", "home", "config", "channel", "intranet_host"):
        if getattr(args, option) == "":  # `--home "$DIR"` with DIR unset: never the default
            flag = "--" + option.replace("_", "-")
            raise ShirError(f"{flag} is empty: give a value, or leave {flag} out")
    config = load_config(args.config, {
        "store": args.store, "channel": args.channel,
        "heartbeat_interval_s": args.heartbeat_interval,
        "concurrency_limit": args.concurrency_limit, "intranet_port": args.intranet_port,
        "intranet_host": args.intranet_host,
        "remote_access": None if args.remote_access is None else args.remote_access == "on",
        "log_level": args.log_level,
    })
    key = args.key or os.environ.get(KEY_ENV, "")
    if not key:
        raise ShirError(f"no auth key: pass --key KEY or set {KEY_ENV} "
                        "(shir runtime create printed two)")
    if config.store is None:
        raise ShirError("no store: pass --store URL or set 'store' in the config file")
    log = JsonLog(args.name, config.log_level)
    if args.key:
        log("warning", "key_on_command_line",
            advice=f"other users can see command lines: set {KEY_ENV} instead of --key")
    home = Path(args.home) if args.home else default_home()
    lock = HomeLock(home, args.name)
    try:
        return _serve(args.name, key, config, home, machine_id(home), log)
    finally:
        lock.release()


def _serve(name: str, key: str, config: Any, home: Path, machine: str, log: JsonLog) -> int:
    """Serve until stopped; a proxy change restarts the host in this process (see docs/node.md):
    every client is closed and opened again with the setting the log gave, kept in the home."""
    from shir.adapters.protect import default_protector
    from shir.adapters.proxy import client_proxy, load_home_proxy, save_home_proxy

    protector = default_protector(home)
    stopping = threading.Event()  # SIGTERM or SIGINT: no restart after this
    current: list[Any] = []  # the host serving now, for the signal handler

    def on_signal(signum: int, _frame: Any) -> None:
        log("info", "signal", signal=signal.Signals(signum).name)
        stopping.set()
        for host in current:
            host.restart_to = None  # a stop asked for during a restart's drain is a stop
            host.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        proxy = client_proxy(load_home_proxy(home), protector)
        code, restart_to = _serve_once(name, key, config, home, machine, log, proxy, current,
                                       stopping)
        if restart_to is None or stopping.is_set():
            return code
        save_home_proxy(home, restart_to)  # the store may be reachable only through it
        log("info", "restarting", proxy=restart_to.describe())


def _serve_once(name: str, key: str, config: Any, home: Path, machine: str, log: JsonLog,
                proxy: Any, current: list[Any], stopping: threading.Event) -> tuple[int, Any]:
    """One life of the host service: (exit code, the proxy setting to restart with or None)."""
    from shir.adapters.credentials_cli import DataDir
    from shir.adapters.node_config import SystemLoad
    from shir.adapters.node_credentials import HostCredentials, node_keys
    from shir.adapters.node_host import NodeHost
    from shir.adapters.node_jobs import kinds_for
    from shir.adapters.stores import describe_store_url, open_store
    from shir.core.model import NodeMetrics

    store = open_store(config.store, create=False, proxy=proxy)
    channel_url = config.channel
    if channel_url is None:
        if not config.store.startswith("sqlite:"):
            raise ShirError("a Blob or file store has no embedded channel: name the control "
                            "channel with --channel URL (or 'channel' in the config)")
        channel_url = config.store
    load = SystemLoad()
    total_mb, _ = load.memory_mb()
    version = shir_version()
    intranet: Any = None

    def metrics(running: int) -> NodeMetrics:
        _, available = load.memory_mb()
        return NodeMetrics(
            cpu_pct=load.cpu_pct(), available_memory_mb=available, running_jobs=running,
            version=version, control_channel_ok=True, remote_access=config.remote_access,
            reachable_peers=intranet.reachable_peers() if intranet is not None else (),
        )

    def on_members(nodes: Any) -> None:
        if intranet is not None:
            from shir.adapters.intranet import directory_from_nodes

            intranet.set_peers(directory_from_nodes(nodes))
        if host.credentials is not None:
            host.credentials.set_nodes(nodes)

    host = NodeHost(
        store=store, channel=None, key_text=key, name=name, machine_id=machine,
        metrics=metrics, cores=os.cpu_count() or 1, memory_mb=max(1, total_mb), log=log,
        heartbeat_interval_s=config.heartbeat_interval_s,
        concurrency_limit=config.concurrency_limit, drain_timeout_s=config.drain_timeout_s,
        on_members=on_members, kinds=kinds_for(home, proxy), proxy=proxy.settings,
    )
    runtime = host.driver.state.runtime
    data = DataDir(home)
    new_identity = not data.identity_file.exists()
    if runtime is not None:  # else register() says there is no runtime in the store
        host.credentials = HostCredentials(
            name, node_keys(home, runtime.runtime_id, name), data.store(data.protector()), log)
    channel = None
    try:
        channel = host.channel = open_channel(
            channel_url, lock_duration_s=host.driver.state.settings.lock_duration_s,
            proxy=proxy)
        if config.remote_access:
            intranet = _open_intranet(name, home, config, host.heartbeat_interval_s(), log,
                                      host.credentials)
            host.intranet_address = intranet.address
            host.cert_sha256 = intranet.identity.fingerprint
        log("info", "starting", store=describe_store_url(config.store), home=str(home),
            pid=os.getpid(), version=version, remote_access=config.remote_access,
            intranet_address=host.intranet_address, proxy=proxy.describe())
        current[:] = [host]
        if stopping.is_set():  # signalled while the previous life was closing
            host.stop.set()
        return host.run(), host.restart_to
    except ShirError:
        if new_identity and host.session == 0:  # refused before it registered: no node knows
            for made in (data.identity_file, data.public_key_file):  # the identity made now,
                made.unlink(missing_ok=True)  # and kept it would refuse every other --name
        raise
    finally:
        current.clear()
        if intranet is not None:
            intranet.stop()
        if channel is not None:
            channel.close()
        close = getattr(store, "close", None)
        if close is not None:
            close()


class _IntranetLog(logging.Handler):
    """The intranet channel's log records, as JSON lines of the node's log."""

    def __init__(self, log: JsonLog) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else (
            "warning" if record.levelno >= logging.WARNING else
            "info" if record.levelno >= logging.INFO else "debug")
        self._log(level, "intranet", message=record.getMessage())


def _open_intranet(name: str, home: Path, config: Any, heartbeat_s: float, log: JsonLog,
                   credentials: Any) -> Any:
    """Listen on the intranet port with this machine's certificate (made on first use); it
    carries credential envelopes to and from ``credentials`` (a ``HostCredentials``)."""
    from shir.adapters.intranet import Intranet
    from shir.adapters.intranet_tls import load_or_create_identity

    logger = logging.getLogger("shir.adapters.intranet")
    logger.addHandler(_IntranetLog(log))
    logger.setLevel(logging.DEBUG if config.log_level == "debug" else logging.INFO)
    logger.propagate = False
    identity = load_or_create_identity(home, name)
    # Peers are checked at least as often as heartbeats report them.
    intranet = Intranet(name, identity, host=config.intranet_host, port=config.intranet_port,
                        check_interval_s=min(5.0, heartbeat_s),
                        on_envelope=credentials.receive if credentials is not None else None)
    intranet.start()
    if credentials is not None:
        credentials.send_envelope = intranet.send_envelope
    return intranet
