"""The generation loop: stopping rules, streaming, context checks, batched ragged decode, KV release.

Most tests drive the loop with a fake runner whose logits are a fixed function of (last token,
position), so the expected tokens are known exactly and ragged batching has something to get
wrong. The last tests run the real ONNX runner against the numpy reference.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from textutil import EOS_ID, make_tokenizer

from meshllm.errors import CapacityError, ContextLengthError, ModelError, SamplingError, UserError
from meshllm.model.config import ModelConfig
from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.generate import (
    generate,
    generate_batch,
    generate_stream,
    iter_batch,
)
from meshllm.runtime.sampling import SamplingParams, sample_one, token_rng

CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position=64)


class FakeRunner:
    """logits(seq, pos) = table[last token] + pos_table[pos] (+ a forced script when given)."""

    def __init__(self, cfg: ModelConfig = CFG, seed: int = 0, script: Sequence[int] | None = None,
                 fail_after: int | None = None) -> None:
        self.manifest = SimpleNamespace(config=cfg)
        self.first, self.end = 0, cfg.num_blocks
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((cfg.vocab_size, cfg.vocab_size)) * 2  # (V, V)
        self.pos = rng.standard_normal((cfg.max_position, cfg.vocab_size))  # (P, V)
        self.script = list(script) if script is not None else None
        self.lens: dict[Hashable, int] = {}
        self.cap: dict[Hashable, int] = {}
        self.generated: dict[Hashable, int] = {}
        self.batch_sizes: list[int] = []
        self.fail_after = fail_after
        self.max_seqs = 8

    def alloc(self, seq_id: Hashable, max_len: int) -> None:
        if seq_id in self.lens:
            raise AssertionError(f"{seq_id} allocated twice")
        if len(self.lens) >= self.max_seqs:
            raise CapacityError("no free KV slot")
        self.lens[seq_id], self.cap[seq_id], self.generated[seq_id] = 0, max_len, 0

    def free(self, seq_id: Hashable) -> None:
        del self.lens[seq_id], self.cap[seq_id], self.generated[seq_id]

    def _logits(self, seq_id: Hashable, token: int) -> np.ndarray:
        pos = self.lens[seq_id] - 1
        assert self.lens[seq_id] <= self.cap[seq_id], "wrote past the allocated length"
        if self.script is not None:
            out = np.zeros(self.manifest.config.vocab_size)
            out[self.script[min(self.generated[seq_id], len(self.script) - 1)]] = 50.0
        else:
            out = self.table[token] + self.pos[pos]
        self.generated[seq_id] += 1
        return out

    def prefill(self, seq_id: Hashable, x: np.ndarray, *, last_only: bool = True) -> np.ndarray:
        assert x.dtype == np.int64 and x.ndim == 1 and last_only
        self.lens[seq_id] += len(x)
        return self._logits(seq_id, int(x[-1]))  # (V,)

    def decode(self, seq_ids: Sequence[Hashable], x: np.ndarray) -> np.ndarray:
        assert x.shape == (len(seq_ids),) and x.dtype == np.int64
        self.batch_sizes.append(len(seq_ids))
        if self.fail_after is not None and len(self.batch_sizes) > self.fail_after:
            raise RuntimeError("device lost")
        rows = []
        for s, t in zip(seq_ids, x, strict=True):
            self.lens[s] += 1
            rows.append(self._logits(s, int(t)))
        return np.stack(rows)  # (B, V)


def greedy_chain(r: FakeRunner, prompt: list[int], n: int) -> list[int]:
    out, last, pos = [], prompt[-1], len(prompt) - 1
    for _ in range(n):
        t = int(np.argmax(r.table[last] + r.pos[pos]))
        out.append(t)
        last, pos = t, pos + 1
    return out


GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def test_greedy_generates_max_tokens_then_frees() -> None:
    r = FakeRunner()
    res = generate(r, [5, 6, 7], GREEDY)
    assert res.token_ids == tuple(greedy_chain(r, [5, 6, 7], 12))
    assert res.finish_reason == "length" and res.prompt_token_ids == (5, 6, 7)
    assert res.text == "" and r.lens == {}
    assert set(res.to_json()) >= {"prompt_token_ids", "token_ids", "text"}


def test_eos_stops_and_is_kept_in_ids_unless_ignored() -> None:
    r = FakeRunner()
    chain = greedy_chain(r, [1, 2], 12)
    eos = chain[3]
    first = chain.index(eos)
    res = generate(r, [1, 2], GREEDY, eos_token_ids=[eos])
    assert res.token_ids == tuple(chain[: first + 1]) and res.finish_reason == "stop"
    ign = generate(r, [1, 2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                   eos_token_ids=[eos])
    assert ign.token_ids == tuple(chain) and ign.finish_reason == "length"


def test_eos_defaults_to_the_model_config() -> None:
    r = FakeRunner()
    eos = greedy_chain(r, [3], 1)[0]
    r.manifest.config = ModelConfig(**{**CFG.to_dict(), "eos_token_ids": (eos,)})
    res = generate(r, [3], GREEDY)
    assert res.token_ids == (eos,) and res.finish_reason == "stop"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(make_tokenizer(), bos_token_id=0, eos_token_ids=[EOS_ID])


def test_stop_string_cuts_text_and_streams_deltas(tok: Tokenizer) -> None:
    script = tok.encode("héllo 日本 STOP here world", add_special_tokens=False)
    r = FakeRunner(script=script)
    p = SamplingParams(temperature=0, max_tokens=40, stop=("STOP",))
    events = list(generate_stream(r, [0], p, tokenizer=tok))
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == "stop"
    text = "".join(e.text for e in events)
    assert text == "héllo 日本 "
    assert tok.decode([e.token_id for e in events]).startswith("héllo 日本 STOP")
    assert len(events) < len(script) and r.lens == {}


def test_stream_text_equals_decode_when_no_stop(tok: Tokenizer) -> None:
    script = [*tok.encode("naïve café 🙂 fox", add_special_tokens=False), EOS_ID]
    r = FakeRunner(script=script)
    res = generate(r, [0], SamplingParams(temperature=0, max_tokens=40), tokenizer=tok)
    assert res.token_ids == tuple(script) and res.finish_reason == "stop"
    assert res.text == "naïve café 🙂 fox"


def test_context_length_and_bad_prompts_are_rejected_before_allocating() -> None:
    r = FakeRunner()
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 64"):
        iter_batch(r, [[1] * 60], SamplingParams(max_tokens=5))
    generate(r, [1] * 59, SamplingParams(temperature=0, max_tokens=5))  # exactly fits
    with pytest.raises(UserError, match="empty"):
        generate(r, [], GREEDY)
    with pytest.raises(UserError, match="outside the vocabulary"):
        generate(r, [300], GREEDY)
    with pytest.raises(SamplingError, match="need a tokenizer"):
        generate(r, [1], SamplingParams(stop=("x",)))
    with pytest.raises(SamplingError):
        generate_batch(r, [[1], [2]], [GREEDY])
    assert r.lens == {}


def test_runner_must_cover_every_block() -> None:
    r = FakeRunner()
    r.end = 2
    with pytest.raises(ModelError, match="all blocks"):
        generate(r, [1], GREEDY)


def test_batched_ragged_decode_equals_one_at_a_time() -> None:
    prompts = [[1, 2, 3, 4, 5], [9], [7, 8], [10, 11, 12]]
    params = [SamplingParams(temperature=0, max_tokens=10),
              SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=4),
              SamplingParams(temperature=1.2, top_k=20, seed=4, max_tokens=15),
              SamplingParams(temperature=0, max_tokens=1)]
    r = FakeRunner(seed=1)
    batch = generate_batch(r, prompts, params)
    singles = [generate(r, p, sp) for p, sp in zip(prompts, params, strict=True)]
    assert batch == singles
    assert [len(b.token_ids) for b in batch] == [10, 4, 15, 1]
    assert max(r.batch_sizes) == 3  # the one-token request ended at prefill; three decoded together
    assert r.lens == {}


def test_seeded_tokens_depend_on_seed_and_index_only_so_a_request_resumes_anywhere() -> None:
    """Token i samples with token_rng(seed, i): the same request alone, in a batch of others, or
    resumed at token i on a fresh runner (prompt + the tokens so far) gives the same tokens."""
    prompt = [4, 5, 6]
    p = SamplingParams(temperature=1.1, top_k=40, seed=77, max_tokens=14, ignore_eos=True)
    alone = generate(FakeRunner(seed=2), prompt, p)
    assert len(set(alone.token_ids)) > 3  # really sampled, not a greedy-like chain
    others = [SamplingParams(temperature=0.8, seed=s, max_tokens=n) for s, n in ((1, 3), (2, 20))]
    mixed = generate_batch(FakeRunner(seed=2), [[9, 9], prompt, [1]], [others[0], p, others[1]])
    assert mixed[1] == alone
    # unseeded request given its base seed explicitly: the same as that seed in the params
    unseeded = SamplingParams(temperature=1.1, top_k=40, max_tokens=14, ignore_eos=True)
    assert generate(FakeRunner(seed=2), prompt, unseeded, seed=77).token_ids == alone.token_ids
    for start in (1, 6, 13):
        r = FakeRunner(seed=2)
        ctx = prompt + list(alone.token_ids[:start])
        r.alloc("resumed", len(ctx) + p.max_tokens)
        logits = r.prefill("resumed", np.asarray(ctx, dtype=np.int64))
        got = []
        for i in range(start, p.max_tokens):
            got.append(sample_one(logits, p, token_rng(77, i)))
            logits = r.decode(["resumed"], np.asarray(got[-1:], dtype=np.int64))[0]
        assert tuple(got) == alone.token_ids[start:], start


def test_kv_is_freed_when_the_consumer_stops_early_or_the_runner_fails() -> None:
    r = FakeRunner()
    it = iter_batch(r, [[1], [2]], SamplingParams(temperature=0, max_tokens=20))
    next(it)
    next(it)
    assert len(r.lens) == 2
    it.close()
    assert r.lens == {}
    bad = FakeRunner(fail_after=2)
    with pytest.raises(RuntimeError):
        generate_batch(bad, [[1], [2]], SamplingParams(temperature=0, max_tokens=20))
    assert bad.lens == {}
    none = FakeRunner()
    none.max_seqs = 0
    with pytest.raises(CapacityError):
        generate_batch(none, [[1], [2]], GREEDY)


def test_prompts_wait_for_room_and_the_result_does_not_change() -> None:
    prompts = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (3, 9, 5, 2, 7)]
    want = generate_batch(FakeRunner(), prompts, params)
    one_slot = FakeRunner()
    one_slot.max_seqs = 1  # alloc raises CapacityError until the running sequence ends
    assert generate_batch(one_slot, prompts, params) == want
    assert set(one_slot.batch_sizes) == {1} and one_slot.lens == {}
    capped = FakeRunner()
    assert generate_batch(capped, prompts, params, max_batch=2) == want
    assert max(capped.batch_sizes) == 2 and capped.lens == {}
    with pytest.raises(UserError):
        generate_batch(capped, prompts, params, max_batch=0)


# --- the real runner ---------------------------------------------------------------------------

def test_real_runner_greedy_matches_the_numpy_reference(tmp_path: Path) -> None:
    from meshllm.model import reference
    from meshllm.model.export import export_model, random_weights
    from meshllm.model.manifest import load_manifest
    from meshllm.runtime.runner import StageRunner

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position=64, tie_word_embeddings=True)
    w = random_weights(cfg, np.random.default_rng(0))
    export_model(w, cfg, tmp_path / "m", name="t", progress=False)
    m = load_manifest(tmp_path / "m")
    runner = StageRunner(m, 0, cfg.num_blocks, threads=1)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [42], [100, 200, 3]]
    n = 8
    batch = generate_batch(runner, prompts, SamplingParams(temperature=0, max_tokens=n))
    for p, res in zip(prompts, batch, strict=True):
        ids = list(p)
        for _ in range(n):
            logits = reference.forward(np.asarray(ids, dtype=np.int64), w, cfg)  # (T, V)
            ids.append(int(np.argmax(logits[-1])))
        assert list(res.token_ids) == ids[len(p):]
        assert res == generate(runner, p, SamplingParams(temperature=0, max_tokens=n))
