"""Sharing: a shared runtime serves other data factories through linked runtimes.

Theory of operation
-------------------
The runtime of this stream is the *shared* runtime: its nodes are the physical infrastructure.
Its owner grants use to another data factory (``GrantAccess`` -> ``AccessGranted``); that factory
then creates a *linked* runtime by referencing the shared one's resource id (``LinkRuntime`` ->
``RuntimeLinked``). A linked runtime is logical: the jobs its factory submits
(``SubmitLinkedJob``) join this runtime's queue and run on this runtime's nodes, under the same
leasing rules as every other job (``LinkedJobAccepted`` records which link a job came from).

Revoking a grant (``RevokeAccess`` -> ``AccessRevoked``) stops *new* work from that factory:
its links are suspended, so a later ``SubmitLinkedJob`` is refused, and the factory is told so
(the effect ``SuspendLinkedWork``). Jobs the runtime accepted before the revocation, queued or
running, finish normally: the service accepted them, and stopping them halfway would lose work.
Granting again resumes the factory's links.

Rules, each named in the refusal that enforces it (``SharingRefused.rule``):

- ``same tenant only``: the grantee factory lives in the shared factory's tenant;
- ``owner role required``: the granter (or revoker) holds the Owner role, possibly inherited, on
  the factory of the shared runtime;
- ``managed identity required``: the grantee factory has a managed identity (MSI);
- ``another factory``: a runtime is shared with other factories, not its own;
- ``resource id must match``: a link references this runtime's resource id exactly;
- ``access must be granted``: only a factory with a grant can link a runtime;
- ``revoked grant stops new work``: a suspended link submits nothing.

The facts a rule checks (tenants, roles, identities) are what the service knows from the
resource manager; a host passes them in the command, and the core decides.

State stays bounded: at most ``MAX_GRANTS`` grants and ``MAX_LINKS`` links (shir's bounds, not
the product's), and per link the ids of the jobs it has in the runtime (pruned as they end).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs

from shir.core import leasing
from shir.core.codec import event, value
from shir.core.effects import FACTORY, Recipient
from shir.core.errors import DomainError, InvalidCommand
from shir.core.jobs import JobSubmitted
from shir.core.kernel import (
    Decider,
    Events,
    Handler,
    Model,
    RuntimeInfo,
    TimedRule,
    check_name,
    emit,
    runtime_of,
)
from shir.core.leasing import SubmitJob
from shir.core.model import CredentialVersion

__all__ = [
    "DECIDE",
    "EFFECTS",
    "EVOLVE",
    "MAX_GRANTS",
    "MAX_LINKS",
    "RULES",
    "AccessGranted",
    "AccessNotGranted",
    "AccessRevoked",
    "AccessRole",
    "FactoryRef",
    "Grant",
    "GrantAccess",
    "GrantRevoked",
    "Link",
    "LinkRuntime",
    "LinkedJobAccepted",
    "NoManagedIdentity",
    "NotOwner",
    "OtherTenant",
    "OwnFactory",
    "Principal",
    "ResourceIdMismatch",
    "RevokeAccess",
    "RuntimeLinked",
    "SharingRefused",
    "SharingState",
    "SubmitLinkedJob",
    "SuspendLinkedWork",
    "UnknownLink",
    "resource_id",
    "sharing_state",
]

MAX_GRANTS = 64
MAX_LINKS = 64


def resource_id(runtime: RuntimeInfo) -> str:
    """The shared runtime's resource id, which a linked runtime references."""
    return f"/factories/{runtime.factory_id}/integrationRuntimes/{runtime.runtime_id}"


# --- values ------------------------------------------------------------------------------------

class AccessRole(enum.Enum):
    """A principal's role on the shared runtime's data factory."""

    OWNER = "Owner"
    INHERITED_OWNER = "Owner (inherited)"  # from the resource group or subscription
    CONTRIBUTOR = "Contributor"
    READER = "Reader"


@value
@attrs.frozen
class FactoryRef:
    """A data factory as the service knows it: id, tenant, and managed identity (or None)."""

    factory_id: str
    tenant_id: str
    managed_identity: str | None = None


@value
@attrs.frozen
class Principal:
    """Who asks: a user (or service principal) and its role on the shared factory."""

    name: str
    role: AccessRole


# --- errors ------------------------------------------------------------------------------------

