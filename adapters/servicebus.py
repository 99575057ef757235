"""The control channel on Azure Service Bus, through the ``azure-servicebus`` SDK (``shir[azure]``).

Two queues of one namespace: job requests (``shir-jobs`` by default) received in peek-lock mode,
and results (``shir-results``) that ``shir job show`` reads back by peeking. Semantics are those
of :mod:`shir.adapters.channel`; this module maps them onto the SDK:

- A request is one message, ``message_id`` = the job's idempotency key (the format is in
  :mod:`shir.adapters.servicebus_messages`). Enable duplicate detection on the queue to have a
  resent id dropped; without it the runtime's idempotency key absorbs the duplicate.
- ``receive`` uses a receiver with ``prefetch_count=0``: the SDK grants link credit for exactly
  the ``max_count`` asked (the dispatcher's free capacity), and releases, uncounted, what it
  reads between calls. A message that is not a shir request (not a msgpack map of the right
  fields, or too large) is dead-lettered with reason ``MalformedJobRequest``, not returned.
- The lock clock starts when the service transfers a message, and a receive call that returns
  early leaves link credit open, so a message may wait in the socket until the next call: one
  that arrives with less than half the queue's lock duration left (learnt from the first
  renewal) is renewed before it is handed over, and one whose lock lapsed is not handed over.
- Locks are the SDK's: ``renew``, ``complete``, ``abandon`` and ``dead_letter`` take the lock
  token of a message this channel object received. ``MessageLockLostError``,
  ``MessageAlreadySettled`` and an unknown token raise :class:`~shir.adapters.channel.LockLost`.
- Transient failures (a dropped connection, a link Service Bus closed after 10 idle minutes,
  throttling, an ``OperationTimeoutError``) are retried ``attempts`` times with exponential
  backoff on top of the SDK's own retries (``retry_total=3``); then they raise
  :class:`~shir.adapters.channel.ChannelError`. Before anything has worked on this namespace,
  only throttling is retried: the SDK's retries already tell a wrong address. An operation
  whose outcome stayed unknown is safe to repeat: a resent request is absorbed by its message
  id, and a settlement that comes back ``LockLost`` after an unknown first attempt only means
  the message may be redelivered, which the idempotency key absorbs too.
- Results are messages on the reply queue, one per (message id, outcome), kept for
  ``result_ttl_s``; ``results`` peeks the queue and drops repeats.

The connection string (or the SAS in it) is held in an object that never prints it; errors
name the namespace and queue only, and any text from the SDK is scrubbed of the key and of
``sig=`` values before it reaches an exception. Network tracing (``logging_enable``) is refused:
it would log the CBS token.

Verified here with the unchanged SDK on the wire against ``tests/sbbroker.py``, a test double
of the protocol (not Azure); against a real namespace only when ``SHIR_SERVICEBUS_CONNECTION_
STRING`` is set (see docs/channel.md).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import msgpack

from shir.adapters.channel import (
    ChannelError,
    DeadLetter,
    JobRequest,
    JobResult,
    LockLost,
    ReceivedRequest,
)
from shir.adapters.closing import CloseOnExit
from shir.adapters.proxy import ClientProxy, proxy_refused
from shir.adapters.servicebus_messages import (
    CONTENT_TYPE,
    MALFORMED_REASON,
    MAX_DESCRIPTION,
    MAX_REASON,
    RESULT_CONTENT_TYPE,
    Secret,
    decode_fields,
    decode_request,
    encode_request,
    epoch,
    parse_connection_string,
    result_id,
    scrub,
)

__all__ = ["DEFAULT_QUEUE", "DEFAULT_REPLY_QUEUE", "MALFORMED_REASON", "ServiceBusChannel"]

DEFAULT_QUEUE = "shir-jobs"
DEFAULT_REPLY_QUEUE = "shir-results"
MIN_WAIT_S = 0.1  # a receive is a round trip: a zero wait still grants credit and listens
PEEK_PAGE = 250
MAX_PEEKED = 100_000  # results and dead letters read back at most (a bound on untrusted input)

T = TypeVar("T")


class ServiceBusChannel(CloseOnExit):
    """The :class:`~shir.adapters.channel.ControlChannel` port on Azure Service Bus queues.

    ``connection_string`` is the namespace's (``Endpoint=sb://...;SharedAccessKeyName=...;
    SharedAccessKey=...``, or with ``SharedAccessSignature=``); an ``EntityPath`` in it names
    the request queue. ``settle_timeout_s`` bounds the wait for the broker to confirm one
    settlement (the SDK waits 60 s by default); ``attempts``, ``backoff_s`` and
    ``backoff_max_s`` shape the retries of transient failures; ``sdk_options`` go to
    ``ServiceBusClient.from_connection_string`` (``retry_backoff_factor``...). ``proxy`` is the
    node's proxy: when one applies, the client speaks AMQP over WebSockets through it (port
    443 through ``CONNECT``), and errors name it.
    """

    def __init__(
        self, connection_string: str, *, queue: str | None = None,
        reply_queue: str = DEFAULT_REPLY_QUEUE, settle_timeout_s: float = 10.0,
        attempts: int = 4, backoff_s: float = 0.2, backoff_max_s: float = 5.0,
        result_ttl_s: float = 7 * 86400.0, sdk_options: Mapping[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep, proxy: ClientProxy | None = None,
    ) -> None:
        try:
            from azure.servicebus import ServiceBusClient
        except ImportError:
            raise ChannelError(
                "the Service Bus channel needs the azure-servicebus package: "
                "pip install 'shir[azure]'"
            ) from None
        if not isinstance(connection_string, str):
            raise ChannelError("the Service Bus connection string must be text")
        settings = parse_connection_string(connection_string)
        self._secret = Secret(connection_string.strip())
        self._keys = tuple(
            Secret(v) for k, v in settings.items()
            if k in ("sharedaccesskey", "sharedaccesssignature")
        )
        self.namespace = settings["endpoint"][len("sb://"):].strip("/")
        through = proxy.servicebus_options(self.namespace) if proxy is not None else {}
        self._via = proxy.describe() if proxy is not None and through else ""
        if proxy is not None:  # its password is scrubbed from SDK text like the key
            self._keys += tuple(Secret(s) for s in proxy.secrets())
        self.queue = queue or settings.get("entitypath") or DEFAULT_QUEUE
        self.reply_queue = reply_queue
        if type(attempts) is not int or attempts < 1 or not settle_timeout_s > 0:
            raise ChannelError(
                f"attempts must be an int >= 1 and settle_timeout_s > 0, got {attempts!r} and "
                f"{settle_timeout_s!r}"
            )
        options = {**(sdk_options or {}), **through}
        if options.pop("logging_enable", False):
            raise ChannelError(
                "logging_enable (the SDK's network trace) would log the namespace's token: "
                "leave it off"
            )
        self._settle_timeout_s = float(settle_timeout_s)
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._result_ttl = timedelta(seconds=result_ttl_s)
        self._sleep = sleep
        self._mutex = threading.RLock()
        self._held: dict[str, Any] = {}  # lock token -> the SDK's received message
        self._lock_s: float | None = None  # the queue's lock duration, once a renewal shows it
        self._reached = False  # whether any operation has succeeded on this namespace
        self._senders: dict[str, Any] = {}
        self._receivers: dict[str, Any] = {}
        sdk_entity = connection_string.strip()
        if "entitypath" in settings:  # the SDK binds a client with EntityPath to that entity
            sdk_entity = ";".join(
                p for p in sdk_entity.split(";") if not p.strip().lower().startswith("entitypath=")
            )
        try:
            self._client: Any = ServiceBusClient.from_connection_string(sdk_entity, **options)
        except (ValueError, TypeError) as exc:
            raise ChannelError(
                f"Service Bus refused the connection string for {self.namespace}: "
                f"{self._scrub(str(exc))}"
            ) from None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ServiceBusChannel:
        """A channel on ``servicebus://KEYNAME:KEY@NAMESPACE[:PORT]/QUEUE[?reply=Q&emulator=true]``.

        The key is percent-encoded (``/`` as ``%2F``, ``+`` as ``%2B``, ``=`` as ``%3D``);
        ``emulator=true`` means plain AMQP on the given port (the Service Bus emulator, or
        shir's test broker). A plain connection string works too (see :func:`open_channel`).
        """
        from shir.adapters.channels import servicebus_url_to_settings

        connection_string, queue, reply = servicebus_url_to_settings(url)
        return cls(connection_string, queue=queue, reply_queue=reply, **options)

    def __repr__(self) -> str:
        return (f"ServiceBusChannel(namespace={self.namespace!r}, queue={self.queue!r}, "
                f"reply_queue={self.reply_queue!r})")

    # -- plumbing ----------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secret.reveal(), *(k.reveal() for k in self._keys))

    def _live(self) -> Any:
        if self._client is None:
            raise ChannelError(f"the Service Bus channel on {self.namespace} is closed; open a "
                               "new one")
        return self._client

    def _sender(self, queue: str) -> Any:
        if queue not in self._senders:
            self._senders[queue] = self._live().get_queue_sender(queue)
        return self._senders[queue]

    def _receiver(self, queue: str, *, dead_letters: bool = False) -> Any:
        key = queue + ("/$deadletterqueue" if dead_letters else "")
        if key not in self._receivers:
            from azure.servicebus import ServiceBusSubQueue

            self._receivers[key] = self._live().get_queue_receiver(
                queue, prefetch_count=0, timeout=self._settle_timeout_s,
                sub_queue=ServiceBusSubQueue.DEAD_LETTER if dead_letters else None,
            )
        return self._receivers[key]

    def _call(self, doing: str, operation: Callable[[], T], *, deadline: float | None = None,
              token: str | None = None) -> T:
        """Run ``operation``, mapping the SDK's errors and retrying transient ones."""
        from azure.servicebus.exceptions import (
            MessageAlreadySettled,
            MessageLockLostError,
            MessageNotFoundError,
            MessageSizeExceededError,
            MessagingEntityDisabledError,
            MessagingEntityNotFoundError,
            ServiceBusAuthenticationError,
            ServiceBusAuthorizationError,
            ServiceBusError,
            ServiceBusQuotaExceededError,
            ServiceBusServerBusyError,
        )

        where = f"{self.namespace} ({doing})"
        last = ""
        for attempt in range(1, self._attempts + 1):
            self._live()
            try:
                result = operation()
                self._reached = True
                return result
            except (MessageLockLostError, MessageAlreadySettled, MessageNotFoundError):
                if token is not None:
                    self._held.pop(token, None)
                raise LockLost(
                    f"cannot {doing}: the lock {token!r} has expired or the message was settled "
                    "already; another delivery of the request may own it now: do not act on "
                    "this delivery"
                ) from None
            except (ServiceBusAuthenticationError, ServiceBusAuthorizationError) as exc:
                self._check_proxy(exc, where)
                raise ChannelError(
                    f"Service Bus {where}: not authorized ({self._scrub(str(exc))}); check the "
                    "key name and key (or the SAS) and that the policy has Send and Listen"
                ) from None
            except (MessagingEntityNotFoundError, MessagingEntityDisabledError) as exc:
                raise ChannelError(
                    f"Service Bus {where}: the queue is missing or disabled "
                    f"({self._scrub(str(exc))}); create queues {self.queue!r} and "
                    f"{self.reply_queue!r} in the namespace, or name others"
                ) from None
            except (MessageSizeExceededError, ServiceBusQuotaExceededError) as exc:
                raise ChannelError(
                    f"Service Bus {where}: refused for size or quota ({self._scrub(str(exc))})"
                ) from None
            except (ServiceBusError, OSError, RuntimeError) as exc:
                # Connection loss, an idle link closed by the service, throttling, a timeout
                # with an unknown outcome: the SDK retried already; back off and try again.
                # A namespace never reached is a wrong address, not a passing fault: the SDK's
                # own retries were enough to say so.
                self._check_proxy(exc, where)
                last = f"{type(exc).__name__}: {self._scrub(str(exc))}"
                if not self._reached and not isinstance(exc, ServiceBusServerBusyError):
                    break
            except ValueError as exc:  # the SDK's "handler has already been shutdown"
                if token is not None:  # its receiver is gone: nobody here can settle it now
                    self._held.pop(token, None)
                    raise LockLost(
                        f"cannot {doing}: the link that received {token!r} was shut down; the "
                        "request comes back when its lock ends: do not act on this delivery"
                    ) from None
                last = f"{type(exc).__name__}: {self._scrub(str(exc))}"
                self._reset_handlers()
            if attempt == self._attempts:
                break
            pause = min(self._backoff_max_s, self._backoff_s * 2 ** (attempt - 1))
            if deadline is not None and time.monotonic() + pause > deadline:
                break
            self._sleep(pause)
        reach = (f"through the {self._via} (check its address and port with shir node proxy, "
                 f"and that it lets {self.namespace}:443 through)" if self._via
                 else "from this machine (outbound 5671 or 443)")
        raise ChannelError(
            f"Service Bus {where} failed after {attempt} attempt(s): {last}; check that the "
            f"namespace is reachable {reach}, then retry"
        )

    def _check_proxy(self, exc: BaseException, where: str) -> None:
        """Raise a :class:`ChannelError` naming the proxy when it refused its credentials."""
        if self._via and proxy_refused(exc):
            raise ChannelError(
                f"Service Bus {where}: the {self._via} refused this node's proxy credentials "
                "(HTTP 407 Proxy Authentication Required): set its user and password again "
                "with shir node proxy (they are not shown here)"
            ) from None

    def _reset_handlers(self) -> None:
        """Drop the SDK's senders and receivers (after one shut down); locks held are lost."""
        for handler in [*self._senders.values(), *self._receivers.values()]:
            with contextlib.suppress(Exception):
                handler.close()
        self._senders.clear()
        self._receivers.clear()
        self._held.clear()

    def _held_message(self, token: str, doing: str) -> Any:
        message = self._held.get(str(token))
        if message is None:
            raise LockLost(
                f"cannot {doing}: the lock {token!r} is settled, expired or was not received by "
                "this channel; another delivery of the request may own it now: do not act on "
                "this delivery"
            )
        return message

    # -- the ControlChannel port -------------------------------------------------------------

    def send(self, requests: Sequence[JobRequest]) -> None:
        """Queue ``requests`` (in batches of what fits in one Service Bus message)."""
        from azure.servicebus import ServiceBusMessage

        messages = [
            ServiceBusMessage(encode_request(r), message_id=r.message_id, subject=r.kind,
                              content_type=CONTENT_TYPE)
            for r in requests
        ]
        if not messages:
            return
        with self._mutex:
            sender = self._sender(self.queue)

            def send_all() -> None:
                batch = sender.create_message_batch()
                for m in messages:
                    try:
                        batch.add_message(m)
                    except ValueError:  # full: send it and start the next
                        sender.send_messages(batch)
                        batch = sender.create_message_batch()
                        batch.add_message(m)
                sender.send_messages(batch)

            # A retry after an unknown outcome resends: the message ids absorb it.
            self._call("send job requests", send_all)

    def receive(self, max_count: int, wait_s: float) -> list[ReceivedRequest]:
        """Lock up to ``max_count`` requests, waiting at most ``wait_s`` (at least 0.1 s)."""
        if type(max_count) is not int or max_count < 1:
            raise ChannelError(f"max_count must be an int >= 1, got {max_count!r}")
        wait = max(MIN_WAIT_S, float(wait_s))
        deadline = time.monotonic() + wait + 2 * self._backoff_max_s
        with self._mutex:
            self._forget_expired()

            def receive_now() -> list[Any]:
                receiver = self._receiver(self.queue)
                # Open (or reopen, after a drop) the link with the SDK's own budget: inside
                # receive_messages the open would have to fit in this call's short wait.
                receiver.__enter__()
                left = max(MIN_WAIT_S, min(wait, deadline - time.monotonic()))
                return list(receiver.receive_messages(max_message_count=max_count,
                                                      max_wait_time=left))

            got = self._call("receive job requests", receive_now, deadline=deadline)
            out = []
            for message in got:
                try:
                    request = decode_request(message)
                except ValueError as exc:
                    self._dead_letter_malformed(message, str(exc))
                    continue
                token = str(message.lock_token)
                self._held[token] = message
                try:
                    locked_until = self._fresh_lock(token, message)
                except LockLost:
                    continue  # it lapsed in the link: it comes back with its count raised
                except ChannelError:  # could not renew now: hand it over with the lock it has
                    locked_until = epoch(message.locked_until_utc)
                # Service Bus puts DeliveryCount - 1 in the AMQP header (the spec counts from
                # 0) and the Python SDK passes it on as is; the port counts from 1.
                out.append(ReceivedRequest(
                    request, token, int(message.delivery_count or 0) + 1, locked_until,
                ))
            return out

    def _fresh_lock(self, token: str, message: Any) -> float:
        """``locked_until``, renewed first when the message spent over half its lock in the link.

        The lock clock starts when the service transfers the message, and a receive call that
        returned early leaves link credit open: a message sent then waits in the socket until
        the next call. The lock duration (the queue's) is learnt from the first renewal.
        """
        locked_until = epoch(message.locked_until_utc)
        if self._lock_s is not None and locked_until - time.time() >= self._lock_s / 2:
            return locked_until
        renewed = self.renew(token)
        if self._lock_s is None:
            self._lock_s = max(0.0, renewed - time.time())
        return renewed

    def _dead_letter_malformed(self, message: Any, why: str) -> None:
        receiver = self._receiver(self.queue)
        with contextlib.suppress(ChannelError):  # else its lock expires and it comes back
            self._call("dead-letter a malformed message", lambda: receiver.dead_letter_message(
                message, reason=MALFORMED_REASON,
                error_description=f"not a shir job request: {why}"[:MAX_DESCRIPTION]))

    def _forget_expired(self) -> None:
        """Drop messages whose lock ended a minute ago: no call can settle them any more."""
        now = time.time()
        for token, message in list(self._held.items()):
            if epoch(message.locked_until_utc) < now - 60:
                del self._held[token]

    def renew(self, lock_token: str) -> float:
        """Extend the lock; return the new ``locked_until``."""
        with self._mutex:
            self._live()
            message = self._held_message(lock_token, "renew the lock")
            receiver = self._receiver(self.queue)
            until = self._call("renew a lock", lambda: receiver.renew_message_lock(message),
                               token=lock_token)
            return epoch(until)

    def _settle(self, lock_token: str, doing: str, how: Callable[[Any, Any], None]) -> None:
        with self._mutex:
            self._live()
            message = self._held_message(lock_token, doing)
            receiver = self._receiver(self.queue)
            self._call(doing, lambda: how(receiver, message), token=lock_token)
            self._held.pop(lock_token, None)

    def complete(self, lock_token: str) -> None:
        """Remove the request for good."""
        self._settle(lock_token, "complete the request", lambda r, m: r.complete_message(m))

    def abandon(self, lock_token: str) -> None:
        """Make the request visible again at once (its delivery count rises)."""
        self._settle(lock_token, "abandon the request", lambda r, m: r.abandon_message(m))

    def dead_letter(self, lock_token: str, reason: str) -> None:
        """Move the request to the dead-letter queue; ``reason`` becomes its DeadLetterReason."""
        text = str(reason)
        self._settle(lock_token, "dead-letter the request", lambda r, m: r.dead_letter_message(
            m, reason=text[:MAX_REASON], error_description=text[:MAX_DESCRIPTION]))

    def publish_result(self, result: JobResult) -> None:
        """Publish ``result`` on the reply queue (its id is one per request and outcome)."""
        from azure.servicebus import ServiceBusMessage

        body = msgpack.packb({
            "v": 1, "message_id": result.message_id, "job_id": result.job_id,
            "outcome": result.outcome, "detail": result.detail[:MAX_DESCRIPTION],
            "at": float(result.at),
        })
        message = ServiceBusMessage(
            body, message_id=result_id(result.message_id, result.outcome),
            subject=result.outcome, content_type=RESULT_CONTENT_TYPE,
            time_to_live=self._result_ttl,
        )
        with self._mutex:
            sender = self._sender(self.reply_queue)
            self._call("publish a job result", lambda: sender.send_messages(message))

    def _peek_all(self, receiver: Any, queue: str, doing: str) -> list[Any]:
        """Every message of a queue, by peeking page after page (at most MAX_PEEKED)."""
        out: list[Any] = []
        sequence = 1

        def peek(start: int) -> list[Any]:
            return list(receiver.peek_messages(max_message_count=PEEK_PAGE,
                                               sequence_number=start))

        while True:
            page = self._call(doing, partial(peek, sequence))
            if not page:
                return out
            out.extend(page)
            if len(out) >= MAX_PEEKED:
                raise ChannelError(
                    f"Service Bus {self.namespace}: more than {MAX_PEEKED} messages to read back "
                    f"from {queue!r}; let old ones expire or purge the queue"
                )
            sequence = max(int(m.sequence_number) for m in page) + 1

    def results(self, message_id: str | None = None) -> list[JobResult]:
        """Results on the reply queue, oldest first, each (message id, outcome) once."""
        with self._mutex:
            peeked = self._peek_all(self._receiver(self.reply_queue), self.reply_queue,
                                   "read job results")
        seen: set[tuple[str, str]] = set()
        out = []
        for message in peeked:
            try:
                f = decode_fields(message, {"message_id": str, "job_id": str, "outcome": str,
                                             "detail": str, "at": float})
            except ValueError:
                continue  # not a shir result: someone else's message on the reply queue
            key = (f["message_id"], f["outcome"])
            if key in seen or (message_id is not None and f["message_id"] != message_id):
                continue
            seen.add(key)
            out.append(JobResult(f["message_id"], f["job_id"], f["outcome"], f["detail"],
                                 f["at"]))
        return out

    def dead_letters(self) -> list[DeadLetter]:
        """The request queue's dead-letter queue, oldest first (peeked, not removed)."""
        with self._mutex:
            peeked = self._peek_all(self._receiver(self.queue, dead_letters=True),
                                    self.queue + "/$DeadLetterQueue", "read the dead-letter queue")
        out = []
        for message in peeked:
            try:
                request = decode_request(message)
            except ValueError:
                request = JobRequest(str(message.message_id or "?"), "?")
            out.append(DeadLetter(request, str(message.dead_letter_reason or ""),
                                  int(message.delivery_count or 0) + 1,
                                  epoch(message.enqueued_time_utc)))
        return out

    def queue_depth(self) -> int:
        """Requests waiting or locked on the request queue (peeked; at most MAX_PEEKED)."""
        with self._mutex:
            return len(self._peek_all(self._receiver(self.queue), self.queue, "count the queue"))

    def close(self) -> None:
        """Close the SDK's links and connection. Safe to call twice."""
        with self._mutex:
            if self._client is None:
                return
            self._reset_handlers()
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
