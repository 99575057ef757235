"""The file event store: the store contract, plus what only files can get wrong."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from sample_events import CounterAdded, NoteWritten
from store_contract import SNAPSHOT_DAMAGE, EventStoreContract, damaged_snapshot

from shir.adapters.filestore import (
    CorruptSnapshot,
    CorruptStream,
    FileEventStore,
    StoreLocked,
    TornTail,
)
from shir.core.codec import UnknownEventType, encode
from shir.core.store import EventStore, Snapshot, StoreError


class TestFileEventStore(EventStoreContract):
    def make_store(self, tmp_path: Path) -> EventStore:
        return FileEventStore(tmp_path / "events")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileEventStore]:
    with FileEventStore(tmp_path) as s:
        yield s


def frame(payload: bytes) -> bytes:
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


EVENTS = [CounterAdded(1), NoteWritten("two"), CounterAdded(3)]


def write_three(store: FileEventStore) -> tuple[Path, int]:
    """Append three events in two batches; return the file and the last record's offset."""
    store.append("rt", EVENTS[:2], 0)
    store.append("rt", EVENTS[2:], 2)
    path = Path(store.path_of("rt"))
    return path, path.stat().st_size - len(frame(encode(EVENTS[2])))


def reopen(store: FileEventStore) -> FileEventStore:
    store.close()
    return FileEventStore(store.directory)


def test_file_format_is_length_crc_payload(store: FileEventStore) -> None:
    store.append("rt", EVENTS, 0)
    expected = b"".join(frame(encode(e)) for e in EVENTS)
    assert Path(store.path_of("rt")).read_bytes() == expected


def test_reopen_reads_back(tmp_path: Path) -> None:
    with FileEventStore(tmp_path) as first:
        first.append("rt", EVENTS, 0)
        first.append("other", [NoteWritten("x")], 0)
        first.save_snapshot("rt", Snapshot(2, b"state"))
    with FileEventStore(tmp_path) as second:
        assert second.version("rt") == 3
        assert second.read("rt") == EVENTS
        assert second.read("rt", from_version=2) == EVENTS[2:]
        assert second.read("other") == [NoteWritten("x")]
        assert second.load_snapshot("rt") == Snapshot(2, b"state")
        assert second.append("rt", [CounterAdded(4)], 3) == 4
    with FileEventStore(tmp_path) as third:
        assert third.read("rt") == [*EVENTS, CounterAdded(4)]


def test_read_from_any_version_across_index_checkpoints(tmp_path: Path) -> None:
    events = [CounterAdded(i) for i in range(700)]
    with FileEventStore(tmp_path, fsync=False) as s:
        s.append("rt", events[:300], 0)
        s.append("rt", events[300:], 300)
        wanted = (0, 1, 255, 256, 257, 511, 512, 513, 699, 700)
        read_live = {v: s.read("rt", from_version=v) for v in wanted}
    with FileEventStore(tmp_path) as s:  # index rebuilt by a scan rather than by appends
        for v in wanted:
            assert read_live[v] == s.read("rt", from_version=v) == events[v:]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("mid_header", "short header"),
        ("mid_payload", "short payload"),
        ("flip_payload", "CRC mismatch"),
        ("flip_crc", "CRC mismatch"),
    ],
)
def test_torn_tail_is_detected_not_truncated(tmp_path: Path, damage: str, reason: str) -> None:
    with FileEventStore(tmp_path) as s:
        path, last = write_three(s)
    data = bytearray(path.read_bytes())
    if damage == "mid_header":
        data = data[: last + 3]
    elif damage == "mid_payload":
        data = data[:-2]
    elif damage == "flip_payload":
        data[-1] ^= 0x40
    else:
        data[last + 5] ^= 0x01
    path.write_bytes(bytes(data))
    damaged = bytes(data)
    with FileEventStore(tmp_path) as s:
        for call in (
            lambda: s.version("rt"),
            lambda: s.read("rt"),
            lambda: s.append("rt", [CounterAdded(9)], 2),
        ):
            with pytest.raises(TornTail) as info:
                call()
            err = info.value
            assert (err.offset, err.good_records, err.trailing_bytes) == (
                last, 2, len(damaged) - last,
            )
            message = str(err)
            assert str(path) in message
            assert f"offset {last}" in message
            assert f"{len(damaged) - last} byte(s)" in message
            assert reason in message
            assert "store.repair('rt')" in message
        assert path.read_bytes() == damaged  # never truncated silently


