"""Credentials between real ``shir node run`` processes on loopback (issue 13).

- a credential saved on node A reaches node B over the intranet: B is Limited with the reason
  until it holds it, then Online, and B's store holds the same plaintext; a copy job that
  needs it then runs on B;
- a job carrying its credential runs on a node that does not hold it, and the node does not
  keep it;
- the secrets (the database password, random per test run) never appear in the nodes' logs,
  the status output, the runtime's store (log and embedded channel), the nodes' credential
  files, or errors;
- a node that cannot take the credential stays Limited and gets no job that needs it.

Tampered and wrong-recipient envelopes: tests/test_node_credentials_parts.py.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from node_helpers import cluster, shir, wait_for

from shir.adapters.credentials_cli import DataDir
from shir.adapters.credstore import LocalCredentialStore
from shir.adapters.node_host import job_id_for
from shir.adapters.odbc import format_connection_string, parse_connection_string
from shir.core import events as ev
from shir.core import jobs as jb
from shir.core.credentials import CredentialSaved, CredentialSynced

pytestmark = pytest.mark.services
FAST = ("--heartbeat-interval", "0.5", "--missed-heartbeats", "3", "--lock-duration", "10")


def _store(home: Path) -> LocalCredentialStore:
    data = DataDir(home)
    return data.store(data.protector())


def _table(pg_odbc: str, name: str, rows: int) -> tuple[str, str]:
    """A table of ``rows`` rows; (the connection string without password, the password)."""
    import pyodbc

    db = pyodbc.connect(pg_odbc, autocommit=True)
    try:
        db.execute(f"DROP TABLE IF EXISTS {name}")
        db.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, s text)")
        db.execute(f"INSERT INTO {name} SELECT g, md5(g::text) FROM generate_series(1, {rows}) g")
    finally:
        db.close()
    pairs = parse_connection_string(pg_odbc)
    password = pairs.pop("pwd")
    return format_connection_string(pairs), password


def _copy_spec(source: str, table: str, out: Path) -> str:
    return json.dumps({"source": source, "credential": "pg", "format": "csv",
                       "query": f"SELECT id, s FROM {table} ORDER BY id",
                       "sink": {"folder": str(out)}})


def _leaks(root: Path, texts: list[str], secret: str) -> list[str]:
    """Where ``secret`` shows up: logs, the store file, every file in the homes, ``texts``."""
    found = [f"output {i}" for i, t in enumerate(texts) if secret in t]
    needle = secret.encode()
    for path in root.rglob("*"):
        if path.is_file() and path.suffix != ".csv" and needle in path.read_bytes():
            found.append(str(path.relative_to(root)))
    return found


def test_a_credential_saved_on_one_node_reaches_another_which_then_runs_a_job_needing_it(
        tmp_path: Path, pg_odbc: str) -> None:
    source, password = _table(pg_odbc, "cred_sync", 300)
    out = tmp_path / "out" / "rows.csv"
    out.parent.mkdir()
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        c.start("a")
        c.start("b")
        wait_for("a and b Online", lambda: [n.status.value for n in c.state().nodes]
                 == ["Online", "Online"], 30)
        # a user saves the credential on machine a (its home's store), while a runs
        _store(tmp_path / "home-a").put("pg", 1, password.encode())
        t_saved = time.monotonic()
        wait_for("b holds pg v1", lambda: _store(tmp_path / "home-b").version_of("pg") == 1, 20)
        wait_for("the sync ended", lambda: any(
            isinstance(e, CredentialSynced) and e.node == "b" for e in c.events()), 10)
        synced_s = time.monotonic() - t_saved
        wait_for("b Online again", lambda: (n := c.state().node("b")) is not None
                 and n.status.value == "Online", 10)
        # a leaves: the copy job that needs pg can only run on b
        c.signal("a", signal.SIGTERM)
        wait_for("a gone", lambda: c.state().node("a") is None, 20)
        shir("job", "submit", "--store", c.store_url, "--kind", "copy", "--spec",
             _copy_spec(source, "cred_sync", out), "--id", "copy-b")
        wait_for("the copy job completed", lambda: c.state().jobs.completed == 1, 60, poll_s=0.3)
        status = shir("status", "--store", c.store_url).stdout
        status_json = shir("status", "--store", c.store_url, "--json").stdout
        shown = shir("job", "show", "--store", c.store_url, "copy-b").stdout
        events = list(c.events())
    # the log: saved on a, b Limited with the reason, then synced and Online
    saved = [e for e in events if isinstance(e, CredentialSaved)]
    assert [(e.credential_id, e.version, e.node) for e in saved] == [("pg", 1, "a")]
    b_status = [(e.status.value, e.reasons) for e in events
                if isinstance(e, ev.NodeStatusChanged) and e.node == "b" and e.at >= saved[0].at]
    assert b_status[0] == ("Limited", ("credential pg missing, latest v1",)), b_status
    assert b_status[-1] == ("Online", ()), b_status
    assert synced_s < 10, f"the sync took {synced_s:.1f} s"
    # b's store holds the same plaintext, as its own encrypted copy
    held = _store(tmp_path / "home-b").get("pg")
    assert (held.version, held.plaintext) == (1, password.encode())
    # the job named pg: it needed it, and ran on b
    (submitted,) = [e for e in events if isinstance(e, jb.JobSubmitted)]
    assert [(cv.credential_id, cv.version) for cv in submitted.needs] == [("pg", 1)]
    assert submitted.carried == ()
    (done,) = [e for e in events if isinstance(e, jb.JobCompleted)]
    assert done.token.node == "b" and done.token.job_id == job_id_for("copy-b")
    assert len(out.read_text().splitlines()) == 301
    records = c.log_records("a") + c.log_records("b")
    assert any(r.get("event") == "credential_sent" and r.get("to") == "b" for r in records)
    assert any(r.get("event") == "credential_received" for r in records)
    texts = [status, status_json, shown, json.dumps(repr(events))]
    assert _leaks(tmp_path, texts, password) == []


@pytest.mark.parametrize("over", ["embedded", "servicebus"])
def test_a_job_carrying_its_credential_runs_on_a_node_that_does_not_hold_it(
        tmp_path: Path, pg_odbc: str, over: str, request: pytest.FixtureRequest) -> None:
    """On the embedded channel, and on Service Bus (the real SDK against tests/sbbroker.py):
    the request's message carries the sealed bundle."""
    channel = None
    if over == "servicebus":
        hooks = request.getfixturevalue("sb_hooks")
        queue = hooks.new_queue(lock_duration_s=10.0, max_delivery_count=10)
        replies = hooks.new_queue(lock_duration_s=60.0, max_delivery_count=10)
        channel = f"{hooks.connection_string};EntityPath={queue};ReplyQueue={replies}"
    source, password = _table(pg_odbc, f"cred_carried_{over}", 200)
    out = tmp_path / "out" / "rows.csv"
    out.parent.mkdir()
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db", channel) as c:
        c.create(*FAST)
        c.start("a")
        wait_for("a Online", lambda: (n := c.state().node("a")) is not None
                 and n.status.value == "Online", 30)
        submit = ("job", "submit", "--store", c.store_url, "--kind", "copy", "--spec",
                  _copy_spec(source, f"cred_carried_{over}", out), "--credential", "pg",
                  *(("--channel", channel) if channel else ()))
        refused = shir(*submit, "--id", "no-value", check=False,
                       env={"SHIR_CREDENTIAL_VALUE": ""})
        assert refused.returncode == 2 and "is empty" in refused.stderr
        shir(*submit, "--id", "carried", env={"SHIR_CREDENTIAL_VALUE": password})
        wait_for("the copy job completed", lambda: c.state().jobs.completed == 1, 60, poll_s=0.3)
        status = shir("status", "--store", c.store_url, "--json").stdout
        shown = shir("job", "show", "--store", c.store_url, "carried").stdout
        events = list(c.events())
    (submitted,) = [e for e in events if isinstance(e, jb.JobSubmitted)]
    assert submitted.carried == ("pg",) and submitted.needs == ()
    assert len(out.read_text().splitlines()) == 201
    assert _store(tmp_path / "home-a").version_of("pg") == 0
    assert _leaks(tmp_path, [status, shown, refused.stderr, json.dumps(repr(events))],
                  password) == []


