"""The strategies and helpers of shir.sim.testing build valid values.

- every fault kind comes out with fields ``parse_fault`` accepts, and reads back unchanged;
- scenarios round-trip through ``to_toml`` and ``parse_scenario``, and run in the simulator;
- events round-trip through the codec; commands are accepted or refused with a DomainError;
- node metrics and fault schedules keep their promises.
"""

from __future__ import annotations

import tomllib

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shir.core import DomainError, decide, fold, initial
from shir.core import commands as cmd
from shir.core.codec import decode, encode, registered_events
from shir.core.keys import AuthKey
from shir.core.model import KeyName, NodeMetrics
from shir.sim.faults import FAULT_KINDS, Fault, parse_fault
from shir.sim.scenario import NodeSpec, Scenario, parse_scenario
from shir.sim.testing import (
    NEVER_S,
    commands,
    events,
    fault_schedules,
    faults,
    node_metrics,
    scenarios,
    to_toml,
)
from shir.sim.world import World

NODES = ("node-1", "node-2", "node-3")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _table(f: Fault) -> dict[str, object]:
    """A fault as the TOML table ``to_toml`` writes for it."""
    text = to_toml(Scenario("s", (NodeSpec("node-1"), NodeSpec("node-2"), NodeSpec("node-3")),
                            faults=(f,)))
    return tomllib.loads(text)["faults"][0]


@FAST
@given(faults(NODES))
def test_faults_parse_back_unchanged(f: Fault) -> None:
    assert f.kind in FAULT_KINDS
    assert parse_fault(_table(f), set(NODES)) == f


def test_faults_cover_every_kind() -> None:
    seen: set[str] = set()

    @settings(max_examples=400, deadline=None, database=None)
    @given(faults(NODES))
    def collect(f: Fault) -> None:
        seen.add(f.kind)

    collect()
    assert seen == set(FAULT_KINDS)


def test_faults_without_nodes_leave_out_the_kinds_that_need_one() -> None:
    @settings(max_examples=50, deadline=None, database=None)
    @given(faults(()))
    def check(f: Fault) -> None:
        assert f.node is None and "node" not in FAULT_KINDS[f.kind].needs

    check()
    with pytest.raises(ValueError, match="unknown fault kind"):
        faults(NODES, kinds=["meteor"])


@FAST
@given(fault_schedules(NODES, 90.0))
def test_fault_schedules_are_in_time_order_within_the_duration(fs: tuple[Fault, ...]) -> None:
    assert [f.at_s for f in fs] == sorted(f.at_s for f in fs)
    assert all(0 <= f.at_s < 90.0 for f in fs)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_scenarios_round_trip_through_toml(sc: Scenario) -> None:
    parsed = parse_scenario(tomllib.loads(to_toml(sc)), sc.source)
    assert parsed == sc


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(max_duration_s=120))
def test_drawn_scenarios_run_in_the_simulator(sc: Scenario) -> None:
    result = World(sc).run()  # must not crash; invariants are the machine's business
    assert result.events > 0


def test_to_toml_escapes_strings_and_marks_nodes_that_never_join() -> None:
    sc = Scenario(
        'quote " back \\ é',  # control characters only where the core takes them
        (NodeSpec("node-1"), NodeSpec("node-2", join_at_s=NEVER_S)),
        description="line\nbreak tab \t bell \x07",
    )
    text = to_toml(sc, "a comment\nover two lines")
    assert text.startswith("# a comment\n# over two lines\n")
    assert "# never joins" in text
    assert parse_scenario(tomllib.loads(text)) == sc


def test_to_toml_refuses_what_toml_cannot_say() -> None:
    node = (NodeSpec("node-1"),)
    with pytest.raises(ValueError, match="takes no"):
        to_toml(Scenario("s", node, faults=(Fault("crash", 1.0, node="node-1", duration_s=5.0,
                                                  probability=0.5),)))
    with pytest.raises(ValueError, match="surrogate"):
        to_toml(Scenario("\ud800", node))


@FAST
@given(events())
def test_events_cover_the_registry_and_round_trip_through_the_codec(e: object) -> None:
    assert type(e) in {s.cls for s in registered_events()}
    assert decode(encode(e)) == e


@FAST
@given(node_metrics(NODES))
def test_node_metrics_are_plausible(m: NodeMetrics) -> None:
    assert 0 <= m.cpu_pct <= 100 and m.available_memory_mb >= 0 and m.running_jobs >= 0
    assert set(m.reachable_peers) <= set(NODES)


def _runtime() -> tuple[object, ...]:
    k1 = AuthKey.from_seed("rt-test", KeyName.KEY1, 1, bytes(range(48)))
    k2 = AuthKey.from_seed("rt-test", KeyName.KEY2, 1, bytes(range(1, 49)))
    return decide(initial(), cmd.CreateRuntime("rt-test", "f", "r", k1, k2, 0.0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(commands(NODES, at=st.integers(0, 400).map(float)), max_size=25))
def test_commands_are_accepted_or_refused_with_a_domain_error(cs: list[object]) -> None:
    state = fold(initial(), _runtime())
    for c in sorted(cs, key=lambda c: getattr(c, "at", 0.0)):
        try:
            events_ = decide(state, c)
        except DomainError:
            continue
        state = fold(state, events_)


def test_commands_can_be_restricted_to_kinds() -> None:
    @settings(max_examples=30, deadline=None, database=None)
    @given(commands(kinds=[cmd.Tick, cmd.RemoveNode]))
    def check(c: object) -> None:
        assert type(c) in (cmd.Tick, cmd.RemoveNode)

    check()
    with pytest.raises(ValueError, match="no strategy"):
        commands(kinds=[int])


def test_every_fault_kind_is_written_with_its_needed_fields() -> None:
    for kind, spec in FAULT_KINDS.items():
        values = {"node": "node-1", "duration_s": 5.0, "key": "key1", "version": "5.41",
                  "count": 1, "credential": "ls-sql", "extra_s": 2.0, "probability": 0.5,
                  "factor": 2.0}
        f = Fault(kind, 3.0, **{k: v for k, v in values.items() if k in spec.needs})
        assert parse_fault(_table(f), set(NODES)) == f
        assert attrs.evolve(f) == f
        # a needed field is written even at its default (which the parser then refuses)
        named = {k: values[k] for k in ("node", "key", "version", "credential", "count")
                 if k in spec.needs}
        assert set(spec.needs) <= set(_table(Fault(kind, 3.0, **named)))
