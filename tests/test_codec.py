"""The event codec: round trips for every registered type, fuzzing, and its refusals.

Every module of shir.core is imported first, so each event type that product code registers is
round-tripped and fuzzed here without anyone writing a test for it.
"""

from __future__ import annotations

import copy
import enum
import importlib
import pickle
import pkgutil
import typing
import weakref
from typing import Any

import attrs
import msgpack
import pytest
import sample_events  # noqa: F401  (registers the test.* events)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_events import CounterAdded, NoteWritten
from strategies import any_event, strategy_for_event, strategy_for_type

import shir.core
from shir.core.codec import (
    CodecError,
    CorruptRecord,
    UnknownEventType,
    UnsupportedEventVersion,
    _shadow,
    decode,
    decode_value,
    encode,
    encode_all,
    encode_value,
    event,
    registered_events,
    registered_values,
    spec_for,
    value,
)

for _module in pkgutil.walk_packages(shir.core.__path__, "shir.core."):
    importlib.import_module(_module.name)


# -- test-only types covering every supported field type --------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@value
@attrs.frozen
class Point:
    x: float
    y: int
    label: str | None


@event("test.kitchen_sink")
@attrs.frozen
class KitchenSink:
    s: str
    i: int
    f: float
    b: bool
    raw: bytes
    opt: int | None
    tags: tuple[str, ...]
    color: Color
    level: Level
    point: Point
    points: tuple[Point, ...]
    maybe_point: Point | None
    grid: tuple[tuple[int, ...], ...]
    colors: tuple[Color | None, ...]


@event("test.empty")
@attrs.frozen
class Empty:
    pass


@event("test.positive")
@attrs.frozen
class Positive:
    amount: int = attrs.field(validator=attrs.validators.gt(0))


@event(
    "test.upcast_demo",
    version=3,
    upcasters={1: lambda f: [f[0], 0], 2: lambda f: [*f, "items"]},
)
@attrs.frozen
class UpcastDemo:
    name: str  # v1
    count: int  # added in v2 (old records: 0)
    unit: str  # added in v3 (old records: "items")


@event("test.cached_hash")
@attrs.frozen(cache_hash=True)
class CachedHash:
    key: str


@event("test.post_init")
@attrs.frozen
class PostInit:
    low: int
    high: int

    def __attrs_post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low > high")


class _CountsSubclasses:
    __slots__ = ()  # slotted, so only the hook can keep the decoder off the fast path
    subclassed = 0

    def __init_subclass__(cls) -> None:
        _CountsSubclasses.subclassed += 1


@attrs.frozen
class HooksSubclassing(_CountsSubclasses):
    x: int


SUBCLASSED = _CountsSubclasses.subclassed  # before registering: attrs itself subclasses twice
event("test.init_subclass")(HooksSubclassing)


@event("test.watched_setattr")
@attrs.define
class WatchedSetattr:
    """Not frozen, with its own __setattr__, which __init__ goes through."""

    x: int

    def __setattr__(self, name: str, value: object) -> None:
        WATCHED.append(name)
        object.__setattr__(self, name, value)


WATCHED: list[str] = []


@attrs.frozen
class Unregistered:
    """An attrs class never passed to @value: not a valid field type."""

    x: int


SPECS = registered_events()
FUZZ = settings(max_examples=400, deadline=None)


def record(tag: object, version: object, fields: object) -> bytes:
    data: bytes = msgpack.packb([tag, version, fields], use_bin_type=True)
    return data


def decode_or_codec_error(data: bytes) -> None:
    """The fuzz oracle: ``decode`` returns a registered event or raises a CodecError."""
    try:
        result = decode(data)
    except CodecError:
        return
    assert type(result) in {s.cls for s in registered_events()}


# -- round trips ------------------------------------------------------------------------------


def test_every_supported_type_is_registered() -> None:
    tags = {s.tag for s in SPECS}
    assert {"test.kitchen_sink", "test.counter_added", "test.note_written"} <= tags


@pytest.mark.parametrize("spec", SPECS, ids=[s.tag for s in SPECS])
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.differing_executors],
)
@given(data=st.data())
def test_round_trip(spec: Any, data: st.DataObject) -> None:
    evt = data.draw(strategy_for_event(spec))
    encoded = encode(evt)
    assert type(encoded) is bytes
    assert decode(encoded) == evt


