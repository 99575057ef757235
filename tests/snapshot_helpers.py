"""Helpers for tests that restore snapshots written by older formats."""

from __future__ import annotations

import msgpack

from shir.core.snapshot import restore, snapshot_bytes
from shir.core.state import RuntimeState

# Node fields each format added at the end of a node record, newest last.
NODE_FIELDS_SINCE = {3: 2, 4: 1, 5: 1}  # intranet_address + cert_sha256, last_update, live_since


def node_fields_after(fmt: int) -> int:
    """How many trailing node-record fields formats newer than ``fmt`` added."""
    return sum(k for f, k in NODE_FIELDS_SINCE.items() if f > fmt)


def strip_nodes(body: list, fmt: int) -> None:
    """Cut ``body``'s node records (a current snapshot, unpacked) down to format ``fmt``'s."""
    cut = node_fields_after(fmt)
    body[3] = [msgpack.packb(msgpack.unpackb(n)[:-cut], use_bin_type=True) for n in body[3]]


def as_format_4_sees(state: RuntimeState) -> RuntimeState:
    """``state`` as a snapshot of format 4 or older restores it: live_since unknown (None)."""
    body = msgpack.unpackb(snapshot_bytes(state), raw=False)
    body[3] = [msgpack.packb([*msgpack.unpackb(n)[:-1], None], use_bin_type=True) for n in body[3]]
    return restore(msgpack.packb(body, use_bin_type=True))
