"""Logprobs and penalties through the OpenAI dialect, over an entry that computes them.

The head stage computes a token's logprobs (``runtime.sampling.logprobs_of``) and the prompt's
(``prompt_logprobs``) and sends them on the request's events; here a stand-in entry does exactly
that over a fixed table of logits, so the test pins down the API's side: which entry features
open which fields, and OpenAI's shapes (chat's ``logprobs.content``, completions' parallel lists
with ``echo``), read back by the official ``openai`` client, with the values the sampler gives.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from meshllm.model.manifest import load_manifest
from meshllm.model.paths import BUNDLED_MODEL
from meshllm.model.tokenizer import Tokenizer
from meshllm.obs.metrics import RequestMetrics
from meshllm.runtime.sampling import SamplingParams, logprobs_of, prompt_logprobs, sample_one, token_rng
from meshllm.serve.api import OpenAIApi
from meshllm.serve.config import ServeConfig
from meshllm.serve.entry import Event

V = 4096  # the bundled model's vocabulary


@dataclass(frozen=True, slots=True)
class HeadEvent(Event):
    """An event as the head stage sends it with logprobs."""

    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] | None = None


def logits_after(token: int) -> np.ndarray:
    """The stand-in model: the next token's logits depend on the last token only, and token 9 is
    always the likeliest, by 4 (greedy repeats it forever unless penalised). (V,)"""
    row = np.random.default_rng(token).standard_normal(V).astype(np.float32) * 3
    row[9] = row.max() + 4
    return row


class HeadEntry:
    """An entry whose head computes what the lead's stage will: tokens by ``sample_one`` with the
    history, logprobs by ``logprobs_of`` of the same row, prompt logprobs by ``prompt_logprobs``."""

    def __init__(self, tokenizer: Tokenizer, features: frozenset[str]) -> None:
        self.tokenizer = tokenizer
        self.features = features
        self.max_position = 512
        self.vocab_size = V
        self.metrics = RequestMetrics()
        self.name = "head"
        self.seen: list[SamplingParams] = []
        self._n = 0

    def new_request_id(self, client: str | None = None) -> str:
        self._n += 1
        return f"{client}.{self._n}" if client else str(self._n)

    async def generate(self, prompt: Sequence[int], params: SamplingParams, *, seed: int | None = None,
                       request_id: str | None = None, prompt_logprobs: bool = False) -> AsyncIterator[Event]:
        self.seen.append(params)
        for ev in expected(list(prompt), params, prompt_logprobs):
            yield ev


def expected(prompt: list[int], params: SamplingParams, scored: bool = False) -> list[HeadEvent]:
    seed = params.seed or 0
    out: list[HeadEvent] = []
    history: list[int] = []
    pl = None
    if scored:
        rows = np.stack([logits_after(t) for t in prompt])  # (P, V)
        pl = prompt_logprobs(rows[:-1], prompt[1:], params.logprobs or 0)
    last = prompt[-1]
    for i in range(params.max_tokens):
        row = logits_after(last)
        tok = sample_one(row, params, token_rng(seed, i), history=history)
        lp, top = logprobs_of(row, params, tok, history=history)
        history.append(tok)
        out.append(HeadEvent(tok, f"<{tok}>", i, "length" if i == params.max_tokens - 1 else None,
                             logprob=lp, top_logprobs=top, prompt_logprobs=pl if i == 0 else None))
        last = tok
    return out


class _Serving:
    def __init__(self, entry: HeadEntry) -> None:
        self.entry = entry
        self.config = ServeConfig()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_manifest(load_manifest(BUNDLED_MODEL))


async def _serve(entry: HeadEntry) -> tuple[TestServer, openai.AsyncOpenAI]:
    app = web.Application()
    OpenAIApi(_Serving(entry), "tiny", "tiny-id").mount(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0)


@pytest.fixture
async def head(tok: Tokenizer) -> AsyncIterator[tuple[HeadEntry, openai.AsyncOpenAI]]:
    entry = HeadEntry(tok, frozenset({"penalties", "logprobs", "prompt_logprobs"}))
    server, client = await _serve(entry)
    yield entry, client
    await client.close()
    await server.close()


async def test_chat_logprobs_in_openais_shape(head: Any, tok: Tokenizer) -> None:
    entry, client = head
    msgs = [{"role": "user", "content": "Hi"}]
    r = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                             logprobs=True, top_logprobs=3)
    params = entry.seen[-1]
    assert params.logprobs == 3
    want = expected(tok.encode_chat(msgs), params)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([e.token_id], skip_special_tokens=False) for e in want]
    for c, e in zip(content, want, strict=True):
        assert c.logprob == pytest.approx(e.logprob, abs=1e-9) and c.bytes == list(c.token.encode())
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([v for _, v in e.top_logprobs], abs=1e-9)
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob  # greedy: the top one
    # top_logprobs 0 (or left out): the chosen token's logprob only
    r = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)
    # streamed: one token's logprobs per chunk
    stream = await client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                                  logprobs=True, top_logprobs=2, stream=True)
    got = [c.choices[0].logprobs.content[0].logprob async for c in stream
           if c.choices and c.choices[0].logprobs is not None]
    assert got == pytest.approx([e.logprob for e in want], abs=1e-9)


async def test_completions_echo_and_logprobs_score_the_prompt(head: Any, tok: Tokenizer) -> None:
    """What lm-evaluation-harness's loglikelihood requests send: echo + logprobs."""
    entry, client = head
    prompt = "The cat sat"
    ids = tok.encode(prompt)
    r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                        logprobs=2)
    params = entry.seen[-1]
    want = expected(ids, params, scored=True)
    lp = r.choices[0].logprobs
    n = len(ids)
    assert r.choices[0].text.startswith(prompt) and len(lp.tokens) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    pl = want[0].prompt_logprobs
    assert lp.token_logprobs[1:n] == pytest.approx([v for v, _ in pl], abs=1e-9)
    assert lp.token_logprobs[n] == pytest.approx(want[0].logprob, abs=1e-9)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # the prompt's score is the sum a harness takes: it is a real log-likelihood under the model
    rows = np.stack([logits_after(t) for t in ids]).astype(np.float64)
    ref = sum(rows[i][ids[i + 1]] - math.log(np.exp(rows[i]).sum()) for i in range(n - 1))
    assert sum(lp.token_logprobs[1:n]) == pytest.approx(ref, abs=1e-6)
    # logprobs without echo: the generated tokens only
    r = await client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, logprobs=0)
    assert len(r.choices[0].logprobs.tokens) == 3
    assert r.choices[0].text == "".join(e.text for e in expected(ids, entry.seen[-1]))
    # streamed: the prompt's chunk first, scored, then one chunk per token with its logprob
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                             logprobs=1, stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].text == prompt
    assert chunks[0].choices[0].logprobs.token_logprobs == lp.token_logprobs[:n]
    scored = [c.choices[0].logprobs.token_logprobs[0] for c in chunks[1:] if c.choices[0].logprobs]
    assert scored == pytest.approx([e.logprob for e in expected(ids, entry.seen[-1], scored=True)], abs=1e-9)
    assert chunks[1].choices[0].logprobs.text_offset == [len(prompt)]
    # echo alone needs nothing from the head
    r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text.startswith(prompt) and r.choices[0].logprobs is None


