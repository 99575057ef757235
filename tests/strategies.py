"""The codec tests' strategies: thin names over the builder in :mod:`shir.sim.testing`.

The builder reads a registered event class's type hints and draws exactly the field types the
codec supports, so every new event type gets round-trip and fuzz coverage without a hand-written
strategy. A class whose validators refuse some values gets one in ``OVERRIDES``.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from shir.core.codec import EventSpec
from shir.sim.testing import EVENT_OVERRIDES as OVERRIDES
from shir.sim.testing import events, strategy_for_type

__all__ = ["OVERRIDES", "any_event", "strategy_for_event", "strategy_for_type"]


def strategy_for_event(spec: EventSpec) -> st.SearchStrategy[Any]:
    """Instances of the event class registered in ``spec``."""
    return events((spec.cls,))


def any_event() -> st.SearchStrategy[Any]:
    """Instances of any event type registered when this is called."""
    return events()
