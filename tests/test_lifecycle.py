"""The runtime lifecycle, rule by rule and refusal by refusal (shir.core.decide, keys, rules).

Every test drives the core through ``Rig`` (tests/rig.py), which asserts on
each refusal that the state's fingerprint did not change.
"""

from __future__ import annotations

import math
import re

import attrs
import pytest
from rig import DAY_S, Rig, names, of_type, statuses, terms

from shir.core import (
    AnnounceDispatcher,
    AuthKey,
    CreateRuntime,
    Disconnect,
    DispatcherChanged,
    FinishUpgrade,
    Heartbeat,
    KeyName,
    NodeRejoined,
    NodeRemoved,
    NodeStatus,
    NodeStatusChanged,
    RegenerateAuthKey,
    RemoveNode,
    RuntimeSettings,
    RuntimeStatus,
    SpentState,
    StartSession,
    StartUpgrade,
    Tick,
    UpgradeFinished,
    VersionExpiryWarned,
    decide,
    fold,
    handle,
    initial,
    next_deadline,
)
from shir.core.codec import decode_value, encode_value
from shir.core.errors import (
    Fenced,
    InvalidCommand,
    MachineAlreadyRegistered,
    NodeNameTaken,
    NodeOffline,
    RemoteAccessDisabled,
    RuntimeAlreadyExists,
    RuntimeNotFound,
    StaleSession,
    TimeWentBackwards,
    TooManyNodes,
    UnknownNode,
    UpgradeInProgress,
)
from shir.core.keys import InvalidAuthKey, RegeneratedKey, WrongRuntimeKey, parse_auth_key
from shir.core.model import InvalidSettings

ON, LIM, OFF = NodeStatus.ONLINE, NodeStatus.LIMITED, NodeStatus.OFFLINE


def online(n: int = 2, at: float = 10.0, **settings: object) -> Rig:
    """A runtime with nodes n1..n<n>, all Online after one heartbeat at ``at``; n1 dispatches."""
    return Rig.online(n, RuntimeSettings(**settings) if settings else None,  # type: ignore[arg-type]
                      at=at)


def secret_of(key_text: str) -> str:
    return key_text.rsplit("@", 1)[1]


def _fields(command: object) -> dict[str, object]:
    return attrs.asdict(command, recurse=False)  # type: ignore[arg-type]


# --- the runtime and its keys ----------------------------------------------------------------

def test_create_runtime_keeps_verifiers_not_keys() -> None:
    c = Rig()
    (created,) = c.log
    assert created.key1 == c.keys[KeyName.KEY1].verifier()
    assert c.state.runtime.type == "SelfHosted"
    assert c.state.runtime.factory_id == "factory-1"
    assert c.state.status is RuntimeStatus.NEED_REGISTRATION
    assert c.state.key_generations == {KeyName.KEY1: 1, KeyName.KEY2: 1}
    for key in c.keys.values():
        assert secret_of(key.text) not in repr(created)
        assert key.secret not in repr(created).encode()
        assert "<hidden>" in repr(key)


def test_create_runtime_again_is_satisfied_and_another_is_refused() -> None:
    c = Rig()
    assert c.handle(c.create) == ()
    later = CreateRuntime(**{**_fields(c.create), "at": 5.0})
    assert c.handle(later) == ()
    other = CreateRuntime(**{**_fields(c.create), "name": "other"})
    err = c.refused(other, RuntimeAlreadyExists)
    assert "'shir-test' (rt-1) already exists" in str(err)
    rekeyed = CreateRuntime(**{**_fields(c.create), "key1": c.new_key(KeyName.KEY1, 1)})
    c.refused(rekeyed, RuntimeAlreadyExists)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"runtime_id": ""}, "runtime_id must be 1-128 characters"),
        ({"name": "x" * 129}, "name must be 1-128 characters"),
        ({"factory_id": "f\n1"}, "factory_id must not contain control characters"),
        ({"at": math.nan}, "'at' must be a number of seconds"),
    ],
)
def test_create_runtime_refuses_bad_fields(change: dict[str, object], message: str) -> None:
    c = Rig()
    fresh = Rig(seed=1)
    command = CreateRuntime(**{**_fields(fresh.create), **change})
    c.state = initial()
    err = c.refused(command, InvalidCommand)
    assert message in str(err)


def test_create_runtime_refuses_text_that_cannot_be_stored() -> None:
    c = Rig()
    fresh = Rig(seed=1)
    command = CreateRuntime(**{**_fields(fresh.create), "name": "caf\udce9"})
    c.state = initial()
    err = c.refused(command, InvalidCommand)
    assert "name 'caf\\udce9' is not UTF-8 text" in str(err)


def test_create_runtime_refuses_keys_not_made_for_it() -> None:
    c = Rig()
    c.state = initial()
    base = _fields(c.create)
    k1, k2 = c.keys[KeyName.KEY1], c.keys[KeyName.KEY2]
    other_runtime = c.new_key(KeyName.KEY1, 1, runtime_id="rt-2")
    pasted = parse_auth_key(k1.text)  # a parsed key has no salt: it cannot make a verifier
    for key1, key2 in ((k2, k2), (other_runtime, k2), (pasted, k2), (k1, k1)):
        err = c.refused(CreateRuntime(**{**base, "key1": key1, "key2": key2}), InvalidCommand)
        assert "must be made with AuthKey.from_seed('rt-1', KeyName.KEY" in str(err)


