"""Credential versions and sync in the core (shir.core.credentials), rule by rule.

Every test drives the core through ``CredCluster`` (tests/credential_helpers.py): ``refused``
asserts the state is unchanged by a refusal; ``cooperative=True`` makes the nodes answer the sync
effects as a host would.
"""

from __future__ import annotations

import attrs
import msgpack
import pytest
from canary import CANARY_BYTES
from credential_helpers import CredCluster, with_credentials
from rig import names, of_type, statuses
from snapshot_helpers import as_format_4_sees, strip_nodes

from shir.adapters.envelope import NodeKeys, open_envelope, seal
from shir.core import (
    CredentialNotHeld,
    CredentialSaved,
    CredentialShared,
    CredentialStatus,
    CredentialSynced,
    CredentialSyncRequested,
    CredentialVersion,
    DeliverCredential,
    DispatchJobs,
    JobLeased,
    NodeStatus,
    RuntimeSettings,
    SaveCredential,
    SealCredentialFor,
    ShareCredential,
    StaleCredentialVersion,
    SubmitJob,
    Tick,
    UnknownCredential,
    credential_status,
    decide,
    fold,
    initial,
    next_deadline,
)
from shir.core.codec import decode, encode
from shir.core.credentials import MAX_ENVELOPE_BYTES, SYNC_TIMEOUT_HEARTBEATS, sync_timeout_s
from shir.core.errors import (
    InvalidCommand,
    NodeOffline,
    RuntimeNotFound,
    TimeWentBackwards,
    UnknownNode,
)
from shir.core.snapshot import FORMAT, restore, snapshot_bytes

ON, LIM, OFF, INIT = (NodeStatus.ONLINE, NodeStatus.LIMITED, NodeStatus.OFFLINE,
                      NodeStatus.INITIALIZING)
TIMEOUT = sync_timeout_s(RuntimeSettings())


def online(n: int = 2, at: float = 10.0, **kw: object) -> CredCluster:
    """Nodes n1..n<n>, all Online after one heartbeat at ``at``; n1 dispatches."""
    return CredCluster.online(n, at=at, **kw)


def requests(events: object) -> list[tuple[str, int, str, str]]:
    return [(e.credential_id, e.version, e.from_node, e.to_node)
            for e in of_type(events, CredentialSyncRequested)]  # type: ignore[arg-type]


def share(c: CredCluster, cid: str, v: int, src: str, dst: str, at: float | None = None,
          envelope: bytes = b"ciphertext") -> ShareCredential:
    return ShareCredential(cid, v, src, dst, envelope, c.at(at))


# --- saving ----------------------------------------------------------------------------------

def test_save_makes_the_latest_version_and_requests_a_sync_to_every_other_node() -> None:
    c = online(3)
    events = c.save("sql-1", 1, "n2", at=12)
    assert names(events) == [
        "CredentialSaved", "NodeStatusChanged", "NodeStatusChanged",
        "CredentialSyncRequested", "CredentialSyncRequested",
    ]
    assert events[0] == CredentialSaved("sql-1", 1, "n2", 12)
    assert requests(events) == [("sql-1", 1, "n2", "n1"), ("sql-1", 1, "n2", "n3")]
    assert c.effects[-2:] == [SealCredentialFor("sql-1", 1, "n2", "n1"),
                              SealCredentialFor("sql-1", 1, "n2", "n3")]
    # the node it was saved on holds it at once; the others are behind, and Limited
    assert c.status("n2") is ON
    assert c.status("n1") is LIM and c.reasons("n1") == ("credential sql-1 missing, latest v1",)
    st = credential_status(c.state)
    assert st.latest == (CredentialVersion("sql-1", 1),) and st.latest_version("sql-1") == 1
    assert st.behind == ("n1", "n3") and not st.converged


def test_a_node_holding_an_older_version_is_limited_with_both_versions_in_the_reason() -> None:
    c = online(2, cooperative=True)
    c.save("sql-1", 1, "n1", at=11)
    c.heartbeat_all(20)
    assert c.status("n2") is ON
    c.save("sql-1", 2, "n1", at=21)
    assert c.status("n2") is LIM
    assert c.reasons("n2") == ("credential sql-1 at v1, latest v2",)


