"""Sharing: every rule of granting, linking and revoking, each refusal naming its rule."""

from __future__ import annotations

import pytest
from rig import Rig, names
from snapshot_helpers import as_format_4_sees, strip_nodes

from shir.core import (
    AccessRevoked,
    AccessRole,
    CompleteJob,
    DispatchJobs,
    FactoryRef,
    GrantAccess,
    JobLeased,
    LinkRuntime,
    Principal,
    RevokeAccess,
    SharingRefused,
    SubmitLinkedJob,
    SuspendLinkedWork,
    handle,
)
from shir.core.codec import decode, encode
from shir.core.errors import InvalidCommand
from shir.core.sharing import (
    MAX_GRANTS,
    MAX_LINKS,
    AccessNotGranted,
    GrantRevoked,
    NoManagedIdentity,
    NotOwner,
    OtherTenant,
    OwnFactory,
    ResourceIdMismatch,
    UnknownLink,
    resource_id,
    sharing_state,
)
from shir.core.snapshot import FORMAT, restore, snapshot_bytes

TENANT = "tenant-a"
SHARED = FactoryRef("factory-1", TENANT, "msi-1")
OWNER = Principal("ada@contoso.com", AccessRole.OWNER)
B = FactoryRef("factory-b", TENANT, "msi-b")


def grant(c: Rig, grantee: FactoryRef = B, by: Principal = OWNER,
          at: float | None = None) -> tuple[object, ...]:
    return c.handle(GrantAccess(SHARED, grantee, by, c.at(at)))


def rid(c: Rig) -> str:
    rt = c.state.runtime
    assert rt is not None
    return resource_id(rt)


def linked(c: Rig, link: str = "lk-b", factory: str = "factory-b") -> Rig:
    c.handle(LinkRuntime(link, factory, rid(c), c.now))
    return c


@pytest.fixture
def c() -> Rig:
    return Rig.online(1)


@pytest.mark.parametrize(
    ("grantee", "by", "error", "rule", "hint"),
    [
        (FactoryRef("factory-b", "tenant-z", "msi-b"), OWNER, OtherTenant, "same tenant only",
         "tenant-z"),
        (B, Principal("bob", AccessRole.CONTRIBUTOR), NotOwner, "owner role required",
         "Contributor"),
        (B, Principal("bob", AccessRole.READER), NotOwner, "owner role required", "Owner"),
        (FactoryRef("factory-b", TENANT, None), OWNER, NoManagedIdentity,
         "managed identity required", "Identity property"),
        (SHARED, OWNER, OwnFactory, "another factory", "another data factory"),
    ],
)
def test_each_grant_rule_refuses_and_names_itself(
    c: Rig, grantee: FactoryRef, by: Principal, error: type[SharingRefused], rule: str,
    hint: str,
) -> None:
    err = c.refused(GrantAccess(SHARED, grantee, by, 2.0), error)
    assert isinstance(err, SharingRefused) and err.rule == rule
    assert f"refused by rule '{rule}'" in str(err) and hint in str(err)


def test_inherited_owner_may_grant_and_a_repeat_is_satisfied(c: Rig) -> None:
    events = c.handle(GrantAccess(SHARED, B, Principal("ops", AccessRole.INHERITED_OWNER), 2.0))
    assert names(events) == ["AccessGranted"]
    assert c.handle(GrantAccess(SHARED, B, OWNER, 3.0)) == ()
    assert list(sharing_state(c.state.model()).grants) == ["factory-b"]


def test_grant_names_the_runtimes_own_factory(c: Rig) -> None:
    err = c.refused(GrantAccess(FactoryRef("other", TENANT, "m"), B, OWNER, 2.0))
    assert "belongs to factory 'factory-1'" in str(err)


def test_link_needs_the_exact_resource_id_and_a_grant(c: Rig) -> None:
    err = c.refused(LinkRuntime("lk-b", "factory-b", rid(c), 2.0), AccessNotGranted)
    assert "must grant it access first" in str(err)
    grant(c, at=2)
    err = c.refused(LinkRuntime("lk-b", "factory-b", rid(c) + "x", 3.0), ResourceIdMismatch)
    assert rid(c) in str(err)  # the message says what to copy
    assert names(c.handle(LinkRuntime("lk-b", "factory-b", rid(c), 3.0))) == ["RuntimeLinked"]
    assert c.handle(LinkRuntime("lk-b", "factory-b", rid(c), 4.0)) == ()  # satisfied
    c.refused(LinkRuntime("lk-b", "factory-c", rid(c), 4.0))  # the id is taken by factory-b


