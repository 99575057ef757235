"""The embedded control channel: the channel contract on a controlled clock, plus its own cases."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import sqlite3
import time
from pathlib import Path

import pytest
from channel_contract import ControlChannelContract, request

from shir.adapters.channel import ChannelError, ControlChannel, JobRequest, LockLost
from shir.adapters.embedded_channel import EmbeddedChannel
from shir.adapters.sqlitestore import SQLiteEventStore
from shir.core.store import Snapshot


class Clock:
    """Wall-clock time that moves only when told to."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TestEmbeddedChannel(ControlChannelContract):
    lock_duration_s = 30.0  # on the test's clock: no test sleeps for it
    max_delivery_count = 3

    def make_channel(self, tmp_path: Path) -> ControlChannel:
        self.clock = Clock()
        return EmbeddedChannel(
            tmp_path / "channel.db", lock_duration_s=self.lock_duration_s,
            max_delivery_count=self.max_delivery_count, clock=self.clock,
        )

    def dead_letters(self, channel: ControlChannel) -> list[tuple[str, str]]:
        assert isinstance(channel, EmbeddedChannel)
        return [(d.request.message_id, d.reason) for d in channel.dead_letters()]

    def open_peer(self, channel: ControlChannel, tmp_path: Path) -> ControlChannel:
        return EmbeddedChannel(
            tmp_path / "channel.db", lock_duration_s=self.lock_duration_s,
            max_delivery_count=self.max_delivery_count, clock=self.clock,
        )

    def advance(self, channel: ControlChannel, seconds: float) -> None:
        self.clock.now += seconds


class TestEmbeddedChannelOnARealClock(ControlChannelContract):
    """A few contract cases on time.time with a short lock, as a broker runs them."""

    lock_duration_s = 0.4

    def make_channel(self, tmp_path: Path) -> ControlChannel:
        return EmbeddedChannel(
            tmp_path / "channel.db", lock_duration_s=self.lock_duration_s,
            max_delivery_count=self.max_delivery_count,
        )

    def dead_letters(self, channel: ControlChannel) -> list[tuple[str, str]]:
        assert isinstance(channel, EmbeddedChannel)
        return [(d.request.message_id, d.reason) for d in channel.dead_letters()]

    def open_peer(self, channel: ControlChannel, tmp_path: Path) -> ControlChannel:
        return self.make_channel(tmp_path)  # the same file


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def channel(tmp_path: Path, clock: Clock) -> EmbeddedChannel:
    return EmbeddedChannel(tmp_path / "c.db", lock_duration_s=10, max_delivery_count=2,
                           duplicate_window_s=60, clock=clock)


def test_locked_until_is_the_clock_plus_the_lock_duration(
    channel: EmbeddedChannel, clock: Clock
) -> None:
    channel.send([request(1)])
    [got] = channel.receive(1, 0)
    assert got.locked_until == clock.now + 10
    clock.now += 4
    assert channel.renew(got.lock_token) == clock.now + 10
    clock.now += 9.9
    channel.complete(got.lock_token)  # still inside the renewed lock


def test_the_lock_ends_exactly_at_locked_until(channel: EmbeddedChannel, clock: Clock) -> None:
    channel.send([request(1)])
    [got] = channel.receive(1, 0)
    clock.now = got.locked_until
    with pytest.raises(LockLost, match="expired"):
        channel.complete(got.lock_token)


def test_a_completed_id_may_be_sent_again_after_the_duplicate_window(
    channel: EmbeddedChannel, clock: Clock
) -> None:
    channel.send([request(1)])
    [got] = channel.receive(1, 0)
    channel.complete(got.lock_token)
    clock.now += 30
    channel.send([request(1)])  # inside the window: dropped
    assert channel.receive(1, 0) == []
    clock.now += 31
    channel.send([request(1)])
    [again] = channel.receive(1, 0)
    assert again.delivery_count == 1


def test_dead_letter_reason_names_max_deliveries(channel: EmbeddedChannel, clock: Clock) -> None:
    channel.send([request(1)])
    [first] = channel.receive(1, 0)
    channel.abandon(first.lock_token)
    [_second] = channel.receive(1, 0)
    clock.now += 11
    assert channel.receive(1, 0) == []
    [dead] = channel.dead_letters()
    assert dead.request == request(1)
    assert dead.delivery_count == 2
    assert dead.reason.startswith("MaxDeliveryCountExceeded")
    assert "lock expired" in dead.reason
    assert channel.queue_depth() == 0


