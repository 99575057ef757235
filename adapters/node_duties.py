"""The node host's duties: the jobs running on this node, and the dispatcher's.

:class:`JobDuties` starts each delivery in a worker thread and reports how it ended;
:class:`DispatcherDuties` moves job requests from the control channel into the log, asks the
core to dispatch, and publishes job results on the reply queue (at least once: what the core
still lists as unpublished is published again). Both act only through
:meth:`~shir.adapters.node_base.HostBase.send`; :class:`~shir.adapters.node_host.NodeHost`
decides when to call them.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
from functools import partial

from shir.adapters.channel import ChannelError, JobResult, LockLost
from shir.adapters.node_base import HostBase
from shir.adapters.node_credentials import request_credentials
from shir.adapters.node_jobs import JobRun, pack_spec
from shir.core import effects as fx
from shir.core import jobs
from shir.core.capacity import requests_wanted
from shir.core.errors import ShirError
from shir.core.leasing import (
    MAX_CONFIRMED,
    AbandonJob,
    CompleteJob,
    ConfirmResultsPublished,
    DispatchJobs,
    FailJob,
    SubmitJob,
    unpublished_results,
)

__all__ = ["MAX_REQUESTS_PER_TURN", "MAX_RESULTS_PER_TURN", "DispatcherDuties", "JobDuties",
           "job_id_for"]

MAX_REQUESTS_PER_TURN = 32  # job requests taken per loop turn (and per append), at most
MAX_RESULTS_PER_TURN = 256  # left-over results published again per loop turn, at most


def job_id_for(message_id: str) -> str:
    """The job id of a request: derived from its message id, so a redelivery is the same job."""
    return "j-" + hashlib.sha256(message_id.encode()).hexdigest()[:20]


class JobDuties(HostBase):
    """The jobs on this node: each delivery runs in its own thread."""

    def _start_job(self, token: jobs.LeaseToken) -> None:
        old = self.running.get(token.job_id)
        if old is not None:
            if old.token == token:
                return  # the same delivery seen twice
            old.cancelled.set()  # a newer delivery replaces a copy whose lease has ended
            del self.running[token.job_id]
        if self.draining:
            self.send(partial(AbandonJob, token, reason=f"node {self.name} is shutting down"))
            return
        spec = self._specs.get(token.job_id, b"")
        run = JobRun(token, spec, lambda r, error: self._finished.put((r, error)), self.kinds)
        self.running[token.job_id] = run
        self.log("info", "job_started", job=token.job_id, kind=run.kind,
                 delivery=token.delivery, term=token.term)
        run.start()

    def _report_finished(self) -> None:
        """Complete or fail finished runs; one the store could not take is retried next turn
        (and its lease still renewed meanwhile)."""
        while True:
            try:
                self._unreported.append(self._finished.get_nowait())
            except queue.Empty:
                break
        pending, self._unreported = self._unreported, []
        for run, error in pending:
            token = run.token
            if error is None:
                outcome = self.send(partial(CompleteJob, token))
            else:
                outcome = self.send(partial(FailJob, token, reason=error[:500]))
            if outcome is None:
                self._unreported.append((run, error))
                continue
            if self.running.get(token.job_id) is run:
                del self.running[token.job_id]
            if outcome and error is None:
                self.log("info", "job_completed", job=token.job_id)
            elif outcome and error is not None:
                self.log("warning", "job_failed", job=token.job_id, reason=error[:500])

    def _cancel_all(self) -> None:
        for run in self.running.values():
            run.cancelled.set()
        self.running.clear()


class DispatcherDuties(HostBase):
    """The dispatcher's work with the control channel, and publishing job results."""

    def _pull_requests(self) -> None:
        if self.channel is None:
            return
        wanted = requests_wanted(self.driver.state, MAX_REQUESTS_PER_TURN)
        if not wanted:
            return
        try:
            received = self.channel.receive(wanted, 0.0)
        except ChannelError as exc:
            self.log("warning", "channel_error", doing="receive", error=str(exc))
            return
        # One append for the whole batch; each message settled only after it.
        makes, taken = [], []
        for r in received:
            req = r.request
            try:
                needs, carried = request_credentials(self.driver.state, req)
                spec = pack_spec(req.kind, req.spec, req.credential)
            except (ValueError, ShirError) as exc:
                self._settle(r.lock_token, f"bad request: {exc}")
                continue
            makes.append(partial(SubmitJob, job_id_for(req.message_id), req.message_id,
                                 needs=needs, carried=carried, spec=spec))
            taken.append(r)
        if not makes:
            return
        for r, ok in zip(taken, self.send_all(makes), strict=True):
            if ok:
                self._settle(r.lock_token, None)  # the job is in the log: durable
            elif ok is None or self.dispatcher != self.name:
                self._abandon_message(r.lock_token)  # it comes back; the key absorbs repeats
            else:
                self._settle(r.lock_token, "refused by the runtime (see the node's log)")

    def _settle(self, lock_token: str, dead_reason: str | None) -> None:
        assert self.channel is not None
        try:
            if dead_reason is None:
                self.channel.complete(lock_token)
            else:
                self.channel.dead_letter(lock_token, dead_reason)
        except LockLost:
            pass  # redelivered elsewhere: the idempotency key absorbs the duplicate
        except ChannelError as exc:
            self.log("warning", "channel_error", doing="settle", error=str(exc))

    def _abandon_message(self, lock_token: str) -> None:
        assert self.channel is not None
        with contextlib.suppress(ChannelError):  # else the lock expires and it comes back
            self.channel.abandon(lock_token)

    def _dispatch(self) -> None:
        self._dispatch_wanted = False
        self.send(partial(DispatchJobs, self.name, self.term))

    def _publish_unpublished(self) -> bool:
        """As the dispatcher, publish the results the core says no host confirmed publishing
        (the one that should have may have died first, or its channel failed): at most
        ``MAX_RESULTS_PER_TURN``, and none after a failure, so that a backlog or a channel
        that is down does not hold up the turn. True when some are left for the next turn."""
        todo = [e for e in unpublished_results(self.driver.state)
                if e.job_id not in self._published]
        for effect in todo[:MAX_RESULTS_PER_TURN]:
            if not self._publish(effect):
                return False  # the channel failed: the next sweep tries again
        return len(todo) > MAX_RESULTS_PER_TURN

    def _publish(self, effect: fx.PublishJobResult) -> bool:
        if self.channel is None:
            return False
        result = JobResult(effect.idempotency_key, effect.job_id, effect.outcome, effect.detail,
                           self.clock())
        try:
            self.channel.publish_result(result)
        except ChannelError as exc:
            self.log("warning", "result_not_published", job=effect.job_id, error=str(exc))
            return False
        self._published[effect.job_id] = None
        return True

    def _confirm_published(self) -> None:
        """Record in the log the results this host published (one append per turn at most);
        kept for the next turn when the store cannot be written."""
        while self._published:
            ids = tuple(self._published)[:MAX_CONFIRMED]
            if self.send(partial(ConfirmResultsPublished, ids)) is None:
                return
            for job_id in ids:
                del self._published[job_id]
