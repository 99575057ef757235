"""The monitoring view: a pure query over a runtime's state, checked field by field."""

from __future__ import annotations

import pytest
from rig import DAY_S, Rig

from shir.core import (
    AccessRole,
    DispatchJobs,
    FactoryRef,
    GrantAccess,
    LinkRuntime,
    NodeStatus,
    Principal,
    ProxyMode,
    ProxySettings,
    RevokeAccess,
    RuntimeSettings,
    RuntimeStatus,
    SaveProxySettings,
    SetConcurrencyLimit,
    SubmitJob,
    SubmitLinkedJob,
)
from shir.core.monitoring import (
    UNAVAILABLE,
    linked_view,
    monitoring_view,
    render,
    render_linked,
)
from shir.core.sharing import resource_id

OWNER = Principal("ada", AccessRole.OWNER)
SHARED = FactoryRef("factory-1", "t", "msi-1")


@pytest.fixture
def c() -> Rig:
    """Two nodes Online, n2 limited to 3 jobs, factories b and c linked, c revoked."""
    c = Rig.online(2, RuntimeSettings(version_lifetime_days=365, version_warning_days=90))
    c.handle(SetConcurrencyLimit("n2", 3, 2.0))
    rt = c.state.runtime
    assert rt is not None
    for f in ("b", "c"):
        c.handle(GrantAccess(SHARED, FactoryRef(f"factory-{f}", "t", f"msi-{f}"), OWNER, 3.0))
        c.handle(LinkRuntime(f"lk-{f}", f"factory-{f}", resource_id(rt), 3.0))
    for i in range(3):
        c.handle(SubmitLinkedJob("lk-b", f"b{i}", f"kb{i}", 4.0))
    c.handle(SubmitJob("own", "k-own", 4.0))
    c.handle(SubmitLinkedJob("lk-c", "c0", "kc0", 4.0))
    c.handle(DispatchJobs("n1", c.state.term, 5.0, max_jobs=3))
    c.handle(RevokeAccess("factory-c", OWNER, 6.0))
    return c


def test_runtime_fields(c: Rig) -> None:
    v = monitoring_view(c.state)
    assert (v.name, v.runtime_id, v.factory_id) == ("shir-test", "rt-1", "factory-1")
    assert v.resource_id == "/factories/factory-1/integrationRuntimes/rt-1"
    assert v.status is RuntimeStatus.ONLINE and v.version == "5.0"
    assert v.auto_update is None
    # n1: 4 cores, 8 GiB -> min(8, 8) = 8; n2 overridden to 3
    assert (v.capacity, v.available_capacity) == (11, 11)
    assert (v.running_jobs, v.queue_depth) == (3, 2)
    assert (v.dispatcher, v.term, v.at) == ("n1", 1, 6.0)


def test_node_fields(c: Rig) -> None:
    n1, n2 = monitoring_view(c.state).nodes
    assert (n1.name, n1.status, n1.reasons, n1.role) == ("n1", NodeStatus.ONLINE, (),
                                                         "dispatcher/worker")
    assert n2.role == "worker"
    assert (n1.version, n1.version_status) == ("5.0", "matches the runtime")
    assert (n1.registered_at, n1.last_connect_at, n1.offline_since) == (0.0, 1.0, None)
    assert (n1.cpu_pct, n1.available_memory_mb) == (0.0, 8192)
    assert (n1.running_jobs + n2.running_jobs, n1.job_limit, n2.job_limit) == (3, 8, 3)
    assert (n1.sent_bytes, n1.received_bytes, n1.last_update) == (None, None, None)  # never
    assert n1.remote_access and n1.proxy == "no proxy"


