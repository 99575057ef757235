"""The folder sink: attempts of one job never mix bytes, and a killed attempt's file goes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shir.adapters.copy_sinks import FolderSink, SinkError


def test_two_attempts_of_one_job_at_once_never_mix_bytes(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    # the second attempt takes the first one's file for a killed attempt's, and removes it
    first, second = FolderSink(target).open("job-1"), FolderSink(target).open("job-1")
    for part in range(3):  # interleaved, as two deliveries would write
        first.put(part, b"a" * 1000)
        second.put(part, b"b" * 1000)
    second.commit(hashlib.md5(b"b" * 3000).digest(), 3)
    with pytest.raises(SinkError, match="commit failed"):
        first.commit(hashlib.md5(b"a" * 3000).digest(), 3)
    assert target.read_bytes() == b"b" * 3000  # whole, one attempt's bytes
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_killed_attempts_file_is_removed_by_the_next_attempt(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    killed = FolderSink(target).open("job-1")
    killed.put(0, b"partial")  # never committed nor aborted: the process died
    other_job = FolderSink(target).open("job-2")
    retry = FolderSink(target).open("job-1")
    partials = sorted(p.name for p in tmp_path.iterdir())
    assert len(partials) == 2 and not target.exists()  # the retry's and job-2's
    retry.put(0, b"whole")
    retry.commit(hashlib.md5(b"whole").digest(), 1)
    other_job.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    assert target.read_bytes() == b"whole"
