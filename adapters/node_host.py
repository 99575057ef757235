"""The node host: one real ``shir`` node driving the shared core on an event store.

Theory of operation
-------------------
One host thread owns the :class:`~shir.core.driver.Driver` (the store is never touched from
elsewhere). Each turn of its loop it reads the clock and:

1. catches up with the log: the events other writers appended yield their effects
   (``effects_of``), this node's own commands return theirs with the core's answer, and
   :meth:`NodeHost._drain_effects` routes each by its recipient (``effect.to``) to
   :meth:`NodeHost._carry_out` when it is addressed to this node;
2. reports the jobs its worker threads finished (complete or fail under the delivery's token);
3. heartbeats every interval with real CPU and memory figures, renews the leases of its running
   jobs every third of the lock duration, and sends ``Tick`` when the core's next deadline has
   passed (any node may tick: the store's expected version makes one of them win, and the
   others decide again on the newer log, where nothing is due any more);
4. as the dispatcher of the current term, moves job requests from the control channel into the
   log (``SubmitJob``, idempotency key = message id) and settles each message only after the
   append is durable, sends ``DispatchJobs`` when the core says ``DispatchWanted``, and
   publishes the results the core lists as ``unpublished_results`` (when it takes over or
   starts, and every ``DISPATCH_POLL_S``);
5. records the results it published (``ConfirmResultsPublished``): a result is published at
   least once, and a repeat is absorbed by the reply queue.

Credentials (:mod:`shir.adapters.node_credentials`, which says how): heartbeats report the
store's versions, after ``SaveCredential`` for newer ones; ``SealCredentialFor`` has a version
sealed and sent over the intranet, then ``ShareCredential`` recorded; requests are queued with
the credentials they name (``needs``) and carry (``carried``).

SIGTERM drains: running jobs may finish (bounded), new deliveries are abandoned, then the node
sends ``LeaveRuntime`` and its remaining leases go back to the queue at once.

Proxy: the host is built with the proxy setting its clients use (``proxy``: the machine's, kept
in its home). When the log holds another one for this node (at registration, or a
``RestartHostService`` addressed to it) the host restarts as the product's host service does:
it drains like SIGTERM but does not leave (the node stays registered, and its proxy setting in
the log with it), and :attr:`NodeHost.restart_to` names the setting to start again with
(:mod:`shir.adapters.node_cli` reopens every client with it). A node that registers anew has no
setting saved in the log: the host saves its machine's own (``SaveProxySettings``), as it sends
its concurrency limit.

Everything this host does with the core goes through :meth:`NodeHost.send`, and everything the
core tells it comes through :meth:`_carry_out` (effects, including the reply a ``Fenced``
refusal carries): those are the only places that know the protocol. The host decides nothing
the core decides: who dispatches, which node runs what, when a node is Offline, when a lease
has ended.

Commands are stamped with ``max(clock, the log's latest time)``: several writers share one log,
and the core refuses time going backwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs

from shir.adapters.channel import ChannelError, ControlChannel, JobResult, LockLost
from shir.adapters.node_credentials import HostCredentials, request_credentials
from shir.adapters.node_jobs import KINDS, JobContext, JobRun, pack_spec
from shir.core import commands as cmd
from shir.core import effects as fx
from shir.core import effects_of, jobs
from shir.core import events as ev
from shir.core.capacity import requests_wanted
from shir.core.credentials import DeliverCredential, SealCredentialFor
from shir.core.driver import AppendOutcomeUnknown, ConcurrencyConflict, Driver
from shir.core.errors import DomainError, Fenced, ShirError, TimeWentBackwards
from shir.core.leasing import (
    MAX_CONFIRMED,
    AbandonJob,
    CompleteJob,
    ConfirmResultsPublished,
    DispatchJobs,
    FailJob,
    RenewLeases,
    SetConcurrencyLimit,
    StaleLease,
    SubmitJob,
    UnknownJob,
    unpublished_results,
)
from shir.core.model import NodeMetrics
from shir.core.proxy import ProxySettings, RestartHostService, SaveProxySettings, saved_proxy
from shir.core.state import Node
from shir.core.store import EventStore, StoreError

__all__ = ["HostExit", "NodeHost", "job_id_for"]

Log = Callable[..., None]
POLL_S = 0.1  # how often the log is read for other writers' events
_SEND_TRIES = 6
MAX_REQUESTS_PER_TURN = 32  # job requests taken per loop turn (and per append), at most
DISPATCH_POLL_S = 5.0  # the dispatcher also dispatches this often without being asked
_MEMBERSHIP_EVENTS = (ev.NodeRegistered, ev.NodeRemoved, ev.NodeLeft)
NO_PROXY = ProxySettings()


class _LogDriver(Driver):
    """The core's Driver, reporting every tail it reads from the store to ``on_tail``.

    Those are other writers' events (and, after an append whose outcome was unknown, this
    node's own): their effects come from the log. The effects of this node's own appends come
    back from ``handle`` with the answer to its command.
    """

    def __init__(self, store: EventStore, on_tail: Callable[[list[object]], None]) -> None:
        self._on_tail: Callable[[list[object]], None] | None = None
        super().__init__(store)  # the history: folded, not acted on
        self._on_tail = on_tail

    def catch_up(self) -> list[object]:
        tail = super().catch_up()
        if tail and self._on_tail is not None:
            self._on_tail(tail)
        return tail


class HostExit(Exception):
    """The host must stop: ``code`` is the exit code, ``message`` says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def job_id_for(message_id: str) -> str:
    """The job id of a request: derived from its message id, so a redelivery is the same job."""
    return "j-" + hashlib.sha256(message_id.encode()).hexdigest()[:20]