class SharingRefused(DomainError):
    """A sharing command broke a rule; ``rule`` names it (see the module docstring)."""

    rule = "sharing"

    def __init__(self, detail: str) -> None:
        super().__init__(f"refused by rule '{self.rule}': {detail}")


class OtherTenant(SharingRefused):
    """The grantee factory lives in another tenant."""

    rule = "same tenant only"


class NotOwner(SharingRefused):
    """The granter or revoker is not an owner of the shared runtime's factory."""

    rule = "owner role required"


class NoManagedIdentity(SharingRefused):
    """The grantee factory has no managed identity."""

    rule = "managed identity required"


class OwnFactory(SharingRefused):
    """A runtime is shared with other factories, not with its own."""

    rule = "another factory"


class ResourceIdMismatch(SharingRefused):
    """A link references another resource id than this runtime's."""

    rule = "resource id must match"


class AccessNotGranted(SharingRefused):
    """The factory has no grant on this runtime."""

    rule = "access must be granted"


class GrantRevoked(SharingRefused):
    """The link's grant was revoked: it takes no new work."""

    rule = "revoked grant stops new work"


class UnknownLink(DomainError):
    """No linked runtime of this id references this runtime."""


# --- commands ----------------------------------------------------------------------------------

@attrs.frozen
class GrantAccess:
    """Grant ``grantee`` the use of this runtime. ``shared_factory`` is this runtime's factory
    as the service knows it (its tenant), ``granted_by`` who asks and with which role."""

    shared_factory: FactoryRef
    grantee: FactoryRef
    granted_by: Principal
    at: float


@attrs.frozen
class RevokeAccess:
    """Withdraw the grant of ``factory_id``: its linked runtimes take no new work."""

    factory_id: str
    revoked_by: Principal
    at: float


@attrs.frozen
class LinkRuntime:
    """Create linked runtime ``linked_runtime_id`` in factory ``factory_id``, referencing
    ``shared_resource_id`` (see :func:`resource_id`)."""

    linked_runtime_id: str
    factory_id: str
    shared_resource_id: str
    at: float


@attrs.frozen
class SubmitLinkedJob:
    """The factory of ``linked_runtime_id`` submits a job to run on this runtime's nodes.

    The job's fields mean what they mean in :class:`~shir.core.leasing.SubmitJob`.
    """

    linked_runtime_id: str
    job_id: str
    idempotency_key: str
    at: float
    needs: tuple[CredentialVersion, ...] = ()
    carried: tuple[str, ...] = ()
    size_mb: float = 0.0
    spec: bytes = b""

    def job(self) -> SubmitJob:
        """The job as the leasing rules see it."""
        return SubmitJob(self.job_id, self.idempotency_key, self.at, self.needs, self.carried,
                         self.size_mb, self.spec)


# --- events ------------------------------------------------------------------------------------

@event("access_granted")
@attrs.frozen
class AccessGranted:
    """``factory`` may now link runtimes to this one."""

    factory: FactoryRef
    granted_by: str
    at: float


@event("access_revoked")
@attrs.frozen
class AccessRevoked:
    """The grant of ``factory_id`` was withdrawn; ``links`` are suspended."""

    factory_id: str
    revoked_by: str
    links: tuple[str, ...]
    at: float


@event("runtime_linked")
@attrs.frozen
class RuntimeLinked:
    """Linked runtime ``linked_runtime_id`` of ``factory_id`` now runs its jobs here."""

    linked_runtime_id: str
    factory_id: str
    at: float


@event("linked_job_accepted")
@attrs.frozen
class LinkedJobAccepted:
    """Job ``job_id`` (submitted in the same decision) came from ``linked_runtime_id``."""

    linked_runtime_id: str
    job_id: str
    at: float


# --- effects -----------------------------------------------------------------------------------

@attrs.frozen
class SuspendLinkedWork:
    """To the factory side: ``factory_id``'s linked runtimes take no new work here."""

    factory_id: str
    links: tuple[str, ...]
    reason: str

    @property
    def to(self) -> Recipient:
        """The factory side."""
        return FACTORY


# --- state -------------------------------------------------------------------------------------

@value
@attrs.frozen
class Grant:
    """A factory's permission to link runtimes to this one."""

    factory: FactoryRef
    granted_by: str
    granted_at: float


@value
@attrs.frozen
class Link:
    """A linked runtime. ``jobs`` are the ids of its jobs the runtime may still hold."""

    linked_runtime_id: str
    factory_id: str
    linked_at: float
    submitted: int = 0
    revoked_at: float | None = None  # set while its factory's grant is withdrawn
    jobs: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        """Does it take new work?"""
        return self.revoked_at is None


