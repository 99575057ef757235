"""The Blob event store against a real Azurite: the store contract, racing writers, damage,
segments, efficiency, and the errors a user can cause.

Every test that touches the service gets a fresh container and the module deletes them all at
the end. Faults are injected only where the SDK lets a caller hook in (a response "lost" after
the service applied the request); the service itself is never mocked.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

pytest.importorskip("azure.storage.blob")

from azure.core.exceptions import ResourceNotFoundError, ServiceResponseError
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas
from sample_events import CounterAdded, NoteWritten
from store_contract import SNAPSHOT_DAMAGE, EventStoreContract, damaged_snapshot

from shir.adapters.blobstore import (
    DEFAULT_SEGMENT_APPENDS,
    MAX_APPEND_BYTES,
    BlobAppendOutcomeUnknown,
    BlobEventStore,
    BlobServiceError,
    CorruptBlobStream,
    CorruptSnapshot,
    InvalidConnectionString,
    InvalidContainerName,
    TornBlobTail,
)
from shir.core.codec import UnknownEventType, encode
from shir.core.store import (
    AppendOutcomeUnknown,
    ConcurrencyConflict,
    EventStore,
    Snapshot,
    StoreError,
)

services = pytest.mark.services
CREATED: list[str] = []
EVENTS = [CounterAdded(1), NoteWritten("two"), CounterAdded(3)]


def new_container() -> str:
    name = f"shir-test-{uuid.uuid4().hex[:20]}"
    CREATED.append(name)
    return name


def frame(payload: bytes) -> bytes:
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


@pytest.fixture(scope="module")
def service(azurite_connection_string: str) -> Iterator[BlobServiceClient]:
    """A plain SDK client, to look at and damage blobs behind the store's back."""
    client = BlobServiceClient.from_connection_string(azurite_connection_string)
    yield client
    for name in CREATED:
        with contextlib.suppress(ResourceNotFoundError):
            client.delete_container(name)
    client.close()