async def test_penalties_reach_the_sampler_when_the_head_applies_them(head: Any, tok: Tokenizer) -> None:
    entry, client = head
    r = await client.completions.create(model="tiny", prompt=[5, 6], max_tokens=12, temperature=0,
                                        presence_penalty=2.0, frequency_penalty=1.5, logit_bias={"7": 3})
    params = entry.seen[-1]
    assert (params.presence_penalty, params.frequency_penalty, params.logit_bias) == (2.0, 1.5, ((7, 3.0),))
    plain = expected([5, 6], SamplingParams(temperature=0.0, max_tokens=12))
    shaped = expected([5, 6], params)
    assert r.choices[0].text == "".join(e.text for e in shaped)
    # as OpenAI documents: a penalised answer repeats itself less
    assert len({e.token_id for e in shaped}) > len({e.token_id for e in plain})


async def test_without_the_heads_support_the_fields_are_refused(tok: Tokenizer) -> None:
    server, client = await _serve(HeadEntry(tok, frozenset()))
    try:
        for kw in ({"logprobs": 1}, {"logprobs": 1, "echo": True}, {"presence_penalty": 0.1}):
            with pytest.raises(openai.BadRequestError, match="not supported yet"):
                await client.completions.create(model="tiny", prompt="x", max_tokens=1, **kw)  # type: ignore[arg-type]
        r = await client.completions.create(model="tiny", prompt="x", max_tokens=1, echo=True)  # echo alone: fine
        assert r.choices[0].text.startswith("x")
    finally:
        await client.close()
        await server.close()
    # logprobs only: the prompt's are refused, naming echo
    server, client = await _serve(HeadEntry(tok, frozenset({"logprobs"})))
    try:
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model="tiny", prompt="x", max_tokens=1, echo=True, logprobs=1)
        assert e.value.param == "echo"  # type: ignore[attr-defined]
    finally:
        await client.close()
        await server.close()
