"""Build the model's ONNX graphs directly from numpy weights (``onnx.helper``; no torch).

One graph per block (see ``config.py`` for block indexing):

* ``embed``:  ``input_ids`` (B, S) int64 -> ``hidden_out`` (B, S, H)
* ``layer.i``: ``hidden`` (B, S, H), ``past_key``/``past_value`` (B, kvh, P, d),
  ``seqlens_k`` (B,) int32, ``total_sequence_length`` () int32
  -> ``hidden_out`` (B, S, H), ``present_key``/``present_value`` (B, kvh, P, d)
* ``head``:   ``hidden`` (B, S, H) -> ``logits`` (B, S, V)

Attention is onnxruntime's ``com.microsoft.GroupQueryAttention`` kernel: it applies RoPE
(HF "rotate_half", positions taken from ``seqlens_k``), handles grouped KV heads, a causal mask
for a chunk appended to a past, and sequences of different lengths in one batch
(``seqlens_k[b]`` = total length of row b minus one). When the caller binds ``present_*`` to the
same memory as ``past_*`` (a preallocated slot buffer of P >= total positions), the kernel writes
only the new positions in place and reads the past where it lies: a decode step copies no cache.

Compute is float32. With ``weight_dtype="float16"`` the matrices are stored as float16
initializers and cast to float32 in the graph (onnxruntime folds the cast once at load), which
halves the files. Matrices are stored transposed, (in, out), so ``MatMul(x, W)`` needs no
transpose; q/k/v are fused into one matrix and gate/up into another so each token streams every
weight once per block with as few kernel launches as possible.

``build_monolithic`` emits the whole model as one graph from the same pieces (the baseline the
runtime benchmark compares the per-block runner against).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from meshllm.errors import ModelError
from meshllm.model.config import DEFAULT_INT4_MODE, INT4_MODES, ModelConfig
from meshllm.model.quant import (
    BLOCK,
    QuantMatrix,
    block_indicator,
    compact4,
    concat_rows,
    fold_offsets,
    quantize4,
    split8,
)

OPSET = 17
MS_DOMAIN = "com.microsoft"
# onnxruntime's CPU GroupQueryAttention kernel refuses other head sizes.
HEAD_DIM_MULTIPLE = 16

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int32): TensorProto.INT32}

WEIGHT_DTYPES = ("float32", "float16", "int4")
Weight = np.ndarray | QuantMatrix


class ExternalData:
    """Tensor bytes written to a side file (``location``, relative to the model file) instead of
    the protobuf, whose messages cannot exceed 2 GiB. Offsets are page-aligned so onnxruntime may
    map them."""

    ALIGN = 4096
    MIN_BYTES = 1024  # smaller tensors stay inline

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.location = self.path.name
        self._f = open(self.path, "wb")  # noqa: SIM115 -- closed by close(), after every block tensor
        self._offset = 0

    def add(self, tensor: onnx.TensorProto, data: bytes) -> None:
        pad = -self._offset % self.ALIGN
        self._f.write(b"\0" * pad)
        self._offset += pad
        self._f.write(data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self._offset)),
                           ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += len(data)

    def close(self) -> None:
        self._f.close()


@dataclass
class _Graph:
    """Nodes and initializers collected while emitting one or more blocks into a graph."""

    weight_dtype: np.dtype
    external: ExternalData | None = None
    accuracy_level: int | None = None  # MatMulNBits accuracy level; None: float matrices
    compact: bool = False  # int4 "compact": every matrix as plain 4 bits (quant.compact4)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    _n: int = 0
    _block_sums: dict[str, str] = field(default_factory=dict)

    def tensor(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        elem = _NP_TO_ONNX.get(arr.dtype, TensorProto.INT64)
        if self.external is not None and arr.nbytes >= ExternalData.MIN_BYTES:
            t = TensorProto(name=name, data_type=elem, dims=arr.shape)
            self.external.add(t, arr.tobytes())
        else:
            t = helper.make_tensor(name, elem, arr.shape, arr.tobytes(), raw=True)
        self.inits.append(t)

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, *,
             domain: str = "", **attrs: Any) -> list[str]:
        outs = outputs or [self.name(op.lower())]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), domain=domain, **attrs))
        return outs

    def init(self, name: str, arr: np.ndarray, *, compute_f32: bool = True) -> str:
        """Add an initializer in the storage dtype; return a float32 tensor name for compute."""
        arr = np.ascontiguousarray(arr)
        if arr.dtype.kind == "f":
            arr = arr.astype(self.weight_dtype)
        self.tensor(name, arr)
        if arr.dtype == np.float16 and compute_f32:
            return self.node("Cast", [name], [name + ".f32"], to=TensorProto.FLOAT)[0]
        return name

    def f32_init(self, name: str, arr: np.ndarray) -> str:
        """A float32 initializer regardless of the weight dtype (rotary tables)."""
        self.tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        return name

    def const(self, arr: np.ndarray) -> str:
        name = self.name("const")
        self.tensor(name, arr)
        return name

    def block_sums(self, x: str, k: int) -> str:
        """(..., K) -> (..., K / BLOCK): sums of the input over each quantization block, shared
        by every matrix that reads ``x``."""
        if x not in self._block_sums:
            shape = self.const(np.array([0, 0, k // BLOCK, BLOCK], np.int64))
            r = self.node("Reshape", [x, shape])[0]  # (B, S, nb, 32)
            self._block_sums[x] = self.node("ReduceSum", [r, self.const(np.array([-1], np.int64))],
                                            keepdims=0)[0]  # (B, S, nb)
        return self._block_sums[x]

    def block_sums_nbits(self, x: str, k: int) -> str:
        """(..., K) -> (..., P): the input's block sums by MatMulNBits against a 0/1 block
        indicator (exact in 4 bits), padded with zero columns to a whole block, P = BLOCK · ceil."""
        key = x + "#nbits"
        if key not in self._block_sums:
            ind = block_indicator(k)
            name = self.name("block_sums")
            self._block_sums[key] = self._matmul_nbits(x, name, ind)
        return self._block_sums[key]

    def _matmul_nbits(self, x: str, name: str, m: QuantMatrix, out: str | None = None) -> str:
        self.tensor(name + ".q", m.packed())
        self.tensor(name + ".scales", m.scale)
        inputs = [x, name + ".q", name + ".scales"]
        if not m.default_zero:
            self.tensor(name + ".zero_points", m.packed_zero())
            inputs.append(name + ".zero_points")
        N, K = m.shape
        return self.node("MatMulNBits", inputs, [out] if out else None, domain=MS_DOMAIN,
                         K=K, N=N, bits=m.bits, block_size=BLOCK, accuracy_level=self.accuracy_level)[0]

    def qmatmul(self, x: str, name: str, m: QuantMatrix, out: str | None = None) -> str:
        """x (B, S, K) @ m.T -> (B, S, N) with MatMulNBits, plus the exact ``mins`` term."""
        assert self.accuracy_level is not None
        if m.bits == 8 and self.accuracy_level == 0:
            # float32 compute on 8 bits is onnxruntime's slow path: two 4-bit halves instead
            x = self.node("Concat", [x, x], axis=-1)[0]  # (B, S, 2K)
            m = split8(m)
        if m.mins is not None and self.accuracy_level > 0:
            # int8 activations are approximate anyway: fold the offsets into the one MatMulNBits
            # as extra input columns (the input's block sums, twice) against the offsets held in
            # 8 bits as two 4-bit halves; saves the separate MatMul and Add per projection. The
            # folded matrix has the default zero point everywhere (see fold_offsets)
            x = self.node("Concat", [x, self.block_sums_nbits(x, m.shape[1]),
                                     self.block_sums_nbits(x, m.shape[1])], axis=-1)[0]
            m = fold_offsets(m)
        if m.mins is None:
            return self._matmul_nbits(x, name, m, out)
        K = m.shape[1]
        y = self._matmul_nbits(x, name, m)
        # sum_k (scale (q - zero) + min_b) x_k = MatMulNBits(x) + sum_b min_b * (block sum of x)_b
        mins = self.f32_init(name + ".mins", np.ascontiguousarray(m.mins.T))  # (nb, N)
        corr = self.node("MatMul", [self.block_sums(x, K), mins])[0]  # (B, S, N)
        return self.node("Add", [y, corr], [out] if out else None)[0]

    def linear(self, x: str, name: str, mats: list[Weight], out: str | None = None) -> str:
        """x (B, S, K) times the row-stack of ``mats`` (each (N_i, K), HF layout), transposed."""
        if self.accuracy_level is None:
            w = np.concatenate([_dense(m) for m in mats], axis=0).T  # (K, sum N_i)
            return self.node("MatMul", [x, self.init(name, w)], [out] if out else None)[0]
        qs = [m if isinstance(m, QuantMatrix) else quantize4(m) for m in mats]
        if self.compact:
            qs = [compact4(m) for m in qs]
        if len({m.bits for m in qs}) == 1:
            return self.qmatmul(x, name, concat_rows(qs) if len(qs) > 1 else qs[0], out)
        parts = [self.qmatmul(x, f"{name}.{i}", m) for i, m in enumerate(qs)]
        return self.node("Concat", parts, [out] if out else None, axis=-1)[0]


def check_supported(cfg: ModelConfig) -> None:
    if cfg.head_dim % HEAD_DIM_MULTIPLE:
        raise ModelError(f"head_dim {cfg.head_dim} is not supported: onnxruntime's CPU attention "
                         f"kernel needs a multiple of {HEAD_DIM_MULTIPLE}")


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of shape (max_position, head_dim / 2), computed as HF does (float32 angles)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    pos = np.arange(cfg.max_position, dtype=np.float32)
    ang = np.outer(pos, inv_freq.astype(np.float32)).astype(np.float32)  # (P, d/2)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _w(weights: Mapping[str, Weight], key: str) -> Weight:
    try:
        return weights[key]
    except KeyError:
        raise ModelError(f"weight {key!r} is missing") from None


def _dense(w: Weight) -> np.ndarray:
    return w.dequantize() if isinstance(w, QuantMatrix) else w


def _rms(g: _Graph, x: str, weight: Weight, wname: str, eps: float) -> str:
    # SimplifiedLayerNormalization is onnxruntime's RMSNorm: x / sqrt(mean(x^2) + eps) * w
    if isinstance(weight, QuantMatrix):
        raise ModelError(f"weight {wname} is a norm: it cannot be quantized")
    w = g.init(wname, weight)
    return g.node("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=float(eps))[0]


def _skip_rms(g: _Graph, x: str, skip: str, weight: Weight, wname: str, eps: float) -> tuple[str, str]:
    """The residual add and the RMSNorm after it as one kernel: returns (norm(x + skip), x + skip)."""
    if isinstance(weight, QuantMatrix):
        raise ModelError(f"weight {wname} is a norm: it cannot be quantized")
    w = g.init(wname, weight)
    normed, total = g.name("skipnorm"), g.name("residual")
    g.node("SkipSimplifiedLayerNormalization", [x, skip, w], [normed, "", "", total], domain=MS_DOMAIN,
           epsilon=float(eps))
    return normed, total


def _emit_embed(g: _Graph, cfg: ModelConfig, weights: Mapping[str, Weight], ids: str, out: str) -> None:
    emb = _w(weights, "embed_tokens.weight")  # (V, H)
    if g.accuracy_level is not None:
        _emit_quant_embed(g, emb if isinstance(emb, QuantMatrix) else quantize4(emb), ids, out)
        return
    # gather rows in the storage dtype, then cast only the gathered rows
    name = g.init("embed_tokens.weight", _dense(emb), compute_f32=False)
    if g.weight_dtype == np.float16:
        rows = g.node("Gather", [name, ids])[0]
        g.node("Cast", [rows], [out], to=TensorProto.FLOAT)
    else:
        g.node("Gather", [name, ids], [out])


def _emit_quant_embed(g: _Graph, m: QuantMatrix, ids: str, out: str) -> None:
    """Gather the quantized rows of the ids, then dequantize only those rows: one
    ``GatherBlockQuantized`` kernel, or, for blocks with float offsets (which it does not take), a
    gather and the dequantization spelled out."""
    H = m.shape[1]
    if m.mins is None:
        V = m.shape[0]
        g.tensor("embed_tokens.weight.q", m.packed().reshape(V, -1))  # (V, H * bits / 8)
        g.tensor("embed_tokens.weight.scales", m.scale)  # (V, nb)
        g.tensor("embed_tokens.weight.zero_points", m.packed_zero().reshape(V, -1))
        g.node("GatherBlockQuantized", ["embed_tokens.weight.q", ids, "embed_tokens.weight.scales",
                                        "embed_tokens.weight.zero_points"], [out], domain=MS_DOMAIN,
               gather_axis=0, quantize_axis=1, block_size=BLOCK, bits=m.bits)
        return
    rows = g.node("Gather", [_tensor_name(g, "embed_tokens.weight.q", m.packed()), ids])[0]  # (B, S, nb, bytes)
    if m.bits == 4:
        xi = g.node("Cast", [rows], to=TensorProto.INT32)[0]
        sixteen = g.const(np.array(16, np.int32))
        hi = g.node("Div", [xi, sixteen])[0]
        lo = g.node("Sub", [xi, g.node("Mul", [hi, sixteen])[0]])[0]
        axis = g.const(np.array([-1], np.int64))
        pair = g.node("Concat", [g.node("Unsqueeze", [lo, axis])[0], g.node("Unsqueeze", [hi, axis])[0]],
                      axis=-1)[0]  # (B, S, nb, 16, 2): even element in the low nibble
        q = g.node("Reshape", [pair, g.const(np.array([0, 0, m.n_blocks, BLOCK], np.int64))])[0]
        qf = g.node("Cast", [q], to=TensorProto.FLOAT)[0]
    else:
        qf = g.node("Cast", [rows], to=TensorProto.FLOAT)[0]  # (B, S, nb, 32)
    axis = g.const(np.array([-1], np.int64))

    def per_block(name: str, arr: np.ndarray) -> str:  # (B, S, nb, 1) float32 rows of arr
        gathered = g.node("Gather", [_tensor_name(g, name, arr), ids])[0]
        if arr.dtype != np.float32:
            gathered = g.node("Cast", [gathered], to=TensorProto.FLOAT)[0]
        return g.node("Unsqueeze", [gathered, axis])[0]

    w = g.node("Mul", [g.node("Sub", [qf, per_block("embed_tokens.weight.zero", m.zero)])[0],
                       per_block("embed_tokens.weight.scales", m.scale)])[0]
    if m.mins is not None:
        w = g.node("Add", [w, per_block("embed_tokens.weight.mins", m.mins)])[0]
    g.node("Reshape", [w, g.const(np.array([0, 0, H], np.int64))], [out])


def _tensor_name(g: _Graph, name: str, arr: np.ndarray) -> str:
    g.tensor(name, arr)
    return name


def _emit_layer(g: _Graph, cfg: ModelConfig, weights: Mapping[str, Weight], i: int, x: str, out: str,
                past_k: str, past_v: str, present_k: str, present_v: str, seqlens: str, total: str,
                cos: str, sin: str) -> None:
    p = f"layers.{i}."
    a = p + "self_attn."
    h = _rms(g, x, _w(weights, p + "input_layernorm.weight"), p + "input_layernorm.weight", cfg.rms_norm_eps)
    # fused q|k|v projection: (B, S, H) -> (B, S, q + 2 kv)
    qkv = g.linear(h, a + "qkv_proj.weight", [_w(weights, a + f"{n}_proj.weight") for n in "qkv"])
    if cfg.qkv_bias:
        bqkv = np.concatenate([_dense(_w(weights, a + f"{n}_proj.bias")) for n in "qkv"], axis=0)
        qkv = g.node("Add", [qkv, g.init(a + "qkv_proj.bias", bqkv)])[0]
    attn = g.node("GroupQueryAttention", [qkv, "", "", past_k, past_v, seqlens, total, cos, sin],
                  [g.name("attn"), present_k, present_v], domain=MS_DOMAIN,
                  num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, do_rotary=1,
                  rotary_interleaved=0, scale=float(cfg.head_dim ** -0.5))[0]  # (B, S, q)
    o = g.linear(attn, a + "o_proj.weight", [_w(weights, a + "o_proj.weight")])
    # x2 = x + o (B, S, H), h2 = its norm
    h2, x2 = _skip_rms(g, o, x, _w(weights, p + "post_attention_layernorm.weight"),
                       p + "post_attention_layernorm.weight", cfg.rms_norm_eps)
    m = p + "mlp."
    gu = g.linear(h2, m + "gate_up_proj.weight",
                  [_w(weights, m + "gate_proj.weight"), _w(weights, m + "up_proj.weight")])  # (B, S, 2I)
    gate, up = _split2(g, gu, cfg.intermediate_size)
    act = g.node("Mul", [gate, g.node("Sigmoid", [gate])[0]])[0]  # SiLU
    y = g.linear(g.node("Mul", [act, up])[0], m + "down_proj.weight", [_w(weights, m + "down_proj.weight")])
    g.node("Add", [x2, y], [out])


def _split2(g: _Graph, x: str, n: int) -> list[str]:
    sizes = g.init(g.name("split_sizes"), np.array([n, n], dtype=np.int64))
    return g.node("Split", [x, sizes], [g.name("gate"), g.name("up")], axis=-1)


def _emit_head(g: _Graph, cfg: ModelConfig, weights: Mapping[str, Weight], x: str, out: str) -> None:
    h = _rms(g, x, _w(weights, "norm.weight"), "norm.weight", cfg.rms_norm_eps)
    lm = _w(weights, "embed_tokens.weight") if cfg.tie_word_embeddings else _w(weights, "lm_head.weight")
    g.linear(h, "lm_head.weight", [lm], out)  # (B, S, V)


def _vi(name: str, elem: int, shape: list[str | int | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _kv_shape(cfg: ModelConfig, past: str) -> list[str | int | None]:
    return ["batch", cfg.num_kv_heads, past, cfg.head_dim]


def _model(g: _Graph, name: str, inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="meshllm")
    model.ir_version = 8
    return model


def _dtype(weight_dtype: str) -> np.dtype:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ModelError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, not {weight_dtype!r}")
    # int4 blocks keep their vectors (norms, biases) and any float tables in float32
    return np.dtype("float32" if weight_dtype == "int4" else weight_dtype)


def _accuracy(weight_dtype: str, int4_mode: str) -> int | None:
    if weight_dtype != "int4":
        return None
    if int4_mode not in INT4_MODES:
        raise ModelError(f"int4 mode must be one of {', '.join(INT4_MODES)}, not {int4_mode!r}")
    return INT4_MODES[int4_mode]


def build_block(weights: Mapping[str, Weight], cfg: ModelConfig, index: int,
                weight_dtype: str = "float32", external: ExternalData | None = None,
                int4_mode: str = DEFAULT_INT4_MODE) -> onnx.ModelProto:
    """The ONNX model of block ``index`` (0 = embed, 1..L = layers, L+1 = head); with
    ``external`` its weights go to that side file. ``weight_dtype="int4"`` runs every matrix
    with MatMulNBits (``QuantMatrix`` weights as they are, float ones quantized to 4 bits) in
    ``int4_mode`` (see ``INT4_MODES``)."""
    check_supported(cfg)
    g = _Graph(_dtype(weight_dtype), external, _accuracy(weight_dtype, int4_mode), compact=int4_mode == "compact")
    F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    hidden: list[str | int | None] = ["batch", "seq", cfg.hidden_size]
    if index == 0:
        _emit_embed(g, cfg, weights, "input_ids", "hidden_out")
        return _model(g, "embed", [_vi("input_ids", I64, ["batch", "seq"])], [_vi("hidden_out", F, hidden)])
    if index == cfg.num_layers + 1:
        _emit_head(g, cfg, weights, "hidden", "logits")
        return _model(g, "head", [_vi("hidden", F, hidden)],
                      [_vi("logits", F, ["batch", "seq", cfg.vocab_size])])
    if not 1 <= index <= cfg.num_layers:
        raise ModelError(f"block index {index} out of range [0, {cfg.num_blocks})")
    cos, sin = rope_tables(cfg)
    g.f32_init("cos_cache", cos)
    g.f32_init("sin_cache", sin)
    _emit_layer(g, cfg, weights, index - 1, "hidden", "hidden_out", "past_key", "past_value",
                "present_key", "present_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache")
    return _model(g, f"layer.{index - 1}", [
        _vi("hidden", F, hidden),
        _vi("past_key", F, _kv_shape(cfg, "past")), _vi("past_value", F, _kv_shape(cfg, "past")),
        _vi("seqlens_k", I32, ["batch"]), _vi("total_sequence_length", I32, []),
    ], [_vi("hidden_out", F, hidden),
        _vi("present_key", F, _kv_shape(cfg, "present")), _vi("present_value", F, _kv_shape(cfg, "present"))])


def build_monolithic(weights: Mapping[str, Weight], cfg: ModelConfig,
                     weight_dtype: str = "float32", int4_mode: str = DEFAULT_INT4_MODE) -> onnx.ModelProto:
    """The whole model as one graph: ``input_ids``, ``seqlens_k``, ``total_sequence_length``,
    ``past_key.{i}``/``past_value.{i}`` -> ``logits``, ``present_key.{i}``/``present_value.{i}``."""
    check_supported(cfg)
    g = _Graph(_dtype(weight_dtype), None, _accuracy(weight_dtype, int4_mode), compact=int4_mode == "compact")
    F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    cos, sin = rope_tables(cfg)
    g.f32_init("cos_cache", cos)
    g.f32_init("sin_cache", sin)
    _emit_embed(g, cfg, weights, "input_ids", "h0")
    inputs = [_vi("input_ids", I64, ["batch", "seq"]), _vi("seqlens_k", I32, ["batch"]),
              _vi("total_sequence_length", I32, [])]
    outputs = [_vi("logits", F, ["batch", "seq", cfg.vocab_size])]
    for i in range(cfg.num_layers):
        _emit_layer(g, cfg, weights, i, f"h{i}", f"h{i + 1}", f"past_key.{i}", f"past_value.{i}",
                    f"present_key.{i}", f"present_value.{i}", "seqlens_k", "total_sequence_length",
                    "cos_cache", "sin_cache")
        inputs += [_vi(f"past_key.{i}", F, _kv_shape(cfg, "past")), _vi(f"past_value.{i}", F, _kv_shape(cfg, "past"))]
        outputs += [_vi(f"present_key.{i}", F, _kv_shape(cfg, "present")),
                    _vi(f"present_value.{i}", F, _kv_shape(cfg, "present"))]
    _emit_head(g, cfg, weights, f"h{cfg.num_layers}", "logits")
    return _model(g, "model", inputs, outputs)


# Interface tensors of a layer block that stay shared (or get a per-layer name) when blocks are
# fused into one graph; every other tensor gets a per-block prefix.
_SHARED = {"seqlens_k", "total_sequence_length", "cos_cache", "sin_cache", ""}


def fuse_blocks(models: list[onnx.ModelProto], indices: list[int], *, select_logits: bool = False) -> onnx.ModelProto:
    """Chain consecutive block models into one graph (a stage's range as one session).

    Inputs: the first block's (``input_ids`` or ``hidden``), then for each layer block ``b``
    ``past_key.{b}``/``past_value.{b}``, plus ``seqlens_k``/``total_sequence_length`` once.
    Outputs: the last block's (``hidden_out`` or ``logits``) and ``present_key.{b}``/
    ``present_value.{b}`` per layer block. With ``select_logits`` (the last block being the head,
    after others) the head reads only the positions listed in the input ``logit_rows`` (int64,
    (R,)): logits are (B, R, V).
    """
    if len(models) != len(indices) or not models:
        raise ModelError("fuse_blocks: one model per block index, at least one")
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    outputs: list[onnx.ValueInfoProto] = []
    prev_out: str | None = None
    for pos, (model, b) in enumerate(zip(models, indices, strict=True)):
        g = model.graph
        last = pos == len(models) - 1
        ren: dict[str, str] = {n: n for n in _SHARED}
        for vi in g.input:
            n = vi.name
            if n in ("past_key", "past_value"):
                ren[n] = f"{n}.{b}"
            elif n in ("hidden", "input_ids") and prev_out is not None and select_logits and last:
                # the head, on the selected positions only
                ren[n] = f"{prev_out}.rows"
                sel = helper.make_node("Gather", [prev_out, "logit_rows"], [ren[n]], name="select_logit_rows", axis=1)
                nodes.append(sel)
                inputs["logit_rows"] = helper.make_tensor_value_info("logit_rows", TensorProto.INT64, ["rows"])
            elif n in ("hidden", "input_ids") and prev_out is not None:
                ren[n] = prev_out
            else:
                ren[n] = n
            if ren[n] not in inputs and (prev_out is None or n not in ("hidden", "input_ids")):
                nv = onnx.ValueInfoProto()
                nv.CopyFrom(vi)
                nv.name = ren[n]
                inputs[ren[n]] = nv
        for vi in g.output:
            n = vi.name
            if n in ("present_key", "present_value"):
                ren[n] = f"{n}.{b}"
            elif last:
                ren[n] = n
            else:
                ren[n] = f"{n}.{b}"
            if n.startswith("present_") or last:
                nv = onnx.ValueInfoProto()
                nv.CopyFrom(vi)
                nv.name = ren[n]
                outputs.append(nv)
        prev_out = ren[g.output[0].name]

        def name(n: str, b: int = b, ren: dict[str, str] = ren) -> str:
            return ren.get(n, f"b{b}/{n}")

        for t in g.initializer:
            nt = onnx.TensorProto()
            nt.CopyFrom(t)
            nt.name = name(t.name)
            inits.setdefault(nt.name, nt)
        for node in g.node:
            nn = onnx.NodeProto()
            nn.CopyFrom(node)
            nn.name = f"b{b}/{node.name}"
            nn.input[:] = [name(x) for x in node.input]
            nn.output[:] = [name(x) for x in node.output]
            nodes.append(nn)
    # no fusion across the blocks' seams (a layer's last Add with the next layer's first norm):
    # SkipSimplifiedLayerNormalization rounds differently from Add + norm, so where a range
    # happens to be cut would change the numbers, and a split mesh must compute, bit for bit,
    # what one process computes
    graph = helper.make_graph(nodes, "fused", list(inputs.values()), outputs, initializer=list(inits.values()))
    fused = helper.make_model(graph, opset_imports=list(models[0].opset_import), producer_name="meshllm")
    fused.ir_version = models[0].ir_version
    return fused