class RequestLog:
    """A ``raw_response_hook``: remembers each response's method, query, range and status."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, int]] = []
        self.lose: Callable[[str, str], bool] = lambda method, url: False

    def __call__(self, response: Any) -> None:
        request = response.http_request
        status = response.http_response.status_code
        self.entries.append(
            (request.method, request.url, request.headers.get("x-ms-range", ""), status)
        )
        if self.lose(request.method, request.url):
            raise ServiceResponseError("test: the response was lost on the way back")

    def clear(self) -> None:
        self.entries.clear()


@pytest.fixture
def open_store(
    azurite_connection_string: str, service: BlobServiceClient
) -> Iterator[Callable[..., BlobEventStore]]:
    """``open_store(container=None, **options)``: a store on a fresh (or the given) container."""
    stores: list[BlobEventStore] = []

    def make(container: str | None = None, **options: Any) -> BlobEventStore:
        store = BlobEventStore.from_connection_string(
            azurite_connection_string, container or new_container(), **options
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@services
class TestBlobEventStore(EventStoreContract):
    segment_max_appends = DEFAULT_SEGMENT_APPENDS

    @pytest.fixture(autouse=True)
    def _azurite(self, azurite_connection_string: str, service: BlobServiceClient) -> None:
        self.connection_string = azurite_connection_string

    def make_store(self, tmp_path: Path) -> EventStore:
        return BlobEventStore.from_connection_string(
            self.connection_string, new_container(),
            segment_max_appends=self.segment_max_appends,
        )


@services
class TestBlobEventStoreInTinySegments(TestBlobEventStore):
    """The same contract with a segment sealed after every two appends (rollover everywhere)."""

    segment_max_appends = 2


# -- concurrency ---------------------------------------------------------------------------------


def race(
    barrier: threading.Barrier, store: BlobEventStore, batch: list[object], version: int,
    results: dict[str, int | ConcurrencyConflict], who: str,
) -> None:
    """Append ``batch`` at ``version`` as soon as the other racer is ready too."""
    barrier.wait()
    try:
        results[who] = store.append("rt", batch, version)
    except ConcurrencyConflict as conflict:
        results[who] = conflict


@services
@pytest.mark.parametrize("segment_max_appends", [DEFAULT_SEGMENT_APPENDS, 3])
def test_two_writers_racing_on_one_version_exactly_one_wins(
    open_store: Callable[..., BlobEventStore], segment_max_appends: int
) -> None:
    container = new_container()
    logs = {"a": RequestLog(), "b": RequestLog()}
    stores = {
        who: open_store(container, segment_max_appends=segment_max_appends,
                        raw_response_hook=logs[who])
        for who in logs
    }
    sizes = {"a": 2, "b": 3}
    history: list[object] = []
    barrier = threading.Barrier(2)
    wins = {"a": 0, "b": 0}
    for round_ in range(24):
        version = stores["a"].version("rt")
        assert stores["b"].version("rt") == version == len(history)
        for log in logs.values():
            log.clear()
        batches: dict[str, list[object]] = {
            who: [NoteWritten(f"{who}{round_}.{k}") for k in range(sizes[who])] for who in stores
        }
        results: dict[str, int | ConcurrencyConflict] = {}
        threads = [
            threading.Thread(target=race, args=(barrier, stores[who], batches[who], version,
                                                 results, who))
            for who in stores
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [who for who, r in results.items() if isinstance(r, int)]
        assert len(winners) == 1, results
        (winner,) = winners
        loser = "b" if winner == "a" else "a"
        wins[winner] += 1
        assert results[winner] == version + sizes[winner]
        conflict = results[loser]
        assert isinstance(conflict, ConcurrencyConflict)
        assert (conflict.expected_version, conflict.actual_version) == (
            version, version + sizes[winner]
        )
        # The service refused the loser's block: a client-side check alone never answers.
        refused = [e for e in logs[loser].entries if "comp=appendblock" in e[1]]
        assert refused and refused[-1][3] in (409, 412), logs[loser].entries
        history.extend(batches[winner])
    assert stores["a"].read("rt") == history
    assert stores["b"].read("rt") == history
    assert open_store(container).read("rt") == history  # and a third reader, from scratch


@services
@pytest.mark.parametrize("segment_max_appends", [5, 1])
def test_many_writers_retrying_lose_nothing_and_never_interleave(
    open_store: Callable[..., BlobEventStore], segment_max_appends: int
) -> None:
    # Small segments: most appends race a seal or a segment's creation too.
    container = new_container()
    writers, batches_each = 4, 12
    stores = [open_store(container, segment_max_appends=segment_max_appends)
              for _ in range(writers)]
    conflicts = [0] * writers

    def write(w: int) -> None:
        store = stores[w]
        for seq in range(batches_each):
            n = 1 + (seq + w) % 3
            batch = [NoteWritten(f"{w}:{seq}:{k}/{n}") for k in range(n)]
            version = store.version("rt")
            while True:
                try:
                    store.append("rt", batch, version)
                    break
                except ConcurrencyConflict as conflict:
                    conflicts[w] += 1
                    version = conflict.actual_version

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = open_store(container).read("rt")
    seen: dict[int, list[int]] = {w: [] for w in range(writers)}
    i = 0
    while i < len(events):  # every batch whole and contiguous, in each writer's order
        evt = events[i]
        assert isinstance(evt, NoteWritten)
        w, seq, rest = evt.text.split(":")
        n = int(rest.split("/")[1])
        assert [e.text for e in events[i : i + n]] == [  # type: ignore[attr-defined]
            f"{w}:{seq}:{k}/{n}" for k in range(n)
        ]
        seen[int(w)].append(int(seq))
        i += n
    assert seen == {w: list(range(batches_each)) for w in range(writers)}
    assert sum(conflicts) > 0  # they did race
    assert stores[0].version("rt") == len(events)


@services
def test_a_lost_append_response_is_resolved_not_reported_as_a_conflict(
    open_store: Callable[..., BlobEventStore],
) -> None:
    log = RequestLog()
    store = open_store(raw_response_hook=log)
    store.append("rt", EVENTS[:1], 0)
    lost: list[str] = []

    def lose_first_append(method: str, url: str) -> bool:
        if "comp=appendblock" in url and not lost:
            lost.append(url)
            return True
        return False

    log.lose = lose_first_append
    # The service applied the block; the store never saw the answer, re-reads, finds its bytes.
    assert store.append("rt", EVENTS[1:], 1) == 3
    assert lost
    assert [e[3] for e in log.entries if "comp=appendblock" in e[1]][-1] == 201
    assert store.read("rt") == EVENTS
    assert open_store(store.container_name).read("rt") == EVENTS  # exactly once


@services
def test_an_unknown_outcome_that_cannot_be_resolved_says_so(
    open_store: Callable[..., BlobEventStore],
) -> None:
    log = RequestLog()
    store = open_store(raw_response_hook=log, retry_total=0)
    store.append("rt", EVENTS[:1], 0)
    log.lose = lambda method, url: True  # every answer is lost from now on
    with pytest.raises(BlobAppendOutcomeUnknown, match="re-read the stream before deciding"):
        store.append("rt", EVENTS[1:], 1)
    log.lose = lambda method, url: False
    assert store.read("rt") == EVENTS  # it had landed: all of it


# -- segments and efficiency ---------------------------------------------------------------------


@services
def test_segments_are_sealed_and_chained(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient
) -> None:
    log = RequestLog()
    store = open_store(segment_max_appends=2, raw_response_hook=log)
    for i in range(5):
        store.append("rt", [CounterAdded(i), NoteWritten(str(i))], 2 * i)
    # A segment's end is final only by a HEAD: Azurite builds a download's sealed flag after its
    # body, and following a seal from a download alone lost records under racing writers.
    requests = [(method, url.split("?")[0].rsplit("/", 1)[-1], "?" in url)
                for method, url, _, _ in log.entries]
    for n in (1, 2):
        created = requests.index(("PUT", f"events.{n:08d}", False))
        assert ("HEAD", f"events.{n - 1:08d}", False) in requests[:created]
    names = store.blob_names("rt")
    assert names == [f"rt/events.{n:08d}" for n in range(3)]
    container = service.get_container_client(store.container_name)
    props = [container.get_blob_client(n).get_blob_properties() for n in names]
    assert [p.is_append_blob_sealed for p in props] == [True, True, False]
    assert [p.metadata["shir_base_version"] for p in props] == ["0", "4", "8"]
    expected = [e for i in range(5) for e in (CounterAdded(i), NoteWritten(str(i)))]
    for v in range(11):
        assert store.read("rt", v) == expected[v:]
    fresh = open_store(store.container_name, segment_max_appends=2)
    assert fresh.read("rt", 5) == expected[5:]
    assert fresh.read("rt") == expected


@services
def test_an_append_slipping_in_before_the_seal_is_kept_in_its_segment(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient
) -> None:
    # A's append fills segment 1; before A seals it, B (a roomier writer) appends too. A's index
    # then lacks B's record: the next segment's base must come from the sealed blob itself, also
    # when A next reads from an earlier segment.
    log = RequestLog()
    a = open_store(segment_max_appends=2, raw_response_hook=log)
    b = open_store(a.container_name)
    for v in range(3):
        a.append("rt", [CounterAdded(v)], v)
    slipped: list[int] = []

    def b_appends_first(method: str, url: str) -> bool:
        if "comp=appendblock" in url and not slipped:
            slipped.append(b.append("rt", [NoteWritten("b")], b.version("rt")))
        return False

    log.lose = b_appends_first
    assert a.append("rt", [CounterAdded(3)], 3) == 4
    assert slipped == [5]
    expected = [CounterAdded(0), CounterAdded(1), CounterAdded(2), CounterAdded(3),
                NoteWritten("b")]
    assert a.read("rt") == expected
    with pytest.raises(ConcurrencyConflict) as info:
        a.append("rt", [CounterAdded(4)], 4)
    assert info.value.actual_version == 5
    assert a.append("rt", [CounterAdded(4)], 5) == 6
    expected.append(CounterAdded(4))
    names = a.blob_names("rt")
    assert names == [f"rt/events.{n:08d}" for n in range(3)]
    container = service.get_container_client(a.container_name)
    bases = [container.get_blob_client(n).get_blob_properties().metadata for n in names]
    assert [m["shir_base_version"] for m in bases] == ["0", "2", "5"]
    assert a.read("rt") == b.read("rt") == open_store(a.container_name).read("rt") == expected


@services
def test_opening_reads_only_the_last_segment_and_nothing_new_is_one_empty_answer(
    open_store: Callable[..., BlobEventStore],
) -> None:
    wlog = RequestLog()
    writer = open_store(segment_max_appends=4, raw_response_hook=wlog)
    for i in range(10):
        writer.append("rt", [CounterAdded(i)], i)
    wlog.clear()
    # The writer knows the ETag its own append produced: unchanged is a 304, no body.
    assert writer.version("rt") == 10
    assert [(e[0], e[3]) for e in wlog.entries] == [("GET", 304)]
    log = RequestLog()
    reader = open_store(writer.container_name, raw_response_hook=log)
    assert reader.version("rt") == 10
    gets = [e for e in log.entries if e[0] == "GET"]
    assert len(gets) == 2  # list the segments, download the last one: not the whole stream
    assert "comp=list" in gets[0][1] and "events.00000002" in gets[1][1]
    end = sum(len(frame(encode(CounterAdded(i)))) for i in range(8, 10))
    for _ in range(2):
        log.clear()
        assert reader.version("rt") == 10
        # One request for the bytes after the indexed end. A download's ETag cannot be trusted
        # on Azurite (it may be newer than the bytes), so a reader asks for the bytes, which
        # are none: an empty 206 here (a 416 answered by a HEAD on Azure).
        ((method, _, byte_range, status),) = log.entries
        assert (method, status) == ("GET", 206) and byte_range.startswith(f"bytes={end}-")
    log.clear()
    assert reader.read("rt", 9) == [CounterAdded(9)]
    assert len(log.entries) == 1  # the read indexes and decodes in one download
    assert reader.read("rt", 12) == []


@services
def test_read_from_a_version_downloads_from_its_checkpoint(
    open_store: Callable[..., BlobEventStore],
) -> None:
    log = RequestLog()
    store = open_store(raw_response_hook=log)
    events = [CounterAdded(i) for i in range(600)]
    store.append("rt", events[:300], 0)
    store.append("rt", events[300:], 300)
    log.clear()
    assert store.read("rt", 550) == events[550:]
    ((method, _, byte_range, status),) = log.entries
    start = len(b"".join(frame(encode(e)) for e in events[:512]))  # the checkpoint of #512
    assert (method, status) == ("GET", 206)
    assert byte_range.startswith(f"bytes={start}-")  # (the SDK asks for up to 32 MiB more)


# -- damage --------------------------------------------------------------------------------------


def write_three(store: BlobEventStore, service: BlobServiceClient) -> tuple[Any, int]:
    """Append three events in two batches; return the blob and the last record's offset."""
    store.append("rt", EVENTS[:2], 0)
    store.append("rt", EVENTS[2:], 2)
    blob = service.get_blob_client(store.container_name, "rt/events.00000000")
    return blob, len(b"".join(frame(encode(e)) for e in EVENTS[:2]))


