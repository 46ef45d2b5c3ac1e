"""The official clients against a data-plane mesh of the bundled model (prefill on one node, the
decoder split over two), every number checked against one process running the whole model.

- ``openai``: chat with ``logprobs`` + ``top_logprobs`` and penalties; completions with ``echo`` +
  ``logprobs`` sent exactly as lm-evaluation-harness's ``local-completions`` model sends them (a
  batch of one tokenized prompt, ``max_tokens: 1``, ``logprobs: 1``), read back the way it reads
  them (the continuation's ``token_logprobs[ctxlen:-1]`` summed, greedy when each equals the best
  of its ``top_logprobs``); penalties, greedy and sampled. Greedy logprobs equal the single
  process's within 1e-4.
- ``ollama``: ``options`` ``seed``, ``temperature``, ``top_k``, ``num_predict``, ``stop``,
  ``presence_penalty`` and ``frequency_penalty`` give the tokens one process gives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import ollama
import openai
import pytest
from servemesh import DataMesh, openai_front
from test_serve_core import reference_logprobs
from waiting import async_wait_until

from meshllm.model.manifest import Manifest, load_manifest
from meshllm.model.paths import BUNDLED_MODEL
from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.generate import generate
from meshllm.runtime.runner import StageRunner
from meshllm.runtime.sampling import SamplingParams, prompt_logprobs
from meshllm.serve.config import ServeConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def bundled() -> Manifest:
    return load_manifest(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def tok(bundled: Manifest) -> Tokenizer:
    return Tokenizer.from_manifest(bundled)


class Served:
    def __init__(self, mesh: DataMesh, root: str) -> None:
        self.mesh, self.root = mesh, root
        self.openai = openai.AsyncOpenAI(base_url=root + "/v1", api_key="unused", max_retries=0)
        self.ollama = ollama.AsyncClient(host=root)

    def held(self) -> dict[str, int]:
        return {**self.mesh.held(), **{f"kv-{k}": v for k, v in self.mesh.kv_in_use().items()}}

    async def settled(self) -> None:
        await async_wait_until(lambda: not any(self.held().values()), "every request freed", 10,
                               describe=lambda: str(self.held()))


@pytest.fixture
async def served(bundled: Manifest) -> AsyncIterator[Served]:
    async with openai_front(bundled, ServeConfig(max_queue=4, queue_timeout_s=5.0)) as (mesh, root):
        s = Served(mesh, root)
        yield s
        await s.openai.close()
        await s.ollama.close()


def one_process(manifest: Manifest, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
    r = generate(StageRunner(manifest, 0, manifest.config.num_blocks, threads=1), prompt, params,
                 tokenizer=Tokenizer.from_manifest(manifest))
    return list(r.token_ids), r.text


def prompt_rows(manifest: Manifest, prompt: list[int]) -> np.ndarray:
    """One process's logits at every prompt position. (P, V)"""
    runner = StageRunner(manifest, 0, manifest.config.num_blocks, threads=1)
    runner.alloc("x", len(prompt))
    return runner.prefill("x", np.array(prompt, np.int64), last_only=False)


def meshllm_ids(r: Any) -> list[int]:
    """The token ids the mesh reports beside an OpenAI answer (the ``meshllm`` extension)."""
    return list(r.model_extra["meshllm"]["token_ids"])


