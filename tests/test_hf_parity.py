"""Hugging Face import == transformers: logits within atol 1e-4 and 20 identical greedy tokens.

Each test builds a small random checkpoint locally (no hub), saves it with ``save_pretrained``
(safetensors, sharded for one of them) next to a tokenizer trained on the fly, imports it with
``meshllm export --hf-dir`` in-process, and compares against transformers on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from textutil import BOS_ID, EOS_ID, PAD_ID, write_tokenizer

from meshllm.cli import main
from meshllm.errors import ModelError
from meshllm.model.hf_import import config_from_hf, read_checkpoint
from meshllm.model.manifest import load_manifest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

SHAPE = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "rms_norm_eps": 1e-6, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _scale_weights(model, seed: int, embed_gain: float) -> None:
    """Re-draw weights at unit scale: HF's 0.02 init makes near-uniform logits, whose greedy
    tokens are decided by noise; these make wrong rotations or biases show far above 1e-4."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                fan_in = p.shape[1] if "embed_tokens" not in name else 1
                # Small embeddings, so the layers dominate the residual stream and a tied head
                # does not just echo the input token back.
                gain = embed_gain if "embed_tokens" in name else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def _checkpoint(tmp_path: Path, kind: str, *, dtype=None, shard: bool = False) -> tuple[Path, object]:
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=(kind == "smollm"), rope_theta=5e4)
        model = transformers.LlamaForCausalLM(cfg)
    # Seeds whose random models do not fall into a one-token loop within 20 greedy steps (tied
    # random models easily do), so the greedy comparison exercises many decode positions.
    _scale_weights(model, seed={"llama": 3, "smollm": 1, "qwen2": 3}[kind],
                   embed_gain=0.2 if kind == "llama" else 0.05)
    model.eval()
    d = tmp_path / f"hf-{kind}"
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(d, max_shard_size="60KB" if shard else "50GB")
    write_tokenizer(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return d, model.float()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # compare n tokens, EOS or not
    x = torch.tensor([ids])
    with torch.no_grad():
        # An explicit mask: inferred from pad_token_id it would mask out a BOS sharing its id.
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=PAD_ID)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind,shard", [("llama", False), ("smollm", False), ("qwen2", True)])
def test_imported_model_matches_transformers(tmp_path: Path, capsys, kind: str, shard: bool) -> None:
    from meshllm.runtime.runner import StageRunner

    hf_dir, model = _checkpoint(tmp_path, kind, shard=shard)
    if shard:
        assert (hf_dir / "model.safetensors.index.json").is_file()
        assert len(list(hf_dir.glob("*.safetensors"))) > 2
    out = tmp_path / "m"
    assert main(["export", "--hf-dir", str(hf_dir), "--out", str(out), "--quiet"]) == 0
    m = load_manifest(out)
    cfg = m.config
    assert cfg.architecture == ("qwen2" if kind == "qwen2" else "llama")
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_word_embeddings == (kind != "llama")
    assert cfg.eos_token_ids == (EOS_ID,) and cfg.bos_token_id == BOS_ID
    assert m.chat_template == TEMPLATE and m.tokenizer_file == "tokenizer.json"

    ids = [BOS_ID, 17, 42, 199, 3, 250, 77, 5, 120, 64, 31]
    runner = StageRunner(m, 0, cfg.num_blocks, threads=1)
    runner.alloc("p", len(ids))
    ours = runner.prefill("p", np.asarray(ids, dtype=np.int64), last_only=False)  # (T, V)
    runner.free("p")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    assert ours.shape == theirs.shape
    assert np.abs(theirs).max() > 1.0  # logits far from uniform, so the comparison has teeth
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # 20 greedy tokens through the CLI (prompt encoded by the shipped tokenizer, with BOS).
    prompt = "The quick brown fox"
    capsys.readouterr()
    rc = main(["generate", "--model", str(out), "--json", "--temperature", "0", "--max-tokens", "20",
               "--ignore-eos", "--threads", "1", prompt])
    got = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert got["prompt_token_ids"][0] == BOS_ID
    want = _hf_greedy(model, got["prompt_token_ids"], 20)
    assert got["token_ids"] == want
    assert len(set(want)) > 3  # not a degenerate repetition


def test_bf16_checkpoint_is_widened_exactly(tmp_path: Path) -> None:
    hf_dir, model = _checkpoint(tmp_path, "llama", dtype=torch.bfloat16)
    _, weights, tok, template = read_checkpoint(hf_dir, progress=False)
    assert tok == hf_dir / "tokenizer.json" and template == TEMPLATE
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    assert set(weights) == set(state)
    for k, w in weights.items():
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, state[k].numpy())  # bf16 -> f32 is exact


def test_mistral_sliding_window_is_refused_inside_the_context_and_accepted_outside() -> None:
    raw = {**SHAPE, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
           "max_position_embeddings": 8192, "sliding_window": 4096}
    with pytest.raises(ModelError, match=r"sliding-window attention \(window 4096 < context 8192\)"):
        config_from_hf(raw)
    cfg = config_from_hf(raw, max_position=4096)
    assert cfg.max_position == 4096 and cfg.architecture == "mistral"
    assert config_from_hf({**raw, "sliding_window": None}).max_position == 8192
    # Qwen2 records a window it does not use unless use_sliding_window is set.
    qwen = {**SHAPE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16}
    assert config_from_hf(qwen).qkv_bias
    with pytest.raises(ModelError, match="sliding-window"):
        config_from_hf({**qwen, "use_sliding_window": True})
    # transformers 5 lists per-layer attention types; a window on any layer counts.
    assert config_from_hf({**qwen, "layer_types": ["full_attention"] * 2}).max_position == 128
    with pytest.raises(ModelError, match="sliding-window"):
        config_from_hf({**qwen, "layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(ModelError, match="layer types"):
        config_from_hf({**qwen, "layer_types": ["linear_attention"] * 2})


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture GPT2LMHeadModel"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
    ({"num_hidden_layers": None}, "lacks 'num_hidden_layers'"),
    ({"eos_token_id": "x"}, "token id"),
    ({"head_dim": "16"}, "head_dim must be a positive integer"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"num_attention_heads": 5}, "multiple of num_kv_heads"),
])
def test_bad_configs_are_refused_with_a_clear_message(change: dict, message: str) -> None:
    raw = {**SHAPE, "architectures": ["LlamaForCausalLM"], "model_type": "llama", **change}
    with pytest.raises(ModelError, match=message):
        config_from_hf(raw)


def test_eos_from_generation_config_and_theta_from_old_style_config(tmp_path: Path) -> None:
    raw = {**SHAPE, "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0, "rope_scaling": None}
    cfg = config_from_hf(raw, extra_eos=[7, EOS_ID])
    assert cfg.rope_theta == 500000.0 and cfg.eos_token_ids == (EOS_ID, 7)
    assert config_from_hf({**raw, "eos_token_id": [1, 2]}).eos_token_ids == (1, 2)
    # null means "the default": Llama without GQA, head_dim from the hidden size
    cfg = config_from_hf({**raw, "num_key_value_heads": None, "head_dim": None})
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16
