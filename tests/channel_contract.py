"""The behaviour every :class:`~shir.adapters.channel.ControlChannel` must have.

Subclass :class:`ControlChannelContract` once per implementation (``class TestMyChannel(
ControlChannelContract)``) and implement :meth:`~ControlChannelContract.make_channel` and
:meth:`~ControlChannelContract.dead_letters`; the class itself is not collected because its
name does not start with ``Test``.

Time: the channel must be made with the lock duration :attr:`lock_duration_s` and the maximum
delivery count :attr:`max_delivery_count` of the subclass. Lock expiry is observed through
:meth:`~ControlChannelContract.advance`, which by default really sleeps (so keep the lock
duration short, a second or so, for a broker); an implementation with an injectable clock
overrides it to move its clock instead.
"""

from __future__ import annotations

import abc
import time
from pathlib import Path

import pytest

from shir.adapters.channel import (
    ChannelError,
    ControlChannel,
    JobRequest,
    JobResult,
    LockLost,
    ReceivedRequest,
)

__all__ = ["ControlChannelContract"]


def request(n: int, **kw: object) -> JobRequest:
    """A request with a distinct message id and spec."""
    return JobRequest(f"msg-{n}", "test", f"spec {n}".encode(), **kw)  # type: ignore[arg-type]


class ControlChannelContract(abc.ABC):
    """Abstract contract tests; subclasses provide a fresh, empty channel."""

    #: The lock duration the subclass's channel (or broker queue) is configured with.
    lock_duration_s: float = 1.0
    #: The queue's maximum delivery count.
    max_delivery_count: int = 3
    #: How long a receive may wait for a request that is there (a broker's round trips).
    receive_wait_s: float = 2.0
    #: Whether the channel drops a second send of a message id (duplicate detection).
    detects_duplicates: bool = True

    @abc.abstractmethod
    def make_channel(self, tmp_path: Path) -> ControlChannel:
        """A new channel on an empty queue, with the class's lock duration and max deliveries."""

    @abc.abstractmethod
    def dead_letters(self, channel: ControlChannel) -> list[tuple[str, str]]:
        """``(message_id, reason)`` of every request on the channel's dead-letter queue."""

    def open_peer(self, channel: ControlChannel, tmp_path: Path) -> ControlChannel:
        """A second channel object (another process's, say) on the same queues as ``channel``."""
        raise NotImplementedError(f"{type(self).__name__} must implement open_peer")

    def advance(self, channel: ControlChannel, seconds: float) -> None:
        """Let ``seconds`` pass for the channel's locks (a real sleep by default)."""
        time.sleep(seconds)

    @pytest.fixture
    def channel(self, tmp_path: Path) -> ControlChannel:
        ch = self.make_channel(tmp_path)
        yield ch  # type: ignore[misc]
        ch.close()

    # -- helpers -----------------------------------------------------------------------------

    def receive_one(self, channel: ControlChannel) -> ReceivedRequest:
        got = channel.receive(1, self.receive_wait_s)
        assert len(got) == 1, f"expected one request, got {got}"
        return got[0]

    def assert_empty(self, channel: ControlChannel) -> None:
        assert channel.receive(10, 0.2) == []

    def past_lock(self, channel: ControlChannel) -> None:
        self.advance(channel, self.lock_duration_s * 1.3 + 0.2)

    # -- send and receive --------------------------------------------------------------------

    def test_is_a_control_channel(self, channel: ControlChannel) -> None:
        assert isinstance(channel, ControlChannel)

    def test_empty_receive_waits_at_most_wait_s(self, channel: ControlChannel) -> None:
        started = time.monotonic()
        assert channel.receive(5, 0.3) == []
        assert time.monotonic() - started < 0.3 + 2.0

    def test_send_then_receive_round_trips_the_request(self, channel: ControlChannel) -> None:
        sent = JobRequest("msg-1", "copy", b"\x00spec\xff", credential=b"sealed\x01")
        channel.send([sent])
        got = self.receive_one(channel)
        assert got.request == sent
        assert got.delivery_count == 1
        assert got.lock_token
        assert got.locked_until > 0

    def test_receive_takes_at_most_max_count_in_order(self, channel: ControlChannel) -> None:
        channel.send([request(i) for i in range(5)])
        first = channel.receive(3, self.receive_wait_s)
        assert 1 <= len(first) <= 3
        seen = [r.request.message_id for r in first]
        deadline = time.monotonic() + 10
        while len(seen) < 5 and time.monotonic() < deadline:
            seen += [r.request.message_id for r in channel.receive(5, self.receive_wait_s)]
        assert seen == [f"msg-{i}" for i in range(5)]
        assert len({r.lock_token for r in first}) == len(first)

    def test_a_locked_request_is_invisible(self, channel: ControlChannel) -> None:
        channel.send([request(1)])
        self.receive_one(channel)
        self.assert_empty(channel)

    def test_duplicate_send_is_delivered_once(self, channel: ControlChannel) -> None:
        if not self.detects_duplicates:
            pytest.skip("this channel is configured without duplicate detection")
        channel.send([request(1)])
        channel.send([request(1), request(2)])
        got = [self.receive_one(channel), self.receive_one(channel)]
        assert [g.request.message_id for g in got] == ["msg-1", "msg-2"]
        self.assert_empty(channel)

    # -- settlement --------------------------------------------------------------------------

    def test_complete_removes_the_request_for_good(self, channel: ControlChannel) -> None:
        channel.send([request(1)])
        got = self.receive_one(channel)
        channel.complete(got.lock_token)
        self.past_lock(channel)
        self.assert_empty(channel)
        assert self.dead_letters(channel) == []

    def test_abandon_redelivers_at_once_with_a_higher_count(self, channel: ControlChannel) -> None:
        channel.send([request(1)])
        first = self.receive_one(channel)
        channel.abandon(first.lock_token)
        second = self.receive_one(channel)
        assert second.request == first.request
        assert second.delivery_count == 2
        assert second.lock_token != first.lock_token

    def test_dead_letter_keeps_the_reason(self, channel: ControlChannel) -> None:
        channel.send([request(1), request(2)])
        got = self.receive_one(channel)
        channel.dead_letter(got.lock_token, "invalid job: unknown kind")
        assert self.dead_letters(channel) == [(got.request.message_id, "invalid job: unknown kind")]
        other = self.receive_one(channel)
        assert other.request.message_id != got.request.message_id
        channel.complete(other.lock_token)
        self.assert_empty(channel)

    @pytest.mark.parametrize("first", ["complete", "abandon", "dead_letter"])
    @pytest.mark.parametrize("then", ["complete", "abandon", "dead_letter", "renew"])
    def test_a_settled_lock_is_lost(self, channel: ControlChannel, first: str, then: str) -> None:
        channel.send([request(1)])
        got = self.receive_one(channel)
        self._settle(channel, first, got.lock_token)
        with pytest.raises(LockLost):
            self._settle(channel, then, got.lock_token)

    def test_an_unknown_lock_token_is_lost(self, channel: ControlChannel) -> None:
        with pytest.raises(LockLost):
            channel.complete("00000000-0000-0000-0000-000000000000")

    @staticmethod
    def _settle(channel: ControlChannel, how: str, token: str) -> None:
        if how == "dead_letter":
            channel.dead_letter(token, "test")
        elif how == "renew":
            channel.renew(token)
        else:
            getattr(channel, how)(token)

    # -- locks in time -----------------------------------------------------------------------

    def test_renew_extends_the_lock(self, channel: ControlChannel) -> None:
        channel.send([request(1)])
        got = self.receive_one(channel)
        locked_until = got.locked_until
        for _ in range(2):  # together longer than one lock duration
            self.advance(channel, self.lock_duration_s * 0.6)
            renewed = channel.renew(got.lock_token)
            assert renewed > locked_until
            locked_until = renewed
        self.assert_empty(channel)
        channel.complete(got.lock_token)

    def test_an_expired_lock_redelivers_and_the_old_token_is_lost(
        self, channel: ControlChannel
    ) -> None:
        channel.send([request(1)])
        first = self.receive_one(channel)
        self.past_lock(channel)
        second = self.receive_one(channel)
        assert second.request == first.request
        assert second.delivery_count == 2
        for settle in ("complete", "renew", "abandon"):
            with pytest.raises(LockLost):
                self._settle(channel, settle, first.lock_token)
        channel.complete(second.lock_token)
        self.assert_empty(channel)

    def test_renewing_an_expired_lock_is_lost(self, channel: ControlChannel) -> None:
        channel.send([request(1)])
        got = self.receive_one(channel)
        self.past_lock(channel)
        with pytest.raises(LockLost):
            channel.renew(got.lock_token)

    def test_max_deliveries_by_abandon_dead_letters(self, channel: ControlChannel) -> None:
        channel.send([request(1)])
        for n in range(1, self.max_delivery_count + 1):
            got = self.receive_one(channel)
            assert got.delivery_count == n
            channel.abandon(got.lock_token)
        self.assert_empty(channel)
        [(message_id, reason)] = self.dead_letters(channel)
        assert message_id == "msg-1"
        assert reason  # the channel says why (Service Bus: MaxDeliveryCountExceeded)

    def test_max_deliveries_by_lock_expiry_dead_letters(self, channel: ControlChannel) -> None:
        channel.send([request(1)])
        for n in range(1, self.max_delivery_count + 1):
            got = self.receive_one(channel)
            assert got.delivery_count == n
            self.past_lock(channel)
        self.assert_empty(channel)
        assert [m for m, _ in self.dead_letters(channel)] == ["msg-1"]

    # -- results -----------------------------------------------------------------------------

    def test_results_are_published_once_per_outcome(self, channel: ControlChannel) -> None:
        assert channel.results() == []
        done = JobResult("msg-1", "job-1", "completed", "ok", 10.0)
        failed = JobResult("msg-2", "job-2", "failed", "source unreachable", 11.0)
        channel.publish_result(done)
        channel.publish_result(failed)
        channel.publish_result(done)  # a host that retried after a crash
        assert channel.results("msg-1") == [done]
        assert channel.results("msg-2") == [failed]
        assert channel.results("msg-9") == []
        assert sorted(channel.results(), key=lambda r: r.message_id) == [done, failed]

    def test_results_are_read_back_by_another_channel(
        self, channel: ControlChannel, tmp_path: Path
    ) -> None:
        peer = self.open_peer(channel, tmp_path)  # as `shir job show` in another process
        try:
            dead = JobResult("msg-3", "job-3", "dead_lettered", "invalid job: unknown kind", 12.5)
            failed = JobResult("msg-4", "job-4", "failed", "source refused: ü", 13.0)
            channel.publish_result(dead)
            channel.publish_result(failed)
            peer.publish_result(dead)  # another node published the same outcome
            assert peer.results("msg-3") == [dead]
            assert peer.results() == [dead, failed]
        finally:
            peer.close()

    # -- several receivers -------------------------------------------------------------------

    def test_a_request_locked_by_one_receiver_is_invisible_to_another(
        self, channel: ControlChannel, tmp_path: Path
    ) -> None:
        peer = self.open_peer(channel, tmp_path)
        try:
            channel.send([request(1)])
            first = self.receive_one(channel)
            assert peer.receive(5, 0.3) == []
            self.past_lock(channel)
            second = self.receive_one(peer)  # the lock ended: the other receiver gets it
            assert second.request == first.request and second.delivery_count == 2
            with pytest.raises(LockLost):
                channel.complete(first.lock_token)
            peer.complete(second.lock_token)
            self.assert_empty(channel)
        finally:
            peer.close()

    def test_a_redelivered_request_keeps_its_credential(self, channel: ControlChannel) -> None:
        sent = request(1, credential=b"\x00sealed for the runtime\xff")
        channel.send([sent])
        first = self.receive_one(channel)
        channel.abandon(first.lock_token)
        again = self.receive_one(channel)
        assert again.request == sent and again.request.credential == sent.credential
        channel.complete(again.lock_token)

    def test_only_the_lock_that_was_not_renewed_expires(self, channel: ControlChannel) -> None:
        channel.send([request(1), request(2)])
        kept = self.receive_one(channel)
        lapsed = self.receive_one(channel)
        for _ in range(3):  # together longer than one lock
            self.advance(channel, self.lock_duration_s * 0.5)
            channel.renew(kept.lock_token)
        again = self.receive_one(channel)
        assert again.request == lapsed.request and again.delivery_count == 2
        channel.complete(kept.lock_token)
        channel.complete(again.lock_token)
        self.assert_empty(channel)

    def test_many_requests_in_one_send_arrive_once_each(self, channel: ControlChannel) -> None:
        sent = [request(i) for i in range(60)]
        channel.send(sent)
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while len(seen) < len(sent) and time.monotonic() < deadline:
            for r in channel.receive(25, self.receive_wait_s):
                assert r.request.message_id not in seen, "a request delivered twice"
                seen.append(r.request.message_id)
                channel.complete(r.lock_token)
        assert seen == [r.message_id for r in sent]
        self.assert_empty(channel)

    # -- lifecycle ---------------------------------------------------------------------------

    def test_a_closed_channel_refuses_work(self, tmp_path: Path) -> None:
        (tmp_path / "closed").mkdir()
        ch = self.make_channel(tmp_path / "closed")
        ch.close()
        ch.close()  # idempotent
        with pytest.raises(ChannelError):
            ch.send([request(1)])
        with pytest.raises(ChannelError):
            ch.receive(1, 0.1)
