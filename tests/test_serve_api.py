"""The OpenAI-compatible API over a data-plane mesh of the bundled model: the official ``openai``
client (streaming and not) gets what one process generates; bad requests get OpenAI's error JSON
with the right status; a node lost mid-stream is an error event the client raises."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import strategies as st
from servemesh import DataMesh, openai_front
from waiting import async_wait_until

from meshllm.model.manifest import Manifest, load_manifest
from meshllm.model.paths import BUNDLED_MODEL
from meshllm.model.tokenizer import Tokenizer
from meshllm.runtime.generate import generate
from meshllm.runtime.runner import StageRunner
from meshllm.runtime.sampling import SamplingParams
from meshllm.serve.api import OpenAIApi
from meshllm.serve.config import ServeConfig

# the bundled model: 6 layers, blocks 0..7; prefill on a, decoder split over b and c


@pytest.fixture(scope="module")
def bundled() -> Manifest:
    return load_manifest(BUNDLED_MODEL)


@pytest.fixture
async def api(bundled: Manifest) -> AsyncIterator[tuple[DataMesh, str]]:
    async with openai_front(bundled, ServeConfig(max_queue=4, queue_timeout_s=1.0)) as (mesh, root):
        yield mesh, root + "/v1"
        for c in _clients:
            await c.close()
        _clients.clear()


_clients: list[openai.AsyncOpenAI] = []


def client_for(base: str, **kw: object) -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=base, api_key="unused", **kw)  # type: ignore[arg-type]
    _clients.append(c)
    return c


def one_process(manifest: Manifest, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
    tok = Tokenizer.from_manifest(manifest)
    r = generate(StageRunner(manifest, 0, manifest.config.num_blocks, threads=1), prompt_ids, params, tokenizer=tok)
    return list(r.token_ids), r.text


async def test_openai_client_completions_and_chat_equal_one_process(api, bundled: Manifest) -> None:
    _, base = api
    client = client_for(base)
    tok = Tokenizer.from_manifest(bundled)
    models = await client.models.list()
    assert [m.id for m in models.data] == [bundled.name]

    prompt = "def add(a, b):\n"
    params = SamplingParams(temperature=0.0, max_tokens=24)
    ids, text = one_process(bundled, tok.encode(prompt), params)
    r = await client.completions.create(model=bundled.name, prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == text
    assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == len(tok.encode(prompt))

    stream = await client.completions.create(model=bundled.name, prompt=prompt, max_tokens=24, temperature=0,
                                             stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == text

    messages = [{"role": "user", "content": "import os"}]
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=20)
    _, chat_text = one_process(bundled, tok.encode_chat(messages), seeded)
    r = await client.chat.completions.create(model=bundled.name, messages=messages, max_tokens=20,
                                             temperature=0.8, top_p=0.9, seed=5)
    assert r.choices[0].message.content == chat_text
    stream = await client.chat.completions.create(model=bundled.name, messages=messages, max_tokens=20,
                                                  temperature=0.8, top_p=0.9, seed=5, stream=True,
                                                  stream_options={"include_usage": True})
    parts, usage = [], None
    async for c in stream:
        if c.choices:
            parts.append(c.choices[0].delta.content or "")
        if c.usage is not None:
            usage = c.usage
    assert "".join(parts) == chat_text
    assert usage is not None and usage.prompt_tokens == len(tok.encode_chat(messages))


async def test_stop_strings_cut_the_answer_like_one_process(api, bundled: Manifest) -> None:
    _, base = api
    client = client_for(base)
    tok = Tokenizer.from_manifest(bundled)
    prompt = "class Stack:\n    def __init__(self"
    full = one_process(bundled, tok.encode(prompt), SamplingParams(temperature=0.0, max_tokens=40))[1]
    stop = full.strip()[len(full.strip()) // 2:][:3] or "self"
    _, text = one_process(bundled, tok.encode(prompt), SamplingParams(temperature=0.0, max_tokens=40, stop=(stop,)))
    r = await client.completions.create(model=bundled.name, prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == text and r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text


async def _post(base: str, path: str, data: bytes | str) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s, s.post(base + path, data=data,
                                                    headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_bad_requests_get_openai_errors(api, bundled: Manifest) -> None:
    _, base = api
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps([1, 2]), 400, "invalid_json"),
        (json.dumps({"prompt": 5}), 400, None),
        (json.dumps({"prompt": "x", "max_tokens": -1}), 400, None),
        (json.dumps({"prompt": "x", "max_tokens": 10**9}), 400, "context_length_exceeded"),
        (json.dumps({"prompt": "x", "temperature": "hot"}), 400, "invalid_value"),
        (json.dumps({"prompt": "x", "model": "gpt-4"}), 404, "model_not_found"),
        (json.dumps({"prompt": [99999]}), 400, "invalid_value"),
        (json.dumps({"prompt": "x" * 70000}), 413, "body_too_large"),
    ]
    for body, status, code in cases:
        got, doc, _ = await _post(base, "/completions", body)
        assert got == status, (body[:40], doc)
        assert "message" in doc["error"] and doc["error"]["message"]
        if code:
            assert doc["error"]["code"] == code
    got, doc, _ = await _post(base, "/chat/completions", json.dumps({"messages": "hi"}))
    assert got == 400
    # the node still serves
    got, doc, _ = await _post(base, "/completions", json.dumps({"prompt": "x", "max_tokens": 3, "temperature": 0}))
    assert got == 200 and len(doc["meshllm"]["token_ids"]) == 3


async def test_queue_full_is_429_and_no_plan_is_503(api) -> None:
    mesh, base = api
    entry = mesh.node("c").serving.entry
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    gens = [entry.generate([5, 6], long) for _ in range(4)]
    for g in gens:
        await anext(g)
    got, doc, headers = await _post(base, "/completions", json.dumps({"prompt": "x", "max_tokens": 3}))
    assert got == 429 and doc["error"]["code"] == "queue_full" and headers.get("Retry-After")
    for g in gens:
        await g.aclose()
    mesh.node("c").control.active_epoch = 0
    got, doc, headers = await _post(base, "/completions", json.dumps({"prompt": "x", "max_tokens": 3}))
    assert got == 503 and headers.get("Retry-After")


async def test_a_node_lost_mid_stream_is_an_error_the_client_raises(api, bundled: Manifest) -> None:
    mesh, base = api
    client = client_for(base, max_retries=0)
    stream = await client.completions.create(model=bundled.name, prompt="def f(x):", max_tokens=300,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
    n = 0
    with pytest.raises(openai.APIError):
        async for _ in stream:
            n += 1
            if n == 3:
                await mesh.kill("b")
    assert n >= 3
    await asyncio.sleep(0)


async def test_an_api_key_is_required_when_set(api, bundled: Manifest) -> None:
    mesh, _ = api
    app = web.Application()
    OpenAIApi(mesh.node("a").serving, bundled.name, bundled.model_id, api_key="s3cret-key").mount(app)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = str(server.make_url("/v1"))
        got, doc, _ = await _post(base, "/completions", json.dumps({"prompt": "x", "max_tokens": 2}))
        assert got == 401 and doc["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await client_for(base, max_retries=0).completions.create(model=bundled.name, prompt="x", max_tokens=2)
        keyed = openai.AsyncOpenAI(base_url=base, api_key="s3cret-key")
        _clients.append(keyed)
        r = await keyed.completions.create(model=bundled.name, prompt="x", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
    finally:
        await server.close()


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                     | st.text(max_size=40), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                     max_leaves=12)
_fields = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.text(max_size=60), st.lists(st.integers(-5, 5000), max_size=20), _json),
    "messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                           "content": st.text(max_size=40)}), max_size=3), _json),
    "max_tokens": st.one_of(st.integers(-3, 10**6), _json), "temperature": st.one_of(st.floats(-2, 5), _json),
    "top_p": st.one_of(st.floats(-1, 2), _json), "seed": st.one_of(st.integers(-5, 2**70), _json),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20), _json),
    "stream": _json, "n": _json, "model": st.one_of(st.text(max_size=10), _json)})


async def test_fuzzed_requests_get_a_clear_answer_and_the_node_keeps_serving(api, bundled: Manifest) -> None:
    """Random JSON (and random bytes) at both endpoints: a 200 or OpenAI's error JSON with a 4xx/503
    status, never a 500, a hang or a crash; afterwards the node answers correctly."""
    _, base = api
    import random

    from hypothesis import HealthCheck, given, settings

    bodies: list[bytes] = []

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_fields)
    def collect(doc: dict) -> None:
        doc = {**doc, "max_tokens": doc.get("max_tokens", 2) if not isinstance(doc.get("max_tokens"), int)
               or doc.get("max_tokens", 0) < 50 else 3}
        try:
            bodies.append(json.dumps(doc).encode())
        except ValueError:  # nan is not JSON: send it raw, as a broken client would
            bodies.append(repr(doc).encode())

    collect()
    rnd = random.Random(0)
    bodies += [bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 200))) for _ in range(20)]
    for i, body in enumerate(bodies):
        path = "/completions" if i % 2 else "/chat/completions"
        async with aiohttp.ClientSession() as s, s.post(base + path, data=body,
                                                        headers={"Content-Type": "application/json"}) as r:
            raw = await r.read()
            assert r.status in (200, 400, 404, 413, 429, 503), (r.status, body[:200], raw[:300])
            if r.status != 200:
                doc = json.loads(raw)
                assert doc["error"]["message"], body[:200]
            elif b"text/event-stream" in r.headers.get("Content-Type", "").encode():
                assert raw.rstrip().endswith(b"[DONE]") or b'"error"' in raw
    tok = Tokenizer.from_manifest(bundled)
    ids, _ = one_process(bundled, tok.encode("def f():"), SamplingParams(temperature=0.0, max_tokens=8))
    got, doc, _ = await _post(base, "/completions", json.dumps({"prompt": "def f():", "max_tokens": 8,
                                                                "temperature": 0}))
    assert got == 200 and doc["meshllm"]["token_ids"] == ids
    await async_wait_until(lambda: not any(mesh_held(api[0]).values()), "every request freed", 10)


def mesh_held(mesh: DataMesh) -> dict[str, int]:
    return {**mesh.held(), **{f"kv-{k}": v for k, v in mesh.kv_in_use().items()}}


@pytest.mark.parametrize("path", ["/v1/completions", "/api/generate"])
async def test_a_client_that_leaves_a_request_not_streamed_frees_it(api, bundled: Manifest, path: str) -> None:
    """aiohttp does not cancel a handler when its client goes away; an answer that is not streamed
    writes nothing before the end, so the front watches the connection and ends the request on
    every node (it used to decode to the end of the context for nobody)."""
    mesh, base = api
    a = mesh.node("c")  # the entry
    gates = [n.hold_inference() for n in mesh.nodes.values()]  # in flight until the client has gone
    body = ({"prompt": "hello", "max_tokens": 40, "temperature": 0} if path.startswith("/v1")
            else {"model": bundled.name, "prompt": "hello", "stream": False, "options": {"num_predict": 40}})
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            async with s.post(base.removesuffix("/v1") + path, json=body,
                              timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                await r.read()
    await async_wait_until(lambda: a.serving.entry.stats["cancelled"] == 1, "the entry to cancel the request", 5.0)
    for g in gates:
        g.set()
    await async_wait_until(lambda: not a.serving.entry.requests and not any(mesh.kv_in_use().values())
                           and not any(mesh.held().values()), "the request freed on every node", 5.0)
