"""Tensors on the wire: ``{dtype, shape, data}`` with a dtype allow-list.

Never pickle, never object arrays: a tensor is a little-endian dtype name from a fixed list, a
shape of non-negative ints, and exactly ``prod(shape) * itemsize`` bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from meshllm.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

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


def tensor_problem(dtype: object, shape: object, data: object) -> str | None:
    """Why ``(dtype, shape, data)`` is not a valid wire tensor, or None if it is."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"tensor dtype {dtype!r} is not one of {sorted(DTYPES)}"
    if not isinstance(shape, tuple | list) or len(shape) > MAX_NDIM:
        return f"tensor shape must be a list of at most {MAX_NDIM} ints"
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"tensor shape {list(shape)!r} must hold non-negative ints"
    if not isinstance(data, bytes):
        return "tensor data must be bytes"
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if want != len(data):
        return f"tensor of dtype {dtype} and shape {list(shape)} needs {want} bytes, got {len(data)}"
    return None


@dataclass(frozen=True, slots=True)
class Tensor:
    """An n-d array as it travels: dtype name, shape, raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        problem = tensor_problem(self.dtype, self.shape, self.data)
        if problem:
            raise LocalProtocolError(problem)
        object.__setattr__(self, "shape", tuple(self.shape))

    @classmethod
    def from_array(cls, a: np.ndarray) -> Tensor:
        name = a.dtype.name
        if a.dtype.kind not in "fiu" or name not in DTYPES:
            raise LocalProtocolError(f"cannot send an array of dtype {a.dtype}; allowed: {sorted(DTYPES)}")
        wire = np.ascontiguousarray(a, dtype=DTYPES[name])
        return cls(name, tuple(int(d) for d in a.shape), wire.tobytes())

    def to_array(self) -> np.ndarray:
        """A read-only view over ``data`` (copy it to write)."""
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype]).reshape(self.shape)

    def to_map(self) -> dict[str, object]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}

    @classmethod
    def from_map(cls, m: object) -> Tensor:
        if not isinstance(m, dict) or set(m) != {"dtype", "shape", "data"}:
            raise RemoteProtocolError("tensor must be a map with exactly dtype, shape, data")
        problem = tensor_problem(m["dtype"], m["shape"], m["data"])
        if problem:
            raise RemoteProtocolError(problem)
        try:
            return cls(m["dtype"], tuple(m["shape"]), m["data"])
        except ProtocolError as e:  # pragma: no cover - tensor_problem already checked
            raise RemoteProtocolError(str(e)) from None
