"""Both HTTP dialects against their schemas, over a data-plane mesh of the bundled model.

Bodies drawn from each endpoint's own schema (valid ones, ones with one known field broken:
wrong type, out of range, too long, nested past the parser's limit; and ones with a huge string)
get a 200 with a well-formed answer or a 4xx with the dialect's error JSON naming the field —
never a 500, a hang or a traceback in the log — and the mesh holds nothing afterwards. Every
known field is honoured or refused: refusals name the field, ``logit_bias`` changes the tokens
exactly as one process does, and OpenAI's and Ollama's endpoints give the same tokens for the
same request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemabodies import DEEP, dumps, huge, invalid, valid
from servemesh import DataMesh, openai_front
from waiting import async_wait_until

from meshllm.model.manifest import Manifest, load_manifest
from meshllm.model.paths import BUNDLED_MODEL
from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.generate import generate
from meshllm.runtime.runner import StageRunner
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.config import ServeConfig
from meshllm.serve.schema import ChatRequest, CompletionRequest, OllamaChatRequest, OllamaGenerateRequest

ENDPOINTS = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest,
             "/api/chat": OllamaChatRequest, "/api/generate": OllamaGenerateRequest}


@pytest.fixture(scope="module")
def bundled() -> Manifest:
    return load_manifest(BUNDLED_MODEL)


class Served:
    def __init__(self, mesh: DataMesh, root: str) -> None:
        self.mesh, self.root = mesh, root

    async def post(self, path: str, body: Any) -> tuple[int, bytes, str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s, s.post(self.root + path, data=data,
                                                        headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.read(), r.headers.get("Content-Type", "")

    def held(self) -> dict[str, int]:
        return {**self.mesh.held(), **{f"kv-{k}": v for k, v in self.mesh.kv_in_use().items()}}


@pytest.fixture
async def served(bundled: Manifest) -> AsyncIterator[Served]:
    async with openai_front(bundled, ServeConfig(max_queue=4, queue_timeout_s=1.0)) as (mesh, root):
        yield Served(mesh, root)


def _drawn(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    out: list[Any] = []

    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(strategy)
    def collect(x: Any) -> None:
        out.append(x)

    collect()
    return out


def _short(path: str, body: dict[str, Any], name: str) -> dict[str, Any]:
    """A valid body made to name the served model and to ask for a few tokens (the test is about
    the answers' shapes, not their length)."""
    if path.startswith("/api/"):
        body["model"] = name
        opts = body.get("options") if isinstance(body.get("options"), dict) else {}
        n = opts.get("num_predict")
        opts["num_predict"] = n if isinstance(n, int) and 0 < n <= 3 else 3
        body["options"] = opts
    else:
        if "model" in body:
            body["model"] = name
        for k in ("max_tokens", "max_completion_tokens"):
            if body.get(k) is not None:
                body[k] = min(body[k], 3)
        if body.get("max_completion_tokens") is None:
            body["max_tokens"] = min(body.get("max_tokens") or 3, 3)
    return body


def _check_answer(path: str, status: int, raw: bytes, ctype: str) -> None:
    """A 200 is the dialect's well-formed answer; anything else is its error JSON."""
    ollama = path.startswith("/api/")
    if status != 200:
        doc = json.loads(raw)
        if ollama:
            assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"], doc
        else:
            err = doc["error"]
            assert isinstance(err["message"], str) and err["message"] and {"type", "param", "code"} <= set(err), doc
        return
    if "text/event-stream" in ctype:
        lines = [ln for ln in raw.decode().split("\n\n") if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]", raw[-300:]
        for ln in lines[:-1]:
            doc = json.loads(ln[6:])
            assert "error" not in doc, doc
            assert doc["object"] in ("chat.completion.chunk", "text_completion"), doc
    elif "ndjson" in ctype:
        docs = [json.loads(ln) for ln in raw.decode().splitlines() if ln]
        assert all("error" not in d for d in docs), docs[-1]
        assert docs[-1]["done"] is True and all(d["done"] is False for d in docs[:-1])
    else:
        doc = json.loads(raw)
        if ollama:
            assert doc["done"] is True and isinstance(doc.get("message", {}).get("content", doc.get("response")), str)
        else:
            assert doc["choices"][0]["finish_reason"] in ("stop", "length") and doc["usage"]["total_tokens"] >= 1


async def test_schema_drawn_bodies_get_an_answer_or_the_dialects_error(served: Served, bundled: Manifest,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    s = served
    caplog.set_level(logging.INFO)
    statuses: dict[str, list[int]] = {"valid": [], "invalid": [], "huge": []}
    for path, model in ENDPOINTS.items():
        for body in _drawn(valid(model), 25):
            status, raw, ctype = await s.post(path, dumps(_short(path, body, bundled.name)))
            assert status in (200, 400, 404), (path, status, dumps(body)[:300], raw[:300])
            _check_answer(path, status, raw, ctype)
            statuses["valid"].append(status)
        for body, field in _drawn(invalid(model), 25):
            sent = dumps(body)
            status, raw, ctype = await s.post(path, sent)
            assert status in (400, 413), (path, field, status, sent[:300], raw[:300])
            _check_answer(path, status, raw, ctype)
            doc = json.loads(raw)
            if status == 400 and not path.startswith("/api/"):  # OpenAI's param names the broken field
                param = doc["error"]["param"]
                if DEEP.encode() not in json.dumps(body).encode() and b"[[[[" * 100 not in sent:
                    top = field.split(".")[0]
                    assert param is not None and param.split(".")[0] == top, (field, doc)
                else:
                    assert doc["error"]["code"] == "invalid_json", doc
            statuses["invalid"].append(status)
        for body in _drawn(huge(model), 4):
            status, raw, ctype = await s.post(path, dumps(_short(path, body, bundled.name)))
            assert status in (200, 400, 404, 413), (path, status, raw[:300])
            _check_answer(path, status, raw, ctype)
            statuses["huge"].append(status)
    # the draws reached the mesh, not only the validators
    assert statuses["valid"].count(200) >= 10, statuses["valid"]  # about a third, most others refusals
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad[:3]]
    await async_wait_until(lambda: not any(s.held().values()), "every request freed", 10, describe=lambda: str(s.held()))


async def test_logprobs_penalties_and_echo_through_the_mesh(served: Served) -> None:
    """The head computes them: chat logprobs with alternatives, penalties, and completions' echo +
    logprobs (the prompt's own logprobs, as evaluation tools score choices)."""
    s = served
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    got, raw, _ = await s.post("/v1/chat/completions", chat)
    assert got == 200, raw[:300]
    content = json.loads(raw)["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    got, raw, _ = await s.post("/v1/completions", {"prompt": "one two three", "max_tokens": 1, "temperature": 0,
                                                   "echo": True, "logprobs": 1})
    assert got == 200, raw[:300]
    lp = json.loads(raw)["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) >= 3
    await async_wait_until(lambda: not any(s.held().values()), "every request freed", 10, describe=lambda: str(s.held()))


async def test_a_token_that_cannot_be_sampled_fails_its_request_alone(served: Served,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The head cannot sample one request's token (a numeric failure in its parameters): that
    request ends with an error naming it, the request beside it in the same steps finishes, and the
    mesh serves the next one. Vanishing temperatures, which once raised here, are greedy."""
    import meshllm.serve.stagecore as stagecore

    real = stagecore.sample_one

    def failing(logits: Any, params: SamplingParams, rng: Any, *, history: Any = None) -> int:
        if params.seed == 666 and history:  # its second token, mid-decode
            raise FloatingPointError("overflow encountered in divide")
        return real(logits, params, rng, history=history)

    monkeypatch.setattr(stagecore, "sample_one", failing)
    s = served
    body = {"prompt": "one two three", "max_tokens": 12, "temperature": 0.8, "ignore_eos": True}
    bad, good = await asyncio.gather(s.post("/v1/completions", {**body, "seed": 666}),
                                     s.post("/v1/completions", {**body, "seed": 1}))
    assert bad[0] >= 400 and "could not be sampled" in json.loads(bad[1])["error"]["message"], bad[:2]
    assert good[0] == 200 and json.loads(good[1])["usage"]["completion_tokens"] == 12, good[:2]
    tiny = {**body, "temperature": 5e-324, "seed": 2}
    got, raw, _ = await s.post("/v1/completions", tiny)
    greedy, raw0, _ = await s.post("/v1/completions", {**body, "temperature": 0})
    assert got == greedy == 200 and json.loads(raw)["choices"][0]["text"] == json.loads(raw0)["choices"][0]["text"]
    await async_wait_until(lambda: not any(s.held().values()), "every request freed", 10, describe=lambda: str(s.held()))


async def test_known_fields_the_mesh_cannot_honour_are_refused_by_name(served: Served, bundled: Manifest) -> None:
    s = served
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases: list[tuple[str, dict[str, Any] | bytes, int, str | None]] = [
        ("/v1/chat/completions", {**chat, "n": 2}, 400, "n"),
        ("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ("/v1/chat/completions", {**chat, "tool_choice": "auto"}, 400, "tool_choice"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "frequency_penalty": 3}, 400, "frequency_penalty"),
        ("/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("/v1/chat/completions", {**chat, "store": True}, 400, "store"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.[0].role"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
         400, "messages.[0].role"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
         400, "messages.[0].content.[0].text"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": ["hi"]}]},
         400, "messages.[0].content.[0]"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages.[0].content.[0].type"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user"}]}, 400, "messages.[0].content"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"abc": 1}}, 400, "logit_bias.abc"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ("/v1/chat/completions", {**chat, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
        ("/v1/chat/completions", {**chat, "logit_bias": [1, 2]}, 400, "logit_bias"),
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 413, None),
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
        ("/v1/completions", {"prompt": "x", "n": 3}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, "best_of"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
        ("/v1/completions", {"prompt": ["x", "y"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, True]}, 400, "prompt.[0]"),
        ("/v1/completions", {"prompt": "x", "temperature": "1"}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
        ("/api/chat", {"model": bundled.name, "messages": chat["messages"], "options": {"repeat_penalty": 1.1}},
         400, None),
        ("/api/chat", {"model": bundled.name, "messages": chat["messages"], "options": {"mirostat": 2}}, 400, None),
        ("/api/chat", {"model": bundled.name, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ("/api/chat", {"model": bundled.name, "messages": chat["messages"], "think": True}, 400, None),
        ("/api/generate", {"model": bundled.name, "prompt": "x", "template": "{{ .Prompt }}"}, 400, None),
        ("/api/generate", {"model": bundled.name, "prompt": "x", "context": [1, -1]}, 400, None),
        ("/api/generate", b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ]
    for path, body, status, param in cases:
        got, raw, _ = await s.post(path, body)
        assert got == status, (path, str(body)[:120], raw[:300])
        doc = json.loads(raw)
        if path.startswith("/api/"):
            assert set(doc) == {"error"} and doc["error"], doc
        else:
            assert doc["error"]["message"], doc
            if param is not None:
                assert doc["error"]["param"] == param, (body, doc)
    # refusals say what is not supported
    got, raw, _ = await s.post("/v1/chat/completions", {**chat, "tools": [{"type": "function",
                                                                          "function": {"name": "f"}}]})
    assert got == 400 and b"tools" in raw
    # what is merely unknown is ignored, and `user` is accepted
    got, raw, _ = await s.post("/v1/chat/completions", {**chat, "user": "u-1", "frobnicate": {"a": [1]},
                                                         "temperature": 0})
    assert got == 200, raw
    await async_wait_until(lambda: not any(s.held().values()), "every request freed", 10)


def _one_process(manifest: Manifest, ids: list[int], params: SamplingParams) -> list[int]:
    r = generate(StageRunner(manifest, 0, manifest.config.num_blocks, threads=1), ids, params,
                 tokenizer=Tokenizer.from_manifest(manifest))
    return list(r.token_ids)


async def test_logit_bias_changes_the_tokens_as_in_one_process(served: Served, bundled: Manifest) -> None:
    s = served
    tok = Tokenizer.from_manifest(bundled)
    ids = tok.encode("def add(a, b):\n")
    plain = _one_process(bundled, ids, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    banned = {plain[0]: -100.0, plain[1]: -100.0}
    want = _one_process(bundled, ids, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                     logit_bias=banned))
    assert want[0] != plain[0] and plain[0] not in want and plain[1] not in want  # the ban bites
    got, raw, _ = await s.post("/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0,
                                                   "ignore_eos": True,
                                                   "logit_bias": {str(t): b for t, b in banned.items()}})
    assert got == 200, raw
    assert json.loads(raw)["meshllm"]["token_ids"] == want
    # +100 forces a token whatever the model says, sampled or not
    got, raw, _ = await s.post("/v1/completions", {"prompt": ids, "max_tokens": 4, "temperature": 1.0, "seed": 3,
                                                   "ignore_eos": True, "logit_bias": {"42": 100}})
    assert got == 200 and json.loads(raw)["meshllm"]["token_ids"] == [42] * 4


async def test_openai_and_ollama_give_the_same_tokens_and_usage(served: Served, bundled: Manifest) -> None:
    s = served
    messages = [{"role": "user", "content": "Name a colour."}]
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7},
                     {"temperature": 1.2, "top_k": 20, "seed": 11}):
        got, raw, _ = await s.post("/v1/chat/completions", {"messages": messages, "max_tokens": 8, "stop": ["\n\n"],
                                                            **sampling})
        assert got == 200, raw
        oa = json.loads(raw)
        got, raw, _ = await s.post("/api/chat", {"model": bundled.name, "messages": messages, "stream": False,
                                                 "options": {"num_predict": 8, "stop": ["\n\n"], **sampling}})
        assert got == 200, raw
        ol = json.loads(raw)
        assert ol["message"]["content"] == oa["choices"][0]["message"]["content"]
        assert ol["eval_count"] == oa["usage"]["completion_tokens"]
        assert ol["prompt_eval_count"] == oa["usage"]["prompt_tokens"]
        # Ollama's own client sends the same options
        oc = ollama.AsyncClient(host=s.root)
        try:
            r = await oc.chat(model=bundled.name, messages=messages, stream=False,
                              options={"num_predict": 8, "stop": ["\n\n"], **sampling})
        finally:
            await oc.close()
        assert r.message.content == ol["message"]["content"] and r.eval_count == ol["eval_count"]
    # stream_options.include_usage: a last chunk with the usage, as the official client reads it
    got, raw, _ = await s.post("/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0})
    want = json.loads(raw)["usage"]
    client = openai.AsyncOpenAI(base_url=s.root + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(model=bundled.name, messages=messages, max_tokens=5,  # type: ignore[arg-type]
                                                      temperature=0, stream=True, stream_options={"include_usage": True},
                                                      user="someone")
        chunks = [c async for c in stream]
    finally:
        await client.close()
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == want


def test_the_dialects_stand_on_one_front_not_on_each_other() -> None:
    """Ollama's dialect and the front import nothing of OpenAI's (the old import circle)."""
    import ast
    from pathlib import Path

    serve = Path(__file__).resolve().parents[1] / "meshllm" / "serve"

    def imports(name: str) -> set[str]:
        tree = ast.parse((serve / name).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "meshllm.serve.api" not in imports("ollama.py") | imports("front.py") | imports("schema.py")
    assert "meshllm.serve.ollama" not in imports("front.py") | imports("schema.py")


async def test_logit_bias_survives_failover(bundled: Manifest) -> None:
    """The bias rides the sampling dict of every frame: a request resumed on another decoder after
    its node is lost goes on drawing from the biased distribution, as one process does."""
    spec = [("prefill", [("a", 0, 8)]), ("decoder", [("b", 0, 4), ("c", 4, 8)]), ("decoder", [("d", 0, 8)])]
    mesh = DataMesh(bundled, ["a", "b", "c", "d"], config=ServeConfig(max_queue=4, queue_timeout_s=1.0))
    await mesh.start(spec)
    try:
        prompt = [3, 4, 5]
        plain = _one_process(bundled, prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        params = SamplingParams(temperature=0.8, seed=5, max_tokens=30, ignore_eos=True,
                                logit_bias={plain[0]: -100.0, plain[2]: -100.0, 17: 4.0})
        want = _one_process(bundled, prompt, params)
        tokens: list[int] = []
        async for ev in mesh.node("a").serving.entry.generate(prompt, params):
            assert ev.error is None, ev.error
            tokens.append(ev.token_id)  # type: ignore[arg-type]
            if len(tokens) == 5:
                holder = next(n for n in "bcd" if mesh.node(n).serving.stage.held_count())
                await mesh.kill(holder)
        assert tokens == want and plain[0] not in tokens and plain[2] not in tokens
        assert mesh.node("a").serving.entry.stats["migrations"] == 1
    finally:
        await mesh.close()
