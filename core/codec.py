"""Versioned msgpack codec for events (and the value objects inside them).

Theory of operation
-------------------
Every event class is registered under a *stable tag* (``"node_registered"``), never its Python
name, with a schema version. A record on disk is the msgpack array ``[tag, version, fields]``
where ``fields`` is the positional list of the class's attrs fields. Positional fields keep the
records small and decoding cheap: decoding is one ``msgpack.unpackb`` plus one generated
function per type that checks each field's type and builds the object: nested value objects
inline, and, for classes whose ``__init__`` only stores its arguments, straight into the slots
(constructing frozen attrs objects is most of a decode's cost). Classes with validators,
converters or ``__attrs_post_init__`` are always built through ``__init__``.

Changing an event's shape means raising its version and registering an *upcaster* for the old
one: a function from the old field list to the next version's field list. Old records are
upcast step by step on read; records from a newer version than this code knows are refused
(``UnsupportedEventVersion``), never guessed at.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``bytes``, ``None``-able
versions of any supported type (``X | None``), ``tuple[X, ...]``, enums (valued by ``str`` or
``int``) and nested frozen attrs classes registered with :func:`value`. Anything else is refused
at registration time, so a schema mistake fails at import, not in production.

Decoding never raises anything but :class:`CodecError` subclasses, whatever the bytes.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import msgpack

from shir.core.errors import ShirError

__all__ = [
    "CodecError",
    "CorruptRecord",
    "EventSpec",
    "UnknownEventType",
    "UnsupportedEventVersion",
    "decode",
    "decode_value",
    "encode",
    "encode_all",
    "encode_value",
    "event",
    "registered_events",
    "registered_values",
    "spec_for",
    "value",
]

T = TypeVar("T")
Upcaster = Callable[[list[Any]], list[Any]]


class CodecError(ShirError):
    """A record could not be encoded or decoded."""


class UnknownEventType(CodecError):
    """The record's type tag is not registered in this version of shir."""


class UnsupportedEventVersion(CodecError):
    """The record was written by a newer schema than this code understands."""


class CorruptRecord(CodecError):
    """The bytes are not a well-formed record of the type they claim to be."""


@attrs.frozen
class EventSpec:
    """How one registered event type is written and read."""

    tag: str
    version: int
    cls: type
    field_names: tuple[str, ...]
    upcasters: Mapping[int, Upcaster]
    encode_fields: Callable[[Any], list[Any]]
    decode_fields: Callable[[Sequence[Any]], Any]


_by_tag: dict[str, EventSpec] = {}
_by_cls: dict[type, EventSpec] = {}
# Value objects (nested attrs classes): cls -> (encode, decode)
_values: dict[type, tuple[Callable[[Any], list[Any]], Callable[[Any], Any]]] = {}


def _fail(msg: str) -> typing.NoReturn:
    raise CorruptRecord(msg)


def _compile(cls: type, label: str) -> tuple[Callable[[Any], list[Any]], Callable[[Any], Any]]:
    """Generate the field encoder and checking decoder for an attrs class.

    Generated source (like attrs itself does) keeps the hot path free of per-field dispatch:
    nested value objects and tuple items are decoded inline (no call per value), and plain
    classes are built without going through ``__init__`` (see :func:`_shadow`).
    """
    if not attrs.has(cls):
        raise TypeError(f"{cls.__qualname__} must be an attrs class to be registered")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in attrs.fields(cls)]
    env: dict[str, Any] = {"_fail": _fail}
    enc_parts = [_enc_expr(hints[name], f"o.{name}", env, f"{i}") for i, name in enumerate(names)]
    enc_src = f"def enc(o):\n    return [{', '.join(enc_parts)}]\n"
    dec_src = "def dec(f):\n" + "".join(
        f"    {line}\n" for line in _dec_object(cls, "f", "f", env, label, "")
    )
    dec_src += "    return f\n"
    exec(compile(enc_src + dec_src, f"<shir.codec {label}>", "exec"), env)
    return env["enc"], env["dec"]