async def test_chat_logprobs_and_penalties_equal_one_process(served: Served, bundled: Manifest,
                                                             tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    prompt = tok.encode_chat(messages)
    for penalties in ({}, {"presence_penalty": 0.8, "frequency_penalty": 1.2}):
        r = await served.openai.chat.completions.create(
            model=bundled.name, messages=messages, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3,
            extra_body={"ignore_eos": True}, **penalties)  # type: ignore[arg-type]
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3, **penalties)
        want, text = one_process(bundled, prompt, params)
        assert meshllm_ids(r) == want and r.choices[0].message.content == text
        content = r.choices[0].logprobs.content
        ref = reference_logprobs(bundled, prompt, params, want)
        assert len(content) == len(want) == len(ref)
        for c, t, (lp, top) in zip(content, want, ref, strict=True):
            assert c.token == tok.decode([t], skip_special_tokens=False) and c.bytes == list(c.token.encode())
            assert c.logprob == pytest.approx(lp, abs=TOL)
            assert [a.token for a in c.top_logprobs] == [tok.decode([i], skip_special_tokens=False) for i, _ in top]
            assert [a.logprob for a in c.top_logprobs] == pytest.approx([v for _, v in top], abs=TOL)
            assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=TOL)  # greedy: the best one
        if penalties:  # they bite, and as OpenAI documents: the answer repeats itself less
            plain, _ = one_process(bundled, prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
            assert want != plain
            assert max(Counter(want).values()) <= max(Counter(plain).values())
    await served.settled()


async def test_completions_echo_logprobs_as_lm_eval_sends_and_reads_them(served: Served, bundled: Manifest,
                                                                         tok: Tokenizer) -> None:
    """``local-completions``' loglikelihood request for one (context, continuation) pair, and the
    score it takes from the answer, equal one process's log-likelihood of the continuation."""
    context = tok.encode("def add(a, b):\n    return", add_special_tokens=False)
    for continuation in (tok.encode(" a + b", add_special_tokens=False), tok.encode(" 42", add_special_tokens=False)):
        ids = context + continuation
        r = await served.openai.completions.create(model=bundled.name, prompt=[ids], temperature=0, max_tokens=1,
                                                   logprobs=1, seed=1234, echo=True)
        lp = r.choices[0].logprobs
        n = len(ids)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
        assert r.choices[0].text == "".join(lp.tokens)
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(n + 1)]
        assert lp.tokens[:n] == [tok.decode([t], skip_special_tokens=False) for t in ids]
        # the prompt's logprobs are one process's, each with its best alternative
        ref = prompt_logprobs(prompt_rows(bundled, ids)[:-1], ids[1:], 1)
        assert lp.token_logprobs[1:n] == pytest.approx([v for v, _ in ref], abs=TOL)
        for top, (_, rtop) in zip(lp.top_logprobs[1:n], ref, strict=True):
            assert list(top) == [tok.decode([rtop[0][0]], skip_special_tokens=False)]
            assert list(top.values()) == pytest.approx([rtop[0][1]], abs=TOL)
        # the one generated token: one process's greedy token and logprob
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
        want, _ = one_process(bundled, ids, params)
        assert meshllm_ids(r) == want
        assert lp.token_logprobs[n] == pytest.approx(reference_logprobs(bundled, ids, params, want)[0][0], abs=TOL)
        # what the harness computes: sum(token_logprobs[ctxlen:-1]); greedy when each is its top's max
        ctxlen = len(context)
        score = sum(lp.token_logprobs[ctxlen:-1])
        greedy = all(v == max(t.values()) for v, t in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1],
                                                          strict=True))
        assert score == pytest.approx(sum(v for v, _ in ref[ctxlen - 1:]), abs=TOL)
        assert greedy == all(rtop[0][0] == t for (_, rtop), t in zip(ref[ctxlen - 1:], continuation, strict=True))
    await served.settled()


