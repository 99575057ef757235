"""The node states users meet beyond the failover ones: InitializeFailed and NeedRegistration,
each with a reason a user can act on."""

from __future__ import annotations

import pytest
from rig import Rig, names

from shir.core import (
    Heartbeat,
    KeyName,
    NodeMetrics,
    NodeStatus,
    RuntimeSettings,
    SaveCredential,
    StartUpgrade,
)
from shir.core.errors import NodeOffline, UnknownNode
from shir.core.kernel import MAX_REMEMBERED_REMOVALS
from shir.core.keys import RegeneratedKey, WrongRuntimeKey
from shir.core.rules import local_status
from shir.core.snapshot import restore, snapshot_bytes


def test_initialize_failed_refuses_work_that_needs_the_node_up() -> None:
    c = Rig()
    c.register("n1", at=0)
    c.tick(30)
    assert c.status("n1") is NodeStatus.INITIALIZE_FAILED
    err = c.refused(SaveCredential("sql", 1, "n1", 31), NodeOffline)
    assert "is InitializeFailed" in str(err)
    assert "is InitializeFailed; bring it back" in str(c.refused(StartUpgrade("n1", "6", 31)))


def test_a_node_that_spoke_once_goes_offline_not_initialize_failed() -> None:
    c = Rig()
    c.register("n1", at=0)
    c.heartbeat("n1", at=5)
    c.tick(35)
    assert c.status("n1") is NodeStatus.OFFLINE


def test_a_node_removed_by_offline_expiry_that_speaks_again_needs_registration() -> None:
    c = Rig(RuntimeSettings(offline_expiry_s=600))
    c.register_n(2)
    c.heartbeat_all(10)
    c.run(700, skip=["n2"])
    assert c.state.node("n2") is None
    late = Heartbeat("n2", 1, NodeMetrics(remote_access=True), 701)
    err = c.refused(late, UnknownNode)
    assert str(err) == (
        "node 'n2' was removed from runtime 'shir-test' at 640 s (offline for 600 s "
        "(auto-expiry)): it needs registration; register it again with an auth key"
    )
    assert local_status(err) == (NodeStatus.NEED_REGISTRATION, str(err))
    # registering again clears the memory: it is a node like any other
    assert names(c.register("n2", at=702))[0] == "NodeRegistered"
    assert "n2" not in c.state.model().removed


def test_a_key_regenerated_before_the_node_registered_means_need_registration() -> None:
    c = Rig()
    old = c.key_text(KeyName.KEY1)
    c.regenerate(KeyName.KEY1, at=1)
    err = c.refused(c.register_cmd("n1", key=old, at=2), RegeneratedKey)
    status, reason = local_status(err)  # type: ignore[misc]
    assert status is NodeStatus.NEED_REGISTRATION and "copy the current key1" in reason
    other = c.new_key(KeyName.KEY1, 1, runtime_id="rt-other")
    err = c.refused(c.register_cmd("n1", key=other.text, at=3), WrongRuntimeKey)
    assert local_status(err) == (NodeStatus.NEED_REGISTRATION, str(err))


def test_refusals_that_do_not_touch_registration_have_no_local_status() -> None:
    c = Rig()
    c.register("n1", at=0)
    c.tick(30)
    assert local_status(c.refused(StartUpgrade("n1", "6", 31))) is None


def test_removals_are_remembered_boundedly_and_survive_a_snapshot() -> None:
    c = Rig(RuntimeSettings(max_nodes=1))
    for i in range(MAX_REMEMBERED_REMOVALS + 5):
        c.register(f"x{i}", at=float(2 * i))
        c.remove(f"x{i}", at=float(2 * i + 1))
    removed = c.state.model().removed
    assert len(removed) == MAX_REMEMBERED_REMOVALS
    assert list(removed)[-1] == f"x{MAX_REMEMBERED_REMOVALS + 4}" and "x0" not in removed
    assert restore(snapshot_bytes(c.state)) == c.state
    err = c.refused(Heartbeat("x20", 1, NodeMetrics(), 100), UnknownNode)
    assert "removed from runtime 'shir-test' at 41 s (removed by a user)" in str(err)
    err = c.refused(Heartbeat("x0", 1, NodeMetrics(), 100), UnknownNode)
    assert "is not registered" in str(err)  # forgotten: the generic message


@pytest.mark.parametrize("status", list(NodeStatus))
def test_every_status_is_in_the_generated_diagram(status: NodeStatus) -> None:
    from shir.core.rules import mermaid

    assert f" {status.value}" in mermaid()