def test_behind_on_two_credentials_and_another_limit_gives_every_reason() -> None:
    c = online(2)
    c.save("a-1", 1, "n1", at=11)
    c.save("b-2", 3, "n1", at=12)
    c.heartbeat("n2", at=13, control_channel_ok=False)
    assert c.status("n2") is LIM
    assert c.reasons("n2") == (
        "control channel unreachable",
        "credential a-1 missing, latest v1; credential b-2 missing, latest v3",
    )


def test_versions_only_grow_and_an_equal_version_elsewhere_is_refused() -> None:
    c = online(2)
    c.save("sql-1", 2, "n1", at=11)
    err = c.refused(SaveCredential("sql-1", 2, "n2", 12), StaleCredentialVersion)
    assert str(err) == (
        "credential 'sql-1' is already at v2 (saved on n1); versions only grow: save it as v3 "
        "or later, not v2"
    )
    err = c.refused(SaveCredential("sql-1", 1, "n2", 12), StaleCredentialVersion)
    assert "not v1" in str(err)
    c.refused(SaveCredential("sql-1", 1, "n1", 12), StaleCredentialVersion)  # older, same node
    assert c.save("sql-1", 3, "n2", at=13)[0] == CredentialSaved("sql-1", 3, "n2", 13)


def test_the_same_save_again_yields_nothing() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    assert decide(c.state, SaveCredential("sql-1", 1, "n1", 11)) == ()
    assert decide(c.state, SaveCredential("sql-1", 1, "n1", 15)) == ()  # later, still satisfied


def test_the_same_save_on_a_new_node_that_took_the_name_is_refused() -> None:
    c = online(2)
    c.save("sql-1", 1, "n2", at=11)
    c.remove("n2", at=12)
    c.register("n2", machine="machine-new", at=13)
    err = c.refused(SaveCredential("sql-1", 1, "n2", 14), StaleCredentialVersion)
    assert "save it as v2 or later" in str(err)


@pytest.mark.parametrize(("cid", "version", "message"), [
    ("", 1, "invalid credential id ''"),
    ("../etc", 1, "invalid credential id '../etc'"),
    ("a" * 129, 1, "use 1-128 letters"),
    ("sql 1", 1, "invalid credential id 'sql 1'"),
    (7, 1, "invalid credential id <class 'int'>"),
    ("sql-1", 0, "invalid version 0 of credential 'sql-1'"),
    ("sql-1", -3, "invalid version -3"),
    ("sql-1", True, "invalid version True"),
    ("sql-1", 1.0, "invalid version 1.0"),
    ("sql-1", 2**63, "versions are whole numbers from 1 to 9223372036854775807"),
])
def test_malformed_saves_are_refused(cid: object, version: object, message: str) -> None:
    c = online(1)
    err = c.refused(SaveCredential(cid, version, "n1", 11), InvalidCommand)  # type: ignore[arg-type]
    assert message in str(err)


def test_save_on_an_unknown_node_or_without_a_runtime_is_refused() -> None:
    c = online(1)
    err = c.refused(SaveCredential("sql-1", 1, "ghost", 11), UnknownNode)
    assert "node 'ghost' is not registered" in str(err)
    with pytest.raises(RuntimeNotFound, match="send CreateRuntime first"):
        decide(initial(), SaveCredential("sql-1", 1, "n1", 0))


def test_save_on_an_offline_node_is_refused_even_when_it_went_offline_at_that_moment() -> None:
    c = online(2)
    c.heartbeat("n1", at=30)
    err = c.refused(SaveCredential("sql-1", 1, "n2", 40), NodeOffline)  # silent since 10
    assert str(err) == (
        "node 'n2' is Offline; save credential 'sql-1' on a node that is up, and it will reach "
        "the others by sync"
    )


def test_save_stamped_in_the_past_is_refused() -> None:
    c = online(1)
    c.refused(SaveCredential("sql-1", 1, "n1", 5), TimeWentBackwards)


# --- sharing ---------------------------------------------------------------------------------

