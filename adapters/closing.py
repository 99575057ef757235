"""``with`` blocks for the adapters that hold a connection, a lock or a client.

The stores, the channels and the ODBC source each release what they hold in ``close()`` (safe
to call twice); :class:`CloseOnExit` gives them the same ``with`` behaviour in one place.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["CloseOnExit"]


class CloseOnExit:
    """Mixin: ``with obj:`` gives ``obj`` and calls ``obj.close()`` on the way out, also when
    the block raised (the exception goes on)."""

    __slots__ = ()

    def close(self) -> None:
        """Release what the object holds (each adapter says what)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