@pytest.mark.parametrize("cls", registered_values(), ids=[c.__name__ for c in registered_values()])
@settings(deadline=None, suppress_health_check=[HealthCheck.differing_executors])
@given(data=st.data())
def test_value_round_trip(cls: type, data: st.DataObject) -> None:
    obj = data.draw(strategy_for_type(cls))
    assert decode_value(cls, encode_value(obj)) == obj


@settings(deadline=None, max_examples=50)
@given(st.lists(any_event(), max_size=8))
def test_encode_all_is_the_records_end_to_end(events: list[Any]) -> None:
    # The simulator hashes its log through encode_all: the same bytes as record by record.
    assert encode_all(events) == b"".join(map(encode, events))


def test_encode_all_names_an_unregistered_event() -> None:
    @attrs.frozen
    class NotAnEvent:
        x: int

    with pytest.raises(UnknownEventType, match="NotAnEvent is not a registered event"):
        encode_all([Empty(), NotAnEvent(1)])


def test_round_trip_extremes() -> None:
    p = Point(float("-inf"), -(2**63), None)
    evt = KitchenSink(
        s="", i=2**64 - 1, f=float("inf"), b=False, raw=b"", opt=None, tags=(),
        color=Color.GREEN, level=Level.HIGH, point=p, points=(p, p), maybe_point=None,
        grid=((), (1, 2)), colors=(None, Color.RED),
    )
    assert decode(encode(evt)) == evt
    assert decode(encode(Empty())) == Empty()


def test_whole_floats_written_as_ints_decode_as_floats() -> None:
    # Another writer (or an upcaster) may hand over 2 for 2.0.
    fields = ["s", 1, 2, True, b"", None, [], "red", 1, [3, 4, None], [], None, [], []]
    evt = decode(record("test.kitchen_sink", 1, fields))
    assert evt.f == 2.0 and type(evt.f) is float
    assert evt.point == Point(3.0, 4, None) and type(evt.point.x) is float


# -- fuzzing: only CodecError, whatever the bytes -------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    decode_or_codec_error(data)


