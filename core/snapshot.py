"""Snapshots: a runtime's state as bytes, so a host can start from it instead of the whole log.

``snapshot_bytes(state)`` and ``restore(data)`` round-trip every part of the state; with the
event store's ``Snapshot(version, data)`` a host loads the snapshot and folds only the events
after ``version``. The simulator checks "snapshot + tail == full replay" on every run.

The format is one msgpack array whose first item is ``FORMAT`` (2 added the credential state,
3 the nodes' intranet address and certificate fingerprint, 4 the sharing state, proxy
settings, the latest removals and each node's last update, 5 each node's ``live_since``, 6 each
node's ``envelope_key``, 7 the results not yet confirmed published; older snapshots still
restore, with none); a newer format is refused with
:class:`~shir.core.codec.UnsupportedEventVersion`, damaged bytes with ``CorruptRecord``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

import msgpack

from shir.core.codec import CorruptRecord, UnsupportedEventVersion, decode_value, encode_value
from shir.core.codec import value as register_value
from shir.core.credentials import CredentialSync, LatestCredential
from shir.core.jobs import Job, JobBook, Lease, LeaseToken
from shir.core.model import CredentialVersion, KeyVerifier
from shir.core.proxy import ProxySettings
from shir.core.sharing import Grant, Link, SharingState
from shir.core.state import Node, RuntimeInfo, RuntimeState, initial

__all__ = ["FORMAT", "restore", "snapshot_bytes"]

FORMAT = 7
# 3 added the nodes' intranet_address and cert_sha256, 4 see above, 5 the nodes' live_since,
# 6 the nodes' envelope_key, 7 the job book's unpublished results
_READABLE = (1, 2, 3, 4, 5, 6, 7)

for _cls in (RuntimeInfo, Node, Job, Lease):
    register_value(_cls)


def snapshot_bytes(state: RuntimeState) -> bytes:
    """The whole state as bytes (no secrets: keys are verifiers, as in events)."""
    m = state.model()
    b = m.jobs
    body = [
        FORMAT,
        encode_value(m.runtime) if m.runtime else None,
        [encode_value(v) for _k, v in sorted(m.keys.items(), key=lambda kv: kv[0].value)],
        [encode_value(n) for n in m.nodes.values()],
        m.next_seq, m.term, m.dispatcher, m.now,
        [encode_value(j) for j in b.jobs.values()],
        [[[encode_value(c) for c in req], list(q)] for req, q in b.queues.items()],
        [encode_value(lease) for lease in b.leases.values()],
        [[key, encode_value(token), at] for key, (token, at) in b.recent.items()],
        sorted(b.limits.items()),
        [b.next_seq, b.submitted, b.completed, b.dead_lettered, b.released, b.window_s,
         b.pruned_at],
        [encode_value(latest) for _cid, latest in sorted(m.credentials.items())],
        [encode_value(sync) for _key, sync in sorted(m.syncs.items())],
        None if m.sharing is None else [
            [encode_value(g) for g in m.sharing.grants.values()],
            [encode_value(link) for link in m.sharing.links.values()],
        ],
        [[node, seq, encode_value(p)] for (node, seq), p in sorted(m.proxies.items())],
        [[node, reason, at] for node, (reason, at) in m.removed.items()],
        [[job_id, *result] for job_id, result in b.unpublished.items()],
    ]
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def restore(data: bytes) -> RuntimeState:
    """The state ``snapshot_bytes`` wrote; fold the events after the snapshot onto it."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise CorruptRecord(f"not a shir snapshot ({type(exc).__name__})") from None
    if not isinstance(body, list) or not body or not isinstance(body[0], int):
        raise CorruptRecord("not a shir snapshot (no format number)")
    if body[0] not in _READABLE:
        raise UnsupportedEventVersion(
            f"snapshot format {body[0]} is not {FORMAT}; rebuild it from the event log"
        )
    try:
        return _restore(body)
    except CorruptRecord:
        raise
    except Exception as exc:
        raise CorruptRecord(f"damaged snapshot ({type(exc).__name__})") from None


