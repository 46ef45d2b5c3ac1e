"""A plain numpy Llama-family forward pass: the truth the ONNX blocks are tested against.

Written for reading, not speed: full causal attention over the whole sequence, no KV cache, in
float64 so that its own rounding is far below the tolerances the tests state. Weight names and
shapes follow Hugging Face (``W`` is (out_features, in_features), so a projection is ``x @ W.T``).
"""

from __future__ import annotations

import numpy as np

from meshllm.model.config import ModelConfig


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
    return x / np.sqrt(var + eps) * w  # (T, H)


def rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """HF "rotate_half" RoPE: x (T, h, d) at positions pos (T,)."""
    d = x.shape[-1]
    # angles in float32 as HF computes them, then the rotation in float64
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    ang = np.outer(pos.astype(np.float32), inv_freq.astype(np.float32)).astype(np.float32)  # (T, d/2)
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1).astype(np.float64)[:, None, :]  # (T, 1, d)
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1).astype(np.float64)[:, None, :]  # (T, 1, d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = np.concatenate([-x2, x1], axis=-1)  # (T, h, d)
    return x * cos + rotated * sin


def _f(w: np.ndarray) -> np.ndarray:
    return np.asarray(w, dtype=np.float64)


def layer(x: np.ndarray, weights: dict[str, np.ndarray], cfg: ModelConfig, i: int) -> np.ndarray:
    """Decoder layer ``i`` on hidden states x (T, H) at positions 0..T-1."""
    T = x.shape[0]
    nh, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p, a = f"layers.{i}.", f"layers.{i}.self_attn."
    h = rms_norm(x, _f(weights[p + "input_layernorm.weight"]), cfg.rms_norm_eps)  # (T, H)
    q = h @ _f(weights[a + "q_proj.weight"]).T  # (T, nh*d)
    k = h @ _f(weights[a + "k_proj.weight"]).T  # (T, kvh*d)
    v = h @ _f(weights[a + "v_proj.weight"]).T  # (T, kvh*d)
    if cfg.qkv_bias:
        q = q + _f(weights[a + "q_proj.bias"])
        k = k + _f(weights[a + "k_proj.bias"])
        v = v + _f(weights[a + "v_proj.bias"])
    pos = np.arange(T)
    q = rope(q.reshape(T, nh, d), pos, cfg.rope_theta)  # (T, nh, d)
    k = rope(k.reshape(T, kvh, d), pos, cfg.rope_theta)  # (T, kvh, d)
    v = v.reshape(T, kvh, d)  # (T, kvh, d)
    group = nh // kvh
    k = np.repeat(k, group, axis=1)  # (T, nh, d): query head j uses KV head j // group
    v = np.repeat(v, group, axis=1)  # (T, nh, d)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)  # (nh, T, T)
    scores = scores + np.triu(np.full((T, T), -np.inf), k=1)  # causal
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(axis=-1, keepdims=True)  # (nh, T, T)
    attn = np.einsum("hts,shd->thd", probs, v).reshape(T, nh * d)  # (T, nh*d)
    x = x + attn @ _f(weights[a + "o_proj.weight"]).T  # (T, H)
    h = rms_norm(x, _f(weights[p + "post_attention_layernorm.weight"]), cfg.rms_norm_eps)
    m = p + "mlp."
    gate = h @ _f(weights[m + "gate_proj.weight"]).T  # (T, I)
    up = h @ _f(weights[m + "up_proj.weight"]).T  # (T, I)
    silu = gate / (1.0 + np.exp(-gate))
    return x + (silu * up) @ _f(weights[m + "down_proj.weight"]).T  # (T, H)


def embed(ids: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    return _f(weights["embed_tokens.weight"])[np.asarray(ids)]  # (T, H)


def head(x: np.ndarray, weights: dict[str, np.ndarray], cfg: ModelConfig) -> np.ndarray:
    h = rms_norm(x, _f(weights["norm.weight"]), cfg.rms_norm_eps)  # (T, H)
    lm = weights["embed_tokens.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
    return h @ _f(lm).T  # (T, V)


def hidden_states(ids: np.ndarray, weights: dict[str, np.ndarray], cfg: ModelConfig) -> list[np.ndarray]:
    """Hidden state after each block of ids (T,): [embed, layer 0, ..., layer L-1], each (T, H)."""
    x = embed(ids, weights)
    out = [x]
    for i in range(cfg.num_layers):
        x = layer(x, weights, cfg, i)
        out.append(x)
    return out


def forward(ids: np.ndarray, weights: dict[str, np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """Logits (T, V), float64, for token ids (T,) at positions 0..T-1."""
    return head(hidden_states(ids, weights, cfg)[-1], weights, cfg)
