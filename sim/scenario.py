"""Scenarios: what to simulate, read from TOML (stdlib ``tomllib``).

A scenario file has a few top-level keys (``name``, ``description``, ``seed``, ``duration_s``,
``drain_s``) and the tables ``[settings]`` (:class:`shir.core.RuntimeSettings` fields),
``[[nodes]]`` (the only one required), ``[workload]``, ``[network]``, ``[[faults]]``,
``[random_faults]`` and ``[[expect]]``. docs/simulation.md is the full schema with every default
and limit; docs/examples/my.toml is a starter file to copy.

The loader refuses, when the file is read, whatever the core or the run would refuse or ignore
(a name the core rejects, a fault that could never start or would change nothing, a field its
kind ignores), so a run never passes without doing what the file says.

Every error names the file, the key and what was expected (:class:`ScenarioError`). The classes
a file becomes live in :mod:`shir.sim.scenario_model`; this module re-exports them.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from shir.core.credentials import check_credential as core_check_credential
from shir.core.errors import InvalidCommand, ShirError
from shir.core.kernel import check_name as _core_check_name  # the core's own rule, not a copy
from shir.core.leasing import LIMIT_RANGE
from shir.core.model import InvalidSettings, NodeStatus, RuntimeSettings, check_setting_bounds
from shir.sim.faults import FAULT_KINDS, parse_fault
from shir.sim.scenario_model import (
    DurationDist,
    Expectation,
    NetworkSpec,
    NodeSpec,
    RandomFaults,
    Scenario,
    Workload,
    metric_names,
)
from shir.sim.surface import parse_link, parse_proxy_change

__all__ = [
    "LIMITS",
    "DurationDist",
    "Expectation",
    "NetworkSpec",
    "NodeSpec",
    "RandomFaults",
    "Scenario",
    "ScenarioError",
    "Workload",
    "builtin_names",
    "check_simulated_s",
    "load_scenario",
    "metric_names",
    "parse_scenario",
]


class ScenarioError(ShirError, ValueError):
    """A scenario file is malformed; the message names the file, the key and what was expected."""


# --- parsing with errors that name the key ---------------------------------------------------

# Documented limits on magnitudes (docs/simulation.md): beyond them a run would take hours of
# wall time without a word, so the loader refuses them instead.
LIMITS: Mapping[str, float] = {
    "simulated_s": 7 * 24 * 3600.0,  # duration_s + drain_s, and --until + drain_s
    "min_heartbeat_interval_s": 0.1,
    "rate_per_s": 100.0,
    "jobs": 200_000.0,  # rate_per_s x the workload's window
    "per_hour": 3600.0,
    "heartbeats": 250_000.0,  # nodes x simulated_s / heartbeat_interval_s: 4 nodes, 7 days, 10 s
}


def _check_metric(r: _Reader, key: str, metric: str | None) -> None:
    if metric not in metric_names():
        raise r.fail(f"{key}.metric", f"one of the metrics {', '.join(metric_names())}", metric)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: Any = None, *, show: bool = True) -> ScenarioError:
        shown = f", got {got!r:.80}" if show else ""
        return ScenarioError(f"{self.source}: {key}: expected {expected}{shown}")

    def table(self, data: Any, key: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(key, "a table", data)
        return data

    def known(self, data: Mapping[str, Any], key: str, allowed: set[str]) -> None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise self.fail(
                f"{key}.{unknown[0]}" if key else unknown[0],
                f"one of the keys {', '.join(sorted(allowed))}", unknown[0], show=False,
            )

    def num(self, data: Mapping[str, Any], key: str, name: str, default: float | None,
            lo: float = 0.0) -> float | None:
        v = data.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            raise self.fail(f"{key}.{name}" if key else name, f"a number >= {lo:g}", v)
        return float(v)

    def req_num(self, data: Mapping[str, Any], key: str, name: str, default: float,
                lo: float = 0.0) -> float:
        v = self.num(data, key, name, default, lo)
        assert v is not None
        return v

    def int_(self, data: Mapping[str, Any], key: str, name: str, default: int | None,
             lo: int = 0) -> int | None:
        v = data.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise self.fail(f"{key}.{name}" if key else name, f"an integer >= {lo}", v)
        return v

    def str_(self, data: Mapping[str, Any], key: str, name: str, default: str | None) -> str | None:
        v = data.get(name, default)
        if v is not None and not isinstance(v, str):
            raise self.fail(f"{key}.{name}" if key else name, "a string", v)
        return v

    def bool_(self, data: Mapping[str, Any], key: str, name: str, default: bool) -> bool:
        v = data.get(name, default)
        if not isinstance(v, bool):
            raise self.fail(f"{key}.{name}", "true or false", v)
        return v


def _settings(r: _Reader, data: Any) -> RuntimeSettings:
    data = r.table(data, "settings")
    fields = {f.name for f in attrs.fields(RuntimeSettings)}
    r.known(data, "settings", fields)
    for f in attrs.fields(RuntimeSettings):
        if f.name not in data:
            continue
        v, want = data[f.name], str(f.type)
        # why: the core takes any number; a bool or float where an int is wanted only fails
        # when the log is encoded at the end of the run
        if want.startswith("int") and (isinstance(v, bool) or not isinstance(v, int)):
            raise r.fail(f"settings.{f.name}", "a whole number", v)
        if want.startswith("float") and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        ):
            raise r.fail(f"settings.{f.name}", "a number", v)
        if want.startswith("float") and isinstance(v, int):
            data = {**data, f.name: float(v)}
    lo_hb = LIMITS["min_heartbeat_interval_s"]
    hb = data.get("heartbeat_interval_s", lo_hb)
    if hb < lo_hb:
        raise r.fail("settings.heartbeat_interval_s", f"a number >= {lo_hb:g} (the limit)", hb)
    try:
        settings = RuntimeSettings(**data)
        check_setting_bounds(settings)  # what creating the runtime would refuse
        return settings
    except InvalidSettings as exc:
        raise ScenarioError(f"{r.source}: settings: {exc}") from None
    except TypeError as exc:
        raise ScenarioError(f"{r.source}: settings: {exc}") from None


def _duration(r: _Reader, data: Any, key: str) -> DurationDist:
    data = r.table(data, key)
    r.known(data, key, {"kind", "mean_s", "min_s", "max_s"})
    kind = r.str_(data, key, "kind", "exponential")
    if kind not in ("exponential", "fixed", "uniform"):
        raise r.fail(f"{key}.kind", "one of exponential, fixed, uniform", kind)
    for bound in ("min_s", "max_s"):  # why: ignored by these kinds, so surely a mistake
        if kind != "uniform" and bound in data:
            raise r.fail(f"{key}.{bound}", f"no {bound} for kind = {kind!r} (it uses mean_s; "
                         "min_s and max_s bound kind = \"uniform\")", data[bound])
    d = DurationDist(
        kind,
        r.req_num(data, key, "mean_s", 30.0),
        r.req_num(data, key, "min_s", 0.0),
        r.req_num(data, key, "max_s", 0.0),
    )
    if kind == "uniform" and d.max_s < d.min_s:
        raise r.fail(f"{key}.max_s", f"a number >= min_s ({d.min_s:g})", d.max_s)
    return d


def _workload(r: _Reader, data: Any) -> Workload:
    data = r.table(data, "workload")
    r.known(data, "workload", {"rate_per_s", "duration", "start_at_s", "stop_at_s", "needs",
                               "duplicate_submit_p"})
    needs_raw = data.get("needs", [])
    if not isinstance(needs_raw, list):
        raise r.fail("workload.needs", "a list of {credential = \"id\", version = N}", needs_raw)
    needs: list[tuple[str, int]] = []
    for i, item in enumerate(needs_raw):
        key = f"workload.needs[{i}]"
        item = r.table(item, key)
        r.known(item, key, {"credential", "version"})
        cid = r.str_(item, key, "credential", None)
        if not cid:
            raise r.fail(f"{key}.credential", "a credential id", cid)
        version = r.int_(item, key, "version", 1, lo=1) or 1
        try:
            core_check_credential(cid, version)
        except InvalidCommand as exc:
            raise r.fail(key, f"a credential the core accepts ({exc})", cid) from None
        if any(c == cid for c, _v in needs):
            raise r.fail(f"{key}.credential", "each credential once in needs", cid)
        needs.append((cid, version))
    rate = r.req_num(data, "workload", "rate_per_s", 1.0)
    if rate > LIMITS["rate_per_s"]:
        raise r.fail("workload.rate_per_s", f"a number <= {LIMITS['rate_per_s']:g} (the limit)",
                     rate)
    p = r.req_num(data, "workload", "duplicate_submit_p", 0.0)
    if p > 1:
        raise r.fail("workload.duplicate_submit_p", "a probability 0..1", p)
    start = r.req_num(data, "workload", "start_at_s", 0.0)
    stop = r.num(data, "workload", "stop_at_s", None)
    if stop is not None and stop < start:
        raise r.fail("workload.stop_at_s", f"a time >= start_at_s ({start:g} s): jobs arrive "
                     "from start_at_s until stop_at_s", stop)
    return Workload(rate, _duration(r, data.get("duration", {}), "workload.duration"), start,
                    stop, tuple(needs), p)


_NODE_KEYS = {f.name for f in attrs.fields(NodeSpec)}


def _node(r: _Reader, data: Any, i: int) -> NodeSpec:
    key = f"nodes[{i}]"
    data = r.table(data, key)
    r.known(data, key, _NODE_KEYS)
    name = r.str_(data, key, "name", None)
    if name is None:
        raise r.fail(f"{key}.name", "a node name", name)
    _core_rule(r, f"{key}.name", name)
    version = r.str_(data, key, "version", "5.40")
    assert version is not None
    _core_rule(r, f"{key}.version", version)
    limit = r.int_(data, key, "concurrency_limit", None, lo=LIMIT_RANGE[0])
    if limit is not None and limit > LIMIT_RANGE[1]:
        raise r.fail(f"{key}.concurrency_limit",
                     f"an integer {LIMIT_RANGE[0]}..{LIMIT_RANGE[1]} (the core's range)", limit)
    k = r.str_(data, key, "key", "key1")
    if k not in ("key1", "key2"):
        raise r.fail(f"{key}.key", "key1 or key2", k)
    speed = r.req_num(data, key, "speed", 1.0)
    if speed <= 0:
        raise r.fail(f"{key}.speed", "a number > 0", speed)
    return NodeSpec(
        name,
        r.int_(data, key, "cores", 4, lo=1) or 1,
        r.int_(data, key, "memory_mb", 8192, lo=1) or 1,
        version,
        r.num(data, key, "version_released_at", None, lo=-1e12),
        r.req_num(data, key, "join_at_s", 0.0),
        k,
        limit,
        speed,
        r.bool_(data, key, "remote_access", False),
    )


def _core_rule(r: _Reader, key: str, value: str) -> None:
    # why: a name the core refuses never joins, and the run would pass with nothing done
    try:
        _core_check_name(key, value)
    except InvalidCommand:
        raise r.fail(key, f"a name the core accepts: {_NAME_RULE}", value) from None


_NAME_RULE = "1-128 characters, not only whitespace, no control characters"


def _random_faults(r: _Reader, data: Any, needs: tuple[Any, ...]) -> RandomFaults:
    data = r.table(data, "random_faults")
    r.known(data, "random_faults", {f.name for f in attrs.fields(RandomFaults)})
    kinds = data.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise r.fail("random_faults.kinds", "a list of fault kinds", kinds)
    for k in kinds:
        if k not in FAULT_KINDS:
            raise r.fail("random_faults.kinds", f"fault kinds among: {', '.join(FAULT_KINDS)}", k)
    lo = r.req_num(data, "random_faults", "min_duration_s", 5.0)
    hi = r.req_num(data, "random_faults", "max_duration_s", 120.0)
    if hi < lo:
        raise r.fail("random_faults.max_duration_s", f"a number >= min_duration_s ({lo:g})", hi)
    p = r.req_num(data, "random_faults", "probability", 0.2)
    if p > 1:
        raise r.fail("random_faults.probability", "a probability 0..1", p)
    per_hour = r.req_num(data, "random_faults", "per_hour", 0.0)
    if per_hour > LIMITS["per_hour"]:
        raise r.fail("random_faults.per_hour", f"a number <= {LIMITS['per_hour']:g} (the limit)",
                     per_hour)
    if data and not (kinds and per_hour > 0):
        # why: either alone draws nothing, and the run would pass without the faults it names
        key, want = (("kinds", "a list of fault kinds to draw from") if not kinds
                     else ("per_hour", "a rate > 0 (faults per simulated hour)"))
        raise r.fail(f"random_faults.{key}", f"{want}: [random_faults] draws faults only with "
                     "both per_hour > 0 and kinds (remove the table to draw none)",
                     data.get(key), show=key in data)
    for k in kinds:
        if k in ("credential_drift", "rotate_credential") and not needs:
            raise r.fail("random_faults.kinds", f"kinds that can be drawn: {k} picks a "
                         "credential from workload.needs, which is empty", k)
    return RandomFaults(per_hour, tuple(kinds), lo, hi, p)


# The fields each kind of expectation reads; any other would be ignored, so it is refused.
_EXPECT_FIELDS = {
    "dispatcher": {"kind", "at_s", "node"},
    "status": {"kind", "at_s", "node", "status"},
    "metric": {"kind", "metric", "max", "min", "equals"},
}


def _expect(r: _Reader, data: Any, i: int, nodes: set[str], end_s: float) -> Expectation:
    key = f"expect[{i}]"
    data = r.table(data, key)
    r.known(data, key, {f.name for f in attrs.fields(Expectation)})
    kind = r.str_(data, key, "kind", None)
    if kind not in _EXPECT_FIELDS:
        raise r.fail(f"{key}.kind", f"one of {', '.join(_EXPECT_FIELDS)}", kind)
    stray = sorted(set(data) - _EXPECT_FIELDS[kind])
    if stray:
        raise r.fail(f"{key}.{stray[0]}", f"only the fields of a {kind} expectation: "
                     f"{', '.join(sorted(_EXPECT_FIELDS[kind]))}", data[stray[0]])
    at = r.num(data, key, "at_s", None)
    if at is not None and at > end_s:
        raise r.fail(f"{key}.at_s", f"a time within the run (0..{end_s:g} s: duration_s + "
                     "drain_s)", at)
    node = r.str_(data, key, "node", None)
    if node is not None and node not in nodes:
        known = ", ".join(sorted(nodes))
        raise r.fail(f"{key}.node", f"one of the scenario's nodes ({known})", node)
    status = r.str_(data, key, "status", None)
    metric = r.str_(data, key, "metric", None)
    if kind in ("dispatcher", "status") and at is None:
        raise r.fail(f"{key}.at_s", "the time to check, in seconds", None)
    if kind == "status":
        if node is None:
            raise r.fail(f"{key}.node", "the node whose status to check", None)
        # a node that has not registered yet reads as NeedRegistration (see report.py)
        valid = [*(s.value for s in NodeStatus), "Removed"]  # NeedRegistration comes first
        if status not in valid:
            raise r.fail(f"{key}.status", f"one of {', '.join(valid)}", status)
    bounds = [r.num(data, key, b, None, lo=-1e18) for b in ("max", "min", "equals")]
    if kind == "metric":
        _check_metric(r, key, metric)
        if all(b is None for b in bounds):
            raise r.fail(key, "at least one of max, min, equals", None, show=False)
    return Expectation(kind, at, node, status, metric, *bounds)


_TOP_KEYS = {
    "name", "description", "seed", "duration_s", "drain_s", "settings", "nodes", "workload",
    "network", "faults", "random_faults", "expect", "links", "proxy_changes",
}


def parse_scenario(data: Mapping[str, Any], source: str = "<memory>") -> Scenario:
    """Build a scenario from parsed TOML; raises :class:`ScenarioError` naming what is wrong."""
    r = _Reader(source)
    r.known(data, "", _TOP_KEYS)
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise r.fail("nodes", "an array of tables [[nodes]] with at least one node", raw_nodes)
    nodes = tuple(_node(r, n, i) for i, n in enumerate(raw_nodes))
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise r.fail("nodes", "unique node names", dup)
    settings = _settings(r, data.get("settings", {}))
    net = r.table(data.get("network", {}), "network")
    r.known(net, "network", {"latency_s", "jitter_s"})
    faults_raw = data.get("faults", [])
    if not isinstance(faults_raw, list):
        raise r.fail("faults", "an array of tables [[faults]]", faults_raw)
    faults = []
    for i, f in enumerate(faults_raw):
        try:
            faults.append(parse_fault(r.table(f, f"faults[{i}]"), set(names)))
        except ValueError as exc:
            raise ScenarioError(f"{source}: faults[{i}]{exc}") from None
    expect_raw = data.get("expect", [])
    if not isinstance(expect_raw, list):
        raise r.fail("expect", "an array of tables [[expect]]", expect_raw)
    name = r.str_(data, "", "name", None)
    if name is None:
        name = Path(source).stem
    else:
        _core_rule(r, "name", name)  # the runtime's name: the core refuses what it refuses
    duration_s = r.req_num(data, "", "duration_s", 600.0)
    drain_s = r.req_num(data, "", "drain_s", 300.0)
    if duration_s <= 0:
        raise r.fail("duration_s", "a number > 0 (seconds of workload and faults)", duration_s)
    check_simulated_s(duration_s, drain_s, f"{source}: duration_s + drain_s",
                      settings.heartbeat_interval_s, len(nodes))
    workload = _workload(r, data.get("workload", {}))
    for i, f in enumerate(faults):
        if f.at_s >= duration_s:
            # why: faults start only while the workload runs; a later one would never run
            raise r.fail(f"faults[{i}].at_s", f"a time before duration_s ({duration_s:g} s): "
                         f"faults start only while the workload runs ({f.describe()})", f.at_s)
    window = (workload.stop_at_s if workload.stop_at_s is not None else duration_s)
    jobs = workload.rate_per_s * max(0.0, min(window, duration_s) - workload.start_at_s)
    if jobs > LIMITS["jobs"]:
        raise r.fail("workload.rate_per_s", f"at most {LIMITS['jobs']:g} jobs in the run (the "
                     f"limit; this asks for about {jobs:.3g})", workload.rate_per_s)
    return Scenario(
        name=name,
        nodes=nodes,
        description=r.str_(data, "", "description", "") or "",
        seed=r.int_(data, "", "seed", 1) or 0,
        duration_s=duration_s,
        drain_s=drain_s,
        settings=settings,
        workload=workload,
        network=NetworkSpec(
            r.req_num(net, "network", "latency_s", 0.005),
            r.req_num(net, "network", "jitter_s", 0.002),
        ),
        faults=tuple(faults),
        random_faults=_random_faults(r, data.get("random_faults", {}), workload.needs),
        expect=tuple(_expect(r, e, i, set(names), duration_s + drain_s)
                     for i, e in enumerate(expect_raw)),
        source=source,
        links=_surface(r, data, "links", parse_link),
        proxy_changes=_surface(r, data, "proxy_changes",
                               lambda t: parse_proxy_change(t, set(names))),
    )


def _surface(r: _Reader, data: Mapping[str, Any], key: str, parse: Any) -> tuple[Any, ...]:
    """``[[links]]`` or ``[[proxy_changes]]``, parsed by shir.sim.surface."""
    raw = data.get(key, [])
    if not isinstance(raw, list):
        raise r.fail(key, f"an array of tables [[{key}]]", raw)
    out = []
    for i, item in enumerate(raw):
        table = r.table(item, f"{key}[{i}]")
        try:
            out.append(parse(table))
        except ValueError as exc:
            raise ScenarioError(f"{r.source}: {key}[{i}]{exc}") from None
    return tuple(out)


def check_simulated_s(duration_s: float, drain_s: float, what: str,
                      heartbeat_interval_s: float = 10.0, nodes: int = 1) -> None:
    """Refuse a run longer than the documented limits (``LIMITS``), before it starts."""
    limit = LIMITS["simulated_s"]
    total = duration_s + drain_s
    if total > limit:
        raise ScenarioError(
            f"{what}: expected at most {limit:g} s of simulated time in all (the limit: 7 days), "
            f"got {total:g} s; simulate a shorter window"
        )
    beats = nodes * total / heartbeat_interval_s
    if beats > LIMITS["heartbeats"]:
        raise ScenarioError(
            f"{what}: expected at most {LIMITS['heartbeats']:g} heartbeats in the run (the limit: "
            f"nodes x simulated seconds / heartbeat_interval_s), got about {beats:.3g} "
            f"({nodes} nodes, {total:g} s, every {heartbeat_interval_s:g} s); simulate a shorter "
            "window or raise heartbeat_interval_s"
        )


def builtin_names() -> tuple[str, ...]:
    """The names of the scenarios shipped inside the package."""
    folder = resources.files("shir.sim") / "scenarios"
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml")))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a built-in scenario by name, or a TOML file by path."""
    text: str
    source = str(name_or_path)
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ScenarioError(
                f"{source}: not a UTF-8 text file (byte {exc.start} is "
                f"{exc.object[exc.start]:#04x}); save it as UTF-8 TOML"
            ) from None
        except OSError as exc:
            why = exc.strerror
            raise ScenarioError(f"{source}: cannot read the scenario file ({why})") from None
    else:
        res = resources.files("shir.sim") / "scenarios" / f"{source}.toml"
        if not res.is_file():
            raise ScenarioError(
                f"no built-in scenario {source!r} and no such file; built-in scenarios: "
                f"{', '.join(builtin_names())}"
            )
        text = res.read_text(encoding="utf-8")
        source = f"{source} (built-in)"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML ({exc})") from None
    return parse_scenario(data, source)
