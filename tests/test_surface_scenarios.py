"""Sharing and proxy changes in the simulator, over 20 seeds each, checked on the event log."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from shir.adapters.cli import main
from shir.core import (
    AccessRevoked,
    JobCompleted,
    JobLeased,
    JobReleased,
    LinkedJobAccepted,
    ProxySettingsSaved,
    ReleaseReason,
    fold,
    initial,
)
from shir.core.codec import encode
from shir.core.monitoring import monitoring_view
from shir.sim.scenario import ScenarioError, load_scenario, parse_scenario
from shir.sim.world import RunResult, run

SEEDS = range(1, 21)


def _run(name: str, seed: int) -> RunResult:
    result = run(load_scenario(name), seed=seed)
    assert result.invariant_violations == [], (name, seed)
    assert result.expectations["failed"] == [], (name, seed)
    return result


@pytest.mark.parametrize("seed", SEEDS)
def test_shared_runtime_with_two_links_and_a_revoked_grant(seed: int) -> None:
    result = _run("shared-runtime", seed)
    log = result.log
    origin = {e.job_id: e.linked_runtime_id for e in log if isinstance(e, LinkedJobAccepted)}
    per_link = Counter(origin.values())
    assert per_link["lk-b"] > 0 and per_link["lk-c"] > 0  # both factories ran work here
    (revoked,) = [(i, e) for i, e in enumerate(log) if isinstance(e, AccessRevoked)]
    at, event = revoked
    assert (event.factory_id, event.links, event.at) == ("factory-c", ("lk-c",), 150.0)
    # no new work from factory-c after the revocation...
    assert not [e for e in log[at:] if isinstance(e, LinkedJobAccepted)
                and e.linked_runtime_id == "lk-c"]
    # ...while factory-b's link goes on, and every job of factory-c it had accepted finishes
    assert [e for e in log[at:] if isinstance(e, LinkedJobAccepted)
            and e.linked_runtime_id == "lk-b"]
    done = {e.token.job_id for e in log if isinstance(e, JobCompleted)}
    assert {j for j, link in origin.items() if link == "lk-c"} <= done
    # linked jobs run on the shared runtime's nodes
    nodes = {e.token.node for e in log if isinstance(e, JobLeased) and e.token.job_id in origin}
    assert nodes <= {"node-1", "node-2"} and nodes


def test_monitoring_view_of_a_recorded_shared_run_matches_its_log() -> None:
    result = _run("shared-runtime", 3)
    state = fold(initial(), result.log)
    view = monitoring_view(state)
    accepted = Counter(e.linked_runtime_id for e in result.log
                       if isinstance(e, LinkedJobAccepted))
    links = {lk.linked_runtime_id: lk for lk in view.links}
    assert set(links) == {"lk-b", "lk-c"}
    assert links["lk-b"].jobs_submitted == accepted["lk-b"]
    assert links["lk-c"].jobs_submitted == accepted["lk-c"]
    assert (links["lk-b"].status, links["lk-c"].status) == ("Active", "Revoked")
    assert links["lk-c"].revoked_at == 150.0
    assert links["lk-b"].jobs_running == links["lk-b"].jobs_queued == 0  # all drained
    assert [n.name for n in view.nodes] == ["node-1", "node-2"]
    assert view.queue_depth == view.running_jobs == 0
    assert "lk-c in factory factory-c: Revoked at 150 s" in result.monitoring


@pytest.mark.parametrize("seed", SEEDS)
def test_a_proxy_change_restarts_the_node_mid_run(seed: int) -> None:
    result = _run("proxy-change", seed)
    log = result.log
    (saved,) = [(i, e) for i, e in enumerate(log) if isinstance(e, ProxySettingsSaved)]
    at, event = saved
    assert (event.node, event.at, event.settings.address) == ("node-2", 120.0, "proxy.contoso.com")
    # the restart lost what node-2 ran: each of its live leases ended by expiry, none completed
    held: dict[str, object] = {}
    for e in log[:at]:
        if isinstance(e, JobLeased):
            held[e.token.job_id] = e.token
        elif isinstance(e, (JobCompleted, JobReleased)):
            held.pop(e.token.job_id, None)
    lost = {t for t in held.values() if t.node == "node-2"}  # type: ignore[attr-defined]
    ends = {e.token: e for e in log[at:] if isinstance(e, (JobCompleted, JobReleased))
            and e.token in lost}
    assert set(ends) == lost
    assert all(isinstance(e, JobReleased) and e.reason is ReleaseReason.EXPIRED
               for e in ends.values())
    # the secrets reached the core only sealed
    blob = b"".join(encode(e) for e in log)
    assert b"not-a-real-password" not in blob and b"svc-proxy" not in blob
    assert "custom proxy proxy.contoso.com:8888" in result.monitoring


def test_a_proxy_change_restarts_jobs_in_most_seeds() -> None:
    """The check above must not pass vacuously: node-2 usually has work when it restarts."""
    restarted = 0
    for seed in range(1, 6):
        log = _run("proxy-change", seed).log
        saved_at = next(i for i, e in enumerate(log) if isinstance(e, ProxySettingsSaved))
        restarted += any(isinstance(e, JobReleased) and e.token.node == "node-2"
                         for e in log[saved_at:])
    assert restarted >= 4


BASE = {"name": "x", "nodes": [{"name": "n1"}]}


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"links": [{"name": "lk"}]}, "links[0].factory: required"),
        ({"links": [{"name": "lk", "factory": "f", "granted_by_role": "Boss"}]},
         "links[0].granted_by_role: expected one of Owner"),
        ({"links": [{"name": "lk", "factory": "f", "colour": 1}]}, "links[0].colour: not a field"),
        ({"links": {"name": "lk"}}, "links: expected an array of tables"),
        ({"proxy_changes": [{"node": "n9", "at_s": 1}]}, "proxy_changes[0].node: expected one"),
        ({"proxy_changes": [{"node": "n1", "at_s": 1, "address": "p"}]}, "port from 1 to 65535"),
        ({"proxy_changes": [{"node": "n1", "at_s": 1, "mode": "pac"}]}, "none, system or custom"),
        ({"proxy_changes": [{"node": "n1", "at_s": -1}]}, "at_s: expected a time"),
    ],
)
def test_bad_links_and_proxy_changes_name_the_key(extra: dict[str, object], says: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario({**BASE, **extra}, "t.toml")
    assert says in str(info.value) and str(info.value).startswith("t.toml: ")


def test_a_refused_grant_is_counted_and_links_nothing() -> None:
    scenario = parse_scenario({
        **BASE, "duration_s": 60, "drain_s": 30,
        "links": [{"name": "lk", "factory": "f", "tenant": "elsewhere", "link_at_s": 2}],
    })
    result = run(scenario)
    assert result.refusals.get("OtherTenant") == 1
    assert result.refusals.get("AccessNotGranted") == 1  # the factory tried to link anyway
    assert not [e for e in result.log if isinstance(e, LinkedJobAccepted)]


def test_run_report_and_replay_show_the_monitoring_view(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    log = tmp_path / "run.events"
    assert main(["sim", "run", "shared-runtime", "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "monitoring\n  runtime shared-runtime" in out
    assert "lk-c in factory factory-c: Revoked at 150 s" in out
    assert main(["sim", "replay", str(log)]) == 0
    out = capsys.readouterr().out
    assert "node-2: Online, worker" in out and "lk-b in factory factory-b: Active" in out
    assert main(["sim", "replay", str(log), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)["monitoring"]
    assert view["status"] == "Online" and view["nodes"][0]["role"] == "dispatcher/worker"
    assert [lk["status"] for lk in view["links"]] == ["Active", "Revoked"]
    assert view["nodes"][0]["sent_bytes"] is None  # not reported: unavailable, not invented


def test_a_second_node_without_remote_access_is_refused_and_the_report_says_how(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    path = tmp_path / "two.toml"
    path.write_text('duration_s = 60\ndrain_s = 10\n[[nodes]]\nname = "node-1"\n'
                    '[[nodes]]\nname = "node-2"\njoin_at_s = 5\n', encoding="utf-8")
    assert main(["sim", "run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "refusals      RemoteAccessDisabled" in out
    assert ("not joined    node-2: node 'node-2' cannot join: remote access from intranet "
            "(TCP 8060) is off on node-1") in out
    assert "remote_access = true under its [[nodes]]" in out
    on = path.read_text(encoding="utf-8").replace('name = "node-1"\n',
                                                  'name = "node-1"\nremote_access = true\n')
    path.write_text(on, encoding="utf-8")
    assert main(["sim", "run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not joined" not in out and "node-2: Online" in out