def test_repair_truncates_then_appends_work(tmp_path: Path) -> None:
    with FileEventStore(tmp_path) as s:
        path, last = write_three(s)
    with path.open("ab") as f:
        f.truncate(path.stat().st_size - 1)
    with FileEventStore(tmp_path) as s:
        report = s.repair("rt")
        assert report.records_kept == 2
        assert report.truncated_at == last
        assert report.bytes_removed == len(frame(encode(EVENTS[2]))) - 1
        assert report.reason is not None and "short payload" in report.reason
        assert path.stat().st_size == last
        assert s.read("rt") == EVENTS[:2]
        assert s.append("rt", [NoteWritten("after")], 2) == 3
        again = s.repair("rt")  # a sound stream is left alone
        assert (again.bytes_removed, again.records_kept, again.reason) == (0, 3, None)
    with FileEventStore(tmp_path) as s:
        assert s.read("rt") == [*EVENTS[:2], NoteWritten("after")]


def test_repair_drops_a_snapshot_beyond_the_kept_records(tmp_path: Path) -> None:
    with FileEventStore(tmp_path) as s:
        path, _ = write_three(s)
        s.save_snapshot("rt", Snapshot(3, b"at three"))
    with path.open("ab") as f:
        f.truncate(path.stat().st_size - 1)
    with FileEventStore(tmp_path) as s:
        report = s.repair("rt")
        assert report.snapshot_removed
        assert s.load_snapshot("rt") is None


def test_snapshot_beyond_a_truncated_stream_is_refused_on_load(tmp_path: Path) -> None:
    with FileEventStore(tmp_path) as s:
        path, last = write_three(s)
        s.save_snapshot("rt", Snapshot(3, b"at three"))
    with path.open("ab") as f:
        f.truncate(last)  # lost by the disk, not by repair()
    with FileEventStore(tmp_path) as s, pytest.raises(CorruptSnapshot, match="beyond"):
        s.load_snapshot("rt")


def test_crc_valid_tail_the_codec_refuses_is_a_torn_tail(tmp_path: Path) -> None:
    with FileEventStore(tmp_path) as s:
        s.append("rt", EVENTS, 0)
        path = Path(s.path_of("rt"))
    good_size = path.stat().st_size
    with path.open("ab") as f:
        f.write(frame(b"\x93\xa5hello"))  # a truncated msgpack record with a correct CRC
    with FileEventStore(tmp_path) as s:
        with pytest.raises(TornTail, match="codec refuses") as info:
            s.version("rt")
        assert info.value.offset == good_size
        assert s.repair("rt").records_kept == 3
        assert s.read("rt") == EVENTS


def test_record_from_a_newer_shir_is_intact_not_torn(tmp_path: Path) -> None:
    with FileEventStore(tmp_path) as s:
        s.append("rt", EVENTS, 0)
        path = Path(s.path_of("rt"))
    with path.open("ab") as f:
        f.write(frame(msgpack.packb(["test.from_the_future", 1, []])))
    with FileEventStore(tmp_path) as s:
        assert s.version("rt") == 4  # counted: a newer writer's record is not damage
        with pytest.raises(UnknownEventType, match=r"test\.from_the_future"):
            s.read("rt")
        assert s.read("rt", from_version=4) == []
        assert s.repair("rt").bytes_removed == 0