class NodeHost:
    """One node of a runtime (see the module doc). ``run`` returns the process's exit code."""

    def __init__(
        self, *, store: EventStore, channel: ControlChannel | None, key_text: str, name: str,
        machine_id: str, metrics: Callable[[int], NodeMetrics], cores: int, memory_mb: int,
        log: Log, heartbeat_interval_s: float | None = None,
        concurrency_limit: int | None = None, drain_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        kinds: dict[str, Callable[[JobContext], None]] = KINDS,
        intranet_address: str | None = None, cert_sha256: str | None = None,
        on_members: Callable[[tuple[Node, ...]], None] | None = None,
        credentials: HostCredentials | None = None,
        proxy: ProxySettings = NO_PROXY,
    ) -> None:
        self._effects: list[tuple[object, bool]] = []  # (effect, caused by this node's command)
        self.driver = _LogDriver(store, self._on_tail)  # the history's effects are not redone
        self.driver.listeners.append(self._on_events)
        self.channel = channel
        self._key_text = key_text
        self.name = name
        self.machine_id = machine_id
        self._metrics = metrics
        self.cores, self.memory_mb = cores, memory_mb
        self.log = log
        self._hb_option = heartbeat_interval_s
        self._limit_option = concurrency_limit
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.kinds = kinds
        self.intranet_address, self.cert_sha256 = intranet_address, cert_sha256
        self._on_members = on_members  # told the registered nodes whenever they change
        self.credentials = credentials
        self.session = 0
        self.term = 0
        self.dispatcher: str | None = None
        self.running: dict[str, JobRun] = {}
        self._finished: queue.Queue[tuple[JobRun, str | None]] = queue.Queue()
        self._unreported: list[tuple[JobRun, str | None]] = []
        self._dispatch_wanted = False
        self._published: dict[str, None] = {}  # job ids published, their record not yet sent
        book = self.driver.state.jobs
        self._specs: dict[str, bytes] = {j.job_id: j.spec for j in book.jobs.values()}
        self.stop = threading.Event()
        self.draining = False
        self.leaving = False
        self.proxy = proxy  # the setting this process's clients were built with
        self.restart_to: ProxySettings | None = None  # set: stop, stay registered, start again

    # -- the one door to the core -------------------------------------------------------------

    def send(self, make: Callable[[float], object]) -> bool | None:
        """Decide ``make(at)``; True when the core accepted it (or found it satisfied).

        A refusal returns False; a fenced one also queues the reply it carries. Lost races (a
        conflict, an append whose outcome was unknown and did not land) are retried with a
        fresh stamp; None means the store could not be written this turn (nothing was decided:
        the caller may try again later).
        """
        [ok] = self.send_all([make])
        return ok

    def send_all(self, makes: Sequence[Callable[[float], object]]) -> list[bool | None]:
        """:meth:`send` for several commands stored in one append (group commit): what each
        would have returned alone. A batch of job requests pays one durable write, so a burst
        of requests does not starve the other nodes' heartbeats of the store."""
        commands: list[object] = []
        for _ in range(_SEND_TRIES):
            at = max(self.clock(), self.driver.state.now)
            commands = [make(at) for make in makes]
            try:
                outcomes = self.driver.handle_all(commands)
            except (ConcurrencyConflict, AppendOutcomeUnknown, TimeWentBackwards):
                self.driver.catch_up()
                continue
            except StoreError as exc:
                # busy, unreachable, throttled: this turn is lost, the next one tries again
                self.log("warning", "store_error", command=type(commands[0]).__name__,
                         error=str(exc))
                return [None] * len(commands)
            done: list[bool | None] = []
            for command, outcome in zip(commands, outcomes, strict=True):
                if isinstance(outcome, DomainError):
                    self._refused(command, outcome)
                    if isinstance(outcome, Fenced):  # the sender (this node) is stale: the
                        self._effects.append((outcome.reply, True))  # reply catches it up
                    done.append(False)
                else:
                    self._effects.extend((e, True) for e in outcome)
                    done.append(True)
            return done
        self.log("warning", "command_retries_exhausted", command=type(commands[0]).__name__)
        return [None] * len(commands)

    def _on_tail(self, events: list[object]) -> None:
        # Events read from the log (other writers'): their effects, some of them for this node.
        self._effects.extend((e, False) for e in effects_of(events, self.driver.state))

    def _on_events(self, events: Any) -> None:
        # Every folded batch, this node's and others': keep what to run for each job.
        for e in events:
            t = type(e)
            if t is jobs.JobSubmitted:
                self._specs[e.job_id] = e.spec
            elif t is jobs.JobCompleted or t is jobs.JobDeadLettered:
                self._specs.pop(e.token.job_id, None)
            elif t is ev.NodeStatusChanged and e.node == self.name:
                self.log("info", "status", status=e.status.value, reasons=list(e.reasons))
            elif t in _MEMBERSHIP_EVENTS and self._on_members is not None:
                self._on_members(self.driver.state.nodes)

    def _drain_effects(self) -> None:
        while self._effects:
            batch, self._effects = self._effects, []
            # A node back from a gap reads deliveries whose leases ended later in the same
            # catch-up: the core has already said stop, so they are not started at all.
            ended = {e.token for e, _ in batch if isinstance(e, fx.StopJob)}
            for effect, own in batch:
                if isinstance(effect, fx.DeliverJob) and effect.token in ended:
                    continue
                to: fx.Recipient = effect.to  # type: ignore[attr-defined]
                if to.role is fx.Role.FACTORY:
                    # The node whose command caused it tells the factory side, and so does
                    # the dispatcher (publishing is idempotent): a result survives its
                    # completer being killed before it published.
                    if own or self.dispatcher == self.name:
                        self._carry_out(effect)
                elif to.role is fx.Role.EVERY_NODE or to.node == self.name:
                    self._carry_out(effect)

    def _carry_out(self, effect: object) -> None:
        """Act on one effect addressed to this node (or, for results, to the factory side)."""
        me = self.name
        if isinstance(effect, fx.DeliverJob):
            self._start_job(effect.token)
        elif isinstance(effect, fx.StopJob):
            run = self.running.get(effect.token.job_id)
            if run is not None and run.token == effect.token:
                run.cancelled.set()
                del self.running[effect.token.job_id]
                self.log("warning", "lease_lost", job=effect.token.job_id, reason=effect.reason)
        elif isinstance(effect, fx.DispatchWanted):
            if effect.term >= self.term:
                self.term, self.dispatcher = effect.term, effect.node
                self._dispatch_wanted = True
        elif isinstance(effect, fx.AnnounceDispatcher):
            if effect.term >= self.term:
                was_me = self.dispatcher == me
                self.term, self.dispatcher = effect.term, effect.node
                if effect.node == me or was_me:
                    self.log("info", "dispatcher", term=effect.term, node=effect.node)
                self._dispatch_wanted = effect.node == me
                if effect.node == me and not was_me:
                    self._next_sweep = 0.0  # publish what the last one may have left
        elif isinstance(effect, fx.StartSession):
            if effect.session != self.session:
                self.session = effect.session
                self.log("info", "session", session=effect.session)
        elif isinstance(effect, fx.PublishJobResult):
            self._publish(effect)
        elif isinstance(effect, SealCredentialFor) and self.credentials is not None:
            target = self.driver.state.node(effect.to_node)
            self.credentials.share(effect, target.envelope_key if target else None)
        elif isinstance(effect, DeliverCredential):
            # it came over the intranet, and the store holds it already: report it now
            self._next_hb = 0.0
        elif isinstance(effect, fx.Disconnect) and not self.leaving:
            raise HostExit(1, f"node {me!r} is not part of the runtime: {effect.reason}")
        elif isinstance(effect, RestartHostService):
            self._follow_proxy(effect.reason)

    def _follow_proxy(self, reason: str) -> None:
        """Restart when the log's proxy setting for this node is not the one in use."""
        wanted = saved_proxy(self.driver.state, self.name)
        if wanted is None or wanted == self.proxy or self.restart_to == wanted:
            return  # the clients already use it: a restart would change nothing
        if self.draining and self.restart_to is None:
            return  # stopping for good (SIGTERM): the next start reads the home, and the log
        self.restart_to = wanted
        self.log("info", "restart_wanted", reason=reason, proxy=wanted.describe())
        self.stop.set()

    def _refused(self, command: object, exc: DomainError) -> None:
        what = type(command).__name__
        if isinstance(exc, (StaleLease, UnknownJob)):
            job = getattr(getattr(command, "token", None), "job_id", None)
            self.log("warning", "late_work_refused", command=what, job=job, reason=str(exc),
                     detail=getattr(command, "reason", ""))
        else:
            self.log("warning", "refused", command=what, error=type(exc).__name__,
                     reason=str(exc))

    def _publish_unpublished(self) -> None:
        """As the dispatcher, publish the results the core says no host confirmed publishing:
        the one that should have may have died first, or its channel failed."""
        for effect in unpublished_results(self.driver.state):
            if effect.job_id not in self._published:
                self._publish(effect)

    def _publish(self, effect: fx.PublishJobResult) -> None:
        if self.channel is None:
            return
        result = JobResult(effect.idempotency_key, effect.job_id, effect.outcome, effect.detail,
                           self.clock())
        try:
            self.channel.publish_result(result)
        except ChannelError as exc:
            self.log("warning", "result_not_published", job=effect.job_id, error=str(exc))
            return
        self._published[effect.job_id] = None

    def _confirm_published(self) -> None:
        """Record in the log the results this host published (one append per turn at most);
        kept for the next turn when the store cannot be written."""
        while self._published:
            ids = tuple(self._published)[:MAX_CONFIRMED]
            if self.send(partial(ConfirmResultsPublished, ids)) is None:
                return
            for job_id in ids:
                del self._published[job_id]

    # -- life cycle ---------------------------------------------------------------------------

    def register(self) -> None:
        """Join the runtime with the auth key; raises the core's refusal as it is."""
        state = self.driver.state
        if state.runtime is None:
            raise ShirError("the store holds no runtime: create one with shir runtime create "
                            "--store STORE --name NAME, or check --store")
        # The log just read names the current term and dispatcher; effects keep them current.
        self.term, self.dispatcher = state.term, state.dispatcher
        if self._on_members is not None:
            self._on_members(state.nodes)
        for _ in range(_SEND_TRIES):
            at = max(self.clock(), self.driver.state.now)
            command = cmd.RegisterNode(
                self._key_text, self.name, self.machine_id, self.cores, self.memory_mb, at,
                self._metrics_now(0), intranet_address=self.intranet_address,
                cert_sha256=self.cert_sha256,
                envelope_key=self.credentials.keys.public if self.credentials else None)
            try:
                effects = self.driver.handle(command)
            except (ConcurrencyConflict, AppendOutcomeUnknown, TimeWentBackwards):
                self.driver.catch_up()
                continue
            self._effects.extend((e, True) for e in effects)
            break
        else:
            raise HostExit(1, "the registration kept losing races with other writers; retry")
        self._drain_effects()  # the session starts here
        rt = self.driver.state.runtime
        self.log("info", "registered", runtime=rt.name if rt else None, session=self.session,
                 term=self.term, dispatcher=self.dispatcher)
        if self._limit_option is not None:
            self.send(partial(SetConcurrencyLimit, self.name, self._limit_option))
        if saved_proxy(self.driver.state, self.name) is None:
            if self.proxy != NO_PROXY:  # a new registration: the machine's own setting
                self.send(partial(SaveProxySettings, self.name, self.proxy))
        else:
            self._follow_proxy("the log holds another proxy setting for this node")
        self._drain_effects()

    def heartbeat_interval_s(self) -> float:
        """The runtime's heartbeat interval, or the host's shorter one."""
        runtime_s = self.driver.state.settings.heartbeat_interval_s
        return min(runtime_s, self._hb_option) if self._hb_option else runtime_s

    def run(self) -> int:
        """Register, then serve until :attr:`stop` is set; drain and return the exit code.

        When :attr:`restart_to` is set on return, the caller starts the host again with it.
        """
        try:
            self.register()
            self._serve()
            return self._drain()
        except HostExit as exc:
            self.log("error", "exit", reason=str(exc))
            self._cancel_all()
            return exc.code

    def _begin_serving(self) -> None:
        """Arm the loop's timers: heartbeat, dispatch and the results sweep are due at once."""
        self._next_hb = self._next_dispatch = self._next_sweep = 0.0
        if self.credentials is not None:
            self.credentials.set_nodes(self.driver.state.nodes)
        self._next_renew = self.clock() + self.driver.state.settings.lock_duration_s / 3
        self._stuck_deadline: float | None = None

    def _serve(self) -> None:
        self._begin_serving()
        while not self.stop.is_set():
            try:
                self._turn()
            except StoreError as exc:  # busy or unreachable: say so, and try again next turn
                self.log("warning", "store_error", error=str(exc))
            self._wait(min(POLL_S, max(0.0, self._next_hb - self.clock())))

    def _turn(self) -> None:
        """One turn of the host loop (see the module doc)."""
        self.driver.catch_up()
        self._drain_effects()
        self._report_finished()
        if self.credentials is not None:
            for share in self.credentials.finished():
                self.send(share)  # the target took it: the log records the envelope
            if self.credentials.report_soon.is_set():
                self.credentials.report_soon.clear()
                self._next_hb = 0.0
        now = self.clock()
        if now >= self._next_hb:
            self._next_hb = now + self.heartbeat_interval_s()
            self._heartbeat()
        if now >= self._next_renew:
            self._next_renew = now + self.driver.state.settings.lock_duration_s / 3
            self._renew()
        deadline = self.driver.deadline()
        due = deadline is not None and deadline <= now and deadline != self._stuck_deadline
        if due and self.send(cmd.Tick):
            after = self.driver.deadline()
            # a tick must clear what is due; if one does not, do not spin on it
            self._stuck_deadline = after if after is not None and after <= now else None
        if self.dispatcher == self.name and not self.draining:
            self._pull_requests()
            if self._dispatch_wanted or now >= self._next_dispatch:
                self._next_dispatch = now + DISPATCH_POLL_S
                self._dispatch()
            if now >= self._next_sweep:
                self._next_sweep = now + DISPATCH_POLL_S
                self._publish_unpublished()
        self._drain_effects()
        self._confirm_published()

    def _wait(self, timeout_s: float) -> None:
        try:
            item = self._finished.get(timeout=timeout_s)
        except queue.Empty:
            return
        self._finished.put(item)  # reported at the top of the next turn

    def _metrics_now(self, running: int) -> NodeMetrics:
        """The machine's figures, with the credential versions its store holds."""
        metrics = self._metrics(running)
        if self.credentials is None:
            return metrics
        return attrs.evolve(metrics, credentials=self.credentials.held())

    def _heartbeat(self) -> None:
        metrics = self._metrics_now(len(self.running))
        if self.credentials is not None:  # versions saved on this machine that the log lacks
            for save in self.credentials.saves(self.driver.state, metrics.credentials):
                self.send(save)
        self.send(lambda at: cmd.Heartbeat(self.name, self.session, metrics, at))

    def _renew(self) -> None:
        if self.running:
            tokens = tuple(r.token for r in self.running.values())
            self.send(lambda at: RenewLeases(tokens, at))

    # -- jobs on this node --------------------------------------------------------------------

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

    def _drain(self) -> int:
        """Finish running jobs (bounded), give back the rest, and leave."""
        self.draining = True
        self.log("info", "draining", running=len(self.running), timeout_s=self.drain_timeout_s)
        until = self.clock() + self.drain_timeout_s
        hb_s = self.heartbeat_interval_s()
        next_hb = self.clock()
        while self.running and self.clock() < until:
            try:
                self.driver.catch_up()
                self._drain_effects()
                self._report_finished()
                if self.clock() >= next_hb:
                    next_hb = self.clock() + hb_s
                    self._heartbeat()
                    self._renew()
            except StoreError as exc:
                self.log("warning", "store_error", error=str(exc))
            self._wait(POLL_S)
        self._cancel_all()  # past the bound: leaving gives their leases back at once
        self._drain_effects()  # the last completions' results are published before leaving
        self._confirm_published()
        if self.restart_to is not None:
            # a restart, as the product's host service does it: the node stays registered
            # (with its proxy setting); leases cut short above end when it registers again
            self.log("info", "stopped", left=False, restart=True)
            return 0
        self.leaving = True
        left = self.send(partial(cmd.LeaveRuntime, self.name, self.session))
        self.log("info", "stopped", left=bool(left))
        return 0

    # -- dispatcher duties --------------------------------------------------------------------

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