@services
@pytest.mark.parametrize(
    "junk, reason",
    [
        (b"\x00\x00", "short header"),
        (frame(encode(CounterAdded(4)))[:-1], "short payload"),
        (b"\x00\x00\x00\x05\x00\x00\x00\x00hello", "CRC mismatch"),
        (frame(b"\x93\xa5hello"), "codec refuses"),  # CRC-valid, malformed msgpack
    ],
)
def test_a_torn_tail_is_reported_by_every_operation(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient, junk: bytes,
    reason: str,
) -> None:
    store = open_store()
    blob, _ = write_three(store, service)
    good = blob.get_blob_properties().size
    blob.append_block(junk)  # another program appends garbage behind the store's back
    for who in (store, open_store(store.container_name)):
        for call in (
            lambda s=who: s.version("rt"),
            lambda s=who: s.read("rt"),
            lambda s=who: s.read("rt", 3),
            lambda s=who: s.append("rt", [CounterAdded(9)], 3),
        ):
            with pytest.raises(TornBlobTail) as info:
                call()
            err = info.value
            assert (err.offset, err.good_records, err.trailing_bytes) == (good, 3, len(junk))
            assert reason in str(err)
            assert "rt/events.00000000" in str(err)
            assert f"first {good} bytes" in str(err)
    assert blob.get_blob_properties().size == good + len(junk)  # nothing written after it


