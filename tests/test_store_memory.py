"""The in-memory event store passes the store contract."""

from __future__ import annotations

from pathlib import Path

from shir.core.store import EventStore, InMemoryEventStore
from store_contract import EventStoreContract


class TestInMemoryEventStore(EventStoreContract):
    def make_store(self, tmp_path: Path) -> EventStore:
        return InMemoryEventStore()
