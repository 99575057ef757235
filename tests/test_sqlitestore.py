"""The SQLite event store: the store contract, several processes on one file, formats, URLs."""

from __future__ import annotations

import datetime
import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sample_events import CounterAdded, NoteWritten
from store_contract import EventStoreContract

from shir.adapters.filestore import FileEventStore
from shir.adapters.sqlitestore import (
    FORMAT_VERSION,
    NotAShirStore,
    SQLiteEventStore,
    StoreBusy,
    UnsupportedStoreFormat,
)
from shir.adapters.stores import StoreUrlError, describe_store_url, open_store
from shir.core.codec import UnknownEventType
from shir.core.store import ConcurrencyConflict, EventStore, Snapshot, StoreError


class TestSQLiteEventStore(EventStoreContract):
    def make_store(self, tmp_path: Path) -> EventStore:
        return SQLiteEventStore(tmp_path / "store.db", fsync=False)


EVENTS = [CounterAdded(1), NoteWritten("two"), CounterAdded(3)]


def test_reopen_reads_back_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteEventStore(path) as first:
        first.append("rt", EVENTS, 0)
        first.save_snapshot("rt", Snapshot(2, b"state"))
    with SQLiteEventStore(path) as second:
        assert second.read("rt") == EVENTS
        assert second.load_snapshot("rt") == Snapshot(2, b"state")
        assert second.append("rt", [CounterAdded(4)], 3) == 4
        assert second.streams() == ["rt"]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_two_store_objects_see_each_others_appends(tmp_path: Path) -> None:
    with SQLiteEventStore(tmp_path / "s.db") as a, SQLiteEventStore(tmp_path / "s.db") as b:
        a.append("rt", EVENTS[:1], 0)
        assert b.version("rt") == 1
        with pytest.raises(ConcurrencyConflict) as info:
            b.append("rt", EVENTS[1:], 0)
        assert info.value.actual_version == 1
        assert b.append("rt", EVENTS[1:], 1) == 3
        assert a.read("rt") == EVENTS


def _writer(path: str, name: str, count: int, start: multiprocessing.synchronize.Barrier,
            out: multiprocessing.Queue[tuple[str, int, int, list[str]]]) -> None:
    """Append ``count`` two-event batches, re-reading after every conflict (bounded)."""
    store = SQLiteEventStore(path, fsync=False)
    start.wait(30)  # every writer has its store open: they race from here on
    appended = conflicts = 0
    problems: list[str] = []
    deadline = time.monotonic() + 60
    version = store.version("rt")
    while appended < count and time.monotonic() < deadline:
        batch = [NoteWritten(f"{name}-{appended}-a"), NoteWritten(f"{name}-{appended}-b")]
        time.sleep(0.001)  # "deciding" between the read and the append widens the race
        try:
            store.append("rt", batch, version)
            appended += 1
            version = store.version("rt")  # as a host re-reads the tail before deciding
        except ConcurrencyConflict as exc:
            conflicts += 1
            if exc.actual_version == version:
                problems.append(f"conflict at the expected version {version}")
            version = store.version("rt")
        except Exception as exc:  # anything else is a failure of the test's subject
            problems.append(f"{type(exc).__name__}: {exc}")
            break
    store.close()
    out.put((name, appended, conflicts, problems))


def test_processes_appending_concurrently_lose_and_interleave_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    SQLiteEventStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    names = ["w0", "w1", "w2"]
    start = ctx.Barrier(len(names))
    out: multiprocessing.Queue[tuple[str, int, int, list[str]]] = ctx.Queue()
    per_writer = 60
    procs = [ctx.Process(target=_writer, args=(path, n, per_writer, start, out)) for n in names]
    for p in procs:
        p.start()
    results = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    for name, appended, _conflicts, problems in results:
        assert problems == [], name
        assert appended == per_writer, name
    assert sum(r[2] for r in results) > 0, "the writers never raced: the test proves nothing"
    with SQLiteEventStore(path) as store:
        events = store.read("rt")
    assert len(events) == 2 * per_writer * len(names)
    notes = [e.text for e in events if isinstance(e, NoteWritten)]
    # Batches stay whole and in order: every "-a" is followed at once by its own "-b".
    for a, b in zip(notes[::2], notes[1::2], strict=True):
        assert a.endswith("-a") and b == a[:-1] + "b"
    for name in names:
        mine = [n for n in notes[::2] if n.startswith(name + "-")]
        assert mine == [f"{name}-{i}-a" for i in range(per_writer)]