async def test_completions_penalties_greedy_and_sampled_equal_one_process(served: Served, bundled: Manifest,
                                                                          tok: Tokenizer) -> None:
    ids = tok.encode("import os\nimport sys\n")
    for kw in ({"temperature": 0}, {"temperature": 0.9, "seed": 5}, {"temperature": 0.9, "seed": 6}):
        plain = SamplingParams(max_tokens=16, ignore_eos=True, temperature=float(kw["temperature"]),
                               seed=kw.get("seed"))
        shaped = SamplingParams(max_tokens=16, ignore_eos=True, temperature=float(kw["temperature"]),
                                seed=kw.get("seed"), presence_penalty=1.5, frequency_penalty=1.0, logprobs=0)
        r = await served.openai.completions.create(model=bundled.name, prompt=ids, max_tokens=16,
                                                   presence_penalty=1.5, frequency_penalty=1.0, logprobs=0,
                                                   extra_body={"ignore_eos": True}, **kw)  # type: ignore[arg-type]
        want, text = one_process(bundled, ids, shaped)
        assert meshllm_ids(r) == want and r.choices[0].text == text
        got = r.choices[0].logprobs.token_logprobs
        assert got == pytest.approx([lp for lp, _ in reference_logprobs(bundled, ids, shaped, want)], abs=TOL)
        base, _ = one_process(bundled, ids, plain)
        assert want != base  # the penalties change the answer
        if kw["temperature"] == 0:
            assert max(Counter(want).values()) <= max(Counter(base).values())
    await served.settled()


async def test_the_ollama_clients_options_give_one_process_tokens(served: Served, bundled: Manifest,
                                                                  tok: Tokenizer) -> None:
    c = served.ollama
    question = "Write a function that adds two numbers."
    prompt = tok.encode_chat([{"role": "user", "content": question}])
    cases = [
        ({"temperature": 0, "num_predict": 8}, SamplingParams(temperature=0.0, max_tokens=8)),
        ({"temperature": 0.8, "seed": 3, "top_k": 40, "num_predict": 8},
         SamplingParams(temperature=0.8, seed=3, top_k=40, max_tokens=8)),
        ({"temperature": 0, "num_predict": 12, "presence_penalty": 1.0, "frequency_penalty": 1.5},
         SamplingParams(temperature=0.0, max_tokens=12, presence_penalty=1.0, frequency_penalty=1.5)),
        ({"temperature": 0.7, "seed": 9, "num_predict": 12, "presence_penalty": 0.5, "frequency_penalty": 0.5},
         SamplingParams(temperature=0.7, seed=9, max_tokens=12, presence_penalty=0.5, frequency_penalty=0.5)),
    ]
    for options, params in cases:
        want, text = one_process(bundled, prompt, params)
        g = await c.generate(model=bundled.name, prompt=question, options=options, stream=False)
        assert list(g.context) == prompt + want, options  # `context`: the prompt's ids and the answer's
        assert g.response == text and g.eval_count == len(want) <= options["num_predict"]
        r = await c.chat(model=bundled.name, messages=[{"role": "user", "content": question}], options=options,
                         stream=False)
        assert r.message.content == text and r.eval_count == len(want)
        parts = [p async for p in await c.chat(model=bundled.name, messages=[{"role": "user", "content": question}],
                                               options=options, stream=True)]
        assert "".join(p.message.content or "" for p in parts) == text and parts[-1].done
    # a different seed, a different answer (or the seed would be ignored)
    a = await c.generate(model=bundled.name, prompt=question, options={"temperature": 1.0, "seed": 1, "num_predict": 8},
                         stream=False)
    b = await c.generate(model=bundled.name, prompt=question, options={"temperature": 1.0, "seed": 2, "num_predict": 8},
                         stream=False)
    assert list(a.context) == prompt + one_process(bundled, prompt, SamplingParams(temperature=1.0, seed=1,
                                                                                   max_tokens=8))[0]
    assert a.context != b.context
    # stop: the answer ends before the stop string, as one process's text shows it
    _, text = one_process(bundled, prompt, SamplingParams(temperature=0.0, max_tokens=16))
    cut = text[2:5]
    assert cut.strip() and cut in text
    g = await c.generate(model=bundled.name, prompt=question, stream=False,
                         options={"temperature": 0, "num_predict": 16, "stop": [cut]})
    assert g.response == text[:text.index(cut)] and g.done_reason == "stop"
    await served.settled()
