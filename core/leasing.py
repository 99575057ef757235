"""Job leasing decisions: submit, dispatch, renew, complete, abandon, fail; limits.

The read side (job counters, scale advice) is in ``shir.core.capacity``.

Theory of operation
-------------------
Dispatch rule (load-aware): the dispatcher of the current term sends ``DispatchJobs``. Until no
queued job can be placed, take the oldest job among the heads of the requirement queues that some
worker with a free slot can serve; give it to the worker that is least loaded relative to its
limit (running / limit), ties to the earliest registered. A *worker* is a node that is Online or
Limited with a working control channel, holds the credential versions the job needs (unless the
job carries them), and is the dispatcher itself or reachable from it on the intranet port.

Concurrency limit per node: by default ``min(2 x cores, memory GiB)``, clamped to 1..64. A copy
job keeps about half a core busy and buffers around 1 GiB, so two per core and one per GiB keeps
a node neither idle nor swapping; the product likewise derives its default from cores and memory.
A user may override it within 1..256. Lowering a limit below what runs drains the node: no new
job until it is below the limit, and nothing is stopped.

Fencing: a ``DispatchJobs`` stamped with a term that is over is refused (``StaleTerm``); a lease
token that is not the job's live lease is refused (``StaleLease``), so a node back from
hibernation can neither dispatch nor finish work it held before the gap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from shir.core import events as ev
from shir.core.effects import AnnounceDispatcher, DeliverJob, PublishJobResult, StopJob
from shir.core.errors import Fenced, InvalidCommand, StaleTerm
from shir.core.jobs import (
    JOB_EVOLVE,
    ConcurrencyLimitSet,
    JobBook,
    JobCompleted,
    JobDeadLettered,
    JobLeased,
    JobReleased,
    JobResultsPublished,
    JobSubmitted,
    Lease,
    LeaseRenewed,
    LeasesRenewed,
    LeaseToken,
    ReleaseReason,
)
from shir.core.kernel import (
    Decider,
    Events,
    Handler,
    Model,
    Node,
    RuntimeState,
    TimedRule,
    check_utf8,
    emit,
    node_of,
    runtime_of,
)
from shir.core.model import CredentialVersion, NodeStatus
from shir.core.rules import reports_unreachable

__all__ = [
    "ANSWERS",
    "DECIDE",
    "DISPATCH_TRIGGERS",
    "EFFECTS",
    "EVOLVE",
    "LIMIT_RANGE",
    "RULES",
    "AbandonJob",
    "CompleteJob",
    "ConfirmResultsPublished",
    "DispatchJobs",
    "FailJob",
    "NotDispatcher",
    "RenewLease",
    "RenewLeases",
    "SetConcurrencyLimit",
    "StaleLease",
    "SubmitJob",
    "UnknownJob",
    "concurrency_limit",
    "default_limit",
    "end_leases",
    "lease_end",
    "limit_of",
    "unpublished_results",
]

MAX_SPEC_BYTES = 64 * 1024  # a job spec names its inputs; it does not carry them
MAX_CONFIRMED = 4096  # job ids per ConfirmResultsPublished: one event stays small
LIMIT_RANGE = (1, 256)  # bounds of a user override
_DEFAULT_RANGE = (1, 64)


class StaleLease(Fenced):
    """The lease token is not the job's live lease (expired, ended, or from another delivery):
    the lease is lost (reply: ``StopJob`` for that token)."""


class UnknownJob(Fenced):
    """No queued or leased job has this id (reply: ``StopJob`` for the token)."""


class NotDispatcher(Fenced):
    """Only the dispatcher of the current term may dispatch (reply: ``AnnounceDispatcher`` of
    the current term, to the sender)."""


# --- commands ----------------------------------------------------------------------------------

@attrs.frozen
class SubmitJob:
    """Queue a job. ``carried`` names needed credentials whose ciphertext travels with the job."""

    job_id: str
    idempotency_key: str
    at: float
    needs: tuple[CredentialVersion, ...] = ()
    carried: tuple[str, ...] = ()
    size_mb: float = 0.0
    # What to run, opaque to the core (a host's job kind and parameters, never a secret):
    # kept in the log so whichever node the job is delivered to can read it.
    spec: bytes = b""


@attrs.frozen
class DispatchJobs:
    """The dispatcher assigns queued jobs to workers with free slots (at most ``max_jobs``)."""

    node: str
    term: int
    at: float
    max_jobs: int | None = None


@attrs.frozen
class RenewLease:
    """Extend a lease by the lock duration."""

    token: LeaseToken
    at: float


@attrs.frozen
class RenewLeases:
    """Extend every one of these leases that is still live (a node's periodic keep-alive).

    The sender is answered ``StopJob`` ("lease lost") for every token whose lease has ended
    (``effects.answer``): the node may have missed the ``StopJob`` sent when it ended.
    """

    tokens: tuple[LeaseToken, ...]
    at: float


@attrs.frozen
class CompleteJob:
    """Finish a job under its live lease."""

    token: LeaseToken
    at: float


@attrs.frozen
class AbandonJob:
    """Give a job back to the queue (its delivery still counts)."""

    token: LeaseToken
    at: float
    reason: str = ""


@attrs.frozen
class FailJob:
    """Report that a job failed on this delivery; it is retried until max deliveries."""

    token: LeaseToken
    at: float
    reason: str = ""


@attrs.frozen
class ConfirmResultsPublished:
    """Record that these jobs' results are on the reply queue (``PublishJobResult`` carried
    out), so that no host publishes them again. Ids already confirmed are ignored."""

    job_ids: tuple[str, ...]
    at: float


@attrs.frozen
class SetConcurrencyLimit:
    """Override a node's concurrent-job limit (``None``: back to the default)."""

    node: str
    limit: int | None
    at: float


