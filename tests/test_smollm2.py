"""The real SmolLM2-135M-Instruct (fetched once by ``ensure_smollm2`` into the user's cache):
the float32 and the exact int4 imports give the greedy tokens transformers gives loading the
same GGUF file; the fast int4 mode's agreement is reported, not asserted. The chat answers, and
streaming detokenisation of multi-byte characters is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshllm.cli import main
from meshllm.model.fetch import ensure_smollm2, smollm2_gguf
from meshllm.model.manifest import Manifest, load_manifest
from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.runner import StageRunner

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
           "Give me a tip for writing clean code."]
NEW_TOKENS = 16


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    return smollm2_gguf()


def _model(dtype: str, mode: str = "exact") -> Manifest:
    return load_manifest(ensure_smollm2(dtype=dtype, int4_mode=mode))


def _greedy(m: Manifest, ids: list[int], eos: tuple[int, ...]) -> list[int]:
    r = StageRunner(m, 0, m.config.num_blocks, threads=2, max_seqs=1)
    r.alloc(0, len(ids) + NEW_TOKENS + 1)
    logits = r.prefill(0, np.array(ids))
    out: list[int] = []
    while len(out) < NEW_TOKENS:
        t = int(np.argmax(logits))
        out.append(t)
        if t in eos:
            break
        logits = r.decode([0], np.array([t]))[0]
    return out


@pytest.fixture(scope="session")
def hf_greedy(gguf_file: Path) -> dict[str, tuple[list[int], list[int]]]:
    """prompt -> (chat prompt ids, greedy continuation) from transformers on the GGUF file."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    torch.set_num_threads(2)
    kw: dict[str, Any] = {"gguf_file": gguf_file.name}
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32,
                                                              **kw).eval()
    out = {}
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        out[p] = (ids, [int(t) for t in gen[0, len(ids):]])
    return out


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "mode"), [("float32", "exact"), ("int4", "exact")])
def test_greedy_tokens_equal_transformers(hf_greedy: dict[str, tuple[list[int], list[int]]],
                                          dtype: str, mode: str) -> None:
    m = _model(dtype, mode)
    tok = Tokenizer.from_manifest(m)
    for p, (hf_ids, hf_out) in hf_greedy.items():
        ids = tok.encode_chat([{"role": "user", "content": p}])
        assert ids == hf_ids, p  # the tokenizer and chat template from the metadata agree too
        assert _greedy(m, ids, tok.eos_token_ids) == hf_out, p


@pytest.mark.parity
@pytest.mark.slow
def test_fast_mode_agreement_is_reported(hf_greedy: dict[str, tuple[list[int], list[int]]],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    m = _model("int4", "fast")
    tok = Tokenizer.from_manifest(m)
    same, total, first_diff = 0, 0, []
    for ids, hf_out in hf_greedy.values():
        got = _greedy(m, ids, tok.eos_token_ids)
        n = next((i for i, (a, b) in enumerate(zip(got, hf_out, strict=False)) if a != b), min(len(got), len(hf_out)))
        first_diff.append(n)
        same += n
        total += len(hf_out)
        assert len(got) > 0
    with capsys.disabled():
        print(f"\nint4 fast mode: greedy tokens equal to transformers before the first difference: "
              f"{same}/{total} (per prompt {first_diff})")


def test_chat_answers_the_question(capsys: pytest.CaptureFixture[str]) -> None:
    d = ensure_smollm2()
    # not "the capital of France": there the exact computation itself prefers "The" over "L" by
    # only 0.08 logits, and the fast mode's int8 activations may take either (docs/models.md)
    rc = main(["generate", "--chat", "What is the capital city of Japan?", "--model", str(d),
               "--temperature", "0", "--max-tokens", "16", "--threads", "2"])
    assert rc == 0
    assert "Tokyo" in capsys.readouterr().out


def test_streaming_multibyte_characters() -> None:
    tok = Tokenizer.from_manifest(load_manifest(ensure_smollm2(), verify=False))
    text = "Crème brûlée, 東京 and 🎉🦀 — naïve café."
    ids = tok.encode(text)
    assert len(ids) > 10
    s = tok.stream()
    parts = [s.push(i) for i in ids]
    parts.append(s.finish())
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)
    # an emoji is several byte-level tokens: some pushes must have held text back
    assert "" in parts[:-1]


def test_one_pass_verification_is_one_position_steps_bit_for_bit_on_int4_fast() -> None:
    """The default import (int4 fast: int8 activations, where a 1e-7 difference in attention
    becomes whole quantization steps): a pass of 8 positions, and rows of different counts and
    lengths in one pass, give the logits of one-position steps exactly; greedy decoding that
    verifies prompt-lookup drafts in one pass gives the plain loop's tokens."""
    from meshllm.serve.spec import PromptLookup

    m = _model("int4", "fast")
    tok = Tokenizer.from_manifest(m)
    r = StageRunner(m, 0, m.config.num_blocks, threads=2, max_seqs=8, one_pass=True)
    assert r.one_pass_exact
    ids = np.array(tok.encode_chat([{"role": "user", "content": "Repeat this line exactly: "
                                     "def area(r): return 3.14159 * r * r  # the area of a circle"}]))
    n = len(ids)
    r.alloc("steps", n + 80)
    plain = [int(r.prefill("steps", ids).argmax())]
    steps = []
    while len(plain) < 48:
        steps.append(r.decode(["steps"], np.array(plain[-1:]))[0].copy())
        plain.append(int(steps[-1].argmax()))
    for s in ("pass", "late"):
        r.alloc(s, n + 20)
        r.prefill(s, ids)
    r.prefill("late", np.array(plain[:3]), last_only=False)
    out, ok, _ = r.decode_rows(["pass", "late"], np.array(plain[:8] + plain[3:6]), counts=[8, 3])
    assert ok == [0, 1]
    np.testing.assert_array_equal(out, np.stack(steps[:8] + steps[3:6]))
    r.alloc("spec", n + 80)
    got = [int(r.prefill("spec", ids).argmax())]
    look = PromptLookup(ids.tolist())
    look.extend(got)
    passes = 0
    while len(got) < 48:
        drafts = look.propose(min(4, 47 - len(got)))
        start = r.seq_len("spec")
        logits = r.decode_rows(["spec"], np.array([got[-1], *drafts]), counts=[len(drafts) + 1])[0]
        new = []
        for j in range(len(drafts) + 1):  # keep drafts while each equals the token sampled before it
            new.append(int(logits[j].argmax()))
            if j == len(drafts) or new[-1] != drafts[j]:
                break
        r.truncate("spec", start + len(new))
        got += new
        look.extend(new)
        passes += 1
    assert got[:48] == plain
    assert passes < 40  # drafts held: fewer passes than tokens
