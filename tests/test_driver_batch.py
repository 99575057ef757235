"""``Driver.handle_all``: several commands, one append (group commit), each refused alone."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from shir.core import CreateRuntime, SubmitJob
from shir.core.driver import Driver
from shir.core.errors import InvalidCommand
from shir.core.jobs import JobSubmitted
from shir.core.keys import AuthKey
from shir.core.model import KeyName
from shir.core.state import fold, initial
from shir.core.store import ConcurrencyConflict, InMemoryEventStore

K1 = AuthKey.from_seed("rt", KeyName.KEY1, 1, bytes(range(48)))
K2 = AuthKey.from_seed("rt", KeyName.KEY2, 1, bytes(range(1, 49)))


class CountingStore(InMemoryEventStore):
    def __init__(self) -> None:
        super().__init__()
        self.appends = 0

    def append(self, stream: str, events: Sequence[object], expected_version: int) -> int:
        self.appends += 1
        return super().append(stream, events, expected_version)


def created(store: InMemoryEventStore) -> Driver:
    d = Driver(store, "rt")
    d.handle(CreateRuntime("rt", "f", "ir", K1, K2, 0.0))
    return d


def test_commands_share_one_append_and_a_refusal_stays_in_its_place() -> None:
    store = CountingStore()
    d = created(store)
    before = store.appends
    out = d.handle_all([
        SubmitJob("j1", "k1", 1.0),
        SubmitJob("", "k2", 1.0),  # refused: an empty job id
        SubmitJob("j3", "k3", 1.0),
        SubmitJob("j1-again", "k1", 1.0),  # the same idempotency key as j1, decided after it
    ])
    assert store.appends == before + 1
    assert isinstance(out[1], InvalidCommand) and "job_id" in str(out[1])
    submitted = [e.job_id for e in store.read("rt") if isinstance(e, JobSubmitted)]
    assert submitted == ["j1", "j3"]  # the repeated key yields nothing: decided on j1's state
    assert d.state == fold(initial(), store.read("rt"))
    assert d.handle_all([SubmitJob("j1", "k1", 2.0)]) == [()]  # satisfied already: no append
    assert store.appends == before + 1


def test_a_conflict_decides_the_whole_batch_again() -> None:
    store = InMemoryEventStore()
    a = created(store)
    b = Driver(store, "rt")
    a.handle(SubmitJob("j1", "k1", 1.0))  # b is one event behind
    b.handle_all([SubmitJob("j1-dup", "k1", 2.0), SubmitJob("j2", "k2", 2.0)])
    assert b.conflicts == 1
    assert [e.job_id for e in store.read("rt") if isinstance(e, JobSubmitted)] == ["j1", "j2"]


def test_handle_still_raises_the_refusal() -> None:
    d = created(InMemoryEventStore())
    with pytest.raises(InvalidCommand):
        d.handle(SubmitJob("", "k", 1.0))
    with pytest.raises(ConcurrencyConflict):

        class Moved(InMemoryEventStore):
            def append(self, stream: str, events: Sequence[object], expected: int) -> int:
                raise ConcurrencyConflict(stream, expected, expected + 1)

        Driver(Moved(), "rt", max_conflict_retries=1).handle_all(
            [CreateRuntime("rt", "f", "ir", K1, K2, 0.0)])


@pytest.mark.parametrize("land", [True, False])
def test_an_unknown_append_outcome_is_read_back(land: bool) -> None:
    from shir.core.store import AppendOutcomeUnknown

    class Losing(InMemoryEventStore):
        failing = False

        def append(self, stream: str, events: Sequence[object], expected: int) -> int:
            if not self.failing:
                return super().append(stream, events, expected)
            if land:
                super().append(stream, events, expected)
            raise AppendOutcomeUnknown("timed out")

    store = Losing()
    d = created(store)
    store.failing = True
    batch = [SubmitJob("j1", "k1", 1.0), SubmitJob("j2", "k2", 1.0)]
    if land:
        d.handle_all(batch)  # landed: the re-read shows both, no error
        assert d.recoveries == 1
    else:
        with pytest.raises(AppendOutcomeUnknown):
            d.handle_all(batch)
    store.failing = False
    assert d.state == fold(initial(), store.read("rt"))
    assert len([e for e in store.read("rt") if isinstance(e, JobSubmitted)]) == (2 if land else 0)
