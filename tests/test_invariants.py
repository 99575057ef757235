"""The simulator's checkers must catch what they claim to: each test feeds a broken stream.

The event streams here are built by hand, not by the core (which would refuse to make them): a
checker that cannot see a violation would pass every simulation and prove nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from shir.core import events as ev
from shir.core import jobs
from shir.core.driver import AppendOutcomeUnknown, Driver
from shir.core.effects import StartSession
from shir.core.keys import AuthKey
from shir.core.model import KeyName, NodeMetrics, RuntimeSettings
from shir.core.snapshot import snapshot_bytes
from shir.core.state import fold, initial
from shir.core.store import InMemoryEventStore
from shir.sim.invariants import Checkers, check_snapshot

K1 = AuthKey.from_seed("rt", KeyName.KEY1, 1, bytes(range(48)))
K2 = AuthKey.from_seed("rt", KeyName.KEY2, 1, bytes(range(1, 49)))


def _created(max_nodes: int = 4) -> ev.RuntimeCreated:
    return ev.RuntimeCreated("rt", "f", "ir", "", RuntimeSettings(max_nodes=max_nodes),
                             K1.verifier(), K2.verifier(), 0.0)


def _registered(node: str, cores: int = 1, memory_mb: int = 1024) -> ev.NodeRegistered:
    return ev.NodeRegistered(node, f"m-{node}", cores, memory_mb, KeyName.KEY1, NodeMetrics(), 0.0)


def _token(job: str, node: str = "a", term: int = 1, delivery: int = 1) -> jobs.LeaseToken:
    return jobs.LeaseToken(job, node, term, delivery)


def _check(events: list[object], presented: dict[str, int] | None = None) -> list[str]:
    c = Checkers(lambda: 1.0, lambda n: (presented or {}).get(n))
    c.on_events([_created(), *events])
    return c.violations


def _dispatcher(term: int, node: str | None = "a") -> ev.DispatcherChanged:
    return ev.DispatcherChanged(term, node, "test", 0.0)


def test_a_clean_stream_has_no_violation() -> None:
    t = _token("j1")
    assert _check([
        _registered("a", cores=1, memory_mb=1024),
        _dispatcher(1),
        jobs.JobSubmitted("j1", "k1", (), (), 0.0, 0.0),
        jobs.JobLeased(t, 60.0, 0.0),
        jobs.LeaseRenewed(t, 90.0, 30.0),
        jobs.LeasesRenewed((t,), 95.0, 35.0),
        jobs.JobCompleted(t, "k1", 40.0),
    ]) == []


def test_terms_must_grow_by_one() -> None:
    v = _check([_registered("a"), _dispatcher(1), _dispatcher(3)])
    assert any("terms: term went from 1 to 3" in x for x in v)
    v = _check([_registered("a"), _dispatcher(1), _dispatcher(1, "b")])
    assert any("terms:" in x for x in v)


def test_two_live_leases_of_one_job_are_caught() -> None:
    v = _check([_registered("a", 4, 4096), _registered("b", 4, 4096), _dispatcher(1),
                jobs.JobLeased(_token("j1", "a"), 60.0, 0.0),
                jobs.JobLeased(_token("j1", "b", delivery=2), 60.0, 0.0)])
    assert any("leases: j1 leased to b while" in x for x in v)


def test_renewal_or_completion_with_a_stale_token_is_caught() -> None:
    live = _token("j1", delivery=2)
    v = _check([_registered("a", 4, 4096), _dispatcher(1), jobs.JobLeased(live, 60.0, 0.0),
                jobs.LeaseRenewed(_token("j1", delivery=1), 90.0, 1.0),
                jobs.JobCompleted(_token("j1", delivery=1), "k1", 2.0)])
    assert any("renewal of j1" in x for x in v)
    assert any("completion of j1" in x for x in v)


def test_a_batch_renewal_with_a_stale_token_is_caught() -> None:
    live, other = _token("j1", delivery=2), _token("j2")
    v = _check([_registered("a", 4, 4096), _dispatcher(1), jobs.JobLeased(live, 60.0, 0.0),
                jobs.JobLeased(other, 60.0, 0.0),
                jobs.LeasesRenewed((other, _token("j1", delivery=1)), 90.0, 1.0)])
    assert [x for x in v if "renewal of" in x] == [
        x for x in v if "renewal of j1" in x and "delivery=1" in x] != []


def test_deliveries_must_grow() -> None:
    first = _token("j1", delivery=2)
    v = _check([_registered("a", 4, 4096), _dispatcher(1), jobs.JobLeased(first, 60.0, 0.0),
                jobs.JobReleased(first, jobs.ReleaseReason.ABANDONED, "x", 1.0),
                jobs.JobLeased(_token("j1", delivery=2), 61.0, 1.0)])
    assert any("j1 delivery 2 after 2 (deliveries go up by one)" in x for x in v)
    skipped = _check([_registered("a", 4, 4096), _dispatcher(1),
                      jobs.JobLeased(_token("j2", delivery=3), 60.0, 0.0)])
    assert any("j2 delivery 3 after 0" in x for x in skipped)


def test_capacity_above_the_limit_is_caught() -> None:
    # 1 core and 1 GiB: default limit 1
    v = _check([_registered("a"), _dispatcher(1), jobs.JobLeased(_token("j1"), 60.0, 0.0),
                jobs.JobLeased(_token("j2"), 60.0, 0.0)])
    assert any("capacity: a runs 2 jobs, above its limit 1" in x for x in v)


def test_a_lease_under_an_old_term_is_caught() -> None:
    v = _check([_registered("a", 4, 4096), _dispatcher(1), _dispatcher(2),
                jobs.JobLeased(_token("j1", term=1), 60.0, 0.0)])
    assert any("leased under term 1 during term 2" in x for x in v)


def test_a_second_completion_of_one_key_is_caught() -> None:
    t1, t2 = _token("j1"), _token("j2")
    c = Checkers(lambda: 1.0, lambda n: None)
    c.on_events([_created(), _registered("a", 4, 4096), _dispatcher(1),
                 jobs.JobLeased(t1, 60.0, 0.0), jobs.JobLeased(t2, 60.0, 0.0),
                 jobs.JobCompleted(t1, "same-key", 1.0), jobs.JobCompleted(t2, "same-key", 2.0)])
    assert any("effects: idempotency key same-key completed twice" in x for x in c.violations)
    assert c.duplicate_effects == 1


def test_too_many_nodes_are_caught() -> None:
    c = Checkers(lambda: 1.0, lambda n: None)
    c.on_events([_created(max_nodes=2), _registered("a"), _registered("b"), _registered("c")])
    assert any("membership: 3 nodes, more than 2" in x for x in c.violations)


def test_joining_with_a_regenerated_key_is_caught() -> None:
    new = AuthKey.from_seed("rt", KeyName.KEY1, 2, bytes(range(2, 50)))
    v = _check([ev.AuthKeyRegenerated(new.verifier(), 1.0), _registered("a")], {"a": 1})
    assert any("joined with key1 generation 1, but generation 2 was current" in x for x in v)


def test_removing_a_node_that_holds_leases_is_caught() -> None:
    v = _check([_registered("a", 4, 4096), _dispatcher(1), jobs.JobLeased(_token("j1"), 60.0, 0.0),
                ev.NodeRemoved("a", "test", 1.0)])
    assert any("removed while holding 1 leases" in x for x in v)


def test_snapshot_check_sees_a_tail_that_does_not_match() -> None:
    log = [_created(), _registered("a")]
    live = fold(initial(), log)
    snap = snapshot_bytes(fold(initial(), log[:1]))
    assert check_snapshot(snap, log[1:], live) == []
    # the tail misses an event: the restored state cannot equal the live one
    assert check_snapshot(snapshot_bytes(fold(initial(), log[:1])), [], fold(initial(), log))


class _LosingStore(InMemoryEventStore):
    """Every append reports an unknown outcome; ``land`` says whether it really landed."""

    def __init__(self, land: bool) -> None:
        super().__init__()
        self.land = land
        self.failing = False

    def append(self, stream: str, events: object, expected_version: int) -> int:  # type: ignore[override]
        if not self.failing:
            return super().append(stream, events, expected_version)  # type: ignore[arg-type]
        if self.land:
            super().append(stream, events, expected_version)  # type: ignore[arg-type]
        raise AppendOutcomeUnknown("timed out")


@pytest.mark.parametrize("land", [True, False])
def test_driver_rereads_the_stream_when_an_append_outcome_is_unknown(land: bool) -> None:
    from shir.core import CreateRuntime, RegisterNode

    store = _LosingStore(land)
    seen: list[object] = []
    d = Driver(store, "rt", [seen.extend])
    d.handle(CreateRuntime("rt", "f", "ir", K1, K2, 0.0))
    store.failing = True
    register = RegisterNode(K1.text, "a", "m-a", 2, 2048, 1.0)
    if land:
        d.handle(register)  # landed: no error, and the state knows the node
        assert d.state.node("a") is not None and d.recoveries == 1
    else:
        with pytest.raises(AppendOutcomeUnknown):
            d.handle(register)  # not landed: the caller learns it and may retry
        assert d.state.node("a") is None
    assert d.version == store.version("rt") == len(seen)
    assert fold(initial(), store.read("rt")) == d.state


def test_two_drivers_on_one_store_resolve_a_conflict_by_deciding_again() -> None:
    """Two hosts on one log: the second writer loses the append, re-reads and decides again."""
    from shir.core import CreateRuntime, RegisterNode

    store = InMemoryEventStore()
    a = Driver(store, "rt")
    a.handle(CreateRuntime("rt", "f", "ir", K1, K2, 0.0))
    b = Driver(store, "rt")  # b has read the log so far
    # remote access on for "a", so a second node may join
    a.handle(RegisterNode(K1.text, "a", "m-a", 2, 2048, 1.0, NodeMetrics(remote_access=True)))
    # b's state is one event behind: its append conflicts, it re-reads and decides again
    b.handle(RegisterNode(K2.text, "b", "m-b", 2, 2048, 2.0))
    assert b.conflicts == 1 and b.state.node("a") is not None and b.state.node("b") is not None
    assert fold(initial(), store.read("rt")) == b.state
    # a command the newer state already satisfies stores nothing after the conflict; the
    # sender is still told its session (its first answer may have been lost)
    before = store.version("rt")
    assert a.handle(RegisterNode(K2.text, "b", "m-b", 2, 2048, 2.0)) == (StartSession("b", 1),)
    assert store.version("rt") == before and a.conflicts == 1
    assert a.state == b.state


def test_a_command_that_lost_the_race_to_a_later_stamped_writer_is_decided_at_the_logs_time(
) -> None:
    """Writer b's clock runs ahead: a's command, stamped earlier, conflicts; deciding it again
    at its own time would be refused as time going backwards, so it is decided at the log's."""
    from shir.core import CreateRuntime, Heartbeat, RegisterNode

    store = InMemoryEventStore()
    a = Driver(store, "rt")
    a.handle(CreateRuntime("rt", "f", "ir", K1, K2, 0.0))
    a.handle(RegisterNode(K1.text, "a", "m-a", 2, 2048, 1.0, NodeMetrics(remote_access=True)))
    b = Driver(store, "rt")
    b.handle(RegisterNode(K1.text, "b", "m-b", 2, 2048, 9.0))  # b's clock: 9 s
    a.handle(Heartbeat("a", 1, NodeMetrics(), 5.0))  # a's clock: 5 s, behind the log
    assert a.conflicts == 1
    assert a.state.node("a").last_seen_at == 9.0  # decided at the log's time
    assert a.state.now == 9.0 and fold(initial(), store.read("rt")) == a.state


def test_a_driver_gives_up_after_its_conflict_budget() -> None:
    from shir.core import CreateRuntime
    from shir.core.store import ConcurrencyConflict

    class _AlwaysMoved(InMemoryEventStore):
        def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
            raise ConcurrencyConflict(stream, expected_version, expected_version + 1)

    d = Driver(_AlwaysMoved(), "rt", max_conflict_retries=3)
    with pytest.raises(ConcurrencyConflict):
        d.handle(CreateRuntime("rt", "f", "ir", K1, K2, 0.0))
    assert d.conflicts == 4
