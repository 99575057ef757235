"""The workload: the jobs the service submits during a run, and the queue samples.

Jobs arrive as a Poisson process at the scenario's rate (``[workload]``), each with a duration
drawn from the scenario's distribution and the latest version of every credential the workload
needs. A linked runtime's factory submits through :meth:`Workload.submit_job` too
(``shir.sim.surface``). The service may resend a submission (``duplicate_submit_p``): the core
must make it take effect once.

The world's ``workload`` is a :class:`Workload`; every draw comes from the world's ``workload``
random stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from shir.core.leasing import SubmitJob
from shir.core.sharing import SubmitLinkedJob

if TYPE_CHECKING:
    from shir.sim.world import World

__all__ = ["Workload"]


class Workload:
    """The workload of one World: job arrivals and queue samples."""

    def __init__(self, world: World) -> None:
        self.w = world

    def arrivals(self) -> Any:
        """The SimPy process of the scenario's Poisson job arrivals."""
        wl = self.w.scenario.workload
        rng = self.w.workload_rng
        end = self.w.duration_s
        stop = min(end, wl.stop_at_s if wl.stop_at_s is not None else end)
        if wl.rate_per_s <= 0:
            return
        env = self.w.env
        if wl.start_at_s > env.now:
            yield env.timeout(wl.start_at_s - env.now)
        # From here on a chain of timers, one per arrival (cheaper than resuming a process;
        # the draws and their order are the same).
        rate, later = wl.rate_per_s, self.w.later

        def arrive() -> None:
            if env.now < stop:
                self.submit_job()
                later(rng.expovariate(rate), arrive)

        later(rng.expovariate(rate), arrive)

    def submit_job(self, link: str | None = None) -> None:
        """The service submits one job of the scenario's workload (or of linked runtime
        ``link``'s), now."""
        wl = self.w.scenario.workload
        rng = self.w.workload_rng
        env = self.w.env
        self.w.jobs_made += 1
        n = self.w.jobs_made
        job_id = f"job-{n}"
        key = f"key-{n}"
        dist = wl.duration
        if dist.kind == "exponential":
            work = rng.expovariate(1.0 / dist.mean_s) if dist.mean_s > 0 else 0.0
        elif dist.kind == "uniform":
            work = rng.uniform(dist.min_s, dist.max_s)
        else:
            work = dist.mean_s
        self.w.job_work[job_id] = work
        self.w.submitted_keys[key] = job_id
        submit: Any = (SubmitJob(job_id, key, env.now, self.w.job_needs) if link is None
                       else SubmitLinkedJob(link, job_id, key, env.now, self.w.job_needs))
        self.w.service.handle(submit)
        if link is not None and self.w.append_lost_at != env.now and (
            key not in self.w.driver.state.model().jobs.active_keys
        ):
            del self.w.submitted_keys[key]  # refused (a revoked link): never accepted, not lost
            return
        if wl.duplicate_submit_p and rng.random() < wl.duplicate_submit_p:
            self.w.later(rng.random() * 5.0, lambda: self.w.service.handle(
                attrs.evolve(submit, at=self.w.env.now)))

    def sampler(self) -> Any:
        """The SimPy process that samples the queue and the running jobs for the timeline."""
        env = self.w.env
        while True:
            b = self.w.driver.state.model().jobs
            self.w.timeline["samples"].append((env.now, b.queued(), len(b.leases)))
            yield env.timeout(max(1.0, self.w.duration_s / 600))
