"""Jobs: the queue, leases, and what happens to them. Events, state and evolve handlers.

Theory of operation
-------------------
A job is *queued* when submitted and *leased* to one node when the dispatcher assigns it. A lease
is a :class:`LeaseToken` (job, node, dispatcher term, delivery number) with an expiry; the node
renews it before then, and ends it by completing, abandoning or failing the job. Whatever the
lease's end other than completion, the job goes back to the queue (``JobReleased``), unless it has
been delivered ``max_deliveries`` times: then it is dead-lettered with its reason. A lease also
ends when it expires unrenewed or its node goes Offline or is removed.

Idempotency: a job is identified by its idempotency key. Submitting a key that is queued, leased,
or was completed within ``duplicate_window_s`` does nothing (as Service Bus duplicate detection);
completing twice with the completing token does nothing; everything else with a token that is not
the job's live lease is refused as stale. So one key has at most one completion: no duplicate
effect.

State stays bounded by live work: finished jobs leave counters, completed keys only for the
duplicate window, and results until a host confirms it published them (``JobResultsPublished``)
or for the duplicate window at most.

Queue: jobs wait in FIFO order in one queue per *requirement* (the credential versions a node
must hold for it), so assignment looks at the heads of a few queues instead of scanning every
queued job: the cost of one assignment does not grow with the queue.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from typing import Any

import attrs

from shir.core.codec import event, value
from shir.core.model import CredentialVersion

__all__ = [
    "ConcurrencyLimitSet",
    "Job",
    "JobBook",
    "JobCompleted",
    "JobDeadLettered",
    "JobLeased",
    "JobReleased",
    "JobResultsPublished",
    "JobSubmitted",
    "Lease",
    "LeaseRenewed",
    "LeaseToken",
    "LeasesRenewed",
    "ReleaseReason",
    "Requirement",
    "requirement_of",
]

Requirement = tuple[CredentialVersion, ...]  # sorted, without the credentials a job carries


class ReleaseReason(enum.Enum):
    """Why a lease ended without completion."""

    EXPIRED = "expired"  # not renewed in time
    ABANDONED = "abandoned"  # the node gave it back
    FAILED = "failed"  # the node reported a failure
    NODE_LOST = "node_lost"  # the node went Offline or was removed


@value
@attrs.frozen
class LeaseToken:
    """Proof of one delivery of one job to one node in one dispatcher term."""

    job_id: str
    node: str
    term: int
    delivery: int


# --- events ----------------------------------------------------------------------------------

@event("job_submitted")
@attrs.frozen
class JobSubmitted:
    """A job was queued. ``carried`` credentials travel encrypted with the job itself."""

    job_id: str
    idempotency_key: str
    needs: tuple[CredentialVersion, ...]
    carried: tuple[str, ...]
    size_mb: float
    at: float
    spec: bytes = b""  # what to run, opaque to the core


@event("job_leased")
@attrs.frozen
class JobLeased:
    """The dispatcher assigned a queued job to a node until ``expires_at``."""

    token: LeaseToken
    expires_at: float
    at: float


@event("lease_renewed")
@attrs.frozen
class LeaseRenewed:
    """A node extended its lease."""

    token: LeaseToken
    expires_at: float
    at: float


@event("leases_renewed")
@attrs.frozen
class LeasesRenewed:
    """A node extended several of its leases at once, all until ``expires_at`` (its periodic
    keep-alive: one event per ``RenewLeases``, as Service Bus renews a batch of lock tokens in
    one request). ``tokens`` are distinct and each was its job's live lease."""

    tokens: tuple[LeaseToken, ...]
    expires_at: float
    at: float


@event("job_completed")
@attrs.frozen
class JobCompleted:
    """A node finished a job under its live lease: the job's one effect."""

    token: LeaseToken
    idempotency_key: str
    at: float


@event("job_released")
@attrs.frozen
class JobReleased:
    """A lease ended without completion and the job went back to the queue."""

    token: LeaseToken
    reason: ReleaseReason
    detail: str
    at: float


@event("job_dead_lettered")
@attrs.frozen
class JobDeadLettered:
    """A job's last allowed delivery ended without completion; it will not run again."""

    token: LeaseToken
    idempotency_key: str
    reason: ReleaseReason
    detail: str
    at: float


@event("job_results_published")
@attrs.frozen
class JobResultsPublished:
    """The factory side was told how these finished jobs ended (their results are on the reply
    queue): no host needs to publish them again."""

    job_ids: tuple[str, ...]
    at: float