@services
def test_damage_in_the_middle_is_corruption_not_a_torn_tail(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient
) -> None:
    store = open_store()
    container = service.get_container_client(store.container_name)
    container.create_container()
    frames = [bytearray(frame(encode(e))) for e in EVENTS]
    frames[1][-1] ^= 0x01  # flip a bit of the second record's payload
    blob = container.get_blob_client("rt/events.00000000")
    blob.create_append_blob(metadata={"shir_base_version": "0"})
    blob.append_block(b"".join(bytes(f) for f in frames))
    with pytest.raises(CorruptBlobStream, match=r"event #2 at byte offset \d+ is damaged") as info:
        store.read("rt")
    assert "not a torn tail" in str(info.value)


@services
def test_a_record_from_a_newer_shir_is_intact_not_damage(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient
) -> None:
    store = open_store()
    blob, _ = write_three(store, service)
    blob.append_block(frame(msgpack.packb(["test.from_the_future", 1, []])))
    assert store.version("rt") == 4
    with pytest.raises(UnknownEventType, match=r"test\.from_the_future"):
        store.read("rt")
    assert store.read("rt", 4) == []


@services
def test_a_stream_deleted_behind_the_stores_back_is_reported(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient
) -> None:
    store = open_store()
    blob, _ = write_three(store, service)
    blob.delete_blob()
    with pytest.raises(CorruptBlobStream, match="deleted behind the store's back"):
        store.version("rt")


