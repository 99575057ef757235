"""What a node host knows about its machine: its config file, its home folder, its load.

- :class:`HostConfig`: the TOML host configuration, every value validated with an error that
  names the key.
- :class:`HomeLock`: one node host per home folder (the home stands for the machine). The lock
  is an ``flock`` on ``HOME/node.lock`` (the kernel drops it when the process dies, even under
  SIGKILL, so a crash never leaves a stale lock); the file also holds the running host's PID and
  node name so that a refused second host can name it.
- :func:`machine_id`: a random id kept in the home folder, made on the first run.
- :class:`SystemLoad`: CPU use and available memory read from ``/proc`` (Linux), for heartbeats.
"""

from __future__ import annotations

import fcntl
import json
import os
import tomllib
import uuid
from pathlib import Path
from typing import Any

import attrs

from shir.core.errors import ShirError

__all__ = [
    "ConfigError",
    "HomeLock",
    "HomeLocked",
    "HostConfig",
    "SystemLoad",
    "default_home",
    "load_config",
    "machine_id",
]

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ShirError):
    """The host configuration (file or options) has a value shir cannot use."""


class HomeLocked(ShirError):
    """Another node host runs on this home folder (on this machine)."""


@attrs.frozen
class HostConfig:
    """The settings of one node host; ``None`` means "not set here" (use the runtime's)."""

    store: str | None = None
    channel: str | None = None
    heartbeat_interval_s: float | None = None  # at most the runtime's interval
    concurrency_limit: int | None = None  # override of the core's default for this node
    intranet_port: int = 8060
    intranet_host: str = "127.0.0.1"  # where the port listens, and the address peers dial
    remote_access: bool = True
    log_level: str = "info"
    drain_timeout_s: float = 30.0


_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "store": (str, "a store URL (sqlite:///PATH, file://PATH, a connection string, a Blob URL)"),
    "channel": (str, "a control channel URL (sqlite:///PATH)"),
    "heartbeat_interval_s": ((int, float), "a number of seconds above 0, at most 3600"),
    "concurrency_limit": (int, "an integer 1..256"),
    "intranet_port": (int, "a TCP port 1..65535"),
    "intranet_host": (str, "the address peers dial to reach this node (an IP or host name, "
                           "not 0.0.0.0)"),
    "remote_access": (bool, "true or false"),
    "log_level": (str, "one of " + ", ".join(LOG_LEVELS)),
    "drain_timeout_s": ((int, float), "a number of seconds 0..3600"),
}
# The command-line option of each key that has one under another name.
_OPTIONS = {"heartbeat_interval_s": "--heartbeat-interval"}


def _check(key: str, value: Any, where: str) -> Any:
    kind, what = _KEYS[key]
    # bool is an int in Python: refuse true for a number and 1 for a bool
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if ok and key == "heartbeat_interval_s":
        ok = 0 < value <= 3600
    elif ok and key == "drain_timeout_s":
        ok = 0 <= value <= 3600
    elif ok and key == "concurrency_limit":
        ok = 1 <= value <= 256
    elif ok and key == "intranet_port":
        ok = 1 <= value <= 65535
    elif ok and key == "log_level":
        ok = value in LOG_LEVELS
    elif ok and key in ("store", "channel"):
        ok = bool(value.strip())
    elif ok and key == "intranet_host":
        ok = bool(value.strip()) and value.strip() not in ("0.0.0.0", "::", "*") \
            and len(value) <= 253 and not any(c.isspace() for c in value)
    if not ok:
        shown = repr(value) if not isinstance(value, str) or key not in ("store", "channel") \
            else "(the value given)"  # a store URL may hold a key: never echo it
        raise ConfigError(f"{where}: {key} must be {what}, got {shown}")
    return value


def load_config(path: str | None, overrides: dict[str, Any]) -> HostConfig:
    """The host config from the TOML file at ``path`` (if any), then ``overrides`` (options).

    Unknown keys and bad values raise :class:`ConfigError` naming the key.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
        if len(raw) > 1 << 20:
            raise ConfigError(f"{path}: a host config is a few lines; this file is over 1 MiB")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path} is not valid UTF-8 TOML: {exc}") from None
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ConfigError(
                f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(_KEYS)}"
            )
        for key, value in data.items():
            values[key] = _check(key, value, path)
    for key, value in overrides.items():
        if value is not None:
            option = _OPTIONS.get(key, "--" + key.replace("_", "-"))
            values[key] = _check(key, value, "option " + option)
    return HostConfig(**values)


def default_home() -> Path:
    """The per-user home of a node host: ``$SHIR_HOME``, else ``~/.local/state/shir/node``."""
    env = os.environ.get("SHIR_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "shir" / "node"


def machine_id(home: Path) -> str:
    """This machine's id, made once and kept in ``home`` (a home stands for one machine)."""
    path = home / "machine-id"
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    value = f"machine-{uuid.uuid4().hex}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


class HomeLock:
    """Hold ``HOME/node.lock`` for the life of the host; see the module doc."""

    def __init__(self, home: Path, node: str) -> None:
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the home folder {home}: {exc.strerror}") from None
        self.path = home / "node.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise HomeLocked(
                f"another node host runs on home {home} ({holder}); one node host per machine: "
                "stop it first, or give this one its own --home"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "node": node}).encode())
        os.fsync(fd)
        self._fd: int | None = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"node {info['node']!r}, PID {int(info['pid'])}"
        except (ValueError, KeyError, TypeError, OSError):
            return "its PID is not recorded yet"

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process ends)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SystemLoad:
    """CPU busy percentage since the previous call, and available memory, from ``/proc``."""

    def __init__(self) -> None:
        self._last = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", "rb") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        values = [int(x) for x in fields[:8]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    def cpu_pct(self) -> float:
        """Share of CPU time busy since the last call, 0..100 (0.0 where /proc is absent)."""
        now = self._cpu_times()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return 0.0
        total, idle = now[0] - last[0], now[1] - last[1]
        return round(100.0 * max(0, total - idle) / total, 1)

    @staticmethod
    def memory_mb() -> tuple[int, int]:
        """(total, available) memory in MiB; (1024, 1024) where /proc is absent."""
        info: dict[str, int] = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("MemTotal", "MemAvailable"):
                        info[key] = int(rest.split()[0]) // 1024
        except (OSError, ValueError, IndexError):
            pass
        total = info.get("MemTotal", 1024)
        return total, info.get("MemAvailable", total)