def test_two_channels_on_one_file_share_the_queue_and_locks(tmp_path: Path, clock: Clock) -> None:
    a = EmbeddedChannel(tmp_path / "c.db", lock_duration_s=10, clock=clock)
    b = EmbeddedChannel(tmp_path / "c.db", lock_duration_s=10, clock=clock)
    a.send([request(1), request(2)])
    assert b.queue_depth() == 2
    [one] = a.receive(1, 0)
    [two] = b.receive(5, 0)
    assert {one.request.message_id, two.request.message_id} == {"msg-1", "msg-2"}
    b.complete(one.lock_token)  # lock tokens are the file's, not the object's
    with pytest.raises(LockLost):
        a.complete(one.lock_token)
    a.close()
    b.close()


def test_shares_a_file_with_the_event_store(tmp_path: Path) -> None:
    path = tmp_path / "runtime.db"
    channel = EmbeddedChannel.from_url(f"sqlite:///{path}")
    channel.send([request(1)])
    with SQLiteEventStore(path) as store:  # the channel made the file: still a shir store
        store.save_snapshot("rt", Snapshot(0, b""))
    channel.close()
    with EmbeddedChannel(path) as again:
        assert again.queue_depth() == 1


def test_refuses_bad_requests_and_urls(channel: EmbeddedChannel) -> None:
    with pytest.raises(ChannelError, match="too large"):
        channel.send([JobRequest("m", "test", b"x" * (64 * 1024 + 1))])
    with pytest.raises(ChannelError, match="1-128"):
        channel.send([JobRequest("", "test")])
    with pytest.raises(ChannelError, match="max_count"):
        channel.receive(0, 0)
    with pytest.raises(ChannelError, match="sqlite:///PATH"):
        EmbeddedChannel.from_url("servicebus://x")
    with pytest.raises(ChannelError) as refused:  # a Service Bus string is not echoed
        EmbeddedChannel.from_url("Endpoint=sb://ns/;SharedAccessKeyName=R;SharedAccessKey=K3y")
    assert "K3y" not in str(refused.value)
    assert channel.queue_depth() == 0


def test_a_newer_channel_format_is_refused(tmp_path: Path) -> None:
    EmbeddedChannel(tmp_path / "c.db").close()
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute("UPDATE shir_channel_meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    with pytest.raises(ChannelError, match=r"format 99.*upgrade"):
        EmbeddedChannel(tmp_path / "c.db")


def test_the_credential_is_not_in_the_repr(channel: EmbeddedChannel) -> None:
    channel.send([JobRequest("m", "copy", b"", credential=b"CANARY-CIPHERTEXT")])
    [got] = channel.receive(1, 0)
    assert got.request.credential == b"CANARY-CIPHERTEXT"
    assert "CANARY" not in repr(got) and "CANARY" not in repr(channel)


def _consumer(path: str, start: multiprocessing.synchronize.Barrier,
              out: multiprocessing.Queue[tuple[list[str], list[str]]]) -> None:
    """Open the (perhaps new) file, then receive and complete until the queue stays empty."""
    problems: list[str] = []
    done: list[str] = []
    start.wait(30)  # all open the file at once: the schema set-up races too
    try:
        channel = EmbeddedChannel(path, lock_duration_s=30)
        start.wait(30)
        idle = 0
        deadline = time.monotonic() + 60
        while idle < 10 and time.monotonic() < deadline:
            got = channel.receive(3, 0.05)
            idle = 0 if got else idle + 1
            for r in got:
                time.sleep(0.002)  # the dispatcher's append to the log, between the two
                channel.complete(r.lock_token)  # LockLost here would be a double delivery
                done.append(r.request.message_id)
        channel.close()
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    out.put((done, problems))


def test_processes_receiving_concurrently_get_each_request_once(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    ctx = multiprocessing.get_context("spawn")
    workers = 3
    start = ctx.Barrier(workers + 1)
    out: multiprocessing.Queue[tuple[list[str], list[str]]] = ctx.Queue()
    procs = [ctx.Process(target=_consumer, args=(path, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    start.wait(30)
    producer = EmbeddedChannel(path, lock_duration_s=30)
    start.wait(30)
    sent = [f"msg-{i}" for i in range(150)]
    for i in range(0, len(sent), 10):
        producer.send([JobRequest(m, "test") for m in sent[i : i + 10]])
    results = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert [problems for _, problems in results] == [[]] * workers
    done = [m for d, _ in results for m in d]
    assert sorted(done) == sorted(sent)  # every request once: none lost, none twice
    assert sum(1 for d, _ in results if d) >= 2, "one consumer took everything: no race shown"
    assert producer.queue_depth() == 0
    producer.close()