def test_auth_key_from_seed_refusals() -> None:
    with pytest.raises(InvalidAuthKey, match="at least 48 random bytes"):
        AuthKey.from_seed("rt-1", KeyName.KEY1, 1, b"x" * 47)
    for bad in ("", "rt@1"):
        with pytest.raises(InvalidAuthKey, match="must be non-empty and contain no '@'"):
            AuthKey.from_seed(bad, KeyName.KEY1, 1, b"x" * 48)


def test_regenerated_key_registers_nothing_and_the_refusal_names_the_slot() -> None:
    c = Rig()
    old = c.key_text(KeyName.KEY1)
    assert names(c.regenerate(KeyName.KEY1, at=1)) == ["AuthKeyRegenerated"]
    assert c.state.key_generations[KeyName.KEY1] == 2
    err = c.refused(c.register_cmd("n1", key=old), RegeneratedKey)
    assert "key1 was regenerated (now generation 2); this is generation 1" in str(err)
    assert secret_of(old) not in str(err)
    assert names(c.register("n1", key=c.key_text(KeyName.KEY1))) == ["NodeRegistered"]
    assert names(c.register("n2", key=c.key_text(KeyName.KEY2))) == ["NodeRegistered"]


def test_regenerate_repeat_is_satisfied_and_generation_must_grow() -> None:
    c = Rig()
    c.regenerate(KeyName.KEY2, at=1)
    assert c.handle(RegenerateAuthKey(c.keys[KeyName.KEY2], 2)) == ()
    same_gen = c.new_key(KeyName.KEY2, 2)
    err = c.refused(RegenerateAuthKey(same_gen, 3), InvalidCommand)
    assert "key2 is at generation 2; a regenerated key needs a higher generation, got 2" in str(err)
    c.refused(RegenerateAuthKey(c.new_key(KeyName.KEY2, 1), 3), InvalidCommand)
    foreign = c.new_key(KeyName.KEY2, 3, runtime_id="rt-2")
    err = c.refused(RegenerateAuthKey(foreign, 3), InvalidCommand)
    assert "made with AuthKey.from_seed('rt-1', ...)" in str(err)
    unsalted = parse_auth_key(c.new_key(KeyName.KEY2, 3).text)
    c.refused(RegenerateAuthKey(unsalted, 3), InvalidCommand)
    c.refused(RegenerateAuthKey(c.new_key(KeyName.KEY2, 3), -1), TimeWentBackwards)


def test_commands_before_create_runtime_are_refused() -> None:
    c = Rig()
    c.state = initial()
    for command in (
        c.register_cmd("n1"),
        RegenerateAuthKey(c.new_key(KeyName.KEY1, 2), 0),
        RemoveNode("n1", 0),
    ):
        err = c.refused(command, RuntimeNotFound)
        assert "send CreateRuntime first" in str(err)
    assert decide(c.state, Tick(5)) == ()
    assert next_deadline(c.state) is None


def test_not_a_command_is_refused() -> None:
    c = Rig()
    err = c.refused("RegisterNode", InvalidCommand)
    assert "str is not a command; expected one of " in str(err)
    assert "CreateRuntime" in str(err) and "Tick" in str(err)


# --- registration ------------------------------------------------------------------------------

def test_either_key_registers_a_node() -> None:
    c = Rig()
    events = c.register("n1", key=c.key_text(KeyName.KEY1))
    assert names(events) == ["NodeRegistered"]
    assert events[0].key_name is KeyName.KEY1
    events = c.register("n2", key=c.key_text(KeyName.KEY2))
    assert events[0].key_name is KeyName.KEY2
    assert [n.name for n in c.state.nodes] == ["n1", "n2"]
    assert [n.status for n in c.state.nodes] == [NodeStatus.INITIALIZING] * 2


def test_key_of_another_runtime_is_refused_as_such() -> None:
    c = Rig()
    other = Rig(runtime_id="rt-other", seed=7)
    text = other.key_text()
    err = c.refused(c.register_cmd("n1", key=text), WrongRuntimeKey)
    assert "belongs to runtime 'rt-other', not to 'rt-1'" in str(err)
    assert secret_of(text) not in str(err)


def _with_secret(text: str, secret: str) -> str:
    return text.rsplit("@", 1)[0] + "@" + secret


