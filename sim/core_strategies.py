"""Hypothesis strategies for the core's values: node metrics, settings, auth keys, commands and
every event type the codec knows.

For a user's own tests of the core; ``shir.sim.strategies`` adds the simulator's faults and
scenarios, and ``shir.sim.testing`` re-exports both.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

try:
    from hypothesis import assume
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "shir.sim.testing needs Hypothesis: pip install 'shir[testing]' (or hypothesis)"
    ) from exc

from shir.core import commands as cmd
from shir.core import jobs
from shir.core.codec import registered_events, registered_values
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
    RuntimeSettings,
)

__all__ = [
    "EVENT_OVERRIDES",
    "NODE_NAMES",
    "VERSIONS",
    "auth_keys",
    "commands",
    "events",
    "node_metrics",
    "runtime_settings",
    "strategy_for_type",
]

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
    if isinstance(tp, type) and (tp in registered_values() or tp in EVENT_OVERRIDES):
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
