"""Attention as a runner runs it: every ``GroupQueryAttention`` node of a block graph rewritten as
plain operators whose arithmetic for one query position does not depend on how many positions
(or rows) the pass carries.

Why: onnxruntime's CPU GroupQueryAttention multiplies the attention weights by V with one GEMM
per head whose M is the number of new positions, and MLAS runs M = 1 (a decode step) through
its own kernel (``MlasSgemmKernelM1``: ``alpha == 1``, ``beta == 0``, no transposed A) and M > 1
through the blocked kernel, which rounds differently: a pass over several positions of one
sequence differed from the same positions decoded one at a time by up to 6e-7 per attention
output (``tools/spec_numerics.py``), which int8-quantized activations downstream turn into whole
logit steps. It also refuses a batch of several rows with several new positions each.

The rewrite, per node (block files keep the kernel; only the runner's sessions change):

* split the packed q|k|v; RoPE on q and k by ``RotaryEmbedding`` at explicit positions
  (per position, so per-row; the same tables, bit-identical keys to GQA's);
* write the new keys and values into the cache by ``ScatterND`` at (row, head, position). The
  runner binds ``present_*`` to the ``past_*`` memory; onnxruntime's ScatterND then copies
  nothing and writes only the new positions, in place, as GQA did;
* scores = q·Kᵀ over the first T cache positions, with a query row per (position, head of the
  group): M = positions x group >= 2 always (a group of one gets a zero row appended), so every
  pass, one position or many, runs MLAS's blocked kernel, whose rounding of one output row does
  not depend on the other rows;
* an additive causal mask (0 where the key's position <= the query's, -inf elsewhere: masked
  weights come out of Softmax as exact zeros, and zeros add nothing to a sum), Softmax, and the
  weights times V (M again positions x group).

Row b, position s of a pass therefore computes exactly what a one-position step at that position
computes, whatever else is in the pass: one-pass verification of drafts is bitwise equal to
decoding them one at a time, and rows with different draft counts share one pass (a shorter row
repeats its last position: the same input at the same position writes the same bytes).

Graph inputs (replacing ``seqlens_k``/``total_sequence_length``; ``inputs`` computes them):
``attn_positions`` (B, S) int64, ``attn_kv_index`` (B, S, kv_heads, 3) int64,
``attn_query_pos`` (B, 1, R, 1) int64 (each query row's position; R = S x group, + 1 for a group
of one), ``attn_key_pos`` (T,) int64 (0..T-1: the cache positions attended, T = the pass's
longest row).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from meshllm.errors import ModelError

INPUTS = ("attn_positions", "attn_kv_index", "attn_query_pos", "attn_key_pos")
_REPLACED = ("seqlens_k", "total_sequence_length")
MS_DOMAIN = "com.microsoft"


def query_rows(num_heads: int, num_kv_heads: int, positions: int) -> int:
    """R, the query rows per (row, kv head) of a pass of ``positions`` positions."""
    group = num_heads // num_kv_heads
    return positions * group + (1 if group == 1 else 0)


def inputs(positions: np.ndarray, num_heads: int, num_kv_heads: int,
           key_pos: np.ndarray) -> dict[str, np.ndarray]:
    """The attention inputs of a pass: ``positions`` (B, S) int64 of every new position (a row's
    padding repeats its last position); ``key_pos`` an arange of at least the longest row's
    length, whose prefix is bound."""
    B, S = positions.shape
    group = num_heads // num_kv_heads
    idx = np.empty((B, S, num_kv_heads, 3), np.int64)
    idx[..., 0] = np.arange(B)[:, None, None]
    idx[..., 1] = np.arange(num_kv_heads)[None, None, :]
    idx[..., 2] = positions[:, :, None]
    q = np.repeat(positions, group, axis=1)  # (B, S * group): rows ordered position-major
    if group == 1:
        q = np.concatenate([q, positions[:, -1:]], axis=1)
    total = int(positions.max()) + 1
    return {"attn_positions": np.ascontiguousarray(positions, np.int64), "attn_kv_index": idx,
            "attn_query_pos": np.ascontiguousarray(q[:, None, :, None]), "attn_key_pos": key_pos[:total]}


def _attr(node: onnx.NodeProto, name: str, default: float | int | None = None) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    if default is None:
        raise ModelError(f"GroupQueryAttention node {node.name!r} has no {name!r}")
    return default


def rewrite(model: onnx.ModelProto, head_dim: int) -> onnx.ModelProto:
    """``model`` with its GroupQueryAttention nodes replaced (in place; returned). A graph
    without any is returned unchanged."""
    g = model.graph
    if not any(n.op_type == "GroupQueryAttention" for n in g.node):
        return model
    inits: list[onnx.TensorProto] = []
    counter = [0]

    def const(arr: np.ndarray) -> str:
        counter[0] += 1
        name = f"attn/const_{counter[0]}"
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(op: str, ins: list[str], out: str | None = None, domain: str = "", **attrs: Any) -> str:
        counter[0] += 1
        name = out or f"attn/{op.lower()}_{counter[0]}"
        new.append(helper.make_node(op, ins, [name], name=f"attn/{op}_{counter[0]}", domain=domain, **attrs))
        return name

    new: list[onnx.NodeProto] = []
    zero, two, minus1 = const(np.array([0], np.int64)), const(np.array([2], np.int64)), const(np.array([-1], np.int64))
    # shared by every layer: T (the attended length) and the (B, 1, R, T) additive causal mask
    total = node("Shape", ["attn_key_pos"], "attn/total")
    allowed = node("LessOrEqual", ["attn_key_pos", "attn_query_pos"])  # (B, 1, R, T)
    mask = node("Where", [allowed, const(np.array(0.0, np.float32)), const(np.array(-np.inf, np.float32))],
                "attn/mask")
    d = head_dim
    for n in g.node:
        if n.op_type != "GroupQueryAttention":
            new.append(n)
            continue
        heads, kvh = int(_attr(n, "num_heads")), int(_attr(n, "kv_num_heads"))
        if not int(_attr(n, "do_rotary", 0)) or int(_attr(n, "rotary_interleaved", 0)):
            raise ModelError(f"{n.name}: only GroupQueryAttention with rotate-half RoPE is supported")
        if n.input[1] or n.input[2]:
            raise ModelError(f"{n.name}: only packed q|k|v is supported")
        scale = float(_attr(n, "scale", 0.0)) or d ** -0.5
        group = heads // kvh
        qkv, past_k, past_v, cos, sin = n.input[0], n.input[3], n.input[4], n.input[7], n.input[8]
        out, present_k, present_v = n.output[0], n.output[1], n.output[2]
        split = const(np.array([heads * d, kvh * d, kvh * d], np.int64))
        counter[0] += 1
        q, k, v = (f"attn/{c}_{counter[0]}" for c in "qkv")
        new.append(helper.make_node("Split", [qkv, split], [q, k, v], name=f"attn/Split_{counter[0]}", axis=-1))
        q = node("RotaryEmbedding", [q, "attn_positions", cos, sin], domain=MS_DOMAIN, num_heads=heads)
        k = node("RotaryEmbedding", [k, "attn_positions", cos, sin], domain=MS_DOMAIN, num_heads=kvh)
        kv_shape = const(np.array([0, 0, kvh, d], np.int64))
        for new_x, past, present in ((k, past_k, present_k), (v, past_v, present_v)):
            # (B, S, kvh, d) rows go to cache[b, head, position]: attn_kv_index is (B, S, kvh, 3)
            node("ScatterND", [past, "attn_kv_index", node("Reshape", [new_x, kv_shape])], present)
        keys = node("Slice", [present_k, zero, total, two])  # (B, kvh, T, d)
        values = node("Slice", [present_v, zero, total, two])
        # (B, S, heads * d) -> (B, kvh, S * group, d): query rows position-major within a kv head
        q5 = node("Reshape", [q, const(np.array([0, 0, kvh, group, d], np.int64))])
        qg = node("Reshape", [node("Transpose", [q5], perm=[0, 2, 1, 3, 4]),
                              const(np.array([0, kvh, -1, d], np.int64))])
        if group == 1:  # M >= 2: a zero query row, dropped after
            qg = node("Pad", [qg, const(np.array([0, 0, 0, 0, 0, 0, 1, 0], np.int64))])
        scores = node("Mul", [node("MatMul", [qg, node("Transpose", [keys], perm=[0, 1, 3, 2])]),
                              const(np.array(scale, np.float32))])
        probs = node("Softmax", [node("Add", [scores, mask])], axis=-1)
        o = node("MatMul", [probs, values])  # (B, kvh, R, d)
        if group == 1:
            o = node("Slice", [o, zero, minus1, two])
        o5 = node("Reshape", [o, const(np.array([0, kvh, -1, group, d], np.int64))])
        node("Reshape", [node("Transpose", [o5], perm=[0, 2, 1, 3, 4]),
                         const(np.array([0, 0, heads * d], np.int64))], out)
    del g.node[:]
    g.node.extend(new)
    g.initializer.extend(inits)
    kept = [vi for vi in g.input if vi.name not in _REPLACED]
    I64 = TensorProto.INT64
    kept += [helper.make_tensor_value_info("attn_positions", I64, ["batch", "seq"]),
             helper.make_tensor_value_info("attn_kv_index", I64, ["batch", "seq", None, 3]),
             helper.make_tensor_value_info("attn_query_pos", I64, ["batch", 1, "rows", 1]),
             helper.make_tensor_value_info("attn_key_pos", I64, ["total"])]
    del g.input[:]
    g.input.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model