@pytest.mark.parametrize(
    ("garble", "message"),
    [
        (lambda t, s: "hello", "not an auth key: expected the form IR@<runtime>@"),
        (lambda t, s: t.replace("IR@", "XX@", 1), "not an auth key"),
        (lambda t, s: t + "@extra", "not an auth key"),
        (lambda t, s: t.replace("@key1@", "@key3@"), "names slot 'key3'; only key1 and key2"),
        (lambda t, s: t.replace("@key1@1@", "@key1@one@"), "generation is not a number"),
        (lambda t, s: t.replace("@key1@1@", "@key1@\u00b2@"), "generation is not a number"),
        (lambda t, s: _with_secret(t, s + "AB"), "secret is not valid base64"),
        (lambda t, s: _with_secret(t, s[:-1] + "\u00e9"), "secret is not valid base64"),
        (lambda t, s: _with_secret(t, s[::-1]), "this key1 is not valid for runtime 'rt-1'"),
        (lambda t, s: t.replace("@key1@1@", "@key1@2@"), "this key1 is not valid"),
        (lambda t, s: t.replace("@key1@", "@key2@"), "this key2 is not valid"),
    ],
)
def test_garbage_keys_are_refused_without_repeating_the_secret(garble, message) -> None:  # type: ignore[no-untyped-def]
    c = Rig()
    text = c.key_text(KeyName.KEY1)
    secret = secret_of(text)
    bad = garble(text, secret)
    command = c.register_cmd("n1", key=bad)
    err = c.refused(command, InvalidAuthKey)
    assert message in str(err)
    assert secret not in str(err) and secret[:-1] not in str(err)
    assert secret not in repr(command)


def test_non_text_key_is_refused() -> None:
    c = Rig()
    err = c.refused(c.register_cmd("n1", key=12345), InvalidAuthKey)  # type: ignore[arg-type]
    assert "not an auth key" in str(err)


def test_at_most_four_nodes() -> None:
    c = Rig()
    c.register_n(4)
    err = c.refused(c.register_cmd("n5"), TooManyNodes)
    assert "runtime 'shir-test' already has 4 nodes (max 4); remove one" in str(err)
    c.remove("n2", at=1)
    assert names(c.register("n5", at=2)) == ["NodeRegistered"]


def test_max_nodes_setting_lowers_the_limit() -> None:
    c = Rig(RuntimeSettings(max_nodes=1))
    c.register("n1")
    err = c.refused(c.register_cmd("n2"), TooManyNodes)
    assert "(max 1)" in str(err)


def test_node_names_are_unique_and_the_same_registration_is_satisfied() -> None:
    c = Rig()
    c.register("n1", machine="m1")
    assert c.handle(c.register_cmd("n1", machine="m1", key=c.key_text(KeyName.KEY2))) == ()
    err = c.refused(c.register_cmd("n1", machine="m2"), NodeNameTaken)
    assert "node name 'n1' is taken by machine 'm1'" in str(err)


def test_one_runtime_per_machine() -> None:
    c = Rig()
    c.register("n1", machine="m1")
    err = c.refused(c.register_cmd("n2", machine="m1"), MachineAlreadyRegistered)
    assert "machine 'm1' already hosts node 'n1'" in str(err)


def test_remote_access_disabled_names_the_nodes() -> None:
    c = Rig()
    c.register("n1", remote_access=False)
    err = c.refused(c.register_cmd("n2"), RemoteAccessDisabled)
    assert "node 'n2' cannot join: remote access from intranet (TCP 8060) is off on n1" in str(err)
    assert "Remote access to intranet" in str(err) and "remote_access = true" in str(err)
    c.heartbeat("n1", at=5, remote_access=True)  # turned on: the heartbeat says so
    assert names(c.register("n2", remote_access=False, at=6)) == ["NodeRegistered"]
    err = c.refused(c.register_cmd("n3", at=7), RemoteAccessDisabled)
    assert "is off on n2," in str(err)
    c2 = Rig(RuntimeSettings(intranet_port=9000))
    c2.register("a", remote_access=False)
    assert "TCP 9000) is off on a," in str(c2.refused(c2.register_cmd("b"), RemoteAccessDisabled))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node": ""}, "node name must be 1-128 characters"),
        ({"machine": "m\x00"}, "machine_id must not contain control characters"),
        ({"cores": 0}, "cores must be a positive integer, got 0"),
        ({"memory_mb": 1.5}, "memory_mb must be a positive integer, got 1.5"),
    ],
)
def test_register_refuses_bad_fields(change: dict[str, object], message: str) -> None:
    c = Rig()
    kw = {"node": "n1", **change}
    node = kw.pop("node")
    err = c.refused(c.register_cmd(node, **kw), InvalidCommand)  # type: ignore[arg-type]
    assert message in str(err)


def test_remove_node_is_idempotent_and_says_goodbye() -> None:
    c = online(2)
    events = c.handle(RemoveNode("n2", 20))
    assert names(events) == ["NodeRemoved"]
    assert events[0].reason == "removed by a user"
    assert c.effects[-1] == Disconnect("n2", "removed by a user")
    assert c.handle(RemoveNode("n2", 20)) == ()
    assert c.handle(RemoveNode("n2", 21)) == ()
    assert c.handle(RemoveNode("never", 21)) == ()
    assert c.state.node("n2") is None


def test_removing_the_dispatcher_fails_over() -> None:
    c = online(3)
    assert c.state.dispatcher == "n1"
    events = c.remove("n1", at=20)
    assert terms(events) == [(2, "n2")]
    assert of_type(events, DispatcherChanged)[0].reason == "n1 was removed; n2 takes over"


