"""Leaving a ``with`` block closes the adapter, also when the block raised (``CloseOnExit``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shir.adapters.channel import ChannelError
from shir.adapters.closing import CloseOnExit
from shir.adapters.embedded_channel import EmbeddedChannel
from shir.adapters.filestore import FileEventStore
from shir.adapters.sqlitestore import SQLiteEventStore
from shir.core.store import StoreError

CASES: list[tuple[Callable[[Path], Any], Callable[[Any], object], type[Exception]]] = [
    (lambda d: SQLiteEventStore(d / "s.db"), lambda o: o.read("runtime", 0), StoreError),
    (lambda d: FileEventStore(d / "files"), lambda o: o.read("runtime", 0), StoreError),
    (lambda d: EmbeddedChannel(d / "c.db"), lambda o: o.results(), ChannelError),
]


@pytest.mark.parametrize(("make", "use", "error"), CASES)
def test_a_with_block_gives_the_object_and_closes_it_on_the_way_out(
        tmp_path: Path, make: Callable[[Path], Any], use: Callable[[Any], object],
        error: type[Exception]) -> None:
    obj = make(tmp_path)
    with pytest.raises(KeyError), obj as entered:
        assert entered is obj and isinstance(obj, CloseOnExit)
        use(obj)  # open: it works
        raise KeyError("the block failed")
    with pytest.raises(error, match="is closed"):
        use(obj)
    obj.close()  # closing twice is safe