def _dec_object(
    cls: type, src: str, out: str, env: dict[str, Any], label: str, key: str
) -> list[str]:
    """Statements that check the field tuple ``src`` and bind ``out`` to a ``cls``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in attrs.fields(cls)]
    args = [f"v{key}_{i}" for i in range(len(names))]
    n = len(names)
    if n:
        lines = [
            f"if type({src}) is not tuple or len({src}) != {n}:",
            f"    _fail({label + f': expected {n} fields, got '!r} + "
            f"(str(len({src})) if type({src}) is tuple else type({src}).__name__))",
            f"{', '.join(args)}, = {src}",
        ]
    else:
        lines = [
            f"if type({src}) is not tuple or {src}:",
            f"    _fail({label + ': expected no fields'!r})",
        ]
    for i, name in enumerate(names):
        lines += _dec_stmts(hints[name], args[i], env, f"{label}.{name}", f"{key}_{i}")
    env[f"_cls{key}"] = cls
    shadow = _shadow(cls, names)
    if shadow is None:
        lines.append(f"{out} = _cls{key}({', '.join(args)})")
    else:
        # Build a twin whose slots take plain stores, then hand the object to ``cls``: the
        # same object __init__ would build, at a third of the cost (see _shadow).
        env[f"_sh{key}"] = shadow
        lines.append(f"{out} = _sh{key}()")
        lines += [f"{out}.{name} = {args[i]}" for i, name in enumerate(names)]
        lines.append(f"{out}.__class__ = _cls{key}")
    return lines


def _shadow(cls: type, names: list[str]) -> type | None:
    """A writable twin of ``cls`` to build its objects in, or ``None`` when it cannot be used.

    Frozen attrs classes refuse ``obj.x = v``, so ``__init__`` stores through
    ``object.__setattr__``: a call per field. The twin is a slot-less subclass with the plain
    ``__setattr__``, so the decoder's stores compile to direct slot writes; assigning
    ``__class__`` afterwards (allowed: the twin adds nothing to the layout) yields exactly the
    object ``__init__`` would have built. (The twin is visible in ``cls.__subclasses__()``.)

    Only for classes whose ``__init__`` does nothing but store its positional arguments:
    generated by attrs, no validators, converters, pre/post-init hooks, keyword-only or
    non-init fields, custom ``__new__``, ``__init_subclass__``, ``__setattr__`` (on a class
    that is not frozen) or metaclass, and no slots beyond the fields (such as a cached hash).
    """
    init = cls.__dict__.get("__init__")
    if init is None or not getattr(init, "__code__", None):
        return None
    if not init.__code__.co_filename.startswith("<attrs generated"):
        return None
    new: object = cls.__new__
    if type(cls) is not type or new is not object.__new__:
        return None
    if any("__init_subclass__" in k.__dict__ for k in cls.__mro__[:-1]):
        return None  # subclassing would run user code
    # Frozen classes store through object.__setattr__ (``_setattr``) as the twin does; others
    # through their own __setattr__, which the twin would bypass unless it is the plain one.
    setattr_: object = cls.__setattr__
    if "_setattr" not in init.__code__.co_varnames and setattr_ is not object.__setattr__:
        return None
    if hasattr(cls, "__attrs_pre_init__") or hasattr(cls, "__attrs_post_init__"):
        return None
    for f in attrs.fields(cls):
        if f.validator is not None or f.converter is not None or f.kw_only or not f.init:
            return None
    slots: set[str] = set()
    for klass in cls.__mro__:
        if "__dict__" in klass.__dict__ and klass is not object:
            return None  # not slotted: instances have a __dict__
        declared = klass.__dict__.get("__slots__", ())
        slots.update((declared,) if isinstance(declared, str) else declared)
    if slots - {"__weakref__"} != set(names):
        return None
    for name in names:
        descriptor = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
        if type(descriptor) is not types.MemberDescriptorType:
            return None
    # Both __setattr__ and __delattr__ live in one type slot: override both or neither is plain.
    # object's __init__ makes ``twin()`` the cheapest way to allocate one (half object.__new__).
    body = {
        "__slots__": (),
        "__init__": object.__init__,
        "__setattr__": object.__setattr__,
        "__delattr__": object.__delattr__,
        "__module__": cls.__module__,
        "__doc__": f"shir.core.codec's writable twin of {cls.__qualname__}; never escapes.",
    }
    return type(f"_Decoding{cls.__name__}", (cls,), body)


_PRIMITIVES: tuple[type, ...] = (str, int, float, bool, bytes)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1 and len(typing.get_args(tp)) == 2:
            return options[0], True
        raise TypeError(f"unsupported union type {tp!r}: only 'X | None' is allowed")
    return tp, False


def _enc_expr(tp: Any, expr: str, env: dict[str, Any], key: str) -> str:
    inner, optional = _split_optional(tp)
    body = _enc_plain(inner, expr, env, key)
    if optional and body != expr:
        return f"(None if {expr} is None else {body})"
    return body


def _enc_plain(tp: Any, expr: str, env: dict[str, Any], key: str) -> str:
    if tp in _PRIMITIVES:
        return expr
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"{expr}.value"
    if isinstance(tp, type) and tp in _values:
        env[f"_venc{key}"] = _values[tp][0]
        return f"_venc{key}({expr})"
    if typing.get_origin(tp) is tuple:
        targs = typing.get_args(tp)
        if len(targs) == 2 and targs[1] is Ellipsis:
            item = _enc_expr(targs[0], "x", env, key + "_")
            return expr if item == "x" else f"[{item} for x in {expr}]"
    raise TypeError(f"unsupported field type {tp!r}; see shir.core.codec for the supported ones")


def _dec_stmts(tp: Any, var: str, env: dict[str, Any], label: str, key: str) -> list[str]:
    """Statements that check ``var`` and rebind it to the decoded Python value."""
    inner, optional = _split_optional(tp)
    stmts = _dec_plain(inner, var, env, label, key)
    if optional:
        return [f"if {var} is not None:", *("    " + s for s in stmts)]
    return stmts


def _dec_plain(tp: Any, var: str, env: dict[str, Any], label: str, key: str) -> list[str]:
    bad = f"_fail({label + ': unexpected '!r} + type({var}).__name__)"
    if tp is float:  # msgpack may hand back an int for a whole float written elsewhere
        return [
            f"if type({var}) is not float:",
            f"    if type({var}) is int: {var} = float({var})",
            f"    else: {bad}",
        ]
    if tp in _PRIMITIVES:
        env[f"_t{key}"] = tp
        return [f"if type({var}) is not _t{key}: {bad}"]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        env[f"_em{key}"] = tp._value2member_map_
        env[f"_e{key}"] = _enum_decoder(tp, label)
        # The value map is what Enum(value) looks in first; anything else takes the full call.
        return [
            "try:",
            f"    {var} = _em{key}[{var}]",
            "except Exception:",
            f"    {var} = _e{key}({var})",
        ]
    if isinstance(tp, type) and tp in _values:
        return _dec_object(tp, var, var, env, tp.__name__, key)
    if typing.get_origin(tp) is tuple:
        targs = typing.get_args(tp)
        if len(targs) == 2 and targs[1] is Ellipsis:
            item = f"x{key}"
            item_stmts = _dec_stmts(targs[0], item, env, label + "[]", key + "_")
            lines = [f"if type({var}) is not tuple: {bad}"]
            inner, _ = _split_optional(targs[0])
            if inner in _PRIMITIVES and inner is not float:
                # Items are only checked, never converted: keep msgpack's tuple as it is.
                lines += [f"for {item} in {var}:", *("    " + s for s in item_stmts)]
            elif item_stmts:
                acc = f"a{key}"
                lines += [
                    f"{acc} = []",
                    f"for {item} in {var}:",
                    *("    " + s for s in item_stmts),
                    f"    {acc}.append({item})",
                    f"{var} = tuple({acc})",
                ]
            return lines
    raise TypeError(f"unsupported field type {tp!r}; see shir.core.codec for the supported ones")


def _enum_decoder(tp: type[enum.Enum], label: str) -> Callable[[Any], Any]:
    def dec(v: Any) -> Any:
        try:
            return tp(v)
        except (ValueError, TypeError):
            _fail(f"{label}: not a valid {tp.__name__}: " + repr(v)[:40])

    return dec


def value(cls: type[T]) -> type[T]:
    """Register a frozen attrs class so it can appear as a field inside events."""
    if cls in _values:
        return cls
    label = cls.__name__
    _values[cls] = _compile(cls, label)
    return cls


def event(
    tag: str, version: int = 1, upcasters: Mapping[int, Upcaster] | None = None
) -> Callable[[type[T]], type[T]]:
    """Register an event class under a stable ``tag`` and schema ``version``.

    ``upcasters[n]`` turns the field list of version ``n`` into that of version ``n + 1``;
    every version from 1 up to ``version - 1`` needs one.
    """
    if version < 1:
        raise ValueError(f"event {tag!r}: version must be >= 1, got {version}")
    ups = dict(upcasters or {})
    missing = [v for v in range(1, version) if v not in ups]
    if missing:
        raise ValueError(f"event {tag!r} v{version}: no upcaster from version(s) {missing}")

    def register(cls: type[T]) -> type[T]:
        if tag in _by_tag and _by_tag[tag].cls is not cls:
            raise ValueError(f"event tag {tag!r} already registered by {_by_tag[tag].cls!r}")
        enc, dec = _compile(cls, tag)
        spec = EventSpec(
            tag=tag,
            version=version,
            cls=cls,
            field_names=tuple(f.name for f in attrs.fields(typing.cast(Any, cls))),
            upcasters=ups,
            encode_fields=enc,
            decode_fields=dec,
        )
        _by_tag[tag] = spec
        _by_cls[cls] = spec
        return cls

    return register


def spec_for(cls: type) -> EventSpec:
    """The registration of an event class; ``UnknownEventType`` when it has none."""
    try:
        return _by_cls[cls]
    except KeyError:
        raise UnknownEventType(
            f"{cls.__qualname__} is not a registered event; decorate it with @event(tag)"
        ) from None


def registered_events() -> tuple[EventSpec, ...]:
    """Every registered event type, in registration order."""
    return tuple(_by_tag.values())


def registered_values() -> tuple[type, ...]:
    """Every registered value type (what may appear as a field inside events), in order."""
    return tuple(_values)


_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack


def encode(evt: object) -> bytes:
    """Encode one event as a self-describing msgpack record."""
    spec = _by_cls.get(type(evt))
    if spec is None:
        spec_for(type(evt))  # raises the explanatory error
    assert spec is not None
    return _packb([spec.tag, spec.version, spec.encode_fields(evt)])


def encode_all(events: Iterable[object]) -> bytes:
    """``b"".join(map(encode, events))``, in one buffer: for hashing a whole log."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    pack, specs = packer.pack, _by_cls
    for evt in events:
        spec = specs.get(type(evt))
        if spec is None:
            spec_for(type(evt))  # raises the explanatory error
        assert spec is not None
        pack([spec.tag, spec.version, spec.encode_fields(evt)])
    data: bytes = packer.bytes()
    return data


