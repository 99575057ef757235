"""What keeps the copy's memory flat and small (docs/copy.md, "Peak RSS"): parts cut at a size
that doubles every 10,000 parts, handed to the sink uncopied, at most ``max_parallel`` of them
uploading; the arrow engine's memory pools and no ``pyarrow.fs``."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shir.adapters import copy as copy_module
from shir.adapters.copy import MAX_PART_SIZE_BYTES, PARTS_PER_SIZE, copy_query, part_size
from shir.adapters.copy_formats import Encoder
from shir.adapters.copy_sinks import BlobSink, SinkWriter

MiB = 1024 * 1024


def test_part_size_doubles_every_10000_parts_so_a_blob_of_50000_blocks_holds_a_terabyte() -> None:
    assert PARTS_PER_SIZE == 10_000
    assert [part_size(4 * MiB, p) // MiB for p in (0, 9_999, 10_000, 19_999, 20_000, 49_999)] == [
        4, 4, 8, 8, 16, 64]
    assert part_size(4 * MiB, 10**9) == MAX_PART_SIZE_BYTES  # never more than the cap...
    assert part_size(512 * MiB, 0) == 512 * MiB  # ...unless asked for more from the start
    assert sum(part_size(4 * MiB, p) for p in range(50_000)) > 2**40


class _Batches:
    """A source whose stream yields ``batches`` batches, each encoded as ``size`` bytes."""

    def __init__(self, batches: int, size: int) -> None:
        self.batches, self.size = batches, size

    def read(self, query: str, *, batch_rows: int) -> _Batches:
        return self

    def driver_rows(self) -> Iterator[list[int]]:
        for i in range(self.batches):
            yield [i]

    def encoder(self, fmt: str, options: object) -> Encoder:
        size = self.size

        class Fixed(Encoder):
            def encode(self, rows: Any) -> bytes:
                return bytes([rows[0] % 256]) * size

        return Fixed()

    def close(self) -> None:
        pass

    def cancel(self) -> None:
        pass


class _Recording(SinkWriter):
    def __init__(self) -> None:
        self.parts: list[bytes | bytearray] = []
        self.committed = False

    def put(self, part: int, data: bytes | bytearray, through_md5: bytes) -> None:
        assert part == len(self.parts)
        self.parts.append(data)

    def commit(self, md5: bytes, rows: int) -> None:
        self.committed = True

    def abort(self) -> None:
        pass


def test_parts_are_cut_at_the_growing_part_size_and_handed_over_uncopied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(copy_module, "PARTS_PER_SIZE", 2)  # doubling after 2 parts, not 10,000
    writer = _Recording()

    class Sink:
        def open(self, job_id: str) -> SinkWriter:
            return writer

    result = copy_query(_Batches(40, 100), "q", Sink(), "csv", "job", part_size_bytes=250)
    assert writer.committed and result.rows == 40 and result.bytes == 4_000
    # cut once a part reaches 250, 250, 500, 500, 1000, ... bytes (batches of 100 bytes)
    assert [len(p) for p in writer.parts] == [300, 300, 500, 500, 1000, 1000, 400]
    assert all(type(p) is bytearray for p in writer.parts)  # the gathering buffers themselves
    assert len({id(p) for p in writer.parts}) == len(writer.parts)  # a new one for each part
    assert b"".join(writer.parts) == b"".join(bytes([i]) * 100 for i in range(40))


def test_a_blob_sink_uploads_at_most_max_parallel_parts_and_queues_none() -> None:
    in_flight, most = [0], [0]
    lock, release = threading.Lock(), threading.Event()

    class Client:  # stands in for the SDK's BlobClient: counts the stage_block calls at once
        def stage_block(self, block_id: str, data: Any, **kwargs: Any) -> None:
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            release.wait(10)
            with lock:
                in_flight[0] -= 1

        def commit_block_list(self, blocks: Any, **kwargs: Any) -> None:
            pass

    class Containers:
        account_name, container_name = "test", "c"

    class Service:
        def get_container_client(self, container: str) -> Containers:
            return Containers()

    from shir.adapters.copy_sinks import _BlobWriter

    writer = _BlobWriter(BlobSink(Service(), "c", "b", max_parallel=3), Client(), "tag", "job",
                         set())
    put = []

    def producer() -> None:
        for part in range(8):
            writer.put(part, bytearray(b"x" * 10), bytes([part]) * 16)
            put.append(part)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while most[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # a fourth part would be taken now if parts could queue
    assert len(put) == 3 and most[0] == 3  # the fourth put waits for a free upload
    release.set()
    thread.join(10)
    writer.commit(b"", 8)  # waits for every upload
    assert len(put) == 8 and most[0] == 3 and in_flight[0] == 0


def test_arrow_engine_memory_pools_and_no_pyarrow_fs() -> None:
    """The kernels on the system allocator, the Parquet writer on mimalloc set to give freed
    memory back at once (flat peak RSS at 5 M rows: docs/copy.md), and no pyarrow.fs."""
    pytest.importorskip("arrow_odbc")
    # a fresh process: Arrow picks its C++ default pool once, at pyarrow's first import
    script = """
import os, sys
from shir.adapters.copy_arrow import ArrowOdbcSource, ArrowParquetEncoder, arrow_available
assert arrow_available()
ArrowOdbcSource("Driver={PostgreSQL Unicode};Server=127.0.0.1")  # parsed, not connected
import pyarrow as pa
schema = pa.schema([("i", pa.int64()), ("s", pa.string())])
encoder = ArrowParquetEncoder(schema)
batch = pa.record_batch([pa.array(range(3)), pa.array(["a", None, "c"])], schema=schema)
data = encoder.encode(batch) + encoder.finish()
# the Parquet writer allocates from Arrow's C++ default pool: mimalloc's counts it
print(pa.default_memory_pool().backend_name, pa.mimalloc_memory_pool().max_memory() > 0,
      os.environ["MIMALLOC_PURGE_DELAY"], os.environ["MIMALLOC_ARENA_EAGER_COMMIT"],
      "pyarrow.fs" in sys.modules, data[:4] == b"PAR1")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["system", "True", "0", "0", "False", "True"]


def test_the_parquet_writer_writes_what_pyarrow_parquet_writes() -> None:
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    from shir.adapters.copy_arrow import ArrowParquetEncoder

    n = 30_000
    table = pa.table({
        "id": pa.array(range(n), pa.int32()),
        "s": pa.array([f"{i:x}" * 3 if i % 7 else None for i in range(n)]),
        "n": pa.array([f"{i}.{i % 10000:04d}" for i in range(n)]).cast(pa.decimal128(18, 4)),
        "ts": pa.array(range(n), pa.timestamp("us")),
        "b": pa.array([bytes([i % 256]) * (i % 5) for i in range(n)], pa.binary()),
    })
    encoder = ArrowParquetEncoder(table.schema)
    ours = b"".join(encoder.encode(b) for b in table.to_batches(max_chunksize=10_000))
    ours += encoder.finish()
    theirs = io.BytesIO()
    writer = pq.ParquetWriter(theirs, table.schema, compression="snappy", use_dictionary=False)
    for start in range(0, n, 20_000):  # the encoder's row groups of 20,000 rows
        writer.write_table(table.slice(start, 20_000), row_group_size=20_000)
    writer.close()
    assert ours == theirs.getvalue()
    assert pq.read_table(io.BytesIO(ours)).equals(table)