def test_offline_nodes_expire_when_configured() -> None:
    c = online(2, offline_expiry_s=600)
    c.run(100, skip=["n2"])
    assert c.status("n2") is OFF and c.state.node("n2").offline_since == 40
    assert next_deadline(c.state) <= 640
    c.run(630, skip=["n2"])
    assert c.state.node("n2") is not None
    assert names(c.tick(640)) == ["NodeRemoved"]
    assert c.log[-1].reason == "offline for 600 s (auto-expiry)"
    assert Disconnect("n2", "offline for 600 s (auto-expiry)") in c.effects


def test_offline_nodes_stay_when_expiry_is_off() -> None:
    c = online(2)
    c.run(100_000, every=1_000, skip=["n2"])
    assert c.status("n2") is OFF
    assert not of_type(c.log, NodeRemoved)


# --- heartbeats ------------------------------------------------------------------------------

def test_heartbeat_refusals() -> None:
    c = online(1)
    err = c.refused(Heartbeat("ghost", 1, c.metrics("n1"), 20), UnknownNode)
    assert "node 'ghost' is not registered in runtime 'shir-test' (nodes: n1)" in str(err)
    assert isinstance(err, Fenced) and err.reply == Disconnect("ghost", "not registered")
    # a session above the current one is from an earlier registration: stale as well
    err = c.refused(c.heartbeat_cmd("n1", at=20, session=2), StaleSession)
    assert "session 2, not given since it last registered; its session is 1" in str(err)
    assert isinstance(err, Fenced) and err.reply == StartSession("n1", 1)
    err = c.refused(c.heartbeat_cmd("n1", at=5), TimeWentBackwards)
    assert "stamped at 5 s, but the runtime has already seen 10 s" in str(err)
    c.refused(c.heartbeat_cmd("n1", at=math.nan), InvalidCommand)
    c.refused(Tick(9), TimeWentBackwards)


def test_the_same_heartbeat_again_yields_nothing() -> None:
    c = online(2)
    command = c.heartbeat_cmd("n1", at=20, cpu_pct=50.0)
    assert names(c.handle(command)) == ["HeartbeatReceived"]
    assert c.handle(command) == ()
    changed = c.heartbeat_cmd("n1", at=20, cpu_pct=51.0)
    assert names(c.handle(changed)) == ["HeartbeatReceived"]
    assert c.state.node("n1").metrics.cpu_pct == 51.0


def test_first_heartbeat_brings_a_node_online_and_a_dispatcher() -> None:
    c = Rig()
    c.register("n1")
    assert c.status("n1") is NodeStatus.INITIALIZING
    assert c.reasons("n1") == ("waiting for the first heartbeat",)
    assert c.state.dispatcher is None and c.state.term == 0
    events = c.heartbeat("n1", at=5)
    assert names(events) == ["HeartbeatReceived", "NodeStatusChanged", "DispatcherChanged"]
    assert terms(events) == [(1, "n1")]
    assert events[-1].reason == "n1 is the first eligible node"
    assert c.status("n1") is ON and c.reasons("n1") == ()
    assert AnnounceDispatcher(1, "n1") in c.effects


def test_a_node_whose_first_heartbeat_never_comes_failed_to_initialize() -> None:
    c = Rig()
    c.register("n1", at=0)
    assert next_deadline(c.state) == 30
    events = c.tick(30)
    assert statuses(events, "n1") == [NodeStatus.INITIALIZE_FAILED]
    assert c.reasons("n1") == (
        "no heartbeat within 30 s of registering: check that the node's host service is "
        "running and can reach the service",)
    assert next_deadline(c.state) is None  # nothing more is due: a tick there finds nothing
    assert c.state.status is RuntimeStatus.OFFLINE
    c.refused(StartUpgrade("n1", "5.1", 31), NodeOffline)
    # its first heartbeat, late: it rejoins under a new session and comes Online
    events = c.heartbeat("n1", at=40)
    assert names(events)[:2] == ["NodeRejoined", "HeartbeatReceived"]
    assert c.status("n1") is ON


# --- statuses --------------------------------------------------------------------------------

def test_missed_heartbeats_take_a_node_offline() -> None:
    c = online(2)
    c.run(60, skip=["n2"])
    assert c.status("n2") is OFF
    assert c.reasons("n2") == ("missed heartbeats for 30 s",)
    assert c.status("n1") is ON  # n2 is no longer live: n1 need not reach it


def test_limited_when_a_peer_port_is_unreachable() -> None:
    c = online(3)
    c.heartbeat("n3", at=20, reachable_peers=("n1",))
    assert c.status("n3") is LIM
    assert c.reasons("n3") == ("cannot reach n2 on the intranet port",)
    assert c.state.dispatcher == "n1"
    c.heartbeat("n3", at=30)
    assert c.status("n3") is ON


