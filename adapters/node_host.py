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

The host is three modules, by role: :mod:`shir.adapters.node_base` holds its state and the door
to the core (``send``); :mod:`shir.adapters.node_duties` the jobs running on this node and the
dispatcher's work with the control channel; this module start-up, the turn loop, the effects it
carries out, and shutdown.

Commands are stamped with ``max(clock, the log's latest time)``: several writers share one log,
and the core refuses time going backwards.
"""

from __future__ import annotations

import queue
from functools import partial

import attrs

from shir.adapters.node_base import NO_PROXY, SEND_TRIES, HostExit
from shir.adapters.node_duties import DispatcherDuties, JobDuties, job_id_for
from shir.core import commands as cmd
from shir.core import effects as fx
from shir.core.credentials import DeliverCredential, SealCredentialFor
from shir.core.driver import AppendOutcomeUnknown, ConcurrencyConflict
from shir.core.errors import ShirError, TimeWentBackwards
from shir.core.leasing import RenewLeases, SetConcurrencyLimit
from shir.core.model import NodeMetrics
from shir.core.proxy import RestartHostService, SaveProxySettings, saved_proxy
from shir.core.store import StoreError

__all__ = ["HostExit", "NodeHost", "job_id_for"]

POLL_S = 0.1  # how often the log is read for other writers' events
DISPATCH_POLL_S = 5.0  # the dispatcher also dispatches (and publishes) this often unasked


class NodeHost(JobDuties, DispatcherDuties):
    """One node of a runtime (see the module doc). ``run`` returns the process's exit code."""

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
        for _ in range(SEND_TRIES):
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
                more = self._publish_unpublished()
                self._next_sweep = now if more else now + DISPATCH_POLL_S
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
