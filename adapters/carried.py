"""A credential a job carries: sealed by the factory side for each node of the runtime.

Theory of operation
-------------------
``shir job submit --credential ID`` reads the runtime's registered nodes from its log, each with
its envelope public key (``Node.envelope_key``), and seals the secret once per node with the
offline sealed box (:func:`shir.adapters.offline.encrypt_for_runtime`: an anonymous sender, a
fresh ephemeral key, bound to the runtime id and the credential id). The bundle::

    msgpack {"v": 1, "credential": ID, "sealed": {node name: sealed box, ...}}

travels as the request's ``credential`` (on the embedded channel and on Service Bus alike). The
dispatcher queues the job with ``carried=(ID,)`` (so the core does not ask the node to hold it)
and the bundle inside the job's spec (:func:`shir.adapters.node_jobs.pack_spec`), so the log
holds only ciphertext, each piece for one named node. The node that runs the job opens the box
sealed for its name with its private key and uses the secret for that job only: it is never
written to its credential store.

Why one box per node: a job may run on any node, no node shares its private key, and the
submitter is not a node (it has no key to sign with, so the sealed box is anonymous: the path
the request travels, the control channel, is what authorises it). A node that registers after
the submission finds no box for its name, and the job fails there with that reason.

Every size is bounded before work is spent on it: the whole bundle by :data:`MAX_CARRIED_BYTES`,
each field by msgpack's limits, the map by the runtime's node limit.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgpack

from shir.adapters.envelope import NodeKeys
from shir.adapters.offline import decrypt_offline, encrypt_for_runtime
from shir.adapters.protect import CredentialError, check_credential_id

__all__ = [
    "MAX_CARRIED_BYTES", "BadCarriedCredential", "carried_ids", "open_carried", "seal_for_nodes",
]

MAX_CARRIED_BYTES = 48 * 1024  # with the params, a job's spec stays within the core's 64 KiB
_MAX_NODES = 16


class BadCarriedCredential(CredentialError):
    """The carried credential is malformed, for another node, or does not open."""


def seal_for_nodes(credential_id: str, plaintext: bytes, runtime_id: str,
                   nodes: Mapping[str, bytes]) -> bytes:
    """The bundle carrying ``plaintext`` as ``credential_id`` for each of ``nodes`` (name ->
    envelope public key) of runtime ``runtime_id``."""
    check_credential_id(credential_id)
    if not nodes:
        raise BadCarriedCredential(
            "no registered node of the runtime published an envelope key: start its nodes "
            "(shir node run) before submitting a job that carries a credential"
        )
    sealed = {name: encrypt_for_runtime(key, runtime_id, credential_id, plaintext)
              for name, key in sorted(nodes.items())}
    bundle: bytes = msgpack.packb({"v": 1, "credential": credential_id, "sealed": sealed},
                                  use_bin_type=True)
    if len(bundle) > MAX_CARRIED_BYTES:
        raise BadCarriedCredential(
            f"the credential sealed for {len(nodes)} nodes takes {len(bundle)} bytes, more than "
            f"{MAX_CARRIED_BYTES}: a carried credential is a password or a key, not data"
        )
    return bundle


def _parse(blob: bytes) -> tuple[str, dict[str, bytes]]:
    if not isinstance(blob, bytes) or not 0 < len(blob) <= MAX_CARRIED_BYTES:
        raise BadCarriedCredential(f"a carried credential is 1-{MAX_CARRIED_BYTES} bytes")
    try:
        doc = msgpack.unpackb(blob, raw=False, max_bin_len=MAX_CARRIED_BYTES, max_str_len=256,
                              max_map_len=_MAX_NODES, max_array_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise BadCarriedCredential("the carried credential is not a shir bundle") from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise BadCarriedCredential("the carried credential is not a version-1 shir bundle; "
                                   "submit the job again with this shir")
    cid, sealed = doc.get("credential"), doc.get("sealed")
    if not isinstance(cid, str) or not isinstance(sealed, dict) or not all(
            isinstance(k, str) and isinstance(v, bytes) for k, v in sealed.items()):
        raise BadCarriedCredential("the carried credential's bundle is malformed")
    try:
        return check_credential_id(cid), sealed
    except CredentialError as exc:
        raise BadCarriedCredential(f"the carried credential's bundle is malformed: {exc}") from None


def carried_ids(blob: bytes) -> tuple[str, ...]:
    """The ids of the credentials ``blob`` carries (checked, not opened); () for none."""
    return () if not blob else (_parse(blob)[0],)


def open_carried(blob: bytes, node_name: str, keys: NodeKeys, runtime_id: str) -> dict[str, bytes]:
    """Open the box sealed for node ``node_name``: ``{credential id: plaintext}``."""
    if not blob:
        return {}
    cid, sealed = _parse(blob)
    box = sealed.get(node_name)
    if box is None:
        raise BadCarriedCredential(
            f"the job carries credential {cid!r} for nodes {', '.join(sorted(sealed))[:200]}, "
            f"not for node {node_name!r} (it registered after the job was submitted): submit "
            "the job again, or save the credential on the runtime's nodes"
        )
    opened = decrypt_offline(box, keys, runtime_id)  # WrongRecipient, TamperedCiphertext
    if opened.credential_id != cid:
        raise BadCarriedCredential(
            f"the box for node {node_name!r} holds credential {opened.credential_id!r}, not "
            f"{cid!r}: the bundle was altered"
        )
    return {cid: opened.plaintext}