def test_share_stores_the_envelope_for_the_target_and_delivers_it() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    events = c.handle(share(c, "sql-1", 1, "n1", "n2", at=12, envelope=b"\x01sealed"))
    assert events == (CredentialShared("sql-1", 1, "n1", "n2", b"\x01sealed", 12),)
    assert c.effects[-1] == DeliverCredential("n2", "sql-1", 1, b"\x01sealed")
    (sync,) = credential_status(c.state).syncs
    assert (sync.from_node, sync.to_node, sync.requested_at, sync.shared_at) == ("n1", "n2", 11, 12)
    assert "sealed" not in repr(events[0]) and "<7 bytes>" in repr(events[0])


def test_share_refusals_say_what_was_wrong() -> None:
    c = online(3)
    c.save("sql-1", 2, "n1", at=11)
    cases = [
        (share(c, "nope", 1, "n1", "n2"), UnknownCredential,
         "no version of credential 'nope' was ever saved in this runtime; save it on a node first"),
        (share(c, "sql-1", 1, "n1", "n2"), StaleCredentialVersion,
         "credential 'sql-1' is at v2; v1 is outdated: seal v2 instead"),
        (share(c, "sql-1", 3, "n1", "n2"), StaleCredentialVersion,
         "credential 'sql-1' is at v2; v3 was never saved: share the latest, v2"),
        (share(c, "sql-1", 2, "n3", "n2"), CredentialNotHeld,
         "node 'n3' last reported no version of credential 'sql-1', not v2; only a node that "
         "holds v2 can share it"),
        (share(c, "sql-1", 2, "n1", "ghost"), UnknownNode, "node 'ghost' is not registered"),
        (share(c, "sql-1", 2, "ghost", "n2"), UnknownNode, "node 'ghost' is not registered"),
        (share(c, "sql-1", 2, "n2", "n2"), InvalidCommand,
         "node 'n2' cannot share a credential with itself"),
        (share(c, "sql-1", 2, "n1", "n2", envelope=b""), InvalidCommand,
         f"envelope must be 1-{MAX_ENVELOPE_BYTES} bytes of ciphertext sealed for 'n2', got 0"),
        (share(c, "sql-1", 2, "n1", "n2", envelope=b"x" * (MAX_ENVELOPE_BYTES + 1)),
         InvalidCommand, f"got {MAX_ENVELOPE_BYTES + 1}"),
        (share(c, "sql-1", 2, "n1", "n2", envelope="text"), InvalidCommand,  # type: ignore[arg-type]
         "got str"),
        (share(c, "sql-1", 2, "n1", "n2", at=1), TimeWentBackwards, "drive the core"),
        (share(c, "sql 1", 2, "n1", "n2"), InvalidCommand, "invalid credential id"),
    ]
    for command, error, message in cases:
        err = c.refused(command, error)
        assert message in str(err), (command, str(err))


def test_a_holder_at_an_older_version_cannot_share() -> None:
    c = online(3)
    c.save("sql-1", 1, "n1", at=11)
    c.hold("n2", "sql-1", 1)
    c.heartbeat_all(20)
    c.save("sql-1", 2, "n1", at=21)
    err = c.refused(share(c, "sql-1", 2, "n2", "n3"), CredentialNotHeld)
    assert "node 'n2' last reported v1 of credential 'sql-1', not v2" in str(err)


def test_sharing_again_or_to_a_node_that_holds_it_yields_nothing() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    c.handle(share(c, "sql-1", 1, "n1", "n2", at=12))
    assert decide(c.state, share(c, "sql-1", 1, "n1", "n2", at=12)) == ()
    assert decide(c.state, share(c, "sql-1", 1, "n1", "n2", at=13, envelope=b"other")) == ()
    c.hold("n2", "sql-1", 1)
    c.heartbeat_all(20)
    assert decide(c.state, share(c, "sql-1", 1, "n1", "n2", at=21)) == ()


def test_a_share_nobody_asked_for_is_accepted_and_counts_as_the_sync() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    c.tick(11 + TIMEOUT)  # the request lapses and is made again
    events = c.handle(share(c, "sql-1", 1, "n1", "n2", at=50))
    assert names(events) == ["CredentialShared"]
    assert credential_status(c.state).syncs[0].shared_at == 50


