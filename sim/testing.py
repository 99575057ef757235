"""Property-based failover testing: Hypothesis strategies and a stateful cluster machine.

Theory of operation
-------------------
:class:`ClusterMachine` is a Hypothesis ``RuleBasedStateMachine`` whose system under test is a
simulated cluster: a :class:`~shir.sim.world.World`, the simulator's own, driving the core
through the same :class:`~shir.core.driver.Driver`. Its rules do only what a scenario file can
say (a node joins, hibernates, crashes, is partitioned, a key is regenerated, any other fault
kind, time passes), each at the current simulated time, and every one is recorded. So whatever
the machine finds, the recorded schedule reproduces in the simulator: on failure it is printed
as a scenario TOML (:func:`to_toml`) with the ``shir sim run FILE --seed N`` command that
replays it, and Hypothesis has already shrunk it.

Replaying is exact, byte for byte, because the machine builds its World the way a scenario run
does and makes SimPy order simultaneous events as the replay will:

- every node the run may ever have is declared from the start (the network draws a latency for
  each message to each of them, joined or not); a node that never joined is written with a
  ``join_at_s`` far past the end;
- injections at one instant are applied before anything else happens at that instant (as the
  replay's fault timers, scheduled at set-up, come first), faults in recorded order, then joins
  in node order;
- the machine's own times lie on a grid (0.25, 1.25, 2.25, ...), never on the whole or half
  seconds where set-up timers fire and nodes that joined at 0 heartbeat, so no injection ties
  with an event the replay would order differently;
- the World runs with an endless duration; the end is chosen at teardown (at or after the
  workload stops), and there, as the replay's timers would, the machine takes the snapshot,
  heals every fault and drains.

``tests/test_property_machine.py`` checks this: the event log of random machine runs hashes the
same as ``World(machine.scenario()).run()``.

The invariants are the simulator's checkers (:class:`~shir.sim.invariants.Checkers`) plus
:class:`ClusterChecks`, which also watch the commands the core accepts: one dispatcher per
term, no dispatch under an old term, no lease held by an Offline node and none used after its
node went Offline. ``shir sim run`` checks only the former; :func:`replay` runs a scenario with
both.

The strategies (:func:`node_metrics`, :func:`commands`, :func:`events`, :func:`faults`,
:func:`fault_schedules`, :func:`scenarios`) build valid values for a user's own tests.
Profiles ``shir-quick`` (the machine's default) and ``shir-ci`` (1000 examples) are registered
on import; ``SHIR_HYPOTHESIS_PROFILE`` picks one (:func:`profile`).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import math
import os
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

try:
    from hypothesis import HealthCheck, assume, note, settings
    from hypothesis import strategies as st
    from hypothesis.control import current_build_context
    from hypothesis.errors import InvalidArgument, StopTest, UnsatisfiedAssumption
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        initialize,
        invariant,
        precondition,
        rule,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shir.sim.testing needs Hypothesis: pip install 'shir[testing]' (or hypothesis)"
    ) from exc

from shir.core import commands as cmd
from shir.core import events as ev
from shir.core import jobs
from shir.core.codec import _values, registered_events
from shir.core.credentials import credential_status
from shir.core.keys import AuthKey
from shir.core.leasing import (
    AbandonJob,
    CompleteJob,
    DispatchJobs,
    FailJob,
    RenewLease,
    RenewLeases,
    SetConcurrencyLimit,
    SubmitJob,
)
from shir.core.model import (
    CredentialVersion,
    KeyName,
    NodeMetrics,
    NodeStatus,
    RuntimeSettings,
)
from shir.sim.faults import _FIELD_TYPES, FAULT_KINDS, Fault
from shir.sim.scenario import (
    DurationDist,
    Expectation,
    NetworkSpec,
    NodeSpec,
    RandomFaults,
    Scenario,
    Workload,
    load_scenario,
)
from shir.sim.world import RunResult, World

__all__ = [
    "PROFILES",
    "ClusterChecks",
    "ClusterMachine",
    "ClusterSetup",
    "Failure",
    "auth_keys",
    "cluster_setups",
    "commands",
    "events",
    "fault_schedules",
    "faults",
    "final_violations",
    "node_metrics",
    "profile",
    "replay",
    "runtime_settings",
    "scenarios",
    "to_toml",
]

NEVER_S = 1e9  # the machine's World runs "forever"; the join time of a node that never joins
_DESCRIPTION = "A fault schedule found by shir.sim.testing.ClusterMachine"

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


# --- strategies: values of the core ------------------------------------------------------------

NODE_NAMES = ("node-1", "node-2", "node-3", "node-4", "node-5")
VERSIONS = ("5.40", "5.41", "5.39", "5.42")
_RUNTIME_ID = "rt-test"


def node_metrics(peers: Sequence[str] = NODE_NAMES[:4]) -> st.SearchStrategy[NodeMetrics]:
    """What a node reports: plausible load, a version, peers among ``peers``, credentials."""
    creds = st.lists(
        st.builds(CredentialVersion, st.sampled_from(("ls-sql", "ls-blob")), st.integers(1, 3)),
        max_size=2, unique_by=lambda c: c.credential_id,
    ).map(tuple)
    return st.builds(
        NodeMetrics,
        cpu_pct=st.floats(0.0, 100.0),
        available_memory_mb=st.integers(0, 65536),
        running_jobs=st.integers(0, 64),
        version=st.sampled_from(VERSIONS),
        version_released_at=st.none() | st.floats(-4e7, 4e7),
        reachable_peers=st.lists(st.sampled_from(tuple(peers)), unique=True).map(tuple)
        if peers else st.just(()),
        control_channel_ok=st.booleans(),
        remote_access=st.booleans(),
        config_hash=st.sampled_from(("", "cfg-a", "cfg-b")),
        credentials=creds,
    )


def runtime_settings() -> st.SearchStrategy[RuntimeSettings]:
    """Valid runtime settings, near the defaults (small values make faults bite sooner)."""
    return st.builds(
        RuntimeSettings,
        heartbeat_interval_s=st.sampled_from((10.0, 5.0, 2.0, 30.0)),
        missed_heartbeats_offline=st.integers(1, 5),
        lock_duration_s=st.sampled_from((60.0, 20.0, 5.0, 300.0)),
        max_deliveries=st.integers(1, 12),
        max_nodes=st.integers(1, 4),
        intranet_port=st.integers(1, 65535),
        offline_expiry_s=st.none() | st.sampled_from((60.0, 600.0)),
        version_lifetime_days=st.just(365),
        version_warning_days=st.integers(0, 120),
        duplicate_window_s=st.sampled_from((600.0, 60.0)),
    )


def auth_keys(runtime_id: str = _RUNTIME_ID, name: KeyName | None = None,
              generation: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[AuthKey]:
    """Auth keys of ``runtime_id`` (either slot unless ``name``), from drawn seed bytes."""
    names = st.just(name) if name is not None else st.sampled_from(KeyName)
    gens = generation if generation is not None else st.integers(1, 4)
    return st.builds(AuthKey.from_seed, st.just(runtime_id), names, gens,
                     st.binary(min_size=48, max_size=48))


def _tokens(nodes: Sequence[str], job_ids: Sequence[str]) -> st.SearchStrategy[jobs.LeaseToken]:
    return st.builds(jobs.LeaseToken, st.sampled_from(tuple(job_ids)),
                     st.sampled_from(tuple(nodes)), st.integers(0, 6), st.integers(1, 6))


def commands(
    runtime_id: str = _RUNTIME_ID,
    nodes: Sequence[str] = NODE_NAMES[:4],
    job_ids: Sequence[str] = ("job-1", "job-2", "job-3"),
    at: st.SearchStrategy[float] | None = None,
    kinds: Iterable[type] | None = None,
) -> st.SearchStrategy[object]:
    """Core commands (every kind, or those in ``kinds``) for a runtime ``runtime_id`` with these
    node names and job ids. Fields are well-typed and mostly plausible; whether the core accepts
    a command depends on the state, and a refusal must be a ``DomainError``."""
    nodes = tuple(nodes)
    at = at if at is not None else st.floats(0.0, 1e5)
    node = st.sampled_from(nodes)
    token = _tokens(nodes, job_ids)
    key_text = auth_keys(runtime_id).map(lambda k: k.text) | st.sampled_from(
        ("", "IR@x", f"IR@{runtime_id}@key1@1@AAAA", "IR@other@key2@1@AAAA"))
    creds = st.lists(st.builds(CredentialVersion, st.sampled_from(("ls-sql", "ls-blob")),
                               st.integers(1, 3)), max_size=2).map(tuple)
    reason = st.sampled_from(("", "disk full", "timeout"))
    by_kind: dict[type, st.SearchStrategy[Any]] = {
        cmd.CreateRuntime: st.builds(
            cmd.CreateRuntime, st.just(runtime_id), st.just("factory-1"), st.just("runtime"),
            auth_keys(runtime_id, KeyName.KEY1, st.just(1)),
            auth_keys(runtime_id, KeyName.KEY2, st.just(1)), at, st.just(""),
            runtime_settings()),
        cmd.RegenerateAuthKey: st.builds(cmd.RegenerateAuthKey, auth_keys(runtime_id), at),
        cmd.RegisterNode: st.builds(
            cmd.RegisterNode, key_text, node, node.map(lambda n: f"machine-{n}"),
            st.integers(1, 16), st.sampled_from((2048, 8192, 16384)), at, node_metrics(nodes)),
        cmd.RemoveNode: st.builds(cmd.RemoveNode, node, at),
        cmd.Heartbeat: st.builds(cmd.Heartbeat, node, st.integers(1, 4), node_metrics(nodes), at),
        cmd.StartUpgrade: st.builds(cmd.StartUpgrade, node, st.sampled_from(VERSIONS), at),
        cmd.FinishUpgrade: st.builds(cmd.FinishUpgrade, node, st.booleans(), at,
                                     st.none() | at, reason),
        cmd.Tick: st.builds(cmd.Tick, at),
        SubmitJob: st.builds(SubmitJob, st.sampled_from(tuple(job_ids)),
                             st.sampled_from(("key-a", "key-b", "key-c")), at, creds,
                             st.just(()), st.sampled_from((0.0, 10.0))),
        DispatchJobs: st.builds(DispatchJobs, node, st.integers(0, 6), at,
                                st.none() | st.integers(0, 4)),
        RenewLease: st.builds(RenewLease, token, at),
        RenewLeases: st.builds(RenewLeases, st.lists(token, max_size=3).map(tuple), at),
        CompleteJob: st.builds(CompleteJob, token, at),
        AbandonJob: st.builds(AbandonJob, token, at, reason),
        FailJob: st.builds(FailJob, token, at, reason),
        SetConcurrencyLimit: st.builds(SetConcurrencyLimit, node,
                                       st.none() | st.integers(1, 8), at),
    }
    chosen = list(by_kind) if kinds is None else list(kinds)
    unknown = [k for k in chosen if k not in by_kind]
    if unknown:
        raise ValueError(f"no strategy for {unknown}; known: {[k.__name__ for k in by_kind]}")
    return st.one_of([by_kind[k] for k in chosen])


# Events: built from the codec's registrations, so a new event type is covered without a
# hand-written strategy. (tests/strategies.py names it for the codec tests.)
MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=True)  # NaN != NaN breaks round trips
EVENT_OVERRIDES: dict[type, st.SearchStrategy[Any]] = {}
_class_cache: dict[type, st.SearchStrategy[Any]] = {}
_NO_VALUE = object()


def strategy_for_type(tp: Any) -> st.SearchStrategy[Any]:
    """Values of one field type the codec supports."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"unsupported union {tp!r}")
        return st.none() | strategy_for_type(options[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for_type(args[0]), max_size=5).map(tuple)
        raise TypeError(f"unsupported tuple type {tp!r}")
    if tp is bool:
        return st.booleans()
    if tp is int:
        return MSGPACK_INT
    if tp is float:
        return FLOATS
    if tp is str:
        return st.text(max_size=20)
    if tp is bytes:
        return st.binary(max_size=20)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(tp)
    if isinstance(tp, type) and (tp in _values or tp in EVENT_OVERRIDES):
        return _class_strategy(tp)
    raise TypeError(f"no strategy for field type {tp!r}")


def _class_strategy(cls: type) -> st.SearchStrategy[Any]:
    if cls in EVENT_OVERRIDES:
        return EVENT_OVERRIDES[cls]
    if cls not in _class_cache:
        _class_cache[cls] = st.deferred(lambda: _instances(cls))
    return _class_cache[cls]


def _default_of(field: attrs.Attribute[Any]) -> Any:
    default: Any = field.default
    if default is attrs.NOTHING:
        return _NO_VALUE
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return _NO_VALUE if default.takes_self else default.factory()
    return default


def _construct(cls: type, values: list[Any]) -> Any:
    try:
        return cls(*values)
    except Exception:
        return _NO_VALUE


def _instances(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = attrs.fields(cls)
    strategies = [strategy_for_type(hints[f.name]) for f in fields]
    defaults = [_default_of(f) for f in fields]

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        drawn = [draw(s) for s in strategies]
        obj = _construct(cls, drawn)
        if obj is not _NO_VALUE:
            return obj
        # Validators refused the mix: start from the defaults, let in each drawn value that
        # the class accepts.
        values = [d if d is not _NO_VALUE else v for d, v in zip(defaults, drawn, strict=True)]
        obj = _construct(cls, values)
        assume(obj is not _NO_VALUE)
        for i, d in enumerate(defaults):
            if d is _NO_VALUE:
                continue
            candidate = [*values[:i], drawn[i], *values[i + 1:]]
            better = _construct(cls, candidate)
            if better is not _NO_VALUE:
                values, obj = candidate, better
        return obj

    return build()


def events(types_: Iterable[type] | None = None) -> st.SearchStrategy[object]:
    """Instances of every event type registered with the codec (or of ``types_``)."""
    specs = registered_events()
    classes = [s.cls for s in specs] if types_ is None else list(types_)
    if not classes:
        raise RuntimeError("no event types are registered; import the modules defining them")
    return st.one_of([_class_strategy(c) for c in classes])


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
        s = _BY_TYPE[_FIELD_TYPES[name]]
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


# --- the invariants the machine adds to the simulator's checkers ------------------------------

class ClusterChecks:
    """Failover invariants over the commands the core accepts and the events it stores.

    - ``dispatchers``: in each term, dispatches are accepted from one node only;
    - ``fencing``: an accepted ``DispatchJobs`` carries the current term and comes from its
      dispatcher; no lease is renewed or completed after its node went Offline since it was
      granted (a node back from hibernation cannot act under its old term or lease);
    - ``offline-leases``: a node that is Offline (or removed) holds no lease.

    Attach to a World before it runs: a driver listener for the events, and a wrapper around
    ``world.driver.handle`` to see which commands were accepted.
    """

    CATEGORIES = ("dispatchers", "fencing", "offline-leases")

    def __init__(self, world: World) -> None:
        self.world = world
        self.violations: list[str] = []
        self.status: dict[str, NodeStatus] = {}
        self.leases: dict[str, set[str]] = {}  # node -> jobs it holds
        self.epoch: dict[str, int] = {}  # node -> how many times it went Offline or was removed
        self.lease_epoch: dict[str, int] = {}  # job -> its node's epoch when leased
        self.dispatchers: dict[int, set[str]] = {}  # term -> nodes whose dispatch was accepted
        driver = world.driver
        driver.listeners.append(self.on_events)
        inner = driver.handle

        def handle(command: object) -> tuple[object, ...]:
            effects = inner(command)  # raises when refused
            if type(command) is DispatchJobs:
                self.on_dispatch(command)
            return effects

        driver.handle = handle  # type: ignore[method-assign]

    def fail(self, category: str, what: str) -> None:
        """Record a violation stamped with the simulated time."""
        self.violations.append(f"t={self.world.env.now:.3f}s {category}: {what}")

    def of(self, category: str) -> list[str]:
        """The violations of one category."""
        tag = f" {category}: "
        return [v for v in self.violations if tag in v]

    def on_dispatch(self, c: DispatchJobs) -> None:
        state = self.world.driver.state
        term, dispatcher = state.term, state.dispatcher
        if c.term != term or c.node != dispatcher:
            self.fail("fencing", f"{c.node} dispatched under term {c.term} during term {term} "
                                 f"(dispatcher {dispatcher}), and the core accepted it")
        seen = self.dispatchers.setdefault(term, set())
        seen.add(c.node)
        if len(seen) > 1:
            self.fail("dispatchers", f"term {term} had dispatches from {sorted(seen)}")

    def on_events(self, batch: Sequence[object]) -> None:
        lost: list[str] = []
        for e in batch:
            t = type(e)
            if t is ev.NodeStatusChanged:
                before = self.status.get(e.node)  # type: ignore[attr-defined]
                self.status[e.node] = e.status  # type: ignore[attr-defined]
                if e.status is NodeStatus.OFFLINE and before is not NodeStatus.OFFLINE:  # type: ignore[attr-defined]
                    self.epoch[e.node] = self.epoch.get(e.node, 0) + 1  # type: ignore[attr-defined]
                    lost.append(e.node)  # type: ignore[attr-defined]
            elif t is ev.NodeRemoved:
                self.status.pop(e.node, None)  # type: ignore[attr-defined]
                self.epoch[e.node] = self.epoch.get(e.node, 0) + 1  # type: ignore[attr-defined]
                lost.append(e.node)  # type: ignore[attr-defined]
            elif t is ev.NodeRegistered:
                self.status[e.node] = NodeStatus.INITIALIZING  # type: ignore[attr-defined]
            elif t is jobs.JobLeased:
                token = e.token  # type: ignore[attr-defined]
                self.leases.setdefault(token.node, set()).add(token.job_id)
                self.lease_epoch[token.job_id] = self.epoch.get(token.node, 0)
                if self.status.get(token.node) is not NodeStatus.OFFLINE:
                    continue
                self.fail("offline-leases", f"{token.job_id} leased to {token.node}, Offline")
            elif t is jobs.LeaseRenewed or t is jobs.JobCompleted:
                token = e.token  # type: ignore[attr-defined]
                granted = self.lease_epoch.get(token.job_id)
                if granted is not None and granted != self.epoch.get(token.node, 0):
                    verb = "renewed" if t is jobs.LeaseRenewed else "completed"
                    self.fail("fencing", f"{token.node} {verb} {token.job_id} under a lease "
                                         "granted before it went Offline")
                if t is jobs.JobCompleted:
                    self._end(token)
            elif t is jobs.JobReleased or t is jobs.JobDeadLettered:
                self._end(e.token)  # type: ignore[attr-defined]
        for node in lost:
            held = self.leases.get(node)
            if held and self.status.get(node, NodeStatus.OFFLINE) is NodeStatus.OFFLINE:
                self.fail("offline-leases", f"{node} went Offline (or was removed) still holding "
                                            f"{len(held)} lease(s): {sorted(held)[:3]}")

    def _end(self, token: jobs.LeaseToken) -> None:
        held = self.leases.get(token.node)
        if held is not None:
            held.discard(token.job_id)
        self.lease_epoch.pop(token.job_id, None)


def final_violations(world: World) -> list[str]:
    """The end-of-run checks of ``World.run`` (see :meth:`World.final_violations`)."""
    return world.final_violations()


def replay(scenario: Scenario | str | Path, seed: int | None = None) -> RunResult:
    """Run a scenario (or a file, or a built-in name) like ``shir sim run``, with
    :class:`ClusterChecks` attached: its violations join ``invariant_violations``."""
    from shir.sim.report import evaluate

    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    world = World(sc, seed)
    checks = ClusterChecks(world)
    result = world.run()
    result.invariant_violations.extend(checks.violations)
    evaluate(sc, result)
    return result


# --- the cluster machine -----------------------------------------------------------------------

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
                              join_at_s=0.0 if i < count - late else NEVER_S))
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


