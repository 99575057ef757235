"""A simulated node: one machine running a node process, as the simulator drives it.

A node knows only what messages told it: its session, the term and who dispatches. It carries
out the effects addressed to it (:meth:`SimNode.receive`), heartbeats on its own clock, runs the
jobs it was delivered as timers (not processes), renews their leases every half lock, and sends
``DispatchJobs`` when it dispatches and the core wants a dispatch (coalescing a burst).

Its faults: a crash loses its memory (running jobs, the term it believed in) but not its durable
state (session, local credential store); a pause (hibernate, stall) freezes its timers; a clock
jump fires the timers due within the jump.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from shir.core import commands as cmd
from shir.core import effects as fx
from shir.core import jobs
from shir.core.credentials import DeliverCredential, SealCredentialFor, ShareCredential
from shir.core.leasing import CompleteJob, DispatchJobs, RenewLeases
from shir.core.model import CredentialVersion, NodeMetrics
from shir.core.proxy import RestartHostService
from shir.sim.network import CONTROL, SERVICE
from shir.sim.scenario import NodeSpec

if TYPE_CHECKING:
    from shir.sim.world import World

__all__ = ["DISPATCH_POLL_S", "NUDGE_COALESCE_S", "SimNode"]

DISPATCH_POLL_S = 5.0  # the dispatcher also polls, so a lost DispatchWanted delays work this long
NUDGE_COALESCE_S = 0.25  # a burst of DispatchWanted becomes one DispatchJobs


@attrs.define
class _Job:
    token: jobs.LeaseToken
    due: float  # sim time of the next timer (renew or finish)
    end: float  # sim time the work finishes
    gen: int = 0


class SimNode:
    """One machine running a node: what it knows, and what it does."""

    def __init__(self, world: World, spec: NodeSpec) -> None:
        self.w = world
        self.spec = spec
        self.name = spec.name
        self.registered = False
        self.up = True  # process running (not crashed, not mid-upgrade)
        self.paused = False  # hibernating or stalled
        self.session = 1  # durable: survives crashes
        self.term = 0
        self.dispatcher: str | None = None
        self.version = spec.version
        self.released_at = spec.version_released_at
        self.reported_version: str | None = None  # version_skew fault
        self.speed = spec.speed
        self.clock_rate = 1.0
        self.running: dict[str, _Job] = {}
        self.deferred: list[_Job] = []  # jobs whose end came while paused
        self.renewing = False  # a renewal timer is armed
        self.renew_due = 0.0
        self.renew_gen = 0
        self.renew_deferred = False
        self.wake = world.env.event()
        self.dispatch_pending = False
        self.credentials: dict[str, int] = {}  # its local encrypted store: durable
        self.key_generation: int | None = None  # the generation of the key it registered with

    # -- heartbeat loop: the node's one process
    def process(self) -> Any:
        env = self.w.env
        spec = self.spec
        if spec.join_at_s > env.now:
            yield env.timeout(spec.join_at_s - env.now)
        interval = self.w.scenario.settings.heartbeat_interval_s
        poll_at = env.now + DISPATCH_POLL_S
        while True:
            while not self.up or self.paused:
                yield self.wake
            if self.registered:
                self.w.service.send_heartbeat(self)
                if self.dispatcher == self.name and env.now >= poll_at:
                    poll_at = env.now + DISPATCH_POLL_S
                    self.nudge()
            else:
                # Not (or no longer) registered, or the reply was lost: the operator pastes
                # the current key again. Registering is idempotent, so retrying is safe.
                self.w.service.register(self)
            yield env.timeout(interval / self.clock_rate)

    def metrics(self) -> NodeMetrics:
        w = self.w
        limit = w.limits.get(self.name, 1)
        load = len(self.running) / max(1, limit)
        peers = tuple(p for p in w.node_names if p != self.name and w.intranet_ok(self.name, p))
        return NodeMetrics(
            cpu_pct=min(100.0, 5.0 + 90.0 * load / self.speed),
            available_memory_mb=max(0, self.spec.memory_mb - 512 * len(self.running)),
            running_jobs=len(self.running),
            version=self.reported_version or self.version,
            version_released_at=self.released_at,
            reachable_peers=peers,
            control_channel_ok=w.net.link_ok(self.name, SERVICE, CONTROL),
            remote_access=self.spec.remote_access,
            credentials=tuple(
                CredentialVersion(cid, v) for cid, v in sorted(self.credentials.items())
            ),
        )

    def alive(self) -> bool:
        return self.up and not self.paused

    # -- messages from the service
    def receive(self, effect: object) -> None:
        """Act on one effect addressed to this node (what the node process does with it)."""
        if not self.alive():
            return  # a sleeping or dead machine hears nothing
        t = type(effect)
        if t is fx.DeliverJob:
            self.start_job(effect)  # type: ignore[arg-type]
        elif t is fx.StopJob:
            self.stop_job(effect.token)  # type: ignore[attr-defined]
        elif t is fx.AnnounceDispatcher:
            if effect.term >= self.term:  # type: ignore[attr-defined]
                self.term = effect.term  # type: ignore[attr-defined]
                self.dispatcher = effect.node  # type: ignore[attr-defined]
                if self.dispatcher == self.name:
                    self.nudge()
        elif t is fx.DispatchWanted:
            if effect.term >= self.term:  # type: ignore[attr-defined]
                self.term, self.dispatcher = effect.term, self.name  # type: ignore[attr-defined]
                self.nudge()
        elif t is fx.StartSession:
            # registered (session 1) or rejoined: the session is the core's, adopted as it is
            self.registered = True
            self.session = effect.session  # type: ignore[attr-defined]
        elif t is fx.Disconnect:
            self.registered = False
        elif t is SealCredentialFor:
            e: Any = effect
            if self.credentials.get(e.credential_id, 0) >= e.version:
                # seal for the named peer (the envelope adapter does this for real) and share
                envelope = f"sealed:{e.credential_id}:v{e.version}:for:{e.to_node}".encode()
                self.w.service.send(self.name, SERVICE, CONTROL, lambda at: ShareCredential(
                    e.credential_id, e.version, self.name, e.to_node, envelope, at))
        elif t is DeliverCredential:
            e = effect
            if self.credentials.get(e.credential_id, 0) < e.version:
                self.credentials[e.credential_id] = e.version  # opened and stored locally
        elif t is RestartHostService:  # its proxy settings changed (shir.sim.surface)
            self.w.surface.restart(self.name)

    def refused(self, command: object) -> None:
        """A command of this node was refused (and the reply, if any, is on its way)."""
        if isinstance(command, cmd.RegisterNode):
            self.key_generation = None  # its operator pastes the current key next time

    def nudge(self) -> None:
        """Dispatch soon (coalescing a burst of nudges into one command)."""
        if self.dispatch_pending:
            return
        self.dispatch_pending = True
        self.w.later(NUDGE_COALESCE_S, self._dispatch)

    def _dispatch(self) -> None:
        self.dispatch_pending = False
        if self.alive() and self.dispatcher == self.name:
            name, term = self.name, self.term
            self.w.service.send(name, SERVICE, CONTROL, lambda at: DispatchJobs(name, term, at))

    # -- jobs: one timer per running job for its end, one per node for renewing all leases
    def start_job(self, d: fx.DeliverJob) -> None:
        old = self.running.get(d.token.job_id)
        if old is not None:
            if old.token.delivery >= d.token.delivery:
                return  # a duplicated (or late, older) delivery
            self.stop_job(old.token)  # a newer delivery: the copy it still runs is stale
        w = self.w
        now = w.env.now
        work = w.job_work.get(d.token.job_id, 1.0) / (self.speed * w.slow.get(self.name, 1.0))
        job = _Job(d.token, 0.0, now + work)
        self.running[d.token.job_id] = job
        self._arm_job(job, job.end)
        if not self.renewing:
            self.renewing = True
            self._arm_renew(now + self._renew_every())

    def stop_job(self, token: jobs.LeaseToken) -> None:
        """Stop the copy of a job that runs under ``token`` (not a newer delivery of it)."""
        job = self.running.get(token.job_id)
        if job is not None and job.token == token:
            del self.running[token.job_id]
            job.gen += 1

    def _renew_every(self) -> float:
        return self.w.scenario.settings.lock_duration_s / 2 / self.clock_rate

    def _arm_job(self, job: _Job, due: float) -> None:
        job.due = due
        job.gen += 1
        gen = job.gen
        self.w.at(due, lambda: self._finish(job, gen))

    def _finish(self, job: _Job, gen: int) -> None:
        if job.gen != gen or self.running.get(job.token.job_id) is not job or not self.up:
            return
        if self.paused:
            self.deferred.append(job)
            return
        token = job.token
        del self.running[token.job_id]
        self.w.service.send(self.name, SERVICE, CONTROL, lambda at: CompleteJob(token, at))

    def _arm_renew(self, due: float) -> None:
        self.renew_due = due
        self.renew_gen += 1
        gen = self.renew_gen
        self.w.at(due, lambda: self._renew(gen))

    def _renew(self, gen: int) -> None:
        if gen != self.renew_gen or not self.up:
            return
        if self.paused:
            self.renew_deferred = True
            return
        if not self.running:
            self.renewing = False
            return
        tokens = tuple(j.token for j in self.running.values())
        self.w.service.send(self.name, SERVICE, CONTROL, lambda at: RenewLeases(tokens, at))
        self._arm_renew(self.w.env.now + self._renew_every())

    # -- faults
    def crash(self) -> None:
        self.up = False
        self.running.clear()  # memory lost; work in flight is gone
        self.deferred.clear()
        self.renewing, self.renew_deferred = False, False
        self.renew_gen += 1
        self.term, self.dispatcher = 0, None

    def restart(self) -> None:
        self.up = True
        self._wake()

    def pause(self) -> None:
        self.paused = True

    def resume(self, shift_s: float) -> None:
        """End a pause; ``shift_s`` > 0 delays every pending timer (a stall has no clock jump)."""
        self.paused = False
        deferred, self.deferred = self.deferred, []
        for job in deferred:
            self._finish_now(job)  # came due while paused: fires at once, late
        if shift_s:
            for job in self.running.values():
                job.end += shift_s
                self._arm_job(job, job.due + shift_s)
        if self.renew_deferred:
            self.renew_deferred = False
            self._renew_now()
        elif shift_s and self.renewing:
            self._arm_renew(self.renew_due + shift_s)
        self._wake()

    def jump_clock(self, jump_s: float) -> None:
        """The node's clock leaps ahead: timers due within the jump fire now."""
        horizon = self.w.env.now + jump_s
        for job in list(self.running.values()):
            if job.due <= horizon:
                self._finish_now(job)
        if self.renewing and self.renew_due <= horizon:
            self._renew_now()

    def _finish_now(self, job: _Job) -> None:
        job.gen += 1
        self._finish(job, job.gen)

    def _renew_now(self) -> None:
        self.renew_gen += 1
        self._renew(self.renew_gen)

    def _wake(self) -> None:
        if not self.wake.triggered:
            self.wake.succeed()
        self.wake = self.w.env.event()