# --- derived status and the sync loop --------------------------------------------------------

def test_limited_while_behind_then_online_once_the_heartbeat_reports_the_version() -> None:
    c = online(2, cooperative=True)
    events = c.save("sql-1", 1, "n1", at=11)
    assert statuses(events, "n2") == [LIM]
    # the host answered: n1 sealed, the envelope was stored and delivered to n2
    assert names(c.log[-2:]) == ["CredentialSyncRequested", "CredentialShared"]
    assert c.status("n2") is LIM  # n2 has not reported it yet
    events = c.heartbeat("n2", at=15)
    assert names(events) == ["HeartbeatReceived", "NodeStatusChanged", "CredentialSynced"]
    assert events[-1] == CredentialSynced("sql-1", 1, "n2", 15)
    assert c.status("n2") is ON and c.reasons("n2") == ()
    st = credential_status(c.state)
    assert st.converged and st.behind == () and st.syncs == ()


def test_a_new_node_is_asked_every_credential_when_it_registers() -> None:
    c = online(2, cooperative=True)
    c.save("a-1", 1, "n1", at=11)
    c.save("b-1", 4, "n2", at=12)
    c.heartbeat_all(20)
    assert credential_status(c.state).converged
    events = c.register("n3", at=21)
    assert requests(events) == [("a-1", 1, "n1", "n3"), ("b-1", 4, "n1", "n3")]
    assert c.status("n3") is INIT  # Initializing outranks Limited
    c.run_up(40)
    assert c.status("n3") is ON
    assert c.holding("n3") == {"a-1": 1, "b-1": 4}


def test_a_node_that_rejoins_after_being_offline_is_asked_what_it_missed() -> None:
    c = online(2, cooperative=True)
    c.save("sql-1", 1, "n1", at=11)
    c.heartbeat_all(20)
    c.silence("n2")
    c.run_up(60)
    assert c.status("n2") is OFF
    events = c.save("sql-1", 2, "n1", at=61)
    assert requests(events) == []  # nothing is sent to a node that is Offline
    assert c.reasons("n2") == ("missed heartbeats for 30 s",)
    c.wake("n2")
    events = c.heartbeat("n2", at=62, session=1)
    assert names(events)[:3] == ["NodeRejoined", "HeartbeatReceived", "NodeStatusChanged"]
    assert requests(events) == [("sql-1", 2, "n1", "n2")]
    assert c.status("n2") is LIM and c.reasons("n2") == ("credential sql-1 at v1, latest v2",)
    c.run_up(80)
    assert c.status("n2") is ON and c.holding("n2") == {"sql-1": 2}


def test_a_rejoin_ends_a_sync_under_way_and_asks_again() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=15)  # requested at 15: it would lapse at 45
    c.heartbeat("n1", at=20)
    c.heartbeat("n1", at=30)
    c.heartbeat("n1", at=39)
    assert c.status("n2") is LIM
    c.heartbeat("n1", at=40)  # n2 silent for 30 s: Offline, the sync request to it lapses
    assert c.status("n2") is OFF
    events = c.heartbeat("n2", at=41)  # a new session: the request of session 1 is void
    assert requests(events) == [("sql-1", 1, "n1", "n2")]
    (sync,) = credential_status(c.state).syncs
    assert (sync.session, sync.requested_at) == (2, 41)


def test_a_sync_with_no_progress_is_requested_again_after_the_timeout() -> None:
    c = online(3)
    c.save("sql-1", 1, "n2", at=11)
    c.hold("n3", "sql-1", 1)
    c.heartbeat_all(12)  # n3 holds it too now; n1 is the one behind
    assert c.status("n1") is LIM
    assert next_deadline(c.state) == 11 + TIMEOUT == 41  # before the silence deadlines (42)
    assert decide(c.state, Tick(40.9)) == ()
    events = c.tick(41)
    assert events == (CredentialSyncRequested("sql-1", 1, "n3", "n1", 41),)  # the next holder
    assert next_deadline(c.state) == 42
    c.heartbeat_all(41.5)
    assert next_deadline(c.state) == 71
    events = c.tick(71)
    assert requests(events) == [("sql-1", 1, "n2", "n1")]  # and round again