def test_a_held_write_lock_gives_a_busy_error_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteEventStore(path, busy_timeout_s=0.2) as store:
        store.append("rt", EVENTS[:1], 0)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            with pytest.raises(StoreBusy, match=r"write lock for more than 0.2 s.*retry"):
                store.append("rt", EVENTS[1:], 1)
            assert time.monotonic() - started < 5
            assert store.read("rt") == EVENTS[:1]  # WAL: reads go on under a writer
        finally:
            other.rollback()
            other.close()
        assert store.append("rt", EVENTS[1:], 1) == 3


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SQLiteEventStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE shir_meta SET value = ? WHERE key = 'format_version'",
               (str(FORMAT_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(UnsupportedStoreFormat, match=rf"format {FORMAT_VERSION + 1}.*upgrade"):
        SQLiteEventStore(path)


def test_a_database_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(NotAShirStore, match="another program"):
        SQLiteEventStore(path)
    db = sqlite3.connect(path)
    assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["customers"]
    db.close()


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the pages of a database " * 200)
    with pytest.raises(NotAShirStore, match="not a SQLite database"):
        SQLiteEventStore(path)


def test_missing_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no SQLite store.*runtime create"):
        SQLiteEventStore(tmp_path / "none.db", create=False)
    with pytest.raises(StoreError, match=r"folder .* does not exist"):
        SQLiteEventStore(tmp_path / "no" / "such" / "s.db")


def test_unencodable_event_writes_nothing(tmp_path: Path) -> None:
    with SQLiteEventStore(tmp_path / "s.db") as store:
        store.append("rt", EVENTS[:1], 0)
        with pytest.raises(UnknownEventType):
            store.append("rt", [CounterAdded(2), object()], 1)
        assert store.read("rt") == EVENTS[:1]


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "s.db")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.append("rt", EVENTS, 0)


# -- open_store ----------------------------------------------------------------------------


def test_open_store_sqlite_relative_and_absolute(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///rel.db")
    assert isinstance(store, SQLiteEventStore)
    store.append("rt", EVENTS, 0)
    store.close()
    assert (tmp_path / "rel.db").exists()
    again = open_store(f"sqlite:///{tmp_path / 'rel.db'}", create=False)
    assert again.read("rt") == EVENTS
    again.close()  # type: ignore[attr-defined]


def test_open_store_file(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'events'}")
    assert isinstance(store, FileEventStore)
    store.close()
    with pytest.raises(StoreError, match="no file store"):
        open_store(f"file://{tmp_path / 'missing'}", create=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://db/shir", r"scheme 'postgres://'.*sqlite:///PATH"),
        ("just-a-name", "no scheme"),
        ("", "no store given"),
        ("sqlite://relative.db", "three slashes"),
        ("file:", "file:///PATH"),
    ],
)
def test_open_store_refuses_unknown_forms(url: str, message: str) -> None:
    with pytest.raises(StoreUrlError, match=message):
        open_store(url)


def test_open_store_missing_sqlite_file_names_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="runtime create"):
        open_store(f"sqlite:///{tmp_path / 'x.db'}", create=False)


CANARY_KEY = "Q2FuYXJ5S2V5U2hvdWxkTmV2ZXJMZWFrT3V0T2ZTaGlyU3RvcmVzMTIzNA=="


def test_open_store_blob_unreachable_names_endpoint_not_key() -> None:
    cs = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={CANARY_KEY};BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    )
    with pytest.raises(StoreError) as info:
        open_store(cs, retry_total=0, connection_timeout=2)
    assert "could not reach" in str(info.value)
    assert "127.0.0.1:9" in str(info.value)
    assert CANARY_KEY not in str(info.value)
    assert CANARY_KEY not in describe_store_url(cs)
    sas_url = "http://127.0.0.1:9/devstoreaccount1/runtime?sv=2020&sig=CANARYSIG"
    with pytest.raises(StoreError) as info2:
        open_store(sas_url, retry_total=0, connection_timeout=2)
    assert "CANARYSIG" not in str(info2.value)
    assert "could not reach" in str(info2.value)
    assert "CANARYSIG" not in describe_store_url(sas_url)


def test_open_store_blob_on_azurite(azurite_connection_string: str) -> None:
    import uuid

    from azure.storage.blob import (
        BlobServiceClient,
        ContainerSasPermissions,
        generate_container_sas,
    )

    from shir.adapters.blobstore import BlobEventStore

    container = f"shir-open-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StoreError, match="container does not exist"):
        open_store(f"{azurite_connection_string};Container={container}", create=False)
    store = open_store(f"{azurite_connection_string};Container={container}")
    assert isinstance(store, BlobEventStore) and store.container_name == container
    store.append("rt", EVENTS, 0)
    store.close()
    service = BlobServiceClient.from_connection_string(azurite_connection_string)
    try:
        parts = dict(
            p.split("=", 1) for p in azurite_connection_string.split(";") if "=" in p
        )
        sas = generate_container_sas(
            parts["AccountName"], container, account_key=parts["AccountKey"],
            permission=ContainerSasPermissions(read=True, add=True, create=True, write=True,
                                               list=True),
            expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=10),
        )
        via_sas = open_store(f"{parts['BlobEndpoint'].rstrip('/')}/{container}?{sas}",
                             create=False)
        assert via_sas.read("rt") == EVENTS
        assert via_sas.append("rt", [CounterAdded(4)], 3) == 4
        assert sas.split("sig=")[1][:10] not in repr(via_sas)
        via_sas.close()  # type: ignore[attr-defined]
    finally:
        service.delete_container(container)
        service.close()


def _opener(folder: str, rounds: int, start: Any, out: Any) -> None:
    from shir.adapters.embedded_channel import EmbeddedChannel

    problems: list[str] = []
    for i in range(rounds):
        start.wait(30)
        path = f"{folder}/round-{i}.db"
        try:  # a node host opens its store and the embedded channel on one file
            SQLiteEventStore(path).close()
            EmbeddedChannel(path).close()
        except Exception as exc:  # reported to the test, which fails on it
            problems.append(f"round {i}: {type(exc).__name__}: {exc}")
    out.put(problems)


def test_processes_opening_a_new_file_at_once_all_get_wal(tmp_path: Path) -> None:
    # Six openers racing on a new file got "database is locked" from PRAGMA journal_mode=WAL,
    # at once and despite the busy timeout, in about one race in seven: the host retries it.
    ctx = multiprocessing.get_context("spawn")
    openers, rounds = 6, 20
    start = ctx.Barrier(openers)
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_opener, args=(str(tmp_path), rounds, start, out))
             for _ in range(openers)]
    for p in procs:
        p.start()
    try:
        problems = [msg for _ in procs for msg in out.get(timeout=120)]
    finally:
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
    assert problems == []
    for i in range(rounds):
        db = sqlite3.connect(tmp_path / f"round-{i}.db")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
