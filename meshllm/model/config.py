"""Model configuration, named presets, and the per-block cost profile.

Block indexing is shared by the whole project (manifest, runtime, planner, plans, wire):

    block 0            embed   (token ids -> hidden)
    block 1 .. L       decoder layer 0 .. L-1
    block L + 1        head    (final norm + lm_head -> logits)

A plan's ``layers: [first, end)`` ranges are half-open ranges of these block indices, so the
embedding and the head are placed (and their memory charged) like any other unit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from meshllm.errors import ModelError

DTYPE_BYTES = {"float32": 4, "float16": 2}
# Bytes per matrix weight as stored and as onnxruntime holds it: int4 packs two values a byte
# plus, per block of 32, a float32 scale and a 4-bit zero point (MatMulNBits' layout). Exports
# from quantized files record each block's exact bytes instead (Q4_1 offsets, 8-bit tables).
# int4 blocks run their matrices with MatMulNBits at one of two accuracy levels: "exact" computes
# in float32 on the dequantized blocks (level 0), "fast" quantizes the activations to int8 per
# block and uses integer dot products (level 4). docs/models.md holds the measured agreement.
INT4_MODES = {"exact": 0, "fast": 4, "compact": 4}
DEFAULT_INT4_MODE = "fast"
MATRIX_BYTES_PER_PARAM = {"float32": 4.0, "float16": 2.0, "int4": 0.5 + (4 + 0.5) / 32}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position: int  # context length in tokens
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2-style q/k/v projections with bias
    weight_dtype: str = "float32"  # storage dtype of the weights; compute is float32
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.num_heads > 0 and self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append("num_heads must be a multiple of num_kv_heads")
        if self.weight_dtype not in MATRIX_BYTES_PER_PARAM:
            problems.append(f"weight_dtype must be one of {sorted(MATRIX_BYTES_PER_PARAM)}")
        if self.head_dim % 2:
            problems.append("head_dim must be even (RoPE rotates pairs)")
        if problems:
            raise ModelError("invalid model config: " + "; ".join(problems))

    # --- derived shapes -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.num_layers + 2

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def weight_bytes(self) -> int:
        """Bytes of a stored vector weight (norms, biases): int4 models keep those in float32."""
        return DTYPE_BYTES.get(self.weight_dtype, 4)

    @property
    def matrix_bytes_per_param(self) -> float:
        return MATRIX_BYTES_PER_PARAM[self.weight_dtype]

    def block_name(self, index: int) -> str:
        if index == 0:
            return "embed"
        if index == self.num_layers + 1:
            return "head"
        if 1 <= index <= self.num_layers:
            return f"layer.{index - 1}"
        raise IndexError(f"block index {index} out of range [0, {self.num_blocks})")

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"unknown model config keys: {sorted(unknown)}")
        d = dict(d)
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(int(x) for x in d["eos_token_ids"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ModelError(f"invalid model config: {e}") from None


@dataclass(frozen=True, slots=True)
class BlockCost:
    """What one block costs per token; the planner's model profile is a list of these."""

    index: int
    name: str
    kind: str  # "embed" | "layer" | "head"
    param_bytes: int
    flops_per_token: int  # matmul FLOPs per token, excluding attention over the context
    attn_flops_per_token_per_ctx: int  # extra FLOPs per token per position of context
    activation_bytes_per_token: int  # bytes of the block's output per token (fp32 hidden / ids)
    kv_bytes_per_token: int  # KV cache bytes per token held by this block (fp32 cache)
    extra: dict[str, Any] = field(default_factory=dict)


def block_costs(cfg: ModelConfig, kv_dtype_bytes: int = 4) -> list[BlockCost]:
    """Analytic per-block costs. Activations and KV are float32 at run time."""
    h, w, mw = cfg.hidden_size, cfg.weight_bytes, cfg.matrix_bytes_per_param
    out: list[BlockCost] = []
    embed_params = cfg.vocab_size * h
    out.append(BlockCost(0, "embed", "embed", round(embed_params * mw), 0, 0, h * 4, 0))
    attn = h * cfg.q_size + 2 * h * cfg.kv_size + cfg.q_size * h
    bias = (cfg.q_size + 2 * cfg.kv_size) if cfg.qkv_bias else 0
    mlp = 3 * h * cfg.intermediate_size
    norms = 2 * h
    for i in range(cfg.num_layers):
        out.append(BlockCost(
            i + 1, f"layer.{i}", "layer",
            param_bytes=round((attn + mlp) * mw) + (bias + norms) * w,
            flops_per_token=2 * (attn + mlp),
            # q·K^T and P·V: 2 FLOPs each per head dim per position
            attn_flops_per_token_per_ctx=4 * cfg.q_size,
            activation_bytes_per_token=h * 4,
            kv_bytes_per_token=2 * cfg.kv_size * kv_dtype_bytes,
        ))
    # final norm + lm_head (a copy even when tied)
    out.append(BlockCost(cfg.num_layers + 1, "head", "head", h * w + round(cfg.vocab_size * h * mw),
                         2 * cfg.vocab_size * h, 0, cfg.vocab_size * 4, 0))
    return out


def param_count(cfg: ModelConfig) -> int:
    """Unique parameters (a tied embedding counted once)."""
    h = cfg.hidden_size
    per_layer = (h * cfg.q_size + 2 * h * cfg.kv_size + cfg.q_size * h + 3 * h * cfg.intermediate_size
                 + 2 * h + ((cfg.q_size + 2 * cfg.kv_size) if cfg.qkv_bias else 0))
    tables = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return tables + cfg.num_layers * per_layer + h


# Named presets. `tiny` is the shape of the bundled model (models/tiny); `bench` is the
# ~125M-parameter Llama shape the runtime benchmark uses; the llama2-* shapes are DESIGN §10
# (too big to ship; the planner and simulator use their profiles).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=6,
                        num_heads=8, num_kv_heads=4, max_position=512, tie_word_embeddings=True,
                        rms_norm_eps=1e-5),
    "small": ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
                         num_heads=8, num_kv_heads=4, max_position=1024),
    "bench": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                         num_heads=12, num_kv_heads=4, max_position=2048),
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, max_position=4096),
    "llama2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                              num_layers=40, num_heads=40, num_kv_heads=40, max_position=4096),
    "llama2-70b": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8, max_position=4096),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
