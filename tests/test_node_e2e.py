"""End to end: four real ``shir node run`` processes on loopback, jobs, kill -9 and SIGSTOP.

One failover trial on the SQLite store, one on the Blob store (Azurite), one with the control
channel on Service Bus (the SDK against the test broker, not Azure); scripts/node_trials
runs N of them. What a trial checks is in tests/node_helpers.py: every job's effect on the sink
exactly once, each job completed once in the log and never under an ended lease, a new
dispatcher within three offline-detection periods, the continued node's late work refused.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from node_helpers import failover_trial, shir
from sbhooks import BrokerHooks


def test_failover_on_sqlite(tmp_path: Path) -> None:
    result = failover_trial(tmp_path, f"sqlite:///{tmp_path}/runtime.db")
    assert result["failover_s"] <= 3 * result["offline_after_s"]
    assert result["late_work_refused"] >= 1


@pytest.mark.services
def test_failover_on_blob(tmp_path: Path, azurite_connection_string: str) -> None:
    # nodes on several machines share a Blob store; the control channel here is the embedded
    # one on a local file (the Service Bus channel has its own trial below)
    store = f"{azurite_connection_string};Container=node-e2e-{uuid.uuid4().hex[:12]}"
    result = failover_trial(tmp_path, store, channel=f"sqlite:///{tmp_path}/channel.db")
    assert result["failover_s"] <= 3 * result["offline_after_s"]
    assert result["late_work_refused"] >= 1


@pytest.mark.services
def test_failover_over_service_bus(tmp_path: Path, sb_hooks: BrokerHooks) -> None:
    """The same trial with job requests and results on Service Bus: the real SDK against the
    test broker (tests/sbbroker.py, not Azure). 200 requests, the dispatcher SIGKILLed: every
    request becomes one job done once, none is left on the queue or dead-lettered, and every
    result is on the reply queue once."""
    from shir.adapters.channels import open_channel

    # The queue's lock as the runtime's lease (3 s): a request the killed dispatcher held comes
    # back after one lock. Duplicate detection on, as the namespace would be set up.
    queue = sb_hooks.new_queue(lock_duration_s=3.0, max_delivery_count=10)
    replies = sb_hooks.new_queue(lock_duration_s=60.0, max_delivery_count=10)
    channel = f"{sb_hooks.connection_string};EntityPath={queue};ReplyQueue={replies}"
    result = failover_trial(tmp_path, f"sqlite:///{tmp_path}/runtime.db", channel=channel)
    assert result["failover_s"] <= 3 * result["offline_after_s"]
    with open_channel(channel) as ch:
        published = ch.results()
        assert ch.queue_depth() == 0 and ch.dead_letters() == []
    assert sorted(r.message_id for r in published) == sorted(f"e2e-{i}" for i in range(200))
    assert {r.outcome for r in published} == {"completed"}
    # what a user types: `job show` reads the same reply queue through the SDK
    shown = json.loads(shir("job", "show", "--store", f"sqlite:///{tmp_path}/runtime.db",
                            "--channel", channel, "e2e-7", "--json").stdout)
    assert shown["state"] == "completed"
    assert [r["outcome"] for r in shown["published"]] == ["completed"]
