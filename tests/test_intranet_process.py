"""Two machines, as far as one host allows: a node channel in its own process with its own home.

The child process generates its identity in its home, prints its address and fingerprint, takes
the peer directory on stdin, and prints every envelope it receives. Killed with SIGKILL, it is
reported unreachable within the check's timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from shir.adapters.intranet import EnvelopeMessage, Intranet, Peer
from shir.adapters.intranet_tls import load_or_create_identity
from shir.adapters.protect import PortableProtector

CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from shir.adapters.intranet import Intranet, Peer
    from shir.adapters.intranet_tls import load_or_create_identity
    home = Path(sys.argv[1])
    identity = load_or_create_identity(home, "child")
    def took(sender, m):
        print(json.dumps({"from": sender, "id": m.credential_id, "v": m.version,
                          "bytes": m.envelope.hex()}), flush=True)
    with Intranet("child", identity, port=0, check_interval_s=None, on_envelope=took) as ch:
        print(json.dumps({"address": ch.address, "fingerprint": identity.fingerprint}),
              flush=True)
        directory = json.loads(sys.stdin.readline())
        ch.set_peers({n: Peer(*p) for n, p in directory.items()})
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()  # until the parent closes stdin
""")


def test_a_node_in_another_process_takes_envelopes_and_is_unreachable_once_killed(
        tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "child-home")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert child.stdin is not None and child.stdout is not None
        hello = json.loads(child.stdout.readline())
        mine = load_or_create_identity(tmp_path / "parent-home", "parent",
                                       protector=PortableProtector(tmp_path / "p.key"))
        with Intranet("parent", mine, port=0, check_interval_s=None, timeout_s=2.0) as channel:
            directory = {"parent": (channel.address, mine.fingerprint),
                         "child": (hello["address"], hello["fingerprint"])}
            child.stdin.write(json.dumps(directory) + "\n")
            child.stdin.flush()
            assert json.loads(child.stdout.readline()) == {"ready": True}
            channel.set_peers({n: Peer(*p) for n, p in directory.items()})
            channel.send_envelope("child", EnvelopeMessage("sql-1", 3, b"\x01sealed"))
            assert json.loads(child.stdout.readline()) == {
                "from": "parent", "id": "sql-1", "v": 3, "bytes": b"\x01sealed".hex()}
            assert channel.check_peer("child")
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            started = time.monotonic()
            assert not channel.check_peer("child", timeout_s=1.0)
            assert time.monotonic() - started < 1.75
        key = (tmp_path / "child-home" / "intranet" / "node.key")
        assert key.stat().st_mode & 0o777 == 0o600
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