def test_a_peer_back_from_silence_is_unknown_not_unreachable_until_the_next_report() -> None:
    # n3 sleeps past offline detection while n1 and n2 report it unreachable; when it wakes, their
    # reports predate its return and say nothing about it: nobody flaps to Limited, and the
    # dispatcher may hand n3 work at once. A report taken after its return counts again.
    c = online(3)
    c.run(60, skip=["n3"])
    assert c.status("n3") is OFF
    c.heartbeat("n1", at=65, reachable_peers=("n2",))
    c.heartbeat("n2", at=65, reachable_peers=("n1",))
    assert (c.status("n1"), c.status("n2")) == (ON, ON)  # n3 is not live: no verdict needed
    c.heartbeat("n3", at=66)
    assert c.status("n3") is ON
    assert (c.status("n1"), c.status("n2")) == (ON, ON)
    c.heartbeat("n1", at=70, reachable_peers=("n2",))
    assert c.status("n1") is LIM
    assert c.reasons("n1") == ("cannot reach n3 on the intranet port",)


def test_limited_when_the_control_channel_is_down_and_the_dispatcher_moves() -> None:
    c = online(2)
    events = c.heartbeat("n1", at=20, control_channel_ok=False)
    assert statuses(events, "n1") == [LIM]
    assert c.reasons("n1") == ("control channel unreachable",)
    assert terms(events) == [(2, "n2")]
    assert of_type(events, DispatcherChanged)[0].reason == "n1 is Limited; n2 takes over"


def test_limited_for_two_reasons_at_once() -> None:
    c = online(2)
    c.heartbeat("n1", at=20, control_channel_ok=False, reachable_peers=())
    assert c.reasons("n1") == (
        "cannot reach n2 on the intranet port", "control channel unreachable",
    )


def test_limited_when_in_the_version_minority() -> None:
    c = online(3)
    c.report("n3", version="4.9")
    events = c.heartbeat("n3", at=20)
    assert statuses(events, "n3") == [LIM]
    assert c.reasons("n3") == ("runs version 4.9; the runtime runs 5.0",)


def test_a_version_tie_goes_to_the_newer_version() -> None:
    c = online(2)
    c.heartbeat("n2", at=20, version="5.1")
    assert c.status("n2") is ON
    assert c.reasons("n1") == ("runs version 5.0; the runtime runs 5.1",)


def test_inactive_when_the_config_differs_from_a_strict_majority() -> None:
    c = online(3)
    events = c.heartbeat("n3", at=20, config_hash="cfg-b")
    assert statuses(events, "n3") == [NodeStatus.INACTIVE]
    assert c.reasons("n3") == ("configuration differs from the majority of nodes",)
    c2 = online(2)
    c2.heartbeat("n2", at=20, config_hash="cfg-b")  # 1 vs 1: no majority, nobody Inactive
    assert [c2.status("n1"), c2.status("n2")] == [ON, ON]


def test_runtime_status_is_derived_from_the_nodes() -> None:
    c = Rig()
    assert c.state.status is RuntimeStatus.NEED_REGISTRATION
    c.register_n(2)
    assert c.state.status is RuntimeStatus.OFFLINE  # nobody can work yet
    c.heartbeat("n1", at=5)
    assert c.state.status is RuntimeStatus.LIMITED
    c.heartbeat("n2", at=6)
    assert c.state.status is RuntimeStatus.ONLINE
    c.heartbeat("n2", at=7, control_channel_ok=False)
    assert c.state.status is RuntimeStatus.LIMITED
    c.run(100, skip=["n1", "n2"])
    assert c.state.status is RuntimeStatus.OFFLINE


# --- versions and updates --------------------------------------------------------------------

def test_version_expiry_is_warned_once_per_version_90_days_before_365() -> None:
    c = online(1)
    released = 30 - 275 * DAY_S  # the warning falls due at t = 30
    c.report("n1", version_released_at=released)
    assert of_type(c.heartbeat("n1", at=20), VersionExpiryWarned) == []
    assert next_deadline(c.state) == 30
    assert c.tick(29.999) == ()
    (warned,) = c.tick(30)
    assert warned == VersionExpiryWarned("n1", "5.0", released + 365 * DAY_S, 30)
    c.run(200)
    assert len(of_type(c.log, VersionExpiryWarned)) == 1
    c.start_upgrade("n1", "5.1", at=201)
    c.finish_upgrade("n1", ok=True, at=202, released_at=released)
    assert [w.version for w in of_type(c.log, VersionExpiryWarned)] == ["5.0", "5.1"]


def test_an_expired_version_takes_its_node_offline_until_updated() -> None:
    c = online(1)
    c.report("n1", version_released_at=60 - 365 * DAY_S)
    c.heartbeat("n1", at=20)  # already inside the warning window: warned now
    assert len(of_type(c.log, VersionExpiryWarned)) == 1
    c.run(55)
    assert next_deadline(c.state) == 60
    events = c.tick(60)
    assert statuses(events, "n1") == [OFF]
    assert c.reasons("n1") == ("version 5.0 expired; update the node",)
    assert terms(events) == [(2, None)]
    c.heartbeat("n1", at=65)
    assert c.status("n1") is OFF and c.state.node("n1").session == 1  # it never went silent
    err = c.refused(StartUpgrade("n1", "5.1", 66), NodeOffline)
    assert "node 'n1' is Offline; bring it back before updating it" in str(err)
    events = c.heartbeat("n1", at=70, version="5.1", version_released_at=70.0)  # updated by hand
    assert statuses(events, "n1") == [ON] and terms(events) == [(3, "n1")]


