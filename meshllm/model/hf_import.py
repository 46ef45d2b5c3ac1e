"""Import a local Hugging Face-format checkpoint directory (no network, ever).

Reads ``config.json``, ``*.safetensors`` (one file, or shards listed by
``model.safetensors.index.json``), ``tokenizer.json`` and, when present, the chat template
(``tokenizer_config.json``'s ``chat_template``, or ``chat_template.jinja`` / ``chat_template.json``
as newer transformers write it). Supported: Llama, Mistral without a sliding window (or with one
no smaller than the context), Qwen2 (q/k/v bias, often tied embeddings), and SmolLM-style models
(Llama architecture with tied embeddings). Weights come out as float32 numpy arrays named as
Hugging Face names them without the ``model.`` prefix, then ``export_model`` writes the blocks.

Anything this cannot represent exactly (RoPE scaling, attention or MLP biases other than Qwen2's
q/k/v, activations other than SiLU, sliding-window attention inside the context) is refused with
a ``ModelError`` rather than imported approximately.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from meshllm.errors import ModelError
from meshllm.model.config import ModelConfig
from meshllm.model.manifest import Manifest

# HF architecture class -> (our architecture name, model_type values it goes with)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
INDEX_NAME = "model.safetensors.index.json"
# Buffers some checkpoints carry that are not weights (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{what} missing: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {what} {path}: {e}") from None


def _int(raw: dict[str, Any], key: str, *, default: int | None = None) -> int:
    v = raw.get(key)
    if v is None:  # absent or null: the architecture's default, if it has one
        v = default
    if v is None:
        raise ModelError(f"config.json lacks {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ModelError(f"config.json: {key} must be a positive integer, got {v!r}")
    return v


def _float(raw: dict[str, Any], key: str, default: float) -> float:
    v = raw.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ModelError(f"config.json: {key} must be a positive number, got {v!r}")
    return float(v)


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return list(v)
    raise ModelError(f"token id must be an integer or a list of integers, got {v!r}")


def architecture_of(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures")
    names = archs if isinstance(archs, list) else []
    for a in names:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = raw.get("model_type")
    if not names and mt in MODEL_TYPES:
        return MODEL_TYPES[str(mt)]
    shown = ", ".join(map(str, names)) or f"model_type {mt!r}"
    raise ModelError(f"unsupported architecture {shown} in config.json; meshllm imports "
                     f"{', '.join(ARCHITECTURES)} (SmolLM is LlamaForCausalLM)")


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta: Any = raw.get("rope_theta", 10000.0)
    for block in (params, scaling):
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ModelError(f"config.json: rope parameters must be an object, got {block!r}")
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ("default", None):
            raise ModelError(f"RoPE scaling {kind!r} is not supported (only plain RoPE)")
        if "rope_theta" in block:
            theta = block["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ModelError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def config_from_hf(raw: Any, *, max_position: int | None = None,
                   extra_eos: list[int] | None = None) -> ModelConfig:
    """Map a Hugging Face ``config.json`` dict to a ``ModelConfig`` (or refuse it clearly).

    ``max_position`` caps the context below the checkpoint's ``max_position_embeddings``.
    """
    if not isinstance(raw, dict):
        raise ModelError("config.json must hold a JSON object")
    arch = architecture_of(raw)
    act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise ModelError(f"activation {act!r} is not supported (the MLP is SwiGLU with SiLU)")
    if raw.get("attention_bias"):
        raise ModelError("attention_bias=true (bias on every attention projection) is not supported")
    if raw.get("mlp_bias"):
        raise ModelError("mlp_bias=true is not supported")
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    ctx = _int(raw, "max_position_embeddings", default=None)
    if max_position is not None:
        if max_position <= 0 or max_position > ctx:
            raise ModelError(f"context {max_position} must be in [1, {ctx}] (the checkpoint's "
                             f"max_position_embeddings)")
        ctx = max_position
    _check_sliding_window(raw, arch, ctx)
    head_dim = _int(raw, "head_dim", default=hidden // heads)
    tied = raw.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ModelError(f"config.json: tie_word_embeddings must be true or false, got {tied!r}")
    eos = _ids(raw.get("eos_token_id"))
    for i in extra_eos or []:
        if i not in eos:
            eos.append(i)
    bos = _ids(raw.get("bos_token_id"))
    return ModelConfig(
        vocab_size=_int(raw, "vocab_size"), hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_layers=_int(raw, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=_int(raw, "num_key_value_heads", default=heads),
        max_position=ctx, head_dim=head_dim, rope_theta=_rope_theta(raw),
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        tie_word_embeddings=tied,
        qkv_bias=arch == "qwen2", bos_token_id=bos[0] if bos else None,
        eos_token_ids=tuple(eos), architecture=arch,
    )


def _check_sliding_window(raw: dict[str, Any], arch: str, ctx: int) -> None:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list):
        unknown = sorted({str(t) for t in layer_types} - {"full_attention", "sliding_attention"})
        if unknown:
            raise ModelError(f"layer types {unknown} are not supported (only full attention)")
        if "sliding_attention" not in layer_types:
            window = None  # newer configs name the layers that use the window: none do
    elif arch == "qwen2" and not raw.get("use_sliding_window", False):
        window = None  # Qwen2 records a window it does not use unless use_sliding_window is set
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ModelError(f"config.json: sliding_window must be a positive integer or null, got {window!r}")
    if window is not None and window < ctx:
        raise ModelError(f"sliding-window attention (window {window} < context {ctx}) is not supported; "
                         f"import with a context of at most {window} tokens (--context {window}) to "
                         f"keep every position inside the window")


# --- safetensors --------------------------------------------------------------------------------

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def _read_safetensors(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one file as float32. BF16 (no numpy dtype) is widened bit-exactly by hand."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelError(f"weight file missing: {path}") from None
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not a valid safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a valid safetensors file: bad header")
    header.pop("__metadata__", None)
    wanted = list(header) if names is None else names
    data: np.ndarray
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    except ValueError:  # nothing after the header
        data = np.zeros(0, dtype=np.uint8)
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        info = header.get(name)
        if not isinstance(info, dict):
            raise ModelError(f"{path} lacks tensor {name!r} that the shard index lists")
        try:
            dtype, shape = info["dtype"], [int(s) for s in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: malformed entry for tensor {name!r}") from None
        count = int(np.prod(shape)) if shape else 1
        width = 2 if dtype in ("BF16", "F16") else np.dtype(_NP_DTYPES.get(dtype, np.uint8)).itemsize
        if dtype not in _NP_DTYPES and dtype != "BF16":
            raise ModelError(f"{path}: tensor {name!r} has dtype {dtype}; only F32/F16/BF16/F64 weights load")
        if not 0 <= start <= end <= data.shape[0] or end - start != count * width:
            raise ModelError(f"{path}: tensor {name!r} points outside the file (truncated or corrupt)")
        raw = data[start:end]
        if dtype == "BF16":
            bits = raw.view("<u2").astype(np.uint32) << 16  # bf16 is the top half of an f32
            arr = bits.view(np.float32)
        else:
            arr = raw.view(np.dtype(_NP_DTYPES[dtype]).newbyteorder("<")).astype(np.float32)
        out[name] = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    del data
    return out


def _weight_files(hf_dir: Path) -> dict[Path, list[str] | None]:
    """Which safetensors files to read, and (for sharded checkpoints) which tensors from each."""
    index = hf_dir / INDEX_NAME
    if index.is_file():
        raw = _read_json(index, "shard index")
        wmap = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ModelError(f"{index} has no weight_map")
        files: dict[Path, list[str] | None] = {}
        for name, fname in wmap.items():
            if not isinstance(fname, str) or Path(fname).is_absolute() or ".." in Path(fname).parts:
                raise ModelError(f"{index}: shard file {fname!r} is outside the checkpoint directory")
            p = hf_dir / fname
            if not p.is_file():
                raise ModelError(f"weight shard missing: {p} (listed in {INDEX_NAME})")
            lst = files.setdefault(p, [])
            assert lst is not None
            lst.append(name)
        return files
    found = sorted(hf_dir.glob("*.safetensors"))
    if not found:
        other = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pt*"))
        hint = f" (found {', '.join(other)}: convert them to safetensors first)" if other else ""
        raise ModelError(f"no *.safetensors weights in {hf_dir}{hint}")
    return {p: None for p in found}


def load_weights(hf_dir: Path, cfg: ModelConfig, *, progress: bool = True) -> dict[str, np.ndarray]:
    """All weights as float32, named without the ``model.`` prefix, checked against ``cfg``."""
    from meshllm.model.export import check_weights

    files = _weight_files(hf_dir)
    weights: dict[str, np.ndarray] = {}
    # a bar on a terminal only (tqdm's disable=None): never in a log file
    for path, names in tqdm(files.items(), desc=f"read {hf_dir.name}", unit="file",
                            disable=None if progress else True):
        for name, arr in _read_safetensors(path, names).items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            key = name.removeprefix("model.")
            if key in weights:
                raise ModelError(f"tensor {name!r} appears twice in the checkpoint")
            weights[key] = arr
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # a saved copy of the tied embedding
    try:
        check_weights(weights, cfg)
    except ModelError as e:
        raise ModelError(f"checkpoint {hf_dir} does not match its config.json: {e}") from None
    return weights


def _chat_template(hf_dir: Path) -> str | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for fname in ("chat_template.json", "tokenizer_config.json"):
        p = hf_dir / fname
        if not p.is_file():
            continue
        raw = _read_json(p, fname)
        tpl = raw.get("chat_template") if isinstance(raw, dict) else None
        if isinstance(tpl, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if isinstance(tpl, str) and tpl:
            return tpl
    return None


def _generation_eos(hf_dir: Path) -> list[int]:
    p = hf_dir / "generation_config.json"
    if not p.is_file():
        return []
    raw = _read_json(p, "generation_config.json")
    return _ids(raw.get("eos_token_id")) if isinstance(raw, dict) else []


def read_checkpoint(hf_dir: str | Path, *, max_position: int | None = None,
                    progress: bool = True) -> tuple[ModelConfig, dict[str, np.ndarray], Path, str | None]:
    """(config, float32 weights, tokenizer.json path, chat template) of a checkpoint directory."""
    root = Path(hf_dir)
    if not root.is_dir():
        raise ModelError(f"checkpoint directory not found: {root}")
    raw = _read_json(root / "config.json", "config.json")
    cfg = config_from_hf(raw, max_position=max_position, extra_eos=_generation_eos(root))
    tok = root / "tokenizer.json"
    if not tok.is_file():
        raise ModelError(f"tokenizer.json missing in {root} (meshllm needs the fast-tokenizer file)")
    weights = load_weights(root, cfg, progress=progress)
    return cfg, weights, tok, _chat_template(root)


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, weight_dtype: str = "float32",
                      name: str | None = None, max_position: int | None = None,
                      progress: bool = True, int4_mode: str | None = None) -> Manifest:
    """Import ``hf_dir`` and export it as a meshllm model directory ``out_dir``."""
    from meshllm.model.blocks import DEFAULT_INT4_MODE
    from meshllm.model.export import export_model

    root = Path(hf_dir)
    if Path(out_dir).resolve() == root.resolve():
        raise ModelError("the output directory must differ from the checkpoint directory")
    cfg, weights, tok, template = read_checkpoint(root, max_position=max_position, progress=progress)
    return export_model(weights, cfg, out_dir, name=name or root.resolve().name, tokenizer_file=tok,
                        chat_template=template, weight_dtype=weight_dtype, progress=progress,
                        int4_mode=int4_mode or DEFAULT_INT4_MODE)