def test_after_a_share_the_timeout_runs_from_the_share() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    c.handle(share(c, "sql-1", 1, "n1", "n2", at=20))
    c.heartbeat_all(21)
    assert next_deadline(c.state) == 20 + TIMEOUT
    assert requests(c.tick(50)) == [("sql-1", 1, "n1", "n2")]


def test_the_timeout_is_three_heartbeat_intervals_of_the_runtime() -> None:
    assert SYNC_TIMEOUT_HEARTBEATS == 3
    assert sync_timeout_s(RuntimeSettings(heartbeat_interval_s=4)) == 12
    c = CredCluster(RuntimeSettings(heartbeat_interval_s=4))
    c.register_n(2, at=0)
    c.heartbeat_all(1)
    c.save("sql-1", 1, "n1", at=2)
    c.heartbeat_all(3)
    assert next_deadline(c.state) == 2 + 12
    assert requests(c.tick(14)) == [("sql-1", 1, "n1", "n2")]


def test_a_request_waiting_on_a_holder_that_goes_offline_moves_to_another_at_once() -> None:
    c = online(3)
    c.save("sql-1", 1, "n1", at=11)
    c.hold("n2", "sql-1", 1)
    c.heartbeat("n2", at=12)
    c.heartbeat("n3", at=20)
    c.heartbeat("n2", at=20)
    events = c.tick(40)  # n1 silent for 30 s
    assert statuses(events, "n1") == [OFF]
    assert requests(events) == [("sql-1", 1, "n2", "n3")]


def test_no_holder_up_means_no_request_until_one_comes_back() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    c.heartbeat("n2", at=20)
    c.heartbeat("n2", at=30)
    c.heartbeat("n2", at=40)  # n1 Offline; the request to n2 waited on it and lapses
    assert c.status("n1") is OFF and c.status("n2") is LIM
    assert requests(c.log[-3:]) == []
    assert next_deadline(c.state) == 70  # n2's silence, no sync deadline: nothing could be done
    events = c.heartbeat("n1", at=50)
    assert requests(events) == [("sql-1", 1, "n1", "n2")]


def test_an_online_holder_is_preferred_to_a_limited_one_then_the_earliest() -> None:
    c = online(4)
    c.heartbeat("n1", at=11, reachable_peers=("n2", "n3"))  # Limited: cannot reach n4
    c.save("sql-1", 1, "n1", at=12)  # n1 is the only holder: Limited holders count
    assert c.status("n1") is LIM
    assert requests(c.log[-3:]) == [("sql-1", 1, "n1", n) for n in ("n2", "n3", "n4")]
    c.hold("n2", "sql-1", 1)
    c.hold("n3", "sql-1", 1)
    c.heartbeat("n2", at=13)
    c.heartbeat("n3", at=13)
    events = c.save("sql-1", 2, "n3", at=14)
    assert requests(events) == [("sql-1", 2, "n3", n) for n in ("n1", "n2", "n4")]
    c.hold("n2", "sql-1", 2)
    c.heartbeat("n1", at=15, reachable_peers=("n2", "n3"))
    for n in ("n2", "n3", "n4"):
        c.heartbeat(n, at=15)
    events = c.tick(14 + TIMEOUT)  # Online holders first (n2, n3), then n1; rotate from n3
    assert requests(events) == [("sql-1", 2, "n2", "n1"), ("sql-1", 2, "n2", "n4")]


def test_a_holder_that_loses_its_control_channel_hands_its_requests_over_at_once() -> None:
    c = online(3)
    c.save("sql-1", 1, "n1", at=11)
    c.hold("n2", "sql-1", 1)
    c.heartbeat("n2", at=12)
    events = c.heartbeat("n1", at=13, control_channel_ok=False)
    assert requests(events) == [("sql-1", 1, "n2", "n3")]


