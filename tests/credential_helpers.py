"""A host for the credential tests: ``Rig`` plus what nodes do with credentials.

``CredCluster`` plays every node's part in the sync protocol the way a real host would:

- ``save(cid, v, node)`` sends ``SaveCredential``; the node then reports the version in its
  heartbeats (it stored it);
- with ``cooperative=True`` it answers effects as they come out of each decision:
  ``SealCredentialFor`` -> the holder sends ``ShareCredential`` with an envelope from ``sealer``
  (a fake one by default), unless the holder is ``down``; ``DeliverCredential`` -> the target
  stores the version and reports it in its next heartbeat, unless it is ``down`` (the envelope is
  lost) or already holds that version or a newer one (an envelope refuses rollbacks);
- it records every refusal it meets while answering (``refusals``), and checks that no
  ``JobLeased`` goes to a node whose reported holding is below the job's requirement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from rig import Rig

from shir.core import (
    CredentialVersion,
    DeliverCredential,
    DomainError,
    JobLeased,
    JobSubmitted,
    SaveCredential,
    SealCredentialFor,
    ShareCredential,
)
from shir.core.jobs import requirement_of

Sealer = Callable[[SealCredentialFor], bytes]


def fake_envelope(fx: SealCredentialFor) -> bytes:
    """Stands for ciphertext: names what it seals, holds nothing secret."""
    return f"sealed:{fx.credential_id}:v{fx.version}:{fx.from_node}->{fx.to_node}".encode()


class CredCluster(Rig):
    """``Rig`` whose nodes hold credentials and (optionally) answer sync effects."""

    def __init__(self, *args: Any, cooperative: bool = False, sealer: Sealer = fake_envelope,
                 **kw: Any) -> None:
        self.cooperative = cooperative
        self.sealer = sealer
        self.down: set[str] = set()
        self.refusals: list[DomainError] = []
        self.requirements: dict[str, tuple[CredentialVersion, ...]] = {}
        self.leased_to: list[tuple[str, str]] = []  # (job id, node)
        self._answering = False
        self._seen = 0
        super().__init__(*args, **kw)

    # --- what a node holds ------------------------------------------------------------------

    def holding(self, node: str) -> dict[str, int]:
        """What ``node`` will report: credential id -> version."""
        return {cv.credential_id: cv.version for cv in self.reports[node].credentials}

    def hold(self, node: str, cid: str, version: int) -> None:
        """``node`` stored ``version`` of ``cid`` and reports it from its next heartbeat on."""
        have = self.holding(node)
        have[cid] = version
        self.report(node, credentials=tuple(
            CredentialVersion(c, v) for c, v in sorted(have.items())
        ))

    def save(self, cid: str, version: int, node: str, at: float | None = None
             ) -> tuple[object, ...]:
        events = self.handle(SaveCredential(cid, version, node, self.at(at)))
        if self.holding(node).get(cid, 0) < version:
            self.hold(node, cid, version)
        return events

    # --- the host loop ----------------------------------------------------------------------

    def handle(self, command: Any) -> tuple[object, ...]:
        events = super().handle(command)
        for e in events:
            if isinstance(e, JobSubmitted):
                self.requirements[e.job_id] = requirement_of(e.needs, e.carried)
            elif isinstance(e, JobLeased):
                self.check_lease(e)
        if self.cooperative and not self._answering:
            self._answering = True
            try:
                self.answer()
            finally:
                self._answering = False
        return events

    def register(self, node: str, **kw: Any) -> tuple[object, ...]:
        """Register ``node``; answer what that calls for once the machine is adopted."""
        answering, self._answering = self._answering, True
        try:
            events = super().register(node, **kw)
        finally:
            self._answering = answering
        if self.cooperative and not answering:
            self._answering = True
            try:
                self.answer()
            finally:
                self._answering = False
        return events

    def check_lease(self, e: JobLeased) -> None:
        node = self.state.node(e.token.node)
        assert node is not None
        held = {cv.credential_id: cv.version for cv in node.metrics.credentials}
        need = self.requirements[e.token.job_id]
        stale = [cv for cv in need if held.get(cv.credential_id, 0) < cv.version]
        assert not stale, f"{e.token.job_id} leased to {node.name} holding {held}, needs {stale}"
        self.leased_to.append((e.token.job_id, node.name))

    def answer(self) -> None:
        """Carry out the sync effects not yet answered, in order (new ones included)."""
        while self._seen < len(self.effects):
            fx = self.effects[self._seen]
            self._seen += 1
            if isinstance(fx, SealCredentialFor):
                if fx.from_node in self.down or fx.from_node not in self.reports:
                    continue
                share = ShareCredential(fx.credential_id, fx.version, fx.from_node, fx.to_node,
                                        self.sealer(fx), self.now)
                try:
                    self.handle(share)
                except DomainError as err:
                    self.refusals.append(err)
            elif isinstance(fx, DeliverCredential):
                if fx.to_node in self.down or fx.to_node not in self.reports:
                    continue
                if self.holding(fx.to_node).get(fx.credential_id, 0) < fx.version:
                    self.hold(fx.to_node, fx.credential_id, fx.version)

    def silence(self, node: str) -> None:
        """``node`` stops heartbeating and answering (hibernation, crash, partition)."""
        self.down.add(node)

    def wake(self, node: str) -> None:
        self.down.discard(node)

    def run_up(self, until: float, every: float = 10.0) -> list[object]:
        """``Rig.run`` with the nodes that are down skipped."""
        return self.run(until, every=every, skip=tuple(sorted(self.down)))


def with_credentials(metrics: Any, **held: int) -> Any:
    """``metrics`` reporting ``held`` (credential id -> version)."""
    return attrs.evolve(metrics, credentials=tuple(
        CredentialVersion(c, v) for c, v in sorted(held.items())
    ))