def test_updates_roll_one_node_at_a_time() -> None:
    c = online(2)
    events = c.start_upgrade("n1", "5.1", at=20)
    assert statuses(events, "n1") == [NodeStatus.UPGRADING]
    assert c.reasons("n1") == ("installing version 5.1",)
    assert terms(events) == [(2, "n2")]  # the dispatcher was n1
    err = c.refused(StartUpgrade("n2", "5.1", 21), UpgradeInProgress)
    assert "node 'n1' is updating; updates roll one node at a time" in str(err)
    c.refused(StartUpgrade("n1", "5.2", 21), UpgradeInProgress)
    assert c.handle(StartUpgrade("n1", "5.1", 21)) == ()  # the same update: satisfied
    c.run(300, skip=["n1"])  # an updating node is not expected to heartbeat
    assert c.status("n1") is NodeStatus.UPGRADING
    events = c.finish_upgrade("n1", ok=True, at=301)
    assert of_type(events, UpgradeFinished)[0].version == "5.1"
    assert c.status("n1") is ON  # 1 vs 1: the newer version is the runtime's
    assert c.reasons("n2") == ("runs version 5.0; the runtime runs 5.1",)
    assert c.handle(FinishUpgrade("n1", True, 302)) == ()  # a repeated report: satisfied
    assert terms(c.start_upgrade("n2", "5.1", at=303)) == [(3, "n1")]
    c.finish_upgrade("n2", ok=True, at=304)
    c.heartbeat_all(310)
    assert [c.status("n1"), c.status("n2")] == [ON, ON]
    assert c.state.dispatcher == "n1"  # sticky


def test_start_upgrade_to_the_running_version_is_satisfied_and_names_are_checked() -> None:
    c = online(1)
    assert c.handle(StartUpgrade("n1", "5.0", 20)) == ()
    c.refused(StartUpgrade("n1", "", 20), InvalidCommand)
    c.refused(StartUpgrade("ghost", "5.1", 20), UnknownNode)
    c.refused(FinishUpgrade("ghost", True, 20), UnknownNode)


def test_a_failed_update_rolls_back() -> None:
    c = online(2)
    c.start_upgrade("n2", "5.1", at=20)
    events = c.finish_upgrade("n2", ok=False, at=25)
    (finished,) = of_type(events, UpgradeFinished)
    assert (finished.ok, finished.version) == (False, "5.0")
    assert finished.reason == "update to 5.1 failed; rolled back"
    assert statuses(events, "n2") == [ON]
    assert c.state.node("n2").metrics.version == "5.0"
    assert c.state.node("n2").upgrading_to is None


# --- time ------------------------------------------------------------------------------------

def test_time_going_backwards_is_refused_by_every_command() -> None:
    c = online(2, at=100)
    for command in (
        Tick(99), c.heartbeat_cmd("n1", at=99), c.register_cmd("n3", at=99),
        RemoveNode("n2", 99), StartUpgrade("n1", "5.1", 99),
        RegenerateAuthKey(c.new_key(KeyName.KEY1, 2), 99),
    ):
        err = c.refused(command, TimeWentBackwards)
        assert "drive the core with one non-decreasing clock" in str(err)


def test_ticks_yield_exactly_the_timeouts_due_and_none_earlier() -> None:
    c = online(2)
    c.heartbeat("n2", at=15)
    assert next_deadline(c.state) == 40  # n1 last spoke at 10
    assert c.tick(39.999) == ()
    events = c.tick(40)
    assert [(e.node, e.status) for e in of_type(events, NodeStatusChanged)] == [("n1", OFF)]
    assert terms(events) == [(2, "n2")]
    assert next_deadline(c.state) == 45
    assert c.tick(40) == ()  # repeating a tick: nothing more is due
    assert statuses(c.tick(45), "n2") == [OFF]
    assert next_deadline(c.state) is None  # nothing waits any more


def test_commands_settle_what_is_due_first() -> None:
    c = online(2)
    c.heartbeat("n2", at=20)
    events = c.heartbeat("n2", at=45)  # n1 has been silent since 10
    assert names(events) == ["NodeStatusChanged", "DispatcherChanged", "HeartbeatReceived"]
    assert c.status("n1") is OFF


def test_regenerating_a_key_settles_what_is_due() -> None:
    c = online(1)
    events = c.regenerate(KeyName.KEY1, at=100)
    assert names(events) == ["NodeStatusChanged", "DispatcherChanged", "AuthKeyRegenerated"]
    deadline = next_deadline(c.state)
    assert deadline is None or deadline > c.state.now


# --- dispatcher ------------------------------------------------------------------------------