def _restore(body: list[Any]) -> RuntimeState:
    credentials: list[Any] = []
    syncs: list[Any] = []
    sharing: list[Any] | None = None
    proxies: list[Any] = []
    removed: list[Any] = []
    unpublished: list[Any] = []  # before format 7: every result counts as published
    if body[0] == 1:
        (_fmt, runtime, keys, nodes, next_seq, term, dispatcher, now, jobs, queues, leases,
         recent, limits, counters) = body
    elif body[0] in (2, 3):
        (_fmt, runtime, keys, nodes, next_seq, term, dispatcher, now, jobs, queues, leases,
         recent, limits, counters, credentials, syncs) = body
    elif body[0] < 7:
        (_fmt, runtime, keys, nodes, next_seq, term, dispatcher, now, jobs, queues, leases,
         recent, limits, counters, credentials, syncs, sharing, proxies, removed) = body
    else:
        (_fmt, runtime, keys, nodes, next_seq, term, dispatcher, now, jobs, queues, leases,
         recent, limits, counters, credentials, syncs, sharing, proxies, removed,
         unpublished) = body
    m = initial().model()
    m.runtime = decode_value(RuntimeInfo, runtime) if runtime is not None else None
    for raw in keys:
        verifier = decode_value(KeyVerifier, raw)
        m.keys[verifier.name] = verifier
    for raw in nodes:
        if body[0] < 3:  # a node record without intranet_address and cert_sha256
            raw = msgpack.packb([*msgpack.unpackb(raw), None, None], use_bin_type=True)
        if body[0] < 4:  # nor last_update
            raw = msgpack.packb([*msgpack.unpackb(raw), ""], use_bin_type=True)
        if body[0] < 5:  # nor live_since (unknown: then every report counts, as before)
            raw = msgpack.packb([*msgpack.unpackb(raw), None], use_bin_type=True)
        if body[0] < 6:  # nor envelope_key (none: no node can seal a credential for it)
            raw = msgpack.packb([*msgpack.unpackb(raw), None], use_bin_type=True)
        node = decode_value(Node, raw)
        m.nodes[node.name] = node
    m.next_seq, m.term, m.dispatcher, m.now = next_seq, term, dispatcher, float(now)
    b: JobBook = m.jobs
    for raw in jobs:
        job = decode_value(Job, raw)
        b.jobs[job.job_id] = job
        b.active_keys[job.idempotency_key] = job.job_id
    for req, ids in queues:
        b.queues[tuple(decode_value(CredentialVersion, c) for c in req)] = deque(ids)
    for raw in leases:
        lease = decode_value(Lease, raw)
        b._lease(lease.token, lease.expires_at)
    b.recent = OrderedDict()
    for key, token, at in recent:
        tok = decode_value(LeaseToken, token)
        b.recent[key] = (tok, at)
        b.recent_jobs[tok.job_id] = tok
    b.unpublished = {job_id: (key, outcome, detail, at)
                     for job_id, key, outcome, detail, at in unpublished}
    b.limits = dict(limits)
    (b.next_seq, b.submitted, b.completed, b.dead_lettered, b.released, b.window_s,
     b.pruned_at) = counters
    for raw in credentials:
        latest = decode_value(LatestCredential, raw)
        m.credentials[latest.credential_id] = latest
    for raw in syncs:
        sync = decode_value(CredentialSync, raw)
        m.syncs[sync.credential_id, sync.to_node] = sync
    if sharing is not None:
        grants = [decode_value(Grant, raw) for raw in sharing[0]]
        links = [decode_value(Link, raw) for raw in sharing[1]]
        m.sharing = SharingState(
            {g.factory.factory_id: g for g in grants}, {k.linked_runtime_id: k for k in links}
        )
    for node, seq, raw in proxies:
        m.proxies[node, seq] = decode_value(ProxySettings, raw)
    m.removed = {node: (reason, float(at)) for node, reason, at in removed}
    return RuntimeState(m)
