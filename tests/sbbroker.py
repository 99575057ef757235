"""A wire-level TEST DOUBLE of the Azure Service Bus AMQP protocol, written for shir's tests.

This is not Azure and not the Service Bus emulator. It implements only what the unchanged
``azure-servicebus`` SDK needs to send, receive in peek-lock mode, renew locks and settle, so
that shir's Service Bus adapter can be tested with the real SDK on the wire:

- ``$cbs`` put-token: answered with ``status-code`` 200 and the request's id as correlation id
  (any token is accepted: this broker checks no signature).
- ``<entity>/$management``: ``com.microsoft:renew-lock`` (statusCode 200 and
  ``{"expirations": [...]}``) and ``com.microsoft:update-disposition``; an unknown lock answers
  410 ``com.microsoft:message-lock-lost``.
- Deliveries carry the lock token (a UUID, ``bytes_le``) as delivery tag and the annotations
  ``x-opt-locked-until``, ``x-opt-sequence-number``, ``x-opt-enqueued-time``.
- Every outcome is echoed and settled: accepted = complete, modified = abandon (counted as a
  delivery when ``delivery-failed`` is set, as AMQP says), released = back on the queue without
  counting the delivery (the SDK releases what arrives between its receive calls), modified with
  undeliverable-here = defer, rejected with ``com.microsoft:dead-letter`` = move to
  ``<entity>/$DeadLetterQueue``. A settlement of an expired lock is rejected with
  ``com.microsoft:message-lock-lost``.
- Lock expiry redelivers with the delivery count raised; at the maximum delivery count the
  message goes to the dead-letter queue with reason ``MaxDeliveryCountExceeded``.
- Batch sends (a message whose data sections each hold an encoded message) are split. The
  Python binding does not expose the delivery's message format, so a batch is recognised by its
  data sections all starting with an AMQP section descriptor.
- Fault hooks, sent as a message to the entity ``$testhooks`` with application property
  ``hook``: ``drop-connections`` (every other connection is closed with
  ``amqp:connection:forced``), ``detach-links`` (every link on ``entity`` is detached with
  ``amqp:link:detach-forced``, as Service Bus does to a link idle for 10 minutes),
  ``lose-settlements`` (the next ``count`` settlements on ``entity`` are neither applied nor
  answered), ``delay-settlements`` (the next ``count`` are applied and answered ``delay-s``
  later), ``throttle`` (the next ``count`` sends to ``entity`` are refused with
  ``com.microsoft:server-busy``), ``expire-locks`` (every lock on ``entity`` ends now),
  ``configure`` (``entity``'s ``lock-duration-s``, ``max-delivery-count``,
  ``duplicate-detection``, as a namespace's queue settings would be).
- ``com.microsoft:peek-message`` on ``$management`` (what a reply-queue reader needs).

Entities are created on first use. Run: ``python tests/sbbroker.py --port 0``; it prints
``PORT <n>`` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from proton import Condition, Delivery, Disposition, Endpoint, Message, symbol, timestamp
from proton.handlers import MessagingHandler
from proton.reactor import Container

LOCK_DURATION_S = 30.0
MAX_DELIVERY_COUNT = 10
HOOKS = "$testhooks"
DLQ = "/$deadletterqueue"
LOCK_LOST = "com.microsoft:message-lock-lost"


@dataclass
class Stored:
    raw: bytes
    sequence_number: int
    enqueued_ms: int
    deliveries: int = 0
    lock_token: uuid.UUID | None = None
    locked_until_ms: int = 0
    extra_props: dict[str, Any] = field(default_factory=dict)


@dataclass
class Entity:
    name: str
    visible: deque[Stored] = field(default_factory=deque)
    locked: dict[uuid.UUID, tuple[Stored, Any]] = field(default_factory=dict)
    deferred: dict[uuid.UUID, Stored] = field(default_factory=dict)
    lose_settlements: int = 0
    delay_settlements: int = 0
    delay_s: float = 0.0
    throttle_sends: int = 0
    lock_ms: int | None = None  # None: the broker's default
    max_deliveries: int | None = None
    seen_ids: set[str] | None = None  # duplicate detection when not None


class _Later:
    """A proton timer task that runs ``action`` once."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def on_timer_task(self, event: Any) -> None:
        self.action()


