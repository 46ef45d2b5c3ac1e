"""Write a model directory: one ONNX file per block plus ``manifest.json``.

``random_weights`` makes a Llama-shaped model for tests and benchmarks; ``export_model`` turns any
weight dict (Hugging Face names without the ``model.`` prefix) into blocks.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from meshllm.errors import ModelError
from meshllm.model.blocks import (
    DEFAULT_INT4_MODE,
    INT4_MODES,
    WEIGHT_DTYPES,
    ExternalData,
    Weight,
    build_block,
    check_supported,
)
from meshllm.model.config import ModelConfig, block_costs
from meshllm.model.manifest import Manifest, load_manifest, write_manifest
from meshllm.model.quant import QuantMatrix


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the config implies, with its HF shape (out_features, in_features)."""
    H, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, H), "norm.weight": (H,)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    return shapes


def random_weights(cfg: ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 weights scaled so activations stay O(1) through every layer.

    Projections ~ N(0, 1/fan_in) and unit-variance embeddings make attention and logits far from
    uniform, so a wrong rotation, mask or head grouping moves the logits well beyond the tests'
    tolerances (small "initialiser" scales would hide such bugs under 1e-4).
    """
    out: dict[str, np.ndarray] = {}
    for name, shape in weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif name == "embed_tokens.weight":
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = w.astype(np.float32)
    return out


def check_weights(weights: Mapping[str, Weight], cfg: ModelConfig) -> None:
    """Every expected weight present with the right shape; nothing unexpected."""
    want = weight_shapes(cfg)
    missing = [k for k in want if k not in weights]
    if missing:
        raise ModelError(f"weights missing for this config: {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for k, shape in want.items():
        if tuple(weights[k].shape) != shape:
            raise ModelError(f"weight {k} has shape {tuple(weights[k].shape)}, config implies {shape}")
    extra = sorted(set(weights) - set(want))
    if extra:
        raise ModelError(f"unexpected weights for this config: {', '.join(extra[:5])}")


def block_file(cfg: ModelConfig, index: int) -> str:
    return f"{cfg.block_name(index)}.onnx"


# Blocks with more weight bytes than this keep them in a side file ``<block>.onnx.data`` (listed
# in the manifest's extra_files, so verified like the blocks): a protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1 << 30


def _initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of a block's weights as stored (inline or in its side file). The rotary tables are
    left out: a stage's fused session holds one copy for all its layers."""
    total = 0
    for t in model.graph.initializer:
        if t.name in ("cos_cache", "sin_cache"):
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            total += len(t.raw_data)
    return total


def export_model(weights: Mapping[str, Weight], cfg: ModelConfig, out_dir: str | Path, *, name: str,
                 tokenizer_file: str | Path | None = None, chat_template: str | None = None,
                 weight_dtype: str = "float32", progress: bool = True,
                 external_data: bool | None = None, int4_mode: str = DEFAULT_INT4_MODE,
                 tokenizer_json: str | None = None, provenance: dict[str, Any] | None = None) -> Manifest:
    """Build every block, write them and ``manifest.json`` under ``out_dir``; return the manifest.

    The manifest's config records ``weight_dtype`` (so ``param_bytes`` are the stored bytes; for
    int4, the bytes of each block's initializers as written). ``external_data``: weights in side
    files for every block (True), none (False), or only for blocks over ``EXTERNAL_DATA_BYTES``
    (None, the default). ``tokenizer_json``: tokenizer.json text to write (instead of copying
    ``tokenizer_file``). ``provenance``: recorded in the manifest (source file, int4 mode).
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ModelError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, not {weight_dtype!r}")
    if weight_dtype == "int4" and int4_mode not in INT4_MODES:
        raise ModelError(f"int4 mode must be one of {', '.join(INT4_MODES)}, not {int4_mode!r}")
    if weight_dtype != "int4" and any(isinstance(w, QuantMatrix) for w in weights.values()):
        weights = {k: (w.dequantize() if isinstance(w, QuantMatrix) else w) for k, w in weights.items()}
    cfg = dataclasses.replace(cfg, weight_dtype=weight_dtype)
    check_supported(cfg)
    check_weights(weights, cfg)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    files, extra = [], []
    costs = block_costs(cfg)
    # a bar on a terminal only (tqdm's disable=None): never in a log file
    for index in tqdm(range(cfg.num_blocks), desc=f"export {name}", unit="block",
                      disable=None if progress else True):
        f = block_file(cfg, index)
        side = None
        if external_data or (external_data is None and costs[index].param_bytes > EXTERNAL_DATA_BYTES):
            side = ExternalData(root / (f + ".data"))
            extra.append(side.location)
        try:
            model = build_block(weights, cfg, index, weight_dtype, external=side, int4_mode=int4_mode)
        finally:
            if side is not None:
                side.close()
        if weight_dtype == "int4":
            costs[index] = dataclasses.replace(costs[index], param_bytes=_initializer_bytes(model))
        onnx.save_model(model, str(root / f))
        files.append(f)
        del model
    tok_name = None
    if tokenizer_json is not None:
        tok_name = "tokenizer.json"
        (root / tok_name).write_text(tokenizer_json, encoding="utf-8")
    elif tokenizer_file is not None:
        src = Path(tokenizer_file)
        if not src.is_file():
            raise ModelError(f"tokenizer file not found: {src}")
        tok_name = "tokenizer.json"
        if src.resolve() != (root / tok_name).resolve():
            shutil.copyfile(src, root / tok_name)
    info = dict(provenance or {})
    if weight_dtype == "int4":
        info["int4_mode"] = int4_mode
    write_manifest(root, name, cfg, files, costs, tokenizer_file=tok_name, chat_template=chat_template,
                   extra_files=extra, provenance=info or None)
    return load_manifest(root)