@attrs.frozen
class SharingState:
    """Grants by factory id and links by linked runtime id (both in the order they began)."""

    grants: dict[str, Grant] = attrs.field(factory=dict)
    links: dict[str, Link] = attrs.field(factory=dict)


# The model's ``sharing`` is copy-on-write: handlers build a new SharingState, never change one
# in place, so a scratch model (which shares it) never writes through to the real one.

def _granted(m: Model, e: AccessGranted) -> None:
    sh = sharing_state(m)
    fid = e.factory.factory_id
    links = {
        k: attrs.evolve(v, revoked_at=None) if v.factory_id == fid else v
        for k, v in sh.links.items()
    }
    m.sharing = SharingState({**sh.grants, fid: Grant(e.factory, e.granted_by, e.at)}, links)


def _revoked(m: Model, e: AccessRevoked) -> None:
    sh = sharing_state(m)
    links = {
        k: attrs.evolve(v, revoked_at=e.at) if k in e.links else v for k, v in sh.links.items()
    }
    m.sharing = SharingState(
        {k: v for k, v in sh.grants.items() if k != e.factory_id}, links
    )


def _linked(m: Model, e: RuntimeLinked) -> None:
    sh = sharing_state(m)
    link = Link(e.linked_runtime_id, e.factory_id, e.at)
    m.sharing = SharingState(sh.grants, {**sh.links, e.linked_runtime_id: link})


def _job_accepted(m: Model, e: LinkedJobAccepted) -> None:
    sh = sharing_state(m)
    link = sh.links[e.linked_runtime_id]
    held = m.jobs.jobs  # prune the ids of jobs that ended: bounded by live work
    live = tuple(j for j in link.jobs if j in held)
    if e.job_id not in live:
        live = (*live, e.job_id)
    link = attrs.evolve(link, submitted=link.submitted + 1, jobs=live)
    m.sharing = SharingState(sh.grants, {**sh.links, e.linked_runtime_id: link})


EVOLVE: dict[type, Callable[[Model, Any], None]] = {
    AccessGranted: _granted,
    AccessRevoked: _revoked,
    RuntimeLinked: _linked,
    LinkedJobAccepted: _job_accepted,
}

EFFECTS: dict[type, Callable[[Any], tuple[object, ...]]] = {
    AccessRevoked: lambda e: (
        SuspendLinkedWork(e.factory_id, e.links, f"access revoked by {e.revoked_by}"),
    ),
}


# --- decisions ---------------------------------------------------------------------------------

_OWNERS = (AccessRole.OWNER, AccessRole.INHERITED_OWNER)


def _check_owner(who: Principal, verb: str) -> None:
    if not isinstance(who, Principal) or not isinstance(who.role, AccessRole):
        raise InvalidCommand(
            f"the principal who asks to {verb} must be a Principal with an AccessRole")
    check_name("principal name", who.name)
    if who.role not in _OWNERS:
        raise NotOwner(
            f"{who.name!r} is {who.role.value} on the shared runtime's factory; only an Owner "
            f"(or inherited Owner) can {verb}: ask an owner, or get the Owner role"
        )


def _check_factory(ref: FactoryRef, what: str) -> None:
    if not isinstance(ref, FactoryRef):
        raise InvalidCommand(f"{what} must be a FactoryRef")
    check_name(f"{what} factory_id", ref.factory_id)
    check_name(f"{what} tenant_id", ref.tenant_id)
    if ref.managed_identity is not None:
        check_name(f"{what} managed_identity", ref.managed_identity)


