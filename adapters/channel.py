"""The control channel port: how job requests travel from the factory side to the runtime.

In the product the cloud service queues each job request on a queue and the runtime's
dispatcher polls it. The port is that queue with peek-lock semantics, as Azure Service Bus has
them: a received request is locked (invisible to other receivers) until ``locked_until``; the
receiver renews the lock, then settles it by completing (done: gone for good), abandoning
(visible again at once, one more delivery), or dead-lettering it with a reason. A lock that
expires makes the request visible again with its delivery count raised; past the queue's
maximum delivery count it is dead-lettered by the channel itself.

The dispatcher moves each request into the runtime's log as a job (idempotency key = the
request's ``message_id``) and completes the message only after that append is durable, so a
crash in between redelivers the request and the idempotency key absorbs the duplicate.

Results travel the other way on a reply queue (``publish_result`` / ``results``), which
``shir job show`` reads.

Implementations: the embedded channel (a SQLite file, for one site without Azure) and Azure
Service Bus. Both pass the one contract suite in ``tests/channel_contract.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from shir.core.errors import ShirError

__all__ = [
    "ChannelError",
    "ControlChannel",
    "DeadLetter",
    "JobRequest",
    "JobResult",
    "LockLost",
    "ReceivedRequest",
]


class ChannelError(ShirError):
    """The control channel could not do what was asked (unreachable, refused, throttled)."""


class LockLost(ChannelError):
    """The message's lock expired or was settled already: another delivery owns it now."""


@attrs.frozen
class JobRequest:
    """One job request as the factory side sends it. Never holds a secret in clear.

    ``credential`` is ciphertext sealed for the runtime (empty when the job carries none).
    """

    message_id: str  # the idempotency key of the job
    kind: str  # what to run: "test", "copy", ...
    spec: bytes = b""  # the kind's parameters, encoded by the factory side
    credential: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class ReceivedRequest:
    """A request received under a lock."""

    request: JobRequest
    lock_token: str
    delivery_count: int  # 1 on the first delivery
    locked_until: float  # wall-clock seconds since the epoch


@attrs.frozen
class JobResult:
    """What became of a job, published on the reply queue."""

    message_id: str
    job_id: str
    outcome: str  # "completed", "failed" or "dead_lettered"
    detail: str = ""
    at: float = 0.0


@attrs.frozen
class DeadLetter:
    """A request on the dead-letter queue, and why it is there."""

    request: JobRequest
    reason: str
    delivery_count: int
    at: float  # when it was dead-lettered (embedded) or enqueued (Service Bus), epoch seconds


@runtime_checkable
class ControlChannel(Protocol):
    """A peek-lock queue of job requests plus a reply queue of results."""

    def send(self, requests: Sequence[JobRequest]) -> None:
        """Queue ``requests`` (the factory side)."""
        ...

    def receive(self, max_count: int, wait_s: float) -> list[ReceivedRequest]:
        """Lock and return up to ``max_count`` visible requests, waiting at most ``wait_s``."""
        ...

    def renew(self, lock_token: str) -> float:
        """Extend the lock; return the new ``locked_until``. Raises :class:`LockLost`."""
        ...

    def complete(self, lock_token: str) -> None:
        """Remove the request for good. Raises :class:`LockLost` if the lock has ended."""
        ...

    def abandon(self, lock_token: str) -> None:
        """Make the request visible again at once (its delivery count rises)."""
        ...

    def dead_letter(self, lock_token: str, reason: str) -> None:
        """Move the request to the dead-letter queue with ``reason``."""
        ...

    def publish_result(self, result: JobResult) -> None:
        """Publish a job's result on the reply queue (idempotent per message id and outcome)."""
        ...

    def results(self, message_id: str | None = None) -> list[JobResult]:
        """Results published so far (all, or those of one request)."""
        ...

    def close(self) -> None:
        """Release connections; the channel is unusable afterwards."""
        ...
