"""A node host's credentials: its envelope keys, its local store, and the sync between nodes.

Theory of operation
-------------------
Each machine's home (``--home``) is also its credential data directory
(:class:`~shir.adapters.credentials_cli.DataDir`): ``identity.node`` holds the node's X25519 key
pair (made on first start when ``shir credentials init`` or a restore did not make one), and
``credentials/`` its :class:`~shir.adapters.credstore.LocalCredentialStore`. The node registers
its public key (``RegisterNode.envelope_key``), so every node can seal for every other.

**Saving.** A user saves a credential on a machine by writing it into that home's store
(``shir credentials set``, or a restore). The host reads the store's versions at every
heartbeat: a version newer than the runtime's latest becomes ``SaveCredential`` from this node,
and the heartbeat reports what the store holds (``NodeMetrics.credentials``). So the store is the
truth about what this machine holds, and the log learns it within one heartbeat interval.

**Sync: one path, over the intranet.** On ``SealCredentialFor`` addressed to it, the holder
reads the version from its store, seals it for the target's registered public key and name
(:func:`shir.adapters.envelope.seal`), and sends it on the intranet channel (mutual TLS, message
``ENVELOPE``). The target opens it on receipt (:meth:`HostCredentials.receive`: the sender must
be the node the TLS pin names, sealing with the key the log holds for it), stores it, and
heartbeats at once. Only after the target acknowledged does the holder record
``ShareCredential`` (the envelope in the log is ciphertext for that one node); the core's
``DeliverCredential`` then finds the target already holding it and only hastens its report. A
refused envelope (tampered, for another node or key, from an unexpected sender, a rollback)
changes nothing on the target, which answers with the reason; the holder logs it, and the
core asks again after its sync timeout. Sealing and sending run on a worker thread (the network
may take the intranet timeout), and the host records the outcome on its own thread.

**Remote access off:** no intranet, so nothing can be sent: the holder logs why. The core lets no
second node join such a runtime, so there is never anyone to sync with.

Secrets: plaintexts live only in the protected store and in memory while sealing or opening;
logs and errors name credentials by id and version.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from shir.adapters.backup import NodeIdentity, load_identity, save_identity
from shir.adapters.carried import carried_ids
from shir.adapters.channel import JobRequest
from shir.adapters.credentials_cli import DataDir
from shir.adapters.credstore import LocalCredentialStore
from shir.adapters.envelope import NodeKeys, open_envelope, seal
from shir.adapters.intranet_wire import EnvelopeMessage
from shir.adapters.node_jobs import credentials_named
from shir.adapters.protect import (
    CredentialError,
    IdentityConflict,
    MissingIdentity,
    ReplayedEnvelope,
    TamperedCiphertext,
    UnknownSender,
)
from shir.core.credentials import (
    SaveCredential,
    SealCredentialFor,
    ShareCredential,
    credential_status,
)
from shir.core.errors import ShirError
from shir.core.model import CredentialVersion
from shir.core.state import RuntimeState

__all__ = ["HostCredentials", "home_identity", "node_keys", "request_credentials"]

Log = Callable[..., None]
SendEnvelope = Callable[[str, EnvelopeMessage], None]


def request_credentials(state: RuntimeState, request: JobRequest,
                        ) -> tuple[tuple[CredentialVersion, ...], tuple[str, ...]]:
    """(needs, carried) of a job request: the credentials its spec names, at the latest versions
    the log knows (the core gives the job only to a node holding them), and the one it carries
    (checked, not opened; the core then needs no node to hold it)."""
    status = credential_status(state)
    named = sorted(set(credentials_named(request.kind, request.spec)))
    versions = ((cid, status.latest_version(cid)) for cid in named)
    needs = tuple(CredentialVersion(cid, v) for cid, v in versions if v is not None)
    return needs, carried_ids(request.credential)


def node_keys(home: Path, runtime_id: str, node_name: str) -> NodeKeys:
    """This machine's envelope key pair: from ``HOME/identity.node``, made there if missing.

    A home initialised for another runtime is refused (one machine, one runtime); one made for
    another node name is refused too, as the name is sealed into every envelope to it.
    """
    identity = home_identity(home, runtime_id, node_name)
    if identity is None:
        data = DataDir(home)
        identity = NodeIdentity(runtime_id, node_name, NodeKeys.generate())
        save_identity(data.identity_file, identity, data.protector())
        data.publish_public_key(identity.keys)
    return identity.keys


def home_identity(home: Path, runtime_id: str, node_name: str) -> NodeIdentity | None:
    """The identity in ``home``, None if no node has run there yet; ``IdentityConflict`` if it
    is another node's (or another runtime's)."""
    data = DataDir(home)
    try:
        identity = load_identity(data.identity_file, data.protector())
    except MissingIdentity:
        return None
    if (identity.runtime_id, identity.node_name) != (runtime_id, node_name):
        raise IdentityConflict(
            f"{data.identity_file} is the identity of node {identity.node_name!r} of runtime "
            f"{identity.runtime_id!r}, not of node {node_name!r} of runtime {runtime_id!r}: "
            "run this node with its own --home (a machine is one node of one runtime)"
        )
    return identity


class HostCredentials:
    """The credential part of one node host (see the module doc).

    ``send_envelope`` is the intranet's (None while remote access is off). The host calls
    :meth:`held`, :meth:`share` and :meth:`finished` from its thread; :meth:`receive` runs on
    intranet server threads.
    """

    def __init__(self, name: str, keys: NodeKeys, store: LocalCredentialStore, log: Log,
                 send_envelope: SendEnvelope | None = None) -> None:
        self.name = name
        self.keys = keys
        self.store = store
        self.log = log
        self.send_envelope = send_envelope
        self.report_soon = threading.Event()  # set when the store took a new version
        self._lock = threading.Lock()
        self._senders: dict[str, bytes] = {}  # node name -> registered envelope key
        self._sending: set[tuple[str, int, str]] = set()
        self._done: list[Callable[[float], ShareCredential]] = []

    # -- what this machine holds ------------------------------------------------------------

    def held(self) -> tuple[CredentialVersion, ...]:
        """The version of each credential the store holds, by id; unreadable files left out
        (with a logged reason), as the node cannot use them."""
        try:
            names = sorted(p.name.removesuffix(".cred") for p in self.store.directory.iterdir()
                           if p.name.endswith(".cred"))
        except FileNotFoundError:
            return ()
        except OSError as exc:  # not a folder, no permission: the node holds nothing usable
            self.log("warning", "credential_store_unreadable", error=exc.strerror or str(exc))
            return ()
        out = []
        for cid in names:
            try:
                version = self.store.version_of(cid)
            except (CredentialError, OSError) as exc:
                reason = str(exc) if isinstance(exc, CredentialError) else exc.strerror
                self.log("warning", "credential_unreadable", credential=cid[:128],
                         reason=reason)
                continue
            if version:
                out.append(CredentialVersion(cid, version))
        return tuple(out)

    def set_nodes(self, nodes: Iterable[Any]) -> None:
        """The registered nodes' envelope keys (``RuntimeState.nodes``): whom envelopes may come
        from, and with which key."""
        keys = {n.name: n.envelope_key for n in nodes if n.envelope_key is not None}
        with self._lock:
            self._senders = keys

    def saves(self, state: RuntimeState, held: Iterable[CredentialVersion],
              ) -> list[Callable[[float], SaveCredential]]:
        """``SaveCredential`` (to stamp) for each version ``held`` here that is newer than the
        runtime's latest: a user saved it on this machine."""
        status = credential_status(state)
        return [partial(SaveCredential, cv.credential_id, cv.version, self.name) for cv in held
                if cv.version > (status.latest_version(cv.credential_id) or 0)]

    # -- holder: seal and send ----------------------------------------------------------------

    def share(self, effect: SealCredentialFor, target_key: bytes | None) -> None:
        """Seal ``effect``'s version for its target and send it on a worker thread; the
        outcome is picked up by :meth:`finished`."""
        cid, version, target = effect.credential_id, effect.version, effect.to_node
        what = {"credential": cid, "version": version, "to": target}
        if self.send_envelope is None:
            self.log("warning", "credential_not_shared", **what,
                     reason="remote access is off: there is no intranet channel to send on")
            return
        if target_key is None:
            self.log("warning", "credential_not_shared", **what,
                     reason=f"node {target!r} registered no envelope key (an older shir?)")
            return
        key = (cid, version, target)
        with self._lock:
            if key in self._sending:
                return  # the same request seen twice: one send is under way
            self._sending.add(key)
        threading.Thread(target=self._seal_and_send, args=(effect, target_key),
                         name=f"share-{cid}-{target}", daemon=True).start()

    def _seal_and_send(self, effect: SealCredentialFor, target_key: bytes) -> None:
        cid, version, target = effect.credential_id, effect.version, effect.to_node
        what = {"credential": cid, "version": version, "to": target}
        try:
            stored = self.store.get(cid)
            if stored.version != version:
                self.log("warning", "credential_not_shared", **what,
                         reason=f"this node's store holds v{stored.version}, not v{version}")
                return
            envelope = seal(cid, version, stored.plaintext, self.keys, target_key, target)
            send = self.send_envelope
            assert send is not None
            send(target, EnvelopeMessage(cid, version, envelope))
        except ShirError as exc:  # the store's, the sealing's and the intranet's: no secrets
            self.log("warning", "credential_not_shared", **what, reason=str(exc))
            return
        finally:
            with self._lock:
                self._sending.discard((cid, version, target))
        self.log("info", "credential_sent", **what)
        with self._lock:
            self._done.append(partial(ShareCredential, cid, version, self.name, target, envelope))

    def finished(self) -> list[Callable[[float], ShareCredential]]:
        """Shares the targets took since the last call, as commands to stamp: the host records
        them in the log."""
        with self._lock:
            done, self._done = self._done, []
        return done

    # -- target: open and store ----------------------------------------------------------------

    def receive(self, sender: str, message: EnvelopeMessage) -> None:
        """An envelope from node ``sender`` (authenticated by its intranet pin): open it with
        this node's key and store it. Raises a :class:`ShirError` saying why it was refused;
        nothing is stored then."""
        with self._lock:
            sender_key = self._senders.get(sender)
        if sender_key is None:
            raise UnknownSender(f"node {sender!r} registered no envelope key in the runtime's "
                                "log; only registered nodes share credentials")
        held = self.store.version_of(message.credential_id)  # also validates the id
        try:
            opened = open_envelope(message.envelope, self.keys, self.name, sender_key, held)
        except ReplayedEnvelope:
            return  # authentic and already held: a resend after a lost answer
        if (opened.credential_id, opened.version) != (message.credential_id, message.version):
            raise TamperedCiphertext(
                f"the envelope holds credential {opened.credential_id!r} v{opened.version}, "
                f"but was sent as {message.credential_id!r} v{message.version}; refused"
            )
        self.store.put(opened.credential_id, opened.version, opened.plaintext)
        self.log("info", "credential_received", credential=opened.credential_id,
                 version=opened.version, sender=sender)
        self.report_soon.set()
