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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from meshllm.errors import ModelError
from meshllm.model.config import ModelConfig

OPSET = 17
MS_DOMAIN = "com.microsoft"
# onnxruntime's CPU GroupQueryAttention kernel refuses other head sizes.
HEAD_DIM_MULTIPLE = 16

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


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
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    _n: int = 0

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


def _w(weights: dict[str, np.ndarray], key: str) -> np.ndarray:
    try:
        return weights[key]
    except KeyError:
        raise ModelError(f"weight {key!r} is missing") from None


def _rms(g: _Graph, x: str, weight: np.ndarray, wname: str, eps: float) -> str:
    # SimplifiedLayerNormalization is onnxruntime's RMSNorm: x / sqrt(mean(x^2) + eps) * w
    w = g.init(wname, weight)
    return g.node("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=float(eps))[0]


def _emit_embed(g: _Graph, cfg: ModelConfig, weights: dict[str, np.ndarray], ids: str, out: str) -> None:
    emb = _w(weights, "embed_tokens.weight")  # (V, H)
    # gather rows in the storage dtype, then cast only the gathered rows
    name = g.init("embed_tokens.weight", emb, compute_f32=False)
    if g.weight_dtype == np.float16:
        rows = g.node("Gather", [name, ids])[0]
        g.node("Cast", [rows], [out], to=TensorProto.FLOAT)
    else:
        g.node("Gather", [name, ids], [out])


def _emit_layer(g: _Graph, cfg: ModelConfig, weights: dict[str, np.ndarray], i: int, x: str, out: str,
                past_k: str, past_v: str, present_k: str, present_v: str, seqlens: str, total: str,
                cos: str, sin: str) -> None:
    p = f"layers.{i}."
    a = p + "self_attn."
    h = _rms(g, x, _w(weights, p + "input_layernorm.weight"), p + "input_layernorm.weight", cfg.rms_norm_eps)
    # fused q|k|v projection, stored (H, q + 2 kv)
    wqkv = np.concatenate([_w(weights, a + f"{n}_proj.weight") for n in "qkv"], axis=0).T
    qkv = g.node("MatMul", [h, g.init(a + "qkv_proj.weight", wqkv)])[0]  # (B, S, q + 2kv)
    if cfg.qkv_bias:
        bqkv = np.concatenate([_w(weights, a + f"{n}_proj.bias") for n in "qkv"], axis=0)
        qkv = g.node("Add", [qkv, g.init(a + "qkv_proj.bias", bqkv)])[0]
    attn = g.node("GroupQueryAttention", [qkv, "", "", past_k, past_v, seqlens, total, cos, sin],
                  [g.name("attn"), present_k, present_v], domain=MS_DOMAIN,
                  num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, do_rotary=1,
                  rotary_interleaved=0, scale=float(cfg.head_dim ** -0.5))[0]  # (B, S, q)
    o = g.node("MatMul", [attn, g.init(a + "o_proj.weight", _w(weights, a + "o_proj.weight").T)])[0]
    x2 = g.node("Add", [x, o])[0]  # (B, S, H)
    h2 = _rms(g, x2, _w(weights, p + "post_attention_layernorm.weight"),
              p + "post_attention_layernorm.weight", cfg.rms_norm_eps)
    m = p + "mlp."
    wgu = np.concatenate([_w(weights, m + "gate_proj.weight"), _w(weights, m + "up_proj.weight")], axis=0).T
    gu = g.node("MatMul", [h2, g.init(m + "gate_up_proj.weight", wgu)])[0]  # (B, S, 2I)
    gate, up = _split2(g, gu, cfg.intermediate_size)
    act = g.node("Mul", [gate, g.node("Sigmoid", [gate])[0]])[0]  # SiLU
    y = g.node("MatMul", [g.node("Mul", [act, up])[0],
                          g.init(m + "down_proj.weight", _w(weights, m + "down_proj.weight").T)])[0]
    g.node("Add", [x2, y], [out])


def _split2(g: _Graph, x: str, n: int) -> list[str]:
    sizes = g.init(g.name("split_sizes"), np.array([n, n], dtype=np.int64))
    return g.node("Split", [x, sizes], [g.name("gate"), g.name("up")], axis=-1)


def _emit_head(g: _Graph, cfg: ModelConfig, weights: dict[str, np.ndarray], x: str, out: str) -> None:
    h = _rms(g, x, _w(weights, "norm.weight"), "norm.weight", cfg.rms_norm_eps)
    lm = weights["embed_tokens.weight"] if cfg.tie_word_embeddings else _w(weights, "lm_head.weight")
    g.node("MatMul", [h, g.init("lm_head.weight", lm.T)], [out])  # (B, S, V)


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
    if weight_dtype not in ("float32", "float16"):
        raise ModelError(f"weight_dtype must be float32 or float16, not {weight_dtype!r}")
    return np.dtype(weight_dtype)


def build_block(weights: dict[str, np.ndarray], cfg: ModelConfig, index: int,
                weight_dtype: str = "float32", external: ExternalData | None = None) -> onnx.ModelProto:
    """The ONNX model of block ``index`` (0 = embed, 1..L = layers, L+1 = head); with
    ``external`` its weights go to that side file."""
    check_supported(cfg)
    g = _Graph(_dtype(weight_dtype), external)
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


def build_monolithic(weights: dict[str, np.ndarray], cfg: ModelConfig,
                     weight_dtype: str = "float32") -> onnx.ModelProto:
    """The whole model as one graph: ``input_ids``, ``seqlens_k``, ``total_sequence_length``,
    ``past_key.{i}``/``past_value.{i}`` -> ``logits``, ``present_key.{i}``/``present_value.{i}``."""
    check_supported(cfg)
    g = _Graph(_dtype(weight_dtype))
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


def fuse_blocks(models: list[onnx.ModelProto], indices: list[int]) -> onnx.ModelProto:
    """Chain consecutive block models into one graph (a stage's range as one session).

    Inputs: the first block's (``input_ids`` or ``hidden``), then for each layer block ``b``
    ``past_key.{b}``/``past_value.{b}``, plus ``seqlens_k``/``total_sequence_length`` once.
    Outputs: the last block's (``hidden_out`` or ``logits``) and ``present_key.{b}``/
    ``present_value.{b}`` per layer block.
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
    graph = helper.make_graph(nodes, "fused", list(inputs.values()), outputs, initializer=list(inits.values()))
    fused = helper.make_model(graph, opset_imports=list(models[0].opset_import), producer_name="meshllm")
    fused.ir_version = models[0].ir_version
    return fused
