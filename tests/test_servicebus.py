"""The Service Bus control channel: the channel contract with the real azure-servicebus SDK on
the wire, against the test broker (tests/sbbroker.py, a test double, not Azure), and against a
real namespace when SHIR_SERVICEBUS_CONNECTION_STRING is set."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from channel_contract import ControlChannelContract, request
from sbhooks import BrokerHooks

from shir.adapters.channel import ChannelError, ControlChannel, JobRequest, JobResult, LockLost
from shir.adapters.servicebus import MALFORMED_REASON, ServiceBusChannel

pytestmark = pytest.mark.services
FAST_SDK = {"retry_backoff_factor": 0.05}  # the SDK's own retries, quick on loopback


def dead_letters_of(channel: ControlChannel) -> list[tuple[str, str]]:
    assert isinstance(channel, ServiceBusChannel)
    return [(d.request.message_id, d.reason) for d in channel.dead_letters()]


class TestServiceBusChannel(ControlChannelContract):
    """The contract through the SDK and the test broker: 2 s locks, 3 deliveries."""

    lock_duration_s = 2.0
    max_delivery_count = 3
    receive_wait_s = 3.0

    @pytest.fixture(autouse=True)
    def _broker(self, sb_hooks: BrokerHooks) -> None:
        self.hooks = sb_hooks

    def make_channel(self, tmp_path: Path) -> ControlChannel:
        queue = self.hooks.new_queue(self.lock_duration_s, self.max_delivery_count)
        replies = self.hooks.new_queue(60, 10)
        return ServiceBusChannel(self.hooks.connection_string, queue=queue, reply_queue=replies,
                                 settle_timeout_s=2.0, sdk_options=FAST_SDK)

    def dead_letters(self, channel: ControlChannel) -> list[tuple[str, str]]:
        return dead_letters_of(channel)

    def open_peer(self, channel: ControlChannel, tmp_path: Path) -> ControlChannel:
        return peer_of(channel)


def peer_of(channel: ControlChannel, **options: object) -> ServiceBusChannel:
    """Another channel object (another process's) on ``channel``'s namespace and queues."""
    assert isinstance(channel, ServiceBusChannel)
    options.setdefault("settle_timeout_s", 2.0)
    options.setdefault("sdk_options", FAST_SDK)
    return ServiceBusChannel(channel._secret.reveal(), queue=channel.queue,
                             reply_queue=channel.reply_queue, **options)  # type: ignore[arg-type]


AZURE = os.environ.get("SHIR_SERVICEBUS_CONNECTION_STRING", "")


@pytest.mark.skipif(not AZURE, reason="SHIR_SERVICEBUS_CONNECTION_STRING is not set: Azure "
                    "itself is not tested (a real namespace is needed; never run here)")
class TestServiceBusChannelOnAzure(ControlChannelContract):
    """The same contract on a real namespace: queues made and deleted per test (5 s locks, the
    service's minimum). Needs a Standard namespace (duplicate detection) and a Manage policy."""

    lock_duration_s = 5.0
    max_delivery_count = 3
    receive_wait_s = 10.0

    def make_channel(self, tmp_path: Path) -> ControlChannel:
        from datetime import timedelta

        from azure.servicebus.management import ServiceBusAdministrationClient

        admin = ServiceBusAdministrationClient.from_connection_string(AZURE)
        self.queues = [f"shir-test-{uuid.uuid4().hex[:10]}" for _ in range(2)]
        for name in self.queues:
            admin.create_queue(name, lock_duration=timedelta(seconds=self.lock_duration_s),
                               max_delivery_count=self.max_delivery_count,
                               requires_duplicate_detection=True,
                               auto_delete_on_idle=timedelta(minutes=30))
        self.admin = admin
        return ServiceBusChannel(AZURE, queue=self.queues[0], reply_queue=self.queues[1])

    @pytest.fixture
    def channel(self, tmp_path: Path) -> Iterator[ControlChannel]:
        ch = self.make_channel(tmp_path)
        yield ch
        ch.close()
        for name in self.queues:
            self.admin.delete_queue(name)
        self.admin.close()

    def dead_letters(self, channel: ControlChannel) -> list[tuple[str, str]]:
        return dead_letters_of(channel)

    def open_peer(self, channel: ControlChannel, tmp_path: Path) -> ControlChannel:
        return peer_of(channel)


# -- faults, through the test broker's hooks -------------------------------------------------


@pytest.fixture
def hooks(sb_hooks: BrokerHooks) -> BrokerHooks:
    return sb_hooks


def open_on(hooks: BrokerHooks, lock_duration_s: float = 1.0, max_deliveries: int = 3,
            **options: object) -> ServiceBusChannel:
    queue = hooks.new_queue(lock_duration_s, max_deliveries)
    replies = hooks.new_queue(60, 10)
    options.setdefault("settle_timeout_s", 2.0)
    options.setdefault("sdk_options", FAST_SDK)
    return ServiceBusChannel(hooks.connection_string, queue=queue, reply_queue=replies,
                             **options)  # type: ignore[arg-type]


def drain(channel: ServiceBusChannel, seconds: float) -> dict[str, int]:
    """Receive and complete until nothing comes for a while: ``{message_id: delivery_count}``."""
    done: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        got = channel.receive(10, 0.5)
        quiet = 0 if got else quiet + 1
        for r in got:
            try:
                channel.complete(r.lock_token)
            except LockLost:
                continue
            assert r.request.message_id not in done, "a request completed twice"
            done[r.request.message_id] = r.delivery_count
    return done


def test_a_dropped_connection_loses_no_request(hooks: BrokerHooks) -> None:
    with open_on(hooks, lock_duration_s=3.0) as channel:
        channel.send([request(i) for i in range(3)])
        first, second = channel.receive(2, 3.0)
        hooks.hook("drop-connections")
        time.sleep(0.3)  # the broker's close waits, unread, in the SDK's socket
        # The broker may apply it before the SDK reads the close: the outcome is unknown.
        with contextlib.suppress(LockLost):
            channel.complete(first.lock_token)
        [third] = channel.receive(1, 3.0)  # the channel has reconnected
        channel.complete(second.lock_token)  # the lock outlives the connection: $management
        channel.complete(third.lock_token)
        channel.send([request(3)])
        rest = drain(channel, 15)
        assert set(rest) <= {"msg-0", "msg-3"}  # msg-0 again only if its outcome was lost
        assert "msg-3" in rest
        assert channel.queue_depth() == 0 and channel.dead_letters() == []


def test_an_idle_link_closed_by_the_service_is_reopened(hooks: BrokerHooks) -> None:
    with open_on(hooks, lock_duration_s=5.0) as channel:
        channel.send([request(1), request(2)])
        [first] = channel.receive(1, 3.0)
        hooks.hook("detach-links", channel.queue)  # as Service Bus does after 10 idle minutes
        time.sleep(0.3)
        [second] = channel.receive(1, 3.0)  # the SDK raises ServiceBusConnectionError: retried
        assert second.request.message_id == "msg-2"
        channel.complete(first.lock_token)  # through $management: the lock outlives the link
        channel.complete(second.lock_token)
        assert drain(channel, 3) == {}
        assert channel.queue_depth() == 0


def test_a_lost_settlement_is_retried_and_applied_once(hooks: BrokerHooks) -> None:
    with open_on(hooks, lock_duration_s=6.0) as channel:
        channel.send([request(1)])
        [got] = channel.receive(1, 3.0)
        hooks.hook("lose-settlements", channel.queue, count=1)
        started = time.monotonic()
        channel.complete(got.lock_token)  # no answer: the SDK waits settle_timeout_s, retries
        assert time.monotonic() - started >= 2.0
        hooks.hook("expire-locks", channel.queue)  # had it not been applied, it would come back
        assert drain(channel, 3) == {}
        assert channel.dead_letters() == []


def test_a_lost_settlement_past_the_lock_redelivers(hooks: BrokerHooks) -> None:
    with open_on(hooks, lock_duration_s=1.0) as channel:
        channel.send([request(1)])
        [got] = channel.receive(1, 3.0)
        hooks.hook("lose-settlements", channel.queue, count=1)
        with pytest.raises(LockLost):  # outcome unknown, then the lock is gone
            channel.complete(got.lock_token)
        assert drain(channel, 5) == {"msg-1": 2}  # the idempotency key absorbs this duplicate


def test_a_delayed_settlement_completes_once(hooks: BrokerHooks) -> None:
    with open_on(hooks, lock_duration_s=5.0) as channel:
        channel.send([request(1)])
        [got] = channel.receive(1, 3.0)
        hooks.hook("delay-settlements", channel.queue, count=1, delay_s=0.8)
        started = time.monotonic()
        channel.complete(got.lock_token)
        assert time.monotonic() - started >= 0.7
        hooks.hook("expire-locks", channel.queue)
        assert drain(channel, 3) == {}


def test_a_settlement_delayed_past_the_lock_is_lost(hooks: BrokerHooks) -> None:
    with open_on(hooks, lock_duration_s=1.0) as channel:
        channel.send([request(1)])
        [got] = channel.receive(1, 3.0)
        hooks.hook("delay-settlements", channel.queue, count=1, delay_s=1.5)
        with pytest.raises(LockLost):
            channel.complete(got.lock_token)
        assert drain(channel, 5) == {"msg-1": 2}


def test_a_lock_expired_early_is_lost_and_redelivered(hooks: BrokerHooks) -> None:
    with open_on(hooks, lock_duration_s=30.0) as channel:
        channel.send([request(1)])
        [got] = channel.receive(1, 3.0)
        hooks.hook("expire-locks", channel.queue)
        time.sleep(0.3)  # the broker's lock clock ticks every 50 ms
        with pytest.raises(LockLost):
            channel.renew(got.lock_token)
        [again] = channel.receive(1, 3.0)
        assert again.delivery_count == 2 and again.request == got.request
        channel.complete(again.lock_token)


def test_throttling_is_retried_with_backoff(hooks: BrokerHooks) -> None:
    with open_on(hooks) as channel:
        # More refusals than the SDK retries (retry_total=3): the channel's own backoff goes on.
        hooks.hook("throttle", channel.queue, count=6)
        channel.send([request(1)])
        assert drain(channel, 5) == {"msg-1": 1}


def test_throttling_that_does_not_stop_is_a_channel_error(hooks: BrokerHooks) -> None:
    with open_on(hooks, attempts=2, backoff_s=0.05) as channel:
        hooks.hook("throttle", channel.queue, count=100)
        with pytest.raises(ChannelError, match=r"failed after 2 attempt.*server-busy") as info:
            channel.send([request(1)])
        assert not isinstance(info.value, LockLost)
        assert "SharedAccessKey" not in str(info.value)


def test_a_message_that_is_not_a_job_request_is_dead_lettered(hooks: BrokerHooks) -> None:
    from azure.servicebus import ServiceBusClient, ServiceBusMessage

    with open_on(hooks) as channel:
        with ServiceBusClient.from_connection_string(hooks.connection_string) as client, \
                client.get_queue_sender(channel.queue) as sender:
            sender.send_messages(ServiceBusMessage(b"\xc1 not msgpack", message_id="junk"))
            sender.send_messages(ServiceBusMessage(b"\x91\x01", message_id="a-list"))
        channel.send([request(1)])
        got = channel.receive(5, 3.0)
        assert [r.request.message_id for r in got] == ["msg-1"]
        dead = channel.dead_letters()
        assert [(d.request.message_id, d.reason) for d in dead] == [
            ("junk", MALFORMED_REASON), ("a-list", MALFORMED_REASON)]


def test_requests_larger_than_one_batch_are_split(hooks: BrokerHooks) -> None:
    with open_on(hooks, lock_duration_s=30.0) as channel:
        big = [JobRequest(f"big-{i}", "copy", bytes([i]) * 60_000) for i in range(6)]
        channel.send(big)  # ~360 kB: more than one 256 kB batch
        seen: list[JobRequest] = []
        deadline = time.monotonic() + 10
        while len(seen) < 6 and time.monotonic() < deadline:
            for r in channel.receive(6, 1.0):
                seen.append(r.request)
                channel.complete(r.lock_token)
        assert seen == big


def test_refuses_bad_options_and_connection_strings() -> None:
    with pytest.raises(ChannelError, match="Endpoint=sb://"):
        ServiceBusChannel("SharedAccessKeyName=a;SharedAccessKey=b")
    with pytest.raises(ChannelError, match="neither SharedAccessKey"):
        ServiceBusChannel("Endpoint=sb://x.servicebus.windows.net/")
    with pytest.raises(ChannelError, match="malformed"):
        ServiceBusChannel("not a connection string")
    with pytest.raises(ChannelError, match="network trace"):
        ServiceBusChannel("Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=b",
                          sdk_options={"logging_enable": True})


# -- secrets: the canary ---------------------------------------------------------------------


def test_no_key_or_signature_in_logs_errors_or_reprs(
    hooks: BrokerHooks, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """Every path a key could leak through, with the SDK logging at DEBUG: nothing shows it."""
    import logging
    import socket
    from urllib.parse import quote

    from canary import CANARY

    from shir.adapters.channels import describe_channel_url, open_channel

    caplog.set_level(logging.DEBUG)
    key = f"{CANARY}+/=="  # a key with the characters a real one has
    endpoint = hooks.connection_string.split(";")[0]  # Endpoint=sb://127.0.0.1:PORT/
    host = endpoint.split("//", 1)[1].strip("/")
    conn = f"{endpoint};SharedAccessKeyName=Root;SharedAccessKey={key};UseDevelopmentEmulator=true"
    queue, replies = hooks.new_queue(30, 3), hooks.new_queue(60, 10)
    shown: list[str] = []
    url = f"servicebus://Root:{quote(key, safe='')}@{host}/{queue}?reply={replies}&emulator=true"
    with open_channel(url, settle_timeout_s=2.0, sdk_options=FAST_SDK) as channel, \
            open_channel(f"{conn};EntityPath={queue};ReplyQueue={replies}") as other:
        assert isinstance(channel, ServiceBusChannel) and isinstance(other, ServiceBusChannel)
        assert (other.queue, other.reply_queue) == (queue, replies)
        channel.send([request(1, credential=b"sealed"), request(2)])
        got = channel.receive(2, 3.0)
        assert len(got) == 2
        channel.renew(got[0].lock_token)
        channel.complete(got[0].lock_token)
        channel.dead_letter(got[1].lock_token, "invalid job")
        channel.publish_result(JobResult("msg-1", "job-1", "completed"))
        assert other.results("msg-1") and other.dead_letters()
        shown += [repr(channel), str(channel), repr(other), repr(got), repr(vars(channel)),
                  describe_channel_url(url), describe_channel_url(conn)]
        for settle in (channel.complete, channel.renew):  # LockLost names the token only
            with pytest.raises(LockLost) as lost:
                settle(got[0].lock_token)
            shown.append(str(lost.value))
        hooks.hook("throttle", queue, count=100)
        with pytest.raises(ChannelError) as throttled:
            ServiceBusChannel(conn, queue=queue, attempts=2, backoff_s=0.01,
                              sdk_options=FAST_SDK).send([request(3)])
        shown.append(str(throttled.value))
        hooks.hook("throttle", queue, count=-100)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    unreachable = conn.replace(host, f"127.0.0.1:{dead_port}")
    with pytest.raises(ChannelError) as refused:
        ServiceBusChannel(unreachable, attempts=2, backoff_s=0.01,
                          sdk_options={**FAST_SDK, "retry_total": 1}).send([request(4)])
    assert "failed after 1 attempt" in str(refused.value)  # never reached: no extra retries
    shown.append(str(refused.value))
    sas = (f"Endpoint=sb://{host}/;SharedAccessSignature=SharedAccessSignature sr=x&sig={key}"
           "&se=1&skn=Root;UseDevelopmentEmulator=true")
    shown.append(repr(ServiceBusChannel(sas)))
    for bad in (f"Endpoint=sb://{host}/;SharedAccessKey={key}",  # a key without its name
                f"servicebus://{quote(key, safe='')}@{host}/q",  # a URL without the key name
                f"servicebus://Root:{quote(key, safe='')}@{host}/q?bogus=1"):
        with pytest.raises(ChannelError) as refusal:
            open_channel(bad)
        shown.append(str(refusal.value))
    out, err = capfd.readouterr()
    everything = "\n".join([*shown, caplog.text, out, err])
    assert caplog.records, "the SDK logged nothing at DEBUG: the check would prove nothing"
    for secret in (CANARY, quote(key, safe=""), "sig="):
        at = everything.find(secret)
        assert at < 0, f"{secret!r} leaked: ...{everything[max(0, at - 300):at + 60]}..."
