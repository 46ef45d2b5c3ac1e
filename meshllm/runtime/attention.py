"""The two kinds of attention a runner can run, and the plain-operator one's graph rewrite.

Kinds (``KINDS``; a mesh runs one kind on every node, chosen once: ``docs/runtime.md``):

* ``fused`` (``StageRunner(one_pass=False)``): the block files' onnxruntime ``GroupQueryAttention``
  node, one kernel per layer: the fastest one-position step. A pass of several positions per row
  (a token and its drafts) runs as that many one-position steps (exact, no cheaper than steps).
* ``plain`` (``StageRunner(one_pass=True)``): every ``GroupQueryAttention`` node rewritten as plain
  operators (``rewrite``) whose arithmetic for one query position does not depend on how many
  positions (or rows) the pass carries: drafts verify in one pass, bit for bit as steps would.

The two do not compute the same numbers (below), so a fused step is not a plain step bit for bit
and a mesh of mixed kinds would match no single process. ``choose`` turns the node setting
``runtime.attention`` (``SETTINGS``: ``auto``, ``fused``, ``plain``) into a kind: ``auto`` is
plain where the mesh speculates by default (``serve.speculate``), fused elsewhere. The leader
stamps the kind into every plan (``of_plan`` reads it), keeping the mesh's kind across re-plans.

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
* scores = q·Kᵀ over the first T cache positions as one small product per (row, kv head): its
  M rows are the query heads of the group at every position of the pass (M = group x S), so a
  pass of S positions reads and packs each kv head's cache once, not S times. MLAS runs M = 1
  through its own kernel (above) and every M >= 2 through the blocked kernel, whose rows do not
  depend on M (its K and N blocking follow K and N alone, and threads split M and N, never K):
  measured bit for bit for M = 2..18 at every T from 1 to 69 and at 127..2048 around the block
  edges, both products, and on SmolLM2 at contexts 1..2040 (``tests/test_runner.py``). A group
  of one gets a zero query row per position (M = 2 S, never 1), as it would in a one-position step;
* an additive causal mask (0 where the key's position <= the query's, -inf elsewhere: masked
  weights come out of Softmax as exact zeros, and zeros add nothing to a sum), Softmax, and the
  weights times V (again one product per row and kv head, M = group x S, over K = T).

Row b, position s of a pass therefore computes exactly what a one-position step at that position
computes, whatever else is in the pass: one-pass verification of drafts is bitwise equal to
decoding them one at a time, and rows with different draft counts share one pass (a shorter row
repeats its last position: the same input at the same position writes the same bytes).

The pass's tensors outside attention are (1, N, .): its N positions, every row's one after
another, so the matrix products compute each real position once (a row padded to the longest
costs nothing there; the products are row-invariant for float matrices and int4 "fast", see
``StageRunner.one_pass_exact``); attention gathers them into rows (B, S) and back.

Cost: about 22 small kernels per layer where GQA was one, and a copy of the first T cached
positions (Slice); on SmolLM2-135M int4 (30 layers) a decode step measured 4-26 % slower than
GQA's (docs/runtime.md): why a mesh that does not speculate runs ``fused`` (GQA's one-position
step is not this graph's bit for bit: its P.V has M = 1).

Graph inputs (replacing ``seqlens_k``/``total_sequence_length``; ``inputs`` computes them):
``attn_gather`` (B, S) int64 (the entry of each row's position among the N), ``attn_scatter``
(N,) int64 (the place of each entry among the B x S), ``attn_positions`` (B, S) int64,
``attn_kv_index`` (B, S, kv_heads, 3) int64 (cache places to write), ``attn_key_pos`` (T,) int64
(0..T-1: the cache positions attended, T = the pass's longest row).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from meshllm.errors import ConfigError, ModelError, PlanError

INPUTS = ("attn_gather", "attn_scatter", "attn_positions", "attn_kv_index", "attn_key_pos")
_REPLACED = ("seqlens_k", "total_sequence_length")
MS_DOMAIN = "com.microsoft"

FUSED, PLAIN = "fused", "plain"
KINDS = (FUSED, PLAIN)
AUTO = "auto"
SETTINGS = (AUTO, *KINDS)  # the choices of the node setting runtime.attention


def choose(setting: str, speculate: bool) -> str:
    """The kind a node setting asks for: ``auto`` is plain where requests speculate by default
    (drafts then verify in one pass), fused elsewhere (the faster step)."""
    if setting == AUTO:
        return PLAIN if speculate else FUSED
    if setting not in KINDS:
        raise ConfigError(f"attention must be one of {', '.join(SETTINGS)}, got {setting!r}")
    return setting


def of_plan(doc: Mapping[str, Any]) -> str:
    """The attention kind a plan document names (``attention``; a plan without one comes from a
    node that ran plain attention whatever it was set to). Raises ``PlanError`` on an unknown one."""
    kind = doc.get("attention", PLAIN)
    if kind not in KINDS:
        raise PlanError(f"plan names attention {kind!r}; known kinds are {', '.join(KINDS)}")
    return str(kind)


def inputs(positions: np.ndarray, num_heads: int, num_kv_heads: int, key_pos: np.ndarray,
           counts: list[int] | None = None) -> dict[str, np.ndarray]:
    """The attention inputs of a pass: ``positions`` (B, S) int64 of every new position (a row
    of ``counts[b]`` < S positions pads with its last one); ``key_pos`` an arange of at least
    the longest row's length, whose prefix is bound. The pass's N = sum(counts) positions are
    its rows' real positions one after another."""
    B, S = positions.shape
    n = [S] * B if counts is None else counts
    at = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    gather = np.minimum(np.arange(S)[None, :], np.array(n)[:, None] - 1) + at[:-1, None]  # (B, S)
    scatter = np.concatenate([b * S + np.arange(c) for b, c in enumerate(n)]).astype(np.int64)  # (N,)
    idx = np.empty((B, S, num_kv_heads, 3), np.int64)
    idx[..., 0] = np.arange(B)[:, None, None]
    idx[..., 1] = np.arange(num_kv_heads)[None, None, :]
    idx[..., 2] = positions[:, :, None]
    total = int(positions.max()) + 1
    return {"attn_gather": np.ascontiguousarray(gather, np.int64), "attn_scatter": scatter,
            "attn_positions": np.ascontiguousarray(positions, np.int64), "attn_kv_index": idx,
            "attn_key_pos": key_pos[:total]}


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
    zero, one, two = (const(np.array([i], np.int64)) for i in range(3))
    # shared by every layer: T (the attended length) and, per query rows r of a position, the (B, 1, S * r, T)
    # additive causal mask of the products' rows (query position s for rows s * r .. s * r + r - 1)
    total = node("Shape", ["attn_key_pos"], "attn/total")
    masks: dict[int, str] = {}

    def mask(r: int) -> str:
        if r not in masks:
            pos = node("Unsqueeze", ["attn_positions", two])  # (B, S, 1)
            pos = node("Expand", [pos, const(np.array([1, 1, r], np.int64))])  # (B, S, r)
            query_pos = node("Reshape", [pos, const(np.array([0, 1, -1, 1], np.int64))])  # (B, 1, S * r, 1)
            allowed = node("LessOrEqual", ["attn_key_pos", query_pos])  # (B, 1, S * r, T)
            masks[r] = node("Where", [allowed, const(np.array(0.0, np.float32)),
                                      const(np.array(-np.inf, np.float32))], f"attn/mask_{r}")
        return masks[r]

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
        rows = max(group, 2)  # query rows per (position, kv head): a group of one gets a zero row
        past_k, past_v, cos, sin = n.input[3], n.input[4], n.input[7], n.input[8]
        out, present_k, present_v = n.output[0], n.output[1], n.output[2]
        # the pass's N positions (1, N, .) laid out as rows (B, S, .) for attention
        qkv = node("Squeeze", [node("Gather", [n.input[0], "attn_gather"], axis=1), zero])
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
        # the first T cache positions, (B, kvh, T, d)
        keys = node("Slice", [present_k, zero, total, two])
        values = node("Slice", [present_v, zero, total, two])
        # one product per (row, kv head) over its group's heads at every position of the pass:
        # (B, kvh, S * rows, .)
        q5 = node("Reshape", [q, const(np.array([0, 0, kvh, group, d], np.int64))])  # (B, S, kvh, group, d)
        if group == 1:
            q5 = node("Pad", [q5, const(np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 0], np.int64))])
        q4 = node("Reshape", [node("Transpose", [q5], perm=[0, 2, 1, 3, 4]),
                              const(np.array([0, 0, -1, d], np.int64))])  # (B, kvh, S * rows, d)
        scores = node("Mul", [node("MatMul", [q4, node("Transpose", [keys], perm=[0, 1, 3, 2])]),
                              const(np.array(scale, np.float32))])  # (B, kvh, S * rows, T)
        probs = node("Softmax", [node("Add", [scores, mask(rows)])], axis=-1)
        o = node("Reshape", [node("MatMul", [probs, values]),
                             const(np.array([0, 0, -1, rows, d], np.int64))])  # (B, kvh, S, rows, d)
        if group == 1:
            o = node("Slice", [o, zero, one, const(np.array([3], np.int64))])
        o = node("Transpose", [o], perm=[0, 2, 1, 3, 4])  # (B, S, kvh, group, d)
        flat = node("Reshape", [o, const(np.array([1, -1, heads * d], np.int64))])  # (1, B * S, heads * d)
        node("Gather", [flat, "attn_scatter"], out, axis=1)  # back to the pass's N positions
    del g.node[:]
    g.node.extend(new)
    g.initializer.extend(inits)
    kept = [vi for vi in g.input if vi.name not in _REPLACED]
    I64 = TensorProto.INT64
    kept += [helper.make_tensor_value_info("attn_gather", I64, ["batch", "seq"]),
             helper.make_tensor_value_info("attn_scatter", I64, ["positions"]),
             helper.make_tensor_value_info("attn_positions", I64, ["batch", "seq"]),
             helper.make_tensor_value_info("attn_kv_index", I64, ["batch", "seq", None, 3]),
             helper.make_tensor_value_info("attn_key_pos", I64, ["total"])]
    del g.input[:]
    g.input.extend(kept)
    # outside attention the batch axis holds 1 and the sequence axis the pass's N positions: the
    # block's shared dim names (the cache's rows are "batch" too) would tie them together
    for vi in [*g.input, *g.output]:
        if not vi.name.startswith(("past_", "present_", "attn_")):
            for dim in vi.type.tensor_type.shape.dim:
                if dim.dim_param in ("batch", "seq"):
                    dim.dim_param = "pass_" + dim.dim_param
    del g.value_info[:]
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model
