"""The in-memory event store passes the store contract."""

from __future__ import annotations

from pathlib import Path

from store_contract import EventStoreContract

from shir.core.store import EventStore, InMemoryEventStore


class TestInMemoryEventStore(EventStoreContract):
    def make_store(self, tmp_path: Path) -> EventStore:
        return InMemoryEventStore()
