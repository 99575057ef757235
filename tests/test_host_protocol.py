"""The host protocol: recipients, answers, fenced replies, leaving, and the intranet identity.

docs/architecture.md ("The host protocol") is the contract these tests hold the core to.
"""

from __future__ import annotations

import attrs
import msgpack
import pytest
from rig import Rig, of_type
from snapshot_helpers import as_format_4_sees, as_older_format_sees, strip_nodes

from shir.core import (
    EVERY_NODE,
    FACTORY,
    AnnounceDispatcher,
    CompleteJob,
    DeliverJob,
    Disconnect,
    DispatchJobs,
    DispatchWanted,
    Fenced,
    Heartbeat,
    JobReleased,
    LeasesRenewed,
    LeaseToken,
    LeaveRuntime,
    NodeLeft,
    NodeRegistered,
    PublishJobResult,
    RegisterNode,
    ReleaseReason,
    RenewLeases,
    Role,
    SetConcurrencyLimit,
    StaleSession,
    StaleTerm,
    StartSession,
    StopJob,
    SubmitJob,
    UnknownNode,
    effects_of,
    fold,
    handle,
    initial,
    to_node,
)
from shir.core.codec import decode, encode, spec_for
from shir.core.errors import InvalidCommand
from shir.core.leasing import NotDispatcher, StaleLease, UnknownJob
from shir.core.snapshot import restore, snapshot_bytes

CERT = "ab" * 32


def leased(c: Rig, jobs: int, at: float = 11.0) -> list[DeliverJob]:
    for i in range(1, jobs + 1):
        c.handle(SubmitJob(f"j{i}", f"k{i}", at))
    before = len(c.effects)
    c.handle(DispatchJobs("n1", c.state.term, at))
    return [e for e in c.effects[before:] if isinstance(e, DeliverJob)]


# --- recipients -------------------------------------------------------------------------------

def test_every_effect_names_its_recipient() -> None:
    c = Rig.online(2, at=10.0)
    deliveries = leased(c, 3)
    c.handle(CompleteJob(deliveries[0].token, 12.0))
    c.remove("n2", at=13.0)
    assert c.effects
    for effect in c.effects:
        to = effect.to
        assert to in (EVERY_NODE, FACTORY) or (to.role is Role.NODE and to.node), effect
    assert AnnounceDispatcher(1, "n1").to == EVERY_NODE
    assert AnnounceDispatcher(1, "n1", to_node="n2").to == to_node("n2")
    assert deliveries[1].to == to_node(deliveries[1].token.node)
    assert PublishJobResult("j1", "k1", "completed", "").to == FACTORY


def test_an_accepted_registration_starts_the_session_also_when_already_satisfied() -> None:
    c = Rig()
    command = c.register_cmd("n1", at=1.0)
    d = handle(c.state, command)
    assert d.effects == (StartSession("n1", 1),)
    again = handle(d.state, command)  # the first answer was lost: the node asks again
    assert again.events == () and again.effects == (StartSession("n1", 1),)


def test_dispatch_is_wanted_only_when_work_waits_and_something_changed() -> None:
    c = Rig.online(2, at=10.0)
    d = handle(c.state, SubmitJob("j1", "k1", 11.0))
    assert d.effects == (DispatchWanted("n1", 1),)
    c.state = d.state
    d = handle(c.state, DispatchJobs("n1", 1, 11.0))
    assert not of_type(d.effects, DispatchWanted)  # nothing waits any more
    c.state = d.state
    (delivery,) = of_type(d.effects, DeliverJob)
    d = handle(c.state, CompleteJob(delivery.token, 12.0))
    assert d.effects == (PublishJobResult("j1", "k1", "completed", ""),)  # the queue is empty
    assert effects_of(d.events) == d.effects  # without the state: no dispatch hint at all


def test_a_job_queued_behind_others_wants_no_dispatch_of_its_own() -> None:
    c = Rig.online(1, at=10.0)
    c.handle(SetConcurrencyLimit("n1", 1, 10.0))
    c.handle(SubmitJob("j1", "k1", 11.0))
    d = handle(c.state, SubmitJob("j2", "k2", 11.1))
    assert d.effects == ()  # j1 is ahead: the dispatch wanted for it places j2 too
    c.state = d.state
    d = handle(c.state, DispatchJobs("n1", 1, 11.2))
    (delivery,) = of_type(d.effects, DeliverJob)  # the one slot: j1; j2 waits
    c.state = d.state
    d = handle(c.state, SubmitJob("j3", "k3", 11.3))
    assert d.effects == ()  # j2 waits for a slot, and so does j3: nothing to place yet
    c.state = d.state
    d = handle(c.state, CompleteJob(delivery.token, 12.0))  # a slot frees: dispatch
    assert d.effects[-1] == DispatchWanted("n1", 1)


# --- answers and fenced replies ---------------------------------------------------------------

