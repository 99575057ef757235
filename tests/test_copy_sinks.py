"""The folder sink: attempts of one job never mix bytes, and a killed attempt's file goes. The
Blob sink (Azurite): a retry uploads again exactly the parts whose bytes changed."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from shir.adapters.copy_sinks import BlobSink, FolderSink, SinkError, open_blob_service


def test_two_attempts_of_one_job_at_once_never_mix_bytes(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    # the second attempt takes the first one's file for a killed attempt's, and removes it
    first, second = FolderSink(target).open("job-1"), FolderSink(target).open("job-1")
    for part in range(3):  # interleaved, as two deliveries would write
        first.put(part, b"a" * 1000, hashlib.md5(b"a" * 1000 * (part + 1)).digest())
        second.put(part, b"b" * 1000, hashlib.md5(b"b" * 1000 * (part + 1)).digest())
    second.commit(hashlib.md5(b"b" * 3000).digest(), 3)
    with pytest.raises(SinkError, match="commit failed"):
        first.commit(hashlib.md5(b"a" * 3000).digest(), 3)
    assert target.read_bytes() == b"b" * 3000  # whole, one attempt's bytes
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_killed_attempts_file_is_removed_by_the_next_attempt(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    killed = FolderSink(target).open("job-1")
    # never committed nor aborted: the process died
    killed.put(0, b"partial", hashlib.md5(b"partial").digest())
    other_job = FolderSink(target).open("job-2")
    retry = FolderSink(target).open("job-1")
    partials = sorted(p.name for p in tmp_path.iterdir())
    assert len(partials) == 2 and not target.exists()  # the retry's and job-2's
    retry.put(0, b"whole", hashlib.md5(b"whole").digest())
    retry.commit(hashlib.md5(b"whole").digest(), 1)
    other_job.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    assert target.read_bytes() == b"whole"


def _attempt(sink: BlobSink, job: str, parts: list[bytes], *, commit: bool) -> tuple[int, bytes]:
    """Put ``parts`` as one attempt of ``job`` (the pipeline's running MD5 with each); commit
    or leave them staged, as a killed attempt does. Returns the parts it did not upload."""
    writer = sink.open(job)
    md5 = hashlib.md5()
    for i, part in enumerate(parts):
        md5.update(part)
        writer.put(i, part, md5.copy().digest())
    if commit:
        writer.commit(md5.digest(), len(parts))
    else:
        writer.abort()
    return writer.skipped_parts, md5.digest()  # type: ignore[attr-defined]


@pytest.mark.services
def test_a_blob_retry_reuses_exactly_the_staged_parts_whose_bytes_are_the_same(
    azurite_connection_string: str,
) -> None:
    service = open_blob_service(azurite_connection_string)
    sink = BlobSink(service, "copy-sinks", f"retry-{uuid.uuid4().hex[:8]}.bin")
    job = f"job-{uuid.uuid4().hex[:8]}"
    a, b, c = b"a" * 3000, b"b" * 3000, b"c" * 3000
    assert _attempt(sink, job, [a, b, c], commit=False)[0] == 0
    assert _attempt(sink, job, [a, b, c], commit=False)[0] == 3  # same bytes: nothing again
    # part 1 changed (same length): parts 1 and 2 go again (the digest runs through the part)
    assert _attempt(sink, job, [a, b"x" * 3000, c], commit=False)[0] == 1
    # the same bytes cut elsewhere: part 1 ends where it did (same digest) but is shorter, so
    # it goes again; part 2 is the same bytes at the same place: reused
    assert _attempt(sink, job, [a + b[:1000], b[1000:], c], commit=False)[0] == 1
    reused, md5 = _attempt(sink, job, [a, b[:1500] + b"y" * 1500, c], commit=True)
    assert reused == 1
    assert sink.client().download_blob().readall() == a + b[:1500] + b"y" * 1500 + c
    assert sink.client().get_blob_properties().content_settings.content_md5 == bytearray(md5)
