"""msgpack codec: envelope, ext registry, field validation, size cap, zero-copy tensors.

A frame is::

    u32 little-endian H | header: H bytes of msgpack | for each tensor: zero padding to a multiple
                                                        of ALIGN, then its raw little-endian bytes

The header is the msgpack map ``{"v": PROTOCOL_VERSION, "t": <type tag>, "b": {<fields>}}``. A
tensor field is msgpack ext type ``TENSOR_EXT`` whose payload is only its descriptor
``[dtype, shape]``; its bytes follow the header, in the order the tensors appear in it. So
encoding copies each tensor once, into the frame, and decoding copies nothing: a decoded tensor is
a read-only numpy view of the received frame (keep the frame unchanged while it is in use).
Decoding checks everything a peer could get wrong (size, framing, version, type,
missing/unknown fields, field types, tensor dtype, shape and length, trailing bytes) and raises
``RemoteProtocolError`` with a one-line reason; encoding our own bad message raises
``LocalProtocolError``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from meshllm.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from meshllm.wire.limits import MAX_MESSAGE_BYTES
from meshllm.wire.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message
from meshllm.wire.tensor import DTYPES, Tensor, dtype_name, nbytes_of, shape_problem

DEFAULT_MAX_MESSAGE_BYTES = MAX_MESSAGE_BYTES  # the name earlier code imported
TENSOR_EXT = 1
ALIGN = 64  # tensor buffers start at multiples of this (from the frame start): aligned views
_PREFIX = 4  # the u32 header length
_ZEROS = bytes(ALIGN)


@dataclass(frozen=True, slots=True)
class ExtType:
    code: int
    cls: type
    pack: Callable[[Any], bytes]
    unpack: Callable[[bytes], Any]


class ExtRegistry:
    """msgpack ext codes, each registered once: a second registration of a code or a class is an error
    (two meanings for one code would silently corrupt frames)."""

    def __init__(self) -> None:
        self._by_code: dict[int, ExtType] = {}
        self._by_cls: dict[type, ExtType] = {}

    def register(self, code: int, cls: type, pack: Callable[[Any], bytes],
                 unpack: Callable[[bytes], Any]) -> None:
        if not 0 <= code <= 127:
            raise LocalProtocolError(f"msgpack ext code {code} outside 0..127")
        if code in self._by_code:
            raise LocalProtocolError(f"msgpack ext code {code} already registered "
                                     f"for {self._by_code[code].cls.__name__}")
        if cls in self._by_cls:
            raise LocalProtocolError(f"{cls.__name__} already has msgpack ext code {self._by_cls[cls].code}")
        ext = ExtType(code, cls, pack, unpack)
        self._by_code[code] = ext
        self._by_cls[cls] = ext

    def default(self, obj: Any) -> msgpack.ExtType:
        ext = self._by_cls.get(type(obj))
        if ext is None:
            raise LocalProtocolError(f"cannot encode a {type(obj).__name__} on the wire")
        return msgpack.ExtType(ext.code, ext.pack(obj))

    def ext_hook(self, code: int, payload: bytes) -> Any:
        ext = self._by_code.get(code)
        if ext is None:
            raise RemoteProtocolError(f"unknown msgpack ext code {code}")
        return ext.unpack(payload)


def _pack_descriptor(t: Tensor) -> bytes:
    return msgpack.packb([t.dtype, t.shape], use_bin_type=True)


@dataclass(frozen=True, slots=True)
class _Descriptor:
    dtype: np.dtype
    shape: tuple[int, ...]
    count: int  # elements
    nbytes: int


# Descriptors repeat from frame to frame (the same hidden and KV shapes), so their parsing and
# checks are remembered, in both directions. Bounded: a peer sending ever new shapes only costs
# a re-parse once the table is full and emptied.
_CACHE_MAX = 1024
_DECODED: dict[bytes, _Descriptor] = {}
_ENCODED: dict[tuple[int, tuple[int, ...]], msgpack.ExtType] = {}


def _unpack_descriptor(payload: bytes) -> _Descriptor:
    d = _DECODED.get(payload)
    if d is not None:
        return d
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise RemoteProtocolError(f"malformed tensor descriptor: {type(e).__name__}") from None
    if not isinstance(raw, list) or len(raw) != 2:
        raise RemoteProtocolError("tensor descriptor must be [dtype, shape]")
    dtype, shape = raw
    problem = shape_problem(dtype, shape)
    if problem:
        raise RemoteProtocolError(problem)
    nbytes = nbytes_of(dtype, shape)
    d = _Descriptor(DTYPES[dtype], tuple(shape), nbytes // DTYPES[dtype].itemsize, nbytes)
    if len(_DECODED) >= _CACHE_MAX:
        _DECODED.clear()
    _DECODED[payload] = d
    return d


def _descriptor_ext(a: np.ndarray) -> msgpack.ExtType:
    key = (a.dtype.num, a.shape)
    ext = _ENCODED.get(key)
    if ext is None:
        ext = msgpack.ExtType(TENSOR_EXT, msgpack.packb([dtype_name(a.dtype), a.shape], use_bin_type=True))
        if len(_ENCODED) >= _CACHE_MAX:
            _ENCODED.clear()
        _ENCODED[key] = ext
    return ext


def _no_frame(payload: bytes) -> Any:
    raise RemoteProtocolError("a tensor outside a frame")  # pragma: no cover - the codec intercepts


EXT = ExtRegistry()
EXT.register(TENSOR_EXT, Tensor, _pack_descriptor, _no_frame)


# --- field validation ----------------------------------------------------------------------------

_NATIVE = (str, bytes, bool, int, float, type(None))


def _check_opaque(value: Any, path: str, depth: int = 0) -> None:
    """Opaque maps (plans, profiles) may hold only msgpack-native values, no tensors/exts."""
    if depth > 32:
        raise RemoteProtocolError(f"{path}: nested too deeply")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RemoteProtocolError(f"{path}: map keys must be strings")
            _check_opaque(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_opaque(v, f"{path}[{i}]", depth + 1)
    elif not isinstance(value, _NATIVE):
        raise RemoteProtocolError(f"{path}: a {type(value).__name__} is not allowed here")


Convert = Callable[[Any, str], Any]  # (value as msgpack decoded it, field path) -> field value


def _simple_types(tp: Any) -> tuple[type, ...] | None:
    """The exact Python types msgpack decodes a scalar annotation to (None: not a scalar)."""
    if tp is type(None):
        return (type(None),)
    if tp is bool:
        return (bool,)
    if tp is int or getattr(tp, "__supertype__", None) is int:
        return (int,)  # exact type: a bool is not an int here
    if tp is str or getattr(tp, "__supertype__", None) is str:
        return (str,)
    if tp is float:
        return (float, int)
    if tp is bytes:
        return (bytes,)
    if tp is Tensor:
        return (Tensor,)
    return None


def _name(tp: Any) -> str:
    return str(getattr(tp, "__name__", tp))


def _compile(tp: Any) -> Convert:
    """A checker for annotation ``tp``, built once per field: decoding is on the hot path, so the
    annotation is not re-read for every value. Lists become tuples, ints become floats where a
    float is declared; anything else that does not match raises ``RemoteProtocolError``."""
    origin = typing.get_origin(tp)
    if tp is Any or origin is dict:
        want_map = origin is dict

        def opaque(value: Any, path: str) -> Any:
            if want_map and not isinstance(value, dict):
                raise RemoteProtocolError(f"{path}: expected dict, got {type(value).__name__}")
            _check_opaque(value, path)
            return value

        return opaque
    simple = _simple_types(tp)
    if simple is not None:
        name, to_float = _name(tp), tp is float

        def scalar(value: Any, path: str) -> Any:
            if type(value) not in simple:
                raise RemoteProtocolError(f"{path}: expected {name}, got {type(value).__name__}")
            return float(value) if to_float else value

        return scalar
    if origin in (typing.Union, types.UnionType):
        alts = typing.get_args(tp)
        parts = [_simple_types(a) for a in alts]
        if all(p is not None for p in parts) and float not in alts:
            allowed = frozenset(t for p in parts if p is not None for t in p)

            def simple_union(value: Any, path: str) -> Any:
                if type(value) not in allowed:
                    raise RemoteProtocolError(f"{path}: {type(value).__name__} does not match {tp}")
                return value

            return simple_union
        convs = [_compile(a) for a in alts]

        def union(value: Any, path: str) -> Any:
            for conv in convs:
                try:
                    return conv(value, path)
                except RemoteProtocolError:
                    continue
            raise RemoteProtocolError(f"{path}: {type(value).__name__} does not match {tp}")

        return union
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:  # pragma: no cover - a bad message class
            raise LocalProtocolError(f"unsupported field type {tp}")
        inner, inner_simple = _compile(args[0]), _simple_types(args[0])
        name = _name(tp)

        def seq(value: Any, path: str) -> Any:
            if type(value) not in (list, tuple):
                raise RemoteProtocolError(f"{path}: expected {name}, got {type(value).__name__}")
            if inner_simple is not None and args[0] is not float:
                # Fast path for the long id/position lists of the data plane: one pass of type checks.
                for v in value:
                    if type(v) not in inner_simple:
                        break
                else:
                    return tuple(value)
            return tuple(inner(v, f"{path}[{i}]") for i, v in enumerate(value))

        return seq
    raise LocalProtocolError(f"unsupported field type {tp}")  # pragma: no cover - a bad message class


def _exact_types(tp: Any) -> frozenset[type] | None:
    """The types a field takes as they are, when checking them is all there is to do."""
    alts = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if float in alts:
        return None  # ints become floats: the compiled checker does that
    parts = [_simple_types(a) for a in alts]
    if any(p is None for p in parts):
        return None
    return frozenset(t for p in parts if p is not None for t in p)


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` (as msgpack decoded it) against the annotation ``tp`` (uncompiled: tests)."""
    return _compile(tp)(value, path)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    tp: Any
    required: bool
    convert: Convert
    path: str
    exact: frozenset[type] | None  # a scalar (or union of scalars) checked inline: the types it takes


