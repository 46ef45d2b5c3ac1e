"""Tensors on the wire: a dtype from a fixed list, a shape, and exactly ``prod(shape) * itemsize``
raw little-endian bytes.

Never pickle, never object arrays. A ``Tensor`` holds a read-only numpy array: built by
``from_array`` it is a view of the caller's array (no copy when that is C-contiguous and
little-endian); decoded by the codec it is a view of the received frame (no copy at all).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from meshllm.errors import LocalProtocolError

# Name -> little-endian numpy dtype. Everything the runtime exchanges (hidden states, KV, ids).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
}
MAX_NDIM = 8
# numpy's ``dtype.name`` formats a string on every call (~2 us): the hot path looks names up by the
# dtype's type number instead (int64 has two numbers on some platforms; both map here).
_NAME_BY_NUM: dict[int, str] = {np.dtype(c).num: name for name, dt in DTYPES.items()
                                for c in {dt.char, dt.newbyteorder("=").char}}
for _c, _name in (("q", "int64"), ("l", "int64"), ("i", "int32")):
    if np.dtype(_c).itemsize == DTYPES[_name].itemsize:
        _NAME_BY_NUM.setdefault(np.dtype(_c).num, _name)


def dtype_name(dt: np.dtype) -> str:
    """The wire name of an allowed (native little-endian) dtype."""
    name = _NAME_BY_NUM.get(dt.num)
    return name if name is not None and dt.isnative else dt.name


def shape_problem(dtype: object, shape: object) -> str | None:
    """Why ``(dtype, shape)`` cannot describe a wire tensor, or None."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"tensor dtype {dtype!r} is not one of {sorted(DTYPES)}"
    if not isinstance(shape, tuple | list) or len(shape) > MAX_NDIM:
        return f"tensor shape must be a list of at most {MAX_NDIM} ints"
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"tensor shape {list(shape)!r} must hold non-negative ints"
    return None


def nbytes_of(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a checked ``(dtype, shape)`` occupies."""
    return math.prod(shape) * DTYPES[dtype].itemsize


def tensor_problem(dtype: object, shape: object, data: object) -> str | None:
    """Why ``(dtype, shape, data)`` is not a valid wire tensor, or None if it is."""
    problem = shape_problem(dtype, shape)
    if problem:
        return problem
    if not isinstance(data, bytes | bytearray | memoryview):
        return "tensor data must be bytes"
    assert isinstance(dtype, str) and isinstance(shape, tuple | list)
    want, got = nbytes_of(dtype, shape), memoryview(data).nbytes
    if want != got:
        return f"tensor of dtype {dtype} and shape {list(shape)} needs {want} bytes, got {got}"
    return None


def _readonly(a: np.ndarray) -> np.ndarray:
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


class Tensor:
    """An n-d array as it travels: a read-only, C-contiguous, little-endian numpy array of an
    allowed dtype. Equal when dtype, shape and bytes are equal."""

    __slots__ = ("_a",)
    _a: np.ndarray

    def __init__(self, dtype: str, shape: tuple[int, ...] | list[int], data: Any) -> None:
        """From raw bytes (``bytes``, ``bytearray`` or ``memoryview``, viewed, not copied)."""
        problem = tensor_problem(dtype, shape, data)
        if problem:
            raise LocalProtocolError(problem)
        a = np.frombuffer(data, dtype=DTYPES[dtype]).reshape(tuple(shape))
        object.__setattr__(self, "_a", _readonly(a))

    @classmethod
    def _trusted(cls, a: np.ndarray) -> Tensor:
        """Wrap an array already known to be valid."""
        return cls._wrap(_readonly(a))

    @classmethod
    def _wrap(cls, a: np.ndarray) -> Tensor:
        """Wrap a valid, already read-only array (the codec's decoded views: the hot path)."""
        t = object.__new__(cls)
        object.__setattr__(t, "_a", a)
        return t

    @classmethod
    def from_array(cls, a: np.ndarray) -> Tensor:
        """Wrap ``a``: a view, no copy, when ``a`` is C-contiguous and little-endian (otherwise one
        copy into that layout). The tensor shares ``a``'s memory, so do not write to ``a`` while
        the tensor (or a frame being built from it) is in use."""
        name = a.dtype.name
        if a.dtype.kind not in "fiu" or name not in DTYPES:
            raise LocalProtocolError(f"cannot send an array of dtype {a.dtype}; allowed: {sorted(DTYPES)}")
        if a.ndim > MAX_NDIM:
            raise LocalProtocolError(f"cannot send an array of {a.ndim} dimensions (at most {MAX_NDIM})")
        return cls._trusted(np.ascontiguousarray(a, dtype=DTYPES[name]))

    def array(self) -> np.ndarray:
        """The tensor as a read-only numpy array (a view: ``.copy()`` it to write)."""
        return self._a

    to_array = array  # the name earlier code used

    @property
    def dtype(self) -> str:
        return dtype_name(self._a.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self._a.shape)

    @property
    def nbytes(self) -> int:
        return int(self._a.nbytes)

    @property
    def data(self) -> memoryview:
        """The raw little-endian bytes, as a flat read-only view."""
        return self._a.reshape(-1).view(np.uint8).data

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Tensor is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (self._a.dtype == other._a.dtype and self._a.shape == other._a.shape
                and self.data == other.data)

    def __hash__(self) -> int:
        return hash((self.dtype, self.shape))

    def __repr__(self) -> str:
        return f"Tensor({self.dtype}, {self.shape})"

    def __reduce__(self) -> Any:  # copy/deepcopy/pickle of a message holding a tensor
        return (Tensor, (self.dtype, self.shape, bytes(self.data)))
