"""Helpers for tests that restore snapshots written by older formats."""

from __future__ import annotations

import msgpack

from shir.core.snapshot import restore, snapshot_bytes
from shir.core.state import RuntimeState

# Node fields each format added at the end of a node record, newest last.
# intranet_address + cert_sha256, last_update, live_since, envelope_key
NODE_FIELDS_SINCE = {3: 2, 4: 1, 5: 1, 6: 1}


def node_fields_after(fmt: int) -> int:
    """How many trailing node-record fields formats newer than ``fmt`` added."""
    return sum(k for f, k in NODE_FIELDS_SINCE.items() if f > fmt)


def strip_nodes(body: list, fmt: int) -> None:
    """Cut ``body``'s node records (a current snapshot, unpacked) down to format ``fmt``'s."""
    cut = node_fields_after(fmt)
    body[3] = [msgpack.packb(msgpack.unpackb(n)[:-cut], use_bin_type=True) for n in body[3]]


def as_older_format_sees(state: RuntimeState, fmt: int) -> RuntimeState:
    """``state`` as a snapshot of format ``fmt`` restores it: what newer formats added to node
    records is unknown (live_since None from format 4 down, envelope_key None from 5 down), and
    below format 7 every result counts as published."""
    body = msgpack.unpackb(snapshot_bytes(state), raw=False)
    defaults = {5: None, 6: None}  # live_since, envelope_key: the last node fields, in order
    unknown = [f for f in defaults if f > fmt]
    records = []
    for n in body[3]:
        fields = msgpack.unpackb(n)
        for f in unknown:
            fields[len(fields) - len(defaults) + list(defaults).index(f)] = defaults[f]
        records.append(msgpack.packb(fields, use_bin_type=True))
    body[3] = records
    if fmt < 7:
        body[-1] = []
    return restore(msgpack.packb(body, use_bin_type=True))


def as_format_4_sees(state: RuntimeState) -> RuntimeState:
    """``state`` as a snapshot of format 4 or older restores it."""
    return as_older_format_sees(state, 4)