def test_renewing_an_ended_lease_answers_lease_lost_for_that_token_only() -> None:
    c = Rig.online(2, at=10.0)
    deliveries = leased(c, 2)
    lost, live = deliveries[0].token, deliveries[1].token
    c.handle(CompleteJob(lost, 12.0))
    d = handle(c.state, RenewLeases((lost, live), 13.0))
    assert [e.tokens for e in d.events] == [(live,)]  # the live one is renewed
    stops = of_type(d.effects, StopJob)
    assert [s.token for s in stops] == [lost] and stops[0].reason.startswith("lease lost")
    assert stops[0].to == to_node(lost.node)


def test_a_keep_alive_renews_its_live_leases_in_one_event_each_once() -> None:
    c = Rig.online(2, at=10.0)
    a, b, gone = (d.token for d in leased(c, 3))
    c.handle(CompleteJob(gone, 12.0))
    lock_s = c.state.settings.lock_duration_s
    d = handle(c.state, RenewLeases((a, b, a, gone), 13.0))
    (renewed,) = d.events
    assert renewed == LeasesRenewed((a, b), 13.0 + lock_s, 13.0)
    assert decode(encode(renewed)) == renewed
    assert [s.token for s in of_type(d.effects, StopJob)] == [gone]
    assert handle(d.state, RenewLeases((gone,), 14.0)).events == ()  # none live: no event


@pytest.mark.parametrize("command", ["complete", "renew"])
def test_a_late_completion_or_renewal_is_refused_with_a_stop_for_its_token(command: str) -> None:
    c = Rig.online(2, at=10.0)
    (delivery,) = leased(c, 1)
    c.run(100.0, skip=[delivery.token.node])  # its node falls silent: the lease ends
    if command == "complete":
        with pytest.raises(StaleLease) as info:
            handle(c.state, CompleteJob(delivery.token, 101.0))
        assert info.value.reply == StopJob(delivery.token, "lease lost")
    else:
        d = handle(c.state, RenewLeases((delivery.token,), 101.0))
        assert d.events == () and d.effects[0].token == delivery.token


def test_every_fenced_refusal_carries_the_reply_for_its_sender() -> None:
    c = Rig.online(2, at=10.0)
    leased(c, 1)
    gone = LeaseToken("nope", "n2", 1, 1)
    cases: list[tuple[object, type[Fenced], object]] = [
        (DispatchJobs("n1", 0, 12.0), StaleTerm, AnnounceDispatcher(1, "n1", "n1")),
        (DispatchJobs("n2", 1, 12.0), NotDispatcher, AnnounceDispatcher(1, "n1", "n2")),
        (c.heartbeat_cmd("n2", at=12.0, session=7), StaleSession, StartSession("n2", 1)),
        (Heartbeat("ghost", 1, c.metrics("n1"), 12.0), UnknownNode,
         Disconnect("ghost", "not registered")),
        (CompleteJob(gone, 12.0), UnknownJob, StopJob(gone, "unknown job")),
    ]
    for command, error, reply in cases:
        with pytest.raises(error) as info:
            handle(c.state, command)
        assert isinstance(info.value, Fenced) and info.value.reply == reply, command
    with pytest.raises(InvalidCommand) as plain:
        handle(c.state, DispatchJobs("n1", 5, 12.0))  # a term not begun: no reply to give
    assert not isinstance(plain.value, Fenced)


# --- leaving ----------------------------------------------------------------------------------

def test_a_node_that_leaves_releases_its_leases_for_redelivery_at_once() -> None:
    c = Rig.online(3, at=10.0)
    deliveries = leased(c, 6)
    c.handle(SetConcurrencyLimit("n2", 3, 11.5))
    held = sorted(d.token.job_id for d in deliveries if d.token.node == "n2")
    events = c.handle(LeaveRuntime("n2", 1, 12.0))
    released = of_type(events, JobReleased)
    assert sorted(e.token.job_id for e in released) == held and held
    assert {e.reason for e in released} == {ReleaseReason.NODE_LOST}
    assert of_type(events, NodeLeft) == [NodeLeft("n2", 12.0)]
    assert c.state.node("n2") is None and "n2" not in c.state.jobs.limits
    assert c.state.jobs.queued() == len(held)
    assert c.handle(LeaveRuntime("n2", 1, 13.0)) == ()  # satisfied: it has left
    assert fold(initial(), c.log) == c.state


def test_leaving_under_a_stale_session_is_refused() -> None:
    c = Rig.online(2, at=10.0)
    with pytest.raises(StaleSession) as info:
        handle(c.state, LeaveRuntime("n2", 3, 12.0))
    assert info.value.reply == StartSession("n2", 1)


# --- intranet identity ------------------------------------------------------------------------

def _register(c: Rig, address: str | None, cert: str | None, node: str = "n1") -> object:
    cmd = c.register_cmd(node, at=1.0)
    return RegisterNode(cmd.auth_key, cmd.node, cmd.machine_id, cmd.cores, cmd.memory_mb, cmd.at,
                        cmd.metrics, intranet_address=address, cert_sha256=cert)


