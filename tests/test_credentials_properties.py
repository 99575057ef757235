"""Credential sync over random interleavings (Hypothesis): convergence, and no stale credential.

A run starts with three Online nodes and plays a random schedule of: saving the next version of
a credential on some node, a node going silent (crash, hibernation, partition: it neither
heartbeats nor answers), a silent node coming back, a fourth node joining, time passing (the
nodes that are up heartbeat every 10 s and the host ticks at every deadline), jobs submitted
needing the latest version of a credential (some carrying it), and dispatch rounds.

The host is cooperative (``CredCluster(cooperative=True)``): a ``SealCredentialFor`` is answered
with ``ShareCredential`` (a fake envelope) unless the holder is down, and a ``DeliverCredential``
makes the target report the version in its next heartbeat unless the target is down.

Checked:

- no stale credential served: every ``JobLeased`` goes to a node whose reported holding meets the
  job's requirement (checked as each lease is decided);
- the host is never refused while answering a sync effect at once;
- convergence: once every node is up and a few heartbeat rounds (past the sync timeout) pass,
  every node is Online, holds the latest version of every credential, and no sync is
  outstanding;
- the state is bounded (one entry per credential, at most one sync per credential and node) and
  equals a fresh fold of the log and its snapshot.

Set SHIR_CREDENTIAL_EXAMPLES to run more (or fewer) examples than the default 300.
"""

from __future__ import annotations

import contextlib
import os

from credential_helpers import CredCluster
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shir.core import (
    CredentialVersion,
    DispatchJobs,
    NodeStatus,
    SubmitJob,
    credential_status,
    fold,
    initial,
)
from shir.core.errors import NodeOffline
from shir.core.snapshot import restore, snapshot_bytes

EXAMPLES = int(os.environ.get("SHIR_CREDENTIAL_EXAMPLES", "300"))
NODES = ("n1", "n2", "n3", "n4")
CREDENTIALS = ("sql-1", "ora-2")

nodes = st.sampled_from(NODES)
creds = st.sampled_from(CREDENTIALS)
step = st.one_of(
    st.tuples(st.just("save"), creds, nodes),
    st.tuples(st.just("save"), creds, nodes),
    st.tuples(st.just("silence"), nodes),
    st.tuples(st.just("silence"), nodes),
    st.tuples(st.just("wake"), nodes),
    st.tuples(st.just("join"), st.just("n4")),
    st.tuples(st.just("pass"), st.floats(1, 45)),
    st.tuples(st.just("pass"), st.floats(1, 45)),
    st.tuples(st.just("pass"), st.floats(1, 15)),
    st.tuples(st.just("job"), creds, st.booleans()),
    st.tuples(st.just("job"), creds, st.booleans()),
    st.tuples(st.just("dispatch"), st.just("")),
)
steps = st.lists(step, min_size=8, max_size=40)


class Run:
    def __init__(self) -> None:
        self.c = CredCluster.online(3, cooperative=True, check_caches=True)
        self.jobs = 0

    def registered(self, node: str) -> bool:
        return self.c.state.node(node) is not None

    def step(self, kind: str, *args: object) -> None:
        c = self.c
        if kind == "save":
            cid, node = str(args[0]), str(args[1])
            if not self.registered(node):
                return
            latest = credential_status(c.state).latest_version(cid) or 0
            with contextlib.suppress(NodeOffline):  # the only refusal the next version may meet
                c.save(cid, latest + 1, node, at=c.now + 0.5)
        elif kind == "silence" and self.registered(str(args[0])):
            c.silence(str(args[0]))
        elif kind == "wake":
            c.wake(str(args[0]))
        elif kind == "join" and not self.registered("n4"):
            c.register("n4", at=c.now + 0.5)
        elif kind == "pass":
            c.run_up(c.now + float(args[0]))  # type: ignore[arg-type]
            self.step("dispatch")  # the dispatcher polls its queue
        elif kind == "job":
            cid, carried = str(args[0]), bool(args[1])
            latest = credential_status(c.state).latest_version(cid)
            if latest is None:
                return
            self.jobs += 1
            c.handle(SubmitJob(
                f"j{self.jobs}", f"k{self.jobs}", c.now, needs=(CredentialVersion(cid, latest),),
                carried=(cid,) if carried else (),
            ))
            self.step("dispatch")
        elif kind == "dispatch":
            dispatcher = c.state.dispatcher
            if dispatcher is not None and dispatcher not in c.down:
                c.handle(DispatchJobs(dispatcher, c.state.term, c.now))

    def converge(self) -> None:
        c = self.c
        for node in NODES:
            c.wake(node)
        c.run_up(c.now + 80)  # past the offline and sync timeouts, a few heartbeat rounds
        st = credential_status(c.state)
        assert st.converged and st.behind == () and st.syncs == (), st
        for n in c.state.nodes:
            assert n.status is NodeStatus.ONLINE, (n.name, n.status, n.reasons)
            held = {cv.credential_id: cv.version for cv in n.metrics.credentials}
            for cv in st.latest:
                assert held.get(cv.credential_id, 0) == cv.version, (n.name, held, st.latest)

    def check_state(self) -> None:
        c = self.c
        m = c.state.model()
        assert len(m.credentials) <= len(CREDENTIALS)
        assert len(m.syncs) <= len(CREDENTIALS) * len(m.nodes)
        assert all(node in m.nodes for _cid, node in m.syncs)
        assert not c.refusals, c.refusals
        assert fold(initial(), c.log) == c.state
        assert restore(snapshot_bytes(c.state)) == c.state


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps)
def test_sync_converges_and_never_serves_a_stale_credential(
    schedule: list[tuple[object, ...]],
) -> None:
    run = Run()
    for kind, *args in schedule:
        run.step(str(kind), *args)
        assert not run.c.refusals, run.c.refusals
    run.check_state()
    run.converge()
    run.check_state()
    log = run.c.log
    kinds = {type(e).__name__ for e in log}
    for kind in ("CredentialSyncRequested", "CredentialSynced", "NodeRejoined", "JobLeased"):
        event(f"{kind}: {'yes' if kind in kinds else 'no'}")
    asked = [(e.credential_id, e.version, e.to_node) for e in log
             if type(e).__name__ == "CredentialSyncRequested"]
    if len(set(asked)) < len(asked):
        event("a sync was requested again")
    # once converged, a job needing any latest version can go to every node
    for cv in credential_status(run.c.state).latest:
        run.c.handle(SubmitJob(f"final-{cv.credential_id}", f"fk-{cv.credential_id}",
                               run.c.now, needs=(cv,)))
    dispatcher = run.c.state.dispatcher
    assert dispatcher is not None
    run.c.handle(DispatchJobs(dispatcher, run.c.state.term, run.c.now))


def test_a_save_on_a_node_that_is_down_but_not_yet_offline_still_converges() -> None:
    run = Run()
    run.c.silence("n2")
    run.c.save("sql-1", 1, "n2", at=5)  # the user reached n2; the runtime will not for a while
    run.c.run_up(60)
    st = credential_status(run.c.state)
    assert run.c.status("n2") is NodeStatus.OFFLINE and st.behind == ("n1", "n3")
    run.converge()
    run.check_state()
