"""Import a GGUF file (llama.cpp, Ollama, LM Studio) of a Llama-family model.

Architectures ``llama`` (which covers Llama 1/2/3, Mistral and SmolLM files), ``mistral`` and
``qwen2``. Tensors are read with the ``gguf`` package: F32, F16, BF16 and every quantized type it
can dequantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K..Q6_K).

* ``float32`` / ``float16`` exports dequantize every tensor.
* ``int4`` exports keep Q4_0, Q4_1 and Q8_0 matrices exactly as stored (``quant.from_gguf``: Q8_0
  stays 8-bit), and quantize any other matrix to 4 bits (``quant.quantize4``), an approximation.

llama.cpp's converter permutes the rows of the Q and K projections of ``llama`` files (rotary
pairs interleaved instead of split in halves); the import undoes it, on quantized rows too (a
quantization block never crosses a row). The tokenizer comes from the metadata
(``gguf_tokenizer``), with BOS/EOS ids and the chat template.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from meshllm.errors import ModelError
from meshllm.model.blocks import DEFAULT_INT4_MODE, Weight
from meshllm.model.config import ModelConfig
from meshllm.model.manifest import Manifest
from meshllm.model.quant import EXACT_GGUF_TYPES, from_gguf, quantize4

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "mistral", "qwen2")
# architectures whose GGUF converter permutes the Q/K rows (the others use NeoX-style RoPE as is)
_PERMUTED_QK = ("llama", "mistral")

_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> meshllm's (Hugging Face without ``model.``); ModelError if unknown."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if gguf_name == "rope_freqs.weight":
        raise ModelError("this GGUF file scales RoPE frequencies (rope_freqs, Llama 3.1 style); "
                         "only plain RoPE is supported")
    raise ModelError(f"GGUF tensor {gguf_name!r} has no place in a Llama-family model "
                     f"(mixture-of-experts and other layouts are not supported)")


@dataclass
class GGUFFile:
    """What a GGUF file holds, read but not yet converted."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Any]  # GGUF name -> gguf.ReaderTensor

    @property
    def architecture(self) -> str:
        return str(self.meta.get("general.architecture", ""))

    def tensor_types(self) -> Counter[str]:
        return Counter(t.tensor_type.name for t in self.tensors.values())


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; every failure is one clear
    ``ModelError`` (not GGUF, truncated, unknown tensor type)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"GGUF file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{p} is not a GGUF file (it does not begin with the bytes 'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(p)
    except ValueError as e:
        msg = str(e)
        m = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", msg)
        if m:
            raise ModelError(f"{p}: tensor type {m.group(1)} is unknown to the gguf reader "
                             f"(a newer or non-standard quantization)") from None
        raise ModelError(f"{p} is not a readable GGUF file (truncated or corrupt): {msg[:200]}") from None
    except (IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as e:
        raise ModelError(f"{p} is not a readable GGUF file (truncated or corrupt): "
                         f"{type(e).__name__}: {str(e)[:200]}") from None
    size = p.stat().st_size
    tensors: dict[str, Any] = {}
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise ModelError(f"{p} is truncated: tensor {t.name!r} ends past the end of the file")
        tensors[t.name] = t
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ModelError(f"{p}: metadata {key!r} is unreadable ({e})") from None
    return GGUFFile(p, meta, tensors)


def _meta_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    v = meta.get(key, default)
    if v is None:
        raise ModelError(f"GGUF metadata lacks {key!r}")
    if isinstance(v, list):  # per-layer values: all must agree
        if not v or len(set(v)) != 1:
            raise ModelError(f"GGUF metadata {key} varies per layer ({v[:4]}...); not supported")
        v = v[0]
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or int(v) <= 0:
        raise ModelError(f"GGUF metadata {key} must be a positive integer, got {v!r}")
    return int(v)


def _meta_float(meta: dict[str, Any], key: str, default: float) -> float:
    v = meta.get(key, default)
    if not isinstance(v, (int, float, np.floating)) or not float(v) > 0:
        raise ModelError(f"GGUF metadata {key} must be a positive number, got {v!r}")
    return float(v)


def config_from_gguf(g: GGUFFile, *, max_position: int | None = None) -> ModelConfig:
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise ModelError(f"unsupported GGUF architecture {arch or '(none)'!r}; meshllm imports "
                         f"{', '.join(ARCHITECTURES)}")
    meta = g.meta

    def k(s: str) -> str:
        return f"{arch}.{s}"

    if meta.get(k("expert_count")):
        raise ModelError("mixture-of-experts GGUF files are not supported")
    scaling = meta.get(k("rope.scaling.type"))
    if scaling not in (None, "none", "") and float(meta.get(k("rope.scaling.factor"), 1.0) or 1.0) != 1.0:
        raise ModelError(f"RoPE scaling {scaling!r} is not supported (only plain RoPE)")
    hidden = _meta_int(meta, k("embedding_length"))
    heads = _meta_int(meta, k("attention.head_count"))
    head_dim = _meta_int(meta, k("attention.key_length"), hidden // heads)
    if _meta_int(meta, k("attention.value_length"), head_dim) != head_dim:
        raise ModelError("GGUF: key and value head sizes differ; not supported")
    if _meta_int(meta, k("rope.dimension_count"), head_dim) != head_dim:
        raise ModelError("GGUF: RoPE on part of each head (rope.dimension_count < head size) is not supported")
    ctx = _meta_int(meta, k("context_length"))
    if max_position is not None:
        if not 0 < max_position <= ctx:
            raise ModelError(f"context {max_position} must be in [1, {ctx}] (the file's context_length)")
        ctx = max_position
    window = meta.get(k("attention.sliding_window"))
    if window and int(window) < ctx:
        raise ModelError(f"sliding-window attention (window {window} < context {ctx}) is not supported; "
                         f"import with --context {window}")
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelError(f"{g.path}: no token_embd.weight tensor")
    vocab = int(emb.shape[1])  # GGUF shapes list the fastest dimension first: (hidden, vocab)
    eos: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(key)
        if isinstance(v, (int, np.integer)) and 0 <= int(v) < vocab and int(v) not in eos:
            eos.append(int(v))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=_meta_int(meta, k("feed_forward_length")),
        num_layers=_meta_int(meta, k("block_count")), num_heads=heads,
        num_kv_heads=_meta_int(meta, k("attention.head_count_kv"), heads), max_position=ctx,
        head_dim=head_dim, rope_theta=_meta_float(meta, k("rope.freq_base"), 10000.0),
        rms_norm_eps=_meta_float(meta, k("attention.layer_norm_rms_epsilon"), 1e-5),
        tie_word_embeddings="output.weight" not in g.tensors,
        qkv_bias="blk.0.attn_q.bias" in g.tensors,
        bos_token_id=int(bos) if isinstance(bos, (int, np.integer)) else None,
        eos_token_ids=tuple(eos), architecture=arch,
    )


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation: GGUF row (h, j, s) holds HF row
    (h, s, j) for head h, rotary pair j, half s."""
    if n_rows % (2 * n_head):
        raise ModelError(f"cannot undo the Q/K row permutation: {n_rows} rows, {n_head} heads")
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _dequantize(t: Any, path: Path) -> np.ndarray:
    from gguf import quants

    try:
        arr = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ModelError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                         f"package cannot dequantize") from None
    shape = tuple(int(s) for s in reversed(t.shape))  # (N, K) for a matrix
    return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)


def load_weights(g: GGUFFile, cfg: ModelConfig, *, weight_dtype: str = "float32",
                 progress: bool = True) -> tuple[dict[str, Weight], Counter[str]]:
    """Weights named as meshllm names them: float32 arrays, or for ``int4`` QuantMatrix
    matrices. Also returns how each matrix was stored: its GGUF type, or "requantized"."""
    from meshllm.model.export import check_weights

    weights: dict[str, Weight] = {}
    how: Counter[str] = Counter()
    perm_heads = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads}
    # a bar on a terminal only (tqdm's disable=None): never in a log file
    for name, t in tqdm(g.tensors.items(), desc=f"read {g.path.name}", unit="tensor",
                        disable=None if progress else True):
        key = hf_name(name)
        w: Weight
        matrix = len(t.shape) == 2
        if weight_dtype == "int4" and matrix and t.tensor_type.name in EXACT_GGUF_TYPES:
            w = from_gguf(np.asarray(t.data), t.tensor_type.name, (int(t.shape[1]), int(t.shape[0])))
            how[t.tensor_type.name] += 1
        elif weight_dtype == "int4" and matrix:
            w = quantize4(_dequantize(t, g.path))
            how["requantized from " + t.tensor_type.name] += 1
        else:
            w = _dequantize(t, g.path)
            how[t.tensor_type.name] += 1
        if g.architecture in _PERMUTED_QK:
            for proj, n_head in perm_heads.items():
                if key.endswith(proj + ".weight") or key.endswith(proj + ".bias"):
                    rows = w.shape[0]
                    idx = _unpermute_rows(rows, n_head)
                    w = w.rows(idx) if not isinstance(w, np.ndarray) else np.ascontiguousarray(w[idx])
        if key in weights:
            raise ModelError(f"{g.path}: tensor {name!r} appears twice")
        weights[key] = w
    try:
        check_weights(weights, cfg)
    except ModelError as e:
        raise ModelError(f"{g.path} does not match its own metadata: {e}") from None
    return weights, how


def tokenizer_json(g: GGUFFile) -> str:
    from meshllm.model.gguf_tokenizer import build_tokenizer

    return str(build_tokenizer(g.meta).to_str())


def import_gguf(path: str | Path, out_dir: str | Path, *, weight_dtype: str = "float32",
                int4_mode: str = DEFAULT_INT4_MODE, name: str | None = None,
                max_position: int | None = None, progress: bool = True) -> Manifest:
    """Import a GGUF file and export it as a meshllm model directory ``out_dir``."""
    from meshllm.model.export import export_model

    g = open_gguf(path)
    cfg = config_from_gguf(g, max_position=max_position)
    tok = tokenizer_json(g)  # before the weights: a tokenizer problem fails fast
    template = g.meta.get("tokenizer.chat_template")
    weights, how = load_weights(g, cfg, weight_dtype=weight_dtype, progress=progress)
    model_name = name or str(g.meta.get("general.name") or g.path.stem)
    return export_model(weights, cfg, out_dir, name=model_name, tokenizer_json=tok,
                        chat_template=template if isinstance(template, str) and template else None,
                        weight_dtype=weight_dtype, int4_mode=int4_mode, progress=progress,
                        provenance={"source": g.path.name, "gguf_tensor_types": dict(how)})