# --- limits ------------------------------------------------------------------------------------

def default_limit(cores: int, memory_mb: int) -> int:
    """The default concurrent-job limit of a node (see the module docstring)."""
    lo, hi = _DEFAULT_RANGE
    return max(lo, min(hi, 2 * cores, memory_mb // 1024))


def limit_of(b: JobBook, n: Node) -> int:
    """The concurrent-job limit in force on ``n`` (its override in ``b``, else the default)."""
    override = b.limits.get(n.name)
    return override if override is not None else default_limit(n.cores, n.memory_mb)


def concurrency_limit(state: RuntimeState, node: str) -> int:
    """The concurrent-job limit in force on ``node``."""
    m = state.model()
    return limit_of(m.jobs, node_of(m, node))


# --- decisions ---------------------------------------------------------------------------------

def _submit(m: Model, c: SubmitJob, k: Decider) -> Events:
    rt = runtime_of(m)
    job_id, key = c.job_id, c.idempotency_key
    if not (type(job_id) is str and 0 < len(job_id) <= 256 and job_id.isascii()
            and type(key) is str and 0 < len(key) <= 256 and key.isascii()):
        for what, v in (("job_id", job_id), ("idempotency_key", key)):
            if not isinstance(v, str) or not v or len(v) > 256:
                raise InvalidCommand(f"{what} must be 1-256 characters, got {v!r:.60}")
            check_utf8(what, v)
    if not (isinstance(c.size_mb, (int, float)) and c.size_mb >= 0):
        raise InvalidCommand(f"size_mb must be >= 0, got {c.size_mb!r}")
    if not isinstance(c.spec, bytes) or len(c.spec) > MAX_SPEC_BYTES:
        raise InvalidCommand(
            f"spec must be at most {MAX_SPEC_BYTES} bytes, got "
            f"{len(c.spec) if isinstance(c.spec, bytes) else type(c.spec).__name__}: "
            "keep large inputs in the source or sink and pass their names"
        )
    for cv in c.needs:
        if cv.version < 1:
            raise InvalidCommand(f"credential {cv.credential_id!r} version must be >= 1")
    b = m.jobs
    done = b.recent.get(c.idempotency_key)
    if c.idempotency_key in b.active_keys or (
        # ``recent`` is pruned only when job events are folded: judge the window by ``c.at``
        done is not None and c.at - done[1] < rt.settings.duplicate_window_s
    ):
        return []  # a duplicate: the key is queued, running or recently done
    if c.job_id in b.jobs:
        raise InvalidCommand(
            f"job id {c.job_id!r} is already in use by idempotency key "
            f"{b.jobs[c.job_id].idempotency_key!r}; use a new job id"
        )
    s, out = k.timed(m, c.at, jobs_only=True)
    emit(s, out, JobSubmitted(c.job_id, c.idempotency_key, tuple(c.needs), tuple(c.carried),
                               float(c.size_mb), c.at, c.spec))
    return out


def _holds(held: dict[str, int], requirement: tuple[CredentialVersion, ...]) -> bool:
    """Does a node holding ``held`` (credential id -> version) meet ``requirement``?"""
    for cv in requirement:  # noqa: SIM110 (a loop: all() over a generator costs a frame)
        if held.get(cv.credential_id, 0) < cv.version:
            return False
    return True


@attrs.define(slots=True)
class _Slots:
    node: Node
    running: int
    limit: int
    held: dict[str, int]  # the credential versions the node holds, read once per decision


def _dispatch(m: Model, c: DispatchJobs, k: Decider) -> Events:
    runtime_of(m)
    node_of(m, c.node)
    if c.max_jobs is not None and c.max_jobs < 0:
        raise InvalidCommand(f"max_jobs must be >= 0 or None, got {c.max_jobs}")
    s, out = k.timed(m, c.at, jobs_only=True)
    if c.term != s.term or c.node != s.dispatcher:
        current = AnnounceDispatcher(s.term, s.dispatcher, c.node)
        if c.term < s.term:
            raise StaleTerm(
                f"node {c.node!r} dispatched under term {c.term}, which is over (term {s.term}, "
                f"dispatcher {s.dispatcher!r}); it must not dispatch",
                current,
            )
        if c.term > s.term:
            raise InvalidCommand(f"term {c.term} has not begun (current term {s.term})")
        raise NotDispatcher(
            f"node {c.node!r} is not the dispatcher of term {s.term} ({s.dispatcher!r} is)",
            current,
        )
    b = s.jobs
    if not b.queues:
        return out
    me = s.nodes[c.node]
    reachable, reported_at = me.metrics.reachable_peers, me.last_seen_at
    # free slots of the workers, counting leases this decision already ended
    free: dict[str, _Slots] = {}
    pending = s.pending
    for n in s.nodes.values():
        if not (
            n.status in _WORKING
            and n.metrics.control_channel_ok  # its results could not reach the service otherwise
            and (n.name == c.node
                 or not reports_unreachable(reported_at, reachable, n.name, n.live_since))
        ):
            continue
        running = b.running(n.name)
        if pending:
            running -= sum(
                1 for j in pending if (lz := b.leases.get(j)) and lz.token.node == n.name
            )
        limit = limit_of(b, n)
        if running < limit:
            held = {cv.credential_id: cv.version for cv in n.metrics.credentials}
            free[n.name] = _Slots(n, running, limit, held)
    budget = c.max_jobs if c.max_jobs is not None else 1 << 62
    lock_s = runtime_of(s).settings.lock_duration_s
    # Per requirement queue, by position (requirements hash slowly): the queue, how far this
    # decision has taken from it, and its candidate slots until one fills up.
    queues = list(b.queues.items())
    offsets = [0] * len(queues)
    eligible: list[list[_Slots] | None] = [None] * len(queues)
    while free and budget > 0:
        best = -1
        best_seq = 0
        for qi, (req, q) in enumerate(queues):
            i = offsets[qi]
            if i >= len(q):
                continue
            seq = b.jobs[q[i]].seq
            if best >= 0 and seq >= best_seq:
                continue
            cands = eligible[qi]
            if cands is None:
                cands = eligible[qi] = [f for f in free.values() if _holds(f.held, req)]
            if cands:
                best, best_seq = qi, seq
        if best < 0:
            break
        cands = eligible[best]
        assert cands is not None
        job = b.jobs[queues[best][1][offsets[best]]]
        offsets[best] += 1
        # the least loaded relative to its limit, ties to the earliest registered
        slot = cands[0]
        for f in cands[1:]:
            if f.running * slot.limit < slot.running * f.limit or (
                f.running * slot.limit == slot.running * f.limit and f.node.seq < slot.node.seq
            ):
                slot = f
        token = LeaseToken(job.job_id, slot.node.name, s.term, job.deliveries + 1)
        emit(s, out, JobLeased(token, c.at + lock_s, c.at))
        slot.running += 1
        if slot.running >= slot.limit:
            del free[slot.node.name]
            eligible = [None] * len(queues)
        budget -= 1
    return out


_WORKING = (NodeStatus.ONLINE, NodeStatus.LIMITED)


def _live_lease(s: Model, token: LeaseToken, verb: str) -> Lease:
    b = s.jobs
    lease = b.leases.get(token.job_id)
    if lease is None or (lease.token is not token and lease.token != token) or (
        token.job_id in s.pending
    ):
        if lease is None and token.job_id not in b.jobs and token.job_id not in b.recent_jobs:
            raise UnknownJob(
                f"no queued or running job {token.job_id!r}: it never existed, was "
                "dead-lettered, or completed longer ago than the duplicate window",
                StopJob(token, "unknown job"),
            )
        raise StaleLease(
            f"cannot {verb} job {token.job_id!r}: delivery {token.delivery} to {token.node} in "
            f"term {token.term} is no longer its live lease (expired, ended, or the node was "
            "Offline); drop the work",
            StopJob(token, "lease lost"),
        )
    return lease


def _renew(m: Model, c: RenewLease, k: Decider) -> Events:
    runtime_of(m)
    _live_lease(m, c.token, "renew")
    s, out = k.timed(m, c.at, jobs_only=True)
    if out:
        _live_lease(s, c.token, "renew")  # settling may have ended it
    expires = c.at + runtime_of(s).settings.lock_duration_s
    emit(s, out, LeaseRenewed(c.token, expires, c.at))
    return out


def _renew_many(m: Model, c: RenewLeases, k: Decider) -> Events:
    runtime_of(m)
    s, out = k.timed(m, c.at, jobs_only=True)
    leases = s.jobs.leases
    pending = s.pending
    live: dict[str, LeaseToken] = {}  # by job: each live lease renewed once
    for token in c.tokens:
        lease = leases.get(token.job_id)
        if lease is not None and (lease.token is token or lease.token == token) and (
            token.job_id not in pending
        ):
            live[token.job_id] = token
    if live:
        # One event for the batch: a keep-alive renews every lease a node holds.
        expires = c.at + runtime_of(s).settings.lock_duration_s
        emit(s, out, LeasesRenewed(tuple(live.values()), expires, c.at))
    return out


def _complete(m: Model, c: CompleteJob, k: Decider) -> Events:
    runtime_of(m)
    b = m.jobs
    if c.token.job_id not in b.jobs and b.recent_jobs.get(c.token.job_id) == c.token:
        return []  # completed with this very token: satisfied, no second effect
    _live_lease(m, c.token, "complete")
    s, out = k.timed(m, c.at, jobs_only=True)
    if out:
        _live_lease(s, c.token, "complete")  # settling may have ended it
    emit(s, out, JobCompleted(c.token, b.jobs[c.token.job_id].idempotency_key, c.at))
    return out


def _give_back(m: Model, token: LeaseToken, at: float, reason: ReleaseReason,
               detail: str, verb: str, k: Decider) -> Events:
    runtime_of(m)
    _live_lease(m, token, verb)
    s, out = k.timed(m, at, jobs_only=True)
    lease = _live_lease(s, token, verb)
    emit(s, out, lease_end(s, lease, reason, detail or f"{reason.value} by {token.node}", at))
    return out


def _abandon(m: Model, c: AbandonJob, k: Decider) -> Events:
    return _give_back(m, c.token, c.at, ReleaseReason.ABANDONED, c.reason, "abandon", k)


def _fail(m: Model, c: FailJob, k: Decider) -> Events:
    return _give_back(m, c.token, c.at, ReleaseReason.FAILED, c.reason, "fail", k)


def _confirm_published(m: Model, c: ConfirmResultsPublished, k: Decider) -> Events:
    runtime_of(m)
    ids = c.job_ids
    if not (isinstance(ids, tuple) and len(ids) <= MAX_CONFIRMED
            and all(isinstance(j, str) for j in ids)):
        raise InvalidCommand(
            f"job_ids must be a tuple of at most {MAX_CONFIRMED} job ids (strings), got "
            f"{type(ids).__name__}{f' of {len(ids)}' if isinstance(ids, tuple) else ''}"
        )
    unpublished = m.jobs.unpublished
    job_ids = tuple(j for j in dict.fromkeys(ids) if j in unpublished)
    if not job_ids:
        return []  # confirmed already (or never finished): satisfied
    s, out = k.timed(m, c.at, jobs_only=True)
    emit(s, out, JobResultsPublished(job_ids, c.at))
    return out


def _set_limit(m: Model, c: SetConcurrencyLimit, k: Decider) -> Events:
    runtime_of(m)
    node_of(m, c.node)
    lo, hi = LIMIT_RANGE
    if c.limit is not None and not (isinstance(c.limit, int) and lo <= c.limit <= hi):
        raise InvalidCommand(
            f"concurrency limit for {c.node!r} must be {lo}..{hi} or None (default), "
            f"got {c.limit!r}"
        )
    if m.jobs.limits.get(c.node) == c.limit:
        return []
    s, out = k.timed(m, c.at, jobs_only=True)
    if c.node in s.nodes:
        emit(s, out, ConcurrencyLimitSet(c.node, c.limit, c.at))
    return out


DECIDE: dict[type, Handler] = {
    SubmitJob: _submit,
    DispatchJobs: _dispatch,
    RenewLease: _renew,
    RenewLeases: _renew_many,
    CompleteJob: _complete,
    AbandonJob: _abandon,
    FailJob: _fail,
    ConfirmResultsPublished: _confirm_published,
    SetConcurrencyLimit: _set_limit,
}


def unpublished_results(state: RuntimeState) -> tuple[PublishJobResult, ...]:
    """The results of finished jobs (completed or dead-lettered) that no host has confirmed
    publishing, oldest first: what a host taking over the factory side publishes again (a
    host may die between storing a job's end and publishing it). Publishing is at least once:
    a result published but not yet confirmed comes back here, and the reply queue keeps one
    result per (request, outcome). A result stays listed for the duplicate window at most
    (``duplicate_window_s``): one never confirmed within it (no channel, a reply queue down
    that long) leaves the list, and only the log keeps the job's outcome."""
    return tuple(PublishJobResult(job_id, key, outcome, detail)
                 for job_id, (key, outcome, detail, _at) in state.model().jobs.unpublished.items())


# --- effects: what the events tell whom ------------------------------------------------------

EFFECTS: dict[type, Callable[[Any], tuple[object, ...]]] = {
    JobLeased: lambda e: (DeliverJob(e.token, e.expires_at),),
    JobReleased: lambda e: (StopJob(e.token, e.detail),),
    JobCompleted: lambda e: (
        PublishJobResult(e.token.job_id, e.idempotency_key, "completed", ""),
    ),
    JobDeadLettered: lambda e: (
        StopJob(e.token, e.detail),
        PublishJobResult(e.token.job_id, e.idempotency_key, "dead_lettered", e.detail),
    ),
}

def _first_in_queue(m: Model, e: JobSubmitted) -> bool:
    """Is the job ``e`` queued the first of its requirement queue (in the state after it)?

    Only then does queueing it want a dispatch: the jobs ahead of it need the same nodes, so
    either a dispatch is already wanted for them (and will place it too) or none of them can
    be placed until a slot frees or a status changes, which want one of their own. A burst of
    submissions thus asks for one dispatch, not one each.
    """
    b = m.jobs
    job = b.jobs.get(e.job_id)
    if job is None:  # placed (or gone) in the same batch
        return False
    q = b.queues.get(job.requirement)
    return q is not None and q[0] == e.job_id


# A job queued first in its queue, a slot freed, a limit changed: queued work may be placed.
# None: always; a function: when it says so, given the model after the events.
DISPATCH_TRIGGERS: dict[type, Callable[[Model, Any], bool] | None] = {
    JobSubmitted: _first_in_queue,
    JobCompleted: None,
    JobReleased: None,
    JobDeadLettered: None,
    ConcurrencyLimitSet: None,
}


def _answer_renew(c: RenewLeases, events: tuple[object, ...], state: RuntimeState
                  ) -> tuple[object, ...]:
    """"Lease lost" for each token neither renewed nor ended (ended ones got ``StopJob``)."""
    # By job id (str hashes are cached; a token's hash is not): the token each event settled.
    settled: dict[str, LeaseToken] = {}
    for e in events:
        if type(e) is LeasesRenewed:
            settled.update((t.job_id, t) for t in e.tokens)
        elif isinstance(e, (JobReleased, JobDeadLettered)):
            settled[e.token.job_id] = e.token
    return tuple(
        StopJob(t, f"lease lost: delivery {t.delivery} of {t.job_id} in term {t.term} has ended")
        for t in c.tokens
        if (done := settled.get(t.job_id)) is None or (done is not t and done != t)
    )


ANSWERS: dict[type, Callable[[Any, tuple[object, ...], RuntimeState], tuple[object, ...]]] = {
    RenewLeases: _answer_renew,
}


# --- timed rules -------------------------------------------------------------------------------

def lease_end(s: Model, lease: Lease, reason: ReleaseReason, detail: str, at: float) -> object:
    """The end of a lease without completion: back to the queue (``JobReleased``), or
    ``JobDeadLettered`` after max deliveries."""
    token = lease.token
    max_deliveries = runtime_of(s).settings.max_deliveries
    if token.delivery >= max_deliveries:
        key = s.jobs.jobs[token.job_id].idempotency_key
        detail = f"{detail}; delivered {token.delivery} times (max {max_deliveries})"
        return JobDeadLettered(token, key, reason, detail, at)
    return JobReleased(token, reason, detail, at)


def end_leases(s: Model, at: float) -> tuple[Events, float | None]:
    """End the leases of nodes that went Offline or were removed, and those that expired."""
    b = s.jobs
    if not b.leases:
        return [], None
    out: Events = []
    ended = set(s.pending)  # ended or granted earlier in this decision
    for node in sorted(b.node_leases):
        n = s.nodes.get(node)
        if n is not None and n.status is not NodeStatus.OFFLINE:
            continue
        why = f"node {node} was removed" if n is None else f"node {node} went Offline"
        for job_id in sorted(b.node_leases[node]):
            if job_id not in ended:
                ended.add(job_id)
                out.append(lease_end(s, b.leases[job_id], ReleaseReason.NODE_LOST, why, at))
    for lease in b.expired(at):
        if lease.token.job_id not in ended:
            ended.add(lease.token.job_id)
            out.append(lease_end(s, lease, ReleaseReason.EXPIRED,
                                 f"lease expired at {lease.expires_at:g} s without renewal", at))
    return out, b.next_expiry()


# Besides its leases (job events), it reads which nodes are Offline or gone.
_READS = frozenset({ev.RuntimeCreated, ev.NodeStatusChanged, ev.NodeRemoved, ev.NodeLeft})
RULES: tuple[TimedRule, ...] = (
    TimedRule("leases", end_leases, moved_by_jobs=True, reads=_READS),
)
EVOLVE = JOB_EVOLVE  # the job events' handlers live with the job book (shir.core.jobs)