def test_a_holder_without_a_control_channel_is_not_asked() -> None:
    c = online(2)
    c.heartbeat("n1", at=11, control_channel_ok=False)
    events = c.save("sql-1", 1, "n1", at=12)
    assert requests(events) == []


def test_an_offline_or_upgrading_node_is_not_asked_anything() -> None:
    c = online(3)
    c.start_upgrade("n3", "5.1", at=11)
    c.heartbeat("n1", at=20)
    c.heartbeat("n3", at=20)
    c.heartbeat("n1", at=40)
    assert c.status("n2") is OFF and c.status("n3") is NodeStatus.UPGRADING
    events = c.save("sql-1", 1, "n1", at=41)
    assert requests(events) == []
    events = c.finish_upgrade("n3", True, at=42)
    assert requests(events) == [("sql-1", 1, "n1", "n3")]


def test_removing_a_node_drops_the_syncs_to_it() -> None:
    c = online(3)
    c.save("sql-1", 1, "n1", at=11)
    assert {s.to_node for s in credential_status(c.state).syncs} == {"n2", "n3"}
    c.remove("n2", at=12)
    assert {s.to_node for s in credential_status(c.state).syncs} == {"n3"}


def test_a_newer_save_replaces_a_sync_under_way() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    events = c.save("sql-1", 2, "n1", at=12)
    assert requests(events) == [("sql-1", 2, "n1", "n2")]
    (sync,) = credential_status(c.state).syncs
    assert (sync.version, sync.requested_at) == (2, 12)


def test_the_node_that_saves_is_up_to_date_and_its_own_sync_ends() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    events = c.save("sql-1", 2, "n2", at=12)  # n2 was behind on v1 and now saves v2
    assert requests(events) == [("sql-1", 2, "n2", "n1")]
    assert c.status("n2") is ON and c.status("n1") is LIM
    assert [s.to_node for s in credential_status(c.state).syncs] == ["n1"]


def test_state_stays_bounded_by_credentials_and_nodes() -> None:
    c = online(3, cooperative=True)
    for v in range(1, 60):
        c.save("sql-1", v, f"n{v % 3 + 1}", at=10 + v)
        c.save("ora-2", v, f"n{(v + 1) % 3 + 1}", at=10 + v)
        c.heartbeat_all(10 + v)
        m = c.state.model()
        assert len(m.credentials) == 2 and len(m.syncs) <= 2 * 3
    c.heartbeat_all(80)
    assert credential_status(c.state).converged and not c.state.model().syncs


# --- jobs ------------------------------------------------------------------------------------

def test_a_job_needing_the_latest_version_goes_only_to_a_node_that_holds_it() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    c.heartbeat("n1", at=12, running_jobs=0)
    c.handle(SubmitJob("j1", "k1", 12, needs=(CredentialVersion("sql-1", 1),)))
    c.handle(SubmitJob("j2", "k2", 12, needs=(CredentialVersion("sql-1", 1),)))
    events = c.handle(DispatchJobs("n1", c.state.term, 13))
    assert {e.token.node for e in of_type(events, JobLeased)} == {"n1"}
    assert c.status("n2") is LIM  # behind: Limited, and no job that needs the credential


def test_a_job_needing_a_version_nobody_online_holds_waits_unless_it_carries_it() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    need = (CredentialVersion("sql-1", 1),)
    c.heartbeat("n2", at=20)
    c.heartbeat("n2", at=30)
    c.heartbeat("n2", at=40)  # n1, the only holder, is Offline
    c.handle(SubmitJob("j1", "k1", 41, needs=need))
    c.handle(SubmitJob("j2", "k2", 41, needs=need, carried=("sql-1",)))
    events = c.handle(DispatchJobs("n2", c.state.term, 42))
    assert [(e.token.job_id, e.token.node) for e in of_type(events, JobLeased)] == [("j2", "n2")]


# --- no secrets, codec, snapshots ------------------------------------------------------------