@dataclass(frozen=True, slots=True)
class _Spec:
    fields: tuple[_Field, ...]
    names: frozenset[str]
    tensors: tuple[str, ...]  # fields annotated ``Tensor`` or ``Tensor | None``, in field order
    nested_tensors: bool  # a Tensor may sit elsewhere (``Tensor | None``, ``tuple[Tensor, ...]``)


def _plain_tensor(tp: Any) -> bool:
    """``Tensor`` or ``Tensor | None``: the fields whose tensors the fast encode path handles."""
    if tp is Tensor:
        return True
    return (typing.get_origin(tp) in (typing.Union, types.UnionType)
            and set(typing.get_args(tp)) == {Tensor, type(None)})


def _mentions_tensor(tp: Any) -> bool:
    return tp is Tensor or any(_mentions_tensor(a) for a in typing.get_args(tp))


def _field_specs(cls: type) -> _Spec:
    hints = typing.get_type_hints(cls)
    fields = tuple(
        _Field(f.name, hints[f.name],
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
               _compile(hints[f.name]), f"{getattr(cls, 'TYPE', cls.__name__)}.{f.name}",
               _exact_types(hints[f.name]))
        for f in dataclasses.fields(cls)
    )
    tensors = tuple(f.name for f in fields if _plain_tensor(f.tp))
    nested = any(_mentions_tensor(f.tp) for f in fields if not _plain_tensor(f.tp))
    return _Spec(fields, frozenset(f.name for f in fields), tensors, nested)