def test_links_show_both_sides(c: Rig) -> None:
    b, cc = monitoring_view(c.state).links
    assert (b.linked_runtime_id, b.factory_id, b.status, b.revoked_at) == (
        "lk-b", "factory-b", "Active", None)
    assert (b.jobs_submitted, b.jobs_running + b.jobs_queued) == (3, 3)
    assert (cc.status, cc.revoked_at, cc.jobs_submitted) == ("Revoked", 6.0, 1)
    lv = linked_view(c.state, "lk-c")
    assert (lv.status, lv.target_resource_id, lv.nodes) == (
        "Revoked", "/factories/factory-1/integrationRuntimes/rt-1", ("n1", "n2"))
    assert "target: shir-test" in render_linked(lv)
    with pytest.raises(KeyError, match="lk-z"):
        linked_view(c.state, "lk-z")


def test_offline_node_shows_since_when_and_why(c: Rig) -> None:
    c.run(60, skip=["n2"])
    v = monitoring_view(c.state)
    n2 = v.nodes[1]
    assert n2.status is NodeStatus.OFFLINE and n2.offline_since == 31.0
    assert n2.reasons == ("missed heartbeats for 30 s",)
    assert v.status is RuntimeStatus.LIMITED and v.available_capacity == 8
    text = render(v)
    assert "n2: Offline, worker" in text and "offline since 31 s" in text
    assert "why: missed heartbeats for 30 s" in text


def test_limited_node_names_the_check_that_failed(c: Rig) -> None:
    c.heartbeat("n2", at=7, control_channel_ok=False)
    n2 = monitoring_view(c.state).nodes[1]
    assert n2.status is NodeStatus.LIMITED and n2.reasons == ("control channel unreachable",)


def test_version_status_warns_then_expires() -> None:
    c = Rig()
    c.register("n1")
    c.report("n1", version_released_at=0.0)
    c.heartbeat_all(at=1)
    assert monitoring_view(c.state).nodes[0].version_status == "matches the runtime"
    c.heartbeat_all(at=300 * DAY_S)
    assert monitoring_view(c.state).nodes[0].version_status == "expires in 65 days: update soon"
    c.heartbeat_all(at=366 * DAY_S)
    assert monitoring_view(c.state).nodes[0].version_status == "expired: update the node"


def test_a_node_that_never_spoke_has_no_metrics_and_proxy_shows_without_secrets() -> None:
    c = Rig()
    c.register("n1", at=0)
    c.handle(SaveProxySettings("n1", ProxySettings(ProxyMode.CUSTOM, "p.contoso.com", 8080,
                                                   b"enc-u", b"enc-p"), 1.0))
    n1 = monitoring_view(c.state).nodes[0]
    assert (n1.cpu_pct, n1.available_memory_mb, n1.last_connect_at) == (None, None, None)
    assert n1.version_status == UNAVAILABLE
    text = render(monitoring_view(c.state))
    assert "custom proxy p.contoso.com:8080 (with user and password)" in text
    assert "enc-" not in text and "last connected never" in text


def test_the_view_is_a_pure_query(c: Rig) -> None:
    before = c.state.fingerprint()
    render(monitoring_view(c.state))
    assert c.state.fingerprint() == before


def test_render_of_an_empty_runtime_says_what_to_do() -> None:
    c = Rig()
    v = monitoring_view(c.state)
    assert v.status is RuntimeStatus.NEED_REGISTRATION
    assert "register a node with an auth key" in render(v)


def test_last_update_result_success_and_rollback() -> None:
    c = Rig()
    c.register_n(2, at=0)
    c.heartbeat_all(at=1)
    assert monitoring_view(c.state).nodes[0].last_update is None
    c.start_upgrade("n1", "5.1", at=2)
    c.finish_upgrade("n1", True, at=3)
    c.start_upgrade("n2", "5.1", at=4)
    c.finish_upgrade("n2", False, at=5)
    n1, n2 = monitoring_view(c.state).nodes
    assert n1.last_update == "updated to 5.1 at 3 s"
    assert n2.last_update == (
        "failed at 5 s and rolled back to 5.0: update to 5.1 failed; rolled back")
    assert "last update: updated to 5.1 at 3 s" in render(monitoring_view(c.state))