def test_events_effects_and_snapshots_never_hold_the_plaintext() -> None:
    """A host seals the canary with the real envelope; the core only ever sees ciphertext."""
    keys = {f"n{i}": NodeKeys.generate() for i in range(1, 5)}

    def sealer(fx: SealCredentialFor) -> bytes:
        return seal(fx.credential_id, fx.version, CANARY_BYTES, keys[fx.from_node],
                    keys[fx.to_node].public, fx.to_node)

    c = online(3, cooperative=True, sealer=sealer)
    c.save("sql-1", 1, "n1", at=11)
    c.register("n4", at=12)
    c.run_up(60)
    c.save("sql-1", 2, "n3", at=61)
    c.run_up(100)
    assert credential_status(c.state).converged
    shared = of_type(c.log, CredentialShared)
    assert len(shared) >= 5
    # the ciphertext is real: the target opens it to the canary
    e = shared[-1]
    opened = open_envelope(e.envelope, keys[e.to_node], e.to_node, keys[e.from_node].public, 1)
    assert opened.plaintext == CANARY_BYTES
    for e in c.log:
        data = encode(e)
        assert CANARY_BYTES not in data
        assert decode(data) == e
        assert CANARY_BYTES.decode() not in repr(e)
    for fx in c.effects:
        assert CANARY_BYTES.decode() not in repr(fx)
    assert CANARY_BYTES not in snapshot_bytes(c.state)
    assert CANARY_BYTES.decode() not in repr(credential_status(c.state))
    assert not c.refusals


def test_snapshot_round_trips_the_credential_state_and_the_tail_replays() -> None:
    c = online(3)
    c.save("sql-1", 1, "n1", at=11)
    c.handle(share(c, "sql-1", 1, "n1", "n2", at=12))
    c.save("ora-2", 5, "n3", at=13)
    log = list(c.log)
    assert c.state.model().syncs and c.state.model().credentials
    assert restore(snapshot_bytes(c.state)) == c.state
    for cut in range(0, len(log) + 1, 3):
        snap = snapshot_bytes(fold(initial(), log[:cut]))
        assert fold(restore(snap), log[cut:]) == fold(initial(), log)
    restored = restore(snapshot_bytes(c.state))
    assert next_deadline(restored) == next_deadline(c.state)
    assert credential_status(restored) == credential_status(c.state)


def test_a_format_1_snapshot_restores_with_no_credential_state() -> None:
    c = online(2)
    body = msgpack.unpackb(snapshot_bytes(c.state), raw=False)
    # no sharing, proxy, removal or unpublished result
    assert body[0] == FORMAT and body[-6:] == [[], [], None, [], [], []]
    # format 1 had no credential state, and its nodes no intranet address, certificate, last
    # update or live_since
    strip_nodes(body, 1)
    old = msgpack.packb([1, *body[1:-6]], use_bin_type=True)
    assert restore(old) == as_format_4_sees(c.state)


def test_decide_leaves_the_state_unchanged_and_fold_equals_replay() -> None:
    c = online(3, cooperative=True)
    c.save("sql-1", 1, "n1", at=11)
    before = c.state.fingerprint()
    decide(c.state, SaveCredential("sql-1", 2, "n2", 12))
    decide(c.state, Tick(100))
    assert c.state.fingerprint() == before
    c.run_up(60)
    assert fold(initial(), c.log) == c.state


def test_credential_status_is_frozen_and_reports_each_node() -> None:
    c = online(2)
    c.save("sql-1", 1, "n1", at=11)
    st = credential_status(c.state)
    assert isinstance(st, CredentialStatus)
    with pytest.raises(AttributeError):
        st.latest = ()  # type: ignore[misc]
    n1, n2 = st.nodes
    v1 = (CredentialVersion("sql-1", 1),)
    assert (n1.node, n1.status, n1.held, n1.behind) == ("n1", ON, v1, ())
    assert (n2.node, n2.status, n2.held, n2.behind) == ("n2", LIM, (), v1)
    assert st.latest_version("other") is None


def test_registration_metrics_count_as_what_a_new_node_holds() -> None:
    c = online(1)
    c.save("sql-1", 1, "n1", at=11)
    command = c.register_cmd("n2", at=12)
    command = attrs.evolve(command, metrics=with_credentials(command.metrics, **{"sql-1": 1}))
    events = c.handle(command)
    assert requests(events) == []