@st.composite
def mutated_records(draw: st.DrawFn) -> bytes:
    data = bytearray(encode(draw(any_event())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


@FUZZ
@given(mutated_records())
def test_mutated_valid_records(data: bytes) -> None:
    decode_or_codec_error(data)


garbage = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=20,
)


@FUZZ
@given(garbage)
def test_msgpack_valid_garbage(obj: object) -> None:
    decode_or_codec_error(msgpack.packb(obj, use_bin_type=True))


@FUZZ
@given(
    tag=st.sampled_from([s.tag for s in SPECS]) | st.text(max_size=5) | garbage,
    version=st.integers(-2, 5) | garbage,
    fields=st.lists(garbage, max_size=16) | garbage,
)
def test_garbage_fields_under_real_tags(tag: object, version: object, fields: object) -> None:
    # Reaches every generated field checker, which random bytes almost never do.
    decode_or_codec_error(record(tag, version, fields))


@st.composite
def right_shape_garbage(draw: st.DrawFn) -> bytes:
    spec = draw(st.sampled_from(SPECS))
    n = len(spec.field_names)
    return record(spec.tag, spec.version, draw(st.lists(garbage, min_size=n, max_size=n)))


@FUZZ
@given(right_shape_garbage())
def test_garbage_of_the_right_shape(data: bytes) -> None:
    # The right tag and field count: every field's own checker has to refuse the garbage.
    decode_or_codec_error(data)


# -- refusals --------------------------------------------------------------------------------


def test_unknown_tag_is_named() -> None:
    with pytest.raises(UnknownEventType, match=r"'test\.no_such_event'"):
        decode(record("test.no_such_event", 1, []))


def test_non_string_tag() -> None:
    with pytest.raises(CorruptRecord, match="tag must be a string"):
        decode(record(7, 1, []))


def test_unregistered_class_cannot_be_encoded() -> None:
    with pytest.raises(UnknownEventType, match="@event"):
        encode(Point(1.0, 2, None))
    with pytest.raises(UnknownEventType):
        spec_for(int)
    with pytest.raises(CodecError, match="not a registered value type"):
        encode_value(CounterAdded(1))


def test_newer_version_is_refused() -> None:
    with pytest.raises(UnsupportedEventVersion, match=r"test\.counter_added v2.*upgrade"):
        decode(record("test.counter_added", 2, [1]))


@pytest.mark.parametrize("bad", [0, -1, "1", None])
def test_bad_version_is_corrupt(bad: object) -> None:
    with pytest.raises(CorruptRecord, match="bad schema version"):
        decode(record("test.upcast_demo", bad, ["x"]))


def test_upcasting_from_v1_through_v3() -> None:
    assert decode(record("test.upcast_demo", 1, ["x"])) == UpcastDemo("x", 0, "items")
    assert decode(record("test.upcast_demo", 2, ["x", 5])) == UpcastDemo("x", 5, "items")
    assert decode(record("test.upcast_demo", 3, ["x", 5, "kg"])) == UpcastDemo("x", 5, "kg")
    assert decode(encode(UpcastDemo("y", 1, "m"))) == UpcastDemo("y", 1, "m")
    with pytest.raises(UnsupportedEventVersion):
        decode(record("test.upcast_demo", 4, ["x", 5, "kg", 1]))


def test_failing_upcaster_is_corrupt_record() -> None:
    with pytest.raises(CorruptRecord, match=r"upcasting from v1 failed \(IndexError\)"):
        decode(record("test.upcast_demo", 1, []))
    with pytest.raises(CorruptRecord, match=r"test\.upcast_demo: fields must be an array"):
        decode(record("test.upcast_demo", 1, 5))
    with pytest.raises(CorruptRecord, match=r"test\.upcast_demo: expected 3 fields, got 4"):
        decode(record("test.upcast_demo", 2, ["x", 1, "extra"]))  # upcast, then checked


UNSUPPORTED = [
    dict[str, int], list[int], typing.Union[int, str], int | str | None,  # noqa: UP007
    tuple[int, str], set[int], object, typing.Any, Unregistered,
]


@pytest.mark.parametrize("annotation", UNSUPPORTED, ids=[str(a) for a in UNSUPPORTED])
def test_unsupported_field_type_refused_at_registration(annotation: object) -> None:
    cls = attrs.frozen(type("Bad", (), {"__annotations__": {"x": annotation}}))
    with pytest.raises(TypeError, match="unsupported"):
        event("test.bad_field_type")(cls)
    assert "test.bad_field_type" not in {s.tag for s in registered_events()}


def test_non_attrs_class_refused() -> None:
    class Plain:
        x: int

    with pytest.raises(TypeError, match="attrs class"):
        event("test.not_attrs")(Plain)


def test_duplicate_tag_for_another_class_refused() -> None:
    @attrs.frozen
    class Impostor:
        amount: int

    with pytest.raises(ValueError, match=r"'test\.counter_added' already registered"):
        event("test.counter_added")(Impostor)
    assert spec_for(CounterAdded).cls is CounterAdded
    assert event("test.counter_added")(CounterAdded) is CounterAdded  # re-registering is fine


def test_missing_upcaster_refused() -> None:
    with pytest.raises(ValueError, match=r"no upcaster from version\(s\) \[2\]"):
        event("test.missing_upcaster", version=3, upcasters={1: lambda f: f})
    with pytest.raises(ValueError, match="version must be >= 1"):
        event("test.version_zero", version=0)


def test_wrong_field_count_names_the_tag() -> None:
    with pytest.raises(CorruptRecord, match=r"test\.counter_added: expected 1 fields, got 2"):
        decode(record("test.counter_added", 1, [1, 2]))
    with pytest.raises(CorruptRecord, match=r"test\.counter_added: expected 1 fields, got int"):
        decode(record("test.counter_added", 1, 5))
    with pytest.raises(CorruptRecord, match=r"test\.empty: expected no fields"):
        decode(record("test.empty", 1, [1]))


@pytest.mark.parametrize(
    ("index", "bad", "where"),
    [
        (0, 5, r"test\.kitchen_sink\.s: unexpected int"),
        (1, 1.5, r"test\.kitchen_sink\.i: unexpected float"),
        (1, True, r"test\.kitchen_sink\.i: unexpected bool"),
        (2, "x", r"test\.kitchen_sink\.f: unexpected str"),
        (4, "x", r"test\.kitchen_sink\.raw: unexpected str"),
        (6, ["ok", 3], r"test\.kitchen_sink\.tags\[\]: unexpected int"),
        (7, "blue", r"test\.kitchen_sink\.color: not a valid Color"),
        (8, 9, r"test\.kitchen_sink\.level: not a valid Level"),
        (9, ["x", 1, None], r"Point\.x: unexpected str"),
        (9, [1.0, 1], r"Point: expected 3 fields, got 2"),
        (12, [[1], ["a"]], r"test\.kitchen_sink\.grid\[\]\[\]: unexpected str"),
    ],
)
def test_wrong_field_type_names_the_field(index: int, bad: object, where: str) -> None:
    fields: list[object] = [
        "s", 1, 2.0, True, b"", None, [], "red", 1, [3.0, 4, None], [], None, [], [],
    ]
    decode(record("test.kitchen_sink", 1, fields))  # the unmodified record is fine
    fields[index] = bad
    with pytest.raises(CorruptRecord, match=where):
        decode(record("test.kitchen_sink", 1, fields))


def test_validator_refusal_is_corrupt_record() -> None:
    assert decode(record("test.positive", 1, [3])) == Positive(3)
    with pytest.raises(CorruptRecord, match=r"test\.positive: invalid field values"):
        decode(record("test.positive", 1, [-3]))


def test_decoded_objects_are_what_the_constructor_builds() -> None:
    # The decoder may skip __init__ for plain classes; nothing about the result may differ.
    p = Point(1.5, 2, "a")
    evt = KitchenSink(
        s="s", i=1, f=2.0, b=True, raw=b"r", opt=3, tags=("t",), color=Color.RED,
        level=Level.LOW, point=p, points=(p,), maybe_point=p, grid=((1,),), colors=(None,),
    )
    for original in (evt, CachedHash("k"), PostInit(1, 2), Empty()):
        decoded: Any = decode(encode(original))
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            decoded.x = 1
        assert type(decoded) is type(original)
        assert decoded == original and hash(decoded) == hash(original)
        assert repr(decoded) == repr(original)
    assert decode(encode(CachedHash("k"))).__hash__() == hash(CachedHash("k"))


def test_decoded_objects_behave_like_constructed_ones() -> None:
    # Decoding builds plain classes in a writable twin and then switches the class: the object
    # must be indistinguishable afterwards: weak references, pickling, copying, attrs helpers.
    assert _shadow(NoteWritten, ["text"]) is not None  # the path under test
    p = Point(1.5, 2, "a")
    decoded = decode(encode(NoteWritten("n")))
    assert weakref.ref(decoded)() is decoded
    assert pickle.loads(pickle.dumps(decoded)) == decoded
    assert copy.copy(decoded) == decoded
    assert attrs.evolve(decode_value(Point, encode_value(p)), x=2.0) == Point(2.0, 2, "a")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        del decoded.text


def test_classes_hooking_subclassing_are_built_through_init() -> None:
    # A twin would be a subclass, and running someone's __init_subclass__ is not the codec's
    # business: such classes take the plain constructor.
    assert decode(encode(HooksSubclassing(5))) == HooksSubclassing(5)
    assert _CountsSubclasses.subclassed == SUBCLASSED


def test_a_class_with_its_own_setattr_is_built_through_init() -> None:
    # Its __init__ stores through that __setattr__; the twin's plain stores would skip it.
    original = WatchedSetattr(5)
    record = encode(original)
    WATCHED.clear()
    assert decode(record) == original
    assert WATCHED == ["x"]  # the decoded object was built through it


def test_post_init_checks_still_run_on_decode() -> None:
    with pytest.raises(CorruptRecord, match=r"test\.post_init: invalid field values"):
        decode(record("test.post_init", 1, [3, 1]))


def test_note_written_round_trip_with_unicode() -> None:
    evt = NoteWritten("ünïcødé \x00 \U0001f600")
    assert decode(encode(evt)) == evt


def test_types_used_by_test_tags_are_marked() -> None:
    # Product code tells test types apart by the prefix; keep every test type under it.
    for spec in SPECS:
        module = spec.cls.__module__
        if not module.startswith("shir."):
            assert spec.tag.startswith("test."), (spec.tag, module)