@event("concurrency_limit_set")
@attrs.frozen
class ConcurrencyLimitSet:
    """A node's concurrent-job limit was overridden (``None``: back to the default)."""

    node: str
    limit: int | None
    at: float


# --- state -----------------------------------------------------------------------------------

@attrs.define(slots=True)
class Job:
    """A job that is queued or leased."""

    job_id: str
    idempotency_key: str
    requirement: Requirement
    carried: tuple[str, ...]
    size_mb: float
    submitted_at: float
    seq: int  # submission order: the queue is FIFO by it
    deliveries: int = 0
    spec: bytes = b""


@attrs.define(slots=True)
class Lease:
    """A live lease."""

    token: LeaseToken
    expires_at: float


def requirement_of(needs: tuple[CredentialVersion, ...], carried: tuple[str, ...]) -> Requirement:
    """What a node must hold to run a job: the needed versions it does not carry along."""
    if not needs:
        return ()
    if len(needs) == 1 and not carried:
        return tuple(needs)
    return tuple(sorted((c for c in needs if c.credential_id not in carried),
                        key=lambda c: (c.credential_id, c.version)))


class JobBook:
    """The mutable job part of the runtime's model (see ``kernel.Model``)."""

    __slots__ = (
        "active_keys", "completed", "dead_lettered", "expiring", "expiring_unsorted", "jobs",
        "latest_expiry", "leases", "limits", "next_seq", "node_leases", "pruned_at", "queues",
        "recent", "recent_jobs", "released", "submitted", "unpublished", "window_s",
    )

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.active_keys: dict[str, str] = {}  # idempotency key -> job id, queued or leased
        self.queues: dict[Requirement, deque[str]] = {}
        self.leases: dict[str, Lease] = {}
        self.node_leases: dict[str, set[str]] = {}
        # Every live lease's expiry, earliest first (see ``_expire_at``): job id -> expires_at.
        self.expiring: OrderedDict[str, float] = OrderedDict()
        self.latest_expiry = float("-inf")  # the latest expiry ever placed in ``expiring``
        self.expiring_unsorted = False  # an expiry came out of order: sort before reading
        self.recent: OrderedDict[str, tuple[LeaseToken, float]] = OrderedDict()  # completed keys
        self.recent_jobs: dict[str, LeaseToken] = {}  # the same completions, by job id
        # finished jobs whose result no host has confirmed publishing, in the order they ended:
        # job id -> (idempotency key, outcome, detail, when it ended); for the duplicate window
        self.unpublished: dict[str, tuple[str, str, str, float]] = {}
        self.window_s = 600.0  # the runtime's duplicate_window_s
        self.pruned_at = float("-inf")
        self.limits: dict[str, int] = {}  # overrides only
        self.next_seq = 1
        self.submitted = 0
        self.completed = 0
        self.dead_lettered = 0
        self.released = 0

    def copy(self) -> JobBook:
        """A deep copy (records are copied, immutable values shared)."""
        b = JobBook()
        b.jobs = {k: attrs.evolve(j) for k, j in self.jobs.items()}
        b.active_keys = dict(self.active_keys)
        b.queues = {k: deque(q) for k, q in self.queues.items() if q}
        b.leases = {k: Lease(v.token, v.expires_at) for k, v in self.leases.items()}
        b.node_leases = {k: set(v) for k, v in self.node_leases.items() if v}
        b.expiring = OrderedDict(self.expiring)
        b.latest_expiry, b.expiring_unsorted = self.latest_expiry, self.expiring_unsorted
        b.recent = OrderedDict(self.recent)
        b.recent_jobs = dict(self.recent_jobs)
        b.unpublished = dict(self.unpublished)
        b.window_s, b.pruned_at = self.window_s, self.pruned_at
        b.limits = dict(self.limits)
        b.next_seq = self.next_seq
        b.submitted, b.completed = self.submitted, self.completed
        b.dead_lettered, b.released = self.dead_lettered, self.released
        return b

    def fingerprint(self) -> tuple[Any, ...]:
        """Plain values for equality: equal books have equal fingerprints."""
        return (
            tuple(sorted((k, attrs.astuple(j, recurse=False)) for k, j in self.jobs.items())),
            # requirements as plain tuples: CredentialVersion does not order
            tuple(sorted((tuple(attrs.astuple(c) for c in k), tuple(q))
                         for k, q in self.queues.items() if q)),
            tuple(sorted((k, v.token, v.expires_at) for k, v in self.leases.items())),
            tuple(self.recent.items()),
            tuple(self.unpublished.items()),
            self.window_s, self.pruned_at,
            tuple(sorted(self.limits.items())),
            self.next_seq, self.submitted, self.completed, self.dead_lettered, self.released,
        )

    def running(self, node: str) -> int:
        """How many live leases ``node`` holds."""
        held = self.node_leases.get(node)
        return len(held) if held else 0

    def queued(self) -> int:
        """How many jobs wait in the queue."""
        return len(self.jobs) - len(self.leases)

    def prune_recent(self, now: float) -> None:
        """Forget completed keys, and results no host confirmed publishing, older than the
        duplicate window (so the state stays bounded whatever the hosts do: a host without a
        channel never confirms).

        Amortised: at most every 1/16 of the window (submissions judge the window by time
        themselves, so a key kept a little longer changes no decision).
        """
        window_s = self.window_s
        if now - self.pruned_at < window_s / 16:
            return
        self.pruned_at = now
        recent, recent_jobs = self.recent, self.recent_jobs
        old: list[str] = []  # both in the order the jobs ended, which the log's time follows
        for key, (token, at) in recent.items():
            if now - at < window_s:
                break
            old.append(key)
            recent_jobs.pop(token.job_id, None)
        for key in old:
            del recent[key]
        unpublished = self.unpublished
        old = []
        for job_id, result in unpublished.items():
            if now - result[3] < window_s:
                break
            old.append(job_id)
        for job_id in old:
            del unpublished[job_id]

    def _expiries(self) -> OrderedDict[str, float]:
        """``expiring``, sorted first if an expiry came out of order (cache upkeep only: what
        the book means does not change, so queries may call this)."""
        if self.expiring_unsorted:
            self.expiring = OrderedDict(sorted(self.expiring.items(), key=_expiry))
            self.expiring_unsorted = False
        return self.expiring

    def next_expiry(self) -> float | None:
        """When the earliest live lease expires, if any."""
        for expires_at in self._expiries().values():
            return expires_at
        return None

    def expired(self, at: float) -> list[Lease]:
        """Live leases whose expiry is at or before ``at``, earliest first (ties by job id)."""
        out = []
        leases = self.leases
        for job_id, expires_at in self._expiries().items():
            if expires_at > at:
                break
            out.append(leases[job_id])
        if len(out) > 1:
            out.sort(key=_lease_order)
        return out

    def _unlease(self, job_id: str) -> Lease:
        lease = self.leases.pop(job_id)
        del self.expiring[job_id]
        held = self.node_leases[lease.token.node]
        held.discard(job_id)
        if not held:
            del self.node_leases[lease.token.node]
        return lease

    def _forget(self, job_id: str) -> Job:
        job = self.jobs.pop(job_id)
        del self.active_keys[job.idempotency_key]
        return job

    def _lease(self, token: LeaseToken, expires_at: float) -> None:
        self.leases[token.job_id] = Lease(token, expires_at)
        self.node_leases.setdefault(token.node, set()).add(token.job_id)
        self._expire_at(token.job_id, expires_at)

    def _expire_at(self, job_id: str, expires_at: float) -> None:
        """Place ``job_id``'s live lease at ``expires_at`` in ``expiring``.

        A lease is granted or renewed for the lock duration from the decision's time, and the
        core's time never goes back, so expiries arrive in order: the newest goes last, each
        in O(1) (a heap cost a log factor per grant and renewal, and a pop for every entry
        that a renewal or an end left stale). One out of order (a restored snapshot lists
        leases by grant) marks the order for sorting when it is next read.
        """
        order = self.expiring
        order.pop(job_id, None)
        order[job_id] = expires_at
        if expires_at >= self.latest_expiry:
            self.latest_expiry = expires_at
        else:
            self.expiring_unsorted = True


