"""End to end: four real ``shir node run`` processes on loopback, jobs, kill -9 and SIGSTOP.

One failover trial on the SQLite store, one on the Blob store (Azurite); scripts/node_trials
runs N of them. What a trial checks is in tests/node_helpers.py: every job's effect on the sink
exactly once, each job completed once in the log and never under an ended lease, a new
dispatcher within three offline-detection periods, the continued node's late work refused.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from node_helpers import failover_trial


def test_failover_on_sqlite(tmp_path: Path) -> None:
    result = failover_trial(tmp_path, f"sqlite:///{tmp_path}/runtime.db")
    assert result["failover_s"] <= 3 * result["offline_after_s"]
    assert result["late_work_refused"] >= 1


@pytest.mark.services
def test_failover_on_blob(tmp_path: Path, azurite_connection_string: str) -> None:
    # nodes on several machines share a Blob store; the control channel here is the embedded
    # one on a local file (Service Bus cannot run on this machine)
    store = f"{azurite_connection_string};Container=node-e2e-{uuid.uuid4().hex[:12]}"
    result = failover_trial(tmp_path, store, channel=f"sqlite:///{tmp_path}/channel.db")
    assert result["failover_s"] <= 3 * result["offline_after_s"]
    assert result["late_work_refused"] >= 1
