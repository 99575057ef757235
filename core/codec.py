"""Versioned msgpack codec for events (and the value objects inside them).

Theory of operation
-------------------
Every event class is registered under a *stable tag* (``"node_registered"``), never its Python
name, with a schema version. A record on disk is the msgpack array ``[tag, version, fields]``
where ``fields`` is the positional list of the class's attrs fields. Positional fields keep the
records small and decoding cheap: decoding is one ``msgpack.unpackb`` plus one generated
function per type that checks each field's type and calls the class.

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
from collections.abc import Callable, Mapping, Sequence
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
    "encode_value",
    "event",
    "registered_events",
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

    Generated source (like attrs itself does) keeps the hot path free of per-field dispatch.
    """
    if not attrs.has(cls):
        raise TypeError(f"{cls.__qualname__} must be an attrs class to be registered")
    hints = typing.get_type_hints(cls)
    fields = attrs.fields(cls)
    names = [f.name for f in fields]
    env: dict[str, Any] = {"_cls": cls, "_fail": _fail}
    enc_parts: list[str] = []
    dec_lines: list[str] = []
    args: list[str] = []
    for i, name in enumerate(names):
        tp = hints[name]
        var = f"v{i}"
        enc_parts.append(_enc_expr(tp, f"o.{name}", env, f"{i}"))
        dec_lines.extend(_dec_stmts(tp, var, env, f"{label}.{name}", f"{i}"))
        args.append(var)
    unpack = ", ".join(args) + ("," if len(args) == 1 else "")
    enc_src = f"def enc(o):\n    return [{', '.join(enc_parts)}]\n"
    dec_src = "def dec(f):\n"
    if names:
        dec_src += (
            f"    if type(f) is not tuple or len(f) != {len(names)}:\n"
            f"        _fail('{label}: expected {len(names)} fields, got ' + "
            "(str(len(f)) if type(f) is tuple else type(f).__name__))\n"
            f"    {unpack} = f\n"
        )
    else:
        dec_src += (
            "    if type(f) is not tuple or f:\n"
            f"        _fail('{label}: expected no fields')\n"
        )
    dec_src += "".join(f"    {line}\n" for line in dec_lines)
    dec_src += f"    return _cls({', '.join(args)})\n"
    exec(compile(enc_src + dec_src, f"<shir.codec {label}>", "exec"), env)
    return env["enc"], env["dec"]


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
    bad = f"_fail('{label}: unexpected ' + type({var}).__name__)"
    if tp is float:  # msgpack may hand back an int for a whole float written elsewhere
        return [
            f"if type({var}) is int: {var} = float({var})",
            f"elif type({var}) is not float: {bad}",
        ]
    if tp in _PRIMITIVES:
        env[f"_t{key}"] = tp
        return [f"if type({var}) is not _t{key}: {bad}"]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        env[f"_e{key}"] = tp
        return [
            "try:",
            f"    {var} = _e{key}({var})",
            "except (ValueError, TypeError):",
            f"    _fail('{label}: not a valid {tp.__name__}: ' + repr({var})[:40])",
        ]
    if isinstance(tp, type) and tp in _values:
        env[f"_vdec{key}"] = _values[tp][1]
        return [f"{var} = _vdec{key}({var})"]
    if typing.get_origin(tp) is tuple:
        targs = typing.get_args(tp)
        if len(targs) == 2 and targs[1] is Ellipsis:
            item_stmts = _dec_stmts(targs[0], "x", env, label + "[]", key + "_")
            lines = [f"if type({var}) is not tuple: {bad}"]
            if item_stmts:
                helper = f"_item{key}"
                src = f"def {helper}(x):\n" + "".join(f"    {s}\n" for s in item_stmts)
                src += "    return x\n"
                exec(compile(src, f"<shir.codec {label}>", "exec"), env)
                lines.append(f"{var} = tuple([{helper}(x) for x in {var}])")
            return lines
    raise TypeError(f"unsupported field type {tp!r}; see shir.core.codec for the supported ones")


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


_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack


def encode(evt: object) -> bytes:
    """Encode one event as a self-describing msgpack record."""
    spec = _by_cls.get(type(evt))
    if spec is None:
        spec_for(type(evt))  # raises the explanatory error
    assert spec is not None
    return _packb([spec.tag, spec.version, spec.encode_fields(evt)])


def encode_value(obj: object) -> bytes:
    """Encode a registered value object (no tag: the reader must know its type)."""
    try:
        enc = _values[type(obj)][0]
    except KeyError:
        raise CodecError(f"{type(obj).__qualname__} is not a registered value type") from None
    return _packb(enc(obj))


_unpack_errors = (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                  msgpack.StackError, RecursionError, OverflowError, MemoryError)


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
    except _unpack_errors as exc:
        raise CorruptRecord(f"not a msgpack record ({type(exc).__name__})") from None


def decode(data: bytes) -> Any:
    """Decode one record written by :func:`encode` (or by an older schema, upcast)."""
    rec = _unpack(data)
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