def test_the_first_eligible_node_dispatches_and_keeps_the_role() -> None:
    c = Rig()
    c.register_n(3)
    c.heartbeat("n2", at=5)  # n1 and n3 are still Initializing
    assert (c.state.term, c.state.dispatcher) == (1, "n2")
    c.heartbeat_all(10)
    assert (c.state.term, c.state.dispatcher) == (1, "n2")  # sticky, not "earliest"


def test_failover_goes_to_the_earliest_registered_eligible_node() -> None:
    c = online(4)
    c.report("n2", control_channel_ok=False)
    c.heartbeat("n2", at=15)
    events = c.run(60, skip=["n1"])
    assert terms(events) == [(2, "n3")]
    assert of_type(events, DispatcherChanged)[0].reason == "n1 is Offline; n3 takes over"


def test_no_dispatcher_term_when_none_is_eligible_and_terms_only_grow() -> None:
    c = online(1)
    events = c.tick(40)
    assert terms(events) == [(2, None)]
    assert of_type(events, DispatcherChanged)[0].reason == "n1 is Offline; no node can dispatch"
    assert AnnounceDispatcher(2, None) in c.effects
    c.heartbeat("n1", at=50)
    assert (c.state.term, c.state.dispatcher) == (3, "n1")
    seen = [t for t, _ in terms(c.log)]
    assert seen == sorted(set(seen)) == [1, 2, 3]


def test_failover_on_upgrade_and_control_channel_loss() -> None:
    c = online(3)
    assert terms(c.start_upgrade("n1", "5.1", at=20)) == [(2, "n2")]
    assert terms(c.heartbeat("n2", at=21, control_channel_ok=False)) == [(3, "n3")]
    c.finish_upgrade("n1", ok=False, at=22)
    assert c.state.dispatcher == "n3"  # a returning node does not take the role back


# --- hibernation and fencing -----------------------------------------------------------------

def test_a_hibernating_dispatcher_returns_fenced_in_a_new_term() -> None:
    c = online(1)
    old = c.heartbeat_cmd("n1", at=10)
    assert c.state.node("n1").session == 1
    d = handle(c.state, c.heartbeat_cmd("n1", at=3_610))  # woke an hour later; no tick meanwhile
    assert names(d.events) == [
        "NodeStatusChanged", "DispatcherChanged", "NodeRejoined", "HeartbeatReceived",
        "NodeStatusChanged", "DispatcherChanged",
    ]
    went, gone, rejoined, _, back, new = d.events
    assert (went.status, back.status) == (OFF, ON)
    assert (gone.term, gone.node, new.term, new.node) == (2, None, 3, "n1")
    assert rejoined == NodeRejoined("n1", 2, 3_600, 3_610)
    assert d.effects == (
        AnnounceDispatcher(2, None), StartSession("n1", 2), AnnounceDispatcher(3, "n1"),
    )
    c.state = d.state
    c.sessions["n1"] = 2
    err = c.refused(Heartbeat("n1", 1, old.metrics, 3_620), StaleSession)
    assert "spoke in session 1, which ended; its session is 2" in str(err)
    assert names(c.heartbeat("n1", at=3_620)) == ["HeartbeatReceived"]


def test_a_hibernating_dispatcher_returns_without_a_new_term_when_another_took_over() -> None:
    c = online(2)
    c.run(100, skip=["n1"])
    assert (c.state.term, c.state.dispatcher) == (2, "n2")
    events = c.heartbeat("n1", at=105, session=1)
    assert names(events) == ["NodeRejoined", "HeartbeatReceived", "NodeStatusChanged"]
    assert (c.state.term, c.state.dispatcher) == (2, "n2")
    assert c.sessions["n1"] == 2
    c.refused(c.heartbeat_cmd("n1", at=110, session=1), StaleSession)


def test_the_heartbeat_that_rejoined_is_satisfied_when_repeated() -> None:
    c = online(2)
    c.run(100, skip=["n1"])
    command = c.heartbeat_cmd("n1", at=105)
    assert names(c.handle(command))[0] == "NodeRejoined"
    assert c.handle(command) == ()
    c.refused(c.heartbeat_cmd("n1", at=106, session=1), StaleSession)


# --- state handles ---------------------------------------------------------------------------

def test_an_evolved_state_handle_is_spent() -> None:
    c = online(1)
    before = c.state
    c.heartbeat("n1", at=20)
    for use in (lambda s: s.nodes, lambda s: s.copy(), lambda s: decide(s, Tick(30)),
                lambda s: next_deadline(s), lambda s: fold(s, ())):
        with pytest.raises(SpentState, match=r"call state\.copy\(\) before evolving"):
            use(before)
    assert repr(before) == "RuntimeState(<spent>)"
    assert "nodes=['n1']" in repr(c.state)


def test_a_decision_without_events_does_not_spend_the_state() -> None:
    c = online(1)
    before = c.state
    assert handle(before, Tick(10)).state is before
    assert before.nodes


def test_copy_branches_independently() -> None:
    c = online(2)
    branch = c.state.copy()
    assert branch == c.state
    events = c.run(100, skip=["n1"])
    assert branch != c.state and branch.dispatcher == "n1"
    assert fold(branch, events) == c.state


