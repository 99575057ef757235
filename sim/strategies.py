"""Hypothesis strategies for the simulator's values (fault schedules, scenarios, the cluster
machine's set-ups), shir's Hypothesis profiles, and scenarios as TOML.

The strategies (:func:`faults`, :func:`fault_schedules`, :func:`scenarios`,
:func:`cluster_setups`) build valid values for a user's own tests; those for the core's values
(:func:`node_metrics`, :func:`commands`, :func:`events`, ...) live in
``shir.sim.core_strategies`` and are re-exported here. Profiles ``shir-quick`` and ``shir-ci``
are registered on import (:func:`profile`). :func:`to_toml` writes a scenario as a file
``shir sim run`` reads. ``shir.sim.testing`` re-exports all of it.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

try:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.errors import InvalidArgument
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shir.sim.testing needs Hypothesis: pip install 'shir[testing]' (or hypothesis)"
    ) from exc

from shir.core.model import RuntimeSettings
from shir.sim.core_strategies import (
    EVENT_OVERRIDES,
    NODE_NAMES,
    VERSIONS,
    auth_keys,
    commands,
    events,
    node_metrics,
    runtime_settings,
    strategy_for_type,
)

# Still importable from here, as before they moved to shir.sim.core_strategies.
from shir.sim.core_strategies import FLOATS as FLOATS
from shir.sim.core_strategies import MSGPACK_INT as MSGPACK_INT
from shir.sim.faults import FAULT_KINDS, FIELD_TYPES, Fault
from shir.sim.scenario import (
    DurationDist,
    Expectation,
    NetworkSpec,
    NodeSpec,
    RandomFaults,
    Scenario,
    Workload,
)

__all__ = [
    "CREDENTIALS",
    "EVENT_OVERRIDES",
    "NEVER_S",
    "NODE_NAMES",
    "PROFILES",
    "VERSIONS",
    "ClusterSetup",
    "auth_keys",
    "cluster_setups",
    "commands",
    "events",
    "fault_schedules",
    "faults",
    "node_metrics",
    "profile",
    "runtime_settings",
    "scenarios",
    "strategy_for_type",
    "to_toml",
]

NEVER_S = 1e9  # the machine's World runs "forever"; the join time of a node that never joins

# --- profiles ----------------------------------------------------------------------------------

PROFILES = ("shir-quick", "shir-ci")
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
# Fast and deterministic: the same examples every run, so a test suite never flakes on it.
settings.register_profile("shir-quick", max_examples=40, stateful_step_count=20,
                          derandomize=True, deadline=None, suppress_health_check=_QUIET)
# Fresh examples every run; a failure prints the blob that reproduces it (@reproduce_failure).
settings.register_profile("shir-ci", max_examples=1000, stateful_step_count=40, deadline=None,
                          suppress_health_check=_QUIET, print_blob=True)


def profile(name: str | None = None) -> settings:
    """The settings of a shir profile: ``name``, else ``$SHIR_HYPOTHESIS_PROFILE``, else
    ``shir-quick``. Use it on one test; loading it globally would change every test."""
    name = name or os.environ.get("SHIR_HYPOTHESIS_PROFILE") or "shir-quick"
    try:
        return settings.get_profile(name)
    except InvalidArgument:
        raise ValueError(f"unknown Hypothesis profile {name!r}; shir's are {PROFILES}") from None


# --- strategies: faults and scenarios ------------------------------------------------------

_WHOLE_S = st.integers(1, 120).map(float)
# Shrinks towards 1.0: a minimal schedule then does not hinge on one lucky draw.
_PROBABILITY = st.integers(0, 19).map(lambda k: (20 - k) / 20)
# By field name; a field added to the fault kinds later falls back to its type (_BY_TYPE).
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "duration_s": _WHOLE_S,
    "probability": _PROBABILITY,
    "extra_s": st.sampled_from((0.5, 2.0, 0.05, 10.0)),
    "factor": st.sampled_from((0.5, 2.0, 0.8, 1.5)),
    "key": st.sampled_from(("key1", "key2")),
    "version": st.sampled_from(("5.41", "5.39", "5.42")),
    "fail": st.booleans(),
    "oneway": st.booleans(),
    "count": st.integers(1, 20),
}
_BY_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "pos": _WHOLE_S,
    "prob": _PROBABILITY,
    "bool": st.booleans(),
    "key": st.sampled_from(("key1", "key2")),
    "count": st.integers(1, 20),
    "str": st.sampled_from(("x", "y")),
}
_KIND_FIELDS: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("clock_jump", "extra_s"): _WHOLE_S,  # a leap of the node's clock, not a message delay
    ("upgrade", "duration_s"): st.integers(1, 60).map(float),
}
CREDENTIALS = ("ls-sql",)


def _field(kind: str, name: str, credentials: tuple[str, ...]) -> st.SearchStrategy[Any]:
    if name == "credential":
        return st.sampled_from(credentials)
    s = _KIND_FIELDS.get((kind, name))
    if s is None:
        s = _FIELDS.get(name)
    if s is None:
        s = _BY_TYPE[FIELD_TYPES[name]]
    return s


def faults(
    nodes: Sequence[str],
    at_s: st.SearchStrategy[float] | None = None,
    kinds: Iterable[str] | None = None,
    credentials: Sequence[str] = CREDENTIALS,
) -> st.SearchStrategy[Fault]:
    """Faults of every kind in ``FAULT_KINDS`` (or ``kinds``) with valid fields, on ``nodes``
    (and, for credential faults, ``credentials``: the workload's ``needs`` ids).

    Kinds that need a node are left out when ``nodes`` is empty. Every fault parses back
    through ``parse_fault`` unchanged (``to_toml`` writes it).
    """
    nodes = tuple(nodes)
    creds = tuple(credentials) or CREDENTIALS
    at = at_s if at_s is not None else st.integers(0, 600).map(float)
    chosen = list(FAULT_KINDS) if kinds is None else list(kinds)
    for k in chosen:
        if k not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {k!r}; valid kinds: {', '.join(FAULT_KINDS)}")
    options = []
    for kind in chosen:
        spec = FAULT_KINDS[kind]
        if "node" in spec.needs and not nodes:
            continue
        options.append(_fault_of(kind, nodes, at, creds))
    if not options:
        raise ValueError("no fault kind fits: every chosen kind needs a node, and nodes is empty")
    return st.one_of(options)


def _fault_of(kind: str, nodes: tuple[str, ...], at: st.SearchStrategy[float],
              credentials: tuple[str, ...]) -> st.SearchStrategy[Fault]:
    spec = FAULT_KINDS[kind]
    fields = {name: _field(kind, name, credentials) for name in (*spec.needs, *spec.allows)
              if name not in ("node", "peer")}

    @st.composite
    def build(draw: st.DrawFn) -> Fault:
        values: dict[str, Any] = {"kind": kind, "at_s": draw(at)}
        for name in (*spec.needs, *spec.allows):
            required = name in spec.needs
            if not required and ((name in ("node", "peer") and not nodes)
                                 or not draw(st.booleans())):
                continue
            if name == "node":
                values["node"] = draw(st.sampled_from(nodes))
            elif name == "peer":
                others = [n for n in nodes if n != values.get("node")]
                if others:
                    values["peer"] = draw(st.sampled_from(others))
            else:
                values[name] = draw(fields[name])
        return Fault(**values)

    return build()


def fault_schedules(nodes: Sequence[str], duration_s: float, max_size: int = 6,
                    kinds: Iterable[str] | None = None, credentials: Sequence[str] = CREDENTIALS,
                    ) -> st.SearchStrategy[tuple[Fault, ...]]:
    """Up to ``max_size`` faults at whole seconds in ``[0, duration_s)``, in time order."""
    last = max(0, math.ceil(duration_s) - 1)
    at = st.integers(0, last).map(float)
    return st.lists(faults(nodes, at, kinds, credentials), max_size=max_size).map(
        lambda fs: tuple(sorted(fs, key=lambda f: f.at_s)))


_NAME_CHARS = st.characters(codec="ascii", categories=("Ll", "Lu", "Nd"), include_characters="-_")


@st.composite
def scenarios(draw: st.DrawFn, max_nodes: int = 4, max_duration_s: int = 300,
              max_faults: int = 4) -> Scenario:
    """Small valid scenarios: 1..``max_nodes`` nodes, a short workload, a fault schedule,
    sometimes random faults and expectations. They parse back from :func:`to_toml` unchanged."""
    count = draw(st.integers(1, max_nodes))
    names = [f"node-{i + 1}" for i in range(count)]
    duration = float(draw(st.integers(10, max_duration_s)))
    nodes = []
    for name in names:
        nodes.append(NodeSpec(
            name,
            cores=draw(st.sampled_from((4, 2, 8, 16))),
            memory_mb=draw(st.sampled_from((8192, 4096, 16384))),
            version=draw(st.sampled_from(("5.40", "5.40", "5.41"))),
            version_released_at=draw(st.none() | st.integers(-3 * 10**7, 0).map(float)),
            join_at_s=float(draw(st.integers(0, int(duration) // 2))) if name != names[0]
            else 0.0,
            key=draw(st.sampled_from(("key1", "key2"))),
            concurrency_limit=draw(st.none() | st.integers(1, 16)),
            speed=draw(st.sampled_from((1.0, 0.5, 2.0))),
            remote_access=draw(st.booleans()) if count == 1 else True,
        ))
    kind = draw(st.sampled_from(("exponential", "fixed", "uniform")))
    dist = (DurationDist("uniform", 10.0, 1.0, draw(st.sampled_from((5.0, 30.0))))
            if kind == "uniform" else DurationDist(kind, draw(st.sampled_from((10.0, 1.0, 30.0)))))
    start = float(draw(st.integers(0, int(duration) // 2)))
    workload = Workload(
        rate_per_s=draw(st.sampled_from((1.0, 0.0, 0.2, 2.0))),
        duration=dist,
        start_at_s=start,
        stop_at_s=draw(st.none() | st.integers(int(start), int(duration)).map(float)),
        needs=draw(st.sampled_from(((), (("ls-sql", 1),)))),
        duplicate_submit_p=draw(st.sampled_from((0.0, 0.1))),
    )
    random_faults = draw(st.just(RandomFaults()) | st.builds(
        RandomFaults, st.sampled_from((6.0, 30.0)),
        st.lists(st.sampled_from(("crash", "hibernate", "partition", "drop")), min_size=1,
                 max_size=3, unique=True).map(tuple),
        st.just(5.0), st.sampled_from((60.0, 120.0)), st.sampled_from((0.2, 0.5))))
    expect = draw(st.lists(st.one_of(
        st.builds(Expectation, st.just("dispatcher"), st.integers(0, int(duration)).map(float),
                  st.none() | st.sampled_from(names)),
        st.builds(Expectation, st.just("status"), st.integers(0, int(duration)).map(float),
                  st.sampled_from(names), st.sampled_from(("Online", "Offline", "Limited"))),
        st.builds(Expectation, st.just("metric"), metric=st.sampled_from(
            ("jobs.lost", "jobs.duplicate_effects", "failovers", "refusals.StaleTerm")),
            max=st.none() | st.integers(0, 5).map(float),
            min=st.integers(0, 1).map(float)),
    ), max_size=3).map(tuple))
    return Scenario(
        name=draw(st.text(_NAME_CHARS, min_size=1, max_size=16)),
        nodes=tuple(nodes),
        description=draw(st.text(max_size=30)),
        seed=draw(st.integers(0, 2**31)),
        duration_s=duration,
        drain_s=float(draw(st.integers(0, 120))),
        settings=draw(st.just(RuntimeSettings()) | runtime_settings()),
        workload=workload,
        network=draw(st.just(NetworkSpec()) | st.builds(
            NetworkSpec, st.sampled_from((0.001, 0.05)), st.sampled_from((0.0, 0.01)))),
        faults=draw(fault_schedules(names, duration, max_faults,
                                    credentials=[c for c, _v in workload.needs] or CREDENTIALS)),
        random_faults=random_faults,
        expect=expect,
    )


@attrs.frozen
class ClusterSetup:
    """What a machine starts from: the seed, every node it may have, settings, the workload.

    Nodes with ``join_at_s == 0`` are there from the start; the others wait for ``join``.
    """

    seed: int
    nodes: tuple[NodeSpec, ...]
    settings: RuntimeSettings
    workload: Workload


_HARDWARE = ((2, 4096, "key1"), (4, 8192, "key2"), (8, 16384, "key1"))  # cores, MiB, key
_TIMING = ((10.0, 3, 60.0), (5.0, 2, 20.0), (10.0, 3, 20.0))  # heartbeat, missed, lock


@st.composite
def cluster_setups(draw: st.DrawFn, max_nodes: int = 5) -> ClusterSetup:
    """Setups for :class:`ClusterMachine`: 1..``max_nodes`` nodes (a fifth is one too many and
    must be refused), short settings, and the workload: job durations, maybe credentials the
    jobs need, and maybe a window of Poisson arrivals besides the ``burst`` rule's.

    Few draws on purpose: every draw costs Hypothesis time in every example.
    """
    count = draw(st.integers(1, max_nodes))
    late = draw(st.integers(0, count - 1))  # shrinks towards "everyone from the start"
    nodes = []
    for i in range(count):
        cores, memory, key = draw(st.sampled_from(_HARDWARE))
        nodes.append(NodeSpec(NODE_NAMES[i], cores=cores, memory_mb=memory, key=key,
                              join_at_s=0.0 if i < count - late else NEVER_S,
                              remote_access=True))  # on, as a multi-node runtime needs
    heartbeat, missed, lock = draw(st.sampled_from(_TIMING))
    runtime = RuntimeSettings(
        heartbeat_interval_s=heartbeat,
        missed_heartbeats_offline=missed,
        lock_duration_s=lock,
        max_deliveries=draw(st.sampled_from((10, 3, 1))),
        offline_expiry_s=draw(st.sampled_from((None, 120.0))),
    )
    kind, mean = draw(st.sampled_from((("fixed", 10.0), ("exponential", 10.0), ("fixed", 2.0),
                                       ("exponential", 40.0))))
    rate, start, length = draw(st.sampled_from(((0.0, 0.0, 0), (0.2, 0.0, 30), (1.0, 10.0, 20),
                                                (0.5, 0.0, 60))))  # shrinks to bursts only
    workload = Workload(
        rate_per_s=rate,
        duration=DurationDist(kind, mean),
        start_at_s=start,
        stop_at_s=start + length if rate else None,
        needs=draw(st.sampled_from(((), (("ls-sql", 1),)))),
        duplicate_submit_p=draw(st.sampled_from((0.0, 0.2))),
    )
    return ClusterSetup(draw(st.integers(0, 2**16)), tuple(nodes), runtime, workload)


# --- scenarios as TOML ---------------------------------------------------------------------

def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04X}")
        elif 0xD800 <= o <= 0xDFFF:
            raise ValueError(f"a lone surrogate (U+{o:04X}) cannot be written in TOML")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, enum.Enum):
        return _toml_value(v.value)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _changed(obj: Any, default: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Fields of an attrs object that differ from ``default``'s, in declaration order."""
    skipped = set(skip)
    return {f.name: getattr(obj, f.name) for f in attrs.fields(type(obj))
            if f.name not in skipped and getattr(obj, f.name) != getattr(default, f.name)}


def to_toml(scenario: Scenario, comment: str = "") -> str:
    """The scenario as a TOML file that ``parse_scenario`` reads back equal (but ``source``).

    Values equal to their defaults are left out; ``comment`` (lines) goes on top.
    """
    sc = scenario
    out: list[str] = [f"# {line}".rstrip() for line in comment.splitlines()]

    def put(key: str, value: Any) -> None:
        out.append(f"{key} = {_toml_value(value)}")

    put("name", sc.name)
    if sc.description:
        put("description", sc.description)
    put("seed", sc.seed)
    put("duration_s", sc.duration_s)
    put("drain_s", sc.drain_s)
    settings_changed = _changed(sc.settings, RuntimeSettings())
    if settings_changed:
        out += ["", "[settings]"]
        for k, v in settings_changed.items():
            if v is None:
                raise ValueError(f"settings.{k} = None cannot be written in TOML (leave it out)")
            put(k, v)
    for n in sc.nodes:
        out += ["", "[[nodes]]"]
        put("name", n.name)
        for k, v in _changed(n, NodeSpec(n.name), skip=("name",)).items():
            put(k, v)
        if n.join_at_s >= NEVER_S:
            out[-1] += "  # never joins"
    if sc.workload != Workload():
        out += ["", "[workload]"]
        for k, v in _changed(sc.workload, Workload()).items():
            if k == "duration":
                v = {f: x for f, x in attrs.asdict(v).items()
                     if f == "kind" or x != getattr(DurationDist(), f)}
            elif k == "needs":
                v = [{"credential": cid, "version": ver} for cid, ver in v]
            put(k, v)
    if sc.network != NetworkSpec():
        out += ["", "[network]"]
        for k, v in _changed(sc.network, NetworkSpec()).items():
            put(k, v)
    for f in sc.faults:
        spec = FAULT_KINDS[f.kind]
        out += ["", "[[faults]]"]
        put("kind", f.kind)
        put("at_s", f.at_s)
        default = Fault(f.kind, f.at_s)
        for k in (*spec.needs, *spec.allows):
            v = getattr(f, k)
            if k in spec.needs or v != getattr(default, k):
                if v is None:
                    raise ValueError(f"a {f.kind} fault needs {k}")
                put(k, v)
        stray = set(_changed(f, default)) - {*spec.needs, *spec.allows}
        if stray:
            raise ValueError(f"a {f.kind} fault takes no {', '.join(sorted(stray))}")
    if sc.random_faults != RandomFaults():
        out += ["", "[random_faults]"]
        for k, v in attrs.asdict(sc.random_faults).items():
            put(k, v)
    for e in sc.expect:
        out += ["", "[[expect]]"]
        for k, v in attrs.asdict(e).items():
            if v is not None:
                put(k, v)
    return "\n".join(out).lstrip("\n") + "\n"