def encode_value(obj: object) -> bytes:
    """Encode a registered value object (no tag: the reader must know its type)."""
    try:
        enc = _values[type(obj)][0]
    except KeyError:
        raise CodecError(f"{type(obj).__qualname__} is not a registered value type") from None
    return _packb(enc(obj))


_unpack_errors = (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                  msgpack.StackError, RecursionError, OverflowError, MemoryError)


_unpackb = msgpack.unpackb


def _unpack(data: bytes) -> Any:
    try:
        return _unpackb(data, use_list=False, raw=False, strict_map_key=True)
    except _unpack_errors as exc:
        raise CorruptRecord(f"not a msgpack record ({type(exc).__name__})") from None


def decode(data: bytes) -> Any:
    """Decode one record written by :func:`encode` (or by an older schema, upcast)."""
    try:  # _unpack inlined: one Python call less per record on the replay path
        rec = _unpackb(data, use_list=False, raw=False, strict_map_key=True)
    except _unpack_errors as exc:
        raise CorruptRecord(f"not a msgpack record ({type(exc).__name__})") from None
    if type(rec) is not tuple or len(rec) != 3:
        raise CorruptRecord("a record is [tag, version, fields]")
    tag, version, fields = rec
    spec = _by_tag.get(tag) if type(tag) is str else None
    if spec is None:
        if type(tag) is not str:
            raise CorruptRecord(f"record tag must be a string, got {type(tag).__name__}")
        raise UnknownEventType(
            f"unknown event type {tag[:60]!r}: written by a newer shir or another program"
        )
    if version != spec.version:
        fields = _upcast(spec, version, fields)
    try:
        return spec.decode_fields(fields)
    except CodecError:
        raise
    except Exception as exc:  # a class validator refused the values
        raise CorruptRecord(f"{tag}: invalid field values ({type(exc).__name__})") from None