def _expiry(item: tuple[str, float]) -> float:
    return item[1]


def _lease_order(lease: Lease) -> tuple[float, str]:
    return lease.expires_at, lease.token.job_id


# --- evolve handlers (leasing.EVOLVE; decide.py merges them) ---------------------------------

def _job_submitted(m: Any, e: JobSubmitted) -> None:
    b: JobBook = m.jobs
    req = requirement_of(e.needs, e.carried) if e.needs else ()
    b.jobs[e.job_id] = Job(e.job_id, e.idempotency_key, req, e.carried, e.size_mb, e.at, b.next_seq,
                           spec=e.spec)
    b.next_seq += 1
    b.active_keys[e.idempotency_key] = e.job_id
    q = b.queues.get(req)
    if q is None:
        q = b.queues[req] = deque()
    q.append(e.job_id)
    b.submitted += 1
    if e.at - b.pruned_at >= b.window_s / 16:  # prune_recent's own test, without the call
        b.prune_recent(e.at)


def _job_leased(m: Any, e: JobLeased) -> None:
    b: JobBook = m.jobs
    job = b.jobs[e.token.job_id]
    q = b.queues[job.requirement]
    # The dispatcher takes queue heads, so this is almost always popleft.
    if q[0] == job.job_id:
        q.popleft()
    else:
        q.remove(job.job_id)
    if not q:
        del b.queues[job.requirement]
    job.deliveries = e.token.delivery
    b._lease(e.token, e.expires_at)
    m.jobs_moved(e.expires_at)