def _condition(name: str, description: str) -> Condition:
    # With an info map: the SDK's AMQP layer indexes a close frame's error info unconditionally.
    return Condition(name, description, {symbol("x-opt-source"): "shir test broker"})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _entity_of(address: str | None) -> str:
    address = address or ""
    if "://" in address:
        address = address.split("://", 1)[1]
        address = address.split("/", 1)[1] if "/" in address else ""
    return address.strip("/").lower()


def _skip_value(b: bytes, i: int) -> int:
    """Index after the AMQP value encoded at ``b[i]``."""
    code = b[i]
    if code == 0x00:
        return _skip_value(b, _skip_value(b, i + 1))
    hi = code >> 4
    fixed = {0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}
    if hi in fixed:
        return i + 1 + fixed[hi]
    if hi in (0xA, 0xC, 0xE):
        return i + 2 + b[i + 1]
    if hi in (0xB, 0xD, 0xF):
        return i + 5 + int.from_bytes(b[i + 1 : i + 5], "big")
    raise ValueError(f"unknown AMQP type code 0x{code:02x}")


def split_batch(raw: bytes) -> list[bytes]:
    """The messages of a batch send, or ``[raw]`` when ``raw`` is one message."""
    datas: list[bytes] = []
    i = 0
    try:
        while i < len(raw):
            if raw[i] != 0x00 or raw[i + 1] != 0x53:
                return [raw]
            section, start = raw[i + 2], i + 3
            end = _skip_value(raw, start)
            if section == 0x75:
                size_len = 1 if raw[start] == 0xA0 else 4
                datas.append(raw[start + 1 + size_len : end])
            i = end
    except (IndexError, ValueError):
        return [raw]
    if datas and all(d[:2] == b"\x00\x53" and 0x70 <= d[2] <= 0x78 for d in datas if len(d) > 2):
        return datas if all(len(d) > 2 for d in datas) else [raw]
    return [raw]