@services
@pytest.mark.parametrize(
    "text, read_first, call",
    [("b", False, "read"), ("b", True, "version"), ("a longer text", True, "read"),
     ("a longer text", False, "version")],
)
def test_a_stream_recreated_behind_the_stores_back_is_reported_then_read_afresh(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient, text: str,
    read_first: bool, call: str,
) -> None:
    # A knows three events of segment 0 (from its own append, or also from reading it); the
    # stream is deleted and written again, longer. With records of the same size the bytes
    # after A's index look like a continuation: A would splice "b3", "b4" onto "a0".."a2".
    # With other sizes A's index falls mid-record: A would call the intact new stream damaged,
    # on every call, and advise a restore from backup.
    a = open_store()
    mine = [NoteWritten(f"a{i}") for i in range(3)]
    a.append("rt", mine, 0)
    if read_first:
        assert a.read("rt") == mine
    container = service.get_container_client(a.container_name)
    container.get_blob_client("rt/events.00000000").delete_blob()
    time.sleep(1.1)  # creation times have a resolution of one second
    recreated = [NoteWritten(f"{text}{i}") for i in range(5)]
    open_store(a.container_name).append("rt", recreated, 0)
    with pytest.raises(CorruptBlobStream, match="created again after this store read it"):
        a.read("rt", 3) if call == "read" else a.version("rt")
    assert a.read("rt") == recreated  # the next call reads the stream afresh
    assert a.version("rt") == 5


@services
@pytest.mark.parametrize("damage", SNAPSHOT_DAMAGE)
def test_a_corrupt_snapshot_is_a_typed_error(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient, damage: str
) -> None:
    store = open_store()
    store.append("rt", EVENTS, 0)
    store.save_snapshot("rt", Snapshot(2, b"some state bytes"))
    blob = service.get_blob_client(store.container_name, "rt/snapshot")
    data = damaged_snapshot(blob.download_blob().readall(), damage)
    blob.upload_blob(data, overwrite=True)
    with pytest.raises(CorruptSnapshot, match=r"rt/snapshot.*delete it"):
        store.load_snapshot("rt")


# -- lifecycle and the errors a user can cause ---------------------------------------------------


@services
def test_reopen_reads_back_and_the_container_is_created_on_first_write(
    open_store: Callable[..., BlobEventStore], service: BlobServiceClient
) -> None:
    store = open_store()
    container = service.get_container_client(store.container_name)
    assert store.version("rt") == 0 and store.load_snapshot("rt") is None
    assert not container.exists()  # reading an absent stream creates nothing
    store.append("rt", EVENTS, 0)
    assert container.exists()
    store.save_snapshot("rt", Snapshot(2, b"state"))
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.read("rt")
    with open_store(store.container_name) as again:
        assert again.version("rt") == 3
        assert again.read("rt") == EVENTS
        assert again.load_snapshot("rt") == Snapshot(2, b"state")
        assert again.append("rt", [CounterAdded(4)], 3) == 4