_SPECS: dict[type, _Spec] = {cls: _field_specs(cls) for cls in MESSAGE_TYPES.values()}


# --- the codec -------------------------------------------------------------------------------------


class Codec:
    """Encodes and decodes whole frames; one instance per link is fine (it holds no stream state)."""

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 ext: ExtRegistry = EXT) -> None:
        self.max_message_bytes = max_message_bytes
        self._ext = ext
        # Reused for every header whose tensors sit in plain ``Tensor`` fields: it then calls no
        # Python code while packing, so it cannot be re-entered (safe across threads too).
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode(self, msg: Message) -> bytes:
        """One frame: the header, then each tensor's bytes (copied once, into the frame)."""
        spec = _SPECS.get(type(msg))
        if spec is None:
            raise LocalProtocolError(f"{type(msg).__name__} is not a wire message")
        arrays: list[np.ndarray] = []
        body = {f.name: getattr(msg, f.name) for f in spec.fields}
        try:
            if spec.nested_tensors:
                header = self._pack_nested(msg.TYPE, body, arrays)
            else:
                for name in spec.tensors:  # field order = the order the decoder meets them
                    t = body[name]
                    if type(t) is Tensor:
                        a = t.array()
                        arrays.append(a)
                        body[name] = _descriptor_ext(a)
                header = self._packer.pack({"v": PROTOCOL_VERSION, "t": msg.TYPE, "b": body})
        except ProtocolError:
            raise
        except (TypeError, ValueError, OverflowError) as e:
            raise LocalProtocolError(f"cannot encode {msg.TYPE}: {e}") from None
        parts: list[Any] = [len(header).to_bytes(_PREFIX, "little"), header]
        size = _PREFIX + len(header)
        for a in arrays:
            pad = -size % ALIGN
            if pad:
                parts.append(_ZEROS[:pad])
            parts.append(a)  # C-contiguous: joined straight from the array's memory
            size += pad + a.nbytes
        if size > self.max_message_bytes:
            raise LocalProtocolError(f"{msg.TYPE} is {size} bytes, over the "
                                     f"{self.max_message_bytes}-byte cap; send it in chunks")
        return b"".join(parts)

    def _pack_nested(self, tag: str, body: dict[str, Any], arrays: list[np.ndarray]) -> bytes:
        ext_default = self._ext.default

        def default(obj: Any) -> Any:
            if type(obj) is Tensor:
                a = obj.array()
                arrays.append(a)
                return _descriptor_ext(a)
            return ext_default(obj)

        return msgpack.packb({"v": PROTOCOL_VERSION, "t": tag, "b": body}, use_bin_type=True, default=default)

    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        """Decode one frame. Tensors in the message are read-only views of ``data``."""
        if type(data) is not bytes and not isinstance(data, bytearray | memoryview):
            raise RemoteProtocolError("a frame must be binary")
        frame = memoryview(data)
        if frame.ndim != 1 or frame.itemsize != 1:
            try:
                frame = frame.cast("B")
            except TypeError:
                raise RemoteProtocolError("a frame must be a contiguous byte buffer") from None
        n = frame.nbytes
        if n > self.max_message_bytes:
            raise RemoteProtocolError(f"frame of {n} bytes is over the "
                                      f"{self.max_message_bytes}-byte cap")
        if n < _PREFIX:
            raise RemoteProtocolError(f"malformed frame: {n} bytes, shorter than its header length")
        hlen = int.from_bytes(frame[:_PREFIX], "little")
        if hlen > n - _PREFIX:
            raise RemoteProtocolError(f"malformed frame: a header of {hlen} bytes in a frame of {n}")
        end = _PREFIX + hlen  # where the next tensor's bytes may start (before its padding)
        ext_hook = self._ext.ext_hook
        writable = not frame.readonly  # a bytearray: make the views read-only ourselves

        def hook(code: int, payload: bytes) -> Any:
            nonlocal end
            if code != TENSOR_EXT:
                return ext_hook(code, payload)
            d = _unpack_descriptor(payload)
            start = end + (-end % ALIGN)
            stop = start + d.nbytes
            if stop > n:
                raise RemoteProtocolError(f"truncated frame: a {d.dtype.name} tensor of shape "
                                          f"{list(d.shape)} needs bytes up to {stop}, the frame has {n}")
            end = stop
            a = np.ndarray(d.shape, d.dtype, frame, start)  # a view: no copy
            if writable:
                a.flags.writeable = False
            return Tensor._wrap(a)

        try:
            msg = msgpack.unpackb(frame[_PREFIX:_PREFIX + hlen], raw=False, strict_map_key=True,
                                  use_list=True, ext_hook=hook)
        except ProtocolError:
            raise
        except Exception as e:  # msgpack raises ExtraData, FormatError, StackError, ValueError, ...
            raise RemoteProtocolError(f"malformed frame: {type(e).__name__}") from None
        if end != n:
            raise RemoteProtocolError(f"malformed frame: {n - end} bytes after the last tensor")
        return self._message(msg)

    def _message(self, frame: Any) -> Message:
        if type(frame) is not dict or "v" not in frame or "t" not in frame or "b" not in frame:
            raise RemoteProtocolError("malformed frame: not a map with v, t and b")
        version, tag, body = frame["v"], frame["t"], frame["b"]
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"protocol version {version!r} not supported "
                                      f"(this node speaks {PROTOCOL_VERSION})")
        cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise RemoteProtocolError(f"unknown message type {tag!r}")
        if not isinstance(body, dict):
            raise RemoteProtocolError(f"{tag}: body must be a map")
        spec = _SPECS[cls]
        if not spec.names.issuperset(body):
            unknown = set(body) - spec.names
            raise RemoteProtocolError(f"{tag}: unknown fields {sorted(map(str, unknown))}")
        kwargs = {}
        for f in spec.fields:
            if f.name in body:
                value = body[f.name]
                # Scalars are checked inline (a decode is on the hot path); the rest, and every
                # failure (for its message), go through the compiled checker.
                kwargs[f.name] = (value if f.exact is not None and type(value) in f.exact
                                  else f.convert(value, f.path))
            elif f.required:
                raise RemoteProtocolError(f"{tag}: missing field {f.name!r}")
        return cls(**kwargs)


_DEFAULT = Codec()


def encode(msg: Message) -> bytes:
    """Encode with the default cap (``MAX_MESSAGE_BYTES``)."""
    return _DEFAULT.encode(msg)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode with the default cap (``MAX_MESSAGE_BYTES``)."""
    return _DEFAULT.decode(data)