def decode_value(cls: type[T], data: bytes) -> T:
    """Decode a value object written by :func:`encode_value`."""
    try:
        dec = _values[cls][1]
    except KeyError:
        raise CodecError(f"{cls.__qualname__} is not a registered value type") from None
    try:
        return dec(_unpack(data))  # type: ignore[no-any-return]
    except CodecError:
        raise
    except Exception as exc:
        why = type(exc).__name__
        raise CorruptRecord(f"{cls.__name__}: invalid field values ({why})") from None


def _upcast(spec: EventSpec, version: Any, fields: Any) -> Any:
    if type(version) is not int or version < 1:
        raise CorruptRecord(f"{spec.tag}: bad schema version {version!r}")
    if version > spec.version:
        raise UnsupportedEventVersion(
            f"{spec.tag} v{version} is newer than this shir understands (v{spec.version}); "
            "upgrade shir to read it"
        )
    if type(fields) is not tuple:
        raise CorruptRecord(f"{spec.tag}: fields must be an array")
    out: list[Any] = list(fields)
    for v in range(version, spec.version):
        try:
            out = spec.upcasters[v](out)
        except Exception as exc:
            raise CorruptRecord(
                f"{spec.tag}: upcasting from v{v} failed ({type(exc).__name__})"
            ) from None
    return tuple(out)