def test_reads_are_copies() -> None:
    c = online(1)
    node = c.state.node("n1")
    node.status = OFF
    c.state.nodes[0].session = 99
    assert c.status("n1") is ON and c.state.node("n1").session == 1


def test_a_refused_command_leaves_the_state_usable_and_equal() -> None:
    c = online(2)
    before = c.state.fingerprint()
    for command in (c.register_cmd("n1", machine="other"), c.heartbeat_cmd("n1", at=1)):
        with pytest.raises(Exception):  # noqa: B017 - Rig.refused checks the types
            handle(c.state, command)
    assert c.state.fingerprint() == before
    assert names(c.heartbeat("n1", at=20)) == ["HeartbeatReceived"]


def test_the_state_refolds_from_its_log() -> None:
    c = online(3)
    c.run(200, skip=["n3"])
    c.start_upgrade("n1", "5.1", at=201)
    c.finish_upgrade("n1", ok=True, at=205)
    c.run(400)
    assert fold(initial(), c.log) == c.state


@pytest.mark.parametrize(("bad", "message"), [
    # a typo of an exponent: nodes would never be found Offline (3e308 s overflows to inf)
    ({"heartbeat_interval_s": 1e308}, "heartbeat_interval_s must be a number of seconds "
                                      "above 0 and at most 86400"),
    ({"lock_duration_s": 1e9}, "lock_duration_s must be a number of seconds above 0 and at "
                               "most 86400"),
    ({"duplicate_window_s": 1e9}, "duplicate_window_s must be a number of seconds above 0 "
                                  "and at most 604800"),
])
def test_a_runtime_is_not_created_with_timings_beyond_their_bounds(
    bad: dict[str, float], message: str,
) -> None:
    c = Rig()
    fresh = Rig(seed=1)
    command = CreateRuntime(**{**_fields(fresh.create), "settings": RuntimeSettings(**bad)})
    c.state = initial()
    err = c.refused(command, InvalidSettings)
    assert message in str(err)


def test_a_log_from_before_the_bounds_still_reads() -> None:
    # Logs written before the upper bounds may hold a longer duplicate window: reading them
    # must not fail (the bounds are the creation's, not the value's).
    long_window = RuntimeSettings(duplicate_window_s=30 * 86400.0)
    assert decode_value(RuntimeSettings, encode_value(long_window)) == long_window


def test_settings_are_checked() -> None:
    for bad, message in (
        ({"heartbeat_interval_s": 0}, "heartbeat_interval_s must be a number of seconds above 0"),
        ({"lock_duration_s": float("inf")}, "lock_duration_s must be a number of seconds above 0"),
        ({"missed_heartbeats_offline": 0}, "missed_heartbeats_offline must be 1..100"),
        ({"max_nodes": 5}, "max_nodes must be 1..4 (the product allows at most four)"),
        ({"intranet_port": 0}, "intranet_port must be 1..65535"),
        ({"offline_expiry_s": 0}, "offline_expiry_s must be positive or None"),
        ({"version_warning_days": 365}, "version_warning_days must be >= 0 and below"),
    ):
        with pytest.raises(InvalidSettings, match=re.escape(message)):
            RuntimeSettings(**bad)  # type: ignore[arg-type]
    assert RuntimeSettings().offline_after_s == 30


def test_a_version_expiring_during_an_update_does_not_stall_the_deadlines() -> None:
    for warning_days in (90, 0):
        c = online(2, version_warning_days=warning_days)
        c.report("n1", version_released_at=100 - 365 * DAY_S)  # expires at t = 100
        c.heartbeat_all(20)
        c.start_upgrade("n1", "5.1", at=30)
        c.run(200)  # fails if a tick at a deadline changes nothing (the deadline never clears)
        assert c.status("n1") is NodeStatus.UPGRADING
        events = c.finish_upgrade("n1", ok=False, at=201)  # rolled back to the expired version
        assert statuses(events, "n1") == [OFF]
        assert c.reasons("n1") == ("version 5.0 expired; update the node",)


def test_an_expired_node_removed_by_expiry_no_longer_counts_for_the_others() -> None:
    c = online(2, offline_expiry_s=600)
    c.report("n1", version="6.0", version_released_at=-400 * DAY_S)
    c.heartbeat_all(20)  # n1 is Offline (expired) yet live: the runtime runs 6.0 (tie -> newer)
    assert c.reasons("n2") == ("runs version 5.0; the runtime runs 6.0",)
    c.run(610)
    events = c.tick(620)
    assert [type(e).__name__ for e in events][:1] == ["NodeRemoved"]
    assert statuses(events, "n2") == [ON]  # in the same decision, not at the next command
    assert c.tick(620) == ()


def test_updating_a_node_that_expires_at_that_moment_is_refused_as_unknown() -> None:
    c = online(2, offline_expiry_s=100)
    c.run(130, skip=["n2"])  # n2 Offline since 40; due for removal at 140
    c.now = 140
    err = c.refused(StartUpgrade("n2", "5.1", 140), UnknownNode)
    assert "node 'n2' was removed from runtime 'shir-test' at 140 s (offline for 100 s" in str(err)