class Broker(MessagingHandler):  # type: ignore[misc]
    def __init__(self, port: int, lock_duration_s: float, max_delivery_count: int) -> None:
        super().__init__(prefetch=100, auto_accept=False, auto_settle=False)
        self.port = port
        self.lock_ms = int(lock_duration_s * 1000)
        self.max_deliveries = max_delivery_count
        self.entities: dict[str, Entity] = {}
        self.seq = 0
        self.container: Any = None
        self.connections: list[Any] = []
        self.senders: list[Any] = []
        self.tokens: dict[Any, uuid.UUID] = {}

    def entity(self, name: str) -> Entity:
        return self.entities.setdefault(name, Entity(name))

    # ---- lifecycle -----------------------------------------------------------------------
    def on_start(self, event: Any) -> None:
        self.container = event.container
        event.container.listen(f"127.0.0.1:{self.port}")
        print(f"PORT {self.port}", flush=True)
        event.container.schedule(0.05, self)

    def on_timer_task(self, event: Any) -> None:
        now = _now_ms()
        for ent in list(self.entities.values()):
            for token, (stored, _dlv) in list(ent.locked.items()):
                if stored.locked_until_ms <= now:
                    del ent.locked[token]
                    self.requeue(ent, stored)
        self.pump()
        event.container.schedule(0.05, self)

    def on_connection_opening(self, event: Any) -> None:
        self.connections.append(event.connection)

    def on_connection_closed(self, event: Any) -> None:
        if event.connection in self.connections:
            self.connections.remove(event.connection)

    def on_disconnected(self, event: Any) -> None:
        if event.connection in self.connections:
            self.connections.remove(event.connection)
        self.senders = [s for s in self.senders if s.connection != event.connection]

    def on_link_opening(self, event: Any) -> None:
        link = event.link
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        link.open()
        if link.is_sender:
            self.senders.append(link)

    def on_link_closing(self, event: Any) -> None:
        if event.link in self.senders:
            self.senders.remove(event.link)
        event.link.close()

    def on_link_closed(self, event: Any) -> None:
        # Freed, so that a client re-attaching under the same link name gets a new link.
        event.link.free()

    def on_sendable(self, event: Any) -> None:
        self.pump()

    # ---- entities ------------------------------------------------------------------------
    def requeue(self, ent: Entity, stored: Stored, counted: bool = True) -> None:
        stored.lock_token = None
        if not counted:  # released: this delivery does not count against the maximum
            stored.deliveries -= 1
        limit = ent.max_deliveries or self.max_deliveries
        if stored.deliveries >= limit and not ent.name.endswith(DLQ):
            self.dead_letter(
                ent, stored, "MaxDeliveryCountExceeded",
                f"Message could not be consumed after {stored.deliveries} delivery attempts.",
            )
        else:
            ent.visible.appendleft(stored)

    def dead_letter(self, ent: Entity, stored: Stored, reason: str, description: str) -> None:
        stored.extra_props = {"DeadLetterReason": reason, "DeadLetterErrorDescription": description}
        stored.lock_token = None
        self.entity(ent.name + DLQ).visible.append(stored)

    def enqueue(self, name: str, raw: bytes) -> None:
        ent = self.entity(name)
        for part in split_batch(raw):
            if ent.seen_ids is not None:
                probe = Message()
                probe.decode(part)
                if str(probe.id) in ent.seen_ids:
                    continue
                ent.seen_ids.add(str(probe.id))
            self.seq += 1
            ent.visible.append(Stored(part, self.seq, _now_ms()))

    def pump(self) -> None:
        for link in list(self.senders):
            name = _entity_of(link.remote_source.address)
            if name == "$cbs" or name.endswith("/$management"):
                continue
            if link.state & Endpoint.LOCAL_CLOSED:
                continue
            ent = self.entity(name)
            while link.credit > 0 and ent.visible:
                stored = ent.visible.popleft()
                self.deliver(link, ent, stored)

    def deliver(self, link: Any, ent: Entity, stored: Stored) -> None:
        token = uuid.uuid4()
        stored.lock_token = token
        stored.locked_until_ms = _now_ms() + (ent.lock_ms or self.lock_ms)
        msg = self.annotated(stored, stored.locked_until_ms)
        stored.deliveries += 1
        dlv = link.delivery(token.bytes_le)
        link.send(msg.encode())
        link.advance()
        ent.locked[token] = (stored, dlv)
        self.tokens[dlv] = token  # the binding cannot read back a binary tag

    def annotated(self, stored: Stored, locked_until_ms: int | None) -> Message:
        msg = Message()
        msg.decode(stored.raw)
        if isinstance(msg.body, memoryview):
            msg.body = bytes(msg.body)
        msg.delivery_count = stored.deliveries
        ann = dict(msg.annotations or {})
        if locked_until_ms is not None:
            ann[symbol("x-opt-locked-until")] = timestamp(locked_until_ms)
        ann[symbol("x-opt-sequence-number")] = stored.sequence_number
        ann[symbol("x-opt-enqueued-time")] = timestamp(stored.enqueued_ms)
        msg.annotations = ann
        if stored.extra_props:
            props = dict(msg.properties or {})
            props.update(stored.extra_props)
            msg.properties = props
        return msg

    # ---- incoming ------------------------------------------------------------------------
    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        link = dlv.link
        if link.is_receiver:
            if dlv.partial:
                return
            raw = link.recv(dlv.pending)
            link.advance()
            self.incoming(link, dlv, raw)
        elif (dlv.updated and not dlv.settled) or dlv.updated:
            self.outcome(link, dlv)

    def incoming(self, link: Any, dlv: Any, raw: bytes) -> None:
        name = _entity_of(link.remote_target.address)
        if name == "$cbs":
            req = Message()
            req.decode(raw)
            self.reply(link, req, {"status-code": 200, "status-description": "OK"}, None)
        elif name.endswith("/$management"):
            req = Message()
            req.decode(raw)
            self.management(link, name[: -len("/$management")], req)
        elif self.entity(name).throttle_sends > 0:
            self.entity(name).throttle_sends -= 1
            dlv.local.condition = _condition("com.microsoft:server-busy", "throttled (test hook)")
            dlv.update(Disposition.REJECTED)
            dlv.settle()
            return
        elif name == HOOKS:
            req = Message()
            req.decode(raw)
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()
            self.hook(link.connection, req.properties or {})
            return
        else:
            self.enqueue(name, raw)
            self.pump()
        dlv.update(Delivery.ACCEPTED)
        dlv.settle()

    def reply(self, link: Any, req: Message, props: dict[str, Any], body: Any) -> None:
        target = None
        for s in self.senders:
            if s.connection != link.connection:
                continue
            if req.reply_to and s.remote_target.address == req.reply_to:
                target = s
                break
            if s.remote_source.address == link.remote_target.address:
                target = s
        if target is None:
            return
        target.send(Message(body=body, properties=props, correlation_id=req.id))

    def management(self, link: Any, name: str, req: Message) -> None:
        op = (req.properties or {}).get("operation")
        body = req.body if isinstance(req.body, dict) else {}
        tokens = [t if isinstance(t, uuid.UUID) else uuid.UUID(str(t))
                  for t in body.get("lock-tokens", [])]
        ent = self.entity(name)
        if any(t not in ent.locked for t in tokens) and op in (
            "com.microsoft:renew-lock", "com.microsoft:update-disposition"
        ):
            lost = {"statusCode": 410, "statusDescription": "The lock supplied is invalid.",
                    "errorCondition": LOCK_LOST}
            self.reply(link, req, lost, None)
            return
        if op == "com.microsoft:renew-lock":
            until = _now_ms() + (ent.lock_ms or self.lock_ms)
            for t in tokens:
                ent.locked[t][0].locked_until_ms = until
            body_out = {"expirations": [timestamp(until) for _ in tokens]}
            self.reply(link, req, {"statusCode": 200, "statusDescription": "OK"}, body_out)
        elif op == "com.microsoft:update-disposition":
            status = body.get("disposition-status")
            for t in tokens:
                stored, _ = ent.locked.pop(t)
                self.apply(ent, stored, status, body.get("deadletter-reason", ""),
                           body.get("deadletter-description", ""))
            self.reply(link, req, {"statusCode": 200, "statusDescription": "OK"}, {})
        elif op == "com.microsoft:peek-message":
            start = int(body.get("from-sequence-number", 0))
            count = int(body.get("message-count", 1))
            pool = sorted([*ent.visible, *(s for s, _ in ent.locked.values())],
                          key=lambda s: s.sequence_number)
            found = [s for s in pool if s.sequence_number >= start][:count]
            if not found:
                self.reply(link, req, {"statusCode": 204, "statusDescription": "none"}, None)
                return
            out = {"messages": [{"message": self.annotated(s, None).encode()} for s in found]}
            self.reply(link, req, {"statusCode": 200, "statusDescription": "OK"}, out)
        else:
            err = {"statusCode": 501, "statusDescription": f"not in the test broker: {op}"}
            self.reply(link, req, err, None)

    def apply(self, ent: Entity, stored: Stored, status: str, reason: str, desc: str) -> None:
        if status == "completed":
            return
        if status == "released":
            self.requeue(ent, stored, counted=False)
        elif status == "suspended":
            self.dead_letter(ent, stored, reason, desc)
        elif status == "defered":
            if stored.lock_token is not None:
                ent.deferred[stored.lock_token] = stored
        else:
            self.requeue(ent, stored)
        self.pump()

    def outcome(self, link: Any, dlv: Any) -> None:
        ent = self.entity(_entity_of(link.remote_source.address))
        if ent.lose_settlements > 0:
            ent.lose_settlements -= 1
            return
        if ent.delay_settlements > 0:
            ent.delay_settlements -= 1
            self.container.schedule(ent.delay_s, _Later(lambda: self.settle_now(link, dlv, ent)))
            return
        self.settle_now(link, dlv, ent)

    def settle_now(self, link: Any, dlv: Any, ent: Entity) -> None:
        token = self.tokens.pop(dlv, None)
        if token is None or token not in ent.locked:
            if not dlv.settled:
                dlv.local.condition = _condition(LOCK_LOST, "The lock supplied is invalid.")
                dlv.update(Disposition.REJECTED)
            dlv.settle()
            return
        stored, _ = ent.locked.pop(token)
        state = dlv.remote_state
        remote = dlv.remote
        if state == Disposition.ACCEPTED:
            self.apply(ent, stored, "completed", "", "")
        elif state == Disposition.REJECTED:
            cond = remote.condition
            info = dict(cond.info or {}) if cond is not None else {}
            self.apply(ent, stored, "suspended", str(info.get("DeadLetterReason") or ""),
                       str(info.get("DeadLetterErrorDescription") or ""))
            dlv.local.condition = None
        elif state == Disposition.MODIFIED and remote.undeliverable:
            self.apply(ent, stored, "defered", "", "")
        elif state == Disposition.RELEASED or (
            state == Disposition.MODIFIED and not remote.failed
        ):
            self.apply(ent, stored, "released", "", "")
        else:
            self.apply(ent, stored, "abandoned", "", "")
        if not dlv.settled:
            if state == Disposition.MODIFIED:
                dlv.local.failed = remote.failed
                dlv.local.undeliverable = remote.undeliverable
            # A rejected echo carrying an error would mean "could not apply": echo it bare.
            dlv.update(state)
        dlv.settle()

    # ---- fault hooks ---------------------------------------------------------------------
    def hook(self, origin: Any, props: dict[str, Any]) -> None:
        kind = props.get("hook")
        name = str(props.get("entity", "")).lower()
        if kind == "drop-connections":
            for conn in list(self.connections):
                if conn != origin:
                    conn.condition = _condition("amqp:connection:forced", "test hook")
                    conn.close()
        elif kind == "detach-links":
            for conn in list(self.connections):
                link = conn.link_head(Endpoint.LOCAL_ACTIVE)
                while link is not None:
                    nxt = link.next(Endpoint.LOCAL_ACTIVE)
                    address = link.remote_source.address if link.is_sender else \
                        link.remote_target.address
                    if _entity_of(address) == name:
                        link.condition = _condition(
                            "amqp:link:detach-forced", "idle link closed (test hook)"
                        )
                        link.close()
                        if link in self.senders:
                            self.senders.remove(link)
                    link = nxt
        elif kind == "lose-settlements":
            self.entity(name).lose_settlements += int(props.get("count", 1))
        elif kind == "delay-settlements":
            self.entity(name).delay_settlements += int(props.get("count", 1))
            self.entity(name).delay_s = float(props.get("delay-s", 1.0))
        elif kind == "throttle":
            self.entity(name).throttle_sends += int(props.get("count", 1))
        elif kind == "configure":
            ent = self.entity(name)
            if "lock-duration-s" in props:
                ent.lock_ms = int(float(props["lock-duration-s"]) * 1000)
            if "max-delivery-count" in props:
                ent.max_deliveries = int(props["max-delivery-count"])
            if props.get("duplicate-detection"):
                ent.seen_ids = set()
        elif kind == "expire-locks":
            ent = self.entity(name)
            for stored, _ in ent.locked.values():
                stored.locked_until_ms = 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lock-duration-s", type=float, default=LOCK_DURATION_S)
    ap.add_argument("--max-delivery-count", type=int, default=MAX_DELIVERY_COUNT)
    args = ap.parse_args(argv)
    if args.port == 0:  # a free loopback port, picked here: proton does not report the one it got
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    Container(Broker(args.port, args.lock_duration_s, args.max_delivery_count)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