def _grant(m: Model, c: GrantAccess, k: Decider) -> Events:
    rt = runtime_of(m)
    _check_factory(c.shared_factory, "shared_factory")
    _check_factory(c.grantee, "grantee")
    if c.shared_factory.factory_id != rt.factory_id:
        raise InvalidCommand(
            f"runtime {rt.name!r} belongs to factory {rt.factory_id!r}, not "
            f"{c.shared_factory.factory_id!r:.60}; describe the runtime's own factory"
        )
    _check_owner(c.granted_by, "grant access")
    g = c.grantee
    if g.factory_id == rt.factory_id:
        raise OwnFactory(
            f"factory {g.factory_id!r} already owns runtime {rt.name!r}; grant access to "
            "another data factory"
        )
    if g.tenant_id != c.shared_factory.tenant_id:
        raise OtherTenant(
            f"factory {g.factory_id!r} is in tenant {g.tenant_id!r}, the shared runtime's "
            f"factory in {c.shared_factory.tenant_id!r}; sharing works only within one tenant"
        )
    if g.managed_identity is None:
        raise NoManagedIdentity(
            f"factory {g.factory_id!r} has no managed identity; create the factory with an "
            "identity (set its Identity property when deploying it by template or SDK)"
        )
    current = sharing_state(m).grants.get(g.factory_id)
    if current is not None and current.factory == g:
        return []  # already granted: satisfied
    if current is None and len(sharing_state(m).grants) >= MAX_GRANTS:
        raise InvalidCommand(
            f"runtime {rt.name!r} already has {MAX_GRANTS} grants (shir's bound); revoke one first"
        )
    s, out = k.timed(m, c.at)
    emit(s, out, AccessGranted(g, c.granted_by.name, c.at))
    return out


def _revoke(m: Model, c: RevokeAccess, k: Decider) -> Events:
    runtime_of(m)
    check_name("factory_id", c.factory_id)
    _check_owner(c.revoked_by, "revoke access")
    if c.factory_id not in sharing_state(m).grants:
        return []  # nothing granted: satisfied
    links = tuple(k for k, v in sharing_state(m).links.items() if v.factory_id == c.factory_id)
    s, out = k.timed(m, c.at)
    emit(s, out, AccessRevoked(c.factory_id, c.revoked_by.name, links, c.at))
    return out


def _link(m: Model, c: LinkRuntime, k: Decider) -> Events:
    rt = runtime_of(m)
    check_name("linked_runtime_id", c.linked_runtime_id)
    check_name("factory_id", c.factory_id)
    expected = resource_id(rt)
    if c.shared_resource_id != expected:
        raise ResourceIdMismatch(
            f"{c.shared_resource_id!r:.200} is not the resource id of runtime {rt.name!r}; "
            f"copy it from the shared runtime: {expected}"
        )
    if c.factory_id not in sharing_state(m).grants:
        raise AccessNotGranted(
            f"factory {c.factory_id!r} has no grant on runtime {rt.name!r}; an owner of "
            f"factory {rt.factory_id!r} must grant it access first"
        )
    existing = sharing_state(m).links.get(c.linked_runtime_id)
    if existing is not None:
        if existing.factory_id == c.factory_id:
            return []  # already linked: satisfied
        raise InvalidCommand(
            f"linked runtime id {c.linked_runtime_id!r} is taken by factory "
            f"{existing.factory_id!r}; choose another id"
        )
    if len(sharing_state(m).links) >= MAX_LINKS:
        raise InvalidCommand(f"runtime {rt.name!r} already has {MAX_LINKS} links (shir's bound)")
    s, out = k.timed(m, c.at)
    emit(s, out, RuntimeLinked(c.linked_runtime_id, c.factory_id, c.at))
    return out


def _submit_linked(m: Model, c: SubmitLinkedJob, k: Decider) -> Events:
    rt = runtime_of(m)
    link = sharing_state(m).links.get(c.linked_runtime_id)
    if link is None:
        raise UnknownLink(
            f"no linked runtime {c.linked_runtime_id!r:.60} references runtime {rt.name!r}; "
            "create it with LinkRuntime first"
        )
    if not link.active:
        raise GrantRevoked(
            f"factory {link.factory_id!r}'s access to runtime {rt.name!r} was revoked at "
            f"{link.revoked_at:g} s; linked runtime {link.linked_runtime_id!r} takes no new "
            "work until an owner grants access again"
        )
    out = list(leasing.DECIDE[SubmitJob](m, c.job(), k))  # the leasing rules decide the job
    if any(type(e) is JobSubmitted for e in out):  # not a duplicate
        out.append(LinkedJobAccepted(c.linked_runtime_id, c.job_id, c.at))
    return out


DECIDE: dict[type, Handler] = {
    GrantAccess: _grant,
    RevokeAccess: _revoke,
    LinkRuntime: _link,
    SubmitLinkedJob: _submit_linked,
}


# --- queries -----------------------------------------------------------------------------------

_NOTHING_SHARED = SharingState()


def sharing_state(m: Model) -> SharingState:
    """The grants and links of a runtime's model (read-only)."""
    return m.sharing or _NOTHING_SHARED


RULES: tuple[TimedRule, ...] = ()  # nothing here waits on time
