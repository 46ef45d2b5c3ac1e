"""``meshllm export`` / ``meshllm generate`` end to end, and every bad input as one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from textutil import BOS_ID, EOS_ID, make_tokenizer, write_tokenizer

from meshllm.cli import main
from meshllm.model.config import ModelConfig
from meshllm.model.manifest import load_manifest

CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position=64, bos_token_id=BOS_ID,
                  eos_token_ids=(EOS_ID,))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meshllm.model.export import export_model, random_weights

    root = tmp_path_factory.mktemp("cli")
    tok = write_tokenizer(root / "tok.json")
    export_model(random_weights(CFG, np.random.default_rng(0)), CFG, root / "m", name="cli-test",
                 tokenizer_file=tok, progress=False)
    return root / "m"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _fails_cleanly(capsys: pytest.CaptureFixture[str], *argv: str, match: str) -> str:
    rc, _, err = _run(capsys, *argv)
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    return lines[0]


def test_generate_streams_the_same_text_json_reports(model_dir: Path, capsys) -> None:
    args = ["generate", "--model", str(model_dir), "--temperature", "0.9", "--top-k", "50", "--top-p", "0.9",
            "--seed", "7", "--max-tokens", "12", "--threads", "1", "The quick"]
    rc, streamed, _ = _run(capsys, *args)
    assert rc == 0
    rc, out, _ = _run(capsys, *args, "--json")
    assert rc == 0
    got = json.loads(out)
    assert set(got) >= {"prompt_token_ids", "token_ids", "text"}
    assert got["prompt_token_ids"][0] == BOS_ID and 1 <= len(got["token_ids"]) <= 12
    assert streamed == got["text"] + "\n"
    # Same seed, same tokens; another seed, other tokens.
    assert json.loads(_run(capsys, *args, "--json")[1])["token_ids"] == got["token_ids"]
    other = [a if a != "7" else "8" for a in args]
    assert json.loads(_run(capsys, *other, "--json")[1])["token_ids"] != got["token_ids"]


def test_generate_stop_string_and_default_model_env(model_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MESHLLM_MODEL", str(model_dir))
    base = ["generate", "--temperature", "0", "--max-tokens", "30", "--ignore-eos", "--json", "x"]
    full = json.loads(_run(capsys, *base)[1])
    assert len(full["token_ids"]) == 30
    text = full["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    cut = json.loads(_run(capsys, *base, "--stop", stop)[1])
    assert cut["text"] == text.split(stop)[0]
    assert cut["token_ids"] == full["token_ids"][: len(cut["token_ids"])]
    assert cut["finish_reason"] == "stop"


def test_chat_flag_renders_the_template(model_dir: Path, capsys) -> None:
    from meshllm.model.tokenizer import Tokenizer

    tok = Tokenizer.from_manifest(load_manifest(model_dir))
    rc, out, _ = _run(capsys, "generate", "--model", str(model_dir), "--chat", "--json", "--max-tokens", "2",
                      "hi there")
    assert rc == 0
    want = tok.encode("<s>user: hi there\nassistant:", add_special_tokens=False)
    assert json.loads(out)["prompt_token_ids"] == want and want[0] == BOS_ID


def test_special_tokens_fall_back_to_the_tokenizer_names(tmp_path: Path, capsys) -> None:
    from meshllm.model.tokenizer import Tokenizer

    tok_file = write_tokenizer(tmp_path / "tok.json")
    out = tmp_path / "small"
    rc, _, _ = _run(capsys, "export", "--random", "--preset", "tiny", "--context", "32", "--tokenizer",
                    str(tok_file), "--out", str(out), "--quiet")
    assert rc == 0
    m = load_manifest(out)
    assert m.config.eos_token_ids == () and m.config.bos_token_id is None
    tok = Tokenizer.from_manifest(m)
    assert tok.eos_token_ids == (EOS_ID,) and tok.bos_token_id == BOS_ID
    big = tmp_path / "big.json"
    inner = make_tokenizer()
    inner.add_tokens([f"<extra_{i}>" for i in range(4000)])  # 4300 tokens
    inner.save(str(big))
    _fails_cleanly(capsys, "export", "--random", "--preset", "tiny", "--tokenizer", str(big), "--out",
                   str(tmp_path / "x"), "--quiet", match="more than the preset's vocabulary of 4096")


def test_export_random_preset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny"
    rc, stdout, _ = _run(capsys, "export", "--random", "--preset", "tiny", "--seed", "3", "--out", str(out),
                         "--dtype", "float16", "--context", "32", "--quiet")
    assert rc == 0
    info = json.loads(stdout)
    m = load_manifest(out)
    assert info["model_id"] == m.model_id and info["dtype"] == "float16" == m.config.weight_dtype
    assert m.config.hidden_size == 256 and m.config.max_position == 32 and m.tokenizer_file is None
    # A model without a tokenizer cannot turn a text prompt into ids.
    _fails_cleanly(capsys, "generate", "--model", str(out), "hi", match="has no tokenizer")
    # Exporting into a directory that holds something else is refused.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    _fails_cleanly(capsys, "export", "--random", "--out", str(tmp_path / "junk"), match="non-empty")


@pytest.mark.parametrize("flags,match", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-p", "0"], "top_p"),
    (["--top-k", "-2"], "top_k"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--seed", "-5"], "seed"),
    (["--stop", ""], "stop string"),
    (["--threads", "0"], "threads"),
])
def test_invalid_sampling_parameters(model_dir: Path, capsys, flags: list[str], match: str) -> None:
    _fails_cleanly(capsys, "generate", "--model", str(model_dir), *flags, "hello", match=match)


def test_prompt_longer_than_the_context(model_dir: Path, capsys) -> None:
    _fails_cleanly(capsys, "generate", "--model", str(model_dir), "the quick brown fox " * 20,
                   match="exceeds the model's context of 64")
    _fails_cleanly(capsys, "generate", "--model", str(model_dir), "--max-tokens", "60", "the quick brown fox",
                   match="lower max_tokens")


def test_missing_and_corrupt_model_files(model_dir: Path, tmp_path: Path, capsys) -> None:
    _fails_cleanly(capsys, "generate", "--model", str(tmp_path / "nowhere"), "hi", match="not found")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    block = broken / load_manifest(model_dir).blocks[1].file
    data = bytearray(block.read_bytes())
    data[len(data) // 2] ^= 0xFF
    block.write_bytes(bytes(data))
    _fails_cleanly(capsys, "generate", "--model", str(broken), "hi", match="sha256 mismatch")
    block.unlink()
    _fails_cleanly(capsys, "generate", "--model", str(broken), "hi", match="missing")
    (broken / "manifest.json").write_text("{ not json")
    _fails_cleanly(capsys, "generate", "--model", str(broken), "hi", match="cannot read")
    (broken / "manifest.json").unlink()
    _fails_cleanly(capsys, "generate", "--model", str(broken), "hi", match="no manifest.json")


def _hf_dir(tmp_path: Path, **overrides: object) -> Path:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300,
              "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True}
    config.update(overrides)
    (d / "config.json").write_text(json.dumps(config))
    write_tokenizer(d / "tokenizer.json")
    return d


def test_bad_checkpoints(tmp_path: Path, capsys) -> None:
    from safetensors.numpy import save_file

    from meshllm.model.export import random_weights

    out = str(tmp_path / "out")
    d = _hf_dir(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _fails_cleanly(capsys, "export", "--hf-dir", str(d), "--out", out, "--quiet", match="unsupported architecture")
    d = _hf_dir(tmp_path)
    _fails_cleanly(capsys, "export", "--hf-dir", str(d), "--out", out, "--quiet", match="no *.safetensors")
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position=64, tie_word_embeddings=True)
    w = {"model." + k: v for k, v in random_weights(cfg, np.random.default_rng(1)).items()}
    save_file(w, str(d / "model.safetensors"))
    assert main(["export", "--hf-dir", str(d), "--out", out, "--quiet"]) == 0  # the good case
    missing = dict(w)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(d / "model.safetensors"))
    _fails_cleanly(capsys, "export", "--hf-dir", str(d), "--out", out, "--quiet",
                   match="weights missing for this config: layers.1.mlp.up_proj.weight")
    save_file(w, str(d / "model.safetensors"))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    _fails_cleanly(capsys, "export", "--hf-dir", str(d), "--out", out, "--quiet", match="truncated or corrupt")
    (d / "model.safetensors").write_bytes(b"\x01\x02")
    _fails_cleanly(capsys, "export", "--hf-dir", str(d), "--out", out, "--quiet", match="not a valid safetensors")
    (d / "tokenizer.json").unlink()
    _fails_cleanly(capsys, "export", "--hf-dir", str(d), "--out", out, "--quiet", match="tokenizer.json missing")
    (d / "config.json").write_text("[1, 2]")
    _fails_cleanly(capsys, "export", "--hf-dir", str(d), "--out", out, "--quiet", match="JSON object")
    (d / "config.json").unlink()
    _fails_cleanly(capsys, "export", "--hf-dir", str(d), "--out", out, "--quiet", match="config.json missing")
    _fails_cleanly(capsys, "export", "--hf-dir", str(tmp_path / "none"), "--out", out, "--quiet", match="not found")
    d2 = _hf_dir(tmp_path, max_position_embeddings=8192, sliding_window=4096,
                 architectures=["MistralForCausalLM"], model_type="mistral")
    _fails_cleanly(capsys, "export", "--hf-dir", str(d2), "--out", out, "--quiet", match="--context 4096")


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "meshllm.cli", "generate", "--model", str(tmp_path / "nope"), "hi"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("meshllm generate: error: model directory not found")


def test_keygen_writes_a_private_key_once(tmp_path, capsys) -> None:
    import stat

    from meshllm.cli import main

    path = tmp_path / "mesh.key"
    assert main(["keygen", str(path)]) == 0
    key = path.read_text().strip()
    assert len(key) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["keygen", str(path)]) == 2  # never overwrites
    assert "never overwrites" in capsys.readouterr().err
    assert path.read_text().strip() == key
