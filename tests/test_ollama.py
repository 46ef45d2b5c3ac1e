"""Ollama's endpoints over a data-plane mesh of the bundled model: the official ``ollama`` client
(chat and generate, streamed and not) gets the tokens the OpenAI endpoints give for the same
greedy request; raw HTTP sees Ollama's NDJSON lines, its final statistics and its error shape;
idle streams get keep-alives (SSE comments, empty NDJSON chunks) that the clients read through."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import strategies as st
from servemesh import DataMesh
from waiting import async_wait_until

from meshllm.model.manifest import Manifest, load_manifest
from meshllm.model.paths import BUNDLED_MODEL
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.api import OpenAIApi
from meshllm.serve.config import ServeConfig

# prefill on a, decoder split over b and c (as tests/test_serve_api.py)
SPEC = [("prefill", [("a", 0, 8)]), ("decoder", [("b", 0, 4), ("c", 4, 8)])]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def bundled() -> Manifest:
    return load_manifest(BUNDLED_MODEL)


class Served:
    def __init__(self, mesh: DataMesh, api: OpenAIApi, root: str) -> None:
        self.mesh, self.api, self.root = mesh, api, root
        self.clients: list[ollama.AsyncClient] = []

    def client(self, **kw: Any) -> ollama.AsyncClient:
        c = ollama.AsyncClient(host=self.root, **kw)
        self.clients.append(c)
        return c

    async def close(self, server: TestServer) -> None:
        for c in self.clients:
            await c.close()
        await server.close()
        await self.mesh.close()

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s, s.post(self.root + path, data=data, headers=headers) as r:
            return r.status, await r.text(), r.headers.get("Content-Type", "")

    async def get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.root + path) as r:
            return r.status, await r.json()


async def _serve(bundled: Manifest, config: ServeConfig, api_key: str | None = None) -> tuple[Served, TestServer]:
    mesh = DataMesh(bundled, ["a", "b", "c"], config=config)
    await mesh.start(SPEC)
    app = web.Application(client_max_size=1 << 16)
    api = OpenAIApi(mesh.node("c").serving, bundled.name, bundled.model_id, api_key=api_key)
    api.mount(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return Served(mesh, api, str(server.make_url("")).rstrip("/")), server


@pytest.fixture
async def served(bundled: Manifest) -> AsyncIterator[Served]:
    s, server = await _serve(bundled, ServeConfig(max_queue=4, queue_timeout_s=1.0))
    yield s
    await s.close(server)


async def _openai_chat(s: Served, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    got, text, _ = await s.post("/v1/chat/completions", {"model": model, "messages": messages,
                                                         "max_tokens": max_tokens, "temperature": 0})
    assert got == 200, text
    return json.loads(text)


async def test_the_ollama_client_gets_the_openai_endpoints_greedy_tokens(served: Served, bundled: Manifest) -> None:
    s = served
    ref = await _openai_chat(s, bundled.name, MESSAGES, 12)
    want_text = ref["choices"][0]["message"]["content"]
    want_ids = ref["meshllm"]["token_ids"]
    assert len(want_ids) >= 1
    client = s.client()
    opts = {"temperature": 0, "num_predict": 12}

    r = await client.chat(model=bundled.name, messages=MESSAGES, options=opts, stream=False)
    assert r.message.content == want_text and r.message.role == "assistant"
    assert r.done and r.done_reason == ref["choices"][0]["finish_reason"]
    assert r.eval_count == len(want_ids) and r.prompt_eval_count == ref["usage"]["prompt_tokens"]
    for d in (r.total_duration, r.prompt_eval_duration, r.eval_duration):
        assert isinstance(d, int) and 0 <= d <= r.total_duration
    assert r.load_duration == 0

    parts = [p async for p in await client.chat(model=bundled.name, messages=MESSAGES, options=opts, stream=True)]
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == want_text
    assert parts[-1].eval_count == len(want_ids) and parts[-1].done_reason == r.done_reason

    # generate without raw: the prompt as the user's message, `system` as the system message
    g = await client.generate(model=bundled.name, prompt=MESSAGES[1]["content"], system=MESSAGES[0]["content"],
                              options=opts, stream=False)
    assert g.response == want_text
    prompt_ids = ref["meshllm"]["prompt_token_ids"]
    assert list(g.context) == prompt_ids + want_ids
    parts = [p async for p in await client.generate(model=bundled.name, prompt=MESSAGES[1]["content"],
                                                     system=MESSAGES[0]["content"], options=opts, stream=True)]
    assert "".join(p.response or "" for p in parts) == want_text and parts[-1].done


async def test_raw_generate_equals_openai_completions(served: Served, bundled: Manifest) -> None:
    s = served
    got, text, _ = await s.post("/v1/completions", {"prompt": "def add(a, b):\n", "max_tokens": 10, "temperature": 0})
    ref = json.loads(text)
    got, text, ctype = await s.post("/api/generate", {"model": bundled.name, "prompt": "def add(a, b):\n",
                                                      "raw": True, "stream": False,
                                                      "options": {"temperature": 0, "num_predict": 10}})
    assert got == 200 and ctype.startswith("application/json")
    doc = json.loads(text)
    assert doc["response"] == ref["choices"][0]["text"] and doc["eval_count"] == 10
    assert doc["done_reason"] == "length" and "context" not in doc  # raw mode returns no context

    # `context` carries a conversation on: the earlier ids, then the new prompt
    follow = await s.post("/api/generate", {"model": bundled.name, "prompt": "x", "raw": True, "stream": False,
                                            "context": ref["meshllm"]["prompt_token_ids"],
                                            "options": {"temperature": 0, "num_predict": 3}})
    assert follow[0] == 200 and json.loads(follow[1])["prompt_eval_count"] > len(ref["meshllm"]["prompt_token_ids"])


async def test_streams_are_ndjson_by_default_with_ollamas_fields(served: Served, bundled: Manifest) -> None:
    s = served
    got, text, ctype = await s.post("/api/chat", {"model": bundled.name + ":latest", "messages": MESSAGES,
                                                  "options": {"temperature": 0, "num_predict": 5, "seed": 3}})
    assert got == 200 and ctype.startswith("application/x-ndjson")
    lines = [json.loads(x) for x in text.strip().split("\n")]
    for d in lines[:-1]:
        assert set(d) == {"model", "created_at", "message", "done"} and d["done"] is False
        assert d["model"] == bundled.name + ":latest" and d["message"]["role"] == "assistant"
        assert d["created_at"].endswith("Z")
    end = lines[-1]
    assert end["done"] is True and end["done_reason"] in ("stop", "length") and end["message"]["content"] == ""
    for k in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
              "eval_duration"):
        assert isinstance(end[k], int) and end[k] >= 0, k
    assert end["eval_count"] <= 5


async def test_stop_and_context_options(served: Served, bundled: Manifest) -> None:
    s = served
    body = {"model": bundled.name, "prompt": "def add(a, b):\n", "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 20}}
    full = json.loads((await s.post("/api/generate", body))[1])["response"]
    cut = full[3:6]
    assert cut and cut in full
    body["options"] = {"temperature": 0, "num_predict": 20, "stop": [cut]}
    doc = json.loads((await s.post("/api/generate", body))[1])
    assert doc["response"] == full[:full.index(cut)] and doc["done_reason"] == "stop"
    # num_ctx bounds prompt + answer: the answer stops where the context ends
    n_prompt = doc["prompt_eval_count"]
    body["options"] = {"temperature": 0, "num_ctx": n_prompt + 4, "num_predict": -1}
    doc = json.loads((await s.post("/api/generate", body))[1])
    assert doc["eval_count"] <= 4 and doc["done_reason"] == "length"
    body["options"] = {"num_ctx": n_prompt}
    got, text, _ = await s.post("/api/generate", body)
    assert got == 400 and "num_ctx" in json.loads(text)["error"]


async def test_errors_are_ollamas_shape_with_the_right_status(served: Served, bundled: Manifest) -> None:
    s = served
    chat = {"model": bundled.name, "messages": MESSAGES}
    cases = [
        ("/api/chat", b"{not json", 400),
        ("/api/chat", {"messages": MESSAGES}, 400),  # model is required
        ("/api/chat", {**chat, "model": "llama3:8b"}, 404),
        ("/api/chat", {**chat, "messages": "hi"}, 400),
        ("/api/chat", {**chat, "tools": [{"type": "function"}]}, 400),
        ("/api/chat", {**chat, "format": "json"}, 400),
        ("/api/chat", {**chat, "options": {"temperature": "hot"}}, 400),
        ("/api/chat", {**chat, "options": {"num_predict": 0}}, 400),
        ("/api/chat", {**chat, "options": "fast"}, 400),
        ("/api/chat", {**chat, "messages": [{"role": "user", "content": "x", "images": ["AAAA"]}]}, 400),
        ("/api/generate", {"model": bundled.name, "prompt": 5}, 400),
        ("/api/generate", {"model": bundled.name, "prompt": "x", "suffix": "y"}, 400),
        ("/api/generate", {"model": bundled.name, "prompt": "x", "context": ["a"]}, 400),
        ("/api/show", {"model": "nope"}, 404),
    ]
    for path, body, status in cases:
        got, text, _ = await s.post(path, body)
        assert got == status, (path, body, text)
        doc = json.loads(text)
        assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"], doc
    with pytest.raises(ollama.ResponseError) as e:
        await s.client().chat(model="llama3:8b", messages=MESSAGES)
    assert e.value.status_code == 404
    # the node still serves
    got, text, _ = await s.post("/api/chat", {**chat, "stream": False, "options": {"num_predict": 2}})
    assert got == 200 and json.loads(text)["eval_count"] == 2


async def test_a_full_queue_and_no_plan_are_503(served: Served, bundled: Manifest) -> None:
    s = served
    entry = s.mesh.node("c").serving.entry
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    gens = [entry.generate([5, 6], long) for _ in range(4)]
    for g in gens:
        await anext(g)
    got, text, _ = await s.post("/api/generate", {"model": bundled.name, "prompt": "x"})
    assert got == 503 and "error" in json.loads(text)
    for g in gens:
        await g.aclose()
    s.mesh.node("c").control.active_epoch = 0
    got, text, _ = await s.post("/api/chat", {"model": bundled.name, "messages": MESSAGES})
    assert got == 503 and "plan" in json.loads(text)["error"]


async def test_listing_showing_and_loading(served: Served, bundled: Manifest) -> None:
    s = served
    client = s.client()
    tags = await client.list()
    assert [m.model for m in tags.models] == [bundled.name + ":latest"]
    assert tags.models[0].details.family == "llama" and tags.models[0].size > 0
    ps = await client.ps()
    assert ps.models[0].context_length == bundled.config.max_position
    shown = await client.show(bundled.name)
    assert shown.modelinfo["llama.block_count"] == bundled.config.num_layers
    assert shown.template == (bundled.chat_template or "")
    got, doc = await s.get("/api/version")
    assert got == 200 and doc["version"].count(".") == 2
    # an empty conversation is Ollama's "load the model": answered at once, nothing generated
    got, text, _ = await s.post("/api/chat", {"model": bundled.name, "messages": []})
    doc = json.loads(text)
    assert got == 200 and doc["done"] is True and doc["done_reason"] == "load"


async def test_the_api_key_guards_ollamas_endpoints_too(bundled: Manifest) -> None:
    s, server = await _serve(bundled, ServeConfig(), api_key="s3cret-key")
    try:
        got, text, _ = await s.post("/api/chat", {"model": bundled.name, "messages": MESSAGES})
        assert got == 401 and "error" in json.loads(text)
        with pytest.raises(ollama.ResponseError) as e:
            await s.client().list()
        assert e.value.status_code == 401
        keyed = s.client(headers={"Authorization": "Bearer s3cret-key"})
        r = await keyed.chat(model=bundled.name, messages=MESSAGES, options={"num_predict": 2}, stream=False)
        assert r.eval_count == 2
    finally:
        await s.close(server)


# --- keep-alives --------------------------------------------------------------------------------------
@pytest.fixture
async def held(bundled: Manifest) -> AsyncIterator[Served]:
    """Keep-alives after 50 ms idle, on a mesh whose prefill a test can hold."""
    s, server = await _serve(bundled, ServeConfig(keepalive_s=0.05))
    yield s
    await s.close(server)


async def test_a_held_prefill_gets_sse_keepalive_comments(held: Served, bundled: Manifest) -> None:
    s = held
    body = {"prompt": "def add(a, b):\n", "max_tokens": 6, "temperature": 0}
    want = json.loads((await s.post("/v1/completions", body))[1])["choices"][0]["text"]
    gate = s.mesh.node("a").hold_inference()  # the prefill replica's inference thread
    try:
        async with aiohttp.ClientSession() as sess, \
                sess.post(s.root + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status == 200
            seen: list[bytes] = []
            while b"".join(seen).count(b": keep-alive\n\n") < 2:  # before the first token
                seen.append(await asyncio.wait_for(r.content.readline(), 30))
            gate.set()
            rest = await asyncio.wait_for(r.content.read(), 30)
    finally:
        gate.set()
    events = [x[len(b"data: "):] for x in (b"".join(seen) + rest).split(b"\n\n") if x.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want


async def test_the_openai_and_ollama_clients_read_through_keepalives(held: Served, bundled: Manifest) -> None:
    s = held
    ref = await _openai_chat(s, bundled.name, MESSAGES, 6)
    want = ref["choices"][0]["message"]["content"]

    async def openai_stream() -> str:
        c = openai.AsyncOpenAI(base_url=s.root + "/v1", api_key="unused", max_retries=0)
        try:
            st = await c.chat.completions.create(model=bundled.name, messages=MESSAGES, max_tokens=6,  # type: ignore[arg-type]
                                                 temperature=0, stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in st if ch.choices])
        finally:
            await c.close()

    async def ollama_stream() -> str:
        parts = [p async for p in await s.client().chat(
            model=bundled.name, messages=MESSAGES, options={"temperature": 0, "num_predict": 6}, stream=True)]
        assert parts[-1].done and parts[-1].eval_count == len(ref["meshllm"]["token_ids"])
        return "".join(p.message.content or "" for p in parts)

    for run in (openai_stream, ollama_stream):
        before = s.api.keepalives
        gate = s.mesh.node("a").hold_inference()
        try:
            task = asyncio.ensure_future(run())
            await async_wait_until(lambda b=before: s.api.keepalives >= b + 2, "keep-alives on the held stream", 30)
            gate.set()
            assert await asyncio.wait_for(task, 60) == want
        finally:
            gate.set()


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=20), lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
_options = st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.floats(-1, 3), _json), "top_p": st.one_of(st.floats(-1, 2), _json),
    "top_k": st.one_of(st.integers(-3, 100), _json), "seed": st.one_of(st.integers(-5, 2**70), _json),
    "stop": st.one_of(st.lists(st.text(max_size=4), max_size=3), _json),
    "num_ctx": st.one_of(st.integers(-2, 2000), _json), "repeat_penalty": _json, "mirostat": _json})
_ollama_fields = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just("tiny"), st.just("tiny:latest"), st.text(max_size=8), _json),
    "messages": st.one_of(st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": st.text(max_size=30)},
        optional={"images": _json}), max_size=3), _json),
    "prompt": st.one_of(st.text(max_size=40), _json), "system": st.one_of(st.text(max_size=10), _json),
    "context": st.one_of(st.lists(st.integers(-3, 5000), max_size=6), _json), "raw": _json,
    "stream": _json, "format": _json, "keep_alive": _json, "think": _json,
    "options": st.one_of(_options, _json)})


async def test_fuzzed_requests_get_ollamas_error_or_an_answer(served: Served, bundled: Manifest) -> None:
    """Random bodies at /api/chat and /api/generate: an answer or {"error": ...} with a 4xx/503,
    never a 500, a hang or a crash; afterwards the node answers and has freed everything."""
    from hypothesis import HealthCheck, given, settings

    s = served
    bodies: list[bytes] = []

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_ollama_fields)
    def collect(doc: dict[str, Any]) -> None:
        if isinstance(doc.get("options"), dict):  # short answers: the fuzz is about the request
            doc["options"] = {**doc["options"], "num_predict": 2}
        else:
            doc.setdefault("options", {"num_predict": 2})
        bodies.append(json.dumps(doc).encode())

    collect()
    for i, body in enumerate(bodies):
        status, text, _ = await s.post("/api/generate" if i % 2 else "/api/chat", body)
        assert status in (200, 400, 404, 413, 503), (status, body[:200], text[:300])
        if status != 200:
            doc = json.loads(text)
            assert isinstance(doc["error"], str) and doc["error"], body[:200]
        else:
            last = json.loads(text.strip().split("\n")[-1])
            assert last.get("done") is True or "error" in last, (body[:200], text[-300:])
    got, text, _ = await s.post("/api/chat", {"model": bundled.name, "messages": MESSAGES, "stream": False,
                                              "options": {"num_predict": 3, "temperature": 0}})
    assert got == 200 and json.loads(text)["eval_count"] >= 1
    await async_wait_until(lambda: not any({**s.mesh.held(), **s.mesh.kv_in_use()}.values()),
                           "every request freed", 10)


async def test_a_client_gone_during_keepalives_frees_its_request(held: Served, bundled: Manifest) -> None:
    s = held
    entry = s.mesh.node("c").serving.entry
    gate = s.mesh.node("a").hold_inference()
    try:
        for path, body in (("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 50, "stream": True}),
                           ("/api/chat", {"model": bundled.name, "messages": MESSAGES})):
            async with aiohttp.ClientSession() as sess, sess.post(s.root + path, json=body) as r:
                assert r.status == 200
                before = s.api.keepalives
                while s.api.keepalives < before + 1:
                    await asyncio.wait_for(r.content.readline(), 30)
                assert len(entry.requests) == 1
            # the connection is closed with the prefill still held: the request goes everywhere
            await async_wait_until(lambda: not entry.requests, f"the abandoned {path} request dropped", 10)
    finally:
        gate.set()
    await async_wait_until(lambda: not any({**s.mesh.held(), **s.mesh.kv_in_use()}.values()),
                           "every request freed", 10)


async def test_request_ids_and_refusals_reach_logs_and_metrics_as_on_the_openai_api(served: Served,
                                                                                    bundled: Manifest) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from meshllm.obs.metrics import render

    s = served

    def requests_total(outcome: str) -> float:
        text = render(s.mesh.node("c").serving.registry).decode()
        return sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
                   if x.name == "meshllm_requests_total" and x.labels.get("outcome") == outcome)

    ok, rejected = requests_total("ok"), requests_total("rejected")
    async with aiohttp.ClientSession() as sess:
        async with sess.post(s.root + "/api/chat", headers={"X-Request-Id": "client-7"},
                             json={"model": bundled.name, "messages": MESSAGES, "options": {"num_predict": 2}}) as r:
            assert r.status == 200 and r.headers["X-Request-Id"] == "client-7"
            await r.read()
        async with sess.post(s.root + "/api/generate", json={"model": bundled.name, "prompt": "x", "stream": False,
                                                             "options": {"num_predict": 2}}) as r:
            assert r.status == 200 and r.headers["X-Request-Id"]  # the mesh's own id when the client sent none
        async with sess.post(s.root + "/api/chat", json={"model": "nope", "messages": MESSAGES}) as r:
            assert r.status == 404
    assert requests_total("ok") == ok + 2 and requests_total("rejected") == rejected + 1
