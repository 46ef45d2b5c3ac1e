"""Small GGUF files written by the tests themselves (with the ``gguf`` package), and the numpy
truth they hold.

``write_model`` writes a Llama-shaped model whose matrices are stored in one GGUF tensor type,
permuting the Q/K rows as llama.cpp's converter does, and returns the weights a correct import
must recover: every tensor dequantized by the ``gguf`` package and un-permuted here,
independently of meshllm's code. K-quant tensors (which ``gguf`` cannot quantize) are random
blocks with sane scale fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from meshllm.model.config import ModelConfig

# K-quants work on blocks of 256: every matrix's K is a multiple of it
CFG = ModelConfig(vocab_size=268, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))

# byte offsets of the float16 scale fields in one block of each K-quant type, and a value for
# them that gives weights of about 0.05 (the block's integer scales times its values reach
# about 1000 for Q6_K, 500 for Q4_K, ...)
_K_SCALE_FIELDS = {T.Q4_K: ((0, 2), 1e-4), T.Q5_K: ((0, 2), 5e-5), T.Q6_K: ((208,), 5e-5),
                   T.Q2_K: ((80, 82), 1e-3), T.Q3_K: ((108,), 5e-4)}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


GPT2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
               ("Ġ", "c"), ("a", "t")]


def gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    """268 tokens: 3 control tokens, 256 byte symbols, 9 merged pieces; and the merges."""
    tokens = GPT2_SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + [a + b for a, b in GPT2_MERGES]
    types = [3] * len(GPT2_SPECIALS) + [1] * (len(tokens) - len(GPT2_SPECIALS))
    return tokens, types, [f"{a} {b}" for a, b in GPT2_MERGES]


SPM_PIECES = ["▁", "a", "b", "c", "e", "h", "l", "o", "t", "r", "▁t", "he", "▁the", "ll", "llo", "▁h", "▁he",
              "▁hello", "at", "▁c", "▁cat"]


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    return tokens, types, scores


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: rotary halves interleaved, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    fwd = permute_qk(np.arange(w.shape[0]), n_head)
    return w[np.argsort(fwd)]


def _gguf_name(hf: str) -> str:
    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    layer, rest = parts[1], ".".join(parts[2:])
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    return f"blk.{layer}.{names[rest]}"


def _encode(w: np.ndarray, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """A matrix (N, K) as the bytes (or floats) of one GGUF tensor type."""
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype in _K_SCALE_FIELDS:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = w.shape[0] * (w.shape[1] // block)
        raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
        offsets, base = _K_SCALE_FIELDS[qtype]
        for off in offsets:
            d = (base * (0.5 + rng.random((n, 1)))).astype(np.float16)
            raw[:, off:off + 2] = d.view(np.uint8)
        return raw.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def write_model(path: Path, qtype: T, *, seed: int = 0, arch: str = "llama", cfg: ModelConfig = CFG,
                tokenizer: str = "gpt2", meta: dict[str, Any] | None = None,
                tensor_types: dict[str, T] | None = None) -> dict[str, np.ndarray]:
    """Write a GGUF model with every matrix in ``qtype`` (norms F32); return the float32 weights
    (meshllm names) that the file holds."""
    from meshllm.model.export import random_weights

    rng = np.random.default_rng(seed)
    weights = random_weights(cfg, rng)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    if tokenizer == "gpt2":
        tokens, types, merges = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    else:
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for k, v in (meta or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)
    truth: dict[str, np.ndarray] = {}
    heads = {"self_attn.q_proj.weight": cfg.num_heads, "self_attn.k_proj.weight": cfg.num_kv_heads}
    for name, arr in weights.items():
        n_head = next((h for suffix, h in heads.items() if name.endswith(suffix)), None)
        if arch == "llama" and n_head is not None:
            arr = permute_qk(arr, n_head)
        t = (tensor_types or {}).get(name, qtype if arr.ndim == 2 else T.F32)
        data = _encode(arr, t, rng)
        if t in (T.F32, T.F16):
            w.add_tensor(_gguf_name(name), data)
        else:
            w.add_tensor(_gguf_name(name), data, raw_dtype=t)
        stored = gguf.quants.dequantize(data, t).reshape(arr.shape).astype(np.float32)
        truth[name] = _unpermute(stored, n_head) if arch == "llama" and n_head is not None else stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return truth