def test_linked_jobs_run_on_the_shared_runtimes_nodes(c: Rig) -> None:
    grant(c, at=2)
    linked(c)
    events = c.handle(SubmitLinkedJob("lk-b", "job-1", "key-1", 3.0))
    assert names(events) == ["JobSubmitted", "LinkedJobAccepted"]
    assert c.handle(SubmitLinkedJob("lk-b", "job-1", "key-1", 3.5)) == ()  # a duplicate key
    leased = [e for e in c.handle(DispatchJobs("n1", c.state.term, 4.0))
              if isinstance(e, JobLeased)]
    assert [e.token.node for e in leased] == ["n1"]
    link = sharing_state(c.state.model()).links["lk-b"]
    assert (link.submitted, link.jobs) == (1, ("job-1",))


def test_revoking_stops_new_work_while_running_jobs_finish(c: Rig) -> None:
    grant(c, at=2)
    linked(c)
    c.handle(SubmitLinkedJob("lk-b", "job-1", "key-1", 3.0))
    (lease,) = [e for e in c.handle(DispatchJobs("n1", c.state.term, 4.0))
                if isinstance(e, JobLeased)]
    c.refused(RevokeAccess("factory-b", Principal("bob", AccessRole.CONTRIBUTOR), 5.0), NotOwner)
    d = handle(c.state, RevokeAccess("factory-b", OWNER, 5.0))
    c.state = d.state
    assert [type(e) for e in d.events] == [AccessRevoked]
    assert d.effects == (SuspendLinkedWork("factory-b", ("lk-b",), "access revoked by "
                                           "ada@contoso.com"),)
    err = c.refused(SubmitLinkedJob("lk-b", "job-2", "key-2", 6.0), GrantRevoked)
    assert err.rule == "revoked grant stops new work" and "grants access again" in str(err)
    # the job it had running finishes
    assert names(c.handle(CompleteJob(lease.token, 7.0))) == ["JobCompleted"]
    assert c.handle(RevokeAccess("factory-b", OWNER, 8.0)) == ()  # satisfied
    # granting again resumes the link
    grant(c, at=9)
    assert names(c.handle(SubmitLinkedJob("lk-b", "job-3", "key-3", 10.0))) == [
        "JobSubmitted", "LinkedJobAccepted"]


def test_unknown_link_is_refused(c: Rig) -> None:
    err = c.refused(SubmitLinkedJob("nope", "job-1", "key-1", 2.0), UnknownLink)
    assert "LinkRuntime" in str(err)


def test_sharing_events_round_trip_and_survive_a_snapshot(c: Rig) -> None:
    grant(c, at=2)
    linked(c)
    c.handle(SubmitLinkedJob("lk-b", "job-1", "key-1", 3.0))
    c.handle(RevokeAccess("factory-b", OWNER, 4.0))
    for e in c.log:
        assert decode(encode(e)) == e
    assert restore(snapshot_bytes(c.state)) == c.state


def test_a_refused_sharing_command_names_no_secret(c: Rig) -> None:
    err = c.refused(GrantAccess(SHARED, FactoryRef("f", "tenant-z", "m"), OWNER, 2.0))
    assert c.key_text() not in str(err)


def test_a_format_3_snapshot_restores_with_nothing_shared(c: Rig) -> None:
    import msgpack

    body = msgpack.unpackb(snapshot_bytes(c.state), raw=False)
    assert body[0] == FORMAT and body[-4:] == [None, [], [], []]
    strip_nodes(body, 3)
    restored = restore(msgpack.packb([3, *body[1:-4]], use_bin_type=True))
    assert restored == as_format_4_sees(c.state)
    assert sharing_state(restored.model()).links == {}


def test_grants_and_links_are_bounded(c: Rig) -> None:
    for i in range(MAX_GRANTS):
        grant(c, FactoryRef(f"f{i}", TENANT, f"m{i}"), at=2)
    err = c.refused(GrantAccess(SHARED, FactoryRef("one-more", TENANT, "m"), OWNER, 3.0))
    assert f"already has {MAX_GRANTS} grants" in str(err)
    for i in range(MAX_LINKS):
        c.handle(LinkRuntime(f"lk-{i}", "f0", rid(c), 4.0))
    err = c.refused(LinkRuntime("lk-more", "f1", rid(c), 5.0))
    assert f"already has {MAX_LINKS} links" in str(err)


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (GrantAccess(SHARED, FactoryRef("", TENANT, "m"), OWNER, 2.0),
         "grantee factory_id must be 1-128 characters"),
        (GrantAccess(SHARED, FactoryRef("f", TENANT, "m\n"), OWNER, 2.0),
         "grantee managed_identity must not contain control characters"),
        (GrantAccess(SHARED, B, Principal("", AccessRole.OWNER), 2.0),
         "principal name must be 1-128 characters"),
        (RevokeAccess("factory-b", Principal("x", "Owner"), 2.0),  # type: ignore[arg-type]
         "must be a Principal with an AccessRole"),
        (LinkRuntime("", "factory-b", "/factories/x", 2.0), "linked_runtime_id must be"),
    ],
)
def test_malformed_sharing_commands_say_which_field(c: Rig, command: object,
                                                    says: str) -> None:
    err = c.refused(command, InvalidCommand)
    assert says in str(err)