def test_a_node_that_cannot_take_the_credential_stays_limited_and_gets_no_job_needing_it(
        tmp_path: Path, pg_odbc: str) -> None:
    """b's credential store is unusable (a file where its folder should be): every envelope a
    sends is refused with the reason, b stays Limited, and the copy jobs that need the
    credential all run on a, while a job that needs none may run on b."""
    source, password = _table(pg_odbc, "cred_limited", 50)
    (tmp_path / "home-b").mkdir()
    (tmp_path / "home-b" / "credentials").write_bytes(b"not a folder")
    out = tmp_path / "out"
    out.mkdir()
    _store(tmp_path / "home-a").put("pg", 1, password.encode())
    with cluster(tmp_path, f"sqlite:///{tmp_path}/rt.db") as c:
        c.create(*FAST)
        c.start("a")
        wait_for("a Online", lambda: (n := c.state().node("a")) is not None
                 and n.status.value == "Online", 30)
        c.start("b")
        wait_for("b Limited for pg", lambda: (n := c.state().node("b")) is not None
                 and n.reasons == ("credential pg missing, latest v1",), 30)
        for i in range(4):
            shir("job", "submit", "--store", c.store_url, "--kind", "copy", "--spec",
                 _copy_spec(source, "cred_limited", out / f"{i}.csv"), "--id", f"copy-{i}")
        shir("job", "submit", "--store", c.store_url, "--kind", "touch", "--param",
             f"sink={out}", "--param", "seconds=0", "--count", "8", "--id", "touch")
        wait_for("12 jobs completed", lambda: c.state().jobs.completed == 12, 60, poll_s=0.3)
        b = c.state().node("b")
        status = shir("status", "--store", c.store_url).stdout
        events = list(c.events())
    assert b is not None and b.status.value == "Limited", b
    assert "credential pg missing, latest v1" in status
    ran_on = {e.token.job_id: e.token.node for e in events if isinstance(e, jb.JobCompleted)}
    assert {ran_on[job_id_for(f"copy-{i}")] for i in range(4)} == {"a"}
    # b does take work: only the work that needs what it lacks passes it by
    assert "b" in {ran_on[job_id_for(f"touch-{i}")] for i in range(8)}, ran_on
    refusals = [r.get("reason", "") for r in c.log_records("a")
                if r.get("event") == "credential_not_shared"]
    assert refusals and all("refused" in r and "failed to store it" in r for r in refusals)
    assert _leaks(tmp_path, [status, json.dumps(repr(events))], password) == []