@attrs.frozen
class Failure:
    """The last failing run of a machine class: what failed and the schedule that replays it."""

    scenario: Scenario
    seed: int
    error: str
    trace: tuple[str, ...]  # what the machine's rules did, in order (start included)
    toml: str
    path: Path | None  # where the TOML was saved (the final, shrunk run only)

    @property
    def steps(self) -> int:
        """How many of the machine's rules the failing example ran (start included)."""
        return len(self.trace)

    @property
    def replay_command(self) -> str:
        """The command that replays the schedule in the simulator."""
        return f"shir sim run {self.path or 'FILE.toml'} --seed {self.seed}"

    @property
    def schedule_length(self) -> int:
        """Faults plus nodes joining after the start: the size of the schedule."""
        late = sum(1 for n in self.scenario.nodes if 0 < n.join_at_s < NEVER_S)
        return len(self.scenario.faults) + late


_EDGE = 0.25  # the machine's times are k + 0.25 (see the module docstring)
# The drain may end once nothing but heartbeats happened for this long: longer than anything the
# World schedules after an event it caused (a duplicate submit comes up to 5 s after the
# original, retries of a refused or unstored command after 1 s).
_QUIET_S = 6.0
_MECHANICS = ("hibernate", "crash", "partition", "control_partition", "regenerate_key", "burst",
              "rotate_credential", "credential_drift")
