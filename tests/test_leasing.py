"""Job leasing, rule by rule: submit, dispatch, limits, leases, effects, counters, scale advice.

Every refusal is checked through ``Rig.refused``, which also asserts that the state's
fingerprint did not change. The shared ``rig.Rig`` drives the core the way a host does: it keeps
the state handle, the event log and the effects, and each node's session and standing report.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rig import Rig, of_type

from shir.core import (
    AbandonJob,
    CompleteJob,
    ConcurrencyLimitSet,
    ConfirmResultsPublished,
    CredentialVersion,
    DeliverJob,
    DispatcherChanged,
    DispatchJobs,
    DispatchWanted,
    FailJob,
    JobCompleted,
    JobDeadLettered,
    JobLeased,
    JobReleased,
    JobResultsPublished,
    JobSubmitted,
    LeaseRenewed,
    LeaseToken,
    NodeRejoined,
    NodeRemoved,
    NodeStatus,
    PublishJobResult,
    ReleaseReason,
    RemoveNode,
    RenewLease,
    RuntimeSettings,
    ScaleThresholds,
    SetConcurrencyLimit,
    StaleLease,
    StopJob,
    SubmitJob,
    Tick,
    UnknownJob,
    concurrency_limit,
    default_limit,
    fold,
    handle,
    initial,
    job_stats,
    next_deadline,
    scale_advice,
    unpublished_results,
)
from shir.core.capacity import requests_wanted
from shir.core.errors import (
    InvalidCommand,
    RuntimeNotFound,
    StaleTerm,
    TimeWentBackwards,
    UnknownNode,
)
from shir.core.jobs import JobBook
from shir.core.leasing import LIMIT_RANGE, MAX_CONFIRMED, NotDispatcher
from shir.core.snapshot import restore, snapshot_bytes

VERSION = "5.0"
CONFIG = "cfg-a"
DB = "db"  # the credential (of one linked service) jobs need


def cred(version: int, credential_id: str = DB) -> CredentialVersion:
    return CredentialVersion(credential_id, version)


def placed(events: Iterable[object]) -> list[tuple[str, str]]:
    """(job, node) of each JobLeased, in order."""
    return [(e.token.job_id, e.token.node) for e in of_type(events, JobLeased)]


# --- submit ---------------------------------------------------------------------------------

def test_submit_queues_the_job_with_its_requirement() -> None:
    r = Rig.online()
    events = r.submit("j1", "k1", needs=(cred(2), cred(1, "other")), carried=("other",),
                      size_mb=12.5)
    assert events == (JobSubmitted("j1", "k1", (cred(2), cred(1, "other")), ("other",), 12.5,
                                   1.0),)
    book = r.state.jobs
    assert book.jobs["j1"].requirement == (cred(2),)  # the carried credential is not required
    assert r.queue() == ["j1"]
    assert job_stats(r.state).queued == 1


@pytest.mark.parametrize(("fields", "message"), [
    ({"job_id": ""}, "job_id must be 1-256 characters"),
    ({"job_id": "x" * 257}, "job_id must be 1-256 characters"),
    ({"job_id": 7}, "job_id must be 1-256 characters"),
    ({"idempotency_key": ""}, "idempotency_key must be 1-256 characters"),
    ({"idempotency_key": None}, "idempotency_key must be 1-256 characters"),
    ({"size_mb": -1.0}, "size_mb must be >= 0"),
    ({"size_mb": float("nan")}, "size_mb must be >= 0"),
    ({"size_mb": "big"}, "size_mb must be >= 0"),
    ({"needs": (cred(0),)}, "credential 'db' version must be >= 1"),
])
def test_submit_refuses_malformed_jobs(fields: dict[str, Any], message: str) -> None:
    r = Rig.online()
    command = attrs.evolve(SubmitJob("j1", "k1", 2.0), **fields)
    err = r.refused(command, InvalidCommand)
    assert message in str(err)


def test_submit_limits_are_inclusive() -> None:
    r = Rig.online()
    assert r.submit("x" * 256, "k" * 256, size_mb=0.0)


def test_submit_needs_a_runtime() -> None:
    with pytest.raises(RuntimeNotFound, match="send CreateRuntime first"):
        handle(initial(), SubmitJob("j1", "k1", 0.0))


def test_submit_refuses_time_going_backwards() -> None:
    r = Rig.online()
    r.refused(SubmitJob("j1", "k1", 0.5), TimeWentBackwards)


@pytest.mark.parametrize("phase", ["queued", "leased", "completed"])
def test_a_duplicate_key_yields_no_events(phase: str) -> None:
    r = Rig.online()
    r.submit("j1", "k1")
    if phase in ("leased", "completed"):
        r.dispatch()
    if phase == "completed":
        r.complete("j1", at=2.0)
    before = r.state.fingerprint()
    # the same submission again, and another job id with the same key: both duplicates
    assert r.handle(SubmitJob("j1", "k1", 3.0)) == ()
    assert r.handle(SubmitJob("j2", "k1", 3.0)) == ()
    assert r.state.fingerprint() == before
    assert job_stats(r.state).submitted == 1


def test_a_job_id_in_use_with_another_key_is_refused() -> None:
    r = Rig.online()
    r.submit("j1", "k1")
    err = r.refused(SubmitJob("j1", "k2", 2.0), InvalidCommand)
    assert "job id 'j1' is already in use by idempotency key 'k1'; use a new job id" in str(err)
    r.dispatch()  # leased: still in use
    r.refused(SubmitJob("j1", "k2", 2.0), InvalidCommand)


def test_a_completed_key_is_forgotten_after_the_duplicate_window() -> None:
    r = Rig.online(1, RuntimeSettings(duplicate_window_s=100.0))
    r.submit("j1", "k1", at=2.0)
    r.dispatch()
    r.complete("j1", at=5.0)
    for t in (25.0, 50.0, 75.0, 100.0):
        r.heartbeat_all(t)
    assert r.handle(SubmitJob("j2", "k1", 104.9)) == ()  # within the window: a duplicate
    # No job event happened since the completion (so nothing pruned the window yet), and
    # still the key is forgotten once the window has passed.
    assert "k1" in r.state.jobs.recent
    events = r.handle(SubmitJob("j2", "k1", 105.0))
    assert of_type(events, JobSubmitted) == [JobSubmitted("j2", "k1", (), (), 0.0, 105.0)]
    book = r.state.jobs
    assert "k1" not in book.recent
    assert book.active_keys == {"k1": "j2"}


# --- dispatch: who may dispatch -------------------------------------------------------------

def test_only_the_dispatcher_of_the_current_term_dispatches() -> None:
    r = Rig.online(2)
    r.submit("j1")
    assert (r.state.dispatcher, r.state.term) == ("n1", 1)
    err = r.refused(DispatchJobs("n2", 1, 2.0), NotDispatcher)
    assert "node 'n2' is not the dispatcher of term 1 ('n1' is)" in str(err)
    err = r.refused(DispatchJobs("n1", 2, 2.0), InvalidCommand)
    assert "term 2 has not begun (current term 1)" in str(err)
    r.refused(DispatchJobs("n9", 1, 2.0), UnknownNode)
    err = r.refused(DispatchJobs("n1", 1, 2.0, max_jobs=-1), InvalidCommand)
    assert "max_jobs must be >= 0" in str(err)
    # the control channel of n1 fails: n2 takes over in term 2, and term 1 is over
    r.report("n1", control_channel_ok=False)
    r.heartbeat("n1", 5.0)
    assert (r.state.dispatcher, r.state.term) == ("n2", 2)
    err = r.refused(DispatchJobs("n1", 1, 6.0), StaleTerm)
    assert "dispatched under term 1, which is over (term 2, dispatcher 'n2')" in str(err)
    r.refused(DispatchJobs("n2", 1, 6.0), StaleTerm)  # an old term is stale whoever sends it
    # n1 is Limited with its control channel down: its results could not reach the service,
    # so it is no worker either
    assert placed(r.handle(DispatchJobs("n2", 2, 6.0))) == [("j1", "n2")]


def test_dispatch_with_nothing_to_do_yields_no_events() -> None:
    r = Rig.online(2)
    assert r.handle(DispatchJobs("n1", 1, 2.0)) == ()
    r.submit("j1")
    assert r.handle(DispatchJobs("n1", 1, 2.0, max_jobs=0)) == ()


# --- dispatch: the load-aware rule ----------------------------------------------------------

def test_least_loaded_relative_to_limit_ties_to_earliest_registered() -> None:
    r = Rig.online(3)
    r.handle(SetConcurrencyLimit("n1", 4, 1.0))
    r.handle(SetConcurrencyLimit("n2", 2, 1.0))
    r.handle(SetConcurrencyLimit("n3", 4, 1.0))
    r.submit_n(12)
    one_by_one = []
    copy = r.state.copy()
    while leased := r.dispatch(max_jobs=1):
        one_by_one.extend(placed(leased))
    # loads (running / limit) after each step: ties go to the node registered first
    assert [n for _j, n in one_by_one] == [
        "n1", "n2", "n3", "n1", "n3", "n1", "n2", "n3", "n1", "n3",
    ]
    assert [j for j, _n in one_by_one] == [f"j{i}" for i in range(1, 11)]  # FIFO
    # one DispatchJobs fills every slot the same way
    r.state = copy
    assert placed(r.dispatch()) == one_by_one
    assert r.queue() == ["j11", "j12"]


def test_existing_leases_count_towards_load() -> None:
    r = Rig.online(2)
    r.submit_n(3)
    r.dispatch(max_jobs=1)  # j1 -> n1
    r.handle(SetConcurrencyLimit("n2", 2, 2.0))
    # n1 1/8 = 0.125 vs n2 0/2: n2; then n1 0.125 vs n2 0.5: n1
    assert placed(r.dispatch()) == [("j2", "n2"), ("j3", "n1")]


def test_fifo_across_requirement_queues() -> None:
    r = Rig.online(1)
    r.report("n1", credentials=(cred(1),))
    r.heartbeat("n1", 2.0)
    r.handle(SetConcurrencyLimit("n1", 1, 2.0))
    for job, needs in (("a", ()), ("b", (cred(1),)), ("c", ()), ("d", (cred(1),)), ("e", ())):
        r.submit(job, needs=needs)
    order = []
    while leased := r.dispatch():
        assert len(leased) == 1
        order.append(leased[0].token.job_id)
        r.complete(order[-1])
    assert order == ["a", "b", "c", "d", "e"]


def test_a_job_needing_a_version_nobody_holds_waits_while_others_run() -> None:
    r = Rig.online(2)
    r.report("n1", credentials=(cred(2),))
    r.report("n2", credentials=(cred(1),))
    r.heartbeat_all(2.0)
    r.submit("v3", needs=(cred(3),))  # first in line, but nobody holds version 3
    r.submit("v2", needs=(cred(2),))
    r.submit("plain")
    r.submit("carried", needs=(cred(3),), carried=(DB,))  # the credential travels with it
    assert placed(r.dispatch()) == [("v2", "n1"), ("plain", "n2"), ("carried", "n1")]
    assert r.queue() == ["v3"]
    assert r.dispatch() == []  # still nobody can take it
    r.report("n2", credentials=(cred(3),))
    r.heartbeat("n2", 3.0)
    assert placed(r.dispatch()) == [("v3", "n2")]


def test_a_newer_held_version_satisfies_an_older_need() -> None:
    r = Rig.online(2)
    r.report("n2", credentials=(cred(5),))
    r.heartbeat_all(2.0)
    r.submit("j", needs=(cred(4),))
    assert placed(r.dispatch()) == [("j", "n2")]


def test_workers_must_be_reachable_from_the_dispatcher() -> None:
    r = Rig.online(2)
    r.isolated.add("n1")  # n1 reaches nobody on the intranet port
    r.heartbeat("n1", 2.0)
    assert r.status("n1") is NodeStatus.LIMITED
    assert r.state.dispatcher == "n1"  # Limited still dispatches
    r.submit_n(4)
    assert placed(r.dispatch()) == [(f"j{i}", "n1") for i in range(1, 5)]  # itself only
    r.isolated.clear()
    r.heartbeat("n1", 3.0)
    r.submit_n(2, prefix="k")
    assert placed(r.dispatch()) == [("k1", "n2"), ("k2", "n2")]


def test_nodes_that_are_not_online_or_limited_get_no_work() -> None:
    r = Rig.online(2)
    r.register("n3")
    r.report("n2", config_hash="other")  # n2 differs from the majority (n1 and n3)
    r.heartbeat_all(2.0)
    assert r.status("n2") is NodeStatus.INACTIVE
    assert r.status("n3") is NodeStatus.ONLINE
    r.register("n4", at=2.0)
    assert r.status("n4") is NodeStatus.INITIALIZING
    r.submit_n(4)
    assert {n for _j, n in placed(r.dispatch())} == {"n1", "n3"}


def test_max_jobs_and_limits_bound_one_dispatch() -> None:
    r = Rig.online(2)
    r.submit_n(20)
    assert len(r.dispatch(max_jobs=3)) == 3
    assert len(r.dispatch()) == 13  # 8 + 8 slots
    assert r.dispatch() == []
    assert job_stats(r.state).queued == 4


def test_the_dispatcher_takes_requests_up_to_the_free_capacity() -> None:
    r = Rig.online(2)  # 8 + 8 slots
    assert requests_wanted(r.state, 32) == 16 and requests_wanted(r.state, 5) == 5
    r.submit_n(10)
    assert requests_wanted(r.state, 32) == 6  # queued jobs count against the free slots
    r.dispatch()
    assert requests_wanted(r.state, 32) == 6  # running ones too
    r.submit_n(10, prefix="more")
    assert requests_wanted(r.state, 32) == 0  # full: the rest wait in the channel


# --- limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("cores", "memory_mb", "limit"), [
    (4, 8192, 8),  # two per core, one per GiB
    (8, 8192, 8),  # memory-bound
    (2, 65536, 4),  # core-bound
    (1, 1023, 1),  # under 1 GiB: clamped up to 1
    (64, 1 << 20, 64),  # clamped down to 64
])
def test_default_limit_formula(cores: int, memory_mb: int, limit: int) -> None:
    assert default_limit(cores, memory_mb) == limit


def test_default_limit_applies_to_registered_nodes() -> None:
    r = Rig.online(1, cores=2, memory_mb=16384)
    assert concurrency_limit(r.state, "n1") == 4
    r.submit_n(6)
    assert len(r.dispatch()) == 4


@pytest.mark.parametrize("bad", [0, -1, 257, 1.5, "4", 10**9])
def test_set_limit_refuses_values_out_of_bounds(bad: Any) -> None:
    r = Rig.online(1)
    err = r.refused(SetConcurrencyLimit("n1", bad, 2.0), InvalidCommand)
    assert "concurrency limit for 'n1' must be 1..256 or None (default)" in str(err)


def test_set_limit_bounds_are_inclusive_and_named() -> None:
    assert LIMIT_RANGE == (1, 256)
    r = Rig.online(1)
    assert r.handle(SetConcurrencyLimit("n1", 1, 2.0)) == (ConcurrencyLimitSet("n1", 1, 2.0),)
    assert r.handle(SetConcurrencyLimit("n1", 256, 2.0)) == (
        ConcurrencyLimitSet("n1", 256, 2.0),)
    assert concurrency_limit(r.state, "n1") == 256
    assert r.handle(SetConcurrencyLimit("n1", 256, 3.0)) == ()  # already so
    r.refused(SetConcurrencyLimit("n9", 4, 3.0), UnknownNode)


def test_lowering_a_limit_below_running_drains_without_stopping() -> None:
    r = Rig.online(1)
    r.submit_n(6)
    assert len(r.dispatch()) == 6
    events = r.handle(SetConcurrencyLimit("n1", 2, 2.0))
    assert events == (ConcurrencyLimitSet("n1", 2, 2.0),)  # nothing released or stopped
    assert not of_type(r.effects[-1:], StopJob)
    assert job_stats(r.state).running == 6
    r.submit_n(3, prefix="k")
    assert r.dispatch() == []
    for job in ("j1", "j2", "j3", "j4"):
        r.complete(job)
        assert r.dispatch() == []  # 5, 4, 3, 2 running: not below 2 yet
    r.complete("j5")
    assert placed(r.dispatch()) == [("k1", "n1")]  # 1 running: one slot
    assert job_stats(r.state).running == 2


def test_none_restores_the_default_limit() -> None:
    r = Rig.online(1)
    assert r.handle(SetConcurrencyLimit("n1", None, 2.0)) == ()  # no override: satisfied
    r.handle(SetConcurrencyLimit("n1", 3, 2.0))
    assert concurrency_limit(r.state, "n1") == 3
    assert r.handle(SetConcurrencyLimit("n1", None, 3.0)) == (
        ConcurrencyLimitSet("n1", None, 3.0),)
    assert concurrency_limit(r.state, "n1") == 8
    assert r.state.jobs.limits == {}


def test_an_override_is_removed_with_its_node() -> None:
    r = Rig.online(2)
    r.handle(SetConcurrencyLimit("n2", 3, 2.0))
    events = r.handle(RemoveNode("n2", 3.0))
    assert [type(e) for e in events][:2] == [ConcurrencyLimitSet, NodeRemoved]
    assert events[0] == ConcurrencyLimitSet("n2", None, 3.0)
    assert r.state.jobs.limits == {}
    r.register("n2", at=4.0)  # a new node under the old name starts at its default
    assert concurrency_limit(r.state, "n2") == 8


# --- leases ---------------------------------------------------------------------------------

def test_a_lease_is_fenced_by_term_node_and_delivery() -> None:
    r = Rig.online(1)
    r.submit("j1")
    (leased,) = r.dispatch(at=2.0)
    assert leased == JobLeased(LeaseToken("j1", "n1", 1, 1), 62.0, 2.0)
    assert r.state.jobs.jobs["j1"].deliveries == 1


def test_renewal_extends_the_expiry() -> None:
    r = Rig.online(1, RuntimeSettings(lock_duration_s=20.0))
    r.submit("j1")
    (leased,) = r.dispatch(at=2.0)
    assert next_deadline(r.state) == 22.0
    assert r.handle(RenewLease(leased.token, 12.0)) == (LeaseRenewed(leased.token, 32.0, 12.0),)
    assert next_deadline(r.state) == 31.0  # n1's heartbeat deadline comes first now
    r.heartbeat("n1", 20.0)
    assert next_deadline(r.state) == 32.0
    assert not of_type(r.handle(Tick(22.0)), JobReleased)  # the old expiry passes harmlessly
    assert r.token("j1") == leased.token
    assert of_type(r.handle(Tick(32.0)), JobReleased)


def test_a_lease_expires_exactly_at_its_deadline() -> None:
    r = Rig.online(1, RuntimeSettings(lock_duration_s=20.0))
    r.submit("j1")
    (leased,) = r.dispatch(at=2.0)
    deadline = next_deadline(r.state)
    assert deadline == leased.expires_at == 22.0
    assert r.handle(Tick(21.999)) == ()
    events = r.handle(Tick(deadline))
    assert events == (JobReleased(leased.token, ReleaseReason.EXPIRED,
                                  "lease expired at 22 s without renewal", 22.0),)
    assert r.queue() == ["j1"]
    assert next_deadline(r.state) == 31.0  # only n1's heartbeat deadline is left
    (again,) = r.dispatch()
    assert again.token == LeaseToken("j1", "n1", 1, 2)


def test_renewing_at_the_expiry_is_too_late() -> None:
    r = Rig.online(1, RuntimeSettings(lock_duration_s=20.0))
    r.submit("j1")
    (leased,) = r.dispatch(at=2.0)
    r.refused(RenewLease(leased.token, 22.0), StaleLease)
    r.refused(CompleteJob(leased.token, 22.0), StaleLease)


def _command(verb: str, token: LeaseToken, at: float) -> Any:
    return {
        "renew": RenewLease(token, at),
        "complete": CompleteJob(token, at),
        "abandon": AbandonJob(token, at),
        "fail": FailJob(token, at),
    }[verb]


VERBS = ["renew", "complete", "abandon", "fail"]


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("how", ["other node", "old term", "next delivery", "old delivery",
                                 "after completion by a newer delivery"])
def test_a_stale_token_is_refused(verb: str, how: str) -> None:
    r = Rig.online(2)
    r.submit("j1")
    (leased,) = r.dispatch(at=2.0)
    live = leased.token
    if how == "other node":
        token = attrs.evolve(live, node="n2")
    elif how == "old term":
        token = attrs.evolve(live, term=0)
    elif how == "next delivery":
        token = attrs.evolve(live, delivery=2)
    else:
        r.handle(AbandonJob(live, 3.0))
        (again,) = r.dispatch(at=3.0)
        if how == "after completion by a newer delivery":
            r.handle(CompleteJob(again.token, 4.0))
        token = live
    err = r.refused(_command(verb, token, 5.0), StaleLease)
    assert f"cannot {verb} job 'j1'" in str(err)
    assert "is no longer its live lease" in str(err)
    assert "drop the work" in str(err)


@pytest.mark.parametrize("verb", VERBS)
def test_an_unknown_job_is_refused(verb: str) -> None:
    r = Rig.online(1)
    err = r.refused(_command(verb, LeaseToken("nope", "n1", 1, 1), 2.0), UnknownJob)
    assert "no queued or running job 'nope'" in str(err)


@pytest.mark.parametrize("verb", VERBS)
def test_a_queued_job_has_no_live_lease(verb: str) -> None:
    r = Rig.online(1)
    r.submit("j1")
    r.refused(_command(verb, LeaseToken("j1", "n1", 1, 1), 2.0), StaleLease)


def test_completion_is_idempotent_with_the_same_token() -> None:
    r = Rig.online(1)
    r.submit("j1", "k1")
    (leased,) = r.dispatch()
    d = handle(r.state, CompleteJob(leased.token, 3.0))
    assert d.events == (JobCompleted(leased.token, "k1", 3.0),)
    assert d.effects == (PublishJobResult("j1", "k1", "completed", ""),)
    r.state = d.state
    before = r.state.fingerprint()
    assert r.handle(CompleteJob(leased.token, 4.0)) == ()
    assert r.handle(CompleteJob(leased.token, 4.0)) == ()
    assert r.state.fingerprint() == before
    assert job_stats(r.state).completed == 1
    # other verbs with the completing token are refused: the lease is over
    r.refused(RenewLease(leased.token, 4.0), StaleLease)
    r.refused(AbandonJob(leased.token, 4.0), StaleLease)


@pytest.mark.parametrize(("verb", "reason"), [("abandon", ReleaseReason.ABANDONED),
                                              ("fail", ReleaseReason.FAILED)])
def test_abandon_and_fail_requeue_at_the_head(verb: str, reason: ReleaseReason) -> None:
    r = Rig.online(1)
    r.handle(SetConcurrencyLimit("n1", 1, 1.0))
    r.submit_n(3)
    (first,) = r.dispatch()
    assert first.token.job_id == "j1"
    command = _command(verb, first.token, 3.0)
    events = r.handle(attrs.evolve(command, reason="source locked"))
    assert events == (JobReleased(first.token, reason, "source locked", 3.0),)
    assert r.queue() == ["j1", "j2", "j3"]  # at the head, ahead of older-queued j2
    (again,) = r.dispatch()
    assert again.token == LeaseToken("j1", "n1", 1, 2)
    assert r.state.jobs.jobs["j1"].deliveries == 2
    # without a reason, the detail says who gave it back
    events = r.handle(_command(verb, again.token, 4.0))
    assert of_type(events, JobReleased)[0].detail == f"{reason.value} by n1"


@pytest.mark.parametrize(("how", "reason"), [
    ("fail", ReleaseReason.FAILED),
    ("abandon", ReleaseReason.ABANDONED),
    ("expire", ReleaseReason.EXPIRED),
])
def test_dead_lettered_after_max_deliveries(how: str, reason: ReleaseReason) -> None:
    r = Rig.online(1, RuntimeSettings(max_deliveries=3, lock_duration_s=5.0))
    r.submit("j1", "k1")
    t = 2.0
    for delivery in (1, 2, 3):
        (leased,) = r.dispatch(at=t)
        assert leased.token.delivery == delivery
        if how == "expire":
            t = leased.expires_at
            d = handle(r.state, Tick(t))
        else:
            t += 1.0
            d = handle(r.state, attrs.evolve(_command(how, leased.token, t), reason="boom"))
        r.state = d.state
        r.log.extend(d.events)
    assert d.events[0] == JobDeadLettered(
        leased.token, "k1", reason,
        ("boom" if how != "expire" else f"lease expired at {t:g} s without renewal")
        + "; delivered 3 times (max 3)", t,
    )
    assert d.effects == (
        StopJob(leased.token, d.events[0].detail),
        PublishJobResult("j1", "k1", "dead_lettered", d.events[0].detail),
    )
    stats = job_stats(r.state)
    assert (stats.queued, stats.running, stats.dead_lettered, stats.released) == (0, 0, 1, 2)
    assert r.state.jobs.jobs == {}
    r.refused(CompleteJob(leased.token, t), UnknownJob)


def test_finished_results_stay_unpublished_until_a_host_confirms_them() -> None:
    r = Rig.online(1, RuntimeSettings(max_deliveries=1))
    r.submit_n(3)
    a, b, _queued = r.dispatch()
    r.handle(CompleteJob(a.token, 3.0))
    r.handle(FailJob(b.token, 3.0, reason="boom"))  # its only delivery: dead-lettered
    detail = "boom; delivered 1 times (max 1)"
    assert unpublished_results(r.state) == (
        PublishJobResult("j1", "key-j1", "completed", ""),
        PublishJobResult("j2", "key-j2", "dead_lettered", detail),
    )
    assert restore(snapshot_bytes(r.state)) == r.state  # a restarted host sees them too
    events = r.handle(ConfirmResultsPublished(("j1", "j3", "nope", "j1"), 4.0))
    assert events == (JobResultsPublished(("j1",), 4.0),)  # only what is finished, once
    assert unpublished_results(r.state) == (
        PublishJobResult("j2", "key-j2", "dead_lettered", detail),)
    assert r.handle(ConfirmResultsPublished(("j1",), 5.0)) == ()  # satisfied already
    r.handle(ConfirmResultsPublished(("j2",), 5.0))
    assert unpublished_results(r.state) == ()
    assert fold(initial(), r.log) == r.state


def test_results_no_host_confirms_leave_after_the_duplicate_window() -> None:
    # No host ever confirms (one without a channel): the state stays bounded all the same.
    window_s, step_s = 160.0, 10.0
    r = Rig.online(1, RuntimeSettings(duplicate_window_s=window_s, max_deliveries=1,
                                      heartbeat_interval_s=5000.0, lock_duration_s=3000.0))
    t = 2.0
    for i in range(1, 101):  # every step_s one job ends: completed, or dead-lettered
        r.submit(f"j{i}", at=t)
        (leased,) = r.dispatch(at=t)
        end = CompleteJob(leased.token, t + 1) if i % 2 else FailJob(leased.token, t + 1)
        r.handle(end)
        listed = unpublished_results(r.state)
        assert len(listed) <= window_s * (1 + 1 / 16) / step_s + 1
        t += step_s
    listed = unpublished_results(r.state)
    assert listed[-1].job_id == "j100" and listed[0].job_id != "j1"
    assert {p.outcome for p in listed} == {"completed", "dead_lettered"}
    assert fold(initial(), r.log) == r.state  # pruning is part of folding: replay agrees


@pytest.mark.parametrize("job_ids", [["j1"], ("j1", 2), ("j",) * (MAX_CONFIRMED + 1)])
def test_a_malformed_confirmation_is_refused(job_ids: Any) -> None:
    r = Rig.online(1)
    err = r.refused(ConfirmResultsPublished(job_ids, 2.0), InvalidCommand)
    assert "job_ids must be a tuple" in str(err)


def test_default_max_deliveries_is_ten() -> None:
    assert RuntimeSettings().max_deliveries == 10
    r = Rig.online(1)
    r.submit("j1")
    for delivery in range(1, 11):
        (leased,) = r.dispatch()
        assert leased.token.delivery == delivery
        events = r.handle(FailJob(leased.token, r.now))
        assert isinstance(events[0], JobDeadLettered if delivery == 10 else JobReleased)


def test_an_offline_node_loses_its_leases_and_the_jobs_go_elsewhere() -> None:
    r = Rig.online(2)
    r.submit_n(4)
    assert placed(r.dispatch()) == [("j1", "n1"), ("j2", "n2"), ("j3", "n1"), ("j4", "n2")]
    lost = r.tokens("n2")
    r.heartbeat_all(11.0, skip=["n2"])
    r.heartbeat_all(21.0, skip=["n2"])
    events = r.handle(Tick(31.0))  # n2 silent for 30 s
    assert r.status("n2") is NodeStatus.OFFLINE
    assert of_type(events, JobReleased) == [
        JobReleased(t, ReleaseReason.NODE_LOST, "node n2 went Offline", 31.0) for t in lost
    ]
    assert of_type(r.effects, StopJob)[-2:] == [
        StopJob(t, "node n2 went Offline") for t in lost
    ]
    assert placed(r.dispatch()) == [("j2", "n1"), ("j4", "n1")]
    assert [r.token(j).delivery for j in ("j2", "j4")] == [2, 2]


def test_a_removed_node_loses_its_leases() -> None:
    r = Rig.online(2)
    r.submit_n(2)
    r.dispatch()
    lost = r.token("j2")
    events = r.handle(RemoveNode("n2", 3.0))
    assert of_type(events, JobReleased) == [
        JobReleased(lost, ReleaseReason.NODE_LOST, "node n2 was removed", 3.0)]
    assert placed(r.dispatch()) == [("j2", "n1")]


def test_a_node_registering_again_from_its_machine_loses_the_leases_of_its_old_process() -> None:
    # one host per machine: a registration of a registered node from its own machine means its
    # host started anew, so the jobs its old process ran are given back now, not after the lock
    r = Rig.online(3)
    r.submit_n(2)
    r.dispatch()
    holders = r.state.jobs.node_leases
    lost = r.token("j2")
    busy = lost.node
    idle = next(n for n in ("n1", "n2", "n3") if not holders.get(n))
    events = r.handle(r.register_cmd(busy, at=3.0))
    assert of_type(events, JobReleased) == [JobReleased(
        lost, ReleaseReason.NODE_LOST,
        f"node {busy} started again (registered anew from its machine)", 3.0)]
    assert r.status(busy) is NodeStatus.ONLINE  # still a member, same session
    assert [j for j, _n in placed(r.dispatch())] == ["j2"]  # its new process may take it
    assert r.token("j2").delivery == 2
    assert r.handle(r.register_cmd(idle, at=4.0)) == ()  # nothing held: satisfied as before


def test_a_node_back_from_hibernation_is_fenced() -> None:
    r = Rig.online(3)
    r.submit_n(3)
    r.dispatch()
    old = r.token("j1")  # n1 dispatches (term 1) and runs j1
    assert old.node == "n1"
    for t in (11.0, 21.0, 31.0):  # n1 hibernates; the others heartbeat
        events = r.heartbeat_all(t, skip=["n1"])
    assert r.status("n1") is NodeStatus.OFFLINE
    assert of_type(events, DispatcherChanged)[0].term == 2
    assert r.state.dispatcher == "n2"
    assert of_type(events, JobReleased)[0].token == old
    (moved,) = r.dispatch(at=32.0)
    assert moved.token == LeaseToken("j1", "n2", 2, 2)
    # n1 wakes up: it rejoins under a new session, but its old work and term are over
    events = r.heartbeat("n1", 40.0)
    assert of_type(events, NodeRejoined)[0].session == 2
    assert r.status("n1") is NodeStatus.ONLINE
    assert r.state.dispatcher == "n2"
    err = r.refused(CompleteJob(old, 40.0), StaleLease)
    assert "delivery 1 to n1 in term 1 is no longer its live lease" in str(err)
    r.refused(RenewLease(old, 40.0), StaleLease)
    r.refused(DispatchJobs("n1", 1, 40.0), StaleTerm)
    r.complete("j1", 41.0)
    r.refused(CompleteJob(old, 42.0), StaleLease)  # even after j1 completed elsewhere


def test_a_node_back_from_hibernation_before_anyone_noticed_is_fenced() -> None:
    r = Rig.online(2)
    r.submit_n(2)
    r.dispatch()
    old = r.token("j1")
    r.heartbeat_all(20.0, skip=["n1"])
    # n1 returns at 45 s and, before heartbeating, reports j1 done: nobody ticked in between,
    # but the decision settles time first, so n1 is Offline and its lease over
    r.refused(CompleteJob(old, 45.0), StaleLease)
    r.refused(DispatchJobs("n1", 1, 45.0), StaleTerm)
    events = r.handle(Tick(45.0))
    assert of_type(events, JobReleased)[0].reason is ReleaseReason.NODE_LOST


# --- effects --------------------------------------------------------------------------------

def test_effects_deliver_each_lease_and_stop_each_release() -> None:
    r = Rig.online(2)
    r.submit_n(3)
    d = handle(r.state, DispatchJobs("n1", 1, 2.0))
    r.state = d.state
    leased = of_type(d.events, JobLeased)
    assert d.effects == tuple(DeliverJob(e.token, e.expires_at) for e in leased)
    d = handle(r.state, AbandonJob(leased[0].token, 3.0, "busy"))
    # the job is queued again: its dispatcher is told to dispatch
    assert d.effects == (StopJob(leased[0].token, "busy"), DispatchWanted("n1", 1))
    r.state = d.state
    d = handle(r.state, CompleteJob(leased[1].token, 3.0))
    assert d.effects == (PublishJobResult("j2", "key-j2", "completed", ""), DispatchWanted("n1", 1))
    r.state = d.state
    d = handle(r.state, RemoveNode("n1", 4.0))  # j3 was on n1
    released = of_type(d.events, JobReleased)
    assert [e.token.job_id for e in released] == ["j3"]
    assert [fx for fx in d.effects if isinstance(fx, StopJob)] == [
        StopJob(e.token, e.detail) for e in released
    ]


# --- counters, capacity, advice --------------------------------------------------------------

def test_job_stats_counts_and_capacity() -> None:
    r = Rig.online(2)
    assert job_stats(r.state).capacity == 16
    r.submit_n(5)
    leased = r.dispatch(max_jobs=3)
    r.handle(CompleteJob(leased[0].token, 2.0))
    r.handle(AbandonJob(leased[1].token, 2.0))
    stats = job_stats(r.state)
    assert (stats.queued, stats.running, stats.submitted, stats.completed, stats.dead_lettered,
            stats.released) == (3, 1, 5, 1, 0, 1)
    r.handle(SetConcurrencyLimit("n2", 3, 2.0))
    assert job_stats(r.state).capacity == 11
    r.heartbeat_all(25.0, skip=["n2"])
    r.handle(Tick(31.0))
    assert job_stats(r.state).capacity == 8  # Offline nodes add nothing


def test_scale_advice() -> None:
    r = Rig.online(2)
    assert scale_advice(r.state) == ()  # idle and unsaturated: nothing to say
    # n1: CPU high and memory low -> add a node
    r.report("n1", cpu_pct=92.0, available_memory_mb=800)
    r.heartbeat("n1", 2.0)
    (advice,) = scale_advice(r.state)
    assert (advice.kind, advice.node, advice.suggested_limit) == ("scale_out", "n1", None)
    assert "add a node" in advice.reason
    # thresholds are configurable
    assert scale_advice(r.state, ScaleThresholds(cpu_high_pct=95.0)) == ()
    assert scale_advice(r.state, ScaleThresholds(memory_low_ratio=0.05)) == ()
    # n2 saturated while idle -> raise its limit
    r.report("n1", cpu_pct=60.0, available_memory_mb=4096)
    r.heartbeat("n1", 3.0)
    r.handle(SetConcurrencyLimit("n2", 3, 3.0))
    r.handle(SetConcurrencyLimit("n1", 1, 3.0))
    r.submit_n(4)
    r.dispatch()
    r.report("n2", cpu_pct=10.0, available_memory_mb=6000)
    r.heartbeat("n2", 4.0)
    (advice,) = scale_advice(r.state)  # n1 is saturated too, but its CPU is not idle
    assert (advice.kind, advice.node, advice.suggested_limit) == ("scale_up", "n2", 6)
    assert "3/3 jobs running" in advice.reason
    assert scale_advice(r.state, ScaleThresholds(cpu_idle_pct=5.0)) == ()
    assert scale_advice(r.state, ScaleThresholds(memory_idle_ratio=0.9)) == ()
    assert {a.node for a in scale_advice(r.state, ScaleThresholds(cpu_idle_pct=70.0))} == {
        "n1", "n2"}


def test_scale_up_suggestion_stays_within_bounds() -> None:
    r = Rig.online(1, cores=64, memory_mb=1 << 20)
    r.handle(SetConcurrencyLimit("n1", 200, 2.0))
    r.report("n1", available_memory_mb=1 << 19)
    r.heartbeat("n1", 2.0)
    r.submit_n(200)
    r.dispatch()
    (advice,) = scale_advice(r.state)
    assert advice.suggested_limit == LIMIT_RANGE[1]


def test_no_advice_for_nodes_that_are_not_up() -> None:
    r = Rig.online(2)
    r.report("n2", cpu_pct=99.0, available_memory_mb=10)
    r.heartbeat("n2", 2.0)
    assert [a.node for a in scale_advice(r.state)] == ["n2"]
    r.heartbeat_all(25.0, skip=["n2"])
    r.handle(Tick(32.0))
    assert scale_advice(r.state) == ()


# --- bounded state --------------------------------------------------------------------------

def test_finished_jobs_leave_counters_not_records() -> None:
    window = 100.0
    r = Rig.online(1, RuntimeSettings(duplicate_window_s=window))
    n = 0
    for step in range(200):  # 1000 jobs over 1000 s, ten windows
        t = 2.0 + 5.0 * step
        r.heartbeat("n1", t)
        for _ in range(5):
            n += 1
            r.submit(f"j{n}", at=t)
        for leased in r.dispatch():
            r.handle(CompleteJob(leased.token, t))
    book = r.state.jobs
    assert (book.jobs, book.leases, book.queues, book.node_leases, book.active_keys) == (
        {}, {}, {}, {}, {})
    assert book.next_expiry() is None and not book.expiring
    # only keys completed within the last window (plus the 1/16 pruning slack) remain
    last = r.now
    slack = window / 16
    assert 5 * int(window / 5.0) <= len(book.recent) <= 5 * int((window + slack) / 5.0 + 1)
    assert all(last - at < window + slack for _token, at in book.recent.values())
    assert set(book.recent_jobs.values()) == {t for t, _at in book.recent.values()}
    stats = job_stats(r.state)
    assert (stats.submitted, stats.completed, stats.queued, stats.running) == (n, n, 0, 0)


def test_a_decision_never_changes_the_state_it_is_given() -> None:
    r = Rig.online(2)
    r.submit_n(3)
    branch = r.state.copy()
    before = r.state.fingerprint()
    d = handle(r.state, DispatchJobs("n1", 1, 2.0))
    assert branch.fingerprint() == before
    assert len(of_type(d.events, JobLeased)) == 3
    assert fold(branch, d.events).fingerprint() == d.state.fingerprint()


# --- the expiry order ------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(("grant", "renew", "end")), st.integers(0, 7),
                          st.sampled_from((1.0, 2.0, 2.0, 3.0, 5.0, 8.0))), max_size=40),
       st.sampled_from((0.0, 2.0, 3.0, 4.0, 9.0)))
def test_expiry_order_matches_the_live_leases(ops: list[tuple[str, int, float]],
                                              at: float) -> None:
    # Expiries in any order (a restored snapshot, or ties): the book's answers are those of
    # the live leases themselves, earliest first and ties by job id.
    book = JobBook()
    for op, i, expires_at in ops:
        job_id = f"j{i}"
        live = book.leases.get(job_id)
        if op == "grant" and live is None:
            book._lease(LeaseToken(job_id, "n1", 1, 1), expires_at)
        elif op == "renew" and live is not None:
            live.expires_at = expires_at
            book._expire_at(job_id, expires_at)
        elif op == "end" and live is not None:
            book._unlease(job_id)
    leases = sorted(book.leases.values(), key=lambda lz: (lz.expires_at, lz.token.job_id))
    assert book.next_expiry() == (leases[0].expires_at if leases else None)
    assert book.expired(at) == [lz for lz in leases if lz.expires_at <= at]
    assert list(book.copy().expiring.items()) == list(book.expiring.items())


@pytest.mark.parametrize("field", ["job_id", "idempotency_key"])
def test_a_job_id_or_key_that_cannot_be_stored_is_refused(field: str) -> None:
    # A JSON "\udce9" escape in a factory's request decodes to a lone surrogate: decided, it
    # would fail the store's encoding in the host instead of being refused.
    r = Rig.online(1)
    fields = {"job_id": "j1", "idempotency_key": "k1", field: "caf\udce9"}
    err = r.refused(SubmitJob(fields["job_id"], fields["idempotency_key"], 2.0), InvalidCommand)
    assert f"{field} 'caf\\udce9' is not UTF-8 text" in str(err)
    r.submit("café", at=3.0)  # text beyond ASCII is fine