@services
def test_an_append_too_big_for_one_block_writes_nothing(
    open_store: Callable[..., BlobEventStore],
) -> None:
    store = open_store()
    store.append("rt", EVENTS[:1], 0)
    with pytest.raises(StoreError, match="one atomic Append Block"):
        store.append("rt", [NoteWritten("x" * (MAX_APPEND_BYTES // 2))] * 2, 1)
    assert store.read("rt") == EVENTS[:1]


def test_invalid_container_names_are_refused_before_any_request() -> None:
    connection_string = "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=AAAA;" \
        "BlobEndpoint=http://127.0.0.1:9/a;"
    for bad in ("ab", "Upper", "has--two", "-dash", "dash-", "x" * 64, "under_score"):
        with pytest.raises(InvalidContainerName, match="lowercase letters, digits"):
            BlobEventStore.from_connection_string(connection_string, bad)


def test_a_malformed_connection_string_names_its_keys_not_its_values() -> None:
    key = "Zm9vYmFyc2VjcmV0a2V5MTIzNDU2Nzg5MA=="
    for bad, keys in (
        (key, "it has no Key=Value pairs"),  # the key pasted in place of the string
        (f"AccountKey={key}", "it has the keys AccountKey"),
        (f"junk;AccountKey={key};x", "it has the keys AccountKey"),
    ):
        with pytest.raises(InvalidConnectionString) as info:
            BlobEventStore.from_connection_string(bad, "events")
        message = str(info.value)
        assert key not in message and key[:12] not in message
        assert keys in message
        assert "expected DefaultEndpointsProtocol, AccountName, and AccountKey" in message


def test_an_unreachable_endpoint_says_where_and_what_to_check() -> None:
    key = "Zm9vYmFyc2VjcmV0a2V5MTIzNDU2Nzg5MA=="
    store = BlobEventStore.from_connection_string(
        f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={key};"
        "BlobEndpoint=http://127.0.0.1:9/acct;", "events", retry_total=0,
    )
    with pytest.raises(BlobServiceError, match="could not reach the Blob endpoint") as info:
        store.append("rt", EVENTS, 0)
    message = str(info.value)
    assert "http://127.0.0.1:9/acct" in message and "BlobEndpoint" in message
    assert key not in message and key not in repr(store)


def with_account_key(connection_string: str, key: str) -> str:
    """``connection_string`` with its AccountKey replaced by ``key``."""
    return ";".join(
        f"AccountKey={key}" if part.startswith("AccountKey=") else part
        for part in connection_string.split(";")
    )


@services
def test_a_wrong_key_says_the_credential_is_wrong_without_showing_it(
    azurite_connection_string: str,
) -> None:
    key = "Zm9vYmFyc2VjcmV0a2V5MTIzNDU2Nzg5MA=="
    wrong = with_account_key(azurite_connection_string, key)
    with BlobEventStore.from_connection_string(wrong, new_container()) as store:
        for call in (lambda: store.version("rt"), lambda: store.append("rt", EVENTS, 0)):
            with pytest.raises(BlobServiceError, match="refused") as info:
                call()
            assert info.value.status == 403
            assert "AccountKey" in str(info.value)
            assert key not in str(info.value) and info.value.__cause__ is None


@services
def test_a_wrong_key_error_carries_the_services_error_code(
    azurite_connection_string: str,
) -> None:
    # The SDK turns codes it does not map to an exception class into StorageErrorCode members,
    # whose str() is "StorageErrorCode.AUTHORIZATION_FAILURE", not the service's code.
    key = "Zm9vYmFyc2VjcmV0a2V5MTIzNDU2Nzg5MA=="
    wrong = with_account_key(azurite_connection_string, key)
    with (
        BlobEventStore.from_connection_string(wrong, new_container()) as store,
        pytest.raises(BlobServiceError) as info,
    ):
        store.version("rt")
    assert info.value.error_code == "AuthorizationFailure"
    assert "(AuthorizationFailure, HTTP 403)" in str(info.value)
    assert "StorageErrorCode" not in str(info.value)


@services
def test_an_expired_sas_is_called_expired_or_wrong_not_missing(
    azurite_connection_string: str, service: BlobServiceClient
) -> None:
    parts = dict(p.split("=", 1) for p in azurite_connection_string.split(";") if p)
    container = new_container()
    service.create_container(container)
    sas = generate_container_sas(
        parts["AccountName"], container, account_key=parts["AccountKey"],
        permission=ContainerSasPermissions(read=True, add=True, create=True, write=True,
                                           list=True),
        expiry=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1),
    )
    signature = dict(p.split("=", 1) for p in sas.split("&"))["sig"]
    with BlobEventStore.from_connection_string(
        f"BlobEndpoint={parts['BlobEndpoint']};SharedAccessSignature={sas}", container
    ) as store:
        for call in (lambda: store.version("rt"), lambda: store.append("rt", EVENTS, 0)):
            with pytest.raises(BlobServiceError) as info:
                call()
            message = str(info.value)
            assert info.value.status == 403
            assert "SharedAccessSignature" in message and "expired" in message
            assert "add one" not in message  # it has one: telling the user to add one misleads
            assert signature not in message and signature not in repr(store)


def test_a_malformed_account_key_is_named_before_any_request() -> None:
    # Not base64: the SDK fails while signing, before it sends anything, with no HTTP status.
    bad_key = "not*base64!secret"
    store = BlobEventStore.from_connection_string(
        f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={bad_key};"
        "BlobEndpoint=http://127.0.0.1:9/acct;", "events", retry_total=0,
    )
    for call in (lambda: store.version("rt"), lambda: store.append("rt", EVENTS, 0),
                 lambda: store.load_snapshot("rt")):
        with pytest.raises(BlobServiceError) as info:
            call()
        message = str(info.value)
        assert "AccountKey" in message and "base64" in message, message
        assert "HTTP None" not in message and "refused" not in message
        assert bad_key not in message and info.value.__cause__ is None


@services
def test_a_busy_or_failing_service_says_retry_later_not_refused(
    open_store: Callable[..., BlobEventStore],
) -> None:
    busy = {"on": False}

    def throttle(response: Any) -> None:
        # The service's answer turned into the 503 it sends when it throttles an account.
        if busy["on"]:
            response.http_response.status_code = 503
            response.http_response.headers["x-ms-error-code"] = "ServerBusy"

    store = open_store(raw_response_hook=throttle, retry_total=0)
    store.append("rt", EVENTS, 0)
    busy["on"] = True
    for call in (lambda: store.version("rt"), lambda: store.read("rt"),
                 lambda: store.save_snapshot("rt", Snapshot(1, b"state"))):
        with pytest.raises(BlobServiceError) as info:
            call()
        message = str(info.value)
        assert (info.value.status, info.value.error_code) == (503, "ServerBusy")
        assert "(ServerBusy, HTTP 503" in message and "retry later" in message, message
        assert "refused" not in message  # it did not refuse anything: it is busy or failing
    busy["on"] = False
    assert store.read("rt") == EVENTS


def test_appends_that_keep_failing_with_a_lost_answer_end_in_an_unknown_outcome(
    open_store: Callable[..., BlobEventStore],
) -> None:
    # Every append is refused by the service (its position condition made impossible) and its
    # answer turned into a 500: each attempt's outcome is unknown to the store. When the
    # attempts run out, the caller must be told to re-read (on Azure a timed-out request can
    # still land later), not that the service merely failed.
    failing = {"on": False}

    def impossible_position(request: Any) -> None:
        http = request.http_request
        if failing["on"] and "comp=appendblock" in http.url:
            http.headers["x-ms-blob-condition-appendpos"] = str(1 << 40)

    def lost_answer(response: Any) -> None:
        if failing["on"] and "comp=appendblock" in response.http_request.url:
            response.http_response.status_code = 500
            response.http_response.headers["x-ms-error-code"] = "InternalError"

    store = open_store(raw_request_hook=impossible_position, raw_response_hook=lost_answer,
                       retry_total=0)  # fmt: skip
    store.append("rt", EVENTS, 0)
    failing["on"] = True
    with pytest.raises(AppendOutcomeUnknown, match="re-read the stream before deciding"):
        store.append("rt", [NoteWritten("lost?")], len(EVENTS))
    failing["on"] = False
    assert store.read("rt") == EVENTS  # it did not land, and the store still works
    assert store.append("rt", [NoteWritten("next")], len(EVENTS)) == len(EVENTS) + 1


def test_without_the_azure_sdk_the_import_says_what_to_install() -> None:
    script = (
        "import sys\n"
        "for name in ('azure', 'azure.core', 'azure.storage', 'azure.storage.blob'):\n"
        "    sys.modules[name] = None\n"
        "import shir.adapters, shir.adapters.filestore\n"  # these keep working
        "try:\n"
        "    import shir.adapters.blobstore\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ).stdout
    assert "pip install 'shir[azure]'" in out
    assert "azure-storage-blob" in out