_OTHER_KINDS = tuple(k for k in FAULT_KINDS if k not in _MECHANICS)
_node_index = st.integers(0, 4)
# How Hypothesis abandons an example (out of data, or an assumption failed): no failure to report.
_DISCARDED = (StopTest, UnsatisfiedAssumption)
_other_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], st.SearchStrategy[Fault]] = {}


def _other_faults(nodes: tuple[str, ...], credentials: tuple[str, ...]
                  ) -> st.SearchStrategy[Fault]:
    s = _other_cache.get((nodes, credentials))
    if s is None:
        s = _other_cache[nodes, credentials] = faults(nodes, st.just(0.0), _OTHER_KINDS,
                                                      credentials)
    return s


_durations = st.integers(1, 120).map(float)


class ClusterMachine(RuleBasedStateMachine):
    """A simulated cluster under random fault schedules; see the module docstring.

    Subclass it to add rules and invariants: read ``self.world`` (the World), ``self.state``
    (the core's state), ``self.now``, ``self.nodes`` (names of joined nodes); inject with
    :meth:`inject` (a ``Fault`` at ``self.now``) so that the schedule stays replayable; let
    time pass with :meth:`run_until`; check more at the end in :meth:`at_end`; call
    ``super().teardown()`` first if you override teardown.
    """

    drain_s = 60.0  # the longest drain after healing (it ends sooner once the cluster is at rest)
    drain_ends_at_rest = True  # False: always drain ``drain_s`` (an end check that needs time)
    failure_dir: Path | None = Path(".hypothesis") / "shir"
    last_failure: Failure | None = None  # set on the class whose run failed

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.setup: ClusterSetup | None = None
        self.now = 0.0
        self.horizon = 0.0  # the furthest time the machine has tried to reach
        self.faults: list[Fault] = []  # applied, in order
        self.joined: dict[str, float] = {}  # node -> when it joined (applied)
        self._pending: list[Fault] = []  # recorded at ``now``, applied before time moves on
        self._pending_joins: list[str] = []
        self.trace: list[str] = []  # what each recording rule did, in order
        self._last_term = 0
        self._end_s: float | None = None  # set by teardown: the scenario's duration_s
        self._drain_s: float | None = None  # set by teardown
        # An exception being handled around the whole run is not this run's failure.
        self._outer_error = sys.exc_info()[1]
        self.checks: ClusterChecks | None = None
        self.final: list[str] | None = None  # teardown's violations

    # -- set-up
    @initialize(setup=cluster_setups())
    def start(self, setup: ClusterSetup) -> None:
        """Build the World as a scenario run would, and run it to the first grid point."""
        self.trace.append(f"start with {len(setup.nodes)} node(s), seed {setup.seed}")
        self.setup = setup
        for spec in setup.nodes:
            if spec.join_at_s == 0.0:
                self.joined[spec.name] = 0.0
        self.world = World(self.scenario(duration_s=NEVER_S), setup.seed, until_s=NEVER_S)
        self.checks = ClusterChecks(self.world)
        self.world.setup()
        self._run(_EDGE)

    # -- what subclasses use
    @property
    def state(self) -> Any:
        """The core's current state (a ``RuntimeState``)."""
        assert self.world is not None
        return self.world.driver.state

    @property
    def nodes(self) -> list[str]:
        """Names of the nodes that have joined (or join now), in declaration order."""
        assert self.setup is not None
        return [n.name for n in self.setup.nodes
                if n.name in self.joined or n.name in self._pending_joins]

    @property
    def credentials(self) -> tuple[str, ...]:
        """Ids of the credentials the workload's jobs need (``CREDENTIALS`` if none)."""
        assert self.setup is not None
        return tuple(c for c, _v in self.setup.workload.needs) or CREDENTIALS

    def inject(self, fault: Fault) -> None:
        """Record ``fault`` to start at ``self.now`` (its ``at_s`` is replaced)."""
        fault = attrs.evolve(fault, at_s=self.now)
        self.trace.append(fault.describe())
        self._pending.append(fault)

    def run_until(self, t: float) -> None:
        """Apply what was injected now, then let simulated time run to ``t`` (rounded up to
        the machine's grid of k + 0.25 s, which keeps the replay exact)."""
        t = math.ceil(t - _EDGE) + _EDGE
        if t > self.now:
            self.trace.append(f"run until {t:g}s")
            self._run(t)

    def scenario(self, duration_s: float | None = None) -> Scenario:
        """The schedule so far as a scenario (applied injections only) ending at
        ``duration_s`` (default: the furthest time reached)."""
        assert self.setup is not None
        setup = self.setup
        nodes = tuple(
            attrs.evolve(n, join_at_s=self.joined.get(n.name, NEVER_S)) for n in setup.nodes
        )
        return Scenario(
            name="cluster-machine",
            nodes=nodes,
            description=_DESCRIPTION,
            seed=setup.seed,
            duration_s=duration_s if duration_s is not None else (
                self._end_s if self._end_s is not None else self.horizon),
            drain_s=self.drain_s if self._drain_s is None else self._drain_s,
            settings=setup.settings,
            workload=setup.workload,
            faults=tuple(self.faults),
        )

    # -- rules: all expressible in a scenario file
    @precondition(lambda self: len(self.nodes) < len(self.setup.nodes))
    @rule(i=_node_index)
    def join(self, i: int) -> None:
        """A node that was not there registers now (a fifth one must be refused)."""
        waiting = [n.name for n in self.setup.nodes  # type: ignore[union-attr]
                   if n.name not in self.nodes]
        name = waiting[i % len(waiting)]
        self.trace.append(f"join {name} @{self.now:g}s")
        self._pending_joins.append(name)

    def _node(self, i: int) -> str:
        names = self.nodes
        return names[i % len(names)]

    @precondition(lambda self: self.nodes)
    @rule(i=_node_index, duration_s=_durations)
    def hibernate(self, i: int, duration_s: float) -> None:
        """The machine sleeps; it wakes after ``duration_s`` with its clock jumped."""
        self.inject(Fault("hibernate", self.now, node=self._node(i), duration_s=duration_s))

    @precondition(lambda self: self.nodes)
    @rule(i=_node_index, duration_s=_durations)
    def crash(self, i: int, duration_s: float) -> None:
        """The node's process dies and restarts after ``duration_s``."""
        self.inject(Fault("crash", self.now, node=self._node(i), duration_s=duration_s))

    @precondition(lambda self: self.nodes)
    @rule(i=_node_index, peer=st.none() | _node_index, duration_s=_durations,
          oneway=st.booleans())
    def partition(self, i: int, peer: int | None, duration_s: float, oneway: bool) -> None:
        """The node loses the intranet to one peer (or all)."""
        node = self._node(i)
        others = [n for n in self.nodes if n != node]
        other = others[peer % len(others)] if peer is not None and others else None
        self.inject(Fault("partition", self.now, node=node, peer=other, duration_s=duration_s,
                          oneway=oneway))

    @precondition(lambda self: self.nodes)
    @rule(i=_node_index, duration_s=_durations, oneway=st.booleans())
    def control_partition(self, i: int, duration_s: float, oneway: bool) -> None:
        """The node loses the control channel (both ways, or only node -> service)."""
        self.inject(Fault("control_partition", self.now, node=self._node(i),
                          duration_s=duration_s, oneway=oneway))

    @rule(count=st.integers(1, 10))
    def burst(self, count: int) -> None:
        """The service submits ``count`` jobs at once (durations drawn like the workload's)."""
        self.inject(Fault("burst", self.now, count=count))

    @precondition(lambda self: self.nodes and self.setup.workload.needs)
    @rule(i=_node_index, c=st.integers(0, 3))
    def save_credential(self, i: int, c: int) -> None:
        """A user saves the next version of a credential the jobs need, through a node."""
        creds = self.credentials
        self.inject(Fault("rotate_credential", self.now, node=self._node(i),
                          credential=creds[c % len(creds)]))

    @precondition(lambda self: len(self.nodes) > 1 and self.setup.workload.needs)
    @rule(i=_node_index, c=st.integers(0, 3))
    def credential_drift(self, i: int, c: int) -> None:
        """A node's copy of a credential falls a version behind (or is lost), provided another
        node still holds the latest version to sync it from: when the last copy is lost only
        a user can save it again, and the run's convergence check would rightly fail."""
        creds = self.credentials
        cid = creds[c % len(creds)]
        node = self._node(i)
        w = self.world
        assert w is not None
        latest = credential_status(self.state).latest_version(cid) or 0
        drifting = {f.node for f in self._pending if f.kind == "credential_drift"
                    and f.credential == cid}
        holders = [n for n in self.nodes if n != node and n not in drifting
                   and w.nodes[n].credentials.get(cid, 0) >= latest > 0]
        saving = any(f.kind == "rotate_credential" and f.credential == cid for f in self._pending)
        if holders and not saving:  # a save now would have the drifting node as its only holder
            self.inject(Fault("credential_drift", self.now, node=node, credential=cid))

    @rule(key=st.sampled_from(("key1", "key2")))
    def regenerate_key(self, key: str) -> None:
        """A user regenerates an auth key."""
        self.inject(Fault("regenerate_key", self.now, key=key))

    @precondition(lambda self: self.nodes)
    @rule(data=st.data())
    def other_fault(self, data: st.DataObject) -> None:
        """Any other fault kind: stall, isolate, message faults, clocks, slowness, versions,
        upgrades, store appends with an unknown outcome."""
        self.inject(data.draw(_other_faults(tuple(self.nodes), self.credentials)))

    @rule(dt=st.integers(0, 59).map(lambda k: 60 - k))
    def advance(self, dt: int) -> None:
        """Simulated time runs ``dt`` seconds (1..60; it shrinks towards 60, so a shrunk
        schedule has one long step where it would have had many short ones)."""
        self.trace.append(f"advance {dt}s to {self.now + dt:g}s")
        self._run(self.now + dt)

    @rule()
    def tick(self) -> None:
        """Time runs until just past the core's next deadline (or one second, if none)."""
        deadline = self.world.driver.deadline()  # type: ignore[union-attr]
        target = self.now + 1.0
        if deadline is not None and deadline < self.now + 600:
            target = max(target, math.floor(deadline - _EDGE) + 1 + _EDGE)
        self.trace.append(f"tick to {target:g}s")
        self._run(target)

    # -- invariants
    @invariant()
    def checkers_hold(self) -> None:
        """The simulator's stream checkers found nothing."""
        if self.world is not None:
            assert not self.world.checkers.violations, self.world.checkers.violations

    @invariant()
    def at_most_four_nodes(self) -> None:
        if self.world is not None:
            nodes = self.state.nodes
            assert len(nodes) <= min(4, self.state.settings.max_nodes), [n.name for n in nodes]

    @invariant()
    def one_dispatcher_per_term(self) -> None:
        if self.checks is not None:
            assert not self.checks.of("dispatchers"), self.checks.of("dispatchers")

    @invariant()
    def terms_never_decrease(self) -> None:
        if self.world is not None:
            term = self.state.term
            assert term >= self._last_term, f"term went from {self._last_term} to {term}"
            self._last_term = term

    @invariant()
    def no_action_under_an_old_term(self) -> None:
        """A node back from hibernation (or any silence) cannot dispatch under its old term,
        nor renew or complete a lease granted before it went Offline."""
        if self.checks is not None:
            assert not self.checks.of("fencing"), self.checks.of("fencing")

    @invariant()
    def offline_nodes_hold_no_leases(self) -> None:
        if self.checks is not None:
            assert not self.checks.of("offline-leases"), self.checks.of("offline-leases")

    # -- the end
    def teardown(self) -> None:
        """Heal everything, drain, and check: no job lost, no duplicate effect, snapshot plus
        tail equals the live state. On failure, report the schedule as a scenario."""
        if self.world is None:
            return
        error = sys.exc_info()[1]
        if error is None or error is self._outer_error:
            try:
                self._finish()
            except BaseException as exc:
                self._report(exc)
                raise
        elif not isinstance(error, _DISCARDED):
            self._report(error)

    def _finish(self) -> None:
        assert self.setup is not None and self.world is not None
        if self._pending or self._pending_joins:
            self._run(self.now + 1)
        stop = self.setup.workload.stop_at_s or 0.0
        if stop > self.now:
            self._run(stop)  # the replay's workload stops at the end: it must be over here too
        w = self.world
        end = self._end_s = self.now
        # heal_all ends every fault but an update in progress: drain past it as well
        late = max([f.end_s - end for f in self.faults if f.kind == "upgrade"] + [0.0])
        longest = self._drain_s = self.drain_s + late
        w._take_snapshot()  # what World.setup schedules at the end
        w.heal_all()
        assert self.checks is not None
        self._drain(end, late)
        self._drain_s = self.now - end  # grid times: exact, so the replay ends here too
        self.final = final_violations(w) + list(self.checks.violations)
        if self.final and self._drain_s < longest:
            # A failure is reported after the whole drain, as it was before drains could end
            # early: the schedule then replays against a fixed core as it always did.
            self._run(end + longest)
            self._drain_s = longest
            self.final = final_violations(w) + list(self.checks.violations)
        assert not self.final, self.final
        assert w.checkers.duplicate_effects == 0
        self.at_end()

    def _drain(self, end: float, late: float) -> None:
        """Run the drain until the cluster is at rest, and at most ``self._drain_s``; the
        drain's length becomes the scenario's ``drain_s``, so the replay runs exactly as long.

        At rest (:meth:`at_rest`, true at two probes a second apart, with no event but
        ``HeartbeatReceived`` for ``_QUIET_S`` and every message sent before the heal landed),
        the rest of the drain could only repeat heartbeats that change nothing: the end-of-run
        checks would find the same. ``tests/test_property_machine.py`` runs examples on to the
        full drain and checks just that.
        """
        w = self.world
        assert w is not None and self._drain_s is not None
        limit = end + self._drain_s
        if not self.drain_ends_at_rest:
            self._run(limit)
            return
        net = w.scenario.network
        # the longest a message sent before the heal can take; message faults stack
        in_flight = net.latency_s + net.jitter_s + sum(
            f.extra_s if f.kind in ("delay", "reorder")
            else net.latency_s if f.kind == "duplicate" else 0.0 for f in self.faults)
        earliest = end + late + in_flight + 1.0  # + 1 s: a retry of a command lost before it
        active_at = [end]  # when the last event other than a heartbeat's receipt was stored

        def watch(batch: Sequence[object]) -> None:
            if any(type(e) is not ev.HeartbeatReceived for e in batch):
                active_at[0] = w.env.now

        rest_at: float | None = None  # the last probe that found the cluster at rest
        w.driver.listeners.append(watch)
        try:
            while self.now < limit:
                t = max(earliest, active_at[0] + _QUIET_S, self.now + 1.0)
                self._run(min(math.ceil(t - _EDGE) + _EDGE, limit))
                if active_at[0] > self.now - _QUIET_S or not self.at_rest():
                    rest_at = None
                elif rest_at is not None and active_at[0] <= rest_at:
                    # At rest a second ago, and since: any message in flight then has landed,
                    # and nothing but a heartbeat was sent in between.
                    return
                else:
                    rest_at = self.now
        finally:
            w.driver.listeners.remove(watch)

    def at_rest(self) -> bool:
        """Is the cluster at rest: every node that joined alive, running nothing, believing
        itself the dispatcher only if it is, in the current term, and (if the core has room
        for it) Online and reporting what the core last recorded; no job queued or leased;
        credentials synced?

        At rest, nothing can happen but heartbeats that change nothing: no job can start, no
        credential sync is due, no node can be lost or dispatch under an old term. A subclass
        with state of its own extends it (``super().at_rest() and ...``).
        """
        w = self.world
        assert w is not None
        state = self.state
        if state.dispatcher is None or state.model().jobs.jobs:
            return False
        core = {n.name: n for n in state.nodes}
        if any(n.status is not NodeStatus.ONLINE for n in core.values()):
            return False
        full = len(core) >= state.settings.max_nodes
        for name in self.joined:
            node = w.nodes[name]
            if not node.alive() or node.running or node.deferred:
                return False
            # One that missed an announcement may keep an old view while it waits for none:
            # only a node that believes it dispatches acts on it (its polls).
            if node.dispatcher == name and (name != state.dispatcher or node.term != state.term):
                return False
            recorded = core.get(name)
            if recorded is None:
                if node.registered or not full:  # a node kept out by a full runtime stays out
                    return False
            elif not node.registered or recorded.metrics != node.metrics():
                return False
        status = credential_status(state)
        return not status.behind and not status.syncs

    def at_end(self) -> None:
        """Override to check more at the end: called after the drain (which ended with the
        cluster at rest, or after ``drain_s``) and the end-of-run checks. A failure here is
        reported like any other."""

    def _run(self, t: float) -> None:
        w = self.world
        assert w is not None
        for f in self._pending:
            w._start_fault(f)  # what the replay's fault timer does
            self.faults.append(f)
        self._pending.clear()
        if self._pending_joins:
            order = [n.name for n in self.setup.nodes]  # type: ignore[union-attr]
            for name in sorted(self._pending_joins, key=order.index):
                node = w.nodes[name]
                node.spec = attrs.evolve(node.spec, join_at_s=self.now)
                w.env.process(node.process())  # registers now, like the replay's join timer
                self.joined[name] = self.now
            self._pending_joins.clear()
        self.horizon = max(self.horizon, t)
        w.env.run(until=t)
        self.now = t

    def _report(self, error: BaseException) -> None:
        if self.setup is None:
            return
        cls = type(self)
        sc = self.scenario()
        unchecked = [c for c in ClusterChecks.CATEGORIES if f" {c}: " in str(error)]
        comment = [
            f"{_DESCRIPTION}.",
            f"It failed with: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if str(error) else f"It failed with {type(error).__name__}",
        ]
        if unchecked:
            comment.append(
                f"shir sim run does not check {', '.join(unchecked)}: replay it with "
                "shir.sim.testing.replay(FILE, seed) to see the violation")
        text = to_toml(sc, "\n".join(comment))
        path = None
        try:
            final = current_build_context().is_final
        except Exception:
            final = False
        if final and cls.failure_dir is not None:
            digest = hashlib.sha256(text.encode()).hexdigest()[:10]
            path = Path(cls.failure_dir) / f"{cls.__name__}-{digest}.toml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        failure = Failure(sc, sc.seed, f"{type(error).__name__}: {error}", tuple(self.trace),
                          text, path)
        cls.last_failure = failure
        with contextlib.suppress(Exception):  # outside a Hypothesis test: nothing to note
            note(f"The failing schedule as a scenario"
                 f"{f' (saved to {path})' if path else ''}:\n\n{text}\n"
                 f"Replay it: {failure.replay_command}")

    @classmethod
    def test_case(cls, profile_name: str | None = None) -> type:
        """The machine as a unittest ``TestCase`` with a shir profile's settings (see
        :func:`profile`): ``TestMyCluster = MyMachine.test_case()``."""
        case = cls.TestCase
        case.settings = profile(profile_name)
        return case
