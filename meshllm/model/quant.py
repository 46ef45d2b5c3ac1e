"""Block-quantized weight matrices, as onnxruntime's ``MatMulNBits`` runs them.

A ``QuantMatrix`` holds an (N, K) matrix (Hugging Face layout: out_features, in_features) in
blocks of ``BLOCK`` consecutive values along K, each block with its own scale, integer zero point
and, optionally, a float offset::

    w[n, k] = scale[n, b] * (q[n, k] - zero[n, b]) + mins[n, b]        b = k // BLOCK

``MatMulNBits`` computes the first term; the ``mins`` term (llama.cpp's Q4_1 stores w = d·q + m,
whose zero point -m/d is not an integer) is added exactly in the graph from block sums of the
input, so a Q4_1 file runs without re-quantisation and without the float-zero-point slow path.

GGUF's Q4_0, Q4_1 and Q8_0 map onto this exactly (``from_gguf``); any other matrix is quantized
to 4 bits here (``quantize4``), an approximation whose loss ``docs/models.md`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshllm.errors import ModelError

BLOCK = 32  # values per quantization block along K (Q4_0/Q4_1/Q8_0 use 32 too)

# GGUF block layouts: bytes per block of 32 values
_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
EXACT_GGUF_TYPES = tuple(_GGUF_BLOCK_BYTES)


@dataclass(frozen=True, slots=True)
class QuantMatrix:
    q: np.ndarray  # (N, K) uint8, values in [0, 2**bits)
    scale: np.ndarray  # (N, K // BLOCK) float32
    zero: np.ndarray  # (N, K // BLOCK) uint8
    mins: np.ndarray | None  # (N, K // BLOCK) float32, or None when every offset is zero
    bits: int  # 4 or 8
    source: str  # where the values came from: "Q4_0", "Q4_1", "Q8_0", or "requantized"

    def __post_init__(self) -> None:
        N, K = self.q.shape
        if K % BLOCK or self.scale.shape != (N, K // BLOCK) or self.zero.shape != self.scale.shape:
            raise ModelError(f"quantized matrix: inconsistent shapes q {self.q.shape}, "
                             f"scale {self.scale.shape}, zero {self.zero.shape}")
        if self.mins is not None and self.mins.shape != self.scale.shape:
            raise ModelError("quantized matrix: mins shape differs from scale shape")
        if self.bits not in (4, 8):
            raise ModelError(f"quantized matrix: {self.bits} bits is not supported (4 or 8)")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    @property
    def n_blocks(self) -> int:
        return self.q.shape[1] // BLOCK

    def dequantize(self) -> np.ndarray:
        """The float32 matrix, computed as llama.cpp and the ``gguf`` package compute it."""
        N, K = self.shape
        q = self.q.reshape(N, self.n_blocks, BLOCK).astype(np.float32)
        w = self.scale[:, :, None] * (q - self.zero[:, :, None].astype(np.float32))  # (N, nb, 32)
        if self.mins is not None:
            w = w + self.mins[:, :, None]
        return w.reshape(N, K).astype(np.float32)

    def rows(self, idx: np.ndarray) -> QuantMatrix:
        return QuantMatrix(self.q[idx], self.scale[idx], self.zero[idx],
                           None if self.mins is None else self.mins[idx], self.bits, self.source)

    # --- what MatMulNBits reads -------------------------------------------------------------
    def packed(self) -> np.ndarray:
        """(N, n_blocks, BLOCK * bits / 8) uint8: 4-bit values two to a byte, the even element in
        the low nibble (MatMulNBits' order, not GGUF's)."""
        N = self.shape[0]
        if self.bits == 8:
            return np.ascontiguousarray(self.q.reshape(N, self.n_blocks, BLOCK))
        lo, hi = self.q[:, 0::2], self.q[:, 1::2]
        return np.ascontiguousarray((lo | (hi << 4)).reshape(N, self.n_blocks, BLOCK // 2))

    def packed_zero(self) -> np.ndarray:
        """Zero points as MatMulNBits reads them: uint8, 4-bit ones two to a byte per row (a row
        with an odd block count padded with a zero nibble)."""
        if self.bits == 8:
            return np.ascontiguousarray(self.zero.reshape(-1))
        z = self.zero
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
        return np.ascontiguousarray((z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1))

    @property
    def default_zero(self) -> bool:
        """Every zero point is MatMulNBits' default (8 for 4 bits, 128 for 8): the zero points
        input can be left out, and the kernel skips their correction."""
        return bool((self.zero == (1 << (self.bits - 1))).all())

    @property
    def nbytes(self) -> int:
        """Bytes as stored for MatMulNBits (packed values, float32 scales, zero points, mins)."""
        n = self.packed().nbytes + self.scale.nbytes + self.packed_zero().nbytes
        return n + (self.mins.nbytes if self.mins is not None else 0)


def split8(m: QuantMatrix) -> QuantMatrix:
    """An 8-bit matrix as a 4-bit one of twice the width, for ``[x, x] @ split8(m).T``: each
    value v = q - zero in [-128, 127] is 16 h + l with h in [-8, 7] and l in [0, 16), so
    scale · v = (16 scale)(h + 8 - 8) + scale · l, exactly. onnxruntime runs 8-bit MatMulNBits in
    float32 on a slow path; two 4-bit halves run on the fast one."""
    if m.bits != 8:
        raise ModelError("split8 needs an 8-bit matrix")
    v = m.q.astype(np.int16).reshape(m.shape[0], m.n_blocks, BLOCK) - m.zero[:, :, None].astype(np.int16)
    hi = np.floor_divide(v, 16)  # (N, nb, 32) in [-8, 7]
    lo = v - 16 * hi  # in [0, 16)
    N, K = m.shape
    q = np.concatenate([(hi + 8).reshape(N, K), lo.reshape(N, K)], axis=1).astype(np.uint8)
    nb = m.n_blocks
    scale = np.concatenate([m.scale * np.float32(16), m.scale], axis=1)
    zero = np.concatenate([np.full((N, nb), 8, np.uint8), np.zeros((N, nb), np.uint8)], axis=1)
    mins = None if m.mins is None else np.concatenate([m.mins, np.zeros_like(m.mins)], axis=1)
    return QuantMatrix(q, scale, zero, mins, 4, m.source + " as 2x4-bit")


def _padded_blocks(n_blocks: int) -> int:
    return -(-n_blocks // BLOCK) * BLOCK


def block_indicator(k: int) -> QuantMatrix:
    """(P, K) 0/1 matrix, row b selecting block b of the input (rows past K / BLOCK all zero),
    stored with the default zero point (8: values 8 and 9)."""
    nb = k // BLOCK
    P = _padded_blocks(nb)
    q = np.full((P, k), 8, np.uint8)
    for b in range(nb):
        q[b, b * BLOCK:(b + 1) * BLOCK] = 9
    return QuantMatrix(q, np.ones((P, nb), np.float32), np.full((P, nb), 8, np.uint8), None, 4, "indicator")


def fold_offsets(m: QuantMatrix) -> QuantMatrix:
    """A matrix with offsets as one without, for the input ``[x, s, s]`` where s holds the block
    sums of x padded to a whole block.

    Every block first takes the default zero point 8: ``scale·(q − zero) + mins`` is
    ``scale·(q − 8) + r`` with the residual ``r = mins + scale·(8 − zero)`` (for Q4_1, ``m + 8d``:
    about the centre of the block's range, so much smaller than ``m``). The residuals become 8-bit
    columns (symmetric per block of BLOCK, at most 119 steps: the one approximation) held as two
    4-bit halves ``v = 16h + l``, h and l in [−8, 8), both with zero point 8. So the whole matrix
    has the default zero point and MatMulNBits runs without a zero-point input — its cheapest
    int8 path, and a closer one: the residuals' rounding is relative to their size."""
    if m.mins is None:
        return m
    N, nb = m.mins.shape
    resid = m.mins + m.scale * (np.float32(8) - m.zero.astype(np.float32))
    P = _padded_blocks(nb)
    padded = np.zeros((N, P), np.float32)
    padded[:, :nb] = resid
    blocks = padded.reshape(N, P // BLOCK, BLOCK)
    scale = np.abs(blocks).max(axis=2) / 119.0  # (N, P / BLOCK)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    v = np.clip(np.round(blocks / scale[:, :, None]), -119, 119).astype(np.int16).reshape(N, P)
    hi = np.floor_divide(v + 8, 16)  # [-7, 7]
    lo = v - 16 * hi  # [-8, 8)
    q = np.concatenate([m.q, (hi + 8).astype(np.uint8), (lo + 8).astype(np.uint8)], axis=1)
    sc = np.concatenate([m.scale, scale * np.float32(16), scale], axis=1)
    return QuantMatrix(q, sc, np.full(sc.shape, 8, np.uint8), None, 4, m.source + " offsets folded")


def concat_rows(mats: list[QuantMatrix]) -> QuantMatrix:
    """Stack matrices along N (fused q|k|v, gate|up). Offsets are kept where any has them."""
    if len({m.bits for m in mats}) != 1 or len({m.shape[1] for m in mats}) != 1:
        raise ModelError("concat_rows: matrices differ in bits or in K")
    has_mins = any(m.mins is not None for m in mats)
    mins = (np.concatenate([m.mins if m.mins is not None else np.zeros_like(m.scale) for m in mats])
            if has_mins else None)
    sources = sorted({m.source for m in mats})
    return QuantMatrix(np.concatenate([m.q for m in mats]), np.concatenate([m.scale for m in mats]),
                       np.concatenate([m.zero for m in mats]), mins, mats[0].bits, "+".join(sources))


def from_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantMatrix:
    """A GGUF Q4_0 / Q4_1 / Q8_0 tensor's bytes (N rows of K values) as an exact QuantMatrix."""
    N, K = shape
    width = _GGUF_BLOCK_BYTES.get(type_name)
    if width is None:
        raise ModelError(f"{type_name} does not map exactly onto MatMulNBits")
    nb = K // BLOCK
    if K % BLOCK or raw.size != N * nb * width:
        raise ModelError(f"{type_name} tensor of shape {shape} has {raw.size} bytes, "
                         f"expected {N * nb * width}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(N, nb, width)
    d = blocks[:, :, 0:2].copy().view("<f2")[:, :, 0].astype(np.float32)  # (N, nb)
    if type_name == "Q8_0":
        q8 = blocks[:, :, 2:].copy().view(np.int8)  # (N, nb, 32)
        q = (q8.astype(np.int16) + 128).astype(np.uint8).reshape(N, K)
        return QuantMatrix(q, d, np.full((N, nb), 128, np.uint8), None, 8, type_name)
    start = 2 if type_name == "Q4_0" else 4
    qs = blocks[:, :, start:start + 16]  # (N, nb, 16): byte j holds element j (low) and j+16 (high)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(N, K)  # (N, nb, 32) -> (N, K)
    if type_name == "Q4_0":
        return QuantMatrix(q, d, np.full((N, nb), 8, np.uint8), None, 4, type_name)
    m = blocks[:, :, 2:4].copy().view("<f2")[:, :, 0].astype(np.float32)
    return QuantMatrix(q, d, np.zeros((N, nb), np.uint8), m, 4, type_name)


def compact4(m: QuantMatrix) -> QuantMatrix:
    """A matrix in MatMulNBits' plainest form (the int4 "compact" mode): 4 bits, an integer zero
    point, no offsets — the shape onnxruntime-genai's builder gives every matrix, at the cost of
    exactness. An 8-bit matrix is re-quantized to 4 bits; a Q4_1 block (``d·q + m``) keeps its
    values and scale and takes the nearest zero point ``round(-m/d)``: each weight of the block
    moves by the same ``m + zero·d`` (at most d/2 when that zero point is in [0, 15]). Measured on
    SmolLM2 this keeps more than re-quantizing the block's float values (docs/models.md)."""
    if m.bits == 8:
        return quantize4(m.dequantize())
    if m.mins is None:
        return m
    zero = np.clip(np.round(-m.mins / m.scale), 0, 15).astype(np.uint8)
    return QuantMatrix(m.q, m.scale, zero, None, 4, m.source + " recentred")


def quantize4(w: np.ndarray) -> QuantMatrix:
    """Asymmetric 4-bit quantization of an (N, K) float matrix, K a multiple of BLOCK: each block
    spans its [min, max] (widened to include 0) in 15 steps, with an integer zero point."""
    w = np.asarray(w, dtype=np.float32)
    N, K = w.shape
    if K % BLOCK:
        raise ModelError(f"cannot quantize a matrix with {K} columns to blocks of {BLOCK}")
    b = w.reshape(N, K // BLOCK, BLOCK)
    lo = np.minimum(b.min(axis=2), 0.0)  # (N, nb)
    hi = np.maximum(b.max(axis=2), 0.0)
    scale = (hi - lo) / 15.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(b / scale[:, :, None]) + zero[:, :, None], 0, 15).astype(np.uint8)
    return QuantMatrix(q.reshape(N, K), scale, zero, None, 4, "requantized")