def _lease_renewed(m: Any, e: LeaseRenewed) -> None:
    b: JobBook = m.jobs
    lease = b.leases[e.token.job_id]
    lease.expires_at = e.expires_at
    b._expire_at(e.token.job_id, e.expires_at)
    m.jobs_moved(e.expires_at)


def _leases_renewed(m: Any, e: LeasesRenewed) -> None:
    b: JobBook = m.jobs
    leases, expire_at, expires_at = b.leases, b._expire_at, e.expires_at
    for token in e.tokens:
        leases[token.job_id].expires_at = expires_at
        expire_at(token.job_id, expires_at)
    m.jobs_moved(expires_at)


def _job_completed(m: Any, e: JobCompleted) -> None:
    b: JobBook = m.jobs
    b._unlease(e.token.job_id)
    b._forget(e.token.job_id)
    b.recent[e.idempotency_key] = (e.token, e.at)
    b.recent_jobs[e.token.job_id] = e.token
    b.unpublished[e.token.job_id] = (e.idempotency_key, "completed", "", e.at)
    b.completed += 1
    if e.at - b.pruned_at >= b.window_s / 16:
        b.prune_recent(e.at)


def _job_released(m: Any, e: JobReleased) -> None:
    b: JobBook = m.jobs
    b._unlease(e.token.job_id)
    job = b.jobs[e.token.job_id]
    q = b.queues.get(job.requirement)
    if q is None:
        q = b.queues[job.requirement] = deque()
    # Redelivered first, as a peek-lock queue does, but in submission order among the jobs
    # released before it: one decision can end several leases (a node lost), and appendleft
    # alone would requeue them newest first. Queues stay sorted by seq; the walk passes only
    # jobs released earlier (bounded by live work, not by the queue).
    jobs, i = b.jobs, 0
    while i < len(q) and jobs[q[i]].seq < job.seq:
        i += 1
    q.insert(i, job.job_id)
    b.released += 1


def _job_dead_lettered(m: Any, e: JobDeadLettered) -> None:
    b: JobBook = m.jobs
    b._unlease(e.token.job_id)
    b._forget(e.token.job_id)
    b.unpublished[e.token.job_id] = (e.idempotency_key, "dead_lettered", e.detail, e.at)
    b.dead_lettered += 1
    if e.at - b.pruned_at >= b.window_s / 16:
        b.prune_recent(e.at)


def _job_results_published(m: Any, e: JobResultsPublished) -> None:
    unpublished = m.jobs.unpublished
    for job_id in e.job_ids:
        unpublished.pop(job_id, None)


def _concurrency_limit_set(m: Any, e: ConcurrencyLimitSet) -> None:
    b: JobBook = m.jobs
    if e.limit is None:
        b.limits.pop(e.node, None)
    else:
        b.limits[e.node] = e.limit


JOB_EVOLVE: dict[type, Any] = {
    JobSubmitted: _job_submitted,
    JobLeased: _job_leased,
    LeaseRenewed: _lease_renewed,
    LeasesRenewed: _leases_renewed,
    JobCompleted: _job_completed,
    JobReleased: _job_released,
    JobDeadLettered: _job_dead_lettered,
    JobResultsPublished: _job_results_published,
    ConcurrencyLimitSet: _concurrency_limit_set,
}
