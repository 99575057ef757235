"""Hypothesis strategies derived from the codec's registrations.

:func:`strategy_for_event` reads a registered event class's type hints and builds values for
exactly the field types the codec supports, so every new event type gets round-trip and fuzz
coverage without writing a strategy by hand. A class whose validators refuse some values can be
given a hand-written strategy in :data:`OVERRIDES` (keyed by class); fields with defaults fall back
to them when the drawn values are refused.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

import attrs
from hypothesis import assume
from hypothesis import strategies as st

from shir.core.codec import EventSpec, _values, registered_events

__all__ = ["OVERRIDES", "any_event", "strategy_for_event", "strategy_for_type"]

# msgpack's integer range: int64 for negatives, uint64 for positives.
MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
# No NaN: NaN != NaN would make every round-trip comparison fail; infinities are fine.
FLOATS = st.floats(allow_nan=False, allow_infinity=True)

OVERRIDES: dict[type, st.SearchStrategy[Any]] = {}
_cache: dict[type, st.SearchStrategy[Any]] = {}


def strategy_for_type(tp: Any) -> st.SearchStrategy[Any]:
    """Values of one supported field type (see ``shir.core.codec`` for the list)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"unsupported union {tp!r}")
        return st.none() | strategy_for_type(options[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for_type(args[0]), max_size=5).map(tuple)
        raise TypeError(f"unsupported tuple type {tp!r}")
    if tp is bool:  # before int: bool is an int subclass
        return st.booleans()
    if tp is int:
        return MSGPACK_INT
    if tp is float:
        return FLOATS
    if tp is str:
        return st.text(max_size=20)
    if tp is bytes:
        return st.binary(max_size=20)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(tp)
    if isinstance(tp, type) and (tp in _values or tp in OVERRIDES):
        return _class_strategy(tp)
    raise TypeError(f"no strategy for field type {tp!r}")


def _class_strategy(cls: type) -> st.SearchStrategy[Any]:
    if cls in OVERRIDES:
        return OVERRIDES[cls]
    if cls not in _cache:
        # Deferred, so a value class that (optionally) contains itself does not recurse forever.
        _cache[cls] = st.deferred(lambda: _build(cls))
    return _cache[cls]


_NO_DEFAULT = object()


def _default(field: attrs.Attribute[Any]) -> Any:
    default: Any = field.default
    if default is attrs.NOTHING:
        return _NO_DEFAULT
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return _NO_DEFAULT if default.takes_self else default.factory()
    return default


def _construct(cls: type, values: list[Any]) -> Any:
    try:
        return cls(*values)  # positionally, as the codec's decoder does
    except Exception:
        return _NO_DEFAULT


def _build(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = attrs.fields(cls)
    strategies = [strategy_for_type(hints[f.name]) for f in fields]
    defaults = [_default(f) for f in fields]

    @st.composite
    def instances(draw: st.DrawFn) -> Any:
        drawn = [draw(s) for s in strategies]
        obj = _construct(cls, drawn)
        if obj is not _NO_DEFAULT:
            return obj
        # Validators refused the combination (settings with ranges, say). Start from the
        # defaults and let in each drawn value the class accepts, so constrained classes still
        # get random values where they allow them instead of being filtered out wholesale.
        values = [d if d is not _NO_DEFAULT else v for d, v in zip(defaults, drawn, strict=True)]
        obj = _construct(cls, values)
        assume(obj is not _NO_DEFAULT)
        for i, d in enumerate(defaults):
            if d is _NO_DEFAULT:
                continue
            candidate = [*values[:i], drawn[i], *values[i + 1 :]]
            better = _construct(cls, candidate)
            if better is not _NO_DEFAULT:
                values, obj = candidate, better
        return obj

    return instances()


def strategy_for_event(spec: EventSpec) -> st.SearchStrategy[Any]:
    """Instances of the event class registered in ``spec``."""
    return _class_strategy(spec.cls)


def any_event() -> st.SearchStrategy[Any]:
    """Instances of any event type registered when this is called."""
    specs = registered_events()
    if not specs:
        raise RuntimeError("no event types are registered; import the modules defining them")
    return st.one_of([strategy_for_event(s) for s in specs])