@pytest.mark.parametrize("address", ["10.0.0.5:8060", "node-1.corp.example:8060", "[fe80::1]:8060"])
def test_a_node_registers_its_intranet_address_and_certificate(address: str) -> None:
    c = Rig()
    c.handle(_register(c, address, CERT.upper()))
    node = c.state.node("n1")
    assert node is not None and (node.intranet_address, node.cert_sha256) == (address, CERT)
    (registered,) = of_type(c.log, NodeRegistered)
    assert (registered.intranet_address, registered.cert_sha256) == (address, CERT)
    assert restore(snapshot_bytes(c.state)) == c.state
    assert fold(initial(), c.log) == c.state
    again = handle(c.state, _register(c, address, CERT))  # the same registration: satisfied
    assert again.events == ()
    with pytest.raises(InvalidCommand, match="remove the node, then register it again"):
        handle(c.state, _register(c, "10.0.0.6:8060", CERT))


@pytest.mark.parametrize(("address", "cert"), [
    ("10.0.0.5", None), ("10.0.0.5:0", None), ("10.0.0.5:70000", None), (":8060", None),
    ("a b:8060", None), ("x" * 300 + ":8060", None), ("-bad:8060", None), (None, "ab" * 31),
    (None, "zz" * 32), (None, CERT + "0"),
])
def test_a_bad_intranet_address_or_fingerprint_is_refused(address: str | None,
                                                         cert: str | None) -> None:
    c = Rig()
    with pytest.raises(InvalidCommand, match=r"intranet_address|cert_sha256") as info:
        handle(c.state, _register(c, address, cert))
    assert len(str(info.value)) < 400  # bounded: a long input is not echoed whole


def test_version_1_and_2_node_registered_records_still_decode() -> None:
    c = Rig()
    c.handle(attrs.evolve(_register(c, "10.0.0.5:8060", CERT), envelope_key=KEY))
    (registered,) = of_type(c.log, NodeRegistered)
    tag, version, fields = msgpack.unpackb(encode(registered), raw=False)
    assert (tag, version) == ("node_registered", 3) == (spec_for(NodeRegistered).tag, 3)
    v1 = decode(msgpack.packb([tag, 1, fields[:-3]], use_bin_type=True))
    assert (v1.intranet_address, v1.cert_sha256, v1.envelope_key) == (None, None, None)
    assert v1.node == registered.node and v1.at == registered.at
    v2 = decode(msgpack.packb([tag, 2, fields[:-1]], use_bin_type=True))
    assert (v2.intranet_address, v2.envelope_key) == ("10.0.0.5:8060", None)


# --- the envelope key: what a holder seals a credential for -----------------------------------

KEY = bytes(range(32))


def test_a_node_registers_its_envelope_key() -> None:
    c = Rig()
    c.handle(attrs.evolve(_register(c, None, None), envelope_key=KEY))
    node = c.state.node("n1")
    assert node is not None and node.envelope_key == KEY
    (registered,) = of_type(c.log, NodeRegistered)
    assert registered.envelope_key == KEY
    assert restore(snapshot_bytes(c.state)) == c.state
    assert fold(initial(), c.log) == c.state
    again = handle(c.state, attrs.evolve(_register(c, None, None), envelope_key=KEY))
    assert again.events == ()  # the same registration: satisfied
    with pytest.raises(InvalidCommand, match=r"another envelope key.*remove the node"):
        handle(c.state, attrs.evolve(_register(c, None, None), envelope_key=bytes(32)))
    with pytest.raises(InvalidCommand, match="another envelope key"):
        handle(c.state, _register(c, None, None))  # none, after one


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33), "k" * 32, bytearray(32)])
def test_an_envelope_key_of_the_wrong_size_or_type_is_refused(key: object) -> None:
    c = Rig()
    with pytest.raises(InvalidCommand, match="envelope_key must be the node's raw 32-byte"):
        handle(c.state, attrs.evolve(_register(c, None, None), envelope_key=key))
    assert c.state.node("n1") is None


def test_a_format_5_snapshot_restores_nodes_without_an_envelope_key() -> None:
    c = Rig()
    c.handle(attrs.evolve(_register(c, None, None), envelope_key=KEY))
    body = msgpack.unpackb(snapshot_bytes(c.state), raw=False)
    body[0] = 5
    body = body[:-1]  # format 7 added the unpublished results
    strip_nodes(body, 5)
    restored = restore(msgpack.packb(body, use_bin_type=True))
    assert restored == as_older_format_sees(c.state, 5)
    node = restored.node("n1")
    assert node is not None and node.envelope_key is None


def test_a_format_2_snapshot_restores_nodes_without_an_intranet_identity() -> None:
    c = Rig.online(2, at=10.0)
    body = msgpack.unpackb(snapshot_bytes(c.state), raw=False)
    body[0] = 2
    # format 4 added the sharing state, proxies and removals (three items) and Node.last_update,
    # format 7 the unpublished results (one)
    body = body[:-4]
    # ... and format 5 Node.live_since
    strip_nodes(body, 2)
    restored = restore(msgpack.packb(body, use_bin_type=True))
    # what an old snapshot cannot know comes back unknown; everything else is as it was
    assert restored == as_format_4_sees(c.state)
    assert all(n.live_since is None for n in restored.nodes)
    assert all(n.live_since is not None for n in c.state.nodes)