@pytest.mark.parametrize("where", ["payload", "length"])
def test_mid_file_corruption_is_not_repaired(tmp_path: Path, where: str) -> None:
    with FileEventStore(tmp_path) as s:
        path, _ = write_three(s)
    data = bytearray(path.read_bytes())
    first = len(frame(encode(EVENTS[0])))
    if where == "payload":
        data[first + 9] ^= 0x20  # inside record #2's payload
    else:
        data[first + 1] ^= 0x10  # record #2's length now points past the end of the file
    path.write_bytes(bytes(data))
    with FileEventStore(tmp_path) as s:
        with pytest.raises(CorruptStream) as info:
            s.read("rt")
        assert info.value.offset == first
        assert info.value.good_records == 1
        with pytest.raises(CorruptStream, match="refuses") as refused:
            s.repair("rt")
        assert str(path) in str(refused.value)
        assert f"offset {first}" in str(refused.value)
    assert path.read_bytes() == bytes(data)


def test_second_store_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = FileEventStore(tmp_path)
    with pytest.raises(StoreLocked, match=rf"{tmp_path}.*pid {os.getpid()}.*close\(\)"):
        FileEventStore(tmp_path)
    first.close()
    first.close()  # idempotent
    with FileEventStore(tmp_path) as second:
        assert second.version("rt") == 0


def test_second_process_is_refused(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from shir.adapters.filestore import FileEventStore, StoreLocked\n"
        "try:\n"
        "    FileEventStore(sys.argv[1])\n"
        "except StoreLocked as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    with FileEventStore(tmp_path):
        held = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True
        )
    assert held.returncode == 3, held.stderr
    assert f"pid {os.getpid()}" in held.stdout
    free = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True)
    assert free.returncode == 0, free.stderr


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = FileEventStore(tmp_path)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.read("rt")
    with pytest.raises(StoreError, match="closed"):
        s.append("rt", [CounterAdded(1)], 0)


@pytest.mark.parametrize("damage", SNAPSHOT_DAMAGE)
def test_corrupt_snapshot_is_a_typed_error(store: FileEventStore, damage: str) -> None:
    store.append("rt", EVENTS, 0)
    store.save_snapshot("rt", Snapshot(2, b"some state bytes"))
    path = Path(store.directory) / "rt.snapshot"
    path.write_bytes(damaged_snapshot(path.read_bytes(), damage))
    with pytest.raises(CorruptSnapshot, match=r"rt\.snapshot.*delete it"):
        store.load_snapshot("rt")


def test_unencodable_event_writes_nothing(store: FileEventStore) -> None:
    store.append("rt", EVENTS[:1], 0)
    with pytest.raises(UnknownEventType):
        store.append("rt", [CounterAdded(2), object()], 1)
    assert store.version("rt") == 1
    assert Path(store.path_of("rt")).stat().st_size == len(frame(encode(EVENTS[0])))


def test_file_written_behind_the_stores_back_is_refused(store: FileEventStore) -> None:
    store.append("rt", EVENTS[:1], 0)
    with open(store.path_of("rt"), "ab") as f:
        f.write(frame(encode(EVENTS[1])))
    with pytest.raises(StoreError, match="another program"):
        store.append("rt", EVENTS[1:], 1)
    assert store.version("rt") == 2  # rescanned: the foreign record is intact


def test_snapshot_leaves_no_temporary_files(store: FileEventStore) -> None:
    store.append("rt", EVENTS, 0)
    for v in range(4):
        store.save_snapshot("rt", Snapshot(v, b"s" * v))
    assert sorted(os.listdir(store.directory)) == [".lock", "rt.events", "rt.snapshot"]


def test_without_fsync(tmp_path: Path) -> None:
    with FileEventStore(tmp_path, fsync=False) as s:
        s.append("rt", EVENTS, 0)
        s.save_snapshot("rt", Snapshot(3, b"state"))
    with FileEventStore(tmp_path, fsync=False) as s:
        assert s.read("rt") == EVENTS
        assert s.load_snapshot("rt") == Snapshot(3, b"state")
